"""Failover: what a SIGKILLed cloud costs the requests in flight, and how fast split mode comes back.

One EdgeAgent sends requests at a steady rate through a LinkProxy (4G-like one-way delay, so several requests
are in flight at any moment) to `split-cloud serve` in its own process. Each cycle: split mode for a while,
SIGKILL the cloud (no goodbye), serve on the device during the outage, restart the cloud on the same port,
keep going. Measured per cycle and pooled:
- for each request in flight at the kill (submitted before it, finished after) that finished on the device:
  the time from the kill to that completion (median, p95, max). A reply already inside the link's delay
  line when the cloud died still arrives (as on a real link) and is counted apart;
- requests lost: submitted but never finished, or finished with an exception (target 0);
- back to split: from the restarted cloud's "listening on" line being read to the agent being in split mode
  again (0 when the agent got there first), and to the first request served by the cloud again (includes the
  reconnect backoff; its settings are printed); the cloud's own start time is shown apart.

    python -m benchmarks.failover [--model mobilenet_v2] [--cycles 4] [--rate 80] [--outage 2] [--bundles DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from benchmarks._common import bench_pki, bundles_dir, host_line, make_bundle, median, mid_cut, percentile, table
from cloud_tier.lab.linkproxy import LinkProxy
from cloud_tier.lab.process import CloudProcess
from edge_agent import EdgeAgent
from models.manifest import Bundle

RESULT_TIMEOUT_S = 60.0


class Feeder:
    """Submits one request every 1/rate s from its own thread and keeps (t_submit, future) for each."""

    def __init__(self, agent: EdgeAgent, x: np.ndarray, rate: float):
        self.agent, self.x, self.period = agent, x, 1.0 / rate
        self.sent: list[tuple[float, Future]] = []
        self.done_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def _run(self) -> None:
        nxt = time.perf_counter()
        while not self._stop.is_set():
            t = time.perf_counter()
            fut = self.agent.submit(self.x, timeout=RESULT_TIMEOUT_S)
            idx = len(self.sent)
            self.sent.append((t, fut))
            fut.add_done_callback(lambda _f, i=idx: self._mark(i))
            nxt += self.period
            self._stop.wait(max(0.0, nxt - time.perf_counter()))

    def _mark(self, idx: int) -> None:
        with self._lock:
            self.done_at[idx] = time.perf_counter()

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def main(argv: list[str] | None = None) -> int:
    """Run the failover benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mobilenet_v2", help="tiny or a zoo name (default %(default)s)")
    ap.add_argument("--cycles", type=int, default=4, help="kill/restart cycles")
    ap.add_argument("--rate", type=float, default=80.0, help="requests per second")
    ap.add_argument("--split-s", type=float, default=1.5, help="seconds in split mode before each kill")
    ap.add_argument("--outage", type=float, default=2.0, help="seconds the cloud stays dead")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="proxy one-way delay (RTT = 2x)")
    ap.add_argument("--deadline-ms", type=int, default=2000, help="agent deadline_ms")
    ap.add_argument("--backoff-max", type=float, default=1.0, help="agent backoff.max_s (reconnect)")
    ap.add_argument("--bundles", help="directory to build bundles in and reuse (default: a temp dir)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="splitinfer-failover-") as tmp:
        root = bundles_dir(args.bundles, tmp)
        path = make_bundle(args.model, root)
        bundle = Bundle.load(path)
        cut = mid_cut(bundle)
        x = np.random.default_rng(0).standard_normal(bundle.inputs[0].concrete_shape(1)).astype(np.float32)
        server_args = ["--cpu-only", "--log-level", "WARNING"]
        pki, tls = bench_pki(Path(tmp))
        cloud = CloudProcess(root, *server_args, pki=pki)
        port = cloud.start()
        backoff = {"initial_s": 0.2, "max_s": args.backoff_max}
        in_flight_ms: list[float] = []
        per_cycle = []
        with LinkProxy("127.0.0.1", port, delay_ms=args.delay_ms) as proxy:
            agent = EdgeAgent.from_bundle(path, cloud=proxy.address, cut=cut, deadline_ms=args.deadline_ms,
                                          backoff=backoff, max_in_flight=1000, device_id="bench", tls=tls)
            feeder = None
            try:
                if not agent.wait_for_mode("split", 30):
                    raise RuntimeError(f"agent never reached split mode: {agent.stats().extra}")
                feeder = Feeder(agent, x, args.rate).start()
                for cycle in range(args.cycles):
                    time.sleep(args.split_s)  # steady split-mode traffic before the fault (a duration, not a wait)
                    t_kill = time.perf_counter()
                    cloud.kill()
                    victims = [i for i, (t, f) in enumerate(list(feeder.sent)) if t < t_kill
                               and (i not in feeder.done_at or feeder.done_at[i] > t_kill)]
                    _wait(lambda v=victims: all(i in feeder.done_at for i in v), RESULT_TIMEOUT_S)
                    local = [i for i in victims if feeder.sent[i][1].done() and not feeder.sent[i][1].exception()
                             and feeder.sent[i][1].result().served_by == "edge"]
                    times = [(feeder.done_at[i] - t_kill) * 1000 for i in local]
                    edge = len(local)
                    in_flight_ms += times
                    time.sleep(max(0.0, args.outage - (time.perf_counter() - t_kill)))
                    cloud = CloudProcess(root, *server_args, "--port", str(port), pki=pki)
                    t_spawn = time.perf_counter()
                    cloud.start()
                    t_up = time.perf_counter()
                    n_before = len(feeder.sent)
                    agent.wait_for_mode("split", 60)
                    t_split = time.perf_counter()
                    _wait(lambda n=n_before: any(f.done() and not f.exception() and f.result().served_by == "cloud"
                                             for _, f in feeder.sent[n:]), 60)
                    first_cloud = next((feeder.done_at.get(i, float("nan")) for i, (_, f) in
                                        enumerate(feeder.sent[n_before:], n_before)
                                        if f.done() and not f.exception() and f.result().served_by == "cloud"),
                                       float("nan"))
                    per_cycle.append([cycle + 1, len(victims), edge, len(victims) - edge, median(times),
                                      max(times, default=float("nan")),
                                      max(0.0, t_split - t_up) * 1000, (first_cloud - t_up) * 1000,
                                      (t_up - t_spawn) * 1000])
                    print(f"# cycle {cycle + 1}: {len(victims)} in flight, back to split in "
                          f"{(t_split - t_up) * 1000:.0f} ms", file=sys.stderr, flush=True)
                time.sleep(args.split_s)
            finally:
                if feeder is not None:
                    feeder.stop()
                futures = [f for _, f in (feeder.sent if feeder else [])]
                _wait(lambda: all(f.done() for f in futures), RESULT_TIMEOUT_S)
                agent.close()
                cloud.kill()
            stats = agent.stats()
    lost = sum(1 for f in futures if not f.done() or f.exception() is not None)
    served = {"cloud": 0, "edge": 0}
    for f in futures:
        if f.done() and f.exception() is None:
            served[f.result().served_by] += 1
    print(f"failover.py: {args.model} cut {cut}, {args.rate:g} req/s, proxy one-way delay {args.delay_ms:g} ms, "
          f"deadline {args.deadline_ms} ms, backoff initial 0.2 s max {args.backoff_max:g} s full jitter, "
          f"probe_count {agent.config.probe_count}, outage {args.outage:g} s; {host_line()}\n")
    print(table(["cycle", "in flight at kill", "finished on edge", "reply already on its way",
                 "kill->local done p50 ms", "max ms",
                 "port line->split ms", "port line->first cloud reply ms", "cloud start (spawn->port line) ms"],
                per_cycle))
    print()
    print(table(["requests", "served by cloud", "served by edge", "lost", "finished on edge after kills",
                 "kill->local done p50 ms", "p95 ms", "max ms", "port line->split p50 ms", "duplicate finishes"],
                [[len(futures), served["cloud"], served["edge"], lost, len(in_flight_ms), median(in_flight_ms),
                  percentile(in_flight_ms, 95), max(in_flight_ms, default=float("nan")),
                  median([c[6] for c in per_cycle]), stats.duplicate_finishes]]))
    print(f"\nRequests lost: {lost} (target 0): {'PASS' if lost == 0 else 'MISS'}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
