"""Tail executors: one onnxruntime session per tail file, found in the bundles of a directory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.extras import require
from models.manifest import CLOUD_ONLY, PLAN_FILE, Bundle, BundleError, TensorSpec
from models.ortopts import make_session

log = logging.getLogger(__name__)


def select_providers(prefer_gpu: bool = True) -> list[str]:
    """onnxruntime execution providers in order: CUDA first when present and wanted, CPU always."""
    ort = require("onnxruntime", "edge")
    available = ort.get_available_providers()
    chosen = ["CUDAExecutionProvider"] if prefer_gpu and "CUDAExecutionProvider" in available else []
    return chosen + ["CPUExecutionProvider"]


class TailExecutor:
    """Runs one tail model; thread-safe (onnxruntime sessions allow concurrent `run`)."""

    def __init__(self, path: Path, *, intra_op_threads: int = 1, prefer_gpu: bool = True):
        try:
            self.session = make_session(path, threads=intra_op_threads, providers=select_providers(prefer_gpu))
        except Exception as exc:  # onnxruntime raises its own exception types for bad model files
            raise BundleError(f"{path}: onnxruntime cannot load this tail ({exc})") from exc
        self.path = path
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.providers = tuple(self.session.get_providers())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the tail on `feeds` (input name -> array); returns output name -> array."""
        outs = self.session.run(list(self.output_names), dict(feeds))
        return dict(zip(self.output_names, outs))


@dataclass(frozen=True)
class ServedTail:
    """One (model, cut) the cloud serves: what it accepts and the executor that runs it."""

    model: str
    cut: str
    inputs: tuple[TensorSpec, ...]
    executor: TailExecutor


class ModelRegistry:
    """Every tail of every bundle under a directory, by (model, cut)."""

    def __init__(self, tails: Mapping[tuple[str, str], ServedTail]):
        self._tails = dict(tails)

    @classmethod
    def load(cls, bundles_dir: str | Path, *, intra_op_threads: int = 1, prefer_gpu: bool = True) -> ModelRegistry:
        """Load each subdirectory of `bundles_dir` holding a plan.json; BundleError on any bad bundle."""
        root = Path(bundles_dir)
        if not root.is_dir():
            raise BundleError(f"{root}: not a directory of bundles")
        dirs = sorted(p for p in root.iterdir() if (p / PLAN_FILE).is_file())
        if (root / PLAN_FILE).is_file():
            dirs.insert(0, root)  # a single bundle given directly
        if not dirs:
            raise BundleError(f"{root}: no bundles (subdirectories with {PLAN_FILE}); make one with split-profile")
        sessions: dict[Path, TailExecutor] = {}  # full.onnx may serve several cuts: load it once
        tails: dict[tuple[str, str], ServedTail] = {}
        owners: dict[str, Path] = {}
        for bdir in dirs:
            bundle = Bundle.load(bdir)
            name = bundle.model_name
            if name in owners:
                raise BundleError(f"{bdir}: model {name!r} is already served from {owners[name]}")
            owners[name] = bdir
            for cut_id in bundle.cut_ids:
                cut = bundle.cut(cut_id)
                path = cut.tail if cut.tail is not None else (bundle.full if cut_id == CLOUD_ONLY else None)
                if path is None:
                    continue  # edge-only: nothing runs in the cloud
                key = path.resolve()
                if key not in sessions:
                    sessions[key] = TailExecutor(path, intra_op_threads=intra_op_threads, prefer_gpu=prefer_gpu)
                executor = sessions[key]
                want = sorted(t.name for t in cut.tensors)
                if sorted(executor.input_names) != want:
                    raise BundleError(
                        f"{path}: tail inputs {sorted(executor.input_names)} do not match cut {cut_id!r} tensors {want}"
                    )
                tails[(name, cut_id)] = ServedTail(name, cut_id, cut.tensors, executor)
            log.info("serving %s from %s: cuts %s", name, bdir, [c for (m, c) in tails if m == name])
        return cls(tails)

    def get(self, model: str, cut: str) -> ServedTail | None:
        """The served tail of (model, cut), or None."""
        return self._tails.get((model, cut))

    def describe_missing(self, model: str, cut: str) -> str:
        """Why (model, cut) is not served, listing what is."""
        cuts = sorted(c for (m, c) in self._tails if m == model)
        if cuts:
            return f"model {model!r} has no served cut {cut!r}; served cuts: {cuts}"
        return f"model {model!r} is not served; served models: {sorted({m for m, _ in self._tails})}"

    def served(self) -> list[ServedTail]:
        """Every served tail, sorted by (model, cut)."""
        return [self._tails[k] for k in sorted(self._tails)]
