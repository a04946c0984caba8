"""Small architectures with structured outputs and integer inputs, written here (nothing imported from torchvision
or transformers), with deterministic weights: what the loaders must handle beyond "one float tensor in, one out".

- `DictSegmenter`: a torchvision-style segmenter returning `{"out": ..., "aux": ...}` (per-pixel class maps at
  the input's resolution from the final and an intermediate stage).
- `TinyBert`: a BERT-style text classifier taking `input_ids` and `attention_mask` (int64), with token and
  position embeddings, two transformer layers and a pooled classifier; returns a `TextOutput` (an OrderedDict
  subclass and dataclass, registered with torch's pytree as Hugging Face's `ModelOutput` is) holding `logits`
  and `last_hidden_state`; `TinyBertLogits` (`dict_output=False`) returns the logits alone and can be scripted.
- `TinyViT`: a ViT on torch's own `nn.TransformerEncoder` (or `nn.MultiheadAttention` blocks, as torchvision's
  vit_b_16): what the legacy ONNX exporter refuses once traced and saved as TorchScript.
- `TinyDetector`: a residual CNN with YOLO's C2f and SPPF blocks (split into chunks, bottlenecks, pooling
  pyramid), a neck and two heads: traced, its shapes inside the blocks are what shape inference loses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own convention

SEGMENTER_SHAPE = (1, 3, 32, 32)
BERT_VOCAB = 100
BERT_SEQ = 16


@dataclass
class TextOutput(OrderedDict):
    """A `ModelOutput`-like result: a dataclass whose set fields are also its dict items, in field order."""

    logits: Any = None
    last_hidden_state: Any = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value


def _flatten_text_output(out: TextOutput) -> tuple[list[Any], Any]:
    keys = list(out.keys())
    return [out[k] for k in keys], keys


def _unflatten_text_output(values: Any, keys: Any) -> TextOutput:
    return TextOutput(**dict(zip(keys, values)))


def _flatten_with_keys(out: TextOutput) -> tuple[list[Any], Any]:
    from torch.utils._pytree import MappingKey

    keys = list(out.keys())
    return [(MappingKey(k), out[k]) for k in keys], keys


torch.utils._pytree.register_pytree_node(TextOutput, _flatten_text_output, _unflatten_text_output,
                                         serialized_type_name=f"{__name__}.TextOutput",
                                         flatten_with_keys_fn=_flatten_with_keys)


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialize every parameter from `seed` (normal, std 0.2 / sqrt(fan-in)) so weights are the same everywhere."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(fan_in, 1)) ** 0.5)
    return module.eval()


class DictSegmenter(nn.Module):
    """Conv backbone at 1/2 resolution, a main head on the last stage and an auxiliary head on the one before."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(16, classes, 1)
        self.aux = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mid = self.stage1(self.stem(x))
        top = self.stage2(mid)
        out = F.interpolate(self.head(top), scale_factor=2.0, mode="bilinear", align_corners=False)
        aux = F.interpolate(self.aux(mid), scale_factor=2.0, mode="bilinear", align_corners=False)
        return {"out": out, "aux": aux}


class _Layer(nn.Module):
    """Post-norm transformer layer with explicit multi-head attention (no fused fast path)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5 + bias, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = self.norm1(x + self.proj(y))
        return self.norm2(x + self.ff(x))


class TinyBert(nn.Module):
    """Token + position embeddings, two layers, a tanh pooler on the first token and a 3-class classifier."""

    def __init__(self, vocab: int = BERT_VOCAB, max_len: int = 64, dim: int = 32, heads: int = 4,
                 classes: int = 3) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.zeros(1, max_len, dim))
        self.layers = nn.ModuleList([_Layer(dim, heads) for _ in range(2)])
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        logits, hidden = self.encode(input_ids, attention_mask)
        return TextOutput(logits=logits, last_hidden_state=hidden)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the last hidden state."""
        t = input_ids.shape[1]
        x = self.tokens(input_ids) + self.positions[:, :t]
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        return self.classifier(torch.tanh(self.pooler(x[:, 0]))), x


