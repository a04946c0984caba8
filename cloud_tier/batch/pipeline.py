"""split-batch's run: the bundle's head and tail as two Ray Data `map_batches` stages, the cache around them.

The driver reads the dataset once (`inputs.scan_dataset`: every row checked, hashed, only ids and hashes kept),
asks the cache which rows it already has, and hands Ray Data only the others, in windows of WINDOW_BLOCKS blocks
of `batch_size` rows (through the object store, so a cluster's workers need no shared disk): each window's
tensors are read again from the dataset and dropped once its blocks are committed, so the driver holds one
window, not the dataset. The head runs in CPU actors, the tail in GPU actors where the
cluster has GPUs (CUDA execution provider, CPU otherwise); each actor loads its onnxruntime session once. Each
block that comes back is committed to the cache in one transaction before the next is taken, which is what
makes a killed run resumable. The output file is written from the cache at the end, in the dataset's order,
with the dataset's row ids.

`--compare` runs the same rows through the full model too (one stage, cached under the full model's identity)
and reports, per output, how far the split's predictions (its head precision, int8 where the plan says so)
are from the full model's on this data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_tier.batch.cache import PredictionCache
from cloud_tier.batch.inputs import BatchInputError, InputSpec, Row, need, scan_dataset
from cloud_tier.executor import select_providers
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle, BundleError, sha256_file
from models.ortopts import make_session
from models.procedural import CACHE_ENV

log = logging.getLogger(__name__)

POS = "__splitinfer_pos"  # the column that carries a row's place in the pending list through the stages
FULL = "full"  # the "cut" of the full model's identity (--compare)
HEAD_PRECISIONS = ("int8", "fp32")
DEFAULT_CACHE_DIR = "$SPLITINFER_CACHE/batch, else ~/.cache/splitinfer/batch"
CACHE_FILE = "predictions.sqlite"
OUTPUT_METADATA_KEY = b"splitinfer.outputs"
ACTOR_WAIT_S = 600.0  # on a cluster at --ray-address: how long Ray Data waits for a stage's actors to start
WINDOW_BLOCKS = 64  # blocks handed to Ray Data at a time (one window's tensors in the driver's memory)
WRITE_ROWS = 256  # rows per output row group, at most
WRITE_BYTES = 64 << 20  # ... and about this many bytes of predictions (a row group holds at least one row)


class OptionError(ValueError):
    """An option of split-batch is out of range; the message names it."""


class RunError(RuntimeError):
    """The run failed on the cluster (a stage's error, rows lost, actors that never started): one line."""


def run_error(label: str, exc: BaseException) -> RunError:
    """A Ray error as one line: its type and the last line of its message (a remote traceback's error line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return RunError(f"{label}: the run failed on Ray ({type(exc).__name__}: {lines[-1] if lines else 'no message'})")


@dataclass(frozen=True)
class BatchOptions:
    """How split-batch runs: which cut and head, the Ray Data stages' sizes, the cache, the cluster."""

    cut: str | None = None  # None: the plan's chosen cut
    head_precision: str = "int8"  # "int8": the int8 head where the plan's gate passed it (as the agent runs)
    batch_size: int = 32  # rows per map_batches call, and per block committed to the cache
    concurrency: int = 1  # actors per stage
    threads: int = 1  # onnxruntime intra-op threads per actor
    tail_gpus: float | None = None  # GPUs per tail actor; None: 1 where the cluster has GPUs, else 0
    use_cache: bool = True
    cache_dir: Path | None = None  # None: default_cache_dir()
    id_column: str = "id"
    ray_address: str | None = None  # None: a private local cluster on 127.0.0.1
    num_cpus: int | None = None  # CPUs of the local cluster (None: all of this machine's)
    progress: bool = True  # Ray Data's progress bars on stderr

    def check(self) -> None:
        """OptionError naming the option that is out of range."""
        if self.head_precision not in HEAD_PRECISIONS:
            raise OptionError(f"head precision {self.head_precision!r}: expected one of {HEAD_PRECISIONS}")
        for name in ("batch_size", "concurrency", "threads"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.tail_gpus is not None and self.tail_gpus < 0:
            raise OptionError(f"tail GPUs must be >= 0, got {self.tail_gpus}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise OptionError(f"num-cpus must be at least 1, got {self.num_cpus}")


@dataclass(frozen=True)
class Stage:
    """One ONNX model run as a Ray Data stage: its bytes, the tensors it reads and writes."""

    model: bytes
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Models:
    """What one run computes: the head and tail stages (either may be absent) and their identity in the cache."""

    label: str  # in words: "cut c1, int8 head"
    cut: str
    precision: str
    identity: str
    head: Stage | None
    tail: Stage | None
    outputs: tuple[str, ...]


def _identity(bundle: Bundle, cut: str, precision: str, files: Sequence[Path | None]) -> str:
    doc = {"model": bundle.model_sha256, "cut": cut, "precision": precision,
           "files": [None if f is None else sha256_file(f) for f in files]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def split_models(bundle: Bundle, cut_id: str | None, head_precision: str) -> Models:
    """The head and tail of `cut_id` (default: the chosen cut): the int8 head where the plan's gate passed it
    and int8 is wanted (as the agent picks it), else fp32."""
    cut = bundle.cut(cut_id or bundle.chosen)
    head_path = cut.edge_head if head_precision == "int8" else cut.head
    if cut.id == CLOUD_ONLY:
        head_path = None
    precision = cut.int8_precision if head_path is not None and head_path == cut.head_int8 else "fp32"
    tail_path = None if cut.id == EDGE_ONLY else cut.tail
    if head_path is None and tail_path is None:
        raise BundleError(f"{bundle.root}: cut {cut.id!r} has neither a head nor a tail")
    model_inputs = tuple(s.name for s in bundle.inputs)
    model_outputs = tuple(s.name for s in bundle.outputs)
    tensors = tuple(t.name for t in cut.tensors)
    head = None if head_path is None else Stage(head_path.read_bytes(), model_inputs, tensors)
    tail = None if tail_path is None else Stage(tail_path.read_bytes(), tensors if head else model_inputs,
                                                model_outputs)
    label = f"cut {cut.id}, {precision if head else 'no'} head"
    return Models(label, cut.id, precision, _identity(bundle, cut.id, precision, [head_path, tail_path]),
                  head, tail, model_outputs)


def check_names(models: Models, id_column: str) -> None:
    """OptionError when a model's tensor would collide with a column of split-batch's: the output's id column
    (--id-column) or the internal position column (POS)."""
    for stage in (models.head, models.tail):
        for name in () if stage is None else (*stage.inputs, *stage.outputs):
            if name == POS:
                raise OptionError(f"{models.label}: the model has a tensor named {POS!r}, the column split-batch "
                                  "uses internally for row positions; rename the tensor")
    if id_column in models.outputs:
        raise OptionError(f"{models.label}: model output {id_column!r} has the name of the id column; give "
                          f"another --id-column (the output file has both)")


def full_models(bundle: Bundle) -> Models:
    """The full fp32 model as one stage (the reference of --compare)."""
    outputs = tuple(s.name for s in bundle.outputs)
    stage = Stage(bundle.full.read_bytes(), tuple(s.name for s in bundle.inputs), outputs)
    return Models("full model, fp32", FULL, "fp32", _identity(bundle, FULL, "fp32", [bundle.full]), None, stage,
                  outputs)


# -- the stages (run in Ray actors) -----------------------------------------------------------------------------


class OnnxStage:
    """A Ray Data callable class: one onnxruntime session per actor, loaded once; CUDA where Ray gave a GPU."""

    def __init__(self, model: bytes | tuple[Any], inputs: Sequence[str], outputs: Sequence[str], threads: int = 1):
        gpu = False
        if isinstance(model, bytes):
            data = model
        else:  # (ObjectRef,): fetched here, once per actor
            import ray

            data = ray.get(model[0])
        try:
            import ray

            gpu = bool(ray.get_gpu_ids())
        except ImportError:  # used without Ray (tests of the stage itself)
            pass
        self.inputs = tuple(inputs)
        self.outputs = list(outputs)
        self.session = make_session(data, threads=threads, providers=select_providers(prefer_gpu=gpu))
        if gpu:  # where a GPU stage really runs, in the actor's log (Ray's worker logs under its session dir)
            ran = self.session.get_providers()[0]
            print(f"split-batch: a stage given GPU {ray.get_gpu_ids()} runs on {ran}"
                  + ("" if ran != "CPUExecutionProvider" else " (no GPU provider here: pip install onnxruntime-gpu)"),
                  file=sys.stderr, flush=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The stage's outputs for a batch (dict of columns), with the rows' positions carried through."""
        feeds = {name: np.ascontiguousarray(batch[name]) for name in self.inputs}
        outs = self.session.run(self.outputs, feeds)
        return {POS: batch[POS], **dict(zip(self.outputs, outs))}


# -- the run ----------------------------------------------------------------------------------------------------


@dataclass
class RunReport:
    """What one identity's pass did: rows in the dataset, distinct contents, taken from the cache, computed."""

    label: str
    identity: str
    rows: int = 0
    unique: int = 0
    cached: int = 0
    computed: int = 0
    blocks: int = 0

    def line(self) -> str:
        """One line for stderr."""
        dup = f" ({self.rows - self.unique} duplicate)" if self.rows != self.unique else ""
        return (f"split-batch: {self.label}: {self.rows} rows{dup}: {self.cached} skipped (cached), "
                f"{self.computed} computed")


@dataclass
class Dataset:
    """The scanned dataset: every row's id and content hash in order, and how to read its rows again."""

    ids: list[str | int] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    id_type: str = "string"
    rescan: Callable[[], Iterator[Row]] = field(default=lambda: iter(()))


BlockCallback = Callable[[RunReport], None]


def load_dataset(path: Path, specs: Sequence[InputSpec], id_column: str) -> Dataset:
    """Scan the dataset once (every row checked): its ids and content hashes, no tensors."""
    data = Dataset(rescan=lambda: scan_dataset(path, specs, id_column))
    for row in scan_dataset(path, specs, id_column):
        data.ids.append(row.id)
        data.digests.append(row.digest)
    if not data.ids:
        raise BatchInputError(f"{path}: the dataset has no rows")
    data.id_type = "int64" if all(isinstance(i, int) for i in data.ids) else "string"
    return data


def compute(models: Models, data: Dataset, cache: PredictionCache, options: BatchOptions, ray: Any,
            on_block: BlockCallback | None = None) -> RunReport:
    """Compute every row of `data` that `cache` lacks under `models.identity` with Ray Data, a window of
    WINDOW_BLOCKS blocks at a time; commit per block."""
    report = RunReport(models.label, models.identity, rows=len(data.digests))
    unique = list(dict.fromkeys(data.digests))
    report.unique = len(unique)
    have = cache.present(models.identity, unique)
    pending = [d for d in unique if d not in have]
    report.cached = len(unique) - len(pending)
    if not pending:
        return report
    rows_again = data.rescan()
    window = WINDOW_BLOCKS * options.batch_size
    for start in range(0, len(pending), window):
        part = pending[start: start + window]
        feeds = _window_feeds(rows_again, set(part), models.label)
        done = 0
        for batch in _run_stages(models, part, feeds, options, ray):
            positions = np.asarray(batch[POS]).astype(np.int64).ravel()
            rows = [(part[p], {name: np.asarray(batch[name][j]) for name in models.outputs})
                    for j, p in enumerate(positions)]
            cache.put_block(models.identity, rows)
            done += len(rows)
            report.computed += len(rows)
            report.blocks += 1
            if on_block is not None:
                on_block(report)
        del feeds
        if done != len(part):
            raise RunError(f"{models.label}: Ray Data returned {done} of {len(part)} rows of a window")
    return report


def _window_feeds(rows: Iterator[Row], wanted: set[str], label: str) -> dict[str, dict[str, np.ndarray]]:
    """The tensors of the rows `wanted`, read on from `rows` (the dataset again, in order)."""
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for row in rows:
        if row.digest in wanted:
            feeds.setdefault(row.digest, row.feeds)
            if len(feeds) == len(wanted):
                return feeds
    raise RunError(f"{label}: the dataset changed while split-batch ran ({len(wanted) - len(feeds)} rows of its "
                   "first read are gone); run it again")


def _blocks(pending: Sequence[str], feeds: dict[str, dict[str, np.ndarray]], names: Sequence[str],
            size: int) -> Iterator[Any]:
    """The pending rows as Arrow tables of `size` rows: the position column and one tensor column per input."""
    pa = need("pyarrow")
    from ray.data.extensions import ArrowTensorArray

    for start in range(0, len(pending), size):
        part = pending[start: start + size]
        columns = {POS: pa.array(np.arange(start, start + len(part), dtype=np.int64))}
        for name in names:
            columns[name] = ArrowTensorArray.from_numpy(np.concatenate([feeds[d][name] for d in part]))
        yield pa.table(columns)


def check_gpus(options: BatchOptions, tail_gpus: float, gpus: float) -> None:
    """OptionError when the tail's actors need more GPUs than the local cluster has (Ray would wait for them
    forever); on a cluster at --ray-address (which may add nodes) a warning, and Ray Data waits ACTOR_WAIT_S."""
    need_gpus = tail_gpus * options.concurrency
    if need_gpus <= gpus:
        return
    what = (f"--tail-gpus {tail_gpus:g} x --concurrency {options.concurrency} needs {need_gpus:g} GPUs, and the "
            f"cluster has {gpus:g}")
    if options.ray_address is None:
        raise OptionError(f"{what}: lower --tail-gpus (0 runs the tail on CPU) or --concurrency")
    log.warning("split-batch: %s now: its actors start only when the cluster adds GPUs (Ray Data gives up "
                "after %.0f s)", what, ACTOR_WAIT_S)


def _run_stages(models: Models, pending: Sequence[str], feeds: dict[str, dict[str, np.ndarray]],
                options: BatchOptions, ray: Any) -> Iterator[dict[str, np.ndarray]]:
    """The result blocks of the head then tail stages over the pending rows, as they finish."""
    first = models.head or models.tail
    assert first is not None
    ds = ray.data.from_arrow(list(_blocks(pending, feeds, first.inputs, options.batch_size)))
    stages = [s for s in (models.head, models.tail) if s is not None]
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    tail_gpus = options.tail_gpus if options.tail_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if models.tail is not None:
        check_gpus(options, tail_gpus, gpus)
    actor_cpus = min(1.0, cpus / (options.concurrency * len(stages)))  # every actor fits, or the run would wait
    for stage in stages:
        on_gpu = stage is models.tail and tail_gpus > 0
        ds = ds.map_batches(
            OnnxStage,
            # the model travels once through the object store, as a reference the actor fetches (not as an
            # argument Ray would have to keep for restarts)
            fn_constructor_kwargs={"model": (ray.put(stage.model),), "inputs": stage.inputs,
                                   "outputs": stage.outputs, "threads": options.threads},
            batch_size=options.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.concurrency),
            num_cpus=actor_cpus,
            num_gpus=tail_gpus if on_gpu else 0,
        )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


# -- the output file --------------------------------------------------------------------------------------------


def write_output(path: Path, data: Dataset, models: Models, cache: PredictionCache, id_column: str) -> None:
    """The predictions of every row in the dataset's order, with its id, as parquet (temp file, then rename)."""
    pa = need("pyarrow")
    pq = need("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = None
    shapes: dict[str, Any] = {}
    try:
        for ids, outs in _row_groups(data, models, cache):
            columns = {id_column: pa.array(ids, type=pa.int64() if data.id_type == "int64" else pa.string())}
            for name in models.outputs:
                arrays = [o[name] for o in outs]
                shapes.setdefault(name, {"dtype": arrays[0].dtype.name, "shape": list(arrays[0].shape)})
                # int64 offsets: one row's output may hold more values than an int32 list's offsets reach
                offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int64)
                values = pa.array(np.concatenate([a.ravel() for a in arrays]))
                columns[name] = pa.LargeListArray.from_arrays(pa.array(offsets), values)
            table = pa.table(columns)
            if writer is None:
                meta = {"outputs": shapes, "cut": models.cut, "head_precision": models.precision,
                        "identity": models.identity}
                schema = table.schema.with_metadata({OUTPUT_METADATA_KEY: json.dumps(meta).encode()})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata), row_group_size=len(ids))
        assert writer is not None
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)


def _row_groups(data: Dataset, models: Models,
                cache: PredictionCache) -> Iterator[tuple[list[str | int], list[dict[str, np.ndarray]]]]:
    """The output's row groups, (ids, predictions): WRITE_ROWS rows, or fewer where they pass WRITE_BYTES."""
    ids: list[str | int] = []
    outs: list[dict[str, np.ndarray]] = []
    size = 0
    for row_id, digest in zip(data.ids, data.digests, strict=True):
        out = cache.get(models.identity, digest)
        ids.append(row_id)
        outs.append(out)
        size += sum(a.nbytes for a in out.values())
        if len(ids) >= WRITE_ROWS or size >= WRITE_BYTES:
            yield ids, outs
            ids, outs, size = [], [], 0
    if ids:
        yield ids, outs


# -- --compare --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputAgreement:
    """How one output of the split agrees with the full model's over the dataset."""

    name: str
    rows: int
    top1: float | None  # fraction of rows whose arg-max agrees (classifiers), None otherwise
    rel_err_median: float  # per row: ||split - full|| / ||full||
    rel_err_p95: float
    rel_err_max: float


def agreement(split: Sequence[dict[str, np.ndarray]], full: Sequence[dict[str, np.ndarray]],
              outputs: Sequence[str], classifier: bool) -> list[OutputAgreement]:
    """Per output: top-1 agreement (classifiers) and the rows' relative errors, split against full."""
    result = []
    for name in outputs:
        errs, same = [], 0
        for s, f in zip(split, full, strict=True):
            a, b = np.asarray(s[name], dtype=np.float64).ravel(), np.asarray(f[name], dtype=np.float64).ravel()
            errs.append(float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12)))
            same += int(a.size > 0 and np.argmax(a) == np.argmax(b))
        e = np.asarray(errs)
        result.append(OutputAgreement(name, len(errs), same / len(errs) if classifier and errs else None,
                                      float(np.median(e)), float(np.percentile(e, 95)), float(e.max())))
    return result


