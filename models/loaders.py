"""One entry point, `load_model`, from any model source `split-profile` accepts to a normalized ONNX file.

Sources: a zoo name (when no file of that name exists), ONNX, TorchScript (`torch.jit.save`), torch.export
(`torch.export.save`, `.pt2`) and, only with `allow_pickle`, a pickled nn.Module (`torch.save(model)`).
Without `allow_pickle` nothing runs the unrestricted unpickler: a `.pt2` whose archive needs it (pickled
weights or constants, sample inputs beyond plain tensors, compiled code) is refused before loading.
The format is detected from the content (zip member names, protobuf parse), not the extension. torch and
onnx are imported only when a model is loaded, so importing this module needs neither.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.dtypes import numpy_dtype
from models.extras import require
from models.manifest import Postprocess, TensorSpec, sha256_file

FORMATS = ("zoo", "torchscript", "torch.export", "onnx", "pickle")
_EXPECTED = "expected ONNX, TorchScript (torch.jit.save), torch.export (.pt2) or a zoo model name"
_SHAPE_HINT = "pass --input-shape 1x3x224x224 (with your model's shape)"
# The one wording for every refusal to unpickle (pickled modules, .pt2 archives whose contents need pickle).
_PICKLE_RISK = ("unpickling runs arbitrary code from the file. Pass --allow-pickle only for files you trust, or "
                "re-save it with torch.jit.save (TorchScript) or torch.export.save (.pt2)")


class ModelLoadError(ValueError):
    """A model source cannot be loaded; the message names the file, what went wrong and what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A model converted to normalized ONNX in the work directory, with its I/O and provenance."""

    name: str
    source: str
    format: str  # one of FORMATS
    sha256: str  # of the source file (for zoo: of the ONNX bytes)
    onnx_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    task: str  # "classification" | "segmentation" | "detection" | "other"
    postprocess: Postprocess | None = None  # decoding after the tail (zoo detectors): plan.json model.postprocess


@dataclass(frozen=True)
class InputHint:
    """What `--input-shape` says about one input: its name (None: the model's only input), shape and dtype."""

    name: str | None
    shape: tuple[int, ...] | None
    dtype: str | None = None  # a numpy dtype name ("int64"); None: the model's own, else float32


# file stems that say nothing about the model (ultralytics saves best.pt and last.pt)
GENERIC_STEMS = frozenset({"model", "net", "network", "weights", "checkpoint", "ckpt", "best", "last"})


def parse_input_hints(text: str) -> tuple[InputHint, ...]:
    """Parse `--input-shape`: "1x3x224x224", "1x128:int64" or "input_ids=1x128:int64,attention_mask=1x128:int64"."""
    text = str(text).strip()
    if "=" not in text:
        return (_parse_hint(None, text),)
    hints: list[InputHint] = []
    for part in text.split(","):
        name, sep, spec = part.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ModelLoadError(f"--input-shape {text!r}: expected name=SHAPE[:DTYPE] entries joined by ',', like "
                                 "input_ids=1x128:int64,attention_mask=1x128:int64")
        hints.append(_parse_hint(name.strip(), spec.strip()))
    names = [h.name for h in hints]
    if len(set(names)) != len(names):
        raise ModelLoadError(f"--input-shape {text!r}: an input is named twice")
    return tuple(hints)


def _parse_hint(name: str | None, spec: str) -> InputHint:
    shape_text, _, dtype_text = spec.partition(":")
    dtype: str | None = None
    if dtype_text.strip():
        try:
            dtype = np.dtype(dtype_text.strip().lower()).name
        except TypeError:
            dtype = None
        if dtype not in _TORCH_DTYPES:
            raise ModelLoadError(f"--input-shape {spec!r}: unknown dtype {dtype_text.strip()!r}; expected one of "
                                 f"{', '.join(_TORCH_DTYPES)}")
    return InputHint(name, parse_input_shape(shape_text) if shape_text.strip() else None, dtype)


_TORCH_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def default_model_name(path: Path, sha256: str) -> str:
    """A bundle's default model name: the file's stem, or its folder's name when the stem is generic (`model`,
    `net`, `weights`, `checkpoint` ...), then the first 8 hex digits of the file's sha256 for a generic stem."""
    stem = path.stem
    if stem.lower() not in GENERIC_STEMS:
        return _safe_name(stem)
    folder = path.resolve().parent.name
    base = folder if folder and folder.lower() not in GENERIC_STEMS else stem
    return f"{_safe_name(base)}-{sha256[:8]}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "model"


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse "1x3x224x224" (or "1,3,224,224") into (1, 3, 224, 224); ModelLoadError otherwise."""
    parts = re.split(r"\s*[x,]\s*", str(text).strip().lower())
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ModelLoadError(
            f"--input-shape {text!r}: expected positive integers joined by 'x', batch first, like 1x3x224x224"
        )
    return tuple(int(p) for p in parts)


def load_model(source: str | Path, workdir: Path, *, input_shape: tuple[int, ...] | None = None,
               allow_pickle: bool = False, progress: Callable[[str], None] | None = None,
               input_hints: Sequence[InputHint] = (), name: str | None = None) -> LoadedModel:
    """Load `source` (file or zoo name), convert it to normalized ONNX in `workdir` and describe its I/O.

    `input_hints` (from `--input-shape name=SHAPE:DTYPE,...`) give shapes and dtypes the file does not record;
    `name` is the model's name (default: `default_model_name`).
    """
    say = progress or (lambda _msg: None)
    hints = tuple(input_hints)
    if input_shape is not None:
        input_shape = _check_shape(input_shape)
    if len(hints) == 1 and hints[0].name is None:
        input_shape = hints[0].shape if input_shape is None else input_shape
    named = {h.name: h for h in hints}
    workdir = Path(workdir)
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists():
        from models import zoo

        if text in zoo.zoo_names():
            loaded = _load_zoo(text, workdir, input_shape, say)
            return loaded if name is None else replace(loaded, name=name)
        if "/" in text or "\\" in text or path.suffix:
            raise ModelLoadError(f"{text}: no such file; {_EXPECTED}")
        raise ModelLoadError(f"{text}: no such file and no zoo model of that name; the zoo has: "
                             f"{', '.join(zoo.zoo_names())}")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory; {_EXPECTED}")
    fmt = detect_format(path)
    say(f"{path.name}: {fmt} model")
    workdir.mkdir(parents=True, exist_ok=True)
    sha = sha256_file(path)
    name = name or default_model_name(path, sha)
    out = workdir / f"{path.stem}.onnx"
    if out.resolve() == path.resolve():  # never overwrite the user's file
        out = workdir / f"{path.stem}.normalized.onnx"
    if fmt == "onnx":
        _convert_onnx(path, out, input_shape, named, say)
    elif fmt == "torchscript":
        _convert_torchscript(path, out, input_shape, named, say)
    elif fmt == "torch.export":
        _convert_exported(path, out, input_shape, named, allow_pickle, say)
    else:
        _convert_pickle(path, out, input_shape, named, allow_pickle, say)
    inputs, outputs = _describe(out, path)
    fixed = [f"{s.name} ({s.shape[0]})" for s in inputs if s.shape and s.shape[0] is not None]
    if fixed:
        say(f"{path.name}: the batch dimension is fixed in the graph for {', '.join(fixed)}; kept as is "
            "(the model runs one fixed-size batch at a time)")
    return LoadedModel(name=name, source=text, format=fmt, sha256=sha, onnx_path=out,
                       inputs=inputs, outputs=outputs, task=_task(outputs))


def detect_format(path: Path) -> str:
    """The format of model file `path` from its content: "onnx", "torchscript", "torch.export" or "pickle"."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if size == 0:
        raise ModelLoadError(f"{path}: is empty (0 bytes); {_EXPECTED}")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_format(path)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # torch.save's legacy (non-zip) format is a bare pickle stream
    if _parses_as_onnx(path):
        return "onnx"
    what = _describe_bytes(head)
    if path.suffix.lower() == ".onnx" and what == "unrecognized binary data":
        raise ModelLoadError(f"{path}: is not a valid ONNX model (the protobuf does not parse or has no graph: "
                             "truncated or not ONNX); re-export or re-download it")
    raise ModelLoadError(f"{path}: is not a model file ({what}); {_EXPECTED}")


# -- format detection ------------------------------------------------------------------------------


def _zip_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path}: is a damaged or truncated zip archive (torch .pt/.pt2 files are zip "
                             f"archives: {exc}); re-save or re-download it") from exc
    if any(n.endswith(("/archive_format", "serialized_exported_program.json")) for n in names):
        return "torch.export"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "pickle"
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise ModelLoadError(f"{path}: is a zip archive but not a torch model (members: {shown}); {_EXPECTED}")


