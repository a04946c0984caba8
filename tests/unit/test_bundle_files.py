"""Bundle files must be regular files inside the bundle: symlinks, and paths resolving outside, are refused
(models.manifest.Bundle.load is what the edge agent and the cloud tier both load bundles with)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from models.manifest import PLAN_FILE, Bundle, BundleError

pytest.importorskip("onnx", reason="needs the [profile] extra (onnx) to build the test bundle")
pytestmark = pytest.mark.needs_profile

from models.tiny_bundle import make_tiny_bundle  # noqa: E402


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle_files") / "tiny")


@pytest.fixture()
def bundle(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "tiny"))


def test_a_pristine_bundle_loads(bundle: Path) -> None:
    assert Bundle.load(bundle).model_name == "tiny"


def test_a_bundle_file_that_is_a_symlink_is_refused_even_with_the_same_content(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(bundle / "tail.onnx", outside)  # same bytes: the sha256 in plan.json still matches
    (bundle / "tail.onnx").unlink()
    os.symlink(outside, bundle / "tail.onnx")
    with pytest.raises(BundleError, match="symbolic link"):
        Bundle.load(bundle)


def test_a_symlink_inside_the_bundle_is_refused_too(bundle: Path) -> None:
    (bundle / "tail.onnx").rename(bundle / "real_tail.onnx")
    os.symlink("real_tail.onnx", bundle / "tail.onnx")
    with pytest.raises(BundleError, match="symbolic link"):
        Bundle.load(bundle)


def test_a_directory_symlink_on_the_way_is_refused(bundle: Path, tmp_path: Path) -> None:
    plan = json.loads((bundle / PLAN_FILE).read_text())
    cuts = plan["artifacts"]["cuts"]
    moved = [c for c in cuts.values() if c.get("tail") and c["tail"]["file"].startswith("cuts/")]
    if not moved:  # the tiny bundle keeps every cut at the top: put one under a linked folder
        c = next(c for c in cuts.values() if c.get("tail") and c["tail"]["file"] == "tail.onnx")
        (tmp_path / "outside").mkdir()
        shutil.copyfile(bundle / "tail.onnx", tmp_path / "outside" / "tail.onnx")
        os.symlink(tmp_path / "outside", bundle / "linked")
        c["tail"]["file"] = "linked/tail.onnx"
        (bundle / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(BundleError, match="symbolic link"):
        Bundle.load(bundle)


def test_a_plan_that_is_a_symlink_is_refused(bundle: Path, tmp_path: Path) -> None:
    (bundle / PLAN_FILE).rename(tmp_path / "plan.json")
    os.symlink(tmp_path / "plan.json", bundle / PLAN_FILE)
    with pytest.raises(BundleError, match="symbolic link"):
        Bundle.load(bundle)


def test_a_bundle_reached_through_a_linked_directory_still_loads(bundle: Path, tmp_path: Path) -> None:
    os.symlink(bundle, tmp_path / "via-link")
    assert Bundle.load(tmp_path / "via-link").model_name == "tiny"


def test_a_path_resolving_outside_the_bundle_is_refused(bundle: Path) -> None:
    plan = json.loads((bundle / PLAN_FILE).read_text())
    plan["artifacts"]["full"]["file"] = "../elsewhere/full.onnx"
    (bundle / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(BundleError, match="leaves the bundle directory"):
        Bundle.load(bundle)


def test_the_agent_and_the_cloud_refuse_a_linked_bundle_file(bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from cloud_tier.executor import ModelRegistry
    from edge_agent import EdgeAgent

    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(bundle / "head.onnx", outside)
    (bundle / "head.onnx").unlink()
    os.symlink(outside, bundle / "head.onnx")
    with pytest.raises(BundleError, match="symbolic link"):
        ModelRegistry.load(bundle.parent)
    with pytest.raises(BundleError, match="symbolic link"):
        EdgeAgent.from_bundle(bundle, connect=False)
