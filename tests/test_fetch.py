"""consumer.fetch against a real aiohttp server on 127.0.0.1 and real files."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.abc import ResolveResult
from PIL import Image
from yarl import URL

import imgstream.consumer.addresses as addresses_module
import imgstream.consumer.blob_readers as blob_readers_module
from imgstream.analysis.imaging import ImageError, decode_image
from imgstream.consumer.addresses import GuardedResolver, address_block_reason
from imgstream.consumer.blob_readers import FileBlobReader
from imgstream.consumer.fetch import FetchedImage, ImageFetcher, TransientFetchError, parse_retry_after
from imgstream.consumer.politeness import origin
from imgstream.schemas.config import DecodeConfig, FetchConfig, WorkerConfig
from imgstream.schemas.events import ImageRef


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 8), (0, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 64).convert("RGB").save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def _gzip_zeros(size: int) -> bytes:
    """`size` zero bytes gzip-compressed (about 1000:1), built without holding them all."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join(compressor.compress(block) for _ in range(size >> 20)) + compressor.flush()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PNG = _png()
GZIP_BOMB = _gzip_zeros(64 << 20)
HTML = b"<!doctype html><html><body><h1>Login required</h1></body></html>"


@dataclass
class Server:
    """A local image server that counts what it was asked."""

    base: str = ""
    hits: Counter[str] = field(default_factory=Counter)
    user_agents: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list[tuple[str, float]] = field(default_factory=list)  # (path, time.monotonic())

    def url(self, path: str) -> str:
        return self.base + path


def _app(state: Server) -> web.Application:
    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        state.hits[request.path] += 1
        state.arrivals.append((request.path, time.monotonic()))
        state.user_agents.append(request.headers.get("User-Agent", ""))
        return await handler(request)

    app = web.Application(middlewares=[count])
    app.add_routes(_routes(state))
    return app


