"""LocalClient's reading of gRPC errors (no sockets: the errors are built here)."""

from __future__ import annotations

import grpc

from edge_agent.local_client import _error


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_call_the_service_cancels_while_stopping_reads_unavailable_and_not_run() -> None:
    # A drained service finishes every request it admitted; what gRPC cancels at shutdown never ran.
    err = _error(_Rpc(grpc.StatusCode.CANCELLED, "CANCELLED"))
    assert err.code == "UNAVAILABLE" and "before running the request" in str(err) and "safe to retry" in str(err)


def test_other_statuses_keep_their_code_and_message() -> None:
    err = _error(_Rpc(grpc.StatusCode.INVALID_ARGUMENT, "input: shape [3]; the model expects: input float32 [N, 3]"))
    assert err.code == "INVALID_ARGUMENT" and "the model expects" in str(err)
