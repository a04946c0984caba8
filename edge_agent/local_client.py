"""`LocalClient`: an application's side of the agent service's local inference API (protos/local.proto).

    from edge_agent.local_client import LocalClient

    with LocalClient() as agent:                          # the default socket /run/splitinfer-agent/agent.sock
        result = agent.infer(frame, timeout=1.0)          # one array (one-input model) or {name: array}
        print(result.output.shape, result.served_by, result.timing["total_ms"])
        for r in agent.stream(frames):                    # many in, answers as they finish (match by request_id)
            ...
        print(agent.health())

Needs only grpcio, numpy and the protos (no onnxruntime): it runs in the application's own environment.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
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


def _request(arrays: Mapping[str, Any], request_id: str = "") -> lpb.LocalInferRequest:
    tensors = [codec.encode(name, np.ascontiguousarray(arr)) for name, arr in arrays.items()]
    return lpb.LocalInferRequest(request_id=request_id, inputs=tensors)


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
    return LocalError(code.name if code is not None else "UNKNOWN", details or "")


class LocalClient:
    """A channel to `split-agent serve`: `socket` (a path) or `address` ("127.0.0.1:PORT"), not both."""

    def __init__(self, socket: str | None = None, address: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, input_name: str | None = None):
        if socket is not None and address is not None:
            raise ValueError("give socket or address, not both")
        target = address if address is not None else f"unix:{socket or DEFAULT_SOCKET}"
        self.target = target
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self._channel = grpc.insecure_channel(target, options=options)  # local only: a socket or loopback
        self._stub = lpb_grpc.LocalInferenceStub(self._channel)
        self._input_name = input_name
        self._ids = itertools.count(1)

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
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

    def infer(self, x: Any, timeout: float | None = None, request_id: str = "") -> LocalResult:
        """One request: an array (one-input model) or {name: array}; LocalError when refused or failed."""
        try:
            resp = self._stub.Infer(_request(self._named(x), request_id),
                                    timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _result(resp)

    def stream(self, inputs: Iterable[Any], timeout: float | None = None,
               raise_errors: bool = True) -> Iterator[LocalResult | LocalError]:
        """Send every input on one stream; yield answers as they finish (match them by request_id: "1", "2", ...
        in input order). A refused request raises its LocalError, or is yielded when not raise_errors. `timeout`
        bounds the whole stream."""
        name = None if self._input_name is None else self._input_name

        def requests() -> Iterator[lpb.LocalInferRequest]:
            for i, x in zip(itertools.count(1), inputs):
                yield _request(x if isinstance(x, Mapping) else {name or self._input(): x}, str(i))

        if name is None:
            self._input()
        call = self._stub.InferStream(requests(), timeout=self.timeout if timeout is None else timeout)
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
