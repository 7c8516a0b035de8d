"""The HTTP port of the worker and the sink: /healthz, /readyz, /metrics, and the worker's /operations (aiohttp)."""

from __future__ import annotations

import logging
from typing import Callable

from aiohttp import web

from imgstream.consumer.metrics import Metrics
from imgstream.schemas.codec import encode_json
from imgstream.schemas.operations import describe_operations

log = logging.getLogger(__name__)


def build_app(metrics: Metrics, ready: Callable[[], dict[str, bool]], operations: bool = True) -> web.Application:
    """`ready()` returns named checks; /readyz is 200 only when all pass. `operations`: serve /operations."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = ready()
        ok = all(checks.values())
        return web.Response(body=encode_json({"ready": ok, "checks": checks}), status=200 if ok else 503,
                            content_type="application/json")

    async def operations_doc(_: web.Request) -> web.Response:
        return web.Response(body=encode_json(describe_operations()), content_type="application/json")

    async def prometheus(request: web.Request) -> web.Response:
        body, content_type = metrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if operations:
        app.router.add_get("/operations", operations_doc)
    app.router.add_get("/metrics", prometheus)
    return app


async def start_server(app: web.Application, port: int, host: str) -> web.AppRunner:
    """Serve `app` on host:port (`host` is the http_host setting: loopback unless told otherwise)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    paths = " ".join(sorted(r.resource.canonical for r in app.router.routes() if r.method == "GET"))
    log.info("HTTP on %s:%d: %s", host, port, paths)
    return runner
