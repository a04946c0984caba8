"""`split-cloud`: serve the tails of a directory of split bundles over gRPC (mTLS), with the fleet control plane
(MQTT broker, fleet store, controller, dashboard) unless --no-fleet; and the deployment's CA.

    split-cloud ca init [--dir STATE/pki] [--host cloud.example --host 10.0.0.5]
    split-cloud enroll cam-1 --cloud cloud.example:50051 [--broker cloud.example:8883] [--out DIR]
    split-cloud revoke cam-1
    split-cloud serve --bundles bundles [--pki STATE/pki]     # gRPC :50051, MQTT :8883, dashboard :8080 on 127.0.0.1
    split-cloud install --bundles /srv/splitinfer/bundles [--print]   # a hardened systemd service
    split-cloud fleet ls | fleet send DEVICE switch-cut c021 | switch-mode local | ping
"""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
import time
from pathlib import Path

from cloud_tier import fleet_cli
from cloud_tier.config import (
    BACKENDS,
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_GRPC_PORT,
    DEFAULT_MQTT_PORT,
    DEFAULT_MQTTS_PORT,
    STATE_DIR_ENV,
    ConfigError,
    NodeOptions,
    RayOptions,
    ServerConfig,
    default_pki_dir,
    parse_address,
)
from models import systemd
from models.extras import MissingExtraError
from models.manifest import BundleError
from models.ortopts import parse_provider_option, parse_providers, provider_options_from
from protos.address import format_address

DEFAULTS = ServerConfig()
RAY_DEFAULTS = RayOptions()
RAY_INSTALL = 'pip install "splitinfer[ray]"'


