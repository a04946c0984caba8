"""A split-batch dataset: rows of model inputs with ids, each checked against the bundle's inputs before allocation.

Two forms (DATASET_FORMATS, shown by `split-batch --help`):

- a directory of `.npy` files, one sample each, for a model with one input: the row id is the file name without
  `.npy` (regular files only: a FIFO, device or folder named *.npy is skipped); the array has the input's shape
  without the batch dimension (or with a batch dimension of 1) and its dtype exactly. Files are read in name
  order with `allow_pickle=False`; the header is checked (dtype, shape, order, the file's length) before the
  array is read.
- a parquet file with a row-id column (`id`, or `--id-column`; integers or strings, unique, no nulls) and one
  column per model input named as the input. A cell is either a flat list of the input's dtype holding the
  sample's values in row-major (C) order, prod(shape) of them, or raw bytes: the sample's values little-endian
  in C order, prod(shape) x itemsize bytes. Before a row group is read, its column chunks' sizes in the file's
  metadata (values of a list column, uncompressed bytes of a bytes column) are checked against its row count x
  the input's size, so a small compressed file cannot decode to more than the rows it claims; raw bytes are read
  dictionary-encoded (not expanded), and rows are read in batches of at most PARQUET_READ_BYTES. Each row's
  length is then checked before any tensor is made.

A bad row stops the run with one BatchInputError naming the row (file, or row number and id) and what was
expected.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_tier.rayinit import INSTALL_LINE
from models.extras import MissingExtraError
from models.manifest import TensorSpec

DATASET_FORMATS = """\
dataset formats:
  DIR          a directory of .npy files, one sample each (models with one input): the row id is the file name
               without .npy; each array has the input's shape without the batch dimension (or with a leading 1)
               and exactly its dtype; read with allow_pickle=False, header checked before the data is read.
  FILE.parquet a row-id column (--id-column, default "id": integers or strings, unique, no nulls) and one column
               per model input, named as the input; a cell is a flat list of the input's dtype (prod(shape)
               values, row-major) or raw bytes (the values little-endian in C order, prod(shape) x itemsize).
output (OUT.parquet): the row-id column (same name and type as the input's; "id" for a directory), then one
  column per model output, named as the output: a flat list of its dtype, row-major; the per-row shapes are in
  the file's metadata (key "splitinfer.outputs", JSON).
"""
INT64_MAX = 2**63 - 1
PARQUET_READ_ROWS = 256  # rows read from a parquet file at a time, at most
PARQUET_READ_BYTES = 64 << 20  # ... and at most this many bytes of tensors (valid rows) at a time
PARQUET_BYTES_SLACK = 64 << 10  # a bytes column chunk's page headers and levels beyond its rows' values


def need(module: str) -> Any:
    """Import `module` of the [ray] extra (Ray Data, pyarrow), or MissingExtraError naming the pip install line."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{module.split('.')[0]} is not installed, and split-batch needs it: "
                                f"{INSTALL_LINE}") from exc


class BatchInputError(ValueError):
    """A dataset row (or the dataset itself) does not fit the bundle's inputs; the message names the row."""


@dataclass(frozen=True)
class InputSpec:
    """One model input as split-batch needs it: a fixed per-sample shape (no batch dimension) and a dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        """Values per sample."""
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes per sample."""
        return self.size * self.dtype.itemsize

    @classmethod
    def from_spec(cls, spec: TensorSpec) -> InputSpec:
        """From a bundle's model input; BatchInputError when a dimension other than the batch one is not fixed."""
        dims = tuple(spec.shape)
        sample = dims[1:] if dims and dims[0] in (None, 1) else dims
        if any(d is None or int(d) < 0 for d in sample):
            shown = ", ".join("?" if d is None else str(d) for d in dims)
            raise BatchInputError(f"model input {spec.name!r} has shape ({shown}): split-batch needs every "
                                  "dimension but the batch one fixed")
        return cls(spec.name, tuple(int(d) for d in sample if d is not None), np.dtype(spec.dtype))  # type: ignore[misc]


@dataclass(frozen=True)
class Row:
    """One dataset row: its id, where it was (for messages), its tensors (batch dimension 1) and content hash."""

    id: str | int
    where: str
    feeds: dict[str, np.ndarray]
    digest: str


