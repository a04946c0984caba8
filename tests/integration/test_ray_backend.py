"""`--backend ray`: the tails as Ray Serve deployments behind our gRPC front, on a real local Ray cluster.

On the session's local Ray cluster (tests/integration/conftest.py: loopback only, 2 CPUs, no dashboard, token
auth pinned off), its Serve apps shut down after the module. Agents stream through the mTLS front to the
replicas; their results equal the in-process backend's; a replica's worker killed mid-stream loses no request and
answers none twice; Serve's back-pressure is RESOURCE_EXHAUSTED; under a short load the autoscaler adds a replica,
and the dashboard's Deployments view and /metrics show both.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason='the [ray] extra is not installed (pip install "splitinfer[ray]")')

from ray import serve  # noqa: E402

from cloud_tier.config import RayOptions, ServerConfig  # noqa: E402
from cloud_tier.dashboard import Dashboard  # noqa: E402
from cloud_tier.metrics import RayCollector, render  # noqa: E402
from cloud_tier.ray_backend import RayBackend  # noqa: E402
from cloud_tier.server import CloudServer  # noqa: E402
from edge_agent import CLOUD, EDGE, EdgeAgent  # noqa: E402
from edge_agent.constants import DEFAULT_DEVICE_ID  # noqa: E402
from models.manifest import CLOUD_ONLY  # noqa: E402
from models.tiny_bundle import CUT_TENSOR, MID_CUT, make_tiny_bundle, sample_input  # noqa: E402
from protos import codec  # noqa: E402
from protos import inference_pb2 as pb  # noqa: E402
from protos import inference_pb2_grpc as pb_grpc  # noqa: E402
from tests import polling  # noqa: E402
from tests.pki import device_tls  # noqa: E402

OK, EXHAUSTED = 0, 8
FP32 = {"head_precision": "fp32", "codec": "fp32"}
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@pytest.fixture(scope="module")
def serve_cluster(ray_cluster: str) -> Iterator[str]:
    """The session's Ray cluster (tests/integration/conftest.py), with this module's Serve apps shut down after it."""
    try:
        yield ray_cluster
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray_bundles")
    make_tiny_bundle(root / "tiny")
    return root


def _ray_server(bundles_dir: Path, config: ServerConfig, **options) -> tuple[CloudServer, RayBackend]:
    server = CloudServer.from_config(bundles_dir, config)
    backend = RayBackend(RayOptions(**{"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25, **options}), config)
    server.tail_backend = backend
    server.start(timeout=120)
    return server, backend


@pytest.fixture(scope="module")
def ray_server(serve_cluster, bundles_dir: Path) -> Iterator[tuple[CloudServer, RayBackend]]:
    server, backend = _ray_server(bundles_dir, ServerConfig(max_batch=8, max_wait_ms=2.0))
    yield server, backend
    server.stop(grace=1.0)
    backend.stop()


def _agent(bundles_dir: Path, address: str, **fields) -> EdgeAgent:
    fields.setdefault("connect_timeout_s", 2.0)
    fields.setdefault("tls", device_tls(DEFAULT_DEVICE_ID))
    return EdgeAgent.from_bundle(bundles_dir / "tiny", address, **fields)


def _run(bundles_dir: Path, address: str, cut: str, xs: list[np.ndarray]) -> list:
    # a deadline far past any batch here: which side answers must not depend on how busy the host is
    with _agent(bundles_dir, address, cut=cut, deadline_ms=20_000, **FP32) as agent:
        return [f.result(timeout=30) for f in [agent.submit(x) for x in xs]]


@pytest.mark.parametrize("cut", [MID_CUT, CLOUD_ONLY])
def test_agents_through_the_front_get_what_the_in_process_backend_gives(ray_server, bundles_dir, cut) -> None:
    server, backend = ray_server
    xs = [sample_input(seed=s) for s in range(24)]
    with CloudServer(bundles_dir, max_batch=8, max_wait_ms=2.0) as local:
        want = _run(bundles_dir, local.address, cut, xs)
    results: list[list] = [[], []]

    def agent(i: int) -> None:  # two devices' streams at once: @serve.batch batches across them
        results[i] = _run(bundles_dir, server.address, cut, xs)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for got in results:
        assert [r.served_by for r in got] == [CLOUD] * len(xs), [r.fallback_reason for r in got]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g.output, w.output, rtol=1e-5, atol=1e-6)
    text = render(RayCollector(backend.snapshot))
    name = backend.names[next(k for k in backend.names if k[1] == cut)]
    assert f'splitinfer_ray_replicas{{deployment="{name}",state="RUNNING"}} 1.0' in text
    assert f'splitinfer_ray_batch_size_rows_count{{deployment="{name}"}}' in text
    assert backend.deployments[name].batched_rows >= 2 * len(xs)
    assert server.stats.snapshot()["batched_rows"] >= 2 * len(xs)
    assert all(t.executor.session is None for t in server._servicer.registry.served())  # no tail copy on the front


def _replica_pid(backend: RayBackend, cut: str) -> int:
    name = backend.names[next(k for k in backend.names if k[1] == cut)]
    return int(serve.get_deployment_handle(name, app_name=name).pid.remote().result(timeout_s=30))


def test_a_killed_replica_loses_no_request_and_answers_none_twice(ray_server, bundles_dir) -> None:
    server, backend = ray_server
    before = _replica_pid(backend, MID_CUT)
    seen: Counter = Counter()
    agent = _agent(bundles_dir, server.address, cut=MID_CUT, deadline_ms=10_000, max_in_flight=16,
                   backoff={"initial_s": 0.2, "max_s": 0.5}, probe_count=1,
                   on_result=lambda r: seen.update([r.request_id]), **FP32)
    futures: list[Future] = []
    killed = threading.Event()
    try:
        def feed() -> None:  # a stream running across the kill: until it, and 40 requests after
            after = 0
            while after < 40 and len(futures) < 3000:
                futures.append(agent.submit(sample_input(seed=len(futures) % 8)))
                after += killed.is_set()  # submit waits for one of the 16 slots: the stream stays full

        feeder = threading.Thread(target=feed)
        feeder.start()
        polling.wait_for(lambda: agent.stats().served_cloud >= 10, "cloud traffic", 30, interval_s=0.01)
        os.kill(before, signal.SIGKILL)
        killed.set()
        feeder.join(timeout=60)
        results = [f.result(timeout=60) for f in futures]
    finally:
        agent.close()
    n = len(futures)
    ids = [r.request_id for r in results]
    assert len(ids) == n and len(set(ids)) == n
    assert len(seen) == n and set(seen.values()) == {1}  # on_result once per request: none lost, none twice
    by = Counter(r.served_by for r in results)
    assert by[CLOUD] >= 10 and by[CLOUD] + by[EDGE] == n
    # Requests in flight at the killed replica are answered UNAVAILABLE and finish on the device; whether any is in
    # flight at the instant of the kill depends on the host's timing (Serve may also route the next ones to the new
    # replica first), so only what happens to those that are is asserted.
    failed = [r for r in results if r.fallback_reason and "replica failed" in r.fallback_reason]
    assert all(r.served_by == EDGE for r in failed)
    assert agent.stats().duplicate_finishes == 0
    # Serve replaces the replica, and the front serves again through it
    polling.wait_for(lambda: _replica_pid(backend, MID_CUT) != before, "a new replica", 60, interval_s=0.2)
    again = _run(bundles_dir, server.address, MID_CUT, [sample_input(seed=1)])
    assert again[0].served_by == CLOUD, again[0].fallback_reason


def test_serve_back_pressure_is_resource_exhausted(serve_cluster, bundles_dir, device_channel) -> None:
    # One replica taking 2 requests at a time and 1 queued in the handle: a burst of 3 x 64 must overflow it.
    server, backend = _ray_server(bundles_dir, ServerConfig(max_batch=1, max_queue=1))
    try:
        act = codec.encode(CUT_TENSOR, np.ones((1, 8, 16, 16), np.float32), "fp32")
        codes: Counter = Counter()
        lock = threading.Lock()

        def burst(i: int) -> None:
            reqs = [pb.InferRequest(request_id=f"{i}-{n}", device_id=DEFAULT_DEVICE_ID, model="tiny", cut=MID_CUT,
                                    tensors=[act]) for n in range(64)]
            with device_channel(server.address, DEFAULT_DEVICE_ID, OPTIONS) as channel:
                got = list(pb_grpc.SplitInferenceStub(channel).Infer(iter(reqs), timeout=60))
            with lock:
                assert len(got) == 64
                codes.update(r.status.code for r in got)

        threads = [threading.Thread(target=burst, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert sum(codes.values()) == 192 and set(codes) <= {OK, EXHAUSTED}, codes
        assert codes[EXHAUSTED] >= 1 and codes[OK] >= 1, codes
    finally:
        server.stop(grace=1.0)
        backend.stop()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_the_autoscaler_adds_a_replica_under_load_and_the_dashboard_shows_it(serve_cluster, bundles_dir) -> None:
    # min 1, max 2, a target of 1 request per replica; Serve's load reports every 0.5 s over a 2 s window
    server, backend = _ray_server(bundles_dir, ServerConfig(max_batch=2, max_wait_ms=2.0), max_replicas=2,
                                  target_ongoing_requests=1.0, upscale_delay_s=0.5, metrics_interval_s=0.5,
                                  look_back_period_s=2.0)
    dash = Dashboard(None, deployments=backend.rows, extra_metrics=[RayCollector(backend.snapshot)])
    dash.start()
    name = backend.names[next(k for k in backend.names if k[1] == MID_CUT)]
    stop = threading.Event()
    futures: list[list[Future]] = [[], []]
    tls = device_tls(DEFAULT_DEVICE_ID)  # once: two threads enrolling at once race on the CA's files

    def load(i: int) -> None:  # a closed loop of 8 requests in flight per agent, until the second replica runs
        with _agent(bundles_dir, server.address, cut=MID_CUT, deadline_ms=20_000, max_in_flight=8, tls=tls,
                    **FP32) as agent:
            while not stop.is_set() and len(futures[i]) < 20_000:
                futures[i].append(agent.submit(sample_input(seed=len(futures[i]) % 8)))
            for f in futures[i]:
                f.result(timeout=30)

    def row() -> dict:
        rows = json.loads(_get(dash.url + "/api/deployments"))["deployments"]
        return next(r for r in rows if r["deployment"] == name)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    try:
        first = row()
        assert (first["replicas_running"], first["replicas_target"], first["cut"]) == (1, 1, MID_CUT), first
        for t in threads:
            t.start()
        scaled = polling.wait_for(lambda: (r := row())["replicas_running"] == 2 and r, "a second running replica "
                                  "on the dashboard", 45, interval_s=0.5)
        assert scaled["replicas_target"] == 2 and scaled["batches"] > 0 and scaled["recent_batch_max"] >= 1
        text = _get(dash.url + "/metrics")
        assert f'splitinfer_ray_replicas{{deployment="{name}",state="RUNNING"}} 2.0' in text
        assert f'splitinfer_ray_target_replicas{{deployment="{name}"}} 2.0' in text
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        dash.stop()
        server.stop(grace=1.0)
        backend.stop()
    results = [f.result(timeout=0) for fs in futures for f in fs]
    assert results and all(r.served_by == CLOUD for r in results), Counter(r.fallback_reason for r in results)