def _parses_as_onnx(path: Path) -> bool:
    onnx = require("onnx", "profile")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - DecodeError and friends: simply not ONNX
        return False
    # protobuf keeps unknown fields silently, so text can "parse": insist on what every model has
    return model.ir_version > 0 and len(model.graph.node) > 0


def _describe_bytes(head: bytes) -> str:
    if head.startswith(b"\xff\xd8\xff"):
        return "looks like a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "looks like a PNG image"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:  # a multi-byte character cut at the end of the sample still counts as text
        text = head[:-4].decode("utf-8", errors="strict") if _decodes(head[:-4]) else ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "looks like a text file"
    return "unrecognized binary data"


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# -- sources ---------------------------------------------------------------------------------------


def _load_zoo(name: str, workdir: Path, input_shape: tuple[int, ...] | None,
              say: Callable[[str], None]) -> LoadedModel:
    from models import zoo
    from models.convert import to_onnx

    torch = require("torch", "profile")
    entry = zoo.zoo_entry(name)
    shape = entry.input_shape
    if input_shape is not None and input_shape[1:] != shape[1:]:
        raise ModelLoadError(f"zoo model {name}: built for input {_fmt(shape)}, not --input-shape {_fmt(input_shape)}; "
                             "drop --input-shape for zoo models")
    say(f"{name}: building the zoo model ({entry.description})")
    model = zoo.build_zoo_model(name)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"{name}.onnx"
    _wrap(lambda: to_onnx(model, (example,), out, progress=say, source=name), f"zoo model {name}")
    inputs, outputs = _describe(out, out)
    return LoadedModel(name=name, source=name, format="zoo", sha256=sha256_file(out), onnx_path=out,
                       inputs=inputs, outputs=outputs, task=entry.task, postprocess=entry.postprocess)


