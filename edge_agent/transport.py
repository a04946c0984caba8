"""The agent's gRPC link to the cloud: one long-lived bidirectional `Infer` stream per agent.

Requests go into a bounded queue that gRPC's sender consumes (the sync API: faster than grpc.aio, DESIGN field
notes); a receiver thread reads the responses and hands them, decoded, to the agent, which matches them by
request_id. The sync response iterator has no timeout of its own (grpc#20562), so deadlines are the agent's
job (its deadline watcher); this module only reports replies and broken streams. Each (re)connection makes a
fresh channel, health-checks it with a deadline, and opens a new stream with a new generation number, so the
agent can tell which in-flight requests a broken stream took with it.

pb2 types stay in here and in protos.codec; the agent sees numpy arrays and `CloudReply`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_agent import constants as C
from edge_agent.config import AgentConfig
from protos import codec
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def status_name(code: int) -> str:
    """The grpc.StatusCode name of a numeric code (or the number when unknown)."""
    return _CODE_NAMES.get(code, str(code))


class LinkDown(ConnectionError):
    """The cloud cannot take a request now: no stream, the stream broke, or the send queue is full."""


@dataclass(frozen=True)
class CloudReply:
    """One decoded InferResponse, stamped with the agent's monotonic receive time."""

    request_id: str
    code: int
    message: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    decode_ms: float = 0.0
    batch_size: int = 0
    received_at: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the cloud answered the request with outputs."""
        return self.code == OK


def channel_options(cfg: AgentConfig) -> list[tuple[str, int]]:
    """Channel settings the cloud accepts: 20 s keepalive pings, 64 MiB messages, our reconnect pacing."""
    return [
        ("grpc.keepalive_time_ms", int(cfg.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", C.MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", C.MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", max(1, int(cfg.backoff.initial_s * 1000))),
        ("grpc.min_reconnect_backoff_ms", max(1, int(cfg.backoff.initial_s * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, int(cfg.backoff.max_s * 1000))),
    ]


def encode_request(
    request_id: str,
    *,
    device_id: str,
    model: str,
    cut: str,
    tensors: Mapping[str, np.ndarray],
    codec_spec: str,
    deadline_ms: int,
    probe: bool = False,
) -> pb.InferRequest:
    """Build the InferRequest for cut tensors `tensors`, encoded with `codec_spec`."""
    return pb.InferRequest(
        request_id=request_id,
        device_id=device_id,
        model=model,
        cut=cut,
        tensors=codec.encode_all(tensors, codec_spec),
        sent_unix_ns=time.time_ns(),
        deadline_ms=deadline_ms,
        probe=probe,
    )


def request_bytes(request: pb.InferRequest) -> int:
    """Tensor payload bytes of a request (what the link carries, after compression)."""
    return codec.wire_bytes(request.tensors)


def _decode_reply(resp: pb.InferResponse) -> CloudReply:
    now = time.perf_counter()
    code = resp.status.code if resp.HasField("status") else OK
    message = resp.status.message if resp.HasField("status") else ""
    outputs: dict[str, np.ndarray] = {}
    if code == OK:
        try:
            outputs = codec.decode_all(resp.outputs, max_bytes=C.MAX_MESSAGE_BYTES)
        except codec.TensorError as exc:
            code, message = INTERNAL, f"the cloud's output does not decode: {exc}"
    t = resp.timing
    return CloudReply(
        request_id=resp.request_id,
        code=code,
        message=message,
        outputs=outputs,
        queue_ms=t.queue_ms,
        compute_ms=t.compute_ms,
        decode_ms=t.decode_ms,
        batch_size=t.batch_size,
        received_at=now,
    )


class _Stream:
    """One Infer call: its bounded send queue, the call object and the receiver thread."""

    def __init__(self, generation: int, channel: grpc.Channel, queue_bound: int):
        self.generation = generation
        self.channel = channel
        self.queue: queue.Queue[pb.InferRequest | None] = queue.Queue(maxsize=queue_bound)
        self.closed = threading.Event()
        self.call: grpc.Call | None = None
        self.thread: threading.Thread | None = None

    def requests(self):
        """The request iterator gRPC's sender consumes; ends when the stream is closed."""
        while True:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.closed.is_set():
                    return
                continue
            if item is None or self.closed.is_set():
                return
            yield item

    def close(self) -> None:
        """Stop sending, cancel the call and close the channel (idempotent)."""
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass  # the iterator sees `closed` within its poll interval
        if self.call is not None:
            self.call.cancel()
        self.channel.close()


