"""split-profile on a head that fails plain int8: a warning line, mixed precision recorded in plan.json, the head
costed at the precision it runs, and the agent saying on load which head it runs.

The model is the trained classifier with an outlier channel pair (models.train.with_outlier_channel),
calibrated and checked on held-out procedural images given with --calibration.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_agent.runtime import CutRuntime, RunnerCache, RuntimeOptions  # noqa: E402
from models.convert import to_onnx  # noqa: E402
from models.manifest import Bundle, PlanDocument  # noqa: E402
from models.train import shapes_dataset, trained_model, with_outlier_channel  # noqa: E402
from partitioning.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """The sensitive classifier profiled for a Pi 4 over 4G with a bundle, and without one (plan only)."""
    root = tmp_path_factory.mktemp("quant")
    model = with_outlier_channel(trained_model("shapes_mobilenet", quiet=True))
    x = torch.from_numpy(shapes_dataset(1, seed=9)[0])
    path = to_onnx(torch.jit.trace(model, x), (x,), root / "sensitive.onnx")  # legacy exporter: seconds
    calib = root / "calib"
    calib.mkdir()
    np.save(calib / "held_out.npy", shapes_dataset(48, seed=4)[0])  # not seed 0: the training images
    common = [str(path), "--device", "rpi4", "--network", "4g", "--calibration", str(calib), "--repeats", "3"]
    plan_only = root / "plan.json"
    assert main([*common, "-q", "--json"]) == 0
    return root, common, plan_only


def test_a_failing_head_falls_back_to_mixed_with_a_warning_and_exit_0(profiled, capsys) -> None:
    root, common, _ = profiled
    capsys.readouterr()
    out = root / "bundle"
    assert main([*common, "--calibration-method", "minmax", "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "warning:" in line and "mixed precision" in line]
    assert warned, err
    assert "failed the gate (top1_agreement" in warned[0] and "node(s) kept in float" in warned[0]

    doc = PlanDocument.from_json(json.loads((out / "plan.json").read_text()))
    assert doc.verification is not None
    mixed = {cid: v for cid, v in doc.verification.cuts.items() if v.precision == "mixed"}
    assert mixed, {cid: v.int8 for cid, v in doc.verification.cuts.items()}
    for check in mixed.values():
        assert check.int8 is not None and check.int8["passed"] and check.int8["calibration"] == "minmax"
        assert 1 <= len(check.float_nodes) <= 2 and check.int8["value"] >= 0.9
        assert check.int8["attempts"][0]["passed"] is False  # plain int8 failed first


def test_mixed_heads_are_costed_at_the_precision_they_run(profiled, capsys) -> None:
    root, common, _ = profiled
    capsys.readouterr()
    assert main([*common, "-q", "--json"]) == 0
    planned = {c["id"]: c for c in json.loads(capsys.readouterr().out)["candidates"]}
    doc = json.loads((root / "bundle" / "plan.json").read_text())
    recosted = {c["id"]: c for c in doc["candidates"]}
    for cid, check in doc["verification"]["cuts"].items():
        if cid not in planned or "int8" not in check:
            continue
        before, after = planned[cid], recosted[cid]
        if check["int8"]["precision"] == "mixed":  # rpi4: fp32 runs at half the int8 rate
            assert after["edge_ms"] > before["edge_ms"]
            assert after["edge_memory_bytes"] > before["edge_memory_bytes"]
            assert after["total_ms"] - before["total_ms"] == pytest.approx(after["edge_ms"] - before["edge_ms"],
                                                                           abs=1e-3)
        else:
            assert after["edge_ms"] == before["edge_ms"]


def test_the_agent_logs_which_head_it_runs(profiled, caplog) -> None:
    root, _, _ = profiled
    bundle = Bundle.load(root / "bundle")
    doc = PlanDocument.from_json(bundle.plan)
    assert doc.verification is not None
    mixed = next(cid for cid, v in doc.verification.cuts.items() if v.precision == "mixed")
    cache = RunnerCache(RuntimeOptions())
    with caplog.at_level(logging.INFO, logger="edge_agent.runtime"):
        rt = CutRuntime(bundle, mixed, "int8", cache)
        CutRuntime(bundle, mixed, "fp32", cache)
    assert rt.head_is_int8
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_agent.runtime"]
    assert any(f"cut {mixed}: running the mixed-precision head" in m and "kept in float" in m for m in lines), lines
    assert any(f"cut {mixed}: running the fp32 head (head_precision fp32)" in m for m in lines), lines
