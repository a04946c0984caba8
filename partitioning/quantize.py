"""Static int8 quantization of a head behind a small calibration reader, and its accuracy gate."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.extras import require
from models.manifest import TensorSpec

log = logging.getLogger(__name__)

Sample = Mapping[str, np.ndarray]


class CalibrationError(ValueError):
    """Calibration data that does not fit the model's inputs."""


def load_calibration(directory: Path, inputs: Sequence[TensorSpec], limit: int = 64) -> list[dict[str, np.ndarray]]:
    """Samples (batch 1 each) from a folder of .npy files (one input) or .npz files (keyed by input name)."""
    if not directory.is_dir():
        raise CalibrationError(f"--calibration {directory}: not a directory of .npy/.npz files")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".npy", ".npz"))
    if not files:
        raise CalibrationError(f"--calibration {directory}: no .npy or .npz files in it")
    samples: list[dict[str, np.ndarray]] = []
    for path in files:
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{path}: not a readable numpy file ({exc})") from exc
        arrays = dict(loaded) if path.suffix == ".npz" else {inputs[0].name: loaded}
        if path.suffix == ".npy" and len(inputs) > 1:
            raise CalibrationError(f"{path}: the model has {len(inputs)} inputs; use .npz files keyed by input name")
        for spec in inputs:
            if spec.name not in arrays:
                raise CalibrationError(f"{path}: no array for input {spec.name!r}")
            arr = np.asarray(arrays[spec.name], dtype=np.dtype(spec.dtype))
            want = spec.concrete_shape(1)[1:]
            if arr.shape == want:
                arr = arr[None]
            if arr.shape[1:] != want:
                raise CalibrationError(f"{path}: {spec.name} has shape {arr.shape}, "
                                       f"expected (N, {', '.join(map(str, want))})")
            arrays[spec.name] = arr
        count = min(len(arrays[s.name]) for s in inputs)
        samples += [{s.name: arrays[s.name][i : i + 1] for s in inputs} for i in range(count)]
        if len(samples) >= limit:
            break
    return samples[:limit]


def _reader(samples: Sequence[Sample]):
    quant = require("onnxruntime.quantization", "edge")

    class _SampleReader(quant.CalibrationDataReader):  # type: ignore[name-defined]  # a module found at run time
        """Feeds the calibration samples once each."""

        def __init__(self) -> None:
            self._it = iter(samples)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(samples)

    return _SampleReader()


# onnxruntime's quantizer chats on its package's loggers and, through module-level `logging.warning(...)`
# calls, on the root logger. Its package logger is quieted; on the root logger only the records its own modules
# log there are dropped (a filter), since raising root's level would mute the whole application.
_QUANT_LOGGER = "onnxruntime.quantization"
_QUANT_PATH = os.path.join("onnxruntime", "quantization")


class _FromQuantizer(logging.Filter):
    """Drops records below ERROR that onnxruntime's quantization modules log on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or _QUANT_PATH not in record.pathname


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Silence onnxruntime's quantizer below ERROR while it runs; the loggers are as they were after."""
    quant_log, root = logging.getLogger(_QUANT_LOGGER), logging.getLogger()
    level = quant_log.level
    quant_log.setLevel(max(level, logging.ERROR))
    quiet = _FromQuantizer()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        quant_log.setLevel(level)


@dataclass(frozen=True)
class QuantConfig:
    """How heads are quantized: QDQ, per-channel int8 weights, uint8 activations, min-max calibration."""

    per_channel: bool = True
    min_top1_agreement: float = 0.9
    max_relative_error: float = 0.1


def quantize_head(fp32_path: Path, int8_path: Path, samples: Sequence[Sample],
                  config: QuantConfig = QuantConfig()) -> Path:
    """Write the static int8 (QDQ) version of `fp32_path`, calibrated on `samples` (inputs of that model)."""
    quant = require("onnxruntime.quantization", "edge")
    with _quiet_quantizer(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.quantize_static(
            str(fp32_path),
            str(int8_path),
            _reader(samples),
            quant_format=quant.QuantFormat.QDQ,
            activation_type=quant.QuantType.QUInt8,
            weight_type=quant.QuantType.QInt8,
            per_channel=config.per_channel,
            calibrate_method=quant.CalibrationMethod.MinMax,
        )
    return int8_path


def int8_agreement(reference: Sequence[Sequence[np.ndarray]], quantized: Sequence[Sequence[np.ndarray]], task: str,
                   config: QuantConfig = QuantConfig()) -> dict:
    """Top-1 agreement for classifiers, relative L2 error otherwise, with the gate's verdict."""
    ref = np.concatenate([np.asarray(r[0]) for r in reference])
    got = np.concatenate([np.asarray(q[0]) for q in quantized])
    if task == "classification" and ref.ndim == 2 and ref.shape[1] > 1:
        value = float(np.mean(ref.argmax(1) == got.argmax(1)))
        return {"metric": "top1_agreement", "value": value, "threshold": config.min_top1_agreement,
                "passed": value >= config.min_top1_agreement, "samples": int(ref.shape[0])}
    value = float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-12))
    return {"metric": "relative_error", "value": value, "threshold": config.max_relative_error,
            "passed": value <= config.max_relative_error, "samples": int(ref.shape[0])}