def _routes(state: Server) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/png")
    async def png(_: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    @routes.get("/html")
    async def html(_: web.Request) -> web.Response:
        # Claims to be an image: content is judged by magic bytes, not headers.
        return web.Response(body=HTML, content_type="image/jpeg")

    @routes.get("/empty")
    async def empty(_: web.Request) -> web.Response:
        return web.Response(body=b"", content_type="image/png")

    @routes.get("/truncated")
    async def truncated(_: web.Request) -> web.Response:
        return web.Response(body=_truncated_jpeg(), content_type="image/jpeg")

    @routes.get("/bytes/{n}")
    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * int(request.match_info["n"]))

    @routes.get("/endless")
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked, no Content-Length
        await response.prepare(request)
        chunk = b"\xff" * 65536
        while True:
            await response.write(chunk)

    @routes.get("/gzip-bomb")
    async def gzip_bomb(_: web.Request) -> web.Response:
        return web.Response(body=GZIP_BOMB, headers={"Content-Encoding": "gzip"})

    @routes.get("/loop")
    async def loop(_: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    @routes.get("/chain/{n}")
    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PNG)
        raise web.HTTPFound(f"/chain/{n - 1}")

    @routes.get("/redirect-to")
    async def redirect_to(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])

    @routes.get("/status/{code}")
    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="nope")

    @routes.get("/flaky")
    async def flaky(request: web.Request) -> web.Response:
        if state.hits[request.path] == 1:
            return web.Response(status=500, text="try again")
        return web.Response(body=PNG)

    @routes.get("/ratelimited/{seconds}")
    async def ratelimited(request: web.Request) -> web.Response:
        if state.hits[request.path] == 1:
            return web.Response(status=429, headers={"Retry-After": request.match_info["seconds"]})
        return web.Response(body=PNG)

    @routes.get("/slow")
    async def slow(_: web.Request) -> web.Response:
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            await asyncio.sleep(0.1)
        finally:
            state.in_flight -= 1
        return web.Response(body=PNG)

    return routes


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    # handler_cancellation: handlers stop when the client hangs up, so teardown is instant.
    runner = web.AppRunner(_app(state), handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base = f"http://{host}:{port}"
    yield state
    await runner.cleanup()


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read(65536)

    tcp = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield tcp.sockets[0].getsockname()[1]
    for writer in writers:
        writer.close()
    tcp.close()
    await tcp.wait_closed()


def local_config(**overrides: object) -> FetchConfig:
    values: dict[str, object] = {"allow_private_addresses": True, "backoff_s": 0.01, "total_timeout_s": 5.0}
    values.update(overrides)
    return FetchConfig(**values)  # type: ignore[arg-type]


async def fetch(config: FetchConfig, url: str | None = None, blob: str | None = None) -> FetchedImage:
    async with ImageFetcher(config) as fetcher:
        return await fetcher.fetch(ImageRef(url=url, blob=blob))


async def fetch_error(config: FetchConfig, url: str | None = None, blob: str | None = None) -> ImageError:
    with pytest.raises(ImageError) as info:
        await fetch(config, url=url, blob=blob)
    return info.value


# --- success ----------------------------------------------------------------------------------


async def test_fetches_and_decodes_a_png(server: Server) -> None:
    got = await fetch(local_config(user_agent="imgstream-test/9"), server.url("/png"))
    assert got.data == PNG
    assert got.final_url == server.url("/png")
    assert got.attempts == 1
    assert got.elapsed_ms > 0
    assert server.user_agents == ["imgstream-test/9"]
    assert decode_image(got.data, DecodeConfig()).image.size == (12, 8)


async def test_follows_redirects_within_the_limit(server: Server) -> None:
    got = await fetch(local_config(max_redirects=5), server.url("/chain/5"))
    assert got.data == PNG
    assert got.final_url == server.url("/chain/0")


async def test_body_of_exactly_max_bytes_is_accepted(server: Server) -> None:
    got = await fetch(local_config(max_bytes=1000), server.url("/bytes/1000"))
    assert len(got.data) == 1000


# --- decode failures of fetched bytes -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/html", "/empty", "/truncated"])
async def test_non_images_fetch_but_do_not_decode(server: Server, path: str) -> None:
    got = await fetch(local_config(), server.url(path))
    with pytest.raises(ImageError) as info:
        decode_image(got.data, DecodeConfig())
    assert info.value.code == "image_undecodable"


# --- deadlines, limits, redirects -------------------------------------------------------------


async def test_server_that_never_answers_hits_the_deadline(silent_port: int) -> None:
    started = time.monotonic()
    err = await fetch_error(local_config(total_timeout_s=1.5), f"http://127.0.0.1:{silent_port}/a.jpg")
    elapsed = time.monotonic() - started
    assert err.code == "image_fetch_failed"
    assert "deadline" in err.message
    assert 1.4 <= elapsed < 2.5


async def test_endless_body_is_too_large(server: Server) -> None:
    started = time.monotonic()
    err = await fetch_error(local_config(max_bytes=300_000), server.url("/endless"))
    assert err.code == "image_too_large"
    assert "300000" in err.message
    assert time.monotonic() - started < 2


async def test_compressed_body_is_limited_after_decompression(server: Server) -> None:
    assert len(GZIP_BOMB) < 100_000
    err = await fetch_error(local_config(max_bytes=1 << 20), server.url("/gzip-bomb"))
    assert err.code == "image_too_large"


async def test_content_length_over_the_limit_is_rejected_early(server: Server) -> None:
    err = await fetch_error(local_config(max_bytes=1000), server.url("/bytes/1001"))
    assert err.code == "image_too_large"
    assert "Content-Length" in err.message


async def test_redirect_loop_fails(server: Server) -> None:
    err = await fetch_error(local_config(max_redirects=3), server.url("/loop"))
    assert err.code == "image_fetch_failed"
    assert "redirects" in err.message
    assert server.hits["/loop"] == 4  # the first request and 3 redirects, not retried


async def test_too_long_redirect_chain_fails(server: Server) -> None:
    err = await fetch_error(local_config(max_redirects=5), server.url("/chain/6"))
    assert "too many redirects" in err.message


async def test_redirect_to_a_non_http_scheme_is_refused(server: Server) -> None:
    err = await fetch_error(local_config(), server.url("/redirect-to?url=file:///etc/passwd"))
    assert err.code == "image_fetch_failed"
    assert "only http(s)" in err.message


# --- retries ------------------------------------------------------------------------------------


async def test_500_then_200_succeeds_after_a_retry(server: Server) -> None:
    got = await fetch(local_config(retries=2), server.url("/flaky"))
    assert got.data == PNG
    assert got.attempts == 2
    assert server.hits["/flaky"] == 2


async def test_404_is_not_retried(server: Server) -> None:
    err = await fetch_error(local_config(retries=3), server.url("/status/404"))
    assert err.code == "image_fetch_failed"
    assert "404" in err.message
    assert server.hits["/status/404"] == 1


async def test_503_is_retried_then_gives_up(server: Server) -> None:
    err = await fetch_error(local_config(retries=2), server.url("/status/503"))
    assert "503" in err.message and "3 attempts" in err.message
    assert server.hits["/status/503"] == 3


async def test_429_waits_for_retry_after(server: Server) -> None:
    started = time.monotonic()
    got = await fetch(local_config(retries=1, backoff_s=0.0), server.url("/ratelimited/1"))
    assert got.attempts == 2
    assert time.monotonic() - started >= 0.95
    assert server.hits["/ratelimited/1"] == 2


async def test_retry_after_past_the_deadline_fails_at_once(server: Server) -> None:
    started = time.monotonic()
    err = await fetch_error(local_config(total_timeout_s=1.5), server.url("/ratelimited/60"))
    assert "deadline" in err.message
    assert time.monotonic() - started < 1.0
    assert server.hits["/ratelimited/60"] == 1


async def test_connection_refused_is_retried_then_fails(unused_tcp_port: int) -> None:
    err = await fetch_error(local_config(retries=2), f"http://127.0.0.1:{unused_tcp_port}/a.png")
    assert err.code == "image_fetch_failed"
    assert "3 attempts" in err.message


@pytest.mark.parametrize("code", [500, 503, 429, 408])
async def test_transient_statuses_are_retried_and_end_as_a_transient_failure(server: Server, code: int) -> None:
    err = await fetch_error(local_config(retries=1), server.url(f"/status/{code}"))
    assert isinstance(err, TransientFetchError) and err.code == "image_fetch_failed"
    assert str(code) in err.message and server.hits[f"/status/{code}"] == 2


@pytest.mark.parametrize("code", [400, 403, 404, 410])
async def test_other_4xx_are_final_at_once(server: Server, code: int) -> None:
    err = await fetch_error(local_config(retries=3), server.url(f"/status/{code}"))
    assert not isinstance(err, TransientFetchError) and err.code == "image_fetch_failed"
    assert server.hits[f"/status/{code}"] == 1


async def test_deadlines_and_connection_failures_are_transient(silent_port: int, unused_tcp_port: int) -> None:
    timed_out = await fetch_error(local_config(total_timeout_s=0.3), f"http://127.0.0.1:{silent_port}/a.png")
    refused = await fetch_error(local_config(retries=0), f"http://127.0.0.1:{unused_tcp_port}/a.png")
    assert isinstance(timed_out, TransientFetchError) and "deadline" in timed_out.message
    assert isinstance(refused, TransientFetchError)


async def test_refused_addresses_and_undecodable_bytes_are_not_transient(server: Server) -> None:
    refused = await fetch_error(FetchConfig(), "http://10.0.0.1/a.png")
    assert not isinstance(refused, TransientFetchError) and "private" in refused.message
    fetched = await fetch(local_config(), server.url("/html"))  # fetched fine; decoding judges it later
    with pytest.raises(ImageError) as info:
        decode_image(fetched.data, DecodeConfig())
    assert info.value.code == "image_undecodable"


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


# --- the address guard --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "CGNAT"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("2002:a00:1::", "private"),  # 6to4 wrapping 10.0.0.1
        # IETF protocol assignments, the whole /24: Python calls .9 and .10 global.
        ("192.0.0.1", "IETF protocol assignment"),
        ("192.0.0.9", "IETF protocol assignment"),
        ("192.0.0.10", "IETF protocol assignment"),
        ("192.0.0.170", "IETF protocol assignment"),
        ("192.0.0.255", "IETF protocol assignment"),
        ("::ffff:192.0.0.10", "IETF protocol assignment"),
    ],
)
def test_guard_refuses_non_public_addresses(address: str, reason: str) -> None:
    found = address_block_reason(ipaddress.ip_address(address))
    assert found is not None and reason in found


