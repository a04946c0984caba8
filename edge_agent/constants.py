"""Defaults of the edge agent and the only place that reads environment overrides.

Every `SPLITINFER_AGENT_*` variable is read here, once, at import; nothing else in `edge_agent` reads the
environment. Config files and CLI flags win over these.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_PREFIX = "SPLITINFER_AGENT_"


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


# Where the agent looks for the cloud when neither the config nor a flag says.
DEFAULT_CLOUD = _env("CLOUD", "127.0.0.1:50051")
DEFAULT_DEVICE_ID = _env("DEVICE_ID", "edge-0")

DEFAULT_HEAD_PRECISION = "int8"
DEFAULT_CODEC = "auto"  # the plan's codec for the cut in use (edge_agent.agent)
PLANLESS_CODEC = "int8"  # "auto" with a plan.json older than the codec choice
DEFAULT_DEADLINE_MS = 1000
DEFAULT_MAX_IN_FLIGHT = 32
DEFAULT_WORKERS = 2
DEFAULT_INTRA_OP_THREADS = 1
DEFAULT_INTER_OP_THREADS = 1
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
DEFAULT_RUNTIME = _env("RUNTIME", "onnxruntime")
# The agent's state (the TensorRT engine cache): systemd's StateDirectory= when run as the service.
DEFAULT_STATE_DIR = Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0]
                         or _env("STATE_DIR", os.path.expanduser("~/.local/state/splitinfer-agent")))

# The agent pings every 20 s; the cloud accepts pings every 10 s without calls (its
# grpc.http2.min_ping_interval_without_data_ms), so it never answers GOAWAY too_many_pings.
DEFAULT_KEEPALIVE_S = 20.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 3.0
DEFAULT_HEALTH_SERVICE = "splitinfer.v1.SplitInference"  # the cloud also answers "" (whole server)

DEFAULT_BACKOFF_INITIAL_S = 0.2
DEFAULT_BACKOFF_MAX_S = 10.0
DEFAULT_BACKOFF_MULTIPLIER = 2.0
DEFAULT_BACKOFF_JITTER = 1.0  # 1.0 = full jitter

DEFAULT_PROBE_COUNT = 3

# A ResNet-50 early activation is 3.2 MB in fp32; 64 MiB leaves room, on both ends.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Bound on how long close() waits for in-flight requests before finishing them on the device.
CLOSE_DRAIN_S = float(_env("CLOSE_DRAIN_S", "10"))
