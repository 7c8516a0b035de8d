"""Getting image bytes for a request: http(s) behind an SSRF guard, or a blob reader (SPEC §5).

Every failure is an `ImageError` with code image_fetch_failed or image_too_large; a
`TransientFetchError` (timeouts, connection errors, 5xx, 408, 429) is worth trying again
later, which the worker does through the retry topic. The bytes themselves are judged
later by `analysis.imaging.decode_image`.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import os
import re
import socket
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Final, Mapping, Protocol, Sequence
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from imgstream.analysis.imaging import FETCH_FAILED, TOO_LARGE, ImageError
from imgstream.consumer.politeness import HostBackoff, HostPoliteness, origin
from imgstream.schemas.config import FetchConfig
from imgstream.schemas.events import ImageRef

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
# Worth asking again: the host is overloaded, rate-limits, or timed out waiting for our request.
_TRANSIENT_STATUSES: Final = frozenset({408, 429})
# Statuses whose Retry-After holds for every request of this worker to that host.
_HOST_BACKOFF_STATUSES: Final = frozenset({429, 503})
_CHUNK_BYTES: Final = 64 * 1024
# The IANA IPv4 and IPv6 special-purpose address registries, plus multicast and IPv6 site-local:
# no image host lives there. Python's is_global calls several of them global (NAT64, 6to4 relay,
# AS112, AMT, ORCHIDv2, 192.0.0.9 and .10, 2001:db8::/32's newer twin 3fff::/20, ...), so each
# range is named here; the most specific range names an address.
_SPECIAL_PURPOSE_RANGES: Final = (
    ("0.0.0.0/32", "an unspecified address"),
    ("0.0.0.0/8", "a 'this network' address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a shared address space (CGNAT) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address (TEST-NET-1)"),
    ("192.31.196.0/24", "an AS112 DNS address"),
    ("192.52.193.0/24", "an AMT relay address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private address"),
    ("192.175.48.0/24", "an AS112 DNS address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address (TEST-NET-2)"),
    ("203.0.113.0/24", "a documentation address (TEST-NET-3)"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("255.255.255.255/32", "the limited broadcast address"),
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("::/96", "an IPv4-compatible address (deprecated)"),
    ("64:ff9b::/96", "a NAT64 address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("100:0:0:1::/64", "a dummy IPv6 prefix address"),
    ("2001::/23", "an IETF protocol assignment address"),
    ("2001::/32", "a Teredo address"),
    ("2001:2::/48", "a benchmarking address"),
    ("2001:3::/32", "an AMT address"),
    ("2001:4:112::/48", "an AS112 DNS address"),
    ("2001:10::/28", "an ORCHID address (deprecated)"),
    ("2001:20::/28", "an ORCHIDv2 address"),
    ("2001:30::/28", "a drone remote ID address"),
    ("2001:db8::/32", "a documentation address"),
    ("2002::/16", "a 6to4 address"),
    ("2620:4f:8000::/48", "an AS112 DNS address"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "a segment routing (SRv6 SID) address"),
    ("fc00::/7", "a unique-local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address (deprecated)"),
    ("ff00::/8", "a multicast address"),
)
_SPECIAL_PURPOSE: Final = sorted(
    ((ipaddress.ip_network(network), reason) for network, reason in _SPECIAL_PURPOSE_RANGES),
    key=lambda entry: -entry[0].prefixlen,
)
_METADATA_ADDRESSES: Final = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
# gaierror codes that mean "this name does not exist": retrying cannot help.
_PERMANENT_DNS_ERRNOS: Final = frozenset(
    code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None)) if code is not None
)


class TransientFetchError(ImageError):
    """A fetch that failed in a way worth trying again later (image_fetch_failed for now).

    `retry_after_s`: how long the host asked us to wait (Retry-After), when it said.
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(FETCH_FAILED, message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class FetchedImage:
    """The raw bytes of an image and how they were obtained."""

    data: bytes
    final_url: str
    elapsed_ms: float
    attempts: int


# --- the address guard -------------------------------------------------------------------


class AddressBlockedError(OSError):
    """A host resolved to an address the guard refuses (an OSError so aiohttp's connector passes it on)."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        where = f"{address} is" if host == address else f"it resolves to {address},"
        super().__init__(
            f"refused to fetch from host {host!r}: {where} {reason} "
            "(set fetch.allow_private_addresses to allow such addresses)"
        )
        self.host = host
        self.address = address
        self.reason = reason


def address_block_reason(address: IPAddress) -> str | None:
    """Why the guard refuses `address` (e.g. "a loopback address"), or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        # Addresses that embed an IPv4 address reach that address; judge it (too).
        if address.ipv4_mapped is not None:
            reason = address_block_reason(address.ipv4_mapped)
            return f"{reason} (IPv4-mapped)" if reason else None
        if address.sixtofour is not None and (reason := address_block_reason(address.sixtofour)):
            return f"{reason} (inside a 6to4 address)"
    if address in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    for network, reason in _SPECIAL_PURPOSE:
        if address.version == network.version and address in network:
            return f"{reason} ({network})"
    checks: tuple[tuple[bool, str], ...] = (  # what the table may not know yet
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "an unspecified address"),
        (address.is_link_local, "a link-local address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        (address.is_multicast, "a multicast address"),
        (not address.is_global, "not a globally routable address"),
    )
    return next((reason for hit, reason in checks if hit), None)


def check_address(host: str, address: str) -> None:
    """Raise AddressBlockedError unless `address` (what `host` resolved to) is public."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise AddressBlockedError(host, address, "not an IP address the guard can judge") from None
    reason = address_block_reason(parsed)
    if reason is not None:
        raise AddressBlockedError(host, address, reason)


def _looks_like_ip_literal(host: str) -> bool:
    """aiohttp's own test: such hosts skip the resolver, so the guard must see them first."""
    return ":" in host or host.replace(".", "").isdigit()


class GuardedResolver(AbstractResolver):
    """Resolves with an inner resolver and refuses the name if ANY of its addresses is blocked.

    aiohttp connects to exactly the addresses returned here, so a DNS answer that changes
    between the check and the connection (rebinding) cannot slip through.
    """

    def __init__(self, inner: AbstractResolver) -> None:
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            check_address(host, result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


# --- blob readers ------------------------------------------------------------------------


class BlobReader(Protocol):
    """Reads one blob reference (e.g. file:///a.jpg, s3://bucket/key) of a scheme it owns."""

    async def read(self, reference: str, max_bytes: int) -> bytes:
        """The blob's bytes; ImageError(image_too_large) past `max_bytes`, image_fetch_failed otherwise."""
        ...


class FileBlobReader:
    """file:// references to local paths inside the configured root directories (none: refuse all)."""

    def __init__(self, roots: Sequence[str]) -> None:
        self._roots = [Path(os.path.realpath(os.path.expanduser(root))) for root in roots]
        # The roots as path prefixes, for the quick route's containment check.
        self._prefixes = tuple(str(root).rstrip("/") + "/" for root in self._roots)

    async def read(self, reference: str, max_bytes: int) -> bytes:
        # File systems (NFS, FUSE) can block, and resolving the path is a syscall per component:
        # both stay off the event loop. (No context copy as asyncio.to_thread makes: nothing here logs.)
        return await asyncio.get_running_loop().run_in_executor(None, self._read, reference, max_bytes)

    def _read(self, reference: str, max_bytes: int) -> bytes:
        data = self._read_quickly(reference, max_bytes) if _QUICK_ROUTE else None
        if data is not None:
            return data
        return _read_regular_file(self._checked_path(reference), reference, max_bytes)

    def _read_quickly(self, reference: str, max_bytes: int) -> bytes | None:
        """The bytes of a plain file:///path inside the roots, resolved by the kernel: the file opened
        by O_PATH (which opens nothing for I/O: no device or FIFO acts on it), its real path read back
        from /proc/self/fd, then that very file reopened for reading (no symlink can be swapped in
        between). None for anything else, and for every refusal: the full route (realpath, then open)
        decides those and words their errors."""
        if not reference.startswith("file:///") or not _PLAIN_PATH.fullmatch(reference, 7):
            return None  # quoting, queries, dot segments, control characters, //: urlsplit and realpath's
        try:
            located = os.open(reference[7:], _LOCATE_FLAGS)
        except (OSError, ValueError):
            return None
        try:
            real = os.readlink(f"/proc/self/fd/{located}")
            if not real.startswith(self._prefixes) and real + "/" not in self._prefixes:
                return None
            info = os.fstat(located)
            if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
                return None
            fd = os.open(f"/proc/self/fd/{located}", _OPEN_FLAGS)
        except OSError:
            return None
        finally:
            os.close(located)
        try:
            # To the end of the file, as the full route reads (some file systems return short reads).
            data = os.read(fd, info.st_size + 1)
            while len(data) <= info.st_size:
                more = os.read(fd, info.st_size + 1 - len(data))
                if not more:
                    break
                data += more
        except OSError:
            return None
        finally:
            os.close(fd)
        # More than fstat said: it grew meanwhile; the full route reads it to its end, or refuses it.
        return data if len(data) <= info.st_size else None

    def _checked_path(self, reference: str) -> Path:
        """The real path behind `reference`, refused when it is not local or lies outside the roots."""
        parts = urlsplit(reference)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(FETCH_FAILED, f"blob {reference!r} names host {parts.netloc!r}; only local files are read")
        raw_path = unquote(parts.path)
        if not raw_path.startswith("/"):
            raise ImageError(FETCH_FAILED, f"blob {reference!r} is not an absolute path (use file:///path)")
        # realpath resolves symlinks and "..", so a link inside a root cannot lead outside it.
        path = Path(os.path.realpath(raw_path))
        if not any(path.is_relative_to(root) for root in self._roots):
            allowed = ", ".join(str(root) for root in self._roots) or "none"
            raise ImageError(
                FETCH_FAILED,
                f"blob {reference!r} is outside the blob roots (fetch.blob_roots: {allowed}); add its directory to "
                "fetch.blob_roots (IMGSTREAM_FETCH__BLOB_ROOTS or worker --blob-root) to allow it",
            )
        return path


# Opening a FIFO for reading blocks until a writer comes, and opening a device may act on it:
# open without blocking (no controlling terminal either), then look at what was opened.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
# FileBlobReader's quick route: Linux's O_PATH and /proc/self/fd; elsewhere only the full one.
_QUICK_ROUTE: Final = hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd")
_LOCATE_FLAGS: Final = getattr(os, "O_PATH", 0) | getattr(os, "O_CLOEXEC", 0)
# What the quick route takes after file://: absolute paths of printable ASCII and non-ASCII characters,
# without %-escapes, queries or fragments, dot segments (., .., hidden files: realpath's), or //.
_SEGMENT: Final = r"[^\x00-\x20\x7f%?#/.][^\x00-\x20\x7f%?#/]*"
_PLAIN_PATH: Final = re.compile(rf"/(?:{_SEGMENT}(?:/{_SEGMENT})*/?)?")  # one way to match: linear time


def _read_regular_file(path: Path, reference: str, max_bytes: int) -> bytes:
    """Read at most max_bytes from a regular file (never a device, FIFO or socket, and never blocking on one)."""
    try:
        # O_NONBLOCK means nothing to a regular file's reads, and nothing else is read.
        with os.fdopen(os.open(path, _OPEN_FLAGS), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(FETCH_FAILED, f"blob {reference!r} is not a regular file")
            if info.st_size > max_bytes:
                message = f"blob {reference!r} is {info.st_size} bytes, over the limit of {max_bytes}"
                raise ImageError(TOO_LARGE, message)
            data = handle.read(max_bytes + 1)  # +1: the file may have grown since fstat
    except FileNotFoundError:
        raise ImageError(FETCH_FAILED, f"blob {reference!r} not found") from None
    except IsADirectoryError:
        raise ImageError(FETCH_FAILED, f"blob {reference!r} is not a regular file") from None
    except OSError as exc:
        raise ImageError(FETCH_FAILED, f"blob {reference!r} could not be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ImageError(TOO_LARGE, f"blob {reference!r} is over the limit of {max_bytes} bytes")
    return data


# --- http(s) -------------------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying within the fetch (timeout, connection error, 5xx, 408, 429)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


class ImageFetcher:
    """Fetches image bytes for ImageRefs; an async context manager owning one HTTP session."""

    def __init__(self, config: FetchConfig, *, blob_readers: Mapping[str, BlobReader] | None = None) -> None:
        self._config = config
        self._blob_readers: dict[str, BlobReader] = (
            dict(blob_readers) if blob_readers is not None else {"file": FileBlobReader(config.blob_roots or ())}
        )
        # Held per request (one GET, one blob read), not across backoff sleeps.
        self._semaphore = asyncio.Semaphore(config.max_concurrent)
        self.hosts = HostPoliteness(config.per_host_concurrent)
        self._session: aiohttp.ClientSession | None = None

    def register_blob_reader(self, scheme: str, reader: BlobReader) -> None:
        """Serve blob references of `scheme` (e.g. "s3") with `reader`."""
        self._blob_readers[scheme.lower()] = reader

    async def __aenter__(self) -> ImageFetcher:
        self._session = self._new_session()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _new_session(self) -> aiohttp.ClientSession:
        """One pooled session; the guard lives in its resolver so connections go where we checked."""
        resolver: AbstractResolver = ThreadedResolver()
        if not self._config.allow_private_addresses:
            resolver = GuardedResolver(resolver)
        connector = aiohttp.TCPConnector(resolver=resolver, limit=self._config.max_concurrent)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._config.connect_timeout_s),
            headers={"User-Agent": self._config.user_agent, "Accept": "image/*,*/*;q=0.8"},
            # Cookies from one image's site must not ride along to another's; proxies from
            # the environment would bypass the address guard.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def fetch(self, ref: ImageRef) -> FetchedImage:
        """The bytes behind `ref`, within the total deadline; raises ImageError (TransientFetchError when
        trying again later may succeed)."""
        started = time.perf_counter()
        progress = _Progress()
        deadline = asyncio.timeout(self._config.total_timeout_s)
        try:
            async with deadline:
                data, final_url = await self._fetch_within(ref, progress, deadline)
        except TimeoutError as exc:
            if not deadline.expired():  # e.g. a plugged-in blob reader's own timeout
                raise TransientFetchError(f"fetching {ref.location} timed out: {exc!r}") from None
            raise TransientFetchError(progress.deadline_message(ref.location, self._config)) from None
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return FetchedImage(data, final_url, elapsed_ms, max(progress.attempts, 1))

    async def _fetch_within(self, ref: ImageRef, progress: _Progress, deadline: asyncio.Timeout) -> tuple[bytes, str]:
        if ref.url is not None:
            return await self._fetch_url(ref.url, progress, deadline)
        assert ref.blob is not None
        progress.attempts = 1
        return await self._read_blob(ref.blob), ref.blob

    async def _read_blob(self, reference: str) -> bytes:
        scheme = reference.partition("://")[0].lower()
        reader = self._blob_readers.get(scheme)
        if reader is None:
            raise ImageError(FETCH_FAILED, f"blob scheme {scheme!r} is not configured on this worker")
        async with self._semaphore:
            return await reader.read(reference, self._config.max_bytes)

    async def _fetch_url(self, url: str, progress: _Progress, deadline: asyncio.Timeout) -> tuple[bytes, str]:
        """Try the whole redirect chain again on transient failures, with exponential backoff."""
        loop = asyncio.get_running_loop()
        while True:
            progress.attempts += 1
            try:
                return await self._follow_redirects(url, deadline)
            except _Transient as exc:
                progress.last_error = str(exc)
                if progress.attempts > self._config.retries:
                    raise TransientFetchError(f"{exc} (gave up after {progress.attempts} attempts)",
                                              exc.retry_after_s) from None
                delay = self._retry_delay(exc, progress.attempts)
                when = deadline.when()
                if when is not None and loop.time() + delay >= when:
                    raise TransientFetchError(f"{exc}; a retry in {delay:.1f} s would pass the deadline",
                                              exc.retry_after_s) from None
                await asyncio.sleep(delay)

    def _retry_delay(self, exc: _Transient, attempts: int) -> float:
        if exc.retry_after_s is not None:
            return exc.retry_after_s
        return self._config.backoff_s * 2.0 ** (attempts - 1)

    async def _follow_redirects(self, url: str, deadline: asyncio.Timeout) -> tuple[bytes, str]:
        """GET `url`, following at most max_redirects redirects, guarding every hop."""
        current = self._parse_url(url)
        for _hop in range(self._config.max_redirects + 1):
            self._check_literal_host(current)
            body, location = await self._polite_request(current, deadline)
            if location is None:
                return body, str(current)
            current = location
        raise ImageError(
            FETCH_FAILED, f"too many redirects (more than {self._config.max_redirects}) fetching {url}"
        )

    @staticmethod
    def _parse_url(url: str, base: URL | None = None) -> URL:
        try:
            parsed = base.join(URL(url)) if base is not None else URL(url)
        except (ValueError, TypeError) as exc:
            raise ImageError(FETCH_FAILED, f"invalid URL {url!r}: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise ImageError(FETCH_FAILED, f"refused URL {str(parsed)!r}: only http(s) URLs with a host are fetched")
        return parsed

    def _check_literal_host(self, url: URL) -> None:
        """Guard hosts written as IP addresses: aiohttp connects to those without asking the resolver."""
        host = url.raw_host or ""
        if self._config.allow_private_addresses or not _looks_like_ip_literal(host):
            return
        try:
            check_address(host, host)
        except AddressBlockedError as exc:
            raise ImageError(FETCH_FAILED, str(exc)) from None

    async def _polite_request(self, url: URL, deadline: asyncio.Timeout) -> tuple[bytes, URL | None]:
        """`_request` within the host's bound and after its Retry-After, then within the worker's bound."""
        try:
            async with self.hosts.turn(origin(url), deadline.when()):
                async with self._semaphore:
                    return await self._request(url)
        except HostBackoff as exc:
            raise TransientFetchError(f"{exc} fetching {url}", exc.wait_s) from None

    async def _request(self, url: URL) -> tuple[bytes, URL | None]:
        """One GET: (body, None) on 2xx, (b"", next_url) on a redirect; raises otherwise."""
        if self._session is None:
            raise RuntimeError("ImageFetcher is not open; use 'async with ImageFetcher(...)'")
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                return await self._handle_response(response, url)
        except (ImageError, _Transient):
            raise
        except aiohttp.ClientConnectorDNSError as exc:
            raise _dns_failure(url, exc) from None
        except aiohttp.ClientSSLError as exc:
            raise ImageError(FETCH_FAILED, f"TLS failure with {url.host}: {exc}") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            # aiohttp's own timeouts (connect) land here; the total deadline cancels instead.
            raise _Transient(f"connection to {url.host} failed: {type(exc).__name__}: {exc}") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise ImageError(FETCH_FAILED, f"request to {url} failed: {type(exc).__name__}: {exc}") from None

    async def _handle_response(self, response: aiohttp.ClientResponse, url: URL) -> tuple[bytes, URL | None]:
        status = response.status
        if status in _REDIRECT_STATUSES:
            location = response.headers.get("Location")
            if not location:
                raise ImageError(FETCH_FAILED, f"HTTP {status} redirect without a Location from {url}")
            return b"", self._parse_url(location, base=url)
        if 200 <= status < 300:
            return await self._read_body(response, url), None
        if status in _TRANSIENT_STATUSES or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if retry_after is not None and status in _HOST_BACKOFF_STATUSES:
                self.hosts.block(origin(url), retry_after)
            raise _Transient(f"HTTP {status} {response.reason or ''} from {url}".strip(), retry_after)
        raise ImageError(FETCH_FAILED, f"HTTP {status} {response.reason or ''} from {url}".strip())

    async def _read_body(self, response: aiohttp.ClientResponse, url: URL) -> bytes:
        """The body, refused as soon as it is known to be over max_bytes (never read past max_bytes+1)."""
        limit = self._config.max_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise ImageError(TOO_LARGE, f"{url} declares Content-Length {declared} bytes, over the limit of {limit}")
        body = bytearray()
        while True:
            chunk = await response.content.read(min(_CHUNK_BYTES, limit + 1 - len(body)))
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                raise ImageError(TOO_LARGE, f"{url} sent more than the limit of {limit} bytes")


def _dns_failure(url: URL, exc: aiohttp.ClientConnectorDNSError) -> Exception:
    """A refused address is final, an unknown name too; other resolver failures may pass."""
    cause = exc.os_error
    if isinstance(cause, AddressBlockedError):
        return ImageError(FETCH_FAILED, str(cause))
    if cause.errno in _PERMANENT_DNS_ERRNOS:
        return ImageError(FETCH_FAILED, f"host {url.host!r} not found (DNS)")
    return _Transient(f"could not resolve {url.host!r}: {cause}")


@dataclass
class _Progress:
    """What one fetch has done so far, for the message when the deadline cuts it short."""

    attempts: int = 0
    last_error: str | None = None

    def deadline_message(self, location: str, config: FetchConfig) -> str:
        message = f"fetching {location} did not finish within the {config.total_timeout_s:g} s deadline"
        details = [f"{self.attempts} attempt(s)"]
        if self.last_error:
            details.append(f"last error: {self.last_error}")
        return f"{message} ({'; '.join(details)})"
