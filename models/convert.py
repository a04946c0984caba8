"""Convert a model to ONNX once, and normalize any ONNX file into the form the rest of splitinfer relies on.

The normal form: every node has a non-empty unique name, all weights are inside the one .onnx file (no
external data), shapes are inferred and kept in value_info, `onnx.checker` passes, and the batch dimension
(dim 0 of every input and output) is the symbolic `batch` where the graph allows it.

Exporters: torch's dynamo exporter (`dynamo=True`) for nn.Modules and ExportedPrograms, opset 18 (its
down-conversion to 17 fails); the legacy TorchScript exporter for ScriptModules, and as the fallback when
dynamo fails on an nn.Module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.dtypes import numpy_dtype
from models.extras import require
from models.inputs import random_array
from models.ortopts import make_session

log = logging.getLogger(__name__)

OPSET = 18
EDGE_IR_VERSION = 8  # ONNX 1.13's IR, which opset 18 belongs to: older onnxruntime builds on edge devices read it
BATCH_DIM = "batch"
RTOL = 1e-4  # max |onnx - torch| / max |torch| allowed, per output
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")


class ConversionError(ValueError):
    """A model could not be converted to, or normalized as, a valid ONNX model."""


def to_onnx(module_or_program: Any, example_inputs: tuple, out_path: Path, *,
            input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
            verbose: bool = False, progress: Callable[[str], None] | None = None, source: str | None = None) -> Path:
    """Export an nn.Module, ScriptModule or ExportedProgram to normalized ONNX at `out_path`, checked against torch.

    `progress` hears one line per finished step with its time ("exporting model.pt to ONNX (legacy TorchScript
    exporter)... 12.3 s"); `source` names the model in those lines (default: the output file's name).
    """
    torch = require("torch", "profile")
    say = progress or (lambda _msg: None)
    what = source or Path(out_path).name
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    example_inputs = tuple(example_inputs)
    structure = _torch_outputs(module_or_program, example_inputs)
    reference = [t.detach().cpu().numpy() for _, t in structure.leaves]
    in_names = list(input_names or _default_names("input", len(example_inputs)))
    out_names = list(output_names or structure.names)
    if structure.needs_flattening and not isinstance(module_or_program, torch.export.ExportedProgram):
        module_or_program = _flattened(module_or_program, example_inputs, structure, torch)
    # exported under plain names (TorchScript refuses names like "0"), renamed after
    export_names = _default_names("output", len(out_names))
    args = (module_or_program, example_inputs, out_path, in_names, export_names, verbose)
    legacy = f"exporting {what} to ONNX (legacy TorchScript exporter)"
    if isinstance(module_or_program, torch.jit.ScriptModule):
        with timed_step(say, legacy):
            _export_script(args, say)
    elif isinstance(module_or_program, torch.export.ExportedProgram):
        with timed_step(say, f"exporting {what} to ONNX (dynamo exporter)"):
            _export_or_raise(_export_dynamo, args, "dynamo")
    elif isinstance(module_or_program, torch.nn.Module):
        try:
            with timed_step(say, f"exporting {what} to ONNX (dynamo exporter)"):
                _export_dynamo(*args)
        except Exception as exc:  # noqa: BLE001 - any dynamo failure: try the other exporter, keep the cause
            log.warning("dynamo ONNX export of %s failed (%s); falling back to the legacy exporter",
                        type(module_or_program).__name__, _summary(exc))
            with timed_step(say, legacy):
                _export_or_raise(_export_legacy, args, f"dynamo: {_summary(exc)}; legacy")
    else:
        raise ConversionError(
            f"cannot export {type(module_or_program).__name__}: "
            "expected torch.nn.Module, ScriptModule or ExportedProgram"
        )
    if export_names != out_names:
        _rename_outputs(out_path, export_names, out_names)
    with timed_step(say, f"checking {out_path.name} and inferring its shapes"):
        normalize_onnx(out_path)
    resolve_shapes(out_path, say)
    _lower_ir_version(out_path)
    if not make_batch_dynamic(out_path):  # the loader says so once, as a progress line
        log.info("%s: exported with a fixed batch dimension", out_path.name)
    _check_against_reference(out_path, example_inputs, reference)
    return out_path


def resolve_shapes(path: Path, progress: Callable[[str], None] | None = None) -> FoldResult:
    """Fold the shape arithmetic of the ONNX file at `path` in place (`fold_shape_subgraphs`), saying what it did."""
    say = progress or (lambda _msg: None)
    start = time.monotonic()
    result = fold_shape_subgraphs(path)
    if result.folded or result.kept:
        kept = (f"; {len(result.kept)} vary with the batch size and stay computed" if result.kept else "")
        say(f"folding the shape computations of {Path(path).name}: {result.folded} made constant{kept}... "
            f"{time.monotonic() - start:.1f} s")
    return result


@contextlib.contextmanager
def timed_step(say: Callable[[str], None], what: str) -> Iterator[None]:
    """Say "`what`... 12.3 s" once the step inside finishes (nothing when it raises: its error says enough)."""
    start = time.monotonic()
    yield
    say(f"{what}... {time.monotonic() - start:.1f} s")


def normalize_onnx(path: Path) -> None:
    """Name every node uniquely, embed all weights in the file, infer shapes and run onnx.checker, in place."""
    onnx = require("onnx", "profile")
    path = Path(path)
    try:
        header = onnx.load(str(path), load_external_data=False)
        external = {loc for t in _all_initializers(header.graph) if (loc := _external_location(t)) is not None}
        model = onnx.load(str(path))  # with external data, resolved next to the file
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ValueError...
        raise ConversionError(f"{path}: cannot be read as ONNX ({type(exc).__name__}: {exc})") from exc
    _name_nodes(model.graph)
    _constants_to_initializers(model.graph)
    model = _infer_shapes(model, path)
    if model.ByteSize() >= 2**31 - 1:
        raise ConversionError(f"{path}: model is over 2 GiB and cannot be stored in one .onnx file")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - ValidationError and friends
        raise ConversionError(f"{path}: fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    onnx.save_model(model, str(path), save_as_external_data=False)
    for location in external:
        data = (path.parent / location).resolve()
        if data != path.resolve() and data.parent == path.parent.resolve() and data.is_file():
            data.unlink()  # the weights are embedded now; a stale .data file would only confuse


def make_batch_dynamic(path: Path) -> bool:
    """Make dim 0 of every input and output the symbolic `batch` if the graph runs at batch 2; else leave it fixed."""
    onnx = require("onnx", "profile")
    path = Path(path)
    model = onnx.load(str(path))
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializer_names]
    dim0 = [vi.type.tensor_type.shape.dim[0] for vi in inputs if vi.type.tensor_type.shape.dim]
    if not dim0:
        return False
    if all(d.HasField("dim_param") and d.dim_param for d in dim0):  # the file declares a symbolic batch
        old = {d.dim_param for d in dim0}
        if old != {BATCH_DIM}:
            _rename_dim_params(model.graph, old, BATCH_DIM)
            onnx.save_model(model, str(path))
        return True
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    for io_ in list(candidate.graph.input) + list(candidate.graph.output):
        if io_.name in initializer_names or not io_.type.tensor_type.shape.dim:
            continue
        io_.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM  # clears dim_value (oneof)
    del candidate.graph.value_info[:]  # inferred again for the new batch dim
    ok = _runs_at_batch_two(candidate)
    if not ok:
        freed = total = _free_batch(candidate)
        while freed:  # what reads a freed Reshape's output is seen to carry the batch once that one does
            freed = _free_batch(candidate)
            total += freed
        freed = total
        if freed and _runs_at_batch_two(candidate) and _batch_of_two_is_two_of_one(candidate, inputs):
            log.info("%s: %d Reshape(s), Resize(s) and constants at batch 1 now keep the input's batch", path.name,
                     freed)
            ok = True
    if not ok:
        # info, not warning: with no logging configured a warning reaches stderr past -q; the loader says it once
        log.info("%s: the batch dimension is fixed in the graph (e.g. a Reshape to batch 1); kept as is", path.name)
        return False
    onnx.save_model(candidate, str(path))
    log.info("%s: made the fixed batch dimension dynamic (%r)", path.name, BATCH_DIM)
    return True


def _runs_at_batch_two(candidate: Any) -> bool:
    """Whether `candidate` (batch dims symbolic) infers and runs at batch 2 with outputs of batch 2, in place."""
    onnx = require("onnx", "profile")
    initializer_names = {t.name for t in candidate.graph.initializer}
    inputs = [i for i in candidate.graph.input if i.name not in initializer_names]
    try:
        inferred = onnx.shape_inference.infer_shapes(candidate)
        outputs = run_onnx(inferred.SerializeToString(), random_feeds(inputs, batch=2), log_severity=4)
    except Exception as exc:  # noqa: BLE001 - any failure means the batch size is baked into the graph
        log.debug("batch 2 run failed: %s", exc)
        return False
    candidate.CopyFrom(inferred)
    return all(o.ndim > 0 and o.shape[0] == 2 for o in outputs)



def _free_batch(candidate: Any) -> int:
    """One round of freeing what torch.export baked batch 1 into (Reshapes, Resizes, class tokens); the count."""
    return _free_reshape_batch(candidate) + _free_resize_batch(candidate) + _expand_batch_constants(candidate)

def _free_reshape_batch(candidate: Any) -> int:
    """Reshapes to a constant target starting with 1 whose data has the symbolic batch as dim 0 (torch.export
    bakes the example's batch 1 into `view`s): that 1 becomes -1 (or 0 next to a -1). The count changed."""
    from onnx import numpy_helper

    graph = candidate.graph
    batched = _batched(candidate)
    holders: dict[str, Any] = {t.name: t for t in graph.initializer}
    holders.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value"})
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    changed = 0
    for name, tensor in holders.items():
        users = readers.get(name, [])
        if not users or not all(_frees_batch(u, name, batched) for u in users):
            continue
        value = numpy_helper.to_array(tensor)
        if value.ndim != 1 or not len(value) or value[0] != 1 or (value == 0).any():
            continue
        value = value.copy()
        # -1 (from the element count) where the target has none: the data's dim 0 may be the batch times the
        # heads (attention's Reshape to [1, heads, d, t] of a [batch * heads, d, t]); else 0 (copy its dim 0)
        value[0] = 0 if (value == -1).any() else -1
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
        for user in users:  # no other 0 in the target: allowzero made no difference until now
            for attr in user.attribute:
                if attr.name == "allowzero":
                    attr.i = 0
        changed += len(users)
    return changed




def _batched(candidate: Any) -> dict[str, list[int]]:
    """The tensors whose dim 0 follows the symbolic batch (under whatever name inference gave it), with their
    inferred dims (-1 where unknown); empty when inference fails. Checked by a run at batch 2 after."""
    onnx = require("onnx", "profile")
    try:
        inferred = onnx.shape_inference.infer_shapes(candidate)
    except Exception:  # noqa: BLE001 - nothing to go on
        return {}
    return {vi.name: [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
            for vi in (*inferred.graph.value_info, *inferred.graph.input)
            if vi.type.tensor_type.shape.dim and not vi.type.tensor_type.shape.dim[0].HasField("dim_value")}


def _free_resize_batch(candidate: Any) -> int:
    """Resizes to constant `sizes` of batch 1 (torch.export's upsample at batch 1: [1, C, H, W]) of a batched input
    whose channels the sizes keep: they resize the spatial axes only (opset 18's `axes`). The count changed."""
    from onnx import helper, numpy_helper

    graph = candidate.graph
    batched = _batched(candidate)
    weights = {t.name: t for t in graph.initializer}
    changed = 0
    for node in graph.node:
        if (node.op_type != "Resize" or len(node.input) < 4 or node.input[0] not in batched
                or node.input[3] not in weights or any(a.name == "axes" for a in node.attribute)):
            continue
        sizes = numpy_helper.to_array(weights[node.input[3]])
        dims = batched[node.input[0]]
        if sizes.ndim != 1 or len(sizes) != len(dims) or len(dims) < 3 or sizes[0] != 1 or sizes[1] != dims[1]:
            continue
        name = f"{node.input[3]}_spatial"
        if name not in weights:
            weights[name] = numpy_helper.from_array(sizes[2:].astype(np.int64), name)
            graph.initializer.append(weights[name])
        node.input[3] = name
        node.attribute.append(helper.make_attribute("axes", list(range(2, len(dims)))))
        changed += 1
    return changed

def _expand_batch_constants(candidate: Any) -> int:
    """Constants of batch 1 concatenated (on an axis other than 0) with a tensor that has the symbolic batch: a
    class token `expand`ed to the example's batch 1, which torch.export folds into a weight. Each becomes an
    Expand to that tensor's batch. The count changed."""
    from onnx import helper, numpy_helper

    graph = candidate.graph
    batched = _batched(candidate)
    weights = {t.name: t for t in graph.initializer}
    taken = set(weights) | {o for n in graph.node for o in n.output} | {n.name for n in graph.node}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    changed = 0
    for index in range(len(graph.node) - 1, -1, -1):  # from the end: inserting keeps earlier indices
        node = graph.node[index]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        source = next((i for i in node.input if i in batched), None)
        if node.op_type != "Concat" or source is None:
            continue
        for slot, name in enumerate(list(node.input)):
            dims = list(weights[name].dims) if name in weights else []
            if len(dims) < 2 or dims[0] != 1 or axis % len(dims) == 0:
                continue
            stem = fresh(f"{name}_batched")
            rest = fresh(f"{stem}_rest")
            graph.initializer.append(numpy_helper.from_array(np.asarray(dims[1:], dtype=np.int64), rest))
            made = [helper.make_node("Shape", [source], [fresh(f"{stem}_n")], name=fresh(f"{stem}_shape"), end=1),
                    helper.make_node("Concat", [f"{stem}_n", rest], [fresh(f"{stem}_to")], name=fresh(f"{stem}_cat"),
                                     axis=0),
                    helper.make_node("Expand", [name, f"{stem}_to"], [stem], name=fresh(f"{stem}_expand"))]
            for k, new in enumerate(made):
                graph.node.insert(index + k, new)
            node.input[slot] = stem
            changed += 1
    return changed

def _frees_batch(node: Any, target: str, batched: Mapping[str, Any]) -> bool:
    return (node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] == target
            and node.input[0] in batched)


def _allows_zero(reshape: Any) -> bool:
    """A Reshape whose 0 entries mean size 0 rather than "copy the input's size"."""
    return any(a.name == "allowzero" and a.i for a in reshape.attribute)


def _batch_of_two_is_two_of_one(candidate: Any, inputs: Sequence[Any]) -> bool:
    """Whether the candidate's outputs at batch 2 are its outputs for each sample at batch 1, stacked."""
    data = candidate.SerializeToString()
    pair = random_feeds(inputs, batch=2)
    try:
        both = run_onnx(data, pair, log_severity=4)
        each = [run_onnx(data, {k: v[i:i + 1] for k, v in pair.items()}, log_severity=4) for i in range(2)]
    except Exception as exc:  # noqa: BLE001 - a failure is a no
        log.debug("batch 2 against 2 x batch 1 failed: %s", exc)
        return False
    for j, out in enumerate(both):
        stacked = np.concatenate([each[0][j], each[1][j]])
        scale = max(float(np.max(np.abs(stacked))) if stacked.size else 0.0, 1e-6)
        if out.shape != stacked.shape or float(np.max(np.abs(out - stacked), initial=0.0)) > RTOL * scale:
            return False
    return True


def _lower_ir_version(path: Path) -> None:
    """Stamp IR version 8 on our own exports when nothing in them needs a newer IR (checked by onnx.checker)."""
    onnx = require("onnx", "profile")
    model = onnx.load(str(path))
    opsets = {o.domain: o.version for o in model.opset_import}
    if model.ir_version <= EDGE_IR_VERSION or model.functions or opsets.get("", 0) > OPSET or set(opsets) - {""}:
        return
    original = model.ir_version
    model.ir_version = EDGE_IR_VERSION
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - keep the exporter's IR version then
        log.debug("%s: keeping IR version %d (%s)", path.name, original, exc)
        return
    onnx.save_model(model, str(path))


# -- exporters -------------------------------------------------------------------------------------


def _export_dynamo(program: Any, example_inputs: tuple, out_path: Path, in_names: list[str],
                   out_names: list[str], verbose: bool) -> None:
    torch = require("torch", "profile")
    kwargs: dict[str, Any] = {}
    if not isinstance(program, torch.export.ExportedProgram):  # a program carries its own dynamic shapes
        batch = torch.export.Dim(BATCH_DIM)
        specs = tuple({0: batch} if t.dim() > 0 else None for t in example_inputs)
        kwargs["dynamic_shapes"] = (specs,) if getattr(program, "varargs_forward", False) else specs
    with _quiet(verbose):
        torch.onnx.export(program, example_inputs, str(out_path), dynamo=True, opset_version=OPSET,
                          input_names=in_names, output_names=out_names, verbose=verbose, **kwargs)


def _export_legacy(module: Any, example_inputs: tuple, out_path: Path, in_names: list[str],
                   out_names: list[str], verbose: bool) -> None:
    torch = require("torch", "profile")
    axes = {name: {0: BATCH_DIM} for name in in_names + out_names}
    with _quiet(verbose):
        torch.onnx.export(module, example_inputs, str(out_path), dynamo=False, opset_version=OPSET,
                          input_names=in_names, output_names=out_names, dynamic_axes=axes, verbose=verbose)


def _export_script(args: tuple, say: Callable[[str], None]) -> None:
    """The legacy exporter on a ScriptModule; when it refuses, again on the module frozen with its attention fast
    paths and rank-dependent ops rewritten (models.torchscript); else one line naming the operator."""
    from models import torchscript

    try:
        _export_legacy(*args)
        return
    except Exception as exc:  # noqa: BLE001 - the exporter raises anything; try the prepared module next
        first = exc
    module, example_inputs = args[0], args[1]
    try:
        prepared = torchscript.prepare(module, example_inputs)
    except Exception as exc:  # noqa: BLE001 - freezing or rewriting failed: the first refusal says why
        log.debug("preparing the TorchScript module failed: %s", exc)
        raise _script_refusal(first) from first
    if prepared.rewrites:
        say("the legacy exporter refused the TorchScript module; retrying with "
            + ", ".join(f"{n} {op} rewritten" for op, n in prepared.rewrites.items()))
    try:
        _export_legacy(prepared.module, *args[1:])
    except Exception as exc:  # noqa: BLE001 - still refused: name the operator
        raise _script_refusal(exc) from exc


def _script_refusal(exc: BaseException) -> ConversionError:
    from models.torchscript import failing_operator

    op = failing_operator(exc)
    what = f"the operator {op}" if op else "this TorchScript module"
    why = _summary(exc).split("  [Caused by")[0][:160]
    return ConversionError(f"the legacy TorchScript exporter cannot convert {what} ({why}); hand "
                           "over the model as .pt2 (torch.export.save) or ONNX instead; --debug shows the full "
                           "graph and traceback")


def _export_or_raise(export: Any, args: tuple, exporter: str) -> None:
    try:
        export(*args)
    except Exception as exc:  # noqa: BLE001 - the exporters raise anything; keep it as the cause
        raise ConversionError(f"ONNX export failed ({exporter}: {_summary(exc)})") from exc


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence the exporters' progress prints, deprecation warnings and logger chatter unless verbose."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        # torch.export prints failing graphs to stderr, and the legacy exporter's C++ logs the whole graph at an
        # exception (torch turns its ONNX log on by mistake); the exception still carries the cause
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), _native_stderr_to_log():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Send what native code writes to file descriptors 1 and 2 meanwhile to this module's debug log instead."""
    import os
    import sys
    import tempfile

    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError):  # no real stdout/stderr (embedded interpreter): nothing to redirect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            for fd, copy in ((1, saved[0]), (2, saved[1])):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                log.debug("native output while exporting:\n%s", text)