class CloudLink:
    """The agent's connection to the cloud tier: health check, one Infer stream, replies by callback."""

    def __init__(
        self,
        cfg: AgentConfig,
        on_reply: Callable[[int, CloudReply], None],
        on_broken: Callable[[int, str], None],
        queue_bound: int | None = None,
    ):
        self.cfg = cfg
        self.address = cfg.cloud
        self._on_reply = on_reply
        self._on_broken = on_broken
        self._queue_bound = queue_bound or (cfg.max_in_flight + cfg.probe_count + 8)
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._generations = itertools.count(1)
        self._closed = False

    # -- connecting -----------------------------------------------------------------------------

    @property
    def generation(self) -> int | None:
        """The generation of the open stream, None when there is none."""
        with self._lock:
            s = self._stream
            return s.generation if s is not None and not s.closed.is_set() else None

    def open(self) -> int:
        """Drop any old stream, connect a fresh channel, health-check it and open the stream; LinkDown if not."""
        self.drop("reconnecting")
        channel = grpc.insecure_channel(self.address, options=channel_options(self.cfg))
        try:
            ok, why = self._health(channel)
            if not ok:
                raise LinkDown(f"cloud {self.address} is not serving: {why}")
            with self._lock:
                if self._closed:
                    raise LinkDown("the link is closed")
                stream = _Stream(next(self._generations), channel, self._queue_bound)
                stub = pb_grpc.SplitInferenceStub(channel)
                stream.call = stub.Infer(stream.requests(), metadata=(("device-id", self.cfg.device_id),))
                stream.thread = threading.Thread(
                    target=self._receive, args=(stream,), name=f"splitinfer-recv-{stream.generation}", daemon=True
                )
                self._stream = stream
            stream.thread.start()
            return stream.generation
        except BaseException:
            channel.close()
            raise

    def health(self) -> tuple[bool, str]:
        """(serving, why not) for the current stream's channel, checked with the connect deadline."""
        with self._lock:
            s = self._stream
        if s is None or s.closed.is_set():
            return False, "no stream"
        return self._health(s.channel)

    def _health(self, channel: grpc.Channel) -> tuple[bool, str]:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(
                health_pb2.HealthCheckRequest(service=self.cfg.health_service),
                # Fails fast on a refused connection; a hung server (no HTTP/2 handshake) hits the deadline.
                timeout=self.cfg.connect_timeout_s,
            )
        except grpc.RpcError as exc:
            return False, f"health check failed: {exc.code().name}: {exc.details()}"
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            return False, f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
        return True, ""

    # -- sending and receiving ------------------------------------------------------------------

    def send(self, request: pb.InferRequest) -> int:
        """Queue `request` on the open stream and return its generation; LinkDown if it cannot go now."""
        with self._lock:
            s = self._stream
        if s is None or s.closed.is_set():
            raise LinkDown("no open stream to the cloud")
        try:
            s.queue.put_nowait(request)
        except queue.Full:
            raise LinkDown(f"the send queue is full ({s.queue.maxsize} requests waiting for the link)") from None
        return s.generation

    def _receive(self, s: _Stream) -> None:
        reason = "the cloud ended the stream"
        try:
            for resp in s.call:  # type: ignore[union-attr]
                self._on_reply(s.generation, _decode_reply(resp))
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            reason = f"stream broken: {code.name if code else 'UNKNOWN'}: {details}"
        finally:
            was_closed = s.closed.is_set()
            s.close()
            with self._lock:
                if self._stream is s:
                    self._stream = None
            self._on_broken(s.generation, "stream closed by the agent" if was_closed else reason)

    def drop(self, reason: str = "") -> None:
        """Close the current stream (its receiver reports it broken to the agent)."""
        with self._lock:
            s, self._stream = self._stream, None
        if s is not None:
            s.close()

    def close(self, timeout_s: float = 2.0) -> None:
        """Close the stream and wait (bounded) for the receiver thread to finish."""
        with self._lock:
            self._closed = True
            s, self._stream = self._stream, None
        if s is not None:
            s.close()
            if s.thread is not None and s.thread is not threading.current_thread():
                s.thread.join(timeout_s)
