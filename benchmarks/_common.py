"""Shared helpers of the split-inference benchmarks: bundles with a middle cut, statistics, Markdown tables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle

# A Raspberry Pi 4 with a T4 in the cloud, and room for only part of the model on the device, so the planner
# must cut in the middle (on this host's numbers alone it keeps everything on one side). Objective "bytes":
# the least upload among the cuts that fit. The compute itself runs on this host in the benchmarks.
MID_CUT_PROFILE = {
    "resnet18": {"device": "rpi4", "cloud": "t4", "edge_memory_mb": 7.4, "objective": "bytes"},
    "mobilenet_v2": {"device": "rpi4", "cloud": "t4", "edge_memory_mb": 9.8, "objective": "bytes"},
}


def make_bundle(model: str, root: Path, network: str = "wifi") -> Path:
    """The bundle of `model` under `root` (reused when already there): tiny, or a zoo model with a middle cut."""
    out = Path(root) / model
    if (out / "plan.json").is_file():
        return out
    if model == "tiny":
        from models.tiny_bundle import make_tiny_bundle

        return make_tiny_bundle(out)
    from partitioning import profile

    settings = MID_CUT_PROFILE.get(model, {"device": "rpi4", "cloud": "t4"})
    print(f"# building the {model} bundle in {out} ({settings}) ...", file=sys.stderr, flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-calibration warning: known and irrelevant to timing
        profile(model, network=network, out=out, repeats=5, **settings)
    return out


def mid_cut(bundle: Bundle) -> str:
    """The bundle's chosen cut if it is a middle cut, else any middle cut it has; ValueError when none."""
    middles = [c for c in bundle.cut_ids if c not in (EDGE_ONLY, CLOUD_ONLY)]
    if not middles:
        raise ValueError(f"{bundle.root}: no middle cut (cuts: {list(bundle.cut_ids)})")
    return bundle.chosen if bundle.chosen in middles else middles[0]


def bundles_dir(arg: str | None, tmp: str) -> Path:
    """Where bundles live: --bundles DIR (kept between runs) or a temp dir."""
    path = Path(arg) if arg else Path(tmp)
    path.mkdir(parents=True, exist_ok=True)
    return path


def median(xs: Sequence[float]) -> float:
    """Median (nan for no data)."""
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """numpy's percentile (linear interpolation), q in [0, 100]; nan for no data."""
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table; floats get 2 decimals (3 significant digits below 1)."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def host_line() -> str:
    """Date, Python and CPU of this run, for the README."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}; {cpu}; {os.cpu_count()} cores; Python {platform.python_version()}"


def bench_pki(folder: Path, device_id: str = "bench") -> tuple[Path, Any]:
    """A CA for one benchmark run in `folder` (the servers' pki=) and the agent's TlsConfig for `device_id`:
    the benchmarks run mTLS, as deployed."""
    from cloud_tier.pki import CertificateAuthority
    from edge_agent.config import TlsConfig

    pki = Path(folder) / "pki"
    ca = CertificateAuthority(pki) if (pki / "ca.key").exists() else CertificateAuthority.init(pki)
    return pki, TlsConfig.from_folder(ca.enroll(device_id, pki / "devices" / device_id))
