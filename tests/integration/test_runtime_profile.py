"""split-profile --providers: the providers measured on reach the saved device profile and plan.json (the
profiler starts a subprocess, hence an integration test)."""

from __future__ import annotations

import json

import pytest

from models.ortopts import CPU_EP

pytest.importorskip("onnx", reason="the tiny bundle is built with onnx")


def test_split_profile_records_the_providers_it_measured_on(tmp_path, capsys):
    """--providers reaches the measurement and lands in the saved device profile and plan.json's device record
    (CPU here; tests/integration/test_openvino.py does the same on OpenVINO)."""
    from models.tiny_bundle import make_tiny_bundle
    from partitioning.cli import main

    full = make_tiny_bundle(tmp_path / "tiny") / "full.onnx"
    saved = tmp_path / "profile.json"
    assert main([str(full), "--device", "local", "--cloud", "t4", "--providers", "cpu", "--save-device-profile",
                 str(saved), "--repeats", "3", "--measure-seconds", "0", "--json", "-q"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"]["runtime"] == "onnxruntime" and plan["device"]["providers"] == [CPU_EP]
    host = json.loads(saved.read_text())["host"]
    assert host["runtime"] == "onnxruntime" and host["providers"] == [CPU_EP]
    assert main([str(full), "--device", str(saved), "--cloud", "t4", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["device"]["providers"] == [CPU_EP]  # a saved profile keeps them


def test_a_provider_that_is_not_installed_is_a_user_error_not_an_internal_one(tmp_path, capsys):
    import onnxruntime as ort

    from models.tiny_bundle import make_tiny_bundle
    from partitioning.cli import main

    if "OpenVINOExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has OpenVINO")
    full = make_tiny_bundle(tmp_path / "tiny") / "full.onnx"
    assert main([str(full), "--device", "local", "--cloud", "t4", "--providers", "openvino,cpu", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("split-profile: error: ") and "internal error" not in err and "pip install" in err
    assert err.count("\n") == 0


def test_litert_heads_planned_on_a_named_device_say_the_costs_assume_another_runtime(tmp_path, capsys):
    from models.tiny_bundle import make_tiny_bundle
    from partitioning.cli import main

    full = make_tiny_bundle(tmp_path / "tiny") / "full.onnx"
    assert main([str(full), "--device", "rpi4", "--cloud", "t4", "--edge-runtime", "litert", "--json", "-q"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "not LiteRT" in line]
    assert len(warned) == 1 and warned[0].startswith("split-profile: warning: the edge costs assume onnxruntime")
