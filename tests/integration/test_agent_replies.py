"""The agent checks what comes back: a fake cloud (a real gRPC server on 127.0.0.1:0 with our servicer's
interface) that answers with wrong outputs, and requests too large for one message."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge_agent import CLOUD, EDGE, SPLIT, EdgeAgent
from edge_agent import constants as C
from models.manifest import Bundle
from models.tiny_bundle import MID_CUT, make_tiny_bundle, sample_input
from protos import codec, serde
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests import polling

FP32_ATOL = 1e-4


class FakeCloud(pb_grpc.SplitInferenceServicer):
    """Answers probes OK and every other request by `behaviour`: "ok" (the real tail), "no_outputs",
    "wrong_shape" (a (7, 3) array), "wrong_name", "wrong_dtype"."""

    def __init__(self, tail: Path):
        self.behaviour = "ok"
        self.tail = ort.InferenceSession(str(tail), providers=["CPUExecutionProvider"])
        self.answered = 0
        self.lock = threading.Lock()

    def Infer(self, request_iterator, context) -> Iterator[pb.InferResponse]:  # noqa: N802 - gRPC's name
        for message in request_iterator:
            request = serde.request_from_proto(message)
            if request.probe:
                yield serde.reply_to_proto(serde.CloudReply(request.request_id, serde.OK, ""))
                continue
            with self.lock:
                self.answered += 1
            feeds = request.tensors.decode()
            (out,) = self.tail.run(None, feeds)
            outputs = {
                "ok": {"output": out},
                "no_outputs": {},
                "wrong_shape": {"output": np.zeros((7, 3), np.float32)},
                "wrong_name": {"logits": out},
                "wrong_dtype": {"output": out.astype(np.int32)},
            }[self.behaviour]
            response = pb.InferResponse(request_id=request.request_id)
            response.outputs.extend(codec.encode(k, v, "fp32") for k, v in outputs.items())
            yield response


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("replies") / "tiny")


@pytest.fixture()
def cloud(bundle: Path) -> Iterator[tuple[FakeCloud, str]]:
    fake = FakeCloud(Bundle.load(bundle).cut(MID_CUT).tail)  # type: ignore[arg-type]
    server = grpc.server(futures.ThreadPoolExecutor(8), options=[
        ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_SplitInferenceServicer_to_server(fake, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(C.DEFAULT_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def full_model(bundle: Path):
    sess = ort.InferenceSession(str(Bundle.load(bundle).full), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input": x})[0]


def _agent(bundle: Path, address: str) -> EdgeAgent:
    return EdgeAgent.from_bundle(bundle, address, cut=MID_CUT, head_precision="fp32", codec="fp32",
                                 deadline_ms=5000, device_id="cam1", insecure=True)  # the fake cloud is plaintext


@pytest.mark.parametrize("behaviour", ["no_outputs", "wrong_shape", "wrong_name", "wrong_dtype"])
def test_wrong_replies_are_finished_on_the_device_never_served_by_the_cloud(
    bundle: Path, cloud: tuple[FakeCloud, str], full_model, behaviour: str
) -> None:
    fake, address = cloud
    fake.behaviour = behaviour
    with _agent(bundle, address) as agent:
        assert agent.mode == SPLIT
        results = []
        for i in range(12):
            agent.wait_for_mode(SPLIT, 10.0)  # a bad reply sends it LOCAL; the probes bring it back
            x = sample_input(1 + i % 3, seed=i)
            r = agent.infer(x, timeout=30)
            results.append(r)
            np.testing.assert_allclose(r.outputs["output"], full_model(x), atol=FP32_ATOL, rtol=0)
        stats = agent.stats()
    assert all(r.served_by == EDGE for r in results)
    assert stats.served_cloud == 0 and stats.served_edge == 12
    rejected = [r for r in results if r.fallback_reason and r.fallback_reason.startswith("cloud reply rejected")]
    assert rejected and stats.extra["bad_replies"] == len(rejected) == fake.answered
    assert stats.cloud_errors >= len(rejected)


def test_correct_replies_are_served_by_the_cloud(bundle: Path, cloud: tuple[FakeCloud, str], full_model) -> None:
    fake, address = cloud
    with _agent(bundle, address) as agent:
        for i in range(4):
            x = sample_input(1 + i, seed=i)
            r = agent.infer(x, timeout=30)
            assert r.served_by == CLOUD, r.fallback_reason
            np.testing.assert_allclose(r.outputs["output"], full_model(x), atol=FP32_ATOL, rtol=0)
        assert agent.stats().served_cloud == 4 and "bad_replies" not in agent.stats().extra


def test_an_oversize_request_is_finished_on_the_device_and_the_stream_goes_on(
    bundle: Path, cloud: tuple[FakeCloud, str], full_model, monkeypatch
) -> None:
    # one row of the cut tensor is 8 KiB in fp32: with a 24 KiB message limit, batches of 3 or more are too big
    monkeypatch.setattr(C, "MAX_MESSAGE_BYTES", 24 * 1024)
    fake, address = cloud
    with _agent(bundle, address) as agent:
        futs = [agent.submit(sample_input(b, seed=i)) for i, b in enumerate([1, 4, 1, 8, 2, 1, 3, 1])]
        results = [f.result(30) for f in futs]
        polling.wait_for(lambda: agent.stats().in_flight == 0, "requests finished", 10)
        stats = agent.stats()
        assert agent.mode == SPLIT
    by_batch = [(r.outputs["output"].shape[0], r.served_by) for r in results]
    assert by_batch == [(1, CLOUD), (4, EDGE), (1, CLOUD), (8, EDGE), (2, CLOUD), (1, CLOUD), (3, EDGE), (1, CLOUD)]
    for r in results:
        if r.served_by == EDGE:
            assert "message limit" in (r.fallback_reason or "")
    assert stats.extra["oversize_requests"] == 3 and stats.reconnects == 1 and stats.fallbacks == 0
    assert fake.answered == 5