def format_agreement(rows: Sequence[OutputAgreement], label: str) -> str:
    """The --compare table."""
    lines = [f"split ({label}) against the full model (fp32), per output:",
             f"{'output':<24} {'rows':>6} {'top-1 agree':>12} {'rel err p50':>12} {'p95':>10} {'max':>10}"]
    for r in rows:
        top1 = "-" if r.top1 is None else f"{100 * r.top1:.2f}%"
        lines.append(f"{r.name:<24} {r.rows:>6} {top1:>12} {r.rel_err_median:>12.3e} {r.rel_err_p95:>10.3e} "
                     f"{r.rel_err_max:>10.3e}")
    return "\n".join(lines)


# -- the whole command ------------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    """What split-batch did: one RunReport per pass, the output file, and --compare's agreement."""

    passes: list[RunReport]
    output: Path | None
    agreement: list[OutputAgreement] | None = None
    label: str = ""


def start_session(options: BatchOptions) -> tuple[Any, bool]:
    """(ray, whether we started it): the cluster at --ray-address, or a private local one on loopback."""
    from cloud_tier.rayinit import start_ray

    ray = need("ray")
    need("ray.data")
    need("pyarrow")
    started = start_ray(ray, options.ray_address, num_cpus=options.num_cpus)
    configure_context(ray.data.DataContext.get_current(), options)
    if not options.progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray, started


