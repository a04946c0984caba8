"""The cloud tier's tails on Ray Serve (`split-cloud serve --backend ray`): our gRPC front stays, the tails move.

Each served (model hash, cut) tail becomes one Serve application with one deployment, `TailReplica`: an
onnxruntime session (CUDA where the replica was given a GPU) behind `@serve.batch`, which batches the requests
of every device's stream (rows counted by `batch_size_fn`, up to `--max-batch`; `--max-wait-ms` is its
`batch_wait_timeout_s`). Serve's HTTP and gRPC proxies are off (`proxy_location="Disabled"`): Serve's proxy
has no TLS, so the front keeps mTLS, per-device identity, the bidi stream and its back-pressure, and calls
each tail through its `DeploymentHandle`.

`RayTail` stands in for the in-process DynamicBatcher in the servicer (same `submit`/`flush`/`idle`/`close`,
same exceptions), so per-request statuses are unchanged: Serve's back-pressure (`max_queued_requests`, from
`--max-queue`) is RESOURCE_EXHAUSTED, a dead replica's requests UNAVAILABLE, a tail failure INTERNAL, and every
handle call has a deadline (the request's, else `RayOptions.request_timeout_s`): DEADLINE_EXCEEDED, never hung.

Ray is imported lazily: without the [ray] extra, the in-process backend works and `--backend ray` fails with
one line naming the pip install.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from cloud_tier.batcher import BatcherClosedError, BatchResult, BatchRunError, DeadlineExceededError, QueueFullError
from cloud_tier.config import RayOptions, ServerConfig
from cloud_tier.executor import ModelRegistry, ServedTail, select_providers
from cloud_tier.rayinit import INSTALL_LINE, start_ray
from cloud_tier.stats import BATCH_SIZE_BUCKETS, ServerStats
from models.detect import apply_postprocess
from models.extras import MissingExtraError

log = logging.getLogger(__name__)

APP_PREFIX = "splitinfer-tail-"
STOP_TIMEOUT_S = 30.0  # stop()'s deadline for Serve's deletions and shutdown
SERVE_CONTROLLER, SERVE_NAMESPACE = "SERVE_CONTROLLER_ACTOR", "serve"  # Serve's controller actor, by name


def require_ray() -> tuple[ModuleType, ModuleType]:
    """(ray, ray.serve), or MissingExtraError naming the pip install."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise MissingExtraError(f"--backend ray needs Ray Serve, which is not installed: {INSTALL_LINE}") from exc
    return ray, serve


class ReplicaUnavailableError(BatcherClosedError):
    """The replica running this request died or could not be reached (answered UNAVAILABLE)."""


def app_name(tail: ServedTail) -> str:
    """The Serve application (and deployment) name of a tail: label and cut, in Serve's allowed characters."""
    raw = f"{tail.label or tail.model}-{tail.cut}"
    return APP_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def _rows(items: Sequence[Mapping[str, Any]]) -> int:
    """@serve.batch's batch_size_fn: a batch's size is its rows, not its requests."""
    return sum(int(i["rows"]) for i in items)


def _batched(fn: Any) -> Any:
    """@serve.batch with rows as the batch size (limits set per replica); `fn` itself without Ray installed."""
    try:
        from ray import serve
    except ImportError:
        return fn  # the replica only ever runs under Ray
    return serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, batch_size_fn=_rows)(fn)


