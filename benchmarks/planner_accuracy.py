"""How well the planner's cost model predicts real head+tail latency, measured on this host.

For each zoo model with --device local and --cloud local: profile per node, plan, then for a spread of
candidate cuts extract the head and tail and time them (fp32, median of N runs each, side by side in one
process). The edge is this host at --edge-threads and the cloud this host at --cloud-threads (default 1 and 2),
so that the cloud is faster and cuts other than edge-only can win. Reports, per model:

- MAPE: mean absolute percentage error of the predicted compute (edge_ms + cloud_ms) against the measured
  head_ms + tail_ms over the candidates;
- regret: how much slower the chosen cut is than the best cut by measurement, where each cut's total is its
  measured head + tail plus the same modelled transfer at the plan's network (the link is not emulated here).

The plan is made as split-profile makes it, so its few best cuts are timed before choosing (--refine, default
3; partitioning/refine.py): regret judges that refined choice. MAPE stays a test of the cost model alone: a
refined candidate is compared by its recorded per-node prediction, and every measurement here is the
benchmark's own, taken after the plan is made (the same timing code, not the plan's timings).

    python benchmarks/planner_accuracy.py [--models resnet18,...] [--repeats 30] [--network ethernet] [--refine 3]
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

DEFAULT_MODELS = ("tiny_cnn", "mobilenet_v2", "resnet18", "vgg11", "vit_tiny", "unet_small")


def predicted_compute(cand: Candidate) -> tuple[float, float]:
    """The cost model's (edge_ms, cloud_ms) for a candidate, also when the plan replaced them by timings."""
    if cand.measured:
        return cand.predicted_edge_ms or 0.0, cand.predicted_cloud_ms or 0.0
    return cand.edge_ms, cand.cloud_ms


def measure_model(name: str, repeats: int, network: str, max_cuts: int, edge_threads: int, cloud_threads: int,
                  rounds: int = 5, refine: int = 3) -> dict:
    """Plan one model and measure a spread of its candidates (interleaved, see partitioning/refine.py)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        result = profile(name, device="local", cloud="local", network=network, repeats=repeats,
                         threads=edge_threads, cloud_threads=cloud_threads, refine=refine)
        doc = result.document
        # the plan itself wrote no bundle; convert again for extraction (same deterministic weights)
        from models.loaders import load_model

        loaded = load_model(name, Path(tmp))
        model = onnx.load(str(loaded.onnx_path))
        cands = sorted(result.plan.candidates, key=lambda c: len(c.edge_nodes))
        step = max(1, len(cands) // max_cuts)
        chosen = result.plan.best
        picked = {c.id: c for c in cands[::step]}
        picked[chosen.id] = chosen
        times = time_cuts(model, loaded.onnx_path, loaded.inputs, list(picked.values()), edge_threads=edge_threads,
                          cloud_threads=cloud_threads, repeats=repeats, rounds=rounds, seed=5)
        rows = []
        for cand in picked.values():
            predicted = sum(predicted_compute(cand))
            measured = sum(times[cand.id])
            rows.append((cand, predicted, measured, measured + cand.transfer_ms))
        errors = [abs(p - m) / m for _, p, m, _ in rows if m > 0]
        best_measured = min(total for *_, total in rows)
        chosen_total = next(total for c, *_, total in rows if c.id == chosen.id)
        return {
            "model": name,
            "nodes": doc["model"]["nodes"],
            "cuts": len(rows),
            "mape": 100 * float(np.mean(errors)),
            "regret": 100 * (chosen_total - best_measured) / best_measured,
            "chosen": chosen.id,
            "best": min(rows, key=lambda r: r[3])[0].id,
            "refined": doc["refined"]["candidates"],
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
    ap.add_argument("--verbose", action="store_true", help="also print each measured candidate")
    args = ap.parse_args(argv)
    print(f"edge: this host, {args.edge_threads} thread(s); cloud: this host, {args.cloud_threads} thread(s); "
          f"network {args.network} (modelled, not emulated); {args.repeats} runs per median\n")
    print(f"| model | nodes | cuts measured | MAPE (compute) | regret of chosen cut | chosen | best measured |")
    print("|---|---:|---:|---:|---:|---|---|")
    for name in args.models.split(","):
        r = measure_model(name.strip(), args.repeats, args.network, args.max_cuts, args.edge_threads, args.cloud_threads,
                          args.rounds, args.refine)
        if args.verbose:
            print(f"    timed by the plan before choosing: {', '.join(r['refined']) or 'none'}", file=sys.stderr)
            for cand, predicted, measured, _ in r["rows"]:
                edge_ms, cloud_ms = predicted_compute(cand)
                print(f"    {cand.id:>10}: predicted {edge_ms:.3f} + {cloud_ms:.3f} ms, measured "
                      f"{measured:.3f} ms ({100 * (predicted - measured) / measured:+.1f}%)", file=sys.stderr)
        print(f"| {r['model']} | {r['nodes']} | {r['cuts']} | {r['mape']:.1f}% | {r['regret']:.1f}% | {r['chosen']} | {r['best']} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
