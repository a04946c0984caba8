"""TFLite heads for LiteRT devices: convert a bundle's ONNX heads, verify them, record them in plan.json.

The conversion runs onnx2tf's `flatbuffer_direct` backend (no TensorFlow) in its own virtual environment: it needs
Python 3.12+ and pins exact versions of numpy, onnx, onnxruntime and protobuf, which must not replace this
install's. The environment is made once (`pip install onnx2tf==...` in a venv under ~/.cache/splitinfer) with a
Python 3.12+ found on PATH or under pyenv, or the one `--converter-python` names; `partitioning/tflite_worker.py`
runs inside it and is the only code that imports onnx2tf.

Per cut with a head: `head.tflite` (fp32) and `head.int8.tflite` (full integer: int8 weights, activations, inputs and
outputs), calibrated on the same samples as `head.int8.onnx` (plan.json `calibration`: the --calibration folder, or
the same seeded synthetic inputs). Layout at the cut: onnx2tf makes convolution tensors channel-last (NHWC); the
worker appends a TRANSPOSE inside the .tflite wherever an output came out NHWC (and prepends one for an NHWC input)
and renames the ends to their ONNX names, so a LiteRT head hands the ONNX tail (local or cloud) exactly the tensor
the ONNX head would. Verification is the ONNX heads': the fp32 .tflite head then the ONNX tail against full.onnx
within a tolerance, and the int8 .tflite head then the tail through the same accuracy gate as head.int8.onnx.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from models.extras import MissingExtraError
from models.litert import LITERT_INSTALL, LiteRTModel, interpreter_class
from models.manifest import PLAN_FILE, Bundle, TensorSpec, artifact_entry
from partitioning.extract import run_split, session, verify_split
from partitioning.quantize import QuantConfig, int8_agreement, load_calibration

ONNX2TF = "onnx2tf==2.6.9"  # the converter's version: its flatbuffer_direct backend needs no TensorFlow
MIN_PYTHON = (3, 12)
ENV_VAR = "SPLITINFER_LITERT_CONVERTER"  # a converter venv to use instead of the default one
WORKER = Path(__file__).with_name("tflite_worker.py")
RUNTIMES = ("onnxruntime", "litert")
FP32_RTOL = 1e-3  # LiteRT's fp32 kernels sum in another order than onnxruntime's: 10x the ONNX split's 1e-4
CALIBRATION_SAMPLES = 16  # partitioning.api's: the same seeded synthetic samples as head.int8.onnx
CHECK_SAMPLES = 32
CONVERT_TIMEOUT_S = 600.0
Progress = Callable[[str], None]
Sample = dict[str, np.ndarray]
# Writes each (onnx head, fp32 .tflite, int8 .tflite) calibrated on the samples; per head a report or the error.
Converter = Callable[[Sequence[tuple[Path, Path, Path]], Sequence[Sample]], list[dict[str, Any] | Exception]]


class ConverterUnavailableError(RuntimeError):
    """The converter environment does not exist and cannot be made here (no Python 3.12+, no network)."""


class TFLiteConversionError(RuntimeError):
    """onnx2tf could not convert a head (an operator it does not support, a shape it cannot make static)."""


def default_env_dir() -> Path:
    """Where the converter venv lives: $SPLITINFER_LITERT_CONVERTER, else ~/.cache/splitinfer/litert-converter-*."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "splitinfer" / f"litert-converter-{ONNX2TF.replace('==', '-')}"


def _version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def find_python(explicit: str | None = None) -> str | None:
    """A Python >= 3.12 for the converter: `explicit`, else python3.13/3.12 on PATH, else one under ~/.pyenv."""
    if explicit:
        return explicit if (_version(explicit) or (0, 0)) >= MIN_PYTHON else None
    found = [shutil.which(f"python3.{m}") for m in (14, 13, 12)]
    found += sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / "3.1[2-9]*" / "bin" / "python3")),
                    reverse=True)
    for python in filter(None, found):
        if (_version(python) or (0, 0)) >= MIN_PYTHON:
            return python
    return None


