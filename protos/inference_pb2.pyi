from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    LZ4: _ClassVar[Compression]
    ZSTD: _ClassVar[Compression]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
INT8: DType
UINT8: DType
INT32: DType
INT64: DType
COMPRESSION_NONE: Compression
LZ4: Compression
ZSTD: Compression

class Quantization(_message.Message):
    __slots__ = ("scale", "zero_point", "axis")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    scale: _containers.RepeatedScalarFieldContainer[float]
    zero_point: _containers.RepeatedScalarFieldContainer[int]
    axis: int
    def __init__(self, scale: _Optional[_Iterable[float]] = ..., zero_point: _Optional[_Iterable[int]] = ..., axis: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "compression", "raw_size", "quantization", "logical_dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    compression: Compression
    raw_size: int
    quantization: Quantization
    logical_dtype: DType
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., compression: _Optional[_Union[Compression, str]] = ..., raw_size: _Optional[int] = ..., quantization: _Optional[_Union[Quantization, _Mapping]] = ..., logical_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "device_id", "model", "cut", "tensors", "sent_unix_ns", "deadline_ms", "probe", "model_sha256")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    device_id: str
    model: str
    cut: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    sent_unix_ns: int
    deadline_ms: int
    probe: bool
    model_sha256: str
    def __init__(self, request_id: _Optional[str] = ..., device_id: _Optional[str] = ..., model: _Optional[str] = ..., cut: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., sent_unix_ns: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., probe: _Optional[bool] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "decode_ms", "batch_size", "received_unix_ns")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    decode_ms: float
    batch_size: int
    received_unix_ns: int
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., received_unix_ns: _Optional[int] = ...) -> None: ...

class RequestStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "outputs", "timing", "status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    timing: Timing
    status: RequestStatus
    def __init__(self, request_id: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., status: _Optional[_Union[RequestStatus, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServedCut(_message.Message):
    __slots__ = ("model", "cut", "inputs", "model_sha256")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    model: str
    cut: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    model_sha256: str
    def __init__(self, model: _Optional[str] = ..., cut: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("cuts",)
    CUTS_FIELD_NUMBER: _ClassVar[int]
    cuts: _containers.RepeatedCompositeFieldContainer[ServedCut]
    def __init__(self, cuts: _Optional[_Iterable[_Union[ServedCut, _Mapping]]] = ...) -> None: ...
