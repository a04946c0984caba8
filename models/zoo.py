"""The built-in model zoo: small standard architectures with deterministic weights (nothing is downloaded).

Weights: `torch.manual_seed` (a fixed seed per model) inside a forked RNG, standard inits (Kaiming for
convolutions, truncated normal 0.02 for the transformer). Random weights alone leave BatchNorm's running
statistics at mean 0 / var 1, so activations grow or collapse layer by layer in eval mode; we therefore run
a few forward passes in train mode on seeded synthetic data to set them (cumulative averages, momentum=None).
That calibration runs in float64 on one thread and the result is cast back to float32: reductions in float64
make the float32 statistics bit-identical across processes, thread counts and most CPUs, so the same name
gives the same weights (and the same full.onnx sha256) everywhere.

Default input shapes (batch 1) were chosen so one forward pass is well under ~50 ms on one CPU core:
tiny_cnn 3x32x32, resnet18 / mobilenet_v2 3x224x224 (ImageNet, 1000 classes), vgg11 / vit_tiny 3x64x64
(Tiny-ImageNet size, 200 classes, VGG channel widths / 4), unet_small 3x128x128 (8-class per-pixel map),
yolo_tiny 3x128x128 (a YOLOv8-style detector, 3 classes: outputs `p3`, `p4`, `p5`; its entry's `postprocess`
says how models.detect decodes them; models.train_detector trains it on procedural shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from models.extras import require
from models.plandoc import Postprocess

try:  # the architectures below need torch; names and entries do not
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - exercised only without the [profile] extra
    torch = None  # type: ignore[assignment]


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model's name, default input shape (batch 1), task and one-line description."""

    name: str
    input_shape: tuple[int, ...]
    task: str  # "classification" | "segmentation" | "detection"
    description: str
    postprocess: Postprocess | None = None  # plan.json model.postprocess of its bundles (detectors)


_ENTRIES: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("tiny_cnn", (1, 3, 32, 32), "classification",
                 "3 convs + a residual add + a linear head, 10 classes; for fast tests"),
        ZooEntry("mobilenet_v2", (1, 3, 224, 224), "classification",
                 "MobileNetV2 (inverted residuals, width 1.0), 1000 classes"),
        ZooEntry("resnet18", (1, 3, 224, 224), "classification",
                 "ResNet-18 (basic residual blocks), 1000 classes"),
        ZooEntry("vgg11", (1, 3, 64, 64), "classification",
                 "VGG-11 plain conv chain, channel widths / 4, 200 classes"),
        ZooEntry("vit_tiny", (1, 3, 64, 64), "classification",
                 "ViT: 8x8 patches, cls token, 4 encoder blocks, dim 192, 3 heads, 200 classes"),
        ZooEntry("unet_small", (1, 3, 128, 128), "segmentation",
                 "U-Net: 3 down / 3 up levels with skip connections, base width 16, 8-class per-pixel map"),
        ZooEntry("shapes_mobilenet", (1, 3, 32, 32), "classification",
                 "MobileNetV2-style, 6 classes, TRAINED here on procedural shapes and textures (models.train; "
                 "the first build trains ~30 s on one core, then the weights are cached)"),
        ZooEntry("yolo_tiny", (1, 3, 128, 128), "detection",
                 "YOLOv8-style detector: C2f backbone, SPPF, PAN neck, anchor-free heads at strides 8/16/32 "
                 "(outputs p3, p4, p5), 3 classes",
                 Postprocess("yolo", (8, 16, 32), ("p3", "p4", "p5"), num_classes=3)),
    )
}
_SEEDS = {name: 1000 + i for i, name in enumerate(_ENTRIES)}  # fixed per model, independent of call order
_CALIBRATION_BATCHES = 1
_CALIBRATION_BATCH_SIZE = 4


def zoo_names() -> list[str]:
    """Names of the built-in models."""
    return list(_ENTRIES)


