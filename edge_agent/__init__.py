"""The edge agent: runs a bundle's int8 head on the device, streams the cut activation to the cloud tier over
gRPC, and finishes every request on the device when the cloud is slow or gone.

Never imports torch, onnx, cloud_tier or partitioning: a Raspberry Pi needs only `splitinfer[edge]`.
The MQTT control plane (`edge_agent.control.ControlLink`) is imported only when a config has an [mqtt] table.
"""

from edge_agent.agent import EdgeAgent
from edge_agent.bandwidth import AdaptiveCut, BandwidthEstimator, CutPolicy, Estimate
from edge_agent.config import (
    AdaptiveConfig,
    AgentConfig,
    BackoffConfig,
    ConfigError,
    InputConfig,
    MqttConfig,
    TlsConfig,
)
from edge_agent.results import (
    CLOUD,
    EDGE,
    LOCAL,
    SPLIT,
    AgentClosedError,
    AgentError,
    AgentStats,
    InferenceResult,
    InFlightLimitError,
    StageTimes,
)
from edge_agent.runtime import InputError, ModelLoadError

__all__ = [
    "CLOUD",
    "EDGE",
    "LOCAL",
    "SPLIT",
    "AdaptiveConfig",
    "AdaptiveCut",
    "AgentClosedError",
    "AgentConfig",
    "AgentError",
    "AgentStats",
    "BackoffConfig",
    "BandwidthEstimator",
    "ConfigError",
    "CutPolicy",
    "EdgeAgent",
    "Estimate",
    "InFlightLimitError",
    "InferenceResult",
    "InputConfig",
    "InputError",
    "ModelLoadError",
    "MqttConfig",
    "StageTimes",
    "TlsConfig",
]
