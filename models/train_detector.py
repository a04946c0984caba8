"""The zoo's `yolo_tiny` trained briefly on procedural shapes (models.procedural), cached, so that what it
detects and how well int8 keeps it mean something.

Data: `shapes_image` with 1-3 circles / squares / triangles (classes 0, 1, 2) at 96 x 96 for training (the
model is fully convolutional; small images make steps cheap), 1-4 at the zoo input size (128 x 128) for testing;
training images come from seeds 0.., held-out ones from HELD_OUT_SEED.. (never trained on).

Assignment (center sampling, one scale per object, as FCOS/YOLOX-style simple assigners do): an object of
half-size r goes to stride 8 when r < 10, 16 when r < 18, else 32; its positives are the cells of that scale
whose centre lies within 0.75 x max(r, stride) of the object's centre (so at least the centre cell).
Loss: BCE over every cell's class logits (one-hot at positives, 0 elsewhere) / positives, plus at positives
2 x (1 - GIoU) of the decoded box and 0.25 x L1 of the ltrb distances in strides (decoded as models.detect does).
Each step: a batch of the training images, each with a random colour-channel permutation and horizontal flip.
Adam with one-cycle (cosine) decay; one thread; `torch.manual_seed(0)` (models.procedural.cached_weights), so the
same code trains the same weights. About a minute on one free core (several when the host is busy); the weights
are cached by a hash of this code (models.procedural.weights_cache_path).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from models import procedural, zoo
from models.extras import require

NAME = "yolo_tiny"
HELD_OUT_SEED = 1_000_000
STEPS = 400
BATCH = 16
TRAIN_IMAGES = 1024
TRAIN_SIZE = 96  # training images are smaller than the zoo input (the model is fully convolutional): faster steps
LR = 5e-3
MIN_R, MAX_R = 6.0, 24.0  # object half-sizes in pixels at 128 x 128
SCALE_R = (10.0, 18.0)  # half-size limits between strides 8 / 16 / 32


def dataset(first_seed: int, count: int, size: int | None = None,
            max_objects: int = 4) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`count` detection samples (image, boxes xyxy, labels) drawn with seeds first_seed.. (one image each), at
    `size` (default the zoo input's)."""
    size = size or zoo.zoo_entry(NAME).input_shape[-1]
    return [procedural.shapes_image(np.random.default_rng(first_seed + i), size, max_objects=max_objects,
                                    min_r=MIN_R, max_r=MAX_R) for i in range(count)]


def held_out(count: int = 32) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Held-out samples (seeds never used in training)."""
    return dataset(HELD_OUT_SEED, count)


def _targets(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int, strides: tuple[int, ...],
             num_classes: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per stride: (class targets B x C x H x W, box targets B x 4 x H x W xyxy, positive mask B x H x W)."""
    out = []
    for si, stride in enumerate(strides):
        g = size // stride
        cls = np.zeros((len(samples), num_classes, g, g), np.float32)
        box = np.zeros((len(samples), 4, g, g), np.float32)
        pos = np.zeros((len(samples), g, g), bool)
        centres = (np.arange(g, dtype=np.float32) + 0.5) * stride
        for b, (_, boxes, labels) in enumerate(samples):
            for (x1, y1, x2, y2), label in zip(boxes, labels):
                r = max(x2 - x1, y2 - y1) / 2
                if int(np.searchsorted(SCALE_R, r, side="right")) != si:
                    continue
                cx, cy, reach = (x1 + x2) / 2, (y1 + y2) / 2, max(0.75 * r, 0.75 * stride)
                ys = np.flatnonzero(np.abs(centres - cy) <= reach)
                xs = np.flatnonzero(np.abs(centres - cx) <= reach)
                for yi in ys:
                    for xi in xs:
                        pos[b, yi, xi] = True
                        cls[b, :, yi, xi] = 0
                        cls[b, label, yi, xi] = 1
                        box[b, :, yi, xi] = (x1, y1, x2, y2)
        out.append((cls, box, pos))
    return out


