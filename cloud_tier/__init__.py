"""The cloud tier: the serving node of splitinfer.

The gRPC tier (`CloudServer`: servicer, dynamic batcher, tail executors) and, beside it, the fleet control plane
(MQTT broker, fleet store, controller, dashboard with Prometheus /metrics), assembled by
`cloud_tier.node.CloudNode` and run by `split-cloud serve`. `CloudServer(bundles_dir, host, port, **ServerConfig
fields)` serves in-process. Lab tools (link proxy, process harness, `split-demo`) live in `cloud_tier.lab`.
"""

from cloud_tier.config import ConfigError, NodeOptions, ServerConfig
from cloud_tier.server import CloudServer, ServerStartError
from cloud_tier.stats import ServerStats

__all__ = ["CloudServer", "ConfigError", "NodeOptions", "ServerConfig", "ServerStartError", "ServerStats"]
