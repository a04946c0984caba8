"""The ONNX graph as the planner sees it: dynamic nodes, the tensors between them, their sizes at batch 1.

Nodes that do not depend on a model input (Constant, arithmetic on initializers) are left out: they are
replicated on whichever side needs them when head and tail are extracted, so they never cross a cut.
Tensor shapes and dtypes come from one onnxruntime run at batch 1 with every intermediate exposed, which is
exact where static shape inference gives up (dynamic reshapes, attention).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.convert import integer_input_highs, shape_derived
from models.dtypes import NUMERIC_ORT_NAMES, itemsize, ort_numpy_dtype, ort_type_name
from models.extras import require
from models.inputs import INT_HIGH, random_array
from models.ortopts import make_session

if TYPE_CHECKING:  # pragma: no cover
    import onnx


@dataclass(frozen=True)
class TensorInfo:
    """One dynamic tensor: who makes it, who reads it, its size at batch 1."""

    name: str
    producer: str | None  # node name; None for a model input
    consumers: tuple[str, ...]
    shape: tuple[int, ...]  # at batch 1
    dtype: str  # numpy dtype name

    @cached_property
    def numel(self) -> int:
        """Number of elements at batch 1 (computed once: the planner asks for it for every candidate cut)."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @cached_property
    def nbytes(self) -> int:
        """Bytes at batch 1 in the tensor's own dtype."""
        return self.numel * np.dtype(self.dtype).itemsize

    @cached_property
    def is_float(self) -> bool:
        """Whether the codec may quantize it (float tensors only; shapes and indices go raw)."""
        return np.dtype(self.dtype).kind == "f"


