"""The cloud side on a GPU machine: a bundle's tail on onnxruntime's CPU provider against CUDA / TensorRT.

Run once on a lent GPU machine (no internet needed) over bundles made beforehand elsewhere:

    python -m benchmarks.gpu_cloud BUNDLE_DIR|TAIL.onnx [...] [--model ZOO_NAME] [--threads 16]
        [--batches 1,8,32] [--runs 50] [--trt-cache DIR] [--json OUT.json]

A bundle directory gives its middle cut's tail (the chosen cut when it is one) and its model's name; a bare ONNX
file (e.g. a bundle's tail.onnx alone, when the whole bundle is too big to carry) is timed as it is, its inputs'
dynamic first dimension set to the batch, `--model` naming the zoo model for the GPU reference.

What it reports:
- the machine: onnxruntime's version and available providers, torch's version and the GPU torch sees;
- per bundle (or ONNX file), the tail of its middle cut (the chosen cut when it is one) at each batch size, on
  every provider of CPU (`--threads` intra-op threads), CUDA, TensorRT fp32, TensorRT fp16 that this
  onnxruntime has: median and p90 ms of `--runs` runs after warm-up, taken in one interleaved loop (each round
  runs every provider once, in rotating order), the ratio to the CPU median, and the noise floor (a second CPU
  session timed in the same rounds: CPU B / CPU A of the same work). TensorRT's first session builds its engine
  (minutes); the build time is reported apart, the engine cache (`--trt-cache`, default a temp dir) keeps it for the
  next session;
- a provider this onnxruntime lacks is one line saying so (the CPU build of onnxruntime has no CUDA or TensorRT:
  `pip install onnxruntime-gpu` replaces it and needs TensorRT's libraries for the TensorRT provider);
- a GPU reference that needs no onnxruntime-gpu: when torch sees CUDA and the bundle's model is a zoo model, the
  whole model in torch on the GPU (fp32 and fp16 autocast) beside the whole model on onnxruntime CPU (full.onnx),
  interleaved the same way. It is the whole model, not the tail: a bound on what the GPU gains, labelled so.

Self-contained: imports numpy, onnxruntime, torch (optional), this project's `models` package and
benchmarks/_common.py (numpy and `models` only) - nothing else of the project, no network.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import mid_cut
from models.manifest import Bundle
from models.ortopts import (
    CPU_EP,
    CUDA_EP,
    INSTALL_HINTS,
    TENSORRT_EP,
    make_session,
    resolve_provider_options,
)

Runner = Callable[[], Any]


def machine() -> dict[str, Any]:
    """onnxruntime's version and providers; torch's version and GPU (when torch is installed)."""
    import onnxruntime as ort

    facts: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                             "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__,
                             "providers": ort.get_available_providers()}
    try:
        import torch
    except ImportError:
        facts["torch"] = None
        return facts
    facts["torch"] = torch.__version__
    facts["cuda"] = torch.cuda.is_available()
    if facts["cuda"]:
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["torch_cuda"] = torch.version.cuda
    return facts


def feeds_for(session: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of `session` with its dynamic first dimension at `batch` (floats N(0,1), integers 0)."""
    from models.dtypes import ort_numpy_dtype, ort_type_name

    rng = np.random.default_rng(seed)
    out = {}
    for arg in session.get_inputs():
        dtype = np.dtype(ort_numpy_dtype(ort_type_name(arg.type)))
        shape: list[int] = []
        for axis, d in enumerate(arg.shape):
            if not (isinstance(d, int) and d > 0) and axis > 0:
                raise SystemExit(f"input {arg.name!r} has a dynamic dimension past the batch: {arg.shape}")
            shape.append(d if isinstance(d, int) and d > 0 else batch)
        out[arg.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                         else np.zeros(shape, dtype=dtype))
    return out