def build_parser() -> argparse.ArgumentParser:
    """The split-cloud argument parser."""
    parser = argparse.ArgumentParser(prog="split-cloud", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pki_help = f"the CA folder (default ${STATE_DIR_ENV}/pki, else $XDG_STATE_HOME/splitinfer/pki, else " \
               "~/.local/state/splitinfer/pki)"
    ca = sub.add_parser("ca", help="the deployment's certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    ca_init = ca_sub.add_parser("init", help="make the CA, the cloud's server certificate, the controller's and "
                                             "dashboard's certificates and the dashboard token")
    ca_init.add_argument("--dir", type=Path, default=None, help=pki_help)
    ca_init.add_argument("--host", action="append", default=None, metavar="NAME_OR_IP",
                         help="a name or address clients dial the cloud by (repeat; default localhost, 127.0.0.1, "
                              "::1); it goes into the server certificate")
    ca_init.add_argument("--force", action="store_true",
                         help="replace an existing CA (every certificate it issued stops being trusted)")
    enroll = sub.add_parser("enroll", help="issue a device certificate and write its folder (ca.pem, device.pem, "
                                           "device.key, agent.toml)")
    enroll.add_argument("device_id", metavar="DEVICE_ID", help="the device id: 1-64 characters of [A-Za-z0-9_-]")
    enroll.add_argument("--days", type=int, default=365, help="validity in days (default %(default)s)")
    enroll.add_argument("--out", type=Path, default=None, help="the device folder (default PKI/devices/DEVICE_ID)")
    enroll.add_argument("--cloud", metavar="HOST:PORT", default=None,
                        help=f"the gRPC tier address for agent.toml (default CLOUD_HOST:{DEFAULT_GRPC_PORT}, the "
                             "port `split-cloud serve` binds by default; replace CLOUD_HOST in the file)")
    enroll.add_argument("--broker", metavar="HOST:PORT", default=None,
                        help="the MQTT broker address for agent.toml (default: the host of --cloud, port "
                             f"{DEFAULT_MQTTS_PORT}: the embedded broker's default)")
    enroll.add_argument("--server-name", default=None,
                        help="the name the agent checks in the server certificate (default: the host of --cloud)")
    enroll.add_argument("--force", action="store_true", help="replace a device folder that already holds a key")
    enroll.add_argument("--pki", type=Path, default=None, help=pki_help)
    revoke = sub.add_parser("revoke", help="revoke every certificate of a device (the tier refuses it at once)")
    revoke.add_argument("device_id", metavar="DEVICE_ID")
    revoke.add_argument("--pki", type=Path, default=None, help=pki_help)
    serve = sub.add_parser("serve", help="serve every bundle (subdirectory with plan.json) of --bundles")
    serve.add_argument("--bundles", required=True, help="directory of bundles made by split-profile")
    serve.add_argument("--host", default=DEFAULTS.host, help="address to bind (default %(default)s)")
    serve.add_argument("--port", type=int, default=DEFAULT_GRPC_PORT,
                       help="gRPC port; 0 lets the OS pick (default %(default)s)")
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
    serve.add_argument("--providers", type=parse_providers, default=(), metavar="P1,P2",
                       help="onnxruntime execution providers for the tails, preferred first, comma-separated (e.g. "
                            "OpenVINOExecutionProvider,CPUExecutionProvider on a CPU-only node; "
                            "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider); default: CUDA "
                            "when onnxruntime has it (unless --cpu-only), then CPU")
    serve.add_argument("--provider-option", action="append", type=parse_provider_option, default=[],
                       metavar="PROVIDER:KEY=VALUE",
                       help="an option of one provider, repeatable (e.g. TensorrtExecutionProvider:trt_fp16_enable="
                            "True); TensorRT's engine cache is on by default in the state directory's trt-cache")
    rays = serve.add_argument_group("backend (where the tails run)")
    rays.add_argument("--backend", choices=BACKENDS, default="local",
                      help="local: in this process (the batcher above); ray: each tail a Ray Serve deployment "
                           "(@serve.batch with --max-batch/--max-wait-ms/--max-queue, autoscaled) behind this same "
                           f"gRPC front; needs {RAY_INSTALL} (default %(default)s)")
    rays.add_argument("--ray-address", metavar="ADDR", default=None,
                      help="with --backend ray: the Ray cluster to join (HOST:6379 or ray://HOST:10001); default: "
                           "start a local cluster on 127.0.0.1")
    rays.add_argument("--min-replicas", type=int, default=RAY_DEFAULTS.min_replicas,
                      help="replicas per tail at least (default %(default)s)")
    rays.add_argument("--max-replicas", type=int, default=RAY_DEFAULTS.max_replicas,
                      help="replicas per tail at most (default %(default)s)")
    rays.add_argument("--target-ongoing-requests", type=float, default=None, metavar="N",
                      help="requests in progress per replica the autoscaler aims at (default: --max-batch)")
    rays.add_argument("--replica-cpus", type=float, default=RAY_DEFAULTS.num_cpus,
                      help="CPUs reserved per replica (default %(default)s)")
    rays.add_argument("--replica-gpus", type=float, default=RAY_DEFAULTS.num_gpus,
                      help="GPUs per replica; > 0 runs the tail with CUDA (default %(default)s)")
    rays.add_argument("--ray-timeout", type=float, default=RAY_DEFAULTS.request_timeout_s, metavar="SECONDS",
                      help="a request without its own deadline is answered DEADLINE_EXCEEDED after this "
                           "(default %(default)s)")
    tls = serve.add_argument_group("transport security")
    tls.add_argument("--pki", type=Path, default=None, help=pki_help + " for both planes: gRPC clients and MQTT "
                     "clients must present one of its certificates, and a device's id is taken from it; the "
                     "embedded broker and the controller use its certificates. SIGHUP re-reads server.pem/.key "
                     "and ca.pem")
    tls.add_argument("--insecure", action="store_true",
                     help="plaintext gRPC and MQTT, device ids taken from requests, no ACL: no authentication at all "
                          "(loopback addresses only, unless --i-know-insecure)")
    tls.add_argument("--i-know-insecure", action="store_true",
                     help="allow --insecure on an address other hosts can reach")
    fleet = serve.add_argument_group("fleet control plane")
    fleet.add_argument("--no-fleet", action="store_true",
                       help="run only the gRPC tier (no MQTT broker, fleet store, controller or dashboard)")
    fleet.add_argument("--broker", metavar="HOST:PORT", default=None,
                       help="MQTT broker to use (Mosquitto in production); default: start the embedded amqtt "
                            "broker on --broker-host:--broker-port")
    fleet.add_argument("--broker-host", default=None,
                       help=f"the embedded broker's bind address (default {NodeOptions.embedded_broker_host})")
    fleet.add_argument("--broker-port", type=int, default=None,
                       help=f"the embedded broker's port; 0 lets the OS pick (default {DEFAULT_MQTTS_PORT} with TLS, "
                            f"{DEFAULT_MQTT_PORT} with --insecure)")
    fleet.add_argument("--db", metavar="PATH", default=None,
                       help=f"SQLite fleet store file (default ${STATE_DIR_ENV}/fleet.db, else "
                            "$XDG_STATE_HOME/splitinfer/fleet.db, else ~/.local/state/splitinfer/fleet.db)")
    fleet.add_argument("--dashboard-host", default=NodeOptions.dashboard_host,
                       help="dashboard bind address (default %(default)s)")
    fleet.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                       help="dashboard port; 0 lets the OS pick (default %(default)s)")
    fleet.add_argument("--dashboard-token-file", metavar="FILE", default=None,
                       help="file holding the token the dashboard and /metrics require (split-cloud ca init writes "
                            "STATE/pki/dashboard.token); required when --dashboard-host is not loopback")
    fleet.add_argument("--stale-after", type=float, default=NodeOptions.stale_after_s, metavar="SECONDS",
                       help="show an online device that sent nothing for this long as stale (default %(default)s)")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds to drain on SIGTERM (default %(default)s)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    inst = sub.add_parser("install", help="install the cloud node as a hardened systemd service (Type=notify)",
                          description="Write /etc/systemd/system/splitinfer-cloud.service (split-cloud serve as a "
                                      "dedicated user, hardened, with a watchdog) and copy the CA folder into the "
                                      "service's state directory /var/lib/splitinfer-cloud (with fleet.db); print "
                                      "the systemctl lines. Arguments after -- are passed to `serve`.")
    inst.add_argument("--bundles", type=Path, required=True, help="directory of bundles the service serves")
    inst.add_argument("--pki", type=Path, default=None, help=pki_help + ", copied into the service's state directory")
    inst.add_argument("--user", default="splitinfer-cloud", help="the service's user (default %(default)s; created "
                                                                 "when missing)")
    inst.add_argument("--gpu", action="store_true", help="the tails run on a GPU: let the service see /dev "
                                                         "(PrivateDevices=no)")
    inst.add_argument("--print", dest="print_only", action="store_true", help="only print the unit")
    inst.add_argument("--root", type=Path, default=None, help="stage the files under this folder instead of / "
                                                              "(image builds, tests): no user is created, nothing "
                                                              "chowned")
    inst.add_argument("serve_args", nargs="*", metavar="-- SERVE_ARGS",
                      help="extra `split-cloud serve` arguments, e.g. -- --host 0.0.0.0")
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
    fleet_cli.add_parser(sub)
    return parser


