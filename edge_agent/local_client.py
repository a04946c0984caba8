"""`LocalClient`: an application's side of the agent service's local inference API (protos/local.proto).

    from edge_agent.local_client import LocalClient

    with LocalClient() as agent:                          # the default socket /run/splitinfer-agent/agent.sock
        result = agent.infer(frame, timeout=1.0)          # one array (one-input model) or {name: array}
        result = agent.infer(frame, unary=True)           # the same on a unary call of its own
        print(result.output.shape, result.served_by, result.timing["total_ms"])
        for r in agent.stream(frames):                    # many in, answers as they finish (match by request_id)
            ...
        print(agent.health())

`infer` sends on long-lived InferStreams that the client opens on first use and keeps: one per thread calling at
the same time, up to MAX_STREAMS, then shared (answers are matched by an id of the client's own); that saves
gRPC's per-call setup on every request. The service runs them one at a time per stream, each on the stream's own
thread as it runs a unary call (metadata SERIAL_METADATA), so no extra thread is woken on its side. Each
request carries its deadline (`timeout_ms`) and the caller waits no longer than it. A stream that breaks (the
service restarted) fails the requests it had in flight with UNAVAILABLE; the next `infer` opens a new one.
`unary=True` uses a unary Infer call instead. Inputs are serialized straight from the array's buffer (one copy;
raw little-endian bytes, no compression: the service reads them in place).

Needs only grpcio, numpy and the protos (no onnxruntime): it runs in the application's own environment.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from protos import codec, serde
from protos import local_pb2 as lpb
from protos import local_pb2_grpc as lpb_grpc

__all__ = ["DEFAULT_SOCKET", "LocalClient", "LocalError", "LocalResult"]

DEFAULT_SOCKET = "/run/splitinfer-agent/agent.sock"  # edge_agent.config.DEFAULT_SOCKET (not imported: no tomli)
DEFAULT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024 + 64 * 1024
SERIAL_METADATA = "splitinfer-serial"  # "1" on infer's streams: one request at a time (LocalApi.serial)
MAX_STREAMS = 8  # shared streams per client: one per concurrent caller up to this, then callers share
STREAM_WINDOW = 256  # unanswered requests on the shared stream; past it infer() waits (within its deadline)
# Unix sockets and loopback: larger HTTP/2 frames and window than the defaults (16 KB, 64 KB growing) move a
# camera frame in fewer frames and without waiting for window updates. The service (local_api) sets the same.
LOCAL_HTTP2_OPTIONS = [("grpc.http2.max_frame_size", 4 * 1024 * 1024), ("grpc.http2.lookahead_bytes", 8 * 1024 * 1024)]
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *LOCAL_HTTP2_OPTIONS]
_SERVICE = lpb.DESCRIPTOR.services_by_name["LocalInference"].full_name
TIMING_KEYS = ("queue_ms", "head_ms", "encode_ms", "network_ms", "cloud_queue_ms", "tail_ms", "total_ms")


class LocalError(RuntimeError):
    """The service refused or failed a request; `code` is the grpc.StatusCode name (INVALID_ARGUMENT, ...)."""

    def __init__(self, code: str, message: str, request_id: str = ""):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class LocalResult:
    """One answer: the outputs by name, who served it, the cut and the timing breakdown (ms)."""

    request_id: str
    outputs: dict[str, np.ndarray]
    served_by: str  # "cloud" or "edge"
    cut: str
    timing: dict[str, float]
    fallback_reason: str = ""

    @property
    def output(self) -> np.ndarray:
        """The first (for most models the only) output."""
        return next(iter(self.outputs.values()))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_INPUTS_TAG = b"\x12"  # LocalInferRequest.inputs: field 2, length-delimited
_DATA_TAG = b"\x22"    # Tensor.data: field 4, length-delimited


_HEADERS: dict[tuple[str, str, tuple[int, ...]], tuple[bytes, np.dtype]] = {}  # see _header
_HEADERS_MAX = 64


def _header(name: str, arr: np.ndarray) -> tuple[bytes, np.dtype]:
    """The serialized Tensor of `arr` without its data, and the wire dtype its data is sent in: codec.encode's
    checks (dtype, rank) and choices (fp32 for floats) made on no data, once per name, dtype and shape."""
    key = (name, arr.dtype.str, arr.shape)
    got = _HEADERS.get(key)
    if got is None:
        head = codec.encode(name, arr[:0])
        wire = codec.decode(head).dtype
        del head.shape[:]
        head.shape.extend(arr.shape)
        head.raw_size = arr.size * wire.itemsize
        if len(_HEADERS) >= _HEADERS_MAX:
            _HEADERS.clear()
        got = _HEADERS[key] = (head.SerializeToString(), wire)
    return got


def request_bytes(arrays: Mapping[str, Any], request_id: str = "", timeout_ms: int = 0) -> bytes:
    """The serialized LocalInferRequest of `arrays` (fp32 for floats, no compression), built around each array's
    own buffer: its bytes are copied once, into the message, where encode + SerializeToString copy them twice.
    Parses to the message codec.encode makes (tests check it)."""
    parts: list[Any] = [lpb.LocalInferRequest(request_id=request_id, timeout_ms=timeout_ms).SerializeToString()]
    for name, x in arrays.items():
        arr = np.asarray(x)
        if arr.ndim == 0 or arr.size == 0:  # nothing to gain: the ordinary encoding
            tensor = codec.encode(name, np.ascontiguousarray(arr))  # as before: a scalar goes as shape [1]
            parts.append(lpb.LocalInferRequest(inputs=[tensor]).SerializeToString())
            continue
        header, wire = _header(name, arr)
        data = np.ascontiguousarray(arr, dtype=wire)  # no copy when already fp32 C-order
        size = _varint(data.nbytes)
        parts += [_INPUTS_TAG, _varint(len(header) + 1 + len(size) + data.nbytes), header, _DATA_TAG, size,
                  memoryview(data.reshape(-1).view(np.uint8))]  # type: ignore[arg-type]  # numpy 2 stubs
    return b"".join(parts)


def _result(resp: lpb.LocalInferResponse) -> LocalResult:
    if resp.HasField("status") and resp.status.code != 0:
        raise LocalError(serde.status_name(resp.status.code), resp.status.message, resp.request_id)
    return LocalResult(
        request_id=resp.request_id,
        outputs={t.name: codec.decode(t, max_bytes=MAX_MESSAGE_BYTES) for t in resp.outputs},
        served_by=resp.served_by, cut=resp.cut, timing={k: getattr(resp.timing, k) for k in TIMING_KEYS},
        fallback_reason=resp.fallback_reason,
    )


def _error(exc: grpc.RpcError) -> LocalError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.CANCELLED:
        # The client cancels nothing it still waits for, so this is the service closing the call: it stops or
        # restarts, and it finishes every request it admitted before closing (drain), so this one did not run.
        return LocalError("UNAVAILABLE", f"the agent service closed the call before running the request (it is "
                                         f"stopping or restarting; safe to retry): {details or 'cancelled'}")
    return LocalError(code.name if code is not None else "UNKNOWN", details or "")


@dataclass
class _Slot:
    """One request waiting on the shared stream for its answer."""

    request_id: str  # the caller's, echoed in its result
    done: threading.Event = field(default_factory=threading.Event)
    response: lpb.LocalInferResponse | None = None
    error: LocalError | None = None


_CLOSE = object()


class _NotSent(LocalError):
    """The shared stream had broken before this request went out: it may go on a new one."""


class _SharedStream:
    """One InferStream call carrying `infer` requests from any thread; a reader thread hands each answer to its
    waiting caller by the stream's own request id. The call has no deadline of its own: every request has one,
    sent with it (timeout_ms, the service answers DEADLINE_EXCEEDED past it) and kept by its waiting caller."""

    def __init__(self, method: grpc.StreamStreamMultiCallable, window: int):
        self._outbox: queue.Queue[Any] = queue.Queue()  # bounded by the window: a slot is taken before a put
        self._window = threading.BoundedSemaphore(window)
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.users = 0  # callers using this stream now (kept by LocalClient under its lock)
        self.broken: LocalError | None = None
        self._call = method(iter(self._outbox.get, _CLOSE), metadata=((SERIAL_METADATA, "1"),))
        threading.Thread(target=self._read, name="splitinfer-local-client", daemon=True).start()

    def _read(self) -> None:
        error = LocalError("UNAVAILABLE", "the stream to the agent service ended")
        try:
            for resp in self._call:
                with self._lock:
                    slot = self._slots.pop(resp.request_id, None)
                if slot is not None:  # None: its caller gave up (deadline) before the answer came
                    slot.response = resp
                    slot.done.set()
                    self._window.release()
        except grpc.RpcError as exc:
            error = _error(exc)  # CANCELLED (the service closed the stream) reads UNAVAILABLE
        except Exception as exc:  # a bug here must fail the callers, not leave them waiting
            error = LocalError("INTERNAL", f"reading the stream failed: {exc!r}")
        self._fail(error)

    def _fail(self, error: LocalError) -> None:
        with self._lock:
            self.broken = self.broken or error
            slots, self._slots = self._slots, {}
        for slot in slots.values():
            slot.error = LocalError(error.code, f"{error.message} (the request may or may not have run)",
                                    slot.request_id)
            slot.done.set()
        self._outbox.put(_CLOSE)

    def infer(self, arrays: Mapping[str, Any], timeout: float, request_id: str) -> lpb.LocalInferResponse:
        sid = f"{next(self._ids)}"
        slot = _Slot(request_id)
        try:  # before taking a window slot: a bad input must not hold one for ever
            data = request_bytes(arrays, sid, max(1, int(timeout * 1000)))
        except (ValueError, TypeError) as exc:  # codec.TensorError (a ValueError) names the input
            raise LocalError("INVALID_ARGUMENT", str(exc), request_id) from None
        if not self._window.acquire(timeout=timeout):
            raise LocalError("DEADLINE_EXCEEDED", f"{STREAM_WINDOW} requests in flight on the stream for "
                                                  f"{timeout:.3f} s", request_id)
        with self._lock:
            if self.broken is not None:
                self._window.release()
                raise _NotSent(self.broken.code, self.broken.message, request_id)
            self._slots[sid] = slot
        self._outbox.put(data)
        if not slot.done.wait(timeout):
            with self._lock:
                gone = self._slots.pop(sid, None) is not None
            if gone:  # else the answer (or the failure) came in the meantime: take it
                self._window.release()
                raise LocalError("DEADLINE_EXCEEDED", f"no answer within {timeout:.3f} s", request_id)
        if slot.error is not None:
            raise slot.error
        assert slot.response is not None
        return slot.response

    def close(self) -> None:
        self._call.cancel()
        self._fail(LocalError("UNAVAILABLE", "the client was closed"))


class LocalClient:
    """A channel to `split-agent serve`: `socket` (a path) or `address` ("127.0.0.1:PORT"), not both."""

    def __init__(self, socket: str | None = None, address: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, input_name: str | None = None):
        if socket is not None and address is not None:
            raise ValueError("give socket or address, not both")
        target = address if address is not None else f"unix:{socket or DEFAULT_SOCKET}"
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)  # local only: a socket or loopback
        self._stub = lpb_grpc.LocalInferenceStub(self._channel)
        # Infer and InferStream with requests already serialized (request_bytes)
        self._unary = self._channel.unary_unary(f"/{_SERVICE}/Infer",
                                                response_deserializer=lpb.LocalInferResponse.FromString)
        self._streaming = self._channel.stream_stream(f"/{_SERVICE}/InferStream",
                                                      response_deserializer=lpb.LocalInferResponse.FromString)
        self._streams: list[_SharedStream] = []  # open shared streams; each has `users` callers in it now
        self._streams_lock = threading.Lock()
        self._closed = False
        self._input_name = input_name
        self._ids = itertools.count(1)

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the shared stream and the channel."""
        with self._streams_lock:
            self._closed = True
            streams, self._streams = self._streams, []
        for shared in streams:
            shared.close()
        self._channel.close()

    def _input(self) -> str:
        """The input name of a one-input model (asked once from Health)."""
        if self._input_name is None:
            specs = self.health()["input_specs"]
            if len(specs) != 1:
                names = [s.split()[0] for s in specs]
                raise LocalError("INVALID_ARGUMENT", f"the model takes inputs {names}: pass a dict name -> array")
            self._input_name = specs[0].split()[0]
        return self._input_name

    def _named(self, x: Any) -> Any:
        return x if isinstance(x, Mapping) else {self._input(): x}

    def _stream(self) -> _SharedStream:
        """A stream for one request, with its `users` counted: an idle one, else a new one (up to MAX_STREAMS),
        else the least busy. Callers on separate streams run in parallel in the service (each stream runs the
        request alone on it on its reader); broken streams are dropped here."""
        with self._streams_lock:
            if self._closed:
                raise LocalError("UNAVAILABLE", "the client is closed")
            self._streams = [s for s in self._streams if s.broken is None]
            idle = [s for s in self._streams if s.users == 0]
            if idle:
                chosen = idle[0]
            elif len(self._streams) < MAX_STREAMS:
                chosen = _SharedStream(self._streaming, STREAM_WINDOW)
                self._streams.append(chosen)
            else:
                chosen = min(self._streams, key=lambda s: s.users)
            chosen.users += 1
            return chosen

    def _on_stream(self, arrays: Mapping[str, Any], wait: float, request_id: str) -> lpb.LocalInferResponse:
        shared = self._stream()
        try:
            return shared.infer(arrays, wait, request_id)
        finally:
            with self._streams_lock:
                shared.users -= 1

    def infer(self, x: Any, timeout: float | None = None, request_id: str = "", *,
              unary: bool = False) -> LocalResult:
        """One request: an array (one-input model) or {name: array}; LocalError when refused or failed. It goes
        on the client's shared stream, or on a unary call of its own with `unary`."""
        wait = self.timeout if timeout is None else timeout
        arrays = self._named(x)
        if not unary:
            try:
                resp = self._on_stream(arrays, wait, request_id)
            except _NotSent:  # it broke just now (the reader saw it first): once more on a new stream
                resp = self._on_stream(arrays, wait, request_id)
            resp.request_id = request_id
            return _result(resp)
        try:
            resp = self._unary(request_bytes(arrays, request_id), timeout=wait)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _result(resp)

    def stream(self, inputs: Iterable[Any], timeout: float | None = None,
               raise_errors: bool = True) -> Iterator[LocalResult | LocalError]:
        """Send every input on one stream; yield answers as they finish (match them by request_id: "1", "2", ...
        in input order). A refused request raises its LocalError, or is yielded when not raise_errors. `timeout`
        bounds the whole stream."""
        name = None if self._input_name is None else self._input_name

        def requests() -> Iterator[bytes]:
            for i, x in zip(itertools.count(1), inputs):
                yield request_bytes(x if isinstance(x, Mapping) else {name or self._input(): x}, str(i))

        if name is None:
            self._input()
        call = self._streaming(requests(), timeout=self.timeout if timeout is None else timeout)
        try:
            for resp in call:
                try:
                    yield _result(resp)
                except LocalError as exc:
                    if raise_errors:
                        raise
                    yield exc
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        """The service's mode, cut, model, links, requests in flight, draining, and the model's input specs."""
        try:
            h = self._stub.Health(lpb.HealthRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return {"mode": h.mode, "cut": h.cut, "model": h.model, "cloud_connected": h.cloud_connected,
                "control_connected": h.control_connected, "in_flight": h.in_flight, "draining": h.draining,
                "mode_reason": h.mode_reason, "input_specs": list(h.input_specs)}
