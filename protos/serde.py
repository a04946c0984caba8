"""The one place where proto messages and gRPC statuses turn into our types and back.

`CloudRequest` and `CloudReply` are what the agent and the servicer speak; `request_to_proto` /
`request_from_proto` and `reply_to_proto` / `reply_from_proto` convert them (Flower's `serde.py` style).
Status codes travel as grpc.StatusCode numbers (`RequestStatus.code`); `status_name` / `status_code` /
`status_number` are the one table between numbers, names and `grpc.StatusCode`.

Tensor bytes are never copied here beyond what protobuf itself does: a request's tensors are carried as
`WireTensors` (the codec's encoded tensors, opaque outside `protos`), encoded once on the agent and decoded
once, with validation before allocation, where the tail's input specs are known.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from models.manifest import TensorSpec
from protos import codec
from protos import inference_pb2 as pb

__all__ = [
    "MAX_ID_CHARS",
    "OK",
    "CloudReply",
    "CloudRequest",
    "WireTensors",
    "encode_tensors",
    "field_error",
    "message_bytes",
    "reply_from_proto",
    "reply_to_proto",
    "request_from_proto",
    "prepare",
    "request_to_proto",
    "served_cuts_to_proto",
    "status_code",
    "status_name",
    "status_number",
]

# -- status codes ---------------------------------------------------------------------------------

_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}

OK: int = grpc.StatusCode.OK.value[0]


def status_name(code: int) -> str:
    """The grpc.StatusCode name of a numeric code (or the number when unknown)."""
    c = _BY_NUMBER.get(code)
    return c.name if c is not None else str(code)


def status_code(number: int) -> grpc.StatusCode | None:
    """The grpc.StatusCode of a numeric code, None when unknown."""
    return _BY_NUMBER.get(number)


def status_number(code: grpc.StatusCode | str) -> int:
    """The wire number of a grpc.StatusCode (or of its name, e.g. "NOT_FOUND")."""
    if isinstance(code, str):
        code = grpc.StatusCode[code]
    return code.value[0]


# -- tensors on the wire ------------------------------------------------------------------------------


class WireTensors(Sequence["pb.Tensor"]):
    """Encoded cut tensors as they travel (opaque outside `protos`): their wire size, and decoding."""

    __slots__ = ("_tensors",)

    def __init__(self, tensors: Iterable[pb.Tensor] = ()):
        # A proto's repeated field is kept as it is (no copy); a plain iterable becomes a tuple.
        self._tensors = tensors if isinstance(tensors, Sequence) else tuple(tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        return self._tensors[i]

    def __iter__(self) -> Iterator[pb.Tensor]:
        return iter(self._tensors)

    @property
    def wire_bytes(self) -> int:
        """Tensor payload bytes (what the link carries, after compression)."""
        return codec.wire_bytes(self._tensors)

    @property
    def message_bytes(self) -> int:
        """An upper estimate of what these tensors add to a message (payload, names, shapes, fields)."""
        return sum(len(t.data) + len(t.name) + 11 * len(t.shape) + 16 * len(t.quantization.scale) + 64
                   for t in self._tensors)

    def check(
        self, specs: Sequence[TensorSpec] | None = None, *, max_bytes: int = codec.DEFAULT_MAX_TENSOR_BYTES,
        max_rows: int | None = None,
    ) -> int:
        """Validate every tensor without decoding (codec.check_all); the bytes decoding will allocate."""
        return codec.check_all(self._tensors, specs, max_bytes=max_bytes, max_rows=max_rows)

    def decode(
        self, specs: Sequence[TensorSpec] | None = None, *, max_bytes: int = codec.DEFAULT_MAX_TENSOR_BYTES,
        max_rows: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate (against `specs` when given, rows against `max_rows`) and decode every tensor; TensorError."""
        return codec.decode_all(self._tensors, specs, max_bytes=max_bytes, max_rows=max_rows)


def encode_tensors(arrays: Mapping[str, np.ndarray], codec_spec: str) -> WireTensors:
    """Encode cut tensors with `codec_spec` (e.g. "int8+zstd") for a request."""
    return WireTensors(codec.encode_all(arrays, codec_spec))


# -- requests ----------------------------------------------------------------------------------------

MAX_ID_CHARS = 256  # request id, device id, model and cut names: longer ones are refused, never echoed
MESSAGE_OVERHEAD_BYTES = 4096  # a request's fields beyond its tensors, rounded up generously


@dataclass(frozen=True)
class CloudRequest:
    """One InferRequest: the cut tensors of request `request_id` of `device_id`, for tail (`model`, `cut`).

    `model_sha256` (the bundle's model hash) with `cut` names the tail; `model` stays for messages and metrics.
    Empty: the cloud finds the tail by `model`, when it serves one bundle of that name.
    """

    request_id: str
    device_id: str
    model: str
    cut: str
    tensors: WireTensors = field(default_factory=WireTensors)
    deadline_ms: int = 0
    probe: bool = False
    sent_unix_ns: int = 0  # 0: stamped when converted to proto
    model_sha256: str = ""
    # The message, once `prepare` built it (so the agent times the copy into it as encoding, not as sending).
    _message: pb.InferRequest | None = field(default=None, init=False, repr=False, compare=False)