def target(path: Path, model: str | None) -> tuple[Path, str, str, Path | None]:
    """(ONNX file to time, its label, the zoo model name or "", the full model for the reference or None)."""
    if path.suffix == ".onnx":
        return path, path.name, model or "", None
    bundle = Bundle.load(path)
    try:
        cut = mid_cut(bundle)
    except ValueError:  # the plan kept only edge-only and cloud-only: the cloud's work is then the whole model
        return bundle.full, "full model (cloud-only: the bundle has no middle cut)", bundle.model_name, bundle.full
    tail = bundle.cut(cut).tail
    assert tail is not None
    return tail, f"tail of cut {cut}", bundle.model_name, bundle.full


def provider_sessions(path: Path, threads: int, trt_cache: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """name -> session for each provider this onnxruntime has (CPU twice: A and B), and notes (build times,
    providers that are missing or fail, each one line)."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    sessions: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for label in ("CPU A", "CPU B"):
        sessions[label] = make_session(path, threads=threads, providers=[CPU_EP])
    wanted: list[tuple[str, list[str], dict[str, dict[str, Any]]]] = [
        ("CUDA", [CUDA_EP, CPU_EP], {}),
        ("TensorRT fp32", [TENSORRT_EP, CUDA_EP, CPU_EP], {TENSORRT_EP: {}}),
        ("TensorRT fp16", [TENSORRT_EP, CUDA_EP, CPU_EP], {TENSORRT_EP: {"trt_fp16_enable": True}}),
    ]
    for label, providers, given in wanted:
        missing = [p for p in providers if p not in have]
        if missing:
            notes[label] = f"n/a: this onnxruntime {ort.__version__} has no {missing[0]} ({INSTALL_HINTS[missing[0]]})"
            continue
        options = resolve_provider_options(providers, given, trt_cache / label.replace(" ", "-"))
        start = time.perf_counter()
        try:
            session = make_session(path, threads=1, providers=providers, provider_options=options)
        except Exception as exc:  # noqa: BLE001 - a provider that fails here is reported, the rest still run
            notes[label] = f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            continue
        ran_on = session.get_providers()
        if ran_on[0] != providers[0]:
            notes[label] = f"n/a: the session fell back to {ran_on[0]}"
            continue
        sessions[label] = session
        notes[label] = f"session made in {time.perf_counter() - start:.1f} s (TensorRT: engine build or cache load)"
    return sessions, notes


def interleaved(runners: dict[str, Runner], runs: int, warmup: int) -> dict[str, list[float]]:
    """ms per run of each runner: `warmup` rounds untimed, then `runs` rounds, each runner once per round in a
    rotating order (drift and background load fall on all alike)."""
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            runners[name]()
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def summarize(times: dict[str, list[float]], base: str) -> list[dict[str, Any]]:
    """Median, p90 and ratio to `base`'s median per runner."""
    ref = statistics.median(times[base])
    rows = []
    for name, xs in times.items():
        med = statistics.median(xs)
        rows.append({"runner": name, "median_ms": round(med, 4), "p90_ms": round(float(np.percentile(xs, 90)), 4),
                     "ratio_to_" + base.replace(" ", "_"): round(med / ref, 3), "runs": len(xs)})
    return rows


def tail_rows(path: Path, label: str, batches: Sequence[int], threads: int, runs: int, warmup: int,
              trt_cache: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The model at `path` on every provider at each batch size."""
    sessions, notes = provider_sessions(path, threads, trt_cache)
    rows = []
    for batch in batches:
        feeds = feeds_for(sessions["CPU A"], batch)
        runners: dict[str, Runner] = {name: functools.partial(s.run, None, feeds) for name, s in sessions.items()}
        for row in summarize(interleaved(runners, runs, warmup), "CPU A"):
            rows.append({"part": label, "batch": batch, **row})
    return rows, notes


def torch_reference(model_name: str, full: Path | None, batches: Sequence[int], threads: int, runs: int,
                    warmup: int) -> tuple[list[dict[str, Any]], str]:
    """The whole zoo model in torch on the GPU (fp32, fp16 autocast) beside full.onnx on onnxruntime CPU (when the
    bundle is here)."""
    try:
        import torch
    except ImportError:
        return [], "n/a: torch is not installed"
    if not torch.cuda.is_available():
        return [], "n/a: torch sees no CUDA device"
    from models.zoo import build_zoo_model, zoo_entry, zoo_names

    if model_name not in zoo_names():
        return [], f"n/a: {model_name!r} is not a zoo model (give --model NAME)"
    model = build_zoo_model(model_name).eval().cuda()
    cpu = make_session(full, threads=threads, providers=[CPU_EP]) if full is not None else None
    rows = []
    shape = zoo_entry(model_name).input_shape
    for batch in batches:
        array = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
        x = torch.from_numpy(array).cuda()

        def gpu(fp16: bool, x: Any = x) -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                model(x)
            torch.cuda.synchronize()

        runners: dict[str, Runner] = {"torch CUDA fp32 (full model)": lambda: gpu(False),
                                      "torch CUDA fp16 (full model)": lambda: gpu(True)}
        if cpu is not None:
            feeds = {cpu.get_inputs()[0].name: array}
            runners = {"onnxruntime CPU (full model)": functools.partial(cpu.run, None, feeds), **runners}
        for row in summarize(interleaved(runners, runs, warmup), next(iter(runners))):
            rows.append({"part": "full model", "batch": batch, **row})
    return rows, f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"


def print_rows(rows: list[dict[str, Any]]) -> None:
    """A Markdown table of rows (the keys of the first row as headers)."""
    if not rows:
        return
    headers = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(str(r.get(h, "")) for h in headers) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path, help="bundle directories, or ONNX files (e.g. a tail.onnx)")
    ap.add_argument("--model", help="the zoo model of bare ONNX files, for the torch GPU reference")
    ap.add_argument("--threads", type=int, default=16, help="intra-op threads of the CPU provider (default 16)")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated (default 1,8,32)")
    ap.add_argument("--runs", type=int, default=50, help="timed rounds per batch size (default 50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    ap.add_argument("--trt-cache", type=Path, help="TensorRT engine cache folder (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="also write every result to this JSON file")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    import onnxruntime as ort

    # The TensorRT provider's library failing to load (no libnvinfer) is logged at error level by onnxruntime's
    # default logger; the table says so in one line, so only fatal lines pass.
    ort.set_default_logger_severity(4)
    facts = machine()
    print(f"# {json.dumps(facts)}")
    missing = [p for p in (CUDA_EP, TENSORRT_EP) if p not in facts["providers"]]
    for p in missing:
        print(f"# {p}: not in this onnxruntime {facts['onnxruntime']} ({INSTALL_HINTS[p]})")
    result: dict[str, Any] = {"machine": facts, "bundles": []}
    with tempfile.TemporaryDirectory(prefix="splitinfer-trt-") as tmp:
        cache = args.trt_cache or Path(tmp)
        for path in args.bundles:
            onnx_path, label, model_name, full = target(path, args.model)
            print(f"\n## {model_name or '?'}: {label} ({onnx_path}), CPU provider at {args.threads} threads")
            rows, notes = tail_rows(onnx_path, label, batches, args.threads, args.runs, args.warmup, cache)
            for provider, note in notes.items():
                print(f"# {provider}: {note}")
            print_rows(rows)
            ref_rows, ref_note = torch_reference(model_name, full, batches, args.threads, args.runs, args.warmup)
            print(f"\n# GPU reference (whole model): {ref_note}")
            print_rows(ref_rows)
            result["bundles"].append({"path": str(path), "model": model_name, "part": label, "rows": rows,
                                      "notes": notes, "reference": ref_rows, "reference_note": ref_note})
    print("\n# noise floor: CPU B / CPU A (two sessions of the same tail, same rounds); ratios within it are ties")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"# wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