@dataclass(frozen=True)
class ConverterEnv:
    """The converter's virtual environment."""

    root: Path

    @property
    def python(self) -> Path:
        """Its interpreter."""
        return self.root / "bin" / "python"

    @property
    def ready(self) -> bool:
        """Whether it exists with the pinned converter installed (a marker written after a complete install)."""
        marker = self.root / ".splitinfer-converter"
        return self.python.exists() and marker.is_file() and marker.read_text().strip() == ONNX2TF

    def convert(self, heads: Sequence[tuple[Path, Path, Path]], calib: Sequence[Sample]) -> list[Any]:
        """convert_heads in this environment (the Converter add_tflite_heads and litert_node_costs take)."""
        return list(convert_heads(self, heads, calib))


def ensure_converter(root: Path | None = None, base_python: str | None = None, create: bool = True,
                     progress: Progress = lambda msg: None) -> ConverterEnv:
    """The converter environment at `root` (default: default_env_dir()), made first if it is not there."""
    env = ConverterEnv(Path(root) if root else default_env_dir())
    if env.ready:
        return env
    how = (f"python3.12 -m venv {env.root} && {env.root}/bin/pip install {ONNX2TF} && echo {ONNX2TF} > "
           f"{env.root}/.splitinfer-converter")
    if not create:
        raise ConverterUnavailableError(f"no TFLite converter environment at {env.root}; make it with: {how}")
    python = find_python(base_python)
    if python is None and base_python:
        raise ConverterUnavailableError(f"--converter-python {base_python}: not a Python {MIN_PYTHON[0]}."
                                        f"{MIN_PYTHON[1]}+ here; the converter ({ONNX2TF}) needs one")
    if python is None:
        raise ConverterUnavailableError(
            f"converting heads to TFLite needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ for {ONNX2TF} (none found on "
            f"PATH or under ~/.pyenv); pass --converter-python PATH or make the environment yourself: {how}")
    progress(f"making the TFLite converter environment {env.root} ({ONNX2TF} on {python}; once, a few minutes)")
    try:
        subprocess.run([python, "-m", "venv", "--clear", str(env.root)], check=True, capture_output=True, text=True,
                       timeout=600)
        subprocess.run([str(env.python), "-m", "pip", "install", "-q", ONNX2TF], check=True, capture_output=True,
                       text=True, timeout=1800)
    except subprocess.TimeoutExpired as exc:
        raise ConverterUnavailableError(f"making the TFLite converter environment {env.root} timed out after "
                                        f"{exc.timeout:.0f} s; make it yourself: {how}") from exc
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:]
        raise ConverterUnavailableError(f"could not make the TFLite converter environment {env.root}: "
                                        f"{' '.join(tail) or exc}; make it yourself: {how}") from exc
    (env.root / ".splitinfer-converter").write_text(ONNX2TF + "\n")
    return env


def convert_heads(env: ConverterEnv, heads: Sequence[tuple[Path, Path, Path]], calib: Sequence[Sample],
                  timeout_s: float = CONVERT_TIMEOUT_S) -> list[dict[str, Any] | TFLiteConversionError]:
    """Write each (onnx head, fp32 .tflite, int8 .tflite), calibrated on `calib`, in one converter process; per head
    the worker's report, or the TFLiteConversionError saying why it could not be converted."""
    names = list(calib[0])
    with tempfile.TemporaryDirectory(prefix="splitinfer-tflite-") as tmp:
        work = Path(tmp)
        arrays: dict[str, Any] = {n: np.concatenate([s[n] for s in calib]).astype(np.float32) for n in names}
        np.savez(work / "calib.npz", **arrays)
        jobs = [{"onnx": str(Path(h).resolve()), "calibration": str(work / "calib.npz"), "work": str(work / f"job{i}"),
                 "fp32": str(Path(f).resolve()), "int8": str(Path(q).resolve())} for i, (h, f, q) in enumerate(heads)]
        (work / "jobs.json").write_text(json.dumps({"jobs": jobs}))
        try:
            done = subprocess.run([str(env.python), str(WORKER), str(work / "jobs.json")], capture_output=True,
                                  text=True, timeout=timeout_s * max(1, len(jobs)), cwd=work)
        except subprocess.TimeoutExpired as exc:
            raise TFLiteConversionError(f"converting {len(jobs)} heads took over {exc.timeout:g} s") from exc
    results: dict[int, dict[str, Any] | TFLiteConversionError] = {}
    for line in done.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in ("SPLITINFER_REPORT", "SPLITINFER_ERROR"):
            index, _, body = rest.partition(" ")
            head = heads[int(index)][0]
            results[int(index)] = (dict(json.loads(body)) if tag == "SPLITINFER_REPORT"
                                   else TFLiteConversionError(f"{head}: onnx2tf failed: {body}"))
    lines = [ln for ln in (done.stderr or "").strip().splitlines() if ln.strip()]
    crashed = lines[-1] if lines else f"the converter exited with {done.returncode}"
    return [results.get(i, TFLiteConversionError(f"{h}: {crashed}")) for i, (h, _, _) in enumerate(heads)]


