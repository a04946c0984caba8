"""The local inference API of `split-agent serve`: gRPC (protos/local.proto) on a Unix socket or loopback TCP.

Applications on the device send inputs as `splitinfer.v1.Tensor`s (protos/codec.py); the agent runs them (split
with the cloud, or on the device) and answers with the outputs, `served_by`, the cut and the timing breakdown.

- Every input is checked against the bundle's input specs from its metadata (names, dtype, shape, declared
  size) before anything is decoded or allocated; a bad one gets INVALID_ARGUMENT naming the expected specs
  (RESOURCE_EXHAUSTED when it is over the size limit).
- At most `max_requests` requests are in flight (all calls together); beyond it: RESOURCE_EXHAUSTED. The slot is
  freed when the agent finishes the request, not when a caller gives up.
- Every request has a deadline: the caller's, capped by `[service] request_timeout_s` (which applies alone when
  the caller set none); past it the call ends DEADLINE_EXCEEDED (the agent still finishes the request).
- `drain()`: new requests get UNAVAILABLE "draining"; those accepted finish and are answered.
- InferStream pipelines (answers as they finish); with the metadata "splitinfer-serial: 1" (LocalClient.infer's
  long-lived streams) it takes one request at a time on the call's own thread, as Infer does, without its
  per-call setup. Requests may carry their own `timeout_ms`.

Access control: on the Unix socket, its file mode and group (`[service] socket_mode`, default 0660: the service's
user and group); on TCP nothing but the loopback restriction, so TCP stays on loopback unless allow_remote.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from edge_agent.config import ServiceConfig
from edge_agent.local_client import LOCAL_HTTP2_OPTIONS, MAX_STREAMS, SERIAL_METADATA
from edge_agent.results import SPLIT, AgentClosedError, InferenceResult, InFlightLimitError
from edge_agent.runtime import InputError
from models.manifest import TensorSpec
from protos import codec, serde
from protos import inference_pb2 as pb
from protos import local_pb2 as lpb
from protos import local_pb2_grpc as lpb_grpc

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent
    from edge_agent.control import ControlLink

__all__ = ["LocalApi", "LocalApiError", "describe_specs"]

log = logging.getLogger("splitinfer.edge.local")

DRAINING = "draining: the agent service is stopping and takes no new requests"
_OK = serde.status_number(grpc.StatusCode.OK)


class LocalApiError(RuntimeError):
    """The local API cannot listen (a bad or busy socket path, a port in use)."""


def describe_specs(specs: tuple[TensorSpec, ...] | list[TensorSpec]) -> str:
    """The model's inputs in one line, e.g. "input float32 [N, 3, 32, 32]"."""
    return "; ".join(f"{s.name} {s.dtype} [{', '.join('N' if d is None else str(d) for d in s.shape)}]"
                     for s in specs)


