"""Prometheus metrics of the cloud node: the gRPC tier, the fleet controller and the fleet store's devices.

Each part has a custom collector (`prometheus_client`'s Collector) that reads the existing stats objects at
scrape time and yields metric families; the dashboard's `/metrics` renders them with `generate_latest` from a
private `CollectorRegistry` (`MetricsRegistry`), in the text format 0.0.4. prometheus_client checks metric and
label names and escapes label values and HELP text, so device-supplied text cannot forge a sample line.
Counter families are declared without `_total`; the exposition appends it. No `_created` samples are emitted.
Names, types, labels and values are those of the hand-written exposition this replaced; the text differs only
in form (label names sorted, integers written as floats), which Prometheus reads the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from cloud_tier.stats import BATCH_SIZE_BUCKETS
from models.extras import require
from protos.mqtt import STAGES

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - the [cloud] extra is missing: name the pip line that fixes it
    require("prometheus_client", "cloud")
    raise

if TYPE_CHECKING:
    from cloud_tier.controller import FleetController

__all__ = ["CONTENT_TYPE", "ControllerCollector", "FleetCollector", "MetricsRegistry", "RayCollector",
           "ServerCollector", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes

FleetRows = Callable[[], list[dict[str, Any]]]  # FleetStore.fleet() rows
Snapshot = Callable[[], Mapping[str, Any]]  # ServerStats.snapshot()
PerCut = Callable[[], Mapping[tuple[str, str, str], int]]  # RequestCounters.by_cut()


def _value(value: Any) -> float:
    """A sample value; None (no data) is NaN."""
    return math.nan if value is None else float(value)


class FleetCollector(Collector):
    """Per-device gauges and counters from the fleet store's rows (FleetStore.fleet())."""

    def __init__(self, rows: FleetRows):
        self._rows = rows

    def collect(self) -> Iterator[Metric]:
        """The device families of the fleet's rows now."""
        return self.families(self._rows())

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so a registry refuses a name declared twice."""
        return self.families([])

    @staticmethod
    def families(fleet: list[dict[str, Any]]) -> Iterator[Metric]:
        """The device families of `fleet` rows."""
        def per_device(kind: Any, name: str, help_: str, value: Callable[[dict[str, Any]], Any],
                       skip_none: bool = False) -> Metric:
            out = kind(name, help_, labels=["device"])
            for d in fleet:
                if value(d) is not None or not skip_none:
                    out.add_metric([d["device_id"]], _value(value(d)))
            return out

        yield per_device(GaugeMetricFamily, "splitinfer_device_up", "1 if the device is online, else 0.",
                         lambda d: 1 if d["status"] == "online" else 0)
        yield per_device(GaugeMetricFamily, "splitinfer_device_requests_per_second",
                         "Requests per second over the rate window.", lambda d: d["req_per_s"])
        yield per_device(GaugeMetricFamily, "splitinfer_device_edge_share", "Share of requests finished on the device.",
                         lambda d: d["edge_share"], skip_none=True)
        yield per_device(CounterMetricFamily, "splitinfer_device_dropped_records",
                         "Telemetry records the agent dropped.", lambda d: d["dropped_total"])
        yield per_device(GaugeMetricFamily, "splitinfer_device_last_seen_seconds",
                         "Unix time of the last message from the device.", lambda d: d["last_seen"])
        latency = GaugeMetricFamily("splitinfer_device_latency_ms",
                                    "Latency percentiles per stage over the stats window (ms).",
                                    labels=["device", "stage", "quantile"])
        for d in fleet:
            for stage in STAGES:
                for q in (50, 95, 99):
                    v = d["stages"][stage][f"p{q}"]
                    if v is not None:
                        latency.add_metric([d["device_id"], stage[:-3], f"0.{q}"], v)
        yield latency


class ServerCollector(Collector):
    """The gRPC tier: ServerStats.snapshot() plus responses counted by (model, cut, status code name)."""

    def __init__(self, snapshot: Snapshot, per_cut: PerCut):
        self._snapshot, self._per_cut = snapshot, per_cut

    def collect(self) -> Iterator[Metric]:
        """The gRPC tier's families now."""
        return self.families(self._snapshot(), self._per_cut())

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so a registry refuses a name declared twice."""
        return self.families({}, {})

    @staticmethod
    def families(snapshot: Mapping[str, Any], per_cut: Mapping[tuple[str, str, str], int]) -> Iterator[Metric]:
        """The gRPC tier's families of one snapshot."""
        yield CounterMetricFamily("splitinfer_cloud_requests", "Infer requests received (probes excluded).",
                                  value=snapshot.get("requests", 0))
        yield CounterMetricFamily("splitinfer_cloud_probes", "Probe requests received (liveness and link probes).",
                                  value=snapshot.get("probes", 0))
        errors = CounterMetricFamily("splitinfer_cloud_errors", "Requests answered with a non-OK status, by code.",
                                     labels=["code"])
        for code, n in sorted(snapshot.get("errors", {}).items()):
            errors.add_metric([code], n)
        yield errors
        responses = CounterMetricFamily(
            "splitinfer_cloud_responses",
            "Infer responses by model, cut and gRPC status code (unknown model/cut pairs as _unknown).",
            labels=["model", "cut", "code"])
        for (model, cut, code), n in sorted(per_cut.items()):
            responses.add_metric([model, cut, code], n)
        yield responses
        yield CounterMetricFamily("splitinfer_cloud_batches", "Tail runs (batches) executed.",
                                  value=snapshot.get("batches", 0))
        yield _batch_sizes(snapshot)
        yield GaugeMetricFamily("splitinfer_cloud_queue_depth", "Requests waiting in the batchers now.",
                                value=snapshot.get("queued", 0))
        yield GaugeMetricFamily("splitinfer_cloud_in_flight", "Accepted requests not yet answered.",
                                value=snapshot.get("in_flight", 0))


