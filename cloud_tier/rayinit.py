"""Starting or joining Ray, shared by `split-cloud serve --backend ray` and `split-batch` (light: no Ray Serve)."""

from __future__ import annotations

from types import ModuleType

INSTALL_LINE = 'pip install "splitinfer[ray]"'


def start_ray(ray: ModuleType, address: str | None, *, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`, or start a private one on this machine reachable from loopback only; False
    when Ray was already initialized here.

    RAY_AUTH_MODE is left to the environment: unset, a new local cluster uses token auth (Ray >= 2.59 writes
    ~/.ray/auth_token); tests pin it. Set it before `import ray`, never here: Ray caches its config at import, and
    RAY_AUTH_MODE=token set later reaches Ray's servers but not the driver's token setup (the GCS then dies)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 num_cpus=num_cpus)
    return True
