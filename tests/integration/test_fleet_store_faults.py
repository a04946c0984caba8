"""A fleet store on a "full disk" (a real file-size limit, RLIMIT_FSIZE, in the controller's own process) behind a
real broker: nothing the controller received is acknowledged before it is stored, so every published record
is stored exactly once, whether the limit is lifted in place or the controller is killed and another takes over.

Every test runs on both brokers: Mosquitto, and the embedded amqtt broker, which keeps what a persistent session
has not acknowledged and delivers it again when the session resumes (cloud_tier.amqtt_auth; its protocol-level
test: test_amqtt_redelivery).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_tier.broker import EmbeddedBroker
from cloud_tier.controller import FleetController
from cloud_tier.fleet_store import FleetStore
from cloud_tier.lab.mosquitto import Mosquitto
from protos.mqtt import TELEMETRY, TelemetryBatch, TelemetryRecord, device_topic
from tests import polling

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 20.0
BATCHES, PER_BATCH = 6, 200

# The controller in a child process whose files may not grow (SIGXFSZ ignored: write() fails with EFBIG, as on a
# full disk); stdin commands: "stats" (one JSON line back), "lift" (the limit goes), "quit".
CHILD = r"""
import json, logging, resource, signal, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from cloud_tier.broker import EmbeddedBroker
from cloud_tier.controller import FleetController
from cloud_tier.fleet_store import FleetStore

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
db, host, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
store = FleetStore(db)
small = {"queue_bound": 1, "put_timeout_s": 0.2, "keepalive_s": 2} if sys.argv[5:] == ["small-queue"] else {}
ctl = FleetController(store, host, port, retry_min_s=0.02, retry_max_s=0.2, **small)  # settles its session id
sizes = [p.stat().st_size for p in (Path(db), Path(db + "-wal")) if p.exists()]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes) + 1, resource.RLIM_INFINITY))
ctl.start()
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "stats":
        print(json.dumps({"stored_records": ctl.stored_records, "store_errors": dict(ctl.store_errors),
                          "records_dropped": dict(ctl.records_dropped), "health": store.health().reason,
                          "waiting": ctl.waiting_for_store}),
              flush=True)
    elif cmd == "lift":
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print("lifted", flush=True)
    elif cmd == "quit":
        break
ctl.stop()
store.close()
"""


class LimitedController:
    """The child process above, with a line protocol on stdin/stdout."""

    def __init__(self, db: Path, host: str, port: int, *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), str(db), host, str(port), *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.readline() == "ready", self.stderr()

    def readline(self) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=DEADLINE_S):
                raise AssertionError(f"the limited controller said nothing for {DEADLINE_S} s: {self.stderr()}")
        return self.proc.stdout.readline().strip()

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.readline()

    def stats(self) -> dict[str, Any]:
        return json.loads(self.ask("stats"))

    def stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=DEADLINE_S)
        return err[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=DEADLINE_S)


def publish_batches(host: str, port: int, prefix: str = "full") -> set[str]:
    """BATCHES telemetry batches of PER_BATCH records, each acknowledged by the broker; the request ids sent."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv311)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    sent: set[str] = set()
    try:
        now = time.time()
        for b in range(BATCHES):
            records = tuple(TelemetryRecord(f"{prefix}-{b}-{i}", now, 1.0, 0.5, 2.0, 0.1, 3.0, 6.6, "cloud", "c1")
                            for i in range(PER_BATCH))
            info = client.publish(device_topic("full-1", TELEMETRY),
                                  TelemetryBatch(records, batch_id=uuid.uuid4().hex).to_json(), qos=1)
            info.wait_for_publish(DEADLINE_S)
            assert info.is_published()
            sent |= {r.request_id for r in records}
    finally:
        client.disconnect()
        client.loop_stop()
    return sent


def stored_ids(db: Path) -> list[str]:
    store = FleetStore(db)
    try:
        return [r for (r,) in store._reader().execute("SELECT request_id FROM requests WHERE device_id = 'full-1'")]
    finally:
        store.close()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """(host, port) of a plaintext broker on loopback: the module's Mosquitto, or an embedded amqtt broker."""
    if request.param == "mosquitto":
        mosquitto: Mosquitto = request.getfixturevalue("mosquitto")
        yield mosquitto.host, mosquitto.port
        return
    embedded = EmbeddedBroker("127.0.0.1", 0, insecure=True)
    port = embedded.start()
    try:
        yield "127.0.0.1", port
        assert embedded.overflow() == {}
    finally:
        embedded.stop()


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.db"
    FleetStore(path).close()  # the schema exists: the limit is on growth, as on a disk that filled up later
    return path


