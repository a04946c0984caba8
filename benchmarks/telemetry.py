"""Fleet control-plane benchmark: telemetry ingestion into SQLite and command latency, through a real broker.

    python -m benchmarks.telemetry [--broker mosquitto|amqtt] [--devices 100] [--records 200] [--commands 200]

Ingestion: N simulated devices (AgentControl each) buffer R records, then flush them in batches of B records;
measured from the first record to the last row committed by the FleetController. Commands: the controller
publishes a `ping` (QoS 1) and we time until the device's handler runs (published -> applied) and until the
ack is back at the controller (round trip).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._common import percentile
from cloud_tier.broker import EmbeddedBroker
from cloud_tier.controller import FleetController
from cloud_tier.fleet_store import FleetStore
from edge_agent.mqtt_control import AgentControl
from protos.mqtt import Ack, Command, TelemetryRecord


class Fleet:
    """N agents plus a controller over one broker, with per-command apply timestamps."""

    def __init__(self, host: str, port: int, devices: int, batch: int, workdir: Path) -> None:
        self.store = FleetStore(workdir / f"fleet-{batch}.sqlite")
        self.ctl = FleetController(self.store, host, port).start()
        self.applied: dict[str, float] = {}
        self._lock = threading.Lock()

        def on_command(cmd: Command) -> Ack:
            with self._lock:
                self.applied[cmd.command_id] = time.perf_counter()
            return Ack(cmd.command_id, True)

        self.agents = [AgentControl(f"bench-{i:03d}", host, port, on_command=on_command, flush_interval_ms=50,
                                    max_batch=batch, telemetry_bound=100_000).start(wait_s=30)
                       for i in range(devices)]

    def close(self) -> None:
        for a in self.agents:
            a.close(timeout_s=2)
        self.ctl.stop()
        self.store.close()


def ingest(fleet: Fleet, records: int, stall_s: float = 5.0) -> tuple[float, int, int, int]:
    """Store `records` per device; returns (seconds, rows stored, mqtt messages, rows lost).

    Rows are lost when the broker's per-subscriber queue overflows (QoS 1 messages beyond
    max_queued_messages are dropped): the wait ends when all arrived or nothing arrived for `stall_s`.
    """
    now = time.time()
    t0 = time.perf_counter()
    for a in fleet.agents:
        for i in range(records):
            a.record(TelemetryRecord(f"{a.device_id}-{i}", now, 1.0, 0.5, 3.0, 0.2, 2.0, 6.7, "cloud", "c1"))
    total = records * len(fleet.agents)
    last, last_change, t_last = 0, time.monotonic(), t0
    while True:
        n = fleet.store.record_count()
        if n != last:
            last, last_change, t_last = n, time.monotonic(), time.perf_counter()
        if n >= total or time.monotonic() - last_change > stall_s:
            break
        time.sleep(0.005)
    return t_last - t0, last, fleet.ctl.telemetry_messages, total - last


def commands(fleet: Fleet, n: int) -> tuple[list[float], list[float]]:
    """Send `n` pings round-robin; return (published->applied ms, round trip ms)."""
    applied_ms, rtt_ms = [], []
    for i in range(n):
        dev = fleet.agents[i % len(fleet.agents)].device_id
        cmd = Command.ping()
        t0 = time.perf_counter()
        fleet.ctl.send_command(dev, cmd)
        if fleet.ctl.wait_ack(cmd.command_id, 10.0) is None:
            raise TimeoutError(f"no ack for command {cmd.command_id} to {dev} within 10 s")
        rtt_ms.append((time.perf_counter() - t0) * 1e3)
        applied_ms.append((fleet.applied[cmd.command_id] - t0) * 1e3)
    return applied_ms, rtt_ms


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", choices=("mosquitto", "amqtt"), default="mosquitto")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--records", type=int, default=200, help="records per device")
    ap.add_argument("--batches", default="1,50", help="records per MQTT message, comma-separated")
    ap.add_argument("--commands", type=int, default=200)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.broker == "mosquitto":
            from cloud_tier.lab.mosquitto import Mosquitto

            broker: Mosquitto | EmbeddedBroker = Mosquitto(work / "mosquitto")
            port = broker.start()
        else:
            broker = EmbeddedBroker(insecure=True)  # plaintext on loopback: the broker's own cost, as before
            port = broker.start()
        try:
            print(f"broker: {args.broker} on 127.0.0.1:{port}; {args.devices} devices, "
                  f"{args.records} records each\n")
            print(f"{'records/msg':>11} {'rows':>7} {'msgs':>7} {'seconds':>8} {'rows/s':>9} {'msgs/s':>8} "
                  f"{'lost':>6}")
            for batch in (int(b) for b in args.batches.split(",")):
                fleet = Fleet("127.0.0.1", port, args.devices, batch, work)
                try:
                    dt, rows, msgs, lost = ingest(fleet, args.records)
                    print(f"{batch:>11} {rows:>7} {msgs:>7} {dt:>8.2f} {rows / dt:>9.0f} {msgs / dt:>8.0f} "
                          f"{lost:>6}")
                    if batch == int(args.batches.split(",")[-1]) and args.commands:
                        applied, rtt = commands(fleet, args.commands)
                finally:
                    fleet.close()
            if args.commands:
                print(f"\ncommand latency over {args.commands} pings (ms)")
                print(f"{'':>22} {'median':>8} {'p95':>8}")
                for name, vals in (("published -> applied", applied), ("round trip (ack)", rtt)):
                    s = sorted(vals)
                    print(f"{name:>22} {statistics.median(s):>8.2f} {percentile(s, 95):>8.2f}")
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
