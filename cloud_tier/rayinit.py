"""Starting or joining Ray, shared by `split-cloud serve --backend ray` and `split-batch` (light: no Ray Serve)."""

from __future__ import annotations

import os
from types import ModuleType

INSTALL_LINE = 'pip install "splitinfer[ray]"'


def start_ray(ray: ModuleType, address: str | None, *, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`, or start a private one on this machine reachable from loopback only (token
    auth unless RAY_AUTH_MODE says otherwise); False when Ray was already initialized here."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # pinned: Ray's default for new local clusters since 2.59
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 num_cpus=num_cpus)
    return True
