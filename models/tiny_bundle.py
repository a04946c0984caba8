"""A tiny split bundle built with onnx.helper, for fast transport tests (no torch, no profiler).

The model: `input` [batch,3,16,16] -> Conv+Relu (`relu1`) -> Conv+Relu -> global average pool -> Gemm ->
`output` [batch,10]. Cuts: `edge-only`, `cloud-only` and `c1` (after the first Relu, tensor `relu1`), the
chosen one. The layout and plan.json follow `models/manifest.py`, as `split-profile` writes them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.manifest import CLOUD_ONLY, EDGE_ONLY, PLAN_FILE, PLAN_SCHEMA, Bundle, artifact_entry, sha256_file

OPSET = 17
IR_VERSION = 8  # readable by older onnxruntime builds on edge devices
INPUT = "input"
OUTPUT = "output"
CUT_TENSOR = "relu1"
MID_CUT = "c1"
INPUT_SHAPE = (None, 3, 16, 16)
CUT_SHAPE = (None, 8, 16, 16)
OUTPUT_SHAPE = (None, 10)


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def he(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "conv1.w": he(8, 3, 3, 3),
        "conv1.b": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "conv2.w": he(16, 8, 3, 3),
        "conv2.b": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "fc.w": he(10, 16),
        "fc.b": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }


def _value_info(name: str, shape: tuple[int | None, ...]) -> onnx.ValueInfoProto:
    dims = ["batch" if d is None else d for d in shape]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


_HEAD_NODES = [
    ("Conv", [INPUT, "conv1.w", "conv1.b"], ["conv1"], {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}),
    ("Relu", ["conv1"], [CUT_TENSOR], {}),
]
_TAIL_NODES = [
    ("Conv", [CUT_TENSOR, "conv2.w", "conv2.b"], ["conv2"], {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}),
    ("Relu", ["conv2"], ["relu2"], {}),
    ("GlobalAveragePool", ["relu2"], ["pool"], {}),
    ("Flatten", ["pool"], ["flat"], {"axis": 1}),
    ("Gemm", ["flat", "fc.w", "fc.b"], [OUTPUT], {"transB": 1}),
]


def _model(name: str, nodes: list, inp: tuple[str, tuple], out: tuple[str, tuple], weights: dict) -> onnx.ModelProto:
    used = {i for _, ins, _, _ in nodes for i in ins}
    inits = [numpy_helper.from_array(w, n) for n, w in weights.items() if n in used]
    graph = helper.make_graph(
        [helper.make_node(op, ins, outs, name=f"{outs[0]}_node", **attrs) for op, ins, outs, attrs in nodes],
        name,
        [_value_info(*inp)],
        [_value_info(*out)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bundle_factory")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def tiny_models(seed: int = 0) -> dict[str, onnx.ModelProto]:
    """The full model and the head/tail of cut c1, with deterministic weights."""
    w = _weights(seed)
    return {
        "full": _model("tiny_full", _HEAD_NODES + _TAIL_NODES, (INPUT, INPUT_SHAPE), (OUTPUT, OUTPUT_SHAPE), w),
        "head": _model("tiny_head", _HEAD_NODES, (INPUT, INPUT_SHAPE), (CUT_TENSOR, CUT_SHAPE), w),
        "tail": _model("tiny_tail", _TAIL_NODES, (CUT_TENSOR, CUT_SHAPE), (OUTPUT, OUTPUT_SHAPE), w),
    }


def sample_input(batch: int = 1, seed: int = 1) -> np.ndarray:
    """A deterministic float32 input of the tiny model."""
    return np.random.default_rng(seed).standard_normal((batch, *INPUT_SHAPE[1:])).astype(np.float32)


def _quantize(src: Path, dst: Path, seed: int = 2) -> None:
    """Static int8 QDQ quantization of `src` into `dst` with a small seeded calibration set."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{INPUT: sample_input(2, seed + i)} for i in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    quantize_static(
        str(src),
        str(dst),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )


def _spec(name: str, shape: tuple[int | None, ...]) -> dict[str, Any]:
    return {"name": name, "shape": list(shape), "dtype": "float32"}


