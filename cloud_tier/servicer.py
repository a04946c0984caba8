"""The SplitInference servicer (grpc.aio): decode and validate each request, batch it, answer it.

A bad request gets its own RequestStatus and the stream goes on. Responses may leave out of order.

What a request can cost is bounded before anything is allocated: ids and names of at most serde.MAX_ID_CHARS
characters (INVALID_ARGUMENT), rows <= max_batch (INVALID_ARGUMENT), and every tensor's decoded size (after
dequantization to float32) <= max_tensor_bytes (RESOURCE_EXHAUSTED), all checked from the declared metadata.
Decoding and encoding larger than INLINE_CODEC_BYTES run in the servicer's own codec threads, never on the
event loop, so one large request does not stall other streams or the health check. Any failure while
answering (a MemoryError: RESOURCE_EXHAUSTED; anything else: INTERNAL) becomes that request's status.

Messages become `CloudRequest` / `CloudReply` (protos.serde) as they arrive and leave; pb2 types appear here only
as the RPCs' signatures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from cloud_tier.batcher import (
    BatcherClosedError,
    BatchMemoryError,
    BatchRunError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
    WorkerSlots,
)
from cloud_tier.config import ServerConfig
from cloud_tier.executor import ModelRegistry, TailLookupError
from cloud_tier.stats import ServerStats
from protos import codec, serde
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos.serde import CloudReply, CloudRequest

log = logging.getLogger(__name__)

_WAKE = object()  # wakes a stream's response loop to re-check whether it is done
INLINE_CODEC_BYTES = 64 * 1024  # smaller decodes and encodes run on the loop: a thread hop costs more than they do
_T = TypeVar("_T")


class RequestRejected(Exception):
    """A request answered with a non-OK status without running."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class _Stream:
    """The state of one Infer stream: responses to send and requests still being worked on."""

    def __init__(self, max_inflight: int):
        self.responses: asyncio.Queue = asyncio.Queue()  # bounded in effect by `slots`
        self.slots = asyncio.Semaphore(max_inflight)
        self.pending = 0
        self.reader_done = False
        self.closing = False
        self.peer: Any = None  # mTLS: the device its certificate names (cloud_tier.tls.Peer); None if insecure

    def wake(self) -> None:
        self.responses.put_nowait(_WAKE)