def _convert_onnx(path: Path, out: Path, input_shape: tuple[int, ...] | None, named: Mapping[str | None, InputHint],
                  say: Callable[[str], None]) -> None:
    from models.convert import make_batch_dynamic, normalize_onnx, resolve_shapes, timed_step

    onnx = require("onnx", "profile")
    model = _wrap(lambda: onnx.load(str(path)), str(path))  # external data resolved next to the user's file
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    _check_hint_names(path, named, [vi.name for vi in graph_inputs])
    for vi in graph_inputs:
        hint = named.get(vi.name)
        own = numpy_dtype(vi.type.tensor_type.elem_type).name
        if hint is not None and hint.dtype is not None and own != hint.dtype:
            raise ModelLoadError(f"{path}: input {vi.name!r} is {own} in the model, not {hint.dtype} as --input-shape "
                                 "says; drop the dtype or fix it")
        dims = vi.type.tensor_type.shape.dim
        known = vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims[1:])
        if known and len(dims) > 0:
            recorded = tuple(d.dim_value for d in dims)
            if input_shape is not None and len(graph_inputs) == 1 and input_shape[1:] != recorded[1:]:
                raise ModelLoadError(f"{path}: records input shape {_fmt(recorded)}, not --input-shape "
                                     f"{_fmt(input_shape)}; drop --input-shape or fix it")
            continue
        wanted = hint.shape if hint is not None else (input_shape if len(graph_inputs) == 1 else None)
        if wanted is None:
            hint_text = _SHAPE_HINT if len(graph_inputs) == 1 else _named_hint([v.name for v in graph_inputs])
            raise ModelLoadError(f"{path}: input {vi.name!r} does not record its full shape; {hint_text}")
        if dims and len(dims) != len(wanted):
            raise ModelLoadError(f"{path}: input {vi.name!r} has rank {len(dims)}, --input-shape "
                                 f"{_fmt(wanted)} has rank {len(wanted)}")
        batch = onnx.TensorShapeProto.Dimension()
        if dims:
            batch.CopyFrom(dims[0])  # a fixed batch stays fixed until make_batch_dynamic proves otherwise
        else:
            batch.dim_param = "batch"
        vi.type.tensor_type.shape.Clear()
        vi.type.tensor_type.shape.dim.add().CopyFrom(batch)
        for d in wanted[1:]:
            vi.type.tensor_type.shape.dim.add().dim_value = d
    _wrap(lambda: onnx.save_model(model, str(out), save_as_external_data=False), str(path))
    with timed_step(say, f"checking {path.name} and inferring its shapes"):
        _wrap(lambda: normalize_onnx(out), str(path))
    _wrap(lambda: resolve_shapes(out, say), str(path))
    _wrap(lambda: make_batch_dynamic(out), str(path))


