"""Fleet store on a real SQLite file: batching, queries, percentiles, series, retention, threads."""

from __future__ import annotations

import random
import sqlite3
import statistics
import threading
import time
from pathlib import Path

import pytest

from cloud_tier.fleet_store import ACK_OP, STATE_OP, TELEMETRY_OP, FleetStore, Retention, error_kind, percentile
from protos.mqtt import STAGES, Ack, Command, DeviceState, TelemetryRecord

NOW = 1_800_000_000.0


def make_records(n: int, *, t0: float, rng: random.Random, edge_every: int = 4) -> list[TelemetryRecord]:
    out = []
    for i in range(n):
        stages = [rng.uniform(0.1, 20.0) for _ in range(5)]
        out.append(TelemetryRecord(f"r{i}", t0 + i * 0.01, *stages, sum(stages),
                                   "edge" if i % edge_every == 0 else "cloud", "c1"))
    return out


def q(values: list[float], p: int) -> float:
    # Independent reference: statistics' inclusive method is numpy's default linear interpolation.
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


@pytest.fixture()
def store(tmp_path: Path) -> FleetStore:
    s = FleetStore(tmp_path / "fleet.sqlite")
    yield s
    s.close()


def test_wal_mode_and_memory_refused(store: FleetStore, tmp_path: Path) -> None:
    assert store._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="file"):
        FleetStore(":memory:")


def test_percentile_helper() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_stats_match_an_independent_computation(store: FleetStore) -> None:
    rng = random.Random(7)
    recs = make_records(400, t0=NOW - 4.0, rng=rng)
    assert store.insert_records([("d1", recs[:150], 0), ("d1", recs[150:], 2), ("d2", recs[:10], 0)],
                                received=NOW - 10) == 410
    store.upsert_state("d1", DeviceState(status="online", mode="split", cut="c1", bandwidth_mbps=18.9,
                                         model="resnet18", label="bench"), received=NOW - 1)
    stats = store.device_stats("d1", window_s=60, rate_window_s=10, now=NOW)
    assert stats["count"] == 400
    for stage in STAGES:
        values = [getattr(r, stage) for r in recs]
        for p in (50, 95, 99):
            assert stats["stages"][stage][f"p{p}"] == pytest.approx(q(values, p), rel=1e-12)
    assert stats["edge_share"] == pytest.approx(100 / 400)
    assert stats["req_per_s"] == pytest.approx(400 / 10)
    # a device first seen 4 s ago is rated over those 4 s, not the whole 10 s window
    store.insert_records([("d3", recs, 0)], received=NOW - 4)
    assert store.device_stats("d3", rate_window_s=10, now=NOW)["req_per_s"] == pytest.approx(400 / 4)

    rows = {r["device_id"]: r for r in store.fleet(window_s=60, now=NOW)}
    assert set(rows) == {"d1", "d2", "d3"}
    d1 = rows["d1"]
    assert (d1["status"], d1["mode"], d1["cut"], d1["bandwidth_mbps"], d1["label"]) == (
        "online", "split", "c1", 18.9, "bench")
    assert d1["dropped_total"] == 2 and d1["count"] == 400
    assert d1["p95_ms"] == pytest.approx(q([r.total_ms for r in recs], 95))
    assert rows["d2"]["status"] == "online" and rows["d2"]["mode"] is None  # telemetry before any state

    store.upsert_state("d1", DeviceState(status="offline", label="bench"))
    assert store.device("d1")["status"] == "offline"


def test_series_buckets_per_second(store: FleetStore) -> None:
    recs = [TelemetryRecord(f"r{i}", NOW - 3 + i * 0.25, 1.0 * i, 0, 0, 0, 0, 1.0 * i, "cloud", "c")
            for i in range(12)]  # 4 records in each of 3 seconds
    store.insert_records([("d1", recs, 0)], received=NOW)  # received "now": times ahead of receipt are clamped
    s = store.series("d1", since_s=10, bucket_s=1.0, now=NOW)
    assert s["t"] == [NOW - 3, NOW - 2, NOW - 1]
    assert s["count"] == [4, 4, 4]
    assert s["p50"]["head_ms"] == [1.5, 5.5, 9.5]
    with pytest.raises(ValueError, match="bucket_s"):
        store.series("d1", bucket_s=0)


def test_retention_by_rows_and_age(tmp_path: Path) -> None:
    store = FleetStore(tmp_path / "r.sqlite", retention=Retention(max_rows_per_device=50, max_age_s=3600,
                                                                   prune_every_s=1e9))
    rng = random.Random(1)
    now = time.time()
    store.insert_records([("d1", make_records(120, t0=now - 10, rng=rng), 0),
                          ("d2", make_records(5, t0=now - 7200, rng=rng), 0)])
    assert store.record_count() == 125
    deleted = store.prune()
    assert deleted == 70 + 5
    assert store.record_count("d1") == 50 and store.record_count("d2") == 0
    # the newest rows are the ones kept
    oldest_kept = store._reader().execute("SELECT MIN(ts) FROM requests WHERE device_id='d1'").fetchone()[0]
    assert oldest_kept == pytest.approx(now - 10 + 70 * 0.01)
    store.close()


