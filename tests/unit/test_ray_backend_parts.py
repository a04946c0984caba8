"""The Ray backend's parts that need no cluster: options, the CLI without Ray, the replica's batch splitting,
deployment names and options, reading Serve's state (bounded), batch sizes, the /metrics families and the
dashboard's rows."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cloud_tier import cli
from cloud_tier.config import ConfigError, RayOptions
from cloud_tier.executor import ModelRegistry
from cloud_tier.metrics import RayCollector, render
from cloud_tier.ray_backend import (
    APP_PREFIX,
    RECENT_S,
    DeploymentStats,
    ServeStatePoller,
    TailReplica,
    app_name,
    deployment_options,
    deployment_rows,
    serve_deployments,
)
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
    assert f"splitinfer_ray_target_replicas{{{dep}}} NaN" in text  # Serve's state not read yet


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_serves_state_is_read_at_most_every_interval_and_a_failed_read_keeps_the_last() -> None:
    clock, calls = Clock(), []

    def fetch() -> dict:
        calls.append(clock.t)
        if len(calls) == 3:
            raise TimeoutError("GetTimeoutError: controller busy")
        return {"d": {"replicas": {"RUNNING": len(calls)}}}

    poller = ServeStatePoller(fetch, every_s=2.0, clock=clock)
    assert poller.get().deployments == {"d": {"replicas": {"RUNNING": 1}}}
    for _ in range(50):  # a scrape storm within the interval: one reading
        clock.t += 0.01
        poller.get()
    assert len(calls) == 1 and poller.age(poller.get()) == pytest.approx(0.5)
    clock.t += 2.0
    assert poller.get().deployments["d"]["replicas"]["RUNNING"] == 2 and len(calls) == 2
    clock.t += 2.0
    failed = poller.get()  # the third reading fails: the second one's values, with the reason and their age
    assert failed.deployments["d"]["replicas"]["RUNNING"] == 2 and "controller busy" in failed.error
    assert poller.age(failed) == pytest.approx(2.0)
    clock.t += 2.0
    assert poller.get().error == "" and len(calls) == 4


def test_recent_batch_sizes_are_those_of_the_last_minute() -> None:
    clock = Clock()
    stats = DeploymentStats("d", clock=clock)
    assert stats.snapshot()["recent_batch_mean"] is None and stats.snapshot()["recent_batch_max"] is None
    for rows in (16, 16, 2):
        stats.batch(rows)
    clock.t += RECENT_S / 2
    stats.batch(4)
    snap = stats.snapshot()
    assert (snap["recent_batches"], snap["recent_batch_mean"], snap["recent_batch_max"]) == (4, 9.5, 16)
    clock.t += RECENT_S / 2 + 1
    snap = stats.snapshot()  # the first three are older than RECENT_S now; the totals keep them
    assert (snap["recent_batches"], snap["recent_batch_mean"], snap["recent_batch_max"]) == (1, 4.0, 4)
    assert (snap["batches"], snap["batched_rows"]) == (4, 38)


# What Serve's controller answers (ServeInstanceDetails as a dict), cut down to what is read; states are enums there.
class State:
    def __init__(self, value: str) -> None:
        self.value = value


DETAILS = {"applications": {
    "splitinfer-tail-tiny-c1": {"deployments": {"splitinfer-tail-tiny-c1": {
        "status": State("UPSCALING"), "target_num_replicas": 2,
        "replicas": [{"state": State("RUNNING")}, {"state": State("STARTING")}]}}},
    "someone-elses-app": {"deployments": {"D": {"status": "HEALTHY", "target_num_replicas": 5, "replicas": []}}},
}}


def test_our_deployments_are_read_from_serves_details() -> None:
    assert serve_deployments(DETAILS) == {"splitinfer-tail-tiny-c1": {
        "status": "UPSCALING", "target_replicas": 2, "replicas": {"RUNNING": 1, "STARTING": 1}}}
    assert serve_deployments({}) == {}


def test_the_dashboard_rows_and_metrics_show_running_and_target_replicas() -> None:
    stats = DeploymentStats("splitinfer-tail-tiny-c1", model="tiny", model_sha256="ab" * 32, cut="c1")
    stats.batch(3)
    snap = {stats.name: {**stats.snapshot(), **serve_deployments(DETAILS)[stats.name], "status_age_s": 0.5,
                         "status_error": ""}}
    (row,) = deployment_rows(snap)
    assert row["replicas_running"] == 1 and row["replicas_target"] == 2 and row["replicas_other"] == {"STARTING": 1}
    assert (row["model"], row["cut"], row["status"], row["recent_batch_max"]) == ("tiny", "c1", "UPSCALING", 3)
    text = render(RayCollector(lambda: snap))
    dep = 'deployment="splitinfer-tail-tiny-c1"'
    assert f"splitinfer_ray_target_replicas{{{dep}}} 2.0" in text
    assert f"splitinfer_ray_status_age_seconds{{{dep}}} 0.5" in text
    assert f'splitinfer_ray_deployment_info{{cut="c1",{dep},model="tiny",model_sha256="{"ab" * 32}"}} 1.0' in text


@pytest.mark.parametrize("max_batch,concurrent,target", [(16, 1, None), (8, 2, None), (4, 1, 30.0), (1, 1, 1.0)])
def test_a_replica_takes_at_least_its_batches_and_the_autoscaling_target(max_batch, concurrent, target) -> None:
    opts = RayOptions(target_ongoing_requests=target, max_concurrent_batches=concurrent)
    got = deployment_options(opts, max_batch, max_queue=256)
    auto = got["autoscaling_config"]
    # @serve.batch batches are capped by max_ongoing_requests; one more batch forms while the others run
    assert got["max_ongoing_requests"] >= max_batch * (concurrent + 1)
    assert got["max_ongoing_requests"] > auto["target_ongoing_requests"]  # the target is reachable in a replica
    assert auto["target_ongoing_requests"] == (target or max_batch)
    assert (auto["min_replicas"], auto["max_replicas"], auto["initial_replicas"]) == (1, 4, 1)
    assert "metrics_interval_s" not in auto and "look_back_period_s" not in auto  # Serve's own unless set
    assert auto["upscale_delay_s"] < auto["downscale_delay_s"]  # quick to add, slow to remove
    assert got["max_queued_requests"] == 256


def test_with_the_tails_on_ray_the_front_loads_the_bundles_but_no_session(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "tiny")
    here = ModelRegistry.load(tmp_path)
    front = ModelRegistry.load(tmp_path, load_sessions=False)

    def served(registry: ModelRegistry) -> list:
        return [(t.key, t.label, t.inputs, t.executor.path, t.postprocess) for t in registry.served()]

    assert served(front) == served(here) and len(served(front)) == 2  # what requests are checked against
    assert all(t.executor.session is None for t in front.served())
    with pytest.raises(RuntimeError, match="runs on Ray Serve"):
        front.served()[0].run({"relu1": np.zeros((1, 8, 16, 16), np.float32)})


def test_stop_gives_up_on_a_serve_that_never_answers(caplog: pytest.LogCaptureFixture) -> None:
    # A cluster that died before the node leaves Serve's calls waiting forever: stop must still return.
    import threading

    from cloud_tier.config import ServerConfig
    from cloud_tier.ray_backend import RayBackend

    pytest.importorskip("ray")
    gone = threading.Event()

    class DeadServe:
        deleted: list[str] = []

        def delete(self, name: str, _blocking: bool = True) -> None:
            self.deleted.append(name)
            gone.wait()  # the controller never answers

    backend = RayBackend(RayOptions(), ServerConfig())
    backend.serve = DeadServe()
    backend.names[("m", "c1")] = "splitinfer-tail-m-c1"
    try:
        with caplog.at_level("WARNING", logger="cloud_tier.ray_backend"):
            backend.stop(timeout_s=0.2)
        assert DeadServe.deleted == ["splitinfer-tail-m-c1"]
        assert backend.names == {} and backend.handles == {}
        assert "did not answer" in caplog.text
    finally:
        gone.set()
