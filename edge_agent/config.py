"""The edge agent's typed, validated configuration: one place, loadable from TOML.

A file looks like this (every key optional except `bundle`; unknown keys are errors)::

    bundle = "bundles/resnet18"
    cloud = "10.0.0.5:50051"
    device_id = "pi-kitchen"
    cut = "c3"                  # default: the bundle's chosen cut
    head_precision = "int8"     # or "fp32"
    codec = "auto"              # the plan's codec for the cut in use; or one for every cut (overrides the plan),
                                # see protos/codec.py: fp32|fp16|int8|int8c [+lz4|+zstd]
    deadline_ms = 1000          # how long the agent waits for the cloud's reply once a request is sent
    max_in_flight = 32
    runtime = "onnxruntime"     # the head's runtime: "onnxruntime" or "litert" (head.tflite; the local tail stays
                                #   on onnxruntime)
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]  # onnxruntime's,
                                #   preferred first (Intel box: ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    state_dir = "/var/lib/splitinfer-agent"  # the agent's state (TensorRT engine cache); default $STATE_DIRECTORY

    [provider_options.TensorrtExecutionProvider]   # per provider (one of providers), passed to onnxruntime; the
    trt_fp16_enable = true      #   TensorRT engine cache is on by default in state_dir/trt-cache (private, kept)

    [tls]                       # mTLS to the cloud (`split-cloud enroll` writes this); paths relative to the file
    ca = "ca.pem"               # the deployment's CA: the cloud's certificate must be signed by it
    cert = "device.pem"         # this device's certificate (its identity: the device id)
    key = "device.key"
    server_name = "cloud.example"   # optional: the name checked in the cloud's certificate (default: cloud's host)

    insecure = true             # instead of [tls]: plaintext, loopback clouds only (with i_know_insecure: any)

    [backoff]                   # reconnecting to the cloud
    initial_s = 0.2
    max_s = 10.0
    multiplier = 2.0
    jitter = 1.0                # 1.0 = full jitter, 0 = none

    [input]                     # what `split-agent run` feeds
    source = "synthetic"        # or a folder of .npy files
    rate = 20.0                 # requests per second, 0 = as fast as max_in_flight allows
    count = 200

    [mqtt]                      # optional: fleet control plane (without it the agent never imports paho)
    broker = "10.0.0.5:1883"
    label = "kitchen camera"    # free-text display name on the dashboard
    flush_interval_ms = 500     # telemetry batches are published this often
    telemetry_bound = 10000     # records buffered while the broker is away; beyond it they are counted, dropped
    reconnect_min_s = 1
    reconnect_max_s = 30
    keepalive_s = 30            # MQTT keepalive: the broker marks the device offline after 1.5x this of silence
    tls_ca = "ca.pem"           # mutual TLS: the CA, this device's certificate and key (relative to this file);
    tls_cert = "device.pem"     #   without them the [tls] files are used; with neither, or insecure = true:
    tls_key = "device.key"      #   plaintext, loopback brokers only, unless i_know_insecure = true
    i_know_insecure = false

    [adaptive]                  # optional: pick the cut from the measured uplink (needs the plan table)
    enabled = true
    hysteresis = 1.25           # the estimate must cross a plan-table boundary by this ratio
    min_dwell_s = 5.0           # hold a cut at least this long
    min_samples = 5             # bandwidth samples needed before deciding
    probe_interval_s = 2.0      # measurement probes while nothing is sent (edge-only cut)
    calibration_interval_s = 5.0  # a probe in another codec: learns the fixed per-request cost (0: off)
    probe_budget_kb_per_min = 1024.0  # calibration probes send at most this many KB a minute (0: no cap)

    [service]                   # `split-agent serve`: the local inference API and the service's own behaviour
    socket = "/run/splitinfer-agent/agent.sock"  # Unix socket of the local API (access: its mode and group)
    socket_mode = "0660"        # the socket file's permissions (octal string)
    listen = ""                 # instead of the socket: loopback TCP "127.0.0.1:PORT" (port 0: a free one)
    allow_remote = false        # allow a listen address that is not loopback (plaintext, unauthenticated!)
    max_requests = 0            # local requests in flight at once (0: max_in_flight); beyond: RESOURCE_EXHAUSTED
    request_timeout_s = 30.0    # deadline of a local request whose caller set none (a caller's shorter one wins)
    max_message_mb = 64         # largest local request or answer, MiB
    drain_timeout_s = 20.0      # on SIGTERM/SIGINT: how long requests in flight may take to finish
    log_level = "INFO"          # DEBUG | INFO | WARNING | ERROR
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent import constants as C
from models.validate import FieldError, check_bool, check_choice, check_int, check_number, check_text
from protos import address
from protos.address import is_loopback
from protos.codec import SPEC_SYNTAX, VALID_SPECS, TensorError, parse_codec
from protos.mqtt import DEVICE_ID_RE

try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6): the `tomli` backport, which the [edge] extra installs there
    import tomli as tomllib  # type: ignore[no-redef]

HEAD_PRECISIONS = ("int8", "fp32")
RUNTIMES = ("onnxruntime", "litert")
AUTO_CODEC = C.DEFAULT_CODEC  # "auto": the plan's codec for the cut in use


class ConfigError(FieldError):
    """A config key has a bad value, or is unknown; the message names the key and what was expected."""

    def __init__(self, key: str | None, message: str, source: str = ""):
        super().__init__(key, message)
        self.source = source
        if source:
            self.args = (f"{source}: {self.args[0]}",)

    def within(self, prefix: str, source: str = "") -> ConfigError:
        """The same error with the key prefixed by its table name (and the source named)."""
        return ConfigError(f"{prefix}.{self.key}", self.detail, source or self.source)


# Value checks (protos/validate.py), raising ConfigError naming the key; each returns the normalised value.
_int = functools.partial(check_int, error=ConfigError)
_float = functools.partial(check_number, error=ConfigError)
_str = functools.partial(check_text, error=ConfigError)
_choice = functools.partial(check_choice, error=ConfigError)


def parse_address(value: str, key: str = "cloud") -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port", host kept in brackets) into host and port; ConfigError naming `key`."""
    try:
        host, port = address.parse_address(value, key)
    except address.AddressError:
        raise ConfigError(key, f"expected \"host:port\" with a port in 1..65535, got {value!r}") from None
    return (f"[{host}]" if ":" in host else host), port


