"""Fleet dashboard: an aiohttp app serving the page and a JSON API from the fleet store, and Prometheus /metrics
(the fleet store's devices plus the collectors it is given: the gRPC tier and the controller, see metrics.py).

Routes: `/` (page), `/static/*` (app.js, app.css: shipped in the package, no CDN), `/api/fleet`,
`/api/devices/{id}/series`, `POST /api/devices/{id}/commands` (send a command, answer with the device's ack),
`/api/deployments` (the tails' Ray Serve deployments with --backend ray; none with the in-process backend),
`/metrics`, `/healthz` (each component's status: 200 when all are ok, else 503). Every response carries a
Content-Security-Policy that allows scripts only from this origin (no inline scripts); the page writes
device-supplied text with textContent, never innerHTML.

Access: bound to loopback (127.0.0.1) by default. A dashboard bound to any other address requires a token
(`token_file`, e.g. the `dashboard.token` that `split-cloud ca init` writes; refused to start without one), and
one on loopback may require it too (`require_token`). With a token, every route but `/healthz` (which says only
ok / not ok, and its component report only to those who may see the rest) needs it: as
`Authorization: Bearer <token>` (scrapers of /metrics, scripts), a `token` query parameter, or the cookie
the page gets when first opened as `/?token=<token>` (it is then redirected to `/`,
and its own fetches carry the cookie). Tokens are compared in constant time. The command route takes only
`Content-Type: application/json`, which no cross-site form or simple request can send (and the cookie is
SameSite=Strict).

The store may be absent (None: the node could not open its fleet store): the page and the API still answer,
with the reason in `warnings` (the page's banner) and in /healthz.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_tier.fleet_store import FleetStore, describe_error
from cloud_tier.loopthread import LoopThread
from cloud_tier.metrics import CONTENT_TYPE, FleetCollector, MetricsRegistry
from models.extras import require
from protos.address import is_loopback
from protos.mqtt import Ack, Command, MqttSchemaError, check_device_id

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

# Per-device cloud-side view: device id -> {requests, errors, mean_ms, last_ts} (see server.RequestCounters).
CloudView = Callable[[], dict[str, dict[str, Any]]]
# The tails' deployments (RayBackend.rows()): one row per (model hash, cut) deployment; None: tails in-process.
DeploymentsView = Callable[[], list[dict[str, Any]]]
# The node's health report: {"status": ok|degraded|down, "components": {name: {"status", "reason"}}}.
HealthView = Callable[[], dict[str, Any]]
# Send a command to a device and wait for its ack: (device id, command, timeout s) -> the ack, None on timeout;
# ConnectionError when nothing can reach the device (no MQTT session).
CommandSender = Callable[[str, Command, float], "Ack | None"]
MAX_COMMAND_TIMEOUT_S = 60.0
DEFAULT_COMMAND_TIMEOUT_S = 10.0

__all__ = ["COOKIE", "Dashboard", "DashboardTokenError", "build_app", "is_loopback", "load_token", "store_health"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


COOKIE = "splitinfer_dashboard"
OPEN_PATHS = frozenset({"/healthz"})
MIN_TOKEN_CHARS = 16


class DashboardTokenError(RuntimeError):
    """The dashboard's token setting cannot work (missing or empty token file where a token is required)."""




def load_token(host: str, token_file: str | Path | None, require_token: bool = False) -> str | None:
    """The token the dashboard on `host` requires, or None when it needs none.

    Required when `host` is not loopback (always) or when `require_token`; then `token_file` must name a file
    holding it (DashboardTokenError otherwise). A token file given for loopback is used too.
    """
    required = require_token or not is_loopback(host)
    if token_file is None:
        if required:
            why = f"bound to {host}, which is not loopback," if not is_loopback(host) else "set to require a token"
            raise DashboardTokenError(f"the dashboard is {why} and needs --dashboard-token-file FILE (split-cloud "
                                      "ca init writes STATE/pki/dashboard.token); or bind it to 127.0.0.1")
        return None
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DashboardTokenError(f"dashboard token file {token_file}: cannot be read ({exc})") from exc
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise DashboardTokenError(f"dashboard token file {token_file}: expected one token of at least "
                                  f"{MIN_TOKEN_CHARS} printable characters without spaces")
    return token


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


def _secure(headers: Any, path: str) -> None:
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    if path.startswith("/api/"):
        headers["Cache-Control"] = "no-store"


def store_health(store: FleetStore | None, reason: str = "") -> dict[str, str]:
    """The store's component entry: ok, or degraded with the reason (`reason` when there is no store)."""
    if store is None:
        return {"status": "degraded", "reason": reason or "no fleet store"}
    health = store.health()
    return {"status": "ok"} if health.ok else {"status": "degraded", "reason": health.reason}


def overall(components: dict[str, dict[str, str]], critical: Sequence[str] = ("grpc",)) -> str:
    """ok when every component is; down when a critical one is down; else degraded."""
    if all(c["status"] == "ok" for c in components.values()):
        return "ok"
    return "down" if any(components.get(k, {}).get("status") == "down" for k in critical) else "degraded"