def deployment_options(opts: RayOptions, max_batch: int, max_queue: int) -> dict[str, Any]:
    """Serve's options of one tail deployment (also used by benchmarks/batching.py's plain Serve deployment).

    `@serve.batch` batches are capped by the replica's max_ongoing_requests, so a replica takes max_batch x
    (max_concurrent_batches + 1) requests: full batches, and one more batch forming while they run. The
    autoscaler aims at `target_ongoing_requests` per replica (default max_batch: a replica with more than one full
    batch in hand, running or waiting, gets help), counted over `look_back_period_s`, after `upscale_delay_s`.
    """
    target = opts.target_ongoing_requests or float(max_batch)
    autoscaling: dict[str, Any] = {
        "min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
        "initial_replicas": max(1, opts.min_replicas), "target_ongoing_requests": target,
        "upscale_delay_s": opts.upscale_delay_s, "downscale_delay_s": opts.downscale_delay_s}
    if opts.look_back_period_s is not None:
        autoscaling["look_back_period_s"] = opts.look_back_period_s
    if opts.metrics_interval_s is not None:
        autoscaling["metrics_interval_s"] = opts.metrics_interval_s
    return {"max_ongoing_requests": max(max_batch * (opts.max_concurrent_batches + 1), int(math.ceil(target)) + 1),
            "max_queued_requests": max_queue, "autoscaling_config": autoscaling,
            "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
            "health_check_period_s": 2.0, "health_check_timeout_s": 10.0}


def _name(value: Any) -> str:
    """An enum's value (Serve's states), else the text."""
    return str(getattr(value, "value", value))


