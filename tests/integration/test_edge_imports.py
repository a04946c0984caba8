"""The cost measurement runs on a device with only the [edge] extra: no onnx, no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]

# Make `import onnx` / `import torch` fail in the child, as on a Raspberry Pi with only [edge] installed.
_BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("onnx", "torch"):
                raise ImportError(f"{name} is blocked: the [edge] extra does not install it")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_costs_and_devices_import_without_torch_or_onnx() -> None:
    result = _run(
        """
        import partitioning.costs, partitioning.devices, partitioning.device_profile, sys
        assert "torch" not in sys.modules and "onnx" not in sys.modules, sorted(sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr


def test_measure_node_costs_runs_without_onnx(tmp_path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = _run(
        f"""
        import json, sys
        from partitioning.costs import measure_node_costs, host_facts
        from partitioning.device_profile import save_device_profile, load_device_profile
        costs = measure_node_costs({str(path)!r}, warmup=1, repeats=3, threads=1)
        assert set(costs.per_node_ms) == {{"conv", "relu"}}, costs.per_node_ms
        save_device_profile({str(tmp_path / "p.json")!r}, costs, model_sha256="a" * 64, host=host_facts(1))
        assert load_device_profile({str(tmp_path / "p.json")!r}).fitted is not None
        assert "onnx" not in sys.modules and "torch" not in sys.modules
        """
    )
    assert result.returncode == 0, result.stderr


def test_split_profile_measures_and_saves_a_device_profile_without_onnx(tmp_path) -> None:
    """On a Pi with only [edge]: `split-profile full.onnx --device local --save-device-profile` works."""
    import torch

    from models.convert import to_onnx
    from models.zoo import build_zoo_model, zoo_entry

    model = to_onnx(build_zoo_model("tiny_cnn"), (torch.randn(*zoo_entry("tiny_cnn").input_shape),),
                    tmp_path / "full.onnx")
    profile_path = tmp_path / "pi.json"
    result = _run(
        f"""
        import sys
        from partitioning.cli import main
        code = main([{str(model)!r}, "--device", "local", "--save-device-profile", {str(profile_path)!r},
                     "--repeats", "3", "-q"])
        assert "torch" not in sys.modules and "onnx" not in sys.modules
        sys.exit(code)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "saved the device profile" in result.stdout and "no plan or bundle" in result.stdout
    # back on the workstation, the saved profile drives the plan of the same model
    from partitioning import profile

    planned = profile(str(model), device=str(profile_path), repeats=3)
    assert planned.document["device"]["kind"] == "measured"