def _fleet_rows(fleet: list[dict[str, Any]], cloud: dict[str, dict[str, Any]] | None = None
                ) -> list[dict[str, Any]]:
    cloud = cloud or {}
    return [
        {
            "device": d["device_id"], "label": d["label"], "status": d["status"],
            # what the device (or its last will) said; status is "stale" instead when it has gone silent
            "reported_status": d.get("reported_status", d["status"]), "mode": d["mode"],
            "cut": d["cut"], "model": d["model"], "bandwidth_mbps": d["bandwidth_mbps"],
            "req_per_s": d["req_per_s"], "p50_ms": d["p50_ms"], "p95_ms": d["p95_ms"], "p99_ms": d["p99_ms"],
            "edge_share": d["edge_share"], "count": d["count"], "last_seen": d["last_seen"],
            "dropped_total": d["dropped_total"],
            # What the cloud tier saw of this device's requests (None: no cloud view, or none seen).
            "cloud": cloud.get(d["device_id"]),
        }
        for d in fleet
    ]


def build_app(store: FleetStore | None, *, window_s: float = 300.0, rate_window_s: float = 10.0,
              series_s: float = 120.0, extra_metrics: Sequence[Collector] = (),
              cloud_view: CloudView | None = None, token: str | None = None,
              warnings: Sequence[str] = (), health: HealthView | None = None,
              send_command: CommandSender | None = None, command_token: str | None = None,
              deployments: DeploymentsView | None = None) -> Any:
    """The aiohttp Application serving the dashboard for `store` (None: the store could not be opened).

    `extra_metrics` are more Prometheus collectors for /metrics (the gRPC tier, the controller); `cloud_view`
    adds each device's cloud-side counts to /api/fleet rows; with `token`, every route but /healthz needs it;
    `warnings` (e.g. the node runs --insecure) are shown at the top of the page, with every component `health`
    reports not ok (default: the store's own health); `send_command` serves POST /api/devices/{id}/commands
    (without it that route answers 503); `command_token` is required by that route even where the page itself
    is open (a token-free dashboard on loopback: any local user may look, only the token holder may command);
    `deployments` serves /api/deployments (the page's Deployments table, hidden while it has no rows).
    """
    web = require("aiohttp.web", "cloud")

    def fleet_rows() -> list[dict[str, Any]]:
        return [] if store is None else store.fleet(window_s=window_s, rate_window_s=rate_window_s)

    def report() -> dict[str, Any]:
        if health is not None:
            return health()
        components = {"store": store_health(store)}
        return {"status": overall(components), "components": components}

    def banner() -> list[str]:
        bad = [f"{name} {c['status']}: {c.get('reason', '')}".rstrip(": ")
               for name, c in report()["components"].items() if c["status"] != "ok"]
        return [*warnings, *bad]

    registry = MetricsRegistry([FleetCollector(fleet_rows), *extra_metrics])

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

    def authorized(request: Any) -> bool:
        """Whether `request` may see more than ok / not ok (the token, or no token and a loopback Host)."""
        if token is None:
            return is_loopback(request.url.host or "")
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        return (_same(bearer, token) or _same(request.cookies.get(COOKIE), token)
                or _same(request.query.get("token"), token))

    @web.middleware
    async def require_token(request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        if token is None and request.path not in OPEN_PATHS and not is_loopback(request.url.host or ""):
            # No token means loopback only: a page elsewhere that points a name at 127.0.0.1 (DNS rebinding)
            # reaches us with its own Host, which a browser on this machine would otherwise let it read.
            return web.json_response({"error": "this dashboard answers only to localhost / a loopback address "
                                               "(give it a token to serve other names)"}, status=403)
        if token is None or request.path in OPEN_PATHS:
            return await handler(request)
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        query = request.query.get("token")
        if _same(bearer, token) or _same(request.cookies.get(COOKIE), token):
            return await handler(request)
        if _same(query, token):
            if request.path != "/":
                return await handler(request)
            # The page opened with its token: keep it in a cookie its fetches carry, and drop it from the URL.
            resp = web.Response(status=303, headers={"Location": "/"})
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            return resp
        return web.json_response(
            {"error": "this dashboard needs its token: open /?token=TOKEN, or send Authorization: Bearer TOKEN"},
            status=401, headers={"WWW-Authenticate": 'Bearer realm="splitinfer"'})

    async def index(_request: Any) -> Any:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def fleet(_request: Any) -> Any:
        try:
            rows = await in_thread(fleet_rows)
        except sqlite3.Error as exc:  # the file went bad under a running node: say so, not a bare 500
            reason = f"fleet store unreadable: {describe_error(exc)}"
            log.error("dashboard: %s", reason)
            return web.json_response({"error": reason, "warnings": [*banner(), reason], "devices": []}, status=503)
        cloud = cloud_view() if cloud_view is not None else None
        return web.json_response({"now": time.time(), "window_s": window_s, "rate_window_s": rate_window_s,
                                  "warnings": await in_thread(banner), "devices": _fleet_rows(rows, cloud)})

    async def command(request: Any) -> Any:
        device_id = request.match_info["device_id"]
        if token is None and command_token is not None:
            auth = request.headers.get("Authorization", "")
            if not _same(auth[7:].strip() if auth[:7].lower() == "bearer " else None, command_token):
                return web.json_response(
                    {"error": "sending commands needs the dashboard token (split-cloud fleet send reads "
                              "STATE/pki/dashboard.token; or send Authorization: Bearer TOKEN)"},
                    status=401, headers={"WWW-Authenticate": 'Bearer realm="splitinfer"'})
        if request.content_type != "application/json":
            return web.json_response({"error": "expected Content-Type: application/json"}, status=415)
        try:
            body = await request.json()
            check_device_id(device_id)
            if not isinstance(body, dict):
                raise MqttSchemaError("expected a JSON object such as {\"kind\": \"switch_cut\", \"cut\": \"c1\"}")
            timeout_s = body.pop("timeout_s", DEFAULT_COMMAND_TIMEOUT_S)
            if (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                    or not 0 < timeout_s <= MAX_COMMAND_TIMEOUT_S):
                raise MqttSchemaError("timeout_s", f"expected a number of seconds in (0, {MAX_COMMAND_TIMEOUT_S}]")
            unknown = set(body) - {"kind", "cut", "mode"}
            if unknown:
                raise MqttSchemaError(sorted(unknown)[0], "is not a command field: expected kind, cut, mode, timeout_s")
            if "kind" not in body:
                raise MqttSchemaError("kind", "is missing: expected switch_cut, switch_mode or ping")
            cmd = Command(kind=body["kind"], cut=body.get("cut"), mode=body.get("mode"))
        except ValueError as exc:  # bad JSON, or MqttSchemaError (a ValueError) naming the field
            return web.json_response({"error": str(exc)}, status=400)
        if send_command is None or store is None:
            return web.json_response({"error": "this node cannot send commands now (no fleet controller)"},
                                     status=503)
        try:
            known = await in_thread(lambda: store.device(device_id))
        except sqlite3.Error as exc:
            return web.json_response({"error": f"fleet store unreadable: {describe_error(exc)}"}, status=503)
        if known is None:
            return web.json_response({"error": f"device {device_id!r} is unknown to this fleet"}, status=404)
        try:
            ack = await in_thread(lambda: send_command(device_id, cmd, float(timeout_s)))
        except (ConnectionError, sqlite3.Error) as exc:
            return web.json_response({"error": f"command not sent: {exc}"}, status=503)
        out = {"device": device_id, "command_id": cmd.command_id, "kind": cmd.kind}
        if ack is None:
            return web.json_response({**out, "error": f"no ack from {device_id} within {timeout_s} s (the broker "
                                                      "keeps the command for the device until it comes back)"},
                                     status=504)
        return web.json_response({**out, "ok": ack.ok, "message": ack.message})

    async def series(request: Any) -> Any:
        if store is None:
            return web.json_response({"error": "the fleet store is not available"}, status=503)
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

    async def deployment_list(_request: Any) -> Any:
        if deployments is None:
            return web.json_response({"backend": "local", "deployments": []})
        # Serve's state is read with a deadline, at most every few seconds (RayBackend): off the event loop
        return web.json_response({"backend": "ray", "deployments": await in_thread(deployments)})

    async def metrics(_request: Any) -> Any:
        body = await in_thread(registry.render)  # the fleet collector reads SQLite: off the event loop
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: Any) -> Any:
        state = await in_thread(report)
        ok = state["status"] == "ok"
        # Open to anyone: ok / not ok only, unless the caller may see the dashboard (reasons name files, hosts).
        body = {"ok": ok, **state} if authorized(request) else {"ok": ok}
        return web.json_response(body, status=200 if ok else 503)

    app = web.Application(middlewares=[security_headers, require_token], client_max_size=64 * 1024)
    app.router.add_get("/", index)
    app.router.add_get("/api/fleet", fleet)
    app.router.add_get("/api/devices/{device_id}/series", series)
    app.router.add_post("/api/devices/{device_id}/commands", command)
    app.router.add_get("/api/deployments", deployment_list)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
    return app


class Dashboard:
    """The dashboard web server on its own event loop in a daemon thread."""

    def __init__(self, store: FleetStore | None, host: str = "127.0.0.1", port: int = 0, *,
                 token_file: str | Path | None = None, require_token: bool = False, **app_options: Any) -> None:
        """Configure; port 0 lets the OS choose (returned by start()).

        A token is required off loopback (DashboardTokenError here without `token_file`), or with
        `require_token` on loopback too.
        """
        self.store, self.host, self._requested_port = store, host, port
        self.token = load_token(host, token_file, require_token)
        self._options = {**app_options, "token": self.token}
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
