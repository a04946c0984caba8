"""Procedural training data and the trained-weights cache: labelled images drawn here, never downloaded.

Drawing (numpy only): `background` (a smooth colour gradient plus pixel noise), `draw_shape` (a filled circle,
square or triangle of one colour, returning its xyxy box), `shapes_image` (a detection sample: several shapes
that overlap little, their boxes and class ids). Images are float32 CHW in [0, 1]; every function takes a numpy
Generator, so the same seed draws the same image on every machine.

Cache: `cached_weights(name, code_hash, build, train)` builds a model, loads its state dict from
`weights_cache_path(name, code_hash)` when present, else trains it (torch seeded, one thread) and saves it
there atomically. The directory is `$SPLITINFER_CACHE/weights` (default `~/.cache/splitinfer/weights`);
`code_hash` should change whenever the architecture, the data or the training changes (`source_hash` hashes
the source of the functions and classes involved), so a stale file is never loaded.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.extras import require

SHAPES = ("circle", "square", "triangle")  # class id = index here
CACHE_ENV = "SPLITINFER_CACHE"


# -- drawing ---------------------------------------------------------------------------------------------------


def background(rng: np.random.Generator, size: int, noise: float = 0.08) -> np.ndarray:
    """A 3 x size x size float32 image: a random linear colour gradient plus Gaussian pixel noise, in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    start = rng.uniform(0.1, 0.6, size=(3, 1, 1)).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, size=(3, 2, 1, 1)).astype(np.float32)
    img = start + slope[:, 0] * xx + slope[:, 1] * yy
    img = img + rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def shape_mask(kind: str, cx: float, cy: float, r: float, size: int, origin: tuple[int, int] = (0, 0),
               extent: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean mask of a filled shape centred at (cx, cy) with half-extent r (pixels): of the whole size x size
    image, or of the window at `origin` (y, x) of `extent` (h, w) pixels."""
    h, w = extent or (size, size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx, dy = xx + origin[1] - cx, yy + origin[0] - cy
    if kind == "circle":
        return np.asarray(dx * dx + dy * dy <= r * r)
    if kind == "square":
        return np.asarray((np.abs(dx) <= r) & (np.abs(dy) <= r))
    if kind == "triangle":  # apex up, base at cy + r, spanning cx - r .. cx + r
        t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return np.asarray((t >= 0) & (t <= 1) & (np.abs(dx) <= t * r))
    raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def draw_shape(img: np.ndarray, kind: str, cx: float, cy: float, r: float,
               color: Sequence[float] | np.ndarray) -> tuple[float, float, float, float]:
    """Paint a filled shape onto `img` (3 x H x W, in place); returns its box (x1, y1, x2, y2) in pixels."""
    size = img.shape[-1]
    y0, x0 = max(int(cy - r) - 1, 0), max(int(cx - r) - 1, 0)
    y1, x1 = min(int(cy + r) + 2, img.shape[-2]), min(int(cx + r) + 2, size)
    mask = shape_mask(kind, cx, cy, r, size, (y0, x0), (y1 - y0, x1 - x0))
    for c in range(3):
        img[c, y0:y1, x0:x1][mask] = color[c]
    return (max(cx - r, 0.0), max(cy - r, 0.0), min(cx + r, float(size)), min(cy + r, float(size)))


def _distinct_color(rng: np.random.Generator, img: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """A saturated colour far from the background under (cx, cy), so every shape is visible."""
    under = img[:, int(min(cy, img.shape[1] - 1)), int(min(cx, img.shape[2] - 1))]
    best, best_d = np.zeros(3, np.float32), -1.0
    for _ in range(8):
        color = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        color[rng.integers(3)] = rng.choice([0.05, 0.95])  # at least one saturated channel
        d = float(np.abs(color - under).sum())
        if d > best_d:
            best, best_d = color, d
    return best


def shapes_image(rng: np.random.Generator, size: int = 256, max_objects: int = 4, min_r: float = 10.0,
                 max_r: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A detection sample: (image 3 x size x size float32, boxes N x 4 float32 xyxy pixels, labels N int64).

    1..max_objects shapes of random kind (class id = index in SHAPES), size and colour on a `background`;
    a shape whose box overlaps an earlier one by IoU > 0.1 is redrawn elsewhere (or dropped after 20 tries).
    """
    max_r = max_r if max_r is not None else size / 6
    img = background(rng, size)
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):
            r = float(rng.uniform(min_r, max_r))
            cx, cy = (float(v) for v in rng.uniform(r, size - r, size=2))
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(_iou(box, b) <= 0.1 for b in boxes):
                break
        else:
            continue
        label = int(rng.integers(len(SHAPES)))
        boxes.append(draw_shape(img, SHAPES[label], cx, cy, r, _distinct_color(rng, img, cx, cy)))
        labels.append(label)
    return img, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# -- trained-weights cache ----------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where trained weights are kept: $SPLITINFER_CACHE/weights, else ~/.cache/splitinfer/weights."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "splitinfer")
    return Path(root) / "weights"


def weights_cache_path(name: str, code_hash: str) -> Path:
    """The cached state dict of model `name` trained by the code whose hash is `code_hash`."""
    return cache_dir() / f"{name}-{code_hash}.pt"


def source_hash(*objs: Any, extra: str = "") -> str:
    """16 hex digits of sha256 over the source of `objs` (functions, classes, modules) and `extra` (e.g. the
    hyper-parameters), plus this module's drawing code: the key that retires cached weights when code changes."""
    digest = hashlib.sha256()
    for obj in (*objs, background, shape_mask, draw_shape, _distinct_color, shapes_image):
        digest.update(inspect.getsource(obj).encode())
    digest.update(extra.encode())
    return digest.hexdigest()[:16]


def cached_weights(name: str, code_hash: str, build: Callable[[], Any], train: Callable[[Any], None], *,
                   quiet: bool = False, say: Callable[[str], None] | None = None) -> Any:
    """`build()` with trained weights: loaded from the cache, else `train(model)` then saved there.

    Training runs with `torch.manual_seed(0)` inside a forked RNG (the caller's RNG is untouched) on one
    thread, so the same code trains the same weights. The file is written to a temporary name and renamed, so
    a crash or a concurrent trainer never leaves a half-written file; a cache that cannot be written (read-only
    home) only costs the training next time. Returns the model in eval mode.
    """
    torch = require("torch", "profile")
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    path = weights_cache_path(name, code_hash)
    model = build()
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a damaged file: train again
            if not quiet:
                say(f"{name}: cached weights {path} unusable ({exc}); training again")
            model = build()  # load_state_dict copies what fits before it raises: start again from the build
    if not quiet:
        say(f"{name}: training on procedural data (cached at {path})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.train()
            train(model)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        if not quiet:
            say(f"{name}: could not cache the weights at {path} ({exc})")
    return model
