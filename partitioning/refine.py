"""Time candidate cuts for real: extract each head and tail, run them side by side, return the medians.

The per-node cost model predicts a cut's compute as a sum of node times measured inside one full-model run;
a cut's real head and tail differ by what the sum misses (session overhead twice, fusions broken at the cut,
layout conversions at the cut). When a few candidates are within that error of each other, timing them
settles the choice (`partitioning.planner.apply_measured`).

Every candidate's sessions are built first; then `rounds` rounds (more, until they span `min_seconds`) each
time every candidate, in a fresh seeded random order, for repeats/rounds runs (after one uncounted run that
wakes the part up), and each part's time is the median over all its counted runs. A stretch of background
load on the host thus slows all candidates a little instead of a few a lot.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from models.manifest import TensorSpec
from partitioning.extract import extract_split, session
from partitioning.planner import CLOUD_ONLY, EDGE_ONLY, Candidate
from partitioning.quantize import synthetic_samples

WARMUP_RUNS = 3
Part = tuple[Any, Mapping[str, Any]]  # an onnxruntime session and its feeds


def runs_per_round(repeats: int, rounds: int) -> int:
    """Runs of each part per round: repeats spread over the rounds, at least WARMUP_RUNS."""
    return max(WARMUP_RUNS, -(-repeats // rounds))


def _timed(part: Part, runs: int) -> list[float]:
    sess, feeds = part
    names = [o.name for o in sess.get_outputs()]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(names, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _parts(model, model_path: Path, cand: Candidate, feeds: Mapping[str, Any], edge_threads: int | None,
           cloud_threads: int | None, workdir: Path) -> tuple[Part | None, Part | None]:
    """The (head, tail) sessions with their feeds; None for the side a baseline does not run."""
    if cand.id == EDGE_ONLY:
        return (session(model_path, edge_threads), feeds), None
    if cand.id == CLOUD_ONLY:
        return None, (session(model_path, cloud_threads), feeds)
    paths = workdir / f"{cand.id}.head.onnx", workdir / f"{cand.id}.tail.onnx"
    head_path, tail_path = extract_split(model, cand.cut, *paths)
    head, tail = session(head_path, edge_threads), session(tail_path, cloud_threads)
    mid = dict(zip([o.name for o in head.get_outputs()], head.run(None, dict(feeds))))
    return (head, feeds), (tail, {i.name: mid[i.name] for i in tail.get_inputs()})


def time_cuts(
    model,
    model_path: Path,
    inputs: Sequence[TensorSpec],
    candidates: Sequence[Candidate],
    *,
    edge_threads: int | None = None,
    cloud_threads: int | None = None,
    repeats: int = 30,
    rounds: int = 5,
    seed: int = 0,
    min_seconds: float = 0.0,
) -> dict[str, tuple[float, float]]:
    """Candidate id -> (head_ms, tail_ms): medians of the fp32 head at edge_threads and tail at cloud_threads.

    `model` is the ONNX ModelProto stored at `model_path`; edge-only times the full model at edge_threads
    (tail 0), cloud-only the full model at cloud_threads (head 0). The inputs are one synthetic sample; each
    part runs runs_per_round(repeats, rounds) times in each of `rounds` rounds, and in more such rounds until
    the rounds span `min_seconds` (a host's speed drifts over seconds: costs.MIN_SECONDS).
    """
    if repeats < 1 or rounds < 1 or not min_seconds >= 0:
        raise ValueError(f"need repeats >= 1, rounds >= 1 and min_seconds >= 0, got repeats={repeats}, "
                         f"rounds={rounds}, min_seconds={min_seconds}")
    feeds = synthetic_samples(inputs, 1, seed=seed)[0]
    with tempfile.TemporaryDirectory(prefix="splitinfer-refine-") as tmp:
        parts = {c.id: _parts(model, Path(model_path), c, feeds, edge_threads, cloud_threads, Path(tmp))
                 for c in candidates}
        for pair in parts.values():
            for part in filter(None, pair):
                _timed(part, WARMUP_RUNS)
        samples: dict[str, tuple[list[float], list[float]]] = {cid: ([], []) for cid in parts}
        rng = random.Random(seed)
        per_round = runs_per_round(repeats, rounds)
        done, start = 0, time.perf_counter()
        while done < rounds or time.perf_counter() - start < min_seconds:
            done += 1
            order = list(parts)
            rng.shuffle(order)
            for cid in order:
                for side, part in enumerate(parts[cid]):
                    if part is not None:
                        # the first run of a turn wakes the part's pool and caches after the other parts ran:
                        # not counted, as in costs.measure_node_costs, whose wall times the prediction scales to
                        samples[cid][side].extend(_timed(part, per_round + 1)[1:])
    return {cid: (statistics.median(h) if h else 0.0, statistics.median(t) if t else 0.0)
            for cid, (h, t) in samples.items()}