# One address in each range of the IANA IPv4 and IPv6 special-purpose registries (and multicast,
# site-local), with the words the refusal must name.
SPECIAL_PURPOSE = [
    ("0.0.0.0", "unspecified address (0.0.0.0/32)"),
    ("0.1.2.3", "'this network' address (0.0.0.0/8)"),
    ("10.1.2.3", "private address (10.0.0.0/8)"),
    ("100.64.0.1", "shared address space (CGNAT) address (100.64.0.0/10)"),
    ("100.127.255.254", "CGNAT"),
    ("127.0.0.2", "loopback address (127.0.0.0/8)"),
    ("169.254.1.1", "link-local address (169.254.0.0/16)"),
    ("172.31.0.1", "private address (172.16.0.0/12)"),
    ("192.0.0.9", "IETF protocol assignment address (192.0.0.0/24)"),
    ("192.0.2.1", "documentation address (TEST-NET-1) (192.0.2.0/24)"),
    ("192.31.196.1", "AS112 DNS address (192.31.196.0/24)"),
    ("192.52.193.1", "AMT relay address (192.52.193.0/24)"),
    ("192.88.99.1", "6to4 relay anycast address (192.88.99.0/24)"),
    ("192.168.1.1", "private address (192.168.0.0/16)"),
    ("192.175.48.1", "AS112 DNS address (192.175.48.0/24)"),
    ("198.18.0.1", "benchmarking address (198.18.0.0/15)"),
    ("198.19.255.254", "benchmarking address (198.18.0.0/15)"),
    ("198.51.100.1", "documentation address (TEST-NET-2) (198.51.100.0/24)"),
    ("203.0.113.1", "documentation address (TEST-NET-3) (203.0.113.0/24)"),
    ("239.255.255.250", "multicast address (224.0.0.0/4)"),
    ("240.0.0.1", "reserved address (240.0.0.0/4)"),
    ("255.255.255.255", "limited broadcast address (255.255.255.255/32)"),
    ("::", "unspecified address (::/128)"),
    ("::1", "loopback address (::1/128)"),
    ("::a00:1", "IPv4-compatible address (deprecated) (::/96)"),
    ("64:ff9b::808:808", "NAT64 address (64:ff9b::/96)"),  # even one that embeds a public IPv4
    ("64:ff9b::a00:1", "NAT64 address (64:ff9b::/96)"),
    ("64:ff9b:1::1", "local-use NAT64 address (64:ff9b:1::/48)"),
    ("100::1", "discard-only address (100::/64)"),
    ("100:0:0:1::1", "dummy IPv6 prefix address (100:0:0:1::/64)"),
    ("2001:1::1", "IETF protocol assignment address (2001::/23)"),
    ("2001::1", "Teredo address (2001::/32)"),
    ("2001:2::1", "benchmarking address (2001:2::/48)"),
    ("2001:3::1", "AMT address (2001:3::/32)"),
    ("2001:4:112::1", "AS112 DNS address (2001:4:112::/48)"),
    ("2001:10::1", "ORCHID address (deprecated) (2001:10::/28)"),
    ("2001:20::1", "ORCHIDv2 address (2001:20::/28)"),
    ("2001:30::1", "drone remote ID address (2001:30::/28)"),
    ("2001:db8::1", "documentation address (2001:db8::/32)"),
    ("2002:808:808::1", "6to4 address (2002::/16)"),  # even one that embeds a public IPv4
    ("2620:4f:8000::1", "AS112 DNS address (2620:4f:8000::/48)"),
    ("3fff::1", "documentation address (3fff::/20)"),
    ("5f00::1", "segment routing (SRv6 SID) address (5f00::/16)"),
    ("fd00::1", "unique-local (private) address (fc00::/7)"),
    ("fe80::1", "link-local address (fe80::/10)"),
    ("fec0::1", "site-local address (deprecated) (fec0::/10)"),
    ("ff02::1", "multicast address (ff00::/8)"),
    ("::ffff:198.18.0.1", "benchmarking address (198.18.0.0/15) (IPv4-mapped)"),
    ("::ffff:100.64.0.1", "CGNAT"),
]


