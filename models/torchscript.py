"""Make a TorchScript module the legacy ONNX exporter can take, when it refuses the module as saved.

Two things make a traced `model.pt` unexportable that a re-export from Python would not:

- attention fast paths recorded by the tracer: `nn.MultiheadAttention` and `nn.TransformerEncoderLayer` in
  eval mode under `torch.no_grad()` call `aten::_native_multi_head_attention` and
  `aten::_transformer_encoder_layer_fwd`, which have no ONNX form. They are replaced here, in the frozen graph,
  by the same computation in plain ops (`_attention`, `_encoder_layer`, written after torch's reference path).
- ops whose ONNX form needs the rank of a tensor the graph does not record (after `torch.jit.save` the graph
  keeps no shapes): `aten::unflatten` becomes `aten::reshape` to the sizes read from one run of the module on the
  example inputs, with the batch entry -1 where a second run at batch 2 shows which one it is.

`prepare(module, example_inputs)` returns the frozen, rewritten module and what it changed. torch is imported
only when called.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from models.extras import require

FAST_PATH_OPS = ("aten::_native_multi_head_attention", "aten::_transformer_encoder_layer_fwd")


@dataclass(frozen=True)
class Prepared:
    """A frozen module ready for the legacy exporter, and the rewrites made (op kind -> count)."""

    module: Any
    rewrites: dict[str, int]


def failing_operator(exc: BaseException) -> str | None:
    """The operator the legacy exporter names in its refusal (`aten::...`), or None."""
    text = str(exc)
    found = re.search(r"operator '([\w:.]+)'", text)
    if found:
        return found.group(1)
    found = re.search(r"ONNX export of ([\w.]+)", text)
    if found:
        op = found.group(1)
        return op if "::" in op else f"aten::{op}"
    return None


def prepare(module: Any, example_inputs: tuple) -> Prepared:
    """`module` frozen, its attention fast paths and rank-dependent ops rewritten (module docstring)."""
    torch = require("torch", "profile")
    frozen = torch.jit.freeze(module.eval()) if module.training is False else torch.jit.freeze(module)
    graph = frozen.graph
    torch._C._jit_pass_inline(graph)
    rewrites: dict[str, int] = {}
    for kind, fn in ((FAST_PATH_OPS[0], _attention_graph(torch)), (FAST_PATH_OPS[1], _encoder_layer_graph(torch))):
        count = _replace_calls(graph, kind, fn, torch)
        if count:
            rewrites[kind] = count
    torch._C._jit_pass_constant_propagation(graph)
    count = _static_unflatten(frozen, example_inputs, torch)
    if count:
        rewrites["aten::unflatten"] = count
    torch._C._jit_pass_dce(graph)
    return Prepared(frozen, rewrites)


def _replace_calls(graph: Any, kind: str, callee: Any, torch: Any) -> int:
    """Replace every node of `kind` in `graph` by the body of `callee` (same inputs and outputs)."""
    nodes = [n for n in graph.nodes() if n.kind() == kind]
    for node in nodes:
        with graph.insert_point_guard(node):
            outs = graph.insertGraph(callee, list(node.inputs()))
        for old, new in zip(node.outputs(), outs):
            old.replaceAllUsesWith(new)
        node.destroy()
    return len(nodes)


_GRAPHS: dict[str, Any] = {}


def _attention_graph(torch: Any) -> Any:
    if "attention" not in _GRAPHS:
        _GRAPHS["attention"] = _inlined(torch.jit.script(_attention_fn(torch)), torch)
    return _GRAPHS["attention"]


def _encoder_layer_graph(torch: Any) -> Any:
    if "encoder" not in _GRAPHS:
        _GRAPHS["encoder"] = _inlined(torch.jit.script(_encoder_layer_fn(torch)), torch)
    return _GRAPHS["encoder"]


def _inlined(fn: Any, torch: Any) -> Any:
    """A copy of the function's graph with calls inlined and a returned tuple as separate outputs (as the op's)."""
    graph = fn.graph.copy()
    torch._C._jit_pass_inline(graph)
    ret = next(graph.outputs())
    if ret.node().kind() == "prim::TupleConstruct":
        items = list(ret.node().inputs())
        graph.eraseOutput(0)
        for item in items:
            graph.registerOutput(item)
    return graph


def _attention_fn(torch: Any) -> Any:
    from typing import Optional, Tuple  # noqa: UP035 - TorchScript's own annotation forms

    from torch import Tensor
    from torch.nn import functional as F  # noqa: N812 - torch's convention

    def _attention(query: Tensor, key: Tensor, value: Tensor, embed_dim: int, num_heads: int, qkv_weight: Tensor,
                   qkv_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor, mask: Optional[Tensor],  # noqa: UP045
                   need_weights: bool, average_attn_weights: bool,
                   mask_type: Optional[int]) -> Tuple[Tensor, Tensor]:  # noqa: UP006,UP045
        """aten::_native_multi_head_attention in plain ops: batch-first (B, T, E) query, key and value."""
        b, t, s = query.size(0), query.size(1), key.size(1)
        hd = embed_dim // num_heads
        w = qkv_weight.chunk(3)
        bias = qkv_bias.chunk(3)
        q = F.linear(query, w[0], bias[0]).reshape(b, t, num_heads, hd).transpose(1, 2)
        k = F.linear(key, w[1], bias[1]).reshape(b, s, num_heads, hd).transpose(1, 2)
        v = F.linear(value, w[2], bias[2]).reshape(b, s, num_heads, hd).transpose(1, 2)
        att = torch.matmul(q, k.transpose(-2, -1)) * (float(hd) ** -0.5)
        if mask is not None:
            m = mask
            if mask_type is not None and mask_type == 1:  # a key padding mask (B, S)
                m = mask.reshape(b, 1, 1, s)
            if m.dtype == torch.bool:
                att = att.masked_fill(m, float("-inf"))
            else:
                att = att + m
        p = torch.softmax(att, dim=-1)
        out = torch.matmul(p, v).transpose(1, 2).reshape(b, t, embed_dim)
        out = F.linear(out, proj_weight, proj_bias)
        weights = p.mean(dim=1) if average_attn_weights else p
        return out, weights if need_weights else torch.empty(0)

    return _attention


def _encoder_layer_fn(torch: Any) -> Any:
    from typing import Optional

    from torch import Tensor
    from torch.nn import functional as F  # noqa: N812 - torch's convention

    attention = torch.jit.script(_attention_fn(torch))

    def _encoder_layer(src: Tensor, embed_dim: int, num_heads: int, qkv_weight: Tensor, qkv_bias: Tensor,
                       proj_weight: Tensor, proj_bias: Tensor, use_gelu: bool, norm_first: bool, eps: float,
                       norm_weight_1: Tensor, norm_bias_1: Tensor, norm_weight_2: Tensor, norm_bias_2: Tensor,
                       ffn_weight_1: Tensor, ffn_bias_1: Tensor, ffn_weight_2: Tensor, ffn_bias_2: Tensor,
                       mask: Optional[Tensor], mask_type: Optional[int]) -> Tensor:  # noqa: UP045
        """aten::_transformer_encoder_layer_fwd in plain ops (nn.TransformerEncoderLayer's reference path)."""
        x = src
        h = F.layer_norm(x, [embed_dim], norm_weight_1, norm_bias_1, eps) if norm_first else x
        a = attention(h, h, h, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, False,
                      True, mask_type)[0]
        x = x + a
        if not norm_first:
            x = F.layer_norm(x, [embed_dim], norm_weight_1, norm_bias_1, eps)
        h = F.layer_norm(x, [embed_dim], norm_weight_2, norm_bias_2, eps) if norm_first else x
        f = F.linear(h, ffn_weight_1, ffn_bias_1)
        f = F.gelu(f) if use_gelu else F.relu(f)
        x = x + F.linear(f, ffn_weight_2, ffn_bias_2)
        if not norm_first:
            x = F.layer_norm(x, [embed_dim], norm_weight_2, norm_bias_2, eps)
        return x

    return _encoder_layer


def _static_unflatten(frozen: Any, example_inputs: tuple, torch: Any) -> int:
    """Replace `aten::unflatten` by `aten::reshape` to its output sizes from runs at the example batch and at twice
    it (the entry that follows the batch becomes -1); untouched when the module cannot run at twice the batch
    and the output has more than one entry, or the sizes cannot be read."""
    graph = frozen.graph
    nodes = [n for n in graph.nodes() if n.kind() == "aten::unflatten"]
    if not nodes:
        return 0
    first = _probe_shapes(frozen, [n.output() for n in nodes], example_inputs, torch)
    doubled = tuple(torch.cat([t, t]) if t.dim() > 0 else t for t in example_inputs)
    try:
        second = _probe_shapes(frozen, [n.output() for n in nodes], doubled, torch)
    except Exception:  # noqa: BLE001 - the batch is fixed in the module: the sizes at the example batch hold
        second = first
    count = 0
    for node, a, b in zip(nodes, first, second):
        if len(a) != len(b):
            continue
        differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(differ) > 1:
            continue
        sizes = [-1 if i in differ else int(d) for i, d in enumerate(a)]
        with graph.insert_point_guard(node):
            shape = graph.insertConstant(sizes)
            reshape = graph.create("aten::reshape", [node.inputsAt(0), shape], 1)
            graph.insertNode(reshape)
        reshape.output().setType(node.output().type())
        node.output().replaceAllUsesWith(reshape.output())
        node.destroy()
        count += 1
    return count


def _probe_shapes(frozen: Any, values: list[Any], example_inputs: tuple, torch: Any) -> list[tuple[int, ...]]:
    """The shapes of the graph's `values` from one run of a copy of the graph that returns them."""
    graph = frozen.graph
    probe = graph.copy()
    index = {v: i for i, v in enumerate(n.output() for n in graph.nodes() if n.outputsSize() == 1)}
    mapped = [n.output() for n in probe.nodes() if n.outputsSize() == 1]
    picked = [mapped[index[v]] for v in values]
    while len(list(probe.outputs())):
        probe.eraseOutput(0)
    shapes = [probe.insertNode(probe.create("aten::size", [v], 1)).output() for v in picked]
    for node in [s.node() for s in shapes]:
        node.output().setType(torch._C.ListType.ofInts())
        node.moveBefore(probe.return_node())
    tup = probe.create("prim::TupleConstruct", shapes, 1)
    tup.output().setType(torch._C.TupleType([s.type() for s in shapes]))
    probe.insertNode(tup)
    tup.moveBefore(probe.return_node())
    probe.registerOutput(tup.output())
    fn = torch._C._create_function_from_graph("splitinfer_probe", probe)
    with torch.no_grad():
        got = fn(frozen._c, *example_inputs)
    return [tuple(int(d) for d in s) for s in got]
