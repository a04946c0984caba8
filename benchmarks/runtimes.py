"""Head latency per edge runtime on this host: onnxruntime CPU, OpenVINO (onnxruntime provider), LiteRT.

For each model, the head of its chosen cut (a middle cut, or the whole model when the choice is cloud-only and
the bundle has no middle cut: edge-only) is loaded on every runtime this
environment has, through the agent's own `edge_agent.runtime.open_runner`:

    onnxruntime CPU fp32 (A and B: two sessions of the same head, the noise floor), onnxruntime CPU int8,
    OpenVINO fp32 / int8 (OpenVINOExecutionProvider, device CPU), LiteRT fp32 / int8 (head.tflite /
    head.int8.tflite, when the bundle has them and ai-edge-litert is installed)

and timed in one interleaved loop: each round runs every head once on the same input, in a rotating order, so
drift and background load fall on all alike. Reported: median and p90 ms, the ratio of medians to onnxruntime CPU
fp32 A, and each head's largest difference from CPU fp32 A's cut tensors (fp32 heads should agree to ~1e-5,
int8 heads differ by their quantization). A runtime this environment lacks is a row "n/a" with the one line
saying why (the OpenVINO provider needs `pip install "splitinfer[openvino]"`, or the onnxruntime-openvino build in
an environment of its own; LiteRT needs ai-edge-litert and a converted bundle).

    python -m benchmarks.runtimes [--models tiny_cnn,resnet18,mobilenet_v2] [--runs 100] [--threads 1]
        [--bundles DIR]

Bundles are made under --bundles (kept, so another environment, e.g. one with onnxruntime-openvino, can time the
same files) or in a temp dir.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import bundles_dir, host_line, make_bundle, median, mid_cut, percentile, table
from edge_agent.runtime import LITERT, ONNXRUNTIME, ModelLoadError, RuntimeOptions, open_runner
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle
from models.ortopts import CPU_EP, OPENVINO_EP, ProviderError, check_providers

BASE = "onnxruntime CPU fp32 A"


def head_cut(bundle: Bundle) -> str:
    """The chosen cut when the edge runs a head there (not cloud-only), else a middle cut, else edge-only."""
    if bundle.chosen != CLOUD_ONLY:
        return bundle.chosen
    try:
        return mid_cut(bundle)
    except ValueError:
        return EDGE_ONLY


def heads(bundle: Bundle, cut_id: str, threads: int) -> tuple[dict[str, Any], dict[str, str]]:
    """label -> runner of the cut's head on each runtime here; label -> why not, for the ones missing."""
    cut = bundle.cut(cut_id)
    cpu = RuntimeOptions(threads, 1, (CPU_EP,), ONNXRUNTIME)
    openvino = RuntimeOptions(threads, 1, (OPENVINO_EP, CPU_EP), ONNXRUNTIME)
    litert = RuntimeOptions(threads, 1, (CPU_EP,), LITERT)
    wanted: list[tuple[str, Path | None, RuntimeOptions]] = [
        (BASE, cut.head, cpu), ("onnxruntime CPU fp32 B", cut.head, cpu), ("onnxruntime CPU int8", cut.head_int8, cpu),
        ("OpenVINO fp32", cut.head, openvino), ("OpenVINO int8", cut.head_int8, openvino),
        ("LiteRT fp32", getattr(cut, "head_tflite", None), litert),
        ("LiteRT int8", getattr(cut, "head_int8_tflite", None), litert),
    ]
    runners: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for label, path, options in wanted:
        if path is None:
            missing[label] = ("the bundle has no LiteRT heads (split-profile convert BUNDLE --edge-runtime litert)"
                              if options.runtime == LITERT else "the bundle has no such head")
            continue
        try:
            if options.providers[0] != CPU_EP:
                check_providers(options.providers)
            runners[label] = open_runner(path, options)
        except (ImportError, ModelLoadError, ProviderError) as exc:
            missing[label] = str(exc).splitlines()[0]
    return runners, missing


def measure(runners: dict[str, Any], feeds: dict[str, np.ndarray], runs: int,
            warmup: int) -> dict[str, list[float]]:
    """ms per run of each runner, interleaved in rotating order (`warmup` rounds untimed)."""
    names = list(runners)
    calls: dict[str, Callable[[], Any]] = {n: functools.partial(runners[n].run, feeds) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            calls[name]()
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest absolute difference over the tensors both give."""
    common = [k for k in a if k in b]
    return max((float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in common),
               default=float("nan"))


def run_model(model: str, root: Path, runs: int, warmup: int, threads: int) -> list[list[object]]:
    """The table rows of one model."""
    bundle = Bundle.load(make_bundle(model, root))
    cut_id = head_cut(bundle)
    runners, missing = heads(bundle, cut_id, threads)
    rng = np.random.default_rng(0)
    spec = bundle.inputs[0]
    feeds = {spec.name: rng.standard_normal(spec.concrete_shape(1)).astype(np.dtype(spec.dtype))}
    reference = runners[BASE].run(feeds)
    diffs = {name: max_diff(reference, r.run(feeds)) for name, r in runners.items()}
    times = measure(runners, feeds, runs, warmup)
    base = median(times[BASE])
    rows: list[list[object]] = []
    for name, xs in times.items():
        rows.append([model, cut_id, name, median(xs), percentile(xs, 90), median(xs) / base, diffs[name], ""])
    for name, why in missing.items():
        rows.append([model, cut_id, name, float("nan"), float("nan"), float("nan"), float("nan"), f"n/a: {why}"])
    for runner in runners.values():
        runner.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny_cnn,resnet18,mobilenet_v2", help="zoo models, comma-separated")
    ap.add_argument("--runs", type=int, default=100, help="timed rounds (default 100)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed rounds first (default 10)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every runtime (default 1, the agent's)")
    ap.add_argument("--bundles", help="keep bundles in this folder (default: a temp dir); the LiteRT rows need "
                    "bundles with .tflite heads: run `split-profile convert DIR/MODEL` on them, then this again")
    args = ap.parse_args(argv)
    print(f"# {host_line()}; {args.runs} interleaved rounds after {args.warmup}, {args.threads} thread(s)")
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="splitinfer-runtimes-") as tmp:
        root = bundles_dir(args.bundles, tmp)
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            rows.extend(run_model(model, root, args.runs, args.warmup, args.threads))
    print(table(["model", "cut", "head on", "median ms", "p90 ms", f"/ {BASE}", "max |diff| vs A", "note"], rows))
    print("\nnoise floor: 'onnxruntime CPU fp32 B' / A (the same head twice in the same rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