@pytest.mark.parametrize(("address", "words"), SPECIAL_PURPOSE, ids=[a for a, _ in SPECIAL_PURPOSE])
def test_guard_refuses_every_special_purpose_range(address: str, words: str) -> None:
    found = address_block_reason(ipaddress.ip_address(address))
    assert found is not None and words in found, found


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "1.1.1.1", "2001:4860:4860::8888", "192.0.3.1", "198.20.0.1"])
def test_guard_allows_public_addresses(address: str) -> None:
    assert address_block_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("10.0.0.1", ["10.0.0.1", "private"]),
        ("169.254.169.254", ["169.254.169.254", "metadata"]),
        ("[::ffff:10.0.0.1]", ["private"]),
        ("100.64.1.2", ["CGNAT"]),
    ],
)
async def test_guard_refuses_literal_addresses_without_connecting(host: str, words: list[str]) -> None:
    started = time.monotonic()
    err = await fetch_error(FetchConfig(retries=3), f"http://{host}/latest/meta-data/")
    assert err.code == "image_fetch_failed"
    assert all(word in err.message for word in words)
    assert time.monotonic() - started < 0.5  # no connect attempt, no retries


async def test_guard_refuses_loopback_before_any_request(server: Server) -> None:
    err = await fetch_error(FetchConfig(), server.url("/png"))
    assert "127.0.0.1" in err.message and "loopback" in err.message
    assert server.hits["/png"] == 0


