"""`split-agent`: the edge agent. `serve` is the device service; `run` is a load driver; `infer` and `install`.

    split-agent serve [--config /etc/splitinfer/agent.toml]   # the service: local inference API, systemd notify
    split-agent infer input.npy [--json] [--socket PATH | --address HOST:PORT] [--out out.npz]
    split-agent install --config agent.toml [--bundle DIR] [--user splitinfer] [--print] [--root DIR]
    split-agent run --config agent.toml [--cloud HOST:PORT --rate 20 --count 500 ...]
    split-agent run --bundle bundles/tiny --cloud cloud:50051 --tls-ca ca.pem --tls-cert device.pem --tls-key device.key
    split-agent run --bundle bundles/tiny --cloud 127.0.0.1:50051 --insecure     # plaintext, loopback only
    split-agent run --config agent.toml --mqtt 127.0.0.1:1883 --label "kitchen" --adaptive
    split-agent keys                       # every config key with its description

`run` feeds .npy or synthetic inputs through an agent, prints a latency summary and exits (a load driver, not a
service). Exit status of `run`: 0 when every request got a result (also after SIGTERM: the feed stops, what was
sent finishes, the summary prints), 1 when some failed on the device, 130 after Ctrl-C, 2 on a bad config,
bundle, input folder or address (one line on stderr naming it). `serve`: 0 after a clean drain, 1 when the drain
timed out, 2 on a bad config or bundle or when it cannot listen. `infer`: 0, 1 when the service refused or
failed the request (its status named), 2 on a bad input file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import (
    DEFAULT_CONFIG,
    DEFAULT_SOCKET,
    HEAD_PRECISIONS,
    AgentConfig,
    ConfigError,
    describe,
    merge_overrides,
)
from edge_agent.results import CLOUD, EDGE, AgentError, InferenceResult
from edge_agent.runtime import InputError, ModelLoadError
from models.extras import MissingExtraError
from models.manifest import Bundle, BundleError, TensorSpec
from protos.codec import SPEC_SYNTAX

STAGES = ("total_ms", "queue_ms", "head_ms", "encode_ms", "network_ms", "cloud_queue_ms", "tail_ms")
SYNTHETIC_VARIANTS = 8  # distinct synthetic inputs, cycled: generating one per request would dominate

# flag -> config key; None values (flag not given) leave the config file's value.
OVERRIDES = {
    "bundle": "bundle", "cloud": "cloud", "device_id": "device_id", "cut": "cut",
    "head_precision": "head_precision", "codec": "codec", "deadline_ms": "deadline_ms",
    "max_in_flight": "max_in_flight", "input": "input.source", "rate": "input.rate", "count": "input.count",
    "seed": "input.seed", "mqtt": "mqtt.broker", "label": "mqtt.label", "adaptive": "adaptive.enabled",
    "tls_ca": "tls.ca", "tls_cert": "tls.cert", "tls_key": "tls.key", "tls_server_name": "tls.server_name",
    "insecure": "insecure", "i_know_insecure": "i_know_insecure",
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of split-agent."""
    parser = argparse.ArgumentParser(prog="split-agent", description="Edge agent of splitinfer.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="the device service: serve the local inference API until SIGTERM",
                           description="Run the agent as a service: connect to the cloud and the control plane, serve "
                                       "the local inference API (Unix socket, or loopback TCP with --listen), notify "
                                       "systemd. SIGTERM/SIGINT drain and exit 0; SIGHUP reloads certificates and "
                                       "the run-time keys (cut, service.log_level, service.max_requests, "
                                       "service.request_timeout_s, service.max_message_mb, service.drain_timeout_s).")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"agent TOML file (default {DEFAULT_CONFIG}; `split-cloud enroll` writes one)")
    serve.add_argument("--socket", help="Unix socket of the local API ([service] socket)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="serve on loopback TCP instead ([service] listen)")
    serve.add_argument("--allow-remote", action="store_true", default=None,
                       help="allow a --listen address that is not loopback (plaintext, unauthenticated)")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="([service] log_level, default INFO)")
    infer = sub.add_parser("infer", help="send one .npy input to `split-agent serve` and print the result")
    infer.add_argument("input", type=Path, help=".npy file of a one-input model, with the batch axis: [N, ...] as "
                                                "the bundle's input (np.save('x.npy', frame[None]) for one sample)")
    where = infer.add_mutually_exclusive_group()
    where.add_argument("--socket", help=f"the service's Unix socket (default {DEFAULT_SOCKET})")
    where.add_argument("--address", metavar="HOST:PORT", help="the service's loopback TCP address")
    infer.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    infer.add_argument("--json", action="store_true", help="print the result summary as JSON")
    infer.add_argument("--out", type=Path, help="also save the outputs to this .npz file")
    inst = sub.add_parser("install", help="install `split-agent serve` as a systemd service (unit, config, "
                                          "certificates, bundle)")
    inst.add_argument("--config", type=Path, required=True, help="the agent TOML to install")
    inst.add_argument("--bundle", type=Path, help="bundle folder to install (default: the config's bundle)")
    inst.add_argument("--user", default="splitinfer", help="service user, created if missing (default splitinfer)")
    inst.add_argument("--prefix", type=Path, default=Path("/etc/splitinfer"),
                      help="where config, certificates and bundle go (default /etc/splitinfer)")
    inst.add_argument("--print", action="store_true", dest="print_only", help="only print the unit")
    inst.add_argument("--root", type=Path, help="install into this staging root (no useradd, no chown)")
    run = sub.add_parser("run", help="load driver: feed inputs through the agent, print a latency summary, exit "
                                     "(the service is `serve`)",
                         description="A load driver, not a service: feeds synthetic or .npy inputs through an agent "
                                     "and prints a latency summary. SIGTERM and Ctrl-C stop the feed; what was sent "
                                     "finishes and is summarized. The device service is `split-agent serve`.")
    run.add_argument("--config", type=Path, help="agent TOML file (flags below override its keys)")
    run.add_argument("--bundle", help="split bundle directory")
    run.add_argument("--cloud", help='cloud tier address "host:port"')
    run.add_argument("--device-id")
    run.add_argument("--cut", help="cut id (default: the bundle's chosen cut)")
    run.add_argument("--head-precision", choices=list(HEAD_PRECISIONS))
    run.add_argument("--codec", help=f"activation codec: auto (default: the plan's) or {SPEC_SYNTAX} (overrides it)")
    run.add_argument("--deadline-ms", type=int)
    run.add_argument("--max-in-flight", type=int)
    run.add_argument("--input", help='"synthetic" or a folder of .npy files')
    run.add_argument("--rate", type=float, help="requests per second (0: as fast as max_in_flight allows)")
    run.add_argument("--count", type=int, help="number of requests")
    run.add_argument("--seed", type=int, help="seed of the synthetic inputs")
    run.add_argument("--mqtt", metavar="HOST:PORT", help="MQTT broker of the fleet control plane ([mqtt] broker)")
    run.add_argument("--label", help="free-text display name on the dashboard ([mqtt] label)")
    run.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                     help="switch cuts by the measured uplink ([adaptive] enabled)")
    tls = run.add_argument_group("transport security (mTLS by default: [tls] or these flags, or --insecure)")
    tls.add_argument("--tls-ca", metavar="PEM", help="the deployment's CA certificate ([tls] ca)")
    tls.add_argument("--tls-cert", metavar="PEM", help="this device's certificate ([tls] cert)")
    tls.add_argument("--tls-key", metavar="PEM", help="this device's private key ([tls] key)")
    tls.add_argument("--tls-server-name", metavar="NAME",
                     help="name checked in the cloud's certificate ([tls] server_name; default: the host of --cloud)")
    tls.add_argument("--insecure", action="store_true", default=None,
                     help="plaintext to the cloud, unauthenticated (loopback clouds only, unless --i-know-insecure)")
    tls.add_argument("--i-know-insecure", action="store_true", default=None,
                     help="allow --insecure to a cloud that is not on loopback")
    run.add_argument("--wait-split-s", type=float, default=0.0,
                     help="wait up to this long for split mode before feeding (default: do not wait)")
    run.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    run.add_argument("--quiet", action="store_true", help="no progress line")
    run.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub.add_parser("keys", help="list every config key with its description")
    return parser


