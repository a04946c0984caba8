"""Graph analysis, costs, the planner, head/tail extraction, int8 quantization and `split-profile`.

`profile(model, options=None, **overrides)` is the Python form of the CLI (settings: `ProfileOptions`). Heavy
modules (onnx, torch) are imported only when used, so `partitioning.costs` (measuring), `partitioning.devices`
and `partitioning.device_profile` (saved profiles) work on a device with just the [edge] extra.

Cost modules, bottom up: `costtypes` (plain cost data), `onnxwire` (the ONNX graph read without onnx),
`attribution` (profiler kernels -> nodes), `costs` (measuring), `estimate` (roofline), `device_profile`.
"""

from typing import Any

__all__ = ["profile", "ProfileOptions", "ProfileResult", "NoFeasiblePlanError", "Refiner", "Budgets", "Plan"]


def __getattr__(name: str) -> Any:
    if name in ("profile", "ProfileResult", "NoFeasiblePlanError"):
        from partitioning import api

        return getattr(api, name)
    if name == "ProfileOptions":
        from partitioning.options import ProfileOptions

        return ProfileOptions
    if name == "Refiner":
        from partitioning.refine import Refiner

        return Refiner
    if name in ("Budgets", "Plan"):
        from partitioning import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'partitioning' has no attribute {name!r}")
