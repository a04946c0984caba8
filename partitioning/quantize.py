"""Static int8 quantization of a head behind a small calibration reader, and its accuracy gate."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.extras import require
from models.manifest import TensorSpec
from models.plandoc import CALIBRATION_CHOICES, CALIBRATION_METHODS, HEAD_PRECISIONS

log = logging.getLogger(__name__)

Sample = Mapping[str, np.ndarray]


class CalibrationError(ValueError):
    """Calibration data that does not fit the model's inputs."""


def load_calibration(directory: Path, inputs: Sequence[TensorSpec], limit: int = 64) -> list[dict[str, np.ndarray]]:
    """Samples (batch 1 each) from a folder of .npy files (one input) or .npz files (keyed by input name)."""
    if not directory.is_dir():
        raise CalibrationError(f"--calibration {directory}: not a directory of .npy/.npz files")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".npy", ".npz"))
    if not files:
        raise CalibrationError(f"--calibration {directory}: no .npy or .npz files in it")
    samples: list[dict[str, np.ndarray]] = []
    for path in files:
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{path}: not a readable numpy file ({exc})") from exc
        arrays = dict(loaded) if path.suffix == ".npz" else {inputs[0].name: loaded}
        if path.suffix == ".npy" and len(inputs) > 1:
            raise CalibrationError(f"{path}: the model has {len(inputs)} inputs; use .npz files keyed by input name")
        for spec in inputs:
            if spec.name not in arrays:
                raise CalibrationError(f"{path}: no array for input {spec.name!r}")
            arr = np.asarray(arrays[spec.name], dtype=np.dtype(spec.dtype))
            want = spec.concrete_shape(1)[1:]
            if arr.shape == want:
                arr = arr[None]
            if arr.shape[1:] != want:
                raise CalibrationError(f"{path}: {spec.name} has shape {arr.shape}, "
                                       f"expected (N, {', '.join(map(str, want))})")
            arrays[spec.name] = arr
        count = min(len(arrays[s.name]) for s in inputs)
        samples += [{s.name: arrays[s.name][i : i + 1] for s in inputs} for i in range(count)]
        if len(samples) >= limit:
            break
    return samples[:limit]


def _reader(samples: Sequence[Sample]):
    quant = require("onnxruntime.quantization", "edge")

    class _SampleReader(quant.CalibrationDataReader):  # type: ignore[name-defined]  # a module found at run time
        """Feeds the calibration samples once each."""

        def __init__(self) -> None:
            self._it = iter(samples)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(samples)

    return _SampleReader()


# onnxruntime's quantizer chats on its package's loggers and, through module-level `logging.warning(...)`
# calls, on the root logger. Its package logger is quieted; on the root logger only the records its own modules
# log there are dropped (a filter), since raising root's level would mute the whole application.
_QUANT_LOGGER = "onnxruntime.quantization"
_QUANT_PATH = os.path.join("onnxruntime", "quantization")


class _FromQuantizer(logging.Filter):
    """Drops records below ERROR that onnxruntime's quantization modules log on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or _QUANT_PATH not in record.pathname


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Silence onnxruntime's quantizer below ERROR while it runs; the loggers are as they were after."""
    quant_log, root = logging.getLogger(_QUANT_LOGGER), logging.getLogger()
    level = quant_log.level
    quant_log.setLevel(max(level, logging.ERROR))
    quiet = _FromQuantizer()
    root.addFilter(quiet)
    try:  # the histogram calibrators (entropy, percentile) print their progress on stdout
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        root.removeFilter(quiet)
        quant_log.setLevel(level)




_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _quantized_op_types() -> list[str]:
    """The op types quantize_static quantizes (and so calibrates) when given none: its two registries."""
    registry = require("onnxruntime.quantization.registry", "edge")
    return sorted(set(registry.QLinearOpsRegistry) | set(registry.QDQRegistry))


