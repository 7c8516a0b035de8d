"""The worker's HTTP port: /healthz, /readyz, /operations, /metrics (aiohttp)."""

from __future__ import annotations

import logging
from typing import Callable

from aiohttp import web

from consumer.metrics import WorkerMetrics
from schemas.codec import encode_json
from schemas.operations import describe_operations

log = logging.getLogger(__name__)


def build_app(metrics: WorkerMetrics, ready: Callable[[], dict[str, bool]]) -> web.Application:
    """`ready()` returns named checks; /readyz is 200 only when all pass."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = ready()
        ok = all(checks.values())
        return web.Response(body=encode_json({"ready": ok, "checks": checks}), status=200 if ok else 503,
                            content_type="application/json")

    async def operations(_: web.Request) -> web.Response:
        return web.Response(body=encode_json(describe_operations()), content_type="application/json")

    async def prometheus(request: web.Request) -> web.Response:
        body, content_type = metrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/operations", operations)
    app.router.add_get("/metrics", prometheus)
    return app


async def start_server(app: web.Application, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("HTTP on %s:%d: /healthz /readyz /operations /metrics", host, port)
    return runner
