"""A TLS and SASL front on loopback before a plaintext Kafka broker: real handshakes, then bytes passed through.

With an AclPolicy (tests/kafka_acl.py) the bytes are Kafka frames that the front checks one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from imgstream.producer.embedded_broker import HOST
from tests.kafka_acl import AclPolicy, AclSession, Answer, Close, Forward
from tests.sasl_server import (
    ALL_MECHANISMS,
    OAuthBearerServer,
    PlainServer,
    SaslFailed,
    SaslServer,
    ScramCredential,
    ScramServer,
    scram_credential,
)

log = logging.getLogger(__name__)

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED = 33, 58


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _skip_tagged_fields(data: bytes, pos: int) -> int:
    count, pos = _read_uvarint(data, pos)
    for _ in range(count):
        _, pos = _read_uvarint(data, pos)
        size, pos = _read_uvarint(data, pos)
        pos += size
    return pos


@dataclass(frozen=True)
class _Request:
    api_key: int
    api_version: int
    correlation_id: int
    body: bytes  # what follows the request header

    @property
    def flexible(self) -> bool:
        # Of the requests the front answers itself, only SaslAuthenticate v2+ uses the compact encoding.
        return self.api_key == SASL_AUTHENTICATE and self.api_version >= 2


def _parse_request(frame: bytes) -> _Request:
    api_key, api_version, correlation_id, client_id_len = struct.unpack_from(">hhih", frame)
    pos = 10 + max(client_id_len, 0)
    request = _Request(api_key, api_version, correlation_id, b"")
    if request.flexible:
        pos = _skip_tagged_fields(frame, pos)
    return _Request(api_key, api_version, correlation_id, frame[pos:])


def _response(request: _Request, body: bytes) -> bytes:
    header = struct.pack(">i", request.correlation_id) + (b"\0" if request.flexible else b"")
    return struct.pack(">i", len(header) + len(body)) + header + body


def _handshake_response(request: _Request, error_code: int, mechanisms: tuple[str, ...]) -> bytes:
    body = struct.pack(">hi", error_code, len(mechanisms))
    for name in mechanisms:
        body += struct.pack(">h", len(name)) + name.encode()
    return _response(request, body)


def _authenticate_bytes(request: _Request) -> bytes:
    if request.flexible:
        size, pos = _read_uvarint(request.body, 0)
        return request.body[pos:pos + size - 1]
    (size,) = struct.unpack_from(">i", request.body)
    return request.body[4:4 + size]


def _authenticate_response(request: _Request, error_code: int, message: str | None, auth_bytes: bytes) -> bytes:
    encoded = message.encode() if message is not None else None
    if request.flexible:
        body = struct.pack(">h", error_code)
        body += _uvarint(0) if encoded is None else _uvarint(len(encoded) + 1) + encoded
        body += _uvarint(len(auth_bytes) + 1) + auth_bytes + struct.pack(">q", 0) + b"\0"
        return _response(request, body)
    body = struct.pack(">h", error_code)
    body += struct.pack(">h", -1) if encoded is None else struct.pack(">h", len(encoded)) + encoded
    body += struct.pack(">i", len(auth_bytes)) + auth_bytes
    if request.api_version >= 1:
        body += struct.pack(">q", 0)  # session_lifetime_ms 0: no re-authentication (KIP-368)
    return _response(request, body)


# Kafka's socket.request.max.bytes: a TLS ClientHello sent to a plaintext port reads as a ~370 MB
# frame, which a broker refuses at once instead of waiting for it.
MAX_REQUEST_BYTES = 100 * 1024 * 1024


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    try:
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        if not 0 <= size <= MAX_REQUEST_BYTES:
            return None
        return await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        return None


@dataclass(frozen=True)
class FrontEvent:
    """Something a front saw: kind is tls_failed, authenticated, auth_failed, refused, denied, no_upstream or error.

    denied: the ACL policy refused a request (detail e.g. "write topic-x: error 29").
    """

    kind: str
    detail: str
    mechanism: str | None = None
    principal: str | None = None


class _LoopThread:
    """One event loop in a daemon thread that serves every front, so sync and async tests can use them."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="kafka-fronts", daemon=True).start()
                cls._loop = loop
            return cls._loop

    @classmethod
    def run(cls, coro: Any, timeout_s: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, cls.loop()).result(timeout_s)


