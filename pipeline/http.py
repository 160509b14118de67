"""HTTP surface of a worker: Prometheus metrics and health (design §9), with /actuator aliases."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from pipeline.health import Health
from pipeline.metrics import Metrics


def make_app(health: Health, metrics: Metrics) -> web.Application:
    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def overall(_: web.Request) -> web.Response:
        ok, body = health.overall()
        return _json(ok, body)

    def component(name: str) -> Any:
        async def handler(_: web.Request) -> web.Response:
            result = health.one(name)
            if result is None:
                return _json(
                    False, {"status": "UNKNOWN", "detail": f"{name} does not run here"}, 404
                )
            return _json(*result)

        return handler

    app = web.Application()
    for prefix, metrics_path in (("", "/metrics"), ("/actuator", "/actuator/prometheus")):
        app.router.add_get(metrics_path, prometheus)
        app.router.add_get(f"{prefix}/health", overall)
        app.router.add_get(f"{prefix}/health/mqtt", component("mqtt"))
        app.router.add_get(f"{prefix}/health/aggregation", component("aggregation"))
    return app


def _json(ok: bool, body: dict[str, Any], status: int | None = None) -> web.Response:
    return web.json_response(body, status=status or (200 if ok else 503))


async def serve(
    app: web.Application, host: str, port: int, shutdown_timeout_s: float = 5.0
) -> web.AppRunner:
    """Serve `app`; on cleanup, requests in flight get `shutdown_timeout_s` to finish."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