def _histogram_buckets(snapshot: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Cumulative buckets from ServerStats' non-cumulative per-bucket counts; every bucket always."""
    counts = {float(b): 0 for b in BATCH_SIZE_BUCKETS}  # a stable series set from the first scrape
    counts.update({float(k): v for k, v in snapshot.get("batch_size_histogram", {}).items()})
    buckets, running = [], 0
    for upper in sorted(b for b in counts if not math.isinf(b)):
        running += counts[upper]
        buckets.append((str(int(upper)) if upper.is_integer() else repr(upper), running))
    buckets.append(("+Inf", snapshot.get("batches", 0)))
    return buckets


def _batch_sizes(snapshot: Mapping[str, Any]) -> HistogramMetricFamily:
    """Rows per tail run."""
    return HistogramMetricFamily("splitinfer_cloud_batch_size_rows", "Rows per tail run.",
                                 buckets=_histogram_buckets(snapshot), sum_value=snapshot.get("batched_rows", 0))


class RayCollector(Collector):
    """The Ray backend's deployments (RayBackend.snapshot()): replicas by state and the autoscaler's target,
    requests outstanding, batch rows, and how old Serve's state is (read at most every few seconds)."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Mapping[str, Any]]]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """The deployment families now."""
        return self.families(self._snapshot())

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so a registry refuses a name declared twice."""
        return self.families({})

    @staticmethod
    def families(deployments: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
        """The deployment families of one RayBackend.snapshot()."""
        info = GaugeMetricFamily("splitinfer_ray_deployment_info", "The (model, cut) tail a deployment serves (1).",
                                 labels=["deployment", "model", "model_sha256", "cut"])
        replicas = GaugeMetricFamily("splitinfer_ray_replicas", "Ray Serve replicas per tail deployment, by state.",
                                     labels=["deployment", "state"])
        target = GaugeMetricFamily("splitinfer_ray_target_replicas",
                                   "Replicas the autoscaler wants for a tail deployment now.", labels=["deployment"])
        queued = GaugeMetricFamily("splitinfer_ray_queue_depth", "Requests sent to a tail deployment and not "
                                   "answered yet (ongoing and queued in Serve).", labels=["deployment"])
        sizes = HistogramMetricFamily("splitinfer_ray_batch_size_rows", "Rows per @serve.batch batch, by deployment.",
                                      labels=["deployment"])
        age = GaugeMetricFamily("splitinfer_ray_status_age_seconds",
                                "Seconds since Ray Serve's state (replicas, target) was last read.",
                                labels=["deployment"])
        for name, d in sorted(deployments.items()):
            info.add_metric([name, d.get("model", ""), d.get("model_sha256", ""), d.get("cut", "")], 1)
            for state, n in sorted({"RUNNING": 0, **d.get("replicas", {})}.items()):
                replicas.add_metric([name, state], n)
            target.add_metric([name], _value(d.get("target_replicas")))
            queued.add_metric([name], d.get("outstanding", 0))
            sizes.add_metric([name], _histogram_buckets(d), sum_value=d.get("batched_rows", 0))
            age.add_metric([name], _value(d.get("status_age_s")))
        yield from (info, replicas, target, queued, sizes, age)


CONTROLLER_COUNTERS = {
    "telemetry_messages": "Valid telemetry batches received.",
    "stored_records": "Request records written to the fleet store.",
    "stored_states": "Device state messages written to the fleet store.",
    "bad_payloads": "Messages ignored because topic or payload broke the schema.",
    "dropped_messages": "Messages dropped because the store queue was full.",
    "duplicate_batches": "Telemetry batches skipped as a second delivery of a batch already stored.",
    "future_timestamps": "Record and state times more than 5 minutes ahead of receipt, stored as the receipt time.",
    "store_retries": "Store writes retried after a failure (with backoff; nothing is acknowledged meanwhile).",
}
# Labelled controller counters: attribute (a collections.Counter) -> (family, label, help).
CONTROLLER_LABELLED = {
    "store_errors": ("splitinfer_fleet_store_errors", "kind",
                     "Failed fleet store writes, by kind of error (disk_full, io_error, corrupt, busy, ...)."),
    "records_dropped": ("splitinfer_fleet_records_dropped", "reason",
                        "Telemetry records given up for good, by reason (each is logged with its cause)."),
}


class ControllerCollector(Collector):
    """The fleet controller: MQTT session, messages stored, refused and dropped."""

    def __init__(self, controller: FleetController):
        self._controller = controller

    def collect(self) -> Iterator[Metric]:
        """The controller's families now."""
        ctl = self._controller
        counters = {key: getattr(ctl, key) for key in CONTROLLER_COUNTERS}
        labelled = {key: dict(getattr(ctl, key)) for key in CONTROLLER_LABELLED}
        return self.families(ctl.connected, counters, ctl.pending, labelled, ctl.store.health().ok)

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so a registry refuses a name declared twice."""
        return self.families(False, {}, 0)

    @staticmethod
    def families(connected: bool, counters: Mapping[str, int], pending: int,
                 labelled: Mapping[str, Mapping[str, int]] | None = None, store_ok: bool = True) -> Iterator[Metric]:
        """The controller's families of one reading."""
        yield GaugeMetricFamily("splitinfer_fleet_mqtt_connected", "1 while the controller's MQTT session is up.",
                                value=1 if connected else 0)
        yield GaugeMetricFamily("splitinfer_fleet_store_up", "1 while the fleet store's last write succeeded.",
                                value=1 if store_ok else 0)
        for key, help_ in CONTROLLER_COUNTERS.items():
            yield CounterMetricFamily(f"splitinfer_fleet_{key}", help_, value=counters.get(key, 0))
        for key, (family, label, help_) in CONTROLLER_LABELLED.items():
            out = CounterMetricFamily(family, help_, labels=[label])
            for value, n in sorted((labelled or {}).get(key, {}).items()):
                out.add_metric([value], n)
            yield out
        yield GaugeMetricFamily("splitinfer_fleet_pending_messages", "Messages received but not yet stored.",
                                value=pending)


class FleetDownCollector(Collector):
    """The fleet plane of a node whose store could not be opened: no controller ran, so the controller's families
    read 0 (`splitinfer_fleet_store_up 0`: the alert on it fires), instead of vanishing from /metrics."""

    def collect(self) -> Iterator[Metric]:
        """The controller's families, down."""
        return ControllerCollector.families(False, {}, 0, None, store_ok=False)

    def describe(self) -> Iterator[Metric]:
        """The same families without samples."""
        return ControllerCollector.families(False, {}, 0)


class MetricsRegistry:
    """A private CollectorRegistry: the collectors of one node; `render()` is the /metrics body."""

    def __init__(self, collectors: Iterable[Collector] = ()):
        self._registry = CollectorRegistry()
        for collector in collectors:
            self.register(collector)

    def register(self, collector: Collector) -> None:
        """Add a collector; ValueError when one of its family names is taken."""
        self._registry.register(collector)

    def render(self) -> bytes:
        """Every collector's families now, in the text format 0.0.4 (CONTENT_TYPE)."""
        return generate_latest(self._registry)


def render(*collectors: Collector) -> str:
    """The exposition text of `collectors` alone (for tests and tools)."""
    return MetricsRegistry(collectors).render().decode()
