"""Shared fixtures: a temp state dir for the servers tests start, zoo models converted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory):
    """Servers started by the tests (in process or as subprocesses) keep their fleet DB in a temp dir."""
    import os

    old = os.environ.get("SPLITINFER_STATE_DIR")
    os.environ["SPLITINFER_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("SPLITINFER_STATE_DIR", None)
    else:
        os.environ["SPLITINFER_STATE_DIR"] = old


@pytest.fixture(scope="session")
def zoo_onnx(tmp_path_factory):
    """zoo_onnx(name) -> path of that zoo model's normalized ONNX, converted once per session."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("zoo")

    def get(name: str) -> Path:
        if name not in cache:
            import torch

            from models.convert import to_onnx
            from models.zoo import build_zoo_model, zoo_entry

            entry = zoo_entry(name)
            cache[name] = to_onnx(build_zoo_model(name), (torch.randn(*entry.input_shape),), root / f"{name}.onnx")
        return cache[name]

    return get

