"""LiteRT (TFLite) backend of the edge: a bundle's `head.tflite` / `head.int8.tflite` behind the runner interface.

The heads `split-profile convert BUNDLE --edge-runtime litert` writes keep the ONNX names and layout at both ends,
so `run` takes the model inputs and returns the cut tensors exactly as the ONNX head would (float32, ONNX layout):
the local tail (onnxruntime) and the cloud take them unchanged. int8 quantize/dequantize and the row-by-row batch
are models/litert.py's; this class adds what the agent needs: one interpreter per thread (a LiteRT Interpreter must
not be invoked from two threads at once; the agent's workers call `run` concurrently) and its error types.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge_agent import runtime as _runtime
from edge_agent.runtime import InputError, ModelLoadError, RuntimeOptions
from models.litert import LITERT_INSTALL, LiteRTModel, interpreter_class


class _MissingRuntime(ModelLoadError):
    """LiteRT is not installed (stand-in where edge_agent.runtime has no RuntimeMissingError)."""


RuntimeMissingError: type[ModelLoadError] = getattr(_runtime, "RuntimeMissingError", _MissingRuntime)


class LiteRTRunner:
    """A .tflite model on LiteRT: `input_names`, `output_names` (ONNX names), `run` (thread-safe), `close`."""

    def __init__(self, path: Path, options: RuntimeOptions | None = None):
        self.path = Path(path)
        cls = interpreter_class()
        if cls is None:
            raise RuntimeMissingError(f"runtime 'litert' needs ai-edge-litert, which is not installed: "
                                      f"{LITERT_INSTALL}")
        self._cls = cls
        self._threads = (options or RuntimeOptions()).intra_op_threads or None
        self._local = threading.local()
        self._closed = False
        first = self._model()  # loaded here so that a bad file fails when the agent starts, not on a request
        self.input_names = first.input_names
        self.output_names = first.output_names

    def _model(self) -> LiteRTModel:
        """This thread's interpreter, made on its first call."""
        model: LiteRTModel | None = getattr(self._local, "model", None)
        if model is None:
            if self._closed:
                raise ModelLoadError(f"{self.path}: this LiteRT runner was closed")
            try:
                model = LiteRTModel(self._cls, self.path, self._threads)
            except (ValueError, RuntimeError) as exc:  # LiteRT reports an unreadable model as either
                raise ModelLoadError(f"{self.path}: LiteRT cannot load it ({exc})") from exc
            self._local.model = model
        return model

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on `feeds` (ONNX name -> array, batch N); returns ONNX name -> float32 array."""
        model = self._model()
        error = model.shape_error(feeds)
        if error:
            raise InputError(error)
        return model.run(feeds)

    def close(self) -> None:
        """Drop the interpreters (another thread's goes when that thread ends); idempotent."""
        self._closed = True
        self._local = threading.local()
