"""The plain cost data types every cost module and the planner share: the bottom of `partitioning`.

Nothing of ours is imported here, so measuring (`costs`), estimating (`estimate`), saved profiles
(`device_profile`) and the pure planner can all depend on it without a circle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PRECISIONS = ("fp32", "fp16", "int8")


def check_precision(precision: str) -> None:
    """ValueError unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


class DeviceProfileError(ValueError):
    """A saved device profile is unreadable, malformed, or does not fit the model it is used for."""


@dataclass(frozen=True)
class BoundaryRates:
    """What one side pays per cut tensor and per fused node a cut leaves on its own (partitioning.planner)."""

    launch_ms: float  # fixed cost of one more kernel
    gbps: float  # achieved memory rate of memory-bound kernels
    reorders: bool = False  # whether the runtime keeps 4-D activations in a blocked layout (NCHWc)

    def __post_init__(self) -> None:
        if self.launch_ms < 0 or self.gbps <= 0:
            raise ValueError(f"boundary rates need launch_ms >= 0 and gbps > 0, got {self}")

    def kernel_ms(self, nbytes: float) -> float:
        """One more kernel writing `nbytes` (1 GB/s = 1e6 bytes per ms)."""
        return self.launch_ms + nbytes / (self.gbps * 1e6)


@dataclass(frozen=True)
class CodecRate:
    """The time one activation codec takes on one side per tensor: fixed + per MB (1e6 bytes) of its size as
    the model holds it (partitioning.codecs measures it, the planner charges it)."""

    fixed_ms: float
    ms_per_mb: float

    def __post_init__(self) -> None:
        if not (self.fixed_ms >= 0 and self.ms_per_mb >= 0):
            raise ValueError(f"codec rates must be >= 0, got {self}")

    def ms(self, nbytes: int) -> float:
        """Milliseconds for a tensor of `nbytes`."""
        return self.fixed_ms + self.ms_per_mb * nbytes / 1e6

    def scaled(self, factor: float) -> CodecRate:
        """The rate on a side `factor` times slower."""
        return CodecRate(self.fixed_ms * factor, self.ms_per_mb * factor)


@dataclass(frozen=True)
class Throughput:
    """Effective (achieved) throughput fitted from measured node times."""

    gflops: float  # achieved on compute-class ops (Conv/Gemm/MatMul)
    gbps: float  # achieved on memory-class ops
    launch_ms: float  # fixed cost per executed op
    source: str


@dataclass(frozen=True)
class NodeCosts:
    """Milliseconds per node of one graph plus the fixed cost of one session.run."""

    per_node_ms: Mapping[str, float]  # every node of the graph (0.0 for nodes fused away by the runtime)
    overhead_ms: float  # fixed cost of one session.run, not attributed to nodes
    kind: str  # "measured" | "estimated"
    source: str
    fitted: Throughput | None = field(default=None, compare=False)  # measured only: what it achieved
    boundary: BoundaryRates | None = None  # what a cut adds on this side (partitioning.planner docstring)
    # measured only: the part of a node's time that was a layout conversion back from the blocked layout
    # (onnxruntime's ReorderOutput, charged to the node whose output it writes); included in per_node_ms
    reorder_out_ms: Mapping[str, float] = field(default_factory=dict)
    # estimated only: nodes whose work could not be determined (a shape static inference could not tell), so
    # their time is a guess (launch overhead, bytes of the known tensors); None when not checked (measured)
    uncosted: tuple[str, ...] | None = None

    def total_ms(self, nodes: Iterable[str] | None = None) -> float:
        """Overhead plus the sum over `nodes` (all nodes when None)."""
        chosen = self.per_node_ms.values() if nodes is None else (self.per_node_ms.get(n, 0.0) for n in nodes)
        return self.overhead_ms + float(sum(chosen))
