"""Fleet store: device state, per-request latency records, telemetry batch ids and commands in SQLite.

WAL mode so the dashboard's readers never block the controller's writer. One writer connection behind a
lock (batched inserts: executemany in one transaction); each reading thread gets its own connection.
Retention: rows older than `max_age_s` and rows beyond `max_rows_per_device` per device are pruned,
at most every `prune_every_s`, on the write path.

Writes run in one transaction each (`write()` takes a whole list of states, telemetry batches and acks, so a
controller's batch commits or fails as one); a failed write is rolled back and its own error raised (never the
ROLLBACK's), and the store remembers the last failure for `health()` until a write succeeds again.
`error_kind()` names the kind of a failure ("disk_full", "io_error", "corrupt", ...) for metrics.

Presence: `fleet()` reports a device "stale" when the broker says online but nothing (state, telemetry) has
arrived from it for `stale_after_s`, so a hung device whose last will never comes still shows.

Percentiles are numpy's (linear interpolation between closest ranks), over the newest
`max_sample` records of the window, so a dashboard poll stays cheap on a busy device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protos.mqtt import STAGES, Ack, Command, DeviceState, TelemetryRecord

__all__ = ["DEFAULT_STALE_AFTER_S", "FleetStore", "StoreHealth", "STAGES", "error_kind", "percentile"]

log = logging.getLogger(__name__)

# Agents flush telemetry every 5 s at most (edge_agent's flush_interval_ms default is 500 ms): three intervals of
# silence while the broker still says "online" is a hung device, a cut link, or a broker without keepalive.
DEFAULT_STALE_AFTER_S = 3 * 5.0

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
STATE_OP, TELEMETRY_OP, ACK_OP = "state", "telemetry", "ack"  # FleetStore.write() operations
MAX_FUTURE_S = 300.0  # a device time further ahead of receipt than this is clamped to the receipt time


_KINDS = (  # (sqlite error name prefix or message fragment, kind), first match wins
    ("SQLITE_FULL", "disk_full"), ("database or disk is full", "disk_full"),
    ("SQLITE_TOOBIG", "too_big"),
    ("SQLITE_CORRUPT", "corrupt"), ("SQLITE_NOTADB", "corrupt"), ("malformed", "corrupt"),
    ("file is not a database", "corrupt"),
    ("SQLITE_READONLY", "read_only"), ("readonly", "read_only"),
    ("SQLITE_BUSY", "busy"), ("SQLITE_LOCKED", "busy"), ("locked", "busy"),
    ("SQLITE_CANTOPEN", "cannot_open"), ("unable to open", "cannot_open"),
    ("SQLITE_IOERR", "io_error"), ("disk I/O error", "io_error"),
)


def error_kind(exc: BaseException) -> str:
    """A short label for a store failure (a metric label): disk_full, io_error, corrupt, read_only, busy,
    cannot_open, too_big, or other."""
    name = getattr(exc, "sqlite_errorname", "") or ""  # Python 3.11+: e.g. SQLITE_IOERR_WRITE
    text = str(exc)
    for key, kind in _KINDS:
        if (key.startswith("SQLITE_") and name.startswith(key)) or (not key.startswith("SQLITE_") and key in text):
            return kind
    return "other"


def describe_error(exc: BaseException) -> str:
    """The failure as an operator reads it: the SQLite message and its code name where Python has it."""
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({name})" if name else str(exc) or type(exc).__name__


@dataclass(frozen=True)
class StoreHealth:
    """Whether the store's last write succeeded; `reason` names the last failure while it lasts."""

    ok: bool
    reason: str = ""
    since: float | None = None  # time.time() of the first failure of the current run of failures


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

    def __init__(self, path: str | Path, *, retention: Retention = Retention(), max_sample: int = 20_000,
                 stale_after_s: float | None = DEFAULT_STALE_AFTER_S) -> None:
        """Open (creating if needed) the database file at `path`; sqlite3.Error when it is not a usable SQLite
        database (corrupt, unreadable, a directory).

        `stale_after_s`: fleet() reports an "online" device that has sent nothing for longer as "stale" (None:
        never).
        """
        if stale_after_s is not None and not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be > 0 seconds (or None), got {stale_after_s!r}")
        self.path = str(path)
        if self.path == ":memory:" or self.path.startswith("file::memory:"):
            raise ValueError("FleetStore needs a database file (readers use their own connections), not ':memory:'")
        self.retention = retention
        self.max_sample = max_sample
        self.stale_after_s = stale_after_s
        self._failure: StoreHealth | None = None
        self._wlock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        # Device ids, labels and latency history are the operator's: a new store is readable by its owner only
        # (SQLite gives its -wal and -shm files the database file's mode).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        self._writer = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
        try:
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
            self._writer.executescript(_SCHEMA)
            # A damaged file can open and still fail on its first real read: read every table once now.
            for table in ("devices", "requests", "telemetry_batches", "commands", "meta"):
                self._writer.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchall()
        except sqlite3.Error:
            self._writer.close()
            raise
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

    # --- health ------------------------------------------------------------------------------------

    def health(self) -> StoreHealth:
        """ok, or the last write failure (until a write succeeds again)."""
        return self._failure or StoreHealth(True)

    def explain(self, exc: BaseException) -> str:
        """`exc` as an operator reads it, with what the system says of a failed write: SQLite reports a file over
        the size limit as a mere "disk I/O error", and a full disk without saying which."""
        text = describe_error(exc)
        if error_kind(exc) not in ("disk_full", "io_error"):
            return text
        hints = []
        files = [p for p in (Path(self.path), Path(self.path + "-wal")) if p.exists()]
        try:
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY and any(p.stat().st_size >= limit for p in files):
                hints.append(f"file too large: this process may not write files over {limit} bytes (RLIMIT_FSIZE, "
                             "ulimit -f)")
        except (ImportError, OSError, ValueError):
            pass
        try:
            usage = shutil.disk_usage(Path(self.path).parent)
            if usage.free < 64 * 1024 * 1024:
                hints.append(f"the disk holding {self.path} has {usage.free // 1024} KiB free")
        except OSError:
            pass
        return f"{text}: {'; '.join(hints)}" if hints else text

    def _failed(self, exc: BaseException) -> None:
        since = self._failure.since if self._failure is not None else time.time()
        self._failure = StoreHealth(False, f"{error_kind(exc)}: {self.explain(exc)}", since)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN ... COMMIT on the writer (the caller holds _wlock). On failure roll back if SQLite has not
        already (a full disk rolls the transaction back itself) and raise the failure, not the ROLLBACK's."""
        cur = self._writer.cursor()
        try:
            cur.execute("BEGIN")
            yield cur
            cur.execute("COMMIT")
        except BaseException as exc:
            if self._writer.in_transaction:
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error as rollback_exc:
                    log.debug("fleet store: ROLLBACK after %r failed too: %s", exc, rollback_exc)
            if isinstance(exc, sqlite3.Error):
                self._failed(exc)
            raise
        self._failure = None

    # --- writes ------------------------------------------------------------------------------------

    def setting(self, key: str, default: str) -> str:
        """The value stored under `key`; the first call stores `default` (the first writer wins)."""
        with self._wlock, self._transaction() as cur:
            cur.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, default))
            return cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    def upsert_state(self, device_id: str, state: DeviceState, received: float | None = None) -> None:
        """Record a device's latest state (status, mode, cut, bandwidth, model, label); a state time more than
        MAX_FUTURE_S ahead of `received` is clamped to it and counted in `future_timestamps`."""
        self.write([(STATE_OP, device_id, state)], received)

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
        ops: list[tuple[str, str, Any]] = []
        for device_id, records, dropped, *rest in batches:
            ops.append((TELEMETRY_OP, device_id, (records, dropped, rest[0] if rest else "")))
        return self.write(ops, received)["records"] if ops else 0

    def record_ack(self, device_id: str, ack: Ack, ts: float | None = None) -> bool:
        """Attach an ack to its command; False if no such command was sent to that device."""
        return self.write([(ACK_OP, device_id, ack)], ts)["acks_matched"] == 1

    def write(self, ops: Sequence[tuple[Any, ...]], received: float | None = None) -> dict[str, int]:
        """Apply `ops` in order in one transaction (all or nothing) and return what was written:
        {"records", "states", "acks_matched", "duplicates"}.

        Each op is (STATE_OP, device_id, DeviceState), (TELEMETRY_OP, device_id, (records, dropped, batch_id)) or
        (ACK_OP, device_id, Ack), each optionally followed by its own receipt time; `received` is the receipt time
        of those without (default now). A failure raises the SQLite
        error (nothing of `ops` is kept) and shows in health() until a write succeeds.
        """
        now = time.time() if received is None else received
        out = {"records": 0, "states": 0, "acks_matched": 0, "duplicates": 0, "future": 0}
        with self._wlock:
            with self._transaction() as cur:
                for op, device_id, payload, *when in ops:
                    t = when[0] if when else now
                    if op == STATE_OP:
                        out["future"] += self._state_in(cur, device_id, payload, t)
                        out["states"] += 1
                    elif op == TELEMETRY_OP:
                        records, dropped, batch_id = payload
                        self._telemetry_in(cur, device_id, records, dropped, batch_id, t, out)
                    elif op == ACK_OP:
                        out["acks_matched"] += cur.execute(
                            "UPDATE commands SET ack_ts = ?, ok = ?, message = ?"
                            " WHERE command_id = ? AND device_id = ?",
                            (t, int(payload.ok), payload.message, payload.command_id, device_id)).rowcount > 0
                    else:
                        raise ValueError(f"fleet store write: unknown op {op!r}")
            self.duplicate_batches += out["duplicates"]
            self.future_timestamps += out.pop("future")
            if time.monotonic() - self._last_prune >= self.retention.prune_every_s:
                self._prune_locked()
        return out

    @staticmethod
    def _state_in(cur: sqlite3.Cursor, device_id: str, state: DeviceState, now: float) -> int:
        future = state.ts > now + MAX_FUTURE_S
        cur.execute(
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
             now if future else state.ts, now, now),
        )
        return int(future)

    @staticmethod
    def _telemetry_in(cur: sqlite3.Cursor, device_id: str, records: Sequence[TelemetryRecord], dropped: int,
                      batch_id: str, now: float, out: dict[str, int]) -> None:
        if batch_id and cur.execute(
                "INSERT OR IGNORE INTO telemetry_batches (device_id, batch_id, received) VALUES (?,?,?)",
                (device_id, batch_id, now)).rowcount == 0:
            out["duplicates"] += 1
            return
        horizon = now + MAX_FUTURE_S
        rows: list[tuple[Any, ...]] = []
        for r in records:
            ts = r.ts
            if ts > horizon:
                ts = now
                out["future"] += 1
            rows.append((device_id, r.request_id, ts, now, r.head_ms, r.encode_ms, r.network_ms,
                         r.queue_ms, r.tail_ms, r.total_ms, r.served_by, r.cut))
        cur.executemany(
            f"INSERT INTO requests (device_id, request_id, ts, received, {_STAGE_COLS}, served_by, cut)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        # A device that sends telemetry before (or without) a retained state still appears.
        cur.execute(
            "INSERT INTO devices (device_id, status, first_seen, last_seen, dropped_total)"
            " VALUES (?, 'online', ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
            " last_seen=excluded.last_seen, dropped_total=dropped_total+excluded.dropped_total",
            (device_id, now, now, dropped),
        )
        out["records"] += len(rows)

    def prune(self) -> int:
        """Apply the retention limits now; return the rows deleted."""
        with self._wlock:
            return self._prune_locked()

    def _prune_locked(self) -> int:
        self._last_prune = time.monotonic()
        with self._transaction() as cur:
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
        return deleted

    def record_command(self, device_id: str, cmd: Command, sent_ts: float | None = None) -> None:
        """Remember a command sent to a device (its ack is filled in by record_ack)."""
        with self._wlock, self._transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO commands (command_id, device_id, kind, payload, sent_ts) VALUES (?,?,?,?,?)",
                (cmd.command_id, device_id, cmd.kind, cmd.to_json(), time.time() if sent_ts is None else sent_ts),
            )

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
        """One summary row per device: state, last seen, req/s, p50/p95/p99 of total latency, edge share.

        `status` is what the device (or its last will) said, except that an "online" device silent for more than
        `stale_after_s` at `now` is "stale"; `reported_status` keeps what it said.
        """
        now = time.time() if now is None else now
        out = []
        with self._snapshot():  # one read transaction: a batch's records and its dropped count are seen together
            for dev in self._devices():
                dev["reported_status"] = dev["status"]
                dev["status"] = self.presence(dev["status"], dev["last_seen"], now)
                stats = self.device_stats(dev["device_id"], window_s=window_s, rate_window_s=rate_window_s, now=now)
                total = stats["stages"]["total_ms"]
                out.append({**dev, "count": stats["count"], "req_per_s": stats["req_per_s"],
                            "edge_share": stats["edge_share"], "p50_ms": total["p50"], "p95_ms": total["p95"],
                            "p99_ms": total["p99"], "stages": stats["stages"]})
        return out

    def presence(self, status: str, last_seen: float, now: float) -> str:
        """`status`, or "stale" when it is "online" but nothing arrived for more than stale_after_s before `now`."""
        if status == "online" and self.stale_after_s is not None and now - last_seen > self.stale_after_s:
            return "stale"
        return status

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
