"""The edge's runtimes: the head and the local tail of a cut.

A head runs on the configured runtime (`RuntimeOptions.runtime`): onnxruntime with its execution providers
(CPU, OpenVINO, TensorRT, CUDA; see models/ortopts.py) or LiteRT (edge_agent/runtime_litert.py, imported only
when chosen). Both sit behind `HeadRunner`, made by `open_runner`. The local tail always runs on onnxruntime.

Per cut (see models/manifest.py): a middle cut runs `head` (int8 by default) and keeps `tail` as the local
fallback; `cloud-only` has no head (the cut tensors are the model inputs) and its local tail is full.onnx;
`edge-only` has no tail: its head is the whole model and the cut tensors are the model outputs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edge_agent.config import RUNTIMES
from models.detect import apply_postprocess, detection_specs
from models.extras import require
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle, TensorSpec
from models.ortopts import CPU, ProviderError, make_session

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig  # noqa: F401 - for the annotation of from_config

ONNXRUNTIME, LITERT = RUNTIMES

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A bundle model cannot be loaded here (bad file, no usable execution provider)."""


class RuntimeMissingError(ModelLoadError):
    """The runtime package or execution provider asked for is not installed; the message is one line naming the
    pip install."""


class InputError(ValueError):
    """An input given to the agent does not match the model's inputs (name, rank, shape or dtype)."""


@dataclass(frozen=True)
class RuntimeOptions:
    """How the edge runs a model: which runtime, its threads, and (onnxruntime) its execution providers.

    `provider_options` maps a provider name to its options, already complete (`AgentConfig` adds TensorRT's
    engine-cache defaults); LiteRT takes `intra_op_threads` as its interpreter's threads (0: its default) and
    ignores the providers.
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    providers: tuple[str, ...] = CPU
    runtime: str = ONNXRUNTIME
    provider_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime: expected one of {', '.join(RUNTIMES)}, got {self.runtime!r}")

    @property
    def tail_options(self) -> RuntimeOptions:
        """The options the local tail runs with: onnxruntime, the same providers."""
        return replace(self, runtime=ONNXRUNTIME)

    @classmethod
    def from_config(cls, config: AgentConfig) -> RuntimeOptions:
        """The options of an agent config (its providers' options with TensorRT's cache defaults resolved)."""
        return cls(config.intra_op_threads, config.inter_op_threads, tuple(config.providers), config.runtime,
                   config.resolved_provider_options())


class HeadRunner(Protocol):
    """A loaded model on one runtime: `run` is safe to call from several threads at once."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on `feeds` (name -> array, ONNX layout); returns name -> array for every output."""
        ...  # pragma: no cover - protocol

    def close(self) -> None:
        """Release the model; idempotent."""
        ...  # pragma: no cover - protocol


def open_runner(path: Path, options: RuntimeOptions) -> HeadRunner:
    """A runner of the model file `path` on `options.runtime` (LiteRT is imported only when chosen)."""
    if options.runtime == LITERT:
        from edge_agent.runtime_litert import LiteRTRunner

        return LiteRTRunner(Path(path), options)
    return OrtRunner(path, options)


