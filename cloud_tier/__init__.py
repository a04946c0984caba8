"""The cloud tier: gRPC server, dynamic batcher and tail executors (fleet store, dashboard: later).

`CloudServer(bundles_dir, host, port, **ServerConfig fields)` serves in-process; `split-cloud serve`
runs it as a process; `CloudProcess` starts that process for tests and benchmarks.
"""

from cloud_tier.config import ServerConfig
from cloud_tier.process import CloudProcess
from cloud_tier.server import CloudServer, ServerStartError
from cloud_tier.stats import ServerStats

__all__ = ["CloudProcess", "CloudServer", "ServerConfig", "ServerStartError", "ServerStats"]
