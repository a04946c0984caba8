"""The cloud node's typed settings, validated where they are made, and its gRPC channel options.

`ServerConfig` (the gRPC tier) and `NodeOptions` (the control plane beside it: broker, fleet store, dashboard)
are frozen dataclasses that check themselves in `__post_init__`; a bad value raises `ConfigError`, which names
the key and what was expected. `parse_address` wraps `protos.address` with that error. `STATE_DIR_ENV` is the one
environment override (where the fleet database lives by default).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.validate import FieldError, check_bool, check_int, check_number, check_text
from protos import address
from protos.address import is_loopback
from protos.codec import DEFAULT_MAX_TENSOR_BYTES

__all__ = ["BACKENDS", "ConfigError", "DEFAULT_DASHBOARD_PORT", "DEFAULT_GRPC_PORT", "DEFAULT_MQTT_PORT",
           "DEFAULT_MQTTS_PORT", "NodeOptions", "RayOptions", "ServerConfig", "STATE_DIR_ENV", "address_in_use",
           "bind_refused", "default_db_path", "default_pki_dir", "default_state_dir", "is_loopback", "parse_address"]

MIB = 1024 * 1024
HEALTH_SERVICE = "splitinfer.v1.SplitInference"
STATE_DIR_ENV = "SPLITINFER_STATE_DIR"  # overrides where the fleet database lives by default
DB_FILE = "fleet.db"
PKI_DIR = "pki"

# The service's stable ports (`split-cloud serve` and `split-cloud enroll` defaults; the library API and the lab
# tools bind port 0 unless told otherwise). Each is on 127.0.0.1 unless its host flag says otherwise.
DEFAULT_GRPC_PORT = 50051  # --port
DEFAULT_MQTTS_PORT = 8883  # --broker-port, the embedded broker with TLS (the default)
DEFAULT_MQTT_PORT = 1883  # --broker-port with --insecure (plaintext)
DEFAULT_DASHBOARD_PORT = 8080  # --dashboard-port

# Keepalive pairing with the edge agent: agents ping every 20 s (keepalive_time_ms=20000, also without an
# active call); the server accepts pings as often as every 10 s, so they never earn a GOAWAY too_many_pings.
# The server pings idle clients every 60 s itself and drops a connection unanswered after 20 s.
MIN_CLIENT_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000


class ConfigError(FieldError):
    """A setting has a bad value; the message names the key (the CLI flag where there is one) and what was expected."""

    def __init__(self, key: str, detail: str):
        super().__init__(key, detail)
        self.args = (f"{key} {detail}",)


def parse_address(text: str, key: str = "address") -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port) by `protos.address`; ConfigError naming `key` otherwise."""
    try:
        return address.parse_address(text, key)
    except address.AddressError:
        raise ConfigError(key, f"{text!r} is invalid: expected HOST:PORT with a port in 1..65535") from None


def default_state_dir() -> Path:
    """$SPLITINFER_STATE_DIR, else $XDG_STATE_HOME/splitinfer, else ~/.local/state/splitinfer."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "splitinfer"


def default_db_path() -> Path:
    """The fleet database in the state dir: default_state_dir() / fleet.db."""
    return default_state_dir() / DB_FILE


def default_pki_dir() -> Path:
    """The deployment's CA folder in the state dir: default_state_dir() / pki (`split-cloud ca init` makes it)."""
    return default_state_dir() / PKI_DIR