class OrtRunner:
    """One onnxruntime session; `run` is safe to call from several threads (onnxruntime allows it)."""

    def __init__(self, path: Path, options: RuntimeOptions = RuntimeOptions()):
        require("onnxruntime", "edge")
        self.path = Path(path)
        try:
            self.session = make_session(self.path, threads=options.intra_op_threads,
                                        inter_threads=options.inter_op_threads, providers=options.providers,
                                        provider_options=options.provider_options)
        except ProviderError as exc:
            raise RuntimeMissingError(str(exc)) from None
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise ModelLoadError(f"{self.path}: onnxruntime cannot load it ({exc})") from exc
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.providers = tuple(self.session.get_providers())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on `feeds` (name -> array); returns name -> array for every output."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"{self.path.name}: missing inputs {missing}; it takes {list(self.input_names)}")
        outs = self.session.run(list(self.output_names), {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        """Nothing to release early: the session goes with the runner."""


class RunnerCache:
    """One runner per file and runtime, shared by every cut that uses it (full.onnx serves two baselines)."""

    def __init__(self, options: RuntimeOptions):
        self.options = options
        self._runners: dict[tuple[Path, str], HeadRunner] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, options: RuntimeOptions | None = None) -> HeadRunner:
        """The runner of `path` on `options` (default the cache's), loaded on first use."""
        options = options or self.options
        key = (Path(path), options.runtime)
        with self._lock:
            runner = self._runners.get(key)
            if runner is None:
                runner = self._runners[key] = open_runner(Path(path), options)
            return runner

    def close(self) -> None:
        """Close every runner."""
        with self._lock:
            runners, self._runners = list(self._runners.values()), {}
        for runner in runners:
            runner.close()


def head_choice(plan: Mapping[str, Any], cut_id: str, wanted: str, runs_int8_file: bool,
                runtime: str = ONNXRUNTIME) -> str:
    """Which head a cut runs and why, in words: int8, mixed (with its float nodes) or fp32. The gate quoted is the
    one of the heads `runtime` runs (LiteRT's .tflite heads have their own, `verification.cuts[id].litert.int8`)."""
    cuts = plan.get("verification", {}).get("cuts", {}) if isinstance(plan, Mapping) else {}
    checked = cuts.get(cut_id) or {}
    gate = ((checked.get("litert") or {}) if runtime == LITERT else checked).get("int8") or {}
    value = f"{gate['metric']} {float(gate['value']):.3f}" if "metric" in gate and "value" in gate else "no gate"
    if wanted != "int8":
        return f"fp32 head (head_precision {wanted})"
    if runs_int8_file:
        if gate.get("precision") == "mixed":
            return (f"mixed-precision head: {len(gate.get('float_nodes') or ())} node(s) kept in float "
                    f"passed its gate ({value}, calibration {gate.get('calibration', '?')})")
        return f"int8 head (passed its gate: {value})"
    if not gate:
        return "fp32 head (the bundle has no int8 head for this cut)"
    if gate.get("passed") and gate.get("precision") == "fp32":
        return (f"fp32 head (its gate passed only with every quantized node kept in float: "
                f"{len(gate.get('float_nodes') or ())} node(s), {value})")
    return f"fp32 head (the int8 head failed its gate: {value})"


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
        self.runtime = cache.options.runtime
        failed = _litert_error(bundle, cut) if self.runtime == LITERT else None
        if failed is not None:  # `split-profile convert` could not convert this cut: its ONNX heads stay for it
            log.warning("%s cut %s: no LiteRT head (its conversion failed: %s); running its ONNX head on "
                        "onnxruntime", bundle.model_name, cut_id, failed)
            self.runtime = ONNXRUNTIME
        if self.runtime == LITERT:
            head_path, self.head_is_int8 = _litert_head(bundle, cut, head_precision)
        else:
            head_path = cut.edge_head if head_precision == "int8" else cut.head
            self.head_is_int8 = head_path is not None and head_path == cut.head_int8
        self.head_path = head_path
        if head_path is not None:
            log.info("%s cut %s: running the %s", bundle.model_name, cut_id,
                     head_choice(bundle.plan, cut_id, head_precision, self.head_is_int8, self.runtime))
        head_options = cache.options if self.runtime == cache.options.runtime else cache.options.tail_options
        self.head = cache.get(head_path, head_options) if head_path is not None else None
        self.tail = cache.get(cut.tail, cache.options.tail_options) if cut.tail is not None else None
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


def _litert_error(bundle: Bundle, cut: Any) -> str | None:
    """Why `cut` has no LiteRT head when its conversion failed (plan.json verification.cuts[id].litert.error), else
    None (it has one, or the bundle was never converted: `_litert_head` says so)."""
    if getattr(cut, "head_tflite", None) is not None or cut.id == CLOUD_ONLY:
        return None
    checked = bundle.plan.get("verification", {}).get("cuts", {}).get(cut.id) or {}
    error = (checked.get("litert") or {}).get("error")
    return None if error is None else str(error)


def _litert_head(bundle: Bundle, cut: Any, head_precision: str) -> tuple[Path | None, bool]:
    """The LiteRT head of `cut` and whether it is the int8 one: "int8" -> the int8 .tflite when its accuracy gate
    passed, else the fp32 one (as `edge_head`); "fp32" -> head.tflite. ModelLoadError when the bundle has none.

    The fields are tfl's (models/manifest.py CutArtifacts.head_tflite / head_int8_tflite / edge_head_tflite),
    read with getattr so a bundle reader without them reads as "no LiteRT heads".
    """
    if cut.id == CLOUD_ONLY:
        return None, False
    int8 = getattr(cut, "head_int8_tflite", None)
    path = getattr(cut, "edge_head_tflite", None) if head_precision == "int8" else getattr(cut, "head_tflite", None)
    if path is None:
        raise ModelLoadError(f"{bundle.root}: cut {cut.id!r} has no LiteRT head (head.tflite) for runtime "
                             f"{LITERT!r}: convert the bundle with `split-profile convert BUNDLE --edge-runtime "
                             f"litert`, or set runtime = {ONNXRUNTIME!r}")
    return path, path == int8


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
