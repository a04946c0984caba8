"""CloudNode: the whole cloud node in one object: gRPC tier, MQTT broker (embedded or external), fleet store,
fleet controller and dashboard (with /metrics), started in dependency order and stopped in reverse.

A fleet store that cannot be opened (a corrupt or unreadable `fleet.db`) does not stop the node: inference
serves, the broker runs, and the fleet plane reports "degraded" with the reason (log, banner, /healthz, the
dashboard's banner). `health()` reports every component.

Stop order: health NOT_SERVING and drain the gRPC tier first (agents move elsewhere or run locally while
telemetry still flows), then the controller (it stores what it has queued), the dashboard, the embedded
broker, and last the database.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_tier.config import NodeOptions, RayOptions, ServerConfig, address_in_use, bind_refused, parse_address
from cloud_tier.server import CloudServer

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = ["CloudNode", "INSECURE_WARNING", "MQTT_INSECURE_WARNING"]

INSECURE_WARNING = ("WARNING: the gRPC tier is plaintext and unauthenticated (--insecure): anyone who can reach it "
                    "can call it as any device")
MQTT_INSECURE_WARNING = ("WARNING: the MQTT plane is plaintext and unauthenticated (--insecure): anyone who can reach "
                         "the broker can read the fleet's telemetry and command any device")

log = logging.getLogger(__name__)


class CloudNode:
    """A cloud node: `start()` brings every part up (or none), `stop()` takes them down in order."""

    def __init__(self, bundles_dir: str | Path, config: ServerConfig = ServerConfig(),
                 options: NodeOptions | None = NodeOptions(), ray: RayOptions | None = None):
        """`options=None` runs only the gRPC tier (no broker, fleet store, controller or dashboard); `ray` runs the
        tails as Ray Serve deployments behind the same gRPC front (MissingExtraError without the [ray] extra)."""
        self.server = CloudServer.from_config(bundles_dir, config)
        self.ray_backend: Any = None  # cloud_tier.ray_backend.RayBackend with --backend ray
        if ray is not None:
            from cloud_tier.ray_backend import RayBackend

            self.ray_backend = self.server.tail_backend = RayBackend(ray, config)
        self.options = options
        self.broker: Any = None  # EmbeddedBroker when embedded
        self.broker_host: str | None = None
        self.broker_port: int | None = None
        self.store: Any = None  # FleetStore
        self.controller: Any = None  # FleetController
        self.dashboard: Any = None  # Dashboard
        self.store_error: str | None = None  # why the fleet store could not be opened (the fleet plane is degraded)
        self._started = False

    # -- addresses -----------------------------------------------------------------------------------

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC tier."""
        return self.server.address

    @property
    def grpc_port(self) -> int:
        """The gRPC tier's bound port (after start())."""
        if self.server.port is None:
            raise RuntimeError("CloudNode.grpc_port: the node has not started")
        return self.server.port

    @property
    def broker_address(self) -> str | None:
        """host:port of the MQTT broker in use (None with the gRPC tier alone)."""
        return None if self.broker_port is None else f"{self.broker_host}:{self.broker_port}"

    @property
    def broker_embedded(self) -> bool:
        """Whether the broker is the embedded amqtt one."""
        return self.broker is not None

    @property
    def dashboard_url(self) -> str | None:
        """Base URL of the dashboard, with a trailing slash (None with the gRPC tier alone)."""
        return None if self.dashboard is None else self.dashboard.url + "/"

    @property
    def insecure(self) -> bool:
        """Whether the gRPC tier serves plaintext and takes device ids from requests (--insecure)."""
        return self.server.insecure

    def warnings(self) -> list[str]:
        """What the operator must know about this node's security (shown on the dashboard)."""
        out = [INSECURE_WARNING] if self.insecure else []
        if self.options is not None and self.options.mqtt_insecure:
            out.append(MQTT_INSECURE_WARNING)
        return out

    def reload_certificates(self) -> None:
        """The gRPC tier serves the certificates on disk to new connections (what SIGHUP asks)."""
        self.server.reload_certificates()

    def banner(self) -> list[str]:
        """The lines `split-cloud serve` prints once everything is up (the first one is parsed by clients)."""
        lines = [f"listening on {self.grpc_address}"]
        if self.insecure:
            lines.append(INSECURE_WARNING)
        elif self.server.tls is not None:
            lines.append(f"grpc mTLS: clients need a certificate of the CA in {self.server.tls.dir}")
        if self.broker_address is not None:
            kind = "embedded" if self.broker_embedded else "external"
            lines.append(f"mqtt broker {self.broker_address} ({kind})")
        if self.ray_backend is not None:
            lines.append(f"tails on Ray Serve: {', '.join(sorted(self.ray_backend.names.values()))}")
        if self.dashboard_url is not None:
            lines.append(f"dashboard {self.dashboard_url}")
        if self.store_error is not None:
            lines.append(f"WARNING: fleet plane degraded: {self.store_error}")
        return lines

    def health(self) -> dict[str, Any]:
        """{"status": ok|degraded|down, "components": {grpc, broker, controller, store: {"status", "reason"}}}:
        down when the gRPC tier is, degraded when another part is not ok."""
        from cloud_tier.dashboard import overall, store_health

        serving = self.server.port is not None and not self.server.wait(0)
        components = {"grpc": {"status": "ok"} if serving else {"status": "down", "reason": "not serving"}}
        if self.options is not None:
            ctl = self.controller
            where = f"MQTT broker {self.broker_address}"
            if ctl is None:
                components["broker"] = {"status": "unknown", "reason": "not checked: no fleet controller"}
                components["controller"] = {"status": "down", "reason": "not started: no fleet store"}
            elif ctl.connected:
                components["broker"] = components["controller"] = {"status": "ok"}
            else:
                components["broker"] = {"status": "down", "reason": f"the controller has no session with the {where}"}
                components["controller"] = {"status": "down", "reason": f"reconnecting to the {where}"}
            components["store"] = store_health(self.store, self.store_error or "")
        return {"status": overall(components), "components": components}

    # -- metrics -----------------------------------------------------------------------------------

    def metrics_collectors(self) -> list[Collector]:
        """Prometheus collectors of the gRPC tier and (once started) the fleet controller, read at scrape time."""
        from cloud_tier.metrics import ControllerCollector, FleetDownCollector, RayCollector, ServerCollector

        server = self.server
        out: list[Collector] = [ServerCollector(server.stats.snapshot,
                                                lambda: server.counters.by_cut() if server.counters else {})]
        if self.ray_backend is not None:
            out.append(RayCollector(self.ray_backend.snapshot))
        if self.controller is not None:
            out.append(ControllerCollector(self.controller))
        elif self.store_error is not None:
            out.append(FleetDownCollector())
        return out

    def cloud_view(self) -> dict[str, dict[str, Any]]:
        """Per device id: what the gRPC tier saw (requests, errors, mean cloud ms, last request time)."""
        counters = self.server.counters
        return counters.devices() if counters else {}

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> CloudNode:
        """Start the gRPC tier, then broker, store, controller and dashboard; on failure stop what started."""
        if self._started:
            raise RuntimeError("CloudNode.start() called twice")
        self._started = True
        if self.options is not None:  # off loopback without a token: refuse before anything starts
            from cloud_tier.dashboard import load_token

            load_token(self.options.dashboard_host, self.options.dashboard_token_file)
        try:
            if self.ray_backend is not None:
                # Here, on the caller's thread: a local cluster's processes end with the thread that started them.
                self.ray_backend.connect()
            self.server.start()
            if self.options is not None:
                self._start_control_plane(self.options)
        except BaseException:
            self.stop(grace=1.0)
            raise
        return self

    def _start_control_plane(self, opts: NodeOptions) -> None:
        from cloud_tier.broker import EmbeddedBroker
        from cloud_tier.controller import FleetController
        from cloud_tier.dashboard import Dashboard
        from cloud_tier.fleet_store import FleetStore, describe_error

        pki, tls = self._mqtt_tls(opts)
        if opts.broker is None:
            self.broker = EmbeddedBroker(opts.embedded_broker_host, opts.embedded_broker_port, pki=pki,
                                         insecure=opts.mqtt_insecure, i_know_insecure=opts.mqtt_i_know_insecure)
            self.broker_host, self.broker_port = opts.embedded_broker_host, self.broker.start()
        else:
            self.broker_host, self.broker_port = parse_address(opts.broker, "--broker")
        db_path = opts.resolved_db_path()
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self.store = FleetStore(db_path, stale_after_s=opts.stale_after_s)
        except (sqlite3.Error, OSError) as exc:
            # Inference does not need the store: serve on, and say loudly what is wrong with the fleet plane.
            self.store_error = (f"fleet store {db_path} cannot be used ({describe_error(exc)}): device state and "
                                "telemetry are not recorded; move the file aside (or fix --db) and restart")
            log.error("%s", self.store_error)
        if self.store is not None:
            self.controller = FleetController(self.store, self.broker_host, self.broker_port, tls=tls,
                                              i_know_insecure=opts.mqtt_i_know_insecure)
            self.controller.start(wait_s=opts.connect_timeout_s)
        self.dashboard = Dashboard(self.store, opts.dashboard_host, opts.dashboard_port,
                                   token_file=opts.dashboard_token_file,
                                   extra_metrics=self.metrics_collectors(),
                                   cloud_view=self.cloud_view, warnings=self.warnings(), health=self.health,
                                   send_command=self.controller.command if self.controller is not None else None,
                                   command_token=self._command_token(opts),
                                   deployments=self.ray_backend.rows if self.ray_backend is not None else None)
        try:
            self.dashboard.start()
        except RuntimeError as exc:
            if address_in_use(exc):
                raise RuntimeError(bind_refused("the dashboard", opts.dashboard_host, opts.dashboard_port,
                                                "--dashboard-port")) from exc
            raise

    def _command_token(self, opts: NodeOptions) -> str | None:
        """The token the command API requires although the page is open: the CA folder's dashboard.token (what
        split-cloud fleet sends by default); None for an insecure node without one (loopback only, as the page)."""
        from cloud_tier.dashboard import load_token

        if opts.dashboard_token_file is not None:
            return None  # the whole dashboard needs that token already
        pki = Path(opts.mqtt_pki) if opts.mqtt_pki is not None else self.server.config.resolved_pki_dir()
        default = pki / "dashboard.token"
        if not default.is_file():
            if self.insecure:
                return None  # no CA at all: loopback only, like the page
            # Secure by default: no token to check, so nobody may command (a token nobody holds).
            log.warning("%s is missing: the command API refuses every request (give --dashboard-token-file, or "
                        "make the CA with a current split-cloud ca init)", default)
            return secrets.token_urlsafe(32)
        return load_token(opts.dashboard_host, default, require_token=True)

    def _mqtt_tls(self, opts: NodeOptions) -> tuple[Path | None, Any]:
        """(CA folder, the controller's MqttTls), or (None, None) in the insecure mode. One CA serves both
        planes: the gRPC tier's (`ServerConfig.pki_dir`) unless `NodeOptions.mqtt_pki` names another."""
        from cloud_tier.pki import PkiError
        from protos.mqtt import MqttTls

        if opts.mqtt_insecure:
            return None, None
        pki = Path(opts.mqtt_pki) if opts.mqtt_pki is not None else self.server.config.resolved_pki_dir()
        # Only the public CA certificate and the controller's own pair: the serving node never needs the CA's
        # signing key (split-cloud install leaves it out of the service's copy).
        files = (pki / "ca.pem", pki / "controller.pem", pki / "controller.key")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise PkiError(f"{pki}: no {', '.join(missing)}: expected a CA folder made by `split-cloud ca init` "
                           f"(or the copy `split-cloud install` places)")
        return pki, MqttTls(*(str(f) for f in files))

    def stop(self, grace: float = 10.0) -> None:
        """Drain and stop the gRPC tier (health NOT_SERVING first), then controller, dashboard, broker, DB."""
        steps = [
            ("gRPC tier", lambda: self.server.stop(grace=grace)),
            ("Ray Serve deployments", lambda: self.ray_backend and self.ray_backend.stop()),
            ("fleet controller", lambda: self.controller and self.controller.stop()),
            ("dashboard", lambda: self.dashboard and self.dashboard.stop()),
            ("embedded MQTT broker", lambda: self.broker and self.broker.stop()),
            ("fleet store", lambda: self.store and self.store.close()),
        ]
        for name, step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - one part failing to stop must not leave the others running
                log.exception("stopping the %s failed", name)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the gRPC tier has stopped; False on timeout."""
        return self.server.wait(timeout)

    def __enter__(self) -> CloudNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