def address_in_use(exc: BaseException | None) -> bool:
    """Whether `exc` (or an exception it was raised from) says the address is already in use (EADDRINUSE)."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return True
        if "address already in use" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def bind_refused(what: str, host: str, port: int, flag: str, detail: str = "address already in use") -> str:
    """The one-line error for a port that cannot be bound, naming the flag that changes it."""
    return (f"{what} cannot listen on {address.format_address(host, port)} ({detail}): another process (or another "
            f"split-cloud) holds that port; stop it, or choose another port with {flag}")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of the gRPC tier; an invalid one raises ConfigError when the object is made."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks; the server reports the port it got
    max_batch: int = 16  # rows (sum of request batch dims) per tail run
    max_wait_ms: float = 0.0  # > 0: the first request of a batch waits this long for company (0: continuous)
    max_queue: int = 256  # requests waiting per (model, cut); beyond: RESOURCE_EXHAUSTED
    workers: int = max(1, min(4, os.cpu_count() or 1))  # tail runs in parallel (thread pool size)
    intra_op_threads: int = 1  # onnxruntime threads per run; workers * this should not exceed the cores
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES  # decompressed size limit per tensor
    max_message_bytes: int = 64 * MIB  # gRPC receive/send limit (the default 4 MiB is too small)
    max_inflight_per_stream: int = 64  # requests of one stream being worked on; beyond: stop reading it
    prefer_gpu: bool = True  # CUDA execution provider first when onnxruntime has it
    # onnxruntime execution providers for the tails, preferred first (empty: CUDA when present and prefer_gpu,
    # then CPU), and options per provider; TensorRT's engine cache defaults to the state dir's trt-cache.
    providers: tuple[str, ...] = ()
    provider_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # mTLS: the CA folder (`split-cloud ca init`) with ca.pem, server.pem/.key and crl.pem; clients must present a
    # certificate of this CA, and the device id is taken from it. None: default_pki_dir().
    pki_dir: str | Path | None = None
    insecure: bool = False  # plaintext, device ids taken from requests: loopback only unless insecure_remote
    insecure_remote: bool = False  # --i-know-insecure: allow plaintext on a non-loopback address

    def __post_init__(self) -> None:
        """Check every field; ConfigError names the first bad one."""
        check_text("ServerConfig.host", self.host, allow_empty=False, error=ConfigError)
        check_int("ServerConfig.port", self.port, 0, 65535, error=ConfigError)
        for name in ("max_batch", "max_queue", "workers", "intra_op_threads", "max_tensor_bytes",
                     "max_message_bytes", "max_inflight_per_stream"):
            check_int(f"ServerConfig.{name}", getattr(self, name), 1, error=ConfigError)
        check_number("ServerConfig.max_wait_ms", self.max_wait_ms, 0, error=ConfigError)
        check_bool("ServerConfig.prefer_gpu", self.prefer_gpu, error=ConfigError)
        if isinstance(self.providers, str) or not all(isinstance(p, str) and p for p in self.providers):
            raise ConfigError("--providers", f"expected provider names, got {self.providers!r}")
        object.__setattr__(self, "providers", tuple(self.providers))
        if self.provider_options and not self.providers:
            raise ConfigError("--provider-option", "needs --providers naming the providers it sets options of")
        check_bool("--insecure", self.insecure, error=ConfigError)
        check_bool("--i-know-insecure", self.insecure_remote, error=ConfigError)
        if self.insecure:
            if not is_loopback(self.host) and not self.insecure_remote:
                raise ConfigError("--insecure", f"refuses to serve plaintext on {self.host!r}, which is not a loopback "
                                  "address: anyone on the network could call the tier as any device (add "
                                  "--i-know-insecure to do it anyway, or serve mTLS with --pki)")

    def resolved_provider_options(self) -> dict[str, dict[str, str]]:
        """provider_options as onnxruntime takes them, TensorRT's engine cache in default_state_dir()/trt-cache
        unless set (created private); ConfigError naming --provider-option when a value or folder is bad."""
        from models.ortopts import ProviderError, resolve_provider_options

        try:
            return resolve_provider_options(self.providers, self.provider_options, default_state_dir())
        except (ProviderError, ValueError) as exc:
            raise ConfigError("--provider-option", str(exc)) from None

    def resolved_pki_dir(self) -> Path:
        """`pki_dir`, or default_pki_dir() when unset."""
        return Path(self.pki_dir) if self.pki_dir is not None else default_pki_dir()

    def grpc_options(self) -> list[tuple[str, int]]:
        """gRPC server options, each set deliberately (see the keepalive note above)."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ]


BACKENDS = ("local", "ray")  # --backend: where the tails run (in-process batcher, or Ray Serve deployments)


