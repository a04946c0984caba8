"""`split-profile`: parse arguments, call `partitioning.profile`, print the plan."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.manifest import BASELINES, CODECS, OBJECTIVES, PlanDocument, rank_key, sha256_file
from models.ortopts import parse_provider_option, parse_providers, provider_options_from
from models.plandoc import CALIBRATION_CHOICES

if TYPE_CHECKING:
    from partitioning.options import ProfileOptions

EXIT_ERROR = 2
EXIT_INFEASIBLE = 3


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _count(text: str) -> int:
    value = _non_negative(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(value)


def _count_positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _codec(text: str) -> str:
    from models.plandoc import split_codec_spec

    if text.strip().lower() == "auto":
        return "auto"
    parts = split_codec_spec(text)
    if parts is None:
        raise argparse.ArgumentTypeError(f"expected auto or a codec like int8+zstd, got {text!r}")
    return parts[0] if parts[1] == "none" else "+".join(parts)


def _shape(text: str) -> tuple[Any, ...]:
    """`--input-shape`: a plain shape (a tuple of ints) or per-input hints (a tuple of InputHint)."""
    from models.loaders import ModelLoadError, parse_input_hints

    try:
        hints = parse_input_hints(text)
    except ModelLoadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if len(hints) == 1 and hints[0].name is None and hints[0].dtype is None and hints[0].shape is not None:
        return hints[0].shape
    return hints


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of split-profile."""
    from partitioning.options import ProfileOptions

    defaults = ProfileOptions()
    p = argparse.ArgumentParser(
        prog="split-profile",
        description="Find where to cut a DNN between an edge device and the cloud, and write a verified split bundle.",
    )
    p.add_argument("model", nargs="?",
                   help="model.pt (TorchScript), model.pt2 (torch.export), model.onnx, or a zoo name")
    p.add_argument("--list-devices", action="store_true",
                   help="print the named edge devices (what each estimate assumes: unit, runtime, providers) and exit")
    p.add_argument("--device", default="local",
                   help="edge device: 'local' (measured here), a name (jetson-nano, jetson-orin-nano, jetson-orin-nx, "
                        "jetson-agx-orin, rpi4, rpi5; aliases jetson, rpi), or a saved profile .json")
    p.add_argument("--cloud", default="local",
                   help="cloud side: 'local' (measured here) or a GPU class (t4, a10, l4, a100, h100, h200)")
    p.add_argument("--network", default=None, help="3g, 4g, 5g, wifi, ethernet (default wifi unless --uplink-mbps)")
    p.add_argument("--uplink-mbps", type=_positive)
    p.add_argument("--downlink-mbps", type=_positive)
    p.add_argument("--rtt-ms", type=_non_negative)
    p.add_argument("--max-latency-ms", type=_positive)
    p.add_argument("--edge-memory-mb", type=_positive, help="head weights plus peak activations")
    p.add_argument("--max-energy-mj", type=_positive, help="device power model plus radio energy per byte")
    p.add_argument("--objective", choices=OBJECTIVES, default="latency")
    p.add_argument("--codec", type=_codec, default="auto",
                   help="how cut activations travel: auto (default: each cut costed under fp32, fp16, int8 and int8c, "
                        "with and without lz4/zstd, and sent with the best that passes the accuracy gate) or one "
                        "codec for every cut, " + "|".join(CODECS) + "[+lz4|+zstd]")
    p.add_argument("--out", type=Path, help="write the bundle here (plan.json, head/int8 head/tail/full .onnx)")
    p.add_argument("--calibration", type=Path, help="folder of .npy (or .npz) inputs to calibrate the int8 heads")
    p.add_argument("--calibration-method", choices=CALIBRATION_CHOICES, default="auto",
                   help="how int8 activation ranges are chosen; auto (default) tries minmax, entropy, percentile in "
                        "turn and keeps the first whose head passes its gate, then keeps the most sensitive nodes "
                        "in float (mixed precision) if none does")
    _runtime_arguments(p)
    p.add_argument("--input-shape", type=_shape, metavar="SHAPE",
                   help="when the model file does not record it: 1x3x224x224; with a dtype 1x128:int64; several "
                        "inputs by name: input_ids=1x128:int64,attention_mask=1x128:int64 (a dtype the model "
                        "records wins; default float32)")
    p.add_argument("--int-high", type=_count_positive, metavar="N",
                   help="synthetic integer inputs (calibration, checks) are drawn from [0, N) where the graph does "
                        "not bound them (token ids feeding an embedding stay below its vocabulary; masks 0/1); "
                        "default 10")
    p.add_argument("--name", help="the bundle's model name (default: the file's stem; for a generic stem like "
                                  "model.pt, its folder's name and a short hash of the file)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a pickled nn.Module (unpickling runs code: only for files you trust)")
    p.add_argument("--save-device-profile", type=Path, help="with --device local: save the measurement as JSON")
    p.add_argument("--repeats", type=int, default=defaults.repeats, help="measured runs per node (median)")
    p.add_argument("--measure-seconds", type=_non_negative, default=defaults.measure_seconds, metavar="S",
                   help="each measurement here (a side's profile, each refinement timing) goes on in turns until "
                        f"it spans at least S seconds, so one busy moment of the host does not decide it "
                        f"(default {defaults.measure_seconds:g})")
    p.add_argument("--measure-budget", type=_non_negative, default=defaults.measure_budget, metavar="S",
                   help="a side's profile here whose --repeats runs would take longer than S seconds runs fewer "
                        f"(at least 5 after a warm-up): large models plan in less time; 0 always runs --repeats "
                        f"(default {defaults.measure_budget:g})")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads when measuring the edge here")
    p.add_argument("--cloud-threads", type=int,
                   help="with --cloud local: threads when measuring the cloud (default --threads)")
    p.add_argument("--providers", type=parse_providers, metavar="P1,P2",
                   help="with --device local: onnxruntime execution providers the edge is measured on, preferred "
                        "first (e.g. OpenVINOExecutionProvider,CPUExecutionProvider); recorded in the device profile "
                        "and plan.json (default: CUDA when onnxruntime has it, then CPU)")
    p.add_argument("--provider-option", action="append", type=parse_provider_option, default=[],
                   metavar="PROVIDER:KEY=VALUE", help="an option of one of --providers, repeatable")
    p.add_argument("--refine", type=_count, default=defaults.refine, metavar="K",
                   help="with --device local and --cloud local: time the K best cuts as real extracted head and "
                        "tail (fp32, --repeats runs each), and both baselines, then choose again with those times, "
                        "timing more while the choice moves to an untimed cut (at most 3K); 0 disables "
                        f"(default {defaults.refine})")
    p.add_argument("--top", type=int, default=5, help="candidates shown besides the baselines")
    p.add_argument("--json", action="store_true", help="print plan.json to stdout instead of the table")
    p.add_argument("--plot", type=Path, help="write a stacked-bar PNG of latency per candidate")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks, and the conversion's detail (e.g. the graph an exporter refused)")
    return p


