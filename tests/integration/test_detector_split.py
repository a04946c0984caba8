"""The trained zoo detector end to end: profiled into a bundle (int8 heads calibrated on procedural images), served
by a real cloud, decoded after the tail on whichever side finishes the request.

- The int8 head's decoded boxes agree with fp32's on held-out images.
- Through the cloud (a middle cut, cloud-only) and on the device (local fallback, edge-only), results carry the
  raw maps `p3`, `p4`, `p5` and the decoded `boxes`, `scores`, `classes`, `count`, and they agree with each other
  and with full.onnx decoded here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from cloud_tier.server import CloudServer  # noqa: E402
from edge_agent import CLOUD, EDGE, LOCAL, EdgeAgent  # noqa: E402
from edge_agent.constants import DEFAULT_DEVICE_ID  # noqa: E402
from models import train_detector  # noqa: E402
from models.convert import to_onnx  # noqa: E402
from models.detect import postprocess  # noqa: E402
from models.loaders import load_model  # noqa: E402
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle  # noqa: E402
from models.zoo import zoo_entry  # noqa: E402
from partitioning import profile  # noqa: E402
from partitioning.bundle import write_bundle  # noqa: E402
from partitioning.graph import build_cut_graph  # noqa: E402
from tests.pki import device_tls  # noqa: E402
from tests.unit.test_detect_trained import match  # noqa: E402

pytestmark = pytest.mark.slow  # training (first run only), profiling and int8 export of a detector

POST = zoo_entry("yolo_tiny").postprocess
assert POST is not None
CALIBRATION_SEED, CHECK_SEED = 2_000_000, 3_000_000  # neither training nor held-out images
IMAGES = 16
DECODED = {"boxes", "scores", "classes", "count"}


def _samples(name: str, seed: int, count: int) -> list[dict[str, np.ndarray]]:
    return [{name: img[None]} for img, _, _ in train_detector.dataset(seed, count)]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """bundles/yolo_tiny: the trained detector planned for rpi4 on 4g, its int8 heads calibrated on procedural
    images, carrying a middle cut (on this tiny model the planner prefers edge-only at every bandwidth), and the
    zoo entry's postprocess (an ONNX file does not say how to decode it)."""
    root = tmp_path_factory.mktemp("detector")
    src = to_onnx(train_detector.trained_yolo_tiny(), (torch.zeros(zoo_entry("yolo_tiny").input_shape),),
                  root / "yolo_tiny.onnx")
    result = profile(src, device="rpi4", cloud="t4", network="4g", name="yolo_tiny")
    loaded = load_model(src, root / "work", name="yolo_tiny")
    proto = onnx.load(str(loaded.onnx_path))
    graph = build_cut_graph(proto)
    # a cut after the backbone's first stages: one 4-d activation crosses it
    middle = [c for c in result.plan.candidates if c.id not in (EDGE_ONLY, CLOUD_ONLY) and len(c.cut) == 1
              and len(graph.tensors[c.cut[0]].shape) == 4]
    assert middle, "a middle cut with one activation"
    cut = middle[len(middle) // 3].id
    plan = dataclasses.replace(result.plan, plan_table=((1000.0, cut),))
    document = dataclasses.replace(result.plan_document,
                                   model=dataclasses.replace(result.plan_document.model, postprocess=POST))
    name = loaded.inputs[0].name
    write_bundle(root / "bundles" / "yolo_tiny", proto, loaded.onnx_path, graph, plan, document,
                 _samples(name, CALIBRATION_SEED, 16), _samples(name, CHECK_SEED, 8), loaded.task)
    return root / "bundles", cut


@pytest.fixture(scope="module")
def bundle(bundles: tuple[Path, str]) -> Bundle:
    return Bundle.load(bundles[0] / "yolo_tiny")


@pytest.fixture(scope="module")
def images() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return train_detector.held_out(IMAGES)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})))


