"""Fleet dashboard: an aiohttp app serving the page and a JSON API from the fleet store, and Prometheus /metrics
(the fleet store's devices plus the collectors it is given: the gRPC tier and the controller, see metrics.py).

Routes: `/` (page), `/static/*` (app.js, app.css: shipped in the package, no CDN), `/api/fleet`,
`/api/devices/{id}/series`, `/metrics`, `/healthz`. Every response carries a Content-Security-Policy that
allows scripts only from this origin (no inline scripts); the page writes device-supplied text with
textContent, never innerHTML.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_tier.fleet_store import FleetStore
from cloud_tier.loopthread import LoopThread
from cloud_tier.metrics import CONTENT_TYPE, FleetCollector, MetricsRegistry
from models.extras import require
from protos.mqtt import MqttSchemaError, check_device_id

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

# Per-device cloud-side view: device id -> {requests, errors, mean_ms, last_ts} (see server.RequestCounters).
CloudView = Callable[[], dict[str, dict[str, Any]]]

__all__ = ["Dashboard", "build_app"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _secure(headers: Any, path: str) -> None:
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    if path.startswith("/api/"):
        headers["Cache-Control"] = "no-store"


def _fleet_rows(fleet: list[dict[str, Any]], cloud: dict[str, dict[str, Any]] | None = None
                ) -> list[dict[str, Any]]:
    cloud = cloud or {}
    return [
        {
            "device": d["device_id"], "label": d["label"], "status": d["status"], "mode": d["mode"],
            "cut": d["cut"], "model": d["model"], "bandwidth_mbps": d["bandwidth_mbps"],
            "req_per_s": d["req_per_s"], "p50_ms": d["p50_ms"], "p95_ms": d["p95_ms"], "p99_ms": d["p99_ms"],
            "edge_share": d["edge_share"], "count": d["count"], "last_seen": d["last_seen"],
            "dropped_total": d["dropped_total"],
            # What the cloud tier saw of this device's requests (None: no cloud view, or none seen).
            "cloud": cloud.get(d["device_id"]),
        }
        for d in fleet
    ]


def build_app(store: FleetStore, *, window_s: float = 300.0, rate_window_s: float = 10.0,
              series_s: float = 120.0, extra_metrics: Sequence[Collector] = (),
              cloud_view: CloudView | None = None) -> Any:
    """The aiohttp Application serving the dashboard for `store`.

    `extra_metrics` are more Prometheus collectors for /metrics (the gRPC tier, the controller); `cloud_view`
    adds each device's cloud-side counts to /api/fleet rows.
    """
    web = require("aiohttp.web", "cloud")
    registry = MetricsRegistry([FleetCollector(lambda: store.fleet(window_s=window_s, rate_window_s=rate_window_s)),
                                *extra_metrics])

    async def in_thread(fn: Callable[[], Any]) -> Any:
        # SQLite reads block: keep them off the event loop.
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    @web.middleware
    async def security_headers(request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        try:
            resp = await handler(request)
        except web.HTTPException as exc:  # 404s from the router and static files get the headers too
            _secure(exc.headers, request.path)
            raise
        _secure(resp.headers, request.path)
        return resp

    async def index(_request: Any) -> Any:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def fleet(_request: Any) -> Any:
        rows = await in_thread(lambda: store.fleet(window_s=window_s, rate_window_s=rate_window_s))
        cloud = cloud_view() if cloud_view is not None else None
        return web.json_response({"now": time.time(), "window_s": window_s, "rate_window_s": rate_window_s,
                                  "devices": _fleet_rows(rows, cloud)})

    async def series(request: Any) -> Any:
        device_id = request.match_info["device_id"]
        try:
            check_device_id(device_id)
        except MqttSchemaError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        try:
            since = float(request.query.get("since_s", series_s))
            bucket = float(request.query.get("bucket_s", 1.0))
        except ValueError:
            return web.json_response({"error": "since_s and bucket_s must be numbers"}, status=400)
        if not (0 < since <= 86_400 and 0.1 <= bucket <= 3_600 and since / bucket <= 10_000):
            return web.json_response({"error": "expected 0 < since_s <= 86400, 0.1 <= bucket_s <= 3600 and at "
                                               "most 10000 buckets"}, status=400)
        if await in_thread(lambda: store.device(device_id)) is None:
            return web.json_response({"error": f"device {device_id!r} is unknown"}, status=404)
        data = await in_thread(lambda: store.series(device_id, since_s=since, bucket_s=bucket))
        return web.json_response(data)

    async def metrics(_request: Any) -> Any:
        body = await in_thread(registry.render)  # the fleet collector reads SQLite: off the event loop
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_request: Any) -> Any:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[security_headers], client_max_size=64 * 1024)
    app.router.add_get("/", index)
    app.router.add_get("/api/fleet", fleet)
    app.router.add_get("/api/devices/{device_id}/series", series)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
    return app


class Dashboard:
    """The dashboard web server on its own event loop in a daemon thread."""

    def __init__(self, store: FleetStore, host: str = "127.0.0.1", port: int = 0, **app_options: Any) -> None:
        """Configure; port 0 lets the OS choose (returned by start())."""
        self.store, self.host, self._requested_port = store, host, port
        self._options = app_options
        self.port: int | None = None
        self._runner_thread = LoopThread("dashboard")
        self._runner: Any = None

    @property
    def url(self) -> str:
        """Base URL of the running dashboard."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> int:
        """Start serving and return the TCP port."""
        web = require("aiohttp.web", "cloud")
        if self._runner_thread.running:
            raise RuntimeError("dashboard already started")

        async def boot() -> None:
            self._runner = web.AppRunner(build_app(self.store, **self._options), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self._requested_port)
            await site.start()
            self.port = int(self._runner.addresses[0][1])

        try:
            self._runner_thread.start(boot, timeout_s)
        except Exception as exc:  # noqa: BLE001 - bind errors and timeouts, one clear line
            raise RuntimeError(f"dashboard on {self.host}:{self._requested_port} failed to start: {exc}") from exc
        log.info("dashboard on %s", self.url)
        assert self.port is not None
        return self.port

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and join the thread."""
        runner = self._runner
        self._runner_thread.stop(runner.cleanup if runner is not None else None, timeout_s)

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