def _runtime_arguments(p: argparse.ArgumentParser, default: str = "onnxruntime") -> None:
    """--edge-runtime and the converter's options (split-profile and split-profile convert)."""
    p.add_argument("--edge-runtime", choices=("onnxruntime", "litert"), default=default,
                   help="what the device runs heads on; litert: the bundle also gets head.tflite and "
                        "head.int8.tflite per cut (converted by onnx2tf in its own Python 3.12+ environment)")
    p.add_argument("--converter-python", metavar="PATH",
                   help="with --edge-runtime litert: a Python 3.12+ to make the converter environment with "
                        "(default: python3.12+ on PATH or under ~/.pyenv)")
    p.add_argument("--converter-env", type=Path, metavar="DIR",
                   help="with --edge-runtime litert: the converter environment (default "
                        "$SPLITINFER_LITERT_CONVERTER, else ~/.cache/splitinfer/litert-converter-*)")


def build_convert_parser() -> argparse.ArgumentParser:
    """The argument parser of `split-profile convert`."""
    p = argparse.ArgumentParser(
        prog="split-profile convert",
        description="Add heads for another edge runtime to an existing bundle (verified like its ONNX heads).")
    p.add_argument("bundle", type=Path, help="a bundle directory written by split-profile --out")
    _runtime_arguments(p, default="litert")  # the one runtime there is to convert to
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def convert_main(argv: Sequence[str]) -> int:
    """`split-profile convert BUNDLE --edge-runtime litert`: write and verify the bundle's TFLite heads."""
    args = build_convert_parser().parse_args(argv)
    if args.edge_runtime != "litert":
        print("split-profile convert: error: the bundle's heads are ONNX already; use --edge-runtime litert",
              file=sys.stderr)
        return EXIT_ERROR
    progress = _Progress(args.quiet)
    try:
        document = _add_litert_heads(args.bundle, args, progress)
    except Exception as exc:  # noqa: BLE001 - every error becomes one clear line and a non-zero exit
        if args.debug:
            raise
        print(f"split-profile convert: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    from partitioning.tflite import summary_lines

    print("\n".join(summary_lines(document)))
    print(f"TFLite heads written to {args.bundle}")
    return 0


def _add_litert_heads(bundle: Path, args: argparse.Namespace, progress: _Progress) -> dict[str, Any]:
    from partitioning.tflite import add_tflite_heads, ensure_converter

    env = ensure_converter(args.converter_env, args.converter_python, progress=progress)
    return add_tflite_heads(bundle, env.convert, progress=progress)


class _Progress:
    """Progress lines on stderr with elapsed time; run counters overwrite themselves on a terminal."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        line = f"[{time.monotonic() - self.start:6.1f}s] {msg}"
        if msg.startswith("  run "):
            if self.tty:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            return
        if self.tty:
            print("\r\033[K", end="", file=sys.stderr)
        print(line, file=sys.stderr, flush=True)


def _fmt_cut(cut: Sequence[str], width: int = 34) -> str:
    text = ",".join(cut)
    return text if len(text) <= width else text[: width - 1] + "…"


def _as_document(doc: PlanDocument | Mapping[str, Any]) -> PlanDocument:
    return doc if isinstance(doc, PlanDocument) else PlanDocument.from_json(dict(doc))


def format_table(doc: PlanDocument | Mapping[str, Any], top: int = 5) -> str:
    """The best candidates and both baselines with their latency breakdown."""
    doc = _as_document(doc)
    shown = {c.id: c for c in doc.ranked() if c.feasible}
    shown = {cid: shown[cid] for cid in list(shown)[:top]}
    shown.update((c.id, c) for c in doc.candidates if c.id in (*BASELINES, doc.chosen))
    rows = sorted(shown.values(), key=lambda c: rank_key(c, doc.budgets.objective))
    timed = any(c.measured for c in rows)  # a column only when --refine timed some of these rows
    head = (f"{'':1} {'cut':<11} {'tensors':<34} {'edge ms':>8} {'xfer KB':>8} {'xfer ms':>8} {'cloud ms':>8} "
            f"{'total ms':>9} {'mem MB':>7} {'mJ':>7}  {'codec':<10} {'codec ms':>8}  ok")  # codec ms: enc + dec
    head += "   timed" if timed else ""
    lines = [head, "-" * len(head)]
    for c in rows:
        mark = "*" if c.id == doc.chosen else " "
        lines.append(
            f"{mark} {c.id:<11} {_fmt_cut(c.cut):<34} {c.edge_ms:8.2f} {c.transfer_bytes / 1024:8.1f} "
            f"{c.transfer_ms:8.2f} {c.cloud_ms:8.2f} {c.total_ms:9.2f} {c.edge_memory_bytes / 2**20:7.2f} "
            f"{c.energy_mj:7.1f}  {c.codec or '-':<10} {c.encode_ms + c.decode_ms:8.2f}  "
            f"{'yes' if c.feasible else 'NO':<3}"
            + (f"  {'yes' if c.measured else '':>5}" if timed else "")
        )
    lines = [line.rstrip() for line in lines]
    return "\n".join(lines)


def _refine_note(doc: PlanDocument | Mapping[str, Any]) -> str:
    """Which rows' edge and cloud ms were timed as a real head and tail, and which are the per-node model."""
    doc = _as_document(doc)
    refined = doc.refined
    if refined is None or not refined.candidates:
        reason = refined.reason if refined is not None else None
        return f"compute: per-node model for every cut (not timed: {reason})" if reason else ""
    text = (f"compute: timed as extracted fp32 head + tail for {', '.join(refined.candidates)} (timed = yes, median "
            f"of at least {refined.runs} runs); per-node model for the other cuts")
    tie = refined.tie_break
    if tie:
        text += (f"; {' and '.join(tie.candidates)} were timed again head to head ({tie.reason or 'close'}; at least "
                 f"{tie.runs} runs each)")
    for earlier in refined.earlier_tie_breaks:
        text += (f"; before that, {' and '.join(earlier.candidates)} were timed head to head and handed the choice "
                 f"to a cut not yet timed, which was timed next")
    if not refined.chosen_timed:
        text += f"; the chosen cut {doc.chosen} was not timed"
    return text


def _summary(doc: PlanDocument, bundle: Path | None) -> str:
    net, model = doc.network, doc.model
    out = [
        f"model    {model.name} ({model.format}, {model.nodes} nodes)",
        f"device   {doc.device.name}: {doc.device.kind} — {doc.device.source}",
        f"cloud    {doc.cloud.name}: {doc.cloud.kind} — {doc.cloud.source}",
        f"network  {net.name}: up {net.uplink_mbps:g} Mbps, down {net.downlink_mbps:g} Mbps, rtt {net.rtt_ms:g} ms",
        f"objective {doc.budgets.objective}; {len(doc.candidates)} candidate cuts; codec {doc.codec} "
        "(the chosen cut's; each cut's in the table)",
        "",
        format_table(doc),
        "",
        f"chosen: {doc.chosen}  (* above)",
        *filter(None, [_refine_note(doc)]),
        "plan table (uplink Mbps -> cut [codec]): " + ", ".join(
            f"{r.uplink_mbps:g}->{r.cut}" + (f" [{r.codec}]" if r.codec else "") for r in doc.plan_table),
    ]
    ver = doc.verification
    if ver:
        for cid, v in ver.cuts.items():
            split, q = v.split, v.int8
            verdict = "pass" if q and q["passed"] else "FAIL"
            qtext = f"int8 {q['metric']} {q['value']:.3f} ({verdict} at {q['threshold']})" if q else ""
            if v.precision in ("mixed", "fp32"):
                qtext += f"; runs {v.precision} ({len(v.float_nodes)} float nodes)"
            out.append(f"verified {cid:<11} split max|err| {split['max_abs_error']:.2e} {qtext}")
        if any(v.litert for v in ver.cuts.values()):
            from partitioning.tflite import summary_lines

            out.extend(summary_lines(doc.to_json()))
    out.append(f"bundle written to {bundle}" if bundle else "no --out given: plan only, no bundle written")
    return "\n".join(out)


def plot_candidates(doc: PlanDocument, path: Path) -> None:
    """A stacked bar (edge / transfer / cloud ms) per candidate, in topological order of the cut."""
    from models.extras import require

    require("matplotlib", "profile")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = sorted(doc.candidates, key=lambda c: c.edge_nodes)
    ids = [c.id for c in cands]
    edge = [c.edge_ms for c in cands]
    xfer = [c.transfer_ms for c in cands]
    cloud = [c.cloud_ms for c in cands]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(ids) + 2), 4.5))
    x = range(len(ids))
    ax.bar(x, edge, label="edge", color="#4C72B0")
    ax.bar(x, xfer, bottom=edge, label="transfer", color="#DD8452")
    ax.bar(x, cloud, bottom=[e + t for e, t in zip(edge, xfer)], label="cloud", color="#55A868")
    chosen = ids.index(doc.chosen)
    ax.annotate("chosen", (chosen, cands[chosen].total_ms), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(ids, rotation=90, fontsize=6)
    ax.set_ylabel("latency per request (ms)")
    ax.set_title(f"{doc.model.name} on {doc.device.name} over {doc.network.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _measure_only(args: argparse.Namespace, progress: _Progress) -> int:
    """`--device local --save-device-profile` on an ONNX file with only the [edge] extra (no onnx, no torch)."""
    from partitioning.costs import host_facts, measure_node_costs
    from partitioning.device_profile import save_device_profile

    path = Path(args.model)
    if not path.is_file():
        print(f"split-profile: error: {path}: no such file", file=sys.stderr)
        return EXIT_ERROR
    progress(f"measuring per-node latency of {path} ({args.repeats} runs after warm-up, over at least "
             f"{args.measure_seconds:g} s)")
    costs = measure_node_costs(path, repeats=args.repeats, threads=args.threads, min_seconds=args.measure_seconds,
                               progress=lambda d, t: progress(f"  run {d}/{t}"), providers=args.providers,
                               provider_options=provider_options_from(args.provider_option))
    sha = sha256_file(path)
    save_device_profile(args.save_device_profile, costs, model_sha256=sha,
                        host=host_facts(args.threads, args.providers))
    print(f"measured {len(costs.per_node_ms)} nodes, {costs.total_ms():.2f} ms per run; "
          f"saved the device profile to {args.save_device_profile}")
    print("onnx is not installed here, so no plan or bundle was made: use the profile elsewhere with --device FILE")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of split-profile; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        return convert_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_devices:
        from partitioning.devices import device_table

        print(device_table())
        return 0
    if args.model is None:
        parser.error("the model is required (or --list-devices)")
    progress = _Progress(args.quiet or args.json)
    with _runtime_logs(args.quiet or args.json, args.debug):
        return _run(args, progress)


def _run(args: argparse.Namespace, progress: _Progress) -> int:
    from models.extras import MissingExtraError, require

    try:
        require("onnx", "profile")
    except MissingExtraError:
        if args.device == "local" and args.save_device_profile and str(args.model).endswith(".onnx"):
            return _measure_only(args, progress)
        raise SystemExit(f"split-profile: error: {sys.exc_info()[1]}") from None
    from partitioning.api import NoFeasiblePlanError, profile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # profile() returns its warnings; they are printed once below
            result = profile(args.model, options_from_args(args), progress=progress)
        for note in result.warnings:
            print(f"split-profile: warning: {note}", file=sys.stderr)
    except NoFeasiblePlanError as exc:
        print(format_table(exc.result.plan_document), file=sys.stderr)
        print(f"split-profile: error: {exc}", file=sys.stderr)
        return EXIT_INFEASIBLE
    except Exception as exc:  # noqa: BLE001 - every error becomes one clear line and a non-zero exit
        if args.debug:
            raise
        known = _is_user_error(exc)
        prefix = "error" if known else f"internal error ({type(exc).__name__}; --debug shows the traceback)"
        print(f"split-profile: {prefix}: {exc}", file=sys.stderr)
        return EXIT_ERROR if known else 1
    if args.plot:
        plot_candidates(result.plan_document, args.plot)
        progress(f"wrote {args.plot}")
    if args.json:
        print(json.dumps(result.document, indent=2))
    else:
        print(_summary(result.plan_document, result.bundle_dir))
    return 0


@contextlib.contextmanager
def _runtime_logs(quiet: bool, debug: bool) -> Iterator[None]:
    """With -q, onnxruntime's own log lines (its default logger's warnings and errors) stay off stderr; with
    --debug, the conversion's debug log (what the exporters printed natively, each step's detail) goes there
    while the command runs."""
    if quiet:
        try:
            import onnxruntime

            onnxruntime.set_default_logger_severity(4)
        except ImportError:  # pragma: no cover - the [edge] extra has it
            pass
    if not debug:
        yield
        return
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("models.convert", "models.loaders")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def options_from_args(args: argparse.Namespace) -> ProfileOptions:
    """The ProfileOptions that split-profile's arguments say."""
    from partitioning.options import ProfileOptions

    return ProfileOptions(
        device=args.device, cloud=args.cloud, network=args.network or (None if args.uplink_mbps else "wifi"),
        uplink_mbps=args.uplink_mbps, downlink_mbps=args.downlink_mbps, rtt_ms=args.rtt_ms,
        max_latency_ms=args.max_latency_ms, edge_memory_mb=args.edge_memory_mb, max_energy_mj=args.max_energy_mj,
        objective=args.objective, codec=args.codec, out=args.out, calibration=args.calibration,
        calibration_method=args.calibration_method,
        input_shape=args.input_shape if _plain(args.input_shape) else None,
        input_hints=() if _plain(args.input_shape) else tuple(args.input_shape), int_high=args.int_high,
        name=args.name, allow_pickle=args.allow_pickle, save_device_profile=args.save_device_profile,
        repeats=args.repeats, measure_seconds=args.measure_seconds, measure_budget=args.measure_budget,
        threads=args.threads, cloud_threads=args.cloud_threads, refine=args.refine, providers=args.providers,
        provider_options=provider_options_from(args.provider_option), edge_runtime=args.edge_runtime,
        converter_python=args.converter_python, converter_env=args.converter_env,
    )


def _plain(shape: Any) -> bool:
    return shape is None or all(isinstance(d, int) for d in shape)


def _is_user_error(exc: BaseException) -> bool:
    """Errors that are about the user's input (a clear message suffices) rather than a bug of ours."""
    from models.extras import MissingExtraError
    from models.manifest import BundleError
    from models.ortopts import ProviderError
    from partitioning.extract import SplitMismatchError
    from partitioning.quantize import CalibrationError
    from partitioning.tflite import ConverterUnavailableError, TFLiteConversionError

    try:
        from models.loaders import ModelLoadError
    except ImportError:  # pragma: no cover
        ModelLoadError = ValueError  # type: ignore[misc,assignment]
    return isinstance(exc, (ModelLoadError, BundleError, CalibrationError, SplitMismatchError, MissingExtraError,
                            ValueError, OSError, KeyError, ConverterUnavailableError, TFLiteConversionError,
                            ProviderError))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