def _agree(got: dict[str, np.ndarray], want: dict[str, np.ndarray], min_iou: float) -> float:
    """The fraction of `want`'s detections that `got` has too (same class, IoU >= min_iou), over every image."""
    hits = total = 0
    for i in range(len(want["count"])):
        n, m = int(want["count"][i]), int(got["count"][i])
        hits += match(got["boxes"][i, :m], got["classes"][i, :m], want["boxes"][i, :n], want["classes"][i, :n],
                      min_iou)
        total += n
    assert total > 0, "the reference found nothing to compare"
    return hits / total


def _recall(out: dict[str, np.ndarray], images) -> float:
    """Recall at IoU 0.5 of decoded detections against the images' ground truth."""
    hits = sum(match(out["boxes"][i, :int(out["count"][i])], out["classes"][i, :int(out["count"][i])], boxes, labels)
               for i, (_, boxes, labels) in enumerate(images))
    return hits / sum(len(boxes) for _, boxes, _ in images)


def test_the_int8_head_decodes_to_the_boxes_fp32_finds(bundles: tuple[Path, str], bundle: Bundle, images) -> None:
    assert bundle.postprocess == POST
    x = {bundle.inputs[0].name: np.stack([s[0] for s in images])}
    reference = postprocess(_run(bundle.full, x), POST)
    cut = bundle.cut(bundles[1])
    assert cut.head_int8 is not None and cut.tail is not None
    fp32 = postprocess(_run(cut.tail, _run(cut.head, x)), POST)  # type: ignore[arg-type]
    assert _agree(fp32, reference, 0.99) == 1.0 and _agree(reference, fp32, 0.99) == 1.0
    int8 = postprocess(_run(cut.tail, _run(cut.head_int8, x)), POST)
    # int8 moves boxes by a pixel or two and flips a class where the model hesitates: the same objects are found
    agree = (_agree(int8, reference, 0.5), _agree(reference, int8, 0.5))
    assert min(agree) >= 0.75, agree
    recall = (_recall(reference, images), _recall(int8, images))
    assert recall[1] >= recall[0] - 0.1, recall


@pytest.mark.parametrize("cut", ["mid", CLOUD_ONLY, EDGE_ONLY])
def test_the_cloud_and_the_device_return_the_same_decoded_boxes(bundles: tuple[Path, str], bundle: Bundle, images,
                                                                cut: str) -> None:
    root, cut = bundles[0], bundles[1] if cut == "mid" else cut
    name = bundle.inputs[0].name
    reference = postprocess(_run(bundle.full, {name: np.stack([s[0] for s in images])}), POST)
    server = CloudServer(root, "127.0.0.1", 0, max_wait_ms=2.0)
    server.start()
    try:
        with EdgeAgent.from_bundle(root / "yolo_tiny", server.address, cut=cut, connect_timeout_s=2.0,
                                   tls=device_tls(DEFAULT_DEVICE_ID)) as agent:
            remote = [agent.submit(s[0][None]).result(timeout=30) for s in images]
            agent.set_mode(LOCAL)
            local = [agent.submit(s[0][None]).result(timeout=30) for s in images]
    finally:
        server.stop(grace=1.0)
    assert [r.served_by for r in remote] == [EDGE if cut == EDGE_ONLY else CLOUD] * IMAGES, \
        [r.fallback_reason for r in remote]
    assert [r.served_by for r in local] == [EDGE] * IMAGES
    for r in remote + local:
        assert set(r.outputs) == {"p3", "p4", "p5"} | DECODED
        assert r.outputs["boxes"].shape == (1, POST.max_det, 4) and r.outputs["count"].shape == (1,)

    def stacked(results) -> dict[str, np.ndarray]:
        return {k: np.concatenate([r.outputs[k] for r in results]) for k in DECODED}

    # cloud and device decode the same activation (the int8 codec between them moves a box by a fraction of a
    # pixel); both against fp32 full.onnx, through the int8 head where the cut has one and it passed its gate
    same = (_agree(stacked(remote), stacked(local), 0.7), _agree(stacked(local), stacked(remote), 0.7))
    assert min(same) >= 0.9, same
    assert _agree(stacked(local), reference, 0.5) >= 0.75
