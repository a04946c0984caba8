"""The agent's gRPC link to the cloud: one long-lived bidirectional `Infer` stream per agent.

Requests go into a bounded queue that gRPC's sender consumes (the sync API: faster than grpc.aio, DESIGN field
notes); a receiver thread reads the responses and hands them, decoded, to the agent, which matches them by
request_id. The sync response iterator has no timeout of its own (grpc#20562), so deadlines are the agent's
job (its deadline watcher); this module only reports replies and broken streams. Each (re)connection makes a
fresh channel, health-checks it with a deadline, and opens a new stream with a new generation number, so the
agent can tell which in-flight requests a broken stream took with it.

The agent hands over `CloudRequest`s and gets `CloudReply`s (protos.serde converts them); pb2 types appear
here only as the stream's items.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_agent import constants as C
from edge_agent.config import AgentConfig
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos import serde
from protos.serde import CloudReply, CloudRequest

__all__ = ["CloudLink", "LinkDown", "channel_credentials", "channel_options"]


class LinkDown(ConnectionError):
    """The cloud cannot take a request now: no stream, the stream broke, or the send queue is full."""


def channel_credentials(cfg: AgentConfig) -> grpc.ChannelCredentials | None:
    """mTLS credentials from cfg.tls (the CA, this device's key and certificate); None when cfg.insecure.

    ConfigError when the config has neither, when insecure is asked for a non-loopback cloud without
    i_know_insecure, or when a [tls] file cannot be read.
    """
    if cfg.check_transport() == "insecure":
        return None
    assert cfg.tls is not None
    ca, key, cert = cfg.tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel_options(cfg: AgentConfig) -> list[tuple[str, int | str]]:
    """Channel settings the cloud accepts: 20 s keepalive pings, 64 MiB messages, our reconnect pacing; with
    [tls] server_name, the name checked in the cloud's certificate (default: the host of `cloud`)."""
    server_name: list[tuple[str, int | str]] = []
    if cfg.tls is not None and cfg.tls.server_name:
        server_name = [("grpc.ssl_target_name_override", cfg.tls.server_name)]
    return server_name + [
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


class _Stream:
    """One Infer call: its bounded send queue, the call object and the receiver thread."""

    def __init__(self, generation: int, channel: grpc.Channel, queue_bound: int):
        self.generation = generation
        self.channel = channel
        self.queue: queue.Queue[pb.InferRequest | None] = queue.Queue(maxsize=queue_bound)
        self.closed = threading.Event()
        self.call: grpc.Call | None = None
        self.thread: threading.Thread | None = None

    def requests(self) -> Iterator[pb.InferRequest]:
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
        # mTLS by default: ConfigError here when the config has neither [tls] nor insecure (the files are read now,
        # so a missing key is an error at start, not a reconnect loop).
        self._credentials = channel_credentials(cfg)
        self._on_reply = on_reply
        self._on_broken = on_broken
        self._queue_bound = queue_bound or (cfg.max_in_flight + cfg.probe_count + 8)
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._generations = itertools.count(1)
        self._closed = False

    def reload_credentials(self, cfg: AgentConfig) -> None:
        """Read `cfg`'s [tls] files now (ConfigError if one cannot be read); the next connection uses them, the
        open stream keeps its channel."""
        self._credentials = channel_credentials(cfg)

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
        if self._credentials is None:
            channel = grpc.insecure_channel(self.address, options=channel_options(self.cfg))
        else:
            channel = grpc.secure_channel(self.address, self._credentials, options=channel_options(self.cfg))
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

    def send(self, request: CloudRequest) -> int:
        """Queue `request` on the open stream and return its generation; LinkDown if it cannot go now."""
        with self._lock:
            s = self._stream
        if s is None or s.closed.is_set():
            raise LinkDown("no open stream to the cloud")
        try:
            s.queue.put_nowait(serde.request_to_proto(request))
        except queue.Full:
            raise LinkDown(f"the send queue is full ({s.queue.maxsize} requests waiting for the link)") from None
        return s.generation

    def _receive(self, s: _Stream) -> None:
        reason = "the cloud ended the stream"
        try:
            for resp in s.call:  # type: ignore[union-attr]
                self._on_reply(s.generation, serde.reply_from_proto(resp, max_bytes=C.MAX_MESSAGE_BYTES))
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
