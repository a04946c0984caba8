"""How well the planner's cost model predicts real head+tail latency, measured on this host.

For each zoo model with --device local and --cloud local: profile per node, plan, then for a spread of
candidate cuts extract the head and tail and time them (fp32, median of N runs each, side by side in one
process); that profile-then-time round runs --plan-rounds times (default 3), and a candidate's prediction and
measurement are each the median over the rounds, so a stretch of a slower host reaches both alike (on a 2-core
VM the speed drifts by 15-30% within a minute, which a single profile then timing took as model error). The
edge is this host at --edge-threads and the cloud this host at --cloud-threads (default 1 and 2), so that the
cloud is faster and cuts other than edge-only can win. Reports, per model:

- MAPE: mean absolute percentage error of the predicted compute (edge_ms + cloud_ms) against the measured
  head_ms + tail_ms over the candidates (and, alongside, the MAPE of each round on its own);
- regret: how much slower the chosen cut is than the best cut by measurement, where each cut's total is its
  measured head + tail plus the same modelled transfer at the plan's network (the link is not emulated here);
  each round's choice is judged against the pooled measurements, reported as the median and the worst round.

The plan is made as split-profile makes it, so its few best cuts are timed before choosing (--refine, default
3; partitioning/refine.py): regret judges that refined choice. MAPE stays a test of the cost model alone: a
refined candidate is compared by its recorded per-node prediction, and every measurement here is the
benchmark's own, taken after the plan is made (the same timing code, not the plan's timings).

    python benchmarks/planner_accuracy.py [--models resnet18,...] [--repeats 30] [--network ethernet] [--refine 3]
                                        [--plan-rounds 3] [--verbose]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partitioning import profile  # noqa: E402
from partitioning.planner import Candidate  # noqa: E402
from partitioning.refine import time_cuts  # noqa: E402

# Timed in every round besides the spread: the 2 x refine best-predicted candidates and any other predicted
# within 10% of the best (up to 40), since any of them may be a round's choice.
NEAR_TIE_BAND = 0.10
MAX_NEAR_TIES = 40
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


def measure_model(name: str, repeats: int, network: str, max_cuts: int, edge_threads: int, cloud_threads: int,
                  rounds: int = 5, refine: int = 3, plan_rounds: int = 3) -> dict:
    """Plan one model `plan_rounds` times, each plan followed at once by timing a spread of its candidates.

    Profiles and timings take turns (P1 T1 P2 T2 ...), so a stretch of a faster or slower host reaches the
    predictions and the measurements alike. Timed in every round: a spread over the order and the first round's
    best-predicted candidates and near-ties (where the choice falls); a later round's choice outside them is
    timed from then on. Each candidate's prediction and measurement are the medians over the rounds; MAPE is
    computed on those (and on each round alone). Each round's chosen cut is judged against the pooled
    measurements: regret is reported as the median and the worst over the rounds.
    """
    import onnx

    from models.loaders import load_model

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(name, Path(tmp))  # the plan writes no bundle; the same deterministic weights again
        model = onnx.load(str(loaded.onnx_path))
        predicted: dict[str, list[float]] = {}
        measured: dict[str, list[float]] = {}
        transfer: dict[str, float] = {}
        chosen: list[str] = []
        round_mapes: list[float] = []
        picked: dict[str, Candidate] = {}
        doc: dict = {}
        for r in range(plan_rounds):
            result = profile(name, device="local", cloud="local", network=network, repeats=repeats,
                             threads=edge_threads, cloud_threads=cloud_threads, refine=refine)
            doc = result.document
            by_id = {c.id: c for c in result.plan.candidates}
            if not picked:  # a spread over the order, and the near-ties any round's plan is likely to choose
                guess = {c.id: sum(predicted_compute(c)) + c.transfer_ms for c in result.plan.candidates}
                by_prediction = sorted(result.plan.candidates, key=lambda c: guess[c.id])
                band = guess[by_prediction[0].id] * (1 + NEAR_TIE_BAND)
                near = [c for i, c in enumerate(by_prediction[:MAX_NEAR_TIES])
                        if i < 2 * refine or guess[c.id] <= band]
                picked = {c.id: c for c in [*_spread(result.plan.candidates, max_cuts), *near]}
            chosen.append(result.plan.best.id)
            ids = list(dict.fromkeys([*picked, *chosen]))  # every round's choice is timed from then on
            times = time_cuts(model, loaded.onnx_path, loaded.inputs, [by_id[i] for i in ids],
                              edge_threads=edge_threads, cloud_threads=cloud_threads, repeats=repeats,
                              rounds=rounds, seed=5 + r)
            errors = []
            for cid in ids:
                pred, meas = sum(predicted_compute(by_id[cid])), sum(times[cid])
                predicted.setdefault(cid, []).append(pred)
                measured.setdefault(cid, []).append(meas)
                transfer[cid] = by_id[cid].transfer_ms  # modelled from bytes and the network: the same each round
                if meas > 0:
                    errors.append(abs(pred - meas) / meas)
            round_mapes.append(100 * float(np.mean(errors)))
        rows = []
        for cid in predicted:
            pred, meas = float(np.median(predicted[cid])), float(np.median(measured[cid]))
            rows.append((cid, pred, meas, meas + transfer[cid], len(measured[cid])))
        total = {cid: t for cid, _, _, t, _ in rows}
        best = min(total, key=total.get)
        regrets = [100 * (total[c] - total[best]) / total[best] for c in chosen]
        return {
            "model": name,
            "nodes": doc["model"]["nodes"],
            "cuts": len(rows),
            "mape": 100 * float(np.mean([abs(p - m) / m for _, p, m, _, _ in rows if m > 0])),
            "round_mapes": round_mapes,
            "regret": float(np.median(regrets)),
            "worst_regret": max(regrets),
            "chosen": chosen,
            "best": best,
            "rows": rows,
        }


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
    ap.add_argument("--plan-rounds", type=int, default=3,
                    help="profile-then-time rounds per model; predictions and measurements are medians over them")
    ap.add_argument("--verbose", action="store_true", help="also print each measured candidate")
    args = ap.parse_args(argv)
    if args.plan_rounds < 1:
        ap.error(f"--plan-rounds must be at least 1, got {args.plan_rounds}")
    print(f"edge: this host, {args.edge_threads} thread(s); cloud: this host, {args.cloud_threads} thread(s); "
          f"network {args.network} (modelled, not emulated); {args.repeats} runs per median; "
          f"{args.plan_rounds} profile-then-time rounds per model\n")
    print("| model | nodes | cuts measured | MAPE (compute) | MAPE per round | regret of chosen cut (median / worst) "
          "| chosen per round | best measured |")
    print("|---|---:|---:|---:|---|---:|---|---|")
    for name in args.models.split(","):
        r = measure_model(name.strip(), args.repeats, args.network, args.max_cuts, args.edge_threads, args.cloud_threads,
                          args.rounds, args.refine, args.plan_rounds)
        if args.verbose:
            for cid, pred, meas, _, n in r["rows"]:
                print(f"    {cid:>10}: predicted {pred:.3f} ms, measured {meas:.3f} ms "
                      f"({100 * (pred - meas) / meas:+.1f}%; medians of {n} round(s))", file=sys.stderr)
        per_round = " / ".join(f"{m:.1f}%" for m in r["round_mapes"])
        print(f"| {r['model']} | {r['nodes']} | {r['cuts']} | {r['mape']:.1f}% | {per_round} | {r['regret']:.1f}% / "
              f"{r['worst_regret']:.1f}% | {', '.join(r['chosen'])} | {r['best']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