@dataclass(frozen=True)
class RayOptions:
    """`split-cloud serve --backend ray`: the tails as Ray Serve deployments (cloud_tier.ray_backend).

    Batching comes from ServerConfig (max_batch rows per @serve.batch batch, max_wait_ms its window, max_queue
    Serve's max_queued_requests); these set the cluster and the replicas. Keys in errors are the CLI flags.
    """

    address: str | None = None  # --ray-address: an existing cluster (ray://... or HOST:PORT); None: a local one
    min_replicas: int = 1  # --min-replicas
    max_replicas: int = 4  # --max-replicas
    target_ongoing_requests: float | None = None  # --target-ongoing-requests per replica; None: max_batch
    max_concurrent_batches: int = 1  # batches a replica runs at once (max_ongoing_requests >= this x max_batch)
    num_cpus: float = 1.0  # --replica-cpus: CPUs reserved per replica
    num_gpus: float = 0.0  # --replica-gpus: GPUs per replica (> 0: CUDA where onnxruntime has it)
    request_timeout_s: float = 30.0  # --ray-timeout: a handle call without a request deadline gives up after this
    upscale_delay_s: float = 5.0  # how long the load must stay above target before a replica is added
    downscale_delay_s: float = 60.0  # how long it must stay below before one is removed
    look_back_period_s: float | None = None  # the window the autoscaler averages over; None: Serve's (30 s)
    metrics_interval_s: float | None = None  # how often replicas and handles report load; None: Serve's (10 s)

    def __post_init__(self) -> None:
        """Check every field; ConfigError names the first bad one."""
        if self.address is not None:
            check_text("--ray-address", self.address, allow_empty=False, error=ConfigError)
        check_int("--min-replicas", self.min_replicas, 0, error=ConfigError)
        check_int("--max-replicas", self.max_replicas, 1, error=ConfigError)
        if self.min_replicas > self.max_replicas:
            raise ConfigError("--min-replicas", f"is {self.min_replicas}, above --max-replicas {self.max_replicas}")
        if self.target_ongoing_requests is not None:
            check_number("--target-ongoing-requests", self.target_ongoing_requests, 0, lo_open=True,
                         error=ConfigError)
        check_int("RayOptions.max_concurrent_batches", self.max_concurrent_batches, 1, error=ConfigError)
        check_number("--replica-cpus", self.num_cpus, 0, error=ConfigError)
        check_number("--replica-gpus", self.num_gpus, 0, error=ConfigError)
        check_number("--ray-timeout", self.request_timeout_s, 0, lo_open=True, error=ConfigError)
        check_number("RayOptions.upscale_delay_s", self.upscale_delay_s, 0, error=ConfigError)
        check_number("RayOptions.downscale_delay_s", self.downscale_delay_s, 0, error=ConfigError)
        for name in ("look_back_period_s", "metrics_interval_s"):
            if getattr(self, name) is not None:
                check_number(f"RayOptions.{name}", getattr(self, name), 0, lo_open=True, error=ConfigError)


@dataclass(frozen=True)
class NodeOptions:
    """The node's control plane: MQTT broker, fleet store, controller and dashboard beside the gRPC tier.

    `broker=None` starts the embedded broker on `embedded_broker_host`. Keys in errors are the CLI flags
    where there is one.
    """

    broker: str | None = None  # HOST:PORT of an external broker (Mosquitto in production)
    db_path: str | Path | None = None  # None: default_db_path()
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 0
    dashboard_token_file: str | Path | None = None  # required when dashboard_host is not loopback
    embedded_broker_host: str = "127.0.0.1"  # loopback by default; insecure elsewhere: mqtt_i_know_insecure
    embedded_broker_port: int = 0
    connect_timeout_s: float = 10.0  # how long the controller waits for the broker at start
    # An "online" device silent (no state, no telemetry) for longer is shown "stale" (--stale-after): three of the
    # agent's 5 s telemetry intervals at most.
    stale_after_s: float = 15.0
    # MQTT security: the CA folder (cloud_tier.pki) whose server certificate the embedded broker serves and whose
    # controller certificate the controller presents; None: the gRPC tier's (ServerConfig.pki_dir).
    mqtt_pki: str | Path | None = None
    mqtt_insecure: bool = False  # plaintext MQTT, no certificates (loopback only unless mqtt_i_know_insecure)
    mqtt_i_know_insecure: bool = False

    def __post_init__(self) -> None:
        """Check every field; ConfigError names the first bad one."""
        if self.broker is not None:
            parse_address(self.broker, "--broker")
        for name in ("dashboard_port", "embedded_broker_port"):
            check_int(f"NodeOptions.{name}", getattr(self, name), 0, 65535, error=ConfigError)
        if str(self.db_path) == ":memory:":
            raise ConfigError("--db", f"{str(self.db_path)!r} is not supported: expected a SQLite file path (the "
                              "fleet store needs a file: the dashboard reads with its own connections)")
        check_number("NodeOptions.connect_timeout_s", self.connect_timeout_s, 0, lo_open=True, error=ConfigError)
        check_number("--stale-after", self.stale_after_s, 0, lo_open=True, error=ConfigError)

    def resolved_db_path(self) -> Path:
        """`db_path`, or default_db_path() when unset."""
        return Path(self.db_path) if self.db_path is not None else default_db_path()

