"""The zoo detector `yolo_tiny`: its named multi-scale outputs, and its procedurally trained weights finding the
shapes of held-out images (where random weights find nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from models import train_detector  # noqa: E402
from models.convert import to_onnx  # noqa: E402
from models.detect import postprocess  # noqa: E402
from models.zoo import build_zoo_model, zoo_entry  # noqa: E402

POST = zoo_entry("yolo_tiny").postprocess
assert POST is not None


def match(boxes: np.ndarray, classes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
          iou: float = 0.5) -> int:
    """How many ground-truth boxes a detection of the same class covers at IoU >= `iou` (each used once)."""
    used: set[int] = set()
    found = 0
    for g, label in zip(gt_boxes, gt_labels):
        best, best_iou = -1, iou
        for k, (b, c) in enumerate(zip(boxes, classes)):
            if k in used or c != label:
                continue
            iw = max(0.0, min(b[2], g[2]) - max(b[0], g[0]))
            ih = max(0.0, min(b[3], g[3]) - max(b[1], g[1]))
            inter = iw * ih
            union = (b[2] - b[0]) * (b[3] - b[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
            if union > 0 and inter / union >= best_iou:
                best, best_iou = k, inter / union
        if best >= 0:
            used.add(best)
            found += 1
    return found


def recall_precision(model, samples) -> tuple[float, float]:
    """Recall and precision at IoU 0.5 of `model` (torch) on detection samples, decoded by models.detect."""
    x = torch.from_numpy(np.stack([s[0] for s in samples]))
    with torch.no_grad():
        raw = {k: v.numpy() for k, v in model(x).items()}
    out = postprocess(raw, POST)
    hits = gts = dets = 0
    for i, (_, boxes, labels) in enumerate(samples):
        n = int(out["count"][i])
        hits += match(out["boxes"][i, :n], out["classes"][i, :n], boxes, labels)
        gts += len(boxes)
        dets += n
    return hits / gts, hits / max(dets, 1)


@pytest.fixture(scope="module")
def trained():
    return train_detector.trained_yolo_tiny()  # cached under $SPLITINFER_CACHE; about a minute the first time


def test_the_detector_has_three_named_scales_that_export_as_named_onnx_outputs(tmp_path: Path):
    model = build_zoo_model("yolo_tiny")
    x = torch.randn(zoo_entry("yolo_tiny").input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"p3": (1, 7, 16, 16), "p4": (1, 7, 8, 8),
                                                           "p5": (1, 7, 4, 4)}
    path = to_onnx(model, (x,), tmp_path / "yolo.onnx")
    sess = ort.InferenceSession(str(path))
    assert [o.name for o in sess.get_outputs()] == ["p3", "p4", "p5"]
    got = dict(zip(["p3", "p4", "p5"], sess.run(None, {sess.get_inputs()[0].name: x.numpy()})))
    for name, value in out.items():
        np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-4, atol=1e-3)
    decoded = postprocess(got, POST)  # random weights: any number of detections, in the documented shapes
    n = int(decoded["count"][0])
    assert decoded["boxes"].shape == (1, POST.max_det, 4) and 0 <= n <= POST.max_det
    assert (decoded["classes"][0, n:] == -1).all() and (decoded["scores"][0, n:] == 0).all()


@pytest.mark.slow  # the first run on a machine trains the detector (about a minute), later ones load the cache
def test_the_trained_detector_finds_held_out_shapes_and_random_weights_do_not(trained):
    samples = train_detector.held_out(32)
    recall, precision = recall_precision(trained, samples)
    # measured here: recall 0.61, precision 0.51 (class-agnostic recall 0.78) after 400 steps; random weights 0.03
    assert recall >= 0.45 and precision >= 0.35, (recall, precision)
    assert recall_precision(build_zoo_model("yolo_tiny"), samples)[0] <= 0.1


def test_the_weights_cache_key_is_stable_and_names_the_model():
    assert train_detector.code_hash() == train_detector.code_hash()
    assert len(train_detector.code_hash()) == 16


def test_split_profile_of_the_zoo_detector_declares_its_postprocess():
    from partitioning import profile

    result = profile("yolo_tiny", device="rpi4", cloud="t4", network="4g")
    model = result.plan_document.model
    assert model.task == "detection" and model.postprocess == POST
    assert [o.name for o in model.outputs] == ["p3", "p4", "p5"]
