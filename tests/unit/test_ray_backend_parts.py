"""The Ray backend's parts that need no cluster: options, the CLI without Ray, the replica's batch splitting,
deployment names and the /metrics families."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cloud_tier import cli
from cloud_tier.config import ConfigError, RayOptions
from cloud_tier.metrics import RayCollector, render
from cloud_tier.ray_backend import APP_PREFIX, TailReplica, app_name
from models.tiny_bundle import make_tiny_bundle, sample_input


@pytest.mark.parametrize("fields,flag", [
    ({"min_replicas": 3, "max_replicas": 2}, "--min-replicas"),
    ({"max_replicas": 0}, "--max-replicas"),
    ({"num_gpus": -1.0}, "--replica-gpus"),
    ({"target_ongoing_requests": 0.0}, "--target-ongoing-requests"),
    ({"request_timeout_s": 0.0}, "--ray-timeout"),
])
def test_bad_ray_options_name_their_flag(fields, flag) -> None:
    with pytest.raises(ConfigError, match=flag):
        RayOptions(**fields)


def test_backend_ray_without_ray_is_one_line_naming_the_pip_install(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the [ray] extra
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    code = cli.main(["serve", "--bundles", str(tmp_path), "--backend", "ray", "--insecure", "--no-fleet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert 'pip install "splitinfer[ray]"' in err[0] and "--backend ray" in err[0]


def test_ray_address_needs_the_ray_backend(tmp_path: Path, capsys) -> None:
    code = cli.main(["serve", "--bundles", str(tmp_path), "--ray-address", "10.0.0.1:6379", "--insecure"])
    assert code == 2 and "--ray-address needs --backend ray" in capsys.readouterr().err


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> TailReplica:
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_bundle(root / "tiny")
    rep = object.__new__(TailReplica)  # the session alone, without Ray's batching around it
    rep.session = ort.InferenceSession(str(root / "tiny" / "tail.onnx"), providers=["CPUExecutionProvider"])
    rep.output_names = [o.name for o in rep.session.get_outputs()]
    rep.head = ort.InferenceSession(str(root / "tiny" / "head.onnx"), providers=["CPUExecutionProvider"])
    return rep


def _act(rep, rows: int, seed: int) -> np.ndarray:
    return rep.head.run(None, {"input": sample_input(rows, seed)})[0]


def test_a_replica_batch_is_split_back_by_rows(replica) -> None:
    acts = [_act(replica, n, seed) for seed, n in enumerate((1, 3, 2))]
    answers = replica._run([{"feeds": {"relu1": a}, "rows": len(a)} for a in acts])
    assert [a["batch_rows"] for a in answers] == [6, 6, 6] and [a["first"] for a in answers] == [True, False, False]
    for a, act in zip(answers, acts, strict=True):
        want = replica.session.run(None, {"relu1": act})[0]
        np.testing.assert_allclose(a["outputs"]["output"], want, rtol=1e-5, atol=1e-6)


def test_a_failing_request_gets_its_own_error_and_the_rest_their_outputs(replica) -> None:
    good = _act(replica, 1, 0)
    bad = np.zeros((1, 5, 16, 16), np.float32)  # wrong channel count: onnxruntime refuses it
    answers = replica._run([{"feeds": {"relu1": good}, "rows": 1}, {"feeds": {"relu1": bad}, "rows": 1}])
    assert "outputs" in answers[0] and answers[0]["batch_rows"] == 1
    assert "error" in answers[1] and not answers[1]["memory"]


def test_deployment_names_keep_to_serves_characters() -> None:
    class Tail:
        label, model, cut = "my model@1a2b3c4d", "my model", "c/1"

    assert app_name(Tail()) == APP_PREFIX + "my_model_1a2b3c4d-c_1"  # type: ignore[arg-type]


def test_metrics_show_replicas_queue_and_batch_sizes_per_deployment() -> None:
    snap = {"splitinfer-tail-tiny-c1": {"replicas": {"RUNNING": 2, "STARTING": 1}, "outstanding": 5,
                                        "batches": 3, "batched_rows": 9,
                                        "batch_size_histogram": {"2": 1, "4": 1, "inf": 1}}}
    text = render(RayCollector(lambda: snap))
    dep = 'deployment="splitinfer-tail-tiny-c1"'
    assert f'splitinfer_ray_replicas{{{dep},state="RUNNING"}} 2.0' in text
    assert f'splitinfer_ray_replicas{{{dep},state="STARTING"}} 1.0' in text
    assert f"splitinfer_ray_queue_depth{{{dep}}} 5.0" in text
    assert f'splitinfer_ray_batch_size_rows_bucket{{{dep},le="4"}} 2.0' in text
    assert f'splitinfer_ray_batch_size_rows_bucket{{{dep},le="+Inf"}} 3.0' in text
    assert f"splitinfer_ray_batch_size_rows_sum{{{dep}}} 9.0" in text
