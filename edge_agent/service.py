"""`split-agent serve`: the long-running device service.

Lifecycle: load the config and the bundle; start the EdgeAgent (cloud link and fallback exactly as `split-agent
run`), the MQTT control link when [mqtt] is set, and the local inference API (edge_agent/local_api.py); tell
systemd READY=1 (models/systemd.py); then loop, sending WATCHDOG=1 every watchdog period while the service is
healthy (the local API answers a Health call over its own socket and the agent's lock and workers respond) and
STATUS= lines when the mode or the cut changes.

Signals (handled on the main thread; the handlers only set flags):
- SIGTERM, SIGINT: drain. STOPPING=1; new local requests get UNAVAILABLE "draining"; every accepted request
  finishes (on the cloud or the device); the agent closes; the control link flushes its telemetry and publishes
  the `offline` state; exit 0. A second signal while draining is logged and draining goes on; past
  `[service] drain_timeout_s` the service exits 1 naming what was left.
- SIGHUP: reload the config file. A config that does not load is refused (logged) and the old one kept. Applied
  at run time (RELOADABLE): `cut`, the [tls] certificate files (read now, used from the next connection to the
  cloud), `service.log_level`, `service.max_requests`, `service.request_timeout_s`, `service.max_message_mb`,
  `service.drain_timeout_s`. Any other changed key is logged as needing a restart and not applied.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.config import DEFAULT_CONFIG, AgentConfig, ConfigError, ServiceConfig, merge_overrides
from edge_agent.local_api import LocalApi
from models import systemd

__all__ = ["DEFAULT_CONFIG", "RELOADABLE", "AgentService", "flatten"]

log = logging.getLogger("splitinfer.edge.service")

SIGNAL_TICK_S = 0.2  # how soon the loop acts on a signal (see _on_hup)
IDLE_TICK_S = 1.0  # the main loop wakes at least this often (status updates) when there is no watchdog
HEALTH_DEADLINE_S = 2.0
RELOADABLE = ("cut", "tls.ca", "tls.cert", "tls.key", "service.log_level", "service.max_requests",
              "service.request_timeout_s", "service.max_message_mb", "service.drain_timeout_s")


def flatten(cfg: AgentConfig) -> dict[str, Any]:
    """Every key of a config with its value, tables dotted ("service.log_level")."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
        else:
            out[f.name] = value
    return out


