"""Head/tail extraction on the ONNX graph by tensor name, and the check that head then tail equals the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.dtypes import onnx_type
from models.extras import require
from models.ortopts import make_session


class SplitMismatchError(RuntimeError):
    """Head then tail does not reproduce the full model within tolerance."""


def _with_value_info(model, names: Sequence[str]):
    """Shape-inferred copy of `model` where every name has at least an element type (Extractor needs it)."""
    onnx = require("onnx", "profile")
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    known = {vi.name for vi in (*graph.value_info, *graph.input, *graph.output)}
    missing = [n for n in names if n not in known]
    if missing:
        # Types the static inference could not reach: take them from one run (graph.py's probe does the same).
        from partitioning.graph import shapes_at_batch_one

        shapes = shapes_at_batch_one(model, missing)
        for name in missing:
            elem = onnx_type(shapes[name][1])
            inferred.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return inferred


class Splitter:
    """Cuts one model at many places: its shapes are inferred once (for every tensor in `names`), not per part."""

    def __init__(self, model, names: Sequence[str]) -> None:
        self.model = model
        self._prepare(names)

    def _prepare(self, names: Sequence[str]) -> None:
        onnx = require("onnx", "profile")
        self._extractor = onnx.utils.Extractor(_with_value_info(self.model, list(dict.fromkeys(names))))
        self._known = set(self._extractor.value_infos)

    def part(self, inputs: Sequence[str], outputs: Sequence[str], path: Path) -> Path:
        """Write the subgraph computing `outputs` from `inputs` (initializers and constants copied in)."""
        onnx = require("onnx", "profile")
        if not self._known.issuperset([*inputs, *outputs]):  # a name not prepared for: prepare for it now
            self._prepare([*self._known, *inputs, *outputs])
        part = self._extractor.extract_model(list(inputs), list(outputs))
        part.producer_name = "splitinfer"
        onnx.checker.check_model(part)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(part, str(path))
        return path

    def split(self, cut: Sequence[str], head_path: Path, tail_path: Path) -> tuple[Path, Path]:
        """Write head (model inputs -> cut tensors) and tail (cut tensors -> model outputs)."""
        graph = self.model.graph
        inputs = [i.name for i in graph.input if i.name not in {x.name for x in graph.initializer}]
        outputs = [o.name for o in graph.output]
        return self.part(inputs, cut, head_path), self.part(cut, outputs, tail_path)


def extract_part(model, inputs: Sequence[str], outputs: Sequence[str], path: Path) -> Path:
    """Write the subgraph computing `outputs` from `inputs` (initializers and constants copied in)."""
    return Splitter(model, [*inputs, *outputs]).part(inputs, outputs, path)


def extract_split(model, cut: Sequence[str], head_path: Path, tail_path: Path) -> tuple[Path, Path]:
    """Write head (model inputs -> cut tensors) and tail (cut tensors -> model outputs)."""
    graph = model.graph
    io = [i.name for i in graph.input] + [o.name for o in graph.output]
    return Splitter(model, [*io, *cut]).split(cut, head_path, tail_path)


def session(path: Path | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with the project's default options."""
    return make_session(path, threads=threads or None, inter_threads=None)


def run_split(head, tail, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run head (a session or None) then tail (a session or None) the way agent and cloud do."""
    values = dict(feeds)
    if head is not None:
        names = [o.name for o in head.get_outputs()]
        values = dict(zip(names, head.run(names, {i.name: values[i.name] for i in head.get_inputs()})))
    if tail is None:
        return list(values.values())
    return tail.run(None, {i.name: values[i.name] for i in tail.get_inputs()})


@dataclass(frozen=True)
class SplitCheck:
    """How far head-then-tail is from the full model on the sample inputs."""

    max_abs_error: float
    tolerance: float
    samples: int

    @property
    def passed(self) -> bool:
        """Within tolerance."""
        return self.max_abs_error <= self.tolerance

    def to_json(self) -> dict:
        """The plan.json form."""
        return {"max_abs_error": self.max_abs_error, "tolerance": self.tolerance, "samples": self.samples,
                "passed": self.passed}


def verify_split(full, head, tail, samples: Sequence[Mapping[str, np.ndarray]], rtol: float = 1e-4,
                 reference: Sequence[Sequence[np.ndarray]] | None = None) -> SplitCheck:
    """Compare head-then-tail with the full model; tolerance = rtol * max(1, max |reference|).

    `reference`: the full model's outputs for `samples`, when they were computed already (else `full` runs).
    """
    worst, scale = 0.0, 1.0
    for i, feeds in enumerate(samples):
        ref = full.run(None, dict(feeds)) if reference is None else reference[i]
        got = run_split(head, tail, feeds)
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise SplitMismatchError(f"split output shape {g.shape} differs from the model's {r.shape}")
            worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - g))) if r.size else 0.0)
            scale = max(scale, float(np.max(np.abs(r))) if r.size else 0.0)
    return SplitCheck(worst, rtol * scale, len(samples))
