"""One .tflite model on LiteRT, with ONNX-style float feeds and results (shared by the edge runner and the
bundle writer's verification; imports nothing of ours and no torch/onnx).

The .tflite heads in a bundle carry the ONNX names and layout at both ends (see partitioning/tflite.py), so what
is left here is the interpreter's own business: int8 inputs are quantized and int8 outputs dequantized with each
tensor's scale and zero point, and a batch of N rows runs row by row (the converted heads have batch 1). An instance
is NOT thread-safe (neither is a LiteRT Interpreter): one per thread.

The runtime is `ai-edge-litert` (`ai_edge_litert.interpreter`), else the older `tflite-runtime` where that is what
the device has.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

LITERT_INSTALL = "pip install 'splitinfer[litert]' (or: pip install ai-edge-litert)"
LITERT_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def interpreter_class() -> Any | None:
    """LiteRT's Interpreter class (ai-edge-litert's, else tflite-runtime's), or None when neither is installed."""
    for name in LITERT_MODULES:
        try:
            return importlib.import_module(name).Interpreter
        except ImportError:
            continue
    return None


class LiteRTPort:
    """One input or output of an interpreter: its index, dtype, shape and int8 affine parameters."""

    def __init__(self, detail: Mapping[str, Any]):
        self.name = str(detail["name"])
        self.index = int(detail["index"])
        self.dtype = np.dtype(detail["dtype"])
        self.shape = tuple(int(d) for d in detail["shape"])
        scale, zero = detail.get("quantization", (0.0, 0))
        self.scale = float(scale)
        self.zero_point = int(zero)

    @property
    def quantized(self) -> bool:
        """Whether values cross this port as integers with a scale and zero point."""
        return self.dtype.kind in "iu" and self.scale > 0

    def to_tensor(self, x: np.ndarray) -> np.ndarray:
        """The model-side array for float input `x`: quantized when the port is integer."""
        if not self.quantized:
            return np.ascontiguousarray(x, dtype=self.dtype)
        info = np.iinfo(self.dtype)
        q = np.round(np.asarray(x, dtype=np.float32) / np.float32(self.scale)) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def from_tensor(self, q: np.ndarray) -> np.ndarray:
        """The float32 values of a model-side array: dequantized when the port is integer."""
        if not self.quantized:
            return q
        return ((q.astype(np.int32) - self.zero_point) * np.float32(self.scale)).astype(np.float32)


class LiteRTModel:
    """A .tflite file in one LiteRT interpreter; `run` takes and returns float arrays by ONNX name."""

    def __init__(self, interpreter_cls: Any, path: Path, num_threads: int | None = None):
        self.path = Path(path)
        self.interpreter = interpreter_cls(model_path=str(self.path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.inputs = [LiteRTPort(d) for d in self.interpreter.get_input_details()]
        self.outputs = [LiteRTPort(d) for d in self.interpreter.get_output_details()]
        self.input_names = tuple(p.name for p in self.inputs)
        self.output_names = tuple(p.name for p in self.outputs)

    def shape_error(self, feeds: Mapping[str, np.ndarray]) -> str | None:
        """Why `feeds` do not fit the inputs (a name missing, another shape past the batch axis), or None."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            return f"{self.path.name}: missing inputs {missing}; it takes {list(self.input_names)}"
        for port in self.inputs:
            shape = np.shape(feeds[port.name])
            if len(shape) != len(port.shape) or tuple(shape[1:]) != port.shape[1:]:
                return (f"{self.path.name}: input {port.name!r} has shape {shape}, expected "
                        f"(N, {', '.join(map(str, port.shape[1:]))})")
        batches = {np.shape(feeds[port.name])[0] for port in self.inputs if np.ndim(feeds[port.name])}
        if 0 in batches or len(batches) > 1:
            return f"{self.path.name}: the inputs' batch sizes are {sorted(batches)}; they must agree and be at least 1"
        return None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Name -> float array for every output, from name -> float array (batch N on axis 0) for the inputs."""
        arrays = [np.asarray(feeds[p.name]) for p in self.inputs]
        batch = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        if batch == 1:
            return self._invoke(arrays)
        rows = [self._invoke([a[i : i + 1] for a in arrays]) for i in range(batch)]
        return {n: np.concatenate([r[n] for r in rows]) for n in self.output_names}

    def _invoke(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        for port, arr in zip(self.inputs, arrays):
            self.interpreter.set_tensor(port.index, port.to_tensor(arr))
        self.interpreter.invoke()
        return {p.name: p.from_tensor(self.interpreter.get_tensor(p.index)) for p in self.outputs}