def test_commands_and_acks(store: FleetStore) -> None:
    cmd = Command.switch_cut("c4")
    store.record_command("d1", cmd, sent_ts=NOW)
    assert store.command(cmd.command_id)["ok"] is None
    assert store.record_ack("d1", Ack(cmd.command_id, True, "done"), ts=NOW + 0.01)
    assert not store.record_ack("d2", Ack(cmd.command_id, True, "wrong device"))
    row = store.command(cmd.command_id)
    assert (row["ok"], row["message"], row["kind"]) == (True, "done", "switch_cut")


def test_concurrent_writers_and_readers(store: FleetStore) -> None:
    errors: list[BaseException] = []

    def write(dev: str) -> None:
        try:
            rng = random.Random(dev)
            for _ in range(20):
                store.insert_records([(dev, make_records(25, t0=NOW - 5, rng=rng), 0)])
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    def read() -> None:
        try:
            for _ in range(30):
                store.fleet(now=NOW)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f"d{i}",)) for i in range(3)]
    threads += [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert store.record_count() == 3 * 20 * 25


def test_offline_state_keeps_the_last_known_cut_and_model(tmp_path):
    from cloud_tier.fleet_store import FleetStore
    from protos.mqtt import DeviceState

    store = FleetStore(tmp_path / "f.db")
    try:
        store.upsert_state("pi-1", DeviceState(status="online", mode="split", cut="c021", bandwidth_mbps=20.0,
                                               model="mobilenet_v2", label="Kitchen"))
        store.upsert_state("pi-1", DeviceState(status="offline", label="Kitchen"))
        row = store.device("pi-1")
        assert row["status"] == "offline"
        assert (row["cut"], row["model"], row["mode"]) == ("c021", "mobilenet_v2", "split")
    finally:
        store.close()


def test_a_batch_delivered_twice_is_stored_once(store: FleetStore, tmp_path: Path) -> None:
    rng = random.Random(5)
    recs = make_records(20, t0=NOW - 2, rng=rng)
    assert store.insert_records([("d1", recs[:10], 2, "b1")], received=time.time()) == 10
    # The same batch again (an agent's QoS 1 resend), alone and beside a new one in the writer's next transaction.
    assert store.insert_records([("d1", recs[:10], 2, "b1")]) == 0
    assert store.insert_records([("d1", recs[:10], 2, "b1"), ("d1", recs[10:], 0, "b2")]) == 10
    assert store.record_count("d1") == 20 and store.device("d1")["dropped_total"] == 2
    assert store.duplicate_batches == 2
    # Ids are per device, and a batch without one (an older agent) is stored every time.
    assert store.insert_records([("d2", recs[:3], 0, "b1")]) == 3
    assert store.insert_records([("d2", recs[:3], 0), ("d2", recs[:3], 0, "")]) == 6
    assert store.duplicate_batches == 2
    # An id is remembered for Retention.batch_ids_s after it was received, then pruned.
    short = FleetStore(tmp_path / "short.sqlite", retention=Retention(batch_ids_s=60.0))
    try:
        assert short.insert_records([("d1", recs[:5], 0, "old")], received=time.time() - 120) == 5
        assert short.insert_records([("d1", recs[:5], 0, "new")], received=time.time()) == 5
        short.prune()
        assert short.insert_records([("d1", recs[:5], 0, "new")]) == 0  # within the window: still known
        assert short.insert_records([("d1", recs[:5], 0, "old")]) == 5  # pruned: stored again
    finally:
        short.close()


def test_times_far_ahead_of_receipt_are_clamped_and_counted(store: FleetStore) -> None:
    received = NOW
    forged = TelemetryRecord("forged", received + 115 * 86400, 1.0, 1.0, 1.0, 1.0, 1.0, 86_000_000.0, "cloud", "c1")
    near = TelemetryRecord("near", received + 299, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, "cloud", "c1")
    assert store.insert_records([("d1", [forged, near], 0)], received=received) == 2
    rows = dict(store._reader().execute("SELECT request_id, ts FROM requests WHERE device_id = 'd1'").fetchall())
    assert rows == {"forged": received, "near": received + 299}  # 5 minutes of clock skew are tolerated
    assert store.future_timestamps == 1
    store.upsert_state("d1", DeviceState("online", ts=received + 86400), received)
    assert store.device("d1")["state_ts"] == received
    store.upsert_state("d1", DeviceState("online", ts=received + 10), received)
    assert store.device("d1")["state_ts"] == received + 10
    assert store.future_timestamps == 2


def _fill(store: FleetStore) -> None:
    """Cap the file at its current size: the next growing write fails with SQLITE_FULL (a real SQLite fault)."""
    pages = store._writer.execute("PRAGMA page_count").fetchone()[0]
    store._writer.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_database_raises_its_own_error_not_the_rollbacks(store: FleetStore) -> None:
    rng = random.Random(5)
    assert store.health().ok
    _fill(store)
    with pytest.raises(sqlite3.OperationalError) as err:
        store.insert_records([("d1", make_records(2000, t0=NOW, rng=rng), 0, "batch-1")], received=NOW)
    assert "database or disk is full" in str(err.value)  # the cause, not "cannot rollback"
    assert error_kind(err.value) == "disk_full"
    health = store.health()
    assert not health.ok and health.reason.startswith("disk_full: database or disk is full")
    assert store.record_count() == 0  # nothing of the failed transaction is kept, its batch id neither
    store._writer.execute("PRAGMA max_page_count = 1073741823")
    assert store.insert_records([("d1", make_records(2000, t0=NOW, rng=rng), 0, "batch-1")], received=NOW) == 2000
    assert store.health().ok and store.duplicate_batches == 0


def test_write_applies_states_telemetry_and_acks_in_one_transaction(store: FleetStore) -> None:
    rng = random.Random(6)
    cmd = Command.ping()
    store.record_command("d1", cmd, sent_ts=NOW)
    ops = [(STATE_OP, "d1", DeviceState(status="online", cut="c1", ts=NOW)),
           (TELEMETRY_OP, "d1", (make_records(3, t0=NOW, rng=rng), 1, "b1"), NOW + 1),
           (ACK_OP, "d1", Ack(cmd.command_id, True, "pong"))]
    out = store.write(ops, received=NOW)
    assert out == {"records": 3, "states": 1, "acks_matched": 1, "duplicates": 0}
    assert store.device("d1")["last_seen"] == NOW + 1 and store.command(cmd.command_id)["ok"] is True
    assert store.write(ops[1:2])["duplicates"] == 1  # the same batch id again: skipped
    _fill(store)
    with pytest.raises(sqlite3.OperationalError):
        store.write([(STATE_OP, "d2", DeviceState(status="online", ts=NOW)),
                     (TELEMETRY_OP, "d2", (make_records(2000, t0=NOW, rng=rng), 0, "b2"))], received=NOW)
    assert store.device("d2") is None  # all or nothing


@pytest.mark.parametrize("message,kind", [
    ("database or disk is full", "disk_full"), ("disk I/O error", "io_error"),
    ("database disk image is malformed", "corrupt"), ("file is not a database", "corrupt"),
    ("attempt to write a readonly database", "read_only"), ("database is locked", "busy"),
    ("UNIQUE constraint failed: x.y", "other"),
])
def test_error_kinds(message: str, kind: str) -> None:
    assert error_kind(sqlite3.OperationalError(message)) == kind


def test_an_online_device_silent_for_stale_after_s_is_stale(tmp_path: Path) -> None:
    store = FleetStore(tmp_path / "s.sqlite", stale_after_s=15.0)
    try:
        store.upsert_state("hung", DeviceState(status="online", mode="split", cut="c1", ts=NOW), received=NOW)
        store.insert_records([("busy", make_records(1, t0=NOW, rng=random.Random(1)), 0)], received=NOW + 10)
        store.upsert_state("gone", DeviceState(status="offline", ts=NOW), received=NOW)

        def status(now: float) -> dict[str, tuple[str, str]]:
            return {r["device_id"]: (r["status"], r["reported_status"]) for r in store.fleet(now=now)}

        assert status(NOW + 15) == {"hung": ("online", "online"), "busy": ("online", "online"),
                                    "gone": ("offline", "offline")}
        # the broker never said offline (no last will came): the store says stale, and keeps what was reported
        assert status(NOW + 15.5) == {"hung": ("stale", "online"), "busy": ("online", "online"),
                                      "gone": ("offline", "offline")}
        assert status(NOW + 26)["busy"] == ("stale", "online")
        store.insert_records([("hung", [], 0, "heartbeat-1")], received=NOW + 30)  # anything it sends counts
        assert status(NOW + 31)["hung"] == ("online", "online")
        assert store.device("hung")["status"] == "online"  # the stored row is what the device said
    finally:
        store.close()
    never = FleetStore(tmp_path / "n.sqlite", stale_after_s=None)
    try:
        never.upsert_state("d", DeviceState(status="online", ts=NOW), received=NOW)
        assert never.fleet(now=NOW + 1e6)[0]["status"] == "online"
    finally:
        never.close()
    with pytest.raises(ValueError, match="stale_after_s"):
        FleetStore(tmp_path / "x.sqlite", stale_after_s=0)


def test_a_corrupt_file_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    path.write_bytes(b"this is not SQLite at all, " * 400)
    with pytest.raises(sqlite3.DatabaseError) as err:
        FleetStore(path)
    assert error_kind(err.value) == "corrupt"


def test_a_new_store_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    store = FleetStore(tmp_path / "fleet.db")
    try:
        store.upsert_state("perm-1", DeviceState(status="online"))
        for name in ("fleet.db", "fleet.db-wal"):
            if (tmp_path / name).exists():
                assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    finally:
        store.close()
