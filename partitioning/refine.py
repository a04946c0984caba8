"""Time candidate cuts for real (`time_cuts`), and the refinement policy that uses those timings (`Refiner`).

The per-node cost model predicts a cut's compute as a sum of node times measured inside one full-model run;
a cut's real head and tail differ by what the sum misses (session overhead twice, fusions broken at the cut,
layout conversions at the cut). When a few candidates are within that error of each other, timing them
settles the choice (`partitioning.planner.apply_measured`).

Every candidate's sessions are built first; then `rounds` rounds (more, until they span `min_seconds`) each
time every candidate, in a fresh seeded random order, for repeats/rounds runs (after one uncounted run that
wakes the part up), and each part's time is the median over all its counted runs. A stretch of background
load on the host thus slows all candidates a little instead of a few a lot.

`Refiner` decides what to time: the few best candidates, again while the choice moves to an untimed one, then
a close or overturned pair head to head. It takes its timer (`time_cuts` by default) as an argument.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from models.convert import integer_input_highs
from models.inputs import synthetic_samples
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Refinement, TensorSpec, TieBreak
from partitioning.extract import extract_split, session
from partitioning.graph import CutGraph
from partitioning.planner import Candidate, CostInputs, Plan, apply_measured, evaluate_cut, rank

WARMUP_RUNS = 3
Part = tuple[Any, Mapping[str, Any]]  # an onnxruntime session and its feeds
PartTimer = Callable[[Part, int], list[float]]  # (part, runs) -> ms of each run
Progress = Callable[[str], None]

REFINE_ROUNDS = 5
REFINE_BOUND = 3  # at most REFINE_BOUND * refine candidates are timed, however the choice moves
# When the two best timed cuts are within REFINE_TIE of each other by the objective, or their timings rank them
# the other way round from the per-node model, they are timed again head to head: twice the runs, in turns of
# TIE_RUNS runs each (see Refiner._tie_break).
REFINE_TIE = 0.10
TIE_RUNS = 3
MAX_TIE_BREAKS = 2  # per refinement: a second only when the first handed the choice to a cut not yet timed


def runs_per_round(repeats: int, rounds: int) -> int:
    """Runs of each part per round: repeats spread over the rounds, at least WARMUP_RUNS."""
    return max(WARMUP_RUNS, -(-repeats // rounds))


def timed_runs(part: Part, runs: int) -> list[float]:
    """Run `part` `runs` times back to back; the ms of each run."""
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
    run: PartTimer = timed_runs,
) -> dict[str, tuple[float, float]]:
    """Candidate id -> (head_ms, tail_ms): medians of the fp32 head at edge_threads and tail at cloud_threads.

    `model` is the ONNX ModelProto stored at `model_path`; edge-only times the full model at edge_threads
    (tail 0), cloud-only the full model at cloud_threads (head 0). The inputs are one synthetic sample; each
    part runs runs_per_round(repeats, rounds) times in each of `rounds` rounds, and in more such rounds until
    the rounds span `min_seconds` (a host's speed drifts over seconds: costs.MIN_SECONDS). `run` times one
    part's runs (timed_runs).
    """
    if repeats < 1 or rounds < 1 or not min_seconds >= 0:
        raise ValueError(f"need repeats >= 1, rounds >= 1 and min_seconds >= 0, got repeats={repeats}, "
                         f"rounds={rounds}, min_seconds={min_seconds}")
    feeds = synthetic_samples(inputs, 1, seed=seed, int_high=integer_input_highs(model))[0]
    with tempfile.TemporaryDirectory(prefix="splitinfer-refine-") as tmp:
        parts = {c.id: _parts(model, Path(model_path), c, feeds, edge_threads, cloud_threads, Path(tmp))
                 for c in candidates}
        for pair in parts.values():
            for part in filter(None, pair):
                run(part, WARMUP_RUNS)
        samples: dict[str, tuple[list[float], list[float]]] = {cid: ([], []) for cid in parts}
        rng = random.Random(seed)
        per_round = runs_per_round(repeats, rounds)
        done, start = 0, time.perf_counter()
        while done < rounds or time.perf_counter() - start < min_seconds:
            done += 1
            order = list(parts)
            rng.shuffle(order)
            for cid in order:
                for side, turn in enumerate(parts[cid]):
                    if turn is not None:
                        # the first run of a turn wakes the part's pool and caches after the other parts ran:
                        # not counted, as in costs.measure_node_costs, whose wall times the prediction scales to
                        samples[cid][side].extend(run(turn, per_round + 1)[1:])
    return {cid: (statistics.median(h) if h else 0.0, statistics.median(t) if t else 0.0)
            for cid, (h, t) in samples.items()}


class CutTimer(Protocol):
    """What times candidate cuts: `time_cuts`'s signature (tests pass a stand-in)."""

    def __call__(self, model: Any, model_path: Path, inputs: Sequence[TensorSpec], candidates: Sequence[Candidate],
                 *, edge_threads: int | None = ..., cloud_threads: int | None = ..., repeats: int = ...,
                 rounds: int = ..., seed: int = ..., min_seconds: float = ...) -> dict[str, tuple[float, float]]:
        """Candidate id -> (head_ms, tail_ms)."""
        ...


@dataclass(frozen=True)
class RefineTarget:
    """What a refinement times and at what settings: the model, its cut graph and costs, the timing settings."""

    graph: CutGraph
    costs: CostInputs
    model: Any  # the ONNX ModelProto stored at onnx_path
    onnx_path: Path
    inputs: Sequence[TensorSpec]
    repeats: int
    seconds: float
    edge_threads: int | None
    cloud_threads: int | None
    progress: Progress = lambda msg: None


class Refiner:
    """The refinement policy: time the best candidates' real heads and tails and choose again (module docstring).

    `timer` times a list of cuts (`time_cuts`); `tie` is how close by the objective two timed cuts must be for a
    head-to-head; `rounds`, `bound`, `tie_runs` and `max_tie_breaks` as the module constants say.
    """

    def __init__(self, timer: CutTimer = time_cuts, *, tie: float = REFINE_TIE, rounds: int = REFINE_ROUNDS,
                 bound: int = REFINE_BOUND, tie_runs: int = TIE_RUNS, max_tie_breaks: int = MAX_TIE_BREAKS) -> None:
        self.timer = timer
        self.tie = tie
        self.rounds = rounds
        self.bound = bound
        self.tie_runs = tie_runs
        self.max_tie_breaks = max_tie_breaks

    def refine(self, plan: Plan, target: RefineTarget, count: int) -> tuple[Plan, Refinement]:
        """Time the `count` best candidates' real heads and tails and choose again, until the chosen one is timed;
        then settle a close or overturned pair head to head (_tie_break).

        The first round also times both baselines: each is one session of the full model, cheap to time, and the
        usual rival of a near-tie (a baseline predicted a little worse than the best cut is often measured
        better). A head-to-head that slows both its cuts can hand the choice to a cut that was never timed; that
        cut is then timed in turn and the pair settled again (at most max_tie_breaks head-to-heads, bound * count
        cuts).
        """
        runs = runs_per_round(target.repeats, self.rounds) * self.rounds
        timed: list[str] = []
        ties: list[TieBreak] = []
        limit = self.bound * count
        plan = self._time_best(plan, target, count=count, limit=limit, runs=runs, timed=timed)
        while len(ties) < self.max_tie_breaks:
            plan, tie = self._tie_break(plan, target)
            if tie is None:
                break
            ties.append(tie)
            if plan.best.measured or len(timed) >= limit:
                break
            target.progress(f"the head-to-head handed the choice to {plan.chosen}, which was not timed: timing it")
            plan = self._time_best(plan, target, count=1, limit=limit, runs=runs, timed=timed)
        record = Refinement(tuple(timed), runs=runs, rounds=self.rounds, min_seconds=target.seconds,
                            edge_threads=target.edge_threads, cloud_threads=target.cloud_threads,
                            chosen_timed=plan.best.measured, tie_break=ties[-1] if ties else None,
                            earlier_tie_breaks=tuple(ties[:-1]))
        if not plan.best.measured:
            target.progress(f"the chosen cut {plan.chosen} was not timed ({len(timed)} cuts timed, at most "
                            f"{limit} for --refine {count}, and the choice moved with every timing)")
        return plan, record

    def _time(self, target: RefineTarget, cands: Sequence[Candidate],
              **settings: Any) -> dict[str, tuple[float, float]]:
        return self.timer(target.model, target.onnx_path, target.inputs, cands, edge_threads=target.edge_threads,
                          cloud_threads=target.cloud_threads, **settings)

    def _time_best(self, plan: Plan, target: RefineTarget, *, count: int, limit: int, runs: int,
                   timed: list[str]) -> Plan:
        """Time the `count` best untimed candidates (and, when nothing is timed yet, both baselines) and choose
        again, until the chosen one is timed or `limit` cuts are; appends the timed ids to `timed`. `runs` (the
        least runs per cut, from repeats) is for the progress line."""
        say = target.progress
        while len(timed) < limit:
            todo = [c for c in rank(plan.candidates, plan.budgets) if not c.measured]
            todo = todo[: min(count, limit - len(timed))]
            if not timed:
                todo += [c for c in plan.candidates if c.id in (EDGE_ONLY, CLOUD_ONLY) and c not in todo]
            if not todo:
                break
            again = " more" if timed else ""
            say(f"timing the {len(todo)}{again} best cuts as extracted head+tail ({', '.join(c.id for c in todo)}; "
                f"at least {runs} runs each in {self.rounds} or more interleaved rounds over {target.seconds:g} s)")
            times = self._time(target, todo, repeats=target.repeats, rounds=self.rounds, min_seconds=target.seconds)
            before = plan.chosen
            plan = apply_measured(plan, target.graph, target.costs, times)
            timed += [c.id for c in todo]
            for c in todo:
                got = plan.candidate(c.id)
                say(f"  {c.id}: predicted {got.predicted_edge_ms:.3f} + {got.predicted_cloud_ms:.3f} ms, "
                    f"timed {got.edge_ms:.3f} + {got.cloud_ms:.3f} ms")
            if plan.chosen != before:
                say(f"timing moved the choice from {before} to {plan.chosen}")
            if plan.best.measured:
                break
        return plan

    def _tie_break(self, plan: Plan, target: RefineTarget) -> tuple[Plan, TieBreak | None]:
        """Time the two best timed cuts again, head to head, when they are within `tie` by the objective or
        when their timings overturn the per-node model's order.

        The refinement's rounds are a few seconds long, and a busy or virtualized host's speed drifts over such
        spans (5-13% on the 2-core development VM, README), so two cuts timed a few percent apart may come out in
        either order, and a stretch that slows one side's threads more than the other's can even reverse two cuts
        the model holds 15% apart. Here the two alone take 2 x repeats runs each (more, until the turns span
        2 x seconds), tie_runs at a time in alternating turns, so that a drift reaches both alike; their timings
        replace the refinement's. None when there is no such pair (or the objective is bytes, which timing does
        not change).
        """
        say = target.progress
        ranked = [c for c in rank(plan.candidates, plan.budgets) if c.measured and c.feasible]
        if plan.budgets.objective == "bytes" or len(ranked) < 2:
            return plan, None
        first, second = ranked[:2]
        objective = plan.budgets.objective
        a, b = (c.objective_value(objective) for c in (first, second))
        predicted = {c.id: evaluate_cut(target.graph, c.edge_nodes, target.costs, plan.link, plan.budgets, c.id)
                     .objective_value(objective) for c in (first, second)}
        if a <= 0:
            return plan, None
        if (b - a) / a <= self.tie:
            reason = f"within {100 * self.tie:g}%"
            say(f"{first.id} and {second.id} are within {100 * (b - a) / a:.1f}%: timing them head to head")
        elif predicted[first.id] > predicted[second.id]:
            reason = "timing overturned the prediction"
            say(f"timed, {first.id} is {100 * (b - a) / a:.1f}% better than {second.id}, but the per-node model put "
                f"{second.id} {100 * (predicted[first.id] / predicted[second.id] - 1):.1f}% ahead: timing them "
                f"head to head")
        else:
            return plan, None
        runs = 2 * target.repeats
        turns = max(1, runs // self.tie_runs)
        say(f"  (at least {runs} runs each in turns of {self.tie_runs}, over {2 * target.seconds:g} s)")
        times = self._time(target, [first, second], repeats=runs, rounds=turns, seed=1,
                           min_seconds=2 * target.seconds)
        before = plan.chosen
        plan = apply_measured(plan, target.graph, target.costs, times)
        for c in (first, second):
            got = plan.candidate(c.id)
            say(f"  {c.id}: timed {got.edge_ms:.3f} + {got.cloud_ms:.3f} ms")
        if plan.chosen != before:
            say(f"the head-to-head moved the choice from {before} to {plan.chosen}")
        return plan, TieBreak((first.id, second.id), reason, runs, turns, 2 * target.seconds,
                              {first.id: round(a, 4), second.id: round(b, 4)},
                              {cid: round(v, 4) for cid, v in predicted.items()})
