"""Graph analysis, costs, the planner, head/tail extraction, int8 quantization and `split-profile`.

`profile(...)` is the Python form of the CLI. Heavy modules (onnx, torch) are imported only when used, so
`partitioning.costs` and `partitioning.devices` work on a device with just the [edge] extra.
"""

from typing import Any

__all__ = ["profile", "ProfileResult", "NoFeasiblePlanError", "Budgets", "Plan"]


def __getattr__(name: str) -> Any:
    if name in ("profile", "ProfileResult", "NoFeasiblePlanError"):
        from partitioning import api

        return getattr(api, name)
    if name in ("Budgets", "Plan"):
        from partitioning import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'partitioning' has no attribute {name!r}")