def row_digest(feeds: dict[str, np.ndarray], specs: Sequence[InputSpec]) -> str:
    """The content hash of a row's inputs (names, dtypes, shapes and values), independent of its id."""
    h = hashlib.sha256()
    for spec in specs:
        arr = np.ascontiguousarray(feeds[spec.name])
        h.update(f"{spec.name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        h.update(arr.data)
    return h.hexdigest()


def scan_dataset(path: Path, specs: Sequence[InputSpec], id_column: str = "id") -> Iterator[Row]:
    """The rows of the dataset at `path` (a directory of .npy files or a .parquet file), checked, in order."""
    if path.is_dir():
        yield from _scan_npy_dir(path, specs)
    elif path.is_file() and path.suffix.lower() in (".parquet", ".pq"):
        yield from _scan_parquet(path, specs, id_column)
    elif not path.exists():
        raise BatchInputError(f"{path}: no such file or directory")
    else:
        raise BatchInputError(f"{path}: expected a directory of .npy files or a .parquet file")


def _row(row_id: str | int, where: str, feeds: dict[str, np.ndarray], specs: Sequence[InputSpec]) -> Row:
    return Row(row_id, where, feeds, row_digest(feeds, specs))


# -- a directory of .npy files --------------------------------------------------------------------------------


def _scan_npy_dir(root: Path, specs: Sequence[InputSpec]) -> Iterator[Row]:
    if len(specs) != 1:
        raise BatchInputError(f"{root}: a directory of .npy files feeds a model with one input; this one has "
                              f"{[s.name for s in specs]}: use a parquet file with one column per input")
    spec = specs[0]
    files = sorted(p for p in root.iterdir() if p.suffix == ".npy" and p.is_file())  # no FIFO, device or folder
    if not files:
        raise BatchInputError(f"{root}: no .npy files in this directory")
    for file in files:
        yield _row(file.stem, str(file), {spec.name: _read_npy(file, spec)}, specs)


def _read_npy(file: Path, spec: InputSpec) -> np.ndarray:
    """One sample from `file`, its header checked against `spec` before the data is read; batch dimension 1."""
    with open(file, "rb") as f:
        try:
            major, minor = np.lib.format.read_magic(f)
            if (major, minor) == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif major in (2, 3):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unknown .npy version {major}.{minor}")
        except ValueError as exc:
            raise BatchInputError(f"{file}: not a readable .npy file ({exc})") from None
        if dtype != spec.dtype:
            raise BatchInputError(f"{file}: dtype {dtype}, expected {spec.dtype} (model input {spec.name!r})")
        if tuple(shape) not in (spec.shape, (1, *spec.shape)):
            raise BatchInputError(f"{file}: shape {tuple(shape)}, expected {spec.shape} or {(1, *spec.shape)} "
                                  f"(model input {spec.name!r})")
        if fortran:
            raise BatchInputError(f"{file}: Fortran-ordered array; save it in C order (np.ascontiguousarray)")
        offset = f.tell()
        length = file.stat().st_size
        if length != offset + spec.nbytes:
            raise BatchInputError(f"{file}: {length - offset} bytes of data, expected {spec.nbytes} "
                                  f"(shape {spec.shape}, {spec.dtype}): truncated or padded")
        data = f.read(spec.nbytes)
    return np.frombuffer(data, dtype=spec.dtype).reshape(1, *spec.shape)


# -- a parquet file ---------------------------------------------------------------------------------------------


def _scan_parquet(file: Path, specs: Sequence[InputSpec], id_column: str) -> Iterator[Row]:
    pq = need("pyarrow.parquet")
    try:
        pf = pq.ParquetFile(file)
    except Exception as exc:  # noqa: BLE001 - pyarrow's error types: any unreadable file is the same user error
        raise BatchInputError(f"{file}: not a readable parquet file ({exc})") from None
    names = set(pf.schema_arrow.names)
    missing = [c for c in (id_column, *(s.name for s in specs)) if c not in names]
    if missing:
        raise BatchInputError(f"{file}: no column(s) {missing}; it has {sorted(names)} (the row id is "
                              f"--id-column {id_column!r}, a tensor column is named as the model input)")
    import pyarrow as pa

    id_type = pf.schema_arrow.field(id_column).type
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise BatchInputError(f"{file}: id column {id_column!r} is {id_type}, expected integers or strings")
    id_limit = INT64_MAX if pa.types.is_uint64(id_type) else None  # the output's id column is int64
    for spec in specs:
        _check_column_type(file, spec, pf.schema_arrow.field(spec.name).type)
    # raw bytes are read as a dictionary (the file's own dictionary encoding is not expanded before the checks)
    binary = [s.name for s in specs if _is_binary(pf.schema_arrow.field(s.name).type)]
    if binary:
        pf = pq.ParquetFile(file, read_dictionary=binary)
    rows = max(1, min(PARQUET_READ_ROWS, PARQUET_READ_BYTES // max(1, sum(s.nbytes for s in specs))))
    seen: set[str | int] = set()
    index = 0
    for group in range(pf.metadata.num_row_groups):
        _check_row_group(file, pf.metadata, group, index, specs)
        for batch in pf.iter_batches(batch_size=rows, row_groups=[group],
                                     columns=[id_column, *(s.name for s in specs)]):
            ids = batch.column(id_column).to_pylist()
            columns = {s.name: _column_values(file, s, batch.column(s.name), index, ids) for s in specs}
            for i, row_id in enumerate(ids):
                where = f"{file}: row {index + i} (id {row_id!r})"
                if row_id is None:
                    raise BatchInputError(f"{file}: row {index + i} has no id (null in column {id_column!r})")
                if id_limit is not None and row_id > id_limit:
                    raise BatchInputError(f"{where}: id above {id_limit}; integer ids must fit int64")
                if row_id in seen:
                    raise BatchInputError(f"{where}: id {row_id!r} appears twice; row ids must be unique")
                seen.add(row_id)
                yield _row(row_id, where, {s.name: columns[s.name][i: i + 1] for s in specs}, specs)
            index += len(ids)


def _is_binary(typ: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ))


def _check_row_group(file: Path, meta: Any, group: int, start: int, specs: Sequence[InputSpec]) -> None:
    """BatchInputError when a row group's column chunks hold more than its rows can (from the metadata alone)."""
    rg = meta.row_group(group)
    n = rg.num_rows
    for j in range(rg.num_columns):
        chunk = rg.column(j)
        name = chunk.path_in_schema.split(".")[0]
        spec = next((s for s in specs if s.name == name), None)
        if spec is None:
            continue
        where = f"{file}: row group {group} (rows {start}-{start + n - 1}): column {name!r}"
        if chunk.path_in_schema == name:  # raw bytes: 4 bytes of length and the value per row, and page headers
            limit = n * (spec.nbytes + 4) + PARQUET_BYTES_SLACK
            if chunk.total_uncompressed_size > limit:
                raise BatchInputError(f"{where} holds {chunk.total_uncompressed_size} bytes uncompressed for {n} "
                                      f"rows of {spec.nbytes} bytes: some row is longer than {spec.nbytes} bytes")
        elif chunk.num_values > n * max(1, spec.size):  # a list: prod(shape) values per row (1 for a null one)
            raise BatchInputError(f"{where} holds {chunk.num_values} values for {n} rows: some row has more than "
                                  f"{spec.size} values (shape {spec.shape})")


def _check_column_type(file: Path, spec: InputSpec, typ: Any) -> None:
    import pyarrow as pa

    if pa.types.is_fixed_size_binary(typ) and typ.byte_width != spec.nbytes:
        raise BatchInputError(f"{file}: column {spec.name!r} is {typ}: {typ.byte_width} bytes per row, expected "
                              f"{spec.nbytes} ({spec.shape}, {spec.dtype})")
    if _is_binary(typ):
        return
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        value = typ.value_type
        if pa.types.is_list(value) or pa.types.is_large_list(value) or pa.types.is_fixed_size_list(value):
            raise BatchInputError(f"{file}: column {spec.name!r} holds nested lists ({typ}); give each sample as "
                                  f"a flat list of {spec.size} values in row-major order")
        numeric = pa.types.is_integer(value) or pa.types.is_floating(value) or pa.types.is_boolean(value)
        if not numeric or value.to_pandas_dtype() != spec.dtype:
            raise BatchInputError(f"{file}: column {spec.name!r} holds {value} values, expected {spec.dtype} "
                                  f"(model input {spec.name!r})")
        return
    raise BatchInputError(f"{file}: column {spec.name!r} is {typ}; expected a list of {spec.dtype} or raw bytes")


def _column_values(file: Path, spec: InputSpec, col: Any, start: int, ids: list) -> np.ndarray:
    """The column's cells as one array [rows, *shape], every cell's length checked before it is made."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def bad(i: int, what: str) -> BatchInputError:
        return BatchInputError(f"{file}: row {start + i} (id {ids[i]!r}): column {spec.name!r} {what}")

    nulls = col.is_null().to_numpy(zero_copy_only=False)
    if nulls.any():
        raise bad(int(np.flatnonzero(nulls)[0]), "is null")
    typ = col.type
    if pa.types.is_dictionary(typ):  # raw bytes read dictionary-encoded: lengths of the distinct values first
        indices = col.indices.to_numpy(zero_copy_only=False)
        lengths = pc.binary_length(col.dictionary).to_numpy(zero_copy_only=False)[indices]
        wrong = np.flatnonzero(lengths != spec.nbytes)
        if wrong.size:
            i = int(wrong[0])
            raise bad(i, f"has {int(lengths[i])} bytes, expected {spec.nbytes} ({spec.shape}, {spec.dtype})")
        col = col.dictionary.take(col.indices)
        typ = col.type
    if _is_binary(typ):
        lengths = pc.binary_length(col).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != spec.nbytes)
        if wrong.size:
            i = int(wrong[0])
            raise bad(i, f"has {int(lengths[i])} bytes, expected {spec.nbytes} ({spec.shape}, {spec.dtype})")
        raw = b"".join(v.as_py() for v in col)
        return np.frombuffer(raw, dtype=spec.dtype.newbyteorder("<")).astype(spec.dtype).reshape(-1, *spec.shape)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != spec.size)
    if wrong.size:
        i = int(wrong[0])
        raise bad(i, f"has {int(lengths[i])} values, expected {spec.size} (shape {spec.shape}, row-major)")
    values = pc.list_flatten(col)
    if values.null_count:
        first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise bad(first // spec.size, "holds a null value")
    return values.to_numpy(zero_copy_only=False).astype(spec.dtype, copy=False).reshape(-1, *spec.shape)
