"""Detector postprocessing (models.detect), plan.json `model.postprocess`, procedural shapes and the weights cache."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from models import procedural
from models.detect import apply_postprocess, decode, detection_specs, nms, postprocess
from models.manifest import Bundle, BundleError, Postprocess
from models.plandoc import ModelRecord
from models.tiny_bundle import make_tiny_bundle

POST = Postprocess("yolo", (8, 16), ("p3", "p4"), num_classes=2, conf=0.5, iou=0.5, max_det=5)


def _inv_softplus(y: float) -> float:
    return float(np.log(np.expm1(y)))


def _raw(n: int = 1) -> dict[str, np.ndarray]:
    """Raw maps of a 32 x 32 input with every class logit very negative (no detections)."""
    return {"p3": np.full((n, 6, 4, 4), -20.0, np.float32), "p4": np.full((n, 6, 2, 2), -20.0, np.float32)}


def _put(raw: dict[str, np.ndarray], name: str, stride: int, b: int, i: int, j: int, ltrb: tuple[float, ...],
         cls: int, logit: float = 5.0) -> tuple[float, float, float, float]:
    """Write one detection into raw[name] at cell (i, j); returns its xyxy box in pixels."""
    raw[name][b, :4, i, j] = [_inv_softplus(d / stride) for d in ltrb]
    raw[name][b, 4 + cls, i, j] = logit
    cx, cy = (j + 0.5) * stride, (i + 0.5) * stride
    return (cx - ltrb[0], cy - ltrb[1], cx + ltrb[2], cy + ltrb[3])


def test_decode_puts_each_anchor_at_its_cell_centre_with_ltrb_distances():
    raw = _raw()
    want = _put(raw, "p3", 8, 0, 1, 2, (3.0, 4.0, 5.0, 6.0), cls=1)
    boxes, scores = decode(raw, POST)
    assert boxes.shape == (1, 16 + 4, 4) and scores.shape == (1, 20, 2)
    k = 1 * 4 + 2  # row-major cell index in p3
    np.testing.assert_allclose(boxes[0, k], want, atol=1e-4)
    assert scores[0, k, 1] > 0.99 and scores[0, k, 0] < 1e-6


def test_postprocess_has_static_padded_shapes_and_counts_per_image():
    raw = _raw(2)
    a = _put(raw, "p3", 8, 0, 0, 0, (2.0, 2.0, 6.0, 6.0), cls=0, logit=3.0)
    b = _put(raw, "p4", 16, 0, 1, 1, (8.0, 8.0, 8.0, 8.0), cls=1, logit=6.0)
    _put(raw, "p3", 8, 0, 3, 3, (1.0, 1.0, 1.0, 1.0), cls=0, logit=-1.0)  # below conf 0.5: dropped
    out = postprocess(raw, POST)
    assert {k: (v.shape, v.dtype.name) for k, v in out.items()} == {
        "boxes": ((2, 5, 4), "float32"), "scores": ((2, 5), "float32"), "classes": ((2, 5), "int64"),
        "count": ((2,), "int64")}
    assert out["count"].tolist() == [2, 0]
    np.testing.assert_allclose(out["boxes"][0, :2], [b, a], atol=1e-4)  # best score first
    assert out["classes"][0].tolist() == [1, 0, -1, -1, -1] and out["classes"][1].tolist() == [-1] * 5
    assert out["scores"][0, 0] > out["scores"][0, 1] > 0.5 and not out["scores"][0, 2:].any()
    assert not out["boxes"][1].any()
    assert [s.name for s in detection_specs(POST)] == list(out)
    for spec in detection_specs(POST):
        assert out[spec.name].dtype.name == spec.dtype and out[spec.name].shape == spec.concrete_shape(2)


def test_boxes_are_clipped_to_the_image_and_max_det_caps_the_count():
    raw = _raw()
    _put(raw, "p3", 8, 0, 0, 0, (20.0, 20.0, 2.0, 2.0), cls=0)
    out = postprocess(raw, POST)
    np.testing.assert_allclose(out["boxes"][0, 0], [0, 0, 6, 6], atol=1e-4)
    raw = _raw()
    for i in range(4):
        for j in range(4):  # 16 disjoint small boxes
            _put(raw, "p3", 8, 0, i, j, (1.0, 1.0, 1.0, 1.0), cls=0, logit=1.0 + i + j / 10)
    out = postprocess(raw, POST)
    assert out["count"].tolist() == [5] and out["scores"][0].tolist() == sorted(out["scores"][0], reverse=True)


def test_nms_suppresses_overlaps_of_one_class_only():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 3]
    assert nms(boxes, scores, 0.5, classes=np.array([0, 0, 1, 0])).tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.9).tolist() == [0, 1, 3]  # IoU(0, 1) = 0.68: kept above that threshold
    assert nms(boxes, scores, 0.5, limit=1).tolist() == [0]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []


def test_overlapping_detections_across_scales_are_merged():
    raw = _raw()
    _put(raw, "p3", 8, 0, 1, 1, (6.0, 6.0, 6.0, 6.0), cls=0, logit=4.0)
    _put(raw, "p4", 16, 0, 0, 0, (2.0, 2.0, 10.0, 10.0), cls=0, logit=2.0)  # the same box, 6..18, from (8, 8)
    assert postprocess(raw, POST)["count"].tolist() == [1]


def test_apply_postprocess_adds_the_decoded_outputs_or_passes_through():
    raw = _raw()
    assert apply_postprocess(raw, None) is raw
    assert set(apply_postprocess(raw, POST)) == {"p3", "p4", "boxes", "scores", "classes", "count"}
    with pytest.raises(ValueError, match="'p4' has shape"):
        postprocess({"p3": raw["p3"], "p4": np.zeros((1, 5, 2, 2), np.float32)}, POST)


# -- plan.json model.postprocess ----------------------------------------------------------------------------------


def test_postprocess_round_trips_and_defaults():
    assert Postprocess.from_json(POST.to_json()) == POST
    short = Postprocess.from_json({"kind": "yolo", "strides": [8], "outputs": ["out"], "num_classes": 1})
    assert (short.conf, short.iou, short.max_det) == (0.25, 0.45, 100)


@pytest.mark.parametrize("change,fragment", [
    ({"kind": "ssd"}, "kind: 'ssd' is not one of"),
    ({"strides": [8, 0]}, "strides: expected positive"),
    ({"outputs": ["p3"]}, "expected 2 distinct output names"),
    ({"outputs": ["p3", "p3"]}, "expected 2 distinct output names"),
    ({"outputs": ["p3", "boxes"]}, "is a name the decoded detections take"),
    ({"num_classes": 0}, "num_classes: expected >= 1"),
    ({"conf": 1.5}, "conf must be in"),
    ({"iou": 0}, "iou in"),
    ({"max_det": 0}, "max_det: expected 1..100000"),
    ({"max_det": 2.5}, "expected an integer"),
    ({"strides": "8"}, "strides"),
    ({"extra": 1}, "unknown keys \\['extra'\\]"),
])
def test_bad_postprocess_fields_are_named(change, fragment):
    with pytest.raises(BundleError, match=fragment):
        Postprocess.from_json({**POST.to_json(), **change})
    with pytest.raises(BundleError, match="missing key 'num_classes'"):
        Postprocess.from_json({"kind": "yolo", "strides": [8], "outputs": ["p3"]})


def test_a_bundle_declaring_a_postprocess_of_outputs_it_lacks_is_refused(tmp_path):
    make_tiny_bundle(tmp_path / "b")
    plan_path = tmp_path / "b" / "plan.json"
    plan = json.loads(plan_path.read_text())
    assert Bundle.load(tmp_path / "b").postprocess is None
    good = copy.deepcopy(plan)
    good["model"]["postprocess"] = {"kind": "yolo", "strides": [8], "outputs": ["output"], "num_classes": 6}
    plan_path.write_text(json.dumps(good))
    assert Bundle.load(tmp_path / "b").postprocess == Postprocess("yolo", (8,), ("output",), 6)
    plan["model"]["postprocess"] = {"kind": "yolo", "strides": [8], "outputs": ["p3"], "num_classes": 1}
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(BundleError, match=r"\['p3'\] are not model outputs"):
        Bundle.load(tmp_path / "b")


def test_model_record_carries_the_postprocess():
    rec = {"name": "m", "source": "m.onnx", "format": "onnx", "sha256": "a", "onnx_sha256": "b", "task": "detection",
           "inputs": [], "outputs": [{"name": n, "shape": [None, 6, 4, 4], "dtype": "float32"} for n in ("p3", "p4")],
           "nodes": 3}
    assert ModelRecord.from_json(rec).postprocess is None and "postprocess" not in ModelRecord.from_json(rec).to_json()
    with_post = ModelRecord.from_json({**rec, "postprocess": POST.to_json()})
    assert with_post.postprocess == POST and with_post.to_json()["postprocess"] == POST.to_json()
    with pytest.raises(BundleError, match="not model outputs"):
        ModelRecord.from_json({**rec, "outputs": rec["outputs"][:1], "postprocess": POST.to_json()})


# -- procedural data and the weights cache ----------------------------------------------------------------------


def test_shapes_images_are_deterministic_and_their_boxes_cover_the_drawn_pixels():
    a = procedural.shapes_image(np.random.default_rng(7), 64, min_r=6, max_r=12)
    b = procedural.shapes_image(np.random.default_rng(7), 64, min_r=6, max_r=12)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    img, boxes, labels = a
    assert img.shape == (3, 64, 64) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert 1 <= len(boxes) <= 4 and len(labels) == len(boxes) and set(labels.tolist()) <= {0, 1, 2}
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes >= 0).all() and (boxes <= 64).all()
    blank = np.zeros((3, 32, 32), np.float32)
    box = procedural.draw_shape(blank, "triangle", 16, 16, 8, (1.0, 0.5, 0.0))
    ys, xs = np.nonzero(blank[0])
    assert box == (8, 8, 24, 24) and xs.min() >= 8 and xs.max() < 24 and ys.min() >= 8 and ys.max() < 24
    assert blank[1].max() == 0.5 and (blank[0] > 0).sum() < 16 * 16 * 0.6  # a triangle, not the square
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        procedural.shape_mask("hexagon", 1, 1, 1, 4)


def test_cached_weights_train_once_then_load(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv(procedural.CACHE_ENV, str(tmp_path))
    calls = []

    def train(model):
        calls.append(torch.rand(1).item())  # seeded: the same value every time
        with torch.no_grad():
            model.weight.fill_(calls[-1])

    lines: list[str] = []
    first = procedural.cached_weights("lin", "h1", lambda: torch.nn.Linear(2, 2), train, say=lines.append)
    again = procedural.cached_weights("lin", "h1", lambda: torch.nn.Linear(2, 2), train, say=lines.append)
    assert len(calls) == 1 and torch.equal(first.weight, again.weight) and not again.training
    assert procedural.weights_cache_path("lin", "h1") == tmp_path / "weights" / "lin-h1.pt"
    assert (tmp_path / "weights" / "lin-h1.pt").is_file() and any("training" in line for line in lines)
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["lin-h1.pt"]  # no temporary file left
    procedural.cached_weights("lin", "h2", lambda: torch.nn.Linear(2, 2), train, quiet=True)
    assert calls[0] == calls[1]  # a new code hash trains again, from the same seed
    (tmp_path / "weights" / "lin-h1.pt").write_bytes(b"junk")
    procedural.cached_weights("lin", "h1", lambda: torch.nn.Linear(2, 2), train, say=lines.append)
    assert len(calls) == 3 and any("unusable" in line for line in lines)


def test_a_cache_file_that_fails_to_load_half_way_leaves_no_weights_behind(tmp_path, monkeypatch):
    # load_state_dict copies the tensors that fit before it raises on the rest: the model trained again must
    # start from build()'s weights, as a first training does, not from a half-loaded stale file.
    torch = pytest.importorskip("torch")
    monkeypatch.setenv(procedural.CACHE_ENV, str(tmp_path))

    def build():
        torch.manual_seed(1)
        return torch.nn.Linear(2, 2)

    def train(model):
        with torch.no_grad():
            model.weight.fill_(0.5)  # trains the weight only: the bias stays as built

    stale = {"weight": torch.full((2, 2), 7.0), "bias": torch.full((2,), 7.0), "renamed.layer": torch.zeros(1)}
    path = procedural.weights_cache_path("lin", "h1")
    path.parent.mkdir(parents=True)
    torch.save(stale, path)
    model = procedural.cached_weights("lin", "h1", build, train, quiet=True)
    assert torch.equal(model.bias, build().bias) and torch.equal(model.weight, torch.full((2, 2), 0.5))


def test_source_hash_changes_with_the_code_and_settings():
    assert procedural.source_hash(nms) == procedural.source_hash(nms)
    assert procedural.source_hash(nms) != procedural.source_hash(decode)
    assert procedural.source_hash(nms, extra="a") != procedural.source_hash(nms, extra="b")
