"""`split-profile` and `partitioning.profile`: bundles, plan.json, output forms and every bad input's error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.manifest import CLOUD_ONLY, EDGE_ONLY, PLAN_SCHEMA, Bundle, BundleError
from partitioning import NoFeasiblePlanError, profile
from partitioning.cli import main
from partitioning.extract import run_split, session

CANDIDATE_KEYS = {"id", "cut", "edge_ms", "transfer_bytes", "transfer_ms", "cloud_ms", "total_ms",
                  "edge_memory_bytes", "feasible"}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """tiny_cnn profiled for a Pi 4 on a low-latency link (the plan table has several cuts), bundle written."""
    out = tmp_path_factory.mktemp("b") / "tiny"
    with pytest.warns(UserWarning, match="synthetic"):
        result = profile("tiny_cnn", device="rpi4", network=None, uplink_mbps=5, rtt_ms=0.2, out=out, repeats=5,
                         plan_table_mbps=(0.01, 0.05, 1.0, 1000.0))
    return result, out


def test_bundle_has_every_artifact_and_plan_fields(tiny_bundle):
    result, out = tiny_bundle
    doc = json.loads((out / "plan.json").read_text())
    assert doc["schema"] == PLAN_SCHEMA
    for key in ("model", "device", "network", "budgets", "candidates", "chosen", "artifacts", "verification"):
        assert key in doc
    assert {"name", "sha256", "inputs", "outputs"} <= set(doc["model"])
    assert doc["model"]["inputs"][0]["shape"][0] is None  # dynamic batch
    assert doc["device"]["kind"] == "estimated" and "rpi4" in doc["device"]["source"]
    ids = {c["id"] for c in doc["candidates"]}
    assert {EDGE_ONLY, CLOUD_ONLY} <= ids and doc["chosen"] in ids
    for cand in doc["candidates"]:
        assert CANDIDATE_KEYS <= set(cand)
    bundle = Bundle.load(out)  # checks every sha256
    assert bundle.chosen == result.plan.chosen
    for name in ("full.onnx",):
        assert (out / name).is_file()
    for cut_id in bundle.cut_ids:
        cut = bundle.cut(cut_id)
        assert doc["verification"]["cuts"][cut_id]["split"]["passed"]
        if cut_id != CLOUD_ONLY:
            assert cut.head_int8 is not None and cut.head_int8.is_file()
            assert "int8" in doc["verification"]["cuts"][cut_id]
    assert len({cid for _, cid in bundle.plan_table}) >= 2, bundle.plan_table


def test_bundle_split_computes_what_the_model_computes(tiny_bundle):
    _, out = tiny_bundle
    bundle = Bundle.load(out)
    x = np.random.default_rng(7).standard_normal((3, 3, 32, 32)).astype(np.float32)
    reference = session(bundle.full).run(None, {"input": x})[0]
    for cut_id in bundle.cut_ids:
        cut = bundle.cut(cut_id)
        head = session(cut.head) if cut.head else None
        tail = session(cut.tail) if cut.tail else None
        got = run_split(head, tail, {"input": x})[0]  # batch 3 through heads exported at batch 1
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)


def test_tampered_bundle_is_refused(tiny_bundle, tmp_path):
    import shutil

    _, out = tiny_bundle
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "full.onnx").write_bytes((copy / "full.onnx").read_bytes()[:100])
    with pytest.raises(BundleError, match="sha256 does not match"):
        Bundle.load(copy)


def test_cli_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "plan.png"
    args = ["tiny_cnn", "--device", "rpi4", "--network", "4g", "--json", "--plot", str(plot), "--repeats", "3"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == PLAN_SCHEMA and doc["network"]["uplink_mbps"] == 5.85
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table_shows_baselines_and_breakdown(capsys):
    assert main(["tiny_cnn", "--device", "jetson", "--uplink-mbps", "2", "--rtt-ms", "30", "-q", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "edge-only" in out and "cloud-only" in out and "xfer ms" in out and "chosen:" in out
    assert "no --out given" in out


def test_no_feasible_cut_names_the_budget_and_the_closest_plan(capsys):
    code = main(["tiny_cnn", "--device", "rpi4", "--max-latency-ms", "0.0001", "-q", "--repeats", "3"])
    err = capsys.readouterr().err
    assert code == 3
    assert "latency" in err and "closest plan" in err
    with pytest.raises(NoFeasiblePlanError) as info:
        profile("tiny_cnn", device="rpi4", max_energy_mj=1e-6, repeats=3)
    assert not info.value.result.plan.feasible
    assert "energy" in str(info.value)
    # a memory budget no head fits still leaves cloud-only (it needs no edge memory)
    assert profile("tiny_cnn", device="rpi4", edge_memory_mb=1e-6, repeats=3).plan.chosen == CLOUD_ONLY


def _truncated_torchscript(d: Path) -> Path:
    import torch

    from models.zoo import build_zoo_model

    path = d / "model.pt"
    torch.jit.save(torch.jit.trace(build_zoo_model("tiny_cnn"), torch.randn(1, 3, 32, 32)), str(path))
    return _write(path, path.read_bytes()[: path.stat().st_size // 2])


def _pickled_module(d: Path) -> Path:
    import torch

    from models.zoo import build_zoo_model

    torch.save(build_zoo_model("tiny_cnn"), str(d / "pickled.pt"))
    return d / "pickled.pt"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make_args, fragment",
    [
        (lambda d: [str(d / "missing.pt")], "no such file"),
        (lambda d: [str(_write(d / "empty.onnx", b""))], "empty"),
        (lambda d: [str(_write(d / "notes.txt", b"hello, this is not a model\n" * 20))], "not a"),
        (lambda d: [str(_write(d / "photo.jpg", b"\xff\xd8\xff\xe0" + bytes(300)))], "not a"),
        (lambda d: ["no_such_zoo_model"], "resnet18"),
        (lambda d: [str(_truncated_torchscript(d))], "truncated"),
        (lambda d: [str(_pickled_module(d))], "--allow-pickle"),
        (lambda d: ["tiny_cnn", "--device", "pdp11"], "unknown edge device"),
        (lambda d: ["tiny_cnn", "--network", "carrier-pigeon"], "unknown network"),
        (lambda d: ["tiny_cnn", "--cloud", "abacus"], "unknown cloud GPU"),
        (lambda d: ["tiny_cnn", "--calibration", str(d / "nowhere")], "calibration"),
    ],
)
def test_bad_inputs_get_one_clear_line(make_args, fragment, tmp_path, capsys):
    code = main(make_args(tmp_path) + ["-q", "--repeats", "3", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("split-profile: error:") and fragment in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_bad_argument_values_are_usage_errors(capsys):
    for argv in (["tiny_cnn", "--uplink-mbps", "-3"], ["tiny_cnn", "--input-shape", "1xbanana"],
                 ["tiny_cnn", "--objective", "speed"], ["tiny_cnn", "--refine", "-1"], ["tiny_cnn", "--refine", "two"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_calibration_folder_is_used(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(calib / f"x{i}.npy", rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    result = profile("tiny_cnn", device="jetson-orin-nano", out=tmp_path / "b", calibration=calib, repeats=3)
    assert result.document["calibration"] == {"source": str(calib), "samples": 8}
    assert not result.warnings
    np.save(calib / "bad.npy", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="expected"):
        profile("tiny_cnn", device="jetson-orin-nano", out=tmp_path / "b2", calibration=calib, repeats=3)


def test_the_written_plan_reads_back_as_the_typed_document(tiny_bundle):
    result, out = tiny_bundle
    written = json.loads((out / "plan.json").read_text())
    typed = Bundle.load(out).document
    assert typed == result.plan_document and typed.to_json() == written
    assert [c.id for c in typed.ranked()][0] == result.plan.chosen