def _summary(exc: BaseException) -> str:
    """The innermost cause's first line, without terminal colour codes, at most 200 characters."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


# -- checks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputStructure:
    """A model's output flattened: its tensors in order, each with the ONNX output name it gets.

    Order: dict (and ModelOutput, any Mapping) items in insertion order, namedtuple fields, list and tuple items,
    depth first, as torch's pytree flattens them. Names: a single tensor is `output`; a flat tuple or list of
    tensors `output`, `output_1`, ...; anything else the path to the tensor, keys and indices joined by '.'
    (`out`, `aux`, `logits`, `0`, `1.a`). Non-tensor leaves (None, numbers) are left out.
    """

    leaves: tuple[tuple[str, Any], ...]
    needs_flattening: bool  # a dict, namedtuple or nesting: the exporters need a flat tuple

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.leaves]


def output_structure(out: Any) -> OutputStructure:
    """The tensors of a model output `out` (tensor, dict, list, tuple, namedtuple, ModelOutput) and their names."""
    torch = require("torch", "profile")
    if isinstance(out, torch.Tensor):
        return OutputStructure((("output", out),), False)
    found: list[tuple[str, Any]] = []
    _walk_output(out, "", found, torch)
    if not found:
        raise ConversionError(f"the model returned no tensors (a {type(out).__name__})")
    flat = type(out) in (tuple, list) and all(isinstance(v, torch.Tensor) for v in out)
    if flat:
        return OutputStructure(tuple(zip(_default_names("output", len(found)), (t for _, t in found))), False)
    names = _unique([name for name, _ in found])
    return OutputStructure(tuple(zip(names, (t for _, t in found))), True)


def _walk_output(value: Any, path: str, found: list[tuple[str, Any]], torch: Any) -> None:
    def child(key: Any) -> str:
        return f"{path}.{key}" if path else str(key)

    if isinstance(value, torch.Tensor):
        found.append((path or "output", value))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _walk_output(item, child(key), found, torch)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        for key, item in zip(value._fields, value):
            _walk_output(item, child(key), found, torch)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _walk_output(item, child(i), found, torch)
    elif value is None or isinstance(value, (bool, int, float, str)):
        return  # not a tensor: not an ONNX output
    else:
        raise ConversionError(f"model output {path or 'output'!r} is a {type(value).__name__}: expected tensors, "
                              "or dicts, lists, tuples and namedtuples of them")


def _unique(names: list[str]) -> list[str]:
    used: set[str] = set()
    out = []
    for name in names:
        base, k = name, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        out.append(name)
    return out


def _flattened(model: Any, example_inputs: tuple, structure: OutputStructure, torch: Any) -> Any:
    """`model` behind a wrapper whose output is the flat tuple of `structure`'s tensors (a ScriptModule for one)."""
    wrapper = _FlatOutputs(model, torch)
    if not isinstance(model, torch.jit.ScriptModule):
        return wrapper
    with torch.no_grad(), _quiet(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings are about the user's model, not ours
        traced = torch.jit.trace(wrapper, example_inputs, strict=False, check_trace=False)
    # inline the model's graph: a dict built then indexed by constant keys folds away (peephole)
    graph = traced.graph
    torch._C._jit_pass_inline(graph)
    torch._C._jit_pass_peephole(graph, True)
    torch._C._jit_pass_dce(graph)
    return traced


def _FlatOutputs(model: Any, torch: Any) -> Any:  # noqa: N802 - builds an nn.Module (torch is imported lazily)
    class FlatOutputs(torch.nn.Module):
        """Calls the model and returns its output's tensors as one flat tuple (OutputStructure's order)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.train(model.training)  # a model in eval mode (freezing needs it: models.torchscript) stays so

        varargs_forward = True  # torch.export sees *args as one input: dynamic_shapes nest one level deeper

        def forward(self, *args: Any) -> tuple:
            found: list[tuple[str, Any]] = []
            _walk_output(self.model(*args), "", found, torch)
            return tuple(t for _, t in found)

    return FlatOutputs()


def _torch_outputs(program: Any, example_inputs: tuple) -> OutputStructure:
    torch = require("torch", "profile")
    runnable = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    try:
        with torch.no_grad():
            out = runnable(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - user model code can raise anything
        shapes = ", ".join(f"{'x'.join(map(str, t.shape))} {str(t.dtype).replace('torch.', '')}"
                           for t in example_inputs)
        raise ConversionError(f"the model fails on inputs of shape {shapes}: {type(exc).__name__}: {exc}") from exc
    return output_structure(out)


def _check_against_reference(path: Path, example_inputs: tuple, reference: list[np.ndarray]) -> None:
    onnx = require("onnx", "profile")
    model = onnx.load(str(path))
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, example_inputs)}
    got = run_onnx(model.SerializeToString(), feeds)
    if len(got) != len(reference):
        raise ConversionError(f"{path}: ONNX has {len(got)} outputs, torch gave {len(reference)}")
    for i, (a, b) in enumerate(zip(got, reference)):
        if a.shape != b.shape:
            raise ConversionError(f"{path}: output {i} has shape {a.shape} in ONNX, {b.shape} in torch")
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        err = float(np.max(np.abs(a.astype(np.float64) - b))) if b.size else 0.0
        if err > RTOL * max(scale, 1e-6):
            raise ConversionError(f"{path}: output {i} differs from torch by {err:.3g} (max |torch| {scale:.3g})")


def run_onnx(model_bytes: bytes, feeds: dict[str, np.ndarray], *, log_severity: int = 3) -> list[np.ndarray]:
    """Run a serialized model once on one CPU thread; its outputs. `log_severity` 4 keeps onnxruntime's own error
    lines off stderr for a run whose failure the caller handles (the exception carries the message)."""
    return make_session(model_bytes, threads=1, inter_threads=None, log_severity=log_severity).run(None, feeds)


def random_feeds(inputs: Sequence[Any], batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded feeds for graph inputs (ValueInfoProtos): symbolic dims 1, dim 0 `batch` when given; integers 0."""
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in inputs:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        if dims and batch is not None:
            dims[0] = batch
        feeds[vi.name] = random_array(rng, dims, numpy_dtype(tt.elem_type), zero_integers=True)
    return feeds


def integer_input_highs(model: Any, default: int | None = None) -> dict[str, int]:
    """An exclusive upper bound for each integer graph input of ONNX `model`, for synthetic values that stay valid.

    An input used as the indices of a Gather on a weight (an embedding table) stays below that table's size on
    the gathered axis (the vocabulary: the smallest where several); one named like a mask stays in {0, 1};
    any other gets `default` (None: left out, so the caller's default applies).
    """
    initializers = {t.name: tuple(t.dims) for t in model.graph.initializer}
    highs: dict[str, int] = {}
    for vi in model.graph.input:
        if vi.name in initializers or numpy_dtype(vi.type.tensor_type.elem_type).kind not in "iu":
            continue
        tables = []
        for node in model.graph.node:
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == vi.name \
                    and node.input[0] in initializers:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = initializers[node.input[0]]
                if dims:
                    tables.append(int(dims[axis % len(dims)]))
        if tables:
            highs[vi.name] = max(min(tables), 1)
        elif "mask" in vi.name.lower():
            highs[vi.name] = 2
        elif default is not None:
            highs[vi.name] = int(default)
    return highs


# -- shape subgraphs -------------------------------------------------------------------------------

SHAPE_ROOTS = frozenset({"Shape", "Size"})
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "Bernoulli"})
MAX_FOLD_ELEMENTS = 4096  # a shape value is a few integers; larger tensors (e.g. a mask built from a shape) ...
MAX_FOLD_BYTES = 4 << 20  # ... are folded while the same at any batch and within max(4 MiB, 5 % of the weights)


