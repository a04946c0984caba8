from protos import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LocalInferRequest(_message.Message):
    __slots__ = ("request_id", "inputs", "timeout_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[_inference_pb2.Tensor]
    timeout_ms: int
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[_inference_pb2.Tensor, _Mapping]]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class LocalTiming(_message.Message):
    __slots__ = ("queue_ms", "head_ms", "encode_ms", "network_ms", "cloud_queue_ms", "tail_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    HEAD_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TAIL_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    head_ms: float
    encode_ms: float
    network_ms: float
    cloud_queue_ms: float
    tail_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., head_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., network_ms: _Optional[float] = ..., cloud_queue_ms: _Optional[float] = ..., tail_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class LocalInferResponse(_message.Message):
    __slots__ = ("request_id", "outputs", "served_by", "cut", "timing", "fallback_reason", "status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outputs: _containers.RepeatedCompositeFieldContainer[_inference_pb2.Tensor]
    served_by: str
    cut: str
    timing: LocalTiming
    fallback_reason: str
    status: _inference_pb2.RequestStatus
    def __init__(self, request_id: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[_inference_pb2.Tensor, _Mapping]]] = ..., served_by: _Optional[str] = ..., cut: _Optional[str] = ..., timing: _Optional[_Union[LocalTiming, _Mapping]] = ..., fallback_reason: _Optional[str] = ..., status: _Optional[_Union[_inference_pb2.RequestStatus, _Mapping]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("mode", "cut", "model", "cloud_connected", "control_connected", "in_flight", "draining", "mode_reason", "input_specs")
    MODE_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLOUD_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    CONTROL_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MODE_REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_SPECS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    cut: str
    model: str
    cloud_connected: bool
    control_connected: bool
    in_flight: int
    draining: bool
    mode_reason: str
    input_specs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mode: _Optional[str] = ..., cut: _Optional[str] = ..., model: _Optional[str] = ..., cloud_connected: _Optional[bool] = ..., control_connected: _Optional[bool] = ..., in_flight: _Optional[int] = ..., draining: _Optional[bool] = ..., mode_reason: _Optional[str] = ..., input_specs: _Optional[_Iterable[str]] = ...) -> None: ...
