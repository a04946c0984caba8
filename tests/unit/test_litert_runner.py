"""LiteRT heads: the edge runner (int8 ports, batches, threads, errors) and the bundle's .tflite records.

The .tflite heads here are built by hand with LiteRT's flatbuffer schema (tests/litert_tiny.py): the tiny bundle's
Conv+Relu head, fp32 and full-integer int8, in the layout the converter leaves (ONNX names and NCHW at both ends).
The onnx2tf conversion itself is tested in tests/integration/test_litert_convert.py.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="the [litert] extra (ai-edge-litert) is part of [dev]")

from edge_agent.runtime import InputError, ModelLoadError, OrtRunner  # noqa: E402
from edge_agent.runtime_litert import LiteRTRunner, RuntimeMissingError  # noqa: E402
from models.manifest import EDGE_ONLY, PLAN_FILE, Bundle, CutFiles  # noqa: E402
from models.tiny_bundle import CUT_TENSOR, INPUT, MID_CUT, make_tiny_bundle, sample_input  # noqa: E402
from partitioning.tflite import add_tflite_heads, summary_lines  # noqa: E402
from tests.litert_tiny import make_converter  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    """The tiny bundle with its TFLite heads added the way `split-profile convert` adds them."""
    root = make_tiny_bundle(tmp_path_factory.mktemp("litert") / "tiny")
    add_tflite_heads(root, make_converter())
    return Bundle.load(root)


def test_the_bundle_records_verified_tflite_heads(bundle: Bundle) -> None:
    cut = bundle.cut(MID_CUT)
    assert cut.head_tflite is not None and cut.head_tflite.name == "head.tflite"
    assert cut.head_int8_tflite is not None and cut.head_int8_tflite.name == "head.int8.tflite"
    litert = bundle.plan["verification"]["cuts"][MID_CUT]["litert"]
    assert litert["fp32"]["passed"] and litert["fp32"]["max_abs_error"] <= litert["fp32"]["tolerance"]
    assert litert["int8"]["passed"] and litert["int8"]["samples"] == 32
    assert cut.tflite_int8_passed and cut.edge_head_tflite == cut.head_int8_tflite
    # The test converter builds only Conv+Relu heads: edge-only (the whole model) records why it has none.
    edge = bundle.cut(EDGE_ONLY)
    assert edge.head_tflite is None and edge.edge_head_tflite is None
    assert "only builds Conv+Relu" in bundle.plan["verification"]["cuts"][EDGE_ONLY]["litert"]["error"]
    assert any(line.startswith(f"litert   {MID_CUT}") and "pass" in line for line in summary_lines(bundle.plan))


def test_a_failed_int8_gate_falls_back_to_the_fp32_tflite_head(bundle: Bundle, tmp_path: Path) -> None:
    root = tmp_path / "b"
    import shutil

    shutil.copytree(bundle.root, root)
    plan = json.loads((root / PLAN_FILE).read_text())
    plan["verification"]["cuts"][MID_CUT]["litert"]["int8"]["passed"] = False
    (root / PLAN_FILE).write_text(json.dumps(plan))
    cut = Bundle.load(root).cut(MID_CUT)
    assert cut.edge_head_tflite == cut.head_tflite


def test_tflite_keys_round_trip_and_stay_out_of_bundles_without_them(bundle: Bundle) -> None:
    files = bundle.plan["artifacts"]["cuts"]
    assert CutFiles.from_json(files[MID_CUT], "c").to_json() == files[MID_CUT]
    assert "head_tflite" not in CutFiles.from_json(files[EDGE_ONLY], "e").to_json()


def test_a_changed_tflite_head_fails_the_hash_check(bundle: Bundle, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "b"
    shutil.copytree(bundle.root, root)
    path = root / "head.int8.tflite"
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(Exception, match="sha256 does not match"):
        Bundle.load(root)


def test_the_fp32_tflite_head_equals_the_onnx_head(bundle: Bundle) -> None:
    cut = bundle.cut(MID_CUT)
    assert cut.head is not None and cut.head_tflite is not None
    runner = LiteRTRunner(cut.head_tflite)
    assert runner.input_names == (INPUT,) and runner.output_names == (CUT_TENSOR,)
    x = sample_input(1, seed=5)
    want = OrtRunner(cut.head).run({INPUT: x})[CUT_TENSOR]
    got = runner.run({INPUT: x})[CUT_TENSOR]
    assert got.dtype == np.float32 and got.shape == want.shape == (1, 8, 16, 16)
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_the_int8_head_quantizes_its_input_and_dequantizes_its_output(bundle: Bundle) -> None:
    cut = bundle.cut(MID_CUT)
    assert cut.head is not None and cut.head_int8_tflite is not None
    runner = LiteRTRunner(cut.head_int8_tflite)
    from models.litert import LiteRTModel, interpreter_class

    ports = LiteRTModel(interpreter_class(), cut.head_int8_tflite)
    assert ports.inputs[0].dtype == np.int8 and ports.outputs[0].dtype == np.int8
    out_scale = ports.outputs[0].scale
    x = sample_input(1, seed=6)
    want = OrtRunner(cut.head).run({INPUT: x})[CUT_TENSOR]
    got = runner.run({INPUT: x})[CUT_TENSOR]
    assert got.dtype == np.float32
    # Dequantized values sit on the output's grid, and (input and weights quantized too) within a few steps.
    steps = (got - ports.outputs[0].from_tensor(np.zeros((), np.int8))) / out_scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert float(np.abs(got - want).max()) <= 8 * out_scale
    assert float(np.abs(got - want).mean()) <= out_scale


def test_a_batch_runs_row_by_row_with_the_same_results(bundle: Bundle) -> None:
    path = bundle.cut(MID_CUT).head_int8_tflite
    assert path is not None
    runner = LiteRTRunner(path)
    x = sample_input(3, seed=7)
    batch = runner.run({INPUT: x})[CUT_TENSOR]
    rows = [runner.run({INPUT: x[i : i + 1]})[CUT_TENSOR] for i in range(3)]
    assert batch.shape == (3, 8, 16, 16)
    np.testing.assert_array_equal(batch, np.concatenate(rows))


def test_concurrent_runs_use_one_interpreter_per_thread(bundle: Bundle) -> None:
    path = bundle.cut(MID_CUT).head_int8_tflite
    assert path is not None
    runner = LiteRTRunner(path)
    inputs = [sample_input(1, seed=100 + i) for i in range(6)]
    expected = [runner.run({INPUT: x})[CUT_TENSOR] for x in inputs]
    errors: list[str] = []
    models: list[object] = []  # the interpreters themselves: an id alone is reused once a finished thread's is freed
    start = threading.Barrier(6)

    def work(k: int) -> None:
        start.wait()
        for _ in range(20):
            got = runner.run({INPUT: inputs[k]})[CUT_TENSOR]
            if not np.array_equal(got, expected[k]):
                errors.append(f"thread {k}: result of another input")
        models.append(runner._model())

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len({id(m) for m in models}) == 6


def test_feeds_that_do_not_fit_are_an_input_error(bundle: Bundle) -> None:
    path = bundle.cut(MID_CUT).head_tflite
    assert path is not None
    runner = LiteRTRunner(path)
    with pytest.raises(InputError, match="missing inputs"):
        runner.run({"other": sample_input()})
    with pytest.raises(InputError, match=r"expected \(N, 3, 16, 16\)"):
        runner.run({INPUT: np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(InputError, match=r"batch sizes are \[0\]"):  # not a bare ValueError from numpy
        runner.run({INPUT: np.zeros((0, 3, 16, 16), np.float32)})


def test_close_is_idempotent_and_final(bundle: Bundle) -> None:
    path = bundle.cut(MID_CUT).head_tflite
    assert path is not None
    runner = LiteRTRunner(path)
    runner.close()
    runner.close()
    with pytest.raises(ModelLoadError, match="closed"):
        runner.run({INPUT: sample_input()})


def test_a_file_litert_cannot_load_is_a_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "head.tflite"
    bad.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ModelLoadError, match="LiteRT cannot load it"):
        LiteRTRunner(bad)


def test_without_a_litert_package_the_error_is_one_line_naming_the_install(
        bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)  # import of these now raises ImportError
    with pytest.raises(RuntimeMissingError) as info:
        LiteRTRunner(bundle.cut(MID_CUT).head_tflite or Path("x"))
    assert str(info.value) == ("runtime 'litert' needs ai-edge-litert, which is not installed: "
                               "pip install 'splitinfer[litert]' (or: pip install ai-edge-litert)")
    assert isinstance(info.value, ModelLoadError)


def test_a_cut_whose_conversion_failed_runs_its_onnx_head(bundle: Bundle, caplog: pytest.LogCaptureFixture) -> None:
    # edge-only has no .tflite here (the conversion failed; plan.json says why). The adaptive cut moves to it on a
    # slow link: a LiteRT agent must run its ONNX head, not fail the switch on every tick.
    from edge_agent.runtime import CutRuntime, RunnerCache, RuntimeOptions

    cache = RunnerCache(RuntimeOptions(runtime="litert"))
    with caplog.at_level("WARNING", logger="edge_agent.runtime"):
        edge = CutRuntime(bundle, EDGE_ONLY, "int8", cache)
    assert isinstance(edge.head, OrtRunner) and edge.runtime == "onnxruntime"
    assert any("no LiteRT head (its conversion failed" in r.getMessage() for r in caplog.records)
    mid = CutRuntime(bundle, MID_CUT, "int8", cache)
    assert isinstance(mid.head, LiteRTRunner) and mid.runtime == "litert"
    assert edge.head_path == bundle.cut(EDGE_ONLY).edge_head  # the head an onnxruntime agent runs (int8 here)
    x = sample_input(2, seed=3)
    want = OrtRunner(edge.head_path).run({INPUT: x})
    out = edge.run_tail(edge.run_head({INPUT: x}))
    assert set(out) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(out[name], value)