def shape_derived(graph: Any) -> set[str]:
    """Tensors computed only from tensors' shapes (Shape, Size) and constants: the shape arithmetic a tracer leaves
    behind (Shape -> Gather -> Unsqueeze -> Concat -> Reshape). Their values carry no batch dimension."""
    onnx = require("onnx", "profile")
    constants = {t.name for t in graph.initializer}
    derived: set[str] = set()
    for node in graph.node:
        outs = [o for o in node.output if o]
        ins = [i for i in node.input if i]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if node.op_type == "Constant" or (ins and all(i in constants for i in ins) and node.op_type not in _RANDOM_OPS):
            constants.update(outs)
        elif node.op_type in SHAPE_ROOTS:
            derived.update(outs)
        elif (ins and node.op_type not in _RANDOM_OPS and all(i in derived or i in constants for i in ins)
              and any(i in derived for i in ins)):
            derived.update(outs)
    return derived


@dataclass(frozen=True)
class FoldResult:
    """What `fold_shape_subgraphs` did: shape values made constants, and those left computed (they vary with the
    batch size and feed something other than a Reshape)."""

    folded: int
    kept: tuple[str, ...]


def fold_shape_subgraphs(path: Path) -> FoldResult:
    """Constant-fold the shape arithmetic of the ONNX file at `path`, in place, with its concrete input shape.

    The values of the shape subgraphs' results (`shape_derived`, where read by other nodes) are read from two
    onnxruntime runs, at batch 1 and batch 2: a value the same in both becomes a constant; a Reshape's target
    that differs only in one entry that doubles with the batch becomes a constant with -1 there (or 0, the
    input's size, next to a -1), checked by a run at batch 2 against two at batch 1; any other stays
    computed (listed in `kept`). When the graph cannot run at batch 2 (the batch is fixed in it), the values at
    batch 1 are folded. Unused nodes are then removed and shapes inferred again, so that every node's shapes are
    known and no shape value crosses a cut.
    """
    onnx = require("onnx", "profile")
    path = Path(path)
    model = onnx.load(str(path))
    graph = model.graph
    derived = shape_derived(graph)
    if not derived:
        return FoldResult(0, ())
    derived_nodes = [n for n in graph.node if any(o in derived for o in n.output)]
    inside = {n.name for n in derived_nodes}  # nodes are named (normalize_onnx)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    outputs = {o.name for o in graph.output}
    frontier = [t for n in derived_nodes for t in n.output
                if t and t not in outputs and any(c.name not in inside for c in consumers.get(t, ()))]
    if not frontier:
        return FoldResult(0, ())
    values = _probe_values(model, frontier)
    if values is None:
        return FoldResult(0, tuple(frontier))
    channels = {vi.name: vi.type.tensor_type.shape.dim[1].dim_value for vi in graph.value_info
                if len(vi.type.tensor_type.shape.dim) > 1}
    folded: dict[str, np.ndarray] = {}
    kept: list[str] = []
    budget = max(MAX_FOLD_BYTES, sum(len(t.raw_data) for t in graph.initializer) // 20)
    for t in frontier:
        v1, v2 = values[t]
        if v1 is not None and v1.size > MAX_FOLD_ELEMENTS and (v2 is None or _same(v1, v2)) and v1.nbytes <= budget:
            folded[t] = v1  # a constant built from shapes (swin's shifted-window masks), within the size budget
            budget -= v1.nbytes
        elif v1 is None or v1.size > MAX_FOLD_ELEMENTS:
            kept.append(t)
        elif v2 is None or (v1.shape == v2.shape and np.array_equal(v1, v2)):
            folded[t] = v1
        elif (reshape := _batch_free_reshape_target(t, v1, v2, consumers.get(t, ()))) is not None:
            folded[t] = reshape
        elif (spatial := _batch_free_resize_sizes(t, v1, v2, consumers.get(t, ()), channels)) is not None:
            folded[t] = spatial
        else:
            kept.append(t)
    if not folded:
        return FoldResult(0, tuple(kept))
    varying = [t for t, value in folded.items() if not _same(value, values[t][0])]  # Reshape targets made batch-free
    result = _folded(model, folded, inside, path)
    if varying and not _keeps_batch(result):
        # a Reshape target rewritten for the batch got it wrong: fold only what does not vary with the batch
        kept += varying
        folded = {t: v for t, v in folded.items() if t not in varying}
        result = _folded(model, folded, inside, path) if folded else model
    onnx.save_model(result, str(path), save_as_external_data=False)
    return FoldResult(len(folded), tuple(kept))


def _same(a: np.ndarray, b: np.ndarray | None) -> bool:
    return b is not None and np.array_equal(a, b)


def _keeps_batch(model: Any) -> bool:
    """Whether `model`, batch dims made symbolic, gives at batch 2 the outputs of its two samples at batch 1."""
    onnx = require("onnx", "profile")
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    initializer_names = {t.name for t in candidate.graph.initializer}
    inputs = [i for i in candidate.graph.input if i.name not in initializer_names]
    for vi in inputs:
        if vi.type.tensor_type.shape.dim:
            vi.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    del candidate.graph.value_info[:]
    return _runs_at_batch_two(candidate) and _batch_of_two_is_two_of_one(candidate, inputs)


def _folded(original: Any, folded: dict[str, np.ndarray], inside: set[str], path: Path) -> Any:
    """A copy of `original` where the tensors `folded` are constants and the shape nodes left unused are gone."""
    onnx = require("onnx", "profile")
    model = onnx.ModelProto()
    model.CopyFrom(original)
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    renamed = {}
    for t, value in folded.items():
        name, k = f"{t}_folded", 1
        while name in taken:
            name, k = f"{t}_folded_{k}", k + 1
        taken.add(name)
        renamed[t] = name
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    for node in graph.node:
        if node.name in inside:
            continue
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
                if node.op_type == "Resize" and i == 3 and np.ndim(folded[name]) == 1 and (
                        not any(a.name == "axes" for a in node.attribute)):
                    rank = _resize_rank(node, graph)
                    if rank > len(folded[name]):  # sizes of the spatial axes only (_batch_free_resize_sizes)
                        axes = list(range(rank - len(folded[name]), rank))
                        node.attribute.append(onnx.helper.make_attribute("axes", axes))
    # the Constants that fed only the folded arithmetic go too: onnxruntime would warn about each one it drops
    _drop_unused(graph, inside | {n.name for n in graph.node if n.op_type == "Constant"})
    del graph.value_info[:]
    return _infer_shapes(model, path)


def _batch_free_reshape_target(name: str, v1: np.ndarray, v2: np.ndarray, readers: Sequence[Any]) -> np.ndarray | None:
    """The constant target for Reshapes reading `name` whose value differs between batch 1 (`v1`) and 2 (`v2`)
    only in one entry equal to the batch size: that entry becomes -1 (inferred from the element count)."""
    if not readers or any(r.op_type != "Reshape" or list(r.input).index(name) != 1 for r in readers):
        return None
    if v1.ndim != 1 or v1.shape != v2.shape or (v1 == 0).any() or any(_allows_zero(r) for r in readers):
        return None
    differ = np.flatnonzero(v1 != v2)
    if len(differ) != 1 or v2[differ[0]] != 2 * v1[differ[0]]:  # the batch, or the batch times heads, ...
        return None
    if not (v1 == -1).any():
        out = v1.copy()
        out[differ[0]] = -1  # inferred from the element count
        return out
    if v1[differ[0]] != 1:
        return None
    out = v1.copy()
    out[differ[0]] = 0  # the input's size there (checked after: _keeps_batch)
    return out



def _batch_free_resize_sizes(name: str, v1: np.ndarray, v2: np.ndarray, readers: Sequence[Any],
                             channels: Mapping[str, int]) -> np.ndarray | None:
    """The constant spatial sizes for Resizes reading `name` as `sizes` whose value is [batch, C, H, W] at batch 1
    (`v1`) and 2 (`v2`) with C the data's channels (`interpolate(size=x.shape[-2:])` as the legacy exporter
    writes it): [H, W], the readers then resizing axes 2 onward (opset 18)."""
    if not readers or any(r.op_type != "Resize" or list(r.input).index(name) != 3
                          or any(a.name == "axes" for a in r.attribute) for r in readers):
        return None
    if v1.ndim != 1 or v1.shape != v2.shape or len(v1) < 3 or v1[0] != 1 or v2[0] != 2:
        return None
    if (v1[1:] != v2[1:]).any() or any(channels.get(r.input[0]) != v1[1] for r in readers):
        return None
    return v1[2:].copy()


def _resize_rank(node: Any, graph: Any) -> int:
    """The rank of a Resize's data input from the graph's inferred shapes (0 when unknown)."""
    for vi in (*graph.value_info, *graph.input):
        if vi.name == node.input[0]:
            return len(vi.type.tensor_type.shape.dim)
    return 0

def _probe_values(model: Any, names: list[str]) -> dict[str, tuple[np.ndarray | None, np.ndarray | None]] | None:
    """The values of tensors `names` from onnxruntime runs at batch 1 and batch 2 (None where batch 2 fails, or
    where a tensor's type is unknown); None when the model does not run at all."""
    onnx = require("onnx", "profile")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    initializer_names = {t.name for t in probe.graph.initializer}
    inputs = [vi for vi in probe.graph.input if vi.name not in initializer_names]
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].dim_param = BATCH_DIM
    del probe.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # noqa: BLE001 - types of the probed tensors then stay unknown
        inferred = probe
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    for node in probe.graph.node:
        if node.op_type in SHAPE_ROOTS:
            elem.update((o, onnx.TensorProto.INT64) for o in node.output)
    known = [n for n in names if elem.get(n)]
    existing = {o.name for o in probe.graph.output}
    for n in known:
        if n not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(n, elem[n], None))
    data = probe.SerializeToString()
    runs: list[dict[str, np.ndarray] | None] = []
    for batch in (1, 2):
        try:
            sess = make_session(data, threads=1, inter_threads=None, log_severity=4)
            got = sess.run(known, random_feeds(inputs, batch=batch))
            runs.append(dict(zip(known, got)))
        except Exception as exc:  # noqa: BLE001 - batch 2 fails where the batch is fixed in the graph
            log.debug("shape probe at batch %d failed: %s", batch, exc)
            if batch == 1:
                return None
            runs.append(None)
    first, second = runs
    assert first is not None
    return {n: (first.get(n), None if second is None else second.get(n)) for n in names}


