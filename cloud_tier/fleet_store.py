"""Fleet store: device state, per-request latency records, telemetry batch ids and commands in SQLite.

WAL mode so the dashboard's readers never block the controller's writer. One writer connection behind a
lock (batched inserts: executemany in one transaction); each reading thread gets its own connection.
Retention: rows older than `max_age_s` and rows beyond `max_rows_per_device` per device are pruned,
at most every `prune_every_s`, on the write path.

Percentiles are numpy's (linear interpolation between closest ranks), over the newest
`max_sample` records of the window, so a dashboard poll stays cheap on a busy device.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protos.mqtt import STAGES, Ack, Command, DeviceState, TelemetryRecord

__all__ = ["FleetStore", "percentile", "STAGES"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    mode TEXT, cut TEXT, bandwidth_mbps REAL, model TEXT, label TEXT,
    state_ts REAL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    dropped_total INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    ts REAL NOT NULL,
    received REAL NOT NULL,
    head_ms REAL NOT NULL, encode_ms REAL NOT NULL, network_ms REAL NOT NULL,
    queue_ms REAL NOT NULL, tail_ms REAL NOT NULL, total_ms REAL NOT NULL,
    served_by TEXT NOT NULL,
    cut TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_device_ts ON requests (device_id, ts);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE TABLE IF NOT EXISTS telemetry_batches (
    device_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (device_id, batch_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS telemetry_batches_received ON telemetry_batches (received);
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    sent_ts REAL NOT NULL,
    ack_ts REAL, ok INTEGER, message TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_STAGE_COLS = ", ".join(STAGES)
MAX_FUTURE_S = 300.0  # a device time further ahead of receipt than this is clamped to the receipt time


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """Percentile `q` (0-100) of `values` (np.percentile, linear interpolation); None when empty."""
    return float(np.percentile(values, q)) if len(values) else None


@dataclass(frozen=True)
class Retention:
    """How much request history is kept."""

    max_rows_per_device: int = 100_000
    max_age_s: float = 24 * 3600.0
    prune_every_s: float = 30.0
    # How long a telemetry batch id is remembered, by the time it was received: a copy of a batch delivered twice
    # (an agent's QoS 1 resend) arrives right behind the first in the broker's queue for this store's controller,
    # however long the controller was down, so minutes are plenty.
    batch_ids_s: float = 900.0


class FleetStore:
    """SQLite-backed store of fleet state and request telemetry; safe to use from several threads."""

    def __init__(self, path: str | Path, *, retention: Retention = Retention(), max_sample: int = 20_000) -> None:
        """Open (creating if needed) the database file at `path`."""
        self.path = str(path)
        if self.path == ":memory:" or self.path.startswith("file::memory:"):
            raise ValueError("FleetStore needs a database file (readers use their own connections), not ':memory:'")
        self.retention = retention
        self.max_sample = max_sample
        self._wlock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._writer = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
        self._writer.execute("PRAGMA journal_mode=WAL")
        self._writer.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
        self._writer.executescript(_SCHEMA)
        self._last_prune = time.monotonic()
        self._closed = False
        self.duplicate_batches = 0  # telemetry batches skipped as second deliveries (insert_records)
        self.future_timestamps = 0  # record and state times more than MAX_FUTURE_S ahead, clamped to receipt

    # --- connections -------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError(f"fleet store {self.path} is closed")
            conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection."""
        self._closed = True
        with self._wlock:
            self._writer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    # --- writes ------------------------------------------------------------------------------------

    def setting(self, key: str, default: str) -> str:
        """The value stored under `key`; the first call stores `default` (the first writer wins)."""
        with self._wlock:
            self._writer.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, default))
            return self._writer.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    def upsert_state(self, device_id: str, state: DeviceState, received: float | None = None) -> None:
        """Record a device's latest state (status, mode, cut, bandwidth, model, label); a state time more than
        MAX_FUTURE_S ahead of `received` is clamped to it and counted in `future_timestamps`."""
        now = time.time() if received is None else received
        future = state.ts > now + MAX_FUTURE_S
        state_ts = now if future else state.ts
        with self._wlock:
            self.future_timestamps += future
            self._writer.execute(
                "INSERT INTO devices (device_id, status, mode, cut, bandwidth_mbps, model, label, state_ts,"
                " first_seen, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?)"
                # An offline last will carries no mode/cut/model: keep the last known ones for the dashboard.
                " ON CONFLICT(device_id) DO UPDATE SET status=excluded.status,"
                " mode=COALESCE(NULLIF(excluded.mode, ''), devices.mode),"
                " cut=COALESCE(NULLIF(excluded.cut, ''), devices.cut),"
                " bandwidth_mbps=COALESCE(excluded.bandwidth_mbps, devices.bandwidth_mbps),"
                " model=COALESCE(NULLIF(excluded.model, ''), devices.model),"
                " label=COALESCE(NULLIF(excluded.label, ''), devices.label),"
                " state_ts=excluded.state_ts, last_seen=excluded.last_seen",
                (device_id, state.status, state.mode, state.cut, state.bandwidth_mbps, state.model, state.label,
                 state_ts, now, now),
            )

    def insert_records(
        self, batches: Iterable[tuple[str, Sequence[TelemetryRecord], int] | tuple[str, Sequence[TelemetryRecord],
                                                                                 int, str]],
        received: float | None = None,
    ) -> int:
        """Insert (device_id, records, dropped[, batch_id]) batches in one transaction; return the rows inserted.

        A batch whose non-empty batch_id this store saw from the same device within Retention.batch_ids_s is a
        second delivery of it: its records and its dropped count are skipped. A record time more than MAX_FUTURE_S
        ahead of `received` (a wrong clock, or a forgery meant to stay on the dashboard) is stored as `received`
        and counted in `future_timestamps`.
        """
        now = time.time() if received is None else received
        batches = list(batches)
        if not batches:
            return 0
        with self._wlock:
            cur = self._writer.cursor()
            cur.execute("BEGIN")
            try:
                rows: list[tuple[Any, ...]] = []
                touched: dict[str, int] = {}
                dupes = future = 0
                horizon = now + MAX_FUTURE_S
                for device_id, records, dropped, *rest in batches:
                    batch_id = rest[0] if rest else ""
                    if batch_id and cur.execute(
                            "INSERT OR IGNORE INTO telemetry_batches (device_id, batch_id, received) VALUES (?,?,?)",
                            (device_id, batch_id, now)).rowcount == 0:
                        dupes += 1
                        continue
                    touched[device_id] = touched.get(device_id, 0) + dropped
                    for r in records:
                        ts = r.ts
                        if ts > horizon:
                            ts, future = now, future + 1
                        rows.append((device_id, r.request_id, ts, now, r.head_ms, r.encode_ms, r.network_ms,
                                     r.queue_ms, r.tail_ms, r.total_ms, r.served_by, r.cut))
                cur.executemany(
                    f"INSERT INTO requests (device_id, request_id, ts, received, {_STAGE_COLS}, served_by, cut)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
                # A device that sends telemetry before (or without) a retained state still appears.
                cur.executemany(
                    "INSERT INTO devices (device_id, status, first_seen, last_seen, dropped_total)"
                    " VALUES (?, 'online', ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
                    " last_seen=excluded.last_seen, dropped_total=dropped_total+excluded.dropped_total",
                    [(d, now, now, n) for d, n in touched.items()],
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self.duplicate_batches += dupes
            self.future_timestamps += future
            if time.monotonic() - self._last_prune >= self.retention.prune_every_s:
                self._prune_locked()
        return len(rows)

    def prune(self) -> int:
        """Apply the retention limits now; return the rows deleted."""
        with self._wlock:
            return self._prune_locked()

    def _prune_locked(self) -> int:
        self._last_prune = time.monotonic()
        cur = self._writer.cursor()
        cur.execute("BEGIN")
        try:
            deleted = cur.execute("DELETE FROM requests WHERE ts < ?",
                                  (time.time() - self.retention.max_age_s,)).rowcount
            cur.execute("DELETE FROM telemetry_batches WHERE received < ?",
                        (time.time() - self.retention.batch_ids_s,))
            keep = self.retention.max_rows_per_device
            for (device_id,) in cur.execute("SELECT device_id FROM devices").fetchall():
                deleted += cur.execute(
                    "DELETE FROM requests WHERE device_id = ? AND id <= (SELECT id FROM requests"
                    " WHERE device_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (device_id, device_id, keep),
                ).rowcount
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return deleted

    def record_command(self, device_id: str, cmd: Command, sent_ts: float | None = None) -> None:
        """Remember a command sent to a device (its ack is filled in by record_ack)."""
        with self._wlock:
            self._writer.execute(
                "INSERT OR REPLACE INTO commands (command_id, device_id, kind, payload, sent_ts) VALUES (?,?,?,?,?)",
                (cmd.command_id, device_id, cmd.kind, cmd.to_json(), time.time() if sent_ts is None else sent_ts),
            )

    def record_ack(self, device_id: str, ack: Ack, ts: float | None = None) -> bool:
        """Attach an ack to its command; False if no such command was sent to that device."""
        with self._wlock:
            cur = self._writer.execute(
                "UPDATE commands SET ack_ts = ?, ok = ?, message = ? WHERE command_id = ? AND device_id = ?",
                (time.time() if ts is None else ts, int(ack.ok), ack.message, ack.command_id, device_id),
            )
            return cur.rowcount > 0

    # --- reads -------------------------------------------------------------------------------------

    def command(self, command_id: str) -> dict[str, Any] | None:
        """A sent command with its ack fields (ack_ts, ok, message are None until acked)."""
        row = self._reader().execute(
            "SELECT command_id, device_id, kind, payload, sent_ts, ack_ts, ok, message FROM commands"
            " WHERE command_id = ?", (command_id,)).fetchone()
        if row is None:
            return None
        keys = ("command_id", "device_id", "kind", "payload", "sent_ts", "ack_ts", "ok", "message")
        out = dict(zip(keys, row))
        out["ok"] = None if out["ok"] is None else bool(out["ok"])
        return out

    def device(self, device_id: str) -> dict[str, Any] | None:
        """The stored state row of one device."""
        rows = self._devices("WHERE device_id = ?", (device_id,))
        return rows[0] if rows else None

    def _devices(self, where: str = "", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        keys = ("device_id", "status", "mode", "cut", "bandwidth_mbps", "model", "label", "state_ts",
                "first_seen", "last_seen", "dropped_total")
        rows = self._reader().execute(f"SELECT {', '.join(keys)} FROM devices {where} ORDER BY device_id",
                                      params).fetchall()
        return [dict(zip(keys, r)) for r in rows]

    def record_count(self, device_id: str | None = None) -> int:
        """Rows stored for one device or for the whole fleet."""
        if device_id is None:
            return self._reader().execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        return self._reader().execute("SELECT COUNT(*) FROM requests WHERE device_id = ?",
                                      (device_id,)).fetchone()[0]

    def device_stats(
        self, device_id: str, *, window_s: float = 300.0, rate_window_s: float = 10.0, now: float | None = None
    ) -> dict[str, Any]:
        """Percentiles (p50/p95/p99) of each stage, request rate and edge share over a window."""
        now = time.time() if now is None else now
        conn = self._reader()
        rows = conn.execute(
            f"SELECT {_STAGE_COLS}, served_by FROM requests WHERE device_id = ? AND ts >= ?"
            " ORDER BY ts DESC LIMIT ?",
            (device_id, now - window_s, self.max_sample),
        ).fetchall()
        in_rate = conn.execute("SELECT COUNT(*) FROM requests WHERE device_id = ? AND ts >= ? AND ts <= ?",
                               (device_id, now - rate_window_s, now)).fetchone()[0]
        first = conn.execute("SELECT first_seen FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        # A device seen for less than the rate window has not had the whole window to send requests.
        span = min(rate_window_s, max(1.0, now - first[0])) if first else rate_window_s
        stages: dict[str, dict[str, float | None]] = {}
        for i, stage in enumerate(STAGES):
            values = np.fromiter((r[i] for r in rows), dtype=float, count=len(rows))
            stages[stage] = {f"p{q}": percentile(values, q) for q in (50, 95, 99)}
        edge = sum(1 for r in rows if r[-1] == "edge")
        return {
            "count": len(rows),
            "req_per_s": in_rate / span if span > 0 else 0.0,
            "edge_share": edge / len(rows) if rows else None,
            "stages": stages,
        }

    def fleet(self, *, window_s: float = 300.0, rate_window_s: float = 10.0, now: float | None = None
              ) -> list[dict[str, Any]]:
        """One summary row per device: state, last seen, req/s, p50/p95/p99 of total latency, edge share."""
        out = []
        with self._snapshot():  # one read transaction: a batch's records and its dropped count are seen together
            for dev in self._devices():
                stats = self.device_stats(dev["device_id"], window_s=window_s, rate_window_s=rate_window_s, now=now)
                total = stats["stages"]["total_ms"]
                out.append({**dev, "count": stats["count"], "req_per_s": stats["req_per_s"],
                            "edge_share": stats["edge_share"], "p50_ms": total["p50"], "p95_ms": total["p95"],
                            "p99_ms": total["p99"], "stages": stats["stages"]})
        return out

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Run this thread's reads in one transaction (WAL: a consistent view of the writer's commits)."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("COMMIT")

    def series(
        self, device_id: str, *, since_s: float = 120.0, bucket_s: float = 1.0, now: float | None = None
    ) -> dict[str, Any]:
        """Per-bucket p50 of each stage and request count for one device, oldest bucket first."""
        if bucket_s <= 0:
            raise ValueError(f"bucket_s must be > 0, got {bucket_s}")
        now = time.time() if now is None else now
        rows = self._reader().execute(
            f"SELECT ts, {_STAGE_COLS} FROM requests WHERE device_id = ? AND ts >= ? AND ts <= ? ORDER BY ts",
            (device_id, now - since_s, now),
        ).fetchall()
        buckets: dict[int, list[tuple[float, ...]]] = {}
        for r in rows:
            buckets.setdefault(int(r[0] // bucket_s), []).append(r[1:])
        keys = sorted(buckets)
        series: dict[str, list[float | None]] = {s: [] for s in STAGES}
        for k in keys:
            for i, stage in enumerate(STAGES):
                series[stage].append(percentile([v[i] for v in buckets[k]], 50))
        return {
            "device_id": device_id,
            "bucket_s": bucket_s,
            "t": [k * bucket_s for k in keys],
            "count": [len(buckets[k]) for k in keys],
            "p50": series,
        }
