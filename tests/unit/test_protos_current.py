"""The committed generated protos match a fresh generation from protos/*.proto."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (the [dev] extra) regenerates the protos")

from protos import PROTO_FILES  # noqa: E402
from protos.generate import REPO_ROOT, generate, generated_paths  # noqa: E402


def test_generated_protos_are_current(tmp_path: Path) -> None:
    from grpc_tools.grpc_version import VERSION

    from protos import inference_pb2_grpc

    if VERSION != inference_pb2_grpc.GRPC_GENERATED_VERSION:
        pytest.skip(f"grpcio-tools {VERSION} differs from the {inference_pb2_grpc.GRPC_GENERATED_VERSION} that made "
                    "the committed protos; pin grpcio-tools to compare byte for byte")
    generate(tmp_path)
    for proto in PROTO_FILES:
        for rel in generated_paths(proto):
            committed = REPO_ROOT / rel
            assert committed.is_file(), f"{rel} is missing; run `python -m protos.generate`"
            assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
                f"{rel} is stale; run `python -m protos.generate`"
            )


def test_proto_path_is_import_path() -> None:
    from protos import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.name == "protos/inference.proto"
    assert inference_pb2.DESCRIPTOR.package == "splitinfer.v1"
    assert hasattr(inference_pb2_grpc, "SplitInferenceServicer")
