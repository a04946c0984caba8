"""The runtime in configs and records: the agent's runtime / providers / [provider_options] keys, the cloud's
--providers, the runners behind HeadRunner, and which runtime the named devices and plan.json say."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cloud_tier.cli import build_parser
from cloud_tier.config import ConfigError as CloudConfigError
from cloud_tier.config import ServerConfig
from edge_agent.config import AgentConfig, ConfigError
from edge_agent.runtime import (
    LITERT,
    ModelLoadError,
    OrtRunner,
    RunnerCache,
    RuntimeMissingError,
    RuntimeOptions,
    open_runner,
)
from models.ortopts import CPU_EP, OPENVINO_EP, TENSORRT_EP
from models.plandoc import SideRecord
from partitioning.devices import DEVICES, JETSON_PROVIDERS, device_table

ort = pytest.importorskip("onnxruntime")
HAVE_TRT = TENSORRT_EP in ort.get_available_providers()


def _identity(tmp_path: Path) -> Path:
    from partitioning.onnxwire import one_op_model

    path = tmp_path / "identity.onnx"
    path.write_bytes(one_op_model("Identity", [4]))
    return path


def test_agent_toml_runtime_providers_and_tensorrt_options(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(
        'bundle = "b"\nruntime = "onnxruntime"\nstate_dir = "state"\n'
        'providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]\n'
        "[provider_options.TensorrtExecutionProvider]\ntrt_fp16_enable = true\ntrt_builder_optimization_level = 3\n"
    )
    cfg = AgentConfig.from_toml(path)
    assert cfg.state_dir == tmp_path / "state"  # relative to the file
    assert cfg.provider_options == {TENSORRT_EP: {"trt_fp16_enable": True, "trt_builder_optimization_level": 3}}
    options = RuntimeOptions.from_config(cfg)
    assert options.runtime == "onnxruntime" and options.providers[0] == TENSORRT_EP
    trt = options.provider_options[TENSORRT_EP]
    assert trt["trt_fp16_enable"] == "True" and trt["trt_builder_optimization_level"] == "3"
    assert trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(tmp_path / "state" / "trt-cache")
    assert stat.S_IMODE((tmp_path / "state" / "trt-cache").stat().st_mode) == 0o700


@pytest.mark.parametrize("data,key,expected", [
    ({"runtime": "tflite"}, "runtime", "['onnxruntime', 'litert']"),
    ({"provider_options": {TENSORRT_EP: {"trt_fp16_enable": True}}}, f"provider_options.{TENSORRT_EP}",
     "not in providers"),
    ({"provider_options": {CPU_EP: 3}}, f"provider_options.{CPU_EP}", "table of options"),
    ({"provider_options": {CPU_EP: {"x": [1]}}}, f"provider_options.{CPU_EP}.x", "string, number or boolean"),
    ({"state_dir": ""}, "state_dir", "directory path"),
])
def test_bad_runtime_keys_name_the_key(data, key, expected):
    with pytest.raises(ConfigError) as info:
        AgentConfig.from_dict({"bundle": "b", **data})
    assert info.value.key == key and expected in str(info.value)


def test_an_unsafe_engine_cache_is_a_config_error(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    cfg = AgentConfig(bundle="b", providers=(TENSORRT_EP, CPU_EP),
                      provider_options={TENSORRT_EP: {"trt_engine_cache_path": str(cache)}})
    with pytest.raises(ConfigError, match="provider_options.*writable by others"):
        RuntimeOptions.from_config(cfg)


@pytest.mark.skipif(HAVE_TRT, reason="this onnxruntime has TensorRT")
def test_a_runner_on_a_missing_provider_gets_one_line(tmp_path):
    with pytest.raises(RuntimeMissingError) as info:
        OrtRunner(_identity(tmp_path), RuntimeOptions(providers=(TENSORRT_EP, CPU_EP)))
    assert "\n" not in str(info.value) and "onnxruntime-gpu" in str(info.value)
    assert isinstance(info.value, ModelLoadError)  # the agent's CLI prints it as its one error line


def test_the_onnxruntime_runner_is_a_head_runner(tmp_path):
    import numpy as np

    runner = open_runner(_identity(tmp_path), RuntimeOptions())
    assert isinstance(runner, OrtRunner) and runner.providers == (CPU_EP,)
    x = np.arange(4, dtype=np.float32)
    (name,) = runner.input_names
    out = runner.run({name: x})
    assert list(out) == list(runner.output_names)
    np.testing.assert_array_equal(next(iter(out.values())), x)
    runner.close()


def test_the_cache_keeps_one_runner_per_file_and_runtime(tmp_path):
    cache = RunnerCache(RuntimeOptions())
    path = _identity(tmp_path)
    assert cache.get(path) is cache.get(path)
    assert RuntimeOptions(runtime=LITERT).tail_options.runtime == "onnxruntime"  # local tails stay on onnxruntime
    cache.close()
    with pytest.raises(ValueError, match="runtime"):
        RuntimeOptions(runtime="tvm")


def test_litert_without_tflite_heads_names_the_conversion(tmp_path):
    """runtime = "litert" on a bundle without .tflite heads: ModelLoadError naming the conversion step."""
    pytest.importorskip("onnx", reason="the tiny bundle is built with onnx")
    from edge_agent.runtime import CutRuntime
    from models.manifest import Bundle
    from models.tiny_bundle import make_tiny_bundle

    bundle = Bundle.load(make_tiny_bundle(tmp_path / "tiny"))
    with pytest.raises(ModelLoadError, match="no LiteRT head.*--edge-runtime litert"):
        CutRuntime(bundle, "c1", "int8", RunnerCache(RuntimeOptions(runtime=LITERT)))


def test_cloud_serve_takes_providers_and_their_options(tmp_path, monkeypatch):
    args = build_parser().parse_args(["serve", "--bundles", "b", "--providers", "openvino,cpu", "--provider-option",
                                      "openvino:device_type=CPU"])
    assert args.providers == (OPENVINO_EP, CPU_EP)
    assert args.provider_option == [(OPENVINO_EP, "device_type", "CPU")]
    monkeypatch.setenv("SPLITINFER_STATE_DIR", str(tmp_path / "cloud-state"))
    cfg = ServerConfig(providers=(TENSORRT_EP, CPU_EP), provider_options={TENSORRT_EP: {"trt_fp16_enable": "True"}})
    trt = cfg.resolved_provider_options()[TENSORRT_EP]
    assert trt["trt_engine_cache_path"] == str(tmp_path / "cloud-state" / "trt-cache")
    with pytest.raises(CloudConfigError, match="not among the providers"):
        ServerConfig(providers=(CPU_EP,), provider_options={TENSORRT_EP: {}}).resolved_provider_options()
    with pytest.raises(CloudConfigError, match="--providers"):
        ServerConfig(providers="CPUExecutionProvider")  # type: ignore[arg-type]
    with pytest.raises(CloudConfigError, match="needs --providers"):
        ServerConfig(provider_options={TENSORRT_EP: {"trt_fp16_enable": "True"}})


@pytest.mark.skipif(HAVE_TRT, reason="this onnxruntime has TensorRT")
def test_a_cloud_tail_on_a_missing_provider_gets_one_line(tmp_path):
    from cloud_tier.executor import TailExecutor
    from models.ortopts import ProviderError

    with pytest.raises(ProviderError, match="TensorrtExecutionProvider is not available"):
        TailExecutor(_identity(tmp_path), providers=[TENSORRT_EP, CPU_EP])


def test_named_devices_say_which_runtime_their_estimate_assumes(capsys):
    for name, device in DEVICES.items():
        assert device.runtime in ("onnxruntime", "litert")
        assert device.providers == (JETSON_PROVIDERS if name.startswith("jetson") else (CPU_EP,))
    text = device_table()
    assert "runtime (providers)" in text.splitlines()[0]
    assert any(line.startswith("rpi4 ") and "onnxruntime (CPUExecutionProvider)" in line for line in text.splitlines())
    from partitioning.cli import main

    assert main(["--list-devices"]) == 0
    assert "jetson-orin-nano" in capsys.readouterr().out


def test_the_device_record_carries_the_runtime():
    record = SideRecord("rpi4", "estimated", "table", runtime="onnxruntime", providers=(CPU_EP,))
    doc = json.loads(json.dumps(record.to_json()))
    assert doc["runtime"] == "onnxruntime" and doc["providers"] == [CPU_EP]
    assert SideRecord.from_json(doc, "device") == record
    assert "runtime" not in SideRecord("x", "estimated", "s").to_json()  # older plans read the same



def test_the_head_choice_quotes_the_gate_of_the_runtime_that_runs_the_head() -> None:
    # The ONNX int8 head passed its gate; LiteRT's int8 .tflite failed its own, so a LiteRT agent runs head.tflite:
    # the line must quote LiteRT's gate, not the ONNX one that says it passed.
    from edge_agent.runtime import ONNXRUNTIME, head_choice

    onnx_gate = {"metric": "top1_agreement", "value": 0.99, "passed": True}
    litert_gate = {"metric": "top1_agreement", "value": 0.41, "passed": False}
    plan = {"verification": {"cuts": {"c1": {"int8": onnx_gate, "litert": {"int8": litert_gate}}}}}
    assert head_choice(plan, "c1", "int8", False, LITERT) == \
        "fp32 head (the int8 head failed its gate: top1_agreement 0.410)"
    assert head_choice(plan, "c1", "int8", True, ONNXRUNTIME) == "int8 head (passed its gate: top1_agreement 0.990)"
    assert head_choice({"verification": {"cuts": {"c1": {"int8": onnx_gate}}}}, "c1", "int8", False, LITERT) == \
        "fp32 head (the bundle has no int8 head for this cut)"