def make_tiny_bundle(root: Path, *, model_name: str = "tiny", seed: int = 0) -> Path:
    """Write a complete tiny split bundle (full, edge-only, cloud-only, c1 chosen) into `root`; return `root`.
    Another `seed` makes another model (other weights, so another model hash) of the same shape."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    models = tiny_models(seed)
    full, head, tail = root / "full.onnx", root / "head.onnx", root / "tail.onnx"
    onnx.save(models["full"], full)
    onnx.save(models["head"], head)
    onnx.save(models["tail"], tail)
    head_int8 = root / "head.int8.onnx"
    _quantize(head, head_int8)
    edge_dir = root / "cuts" / EDGE_ONLY
    edge_dir.mkdir(parents=True, exist_ok=True)
    full_int8 = edge_dir / "head.int8.onnx"
    _quantize(full, full_int8)
    for leftover in root.glob("*-opt.onnx"):  # onnxruntime's quantizer may leave its preprocessed copy
        leftover.unlink()

    x_bytes, cut_bytes, y_bytes = 3 * 16 * 16 * 4, 8 * 16 * 16 * 4, 10 * 4
    candidates = [
        {"id": EDGE_ONLY, "tensors": [OUTPUT], "head_ms": 0.9, "tail_ms": 0.0, "transfer_bytes": y_bytes,
         "transfer_bytes_int8": y_bytes, "feasible": True},
        {"id": MID_CUT, "tensors": [CUT_TENSOR], "head_ms": 0.3, "tail_ms": 0.2, "transfer_bytes": cut_bytes,
         "transfer_bytes_int8": cut_bytes // 4, "feasible": True},
        {"id": CLOUD_ONLY, "tensors": [INPUT], "head_ms": 0.0, "tail_ms": 0.3, "transfer_bytes": x_bytes,
         "transfer_bytes_int8": x_bytes, "feasible": True},
    ]
    plan: dict[str, Any] = {
        "schema": PLAN_SCHEMA,
        "model": {
            "name": model_name,
            "sha256": sha256_file(full),
            "inputs": [_spec(INPUT, INPUT_SHAPE)],
            "outputs": [_spec(OUTPUT, OUTPUT_SHAPE)],
        },
        "device": "test-device",
        "network": "loopback",
        "budgets": {},
        "candidates": candidates,
        "chosen": MID_CUT,
        "plan_table": [
            {"uplink_mbps": 0.0, "cut": EDGE_ONLY},
            {"uplink_mbps": 1.0, "cut": MID_CUT},
            {"uplink_mbps": 100.0, "cut": CLOUD_ONLY},
        ],
        "artifacts": {
            "full": artifact_entry(root, full),
            "cuts": {
                EDGE_ONLY: {
                    "tensors": [_spec(OUTPUT, OUTPUT_SHAPE)],
                    "head": artifact_entry(root, full),
                    "head_int8": artifact_entry(root, full_int8),
                    "tail": None,
                },
                MID_CUT: {
                    "tensors": [_spec(CUT_TENSOR, CUT_SHAPE)],
                    "head": artifact_entry(root, head),
                    "head_int8": artifact_entry(root, head_int8),
                    "tail": artifact_entry(root, tail),
                },
                CLOUD_ONLY: {
                    "tensors": [_spec(INPUT, INPUT_SHAPE)],
                    "head": None,
                    "head_int8": None,
                    "tail": artifact_entry(root, full),
                },
            },
        },
        "verification": {
            "cuts": {
                cut: {"equivalence": {"passed": True, "max_abs_err": 0.0},
                      "int8": {"passed": True, "top1_agreement": 1.0, "max_abs_err": 0.05}}
                for cut in (EDGE_ONLY, MID_CUT)
            }
        },
    }
    (root / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    Bundle.load(root)  # the fixture must always be a valid bundle
    return root


def copy_bundle(src: Path, dst: Path) -> Path:
    """Copy a bundle directory (cheaper than building another)."""
    shutil.copytree(src, dst)
    return Path(dst)