def mosquitto_config(args: argparse.Namespace) -> int:
    """Write the Mosquitto config and ACL; print where, and how to run it."""
    from cloud_tier.broker import write_mosquitto_config

    pki = args.pki if args.pki is not None else default_pki_dir()
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
    from cloud_tier.node import INSECURE_WARNING, CloudNode
    from cloud_tier.pki import PkiError
    from cloud_tier.server import ServerStartError

    config = ServerConfig(
        host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, workers=args.workers, intra_op_threads=args.intra_op_threads,
        max_tensor_bytes=args.max_tensor_mib << 20, max_message_bytes=args.max_message_mib << 20,
        prefer_gpu=not args.cpu_only, pki_dir=args.pki, insecure=args.insecure,
        insecure_remote=args.i_know_insecure, providers=args.providers,
        provider_options=provider_options_from(args.provider_option),
    )
    ray = None
    if args.backend == "ray":
        ray = RayOptions(address=args.ray_address, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                         target_ongoing_requests=args.target_ongoing_requests, num_cpus=args.replica_cpus,
                         num_gpus=args.replica_gpus, request_timeout_s=args.ray_timeout)
        from cloud_tier.ray_backend import require_ray

        require_ray()  # without the [ray] extra: one line naming the pip install, before anything starts
    elif args.ray_address is not None:
        raise ConfigError("--ray-address", "needs --backend ray")
    if args.broker is not None and (args.broker_host is not None or args.broker_port is not None):
        flag = "--broker-port" if args.broker_port is not None else "--broker-host"
        raise ConfigError(flag, "sets the embedded broker, which --broker replaces by an external one: give one of "
                                "the two")
    broker_port = args.broker_port if args.broker_port is not None else (
        DEFAULT_MQTT_PORT if args.insecure else DEFAULT_MQTTS_PORT)
    options = None if args.no_fleet else NodeOptions(
        broker=args.broker, db_path=args.db, dashboard_host=args.dashboard_host, dashboard_port=args.dashboard_port,
        dashboard_token_file=args.dashboard_token_file, stale_after_s=args.stale_after,
        embedded_broker_host=args.broker_host or NodeOptions.embedded_broker_host, embedded_broker_port=broker_port,
        # One CA and one insecure switch for both planes: --pki, --insecure, --i-know-insecure.
        mqtt_pki=args.pki, mqtt_insecure=args.insecure, mqtt_i_know_insecure=args.i_know_insecure,
    )
    if config.insecure:
        print(f"split-cloud: {INSECURE_WARNING}", file=sys.stderr, flush=True)
    elif not (config.resolved_pki_dir() / "ca.pem").is_file():
        print(f"split-cloud: no CA in {config.resolved_pki_dir()}: run `split-cloud ca init --dir "
              f"{config.resolved_pki_dir()}` first (or --insecure for plaintext on loopback)", file=sys.stderr)
        return 2
    # The handlers only set flags: one runs on the main thread between two bytecodes, possibly while it holds a
    # lock (an Event's, the node's), so setting an Event or reloading there could deadlock. The loop reads them.
    flags = {"stop": False, "reload": False}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGHUP, lambda *_: flags.__setitem__("reload", True))
    node = CloudNode(args.bundles, config, options, ray=ray)  # MissingExtraError: --backend ray without Ray
    try:
        node.start()
    except (BundleError, ServerStartError, BrokerStartError, PkiError, TimeoutError, OSError, RuntimeError,
            sqlite3.Error) as exc:
        print(f"split-cloud: {exc}", file=sys.stderr)
        return 2
    if ray is not None:  # ray.init installed its own SIGTERM handler, which ends the process mid-drain: ours again
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: flags.__setitem__("stop", True))
    for line in node.banner():
        print(line, flush=True)
    systemd.notify("READY=1", f"STATUS=serving on {node.grpc_address}")
    watchdog_s = systemd.watchdog_period_s()
    tick = min(0.2, watchdog_s) if watchdog_s else 0.2
    last_ping = 0.0
    while not flags["stop"] and not node.wait(tick):
        # The gRPC tier's thread is alive (the loop's condition), so tell the watchdog.
        if flags["reload"]:
            flags["reload"] = False
            node.reload_certificates()
        if watchdog_s and time.monotonic() - last_ping >= watchdog_s:
            systemd.notify("WATCHDOG=1")
            last_ping = time.monotonic()
    systemd.notify("STOPPING=1", "STATUS=draining")
    print("shutting down: draining", flush=True)
    node.stop(grace=args.grace)
    print("stopped", flush=True)
    return 0


