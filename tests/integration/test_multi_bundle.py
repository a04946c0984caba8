"""One cloud, several bundles: tails are identified by (model hash, cut), not by model name.

- The same model profiled for two devices (two bundles of one model, different chosen cuts, the second one as
  a profile for a device whose best plan sends the raw input): both devices' cuts are served, and identical tail
  files are loaded once.
- Two different models that share a name (both saved as `model`): each agent gets its own model's tail.
- A request without a hash (an older agent) is served by name when one model has that name, and refused with
  INVALID_ARGUMENT naming the hashes when several do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cloud_tier.executor import ModelRegistry
from cloud_tier.server import CloudServer
from edge_agent import CLOUD, SPLIT, EdgeAgent
from models.manifest import CLOUD_ONLY, PLAN_FILE, Bundle
from models.tiny_bundle import MID_CUT, make_tiny_bundle, sample_input
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos import serde
from protos.serde import CloudRequest
from tests.pki import device_tls
from tests.polling import wait_for

SPLIT_ATOL = 0.03  # int8 head and codec against full.onnx in fp32 (see test_agent_split.py)
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bundles/: tiny for two devices (chosen c1 and cloud-only), and two different models both named `model`."""
    root = tmp_path_factory.mktemp("multi")
    make_tiny_bundle(root / "tiny-pi")
    make_tiny_bundle(root / "tiny-orin")
    plan = json.loads((root / "tiny-orin" / PLAN_FILE).read_text())
    plan["chosen"], plan["device"] = CLOUD_ONLY, "other-device"  # what profiling for another device may choose
    (root / "tiny-orin" / PLAN_FILE).write_text(json.dumps(plan))
    make_tiny_bundle(root / "cam-a", model_name="model", seed=1)
    make_tiny_bundle(root / "cam-b", model_name="model", seed=2)
    return root


@pytest.fixture(scope="module")
def server(bundles: Path):
    srv = CloudServer(bundles, "127.0.0.1", 0, max_wait_ms=2.0)
    srv.start()
    yield srv
    srv.stop(grace=1.0)


def _full(bundle: Path):
    sess = ort.InferenceSession(str(Bundle.load(bundle).full))
    return lambda x: sess.run(None, {"input": x})[0]


def test_the_registry_keys_tails_by_model_hash_and_loads_identical_tails_once(bundles: Path) -> None:
    registry = ModelRegistry.load(bundles)
    pi, orin = Bundle.load(bundles / "tiny-pi"), Bundle.load(bundles / "tiny-orin")
    a, b = Bundle.load(bundles / "cam-a"), Bundle.load(bundles / "cam-b")
    assert pi.model_sha256 == orin.model_sha256 and a.model_sha256 != b.model_sha256
    assert {(t.model, t.cut) for t in registry.served()} == {
        (name, cut) for name in ("tiny", "model", "model") for cut in (MID_CUT, CLOUD_ONLY)}
    assert len(registry.served()) == 6  # tiny's c1 and cloud-only once for both bundles; each `model` twice
    tiny = registry.lookup("tiny", MID_CUT, pi.model_sha256)
    assert registry.lookup("tiny", MID_CUT) is tiny and tiny.label == "tiny"  # one model of that name
    labels = {registry.lookup("model", MID_CUT, h).label for h in (a.model_sha256, b.model_sha256)}
    assert labels == {f"model@{a.model_sha256[:8]}", f"model@{b.model_sha256[:8]}"}
    # Identical tail files share one onnxruntime session: tiny-orin's tails are tiny-pi's, so they add none.
    assert len({id(t.executor) for t in registry.served()}) == 6


def test_agents_of_each_bundle_get_their_cut_served_by_one_cloud(bundles: Path, server: CloudServer) -> None:
    x = sample_input(2)
    for name, cut in (("tiny-pi", MID_CUT), ("tiny-orin", CLOUD_ONLY), ("cam-a", MID_CUT), ("cam-b", MID_CUT)):
        with EdgeAgent.from_bundle(bundles / name, server.address, device_id=f"mb-{name}", tls=device_tls(f"mb-{name}"),
                                   connect_timeout_s=2.0, probe_count=1) as agent:
            wait_for(lambda a=agent: a.mode == SPLIT, f"{name}'s agent in split mode")
            assert agent.cut == cut
            result = agent.infer(x)
            assert result.served_by == CLOUD, (name, result.fallback_reason)
            assert result.cut == cut
            np.testing.assert_allclose(result.output, _full(bundles / name)(x), atol=SPLIT_ATOL)
    by_cut = server.counters.by_cut() if server.counters else {}
    a, b = (Bundle.load(bundles / n).model_sha256[:8] for n in ("cam-a", "cam-b"))
    for label, cut in (("tiny", MID_CUT), ("tiny", CLOUD_ONLY), (f"model@{a}", MID_CUT), (f"model@{b}", MID_CUT)):
        assert by_cut.get((label, cut, "OK"), 0) >= 1, (label, cut, by_cut)


def test_a_request_without_a_hash_is_served_by_an_unambiguous_name_only(bundles: Path, server: CloudServer,
                                                                         device_channel) -> None:
    act = serde.encode_tensors({"relu1": np.zeros((1, 8, 16, 16), np.float32)}, "fp32")

    def ask(model: str, sha: str = "") -> pb.InferResponse:
        request = serde.request_to_proto(CloudRequest("r", "mb-old", model, MID_CUT, act, model_sha256=sha))
        with device_channel(server.address, "mb-old") as channel:
            stub = pb_grpc.SplitInferenceStub(channel)
            return next(iter(stub.Infer(iter([request]), timeout=DEADLINE_S)))

    assert ask("tiny").status.code == serde.OK  # one model named tiny: found by name
    refused = ask("model")
    hashes = sorted(Bundle.load(bundles / n).model_sha256 for n in ("cam-a", "cam-b"))
    assert refused.status.code == serde.status_number("INVALID_ARGUMENT")
    assert all(h in refused.status.message for h in hashes) and "model_sha256" in refused.status.message
    assert ask("model", hashes[1]).status.code == serde.OK
    unknown = ask("model", "f" * 64)
    assert unknown.status.code == serde.status_number("NOT_FOUND") and "not served" in unknown.status.message
    with device_channel(server.address, "mb-old") as channel:
        listed = pb_grpc.SplitInferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=DEADLINE_S)
    assert {(c.model, c.model_sha256) for c in listed.cuts if c.cut == MID_CUT} == {
        ("tiny", Bundle.load(bundles / "tiny-pi").model_sha256), ("model", hashes[0]), ("model", hashes[1])}