async def test_guard_checks_resolved_names(server: Server) -> None:
    port = server.base.rsplit(":", 1)[1]
    err = await fetch_error(FetchConfig(retries=3), f"http://localhost:{port}/png")
    assert "'localhost'" in err.message and "loopback" in err.message
    assert sum(server.hits.values()) == 0


@pytest.fixture
def trust_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let the guard pass 127.0.0.1 (our test server) but nothing else non-public."""
    original = addresses_module.address_block_reason

    def reason(address: addresses_module.IPAddress) -> str | None:
        return None if str(address) == "127.0.0.1" else original(address)

    monkeypatch.setattr(addresses_module, "address_block_reason", reason)
    yield


@pytest.mark.usefixtures("trust_loopback")
async def test_guard_rechecks_every_redirect_hop(server: Server) -> None:
    assert (await fetch(FetchConfig(), server.url("/chain/1"))).data == PNG
    target = "http://169.254.169.254/latest/meta-data/"
    err = await fetch_error(FetchConfig(), server.url(f"/redirect-to?url={target}"))
    assert "169.254.169.254" in err.message and "metadata" in err.message


async def test_guarded_resolver_refuses_if_any_address_is_private() -> None:
    class TwoAnswers:
        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[ResolveResult]:
            return [
                ResolveResult(hostname=host, host=ip, port=port, family=2, proto=6, flags=0)
                for ip in ("93.184.216.34", "192.168.0.7")
            ]

        async def close(self) -> None:
            pass

    resolver = GuardedResolver(TwoAnswers())  # type: ignore[arg-type]
    with pytest.raises(addresses_module.AddressBlockedError) as info:
        await resolver.resolve("rebind.example", 80)
    assert "rebind.example" in str(info.value) and "192.168.0.7" in str(info.value)


# --- blobs --------------------------------------------------------------------------------------


async def test_file_blob_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    got = await fetch(local_config(blob_roots=[str(tmp_path)]), blob=path.as_uri())
    assert got.data == PNG
    assert got.final_url == path.as_uri()
    assert got.attempts == 1


async def test_missing_file_blob_fails(tmp_path: Path) -> None:
    err = await fetch_error(local_config(blob_roots=[str(tmp_path)]), blob=(tmp_path / "nope.png").as_uri())
    assert err.code == "image_fetch_failed"
    assert "not found" in err.message


async def test_blob_outside_the_roots_is_refused(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "a.png").write_bytes(PNG)
    (root / "link.png").symlink_to(elsewhere / "a.png")
    config = local_config(blob_roots=[str(root)])
    references = [(elsewhere / "a.png").as_uri(), (root / "link.png").as_uri(), f"file://{root}/../elsewhere/a.png"]
    for reference in references:
        err = await fetch_error(config, blob=reference)
        assert err.code == "image_fetch_failed"
        assert "outside" in err.message


async def test_no_blob_roots_refuses_every_file_blob(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    for config in (local_config(blob_roots=[]), local_config()):  # empty, and unset on a bare fetcher
        err = await fetch_error(config, blob=path.as_uri())
        assert err.code == "image_fetch_failed"
        assert "fetch.blob_roots" in err.message


def test_an_empty_blob_roots_setting_means_none_not_anything() -> None:
    assert WorkerConfig(fetch=FetchConfig(blob_roots=[])).file_blob_roots() == []
    default = WorkerConfig(blobs={"dir": "/srv/imgstream/blobs"}).file_blob_roots()
    assert default == ["/srv/imgstream/blobs"]  # unset: the blob store directory submit writes to


async def test_large_blob_is_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\0" * 2001)
    err = await fetch_error(local_config(max_bytes=2000, blob_roots=[str(tmp_path)]), blob=path.as_uri())
    assert err.code == "image_too_large"


async def test_blob_that_is_not_a_file_or_not_local_fails(tmp_path: Path) -> None:
    config = local_config(blob_roots=[str(tmp_path)])
    assert "regular file" in (await fetch_error(config, blob=tmp_path.as_uri())).message
    assert "host" in (await fetch_error(config, blob="file://fileserver/share/a.png")).message


async def test_a_fifo_in_a_blob_root_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    try:
        err = await asyncio.wait_for(fetch_error(local_config(blob_roots=[str(tmp_path)]), blob=fifo.as_uri()), 5)
    finally:
        # Had the reader blocked opening it, a writer coming and going lets its thread finish.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # ENXIO: no reader holds it open, as it should be
    assert err.code == "image_fetch_failed" and "not a regular file" in err.message


def _outcome(read, *args):
    try:
        return read(*args)
    except ImageError as exc:
        return (exc.code, exc.message)


def test_the_quick_file_route_reads_and_refuses_what_the_full_route_does(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "a.png").write_bytes(PNG)
    (root / "sub" / "b.png").write_bytes(PNG[::-1])
    (root / ".hidden.png").write_bytes(PNG)
    (root / "big.bin").write_bytes(b"\0" * 2001)
    (elsewhere / "c.png").write_bytes(PNG)
    (root / "inside-link.png").symlink_to(root / "sub" / "b.png")
    (root / "outside-link.png").symlink_to(elsewhere / "c.png")
    (root / "dir-link").symlink_to(elsewhere)
    (root / "null.png").symlink_to(os.devnull)
    os.mkfifo(root / "pipe.png")
    reader = FileBlobReader([str(root)])
    references = [f"file://{root}/{name}" for name in (
        "a.png", "sub/b.png", ".hidden.png", "big.bin", "inside-link.png", "outside-link.png", "dir-link/c.png",
        "null.png", "pipe.png", "sub", "sub/", "missing.png", "a.png/", "sub/../a.png", "%61.png")]
    references += [f"file://{elsewhere}/c.png", f"file:///{root}/a.png", f"file://localhost{root}/a.png",
                   f"file://{root}/" + "segment/" * 60 + ".."]  # the route's pattern must not backtrack on it

    for reference in references:
        full = _outcome(lambda r: blob_readers_module._read_regular_file(reader._checked_path(r), r, 2000), reference)
        assert _outcome(reader._read, reference, 2000) == full, reference
    assert reader._read(f"file://{root}/inside-link.png", 2000) == PNG[::-1]


@pytest.mark.skipif(not blob_readers_module._QUICK_ROUTE, reason="the quick route needs O_PATH and /proc/self/fd (Linux)")
def test_a_plain_file_reference_takes_the_quick_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    reader = FileBlobReader([str(tmp_path)])

    def no_realpath(self: FileBlobReader, reference: str) -> Path:
        raise AssertionError(f"the full route was taken for {reference}")

    monkeypatch.setattr(FileBlobReader, "_checked_path", no_realpath)
    assert reader._read((tmp_path / "a.png").as_uri(), 2000) == PNG
    with pytest.raises(AssertionError):  # a name the quick route leaves to the full one
        reader._read(f"file://{tmp_path}/%61.png", 2000)


def test_the_quick_file_route_reads_past_short_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 40
    (tmp_path / "a.bin").write_bytes(data)
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 1000)))  # as some file systems answer
    assert FileBlobReader([str(tmp_path)])._read((tmp_path / "a.bin").as_uri(), len(data)) == data


async def test_unconfigured_blob_scheme_fails() -> None:
    err = await fetch_error(local_config(), blob="s3://bucket/key.jpg")
    assert err.code == "image_fetch_failed"
    assert err.message == "blob scheme 's3' is not configured on this worker"


async def test_a_blob_reader_can_be_plugged_in() -> None:
    class MemoryReader:
        async def read(self, reference: str, max_bytes: int) -> bytes:
            return PNG

    async with ImageFetcher(local_config()) as fetcher:
        fetcher.register_blob_reader("mem", MemoryReader())
        got = await fetcher.fetch(ImageRef(blob="mem://images/1"))
    assert got.data == PNG


# --- concurrency and lifecycle ------------------------------------------------------------------


async def test_concurrent_fetches_are_bounded(server: Server) -> None:
    async with ImageFetcher(local_config(max_concurrent=2)) as fetcher:
        results = await asyncio.gather(*(fetcher.fetch(ImageRef(url=server.url("/slow"))) for _ in range(6)))
    assert all(result.data == PNG for result in results)
    assert server.max_in_flight == 2


async def test_fetches_to_one_host_are_bounded_per_host(server: Server) -> None:
    async with ImageFetcher(local_config(max_concurrent=10, per_host_concurrent=2)) as fetcher:
        results = await asyncio.gather(*(fetcher.fetch(ImageRef(url=server.url("/slow"))) for _ in range(6)))
    assert all(result.data == PNG for result in results)
    assert server.max_in_flight == 2
    assert fetcher.hosts.waits["slot"] == 4


async def test_the_per_host_bound_does_not_hold_back_other_hosts(server: Server) -> None:
    port = server.base.rsplit(":", 1)[1]
    hosts = [server.base, f"http://localhost:{port}"]  # one server, two hosts as fetches see them
    async with ImageFetcher(local_config(max_concurrent=10, per_host_concurrent=1)) as fetcher:
        await asyncio.gather(*(fetcher.fetch(ImageRef(url=f"{base}/slow")) for base in hosts for _ in range(3)))
    assert server.max_in_flight == 2  # one per host, at the same time


async def test_a_hosts_retry_after_holds_for_every_fetch_of_the_worker(server: Server) -> None:
    async with ImageFetcher(local_config(retries=1, backoff_s=0.0)) as fetcher:
        limited = asyncio.create_task(fetcher.fetch(ImageRef(url=server.url("/ratelimited/1"))))
        while not fetcher.hosts.blocked_for(origin(URL(server.base))):
            await asyncio.sleep(0.01)
        other = await fetcher.fetch(ImageRef(url=server.url("/png")))  # another path, the same host
        assert (await limited).data == other.data == PNG
    refused_at = next(t for path, t in server.arrivals if path == "/ratelimited/1")
    asked_again = [t for path, t in server.arrivals if t > refused_at]
    assert len(asked_again) == 2 and min(asked_again) - refused_at >= 0.95  # nobody asked within the window
    assert fetcher.hosts.waits["retry_after"] >= 1


async def test_a_retry_after_past_the_deadline_gives_up_every_fetch_to_that_host_at_once(server: Server) -> None:
    async with ImageFetcher(local_config(total_timeout_s=1.5)) as fetcher:
        first = await fetch_error_with(fetcher, server.url("/ratelimited/60"))
        started = time.monotonic()
        second = await fetch_error_with(fetcher, server.url("/png"))
    assert isinstance(first, TransientFetchError) and first.retry_after_s == 60
    assert isinstance(second, TransientFetchError) and "Retry-After" in second.message
    assert 58 <= (second.retry_after_s or 0) <= 60
    assert time.monotonic() - started < 0.5 and server.hits["/png"] == 0
    assert fetcher.hosts.backoffs == 1


async def fetch_error_with(fetcher: ImageFetcher, url: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        await fetcher.fetch(ImageRef(url=url))
    return info.value


async def test_fetching_a_url_needs_an_open_fetcher(server: Server) -> None:
    with pytest.raises(RuntimeError):
        await ImageFetcher(local_config()).fetch(ImageRef(url=server.url("/png")))
