"""Making the TFLite converter's environment: every step has a deadline, and running past it is one clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from partitioning import tflite


def test_a_venv_step_that_runs_past_its_deadline_is_one_clear_error(tmp_path, monkeypatch):
    seen: list[float | None] = []

    def run(cmd, **kwargs):  # stands in for the interpreter that hangs: no process is started
        seen.append(kwargs.get("timeout"))
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout") or 0)

    monkeypatch.setattr(tflite, "find_python", lambda explicit=None: sys.executable)
    monkeypatch.setattr(tflite.subprocess, "run", run)
    with pytest.raises(tflite.ConverterUnavailableError, match=r"timed out after 600 s; make it yourself: "):
        tflite.ensure_converter(tmp_path / "env")
    assert seen == [600]
