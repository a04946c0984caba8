"""Detector postprocessing in numpy: multi-scale raw maps -> boxes, scores, classes (class-aware NMS).

Runs after the tail on whichever side finishes a request (the cloud's executor, or the agent's local tail /
edge-only head), as plan.json `model.postprocess` (models.plandoc.Postprocess, kind "yolo") says.

Raw format (the zoo's `yolo_tiny`, anchor-free like YOLOv8 with plain ltrb regression): one output per stride,
`N x (4 + C) x H x W` with H = input height / stride. At cell (i, j) the anchor point is ((j + 0.5) * stride,
(i + 0.5) * stride); channels 0..3 are the distances to the box's left, top, right, bottom edges as
`softplus(raw) * stride` pixels; channels 4.. are class logits (score = sigmoid).

Decoded outputs (added to the model's raw outputs; static shapes, padded to `max_det`):

    boxes    float32  N x max_det x 4   x1, y1, x2, y2 in input pixels (clipped to the image); 0 in padding
    scores   float32  N x max_det       confidence (sigmoid of the best class logit), descending; 0 in padding
    classes  int64    N x max_det       class id; -1 in padding
    count    int64    N                 how many rows of each image are real detections

Per image: each anchor keeps its best class; anchors below `conf` are dropped; the best 4 x max_det (at least
1,000) go to greedy NMS at IoU `iou`, per class (boxes of different classes never suppress each other).
Only numpy is imported (the edge agent runs this).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.plandoc import DETECTION_OUTPUTS, Postprocess, TensorSpec

__all__ = ["decode", "nms", "postprocess", "detection_specs", "apply_postprocess"]


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def decode(raw: Mapping[str, np.ndarray], post: Postprocess) -> tuple[np.ndarray, np.ndarray]:
    """Every anchor's box and class scores: (N x A x 4 xyxy float32 pixels, N x A x C float32 in [0, 1]),
    A = the anchors of all scales, in the order of `post.outputs` then row-major cells."""
    boxes, scores = [], []
    for name, stride in zip(post.outputs, post.strides):
        out = np.asarray(raw[name], dtype=np.float32)
        if out.ndim != 4 or out.shape[1] != 4 + post.num_classes:
            raise ValueError(f"detector output {name!r} has shape {out.shape}; expected N x "
                             f"{4 + post.num_classes} x H x W (4 box distances + {post.num_classes} classes)")
        n, _, h, w = out.shape
        flat = out.reshape(n, 4 + post.num_classes, h * w).transpose(0, 2, 1)  # N x HW x (4 + C)
        ys, xs = np.divmod(np.arange(h * w, dtype=np.float32), np.float32(w))
        cx, cy = (xs + 0.5) * stride, (ys + 0.5) * stride
        dist = _softplus(flat[..., :4]) * stride
        boxes.append(np.stack([cx - dist[..., 0], cy - dist[..., 1], cx + dist[..., 2], cy + dist[..., 3]], -1))
        scores.append(_sigmoid(flat[..., 4:]))
    return np.concatenate(boxes, 1).astype(np.float32), np.concatenate(scores, 1).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, classes: np.ndarray | None = None,
        limit: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes (M x 4 xyxy), best score first.

    With `classes`, only boxes of the same class suppress each other. At most `limit` indices are returned.
    """
    if classes is not None and len(boxes):  # shift each class to its own region: no overlap across classes
        offset = (float(np.abs(boxes).max()) + 1.0) * 2.0
        boxes = boxes + (classes.astype(np.float32) * offset)[:, None]
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep: list[int] = []
    while order.size and (limit is None or len(keep) < limit):
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        overlap = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def postprocess(raw: Mapping[str, np.ndarray], post: Postprocess,
                image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The decoded detections (`boxes`, `scores`, `classes`, `count`; see the module doc) of raw outputs.

    `image_size` (height, width) clips boxes; by default the first map's size times its stride.
    """
    boxes, scores = decode(raw, post)
    n = boxes.shape[0]
    if image_size is None:
        first = np.shape(raw[post.outputs[0]])
        image_size = (first[2] * post.strides[0], first[3] * post.strides[0])
    height, width = image_size
    out_boxes = np.zeros((n, post.max_det, 4), np.float32)
    out_scores = np.zeros((n, post.max_det), np.float32)
    out_classes = np.full((n, post.max_det), -1, np.int64)
    count = np.zeros((n,), np.int64)
    pre_nms = max(1000, 4 * post.max_det)
    for b in range(n):
        cls = scores[b].argmax(-1)
        conf = np.take_along_axis(scores[b], cls[:, None], -1)[:, 0]
        idx = np.flatnonzero(conf >= post.conf)
        if idx.size > pre_nms:
            idx = idx[np.argsort(-conf[idx], kind="stable")[:pre_nms]]
        box = boxes[b, idx]
        box[:, 0::2] = np.clip(box[:, 0::2], 0, width)
        box[:, 1::2] = np.clip(box[:, 1::2], 0, height)
        keep = nms(box, conf[idx], post.iou, cls[idx], limit=post.max_det)
        k = keep.size
        out_boxes[b, :k] = box[keep]
        out_scores[b, :k] = conf[idx][keep]
        out_classes[b, :k] = cls[idx][keep]
        count[b] = k
    return {"boxes": out_boxes, "scores": out_scores, "classes": out_classes, "count": count}


def detection_specs(post: Postprocess) -> tuple[TensorSpec, ...]:
    """The TensorSpecs of the decoded outputs (batch dimension None), in DETECTION_OUTPUTS order."""
    specs = {
        "boxes": TensorSpec("boxes", (None, post.max_det, 4), "float32"),
        "scores": TensorSpec("scores", (None, post.max_det), "float32"),
        "classes": TensorSpec("classes", (None, post.max_det), "int64"),
        "count": TensorSpec("count", (None,), "int64"),
    }
    return tuple(specs[name] for name in DETECTION_OUTPUTS)


def apply_postprocess(outputs: dict[str, np.ndarray], post: Postprocess | None) -> dict[str, np.ndarray]:
    """The model's outputs plus the decoded ones when the bundle declares a postprocess (else unchanged): the
    one hook the cloud and the agent call after a tail."""
    if post is None:
        return outputs
    return {**outputs, **postprocess(outputs, post)}
