"""`ProfileOptions`: every setting of `partitioning.profile` (and `split-profile`) in one typed, frozen value.

The CLI builds one from its arguments; tests and scripts build one, or pass the fields as keywords to
`profile(model, **overrides)`. Defaults are the CLI's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from models.loaders import InputHint
from models.plandoc import CALIBRATION_CHOICES
from models.validate import FieldError, check_int, check_number
from partitioning.costs import MIN_SECONDS
from partitioning.planner import PLAN_TABLE_MBPS, Budgets

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_REFINE = 3  # candidates timed as real head and tail when edge and cloud are both this host


@dataclass(frozen=True)
class ProfileOptions:
    """Where the model runs, over what link, under which budgets, and how it is measured and exported."""

    device: str = "local"  # "local" (measured here), a device-table name, or a saved profile .json
    cloud: str = "local"  # "local" (measured here) or a GPU class
    network: str | None = "wifi"  # a named network; None: a custom link from uplink_mbps
    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    rtt_ms: float | None = None
    max_latency_ms: float | None = None
    edge_memory_mb: float | None = None
    max_energy_mj: float | None = None
    objective: str = "latency"
    codec: str = "auto"  # "auto": each cut with the codec that costs least (partitioning.codecs); else that one
    out: str | Path | None = None  # write the bundle here; None: plan only
    calibration: str | Path | None = None  # folder of .npy/.npz inputs for the int8 heads
    calibration_method: str = "auto"  # minmax | entropy | percentile | auto (each in turn until the gate passes)
    input_shape: tuple[int, ...] | None = None
    input_hints: tuple[InputHint, ...] = ()  # per-input shapes and dtypes (--input-shape name=1x128:int64,...)
    int_high: int | None = None  # synthetic integer inputs below this where the graph does not bound them
    name: str | None = None  # the bundle's model name; None: from the file (default_model_name)
    allow_pickle: bool = False
    save_device_profile: str | Path | None = None
    repeats: int = 20
    measure_seconds: float = MIN_SECONDS  # every measurement here spans at least this long
    # a measurement whose runs would take longer keeps fewer (at least costs.MIN_REPEATS); 0: always `repeats`
    measure_budget: float = 10.0
    threads: int | None = None  # edge intra-op threads when measured here
    cloud_threads: int | None = None  # cloud threads when measured here (None: threads)
    # onnxruntime execution providers the edge is measured on here (None: the default, CUDA if present, then CPU),
    # with options per provider; recorded in the device profile and plan.json (host.providers, host.runtime)
    providers: tuple[str, ...] | None = None
    provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    plan_table_mbps: tuple[float, ...] = PLAN_TABLE_MBPS
    refine: int = DEFAULT_REFINE  # best candidates timed as real head and tail; 0 disables
    # what the device runs heads on; "litert": --device local is measured on LiteRT (timed graph prefixes) and the
    # bundle gets .tflite heads (partitioning/tflite.py), converted in the environment below (None: the default)
    edge_runtime: str = "onnxruntime"
    converter_python: str | None = None
    converter_env: str | Path | None = None

    def __post_init__(self) -> None:
        """Check the numeric options; FieldError (a ValueError) names the first bad one."""
        check_int("refine", self.refine, 0)  # candidates to time; 0 disables
        if self.edge_runtime not in ("onnxruntime", "litert"):
            raise FieldError("edge_runtime", f"{self.edge_runtime!r}: expected 'onnxruntime' or 'litert'")
        check_number("measure_seconds", self.measure_seconds, 0)
        if self.int_high is not None:
            check_int("int_high", self.int_high, 1)
        if self.calibration_method not in CALIBRATION_CHOICES:
            raise FieldError("calibration_method", f"{self.calibration_method!r}: expected one of "
                             f"{', '.join(CALIBRATION_CHOICES)}")
        stray = sorted(set(self.provider_options) - set(self.providers or ()))
        if stray:  # measuring passes options only to the providers it runs: these would be dropped unsaid
            raise FieldError("provider_options", f"options for {', '.join(stray)}, which is not among the providers "
                             f"{list(self.providers or ())}: name it in --providers")
        if self.name is not None and not _NAME.fullmatch(self.name):
            raise FieldError("name", f"{self.name!r}: expected letters, digits, '.', '_' and '-' "
                             "(at most 64, starting with a letter or digit)")

    @property
    def budgets(self) -> Budgets:
        """The planner's budgets and objective."""
        return Budgets(self.max_latency_ms, self.edge_memory_mb, self.max_energy_mj, self.objective)

    @property
    def cloud_measure_threads(self) -> int | None:
        """Threads when the cloud is measured here: cloud_threads, else threads."""
        return self.threads if self.cloud_threads is None else self.cloud_threads

    @property
    def both_local(self) -> bool:
        """Edge and cloud are both this host (refinement times real heads and tails only then)."""
        return self.device == "local" and self.cloud == "local"
