"""How well the planner's cost model predicts real head+tail latency, measured on this host.

For each zoo model with --device local and --cloud local: profile per node and plan, as split-profile does,
then extract the head and tail of a spread of candidate cuts and time them (fp32, side by side in one
process). That profile-then-time round runs --plan-rounds times (default 5), and the rounds go round the models
(round 1 of every model, then round 2 of every model, ...), so one model's rounds lie minutes apart. On a
2-core VM the host's speed drifts by 10-30% over seconds (see the README), so one profile and one timing are
one draw each from that drift; a candidate's prediction and its measurement are each the median over the
rounds. The edge is this host at --edge-threads and the cloud this host at --cloud-threads (default 1 and 2),
so that the cloud is faster and cuts other than edge-only can win. Reports, per model:

- MAPE: mean absolute percentage error of the predicted compute (edge_ms + cloud_ms) against the measured
  head_ms + tail_ms over the candidates (and, alongside, the MAPE of each round on its own);
- re-timing MAPE, the noise floor: the plan's refinement times its few best cuts and both baselines with the
  same timing code just before the benchmark times them again, so the two timings of those cuts differ by
  the host's noise alone. Their MAPE (pooled like the other, and per round) is what any predictor is held to
  here: a prediction cannot agree with one timing better than a second timing does. Alongside, the
  prediction's MAPE on the same cuts;
- regret: how much slower each round's chosen cut is than the best cut, where a cut's total is its measured
  head + tail plus the same modelled transfer at the plan's network (the link is not emulated here). The
  best is settled by a final head-to-head timing of every round's choice and the best few cuts by the pooled
  measurements, in fine turns (3 runs each), so that drift reaches them alike and the pooled minimum's luck
  (the fastest of 40 noisy cuts is faster than it really is) does not count as regret. Reported as the median
  and the worst over the rounds.

The plan is made as split-profile makes it, so its few best cuts are timed before choosing (--refine, default
3; partitioning/refine.py), and the two best timed again head to head when within 10% or when the timing
overturns the model's order: regret judges that refined choice. MAPE stays a test of the cost model alone: a
refined candidate is compared by its recorded per-node prediction, and every measurement here is the
benchmark's own, taken after the plan is made (the same timing code, not the plan's timings).

    python -m benchmarks.planner_accuracy [--models resnet18,...] [--repeats 30] [--network ethernet] [--refine 3]
                                        [--plan-rounds 5] [--verbose]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from partitioning import profile
from partitioning.planner import Candidate
from partitioning.refine import time_cuts

# Timed in every round besides the spread: the 2 x refine best-predicted candidates and any other predicted
# within 10% of the best (up to 40), since any of them may be a round's choice.
NEAR_TIE_BAND = 0.10
MAX_NEAR_TIES = 40
# The final head-to-head: every round's choice and this many best cuts by the pooled measurements, each part
# timed FINAL_TURNS times for FINAL_RUNS runs, in a fresh random order each turn.
FINAL_CONTENDERS = 3
FINAL_TURNS, FINAL_RUNS = 40, 3
DEFAULT_MODELS = ("tiny_cnn", "mobilenet_v2", "resnet18", "vgg11", "vit_tiny", "unet_small")


def predicted_compute(cand: Candidate) -> tuple[float, float]:
    """The cost model's (edge_ms, cloud_ms) for a candidate, also when the plan replaced them by timings."""
    if cand.measured:
        return cand.predicted_edge_ms or 0.0, cand.predicted_cloud_ms or 0.0
    return cand.edge_ms, cand.cloud_ms


