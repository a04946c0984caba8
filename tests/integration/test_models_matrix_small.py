"""CI's small models matrix: architectures written in the project, through benchmarks/models_matrix.py's own code.

Each model is exported as a user would (TorchScript trace, `.pt2`, ONNX), planned by `split-profile` in a child
process (`--device rpi4 --network 4g`, a T4 cloud so nothing is timed here), and its bundle is checked: every
cut it holds, head then tail by tensor name, gives the model's own outputs (torch, flattened by name). The
families: a residual CNN, a dict-output segmenter, a transformer saved as TorchScript, a multi-input text model
with int64 inputs and a ModelOutput-like result, and the zoo's YOLO-class detector when the zoo has one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from benchmarks import models_matrix as mm  # noqa: E402 - after the skips: it needs torch
from models.convert import output_structure  # noqa: E402
from models.manifest import Bundle  # noqa: E402
from partitioning.extract import session  # noqa: E402

PROFILE = (*mm.PROFILE_ARGS, "--cloud", "t4")
CASES = [
    ("zoo_tiny_cnn", "pt2"),  # residual CNN
    ("zoo_tiny_cnn", "onnx"),
    ("dict_segmenter", "pt"),  # {"out", "aux"}
    ("zoo_vit_tiny", "pt"),  # a transformer as TorchScript
    ("tiny_bert", "pt"),  # input_ids + attention_mask (int64) -> logits, last_hidden_state
]


def _detector_case() -> list:
    name = mm.detector_zoo_name()
    reason = "the zoo has no YOLO-class detector yet (models/zoo.py: a name with 'yolo' or 'det', or task 'detection')"
    return [pytest.param(f"zoo_{name}", "pt", id="detector") if name else
            pytest.param("detector", "pt", id="detector", marks=pytest.mark.skip(reason=reason))]


def _reference(spec: mm.Spec) -> tuple[tuple, dict[str, np.ndarray]]:
    """The spec's example inputs and its torch outputs by ONNX output name."""
    model, inputs = spec.build()
    with torch.no_grad():
        out = model(*inputs)
    return inputs, {name: t.detach().numpy() for name, t in output_structure(out).leaves}


def _head_then_tail(bundle: Bundle, cut_id: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    cut = bundle.cut(cut_id)
    values = dict(feeds)
    for part in (cut.head, cut.tail):
        if part is None:
            continue
        sess = session(part)
        names = [o.name for o in sess.get_outputs()]
        values.update(zip(names, sess.run(names, {i.name: values[i.name] for i in sess.get_inputs()})))
    return {o.name: values[o.name] for o in bundle.outputs}


@pytest.mark.parametrize("name, fmt", [*CASES, *_detector_case()])
def test_the_small_matrix_plans_bundles_and_round_trips(tmp_path: Path, name: str, fmt: str) -> None:
    spec = mm.specs_by_name()[name]
    rows = list(mm.run_model(spec, [fmt], tmp_path, timeout=240, profile_args=PROFILE, export_here=True))
    assert len(rows) == 1
    row = rows[0]
    assert row.ok, row.status
    assert row.nodes and row.candidates and row.chosen and row.int8, row
    line = mm.table_row(row)
    assert line.startswith(f"| {name} | {fmt} | ok |") and line.count("|") == mm.HEADER.splitlines()[0].count("|")
    assert row.bundle is not None
    bundle = Bundle.load(row.bundle)
    inputs, want = _reference(spec)
    if fmt == "onnx":  # torch.onnx.export named the outputs itself: match them by position
        assert len(bundle.outputs) == len(want)
        want = dict(zip([o.name for o in bundle.outputs], want.values()))
    assert [o.name for o in bundle.outputs] == list(want)
    feeds = {i.name: x.numpy() for i, x in zip(bundle.inputs, inputs)}
    assert len(feeds) == len(inputs)
    assert len(bundle.cut_ids) >= 2  # the chosen cut and the baselines or the plan table's cuts
    for cut_id in bundle.cut_ids:
        got = _head_then_tail(bundle, cut_id, feeds)
        for out_name, value in want.items():
            scale = max(1.0, float(np.abs(value).max()))
            np.testing.assert_allclose(got[out_name], value, rtol=1e-3, atol=1e-4 * scale,
                                       err_msg=f"{name} {fmt} cut {cut_id} output {out_name}")


def test_the_table_says_a_failure_in_one_line() -> None:
    row = mm.Row("m", "project", "pt", status="exit 2: split-profile: error: the | pipe", plan_s=70.0, plan_cpu_s=61.0)
    line = mm.table_row(row)
    assert "the \\| pipe (over 60 s cpu)" in line and "\n" not in line
    assert mm.one_line("Traceback ...\n  File x\nsplit-profile: error: boom\n") == "split-profile: error: boom"
    assert mm.one_line("a\nRuntimeError: last\n") == "RuntimeError: last"