def _drop_unused(graph: Any, candidates: set[str]) -> None:
    """Remove the nodes among `candidates` (names) whose outputs nothing reads, repeatedly; then unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.name in candidates and not any(o in read for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in _walk_nodes(graph) for i in n.input} | outputs | {vi.name for vi in graph.input}
    for t in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(t)


# -- graph helpers ---------------------------------------------------------------------------------


def _default_names(stem: str, n: int) -> list[str]:
    return [stem if i == 0 else f"{stem}_{i}" for i in range(n)]


def _subgraphs(graph: Any) -> Iterator[Any]:
    onnx = require("onnx", "profile")
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                yield from attr.graphs


def _all_initializers(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sub in _subgraphs(graph):
        yield from _all_initializers(sub)


def _external_location(tensor: Any) -> str | None:
    onnx = require("onnx", "profile")
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), None)



_CONSTANT_VALUES = ("value", "value_float", "value_floats", "value_int", "value_ints")


def _constants_to_initializers(graph: Any) -> int:
    """The top graph's Constant nodes (the legacy exporter writes them; the dynamo exporter writes initializers)
    become initializers of the same name: weights, not activations to cut at or measure (a -inf mask constant
    cannot be int8-encoded). Those that are graph outputs stay. The count moved."""
    from onnx import helper, numpy_helper

    outputs = {o.name for o in graph.output}
    moved = []
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if (node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1
                or node.output[0] in outputs or set(attrs) - set(_CONSTANT_VALUES) or len(attrs) != 1):
            continue
        (attr,) = attrs.values()
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            tensor = type(value)()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
        else:
            dtype = np.float32 if attr.name.startswith("value_float") else np.int64
            tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), node.output[0])
        graph.initializer.append(tensor)
        moved.append(node)
    for node in moved:
        graph.node.remove(node)
    return len(moved)

def _name_nodes(graph: Any) -> None:
    """Give every node (subgraphs included) a non-empty name unique in the model: `{op_type}_{i}` where needed."""
    nodes = list(_walk_nodes(graph))
    reserved = {node.name for node in nodes if node.name}  # a generated name never steals an existing one
    used: set[str] = set()
    for i, node in enumerate(nodes):
        if node.name and node.name not in used:  # the first holder of a duplicated name keeps it
            used.add(node.name)
            continue
        base = name = f"{node.op_type}_{i}"
        k = 1
        while name in used or name in reserved:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        used.add(name)


def _walk_nodes(graph: Any) -> Iterator[Any]:
    yield from graph.node
    for sub in _subgraphs(graph):
        yield from _walk_nodes(sub)


def _rename_outputs(path: Path, old: list[str], new: list[str]) -> None:
    """Rename graph outputs `old` to `new` in the file at `path`; a tensor already called a new name is renamed."""
    onnx = require("onnx", "profile")
    model = onnx.load(str(path))
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {vi.name for vi in graph.input}
    for node in _walk_nodes(graph):
        taken.update(node.input)
        taken.update(node.output)
    mapping = {o: n for o, n in zip(old, new) if o != n}
    for target in mapping.values():
        if target in taken and target not in mapping:
            k, spare = 1, f"{target}_{1}"
            while spare in taken or spare in mapping.values():
                k, spare = k + 1, f"{target}_{k}"
            _rename_tensor(graph, {target: spare})
            taken.add(spare)
    _rename_tensor(graph, mapping)
    onnx.save_model(model, str(path), save_as_external_data=False)


def _rename_tensor(graph: Any, mapping: dict[str, str]) -> None:
    for node in _walk_nodes(graph):
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name in mapping:
            vi.name = mapping[vi.name]
    for t in graph.initializer:
        if t.name in mapping:
            t.name = mapping[t.name]


def _rename_dim_params(graph: Any, old: set[str], new: str) -> None:
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in old:
                d.dim_param = new


def _infer_shapes(model: Any, path: Path) -> Any:
    onnx = require("onnx", "profile")
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is best effort; the checker decides validity
        log.warning("%s: shape inference failed (%s); keeping the shapes the file has", path.name, exc)
        return model
