"""protos.serde, protos.address and protos.validate: the wire's conversions and the shared checkers."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from models.validate import FieldError, check_int, check_number
from protos import inference_pb2 as pb
from protos import serde
from protos.address import AddressError, format_address, parse_address
from protos.serde import CloudReply, CloudRequest


def test_status_table_round_trips_every_code():
    for code in grpc.StatusCode:
        number = serde.status_number(code)
        assert serde.status_name(number) == code.name and serde.status_code(number) is code
        assert serde.status_number(code.name) == number
    assert serde.status_name(999) == "999" and serde.status_code(999) is None and serde.OK == 0


def test_request_round_trip_keeps_fields_and_tensors():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    req = CloudRequest("r1", "dev-1", "tiny", "c1", serde.encode_tensors({"act": x}, "fp32"), deadline_ms=250,
                       probe=True, sent_unix_ns=7, model_sha256="ab" * 32)
    msg = serde.request_to_proto(req)
    assert isinstance(msg, pb.InferRequest) and msg.sent_unix_ns == 7
    back = serde.request_from_proto(pb.InferRequest.FromString(msg.SerializeToString()))
    assert (back.request_id, back.device_id, back.model, back.cut, back.deadline_ms, back.probe) == \
        ("r1", "dev-1", "tiny", "c1", 250, True)
    assert back.model_sha256 == "ab" * 32  # with the cut, the hash names the tail
    assert serde.request_from_proto(serde.request_to_proto(CloudRequest("r2", "d", "m", "c"))).model_sha256 == ""
    assert back.tensors.wire_bytes == req.tensors.wire_bytes == x.nbytes
    np.testing.assert_array_equal(back.tensors.decode()["act"], x)
    assert serde.request_to_proto(CloudRequest("r2", "d", "m", "c")).sent_unix_ns > 0  # stamped when unset


def test_prepare_builds_the_message_once_before_sending():
    x = np.arange(12, dtype=np.float32).reshape(1, 12)
    req = CloudRequest("r1", "cam1", "m", "c1", serde.encode_tensors({"act": x}, "fp32"), sent_unix_ns=5)
    assert serde.request_to_proto(req) is not serde.request_to_proto(req)  # unprepared: built on each call
    prepared = serde.prepare(req)
    message = serde.request_to_proto(prepared)
    assert message is serde.request_to_proto(prepared) and message.sent_unix_ns == 5


def test_reply_round_trip_ok_and_error():
    y = np.ones((1, 2), np.float32)
    ok = CloudReply("r1", serde.OK, "", {"y": y}, queue_ms=1.0, compute_ms=2.0, decode_ms=0.5, batch_size=3,
                    received_unix_ns=9)
    back = serde.reply_from_proto(serde.reply_to_proto(ok), received_at=4.0)
    assert back.ok and back.batch_size == 3 and back.received_at == 4.0 and back.received_unix_ns == 9
    assert back.cloud_ms == pytest.approx(3.5)
    np.testing.assert_array_equal(back.outputs["y"], y)
    err = serde.reply_to_proto(CloudReply("r2", serde.status_number("NOT_FOUND"), "no such cut", {"y": y}))
    assert not err.outputs and err.status.message == "no such cut"
    back = serde.reply_from_proto(err)
    assert not back.ok and serde.status_name(back.code) == "NOT_FOUND" and back.outputs == {}


def test_parse_address():
    assert parse_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_address("[::1]:50051") == ("::1", 50051)
    assert format_address("::1", 8) == "[::1]:8" and format_address("h", 8) == "h:8"
    for bad in ("nohost", "h:0", "h:70000", "::1:80", "", "h:"):
        with pytest.raises(AddressError, match="--broker .* is invalid: expected HOST:PORT"):
            parse_address(bad, "--broker")


def test_checkers_name_the_key():
    with pytest.raises(FieldError, match=r"key 'n': expected an integer in \[1, 3\], got 4") as err:
        check_int("n", 4, 1, 3)
    assert err.value.key == "n"
    with pytest.raises(FieldError, match="expected a number > 0.0"):
        check_number("x", 0, 0.0, lo_open=True)
    with pytest.raises(FieldError, match="expected a number"):
        check_number("x", float("nan"))


def test_served_cuts_carry_the_model_hash_and_long_hashes_are_refused():
    answer = serde.served_cuts_to_proto([("m", "c1", ["act"], "ab" * 32)])
    assert [(c.model, c.cut, list(c.inputs), c.model_sha256) for c in answer.cuts] == [("m", "c1", ["act"], "ab" * 32)]
    problem = serde.field_error(CloudRequest("r", "d", "m", "c", model_sha256="x" * (serde.MAX_ID_CHARS + 1)))
    assert problem is not None and problem.startswith("model_sha256 is")