def ca_init(args: argparse.Namespace) -> int:
    """`split-cloud ca init`: make the CA folder."""
    from cloud_tier.pki import CertificateAuthority

    folder = args.dir or default_pki_dir()
    hosts = args.host or ["localhost", "127.0.0.1", "::1"]
    ca = CertificateAuthority.init(folder, hosts, force=args.force)
    print(f"CA made in {ca.dir} (server certificate for {', '.join(hosts)}); enroll devices with "
          f"`split-cloud enroll DEVICE_ID --pki {ca.dir}`")
    return 0


def enroll(args: argparse.Namespace) -> int:
    """`split-cloud enroll`: issue a device certificate and write the device folder."""
    from cloud_tier.pki import CertificateAuthority

    for key in ("cloud", "broker"):
        if getattr(args, key) is not None:
            parse_address(getattr(args, key), f"--{key}")
    if args.days < 1:
        raise ConfigError("--days", f"expected a number of days >= 1, got {args.days}")
    ca = CertificateAuthority(args.pki or default_pki_dir())
    out = args.out or ca.dir / "devices" / args.device_id
    if (out / "device.key").exists() and not args.force:
        raise ConfigError("--out", f"{out} already holds a device key: refusing to replace it (--force replaces it; "
                          "`split-cloud revoke` the old certificate if it leaked)")
    # Without --cloud/--broker: the service's stable ports (CLOUD_HOST is left for the operator to fill in).
    cloud = args.cloud or f"CLOUD_HOST:{DEFAULT_GRPC_PORT}"
    broker = args.broker or f"{format_address(parse_address(cloud, '--cloud')[0], DEFAULT_MQTTS_PORT)}"
    folder = ca.enroll(args.device_id, out, days=args.days, cloud=cloud, broker=broker,
                       server_name=args.server_name)
    print(f"enrolled device {args.device_id}: {folder} (ca.pem, device.pem, device.key, agent.toml); copy it and "
          "the device's bundle to the device and run `sudo split-agent install --config agent.toml --bundle BUNDLE` "
          "(or `split-agent serve --config agent.toml` after setting its bundle path)")
    return 0