def configure_context(ctx: Any, options: BatchOptions) -> None:
    """Ray Data's settings for a run: progress bars, and on a cluster at --ray-address a deadline on waiting
    for a stage's actors (which otherwise waits forever for resources the cluster never has)."""
    ctx.enable_progress_bars = options.progress
    if options.ray_address is not None:
        ctx.wait_for_min_actors_s = ACTOR_WAIT_S


def run_batch(bundle_dir: Path, input_path: Path, output: Path | None, options: BatchOptions = BatchOptions(), *,
              compare: bool = False, on_block: BlockCallback | None = None,
              say: Callable[[str], None] | None = None) -> BatchResult:
    """split-batch: the dataset through the bundle (and, with `compare`, the full model), cached and resumable.

    Bundle and dataset are checked before Ray starts; `on_block` is called after each block is committed."""
    options.check()
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    bundle = Bundle.load(bundle_dir)
    specs = [InputSpec.from_spec(s) for s in bundle.inputs]
    split = split_models(bundle, options.cut, options.head_precision)
    runs = [split, full_models(bundle)] if compare else [split]
    for models in runs:
        check_names(models, options.id_column)
    with _cache(options) as cache:
        data = load_dataset(input_path, specs, options.id_column)
        ray = None
        started = False
        reports = []
        try:
            for models in runs:
                needs_ray = bool(set(data.digests) - cache.present(models.identity, data.digests))
                if needs_ray and ray is None:
                    ray, started = start_session(options)
                try:
                    report = compute(models, data, cache, options, ray, on_block) if needs_ray else _all_cached(
                        models, data)
                except Exception as exc:  # noqa: BLE001 - only Ray's errors are re-raised as RunError
                    if ray is not None and isinstance(exc, ray.exceptions.RayError):
                        raise run_error(models.label, exc) from exc
                    raise
                reports.append(report)
                say(report.line())
        finally:
            if started and ray is not None:
                ray.shutdown()
        if output is not None:
            write_output(output, data, split, cache, options.id_column)
            say(f"split-batch: wrote {len(data.ids)} rows to {output}")
        result = BatchResult(reports, output, label=split.label)
        if compare:
            task = str(bundle.plan.get("model", {}).get("task") or "")
            rows = agreement(list(cache.get_many(split.identity, data.digests)),
                             list(cache.get_many(runs[1].identity, data.digests)), split.outputs,
                             classifier=task == "classification")
            result.agreement = rows
        return result


def _all_cached(models: Models, data: Dataset) -> RunReport:
    unique = len(set(data.digests))
    return RunReport(models.label, models.identity, rows=len(data.digests), unique=unique, cached=unique)


def default_cache_dir() -> Path:
    """$SPLITINFER_CACHE/batch, else ~/.cache/splitinfer/batch (the trained weights' cache is beside it)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "splitinfer") / "batch"


class _cache:
    """The prediction cache of a run: --cache-dir's (default ~/.cache/splitinfer/batch), or with --no-cache a
    temporary one, deleted at the end (the output is still written from it)."""

    def __init__(self, options: BatchOptions):
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if options.use_cache:
            root = options.cache_dir.expanduser() if options.cache_dir else default_cache_dir()
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="split-batch-")
            root = Path(self._tmp.name)
        self.cache = PredictionCache(root / CACHE_FILE)

    def __enter__(self) -> PredictionCache:
        return self.cache

    def __exit__(self, *exc: object) -> None:
        self.cache.close()
        if self._tmp is not None:
            self._tmp.cleanup()