def _convert_torchscript(path: Path, out: Path, input_shape: tuple[int, ...] | None,
                         named: Mapping[str | None, InputHint], say: Callable[[str], None]) -> None:
    from models.convert import timed_step, to_onnx

    torch = require("torch", "profile")
    with zipfile.ZipFile(path) as zf:  # traced archives keep their example inputs; scripted ones do not
        traced = any(n.endswith("/traced_inputs.pkl") for n in zf.namelist())
    with timed_step(say, f"loading {path.name} (TorchScript)"):
        module = _wrap(lambda: torch.jit.load(str(path), map_location="cpu", _restore_shapes=traced), str(path))
    module.eval()
    args = list(module.graph.inputs())[1:]  # [0] is self
    shapes: list[tuple[int, ...] | None] = []
    dtypes: list[Any] = []
    for arg in args:
        t = arg.type()
        sizes = t.sizes() if t.kind() == "TensorType" else None
        shapes.append(tuple(sizes) if sizes is not None and all(s is not None for s in sizes) else None)
        dtypes.append(t.dtype() if t.kind() == "TensorType" else None)
    names = [re.sub(r"\.\d+$", "", arg.debugName()) for arg in args]
    examples = _examples_from(path, shapes, input_shape, torch, names=names, dtypes=dtypes, named=named)
    _wrap(lambda: to_onnx(module, examples, out, input_names=_onnx_input_names(names), progress=say,
                          source=path.name), str(path))


def _convert_exported(path: Path, out: Path, input_shape: tuple[int, ...] | None,
                      named: Mapping[str | None, InputHint], allow_pickle: bool, say: Callable[[str], None]) -> None:
    from models.convert import timed_step, to_onnx

    torch = require("torch", "profile")
    if not allow_pickle:
        why = pt2_pickle_use(path, torch)
        if why is not None:
            raise ModelLoadError(f"{path}: is a torch.export archive whose {why} (torch.export.load would unpickle "
                                 f"it); {_PICKLE_RISK}")
    with timed_step(say, f"loading {path.name} (torch.export)"):
        program = _load_pt2(path, torch)
    recorded = getattr(program, "example_inputs", None)
    user_inputs = list(program.graph_signature.user_inputs)
    if recorded is not None and recorded[0] and not recorded[1]:
        examples = tuple(recorded[0])
        if input_shape is not None and len(examples) == 1 and tuple(examples[0].shape[1:]) != input_shape[1:]:
            raise ModelLoadError(f"{path}: records input shape {_fmt(tuple(examples[0].shape))}, not --input-shape "
                                 f"{_fmt(input_shape)}; drop --input-shape or fix it")
    else:  # no stored example inputs: read the shapes and dtypes off the graph's user-input placeholders
        shapes: list[tuple[int, ...] | None] = []
        dtypes: list[Any] = []
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in set(user_inputs):
                val = node.meta.get("val")
                dims = tuple(val.shape) if val is not None else ()
                static = all(isinstance(d, int) for d in dims[1:]) and val is not None
                batch = dims[0] if dims and isinstance(dims[0], int) else 1  # a symbolic batch: run 1
                shapes.append((batch, *dims[1:]) if static and dims else None)
                dtypes.append(getattr(val, "dtype", None))
        examples = _examples_from(path, shapes, input_shape, torch, names=user_inputs, dtypes=dtypes, named=named)
    in_names = _onnx_input_names(user_inputs) if len(user_inputs) == len(examples) else None
    _wrap(lambda: to_onnx(program, examples, out, input_names=in_names, progress=say, source=path.name), str(path))


