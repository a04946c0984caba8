"""The agent's side of the MQTT control plane: its telemetry, its state, and the commands it applies.

- Telemetry: each InferenceResult becomes one TelemetryRecord handed to `AgentControl.record()` (a bounded
  buffer; its flush thread publishes batches), so the request path pays for building one small object.
  The record's `queue_ms` is the edge queue plus the cloud batching queue, so the stages add up to total.
- State (retained): published when MQTT connects and whenever the mode or the cut changes, and refreshed
  (at most every STATE_REFRESH_S) when the bandwidth estimate moved by more than 10%. `close()` publishes
  `offline`; a dead agent is marked `offline` by its last will.
- Commands: `switch_cut` with a cut id of the bundle pins that cut (unknown ids are refused, the ack lists
  the bundle's cuts) and suspends adaptive switching; `switch_cut` with cut "auto" resumes it, and so does any
  `switch_mode` ("split": back to the cloud once probes pass; "local": stay on the device). `ping` is acked.
  AgentControl dedupes commands by id, so a command redelivered after a reconnect is applied once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING

from edge_agent.config import MqttConfig
from edge_agent.mqtt_control import AgentControl
from edge_agent.results import CLOUD, InferenceResult
from protos.mqtt import Ack, Command, MqttTls, TelemetryRecord

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent

__all__ = ["AUTO_CUT", "ControlLink"]

log = logging.getLogger("splitinfer.edge.fleet")

AUTO_CUT = "auto"  # switch_cut target that hands the choice back to adaptive switching
STATE_REFRESH_S = 5.0
_MAX_MS = 86_400_000.0  # protos.mqtt's bound on a stage time
_MAX_MBPS = 1e6  # protos.mqtt's bound on bandwidth_mbps


def _clip(ms: float) -> float:
    return min(max(ms, 0.0), _MAX_MS)


def telemetry_record(result: InferenceResult, ts: float | None = None) -> TelemetryRecord:
    """The MQTT telemetry record of one result (queue_ms = edge queue + cloud batching queue)."""
    t = result.timing
    return TelemetryRecord(
        request_id=result.request_id[:256], ts=time.time() if ts is None else ts, head_ms=_clip(t.head_ms),
        encode_ms=_clip(t.encode_ms), network_ms=_clip(t.network_ms), queue_ms=_clip(t.queue_ms + t.cloud_queue_ms),
        tail_ms=_clip(t.tail_ms), total_ms=_clip(t.total_ms), served_by=result.served_by, cut=result.cut,
    )


class ControlLink:
    """Attach an AgentControl to an EdgeAgent: publish its telemetry and state, apply the cloud's commands."""

    def __init__(self, agent: EdgeAgent, mqtt: MqttConfig, *, keepalive_s: int | None = None) -> None:
        """Configure the MQTT session of `agent` (nothing connects until start()); `keepalive_s` overrides
        [mqtt] keepalive_s."""
        self.agent = agent
        self.config = mqtt
        host, port = mqtt.address
        # The device has one certificate: [mqtt] tls_* when given, else the agent's [tls] files (the same ones
        # `split-cloud enroll` wrote for gRPC), unless [mqtt] insecure; an agent without [tls] speaks plaintext.
        agent_tls = agent.config.tls
        files = mqtt.tls or (None if agent_tls is None or mqtt.insecure else
                             (str(agent_tls.ca), str(agent_tls.cert), str(agent_tls.key)))
        tls = None if files is None else MqttTls(*files)
        self.control = AgentControl(
            agent.config.device_id, host, port, on_command=self._on_command, telemetry_bound=mqtt.telemetry_bound,
            flush_interval_ms=mqtt.flush_interval_ms, keepalive_s=keepalive_s or mqtt.keepalive_s,
            reconnect_min_s=mqtt.reconnect_min_s, reconnect_max_s=mqtt.reconnect_max_s, label=mqtt.label,
            heartbeat_s=mqtt.heartbeat_s, tls=tls, i_know_insecure=mqtt.i_know_insecure,
        )
        self.applied: collections.Counter[str] = collections.Counter()  # commands applied, by kind
        self._lock = threading.Lock()
        self._published_mbps: float | None = None
        self._published_at = 0.0
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self, wait_s: float | None = 10.0) -> ControlLink:
        """Publish the current state, hook into the agent, connect; optionally wait until commands can arrive."""
        self._publish_state()
        self.agent.add_result_listener(self._on_result)
        self.agent.add_state_listener(self._on_state)
        self.control.start(wait_s)
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush telemetry, publish `offline` (retained) and disconnect; the agent keeps running without MQTT."""
        self._closed = True
        self.control.close(timeout_s)

    def __enter__(self) -> ControlLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- agent hooks (agent threads: keep them short) ------------------------------------------------

    def _on_result(self, result: InferenceResult) -> None:
        if self._closed:
            return
        self.control.record(telemetry_record(result))
        if result.served_by == CLOUD and time.monotonic() - self._published_at >= STATE_REFRESH_S:
            mbps = self.agent.bandwidth.estimate().mbps
            last = self._published_mbps
            if mbps is not None and (last is None or abs(mbps - last) > 0.1 * last):
                self._publish_state()

    def _on_state(self, _mode: str, _cut: str) -> None:
        if not self._closed:
            self._publish_state()

    def _publish_state(self) -> None:
        mbps = self.agent.bandwidth.estimate().mbps
        with self._lock:  # one state at a time, so the retained one is the latest
            self._published_mbps = mbps
            self._published_at = time.monotonic()
            self.control.publish_state(
                mode=self.agent.mode, cut=self.agent.cut, model=self.agent.bundle.model_name,
                bandwidth_mbps=None if mbps is None else min(mbps, _MAX_MBPS),
            )

    # --- commands (MQTT network thread) ---------------------------------------------------------------

    def _on_command(self, cmd: Command) -> Ack:
        agent, adaptive = self.agent, self.agent.adaptive
        if cmd.kind == "ping":
            self.applied[cmd.kind] += 1
            return Ack(cmd.command_id, True, "pong")
        if cmd.kind == "switch_mode":
            agent.set_mode(cmd.mode)  # type: ignore[arg-type]
            if adaptive is not None:
                adaptive.resume()
            self.applied[cmd.kind] += 1
            return Ack(cmd.command_id, True, f"mode {cmd.mode}" + (", adaptive cut resumed" if adaptive else ""))
        # switch_cut
        cut = cmd.cut or ""
        if cut == AUTO_CUT:
            if adaptive is None:
                return Ack(cmd.command_id, False, f"adaptive cut selection is off ([adaptive] enabled = false); "
                                                  f"cut stays {agent.cut!r}")
            adaptive.resume()
            self.applied[cmd.kind] += 1
            return Ack(cmd.command_id, True, f"adaptive cut selection resumed (cut now {agent.cut!r})")
        cuts = agent.bundle.cut_ids
        if cut not in cuts:
            return Ack(cmd.command_id, False, f"unknown cut {cut!r}: bundle {agent.bundle.model_name!r} has "
                                              f"{sorted(cuts)} (or {AUTO_CUT!r})")
        if adaptive is not None:
            adaptive.pin(cut)
        else:
            agent.set_cut(cut)
        self.applied[cmd.kind] += 1
        log.info("cloud pinned cut %s", cut)
        return Ack(cmd.command_id, True, f"cut {cut}" + (f" pinned (send cut {AUTO_CUT!r} to resume adaptive)"
                                                         if adaptive is not None else ""))