def convert_head(env: ConverterEnv, onnx_path: Path, fp32_out: Path, int8_out: Path,
                 calib: Sequence[Sample], timeout_s: float = CONVERT_TIMEOUT_S) -> dict[str, Any]:
    """Write `fp32_out` and `int8_out` from ONNX head `onnx_path` (calibrated on `calib`); the worker's report."""
    result = convert_heads(env, [(onnx_path, fp32_out, int8_out)], calib, timeout_s)[0]
    if isinstance(result, TFLiteConversionError):
        raise result
    return result


class TFLiteSession:
    """A .tflite model with the part of onnxruntime's InferenceSession that run_split and verify_split use."""

    def __init__(self, path: Path):
        cls = interpreter_class()
        if cls is None:
            raise MissingExtraError(f"verifying TFLite heads needs ai-edge-litert: {LITERT_INSTALL}")
        self.model = LiteRTModel(cls, path)

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=n) for n in self.model.input_names]

    def get_outputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=n) for n in self.model.output_names]

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.model.run(feeds)
        return [out[n] for n in (names or self.model.output_names)]


def verify_tflite(full_path: Path, tail_path: Path | None, fp32: Path, int8: Path,
                  checks: Sequence[dict[str, np.ndarray]], task: str,
                  qconfig: QuantConfig = QuantConfig()) -> dict[str, Any]:
    """plan.json `verification.cuts[id].litert`: fp32 .tflite head then ONNX tail against the model (tolerance
    FP32_RTOL x max |output|), and the int8 .tflite head's agreement through the ONNX int8 heads' gate."""
    full, tail = session(full_path), (session(tail_path) if tail_path else None)
    check = verify_split(full, TFLiteSession(fp32), tail, checks, rtol=FP32_RTOL)
    reference = [full.run(None, dict(x)) for x in checks]
    q_head = TFLiteSession(int8)
    quantized = [run_split(q_head, tail, x) for x in checks]
    return {"fp32": check.to_json(), "int8": int8_agreement(reference, quantized, str(task), qconfig)}


def bundle_samples(root: Path, plan: Mapping[str, Any]) -> tuple[list[Sample], list[Sample]]:
    """The calibration and check samples the bundle's ONNX int8 heads were made with (plan.json `calibration`)."""
    from models.inputs import synthetic_samples

    inputs = [TensorSpec.from_json(t, "model.inputs") for t in plan["model"]["inputs"]]
    source = (plan.get("calibration") or {}).get("source", "synthetic")
    if source != "synthetic":
        calib = load_calibration(Path(source), inputs)
        return calib, calib[-CHECK_SAMPLES:]
    highs = _integer_highs(Path(root) / plan["artifacts"]["full"]["file"])
    return (synthetic_samples(inputs, CALIBRATION_SAMPLES, seed=1, int_high=highs),
            synthetic_samples(inputs, CHECK_SAMPLES, seed=2, int_high=highs))


def _integer_highs(full: Path) -> dict[str, int]:
    """partitioning.api's bounds for synthetic integer inputs (token ids, masks), read from full.onnx."""
    from models.convert import integer_input_highs
    from models.extras import require

    onnx = require("onnx", "profile")
    return integer_input_highs(onnx.load(str(full)))


