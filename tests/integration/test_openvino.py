"""OpenVINO under onnxruntime, end to end on this CPU: heads, profiling and cloud tails on the OpenVINO execution
provider give what the CPU provider gives.

Runs where onnxruntime can use OpenVINOExecutionProvider: the plugin package (`pip install "splitinfer[openvino]"`,
Intel CPUs) or the onnxruntime-openvino build in an environment of its own (any x86-64 CPU). Elsewhere every
test here is skipped with the one line saying what to install.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.ortopts import CPU_EP, OPENVINO_EP, ProviderError, check_providers

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx", reason="the tiny bundle is built with onnx")
try:
    check_providers([OPENVINO_EP])
except ProviderError as exc:
    pytest.skip(str(exc), allow_module_level=True)

from edge_agent.config import AgentConfig  # noqa: E402
from edge_agent.runtime import CutRuntime, RunnerCache, RuntimeOptions  # noqa: E402
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle  # noqa: E402
from models.tiny_bundle import make_tiny_bundle, sample_input  # noqa: E402

PROVIDERS = (OPENVINO_EP, CPU_EP)
FP32_ATOL = 1e-4  # OpenVINO's CPU plugin orders float sums its own way
# The int8 tolerances of tests/unit/test_agent_runtime.py (CPU provider: 0.02 and 0.14 worst; OpenVINO: 0.01, 0.14)
INT8_HEAD_ATOL = 0.03
INT8_FULL_ATOL = 0.3


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return Bundle.load(make_tiny_bundle(tmp_path_factory.mktemp("openvino") / "tiny"))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    config = AgentConfig(bundle="unused", providers=PROVIDERS, state_dir=tmp_path_factory.mktemp("state"))
    return RunnerCache(RuntimeOptions()), RunnerCache(RuntimeOptions.from_config(config))


@pytest.mark.parametrize("cut", ["c1", EDGE_ONLY, CLOUD_ONLY])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_an_openvino_head_and_tail_equal_the_cpu_provider(bundle, caches, cut, precision):
    """fp32: the cut tensors and outputs equal the CPU provider's. int8: OpenVINO's int8 kernels round
    requantization their own way (a few cut-tensor elements land a step or more apart), so the outputs are held
    to the gate the CPU provider's int8 head meets: the full fp32 model within the agent's int8 tolerance."""
    cpu_cache, ov_cache = caches
    cpu = CutRuntime(bundle, cut, precision, cpu_cache)
    ov = CutRuntime(bundle, cut, precision, ov_cache)
    if ov.head is not None:
        assert ov.head.providers[0] == OPENVINO_EP  # type: ignore[attr-defined]
    x = {"input": sample_input(batch=16)}
    got = ov.run_tail(ov.run_head(x))["output"]
    if precision == "fp32" or cut == CLOUD_ONLY:
        want = cpu.run_head(x)
        for name, acts in ov.run_head(x).items():
            np.testing.assert_allclose(acts, want[name], atol=FP32_ATOL)
        np.testing.assert_allclose(got, cpu.run_tail(want)["output"], atol=FP32_ATOL)
    else:
        full = ort.InferenceSession(str(bundle.full), providers=[CPU_EP]).run(None, x)[0]
        np.testing.assert_allclose(got, full, atol=INT8_FULL_ATOL if cut == EDGE_ONLY else INT8_HEAD_ATOL)


def test_profiling_on_openvino_records_the_provider(bundle, tmp_path, capsys):
    from partitioning.cli import main

    profile_path = tmp_path / "ov-profile.json"
    status = main([str(bundle.full), "--device", "local", "--cloud", "local", "--providers", "openvino,cpu",
                   "--save-device-profile", str(profile_path), "--repeats", "3", "--measure-seconds", "0",
                   "--refine", "0", "--json", "-q"])
    assert status == 0
    saved = json.loads(profile_path.read_text())
    assert saved["host"]["providers"] == list(PROVIDERS) and saved["host"]["runtime"] == "onnxruntime"
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"]["runtime"] == "onnxruntime" and plan["device"]["providers"] == list(PROVIDERS)
    assert OPENVINO_EP in plan["device"]["source"]


def test_measured_costs_on_openvino_are_spread_over_the_nodes(bundle):
    from partitioning.costs import measure_node_costs

    costs = measure_node_costs(bundle.full, providers=PROVIDERS, repeats=3, warmup=1, min_seconds=0)
    assert OPENVINO_EP in costs.source
    assert costs.total_ms() > 0
    assert sum(1 for ms in costs.per_node_ms.values() if ms > 0) >= len(costs.per_node_ms) // 2


def test_cloud_tails_on_openvino(bundle):
    from cloud_tier.executor import ModelRegistry

    cpu = ModelRegistry.load(bundle.root, prefer_gpu=False)
    ov = ModelRegistry.load(bundle.root, providers=PROVIDERS)
    tail = ov.lookup(bundle.model_name, "c1", bundle.model_sha256)
    assert tail.executor.providers[0] == OPENVINO_EP
    head = CutRuntime(bundle, "c1", "fp32", RunnerCache(RuntimeOptions()))
    acts = head.run_head({"input": sample_input(batch=2)})
    want = cpu.lookup(bundle.model_name, "c1", bundle.model_sha256).executor.run(acts)
    got = tail.executor.run(acts)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-3)


def test_sessions_get_their_provider_options(bundle):
    from models.ortopts import make_session

    session = make_session(bundle.full, providers=PROVIDERS, provider_options={OPENVINO_EP: {"device_type": "CPU"}})
    assert session.get_providers()[0] == OPENVINO_EP
    assert session.get_provider_options()[OPENVINO_EP].get("device_type", "CPU") == "CPU"


def test_an_agent_with_an_openvino_head_through_an_openvino_cloud(bundle, tmp_path):
    """The agent's head on OpenVINO, the cloud's tails on OpenVINO (a CPU-only cloud node), results those of
    the full model; the same agent finishing on the device (its local tail) when the cut is edge-only."""
    from cloud_tier.server import CloudServer
    from edge_agent import CLOUD, EDGE, EdgeAgent

    server = CloudServer(bundle.root, "127.0.0.1", 0, insecure=True, providers=PROVIDERS)
    server.start()
    full = ort.InferenceSession(str(bundle.full), providers=[CPU_EP])
    try:
        for cut, served_by in (("c1", CLOUD), (EDGE_ONLY, EDGE)):
            with EdgeAgent.from_bundle(bundle.root, server.address, cut=cut, head_precision="fp32", codec="fp32",
                                       insecure=True, providers=PROVIDERS, state_dir=tmp_path) as agent:
                x = sample_input(batch=1, seed=3)
                result = agent.infer(x, timeout=10)
                assert result.served_by == served_by, result.fallback_reason
                np.testing.assert_allclose(result.output, full.run(None, {"input": x})[0], atol=FP32_ATOL)
    finally:
        server.stop(grace=1.0)