def _calibrated_tensors(model, op_types: Sequence[str]) -> set[str]:
    """The tensors onnxruntime's calibrator calibrates in `model` (shape-inferred): the float inputs and outputs,
    not initializers, of the nodes of `op_types` (`CalibraterBase.select_tensors_to_calibrate`)."""
    onnx = require("onnx", "profile")
    graph = model.graph
    infos = {vi.name: vi for vi in (*graph.value_info, *graph.output, *graph.input)}
    initializers = {t.name for t in graph.initializer}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    wanted = set(op_types)
    found = set()
    for node in graph.node:
        if node.op_type in wanted:
            for name in (*node.input, *node.output):
                vi = infos.get(name)
                if (vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in floats
                        and name not in initializers):
                    found.add(name)
    return found


HISTOGRAM_CHUNK = 4  # samples a histogram calibration (entropy, percentile) collects at a time


class ActivationRanges:
    """Activation ranges per calibration method, calibrated once and reused for every head and every try.

    A tensor's range depends on the samples and on the nodes before it, not on where the model is cut: a head's
    ranges are those of its tensors in any calibration of a model that contains them, which is what calibrating
    that head would compute (the same calibrator, the same samples, the same tensors; onnxruntime's calibration
    cache carries them in). Each method is calibrated once, on the whole model, when a head first needs it, and
    serves every head and every try (the best method written back, the sensitivity ranking, each mixed-precision
    round); the histogram methods (entropy, percentile) collect HISTOGRAM_CHUNK samples at a time, so their memory
    does not grow with the samples. A head whose tensors that calibration does not cover is calibrated on its
    own; so is every head where onnxruntime takes no calibration cache.
    """

    def __init__(self, model_path: Path, samples: Sequence[Sample], work_dir: Path) -> None:
        self.model_path, self.samples, self.work_dir = Path(model_path), samples, Path(work_dir)
        self._ranges: dict[str, list[Any]] = {}  # method -> the TensorsData calibrated so far
        self._files: dict[tuple[str, str], Path | None] = {}
        self.computed = 0  # calibrations run
        self.reused = 0  # head quantizations that took their ranges from here

    @staticmethod
    def supported() -> bool:
        """Whether this onnxruntime's quantize_static takes a calibration cache (1.24 and later)."""
        import inspect

        quant = require("onnxruntime.quantization", "edge")
        calibrate = require("onnxruntime.quantization.calibrate", "edge")
        return ("calibration_cache_path" in inspect.signature(quant.quantize_static).parameters
                and hasattr(calibrate, "save_tensors_data"))

    def _calibrate(self, model_path: Path, method: str) -> Any:
        """`model_path`'s TensorsData for `method` on the samples, kept for the heads it covers."""
        calibrate = require("onnxruntime.quantization.calibrate", "edge")
        with _quiet_quantizer(), warnings.catch_warnings(), \
                tempfile.TemporaryDirectory(prefix="splitinfer-calib-") as tmp:
            warnings.simplefilter("ignore")
            calibrator = calibrate.create_calibrator(
                model_path, _quantized_op_types(), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=getattr(calibrate.CalibrationMethod, _ORT_METHODS[method]))
            # a histogram calibrator holds every calibrated activation of the samples it is handed: a few at a
            # time bound its memory (the histograms merge across calls); MinMax keeps only running ranges
            step = len(self.samples) if method == "minmax" else HISTOGRAM_CHUNK
            for start in range(0, len(self.samples), step):
                calibrator.collect_data(_reader(self.samples[start:start + step]))
            data = calibrator.compute_data()
            del calibrator
        self.computed += 1
        self._ranges.setdefault(method, []).append(data)
        return data

    def cache_for(self, head_path: Path, method: str) -> Path | None:
        """A calibration cache file with the ranges of the tensors `head_path` calibrates, or None (calibrate it)."""
        key = (str(Path(head_path).resolve()), method)
        if key not in self._files:
            self._files[key] = self._write(Path(head_path), method) if self.supported() else None
        if self._files[key] is not None:
            self.reused += 1
        return self._files[key]

    def _write(self, head_path: Path, method: str) -> Path | None:
        onnx = require("onnx", "profile")
        calibrate = require("onnxruntime.quantization.calibrate", "edge")
        head = onnx.shape_inference.infer_shapes(onnx.load(str(head_path), load_external_data=False))
        names = _calibrated_tensors(head, _quantized_op_types())
        found = next((d for d in self._ranges.get(method, ()) if all(n in d for n in names)), None)
        if found is None:  # the whole model once per method; a head it does not cover, on its own
            found = self._calibrate(self.model_path if method not in self._ranges else head_path, method)
            if not all(n in found for n in names):
                return None
        ranges = calibrate.TensorsData(found.calibration_method, {n: found.data[n] for n in sorted(names)})
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / f"ranges-{method}-{len(self._files)}.json"
        calibrate.save_tensors_data(ranges, path)
        return path


