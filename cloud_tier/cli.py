"""`split-cloud`: serve the tails of a directory of split bundles over gRPC, with the fleet control plane
(MQTT broker, fleet store, controller, dashboard) unless --no-fleet."""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
import threading

from cloud_tier.config import STATE_DIR_ENV, NodeOptions, ServerConfig
from models.manifest import BundleError

DEFAULTS = ServerConfig()


def build_parser() -> argparse.ArgumentParser:
    """The split-cloud argument parser."""
    parser = argparse.ArgumentParser(prog="split-cloud", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve every bundle (subdirectory with plan.json) of --bundles")
    serve.add_argument("--bundles", required=True, help="directory of bundles made by split-profile")
    serve.add_argument("--host", default=DEFAULTS.host, help="address to bind (default %(default)s)")
    serve.add_argument("--port", type=int, default=DEFAULTS.port,
                       help="port; 0 lets the OS pick (default %(default)s)")
    serve.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch,
                       help="rows per tail run (default %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=DEFAULTS.max_wait_ms,
                       help="how long a batch's first request waits for company before it asks for a worker; "
                            "0 is continuous batching: a free worker takes whatever is queued (default %(default)s)")
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
    fleet = serve.add_argument_group("fleet control plane")
    fleet.add_argument("--no-fleet", action="store_true",
                       help="run only the gRPC tier (no MQTT broker, fleet store, controller or dashboard)")
    fleet.add_argument("--broker", metavar="HOST:PORT", default=None,
                       help="MQTT broker to use (Mosquitto in production); default: start the embedded amqtt "
                            "broker on 127.0.0.1 with a port the OS picks")
    fleet.add_argument("--db", metavar="PATH", default=None,
                       help=f"SQLite fleet store file (default ${STATE_DIR_ENV}/fleet.db, else "
                            "$XDG_STATE_HOME/splitinfer/fleet.db, else ~/.local/state/splitinfer/fleet.db)")
    fleet.add_argument("--mqtt-pki", metavar="DIR", default=None,
                       help="CA folder (split-cloud ca init) for MQTT: the embedded broker's TLS certificate and the "
                            "controller's client certificate (default: pki beside the fleet store, made on first "
                            "start)")
    fleet.add_argument("--mqtt-insecure", action="store_true",
                       help="plaintext MQTT without certificates, ACL or authentication (loopback only unless "
                            "--i-know-insecure)")
    fleet.add_argument("--i-know-insecure", action="store_true",
                       help="allow --mqtt-insecure on a non-loopback broker address")
    fleet.add_argument("--dashboard-host", default=NodeOptions.dashboard_host,
                       help="dashboard bind address (default %(default)s)")
    fleet.add_argument("--dashboard-port", type=int, default=NodeOptions.dashboard_port,
                       help="dashboard port; 0 lets the OS pick (default %(default)s)")
    fleet.add_argument("--dashboard-token-file", metavar="FILE", default=None,
                       help="file holding the token the dashboard and /metrics require (split-cloud ca init writes "
                            "STATE/pki/dashboard.token); required when --dashboard-host is not loopback")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds to drain on SIGTERM (default %(default)s)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    mosq = sub.add_parser("mosquitto-config", help="write a Mosquitto config (TLS, client certificates, ACL, CRL)",
                          description="Write mosquitto.conf and its ACL file for the fleet's broker: a TLS listener "
                                      "that requires a certificate from the CA, identities as usernames and client "
                                      "ids, no anonymous clients, the revocation list. Run: mosquitto -c "
                                      "DIR/mosquitto.conf (send it SIGHUP after split-cloud revoke).")
    mosq.add_argument("--out", required=True, metavar="DIR", help="folder for mosquitto.conf and acl")
    mosq.add_argument("--pki", metavar="DIR", default=None,
                      help=f"CA folder made by split-cloud ca init (default ${STATE_DIR_ENV}/pki or the state folder's "
                           "pki)")
    mosq.add_argument("--port", type=int, default=8883, help="listener port (default %(default)s)")
    mosq.add_argument("--host", default="127.0.0.1", help="listener address (default %(default)s)")
    mosq.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def mosquitto_config(args: argparse.Namespace) -> int:
    """Write the Mosquitto config and ACL; print where, and how to run it."""
    from cloud_tier.broker import write_mosquitto_config
    from cloud_tier.config import default_db_path

    pki = args.pki if args.pki is not None else default_db_path().parent / "pki"
    try:
        conf = write_mosquitto_config(args.out, pki, port=args.port, host=args.host)
    except (FileNotFoundError, OSError) as exc:
        print(f"split-cloud: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {conf} and {conf.parent / 'acl'}")
    print(f"run: mosquitto -c {conf}    (after split-cloud revoke: kill -HUP <mosquitto pid> to reload the CRL)")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Run the node until SIGTERM or SIGINT, then drain and stop every part; returns the exit status."""
    from cloud_tier.broker import BrokerStartError
    from cloud_tier.node import CloudNode
    from cloud_tier.pki import PkiError
    from cloud_tier.server import ServerStartError

    config = ServerConfig(
        host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, workers=args.workers, intra_op_threads=args.intra_op_threads,
        max_tensor_bytes=args.max_tensor_mib << 20, max_message_bytes=args.max_message_mib << 20,
        prefer_gpu=not args.cpu_only,
    )
    options = None if args.no_fleet else NodeOptions(
        broker=args.broker, db_path=args.db, dashboard_host=args.dashboard_host, dashboard_port=args.dashboard_port,
        dashboard_token_file=args.dashboard_token_file,
        mqtt_pki=args.mqtt_pki, mqtt_insecure=args.mqtt_insecure, mqtt_i_know_insecure=args.i_know_insecure,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node = CloudNode(args.bundles, config, options)
    try:
        node.start()
    except (BundleError, ServerStartError, BrokerStartError, PkiError, TimeoutError, OSError, RuntimeError,
            sqlite3.Error) as exc:
        print(f"split-cloud: {exc}", file=sys.stderr)
        return 2
    for line in node.banner():
        print(line, flush=True)
    while not stop.wait(1.0) and not node.wait(0):
        pass  # wake every second so signals are handled promptly on every platform
    print("shutting down: draining", flush=True)
    node.stop(grace=args.grace)
    print("stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "mosquitto-config":
            return mosquitto_config(args)
        return serve(args)
    except ValueError as exc:  # ConfigError (a ValueError) names the bad setting
        print(f"split-cloud: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
