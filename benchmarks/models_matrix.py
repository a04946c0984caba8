"""The models matrix: common architectures, exported as users export them, planned by `split-profile`.

Each model is built with random weights (nothing is downloaded), exported in a child process to TorchScript
(`model.pt`, `torch.jit.trace`), `.pt2` (`torch.export.export` + `torch.export.save`) and ONNX
(`torch.onnx.export`, the default exporter), each in a folder named after the model; then

    split-profile DIR/model.EXT --device rpi4 --network 4g --input-shape ... --out BUNDLE

runs as a child process with a timeout (its progress lines are kept in split-profile-EXT.log). A row per
(model, format): the status (ok, or the error's line), the export's and split-profile's wall and CPU time (user
+ system: the children run one thread, so on a shared host the CPU time is what an idle core would take), the
peak memory (the child's `ru_maxrss`), the graph's node count and GFLOPs (the planner's count on the bundle's
full.onnx), the chosen cut and its int8 head's agreement with fp32 (the verification gate). The summary names
the formats of a model that disagree on GFLOPs or node count by more than 5 %, and any stderr line past
split-profile's own (what would still print under -q).

Families: `torchvision`, `timm`, `transformers` (Hugging Face, built from a config, 4 layers), `ultralytics`
(YOLO from its yaml, offline) need the `matrix` extra (`pip install -e .[matrix]`; see below); `project` (the
zoo's and models/testnets' architectures, which need nothing more) is what CI runs, through the same code
(tests/integration/test_models_matrix_small.py).

    python -m benchmarks.models_matrix [--models resnet50,bert_hf,...|--family torchvision] \\
        [--formats pt,pt2,onnx] [--timeout 600] [--out matrix.md] [--work DIR] [--profile-args "..."]

Installing the matrix extra next to the CPU torch (pip must never replace torch): the torchvision wheel in the
registry is the CUDA build, whose C++ ops do not load next to the CPU torch; `import torchvision` then fails in
its fake-op registrations unless `torchvision::nms` / `qnms` are defined first, which `import_torchvision()`
does. timm, transformers and ultralytics install with `--no-deps` and their pure-python dependencies listed
in the extra:

    pip install --no-deps torchvision timm transformers ultralytics && pip install -e ".[matrix]"
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("pt", "pt2", "onnx")
PROFILE_ARGS = ("--device", "rpi4", "--network", "4g")
PLAN_TARGET_S = 60.0  # issue 17: every model of the matrix planned in under a minute on the 2-core host


# -- the models ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One model of the matrix: how to build it and feed it, and how split-profile is told its inputs."""

    name: str
    family: str
    build: Callable[[], tuple[Any, tuple[Any, ...]]]  # -> (module in eval mode, example inputs)
    input_shape: str  # split-profile's --input-shape
    note: str = ""
    tolerance: float = 1e-3  # round trips in the small matrix: max |error| relative to the output's scale