def load_config(args: argparse.Namespace) -> AgentConfig:
    """The config from --config (if any) with the flags given applied over it."""
    overrides = {key: getattr(args, flag) for flag, key in OVERRIDES.items() if getattr(args, flag) is not None}
    if args.config is not None:
        return AgentConfig.from_toml(args.config, overrides)
    return AgentConfig.from_dict(merge_overrides({}, overrides), source="command line")


def load_inputs(source: str, specs: Sequence[TensorSpec], seed: int) -> list[np.ndarray]:
    """The inputs to cycle through: seeded synthetic ones, or the .npy files of a folder (one-input models)."""
    if len(specs) != 1:
        raise InputError(f"split-agent feeds one-input models; this one takes {[s.name for s in specs]}")
    spec = specs[0]
    if source == "synthetic":
        rng = np.random.default_rng(seed)
        shape, dtype = spec.concrete_shape(1), np.dtype(spec.dtype)
        return [(rng.standard_normal(shape) if dtype.kind == "f" else np.zeros(shape)).astype(dtype)
                for _ in range(SYNTHETIC_VARIANTS)]
    folder = Path(source)
    if not folder.is_dir():
        raise InputError(f"input {source!r}: not a folder of .npy files (or \"synthetic\")")
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise InputError(f"input folder {folder}: no .npy files in it")
    pool = []
    for f in files:
        try:
            arr = np.load(f, allow_pickle=False)  # never unpickle: a .npy must be plain data
        except (OSError, ValueError) as exc:
            raise InputError(f"{f}: not a readable .npy array ({exc})") from exc
        pool.append(arr[None] if arr.ndim == len(spec.shape) - 1 else arr)  # one sample: add the batch axis
    return pool