class SplitInferenceServicer(pb_grpc.SplitInferenceServicer):
    """Serves the tails of a ModelRegistry with one DynamicBatcher per (model hash, cut)."""

    # mTLS (cloud_tier.tls.PeerGuard): the device id comes from the peer certificate, never from the request.
    # None on an --insecure server: device ids are taken from the requests.
    guard: Any = None

    def __init__(self, registry: ModelRegistry, config: ServerConfig, pool: Executor, stats: ServerStats,
                 batchers: Mapping[tuple[str, str], Any] | None = None):
        """`batchers` (by tail key) replace the in-process DynamicBatchers: the Ray backend's RayTails, which have
        the same submit/flush/idle/close and raise the same exceptions."""
        self.registry = registry
        self.config = config
        self.stats = stats
        self.draining = False
        self._streams: set[_Stream] = set()
        self._tasks: set[asyncio.Task] = set()
        slots = WorkerSlots(config.workers)
        # Decoding and encoding of large tensors: off the event loop, and apart from the tail runs' pool.
        self._codec_pool = ThreadPoolExecutor(max(2, config.workers), thread_name_prefix="codec")
        self._batchers: dict[tuple[str, str], Any] = dict(batchers) if batchers is not None else {
            t.key: DynamicBatcher(
                f"{t.label}/{t.cut}", t.run, pool, slots, stats,
                max_batch=config.max_batch, max_wait_ms=config.max_wait_ms, max_queue=config.max_queue,
            )
            for t in registry.served()
        }

    # -- RPCs ----------------------------------------------------------------------------------------

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """Every served (model, cut) and the tensor names it takes (to devices only, as Infer)."""
        if self.guard is not None:
            await self.guard.admit(context)  # PERMISSION_DENIED: not a device, or revoked
        return serde.served_cuts_to_proto((t.model, t.cut, [s.name for s in t.inputs], t.model_sha256)
                                          for t in self.registry.served())

    async def Infer(
        self, request_iterator: AsyncIterator[pb.InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferResponse]:
        """One long-lived stream: each request answered on its own, possibly out of order."""
        stream = _Stream(self.config.max_inflight_per_stream)
        if self.guard is not None:
            stream.peer = await self.guard.admit(context)  # PERMISSION_DENIED: not a device, or revoked
        self._streams.add(stream)
        if self.draining:
            stream.closing = True
        reader = asyncio.get_running_loop().create_task(self._read(request_iterator, stream))
        try:
            while not ((stream.reader_done or stream.closing) and stream.pending == 0):
                item = await stream.responses.get()
                if item is _WAKE:
                    continue
                yield item
                stream.pending -= 1
                stream.slots.release()
            if stream.closing and not stream.reader_done:
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details("server is shutting down; reconnect to another cloud node or run locally")
        finally:
            reader.cancel()
            self._streams.discard(stream)

    # -- shutdown --------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop taking new work (new requests get UNAVAILABLE) and wait for accepted work to be answered."""
        self.draining = True
        for batcher in self._batchers.values():
            batcher.flush()
        await asyncio.gather(*(b.idle() for b in self._batchers.values()))
        while self._tasks:  # requests between decode and the batcher, or writing their response
            await asyncio.wait(list(self._tasks))

    async def close_streams(self) -> None:
        """Let every open stream send what it owes, then end it with UNAVAILABLE."""
        for stream in list(self._streams):
            stream.closing = True
            stream.wake()

    async def close(self) -> None:
        """Stop the batchers and the codec threads."""
        await asyncio.gather(*(b.close() for b in self._batchers.values()))
        self._codec_pool.shutdown(wait=False)

    # -- internals -----------------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[pb.InferRequest], stream: _Stream) -> None:
        try:
            async for request in requests:
                await stream.slots.acquire()  # at the bound, stop reading: flow control pushes back
                stream.pending += 1
                # Another device's id: this request refused, the stream goes on. A malformed request (an over-long
                # id) is left to _answer, which refuses it INVALID_ARGUMENT without echoing the field.
                if (stream.peer is not None and serde.field_error(request) is None
                        and (refusal := self.guard.refuse(request, stream.peer)) is not None):
                    stream.responses.put_nowait(refusal)
                    continue
                task = asyncio.get_running_loop().create_task(self._answer(request, stream))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as exc:  # the client went away mid-stream
            log.debug("Infer stream read ended: %s", exc)
        finally:
            stream.reader_done = True
            stream.wake()

    async def _answer(self, message: pb.InferRequest, stream: _Stream) -> None:
        received_ns = time.time_ns()
        self.stats.gauge("in_flight", 1)
        try:
            reply = await self._infer(serde.request_from_proto(message), received_ns)
        except Exception as exc:  # noqa: BLE001 - never leave a request unanswered: the stream could not end
            log.exception("answering a request failed")
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, MemoryError) else grpc.StatusCode.INTERNAL
            reply = CloudReply(message.request_id[: serde.MAX_ID_CHARS], serde.status_number(code),
                               f"the cloud failed to answer: {type(exc).__name__}", received_unix_ns=received_ns)
        finally:
            self.stats.gauge("in_flight", -1)
        if reply.code != serde.OK:
            self.stats.error(serde.status_name(reply.code))
        stream.responses.put_nowait(serde.reply_to_proto(reply))

    async def _off_loop(self, nbytes: int, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """fn(*args, **kwargs): inline when it handles at most INLINE_CODEC_BYTES, else in a codec thread."""
        if nbytes <= INLINE_CODEC_BYTES:
            return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._codec_pool, lambda: fn(*args, **kwargs))

    async def _infer(self, request: CloudRequest, received_ns: int) -> CloudReply:
        """Run one request to its reply; every failure becomes that request's status."""
        decode_ms = 0.0  # kept in a failed reply once decoding succeeded
        request_id = request.request_id[: serde.MAX_ID_CHARS]  # an over-long id is refused, never echoed whole
        self.stats.incr("probes" if request.probe else "requests")
        try:
            if self.draining:
                raise RequestRejected(
                    grpc.StatusCode.UNAVAILABLE, "server is shutting down; send to another node or run locally"
                )
            problem = serde.field_error(request)
            if problem is not None:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, problem)
            if request.probe and not request.tensors:
                return CloudReply(request_id, serde.OK, "", received_unix_ns=received_ns)  # liveness: OK
            try:
                tail = self.registry.lookup(request.model, request.cut, request.model_sha256)
            except TailLookupError as exc:
                raise RequestRejected(grpc.StatusCode[exc.status], str(exc)) from None
            start = time.perf_counter()
            limits = {"max_bytes": self.config.max_tensor_bytes, "max_rows": self.config.max_batch}
            size = request.tensors.check(tail.inputs, **limits)  # metadata only: nothing allocated yet
            feeds = await self._off_loop(size, request.tensors.decode, tail.inputs, **limits)
            rows = next(iter(feeds.values())).shape[0] if feeds else 1
            decode_ms = 1000 * (time.perf_counter() - start)
            deadline = request.deadline_ms / 1000 if request.deadline_ms else None
            result = await self._batchers[tail.key].submit(feeds, rows, deadline)
            out_bytes = sum(v.nbytes for v in result.outputs.values())
            wire = await self._off_loop(out_bytes, serde.encode_tensors, result.outputs, "fp32")
            return CloudReply(
                request_id, serde.OK, "", queue_ms=result.queue_ms, compute_ms=result.compute_ms,
                batch_size=result.batch_size, received_unix_ns=received_ns,
                decode_ms=decode_ms, wire_outputs=wire,
            )
        except codec.TensorError as exc:
            code, message = grpc.StatusCode[exc.status], str(exc)
        except RequestRejected as exc:
            code, message = exc.code, str(exc)
        except QueueFullError as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except DeadlineExceededError as exc:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
        except BatchMemoryError as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except BatchRunError as exc:
            code, message = grpc.StatusCode.INTERNAL, str(exc)
        except BatcherClosedError as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except MemoryError:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, "the cloud ran out of memory for this request"
        except Exception as exc:  # noqa: BLE001 - any other failure is this request's, and the stream goes on
            log.exception("request %s failed", request_id)
            code, message = grpc.StatusCode.INTERNAL, f"the cloud failed on this request: {type(exc).__name__}"
        return CloudReply(
            request_id, serde.status_number(code), message, decode_ms=decode_ms, received_unix_ns=received_ns
        )