_PYTREE_MISSING = re.compile(r"Deserializing ([\w.]+) in pytree is not registered")


def _load_pt2(path: Path, torch: Any) -> Any:
    """torch.export.load, with torch's logged explanation of a failure turned into the error's one line.

    A program whose inputs or outputs are types registered with torch's pytree (Hugging Face's ModelOutput, ...)
    loads only where the package that registered them is imported: an installed one is imported and the load
    tried again; else the error names it.
    """
    import importlib
    import logging

    class _Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(logging.Formatter().format(record))  # with the logged traceback

    logger = logging.getLogger("torch.export")
    imported: set[str] = set()
    while True:
        keep = _Keep()
        own, propagate = list(logger.handlers), logger.propagate
        for handler in own:  # torch's stderr handler would print the whole traceback past -q
            logger.removeHandler(handler)
        logger.addHandler(keep)
        logger.propagate = False
        try:
            return torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001 - torch logs the cause and raises a generic RuntimeError
            found = _PYTREE_MISSING.search("\n".join(keep.lines) + "\n" + str(exc))
            if found is None:
                raise ModelLoadError(f"{path}: {type(exc).__name__}: {_first_line(exc)}") from exc
            type_name = found.group(1)
            package = type_name.split(".")[0]
            module = type_name.rsplit(".", 1)[0]
            if module not in imported:
                imported.add(module)
                try:
                    importlib.import_module(module)
                    continue  # registered now: load again
                except ImportError:
                    pass
            raise ModelLoadError(f"{path}: this .pt2 needs the package that defined its output types: import "
                                 f"{package} (it holds a {type_name}, which torch cannot read without it; "
                                 f"pip install {package})") from exc
        finally:
            logger.removeHandler(keep)
            for handler in own:
                logger.addHandler(handler)
            logger.propagate = propagate


def _convert_pickle(path: Path, out: Path, input_shape: tuple[int, ...] | None,
                    named: Mapping[str | None, InputHint], allow_pickle: bool, say: Callable[[str], None]) -> None:
    from models.convert import to_onnx

    if not allow_pickle:
        raise ModelLoadError(f"{path}: is a pickled torch model (torch.save(model)); {_PICKLE_RISK}")
    torch = require("torch", "profile")
    obj = _wrap(lambda: torch.load(str(path), map_location="cpu", weights_only=False), str(path))
    if not isinstance(obj, torch.nn.Module):
        hint = " (a state_dict holds weights but not the architecture)" if isinstance(obj, dict) else ""
        raise ModelLoadError(f"{path}: unpickled a {type(obj).__name__}, expected an nn.Module{hint}; save the "
                             "module itself with torch.jit.save or torch.export.save")
    obj.eval()
    names = [n for n in named if n is not None] or ["input"]
    examples = _examples_from(path, [None] * len(names), input_shape, torch, names=names, dtypes=[None] * len(names),
                              named=named)
    _wrap(lambda: to_onnx(obj, examples, out, input_names=_onnx_input_names(names), progress=say, source=path.name),
          str(path))


# -- .pt2 archives without pickle ------------------------------------------------------------------

# torch.export.load unpickles, with no restriction: weights and constants marked use_pickle, custom and opaque
# objects, and (after a failed restricted load) sample inputs and the older formats' .pt members; it loads
# AOTInductor's compiled code. The restricted `weights_only` unpickler is torch's safe path.
_RESTRICTED_PT = ("data/sample_inputs/", "data/weights/", "data/constants/")
_LEGACY_PT = ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt")


