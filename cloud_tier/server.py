"""CloudServer: the grpc.aio server (SplitInference + standard health) on its own thread and event loop.

It keeps ServerStats and RequestCounters (answered requests by model, cut and status, and a bounded per-device
view), which the node's /metrics and /api/fleet read.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from cloud_tier.config import HEALTH_SERVICE, ServerConfig, bind_refused
from cloud_tier.executor import ModelRegistry
from cloud_tier.servicer import SplitInferenceServicer
from cloud_tier.stats import ServerStats
from cloud_tier.tls import PeerGuard, ServerTls
from protos import inference_pb2_grpc as pb_grpc
from protos import serde
from protos.address import format_address
from protos.mqtt import DEVICE_ID_RE
from protos.serde import CloudReply, CloudRequest

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
_DEFAULTS = ServerConfig()


class ServerStartError(RuntimeError):
    """The server could not load its bundles or bind its port."""


UNKNOWN = "_unknown"  # label of requests for a (model, cut) this server does not serve
MAX_DEVICES_TRACKED = 4096  # the cloud-side per-device view is bounded: device ids come from clients


class RequestCounters:
    """Thread-safe answered-request counts by (model, cut, status code) and a bounded per-device cloud view.

    Label values are bounded: a (model, cut) the server does not serve counts as `_unknown`, and at most
    MAX_DEVICES_TRACKED valid device ids are tracked (later ones are only counted in `untracked_devices`).
    The model label is the served tail's (ServedTail.label: the name, with a short hash where two models share
    it); `resolve` maps a request to its (label, cut), None when nothing serves it (default: its model and cut).
    """

    def __init__(self, served: set[tuple[str, str]], max_devices: int = MAX_DEVICES_TRACKED,
                 resolve: Callable[[CloudRequest], tuple[str, str] | None] | None = None):
        self._served = frozenset(served)
        self._resolve = resolve or (lambda r: (r.model, r.cut))
        self._max_devices = max_devices
        self._lock = threading.Lock()
        # Every served (model, cut) has an OK series from the start, so rates work before the first request.
        self._by_cut: dict[tuple[str, str, str], int] = {(m, c, "OK"): 0 for m, c in sorted(self._served)}
        self._devices: dict[str, dict[str, float]] = {}
        self.untracked_devices = 0

    def record(self, request: CloudRequest, reply: CloudReply) -> None:
        """Count one answered (non-probe) request."""
        found = self._resolve(request)
        key = found if found is not None and found in self._served else (UNKNOWN, UNKNOWN)
        code = serde.status_name(reply.code)
        cloud_ms = reply.decode_ms + reply.queue_ms + reply.compute_ms
        with self._lock:
            k = (*key, code)
            self._by_cut[k] = self._by_cut.get(k, 0) + 1
            dev = self._devices.get(request.device_id)
            if dev is None:
                if len(self._devices) >= self._max_devices or not DEVICE_ID_RE.fullmatch(request.device_id):
                    self.untracked_devices += 1
                    return
                dev = self._devices[request.device_id] = {"requests": 0, "errors": 0, "cloud_ms_sum": 0.0,
                                                          "last_ts": 0.0}
            dev["requests"] += 1
            dev["errors"] += reply.code != serde.OK
            dev["cloud_ms_sum"] += cloud_ms
            dev["last_ts"] = time.time()

    def by_cut(self) -> dict[tuple[str, str, str], int]:
        """A copy of the counts by (model, cut, status code name)."""
        with self._lock:
            return dict(self._by_cut)

    def devices(self) -> dict[str, dict[str, float | None]]:
        """Per device id: requests, errors, mean cloud-side ms (decode + queue + compute), last request time."""
        with self._lock:
            return {
                d: {"requests": v["requests"], "errors": v["errors"], "last_ts": v["last_ts"],
                    "mean_ms": v["cloud_ms_sum"] / v["requests"] if v["requests"] else None}
                for d, v in self._devices.items()
            }


class _CountingServicer(SplitInferenceServicer):
    """The servicer, also counting each answered request by (model, cut, code) and by device."""

    def __init__(self, *args: Any, counters: RequestCounters, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.counters = counters

    async def _infer(self, request: CloudRequest, received_ns: int) -> CloudReply:
        reply = await super()._infer(request, received_ns)
        if not request.probe:
            self.counters.record(request, reply)
        return reply


class CloudServer:
    """Serves the tails of every bundle under `bundles_dir`; `start()` returns the bound port."""

    def __init__(
        self,
        bundles_dir: str | Path,
        host: str = _DEFAULTS.host,
        port: int = _DEFAULTS.port,
        *,
        max_batch: int = _DEFAULTS.max_batch,
        max_wait_ms: float = _DEFAULTS.max_wait_ms,
        max_queue: int = _DEFAULTS.max_queue,
        workers: int = _DEFAULTS.workers,
        intra_op_threads: int = _DEFAULTS.intra_op_threads,
        max_tensor_bytes: int = _DEFAULTS.max_tensor_bytes,
        max_message_bytes: int = _DEFAULTS.max_message_bytes,
        max_inflight_per_stream: int = _DEFAULTS.max_inflight_per_stream,
        prefer_gpu: bool = _DEFAULTS.prefer_gpu,
        pki_dir: str | Path | None = _DEFAULTS.pki_dir,
        insecure: bool = _DEFAULTS.insecure,
        insecure_remote: bool = _DEFAULTS.insecure_remote,
        providers: Sequence[str] = _DEFAULTS.providers,
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.bundles_dir = Path(bundles_dir)
        self.config = ServerConfig(
            host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, workers=workers,
            intra_op_threads=intra_op_threads, max_tensor_bytes=max_tensor_bytes, max_message_bytes=max_message_bytes,
            max_inflight_per_stream=max_inflight_per_stream, prefer_gpu=prefer_gpu, pki_dir=pki_dir,
            insecure=insecure, insecure_remote=insecure_remote, providers=tuple(providers),
            provider_options=dict(provider_options or {}),
        )
        self.tls: ServerTls | None = None  # mTLS credentials and revocation list (None when insecure)
        self.stats = ServerStats()
        self.counters: RequestCounters | None = None  # set once the bundles are loaded
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._server: grpc.aio.Server | None = None
        self._servicer: SplitInferenceServicer | None = None
        self._health: health_aio.HealthServicer | None = None
        self._stop_request: asyncio.Event | None = None
        self._pool: ThreadPoolExecutor | None = None
        # Where the tails run instead of in-process batchers (cloud_tier.ray_backend.RayBackend): set before start()
        self.tail_backend: Any = None

    @classmethod
    def from_config(cls, bundles_dir: str | Path, config: ServerConfig) -> CloudServer:
        """A server with every setting taken from `config`."""
        return cls(bundles_dir, **{f.name: getattr(config, f.name) for f in fields(config)})

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> int:
        """Load the bundles, bind, start serving on a background thread; return the port."""
        if self._thread is not None:
            raise RuntimeError("CloudServer.start() called twice")
        ready: Future[int] = Future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="cloud-server", daemon=True)
        self._thread.start()
        try:
            self.port = ready.result(timeout=timeout)
        except FutureTimeout as exc:
            raise ServerStartError(f"cloud server did not start within {timeout} s") from exc
        return self.port

    @property
    def address(self) -> str:
        """host:port clients dial ("[v6]:port" for an IPv6 host, which `parse_address` reads back)."""
        if self.port is None:
            raise RuntimeError("the server has no address before start()")
        return format_address(self.config.host, self.port)

    @property
    def insecure(self) -> bool:
        """Whether the tier serves plaintext and takes device ids from requests (--insecure)."""
        return self.config.insecure

    def reload_certificates(self) -> None:
        """New connections get server.pem/.key and ca.pem as they are now on disk (SIGHUP); safe in a handler."""
        if self.tls is not None:
            self.tls.reload()

    def drain(self, timeout: float = 30.0) -> None:
        """Health NOT_SERVING, refuse new requests (UNAVAILABLE), wait until accepted work is answered."""
        self._call(self._drain(), timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Graceful stop: drain (up to `grace` s), end open streams with UNAVAILABLE, stop the server."""
        if self._loop is None or self._stopped.is_set():
            return
        deadline = time.monotonic() + grace
        try:
            self._call(self._drain(), grace)
        except FutureTimeout:
            log.warning("drain did not finish within %.1f s; stopping anyway", grace)
        remaining = max(0.0, deadline - time.monotonic())
        self._call(self._shutdown(remaining), remaining + 10.0)
        assert self._thread is not None
        self._thread.join(timeout=remaining + 10.0)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> CloudServer:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the server thread ---------------------------------------------------------------------------

    def _call(self, coro: Any, timeout: float) -> Any:
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout=timeout)
        except FutureTimeout:
            fut.cancel()
            raise

    def _thread_main(self, ready: Future) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:  # surface startup failures to start() instead of a dead thread
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.exception("cloud server thread failed")
        finally:
            self._stopped.set()

    async def _serve(self, ready: Future) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._stop_request = asyncio.Event()
        if not cfg.insecure:
            try:
                self.tls = ServerTls(cfg.resolved_pki_dir())
            except (OSError, ValueError) as exc:  # missing folder, unreadable or malformed PEM files
                raise ServerStartError(str(exc)) from exc
        remote = self.tail_backend is not None  # the tails run elsewhere: the front loads no session of them
        registry = await self._loop.run_in_executor(
            None, lambda: ModelRegistry.load(self.bundles_dir, intra_op_threads=cfg.intra_op_threads,
                                             prefer_gpu=cfg.prefer_gpu and not remote,
                                             providers=None if remote else cfg.providers or None,
                                             provider_options=None if remote else cfg.resolved_provider_options(),
                                             load_sessions=not remote)
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="tail")
        batchers = None
        if self.tail_backend is not None:  # the tails on Ray Serve: deploy them, then batch through their handles
            await self._loop.run_in_executor(None, self.tail_backend.deploy, registry)
            batchers = self.tail_backend.batchers(registry, self.stats)

        def label(request: CloudRequest) -> tuple[str, str] | None:
            tail = registry.get(request.model, request.cut, request.model_sha256)
            return None if tail is None else (tail.label, tail.cut)

        self.counters = RequestCounters({(t.label, t.cut) for t in registry.served()}, resolve=label)
        self._servicer = _CountingServicer(registry, cfg, self._pool, self.stats, batchers, counters=self.counters)
        if self.tls is not None:
            self._servicer.guard = PeerGuard(self.tls.revocations, self.stats)
        self._health = health_aio.HealthServicer()
        server = grpc.aio.server(options=cfg.grpc_options())
        pb_grpc.add_SplitInferenceServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            bind = format_address(cfg.host, cfg.port)
            port = (server.add_insecure_port(bind) if self.tls is None
                    else server.add_secure_port(bind, self.tls.credentials()))
        except RuntimeError as exc:
            raise ServerStartError(bind_refused("the gRPC tier", cfg.host, cfg.port, "--port",
                                                f"cannot bind: {exc}")) from exc
        if port == 0:
            raise ServerStartError(bind_refused("the gRPC tier", cfg.host, cfg.port, "--port", "cannot bind"))
        await server.start()
        self._server = server
        for service in ("", HEALTH_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %d tails on %s:%d (%s)", len(registry.served()), cfg.host, port,
                 "INSECURE: plaintext, device ids from requests" if self.tls is None else f"mTLS, CA {self.tls.dir}")
        ready.set_result(port)
        await self._stop_request.wait()
        self._pool.shutdown(wait=True)

    async def _drain(self) -> None:
        assert self._health is not None and self._servicer is not None
        await self._health.enter_graceful_shutdown()
        await self._servicer.drain()

    async def _shutdown(self, grace: float) -> None:
        assert self._servicer is not None and self._server is not None and self._stop_request is not None
        await self._servicer.close_streams()
        await self._server.stop(grace)
        await self._servicer.close()
        self._stop_request.set()
