"""onnxruntime backend of the edge: the head and the local tail of a cut.

Per cut (see models/manifest.py): a middle cut runs `head` (int8 by default) and keeps `tail` as the local
fallback; `cloud-only` has no head (the cut tensors are the model inputs) and its local tail is full.onnx;
`edge-only` has no tail: its head is the whole model and the cut tensors are the model outputs.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.detect import apply_postprocess, detection_specs
from models.extras import require
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle, TensorSpec
from models.ortopts import make_session


class ModelLoadError(RuntimeError):
    """A bundle model cannot be loaded by onnxruntime here (bad file, no usable execution provider)."""


class InputError(ValueError):
    """An input given to the agent does not match the model's inputs (name, rank, shape or dtype)."""


@dataclass(frozen=True)
class RuntimeOptions:
    """onnxruntime session settings."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


class OrtRunner:
    """One onnxruntime session; `run` is safe to call from several threads (onnxruntime allows it)."""

    def __init__(self, path: Path, options: RuntimeOptions = RuntimeOptions()):
        ort = require("onnxruntime", "edge")
        self.path = Path(path)
        available = set(ort.get_available_providers())
        providers = [p for p in options.providers if p in available]
        if not providers:
            raise ModelLoadError(
                f"none of the execution providers {list(options.providers)} is available in this onnxruntime "
                f"build (it has {sorted(available)})"
            )
        try:
            self.session = make_session(self.path, threads=options.intra_op_threads,
                                        inter_threads=options.inter_op_threads, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise ModelLoadError(f"{self.path}: onnxruntime cannot load it ({exc})") from exc
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on `feeds` (name -> array); returns name -> array for every output."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"{self.path.name}: missing inputs {missing}; it takes {list(self.input_names)}")
        outs = self.session.run(list(self.output_names), {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))


class RunnerCache:
    """One OrtRunner per file, shared by every cut that uses it (full.onnx serves two baselines)."""

    def __init__(self, options: RuntimeOptions):
        self.options = options
        self._runners: dict[Path, OrtRunner] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> OrtRunner:
        """The runner of `path`, loaded on first use."""
        with self._lock:
            runner = self._runners.get(Path(path))
            if runner is None:
                runner = self._runners[Path(path)] = OrtRunner(path, self.options)
            return runner


class CutRuntime:
    """The head and local tail of one cut of a bundle."""

    def __init__(self, bundle: Bundle, cut_id: str, head_precision: str, cache: RunnerCache):
        cut = bundle.cut(cut_id)
        self.cut_id = cut_id
        self.model_name = bundle.model_name
        self.inputs: tuple[TensorSpec, ...] = bundle.inputs
        self.outputs: tuple[TensorSpec, ...] = bundle.outputs
        self.postprocess = bundle.postprocess  # decoding after the tail: results add its outputs (models.detect)
        self.results = self.outputs + (detection_specs(self.postprocess) if self.postprocess else ())
        self.tensors: tuple[TensorSpec, ...] = cut.tensors
        head_path = cut.edge_head if head_precision == "int8" else cut.head
        self.head_path = head_path
        self.head_is_int8 = head_path is not None and head_path == cut.head_int8
        self.head = cache.get(head_path) if head_path is not None else None
        self.tail = cache.get(cut.tail) if cut.tail is not None else None
        if cut_id == CLOUD_ONLY and self.head is not None:
            raise ModelLoadError(f"{bundle.root}: cut {CLOUD_ONLY!r} must have no head")
        if self.head is None and self.tail is None:
            raise ModelLoadError(f"{bundle.root}: cut {cut_id!r} has neither a head nor a tail")

    @property
    def remote(self) -> bool:
        """Whether this cut sends anything to the cloud (every cut but edge-only)."""
        return self.cut_id != EDGE_ONLY and self.tail is not None

    def run_head(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The cut tensors for model inputs `inputs` (cloud-only: the inputs themselves)."""
        if self.head is None:
            return {t.name: inputs[t.name] for t in self.tensors}
        out = self.head.run(inputs)
        return {t.name: out[t.name] for t in self.tensors}

    def run_tail(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model outputs from the cut tensors, on this device (edge-only: the tensors are the outputs), plus
        the decoded ones when the bundle declares a postprocess."""
        out = tensors if self.tail is None else self.tail.run(tensors)
        return apply_postprocess({o.name: out[o.name] for o in self.outputs}, self.postprocess)

    def check_outputs(self, outputs: Mapping[str, np.ndarray], batch: int | None) -> str | None:
        """Why `outputs` (a cloud reply's) are not this model's outputs for `batch` rows, or None when they are.

        Names must be exactly the model's outputs (and its postprocess's), dtypes theirs, shapes of their rank with
        every fixed dimension as recorded and a dynamic first (batch) dimension equal to `batch` (unchecked when None).
        """
        want = {o.name: o for o in self.results}
        if set(outputs) != set(want):
            return f"outputs {sorted(outputs)[:8]}, expected {sorted(want)}"
        for name, spec in want.items():
            arr = outputs[name]
            if arr.dtype != np.dtype(spec.dtype):
                return f"output {name!r} has dtype {arr.dtype}, expected {spec.dtype}"
            shape = tuple(arr.shape)
            if len(shape) != len(spec.shape):
                return f"output {name!r} has shape {shape}, expected rank {len(spec.shape)}"
            for i, (d, got) in enumerate(zip(spec.shape, shape)):
                expect = batch if d is None and i == 0 else d
                if expect is not None and got != expect:
                    shown = tuple("N" if x is None else x for x in spec.shape)
                    return f"output {name!r} has shape {shape}, expected {shown} with N = {batch}"
        return None

    def zeros_input(self, batch: int = 1) -> dict[str, np.ndarray]:
        """A zero input of batch `batch` (the probes' payload)."""
        return {s.name: np.zeros(s.concrete_shape(batch), dtype=np.dtype(s.dtype)) for s in self.inputs}


def prepare_inputs(x: Any, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """Check `x` (an array for a one-input model, else name -> array) against `specs`; InputError if it differs."""
    if isinstance(x, Mapping):
        feeds = dict(x)
    elif len(specs) == 1:
        feeds = {specs[0].name: x}
    else:
        raise InputError(f"the model takes {len(specs)} inputs {[s.name for s in specs]}: pass a dict name -> array")
    unknown = sorted(set(feeds) - {s.name for s in specs})
    if unknown:
        raise InputError(f"unknown inputs {unknown}; the model takes {[s.name for s in specs]}")
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in feeds:
            raise InputError(f"input {spec.name!r} is missing")
        arr = np.asarray(feeds[spec.name])
        want = np.dtype(spec.dtype)
        if arr.dtype != want:
            if not np.can_cast(arr.dtype, want, casting="same_kind"):
                raise InputError(f"input {spec.name!r}: expected dtype {want}, got {arr.dtype}")
            arr = arr.astype(want)
        if arr.ndim != len(spec.shape) or any(d is not None and d != a for d, a in zip(spec.shape, arr.shape)):
            shape = tuple("N" if d is None else d for d in spec.shape)
            raise InputError(f"input {spec.name!r}: expected shape {shape}, got {arr.shape}")
        out[spec.name] = np.ascontiguousarray(arr)
    return out