def pt2_pickle_use(path: Path, torch: Any) -> str | None:
    """Why loading the .pt2 archive at `path` with torch.export.load would run the unrestricted unpickler (or
    native code), e.g. "weight 'l.weight' is stored pickled (use_pickle)"; None when it would not.

    Looks at the zip's members and configs only; the members torch first tries with the restricted
    `weights_only` unpickler are loaded here the same way, so one that would fall back to full pickle is named.
    """
    with zipfile.ZipFile(path) as zf:
        members = {n.split("/", 1)[1] if "/" in n else n: n for n in zf.namelist() if not n.endswith("/")}
        for rel in members:
            if rel.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
                return f"member {rel} is compiled native code (AOTInductor), which loading would run"
        for rel, name in members.items():
            if not rel.endswith("_config.json") or not rel.startswith(("data/weights/", "data/constants/")):
                continue
            try:
                config = json.loads(zf.read(name)).get("config", {})
                entries = [(str(k), v.get("path_name", ""), bool(v.get("use_pickle"))) for k, v in config.items()]
            except (ValueError, AttributeError) as exc:
                return f"member {rel} is not a valid payload config ({exc})"
            kind = "weight" if rel.startswith("data/weights/") else "constant"
            for fqn, file, use_pickle in entries:
                if use_pickle:
                    return f"{kind} {fqn!r} is stored pickled (use_pickle)"
                if str(file).startswith(("custom_obj_", "opaque_obj_")):
                    return f"{kind} {fqn!r} is a pickled object ({file})"
        for rel, name in members.items():
            restricted = rel.endswith(".pt") and (rel.startswith(_RESTRICTED_PT) or rel in _LEGACY_PT)
            if not restricted:
                continue
            data = zf.read(name)
            if not data:
                continue  # an empty member is read as "nothing" without unpickling (no sample inputs)
            try:
                torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception as exc:  # noqa: BLE001 - the restricted unpickler refuses: torch would retry unrestricted
                return f"member {rel} needs pickle beyond plain tensors ({type(exc).__name__})"
    return None


# -- helpers ---------------------------------------------------------------------------------------


def _examples_from(path: Path, shapes: list[tuple[int, ...] | None], input_shape: tuple[int, ...] | None,
                   torch: Any, *, names: Sequence[str] | None = None, dtypes: Sequence[Any] | None = None,
                   named: Mapping[str | None, InputHint] | None = None) -> tuple:
    """Seeded example inputs: shapes and dtypes recorded in the model where known, else --input-shape's.

    Floats are standard normal; integers are 0 (a valid index and token id for any table) except inputs named
    like a mask, which are 1 (attend everywhere); bools are True.
    """
    if not shapes:
        raise ModelLoadError(f"{path}: the model takes no tensor inputs; expected at least one")
    names = list(names) if names is not None else [f"input_{i}" for i in range(len(shapes))]
    dtypes = list(dtypes) if dtypes is not None else [None] * len(shapes)
    named = dict(named or {})
    _check_hint_names(path, named, names)
    shapes, dtypes = list(shapes), list(dtypes)
    for i, name in enumerate(names):
        hint = named.get(name) or (named.get(None) if len(shapes) == 1 else None)
        given = hint.shape if hint is not None and hint.shape is not None else (
            input_shape if len(shapes) == 1 else None)
        if given is not None:
            if shapes[i] is not None and shapes[i][1:] != given[1:]:  # type: ignore[index]
                what = "input shape" if len(shapes) == 1 else f"input {name!r} with shape"
                raise ModelLoadError(f"{path}: records {what} {_fmt(shapes[i])}, not --input-shape "  # type: ignore[arg-type]
                                     f"{_fmt(given)}; drop --input-shape or fix it")
            shapes[i] = given
        if hint is not None and hint.dtype is not None:
            want = getattr(torch, hint.dtype)
            if dtypes[i] is not None and dtypes[i] != want:
                raise ModelLoadError(f"{path}: input {name!r} is {str(dtypes[i]).replace('torch.', '')} in the model, "
                                     f"not {hint.dtype} as --input-shape says; drop the dtype or fix it")
            dtypes[i] = want
    missing = [names[i] for i, s in enumerate(shapes) if s is None]
    if missing and len(shapes) > 1:
        raise ModelLoadError(f"{path}: has {len(shapes)} inputs and does not record the shapes of "
                             f"{', '.join(missing)}; {_named_hint(names)}")
    if missing:
        raise ModelLoadError(f"{path}: does not record its input shape; {_SHAPE_HINT}")
    gen = torch.Generator().manual_seed(0)
    examples = []
    for name, shape, dtype in zip(names, shapes, dtypes):
        dtype = dtype or torch.float32
        if dtype.is_floating_point:
            examples.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool or "mask" in name.lower():
            examples.append(torch.ones(shape, dtype=dtype))
        else:
            examples.append(torch.zeros(shape, dtype=dtype))
    return tuple(examples)


