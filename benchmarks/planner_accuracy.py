"""How well the planner's cost model predicts real head+tail latency, measured on this host.

For each zoo model with --device local and --cloud local: profile per node, plan, then for a spread of
candidate cuts extract the head and tail and time them (fp32, median of N runs each, side by side in one
process). The edge is this host at --edge-threads and the cloud this host at --cloud-threads (default 1 and 2),
so that the cloud is faster and cuts other than edge-only can win. Reports, per model:

- MAPE: mean absolute percentage error of the predicted compute (edge_ms + cloud_ms) against the measured
  head_ms + tail_ms over the candidates;
- regret: how much slower the chosen cut is than the best cut by measurement, where each cut's total is its
  measured head + tail plus the same modelled transfer at the plan's network (the link is not emulated here).

    python benchmarks/planner_accuracy.py [--models resnet18,...] [--repeats 30] [--network ethernet]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partitioning import profile  # noqa: E402
from partitioning.extract import extract_split, session  # noqa: E402
from partitioning.quantize import synthetic_samples  # noqa: E402

DEFAULT_MODELS = ("tiny_cnn", "mobilenet_v2", "resnet18", "vgg11", "vit_tiny", "unet_small")


def _timed(sess, feeds, runs: int) -> list[float]:
    names = [o.name for o in sess.get_outputs()]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(names, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_model(name: str, repeats: int, network: str, max_cuts: int, edge_threads: int, cloud_threads: int,
                  rounds: int = 5) -> dict:
    """Plan one model and measure a spread of its candidates; returns the row of the report.

    Every candidate's head and tail sessions are built first; then `rounds` rounds each time every candidate
    (in a fresh random order) for repeats/rounds runs, and each part's time is the median over all its runs.
    A stretch of background load on the host thus slows all candidates a little instead of a few a lot.
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        result = profile(name, device="local", cloud="local", network=network, repeats=repeats,
                         threads=edge_threads, cloud_threads=cloud_threads)
        doc = result.document
        # the plan itself wrote no bundle; convert again for extraction (same deterministic weights)
        from models.loaders import load_model

        loaded = load_model(name, Path(tmp))
        model = onnx.load(str(loaded.onnx_path))
        feeds = synthetic_samples(loaded.inputs, 1, seed=5)[0]
        cands = sorted(result.plan.candidates, key=lambda c: len(c.edge_nodes))
        step = max(1, len(cands) // max_cuts)
        chosen = result.plan.best
        picked = {c.id: c for c in cands[::step]}
        picked[chosen.id] = chosen
        parts: dict[str, list] = {}  # candidate id -> [(session, feeds) of the head or None, same of the tail]
        for cand in picked.values():
            if cand.id == "edge-only":
                parts[cand.id] = [(session(loaded.onnx_path, edge_threads), feeds), None]
            elif cand.id == "cloud-only":
                parts[cand.id] = [None, (session(loaded.onnx_path, cloud_threads), feeds)]
            else:
                h, t = extract_split(model, cand.cut, Path(tmp) / f"{cand.id}.h.onnx", Path(tmp) / f"{cand.id}.t.onnx")
                hs, ts = session(h, edge_threads), session(t, cloud_threads)
                mid = dict(zip([o.name for o in hs.get_outputs()], hs.run(None, feeds)))
                parts[cand.id] = [(hs, feeds), (ts, {i.name: mid[i.name] for i in ts.get_inputs()})]
        for pair in parts.values():  # warm-up
            for part in filter(None, pair):
                _timed(*part, 3)
        samples: dict[str, list[list[float]]] = {cid: [[], []] for cid in parts}
        rng = random.Random(0)
        per_round = max(3, -(-repeats // rounds))
        for _ in range(rounds):
            order = list(parts)
            rng.shuffle(order)
            for cid in order:
                for side, part in enumerate(parts[cid]):
                    if part is not None:
                        samples[cid][side].extend(_timed(*part, per_round))
        rows = []
        for cand in picked.values():
            head_ms, tail_ms = (statistics.median(s) if s else 0.0 for s in samples[cand.id])
            predicted = cand.edge_ms + cand.cloud_ms
            measured = head_ms + tail_ms
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
    ap.add_argument("--verbose", action="store_true", help="also print each measured candidate")
    args = ap.parse_args(argv)
    print(f"edge: this host, {args.edge_threads} thread(s); cloud: this host, {args.cloud_threads} thread(s); "
          f"network {args.network} (modelled, not emulated); {args.repeats} runs per median\n")
    print(f"| model | nodes | cuts measured | MAPE (compute) | regret of chosen cut | chosen | best measured |")
    print("|---|---:|---:|---:|---:|---|---|")
    for name in args.models.split(","):
        r = measure_model(name.strip(), args.repeats, args.network, args.max_cuts, args.edge_threads, args.cloud_threads,
                          args.rounds)
        if args.verbose:
            for cand, predicted, measured, _ in r["rows"]:
                print(f"    {cand.id:>10}: predicted {cand.edge_ms:.3f} + {cand.cloud_ms:.3f} ms, measured "
                      f"{measured:.3f} ms ({100 * (predicted - measured) / measured:+.1f}%)", file=sys.stderr)
        print(f"| {r['model']} | {r['nodes']} | {r['cuts']} | {r['mape']:.1f}% | {r['regret']:.1f}% | {r['chosen']} | {r['best']} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