def prepare(request: CloudRequest) -> CloudRequest:
    """Build `request`'s message now, before the sender starts its clock; `request_to_proto` then reuses it."""
    object.__setattr__(request, "_message", _build(request))
    return request


def field_error(request: CloudRequest) -> str | None:
    """Why `request`'s id, device id, model, model hash or cut cannot be used (too long), or None."""
    for name in ("request_id", "device_id", "model", "cut", "model_sha256"):
        value = getattr(request, name)
        if len(value) > MAX_ID_CHARS:
            return f"{name} is {len(value)} characters; at most {MAX_ID_CHARS} are accepted"
    return None


def message_bytes(request: CloudRequest) -> int:
    """An upper estimate of `request`'s serialized InferRequest size (to keep it under the message limit)."""
    ids = (len(request.request_id) + len(request.device_id) + len(request.model) + len(request.cut)
           + len(request.model_sha256))
    return request.tensors.message_bytes + 4 * ids + MESSAGE_OVERHEAD_BYTES


def request_to_proto(request: CloudRequest) -> pb.InferRequest:
    """The InferRequest message of `request`: the one `prepare` built, else built now (sent_unix_ns stamped
    now when unset)."""
    return request._message if request._message is not None else _build(request)


def _build(request: CloudRequest) -> pb.InferRequest:
    return pb.InferRequest(
        request_id=request.request_id,
        device_id=request.device_id,
        model=request.model,
        cut=request.cut,
        tensors=request.tensors,
        sent_unix_ns=request.sent_unix_ns or time.time_ns(),
        deadline_ms=request.deadline_ms,
        probe=request.probe,
        model_sha256=request.model_sha256,
    )


def request_from_proto(message: pb.InferRequest) -> CloudRequest:
    """Our view of an InferRequest; its tensors stay encoded until `tensors.decode` (validation first)."""
    return CloudRequest(
        request_id=message.request_id,
        device_id=message.device_id,
        model=message.model,
        cut=message.cut,
        tensors=WireTensors(message.tensors),
        deadline_ms=message.deadline_ms,
        probe=message.probe,
        sent_unix_ns=message.sent_unix_ns,
        model_sha256=message.model_sha256,
    )


# -- replies ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CloudReply:
    """One InferResponse with decoded outputs; the agent stamps its monotonic receive time."""

    request_id: str
    code: int
    message: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    decode_ms: float = 0.0
    batch_size: int = 0
    received_at: float = 0.0  # the agent's perf_counter when the reply arrived
    received_unix_ns: int = 0  # when the cloud received the request
    # The cloud's side: outputs already encoded (so that an output the codec refuses fails that request only).
    wire_outputs: WireTensors = field(default_factory=WireTensors)

    @property
    def ok(self) -> bool:
        """Whether the cloud answered the request with outputs."""
        return self.code == OK

    @property
    def cloud_ms(self) -> float:
        """Time the request spent in the cloud: queue + compute + decode."""
        return self.queue_ms + self.compute_ms + self.decode_ms


def served_cuts_to_proto(cuts: Iterable[tuple[str, str, Sequence[str], str]]) -> pb.ListModelsResponse:
    """The ListModels answer for (model, cut, input tensor names, model hash) tuples."""
    return pb.ListModelsResponse(cuts=[pb.ServedCut(model=m, cut=c, inputs=list(names), model_sha256=sha)
                                       for m, c, names, sha in cuts])


def reply_to_proto(reply: CloudReply) -> pb.InferResponse:
    """The InferResponse of `reply`: its outputs (`wire_outputs`, else `outputs` in fp32) when OK, none otherwise."""
    response = pb.InferResponse(request_id=reply.request_id)
    t = response.timing
    t.received_unix_ns = reply.received_unix_ns
    t.decode_ms = reply.decode_ms
    t.queue_ms = reply.queue_ms
    t.compute_ms = reply.compute_ms
    t.batch_size = reply.batch_size
    if reply.code != OK:
        response.status.code = reply.code
        response.status.message = reply.message
    elif reply.wire_outputs:
        response.outputs.extend(reply.wire_outputs)
    else:
        response.outputs.extend(codec.encode(name, arr, "fp32") for name, arr in reply.outputs.items())
    return response


def reply_from_proto(
    response: pb.InferResponse, *, max_bytes: int = codec.DEFAULT_MAX_TENSOR_BYTES, received_at: float | None = None
) -> CloudReply:
    """Our view of an InferResponse, outputs decoded (a reply whose outputs do not decode becomes INTERNAL)."""
    now = time.perf_counter() if received_at is None else received_at
    code = response.status.code if response.HasField("status") else OK
    message = response.status.message if response.HasField("status") else ""
    outputs: dict[str, np.ndarray] = {}
    if code == OK:
        try:
            outputs = codec.decode_all(response.outputs, max_bytes=max_bytes)
        except codec.TensorError as exc:
            code, message = grpc.StatusCode.INTERNAL.value[0], f"the cloud's output does not decode: {exc}"
    t = response.timing
    return CloudReply(
        request_id=response.request_id,
        code=code,
        message=message,
        outputs=outputs,
        queue_ms=t.queue_ms,
        compute_ms=t.compute_ms,
        decode_ms=t.decode_ms,
        batch_size=t.batch_size,
        received_at=now,
        received_unix_ns=t.received_unix_ns,
    )