def import_torchvision() -> Any:
    """`import torchvision`, also when its C++ ops do not load (a CUDA wheel beside the CPU torch).

    torchvision registers fake (meta) kernels for `torchvision::nms` and `qnms` at import; when its C++ library
    did not load, those ops have no schema and the registration fails. Defining the schemas first lets the
    import (and every model without NMS) work.
    """
    import torch

    schemas = {"nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
               "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}
    for op, schema in schemas.items():
        try:
            torch.library.define(f"torchvision::{op}", schema)
        except RuntimeError:
            pass  # already defined: torchvision's own ops loaded (a matching CPU wheel)
    import torchvision

    return torchvision


def _image(size: int = 224) -> tuple[Any, ...]:
    import torch

    return (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _torchvision(name: str, size: int = 224, **kw: Any) -> Callable[[], tuple[Any, tuple[Any, ...]]]:
    def build() -> tuple[Any, tuple[Any, ...]]:
        tv = import_torchvision()
        import torch

        torch.manual_seed(0)
        return tv.models.get_model(name, weights=None, **kw).eval(), _image(size)

    return build


def _timm(name: str, size: int = 224) -> Callable[[], tuple[Any, tuple[Any, ...]]]:
    def build() -> tuple[Any, tuple[Any, ...]]:
        import_torchvision()  # timm, transformers and ultralytics import it
        import timm
        import torch

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False).eval(), _image(size)

    return build


HF_LAYERS = 4  # the Hugging Face models are built with 4 layers (bert-base and vit-base have 12) to save time
HF_SEQ = 128


def _bert_hf() -> tuple[Any, tuple[Any, ...]]:
    import_torchvision()
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=HF_LAYERS, num_labels=3)  # bert-base widths: 768, 12 heads, 30522 tokens
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, HF_SEQ), generator=gen, dtype=torch.int64)
    mask = torch.ones(1, HF_SEQ, dtype=torch.int64)
    return BertForSequenceClassification(config).eval(), (ids, mask)


def _vit_hf() -> tuple[Any, tuple[Any, ...]]:
    import_torchvision()
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(num_hidden_layers=HF_LAYERS, num_labels=1000)  # vit-base widths: 768, 12 heads, 16x16 patches
    return ViTForImageClassification(config).eval(), _image(224)


def _yolo(yaml: str) -> Callable[[], tuple[Any, tuple[Any, ...]]]:
    def build() -> tuple[Any, tuple[Any, ...]]:
        os.environ.setdefault("YOLO_OFFLINE", "1")
        import_torchvision()
        import torch
        from ultralytics import YOLO

        torch.manual_seed(0)
        model = YOLO(yaml).model.eval()
        for m in model.modules():  # as ultralytics' own exporter does: the head returns the decoded boxes alone
            if hasattr(m, "export") and hasattr(m, "stride"):
                m.export = True
        image = _image(640)
        with torch.no_grad():
            for _ in range(2):  # the exporter's dry runs: the head caches its anchors for this input size
                model(*image)
        return model, image

    return build


def _zoo(name: str) -> Callable[[], tuple[Any, tuple[Any, ...]]]:
    def build() -> tuple[Any, tuple[Any, ...]]:
        import torch

        from models.zoo import build_zoo_model, zoo_entry

        shape = zoo_entry(name).input_shape
        return build_zoo_model(name), (torch.randn(*shape, generator=torch.Generator().manual_seed(0)),)

    return build


def _segmenter() -> tuple[Any, tuple[Any, ...]]:
    import torch

    from models.testnets import SEGMENTER_SHAPE, build_segmenter

    return build_segmenter(), (torch.randn(*SEGMENTER_SHAPE, generator=torch.Generator().manual_seed(0)),)


def _tiny_bert() -> tuple[Any, tuple[Any, ...]]:
    from models.testnets import build_text_model, text_inputs

    return build_text_model(), text_inputs()


def detector_zoo_name() -> str | None:
    """The zoo's YOLO-class detector, when the zoo has one (a name with "yolo" or "det" in it); else None."""
    from models.zoo import zoo_entry, zoo_names

    found = [n for n in zoo_names() if "yolo" in n or "det" in n or zoo_entry(n).task == "detection"]
    return found[0] if found else None


def _image_shape(size: int) -> str:
    return f"1x3x{size}x{size}"


