"""Starting or joining Ray, shared by `split-cloud serve --backend ray` and `split-batch` (light: no Ray Serve)."""

from __future__ import annotations

import os
from types import ModuleType

INSTALL_LINE = 'pip install "splitinfer[ray]"'


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only(ray: ModuleType) -> None:
    """Keep a private local cluster on 127.0.0.1. Ray turns `_node_ip_address="127.0.0.1"` into the machine's
    outward address (services.resolve_ip_for_localhost) and its GCS, raylet and agents then listen on every
    interface, unless its "no cluster" mode is on: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the processes Ray starts read
    the environment; the driver's copy of the constant, read at `import ray`, is set too). Never for a cluster
    joined by address: its nodes must reach this driver."""
    os.environ[LOOPBACK_ENV] = "0"
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = False


def start_ray(ray: ModuleType, address: str | None, *, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`, or start a private one on this machine listening on 127.0.0.1 only
    (`loopback_only`); False
    when Ray was already initialized here.

    RAY_AUTH_MODE is left to the environment: unset, a new local cluster uses token auth (Ray >= 2.59 writes
    ~/.ray/auth_token); tests pin it. Set it before `import ray`, never here: Ray caches its config at import, and
    RAY_AUTH_MODE=token set later reaches Ray's servers but not the driver's token setup (the GCS then dies)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        loopback_only(ray)
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 num_cpus=num_cpus)
    return True