class _Refused(Exception):
    """A request refused before it reached the agent: its status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _timing(result: InferenceResult) -> lpb.LocalTiming:
    t = result.timing
    return lpb.LocalTiming(queue_ms=t.queue_ms, head_ms=t.head_ms, encode_ms=t.encode_ms, network_ms=t.network_ms,
                           cloud_queue_ms=t.cloud_queue_ms, tail_ms=t.tail_ms, total_ms=t.total_ms)


class _Servicer(lpb_grpc.LocalInferenceServicer):
    def __init__(self, api: LocalApi):
        self.api = api

    def Infer(self, request: lpb.LocalInferRequest, context: grpc.ServicerContext) -> lpb.LocalInferResponse:
        api = self.api
        try:
            fut = api.start_request(request, here=True)
        except _Refused as exc:
            context.abort(exc.code, exc.message)
        try:
            result = fut.result(timeout=api.timeout_for(context, request))
        except futures.TimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no result within the request's deadline ({api.timeout_for(context, request):.3f} s)")
        except Exception as exc:  # the model failed on the device
            context.abort(grpc.StatusCode.INTERNAL, f"inference failed: {exc}")
        return api.answer(request.request_id, result)

    def InferStream(self, request_iterator: Iterator[lpb.LocalInferRequest],
                    context: grpc.ServicerContext) -> Iterator[lpb.LocalInferResponse]:
        if (SERIAL_METADATA, "1") in context.invocation_metadata():
            return self.api.serial(request_iterator, context)
        return self.api.stream(request_iterator, context)

    def Health(self, request: lpb.HealthRequest, context: grpc.ServicerContext) -> lpb.HealthResponse:
        return self.api.health()


class LocalApi:
    """The local gRPC server over an EdgeAgent; `start()` binds and serves, `drain()` then `stop()` end it."""

    def __init__(self, agent: EdgeAgent, service: ServiceConfig, *, control: ControlLink | None = None):
        self.agent = agent
        self.control = control
        self.service = service
        self.specs = tuple(agent.bundle.inputs)
        self.max_requests = service.max_requests or agent.config.max_in_flight
        self.max_bytes = service.max_message_mb * 1024 * 1024
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._draining = False
        self._ids = itertools.count(1)
        self._server: grpc.Server | None = None
        self._socket_path: Path | None = None
        self._socket_ino: tuple[int, int] | None = None
        self.address = ""  # "unix:/path" or "host:port", set by start()
        self.answered = 0

    # -- settings that SIGHUP may change ---------------------------------------------------------

    def update(self, service: ServiceConfig) -> None:
        """Apply the run-time keys of a reloaded [service] (max_requests, request_timeout_s, max_message_mb for
        checks; the listening address and socket stay until a restart)."""
        with self._lock:
            self.service = service
            self.max_requests = service.max_requests or self.agent.config.max_in_flight
            self.max_bytes = service.max_message_mb * 1024 * 1024

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> LocalApi:
        """Bind (the socket, safely; or loopback TCP) and serve; LocalApiError when it cannot listen."""
        svc = self.service
        limit = svc.max_message_mb * 1024 * 1024 + 64 * 1024
        # Each LocalClient keeps up to MAX_STREAMS long-lived streams, each holding a server thread while open:
        # room for several clients' streams besides max_requests unary calls (requests stay bounded by the slots).
        workers = self.max_requests + 8 + 4 * MAX_STREAMS
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitinfer-local"),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0), *LOCAL_HTTP2_OPTIONS],
            maximum_concurrent_rpcs=workers,
        )
        lpb_grpc.add_LocalInferenceServicer_to_server(_Servicer(self), server)
        if svc.listen:
            try:
                port = server.add_insecure_port(svc.listen)
            except RuntimeError as exc:
                raise LocalApiError(f"cannot listen on {svc.listen!r}: {exc}") from None
            if port == 0:
                raise LocalApiError(f"cannot listen on {svc.listen!r} (address in use or not local)")
            host = svc.listen.rsplit(":", 1)[0]
            self.address = f"{host}:{port}"
        else:
            path = Path(svc.socket)
            prepare_socket_path(path)
            old = os.umask(0o177)  # the socket is born 0600, never wider than asked for, then chmod'ed below
            try:
                bound = server.add_insecure_port(f"unix:{path}")
            except RuntimeError as exc:
                raise LocalApiError(f"cannot listen on the socket {path}: {exc}") from None
            finally:
                os.umask(old)
            if bound == 0:
                raise LocalApiError(f"cannot listen on the socket {path}")
            self._socket_path = path
            self.address = f"unix:{path}"
        server.start()
        if self._socket_path is not None:
            st = os.lstat(self._socket_path)
            if not stat.S_ISSOCK(st.st_mode):
                server.stop(None)
                raise LocalApiError(f"{self._socket_path} is not our socket after binding; refusing to chmod it")
            os.chmod(self._socket_path, svc.socket_permissions)
            self._socket_ino = (st.st_dev, st.st_ino)
        self._server = server
        log.info("local inference API listening on %s", self.address)
        return self

    @property
    def in_flight(self) -> int:
        """Requests accepted and not finished by the agent."""
        return self._in_flight

    @property
    def draining(self) -> bool:
        """Whether drain() was called."""
        return self._draining

    def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE "draining"); those accepted go on."""
        with self._lock:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no accepted request is unfinished; whether that happened within `timeout`."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def stop(self, grace: float = 2.0) -> None:
        """Stop the server (answers being written get `grace` seconds) and remove the socket file if still ours."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait(grace + 1.0)
        path, ino = self._socket_path, self._socket_ino
        if path is not None and ino is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == ino:
                    path.unlink()

    # -- requests -----------------------------------------------------------------------------------

    def timeout_for(self, context: grpc.ServicerContext, request: lpb.LocalInferRequest | None = None) -> float:
        """Seconds this request may still wait: the call's deadline and the request's own timeout_ms, capped by
        request_timeout_s."""
        cap = self.service.request_timeout_s
        if request is not None and request.timeout_ms:
            cap = min(cap, request.timeout_ms / 1000.0)
        left = context.time_remaining()
        return cap if left is None else max(0.0, min(cap, left))

    def _refuse_spec(self, exc: Exception, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> _Refused:
        return _Refused(code, f"{exc}; the model expects: {describe_specs(self.specs)}")

    def start_request(self, request: lpb.LocalInferRequest, *, here: bool = False) -> Future[InferenceResult]:
        """Check the request, take a slot and hand it to the agent (`here`: its head runs on this thread, for a
        unary call that waits anyway); _Refused with the status otherwise."""
        if self._draining:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, DRAINING)
        try:  # metadata only: nothing is decoded or allocated before every tensor passed
            inputs = codec.decode_all(request.inputs, self.specs, max_bytes=self.max_bytes)
        except codec.TensorError as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.status == codec.RESOURCE_EXHAUSTED else \
                grpc.StatusCode.INVALID_ARGUMENT
            raise self._refuse_spec(exc, code) from None
        with self._lock:
            if self._draining:
                raise _Refused(grpc.StatusCode.UNAVAILABLE, DRAINING)
            if self._in_flight >= self.max_requests:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self._in_flight} local requests are in flight, the limit ([service] max_requests) "
                               f"is {self.max_requests}; retry later")
            self._in_flight += 1
        try:
            fut = (self.agent.start_here if here else self.agent.submit)(inputs, block=False)
        except BaseException as exc:
            self._finished(None)
            if isinstance(exc, InputError):
                raise self._refuse_spec(exc) from None
            if isinstance(exc, InFlightLimitError):
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            if isinstance(exc, AgentClosedError):
                raise _Refused(grpc.StatusCode.UNAVAILABLE, DRAINING) from None
            raise
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, fut: object) -> None:
        with self._idle:
            self._in_flight -= 1
            if fut is not None:
                self.answered += 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def answer(self, request_id: str, result: InferenceResult) -> lpb.LocalInferResponse:
        """The response message of one result (outputs in fp32, lossless)."""
        return lpb.LocalInferResponse(
            request_id=request_id, outputs=[codec.encode(name, arr) for name, arr in result.outputs.items()],
            served_by=result.served_by, cut=result.cut, timing=_timing(result),
            fallback_reason=result.fallback_reason or "",
        )

    def serial(self, requests: Iterator[lpb.LocalInferRequest],
               context: grpc.ServicerContext) -> Iterator[lpb.LocalInferResponse]:
        """InferStream of a caller that waits for each answer before it sends the next request (metadata
        SERIAL_METADATA "1": LocalClient.infer's streams): each request runs on the call's own thread, as a unary
        call does, answered in order, with no other thread woken on the way; the same checks, slots and deadlines
        as Infer (a deadline passed: a DEADLINE_EXCEEDED status, the stream goes on). Ends when the caller closes
        it, or after an answer once draining."""
        for req in requests:
            rid = req.request_id
            try:
                fut = self.start_request(req, here=True)
            except _Refused as exc:
                yield _status(rid, exc.code, exc.message)
            else:
                wait = self.timeout_for(context, req)
                if futures.wait([fut], timeout=wait).done:  # a result, or the model's failure as INTERNAL
                    yield self._outcome(rid, fut)
                else:
                    yield _status(rid, grpc.StatusCode.DEADLINE_EXCEEDED, f"no result within {wait:.3f} s")
            if self._draining:
                return

    def stream(self, requests: Iterator[lpb.LocalInferRequest],
               context: grpc.ServicerContext) -> Iterator[lpb.LocalInferResponse]:
        """InferStream: a reader thread takes requests as they come, answers leave as they finish.

        Requests go to agent workers, so pipelined requests overlap (a caller that waits for each answer does
        better on `serial`: no reader or worker thread woken).

        A stream holds at most max_requests unanswered requests: past that the reader waits for the caller to
        read answers (flow control), so neither side's memory grows without bound. Each request has its own
        deadline (request_timeout_s, capped by the call's and by the request's timeout_ms)."""
        out: queue.Queue[Any] = queue.Queue()
        window = threading.BoundedSemaphore(max(1, self.max_requests))
        end = object()
        pending: dict[str, float] = {}  # request id -> its deadline (monotonic)
        lock = threading.Lock()
        seq = itertools.count(1)

        def put(resp: lpb.LocalInferResponse) -> None:
            with lock:  # out.put under the lock: "nothing pending and nothing queued" is then one fact
                if resp.request_id not in pending:
                    return  # already answered (its deadline passed)
                del pending[resp.request_id]
                out.put(resp)

        def reader() -> None:
            try:
                for req in requests:
                    rid = req.request_id or f"r{next(seq)}"
                    while not window.acquire(timeout=0.5):
                        if not context.is_active():
                            return
                    with lock:
                        if rid in pending:
                            out.put(_status(rid, grpc.StatusCode.INVALID_ARGUMENT,
                                            f"request_id {rid!r} is already in flight on this stream"))
                            continue
                        pending[rid] = time.monotonic() + self.timeout_for(context, req)
                    try:
                        fut = self.start_request(req)
                    except _Refused as exc:
                        put(_status(rid, exc.code, exc.message))
                        continue
                    fut.add_done_callback(functools.partial(self._deliver, put, rid))
            except grpc.RpcError:
                pass  # the caller went away
            except Exception:  # a bug here must end the stream, not hang it; logged with its traceback
                log.exception("local stream reader failed")
            finally:
                out.put(end)

        threading.Thread(target=reader, name="splitinfer-local-stream", daemon=True).start()
        reading = True
        while True:
            with lock:
                if (not reading or self._draining) and not pending and out.empty():
                    return  # all answered; while draining the stream ends here, new requests are refused anyway
                nearest = min(pending.values(), default=None)
            wait = 0.5 if nearest is None else max(0.0, min(0.5, nearest - time.monotonic()))
            try:
                item = out.get(timeout=wait)
            except queue.Empty:
                if not context.is_active():
                    return
                now = time.monotonic()
                with lock:
                    late = [rid for rid, t in pending.items() if t <= now]
                    for rid in late:
                        del pending[rid]
                for rid in late:
                    window.release()
                    yield _status(rid, grpc.StatusCode.DEADLINE_EXCEEDED, "no result within the request's deadline")
                continue
            if item is end:
                reading = False
                continue
            window.release()
            yield item

    def _deliver(self, put: Callable[[lpb.LocalInferResponse], None], request_id: str,
                 fut: Future[InferenceResult]) -> None:
        put(self._outcome(request_id, fut))

    def _outcome(self, request_id: str, fut: Future[InferenceResult]) -> lpb.LocalInferResponse:
        exc = fut.exception()
        if exc is not None:
            return _status(request_id, grpc.StatusCode.INTERNAL, f"inference failed: {exc}")
        return self.answer(request_id, fut.result())

    def health(self) -> lpb.HealthResponse:
        """The service's state for Health: mode, cut, links, in flight, draining."""
        agent = self.agent
        control = self.control
        st = agent.stats()
        return lpb.HealthResponse(
            mode=st.mode, cut=st.cut, model=agent.bundle.model_name, cloud_connected=st.mode == SPLIT,
            control_connected=bool(control is not None and control.control.connected),
            in_flight=self._in_flight, draining=self._draining, mode_reason=str(st.extra.get("mode_reason", "")),
            input_specs=[describe_specs([s]) for s in self.specs],
        )


def _status(request_id: str, code: grpc.StatusCode, message: str) -> lpb.LocalInferResponse:
    return lpb.LocalInferResponse(request_id=request_id,
                                  status=pb.RequestStatus(code=serde.status_number(code), message=message))


def prepare_socket_path(path: Path) -> None:
    """Make `path` ready for bind: its folder exists (made 0750 if missing); an old socket there is removed only if
    it is a socket nobody answers on. Refuses symlinks (the path or its folder), other files, and a live socket."""
    folder = path.parent
    try:
        fst = os.lstat(folder)
    except FileNotFoundError:
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        fst = os.lstat(folder)
    if stat.S_ISLNK(fst.st_mode):
        raise LocalApiError(f"the socket's folder {folder} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(fst.st_mode):
        raise LocalApiError(f"the socket's folder {folder} is not a folder")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise LocalApiError(f"{path} is a symlink; refusing to follow it (remove it if it is not meant to be there)")
    if not stat.S_ISSOCK(st.st_mode):
        raise LocalApiError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # a stale socket of a process that is gone
            log.info("removed the stale socket %s", path)
            return
        except OSError as exc:
            raise LocalApiError(f"{path}: cannot tell whether another service uses it ({exc})") from None
    raise LocalApiError(f"{path}: another process is listening on it (is split-agent serve already running?)")


def ok_status(response: lpb.LocalInferResponse) -> bool:
    """Whether a stream answer carries a result (no status, or OK)."""
    return not response.HasField("status") or response.status.code == _OK
