"""Execution-provider plumbing (models/ortopts.py): provider lists and options, TensorRT's engine cache, and the
one line a provider that is not installed gets, on the agent, the profiler and the cloud."""

from __future__ import annotations

import os
import stat

import pytest

from models.ortopts import (
    CPU_EP,
    OPENVINO_EP,
    TENSORRT_EP,
    ProviderError,
    ProviderSpecError,
    check_providers,
    option_strings,
    parse_provider_option,
    parse_providers,
    private_dir,
    provider_options_from,
    resolve_provider_options,
)

ort = pytest.importorskip("onnxruntime")
HAVE_TRT = TENSORRT_EP in ort.get_available_providers()


def test_provider_lists_take_full_and_short_names():
    assert parse_providers("openvino, cpu") == (OPENVINO_EP, CPU_EP)
    assert parse_providers("TensorrtExecutionProvider,CUDAExecutionProvider") == (
        TENSORRT_EP, "CUDAExecutionProvider")
    with pytest.raises(ProviderSpecError, match="comma-separated"):
        parse_providers(" , ")


def test_provider_options_parse_and_group():
    items = [parse_provider_option("trt:trt_fp16_enable=True"),
             parse_provider_option("TensorrtExecutionProvider:trt_max_workspace_size = 2147483648"),
             parse_provider_option("openvino:device_type=CPU")]
    assert provider_options_from(items) == {
        TENSORRT_EP: {"trt_fp16_enable": "True", "trt_max_workspace_size": "2147483648"},
        OPENVINO_EP: {"device_type": "CPU"}}
    for bad in ("trt_fp16_enable=True", "tensorrt:", "tensorrt:=1"):
        with pytest.raises(ProviderSpecError, match="PROVIDER:KEY=VALUE"):
            parse_provider_option(bad)


def test_option_values_become_onnxruntime_strings():
    assert option_strings({"a": True, "b": False, "c": 3, "d": 0.5, "e": "x"}) == {
        "a": "True", "b": "False", "c": "3", "d": "0.5", "e": "x"}
    with pytest.raises(ValueError, match="'f'"):
        option_strings({"f": [1, 2]})


def test_tensorrt_engine_cache_is_on_by_default_in_a_private_state_folder(tmp_path):
    state = tmp_path / "state"
    got = resolve_provider_options([TENSORRT_EP, CPU_EP], {TENSORRT_EP: {"trt_fp16_enable": True}}, state)
    cache = state / "trt-cache"
    assert got[TENSORRT_EP] == {"trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                                "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "True",
                                "trt_timing_cache_path": str(cache)}
    assert got[CPU_EP] == {}
    assert cache.is_dir() and stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_tensorrt_cache_settings_given_win_and_off_creates_nothing(tmp_path):
    mine = tmp_path / "engines"
    got = resolve_provider_options([TENSORRT_EP], {TENSORRT_EP: {"trt_engine_cache_path": str(mine)}},
                                   tmp_path / "state")
    assert got[TENSORRT_EP]["trt_engine_cache_path"] == str(mine) and mine.is_dir()
    off = resolve_provider_options([TENSORRT_EP], {TENSORRT_EP: {"trt_engine_cache_enable": False,
                                                                 "trt_timing_cache_enable": False}},
                                   tmp_path / "state2")
    assert off[TENSORRT_EP]["trt_engine_cache_enable"] == "False"
    assert not (tmp_path / "state2").exists()


def test_an_engine_cache_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ProviderError, match="writable by others.*chmod go-w"):
        private_dir(shared)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ProviderError, match="symlink"):
        private_dir(link)


def test_options_for_a_provider_not_in_the_list_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="TensorrtExecutionProvider.*not among the providers"):
        resolve_provider_options([CPU_EP], {TENSORRT_EP: {"trt_fp16_enable": True}}, tmp_path)


@pytest.mark.skipif(HAVE_TRT, reason="this onnxruntime has TensorRT")
def test_a_missing_tensorrt_provider_is_one_line_naming_the_jetpack_wheel():
    with pytest.raises(ProviderError) as info:
        check_providers([TENSORRT_EP, CPU_EP])
    message = str(info.value)
    assert "\n" not in message
    assert f"{TENSORRT_EP} is not available in this onnxruntime {ort.__version__}" in message
    assert "JetPack's onnxruntime-gpu wheel" in message and "pip install onnxruntime-gpu" in message


def test_a_missing_openvino_provider_is_one_line_naming_the_extra():
    try:
        check_providers([OPENVINO_EP])
    except ProviderError as exc:
        message = str(exc)
        assert "\n" not in message
        assert 'pip install "splitinfer[openvino]"' in message or "found no" in message
    else:
        pytest.skip("OpenVINO is usable here (tests/integration/test_openvino.py covers it)")


def test_an_unknown_provider_is_one_line(tmp_path):
    with pytest.raises(ProviderError, match=r"^execution provider NoSuchExecutionProvider is not available"):
        check_providers(["NoSuchExecutionProvider"])