def _specs() -> list[Spec]:
    tv = [("resnet50", 224), ("mobilenet_v3_large", 224), ("efficientnet_b0", 224), ("squeezenet1_1", 224),
          ("googlenet", 224), ("inception_v3", 299), ("densenet121", 224), ("convnext_tiny", 224),
          ("vit_b_16", 224), ("swin_t", 224), ("deeplabv3_mobilenet_v3_large", 224),
          ("lraspp_mobilenet_v3_large", 224), ("fcn_resnet50", 224)]
    extra: dict[str, dict[str, Any]] = {"googlenet": {"aux_logits": False, "init_weights": True},
                                        "inception_v3": {"aux_logits": False, "init_weights": True}}
    for seg in ("deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50"):
        extra[seg] = {"weights_backbone": None}  # else torchvision downloads the backbone's ImageNet weights
    specs = [Spec(n, "torchvision", _torchvision(n, s, **extra.get(n, {})), _image_shape(s),
                  "dict output" if n.split("_")[0] in ("deeplabv3", "lraspp", "fcn") else "")
             for n, s in tv]
    specs += [Spec("timm_mobilenetv3_small_100", "timm", _timm("mobilenetv3_small_100"), _image_shape(224)),
              Spec("timm_vit_tiny_patch16_224", "timm", _timm("vit_tiny_patch16_224"), _image_shape(224))]
    text = f"input_ids=1x{HF_SEQ}:int64,attention_mask=1x{HF_SEQ}:int64"
    specs += [Spec("bert_hf", "transformers", _bert_hf, text,
                   f"BertForSequenceClassification, bert-base widths, {HF_LAYERS} layers, seq {HF_SEQ}"),
              Spec("vit_hf", "transformers", _vit_hf, _image_shape(224),
                   f"ViTForImageClassification, vit-base widths, {HF_LAYERS} layers")]
    specs += [Spec("yolov8n", "ultralytics", _yolo("yolov8n.yaml"), _image_shape(640)),
              Spec("yolo11n", "ultralytics", _yolo("yolo11n.yaml"), _image_shape(640))]
    from models.testnets import BERT_SEQ, SEGMENTER_SHAPE

    specs += [Spec("zoo_resnet18", "project", _zoo("resnet18"), _image_shape(224), "residual CNN"),
              Spec("zoo_tiny_cnn", "project", _zoo("tiny_cnn"), _image_shape(32), "residual CNN, tiny"),
              Spec("dict_segmenter", "project", _segmenter, "x".join(map(str, SEGMENTER_SHAPE)),
                   "dict output {out, aux}"),
              Spec("zoo_vit_tiny", "project", _zoo("vit_tiny"), _image_shape(64), "transformer"),
              Spec("tiny_bert", "project", _tiny_bert,
                   f"input_ids=1x{BERT_SEQ}:int64,attention_mask=1x{BERT_SEQ}:int64",
                   "int64 inputs, ModelOutput-like dict output")]
    with contextlib.suppress(ImportError):
        det = detector_zoo_name()
        if det is not None:
            from models.zoo import zoo_entry

            shape = "x".join(map(str, zoo_entry(det).input_shape))
            specs.append(Spec(f"zoo_{det}", "project", _zoo(det), shape, "detector, multi-scale outputs"))
    return specs


def specs_by_name() -> dict[str, Spec]:
    """Every model the matrix knows, by name."""
    return {s.name: s for s in _specs()}


# -- exporting (in a child process: a crash or a hang there is one row's error) -------------------------------------


def export(spec: Spec, fmt: str, folder: Path, model: Any = None, inputs: tuple[Any, ...] = ()) -> Path:
    """Export `spec` (built now unless `model` and `inputs` are given) as a user would, to folder/model.FMT."""
    import warnings

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model.{fmt}"
    if model is None:
        model, inputs = spec.build()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if fmt == "pt":
            traced = torch.jit.trace(model, inputs, strict=False)  # strict=False: dict and list outputs
            traced.save(str(path))
        elif fmt == "pt2":
            torch.export.save(torch.export.export(model, inputs, strict=False), str(path))
        elif fmt == "onnx":
            names = _input_names(spec, len(inputs))
            torch.onnx.export(model, inputs, str(path), input_names=names)
        else:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return path


EXPORTS = "exports.json"  # what the export child says about each format: {fmt: {"seconds": s, "error": str|None}}