class TinyBertLogits(TinyBert):
    """TinyBert returning the logits alone (scriptable: no TextOutput)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encode(input_ids, attention_mask)[0]


def build_segmenter(seed: int = 17) -> DictSegmenter:
    """The dict-output segmenter with weights from `seed`."""
    return _seeded(DictSegmenter(), seed)  # type: ignore[return-value]


def build_text_model(seed: int = 18, *, dict_output: bool = True) -> TinyBert:
    """The BERT-style text model with weights from `seed`."""
    return _seeded(TinyBert() if dict_output else TinyBertLogits(), seed)  # type: ignore[return-value]


def text_inputs(batch: int = 1, seq: int = BERT_SEQ, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded `input_ids` (below the vocabulary) and `attention_mask` (ones, the last quarter zero) as int64."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, BERT_VOCAB, (batch, seq), generator=gen, dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[:, seq - seq // 4:] = 0
    return ids, mask


# -- TorchScript transformers and YOLO-style blocks (issue 17, conversion and shapes) -----------------------------

VIT_SHAPE = (1, 3, 32, 32)
DETECTOR_SHAPE = (1, 3, 64, 64)


class _MhaBlock(nn.Module):
    """Pre-norm block on nn.MultiheadAttention, as torchvision's ViT EncoderBlock."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, a class token, position embeddings, two encoder layers and a linear head.

    `encoder="torch"`: nn.TransformerEncoder (its eval fast path under no_grad is one fused op per layer);
    `encoder="mha"`: blocks on nn.MultiheadAttention (fast path: aten::_native_multi_head_attention).
    """

    def __init__(self, encoder: str = "torch", image: int = 32, patch: int = 8, dim: int = 32, heads: int = 4,
                 depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        if encoder == "torch":
            layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            self.encoder: nn.Module = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        else:
            self.encoder = nn.Sequential(*(_MhaBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.encoder(x)
        return self.head(self.norm(x[:, 0]))


def _cbs(c1: int, c2: int, k: int = 1, s: int = 1) -> nn.Sequential:
    """Conv, BatchNorm, SiLU: YOLO's basic block."""
    return nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())


class _Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = _cbs(c, c, 3), _cbs(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class C2f(nn.Module):
    """YOLOv8's C2f: a 1x1 conv split in two chunks, bottlenecks on the last chunk, everything concatenated."""

    def __init__(self, c1: int, c2: int, n: int = 1) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = _cbs(c1, 2 * self.c)
        self.cv2 = _cbs((2 + n) * self.c, c2)
        self.m = nn.ModuleList(_Bottleneck(self.c) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """YOLO's spatial pyramid pooling (fast): three chained 5x5 max pools, concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c = c1 // 2
        self.cv1, self.cv2 = _cbs(c1, c), _cbs(4 * c, c2)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class TinyDetector(nn.Module):
    """Backbone of strided convs and C2f blocks with SPPF, an upsampling neck, two heads flattened per anchor."""

    def __init__(self, outputs: int = 9) -> None:
        super().__init__()
        self.b1 = nn.Sequential(_cbs(3, 8, 3, 2), _cbs(8, 16, 3, 2), C2f(16, 16))
        self.b2 = nn.Sequential(_cbs(16, 32, 3, 2), C2f(32, 32))
        self.b3 = nn.Sequential(_cbs(32, 64, 3, 2), C2f(64, 64), SPPF(64, 64))
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.neck = C2f(96, 32)
        self.outputs = outputs
        self.h1, self.h2 = nn.Conv2d(32, outputs, 1), nn.Conv2d(64, outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b2(self.b1(x))
        p4 = self.b3(p3)
        n3 = self.neck(torch.cat([self.up(p4), p3], 1))
        b = x.shape[0]
        return torch.cat([self.h1(n3).view(b, self.outputs, -1), self.h2(p4).view(b, self.outputs, -1)], 2)


def build_vit(seed: int = 19, encoder: str = "torch") -> TinyViT:
    """The small ViT with weights from `seed`."""
    return _seeded(TinyViT(encoder), seed)  # type: ignore[return-value]


def build_detector(seed: int = 20) -> TinyDetector:
    """The YOLO-style detector with weights from `seed`."""
    return _seeded(TinyDetector(), seed)  # type: ignore[return-value]