def serve_deployments(details: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Our deployments in Serve's instance details (ServeInstanceDetails as a dict): per deployment its status,
    the autoscaler's target replica count, and its live replicas by state."""
    out: dict[str, dict[str, Any]] = {}
    for name, app in (details.get("applications") or {}).items():
        if not str(name).startswith(APP_PREFIX):
            continue
        for dep_name, dep in (app.get("deployments") or {}).items():
            out[dep_name] = {"status": _name(dep.get("status", "")),
                             "target_replicas": int(dep.get("target_num_replicas") or 0),
                             "replicas": dict(Counter(_name(r.get("state")) for r in dep.get("replicas") or []))}
    return out


def deployment_rows(snapshot: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The dashboard's rows of a RayBackend.snapshot(), sorted by model and cut."""
    rows = []
    for name, d in snapshot.items():
        replicas = d.get("replicas") or {}
        rows.append({"deployment": name, "model": d.get("model", ""), "model_sha256": d.get("model_sha256", ""),
                     "cut": d.get("cut", ""), "status": d.get("status", ""),
                     "replicas_running": int(replicas.get("RUNNING", 0)), "replicas_target": d.get("target_replicas"),
                     "replicas_other": {k: v for k, v in sorted(replicas.items()) if k != "RUNNING" and v},
                     "ongoing": d.get("outstanding", 0), "batches": d.get("batches", 0),
                     "recent_batch_mean": d.get("recent_batch_mean"), "recent_batch_max": d.get("recent_batch_max"),
                     "status_age_s": d.get("status_age_s"), "status_error": d.get("status_error", "")})
    return sorted(rows, key=lambda r: (r["model"], r["model_sha256"], r["cut"]))


# -- the replica (runs in a Ray worker) ------------------------------------------------------------------


class TailReplica:
    """One onnxruntime session of one tail; `__call__` takes {"feeds", "rows"} and answers {"outputs",
    "compute_ms", "batch_rows", "first"} or {"error"}. Made a Serve deployment by `RayBackend.deploy`."""

    def __init__(self, model: bytes, *, max_batch: int, wait_s: float, threads: int, providers: list[str],
                 inputs: Sequence[str] = ()):
        import onnxruntime as ort  # the worker's own: the [ray] extra keeps the package the node has
        import ray

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        gpu = bool(ray.get_gpu_ids())  # CUDA only where Serve gave this replica a GPU
        usable = [p for p in providers if p in ort.get_available_providers()
                  and (gpu or p not in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))]
        self.session = ort.InferenceSession(model, opts, providers=usable or ["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        have = sorted(i.name for i in self.session.get_inputs())
        if inputs and have != sorted(inputs):  # the front checks requests against the bundle's cut tensors
            raise ValueError(f"tail inputs {have} do not match the cut's tensors {sorted(inputs)}")
        self.run_batch.set_max_batch_size(max_batch)  # type: ignore[attr-defined]
        self.run_batch.set_batch_wait_timeout_s(wait_s)  # type: ignore[attr-defined]

    async def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return await self.run_batch(item)  # type: ignore[no-any-return]

    def pid(self) -> int:
        """The replica's worker process id (tests kill it)."""
        return os.getpid()

    def providers(self) -> list[str]:
        """The onnxruntime providers this replica's session uses."""
        return list(self.session.get_providers())

    @_batched
    async def run_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One session run over the batch's concatenation (a thread, so health checks go on); a failing batch
        is re-run request by request so each failure is its own."""
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        rows = _rows(items)
        signatures = {tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(i["feeds"].items())) for i in items}
        try:
            if len(items) > 1 and len(signatures) > 1:
                raise ValueError("mixed input shapes in one batch")
            feeds = items[0]["feeds"] if len(items) == 1 else {
                k: np.concatenate([i["feeds"][k] for i in items], axis=0) for k in items[0]["feeds"]}
            outs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
            if len(items) > 1 and any(v.ndim == 0 or v.shape[0] != rows for v in outs.values()):
                raise ValueError("an output without the batch dimension")
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types: each request gets its answer
            if len(items) > 1:
                return [r for i in items for r in self._run([i])]
            return [{"error": f"{type(exc).__name__}: {exc}", "memory": isinstance(exc, MemoryError)}]
        compute_ms = 1000 * (time.perf_counter() - start)
        answers, offset = [], 0
        for n, item in enumerate(items):
            part = outs if len(items) == 1 else {k: v[offset: offset + item["rows"]] for k, v in outs.items()}
            offset += item["rows"]
            answers.append({"outputs": part, "compute_ms": compute_ms, "batch_rows": rows, "first": n == 0})
        return answers


# -- the front's side: one RayTail per tail, in place of the in-process batcher ----------------------------------


RECENT_S = 60.0  # the dashboard's "recent" batch sizes: batches of the last minute
RECENT_MAX = 4096  # ... and at most this many of them (a bound on the memory, whatever the rate)


@dataclass
class DeploymentStats:
    """What the front sees of one deployment: requests sent and not answered, and the batch sizes (rows) its
    replicas ran, as each batch's first answer reports them (all time, and the last RECENT_S seconds)."""

    name: str
    model: str = ""  # the tail's label (model name, or name@hash when two models share it)
    model_sha256: str = ""
    cut: str = ""
    outstanding: int = 0
    batches: int = 0
    batched_rows: int = 0
    sizes: Counter[float] = field(default_factory=Counter)
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=RECENT_MAX))
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def batch(self, rows: int) -> None:
        """Count one replica batch of `rows` rows."""
        bucket = next((b for b in BATCH_SIZE_BUCKETS if rows <= b), math.inf)
        with self.lock:
            self.batches += 1
            self.batched_rows += rows
            self.sizes[bucket] += 1
            self.recent.append((self.clock(), rows))

    def snapshot(self) -> dict[str, Any]:
        """A copy, in ServerStats.snapshot()'s batch keys, plus the recent batches' count, mean and max rows."""
        with self.lock:
            since = self.clock() - RECENT_S
            recent = [rows for t, rows in self.recent if t >= since]
            return {"model": self.model, "model_sha256": self.model_sha256, "cut": self.cut,
                    "outstanding": self.outstanding, "batches": self.batches, "batched_rows": self.batched_rows,
                    "batch_size_histogram": {str(k): v for k, v in sorted(self.sizes.items())},
                    "recent_batches": len(recent),
                    "recent_batch_mean": sum(recent) / len(recent) if recent else None,
                    "recent_batch_max": max(recent) if recent else None}


@dataclass
class ServeState:
    """Serve's view of our deployments at one reading: per deployment its status, target replica count and
    replicas by state; `error` says why the last reading failed (the values are then the previous ones)."""

    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    read_at: float | None = None  # clock time of the last successful reading
    error: str = ""


class ServeStatePoller:
    """Reads Serve's state (`fetch`, which has its own deadline) at most every `every_s` seconds: scrapes and
    dashboard polls between two readings get the last one, so their rate never reaches Serve's controller;
    one reading at a time (a caller that finds one under way gets the last reading)."""

    def __init__(self, fetch: Callable[[], dict[str, dict[str, Any]]], every_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self._fetch, self._every_s, self._clock = fetch, every_s, clock
        self._state = ServeState()
        self._tried_at: float | None = None
        self._lock = threading.Lock()

    def age(self, state: ServeState) -> float:
        """Seconds since `state` was read."""
        return self._clock() - (state.read_at if state.read_at is not None else -math.inf)

    def get(self) -> ServeState:
        """The last reading, renewed first when it is older than `every_s`."""
        now = self._clock()
        if (self._tried_at is None or now - self._tried_at >= self._every_s) and self._lock.acquire(blocking=False):
            try:
                self._tried_at = now
                try:
                    self._state = ServeState(self._fetch(), self._clock())
                except Exception as exc:  # noqa: BLE001 - a scrape must not fail because Serve is busy or gone
                    log.debug("reading Serve's state failed: %s", exc)
                    self._state = ServeState(self._state.deployments, self._state.read_at,
                                             f"{type(exc).__name__}: {exc}")
            finally:
                self._lock.release()
        return self._state


class RayTail:
    """The servicer's batcher for one tail on Serve: each request is one handle call with a deadline."""

    def __init__(self, tail: ServedTail, handle: Any, stats: ServerStats, deployment: DeploymentStats,
                 timeout_s: float):
        self.name = f"{tail.label}/{tail.cut}"
        self._tail = tail
        self._handle = handle
        self._stats = stats
        self._deployment = deployment
        self._timeout_s = timeout_s
        self._held: set[asyncio.Future] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    def submit(self, feeds: Mapping[str, np.ndarray], rows: int, deadline_s: float | None = None) -> asyncio.Future:
        """Send one request to the deployment; the future resolves to a BatchResult (or the batcher's errors)."""
        if self._closed:
            raise BatcherClosedError(f"{self.name}: server stopped before this request ran")
        fut = asyncio.ensure_future(self._call(dict(feeds), rows, deadline_s))
        self._held.add(fut)
        self._idle.clear()
        fut.add_done_callback(self._answered)
        return fut

    def _answered(self, fut: asyncio.Future) -> None:
        self._held.discard(fut)
        if not self._held:
            self._idle.set()

    def flush(self) -> None:
        """Nothing is held back in the front: Serve's batch window is short."""

    async def idle(self) -> None:
        """Wait until every submitted request has its answer."""
        await self._idle.wait()

    async def close(self) -> None:
        """Requests still waiting on Serve get BatcherClosedError."""
        self._closed = True
        for fut in list(self._held):
            fut.cancel()
        await asyncio.gather(*self._held, return_exceptions=True)

    async def _call(self, feeds: dict[str, np.ndarray], rows: int, deadline_s: float | None) -> BatchResult:
        from ray import exceptions as ray_exc
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

        timeout = self._timeout_s if deadline_s is None else min(deadline_s, self._timeout_s)
        start = time.perf_counter()
        with self._deployment.lock:
            self._deployment.outstanding += 1
        response = None
        try:
            response = self._handle.remote({"feeds": feeds, "rows": rows})
            answer = await asyncio.wait_for(_awaited(response), timeout)
        except asyncio.TimeoutError:
            if response is not None:
                response.cancel()
            raise DeadlineExceededError(f"{self.name}: no answer from Ray Serve within {timeout:.1f} s") from None
        except asyncio.CancelledError:
            if response is not None:
                response.cancel()
            if self._closed:  # close(): answered like the in-process batcher's queued requests
                raise BatcherClosedError(f"{self.name}: server stopped before this request ran") from None
            raise
        except BackPressureError as exc:
            raise QueueFullError(f"{self.name}: Ray Serve queue full ({exc}); retry later or run locally") from None
        except (ray_exc.RayActorError, ray_exc.ActorUnavailableError, ray_exc.WorkerCrashedError,
                ray_exc.NodeDiedError, RequestCancelledError, DeploymentUnavailableError) as exc:
            raise ReplicaUnavailableError(
                f"{self.name}: the Ray Serve replica failed ({type(exc).__name__}); retry later or run locally"
            ) from None
        except Exception as exc:  # noqa: BLE001 - anything else Serve raises is this request's failure
            if isinstance(getattr(exc, "cause", None), BackPressureError):
                raise QueueFullError(f"{self.name}: Ray Serve queue full; retry later or run locally") from None
            raise BatchRunError(f"{self.name}: Ray Serve call failed: {type(exc).__name__}: {exc}") from None
        finally:
            with self._deployment.lock:
                self._deployment.outstanding -= 1
        if "error" in answer:
            raise BatchRunError(f"{self.name}: tail run failed: {answer['error']}")
        if answer["first"]:
            self._stats.batch(answer["batch_rows"])
            self._deployment.batch(answer["batch_rows"])
        outputs = answer["outputs"]
        if self._tail.postprocess is not None:
            outputs = await asyncio.to_thread(apply_postprocess, outputs, self._tail.postprocess)
        total_ms = 1000 * (time.perf_counter() - start)
        return BatchResult(outputs, max(0.0, total_ms - answer["compute_ms"]), answer["compute_ms"],
                           answer["batch_rows"])


async def _awaited(response: Any) -> Any:
    return await response


# -- the backend: deploys the tails, hands the servicer its batchers, reports replicas -------------------------


def _within(work: Callable[[], None], timeout_s: float) -> bool:
    """Run `work` on a daemon thread and wait at most `timeout_s` for it: whether it finished (its exceptions are
    logged). For Ray calls that wait forever on a cluster that is gone."""
    def run() -> None:
        try:
            work()
        except Exception:  # noqa: BLE001 - stopping goes on
            log.exception("stopping Ray: %s failed", getattr(work, "__name__", work))

    worker = threading.Thread(target=run, name="ray-stop", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return not worker.is_alive()


class RayBackend:
    """Deploys every tail of a registry on Ray Serve (`deploy`), gives the servicer its `batchers`, reports
    per-deployment replicas (running / target), requests outstanding and batch sizes for /metrics (`snapshot`)
    and the dashboard (`rows`), and takes the applications down (`stop`).

    Serve's state is read from its controller at most every `status_every_s` seconds, each reading with a
    deadline of `status_timeout_s`: what /metrics and the dashboard cost Serve does not grow with their polling.
    """

    def __init__(self, options: RayOptions, config: ServerConfig, *, status_every_s: float = 2.0,
                 status_timeout_s: float = 2.0):
        self.ray, self.serve = require_ray()
        self.options = options
        self.config = config
        self.handles: dict[tuple[str, str], Any] = {}
        self.names: dict[tuple[str, str], str] = {}
        self.deployments: dict[str, DeploymentStats] = {}
        self.status_timeout_s = status_timeout_s
        self.serve_state = ServeStatePoller(self._read_serve, every_s=status_every_s)
        self._controller: Any = None
        self._started_ray = False
        self._connected = False

    def connect(self) -> None:
        """Join the cluster at `options.address`, or start a local one on loopback; start Serve without proxies."""
        ray, serve = self.ray, self.serve
        if self._connected:
            return
        self._started_ray = start_ray(ray, self.options.address)  # or a private cluster on loopback
        serve.start(proxy_location="Disabled")  # no HTTP or gRPC proxy: only handles reach the tails
        self._connected = True

    def deploy(self, registry: ModelRegistry) -> None:
        """One Serve application per served tail (waits until each is running)."""
        self.connect()
        cfg, opts, serve = self.config, self.options, self.serve
        providers = list(cfg.providers) or select_providers(cfg.prefer_gpu)
        if opts.num_gpus > 0 and "CUDAExecutionProvider" not in providers and cfg.prefer_gpu:
            providers = ["CUDAExecutionProvider", *providers]
        max_batch = cfg.max_batch
        for tail in registry.served():
            name = app_name(tail)
            model = tail.executor.path.read_bytes()  # shipped in the object store: workers need no shared disk
            with warnings.catch_warnings():  # metrics_interval_s (set by tests only) is marked deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                deployment = serve.deployment(TailReplica).options(
                    name=name, **deployment_options(opts, max_batch, cfg.max_queue))
                app = deployment.bind(model, max_batch=max_batch, wait_s=cfg.max_wait_ms / 1000.0,
                                      threads=cfg.intra_op_threads, providers=providers,
                                      inputs=[t.name for t in tail.inputs])
                handle = serve.run(app, name=name, route_prefix=None)
            self.handles[tail.key] = handle
            self.names[tail.key] = name
            self.deployments[name] = DeploymentStats(name, model=tail.label or tail.model,
                                                     model_sha256=tail.model_sha256, cut=tail.cut)
            log.info("Ray Serve deployment %s: %s cut %s (replicas %d..%d, max_batch %d)", name, tail.label,
                     tail.cut, opts.min_replicas, opts.max_replicas, max_batch)

    def batchers(self, registry: ModelRegistry, stats: ServerStats) -> dict[tuple[str, str], RayTail]:
        """The servicer's batcher per tail key (on the server's event loop)."""
        return {t.key: RayTail(t, self.handles[t.key], stats, self.deployments[self.names[t.key]],
                               self.options.request_timeout_s) for t in registry.served()}

    def _read_serve(self) -> dict[str, dict[str, Any]]:
        """Per deployment of ours: Serve's status, its target replica count and its live replicas by state (one
        call to Serve's controller, with a deadline; what `serve status` shows, plus the autoscaler's target)."""
        ray = self.ray
        if self._controller is None:
            self._controller = ray.get_actor(SERVE_CONTROLLER, namespace=SERVE_NAMESPACE)
        try:
            details = ray.get(self._controller.get_serve_instance_details.remote(), timeout=self.status_timeout_s)
        except Exception:
            self._controller = None  # looked up again next time (the controller may have been restarted)
            raise
        return serve_deployments(details)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per deployment: what the front counted (requests outstanding, batch sizes) and Serve's state (replicas
        by state, target replicas, status, seconds since it was read): what /metrics shows."""
        state = self.serve_state.get()
        age = None if state.read_at is None else max(0.0, self.serve_state.age(state))
        return {name: {**d.snapshot(), "replicas": {}, "target_replicas": None, "status": "",
                       **state.deployments.get(name, {}), "status_age_s": age, "status_error": state.error}
                for name, d in self.deployments.items()}

    def rows(self) -> list[dict[str, Any]]:
        """The dashboard's Deployments table: one row per (model hash, cut) deployment."""
        return deployment_rows(self.snapshot())

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Delete our applications; disconnect from Ray when this backend connected, and shut Serve down too
        when the cluster was its own (a cluster joined by --ray-address keeps Serve for its other apps).

        Serve's calls wait on its controller, which never answers when the cluster died first: they run under a
        deadline (`timeout_s` for Serve's calls, as much again for ray.shutdown), and past it the node stops
        anyway, with a warning."""
        names = list(self.names.values())
        self.names.clear()
        self.handles.clear()
        own_serve = self._started_ray and not self.options.address  # on a shared cluster, others' apps stay up

        def release() -> None:
            for name in names:
                try:
                    self.serve.delete(name, _blocking=True)
                except Exception:  # noqa: BLE001 - stopping goes on
                    log.exception("deleting the Serve application %s failed", name)
            if own_serve:
                try:
                    self.serve.shutdown()
                except Exception:  # noqa: BLE001 - stopping goes on
                    log.exception("shutting Ray Serve down failed")

        if not _within(release, timeout_s):
            log.warning("Ray Serve did not answer within %.0f s while stopping (is the cluster gone?); "
                        "stopping without it", timeout_s)
        if self._started_ray:
            self._started_ray = False
            if not _within(self.ray.shutdown, timeout_s):
                log.warning("ray.shutdown() did not return within %.0f s; leaving it behind", timeout_s)
        self._connected = False