@dataclass(frozen=True)
class CutGraph:
    """The DAG of dynamic nodes (in topological order) with the tensors between them."""

    nodes: tuple[str, ...]
    node_inputs: dict[str, tuple[str, ...]]  # node -> dynamic input tensors
    node_weight_bytes: dict[str, int]  # node -> bytes of initializers it reads (fp32)
    tensors: dict[str, TensorInfo]
    inputs: tuple[str, ...]  # model inputs (non-initializer)
    outputs: tuple[str, ...]  # model outputs
    node_ops: dict[str, str] = field(default_factory=dict)  # node -> op type (may be empty in hand-made graphs)
    # tensors that never cross a cut: shape values computed from a tensor's shape, which carry no batch dimension
    # (the cloud batches requests) and which constant folding left because they vary with the batch size
    local_tensors: frozenset[str] = frozenset()
    node_outputs: dict[str, tuple[str, ...]] = field(init=False, compare=False, repr=False)
    _position: dict[str, int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        made: dict[str, list[str]] = {}
        for t in self.tensors.values():
            if t.producer is not None:
                made.setdefault(t.producer, []).append(t.name)
        object.__setattr__(self, "node_outputs", {n: tuple(made.get(n, ())) for n in self.nodes})
        object.__setattr__(self, "_position", {n: i for i, n in enumerate(self.nodes)})

    def position(self, node: str) -> int:
        """Index of `node` in topological order."""
        return self._position[node]

    def last_position(self, nodes: Iterable[str]) -> int:
        """The largest topological index among `nodes` (-1 when there are none)."""
        return max(map(self._position.__getitem__, nodes), default=-1)

    def cut_tensors(self, edge_nodes: AbstractSet[str]) -> tuple[str, ...]:
        """The tensors that cross from the edge side (`edge_nodes` plus the inputs) to the cloud side.

        A tensor crosses when it is made on the edge (or is a model input) and read by a cloud node, or is
        a model output made on the edge. For the empty edge set that is the model inputs (cloud-only); for
        all nodes it is the model outputs (edge-only).
        """
        crossing = []
        for t in self.tensors.values():
            on_edge = t.producer is None or t.producer in edge_nodes
            if not on_edge:
                continue
            read_in_cloud = any(c not in edge_nodes for c in t.consumers)
            if read_in_cloud or (t.name in self.outputs and t.producer is not None):
                crossing.append(t.name)
        if not edge_nodes:
            return self.inputs
        return tuple(sorted(crossing, key=self.tensor_order))

    def is_closed(self, edge_nodes: AbstractSet[str]) -> bool:
        """Whether every dynamic predecessor of an edge node is on the edge too (data flows edge -> cloud only)."""
        for node in edge_nodes:
            for t in self.node_inputs[node]:
                producer = self.tensors[t].producer
                if producer is not None and producer not in edge_nodes:
                    return False
        return True

    def tensor_order(self, name: str) -> tuple[int, str]:
        """How cut tensors are listed: by their producer's position (model inputs first), then by name."""
        producer = self.tensors[name].producer
        return (-1 if producer is None else self.position(producer), name)


def build_cut_graph(model: onnx.ModelProto, work_dir: Path | None = None) -> CutGraph:
    """Analyse a (normalized, named-node) ONNX model into a CutGraph with exact sizes at batch 1."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = tuple(i.name for i in graph.input if i.name not in initializers)
    outputs = tuple(o.name for o in graph.output)
    init_bytes = {i.name: int(np.prod(i.dims, dtype=np.int64)) * itemsize(i.data_type) for i in graph.initializer}

    dynamic: set[str] = set(inputs)
    nodes: list[str] = []
    node_inputs: dict[str, tuple[str, ...]] = {}
    node_weights: dict[str, int] = {}
    node_ops: dict[str, str] = {}
    producer: dict[str, str | None] = {name: None for name in inputs}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        dyn_in = tuple(dict.fromkeys(t for t in node.input if t in dynamic))
        if not dyn_in:
            continue  # constant subgraph: replicated where needed
        if not node.name:
            raise ValueError(f"node of type {node.op_type} has no name; normalize the model first")
        nodes.append(node.name)
        node_inputs[node.name] = dyn_in
        node_ops[node.name] = node.op_type
        node_weights[node.name] = sum(init_bytes.get(t, 0) for t in node.input)
        for t in dyn_in:
            consumers.setdefault(t, []).append(node.name)
        for t in node.output:
            if t:
                dynamic.add(t)
                producer[t] = node.name

    local = frozenset(t for t in shape_derived(graph) if t in producer and producer[t] is not None)
    shapes = shapes_at_batch_one(model, [t for t in producer if t not in inputs])
    tensors = {}
    for name, prod in producer.items():
        if name not in shapes:
            continue  # an unused optional output: never read, never crosses
        shape, dtype = shapes[name]
        tensors[name] = TensorInfo(name, prod, tuple(consumers.get(name, ())), shape, dtype)
    return CutGraph(tuple(nodes), node_inputs, node_weights, tensors, inputs, outputs, node_ops,
                    frozenset(t for t in local if t in tensors and t not in outputs and not tensors[t].is_float))


def shapes_at_batch_one(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Run the model once at batch 1 with every intermediate exposed; return {tensor: (shape, dtype)}."""
    return {name: (tuple(int(d) for d in arr.shape), arr.dtype.name) for name, arr in activations(model, names).items()}


def activations(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray] | None = None
                ) -> dict[str, np.ndarray]:
    """Run the model once on `feeds` (default: a deterministic random input at batch 1) with the tensors `names`
    exposed; return the feeds and every tensor onnxruntime could expose, by name."""
    onnx = require("onnx", "profile")
    inferred = onnx.shape_inference.infer_shapes(model)
    elem_types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    elem_types.update({vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.output})
    ort = require("onnxruntime", "edge")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    # A tensor whose type static inference could not tell (e.g. made by an op of a domain onnx does not know)
    # is tried as float, the usual activation; if onnxruntime disagrees, it is left out as before.
    for guess in (onnx.TensorProto.FLOAT, None):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        existing = {o.name for o in probe.graph.output}
        for name in names:
            elem = elem_types.get(name) or guess
            if name not in existing and elem:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        try:
            sess = make_session(probe.SerializeToString(), options=opts)
            break
        except Exception:  # noqa: BLE001 - a wrong guess: onnxruntime refuses the declared type; retry without it
            if guess is None:
                raise
    if feeds is None:
        highs = integer_input_highs(model)  # token ids below the vocabulary, masks 0/1, as the loader draws them
        feeds = {i.name: sample_input(i.shape, i.type, int_high=highs.get(i.name, INT_HIGH)) for i in sess.get_inputs()}
    result = {name: np.asarray(arr) for name, arr in feeds.items()}
    out_names = [o.name for o in sess.get_outputs()]
    for name, arr in zip(out_names, sess.run(out_names, feeds)):
        result[name] = np.asarray(arr)
    return result


def sample_input(shape: list, ort_type: str, batch: int = 1, seed: int = 0, int_high: int = INT_HIGH) -> np.ndarray:
    """A deterministic random input for an onnxruntime input description (dynamic dims -> `batch`); integers
    from [0, int_high)."""
    dims = [d if isinstance(d, int) and d > 0 else batch for d in shape]
    if ort_type_name(ort_type) not in NUMERIC_ORT_NAMES:
        raise ValueError(f"model input of type {ort_type} is not supported; expected one of "
                         f"{sorted(f'tensor({n})' for n in NUMERIC_ORT_NAMES)}")
    return random_array(np.random.default_rng(seed), dims, ort_numpy_dtype(ort_type), int_high=int_high)