class AgentService:
    """The agent as a service: `start()`, then `serve()` until a signal drains it; `serve()` returns the exit status."""

    def __init__(self, config_path: Path, overrides: dict[str, Any] | None = None):
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.config = self._load()
        self.agent: Any = None
        self.control: Any = None
        self.api: LocalApi | None = None
        self._wake = threading.Event()
        self._stop_signal: str | None = None
        self._reload = False
        self._status = ""

    def _load(self) -> AgentConfig:
        return AgentConfig.from_toml(self.config_path, merge_overrides({}, self.overrides))

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> AgentService:
        """Load the head, connect, listen; READY=1."""
        from edge_agent.agent import EdgeAgent  # onnxruntime and grpc load here

        cfg = self.config
        if cfg.check_transport() == "insecure":
            log.warning("the link to the cloud %s is plaintext and unauthenticated (insecure = true)", cfg.cloud)
        self.agent = EdgeAgent(cfg)
        try:
            if cfg.mqtt is not None:
                from edge_agent.control import ControlLink  # paho loads only with [mqtt]

                self.control = ControlLink(self.agent, cfg.mqtt).start(wait_s=None)
            self.api = LocalApi(self.agent, cfg.service, control=self.control).start()
        except BaseException:
            self._close_links()
            raise
        self.agent.add_state_listener(lambda *_: self._wake.set())
        print(f"split-agent: serving {self.agent.bundle.model_name} cut {self.agent.cut} on {self.api.address} "
              f"(cloud {cfg.cloud}, mode {self.agent.mode})", file=sys.stderr, flush=True)
        systemd.notify("READY=1", self._status_line())
        return self

    def _status_line(self) -> str:
        self._status = f"STATUS=mode {self.agent.mode}, cut {self.agent.cut}, serving on {self.api_address}"
        return self._status

    @property
    def api_address(self) -> str:
        """Where the local API listens ("unix:/path" or "host:port")."""
        return self.api.address if self.api is not None else ""

    # -- signals --------------------------------------------------------------------------------

    def install_signals(self) -> dict[int, Any]:
        """SIGTERM/SIGINT drain, SIGHUP reloads (main thread only); returns the handlers they replace."""
        return {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_stop),
                signal.SIGINT: signal.signal(signal.SIGINT, self._on_stop),
                signal.SIGHUP: signal.signal(signal.SIGHUP, self._on_hup)}

    def _on_stop(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self._stop_signal is not None:
            log.warning("%s while draining: still draining (at most [service] drain_timeout_s = %.0f s)", name,
                        self.config.service.drain_timeout_s)
            return
        self._stop_signal = name  # only a flag: the loop sees it within SIGNAL_TICK_S

    def _on_hup(self, _signum: int, _frame: object) -> None:
        self._reload = True

    # A signal handler runs on the main thread between two bytecodes, possibly inside Event.clear() or wait()
    # holding the Event's lock: a handler that called Event.set() could deadlock the loop. The handlers set
    # flags, and the loop wakes at least this often to read them.

    def request_stop(self, reason: str = "stop requested") -> None:
        """Drain from another thread (tests, embedding)."""
        if self._stop_signal is None:
            self._stop_signal = reason
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------------

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT; drain; the exit status (0 when everything in flight finished)."""
        period = systemd.watchdog_period_s()
        tick = min(period or IDLE_TICK_S, IDLE_TICK_S, SIGNAL_TICK_S)
        next_ping = 0.0
        if period:
            log.info("systemd watchdog: pinging every %.2f s", period)
        while self._stop_signal is None:
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop_signal is not None:
                break
            if self._reload:
                self._reload = False
                self.reload()
            status = self._status
            if self._status_line() != status:
                systemd.notify(self._status)
            now = time.monotonic()
            if period and now >= next_ping:
                problem = self.health_problem()
                if problem is None:
                    systemd.notify("WATCHDOG=1")
                    next_ping = now + period
                else:  # no ping: systemd restarts a service that stays unhealthy past WatchdogSec
                    log.error("unhealthy, not pinging the watchdog: %s", problem)
        return self.drain(self._stop_signal)

    def health_problem(self) -> str | None:
        """None when the service's own parts answer: the local API (a Health call over its socket) and the agent."""
        from edge_agent.local_client import LocalClient, LocalError

        t0 = time.monotonic()
        done = threading.Event()

        def touch_agent() -> None:
            self.agent.stats()  # takes the agent's lock: a deadlocked agent never returns
            done.set()

        threading.Thread(target=touch_agent, daemon=True, name="splitinfer-watchdog").start()
        target = self.api_address
        try:
            with LocalClient(socket=target[5:]) if target.startswith("unix:") else LocalClient(address=target) as c:
                c.health(timeout=HEALTH_DEADLINE_S)
        except LocalError as exc:
            if exc.code != "RESOURCE_EXHAUSTED":  # that is an answer: the API is alive and full (busy, or held
                return f"the local API does not answer ({exc})"  # by idle client streams), not stuck
        if not done.wait(max(0.0, HEALTH_DEADLINE_S - (time.monotonic() - t0))):
            return f"the agent did not answer within {HEALTH_DEADLINE_S} s (a lock held or its threads stuck)"
        return None

    # -- reload ---------------------------------------------------------------------------------

    def reload(self) -> list[str]:
        """SIGHUP: load the config file again and apply what may change at run time; the keys applied."""
        try:
            new = self._load()
            if new.tls is not None and new != self.config:
                new.tls.read()  # a certificate that cannot be read is refused now, not at the next reconnect
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return []
        old_keys, new_keys = flatten(self.config), flatten(new)
        changed = sorted(k for k in new_keys if new_keys[k] != old_keys.get(k))
        tls_files_changed = new.tls is not None and any(k.startswith("tls.") for k in changed)
        applied = [k for k in changed if k in RELOADABLE]
        restart = [k for k in changed if k not in RELOADABLE]
        if "cut" in applied:
            try:
                self.agent.set_cut(new.cut or self.agent.bundle.chosen)
            except Exception as exc:  # an unknown cut id: refuse the whole reload
                log.error("reload refused, keeping the running config: cut %r: %s", new.cut, exc)
                return []
        if new.tls is not None:  # certificates: the same paths may hold renewed files
            self.agent.reload_tls(new)
            if not tls_files_changed:
                applied.append("tls (certificates re-read)")
        svc: ServiceConfig = new.service
        logging.getLogger().setLevel(svc.log_level)
        if self.api is not None:
            self.api.update(svc)
        self.config = dataclasses.replace(self.config, cut=new.cut, tls=new.tls, service=dataclasses.replace(
            svc, socket=self.config.service.socket, listen=self.config.service.listen,
            socket_mode=self.config.service.socket_mode, allow_remote=self.config.service.allow_remote))
        log.warning("reloaded %s: applied %s%s", self.config_path, ", ".join(applied) or "nothing",
                    f"; needs a restart, not applied: {', '.join(restart)}" if restart else "")
        return applied

    # -- drain ----------------------------------------------------------------------------------

    def drain(self, why: str | None = None) -> int:
        """Stop taking requests, finish those in flight, flush telemetry, publish offline; 0, or 1 naming what
        was left after drain_timeout_s."""
        timeout = self.config.service.drain_timeout_s
        deadline = time.monotonic() + timeout
        log.warning("draining (%s): finishing the requests in flight (at most %.0f s)", why or "stop", timeout)
        systemd.notify("STOPPING=1", f"STATUS=draining ({why or 'stop'})")
        left: list[str] = []
        api = self.api
        if api is not None:
            api.drain()
            if not api.wait_idle(max(0.0, deadline - time.monotonic())):
                left.append(f"{api.in_flight} local requests unfinished")
            api.stop(grace=max(0.5, min(5.0, deadline - time.monotonic())))
        answered = api.answered if api is not None else 0
        self._close_links(max(0.1, deadline - time.monotonic()))
        if left:
            print(f"split-agent: drain timed out after {timeout:g} s: {'; '.join(left)}", file=sys.stderr,
                  flush=True)
            return 1
        print(f"split-agent: drained ({why or 'stop'}): {answered} requests answered, exiting", file=sys.stderr,
              flush=True)
        return 0

    def _close_links(self, timeout: float = 5.0) -> None:
        if self.agent is not None:
            self.agent.close(timeout)  # its stragglers finish on the device and reach the telemetry buffer
        if self.control is not None:
            self.control.close(min(timeout, 5.0))  # flush telemetry, publish offline, disconnect
