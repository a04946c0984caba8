"""The prediction cache of split-batch: one SQLite file in WAL mode, one transaction per finished block.

A prediction is keyed by (identity, digest): the bundle's identity (model hash, cut, head precision and the
hashes of the files run; `pipeline.Identity`) and the row's content hash (`inputs.row_digest`), never the row's
id. Outputs are stored as a JSON header (name, dtype, shape per output) and their bytes: no pickle. A block's
rows are committed together as the block finishes, so a run killed at any point (SIGKILL included) leaves
every finished block in the cache and nothing half-written; a rerun skips those rows.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    identity TEXT NOT NULL,
    digest   TEXT NOT NULL,
    header   TEXT NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (identity, digest)
) WITHOUT ROWID;
"""
LOOKUP_CHUNK = 500  # digests per SELECT ... IN (...): below SQLite's variable limit
BUSY_TIMEOUT_S = 60.0  # how long a statement waits for another run's write transaction before giving up


class CacheError(RuntimeError):
    """The cache file cannot be used (not SQLite, or a record that does not decode); the message names it."""


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> tuple[str, bytes]:
    """(header JSON, bytes) of one row's outputs: their names, dtypes and shapes, then their C-order bytes."""
    header, parts = [], []
    for name, arr in outputs.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.hasobject:
            raise CacheError(f"output {name!r} has dtype object; only numeric outputs are cached")
        header.append([name, arr.dtype.str, list(arr.shape)])
        parts.append(arr.tobytes())
    return json.dumps(header, separators=(",", ":")), b"".join(parts)


def decode_outputs(header: str, data: bytes) -> dict[str, np.ndarray]:
    """The outputs `encode_outputs` stored; CacheError when the record is not one it wrote."""
    try:
        fields = json.loads(header)
        out, offset = {}, 0
        for name, dtype_str, shape in fields:
            dtype = np.dtype(dtype_str)
            if dtype.hasobject:
                raise ValueError("dtype object")
            count = int(np.prod(shape, dtype=np.int64))
            if count < 0 or offset + count * dtype.itemsize > len(data):
                raise ValueError("fewer bytes than the header says")
            out[str(name)] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += count * dtype.itemsize
        if offset != len(data):
            raise ValueError("more bytes than the header says")
    except (ValueError, TypeError) as exc:
        raise CacheError(f"a cached prediction does not decode ({exc}); delete the cache file or use --no-cache"
                         ) from None
    return out


def _busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _busy_error(path: Path, exc: sqlite3.Error) -> CacheError:
    return CacheError(f"{path}: another split-batch run is creating or writing this cache and held it for more "
                      f"than {BUSY_TIMEOUT_S:g} s ({exc}); wait for it, or give this run another --cache-dir")


class PredictionCache:
    """Predictions by (identity, digest) in one SQLite file (WAL); safe to share between threads of one process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        db = None
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a killed process
            db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            if _busy(exc):  # another run holds it (creating it, or writing a block): not a damaged file
                raise _busy_error(self.path, exc) from None
            raise CacheError(f"{self.path}: not a usable prediction cache ({exc}); delete it or use --no-cache"
                             ) from None
        self._db = db

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The connection, under this process's lock; another run's lock held past the timeout is a CacheError."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.OperationalError as exc:
                if _busy(exc):
                    raise _busy_error(self.path, exc) from None
                raise

    def close(self) -> None:
        """Close the database (committed blocks are already on disk)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> PredictionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def present(self, identity: str, digests: Iterable[str]) -> set[str]:
        """Which of `digests` have a prediction under `identity`."""
        wanted = list(dict.fromkeys(digests))
        found: set[str] = set()
        with self._locked() as db:
            for i in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[i: i + LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT digest FROM predictions WHERE identity = ? AND digest IN ({marks})",
                                  [identity, *chunk])
                found.update(r[0] for r in rows)
        return found

    def put_block(self, identity: str, rows: Sequence[tuple[str, Mapping[str, np.ndarray]]]) -> None:
        """Store one finished block's predictions in one transaction: all of them, or (killed) none."""
        records = [(identity, digest, *encode_outputs(outputs)) for digest, outputs in rows]
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?)", records)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def get(self, identity: str, digest: str) -> dict[str, np.ndarray]:
        """The prediction of one row; KeyError when there is none."""
        with self._locked() as db:
            row = db.execute("SELECT header, data FROM predictions WHERE identity = ? AND digest = ?",
                             (identity, digest)).fetchone()
        if row is None:
            raise KeyError(digest)
        return decode_outputs(row[0], row[1])

    def get_many(self, identity: str, digests: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """The predictions of `digests`, in their order (KeyError for one not cached)."""
        for digest in digests:
            yield self.get(identity, digest)

    def count(self, identity: str | None = None) -> int:
        """Predictions stored (under `identity`, or all)."""
        with self._locked() as db:
            if identity is None:
                return int(db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
            return int(db.execute("SELECT COUNT(*) FROM predictions WHERE identity = ?",
                                  (identity,)).fetchone()[0])