def detection_loss(outputs: dict[str, Any], samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   size: int) -> Any:
    """The training loss of raw outputs {p3, p4, p5} on `samples` (see the module doc)."""
    torch = require("torch", "profile")
    post = zoo.zoo_entry(NAME).postprocess
    assert post is not None
    fn = torch.nn.functional
    targets = _targets(samples, size, post.strides, post.num_classes)
    cls_loss, box_loss, npos = 0.0, 0.0, 0
    for name, stride, (cls_t, box_t, pos_t) in zip(post.outputs, post.strides, targets):
        raw = outputs[name]
        cls_loss = cls_loss + fn.binary_cross_entropy_with_logits(raw[:, 4:], torch.from_numpy(cls_t),
                                                                  reduction="sum")
        pos = torch.from_numpy(pos_t)
        if not pos.any():
            continue
        g = raw.shape[-1]
        centre = (torch.arange(g, dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(centre, centre, indexing="ij")
        dist = (fn.softplus(raw[:, :4]) * stride).permute(0, 2, 3, 1)[pos]  # P x 4 ltrb pixels
        ax, ay = cx.expand_as(pos)[pos], cy.expand_as(pos)[pos]
        pred = torch.stack([ax - dist[:, 0], ay - dist[:, 1], ax + dist[:, 2], ay + dist[:, 3]], 1)
        tgt = torch.from_numpy(box_t).permute(0, 2, 3, 1)[pos]
        tgt_dist = torch.stack([ax - tgt[:, 0], ay - tgt[:, 1], tgt[:, 2] - ax, tgt[:, 3] - ay], 1)
        box_loss = box_loss + 2 * (1 - _giou(pred, tgt)).sum() + 0.25 * (dist - tgt_dist).abs().sum() / stride
        npos += int(pos.sum())
    return (cls_loss + box_loss) / max(npos, 1)


def _giou(a: Any, b: Any) -> Any:
    torch = require("torch", "profile")
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    union = area_a + area_b - inter + 1e-7
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(1) + 1e-7
    return inter / union - (hull - union) / hull


def _augment(gen: np.random.Generator, sample: tuple[np.ndarray, np.ndarray, np.ndarray],
             size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random colour-channel permutation and horizontal flip of a sample (labels unchanged)."""
    img, boxes, labels = sample
    img = img[gen.permutation(3)]
    if gen.random() < 0.5:
        img = img[:, :, ::-1]
        boxes = np.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
    return np.ascontiguousarray(img), boxes, labels


def train(model: Any, *, steps: int = STEPS, say: Callable[[str], None] | None = None) -> None:
    """Train `model` (a YoloTiny, in train mode) in place on procedural shapes; a progress line every 10%."""
    torch = require("torch", "profile")
    size = TRAIN_SIZE
    data = dataset(0, TRAIN_IMAGES, size, max_objects=3)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    gen = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(steps):
        batch = [_augment(gen, data[i], size) for i in gen.choice(len(data), BATCH, replace=False)]
        loss = detection_loss(model(torch.from_numpy(np.stack([b[0] for b in batch]))), batch, size)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if say is not None and ((step + 1) % max(steps // 10, 1) == 0 or step == 0):
            say(f"{NAME}: step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")


def code_hash() -> str:
    """The cache key: the source of the architecture, the data, the loss and the training, and their settings."""
    settings = repr((STEPS, BATCH, TRAIN_IMAGES, TRAIN_SIZE, LR, MIN_R, MAX_R, SCALE_R, zoo.zoo_entry(NAME)))
    return procedural.source_hash(sys.modules[__name__], zoo.YoloTiny, zoo._C2f, zoo._DetectHead, zoo._SPPF,
                                  zoo._Bottleneck, zoo._ConvSiLU, extra=settings)


def trained_yolo_tiny(*, quiet: bool = False) -> Any:
    """`yolo_tiny` with trained weights (eval mode), from the cache or trained now (about a minute)."""
    say = None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    return procedural.cached_weights(NAME, code_hash(), lambda: zoo.build_zoo_model(NAME),
                                     lambda m: train(m, say=say), quiet=quiet)