def add_tflite_heads(root: Path, convert: Converter, qconfig: QuantConfig = QuantConfig(),
                     progress: Progress = lambda msg: None) -> dict[str, Any]:
    """Convert every head of bundle `root` to head.tflite + head.int8.tflite, verify them, rewrite plan.json;
    return plan.json as written.

    `convert` (`env.convert`: onnx2tf; a Converter) writes the two files of every head, or says why it could not.
    A cut that cannot be converted keeps its ONNX heads and records why (verification.cuts[id].litert.error);
    only the chosen cut's failure is an error.
    """
    root = Path(root)
    bundle = Bundle.load(root)
    plan = json.loads((root / PLAN_FILE).read_text())
    calib, checks = bundle_samples(root, plan)
    task = str(plan["model"].get("task") or "classification")
    verified = plan.setdefault("verification", {}).setdefault("cuts", {})
    jobs: list[tuple[str, Path, Path, Path]] = []
    for cut_id in bundle.cut_ids:
        head = bundle.cut(cut_id).head
        if head is not None:
            folder = head.parent if head != bundle.full else root / "cuts" / cut_id
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((cut_id, head, folder / "head.tflite", folder / "head.int8.tflite"))
    progress(f"converting {len(jobs)} heads to TFLite (fp32 and int8) in the converter environment")
    reports = convert([(h, f, q) for _, h, f, q in jobs], calib)
    for (cut_id, _, fp32, int8), report in zip(jobs, reports):
        if isinstance(report, Exception):
            if cut_id == bundle.chosen:
                raise report
            progress(f"  cut {cut_id}: no TFLite head ({report})")
            verified.setdefault(cut_id, {})["litert"] = {"error": str(report)}
            continue
        progress(f"verifying the TFLite heads of cut {cut_id}")
        litert = verify_tflite(bundle.full, bundle.cut(cut_id).tail, fp32, int8, checks, task, qconfig)
        verified.setdefault(cut_id, {})["litert"] = {**litert, "layout": report.get("mapping", {})}
        files = plan["artifacts"]["cuts"][cut_id]
        files["head_tflite"], files["head_int8_tflite"] = artifact_entry(root, fp32), artifact_entry(root, int8)
    (root / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    return plan


def summary_lines(plan: Mapping[str, Any]) -> list[str]:
    """One line per cut: its TFLite heads' verification (plan.json verification.cuts[id].litert)."""
    lines = []
    for cut_id, v in (plan.get("verification") or {}).get("cuts", {}).items():
        lit = v.get("litert")
        if not lit:
            continue
        if "error" in lit:
            lines.append(f"litert   {cut_id:<11} no TFLite head: {lit['error']}")
            continue
        f, q = lit["fp32"], lit["int8"]
        verdict = {True: "pass", False: "FAIL"}
        lines.append(f"litert   {cut_id:<11} fp32 max|err| {f['max_abs_error']:.2e} ({verdict[bool(f['passed'])]})"
                     f"  int8 {q['metric']} {q['value']:.3f} ({verdict[bool(q['passed'])]} at {q['threshold']})")
    return lines


PREFIX_CUTS = 5  # graph prefixes timed on LiteRT when profiling for it (plus the whole model)


def prefix_positions(graph: Any, count: int = PREFIX_CUTS) -> list[int]:
    """Where to cut the graph's node order for prefix timing: about `count` evenly spaced points, each moved
    forward to the next point that a single tensor crosses where there is one nearby, then the whole model."""
    order = graph.nodes
    picked: list[int] = []
    for i in range(1, count + 1):
        k = max(1, round(len(order) * i / (count + 1)))
        best = k
        for j in range(k, min(len(order), k + max(2, len(order) // (4 * (count + 1))))):
            if len(graph.cut_tensors(frozenset(order[:j]))) == 1:
                best = j
                break
        if best not in picked and best < len(order):
            picked.append(best)
    return [*sorted(picked), len(order)]


def litert_node_costs(onnx_path: Path, model: Any, graph: Any, base: Any, convert: Converter,
                      samples: Sequence[Sample], count: int = PREFIX_CUTS, repeats: int = 20,
                      threads: int | None = None, progress: Progress = lambda msg: None) -> Any:
    """Per-node costs of `onnx_path` on LiteRT (int8 heads), from timing graph prefixes.

    LiteRT has no per-operator profile in its Python API, so costs are attributed: the int8 .tflite of the prefix
    up to each of `count` cut points and of the whole model are timed here (median of `repeats` runs, prefixes in
    turns so that load on the host touches all alike); the time between consecutive prefixes is that segment's,
    shared among its nodes in proportion to `base` (onnxruntime's per-node profile of the same graph).
    """
    from partitioning.costtypes import NodeCosts
    from partitioning.extract import extract_part

    order = graph.nodes
    inputs = list(graph.inputs)
    positions = prefix_positions(graph, count)
    runners: list[LiteRTModel] = []
    cls = interpreter_class()
    if cls is None:
        raise MissingExtraError(f"profiling on LiteRT needs ai-edge-litert: {LITERT_INSTALL}")
    with tempfile.TemporaryDirectory(prefix="splitinfer-prefix-") as tmp:
        jobs = []
        for k in positions:
            head = Path(onnx_path) if k == len(order) else extract_part(
                model, inputs, graph.cut_tensors(frozenset(order[:k])), Path(tmp) / f"p{k}.onnx")
            jobs.append((head, Path(tmp) / f"p{k}.tflite", Path(tmp) / f"p{k}.int8.tflite"))
        progress(f"LiteRT: converting {len(jobs)} graph prefixes (up to nodes {positions} of {len(order)})")
        for (_, _, int8), report in zip(jobs, convert(jobs, samples)):
            if isinstance(report, Exception):
                raise report
            runners.append(LiteRTModel(cls, int8, threads))
        feeds = dict(samples[0])
        times: list[list[float]] = [[] for _ in runners]
        for r in runners:
            r.run(feeds)  # warm-up
        for _ in range(repeats):
            for r, out in zip(runners, times):
                start = time.perf_counter()
                r.run(feeds)
                out.append((time.perf_counter() - start) * 1e3)
    prefix_ms = np.maximum.accumulate([float(np.median(t)) for t in times])
    per_node: dict[str, float] = {}
    lo, before = 0, 0.0
    for k, total in zip(positions, prefix_ms):
        segment = order[lo:k]
        weights = np.array([max(float(base.per_node_ms.get(v, 0.0)), 0.0) for v in segment]) + 1e-9
        for v, w in zip(segment, weights / weights.sum()):
            per_node[v] = float((total - before) * w)
        lo, before = k, float(total)
    source = (f"LiteRT int8 on this host: {len(positions)} graph prefixes timed (median of {repeats} runs), each "
              "segment's time shared among its nodes in proportion to onnxruntime's per-node profile (LiteRT has "
              "no per-node profile)")
    return NodeCosts(per_node, 0.0, "measured", source, boundary=base.boundary)


def litert_host(host: Mapping[str, Any]) -> dict[str, Any]:
    """host_facts for a LiteRT measurement: the runtime named, with its package and version."""
    from importlib.metadata import PackageNotFoundError, version

    facts = {k: v for k, v in host.items() if k not in ("providers", "onnxruntime")}
    for package in ("ai-edge-litert", "tflite-runtime"):
        try:
            return {**facts, "runtime": "litert", "litert": f"{package} {version(package)}",
                    "attribution": "graph prefixes timed on LiteRT (no per-node profile there)"}
        except PackageNotFoundError:
            continue
    return {**facts, "runtime": "litert"}


def litert_profile(onnx_path: Path, model: Any, base: Any, opts: Any, progress: Progress) -> Any:
    """`split-profile --device local --edge-runtime litert`: the edge's per-node costs measured on LiteRT."""
    from models.inputs import synthetic_samples
    from partitioning.graph import build_cut_graph

    env = ensure_converter(Path(opts.converter_env) if opts.converter_env else None, opts.converter_python,
                           progress=progress)
    graph = build_cut_graph(model)
    inputs = [TensorSpec(i, (None, *graph.tensors[i].shape[1:]), graph.tensors[i].dtype) for i in graph.inputs]
    samples = synthetic_samples(inputs, CALIBRATION_SAMPLES, seed=1)
    return litert_node_costs(onnx_path, model, graph, base, env.convert, samples, repeats=opts.repeats,
                             threads=opts.threads, progress=progress)