# -- the config objects ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BackoffConfig:
    """Reconnect backoff: delay = min(max_s, initial_s * multiplier**attempt), then jittered."""

    initial_s: float = field(default=C.DEFAULT_BACKOFF_INITIAL_S, metadata={"doc": "first delay, seconds"})
    max_s: float = field(default=C.DEFAULT_BACKOFF_MAX_S, metadata={"doc": "largest delay, seconds"})
    multiplier: float = field(default=C.DEFAULT_BACKOFF_MULTIPLIER, metadata={"doc": "growth per attempt"})
    jitter: float = field(
        default=C.DEFAULT_BACKOFF_JITTER, metadata={"doc": "share of the delay drawn at random (1 = full jitter)"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial_s", _float("initial_s", self.initial_s, 0.0, lo_open=True))
        object.__setattr__(self, "max_s", _float("max_s", self.max_s, 0.0, lo_open=True))
        object.__setattr__(self, "multiplier", _float("multiplier", self.multiplier, 1.0))
        object.__setattr__(self, "jitter", _float("jitter", self.jitter, 0.0, 1.0))
        if self.max_s < self.initial_s:
            raise ConfigError("max_s", f"expected a number >= initial_s ({self.initial_s}), got {self.max_s}")


@dataclass(frozen=True)
class InputConfig:
    """What `split-agent run` feeds: a folder of .npy files or synthetic inputs, at a rate."""

    source: str = field(default="synthetic", metadata={"doc": '"synthetic" or a folder of .npy files'})
    rate: float = field(default=0.0, metadata={"doc": "requests per second; 0 = as fast as allowed"})
    count: int = field(default=100, metadata={"doc": "how many requests to send"})
    seed: int = field(default=0, metadata={"doc": "seed of the synthetic inputs"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _str("source", self.source))
        if not self.source:
            raise ConfigError("source", 'expected "synthetic" or a folder of .npy files, got ""')
        object.__setattr__(self, "rate", _float("rate", self.rate, 0.0))
        object.__setattr__(self, "count", _int("count", self.count, 1))
        object.__setattr__(self, "seed", _int("seed", self.seed, 0))


@dataclass(frozen=True)
class MqttConfig:
    """The fleet control plane: where the broker is and how telemetry is batched."""

    broker: str = field(default="", metadata={"doc": 'MQTT broker "host:port" (required in [mqtt])'})
    label: str | None = field(default=None, metadata={"doc": "free-text display name shown on the dashboard"})
    flush_interval_ms: int = field(default=500, metadata={"doc": "how often telemetry batches are published"})
    telemetry_bound: int = field(
        default=10_000, metadata={"doc": "records buffered while the broker is away; beyond it they are dropped"}
    )
    reconnect_min_s: int = field(default=1, metadata={"doc": "first MQTT reconnect delay, seconds"})
    reconnect_max_s: int = field(default=30, metadata={"doc": "largest MQTT reconnect delay, seconds"})
    keepalive_s: int = field(default=30, metadata={
        "doc": "MQTT keepalive, seconds: the broker shows the device offline after 1.5x this without a packet"})
    heartbeat_s: float = field(default=5.0, metadata={
        "doc": "an idle agent republishes its state this often, so the fleet store does not show it stale "
               "(split-cloud serve --stale-after, default 15 s)"})
    tls_ca: str | None = field(default=None, metadata={"doc": "CA certificate (PEM) the broker's certificate is "
                                                              "checked against ([tls] ca when present)"})
    tls_cert: str | None = field(default=None, metadata={"doc": "this device's certificate ([tls] cert)"})
    tls_key: str | None = field(default=None, metadata={"doc": "this device's private key ([tls] key)"})
    insecure: bool = field(default=False, metadata={
        "doc": "plaintext MQTT although the agent has TLS files (a lab broker on loopback)"})
    i_know_insecure: bool = field(default=False, metadata={
        "doc": "allow plaintext MQTT to a broker that is not on loopback (without the TLS files)"})

    def __post_init__(self) -> None:
        tls = {name: getattr(self, name) for name in ("tls_ca", "tls_cert", "tls_key")}
        for name, value in tls.items():
            if value is not None:
                _str(name, value, max_len=4096)
        if any(v is not None for v in tls.values()) and not all(v is not None for v in tls.values()):
            missing = [n for n, v in tls.items() if v is None]
            raise ConfigError(missing[0], "is required with the other TLS files: MQTT over TLS needs the CA, "
                                          "the device's certificate and its key")
        check_bool("i_know_insecure", self.i_know_insecure, error=ConfigError)
        check_bool("insecure", self.insecure, error=ConfigError)
        if self.insecure and any(v is not None for v in tls.values()):
            raise ConfigError("insecure", "cannot be set with tls_ca/tls_cert/tls_key: choose TLS or plaintext")
        if self.broker == "":
            raise ConfigError("broker", 'is required: the MQTT broker "host:port"')
        parse_address(self.broker, "broker")
        if self.label is not None:
            _str("label", self.label, max_len=256)
        object.__setattr__(self, "flush_interval_ms", _int("flush_interval_ms", self.flush_interval_ms, 1, 3_600_000))
        object.__setattr__(self, "telemetry_bound", _int("telemetry_bound", self.telemetry_bound, 1, 10_000_000))
        object.__setattr__(self, "reconnect_min_s", _int("reconnect_min_s", self.reconnect_min_s, 1, 3600))
        object.__setattr__(self, "reconnect_max_s", _int("reconnect_max_s", self.reconnect_max_s, 1, 3600))
        object.__setattr__(self, "keepalive_s", _int("keepalive_s", self.keepalive_s, 1, 65535))
        object.__setattr__(self, "heartbeat_s", _float("heartbeat_s", self.heartbeat_s, 0.0, 86_400.0, lo_open=True))
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError("reconnect_max_s", f"expected an integer >= reconnect_min_s ({self.reconnect_min_s}), "
                                                 f"got {self.reconnect_max_s}")

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the broker."""
        return parse_address(self.broker, "broker")

    @property
    def tls(self) -> tuple[str, str, str] | None:
        """(ca, cert, key) for mutual TLS, or None (plaintext)."""
        if self.tls_ca is None or self.tls_cert is None or self.tls_key is None:
            return None
        return self.tls_ca, self.tls_cert, self.tls_key


@dataclass(frozen=True)
class AdaptiveConfig:
    """Adaptive cut selection from the measured uplink (see edge_agent/bandwidth.py)."""

    enabled: bool = field(default=False, metadata={"doc": "switch cuts by the measured uplink and the plan table"})
    hysteresis: float = field(
        default=1.25, metadata={"doc": "ratio by which the estimate must cross a plan-table boundary"}
    )
    min_dwell_s: float = field(default=5.0, metadata={"doc": "hold a cut at least this long before switching"})
    min_samples: int = field(default=5, metadata={"doc": "bandwidth samples needed before deciding"})
    probe_interval_s: float = field(
        default=2.0, metadata={"doc": "measure with a probe this often while nothing is sent (edge-only cut)"}
    )
    calibration_interval_s: float = field(
        default=5.0, metadata={"doc": "send a probe in another codec this often to learn the fixed per-request "
                                      "cost (0: never; the health-check RTT alone is then subtracted)"}
    )
    probe_budget_kb_per_min: float = field(
        default=1024.0, metadata={"doc": "calibration probes send at most this many KB of payload in any minute, "
                                         "so that they never crowd a slow uplink's requests (0: no cap)"}
    )

    def __post_init__(self) -> None:
        check_bool("enabled", self.enabled, error=ConfigError)
        object.__setattr__(self, "hysteresis", _float("hysteresis", self.hysteresis, 1.0, 100.0))
        object.__setattr__(self, "min_dwell_s", _float("min_dwell_s", self.min_dwell_s, 0.0, 86_400.0))
        object.__setattr__(self, "min_samples", _int("min_samples", self.min_samples, 1, 10_000))
        object.__setattr__(
            self, "probe_interval_s", _float("probe_interval_s", self.probe_interval_s, 0.0, 86_400.0, lo_open=True)
        )
        object.__setattr__(
            self, "calibration_interval_s", _float("calibration_interval_s", self.calibration_interval_s, 0.0, 86_400.0)
        )
        object.__setattr__(
            self, "probe_budget_kb_per_min",
            _float("probe_budget_kb_per_min", self.probe_budget_kb_per_min, 0.0, 1e9),
        )


@dataclass(frozen=True)
class TlsConfig:
    """mTLS to the cloud tier: the CA that signs the cloud's certificate, and this device's certificate and key.

    Paths are read when the agent connects (a file config makes them relative to the file).
    """

    ca: Path = field(default=Path(), metadata={"doc": "CA certificate (PEM) the cloud's certificate must chain to"})
    cert: Path = field(default=Path(), metadata={"doc": "this device's certificate (PEM), from split-cloud enroll"})
    key: Path = field(default=Path(), metadata={"doc": "this device's private key (PEM)"})
    server_name: str | None = field(
        default=None, metadata={"doc": "name checked in the cloud's certificate (default: the host of cloud)"}
    )

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or not str(value) or str(value) == ".":
                raise ConfigError(name, f"is required in [tls]: a PEM file path, got {value!r}")
            object.__setattr__(self, name, Path(value))
        if self.server_name is not None:
            _str("server_name", self.server_name, max_len=253)
            if not self.server_name:
                raise ConfigError("server_name", "expected a host name, got \"\"")

    @classmethod
    def from_folder(cls, folder: str | Path, server_name: str | None = None) -> TlsConfig:
        """The files of a device folder written by `split-cloud enroll`: ca.pem, device.pem, device.key."""
        folder = Path(folder)
        return cls(ca=folder / "ca.pem", cert=folder / "device.pem", key=folder / "device.key",
                   server_name=server_name)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, key, cert) PEM bytes; ConfigError naming the tls key of a file that cannot be read."""
        out = []
        for name in ("ca", "key", "cert"):
            path = getattr(self, name)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"tls.{name}", f"cannot read {str(path)!r} ({exc.strerror or exc})") from None
            if b"-----BEGIN" not in data:
                raise ConfigError(f"tls.{name}", f"{str(path)!r} is not a PEM file")
            out.append(data)
        return out[0], out[1], out[2]


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_CONFIG = Path("/etc/splitinfer/agent.toml")  # what `split-agent serve` reads without --config
DEFAULT_SOCKET = "/run/splitinfer-agent/agent.sock"


@dataclass(frozen=True)
class ServiceConfig:
    """`split-agent serve`: where the local inference API listens, its bounds, and how the service stops."""

    socket: str = field(default=DEFAULT_SOCKET, metadata={
        "doc": "Unix socket of the local inference API (access control: the socket's mode and group)"})
    socket_mode: str = field(default="0660", metadata={"doc": 'permissions of the socket file, octal ("0660")'})
    listen: str = field(default="", metadata={
        "doc": 'serve the local API on TCP "127.0.0.1:PORT" instead of the socket (loopback only)'})
    allow_remote: bool = field(default=False, metadata={
        "doc": "allow a listen address that is not loopback: plaintext and unauthenticated"})
    max_requests: int = field(default=0, metadata={
        "doc": "local requests in flight at once (0: max_in_flight); beyond it: RESOURCE_EXHAUSTED"})
    request_timeout_s: float = field(default=30.0, metadata={
        "doc": "deadline of a local request whose caller set none (a shorter caller deadline wins)"})
    max_message_mb: int = field(default=64, metadata={"doc": "largest local request or answer, MiB"})
    drain_timeout_s: float = field(default=20.0, metadata={
        "doc": "on SIGTERM/SIGINT, how long requests in flight may take to finish before exiting non-zero"})
    log_level: str = field(default="INFO", metadata={"doc": "DEBUG, INFO, WARNING or ERROR"})

    def __post_init__(self) -> None:
        s = object.__setattr__
        _str("socket", self.socket, max_len=107)  # sun_path holds 108 bytes with its NUL
        if not self.socket or not self.socket.startswith("/"):
            raise ConfigError("socket", f"expected an absolute path, got {self.socket!r}")
        _str("socket_mode", self.socket_mode, max_len=4)
        try:
            mode = int(self.socket_mode, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
            raise ConfigError("socket_mode", f'expected octal permissions giving the owner rw, like "0660", '
                                             f"got {self.socket_mode!r}")
        check_bool("allow_remote", self.allow_remote, error=ConfigError)
        _str("listen", self.listen, max_len=300)
        if self.listen:  # port 0: a free port, named in the "serving on" line (tests, one-off runs)
            host, _port = parse_address(self.listen[:-1] + "1" if self.listen.endswith(":0") else self.listen,
                                        "listen")
            if not is_loopback(host.strip("[]")) and not self.allow_remote:
                raise ConfigError("listen", f"{self.listen!r} is not a loopback address: the local API is "
                                            "plaintext and unauthenticated (use the Unix socket, a loopback "
                                            "address, or allow_remote = true / --allow-remote)")
        s(self, "max_requests", _int("max_requests", self.max_requests, 0, 100_000))
        s(self, "request_timeout_s", _float("request_timeout_s", self.request_timeout_s, 0.0, 86_400.0,
                                            lo_open=True))
        s(self, "max_message_mb", _int("max_message_mb", self.max_message_mb, 1, 2047))
        s(self, "drain_timeout_s", _float("drain_timeout_s", self.drain_timeout_s, 0.0, 86_400.0, lo_open=True))
        s(self, "log_level", _choice("log_level", self.log_level, LOG_LEVELS))

    @property
    def socket_permissions(self) -> int:
        """socket_mode as an int."""
        return int(self.socket_mode, 8)


# The [table]s of an agent file, by name.
_TABLES: dict[str, type] = {
    "backoff": BackoffConfig, "input": InputConfig, "mqtt": MqttConfig, "adaptive": AdaptiveConfig, "tls": TlsConfig,
    "service": ServiceConfig,
}

NO_TRANSPORT_SECURITY = (
    "no [tls] table and not insecure: the agent talks to the cloud over mTLS by default; give [tls] ca/cert/key "
    "(the folder `split-cloud enroll DEVICE_ID` writes; flags --tls-ca --tls-cert --tls-key; Python: "
    "tls=TlsConfig.from_folder(dir)), or set insecure = true (--insecure; Python: insecure=True) for plaintext to a "
    "loopback cloud"
)




@dataclass(frozen=True)
class AgentConfig:
    """Everything the edge agent needs; validated when built, whatever it is built from."""

    bundle: Path = field(metadata={"doc": "split bundle directory (plan.json + ONNX files)"})
    cloud: str = field(default=C.DEFAULT_CLOUD, metadata={"doc": 'cloud tier address "host:port"'})
    device_id: str = field(default=C.DEFAULT_DEVICE_ID, metadata={"doc": "this device's id, [A-Za-z0-9_-]{1,64}"})
    cut: str | None = field(default=None, metadata={"doc": "cut id to run; default the bundle's chosen cut"})
    head_precision: str = field(default=C.DEFAULT_HEAD_PRECISION, metadata={"doc": '"int8" or "fp32" head'})
    codec: str = field(default=C.DEFAULT_CODEC, metadata={
        "doc": f"activation codec: auto (the plan's for the cut in use) or {SPEC_SYNTAX} (overrides the plan)"})
    deadline_ms: int = field(
        default=C.DEFAULT_DEADLINE_MS, metadata={"doc": "wait for the cloud's reply after sending, then finish locally"}
    )
    max_in_flight: int = field(default=C.DEFAULT_MAX_IN_FLIGHT, metadata={"doc": "bound on unfinished requests"})
    workers: int = field(default=C.DEFAULT_WORKERS, metadata={"doc": "edge compute threads (heads, local tails)"})
    intra_op_threads: int = field(
        default=C.DEFAULT_INTRA_OP_THREADS, metadata={"doc": "onnxruntime intra-op threads (0 = its default)"}
    )
    inter_op_threads: int = field(
        default=C.DEFAULT_INTER_OP_THREADS, metadata={"doc": "onnxruntime inter-op threads (0 = its default)"}
    )
    providers: tuple[str, ...] = field(
        default=C.DEFAULT_PROVIDERS, metadata={"doc": "onnxruntime execution providers, in order of preference"}
    )
    runtime: str = field(default=C.DEFAULT_RUNTIME, metadata={
        "doc": '"onnxruntime" or "litert": what runs the head (the local tail always runs on onnxruntime)'})
    provider_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, metadata={
        "doc": "[provider_options.<provider>] tables: options passed to that onnxruntime provider (TensorRT: "
               "engine cache on in state_dir/trt-cache unless trt_engine_cache_enable = false)"})
    state_dir: Path = field(default=C.DEFAULT_STATE_DIR, metadata={
        "doc": "the agent's own state (the TensorRT engine cache); default $STATE_DIRECTORY (systemd) or "
               "~/.local/state/splitinfer-agent"})
    keepalive_s: float = field(default=C.DEFAULT_KEEPALIVE_S, metadata={"doc": "HTTP/2 keepalive ping interval"})
    keepalive_timeout_s: float = field(
        default=C.DEFAULT_KEEPALIVE_TIMEOUT_S, metadata={"doc": "a ping unanswered this long breaks the stream"}
    )
    connect_timeout_s: float = field(
        default=C.DEFAULT_CONNECT_TIMEOUT_S, metadata={"doc": "deadline of the health check and of connecting"}
    )
    health_service: str = field(default=C.DEFAULT_HEALTH_SERVICE, metadata={"doc": "grpc.health.v1 service name"})
    probe_count: int = field(
        default=C.DEFAULT_PROBE_COUNT, metadata={"doc": "probe requests that must succeed before split mode again"}
    )
    backoff: BackoffConfig = field(default_factory=BackoffConfig, metadata={"doc": "reconnect backoff"})
    input: InputConfig = field(default_factory=InputConfig, metadata={"doc": "inputs for split-agent run"})
    mqtt: MqttConfig | None = field(default=None, metadata={"doc": "fleet control plane; none: no MQTT at all"})
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig, metadata={"doc": "adaptive cut selection"})
    tls: TlsConfig | None = field(default=None, metadata={"doc": "mTLS to the cloud: ca, cert, key (server_name)"})
    service: ServiceConfig = field(default_factory=ServiceConfig, metadata={"doc": "split-agent serve"})
    insecure: bool = field(
        default=False, metadata={"doc": "plaintext to the cloud, unauthenticated: loopback clouds only"}
    )
    i_know_insecure: bool = field(
        default=False, metadata={"doc": "allow insecure to a cloud that is not on loopback"}
    )

    def __post_init__(self) -> None:
        s = object.__setattr__
        if not isinstance(self.bundle, (str, Path)) or not str(self.bundle):
            raise ConfigError("bundle", f"expected a bundle directory path, got {self.bundle!r}")
        s(self, "bundle", Path(self.bundle))
        parse_address(self.cloud, "cloud")
        if not isinstance(self.device_id, str) or not DEVICE_ID_RE.fullmatch(self.device_id):
            raise ConfigError("device_id", f"expected 1-64 characters of [A-Za-z0-9_-], got {self.device_id!r}")
        if self.cut is not None and (not isinstance(self.cut, str) or not self.cut):
            raise ConfigError("cut", f"expected a cut id of the bundle, got {self.cut!r}")
        _choice("head_precision", self.head_precision, HEAD_PRECISIONS)
        if not isinstance(self.codec, str):
            raise ConfigError("codec", f"expected \"auto\" or a codec spec string like \"int8\", got {self.codec!r}")
        try:
            s(self, "codec", AUTO_CODEC if self.codec.strip().lower() == AUTO_CODEC else parse_codec(self.codec).spec)
        except TensorError:
            raise ConfigError("codec", f"expected auto or one of {', '.join(VALID_SPECS)}, got {self.codec!r}"
                              ) from None
        s(self, "deadline_ms", _int("deadline_ms", self.deadline_ms, 1, 2**32 - 1))
        s(self, "max_in_flight", _int("max_in_flight", self.max_in_flight, 1, 100_000))
        s(self, "workers", _int("workers", self.workers, 1, 256))
        s(self, "intra_op_threads", _int("intra_op_threads", self.intra_op_threads, 0, 1024))
        s(self, "inter_op_threads", _int("inter_op_threads", self.inter_op_threads, 0, 1024))
        providers = self.providers
        if isinstance(providers, str) or not isinstance(providers, (list, tuple)) or not providers:
            raise ConfigError("providers", f"expected a non-empty list of provider names, got {providers!r}")
        s(self, "providers", tuple(_str("providers", p) for p in providers))
        s(self, "runtime", _choice("runtime", self.runtime, RUNTIMES))
        s(self, "provider_options", _provider_options(self.provider_options, self.providers))
        if not isinstance(self.state_dir, (str, Path)) or not str(self.state_dir):
            raise ConfigError("state_dir", f"expected a directory path, got {self.state_dir!r}")
        s(self, "state_dir", Path(self.state_dir))
        s(self, "keepalive_s", _float("keepalive_s", self.keepalive_s, 0.0, lo_open=True))
        s(self, "keepalive_timeout_s", _float("keepalive_timeout_s", self.keepalive_timeout_s, 0.0, lo_open=True))
        s(self, "connect_timeout_s", _float("connect_timeout_s", self.connect_timeout_s, 0.0, lo_open=True))
        _str("health_service", self.health_service)
        s(self, "probe_count", _int("probe_count", self.probe_count, 1, 1000))
        if not isinstance(self.backoff, BackoffConfig):
            raise ConfigError("backoff", f"expected a [backoff] table, got {self.backoff!r}")
        if not isinstance(self.input, InputConfig):
            raise ConfigError("input", f"expected an [input] table, got {self.input!r}")
        if self.mqtt is not None and not isinstance(self.mqtt, MqttConfig):
            raise ConfigError("mqtt", f"expected an [mqtt] table, got {self.mqtt!r}")
        if not isinstance(self.adaptive, AdaptiveConfig):
            raise ConfigError("adaptive", f"expected an [adaptive] table, got {self.adaptive!r}")
        if not isinstance(self.service, ServiceConfig):
            raise ConfigError("service", f"expected a [service] table, got {self.service!r}")
        if self.tls is not None and not isinstance(self.tls, TlsConfig):
            raise ConfigError("tls", f"expected a [tls] table, got {self.tls!r}")
        check_bool("insecure", self.insecure, error=ConfigError)
        check_bool("i_know_insecure", self.i_know_insecure, error=ConfigError)
        if self.insecure and self.tls is not None:
            raise ConfigError("insecure", "cannot be set together with [tls]: choose mTLS or plaintext")

    def resolved_provider_options(self) -> dict[str, dict[str, str]]:
        """provider_options as onnxruntime takes them, with TensorRT's engine cache defaults (state_dir/trt-cache,
        created private); ConfigError naming the key when a cache folder is unsafe."""
        from models.ortopts import ProviderError, resolve_provider_options

        try:
            return resolve_provider_options(self.providers, self.provider_options, self.state_dir)
        except (ProviderError, ValueError) as exc:
            raise ConfigError("provider_options", str(exc)) from None

    def check_transport(self) -> str:
        """"tls" or "insecure": how the agent may talk to the cloud. ConfigError when neither is configured, or
        when insecure is asked for a cloud that is not on loopback without i_know_insecure.

        Checked by the gRPC link when it is made (and by `split-agent run` at start), not when the config is
        built, so that configs of agents that never dial a cloud (tests with a fake link) need neither.
        """
        if self.tls is not None:
            return "tls"
        if not self.insecure:
            raise ConfigError("tls", NO_TRANSPORT_SECURITY)
        host = parse_address(self.cloud)[0]
        if not is_loopback(host) and not self.i_know_insecure:
            raise ConfigError("insecure", f"refuses plaintext to {self.cloud!r}, which is not a loopback address: "
                                          "requests and results would cross the network unauthenticated and in "
                                          "the clear (use [tls], or add i_know_insecure = true / --i-know-insecure)")
        return "insecure"

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> AgentConfig:
        """Build from a TOML-shaped mapping; unknown or bad keys raise ConfigError naming them and `source`."""
        if not isinstance(data, Mapping):
            raise ConfigError(None, f"expected a table of keys, got {type(data).__name__}", source)
        data = dict(data)
        kwargs: dict[str, Any] = {}
        for name, sub in _TABLES.items():
            if name in data:
                value = data.pop(name)
                if isinstance(value, sub):
                    kwargs[name] = value
                    continue
                if not isinstance(value, Mapping):
                    raise ConfigError(name, f"expected a [{name}] table, got {value!r}", source)
                _reject_unknown(sub, value, source, prefix=f"{name}.")
                try:
                    kwargs[name] = sub(**value)
                except ConfigError as exc:
                    raise exc.within(name, source) from None
        _reject_unknown(cls, data, source)
        if "bundle" not in data:
            raise ConfigError("bundle", "is required: the split bundle directory", source)
        try:
            return cls(**data, **kwargs)
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.detail, source) from None

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> AgentConfig:
        """Read a TOML file; `overrides` (dotted keys like "input.rate" allowed) win over its values."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(None, "config file not found", str(path)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(None, f"cannot read it ({exc})", str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(None, f"not valid TOML ({exc})", str(path)) from None
        for key in ("bundle", "state_dir"):  # relative to the file, not the cwd
            if key in data and isinstance(data[key], str) and data[key] and not Path(data[key]).is_absolute():
                data[key] = str(path.parent / data[key])
        mqtt = data.get("mqtt")
        if isinstance(mqtt, dict):
            for name in ("tls_ca", "tls_cert", "tls_key"):
                if isinstance(mqtt.get(name), str) and not Path(mqtt[name]).is_absolute():
                    mqtt[name] = str(path.parent / mqtt[name])
        tls = data.get("tls")
        if isinstance(tls, dict):  # [tls] files are relative to the config file too
            data["tls"] = {k: (str(path.parent / v) if k in ("ca", "cert", "key") and isinstance(v, str)
                               and v and not Path(v).is_absolute() else v) for k, v in tls.items()}
        return cls.from_dict(merge_overrides(data, overrides or {}), source=str(path))

    def replace(self, **changes: Any) -> AgentConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def merge_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with `overrides` applied; a dotted key ("backoff.max_s") sets a key of a table."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        table, _, sub = key.partition(".")
        if sub:
            current = out.setdefault(table, {})
            if not isinstance(current, dict):
                raise ConfigError(table, f"expected a [{table}] table, got {current!r}")
            current[sub] = value
        else:
            out[key] = value
    return out


def describe() -> dict[str, str]:
    """Every config key (dotted for tables) with its description; the docs and --help read this."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(AgentConfig):
        out[f.name] = f.metadata.get("doc", "")
    for prefix, sub in _TABLES.items():
        for f in dataclasses.fields(sub):
            out[f"{prefix}.{f.name}"] = f.metadata.get("doc", "")
    return out


def _provider_options(value: Any, providers: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """[provider_options.<provider>] tables: each for a provider in `providers`, with scalar values."""
    if not isinstance(value, Mapping):
        raise ConfigError("provider_options", f"expected [provider_options.<provider>] tables, got {value!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, table in value.items():
        key = f"provider_options.{name}"
        if name not in providers:
            raise ConfigError(key, f"options for a provider that is not in providers {list(providers)}")
        if not isinstance(table, Mapping):
            raise ConfigError(key, f"expected a table of options, got {table!r}")
        for option, v in table.items():
            if not isinstance(option, str) or not option or isinstance(v, (dict, list)) or v is None:
                raise ConfigError(f"{key}.{option}", f"expected a string, number or boolean, got {v!r}")
        out[str(name)] = dict(table)
    return out


def _reject_unknown(cls: type, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", f"unknown key; expected one of {sorted(known)}", source)