def summarize(results: list[InferenceResult], failures: int, stats: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Counts, served_by, fallbacks and p50/p95/p99 of each stage (ms)."""
    stages = {}
    for stage in STAGES:
        vals = np.array([getattr(r.timing, stage) for r in results], dtype=np.float64)
        if vals.size:
            p50, p95, p99 = np.percentile(vals, [50, 95, 99])
            stages[stage] = {"p50": float(p50), "p95": float(p95), "p99": float(p99)}
    return {
        "count": len(results) + failures,
        "failed": failures,
        "served_by": {side: sum(r.served_by == side for r in results) for side in (CLOUD, EDGE)},
        "fallbacks": stats["fallbacks"],
        "deadline_misses": stats["deadline_misses"],
        "late_replies_dropped": stats["late_replies_dropped"],
        "mode_switches": stats["mode_switches"],
        "throughput_rps": (len(results) + failures) / wall_s if wall_s > 0 else 0.0,
        "stages_ms": stages,
    }


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a small text table."""
    lines = [
        f"requests {s['count']}  cloud {s['served_by'][CLOUD]}  edge {s['served_by'][EDGE]}  failed {s['failed']}  "
        f"fallbacks {s['fallbacks']}  deadline misses {s['deadline_misses']}  late replies dropped "
        f"{s['late_replies_dropped']}  mode switches {s['mode_switches']}  {s['throughput_rps']:.1f} req/s",
        f"{'stage':<16}{'p50':>10}{'p95':>10}{'p99':>10}",
    ]
    for stage, p in s["stages_ms"].items():
        lines.append(f"{stage:<16}{p['p50']:>10.2f}{p['p95']:>10.2f}{p['p99']:>10.2f}")
    return "\n".join(lines)


@contextlib.contextmanager
def _fleet(agent: Any, cfg: AgentConfig) -> Iterator[Any]:
    """The agent's MQTT control plane while the block runs, when [mqtt] is configured (else nothing)."""
    if cfg.mqtt is None:
        yield None
        return
    from edge_agent.control import ControlLink  # paho loads only with [mqtt]

    link = ControlLink(agent, cfg.mqtt).start(wait_s=None)  # inference does not wait for the broker
    print(f"split-agent: mqtt broker {cfg.mqtt.broker} as device {cfg.device_id}", file=sys.stderr, flush=True)
    try:
        yield link
    finally:
        agent.close()  # drain first, so the last results reach the telemetry buffer before the final flush
        link.close()


def run(cfg: AgentConfig, *, wait_split_s: float = 0.0, quiet: bool = False, json_path: Path | None = None,
        stop: threading.Event | None = None) -> int:
    """Feed cfg.input through an agent, print progress and the summary; the exit status.

    `stop` ends the feed between requests (main() sets it on SIGINT); without it, run() catches SIGINT itself
    while it feeds."""
    from edge_agent.agent import EdgeAgent  # grpc and onnxruntime load only for `run`

    bundle = Bundle.load(cfg.bundle)
    pool = load_inputs(cfg.input.source, bundle.inputs, cfg.input.seed)  # bad inputs fail before connecting
    if cfg.check_transport() == "insecure":  # neither [tls] nor insecure: ConfigError naming both ways out
        print(f"split-agent: WARNING: the link to the cloud {cfg.cloud} is plaintext and unauthenticated "
              "(--insecure)", file=sys.stderr, flush=True)
    results: list[InferenceResult] = []
    failures: list[BaseException] = []
    with EdgeAgent(cfg) as agent, _fleet(agent, cfg):
        if wait_split_s > 0:
            agent.wait_for_mode("split", wait_split_s)
        futures: list[Future] = []
        start = time.perf_counter()
        period = 1.0 / cfg.input.rate if cfg.input.rate > 0 else 0.0
        last_progress = 0.0
        tty = sys.stderr.isatty()
        # Ctrl-C (SIGINT) stops the feed between requests; those already submitted finish and are summarized.
        # A flag, not KeyboardInterrupt, so that no request is left half-submitted. A second Ctrl-C while the
        # last requests finish interrupts at once.
        own = stop is None and threading.current_thread() is threading.main_thread()
        stop = stop if stop is not None else threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if own else None
        try:
            print(f"split-agent: {bundle.model_name} cut {agent.cut} -> {cfg.cloud}, mode {agent.mode}",
                  file=sys.stderr, flush=True)
            for i in range(cfg.input.count):
                x = pool[i % len(pool)]
                if period:
                    delay = start + i * period - time.perf_counter()
                    if delay > 0 and stop.wait(delay):  # pacing the feed (product code, not a test wait)
                        break
                if stop.is_set():
                    break
                futures.append(agent.submit(x))
                now = time.perf_counter()
                if not quiet and now - last_progress > (0.5 if tty else 5.0):
                    last_progress = now
                    st = agent.stats()
                    print(f"{chr(13) if tty else ''}  {i + 1}/{cfg.input.count} sent  cloud {st.served_cloud}  "
                          f"edge {st.served_edge}  mode {st.mode}   ", end="" if tty else "\n", file=sys.stderr,
                          flush=True)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if stop.is_set():
            print(f"split-agent: interrupted after {len(futures)} of {cfg.input.count} requests; finishing those "
                  "in flight", file=sys.stderr, flush=True)
        for fut in futures:
            exc = fut.exception()
            if exc is not None:
                failures.append(exc)
            else:
                results.append(fut.result())
        wall = time.perf_counter() - start
        stats = agent.stats().as_dict()
    if not quiet and tty:
        print(file=sys.stderr)
    summary = summarize(results, len(failures), stats, wall)
    print(format_summary(summary))
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    if failures:
        print(f"split-agent: {len(failures)} requests failed; first: {failures[0]}", file=sys.stderr)
        return 1
    return 130 if stop.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    status = _main(argv)
    if argv is None:  # the process's entry point: everything is closed and flushed, so leave now
        # Interpreter shutdown can hang for ever in a gRPC call object's __del__, whose lock a daemon thread
        # (gRPC's own channel thread) held when shutdown froze it (seen: a 45 s hang after "ok"). Skip it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keys":
        for key, doc in describe().items():
            print(f"{key:<26}{doc}")
        return 0
    if args.command == "serve":
        return serve_main(args, entry_point=argv is None)
    if args.command == "infer":
        try:
            return infer_main(args)
        except BrokenPipeError:  # `split-agent infer x.npy | head -1`: the reader left; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    if args.command == "install":
        return install_main(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGINT (Ctrl-C, or split-demo stopping its agents) ends the feed between requests; those submitted
    # finish and are summarized; a second one interrupts at once. The handler stays until the process ends, so
    # a SIGINT that lands after the summary changes nothing (it used to find Python's default handler and kill
    # the process with -2 while it was exiting).
    # SIGTERM (systemd, docker, kill) drains the same way, once, and the run exits 0 after its summary.
    stop = threading.Event()
    terminated = threading.Event()

    def on_sigint(*_: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    def on_sigterm(*_: object) -> None:
        terminated.set()
        stop.set()

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, on_sigint),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
    try:
        cfg = load_config(args)
        status = run(cfg, wait_split_s=args.wait_split_s, quiet=args.quiet, json_path=args.json, stop=stop)
        return 0 if status == 130 and terminated.is_set() else status
    except (ConfigError, BundleError, InputError, ModelLoadError, MissingExtraError, AgentError) as exc:
        print(f"split-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("split-agent: interrupted", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            # As the process's entry point (argv None: the console script) it exits now, so a late Ctrl-C must
            # not turn 0 into -2: ignore. Called as a library (tests, split-demo's helpers), give the caller its
            # handlers back: an ignored SIGTERM would be inherited by every process it starts later.
            signal.signal(signum, signal.SIG_IGN if argv is None else handler)


def serve_main(args: argparse.Namespace, *, entry_point: bool = False) -> int:
    """`split-agent serve`: the exit status (see the module doc)."""
    from edge_agent.local_api import LocalApiError
    from edge_agent.service import AgentService

    overrides = {"service.socket": args.socket, "service.listen": args.listen,
                 "service.allow_remote": args.allow_remote, "service.log_level": args.log_level}
    if not args.config.exists():
        print(f"split-agent: error: no config at {args.config}: write one (`split-cloud enroll DEVICE_ID` makes the "
              "device folder with agent.toml and its certificates) and pass it with --config PATH",
              file=sys.stderr)
        return 2
    previous: dict[int, Any] = {}
    try:
        service = AgentService(args.config, {k: v for k, v in overrides.items() if v is not None})
        logging.basicConfig(level=service.config.service.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        previous = service.install_signals()  # before start: a SIGTERM while the head loads drains right after
        service.start()
        return service.serve()
    except (ConfigError, BundleError, ModelLoadError, MissingExtraError, AgentError, LocalApiError) as exc:
        print(f"split-agent: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():  # exiting: a late signal changes nothing; in-process: give back
            signal.signal(signum, signal.SIG_IGN if entry_point else handler)


def infer_main(args: argparse.Namespace) -> int:
    """`split-agent infer`: one request to the service; prints shapes, served_by, timing (or JSON)."""
    from edge_agent.local_client import LocalClient, LocalError

    try:
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        print(f"split-agent: error: {args.input}: not a readable .npy array ({exc})", file=sys.stderr)
        return 2
    try:
        with LocalClient(socket=args.socket, address=args.address) as client:
            result = client.infer(x, timeout=args.timeout)
    except LocalError as exc:
        print(f"split-agent: the service answered {exc}", file=sys.stderr)
        return 1
    outputs = {name: {"shape": list(a.shape), "dtype": str(a.dtype),
                      "top": [int(i) for i in np.argsort(a.reshape(a.shape[0], -1)[0])[::-1][:5]]
                      if a.ndim >= 1 and a.size else []}
               for name, a in result.outputs.items()}
    summary = {"request_id": result.request_id, "served_by": result.served_by, "cut": result.cut,
               "fallback_reason": result.fallback_reason or None, "outputs": outputs, "timing_ms": result.timing}
    if args.out is not None:
        np.savez(args.out, **result.outputs)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"served by {result.served_by} on cut {result.cut}"
          + (f" (fallback: {result.fallback_reason})" if result.fallback_reason else ""))
    for name, o in outputs.items():
        print(f"  {name}: shape {tuple(o['shape'])} {o['dtype']}  top-5 indices {o['top']}")
    print("  " + "  ".join(f"{k} {v:.2f}" for k, v in result.timing.items()))
    return 0


def install_main(args: argparse.Namespace) -> int:
    """`split-agent install`."""
    from edge_agent.install import InstallError, install

    try:
        plan = install(args.config, bundle=args.bundle, user=args.user, prefix=args.prefix, root=args.root,
                       dry_run=args.print_only)
    except InstallError as exc:
        print(f"split-agent: error: {exc}", file=sys.stderr)
        return 2
    for warning in plan.warnings:
        print(f"split-agent: WARNING: {warning}", file=sys.stderr)
    if args.print_only:
        print(plan.unit_text, end="")
        return 0
    base = args.root if args.root is not None else Path("/")
    for path, mode in plan.files:
        print(f"  {oct(mode)[2:]:>4}  {base / path.relative_to('/')}")
    if plan.created_user:
        print(f"created the system user {args.user}")
    if args.root is not None:  # an image build: the target still needs the user, the ownership and the binary
        exec_start = next((line.split("=", 1)[1].split()[0] for line in plan.unit_text.splitlines()
                           if line.startswith("ExecStart=")), "split-agent")
        print(f"staged the unit {base / plan.unit_path.relative_to('/')}; on the target:")
        for line in (f"useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {args.user}",
                     f"chown -R root:{args.user} {args.prefix} && chown {args.user} {args.prefix}/tls/*.key",
                     f"make sure {exec_start} exists there (the unit's ExecStart: install splitinfer[edge] at that "
                     "path)",
                     "systemctl enable splitinfer-agent"):
            print(f"  {line}")
        return 0
    print(f"installed the unit {base / plan.unit_path.relative_to('/')}; now run:")
    for line in plan.next_steps:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