def test_a_full_disk_loses_nothing_and_stores_everything_once_the_space_is_back(
        db: Path, broker: tuple[str, int]) -> None:
    host, port = broker
    child = LimitedController(db, host, port)
    try:
        sent = publish_batches(host, port)
        stats = polling.wait_for(lambda: (s := child.stats())["store_errors"].get("io_error", 0) >= 3 and s,
                                 "failed writes counted", DEADLINE_S)
        assert stats["stored_records"] == 0 and stats["records_dropped"] == {}
        assert "file too large" in stats["health"] and "RLIMIT_FSIZE" in stats["health"]
        assert child.ask("lift") == "lifted"
        polling.wait_for(lambda: child.stats()["stored_records"] == len(sent), "every record stored", DEADLINE_S)
        assert child.stats()["records_dropped"] == {}
        child.ask("quit")
        assert child.proc.wait(DEADLINE_S) == 0
    finally:
        err = child.stderr() if child.proc.returncode is None else child.proc.stderr.read()  # type: ignore[union-attr]
        child.close()
    # The log names the cause, not the ROLLBACK that followed it.
    assert "disk I/O error" in err and "file too large" in err, err
    assert "cannot rollback" not in err
    ids = stored_ids(db)
    assert len(ids) == len(sent) and set(ids) == sent  # all of them, each once


def test_a_controller_killed_while_the_disk_is_full_loses_no_acknowledged_telemetry(
        db: Path, broker: tuple[str, int]) -> None:
    host, port = broker
    child = LimitedController(db, host, port)
    try:
        sent = publish_batches(host, port)
        polling.wait_for(lambda: child.stats()["store_errors"], "failed writes", DEADLINE_S)
    finally:
        child.close()  # SIGKILL: whatever it received is still unacknowledged in its broker session
    assert stored_ids(db) == []  # all of it was in flight, none stored
    store = FleetStore(db)
    try:
        ctl = FleetController(store, host, port).start()  # same store: same session id
        try:
            polling.wait_for(lambda: store.record_count("full-1") == len(sent), "every record after the crash",
                             DEADLINE_S)
            # In order behind any redelivery: once these are in, anything delivered twice would be in too.
            barrier = publish_batches(host, port, "after")
            polling.wait_for(lambda: store.record_count("full-1") == len(sent) + len(barrier), "the barrier",
                             DEADLINE_S)
        finally:
            ctl.stop()
        assert ctl.records_dropped == {} and ctl.dropped_messages == 0
    finally:
        store.close()
    ids = stored_ids(db)
    assert len(ids) == len(set(ids)) == 2 * len(sent)  # nothing twice



def test_a_store_outage_longer_than_the_queue_stalls_nothing_once_the_store_is_back(
        db: Path, broker: tuple[str, int]) -> None:
    """A queue of one and a 2 s keepalive: the controller's network thread waits for the store (nothing is left
    unacknowledged on the live connection, which the broker would resend only when the session resumes); the
    broker drops the silent connection, and once the store is back paho reconnects and everything comes in."""
    host, port = broker
    child = LimitedController(db, host, port, "small-queue")
    try:
        sent = publish_batches(host, port)
        polling.wait_for(lambda: child.stats()["store_errors"].get("io_error", 0) >= 3, "failed writes", DEADLINE_S)
        sent |= publish_batches(host, port, "during")  # more than the queue of one holds while the store fails
        polling.wait_for(lambda: child.stats()["waiting"], "the network thread waiting for the store", DEADLINE_S)
        assert child.ask("lift") == "lifted"
        polling.wait_for(lambda: child.stats()["stored_records"] == len(sent), "every record stored", DEADLINE_S)
        barrier = publish_batches(host, port, "after")  # flows again, in order behind any redelivery
        polling.wait_for(lambda: child.stats()["stored_records"] == len(sent) + len(barrier), "the barrier",
                         DEADLINE_S)
        sent |= barrier
        assert child.stats()["records_dropped"] == {}
        child.ask("quit")
        assert child.proc.wait(DEADLINE_S) == 0
    finally:
        child.close()
    ids = stored_ids(db)
    assert len(ids) == len(set(ids)) == len(sent)
