"""Activation codecs side by side: bytes on the wire, output error, and encode + decode time.

For each model, the cut tensors of its middle cut (the head the agent runs: int8 when it passed its gate)
on N seeded random inputs go through every codec (fp32, fp16, int8, int8c, each raw, +lz4, +zstd), then the
fp32 tail. Compared with the tail on the uncoded tensors: max abs error of the outputs, relative error (max
abs / max |reference|), and top-1 agreement for classifiers. Times are medians of `--repeats` runs per input.
`4G ms` is the upload time of those bytes at 5.85 Mbit/s, for scale. Inputs are random normal, not real
images: int8 error on real data differs (usually smaller, activations of real images are less spread).

Predicted vs measured: `pred enc` / `pred dec` are what the planner charges for this cut's tensors
(partitioning.codecs: every codec timed on each of the full model's activations for the first input, the
figures split-profile uses for `--device local`); `enc err` / `dec err` are (predicted - measured) /
measured against the medians above. Noise floor: the same medians taken over the odd and over the even runs
of the same loop (two timings of the same thing in one run); the footer gives its median over codecs.

    python -m benchmarks.codecs [--models tiny,mobilenet_v2,resnet18] [--samples 8] [--repeats 5] [--bundles DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import bundles_dir, host_line, make_bundle, median, mid_cut, table
from edge_agent.runtime import CutRuntime, OrtRunner, RunnerCache, RuntimeOptions
from models.manifest import CLOUD_ONLY, Bundle
from protos import codec

FOUR_G_MBPS = 5.85


def _timed(fn, repeats: int) -> tuple[object, list[float]]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return out, times


def planner_rates(bundle: Bundle, feeds: dict[str, np.ndarray]):
    """The codec rates split-profile would measure on this model (every tensor of the full model, one input)."""
    import onnx

    from partitioning.codecs import measure_codecs
    from partitioning.graph import activations

    model = onnx.load(str(bundle.full))
    names = [o for n in model.graph.node for o in n.output if o]
    arrays = activations(model, names, feeds=feeds)
    return measure_codecs({k: v for k, v in arrays.items() if v.size}, codec.VALID_SPECS)


def _error(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.0f}%" if measured > 0 else "n/a"


def measure_model(bundle_path: Path, samples: int, repeats: int) -> tuple[str, list[list], list[float]]:
    """One row per codec for one model."""
    bundle = Bundle.load(bundle_path)
    try:
        cut = mid_cut(bundle)
    except ValueError:
        cut = CLOUD_ONLY  # no middle cut: what cloud-only sends, the inputs
    opts = RuntimeOptions(1, 1)
    rt = CutRuntime(bundle, cut, "int8", RunnerCache(opts))
    tail = OrtRunner(bundle.cut(cut).tail, opts)
    spec = bundle.inputs[0]
    rng = np.random.default_rng(0)
    inputs = [{spec.name: rng.standard_normal(spec.concrete_shape(1)).astype(np.float32)} for _ in range(samples)]
    acts = [rt.run_head(x) for x in inputs]
    rates = planner_rates(bundle, inputs[0])
    noise: list[float] = []
    refs = [next(iter(tail.run(a).values())) for a in acts]
    classifier = refs[0].ndim == 2 and refs[0].shape[1] > 1
    rows = []
    fp32_bytes = None
    for spec_name in codec.VALID_SPECS:
        enc_t, dec_t, sizes, errs, agree = [], [], [], [], []
        scale = max(float(np.abs(r).max()) for r in refs)
        for act, ref in zip(acts, refs, strict=True):
            tensors, t = _timed(lambda a=act, c=spec_name: codec.encode_all(a, c), repeats)
            enc_t += t
            feeds, t = _timed(lambda enc=tensors: codec.decode_all(enc), repeats)
            dec_t += t
            sizes.append(codec.wire_bytes(tensors))
            out = next(iter(tail.run(feeds).values()))
            errs.append(float(np.abs(out - ref).max()))
            if classifier:
                agree.append(float(np.mean(out.argmax(1) == ref.argmax(1))))
        size = median(sizes)
        fp32_bytes = fp32_bytes or size
        enc, dec = median(enc_t), median(dec_t)
        timed_enc, timed_dec = rates.tensor_encode.get(spec_name, {}), rates.tensor_decode.get(spec_name, {})
        pred_enc = sum(timed_enc.get(k, rates.encode[spec_name].ms(a.nbytes)) for k, a in acts[0].items())
        pred_dec = sum(timed_dec.get(k, rates.decode[spec_name].ms(a.nbytes)) for k, a in acts[0].items())
        noise += [abs(median(t[0::2]) - median(t[1::2])) / median(t) for t in (enc_t, dec_t) if median(t) > 0]
        rows.append([bundle.model_name, cut, spec_name, int(size), fp32_bytes / size, size * 8 / (FOUR_G_MBPS * 1e3),
                     enc, dec, pred_enc, pred_dec, _error(pred_enc, enc), _error(pred_dec, dec),
                     max(errs), max(errs) / scale if scale else float("nan"),
                     f"{100 * np.mean(agree):.1f}%" if classifier else "n/a"])
    return cut, rows, noise


def main(argv: list[str] | None = None) -> int:
    """Run the codec benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,mobilenet_v2,resnet18", help="comma-separated: tiny or zoo names")
    ap.add_argument("--samples", type=int, default=8, help="inputs per model")
    ap.add_argument("--repeats", type=int, default=5, help="timed encodes/decodes per input and codec")
    ap.add_argument("--bundles", help="directory to build bundles in and reuse (default: a temp dir)")
    args = ap.parse_args(argv)
    rows, noise = [], []
    with tempfile.TemporaryDirectory(prefix="splitinfer-codecs-") as tmp:
        root = bundles_dir(args.bundles, tmp)
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            _, model_rows, model_noise = measure_model(make_bundle(model, root), args.samples, args.repeats)
            rows += model_rows
            noise += model_noise
            print(f"# {model} done", file=sys.stderr, flush=True)
    print(f"codecs.py: {args.samples} inputs x {args.repeats} repeats per codec; {host_line()}\n")
    print(table(["model", "cut", "codec", "wire B", "x smaller", "4G ms", "encode ms", "decode ms",
                 "pred enc", "pred dec", "enc err", "dec err", "max abs err", "rel err", "top-1 agree"], rows))
    print(f"\nnoise floor (odd vs even runs of the same loop, |difference| / median): median "
          f"{100 * median(noise):.0f}%, max {100 * max(noise):.0f}% over {len(noise)} timings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