class _Sink(Protocol):
    """Where the front writes to a client or broker: a StreamWriter, or the TLS layer over one."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class _ServerTls:
    """Server-side TLS over a plain stream with ssl.MemoryBIO, so that a failed handshake still sends its alert.

    asyncio's own TLS drops the alert (the client would see a bare close), where a Kafka broker sends
    it: a client without the required certificate must learn "certificate required", as in production.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext) -> None:
        self._reader, self._writer = reader, writer
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._pump: asyncio.Task[None] | None = None

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _receive(self) -> None:
        data = await self._reader.read(1 << 16)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def handshake(self, failed: Callable[[ssl.SSLError], None]) -> None:
        """Complete the handshake; on failure, call `failed` before the client can see the alert."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._receive()
                continue
            except ssl.SSLError as exc:
                failed(exc)
                with contextlib.suppress(OSError):
                    await self._flush()  # the alert, e.g. certificate required or unknown CA
                raise
            await self._flush()
            return

    def start_reading(self) -> asyncio.StreamReader:
        """A stream of the decrypted bytes the client sends."""
        plain = asyncio.StreamReader()

        async def pump() -> None:
            try:
                while True:
                    try:
                        data = self._tls.read(1 << 16)
                    except ssl.SSLWantReadError:
                        await self._flush()
                        await self._receive()
                        continue
                    if not data:
                        break
                    plain.feed_data(data)
            except (ssl.SSLError, OSError):
                pass
            finally:
                plain.feed_eof()

        self._pump = asyncio.ensure_future(pump())
        return plain

    def write(self, data: bytes) -> None:
        self._tls.write(data)
        self._writer.write(self._outgoing.read())

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    async def aclose(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self._tls.unwrap()  # close_notify
        with contextlib.suppress(OSError):
            await self._flush()


class KafkaFront:
    """A proxy on 127.0.0.1 before a plaintext Kafka broker: TLS (optionally mutual) and/or SASL, then bytes.

    Bind with `start()` first (the port is then fixed, so a broker can advertise it), set `upstream`
    once the broker runs; connections that arrive without an upstream are closed. With `acl`, every
    request after login is checked against that policy (which may change while clients run).
    """

    def __init__(
        self,
        *,
        upstream: str | None = None,
        tls: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
        mechanisms: tuple[str, ...] = (),
        users: Mapping[str, str] | None = None,
        oauth_validate: Callable[[str], bool] | None = None,
        acl: AclPolicy | None = None,
        port: int = 0,
    ) -> None:
        unknown = set(mechanisms) - set(ALL_MECHANISMS)
        if unknown:
            raise ValueError(f"unsupported SASL mechanisms {sorted(unknown)}")
        self.upstream = upstream
        self.mechanisms = tuple(mechanisms)
        self.acl = acl
        self.events: list[FrontEvent] = []
        self._port = port
        self._oauth_validate = oauth_validate
        # Salted once per user and mechanism, as a broker stores them (the password itself is not kept).
        self._scram: dict[tuple[str, str], ScramCredential] = {}
        self._users = dict(users or {})
        self._ssl: ssl.SSLContext | None = None
        if tls is not None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(*tls)
            if client_ca is not None:
                self._ssl.verify_mode = ssl.CERT_REQUIRED
                self._ssl.load_verify_locations(client_ca)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{HOST}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> KafkaFront:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self._port))
        sock.listen(128)
        self._port = sock.getsockname()[1]
        self._server = _LoopThread.run(asyncio.start_server(self._accept, sock=sock))
        return self

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            _LoopThread.run(self._close(server))

    async def _close(self, server: asyncio.Server) -> None:
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    def __enter__(self) -> KafkaFront:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _scram_credential(self, mechanism: str) -> Callable[[str], ScramCredential | None]:
        def lookup(user: str) -> ScramCredential | None:
            if user not in self._users:
                return None
            if (user, mechanism) not in self._scram:
                self._scram[user, mechanism] = scram_credential(mechanism, self._users[user], os.urandom(16))
            return self._scram[user, mechanism]

        return lookup

    def _note(self, kind: str, detail: str) -> None:
        self.events.append(FrontEvent(kind, detail))

    def _mechanism(self, name: str) -> SaslServer:
        if name == "PLAIN":
            return PlainServer(self._users)
        if name == "OAUTHBEARER":
            return OAuthBearerServer(self._oauth_validate)
        return ScramServer(name, self._scram_credential(name))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        client: tuple[asyncio.StreamReader, _Sink] = (reader, writer)
        upstream_writer: asyncio.StreamWriter | None = None
        tls: _ServerTls | None = None
        try:
            if self._ssl is not None:
                tls = _ServerTls(reader, writer, self._ssl)

                def failed(exc: BaseException) -> None:
                    self.events.append(FrontEvent("tls_failed", f"{type(exc).__name__}: {exc}"))

                try:
                    await asyncio.wait_for(tls.handshake(failed), 5.0)
                except ssl.SSLError:
                    return
                except (OSError, asyncio.TimeoutError) as exc:
                    failed(exc)
                    return
                client = (tls.start_reading(), tls)
            if self.upstream is None:
                self.events.append(FrontEvent("no_upstream", "no upstream broker set yet"))
                return
            host, _, port = self.upstream.rpartition(":")
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
            except OSError as exc:
                self.events.append(FrontEvent("no_upstream", f"{self.upstream}: {exc}"))
                return
            acl = AclSession(self.acl, self._note) if self.acl is not None else None
            if self.mechanisms and not await self._authenticate(*client, upstream_reader, upstream_writer, acl):
                return
            if acl is not None:
                await _checked_pipe(*client, upstream_reader, upstream_writer, acl, self._note)
            else:
                await _pipe(*client, upstream_reader, upstream_writer)
        except asyncio.CancelledError:
            pass  # stop(): ending quietly, as Python 3.11's start_server logs a cancelled handler as an error
        except Exception as exc:  # a bug in the front: visible in the events and the log, not a silent close
            self.events.append(FrontEvent("error", f"{type(exc).__name__}: {exc}"))
            log.exception("Kafka front on %s failed", self.address)
        finally:
            if tls is not None:
                await tls.aclose()
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()
            self._connections.discard(task)

    def _step(self, server: SaslServer, mechanism: str, token: bytes) -> tuple[bytes, str | None]:
        """One SASL step, recorded before the client can see its outcome: (challenge, None) or (b"", error)."""
        try:
            challenge = server.step(token)
        except SaslFailed as exc:
            self.events.append(FrontEvent("auth_failed", str(exc), mechanism, server.principal))
            return b"", str(exc)
        if server.complete:
            self.events.append(FrontEvent("authenticated", "", mechanism, server.principal))
        return challenge, None

    async def _authenticate(
        self,
        reader: asyncio.StreamReader,
        writer: _Sink,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
        acl: AclSession | None,
    ) -> bool:
        """Serve ApiVersions (relayed), SaslHandshake and SaslAuthenticate as a SASL listener does."""
        server: SaslServer | None = None
        mechanism = ""
        bare_tokens = False  # after SaslHandshake v0, tokens travel as size-prefixed frames without a header
        while server is None or not server.complete:
            frame = await _read_frame(reader)
            if frame is None:
                self.events.append(FrontEvent("refused", "client closed before authenticating", mechanism))
                return False
            if bare_tokens:
                assert server is not None
                challenge, error = self._step(server, mechanism, frame)
                if error is not None:
                    return False  # no SaslAuthenticate, no error to send: Kafka just closes
                writer.write(struct.pack(">i", len(challenge)) + challenge)
                await writer.drain()
                continue
            request = _parse_request(frame) if len(frame) >= 10 else None
            if request is not None and request.api_key == API_VERSIONS:
                # Tansu lists SaslHandshake v0-1 and SaslAuthenticate v0-2, so its answer serves as ours.
                upstream_writer.write(struct.pack(">i", len(frame)) + frame)
                await upstream_writer.drain()
                answer = await _read_frame(upstream_reader)
                if answer is None:
                    self.events.append(FrontEvent("no_upstream", "upstream closed during ApiVersions"))
                    return False
                step = acl.request(frame) if acl is not None else None
                if isinstance(step, Forward) and step.rewrite is not None:
                    answer = step.rewrite(answer)  # the versions the ACL front can check
                writer.write(struct.pack(">i", len(answer)) + answer)
                await writer.drain()
            elif (request is not None and request.api_key == SASL_HANDSHAKE and server is None
                  and request.api_version <= 1):
                (size,) = struct.unpack_from(">h", request.body)
                mechanism = request.body[2:2 + size].decode("utf-8", "replace")
                if mechanism not in self.mechanisms:
                    self.events.append(FrontEvent("auth_failed", "unsupported mechanism", mechanism))
                    writer.write(_handshake_response(request, UNSUPPORTED_SASL_MECHANISM, self.mechanisms))
                    await writer.drain()
                    return False
                server = self._mechanism(mechanism)
                bare_tokens = request.api_version == 0
                writer.write(_handshake_response(request, 0, self.mechanisms))
                await writer.drain()
            elif (request is not None and request.api_key == SASL_AUTHENTICATE and server is not None
                  and request.api_version <= 2):
                challenge, error = self._step(server, mechanism, _authenticate_bytes(request))
                code = 0 if error is None else SASL_AUTHENTICATION_FAILED
                writer.write(_authenticate_response(request, code, error, challenge))
                await writer.drain()
                if error is not None:
                    return False
            else:
                # A Kafka broker answers with ILLEGAL_SASL_STATE, then closes; the close is what clients see.
                what = "a malformed request" if request is None else \
                    f"request api_key={request.api_key} v{request.api_version}"
                self.events.append(FrontEvent("refused", f"{what} before authentication", mechanism))
                return False
        return True


async def _pipe(
    reader: asyncio.StreamReader,
    writer: _Sink,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    """Copy bytes both ways until either side closes."""

    async def copy(source: asyncio.StreamReader, sink: _Sink) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            while data := await source.read(1 << 16):
                sink.write(data)
                await sink.drain()

    tasks = [asyncio.ensure_future(copy(reader, upstream_writer)),
             asyncio.ensure_future(copy(upstream_reader, writer))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _send(sink: _Sink, frame: bytes) -> bool:
    """Write one frame; False when that end has gone away."""
    try:
        sink.write(struct.pack(">i", len(frame)) + frame)
        await sink.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        return False
    return True


async def _checked_pipe(
    reader: asyncio.StreamReader,
    writer: _Sink,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
    acl: AclSession,
    note: Callable[[str, str], None],
) -> None:
    """Pass frames both ways, each request as `acl` says; answers reach the client in request order."""
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[asyncio.Future[bytes]] = asyncio.Queue()
    owed: deque[tuple[bytes, asyncio.Future[bytes], Callable[[bytes], bytes] | None]] = deque()

    async def requests() -> None:
        while (frame := await _read_frame(reader)) is not None:
            step = acl.request(frame)
            if isinstance(step, Close):
                note(step.kind, step.reason)
                return
            answer: asyncio.Future[bytes] = loop.create_future()
            if isinstance(step, Answer):
                answer.set_result(step.frame)
                answers.put_nowait(answer)
                continue
            if step.answered:
                owed.append((frame[4:8], answer, step.rewrite))  # correlation id
                answers.put_nowait(answer)
            if not await _send(upstream_writer, step.frame):
                return

    async def responses() -> None:
        while (frame := await _read_frame(upstream_reader)) is not None:
            if not owed or owed[0][0] != frame[:4]:
                raise RuntimeError("the broker answered a request the front did not send")
            _, answer, rewrite = owed.popleft()
            answer.set_result(rewrite(frame) if rewrite is not None else frame)

    async def deliver() -> None:
        while True:
            if not await _send(writer, await (await answers.get())):
                return

    tasks = [asyncio.ensure_future(job()) for job in (requests, responses, deliver)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # a bug in the rewriting: _accept records it as an error event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
