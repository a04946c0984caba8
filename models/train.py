"""A zoo classifier trained here on procedural images, so that int8 agreement figures mean something.

`shapes_mobilenet`: a small MobileNetV2-style network (inverted residuals, ReLU6, linear bottlenecks; the
zoo's own blocks) for 3x32x32 images of six classes: three filled shapes (models.procedural.SHAPES) and three
textures (horizontal stripes, vertical stripes, a checkerboard) on a noisy gradient background. It trains in
well under a minute on one CPU thread (deterministic: seeded, one thread) and the weights are cached
(models.procedural.cached_weights, keyed by the hash of this code), so only the first build trains.

`shapes_dataset(count, seed)` draws labelled images; training uses seed 0, held-out data (calibration, checks,
accuracy) any other seed. Inputs are normalised as the model expects ((x - 0.5) / 0.25), so a `.npy` of
`shapes_dataset(...)[0]` is what `split-profile --calibration` takes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.extras import require
from models.procedural import SHAPES, background, cached_weights, draw_shape, source_hash

TEXTURES = ("hstripes", "vstripes", "checker")
CLASSES = (*SHAPES, *TEXTURES)
IMAGE_SIZE = 32
TRAIN_IMAGES = 2048
EPOCHS = 5
BATCH = 64
LEARNING_RATE = 5e-3
TRAINED = ("shapes_mobilenet",)  # zoo names whose weights come from `trained_model`


def _texture(img: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Paint a square patch of a two-colour texture onto `img` (3 x H x W, in place)."""
    size = img.shape[-1]
    half = int(rng.integers(size // 4, size // 2))
    x0, y0 = (int(v) for v in rng.integers(0, size - 2 * half + 1, size=2))
    period = int(rng.integers(3, 6))  # at least 3 pixels: the stem has stride 2
    yy, xx = np.mgrid[0 : 2 * half, 0 : 2 * half]
    phase = int(rng.integers(0, period))
    if kind == "hstripes":
        on = ((yy + phase) // period) % 2 == 0
    elif kind == "vstripes":
        on = ((xx + phase) // period) % 2 == 0
    else:
        on = (((yy + phase) // period) + ((xx + phase) // period)) % 2 == 0
    colors = rng.uniform(0.0, 1.0, size=(2, 3)).astype(np.float32)
    colors[0, rng.integers(3)], colors[1, rng.integers(3)] = 0.95, 0.05  # two clearly different colours
    patch = np.where(on[None], colors[0][:, None, None], colors[1][:, None, None])
    img[:, y0 : y0 + 2 * half, x0 : x0 + 2 * half] = patch


def shapes_image(rng: np.random.Generator, label: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """One 3 x size x size float32 image in [0, 1] of class CLASSES[label]."""
    img = background(rng, size)
    kind = CLASSES[label]
    if kind in TEXTURES:
        _texture(img, kind, rng)
    else:
        r = float(rng.uniform(size / 4.5, size / 3))  # large enough to tell a triangle from a circle
        cx, cy = (float(v) for v in rng.uniform(r, size - r, size=2))
        color = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        color[rng.integers(3)] = rng.choice([0.02, 0.98])
        draw_shape(img, kind, cx, cy, r, color.tolist())
    return img


def shapes_dataset(count: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """`count` normalised images (N x 3 x size x size float32) and their labels (N int64), classes balanced."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.int64) % len(CLASSES)
    rng.shuffle(labels)
    images = np.stack([shapes_image(rng, int(y), size) for y in labels]) if count else np.zeros((0, 3, size, size))
    return ((images - 0.5) / 0.25).astype(np.float32), labels


def _build_shapes_mobilenet() -> Any:
    torch = require("torch", "profile")
    from models.zoo import _conv_bn, _init_cnn, _InvertedResidual

    nn: Any = torch.nn

    class ShapesMobileNet(nn.Module):
        """MobileNetV2-style: a strided stem, inverted residuals (t=4) 16-24-24-32, a 1x1 to 96, pool, linear."""

        SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 1, 2))  # expand t, channels c, repeats n, stride s

        def __init__(self, num_classes: int = len(CLASSES)):
            super().__init__()
            layers: list[Any] = [_conv_bn(3, 16, 3, 2, act=torch.nn.ReLU6)]
            cin = 16
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(_conv_bn(cin, 96, 1, act=torch.nn.ReLU6))
            self.features = torch.nn.Sequential(*layers)
            self.classifier = torch.nn.Linear(96, num_classes)
            _init_cnn(self)

        def forward(self, x: Any) -> Any:
            x = torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    return ShapesMobileNet()


def _train_classifier(model: Any) -> None:
    """Adam with a cosine schedule, EPOCHS passes over TRAIN_IMAGES images drawn with seed 0."""
    torch = require("torch", "profile")
    x, y = shapes_dataset(TRAIN_IMAGES, seed=0)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    steps = EPOCHS * (TRAIN_IMAGES // BATCH)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        order = torch.randperm(TRAIN_IMAGES, generator=gen)
        for i in range(TRAIN_IMAGES // BATCH):
            idx = order[i * BATCH : (i + 1) * BATCH]
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def code_hash() -> str:
    """The cache key of the trained weights: this module's data, model and training code, the zoo's blocks."""
    from models import zoo

    hyper = repr((CLASSES, IMAGE_SIZE, TRAIN_IMAGES, EPOCHS, BATCH, LEARNING_RATE))
    return source_hash(_texture, shapes_image, shapes_dataset, _build_shapes_mobilenet, _train_classifier,
                       zoo._conv_bn, zoo._init_cnn, zoo._InvertedResidual, extra=hyper)


def trained_model(name: str, quiet: bool = False) -> Any:
    """Zoo model `name` (one of TRAINED) with its trained weights, from the cache or trained now; eval mode."""
    if name not in TRAINED:
        raise KeyError(f"no trained model {name!r}; trained: {', '.join(TRAINED)}")
    return cached_weights(name, code_hash(), _build_shapes_mobilenet, _train_classifier, quiet=quiet)


def accuracy(model: Any, count: int = 256, seed: int = 1) -> float:
    """Top-1 accuracy of `model` (torch) on `count` held-out images drawn with `seed` (not 0, the training seed)."""
    torch = require("torch", "profile")
    x, y = shapes_dataset(count, seed)
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float(np.mean(pred == y))


def with_outlier_channel(model: Any, scale: float = 1e3) -> Any:
    """A copy of the trained classifier made deliberately hard for int8: after the stem, a pair of 1x1 convs
    scales channel 0 up by `scale` and back (the same function in fp32). The tensor between them then has a
    per-tensor int8 range set by that channel alone, so plain int8 zeroes the other channels, as a real outlier
    channel does; keeping the pair in float (mixed precision) undoes it. For the quantization tests."""
    import copy

    torch = require("torch", "profile")
    channels = model.features[0][0].out_channels
    up = torch.nn.Conv2d(channels, channels, 1, bias=False)
    down = torch.nn.Conv2d(channels, channels, 1, bias=False)
    gains = torch.ones(channels)
    gains[0] = scale
    with torch.no_grad():
        up.weight.copy_(torch.diag(gains)[:, :, None, None])
        down.weight.copy_(torch.diag(1 / gains)[:, :, None, None])
    sensitive = copy.deepcopy(model)
    sensitive.features.insert(1, torch.nn.Sequential(up, down))
    return sensitive.eval()
