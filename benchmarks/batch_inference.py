"""Rows per second of `split-batch` (a bundle's head and tail as two Ray Data stages) against the full model run
with onnxruntime in a plain loop, on this host, with and without the prediction cache.

The dataset is ROWS procedural images (shapes on gradients, ImageNet-normalised, seeded) saved as .npy files.
One local Ray cluster on loopback (all of this host's CPUs) serves every split-batch run; its start is timed
once and reported apart. Per round, in an order that alternates between rounds (so background load hits all
alike):

- `ort loop`: the full model (fp32), one onnxruntime session on all cores, row by row, timed twice (`ort loop`,
  `ort loop again`): the two are the same thing, so their ratio is the noise floor of this run;
- `split-batch --no-cache`: the dataset through the head (int8 where the plan says) and tail stages, actors
  started per run, results kept in a temporary cache and written to parquet;
- `split-batch, cache cold`: the same with a fresh cache directory (every block committed as it finishes);
- `split-batch, cache warm`: the same command again over that cache: every row is a hit, no Ray stage runs.

Reported: the median over rounds of rows/s (whole command), and each row's ratio to `ort loop`; for the runs that
compute, also the seconds to the first committed block (mostly the stage actors' start: new worker processes
that import onnxruntime and load their sessions) and the rows/s after it (the pipeline's steady rate).

    python -m benchmarks.batch_inference [--model mobilenet_v2] [--rows 256] [--rounds 2] [--batch-size 32]
                                         [--bundles DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks._common import bundles_dir, host_line, make_bundle, median, table
from cloud_tier.batch.pipeline import BatchOptions, run_batch
from cloud_tier.rayinit import start_ray
from models.manifest import Bundle
from models.ortopts import make_session
from models.procedural import shapes_image

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def write_dataset(bundle: Bundle, folder: Path, rows: int) -> list[np.ndarray]:
    """`rows` seeded images of the model's input shape as .npy files in `folder`; the arrays too."""
    spec = bundle.inputs[0]
    channels, height, width = (int(d) for d in spec.shape[1:])  # type: ignore[arg-type]
    folder.mkdir(parents=True, exist_ok=True)
    xs = []
    for i in range(rows):
        img, _, _ = shapes_image(np.random.default_rng(1000 + i), size=max(height, width))
        x = ((img[:channels, :height, :width] - MEAN[:channels]) / STD[:channels]).astype(np.float32)
        np.save(folder / f"row{i:05d}.npy", x)
        xs.append(x)
    return xs


def ort_loop(bundle: Bundle, xs: list[np.ndarray], threads: int) -> Callable[[], float]:
    """A timer of the full model over `xs`, row by row, in one onnxruntime session (rows/s)."""
    session = make_session(bundle.full, threads=threads)
    name = bundle.inputs[0].name
    session.run(None, {name: xs[0][None]})  # warm

    def run() -> float:
        start = time.perf_counter()
        for x in xs:
            session.run(None, {name: x[None]})
        return len(xs) / (time.perf_counter() - start)

    return run


def split_batch(bundle_dir: Path, data: Path, out: Path, options: BatchOptions,
                extra: dict[str, list[float]]) -> float:
    """One split-batch run: rows/s over the wall clock of the whole command (the output file included); into
    `extra`, the seconds to the first committed block (the actors' start) and the rows/s after it."""
    start = time.perf_counter()
    marks: list[tuple[float, int]] = []
    result = run_batch(bundle_dir, data, out, options, say=lambda _: None,
                       on_block=lambda r: marks.append((time.perf_counter() - start, r.computed)))
    elapsed = time.perf_counter() - start
    if len(marks) > 1:
        extra.setdefault("first", []).append(marks[0][0])
        extra.setdefault("after", []).append((marks[-1][1] - marks[0][1]) / max(marks[-1][0] - marks[0][0], 1e-9))
    return result.passes[0].rows / elapsed


def main() -> int:
    """Run the benchmark and print its Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2", help="tiny or a zoo name (default %(default)s)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bundles", help="directory to build bundles in and reuse (default: a temp dir)")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)
        bundle_dir = make_bundle(args.model, bundles_dir(args.bundles, tmp))
        bundle = Bundle.load(bundle_dir)
        data = root / "data"
        xs = write_dataset(bundle, data, args.rows)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only cluster that lives for this run
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        start = time.perf_counter()
        start_ray(ray, None, num_cpus=cpus)
        ray_start_s = time.perf_counter() - start
        base = BatchOptions(batch_size=args.batch_size, progress=False, num_cpus=cpus)
        loop = ort_loop(bundle, xs, threads=cpus)
        results: dict[str, list[float]] = {}
        extras: dict[str, dict[str, list[float]]] = {}

        def timed(name: str, fn: Callable[[], float]) -> None:
            results.setdefault(name, []).append(fn())
            print(f"# {name}: {results[name][-1]:.1f} rows/s", file=sys.stderr, flush=True)

        try:
            for r in range(args.rounds):
                cache = root / f"cache{r}"
                steps: list[tuple[str, Callable[[], float]]] = [
                    ("ort loop", loop),
                    ("split-batch --no-cache", lambda: split_batch(
                        bundle_dir, data, root / "a.parquet", replace(base, use_cache=False),
                        extras.setdefault("split-batch --no-cache", {}))),
                    ("split-batch, cache cold", lambda c=cache: split_batch(
                        bundle_dir, data, root / "b.parquet", replace(base, cache_dir=c),
                        extras.setdefault("split-batch, cache cold", {}))),
                    ("split-batch, cache warm", lambda c=cache: split_batch(
                        bundle_dir, data, root / "c.parquet", replace(base, cache_dir=c), {})),
                    ("ort loop again", loop),
                ]
                if r % 2:  # alternate the order, keeping cold before warm
                    steps = [steps[4], steps[1], steps[2], steps[3], steps[0]]
                for name, fn in steps:
                    timed(name, fn)
        finally:
            ray.shutdown()
    ref = median(results["ort loop"])
    rows = []
    for name, v in results.items():
        more = extras.get(name, {})
        after = median(more.get("after", []))
        rows.append((name, len(v), median(v), median(v) / ref, median(more.get("first", [])), after, after / ref))
    print(f"\n{args.model}, {args.rows} rows, batch size {args.batch_size}, {args.rounds} rounds; {host_line()}")
    print(f"local Ray cluster start (once, not in any row): {ray_start_s:.1f} s\n")
    print(table(["run", "rounds", "rows/s (median)", "x ort loop", "s to 1st block", "rows/s after it",
                 "x ort loop"], rows))
    noise = abs(median(results["ort loop again"]) / ref - 1)
    print(f"\nnoise floor (ort loop timed twice in this run): {100 * noise:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