def zoo_entry(name: str) -> ZooEntry:
    """The zoo entry `name`; KeyError listing the known names if there is none."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; the zoo has: {', '.join(_ENTRIES)}") from None


def build_zoo_model(name: str) -> torch.nn.Module:
    """Build zoo model `name` in eval mode with deterministic weights (the same every call and process)."""
    entry = zoo_entry(name)
    torch = require("torch", "profile")
    from models.train import TRAINED, trained_model

    if name in TRAINED:  # weights trained on procedural data (cached), not seeded ones
        return trained_model(name)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(_SEEDS[name])
        model = _builders()[name]()
        _calibrate_batchnorm(model, entry.input_shape, _SEEDS[name])
    return model.eval()


def _calibrate_batchnorm(model: torch.nn.Module, input_shape: tuple[int, ...], seed: int) -> None:
    torch = require("torch", "profile")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.double().train()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        with torch.no_grad():
            for _ in range(_CALIBRATION_BATCHES):
                shape = (_CALIBRATION_BATCH_SIZE, *input_shape[1:])
                model(torch.randn(shape, generator=gen, dtype=torch.float64))
        for bn in bns:
            bn.momentum = 0.1
    finally:
        torch.set_num_threads(threads)
        model.float().eval()


def _builders() -> dict[str, Callable[[], Any]]:
    return {
        "tiny_cnn": TinyCNN,
        "mobilenet_v2": MobileNetV2,
        "resnet18": ResNet18,
        "vgg11": VGG11,
        "vit_tiny": ViTTiny,
        "unet_small": UNetSmall,
        "yolo_tiny": YoloTiny,
    }


# -- architectures (defined only when torch is installed) ---------------------------------------

if torch is not None:

    def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=True))
        return nn.Sequential(*layers)

    def _init_cnn(model: nn.Module, conv_mode: Literal["fan_in", "fan_out"] = "fan_out") -> None:
        # torchvision's inits; Kaiming keeps ReLU activations at unit scale before BN calibration
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    class TinyCNN(nn.Module):
        """Three 3x3 convs with a residual add, a strided conv and a linear head (10 classes, 3x32x32)."""

        def __init__(self, num_classes: int = 10):
            super().__init__()
            self.stem = _conv_bn(3, 16)
            self.body = nn.Sequential(_conv_bn(16, 16), _conv_bn(16, 16, act=None))
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.down = _conv_bn(16, 32, stride=2)
            self.head = nn.Linear(32, num_classes)
            _init_cnn(self)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            x = self.pool(self.relu(x + self.body(x)))
            x = self.down(x).mean((2, 3))
            return self.head(x)

    class _InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int):
            super().__init__()
            hidden = cin * expand
            layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.ReLU6)]
            layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                       _conv_bn(hidden, cout, 1, act=None)]  # linear bottleneck
            self.conv = nn.Sequential(*layers)
            self.use_res = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        """MobileNetV2 (Sandler et al. 2018), width 1.0, torchvision's layer layout."""

        SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # expand t, channels c, repeats n, stride s

        def __init__(self, num_classes: int = 1000):
            super().__init__()
            layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2, act=nn.ReLU6)]
            cin = 32
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(_conv_bn(cin, 1280, 1, act=nn.ReLU6))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
            _init_cnn(self)
            nn.init.normal_(cast(nn.Linear, self.classifier[1]).weight, 0, 0.01)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    class _BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = _conv_bn(cin, cout, 3, stride)
            self.conv2 = _conv_bn(cout, cout, 3, act=None)
            self.down = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.down is None else self.down(x)
            return self.relu(self.conv2(self.conv1(x)) + identity)

    class ResNet18(nn.Module):
        """ResNet-18 (He et al. 2016): basic blocks [2, 2, 2, 2], widths 64..512."""

        def __init__(self, num_classes: int = 1000):
            super().__init__()
            self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
            blocks: list[nn.Module] = []
            cin = 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, num_classes)
            _init_cnn(self)
            nn.init.normal_(self.fc.weight, 0, 0.01)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1)
            return self.fc(torch.flatten(x, 1))

    class VGG11(nn.Module):
        """VGG-11 configuration "A" (no BatchNorm) with channel widths / 4, for 3x64x64 inputs."""

        CFG = (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M")

        def __init__(self, num_classes: int = 200):
            super().__init__()
            layers: list[nn.Module] = []
            cin = 3
            for v in self.CFG:
                if v == "M":
                    layers.append(nn.MaxPool2d(2))
                else:
                    layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                    cin = int(v)
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(
                nn.Linear(128 * 2 * 2, 256), nn.ReLU(inplace=True), nn.Dropout(),
                nn.Linear(256, 256), nn.ReLU(inplace=True), nn.Dropout(),
                nn.Linear(256, num_classes),
            )
            _init_cnn(self, conv_mode="fan_in")  # no BatchNorm: fan_in keeps the forward scale
            nn.init.normal_(cast(nn.Linear, self.classifier[-1]).weight, 0, 0.01)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.features(x), 1))

    class _Attention(nn.Module):
        def __init__(self, dim: int, heads: int):
            super().__init__()
            self.heads = heads
            self.scale = (dim // heads) ** -0.5
            self.qkv = nn.Linear(dim, dim * 3)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _, n, c = x.shape
            qkv = self.qkv(x).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(-1, n, c))

    class _EncoderBlock(nn.Module):
        def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attn = _Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViTTiny(nn.Module):
        """A small pre-norm vision transformer: patch embedding, cls token, learned positions, encoder blocks."""

        def __init__(self, image: int = 64, patch: int = 8, dim: int = 192, depth: int = 4, heads: int = 3,
                     num_classes: int = 200):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dim, patch, patch)
            tokens = (image // patch) ** 2 + 1
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
            self.blocks = nn.Sequential(*(_EncoderBlock(dim, heads) for _ in range(depth)))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, num_classes)
            for p in (self.cls_token, self.pos_embed):
                nn.init.trunc_normal_(p, std=0.02)
            for m in self.modules():  # the ViT paper's / timm's init
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    class _DoubleConv(nn.Sequential):
        def __init__(self, cin: int, cout: int):
            super().__init__(_conv_bn(cin, cout), _conv_bn(cout, cout))

    class UNetSmall(nn.Module):
        """U-Net (Ronneberger et al. 2015) with 3 levels, base width 16; output: per-pixel class logits."""

        def __init__(self, num_classes: int = 8, base: int = 16):
            super().__init__()
            w = (base, base * 2, base * 4, base * 8)
            self.enc = nn.ModuleList([_DoubleConv(3, w[0]), _DoubleConv(w[0], w[1]), _DoubleConv(w[1], w[2])])
            self.pool = nn.MaxPool2d(2)
            self.bottleneck = _DoubleConv(w[2], w[3])
            self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, 2) for i in (2, 1, 0)])
            self.dec = nn.ModuleList([_DoubleConv(w[i] * 2, w[i]) for i in (2, 1, 0)])
            self.head = nn.Conv2d(w[0], num_classes, 1)
            _init_cnn(self)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for enc in self.enc:
                x = enc(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottleneck(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
                x = dec(torch.cat([up(x), skip], dim=1))
            return self.head(x)

    # -- YOLO-class detector (YOLOv8's layout, small): Conv-BN-SiLU, C2f blocks, SPPF, PAN neck, decoupled heads --

    class _ConvSiLU(nn.Sequential):
        def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
            super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

    class _Bottleneck(nn.Module):
        def __init__(self, c: int, shortcut: bool):
            super().__init__()
            self.cv1, self.cv2 = _ConvSiLU(c, c), _ConvSiLU(c, c)
            self.add = shortcut

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.cv2(self.cv1(x))
            return x + y if self.add else y

    class _C2f(nn.Module):
        """YOLOv8's CSP block: 1x1 conv, split in two, n bottlenecks on one half, concat every stage, 1x1 conv."""

        def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True):
            super().__init__()
            self.c = cout // 2
            self.cv1 = _ConvSiLU(cin, 2 * self.c, 1)
            self.m = nn.ModuleList(_Bottleneck(self.c, shortcut) for _ in range(n))
            self.cv2 = _ConvSiLU((2 + n) * self.c, cout, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = list(self.cv1(x).chunk(2, 1))
            for m in self.m:
                y.append(m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class _SPPF(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.cv1, self.cv2 = _ConvSiLU(c, c // 2, 1), _ConvSiLU(c // 2 * 4, c, 1)
            self.pool = nn.MaxPool2d(5, 1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = [self.cv1(x)]
            for _ in range(3):
                y.append(self.pool(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class _DetectHead(nn.Module):
        """One scale's decoupled head: a box branch (4 ltrb distances) and a class branch, concatenated."""

        def __init__(self, cin: int, num_classes: int, hidden: int = 16):
            super().__init__()
            self.box = nn.Sequential(_ConvSiLU(cin, hidden), _ConvSiLU(hidden, hidden), nn.Conv2d(hidden, 4, 1))
            self.cls = nn.Sequential(_ConvSiLU(cin, hidden), _ConvSiLU(hidden, hidden),
                                     nn.Conv2d(hidden, num_classes, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.box(x), self.cls(x)], 1)

    class YoloTiny(nn.Module):
        """A small YOLOv8-style detector: strides 8/16/32, outputs {p3, p4, p5}, each N x (4 + C) x H x W
        (raw ltrb distances and class logits; models.detect decodes them)."""

        STRIDES = (8, 16, 32)

        def __init__(self, num_classes: int = 3, widths: tuple[int, int, int, int] = (8, 16, 32, 64)):
            super().__init__()
            w1, w2, w3, w4 = widths
            self.stem = nn.Sequential(_ConvSiLU(3, w1, 3, 2), _ConvSiLU(w1, w2, 3, 2), _C2f(w2, w2))  # /4
            self.stage3 = nn.Sequential(_ConvSiLU(w2, w3, 3, 2), _C2f(w3, w3))  # /8
            self.stage4 = nn.Sequential(_ConvSiLU(w3, w4, 3, 2), _C2f(w4, w4))  # /16
            self.stage5 = nn.Sequential(_ConvSiLU(w4, w4, 3, 2), _C2f(w4, w4), _SPPF(w4))  # /32
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.top4 = _C2f(w4 + w4, w4, shortcut=False)  # FPN: P5 up + P4
            self.top3 = _C2f(w4 + w3, w3, shortcut=False)  # FPN: N4 up + P3 -> out3
            self.down3 = _ConvSiLU(w3, w3, 3, 2)
            self.bottom4 = _C2f(w3 + w4, w4, shortcut=False)  # PAN: out3 down + N4 -> out4
            self.down4 = _ConvSiLU(w4, w4, 3, 2)
            self.bottom5 = _C2f(w4 + w4, w4, shortcut=False)  # PAN: out4 down + P5 -> out5
            self.heads = nn.ModuleList([_DetectHead(w3, num_classes), _DetectHead(w4, num_classes),
                                        _DetectHead(w4, num_classes)])
            _init_cnn(self)
            for head in self.heads:  # YOLOv8's bias prior: few objects per cell before training
                cls_out = cast(nn.Conv2d, cast(_DetectHead, head).cls[-1])
                nn.init.constant_(cast(torch.Tensor, cls_out.bias), -4.6)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            p3 = self.stage3(self.stem(x))
            p4 = self.stage4(p3)
            p5 = self.stage5(p4)
            n4 = self.top4(torch.cat([self.up(p5), p4], 1))
            out3 = self.top3(torch.cat([self.up(n4), p3], 1))
            out4 = self.bottom4(torch.cat([self.down3(out3), n4], 1))
            out5 = self.bottom5(torch.cat([self.down4(out4), p5], 1))
            return {name: head(f) for name, head, f in zip(("p3", "p4", "p5"), self.heads, (out3, out4, out5))}