def _spread(cands: list[Candidate], max_cuts: int) -> list[Candidate]:
    """About max_cuts candidates spread over the topological order (by how many nodes the head holds)."""
    ordered = sorted(cands, key=lambda c: len(c.edge_nodes))
    return ordered[:: max(1, len(ordered) // max_cuts)]


class ModelRun:
    """One model's rounds: each plans as split-profile does, then times the picked candidates at once."""

    def __init__(self, name: str, workdir: Path, args: argparse.Namespace) -> None:
        import onnx

        from models.loaders import load_model

        self.name, self.args = name, args
        self.loaded = load_model(name, workdir)  # the plan writes no bundle; the same deterministic weights again
        self.model = onnx.load(str(self.loaded.onnx_path))
        self.predicted: dict[str, list[float]] = {}
        self.measured: dict[str, list[float]] = {}
        self.transfer: dict[str, float] = {}
        self.candidates: dict[str, Candidate] = {}
        self.chosen: list[str] = []
        self.round_mapes: list[float] = []
        self.retimed: dict[str, list[tuple[int, float]]] = {}  # cid -> (round, the plan's refinement timing)
        self.round_noise: list[float] = []
        self.tie_breaks = 0  # rounds whose plan timed its two best cuts again head to head (close or overturned)
        self.picked: list[str] = []
        self.nodes = 0

    def _time(self, ids: list[str], **kw) -> dict[str, float]:
        a = self.args
        times = time_cuts(self.model, self.loaded.onnx_path, self.loaded.inputs, [self.candidates[i] for i in ids],
                          edge_threads=a.edge_threads, cloud_threads=a.cloud_threads, **kw)
        return {cid: sum(parts) for cid, parts in times.items()}

    def round(self, r: int) -> None:
        """Plan once, then time the spread, the near-ties and every choice so far."""
        a = self.args
        result = profile(self.name, device="local", cloud="local", network=a.network, repeats=a.repeats,
                         measure_seconds=a.measure_seconds, threads=a.edge_threads, cloud_threads=a.cloud_threads,
                         refine=a.refine)
        self.nodes = result.plan_document.model.nodes
        self.candidates = {c.id: c for c in result.plan.candidates}
        if not self.picked:  # a spread over the order, and the near-ties any round's plan is likely to choose
            guess = {c.id: sum(predicted_compute(c)) + c.transfer_ms for c in result.plan.candidates}
            by_prediction = sorted(result.plan.candidates, key=lambda c: guess[c.id])
            band = guess[by_prediction[0].id] * (1 + NEAR_TIE_BAND)
            near = [c for i, c in enumerate(by_prediction[:MAX_NEAR_TIES]) if i < 2 * a.refine or guess[c.id] <= band]
            self.picked = list(dict.fromkeys(c.id for c in [*_spread(result.plan.candidates, a.max_cuts), *near]))
        self.chosen.append(result.plan.best.id)
        refinement = result.plan_document.refined
        self.tie_breaks += refinement is not None and refinement.tie_break is not None
        refined = [c for c in result.plan.candidates if c.measured]
        # Every round's choice is timed from then on, and this round's refined cuts again (the noise floor).
        ids = list(dict.fromkeys([*self.picked, *self.chosen, *(c.id for c in refined)]))
        times = self._time(ids, repeats=a.repeats, rounds=a.rounds, seed=5 + r, min_seconds=a.timing_seconds)
        errors = []
        for cid in ids:
            pred, meas = sum(predicted_compute(self.candidates[cid])), times[cid]
            self.predicted.setdefault(cid, []).append(pred)
            self.measured.setdefault(cid, []).append(meas)
            self.transfer[cid] = self.candidates[cid].transfer_ms  # from bytes and the network: the same each round
            if meas > 0:
                errors.append(abs(pred - meas) / meas)
        self.round_mapes.append(100 * float(np.mean(errors)))
        for c in refined:
            self.retimed.setdefault(c.id, []).append((len(self.measured[c.id]) - 1, c.edge_ms + c.cloud_ms))
        self.round_noise.append(100 * float(np.mean([abs(c.edge_ms + c.cloud_ms - times[c.id]) / times[c.id]
                                                     for c in refined if times[c.id] > 0])))

    def noise_floor(self) -> tuple[float, float, int]:
        """Over the refined cuts, pooled: (MAPE of the plan's timing, MAPE of the prediction) against the
        benchmark's timing, each the median over the rounds that refined the cut; and how many cuts."""
        retime, predict = [], []
        for cid, pairs in self.retimed.items():
            rounds = [i for i, _ in pairs]
            meas = float(np.median([self.measured[cid][i] for i in rounds]))
            if meas > 0:
                retime.append(abs(float(np.median([t for _, t in pairs])) - meas) / meas)
                predict.append(abs(float(np.median([self.predicted[cid][i] for i in rounds])) - meas) / meas)
        return 100 * float(np.mean(retime)), 100 * float(np.mean(predict)), len(retime)

    def result(self) -> dict:
        """Pooled MAPE, and each round's regret from a final head-to-head of the choices and the best few."""
        rows = []
        for cid in self.predicted:
            pred, meas = float(np.median(self.predicted[cid])), float(np.median(self.measured[cid]))
            rows.append((cid, pred, meas, meas + self.transfer[cid], len(self.measured[cid])))
        pooled = {cid: t for cid, _, _, t, _ in rows}
        contenders = list(dict.fromkeys([*sorted(pooled, key=pooled.get)[:FINAL_CONTENDERS], *self.chosen]))
        final = self._time(contenders, repeats=FINAL_TURNS * FINAL_RUNS, rounds=FINAL_TURNS, seed=99,
                           min_seconds=2 * self.args.timing_seconds)
        total = {cid: final[cid] + self.transfer[cid] for cid in contenders}
        best = min(total, key=total.get)
        regrets = [100 * (total[c] - total[best]) / total[best] for c in self.chosen]
        retime, predict, refined = self.noise_floor()
        return {
            "model": self.name,
            "nodes": self.nodes,
            "cuts": len(rows),
            "mape": 100 * float(np.mean([abs(p - m) / m for _, p, m, _, _ in rows if m > 0])),
            "round_mapes": self.round_mapes,
            "retime_mape": retime,
            "retime_predicted_mape": predict,
            "retimed_cuts": refined,
            "round_noise": self.round_noise,
            "regret": float(np.median(regrets)),
            "worst_regret": max(regrets),
            "chosen": self.chosen,
            "tie_breaks": self.tie_breaks,
            "best": best,
            "rows": rows,
            "final": total,
        }


def _chosen(ids: list[str]) -> str:
    """Round choices, runs folded: 'c044, cloud-only ×2'."""
    counts = dict.fromkeys(ids, 0)
    for cid in ids:
        counts[cid] += 1
    return ", ".join(cid if n == 1 else f"{cid} ×{n}" for cid, n in counts.items())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--network", default="ethernet")
    ap.add_argument("--max-cuts", type=int, default=16, help="candidates measured per model (spread over the order)")
    ap.add_argument("--edge-threads", type=int, default=1)
    ap.add_argument("--cloud-threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds over the candidates")
    ap.add_argument("--refine", type=int, default=3, help="candidates the plan times before choosing (0: none)")
    ap.add_argument("--measure-seconds", type=float, default=1.0,
                    help="the plan's --measure-seconds: each profile and refinement timing spans at least this")
    ap.add_argument("--timing-seconds", type=float, default=2.0,
                    help="the benchmark's timing of a round's cuts spans at least this (the final head-to-head twice "
                         "this)")
    ap.add_argument("--plan-rounds", type=int, default=5,
                    help="profile-then-time rounds per model, taken in turns across the models; predictions and "
                         "measurements are medians over them")
    ap.add_argument("--verbose", action="store_true", help="also print each measured candidate")
    args = ap.parse_args(argv)
    if args.plan_rounds < 1:
        ap.error(f"--plan-rounds must be at least 1, got {args.plan_rounds}")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    print(f"edge: this host, {args.edge_threads} thread(s); cloud: this host, {args.cloud_threads} thread(s); "
          f"network {args.network} (modelled, not emulated); {args.repeats} runs per median, profiles and the "
          f"plan's timings over >= {args.measure_seconds:g} s, the benchmark's over >= {args.timing_seconds:g} s; "
          f"{args.plan_rounds} profile-then-time rounds per model, in turns across the models\n", flush=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [ModelRun(name, Path(tmp) / name, args) for name in names]
        for r in range(args.plan_rounds):
            for run in runs:
                run.round(r)
                print(f"[{time.monotonic() - start:6.0f} s] round {r + 1}/{args.plan_rounds} {run.name}: MAPE "
                      f"{run.round_mapes[-1]:.1f}% (re-timing {run.round_noise[-1]:.1f}%), chose {run.chosen[-1]}",
                      file=sys.stderr, flush=True)
        results = [run.result() for run in runs]
    print("| model | nodes | cuts measured | MAPE (compute) | MAPE per round | re-timing MAPE (noise floor) / "
          "prediction's, same cuts | re-timing MAPE per round | regret of chosen cut (median / worst) "
          "| chosen per round (rounds whose plan timed a pair head to head) | best (head-to-head) |")
    print("|---|---:|---:|---:|---|---:|---|---:|---|---|")
    for r in results:
        if args.verbose:
            for cid, pred, meas, _, n in r["rows"]:
                print(f"    {cid:>10}: predicted {pred:.3f} ms, measured {meas:.3f} ms "
                      f"({100 * (pred - meas) / meas:+.1f}%; medians of {n} round(s))", file=sys.stderr)
            print("    head-to-head totals (with modelled transfer): "
                  + ", ".join(f"{cid} {t:.3f} ms" for cid, t in sorted(r["final"].items(), key=lambda kv: kv[1])),
                  file=sys.stderr)
        per_round = " / ".join(f"{m:.1f}" for m in r["round_mapes"])
        noise = " / ".join(f"{m:.1f}" for m in r["round_noise"])
        print(f"| {r['model']} | {r['nodes']} | {r['cuts']} | {r['mape']:.1f}% | {per_round} | "
              f"{r['retime_mape']:.1f}% / {r['retime_predicted_mape']:.1f}% ({r['retimed_cuts']} cuts) | {noise} | "
              f"{r['regret']:.1f}% / {r['worst_regret']:.1f}% | {_chosen(r['chosen'])} "
              f"({r['tie_breaks']} head-to-head) | {r['best']} |")
    print(f"\n({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