def revoke(args: argparse.Namespace) -> int:
    """`split-cloud revoke`: put a device's certificates on the revocation list."""
    from cloud_tier.pki import CertificateAuthority

    serials = CertificateAuthority(args.pki or default_pki_dir()).revoke(args.device_id)
    print(f"revoked device {args.device_id}: {len(serials)} certificate(s), serial(s) "
          f"{', '.join(f'{s:x}' for s in serials)}; the gRPC tier and the embedded broker refuse it from now on "
          "(Mosquitto: kill -HUP its pid to reload the CRL)")
    return 0


def install(args: argparse.Namespace) -> int:
    """`split-cloud install`: the systemd unit and the state directory; print what to run next."""
    from cloud_tier.install import InstallError
    from cloud_tier.install import install as install_service

    try:
        done = install_service(args.bundles, args.pki or default_pki_dir(), user=args.user,
                               serve_args=tuple(args.serve_args), root=args.root, dry_run=args.print_only,
                               gpu=args.gpu)
    except InstallError as exc:
        print(f"split-cloud: {exc}", file=sys.stderr)
        return 2
    for warning in done.warnings:
        print(f"split-cloud: WARNING: {warning}", file=sys.stderr)
    if args.print_only:
        print(done.unit_text, end="")
        return 0
    for path, mode in done.files:
        print(f"placed {path} ({mode:04o})")
    if done.created_user:
        print(f"created the system user {args.user}")
    print("next, on the target:" if args.root is not None else "next:")
    for line in (done.staging_steps if args.root is not None else done.next_steps):
        print(f"  {line}")
    return 0


COMMANDS = {"serve": serve, "enroll": enroll, "revoke": revoke, "ca": ca_init, "mosquitto-config": mosquitto_config,
            "install": install, "fleet": fleet_cli.run}


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    from cloud_tier.pki import PkiError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # amqtt's state machines (transitions) log every transition, and amqtt every connection, at INFO: 35
        # lines per start. Their warnings still show; --log-level DEBUG shows everything.
        for noisy in ("transitions", "amqtt"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, PkiError, MissingExtraError, OSError) as exc:  # ConfigError (a ValueError) names the key
        print(f"split-cloud: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
