"""Getting image bytes for a request: http(s) behind an SSRF guard, or a blob reader (SPEC §5).

Every failure is an `ImageError` with code image_fetch_failed or image_too_large; a
`TransientFetchError` (timeouts, connection errors, 5xx, 408, 429) is worth trying again
later, which the worker does through the retry topic. The bytes themselves are judged
later by `analysis.imaging.decode_image`.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Final, Mapping

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from imgstream.analysis.imaging import FETCH_FAILED, TOO_LARGE, ImageError
from imgstream.consumer.addresses import AddressBlockedError, GuardedResolver, check_address, looks_like_ip_literal
from imgstream.consumer.blob_readers import BlobReader, FileBlobReader
from imgstream.consumer.politeness import HostBackoff, HostPoliteness, origin
from imgstream.schemas.config import FetchConfig
from imgstream.schemas.events import ImageRef
from imgstream.service.tracing import NO_TRACING, Tracing

_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
# Worth asking again: the host is overloaded, rate-limits, or timed out waiting for our request.
_TRANSIENT_STATUSES: Final = frozenset({408, 429})
# Statuses whose Retry-After holds for every request of this worker to that host.
_HOST_BACKOFF_STATUSES: Final = frozenset({429, 503})
_CHUNK_BYTES: Final = 64 * 1024
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

    def __init__(self, config: FetchConfig, *, blob_readers: Mapping[str, BlobReader] | None = None,
                 tracing: Tracing = NO_TRACING) -> None:
        self._config = config
        self.tracing = tracing
        self._blob_readers: dict[str, BlobReader] = (
            dict(blob_readers) if blob_readers is not None
            else {"file": FileBlobReader(config.blob_roots or (), reads=config.blob_reads)}
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
        if self.tracing.enabled:
            with self.tracing.fetch(ref.location, _host_of(ref)):
                return await self._fetch(ref)
        return await self._fetch(ref)

    async def _fetch(self, ref: ImageRef) -> FetchedImage:
        started = time.perf_counter()
        if ref.blob is not None:
            data = self._read_blob_now(ref.blob)
            if data is not None:  # a local file read at once: nothing to wait for, so no deadline or slot
                return FetchedImage(data, ref.blob, (time.perf_counter() - started) * 1000.0, 1)
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

    def _blob_reader(self, reference: str) -> tuple[str, BlobReader | None]:
        """The scheme of a blob reference, and its reader (None: not configured here)."""
        scheme = reference.partition("://")[0].lower()
        return scheme, self._blob_readers.get(scheme)

    def _read_blob_now(self, reference: str) -> bytes | None:
        read_now = getattr(self._blob_reader(reference)[1], "read_now", None)
        return read_now(reference, self._config.max_bytes) if read_now is not None else None

    async def _read_blob(self, reference: str) -> bytes:
        scheme, reader = self._blob_reader(reference)
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
        if self._config.allow_private_addresses or not looks_like_ip_literal(host):
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
        if self.tracing.enabled:
            with self.tracing.http_get(str(url), url.host, url.port) as span:
                return await self._get(url, span)
        return await self._get(url)

    async def _get(self, url: URL, span: Any = None) -> tuple[bytes, URL | None]:
        assert self._session is not None
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if span is not None:
                    span.status(response.status)
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


def _host_of(ref: ImageRef) -> str | None:
    """The host of a URL reference, for its fetch span (None for a blob, or a URL yarl cannot read)."""
    try:
        return URL(ref.url).host if ref.url else None
    except (ValueError, TypeError):
        return None


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