def _check_hint_names(path: Path, named: Mapping[str | None, InputHint], names: Sequence[str]) -> None:
    unknown = [n for n in named if n is not None and n not in names]
    if unknown:
        raise ModelLoadError(f"{path}: --input-shape names {', '.join(map(repr, unknown))}, but the model's inputs "
                             f"are {', '.join(map(repr, names))}")
    if None in named and len(names) > 1:
        raise ModelLoadError(f"{path}: has {len(names)} inputs; {_named_hint(names)}")


def _named_hint(names: Sequence[str]) -> str:
    return "pass --input-shape " + ",".join(f"{n}=SHAPE[:DTYPE]" for n in names) + " (e.g. 1x128:int64)"


def _onnx_input_names(names: Sequence[str]) -> list[str] | None:
    """The model's own input names for several inputs; None (the default `input`) for one."""
    return list(names) if len(names) > 1 and len(set(names)) == len(names) else None


def _describe(onnx_path: Path, source: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs of a normalized ONNX file, output shapes taken from one onnxruntime run."""
    from models.convert import random_feeds, run_onnx

    onnx = require("onnx", "profile")
    model = onnx.load(str(onnx_path))
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = _wrap(lambda: run_onnx(model.SerializeToString(), random_feeds(graph_inputs)),
                    f"{source} (onnxruntime cannot run the converted model)")

    def dynamic0(vi: Any) -> bool:
        dims = vi.type.tensor_type.shape.dim
        return bool(dims) and dims[0].HasField("dim_param")

    def dtype(vi: Any) -> str:
        return numpy_dtype(vi.type.tensor_type.elem_type).name

    inputs = tuple(
        TensorSpec(vi.name, tuple(None if (i == 0 and dynamic0(vi)) else d.dim_value
                                  for i, d in enumerate(vi.type.tensor_type.shape.dim)), dtype(vi))
        for vi in graph_inputs
    )
    outs = tuple(
        TensorSpec(vi.name, tuple(None if (i == 0 and dynamic0(vi)) else int(d) for i, d in enumerate(arr.shape)),
                   arr.dtype.name)
        for vi, arr in zip(model.graph.output, outputs)
    )
    return inputs, outs


def _task(outputs: tuple[TensorSpec, ...]) -> str:
    return "classification" if len(outputs) == 1 and len(outputs[0].shape) == 2 else "other"


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if not dims or any(d <= 0 for d in dims) or any(isinstance(d, bool) for d in shape):
        raise ModelLoadError(f"input shape {shape!r}: expected positive integers, batch first, like 1x3x224x224")
    return dims


def _fmt(shape: tuple[Any, ...]) -> str:
    return "x".join("N" if d is None else str(d) for d in shape)


def _wrap(fn: Callable[[], Any], where: str) -> Any:
    """Run fn; any torch/onnx/ort failure becomes one ModelLoadError line naming `where`, chained to the cause."""
    from models.convert import ConversionError

    try:
        return fn()
    except ModelLoadError:
        raise
    except ConversionError as exc:
        raise ModelLoadError(f"{where}: {_first_line(exc, limit=1000)}") from exc  # ours: one line, whole
    except Exception as exc:  # noqa: BLE001 - torch and onnx raise anything; the cause is kept as __cause__
        raise ModelLoadError(f"{where}: {type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit] + ("" if len(text) <= 1 else " ...")

