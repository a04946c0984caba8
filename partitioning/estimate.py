"""Roofline estimation: per-node costs of a model on a device it was not measured on.

From a device table entry (peak rates x efficiency, `partitioning.devices`) or from the rates a measured device
achieved (`partitioning.device_profile.MeasuredDeviceProfile`). Needs onnx (shape inference, through
`partitioning.flops.node_stats`), which is imported when a model is analysed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from partitioning.costtypes import BoundaryRates, NodeCosts, check_precision
from partitioning.devices import DeviceProfile, GpuProfile
from partitioning.flops import VIEW_OPS, NodeStats, node_stats, runtime_free_nodes

if TYPE_CHECKING:
    import onnx

PRECISION_BYTES = {"fp32": 1.0, "fp16": 0.5, "int8": 0.25}  # bytes moved relative to the fp32 graph


class FittedProfile(Protocol):
    """A measured device profile: estimates another model from the rates it achieved."""

    def estimate(self, model: onnx.ModelProto) -> NodeCosts:
        """Roofline costs of `model` from the fitted rates."""
        ...


def roofline(
    model: onnx.ModelProto, gflops: float, gbps: float, launch_ms: float, byte_scale: float = 1.0
) -> tuple[dict[str, float], int]:
    """Per-node ms by the roofline below; nodes the runtime folds or fuses away cost 0. Also their count."""
    per_node, free, _ = _roofline(model, gflops, gbps, launch_ms, byte_scale)
    return per_node, free


def uncosted_nodes(stats: dict[str, NodeStats], free: Iterable[str] = ()) -> tuple[str, ...]:
    """Nodes whose work the roofline cannot determine: a shape is unknown, and the node is not folded or fused
    away by the runtime nor a view op (which costs its launch whatever its shapes)."""
    skip = set(free)
    return tuple(n for n, s in stats.items() if not s.shapes_known and n not in skip and s.op_type not in VIEW_OPS)


def _roofline(
    model: onnx.ModelProto, gflops: float, gbps: float, launch_ms: float, byte_scale: float = 1.0
) -> tuple[dict[str, float], int, tuple[str, ...]]:
    """`roofline` and the nodes it could not cost (`uncosted_nodes`)."""
    stats = node_stats(model)
    free = runtime_free_nodes(model)
    per_node = {}
    for name, s in stats.items():
        if name in free:
            per_node[name] = 0.0
            continue
        moved = 0.0 if s.op_type in VIEW_OPS else s.bytes_total * byte_scale
        # time_ms = max(FLOPs / (GFLOP/s * 1e6), bytes / (GB/s * 1e6)) + launch_ms
        #   (1 GFLOP/s = 1e6 FLOP per ms; the effective rates already include the efficiency factors)
        per_node[name] = max(s.flops / (gflops * 1e6), moved / (gbps * 1e6)) + launch_ms
    return per_node, len(free), uncosted_nodes(stats, free)


def estimate_node_costs(
    model: onnx.ModelProto,
    device: DeviceProfile | GpuProfile | FittedProfile,
    *,
    precision: str = "fp32",
) -> NodeCosts:
    """Roofline per-node costs of `model` on a device table entry (or a measured profile's fitted rates)."""
    check_precision(precision)
    if not isinstance(device, (DeviceProfile, GpuProfile)):  # a measured profile: its fitted rates
        return device.estimate(model)
    # Effective rates: peak at this precision x achieved fraction (compute for FLOPs, memory for bytes).
    gflops = device.peak_gflops(precision) * device.compute_efficiency
    gbps = device.memory_gbps * device.memory_efficiency
    per_node, free, unknown = _roofline(model, gflops, gbps, device.launch_overhead_ms, PRECISION_BYTES[precision])
    overhead = 10.0 * device.launch_overhead_ms
    source = (
        f"estimated for {device.name} from its device table at {precision}: roofline per node, "
        f"max(FLOPs / {gflops:.1f} GFLOP/s, bytes / {gbps:.1f} GB/s) + {device.launch_overhead_ms} ms launch "
        f"(peak {device.peak_gflops(precision):g} x {device.compute_efficiency} efficiency, "
        f"{device.memory_gbps:g} GB/s x {device.memory_efficiency}); {free} nodes constant-folded or fused "
        f"(0 ms); session overhead ~10 launches (approximate)"
    )
    return NodeCosts(per_node, overhead, "estimated", source, boundary=BoundaryRates(device.launch_overhead_ms, gbps),
                     uncosted=unknown)
