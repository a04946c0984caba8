"""ProfileOptions: the one typed value of split-profile's settings; the CLI builds it from its arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from partitioning.cli import build_parser, options_from_args
from partitioning.options import ProfileOptions


def test_the_cli_builds_the_options_its_arguments_say() -> None:
    args = build_parser().parse_args(["m.onnx", "--device", "rpi4", "--uplink-mbps", "5", "--codec", "fp16",
                                      "--out", "b", "--refine", "0", "--threads", "2"])
    assert options_from_args(args) == ProfileOptions(device="rpi4", network=None, uplink_mbps=5.0, codec="fp16",
                                                     out=Path("b"), refine=0, threads=2)
    assert options_from_args(build_parser().parse_args(["m.onnx"])) == ProfileOptions()


def test_options_are_checked_and_derive_the_budgets() -> None:
    with pytest.raises(ValueError, match="refine"):
        ProfileOptions(refine=-1)
    with pytest.raises(ValueError, match="measure_seconds"):
        ProfileOptions(measure_seconds=-0.5)
    opts = ProfileOptions(max_latency_ms=50, objective="energy", threads=1)
    assert (opts.budgets.max_latency_ms, opts.budgets.objective) == (50, "energy")
    assert opts.cloud_measure_threads == 1 and ProfileOptions(threads=1, cloud_threads=4).cloud_measure_threads == 4
    assert ProfileOptions().both_local and not ProfileOptions(device="rpi4").both_local


def test_provider_options_need_their_provider_among_the_providers() -> None:
    # Measuring applies options only to the providers it runs (models.ortopts.make_session), so options for
    # another provider, or with no --providers at all, would be dropped without a word.
    with pytest.raises(ValueError, match="provider_options.*TensorrtExecutionProvider"):
        ProfileOptions(provider_options={"TensorrtExecutionProvider": {"trt_fp16_enable": "True"}})
    with pytest.raises(ValueError, match="provider_options.*OpenVINOExecutionProvider"):
        options_from_args(build_parser().parse_args(["m.onnx", "--providers", "cpu",
                                                     "--provider-option", "openvino:num_of_threads=2"]))
    opts = options_from_args(build_parser().parse_args(["m.onnx", "--providers", "openvino,cpu",
                                                        "--provider-option", "openvino:num_of_threads=2"]))
    assert opts.provider_options == {"OpenVINOExecutionProvider": {"num_of_threads": "2"}}
