"""`split-cloud`: serve the tails of a directory of split bundles over gRPC."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from cloud_tier.config import ServerConfig
from models.manifest import BundleError

DEFAULTS = ServerConfig()


def build_parser() -> argparse.ArgumentParser:
    """The split-cloud argument parser."""
    parser = argparse.ArgumentParser(prog="split-cloud", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve every bundle (subdirectory with plan.json) of --bundles")
    serve.add_argument("--bundles", required=True, help="directory of bundles made by split-profile")
    serve.add_argument("--host", default=DEFAULTS.host, help="address to bind (default %(default)s)")
    serve.add_argument("--port", type=int, default=DEFAULTS.port, help="port; 0 lets the OS pick (default %(default)s)")
    serve.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch, help="rows per tail run (default %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=DEFAULTS.max_wait_ms,
                       help="how long a batch waits to fill (default %(default)s)")
    serve.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue,
                       help="requests waiting per model and cut before RESOURCE_EXHAUSTED (default %(default)s)")
    serve.add_argument("--workers", type=int, default=DEFAULTS.workers, help="parallel tail runs (default %(default)s)")
    serve.add_argument("--intra-op-threads", type=int, default=DEFAULTS.intra_op_threads,
                       help="onnxruntime threads per run (default %(default)s)")
    serve.add_argument("--max-tensor-mib", type=int, default=DEFAULTS.max_tensor_bytes >> 20,
                       help="largest decoded tensor accepted, MiB (default %(default)s)")
    serve.add_argument("--max-message-mib", type=int, default=DEFAULTS.max_message_bytes >> 20,
                       help="gRPC message size limit, MiB (default %(default)s)")
    serve.add_argument("--cpu-only", action="store_true", help="do not use the CUDA execution provider")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds to drain on SIGTERM (default %(default)s)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM or SIGINT, then drain and stop; returns the exit status."""
    from cloud_tier.server import CloudServer, ServerStartError

    server = CloudServer(
        args.bundles, args.host, args.port,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, workers=args.workers,
        intra_op_threads=args.intra_op_threads, max_tensor_bytes=args.max_tensor_mib << 20,
        max_message_bytes=args.max_message_mib << 20, prefer_gpu=not args.cpu_only,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        port = server.start()
    except (BundleError, ServerStartError) as exc:
        print(f"split-cloud: {exc}", file=sys.stderr)
        return 2
    print(f"listening on {args.host}:{port}", flush=True)
    while not stop.wait(1.0) and not server.wait(0):
        pass  # wake every second so signals are handled promptly on every platform
    print("shutting down: draining", flush=True)
    server.stop(grace=args.grace)
    print("stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(args)
    except ValueError as exc:  # ServerConfig.validate names the bad setting
        print(f"split-cloud: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