@dataclass(frozen=True)
class QuantConfig:
    """How heads are quantized: QDQ, per-channel int8 weights, uint8 activations, and the gate's thresholds.

    `calibration`: how activation ranges are chosen (one of CALIBRATION_CHOICES; `auto` tries MinMax, Entropy
    and Percentile in that order and keeps the first whose head passes the gate). `mixed`: when no method
    passes, keep the most sensitive nodes in float until the head passes or is all float.
    """

    per_channel: bool = True
    min_top1_agreement: float = 0.9
    max_relative_error: float = 0.1
    calibration: str = "auto"
    mixed: bool = True

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_CHOICES:
            raise ValueError(f"calibration must be one of {CALIBRATION_CHOICES}, got {self.calibration!r}")

    @property
    def methods(self) -> tuple[str, ...]:
        """The calibration methods to try, in order."""
        return CALIBRATION_METHODS if self.calibration == "auto" else (self.calibration,)


def quantize_head(fp32_path: Path, int8_path: Path, samples: Sequence[Sample],
                  config: QuantConfig = QuantConfig(), method: str = "minmax",
                  float_nodes: Sequence[str] = (), keep_activations: bool = False,
                  ranges: ActivationRanges | None = None) -> Path:
    """Write the static int8 (QDQ) version of `fp32_path`, calibrated on `samples` (inputs of that model).

    `method`: one of CALIBRATION_METHODS; `float_nodes`: node names left in float (not quantized);
    `keep_activations`: keep Relu/Clip as nodes rather than folding them into the quantization range;
    `ranges`: the whole model's activation ranges (`samples` are then the whole model's inputs), reused.
    """
    quant = require("onnxruntime.quantization", "edge")
    methods = {"minmax": quant.CalibrationMethod.MinMax, "entropy": quant.CalibrationMethod.Entropy,
               "percentile": quant.CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    cache = ranges.cache_for(fp32_path, method) if ranges is not None else None
    with _quiet_quantizer(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.quantize_static(
            str(fp32_path),
            str(int8_path),
            _reader(samples),
            quant_format=quant.QuantFormat.QDQ,
            activation_type=quant.QuantType.QUInt8,
            weight_type=quant.QuantType.QInt8,
            per_channel=config.per_channel,
            calibrate_method=methods[method],
            nodes_to_exclude=list(float_nodes),
            extra_options={"QDQKeepRemovableActivations": keep_activations},
            **({"calibration_cache_path": str(cache)} if cache is not None else {}),
        )
    return int8_path


@dataclass(frozen=True)
class HeadQuantization:
    """What a head runs at after the gate: its precision, the nodes kept in float, the method, the gate's verdict.

    `gate` is the `int8_agreement` of the head file written (for "fp32", of the best quantized head tried, which
    failed, or of a head that passed only with nothing left quantized; either way the edge runs the float head);
    `attempts` lists every try in order.
    """

    precision: str  # one of HEAD_PRECISIONS
    calibration: str  # the method of the head written
    float_nodes: tuple[str, ...]
    gate: Mapping[str, Any]
    attempts: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in HEAD_PRECISIONS:
            raise ValueError(f"precision must be one of {HEAD_PRECISIONS}, got {self.precision!r}")

    def record(self) -> dict[str, Any]:
        """plan.json `verification.cuts[id].int8`: the gate's fields with the precision fields added."""
        return {**self.gate, "precision": self.precision, "calibration": self.calibration,
                "float_nodes": list(self.float_nodes), "attempts": [dict(a) for a in self.attempts]}


Gate = Callable[[Path], Mapping[str, Any]]


def _score(gate: Mapping[str, Any]) -> float:
    """Higher is better, for both metrics."""
    value = float(gate["value"])
    return value if gate["metric"] == "top1_agreement" else -value


def quantize_gated(fp32_path: Path, int8_path: Path, samples: Sequence[Sample], gate: Gate,
                   config: QuantConfig = QuantConfig(), ranges: ActivationRanges | None = None,
                   seed: tuple[str, Sequence[str]] | None = None) -> HeadQuantization:
    """Quantize `fp32_path` into `int8_path` at the lowest precision whose head passes `gate` (with a `seed`:
    the lowest of plain int8 and the seed's nodes in float, when one of those passes).

    Each calibration method of `config` in turn; when none passes (and `config.mixed`), the nodes of the best
    one ranked by `node_sensitivity` are kept in float, 1, 2, 4, ... of them, re-quantizing until the gate
    passes. When every quantized node would be float the head is fp32 (`int8_path` keeps the best try; a head
    that passes only with nothing left quantized is labelled fp32 too, its file all float).
    `ranges`: the whole model's activation ranges, reused for every try (`quantize_head`).

    `seed`: (method, nodes) that another head of the same model (the whole model's) passed its gate with, kept in
    float. When some of those nodes are in this head (and `config.mixed`), the head is first tried as plain int8
    at the seed's method, then with the seed's nodes it has in float (unless that leaves nothing quantized); the
    first that passes is kept (usually one or two tries instead of the search: a head that quantizes a part of
    what passed usually passes too). When neither passes, the search above runs, reusing the plain try.
    """
    attempts: list[dict[str, Any]] = []

    def attempt(method: str, floats: Sequence[str], path: Path, **note: Any) -> Mapping[str, Any]:
        quantize_head(fp32_path, path, samples, config, method, floats, ranges=ranges)
        verdict = gate(path)
        stopped = {"stopped_after": verdict["stopped_after"]} if "stopped_after" in verdict else {}
        attempts.append({"calibration": method, "float_nodes": len(floats), "value": verdict["value"],
                         "passed": bool(verdict["passed"]), **stopped, **note})
        return verdict

    tried: dict[str, Mapping[str, Any]] = {}  # method -> the verdict of its plain int8 head
    in_file: str | None = None  # the method whose plain int8 head `int8_path` holds
    if seed is not None and config.mixed and seed[0] in config.methods:
        method, floats = seed[0], _present(fp32_path, seed[1])
        try:
            if floats:
                tried[method] = verdict = attempt(method, (), int8_path, seeded=True)
                in_file = method
                if verdict["passed"]:
                    return HeadQuantization("int8", method, (), verdict, tuple(attempts))
                onnx = require("onnx", "profile")
                if set(_quantized_nodes(onnx.load(str(int8_path)))) - set(floats):  # something stays int8
                    result = _seeded_try(fp32_path, int8_path, method, floats, attempt)
                    if result is not None:
                        return _finished(int8_path, replace(result, attempts=tuple(attempts)))
        except ValueError as exc:  # e.g. a histogram method on a tensor too narrow for its bins: search instead
            log.info("%s: the seeded %s try failed (%s); searching", fp32_path, method, exc)
            attempts.append({"calibration": method, "float_nodes": 0, "error": str(exc), "passed": False,
                             "seeded": True})
    best: tuple[float, str, Mapping[str, Any]] | None = None
    for method in config.methods:
        try:
            if method in tried:
                verdict = tried[method]
            else:
                verdict = attempt(method, (), int8_path)
                in_file = method
        except ValueError as exc:  # e.g. a histogram method on a tensor whose range is too narrow for its bins
            if len(config.methods) == 1 or (best is None and method == config.methods[-1]):
                raise
            # info, not warning: plan.json's attempts and split-profile's fallback warning say it (past -q too)
            log.info("%s: %s calibration failed (%s); trying the others", fp32_path, method, exc)
            attempts.append({"calibration": method, "float_nodes": 0, "error": str(exc), "passed": False})
            continue
        if verdict["passed"]:
            if in_file != method:
                quantize_head(fp32_path, int8_path, samples, config, method, ranges=ranges)
            return HeadQuantization("int8", method, (), verdict, tuple(attempts))
        if best is None or _score(verdict) > best[0]:
            best = (_score(verdict), method, verdict)
    assert best is not None
    _, method, best_gate = best
    if in_file != method:  # the file holds another method's head: write the best one back
        quantize_head(fp32_path, int8_path, samples, config, method, ranges=ranges)
    if not config.mixed:
        return HeadQuantization("fp32", method, (), best_gate, tuple(attempts))
    ranked = [name for name, _ in node_sensitivity(fp32_path, samples, config, method, ranges)]
    groups = _float_groups(int8_path, ranked)
    trial = int8_path.with_name(int8_path.stem + ".trial.onnx")
    try:
        count = 1
        while count < len(ranked):
            floats = tuple(dict.fromkeys(n for name in ranked[:count] for n in groups[name]))
            verdict = attempt(method, floats, trial)
            if verdict["passed"]:
                os.replace(trial, int8_path)
                log.info("%s: int8 kept %d of %d quantized nodes in float (%s %.3f)", fp32_path, len(floats),
                         len(ranked), verdict["metric"], verdict["value"])
                return _finished(int8_path, HeadQuantization("mixed", method, floats, verdict, tuple(attempts)))
            count *= 2
    finally:
        trial.unlink(missing_ok=True)
    return HeadQuantization("fp32", method, tuple(ranked), best_gate, tuple(attempts))


def _seeded_try(fp32_path: Path, int8_path: Path, method: str, floats: tuple[str, ...],
                attempt: Callable[..., Mapping[str, Any]]) -> HeadQuantization | None:
    """`fp32_path` quantized at `method` with `floats` in float, written to `int8_path` if it passes its gate."""
    trial = int8_path.with_name(int8_path.stem + ".trial.onnx")
    try:
        verdict = attempt(method, floats, trial, seeded=True)
        if not verdict["passed"]:
            return None
        os.replace(trial, int8_path)
        log.info("%s: int8 with the %d float nodes another head passed with (%s %.3f)", fp32_path, len(floats),
                 verdict["metric"], verdict["value"])
        return HeadQuantization("mixed", method, floats, verdict)
    finally:
        trial.unlink(missing_ok=True)


def _present(fp32_path: Path, names: Sequence[str]) -> tuple[str, ...]:
    """The nodes of `names` that `fp32_path` has, in their order."""
    onnx = require("onnx", "profile")
    here = {node.name for node in onnx.load(str(fp32_path), load_external_data=False).graph.node}
    return tuple(n for n in dict.fromkeys(names) if n in here)


def _finished(int8_path: Path, result: HeadQuantization) -> HeadQuantization:
    """`result`, labelled "fp32" when its file quantizes nothing (every quantized node was kept in float): the edge
    then runs the fp32 head, and the planner costs it so."""
    if result.precision != "mixed":
        return result
    onnx = require("onnx", "profile")
    ops = {node.op_type for node in onnx.load(str(int8_path), load_external_data=False).graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return result
    log.info("%s: every quantized node was kept in float; the head is fp32", int8_path)
    return replace(result, precision="fp32")


def _float_groups(int8_path: Path, ranked: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """{node: the nodes to keep in float so that it runs on float inputs}: itself and the quantized producers of
    its activation inputs (onnxruntime quantizes a quantized node's outputs as well as its inputs)."""
    onnx = require("onnx", "profile")
    qmodel = onnx.load(str(int8_path))
    made_by = {out: node.name for node in qmodel.graph.node for out in node.output}
    quantized = _quantized_nodes(qmodel)
    known = set(ranked)
    return {name: (name, *(p for src in quantized.get(name, ()) if (p := made_by.get(src)) in known and p != name))
            for name in ranked}


def _quantized_nodes(qmodel) -> dict[str, list[str]]:
    """{node: the float tensors its dequantized inputs were quantized from} for each node of a QDQ model that
    reads an activation through QuantizeLinear -> DequantizeLinear (a dequantized weight alone does not count:
    excluding such a node is what leaves its inputs and weights in float)."""
    made_by = {out: node for node in qmodel.graph.node for out in node.output}
    found: dict[str, list[str]] = {}
    for node in qmodel.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        sources = []
        for name in node.input:
            dq = made_by.get(name)
            q = made_by.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                sources.append(q.input[0])
        if sources:
            found[node.name] = sources
    return found


def _exposed(model, names: Sequence[str]) -> Any:
    """A session of `model` that outputs every tensor of `names` (graph optimizations off: nothing fused away)."""
    onnx = require("onnx", "profile")
    ort = require("onnxruntime", "edge")
    from models.ortopts import make_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    return make_session(probe.SerializeToString(), options=opts)


def _relative_errors(fp32, qmodel, names: Sequence[str], samples: Sequence[Sample]) -> dict[str, float]:
    """{tensor: relative L2 error of `qmodel`'s value against `fp32`'s over `samples`}, accumulated one sample at a
    time (every tensor of a large model over all samples, held at once, took 17 GB)."""
    ref_sess, q_sess = _exposed(fp32, names), _exposed(qmodel, names)
    num = dict.fromkeys(names, 0.0)
    den = dict.fromkeys(names, 0.0)
    for x in samples:
        for name, ref, got in zip(names, ref_sess.run(list(names), dict(x)), q_sess.run(list(names), dict(x))):
            r = np.asarray(ref, dtype=np.float64)
            num[name] += float(np.sum((np.asarray(got, dtype=np.float64) - r) ** 2))
            den[name] += float(np.sum(r**2))
    return {n: float(np.sqrt(num[n] / max(den[n], 1e-30))) for n in names}


SENSITIVITY_SAMPLES = 8  # samples the per-node ranking runs (a ranking, not a verdict: the gate decides)


def node_sensitivity(fp32_path: Path, samples: Sequence[Sample], config: QuantConfig = QuantConfig(),
                     method: str = "minmax", ranges: ActivationRanges | None = None) -> list[tuple[str, float]]:
    """The nodes that int8 quantizes in `fp32_path`, most sensitive first, with the error each adds.

    The head is quantized once more (activations such as Relu kept as nodes, so every tensor keeps its fp32
    meaning) and run with every tensor exposed, beside the fp32 head, on the first SENSITIVITY_SAMPLES of
    `samples` (the quantization itself is calibrated on all of them). A node's error is the
    relative L2 error of its output against fp32, less the largest such error among the float tensors its
    inputs were quantized from: what quantizing its inputs and weights adds to the error that reached it.
    """
    onnx = require("onnx", "profile")
    with tempfile.TemporaryDirectory(prefix="splitinfer-sens-") as tmp:
        ranked_path = quantize_head(fp32_path, Path(tmp) / "ranking.onnx", samples, config, method,
                                    keep_activations=True, ranges=ranges)
        qmodel = onnx.load(str(ranked_path))
    fp32 = onnx.load(str(fp32_path))
    common = ({o for node in fp32.graph.node for o in node.output} | {i.name for i in fp32.graph.input}) & (
        {o for node in qmodel.graph.node for o in node.output} | {i.name for i in qmodel.graph.input})
    # a model output's producer writes `<name>_QuantizeLinear_Input`; its fp32 meaning is `<name>` after Q/DQ
    after_qdq = {}
    consumers: dict[str, list[Any]] = {}
    for node in qmodel.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in qmodel.graph.node:
        if node.op_type == "QuantizeLinear":
            for dq in consumers.get(node.output[0], ()):
                if dq.op_type == "DequantizeLinear" and dq.output[0] in common:
                    after_qdq[node.input[0]] = dq.output[0]

    def meaning(name: str) -> str | None:
        return name if name in common else after_qdq.get(name)

    nodes = _quantized_nodes(qmodel)
    outputs = {node.name: [m for m in map(meaning, node.output) if m] for node in qmodel.graph.node}
    names = sorted({t for n, srcs in nodes.items() for t in (*map(meaning, srcs), *outputs[n]) if t})
    error = _relative_errors(fp32, qmodel, names, samples[:SENSITIVITY_SAMPLES])
    scores = []
    for node, srcs in nodes.items():
        if outputs[node]:
            reached = max((error[m] for m in map(meaning, srcs) if m), default=0.0)
            scores.append((node, max(error[t] for t in outputs[node]) - reached))
    return sorted(scores, key=lambda s: (-s[1], s[0]))


def gated_agreement(reference: Sequence[Sequence[np.ndarray]], run: Callable[[int], Sequence[np.ndarray]], task: str,
                    config: QuantConfig = QuantConfig()) -> dict:
    """`int8_agreement` of the outputs `run(i)` gives for sample i, run one sample at a time. A top-1 gate stops at
    the first sample after which it cannot pass any more (every later sample agreeing would not lift it to the
    threshold): its verdict is then the agreement on the samples run, with `stopped_after` (a failing head costs
    a few runs, not all of them). A relative-error gate runs every sample."""
    if not reference:
        raise ValueError("the gate needs at least one sample")
    first = np.asarray(reference[0][0])
    top1 = task == "classification" and first.ndim == 2 and first.shape[1] > 1
    total = sum(int(np.asarray(r[0]).shape[0]) for r in reference) if top1 else 0
    got: list[Sequence[np.ndarray]] = []
    wrong = 0
    for i, ref in enumerate(reference):
        out = run(i)
        got.append(out)
        if not top1:
            continue
        wrong += int(np.sum(np.asarray(ref[0]).argmax(1) != np.asarray(out[0]).argmax(1)))
        if (total - wrong) / total < config.min_top1_agreement and i + 1 < len(reference):
            verdict = int8_agreement(reference[: i + 1], got, task, config)
            return {**verdict, "passed": False, "stopped_after": i + 1, "of": len(reference)}
    return int8_agreement(reference, got, task, config)


def int8_agreement(reference: Sequence[Sequence[np.ndarray]], quantized: Sequence[Sequence[np.ndarray]], task: str,
                   config: QuantConfig = QuantConfig()) -> dict:
    """Top-1 agreement for classifiers, relative L2 error otherwise, with the gate's verdict."""
    ref = np.concatenate([np.asarray(r[0]) for r in reference])
    got = np.concatenate([np.asarray(q[0]) for q in quantized])
    if task == "classification" and ref.ndim == 2 and ref.shape[1] > 1:
        value = float(np.mean(ref.argmax(1) == got.argmax(1)))
        return {"metric": "top1_agreement", "value": value, "threshold": config.min_top1_agreement,
                "passed": value >= config.min_top1_agreement, "samples": int(ref.shape[0])}
    value = float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-12))
    return {"metric": "relative_error", "value": value, "threshold": config.max_relative_error,
            "passed": value <= config.max_relative_error, "samples": int(ref.shape[0])}