def export_all(spec: Spec, formats: Sequence[str], work: Path) -> None:
    """Build `spec` once and export it in each format to work/FMT/model.FMT, recording each in work/exports.json."""
    import traceback

    start, cpu = time.monotonic(), time.process_time()
    model, inputs = spec.build()
    built, built_cpu = time.monotonic() - start, time.process_time() - cpu
    said: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        start, cpu = time.monotonic(), time.process_time()
        try:
            export(spec, fmt, work / fmt, model, inputs)
            error = None
        except Exception as exc:  # noqa: BLE001 - one row's error, said in one line
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
        said[fmt] = {"seconds": time.monotonic() - start + built, "cpu_seconds": time.process_time() - cpu + built_cpu,
                     "error": error}
        (work / EXPORTS).write_text(json.dumps(said))


def _input_names(spec: Spec, count: int) -> list[str]:
    named = [part.split("=")[0] for part in spec.input_shape.split(",") if "=" in part]
    return named if len(named) == count else ["x"] if count == 1 else [f"input_{i}" for i in range(count)]


# -- running children ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    """A finished child process: exit status (None: killed at the timeout), wall and CPU time, peak RSS, output."""

    returncode: int | None
    seconds: float
    cpu_seconds: float  # user + system: what the wall time would be on an idle core (the children are 1-thread)
    peak_mb: float
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_child(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> Child:
    """Run `argv` in its own session; kill its process group after `timeout` s. ru_maxrss comes from wait4."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=env, start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        seconds = time.monotonic() - start
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind
        out.seek(0)
        err.seek(0)
        code = None if killed.is_set() else proc.returncode
        cpu = usage.ru_utime + usage.ru_stime
        return Child(code, seconds, cpu, usage.ru_maxrss / 1024, out.read(), err.read())


def child_env(threads: int) -> dict[str, str]:
    """The environment of the children: `threads` threads for torch and BLAS, offline ultralytics."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("YOLO_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# -- one row ----------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One (model, format) of the matrix."""

    model: str
    family: str
    fmt: str
    status: str = "ok"
    export_s: float | None = None
    export_cpu_s: float | None = None
    plan_s: float | None = None
    plan_cpu_s: float | None = None
    peak_mb: float | None = None
    nodes: int | None = None
    gflops: float | None = None  # the whole model's work at batch 1 (bundle's full.onnx, partitioning.flops)
    candidates: int | None = None
    chosen: str = ""
    cut: tuple[str, ...] = ()
    int8: str = ""
    bundle: Path | None = None
    model_file: Path | None = None
    notes: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # stderr lines past split-profile's own (stray_lines)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def slow(self) -> bool:
        """Planned in more than the target, counted in CPU seconds (the host is shared; the child is 1-thread)."""
        return self.plan_cpu_s is not None and self.plan_cpu_s > PLAN_TARGET_S


def one_line(text: str, width: int = 160) -> str:
    """The line of an error output that says what went wrong (split-profile's error line, else the last line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("split-profile: error") or line.startswith("split-profile: "
                                                                                                  "internal error")]
    line = said[-1] if said else lines[-1] if lines else "no output"
    return line if len(line) <= width else line[: width - 1] + "…"


def _int8_summary(doc: dict[str, Any]) -> str:
    """The chosen cut's int8 gate: "top-1 0.953 pass", "rel. err 0.006 pass" (+ float nodes / precision if recorded)."""
    chosen = doc.get("chosen")
    cut = ((doc.get("verification") or {}).get("cuts") or {}).get(chosen) or {}
    gate = cut.get("int8")
    if not gate:
        return "no head" if chosen in ("cloud_only",) else "—"
    metric = {"top1_agreement": "top-1", "relative_error": "rel. err"}.get(gate.get("metric"), gate.get("metric", ""))
    text = f"{metric} {gate.get('value', float('nan')):.3f} {'pass' if gate.get('passed') else 'FAIL'}"
    precision = gate.get("precision") or gate.get("head_precision")
    floats = gate.get("float_nodes")
    if precision:
        text += f", head {precision}"
    if floats:
        text += f", {len(floats)} nodes kept fp32"
    return text


def run_model(spec: Spec, formats: Sequence[str], work: Path, timeout: float,
              profile_args: Sequence[str] = PROFILE_ARGS, threads: int = 1,
              say: Callable[[str], None] = lambda _: None, export_here: bool = False) -> Iterator[Row]:
    """Export `spec` in `formats` (one child: one build) and plan each export with split-profile (a child each).

    `export_here`: export in this process instead (CI's small matrix: torch is imported already).
    """
    folder = work / spec.name
    env = child_env(threads)
    say(f"{spec.name}: exporting to {', '.join(formats)}")
    if export_here:
        start = time.monotonic()
        export_all(spec, formats, folder)
        made = Child(0, time.monotonic() - start, 0.0, 0.0, "", "")
    else:
        made = run_child([sys.executable, "-m", "benchmarks.models_matrix", "--export-one", spec.name,
                          ",".join(formats), str(folder)], timeout * len(formats), env)
    try:
        said = json.loads((folder / EXPORTS).read_text())
    except (OSError, json.JSONDecodeError):
        said = {}
    for fmt in formats:
        row = Row(spec.name, spec.family, fmt)
        got = said.get(fmt)
        if got is None:
            row.export_s, row.export_cpu_s = made.seconds, made.cpu_seconds
            row.status = (f"export timed out after {timeout * len(formats):g} s" if made.timed_out
                          else f"export failed: {one_line(made.stderr)}")
        elif got["error"]:
            row.export_s, row.export_cpu_s = got["seconds"], got.get("cpu_seconds")
            row.status = f"export failed: {one_line(got['error'])}"
        else:
            row.export_s, row.export_cpu_s = got["seconds"], got.get("cpu_seconds")
            say(f"{spec.name} {fmt}: split-profile")
            plan(row, folder / fmt / f"model.{fmt}", spec, folder / f"bundle-{fmt}", timeout, profile_args, env)
        yield row


def plan(row: Row, model_file: Path, spec: Spec, bundle: Path, timeout: float, profile_args: Sequence[str],
         env: dict[str, str]) -> None:
    """Run split-profile on `model_file` in a child and fill `row` from its plan.json (or its error)."""
    row.model_file = model_file
    argv = [sys.executable, "-m", "partitioning.cli", str(model_file), *profile_args,
            "--input-shape", spec.input_shape, "--name", f"{spec.name}-{row.fmt}", "--out", str(bundle)]
    ran = run_child(argv, timeout, env)
    row.plan_s, row.plan_cpu_s, row.peak_mb = ran.seconds, ran.cpu_seconds, ran.peak_mb
    (bundle.parent / f"split-profile-{row.fmt}.log").write_text(ran.stderr)  # the progress lines, timed
    if ran.timed_out:
        row.status = f"timed out after {timeout:g} s"
        return
    if ran.returncode != 0:
        row.status = f"exit {ran.returncode}: {one_line(ran.stderr)}"
        return
    try:
        doc = json.loads((bundle / "plan.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        row.status = f"no plan.json in the bundle ({exc}): {one_line(ran.stdout or ran.stderr)}"
        return
    row.bundle = bundle
    row.nodes = (doc.get("model") or {}).get("nodes")
    row.candidates = len(doc.get("candidates") or ())
    row.chosen = str(doc.get("chosen", ""))
    row.cut = tuple(next((c.get("cut", ()) for c in doc.get("candidates", ()) if c.get("id") == row.chosen), ()))
    row.int8 = _int8_summary(doc)
    row.notes = [line.removeprefix("split-profile: warning: ") for line in ran.stderr.splitlines()
                 if line.startswith("split-profile: warning")]
    row.stray = stray_lines(ran.stderr)
    row.gflops = model_gflops(bundle / "full.onnx")


_PROGRESS = re.compile(r"^\[\s*\d+(\.\d+)?s\] ")


def stray_lines(stderr: str) -> list[str]:
    """split-profile's stderr lines that are neither its progress lines nor its own `split-profile:` lines:
    what would still reach the terminal under -q (an onnxruntime `[E:onnxruntime...]` line, a library's warning)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not _PROGRESS.match(line) and not line.startswith("split-profile: ")]


def model_gflops(full_onnx: Path) -> float | None:
    """The model's work at batch 1 in GFLOPs as the planner counts it (None when the file is missing)."""
    if not full_onnx.is_file():
        return None
    import onnx

    from partitioning.flops import node_stats

    return sum(s.flops for s in node_stats(onnx.load(str(full_onnx))).values()) / 1e9


FORMAT_SLACK = 0.05  # the same model in two formats: GFLOPs and node count within 5 %


def format_discrepancies(rows: Sequence[Row]) -> list[str]:
    """Lines naming each model whose formats disagree on its work or graph size by more than FORMAT_SLACK,
    against its ONNX row (else its first planned row)."""
    said = []
    by_model: dict[str, list[Row]] = {}
    for row in rows:
        if row.ok and row.nodes is not None:
            by_model.setdefault(row.model, []).append(row)
    for model, planned in by_model.items():
        ref = next((r for r in planned if r.fmt == "onnx"), planned[0])
        for row in planned:
            if row is ref:
                continue
            what = []
            if ref.gflops and row.gflops is not None and abs(row.gflops - ref.gflops) > FORMAT_SLACK * ref.gflops:
                what.append(f"{row.gflops:.2f} GFLOPs against {ref.gflops:.2f}")
            if ref.nodes and abs((row.nodes or 0) - ref.nodes) > FORMAT_SLACK * ref.nodes:
                what.append(f"{row.nodes} nodes to search against {ref.nodes}")
            if what:
                said.append(f"{model} {row.fmt}: {', '.join(what)} ({ref.fmt})")
    return said


# -- the table --------------------------------------------------------------------------------------------------------


def _cut_text(row: Row, width: int = 40) -> str:
    if not row.chosen:
        return ""
    if row.chosen in ("edge_only", "cloud_only"):
        return row.chosen
    text = f"{row.chosen} ({', '.join(row.cut)})"
    return text if len(text) <= width else text[: width - 1] + "…"


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "" if value is None else fmt.format(value)


def _wall_cpu(wall: float | None, cpu: float | None) -> str:
    return "" if wall is None else f"{wall:.0f} ({cpu:.0f})" if cpu is not None else f"{wall:.0f}"


HEADER = ("| model | format | status | export s (cpu) | split-profile s (cpu) | peak MB | nodes | GFLOPs | chosen cut "
          "| int8 head (agreement) |\n|---|---|---|---:|---:|---:|---:|---:|---|---|")


def table_row(row: Row) -> str:
    """One Markdown row (`|` in messages escaped)."""
    status = row.status.replace("|", "\\|")
    if row.slow:
        status += f" (over {PLAN_TARGET_S:g} s cpu)"
    if row.stray:
        status += f" ({len(row.stray)} stray stderr line(s))"
    cells = [row.model, row.fmt, status, _wall_cpu(row.export_s, row.export_cpu_s),
             _wall_cpu(row.plan_s, row.plan_cpu_s), _num(row.peak_mb, "{:.0f}"),
             "" if row.nodes is None else str(row.nodes), _num(row.gflops, "{:.2f}"),
             _cut_text(row).replace("|", "\\|"), row.int8]
    return "| " + " | ".join(cells) + " |"


def host_note() -> str:
    """Date, host and versions, for the table's caption."""
    import importlib.metadata as md

    versions = []
    for pkg in ("torch", "onnxruntime", "torchvision", "timm", "transformers", "ultralytics"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions.append(f"{pkg} {md.version(pkg)}")
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return (f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} cores "
            f"(load average {os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()}; "
            + ", ".join(versions))


# -- main -------------------------------------------------------------------------------------------------------------


def select(models: str | None, family: str | None) -> list[Spec]:
    """The specs named (comma-separated) or of a family; default: every family but `project`."""
    known = specs_by_name()
    if models:
        names = [m.strip() for m in models.split(",") if m.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"models_matrix: unknown model(s) {unknown}; known: {', '.join(known)}")
        return [known[n] for n in names]
    if family:
        return [s for s in known.values() if s.family == family]
    return [s for s in known.values() if s.family != "project"]


@contextlib.contextmanager
def _work_dir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="models-matrix-") as tmp:
            yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: export and plan each model in each format; print the table (and write it to --out)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.models_matrix", description=__doc__.split("\n")[0])
    p.add_argument("--models", help="comma-separated names (default: every model outside the `project` family)")
    p.add_argument("--family", choices=("torchvision", "timm", "transformers", "ultralytics", "project"))
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: pt, pt2, onnx")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for each export and each split-profile")
    p.add_argument("--out", type=Path, help="also write the table here (rows are appended as they finish)")
    p.add_argument("--work", help="work here, and keep the logs (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep each model's exports and bundles in --work")
    p.add_argument("--threads", type=int, default=1, help="threads of each child (OMP_NUM_THREADS; default 1)")
    p.add_argument("--profile-args", default=" ".join(PROFILE_ARGS), help="split-profile's arguments besides the "
                   f"model, --input-shape, --out, --json and -q (default: {' '.join(PROFILE_ARGS)!r})")
    p.add_argument("--list", action="store_true", help="list the models and exit")
    p.add_argument("--export-one", nargs=3, metavar=("MODEL", "FORMATS", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.export_one:
        name, fmts, folder = args.export_one
        export_all(specs_by_name()[name], fmts.split(","), Path(folder))
        return 0
    if args.list:
        for s in specs_by_name().values():
            print(f"{s.family:<12} {s.name:<32} {s.input_shape:<44} {s.note}")
        return 0
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise SystemExit(f"models_matrix: unknown format(s) {bad}; expected {', '.join(FORMATS)}")
    specs = select(args.models, args.family)

    def say(msg: str) -> None:
        print(f"# [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    caption = (f"`split-profile MODEL {args.profile_args}` ({args.threads} thread(s) per child, "
               f"timeout {args.timeout:g} s)")
    if args.out:
        args.out.write_text(f"{caption}\n\n{HEADER}\n")
    print(HEADER, flush=True)
    with _work_dir(args.work) as work:
        for spec in specs:
            for row in run_model(spec, formats, work, args.timeout, shlex.split(args.profile_args), args.threads,
                                 say):
                rows.append(row)
                line = table_row(row)
                print(line, flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(line + "\n")
            for made in (work / spec.name).iterdir() if (work / spec.name).is_dir() else ():
                if made.is_dir() and not args.keep:  # exports and bundles of big models add up; the logs stay
                    shutil.rmtree(made, ignore_errors=True)
    note = host_note()
    ok = sum(r.ok for r in rows)
    slow = [f"{r.model} {r.fmt}" for r in rows if r.slow]
    differ = format_discrepancies(rows)
    stray = [f"{r.model} {r.fmt}: {r.stray[0][:160]}" for r in rows if r.stray]
    summary = (f"\n{ok} of {len(rows)} planned; over {PLAN_TARGET_S:g} s: {', '.join(slow) or 'none'}.\n"
               + "".join(f"Formats disagree: {line}\n" for line in differ)
               + "".join(f"Stray stderr: {line}\n" for line in stray)
               + f"Measured {note}.")
    print(summary)
    if args.out:
        with args.out.open("a") as f:
            f.write(summary + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
