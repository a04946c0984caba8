"""Prometheus text exposition (format 0.0.4) of the cloud tier: gRPC server, fleet controller, fleet store.

One small writer (`Exposition`) emits each family once with its HELP and TYPE lines and escapes label values
(backslash, double quote, newline) and HELP text (backslash, newline): model names come from bundle folder
names and device-supplied text must never be able to forge a sample line.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from cloud_tier.stats import BATCH_SIZE_BUCKETS
from protos.mqtt import STAGES

__all__ = ["Exposition", "escape_label", "fleet_metrics", "server_metrics", "controller_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: Any) -> str:
    """A label value escaped for the text format (\\ -> \\\\, \" -> \\\", newline -> \\n)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _num(value: Any) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _labels(labels: Mapping[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


class Exposition:
    """Collects metric families and renders them; a family name may be declared only once."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._names: set[str] = set()

    def family(self, name: str, kind: str, help_: str,
               samples: Iterable[tuple[Mapping[str, Any], Any]]) -> None:
        """Add family `name` (counter|gauge) with (labels, value) samples."""
        self._declare(name, kind, help_)
        self._lines.extend(f"{name}{_labels(labels)} {_num(value)}" for labels, value in samples)

    def histogram(self, name: str, help_: str, buckets: Mapping[float, int], total: float, count: int,
                  labels: Mapping[str, Any] | None = None) -> None:
        """Add a histogram from non-cumulative per-bucket counts (upper bound -> count; inf allowed)."""
        self._declare(name, "histogram", help_)
        base = dict(labels or {})
        running = 0
        for upper in sorted(b for b in buckets if not math.isinf(b)):
            running += buckets[upper]
            le = str(int(upper)) if float(upper).is_integer() else repr(float(upper))
            self._lines.append(f"{name}_bucket{_labels({**base, 'le': le})} {running}")
        self._lines.append(f"{name}_bucket{_labels({**base, 'le': '+Inf'})} {count}")
        self._lines.append(f"{name}_sum{_labels(base)} {_num(total)}")
        self._lines.append(f"{name}_count{_labels(base)} {count}")

    def extend(self, other: "Exposition") -> None:
        """Append every family of `other` (names must not clash)."""
        clash = self._names & other._names
        if clash:
            raise ValueError(f"metric families declared twice: {sorted(clash)}")
        self._names |= other._names
        self._lines.extend(other._lines)

    def render(self) -> str:
        """The exposition text, newline-terminated."""
        return "\n".join(self._lines) + "\n"

    def _declare(self, name: str, kind: str, help_: str) -> None:
        if name in self._names:
            raise ValueError(f"metric family {name!r} declared twice")
        if kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"metric kind {kind!r} is unknown: expected counter, gauge or histogram")
        self._names.add(name)
        self._lines.append(f"# HELP {name} {_help(help_)}")
        self._lines.append(f"# TYPE {name} {kind}")


def fleet_metrics(fleet: list[dict[str, Any]]) -> Exposition:
    """Per-device gauges from FleetStore.fleet() rows."""
    out = Exposition()

    def dev(d: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"device": d["device_id"], **more}

    out.family("splitinfer_device_up", "gauge", "1 if the device is online, else 0.",
               [(dev(d), 1 if d["status"] == "online" else 0) for d in fleet])
    out.family("splitinfer_device_requests_per_second", "gauge", "Requests per second over the rate window.",
               [(dev(d), d["req_per_s"]) for d in fleet])
    out.family("splitinfer_device_edge_share", "gauge", "Share of requests finished on the device.",
               [(dev(d), d["edge_share"]) for d in fleet if d["edge_share"] is not None])
    out.family("splitinfer_device_dropped_records_total", "counter", "Telemetry records the agent dropped.",
               [(dev(d), d["dropped_total"]) for d in fleet])
    out.family("splitinfer_device_last_seen_seconds", "gauge", "Unix time of the last message from the device.",
               [(dev(d), d["last_seen"]) for d in fleet])
    samples = []
    for d in fleet:
        for stage in STAGES:
            for q in (50, 95, 99):
                v = d["stages"][stage][f"p{q}"]
                if v is not None:
                    samples.append((dev(d, stage=stage[:-3], quantile=f"0.{q}"), v))
    out.family("splitinfer_device_latency_ms", "gauge", "Latency percentiles per stage over the stats window (ms).",
               samples)
    return out


def server_metrics(snapshot: Mapping[str, Any], per_cut: Mapping[tuple[str, str, str], int]) -> Exposition:
    """The gRPC tier: ServerStats.snapshot() plus responses counted by (model, cut, status code name)."""
    out = Exposition()
    out.family("splitinfer_cloud_requests_total", "counter", "Infer requests received (probes excluded).",
               [({}, snapshot.get("requests", 0))])
    out.family("splitinfer_cloud_probes_total", "counter", "Probe requests received (liveness and link probes).",
               [({}, snapshot.get("probes", 0))])
    out.family("splitinfer_cloud_errors_total", "counter", "Requests answered with a non-OK status, by code.",
               [({"code": code}, n) for code, n in sorted(snapshot.get("errors", {}).items())])
    out.family("splitinfer_cloud_responses_total", "counter",
               "Infer responses by model, cut and gRPC status code (unknown model/cut pairs as _unknown).",
               [({"model": m, "cut": c, "code": code}, n) for (m, c, code), n in sorted(per_cut.items())])
    out.family("splitinfer_cloud_batches_total", "counter", "Tail runs (batches) executed.",
               [({}, snapshot.get("batches", 0))])
    hist = {float(b): 0 for b in BATCH_SIZE_BUCKETS}  # every bucket, always: a stable series set
    hist.update({float(k): v for k, v in snapshot.get("batch_size_histogram", {}).items()})
    out.histogram("splitinfer_cloud_batch_size_rows", "Rows per tail run.", hist,
                  snapshot.get("batched_rows", 0), snapshot.get("batches", 0))
    out.family("splitinfer_cloud_queue_depth", "gauge", "Requests waiting in the batchers now.",
               [({}, snapshot.get("queued", 0))])
    out.family("splitinfer_cloud_in_flight", "gauge", "Accepted requests not yet answered.",
               [({}, snapshot.get("in_flight", 0))])
    return out


def controller_metrics(connected: bool, counters: Mapping[str, int], pending: int) -> Exposition:
    """The fleet controller: MQTT session, messages stored, refused and dropped."""
    out = Exposition()
    out.family("splitinfer_fleet_mqtt_connected", "gauge", "1 while the controller's MQTT session is up.",
               [({}, 1 if connected else 0)])
    helps = {
        "telemetry_messages": "Valid telemetry batches received.",
        "stored_records": "Request records written to the fleet store.",
        "stored_states": "Device state messages written to the fleet store.",
        "bad_payloads": "Messages ignored because topic or payload broke the schema.",
        "dropped_messages": "Messages dropped because the store queue was full.",
        "duplicate_batches": "Telemetry batches skipped as a second delivery of a batch already stored.",
    }
    for key, help_ in helps.items():
        out.family(f"splitinfer_fleet_{key}_total", "counter", help_, [({}, counters.get(key, 0))])
    out.family("splitinfer_fleet_pending_messages", "gauge", "Messages received but not yet stored.",
               [({}, pending)])
    return out
