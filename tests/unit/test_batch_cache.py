"""split-batch's parts without Ray: the prediction cache (SQLite WAL, blocks committed whole, no pickle), the
dataset readers' checks (every bad row named before its tensor is made), row hashes and bundle identities."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from cloud_tier.batch.cache import CacheError, PredictionCache, decode_outputs, encode_outputs
from cloud_tier.batch.inputs import BatchInputError, InputSpec, need, row_digest, scan_dataset
from cloud_tier.batch.pipeline import BatchOptions, OptionError, agreement, full_models, split_models
from models.extras import MissingExtraError
from models.manifest import Bundle, TensorSpec

SPEC = InputSpec("input", (3, 4), np.dtype(np.float32))


def _outputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": rng.standard_normal(10).astype(np.float32), "boxes": rng.integers(0, 9, (2, 4))}


def test_a_block_is_stored_and_read_back_exactly_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "c" / "predictions.sqlite"
    with PredictionCache(path) as cache:
        cache.put_block("id-a", [("d1", _outputs(1)), ("d2", _outputs(2))])
        cache.put_block("id-b", [("d1", _outputs(3))])
    with PredictionCache(path) as cache:
        assert cache.present("id-a", ["d1", "d2", "d3"]) == {"d1", "d2"}
        assert cache.present("id-b", ["d1", "d2"]) == {"d1"}  # another bundle identity: another prediction
        assert (cache.count("id-a"), cache.count()) == (2, 3)
        got = cache.get("id-a", "d2")
        for name, arr in _outputs(2).items():
            np.testing.assert_array_equal(got[name], arr)
            assert got[name].dtype == arr.dtype
        with pytest.raises(KeyError):
            cache.get("id-b", "d2")
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_block_that_fails_to_encode_stores_none_of_its_rows(tmp_path: Path) -> None:
    with PredictionCache(tmp_path / "p.sqlite") as cache:
        with pytest.raises(CacheError, match="dtype object"):
            cache.put_block("id", [("d1", _outputs(1)), ("d2", {"x": np.array([object()])})])
        assert cache.count() == 0


def test_records_hold_no_pickle_and_a_damaged_one_is_a_clear_error() -> None:
    header, data = encode_outputs(_outputs(4))
    assert b"\x80" not in header.encode()  # JSON names, dtypes and shapes; the values are raw bytes
    decode_outputs(header, data)
    with pytest.raises(CacheError, match="fewer bytes"):
        decode_outputs(header, data[:-1])
    with pytest.raises(CacheError, match="more bytes"):
        decode_outputs(header, data + b"\0")
    with pytest.raises(CacheError, match="dtype object"):
        decode_outputs('[["x", "|O", [1]]]', b"\0" * 8)


def test_a_file_that_is_not_a_cache_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "predictions.sqlite"
    path.write_bytes(b"not sqlite" * 100)
    with pytest.raises(CacheError, match="not a usable prediction cache"):
        PredictionCache(path)


def test_the_row_hash_is_of_the_content_not_the_id_or_the_form() -> None:
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    same = np.asfortranarray(x.copy())
    assert row_digest({"input": x}, [SPEC]) == row_digest({"input": same}, [SPEC])
    y = x.copy()
    y[0, 0, 0] = 1e-7
    assert row_digest({"input": x}, [SPEC]) != row_digest({"input": y}, [SPEC])


def _npy_dir(tmp_path: Path, **files: np.ndarray) -> Path:
    root = tmp_path / "npy"
    root.mkdir()
    for name, arr in files.items():
        np.save(root / f"{name}.npy", arr)
    return root


def test_npy_rows_are_read_in_name_order_with_their_ids(tmp_path: Path) -> None:
    a, b = np.ones((3, 4), np.float32), np.zeros((1, 3, 4), np.float32)  # with or without the batch dimension
    rows = list(scan_dataset(_npy_dir(tmp_path, b=b, a=a), [SPEC]))
    assert [r.id for r in rows] == ["a", "b"]
    assert rows[0].feeds["input"].shape == (1, 3, 4)
    np.testing.assert_array_equal(rows[1].feeds["input"], b)


@pytest.mark.parametrize(("arr", "message"), [
    (np.ones((3, 4), np.float64), "bad.npy: dtype float64, expected float32"),
    (np.ones((4, 3), np.float32), "bad.npy: shape (4, 3), expected (3, 4) or (1, 3, 4)"),
    (np.ones((2, 3, 4), np.float32), "bad.npy: shape (2, 3, 4)"),
    (np.asfortranarray(np.ones((3, 4), np.float32)), "bad.npy: Fortran-ordered array"),
    (np.array([{"a": 1}] * 12, dtype=object).reshape(3, 4), "bad.npy: dtype object, expected float32"),
])
def test_a_bad_npy_file_is_named_before_its_data_is_read(tmp_path: Path, arr: np.ndarray, message: str) -> None:
    root = _npy_dir(tmp_path, good=np.ones((3, 4), np.float32), bad=arr)
    with pytest.raises(BatchInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list(scan_dataset(root, [SPEC]))


def test_a_truncated_npy_file_is_named(tmp_path: Path) -> None:
    root = _npy_dir(tmp_path, cut=np.ones((3, 4), np.float32))
    file = root / "cut.npy"
    file.write_bytes(file.read_bytes()[:-4])
    with pytest.raises(BatchInputError, match=r"cut.npy: 44 bytes of data, expected 48 .* truncated"):
        list(scan_dataset(root, [SPEC]))


def test_a_dataset_that_is_neither_form_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(BatchInputError, match="expected a directory of .npy files or a .parquet file"):
        list(scan_dataset(tmp_path / "x.csv", [SPEC]))
    with pytest.raises(BatchInputError, match="no such file"):
        list(scan_dataset(tmp_path / "nothing", [SPEC]))
    with pytest.raises(BatchInputError, match="one input"):
        list(scan_dataset(tmp_path, [SPEC, InputSpec("mask", (3,), np.dtype(np.int64))]))


def _parquet(tmp_path: Path, columns: dict) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_rows_from_lists_or_raw_bytes(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    xs = [np.arange(12, dtype=np.float32) + i for i in range(3)]
    lists = _parquet(tmp_path, {"id": ["a", "b", "c"], "input": pa.array(xs, pa.list_(pa.float32()))})
    rows = list(scan_dataset(lists, [SPEC]))
    assert [r.id for r in rows] == ["a", "b", "c"]
    np.testing.assert_array_equal(rows[2].feeds["input"], xs[2].reshape(1, 3, 4))
    raw = tmp_path / "raw"
    raw.mkdir()
    packed = _parquet(raw, {"key": [7, 8, 9], "input": [x.astype("<f4").tobytes() for x in xs]})
    rows2 = list(scan_dataset(packed, [SPEC], id_column="key"))
    assert [r.id for r in rows2] == [7, 8, 9]
    assert [r.digest for r in rows2] == [r.digest for r in rows]  # the same content, the same rows to the cache


@pytest.mark.parametrize(("columns", "message"), [
    ({"id": ["a", "b"], "input": [list(range(12)), list(range(11))]}, r"row 1 \(id 'b'\): column 'input' has 11 "
                                                                      r"values, expected 12"),
    ({"id": ["a", "b"], "input": [b"\0" * 48, b"\0" * 47]}, r"row 1 \(id 'b'\): column 'input' has 47 bytes"),
    ({"id": ["a", "a"], "input": [b"\0" * 48, b"\0" * 48]}, r"row 1 \(id 'a'\): id 'a' appears twice"),
    ({"id": ["a", None], "input": [b"\0" * 48, b"\0" * 48]}, r"row 1 has no id"),
    ({"id": ["a", "b"], "input": [b"\0" * 48, None]}, r"row 1 \(id 'b'\): column 'input' is null"),
    ({"id": ["a"], "pixels": [b"\0" * 48]}, r"no column\(s\) \['input'\]"),
    ({"id": [1.5], "input": [b"\0" * 48]}, r"id column 'id' is double"),
    ({"id": ["a"], "input": [[[0.0] * 4] * 3]}, r"column 'input' holds nested lists"),
])
def test_a_bad_parquet_row_is_named(tmp_path: Path, columns: dict, message: str) -> None:
    pa = pytest.importorskip("pyarrow")
    if isinstance(columns.get("input", [None])[0], list) and not isinstance(columns["input"][0][0], list):
        columns["input"] = pa.array(columns["input"], pa.list_(pa.float32()))
    with pytest.raises(BatchInputError, match=message):
        list(scan_dataset(_parquet(tmp_path, columns), [SPEC]))


def test_parquet_values_of_another_dtype_are_refused(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    path = _parquet(tmp_path, {"id": [1], "input": pa.array([list(range(12))], pa.list_(pa.float64()))})
    with pytest.raises(BatchInputError, match="holds double values, expected float32"):
        list(scan_dataset(path, [SPEC]))


def test_an_input_with_a_free_dimension_is_refused() -> None:
    with pytest.raises(BatchInputError, match=r"shape \(\?, 3, \?, 224\).*fixed"):
        InputSpec.from_spec(TensorSpec("x", (None, 3, None, 224), "float32"))
    assert InputSpec.from_spec(TensorSpec("x", (None, 3, 8), "float32")).shape == (3, 8)


def test_the_identity_names_cut_precision_and_files(tiny_bundle: Path) -> None:
    bundle = Bundle.load(tiny_bundle)
    int8, fp32 = split_models(bundle, None, "int8"), split_models(bundle, None, "fp32")
    assert (int8.precision, fp32.precision) == ("int8", "fp32")
    cloud = split_models(bundle, "cloud-only", "int8")
    assert cloud.head is None and cloud.precision == "fp32" and cloud.tail is not None
    edge = split_models(bundle, "edge-only", "int8")
    assert edge.tail is None and edge.head is not None
    ids = {int8.identity, fp32.identity, cloud.identity, edge.identity, full_models(bundle).identity}
    assert len(ids) == 5
    assert split_models(Bundle.load(tiny_bundle), None, "int8").identity == int8.identity  # stable


@pytest.fixture()
def tiny_bundle(tmp_path: Path) -> Path:
    pytest.importorskip("onnx")
    from models.tiny_bundle import make_tiny_bundle

    return make_tiny_bundle(tmp_path / "tiny")


def test_options_out_of_range_are_named() -> None:
    with pytest.raises(OptionError, match="batch-size must be at least 1"):
        BatchOptions(batch_size=0).check()
    with pytest.raises(OptionError, match="head precision 'int4'"):
        BatchOptions(head_precision="int4").check()


def test_agreement_is_top1_for_classifiers_and_relative_error_for_all() -> None:
    full = [{"y": np.array([0.0, 1.0, 0.0])}, {"y": np.array([2.0, 0.0, 0.0])}]
    split = [{"y": np.array([0.0, 1.1, 0.0])}, {"y": np.array([0.0, 0.0, 3.0])}]
    (row,) = agreement(split, full, ["y"], classifier=True)
    assert row.top1 == 0.5 and row.rows == 2
    assert row.rel_err_max == pytest.approx(np.sqrt(13) / 2)
    assert agreement(split, full, ["y"], classifier=False)[0].top1 is None


def test_without_ray_the_error_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the [ray] extra gives
    with pytest.raises(MissingExtraError, match=r"^ray is not installed, and split-batch needs it: "
                                                r"pip install \"splitinfer\[ray\]\"$"):
        need("ray")


def test_split_batch_without_ray_is_one_line_naming_the_install(tiny_bundle: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from cloud_tier.batch.cli import main

    data = _npy_dir(tmp_path, a=np.zeros((3, 16, 16), np.float32))
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main([str(tiny_bundle), "--input", str(data), "--output", str(tmp_path / "o.parquet"),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert capsys.readouterr().err == ('split-batch: ray is not installed, and split-batch needs it: '
                                       'pip install "splitinfer[ray]"\n')


def _bomb(tmp_path: Path, column: object, rows: int = 4) -> Path:
    """A small zstd parquet file whose `input` column decodes to far more than its rows claim."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"id": list(range(rows)), "input": column}), path, compression="zstd")
    return path


def test_an_oversized_parquet_list_column_is_refused_from_the_metadata(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    big = pa.array([np.zeros(2_000_000, np.float32)] * 4, pa.list_(pa.float32()))  # 32 MB decoded, KBs on disk
    path = _bomb(tmp_path, big)
    assert path.stat().st_size < 200_000
    import pyarrow.parquet as pq

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("rows were decoded before the metadata check")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no_decode)
    with pytest.raises(BatchInputError, match=r"row group 0 \(rows 0-3\): column 'input' holds 8000000 values "
                                              r"for 4 rows: some row has more than 12 values"):
        list(scan_dataset(path, [SPEC]))


def test_an_oversized_parquet_bytes_column_is_refused_from_the_metadata(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = _bomb(tmp_path, [bytes(i) + b"\0" * 8_000_000 for i in range(4)])
    import pyarrow.parquet as pq

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda *a, **k: iter(()))
    with pytest.raises(BatchInputError, match=r"row group 0 \(rows 0-3\): column 'input' holds \d+ bytes "
                                              r"uncompressed for 4 rows of 48 bytes"):
        list(scan_dataset(path, [SPEC]))


def test_a_dictionary_encoded_bytes_column_is_checked_before_it_is_expanded(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    types: list[object] = []
    real = pq.ParquetFile.iter_batches

    def spy(self: object, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        for batch in real(self, *args, **kwargs):
            types.append(batch.column("input").type)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    # one long value repeated: the file's dictionary keeps it once, a decoder would expand it per row
    path = _bomb(tmp_path, pa.array([b"\0" * 40_000] * 4, pa.binary()))
    with pytest.raises(BatchInputError, match=r"row 0 \(id 0\): column 'input' has 40000 bytes, expected 48"):
        list(scan_dataset(path, [SPEC]))
    good = _bomb(tmp_path, pa.array([np.arange(12, dtype="<f4").tobytes()] * 4, pa.binary()))
    rows = list(scan_dataset(good, [SPEC]))
    np.testing.assert_array_equal(rows[3].feeds["input"], np.arange(12, dtype=np.float32).reshape(1, 3, 4))
    assert types and all(pa.types.is_dictionary(t) for t in types)  # read as the file keeps it, not expanded


def test_parquet_batches_are_sized_by_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cloud_tier.batch.inputs as inputs

    pa = pytest.importorskip("pyarrow")
    monkeypatch.setattr(inputs, "PARQUET_READ_BYTES", 2 * SPEC.nbytes)
    xs = [np.arange(12, dtype=np.float32) + i for i in range(5)]
    path = _parquet(tmp_path, {"id": list(range(5)), "input": pa.array(xs, pa.list_(pa.float32()))})
    import pyarrow.parquet as pq

    sizes: list[int] = []
    real = pq.ParquetFile.iter_batches

    def spy(self: object, batch_size: int, **kwargs: object):  # type: ignore[no-untyped-def]
        sizes.append(batch_size)
        return real(self, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    rows = list(scan_dataset(path, [SPEC]))
    assert sizes == [2] and len(rows) == 5
    np.testing.assert_array_equal(rows[4].feeds["input"], xs[4].reshape(1, 3, 4))


def test_the_output_has_int64_list_offsets_and_row_groups_sized_by_bytes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import cloud_tier.batch.pipeline as pipeline

    models = pipeline.Models("test", "c1", "fp32", "ident", None, None, ("y",))
    rows = {f"d{i}": {"y": np.full((2, 5), i, np.float32)} for i in range(5)}
    data = pipeline.Dataset(ids=[10, 11, 12, 13, 14], digests=list(rows), id_type="int64")
    monkeypatch.setattr(pipeline, "WRITE_BYTES", 2 * 40)  # two rows of 40 bytes of predictions per row group
    out = tmp_path / "o.parquet"
    with PredictionCache(tmp_path / "c.sqlite") as cache:
        cache.put_block("ident", list(rows.items()))
        pipeline.write_output(out, data, models, cache, "id")
    pf = pq.ParquetFile(out)
    assert pf.schema_arrow.field("y").type == pa.large_list(pa.float32())  # int64 offsets: no 2**31 values limit
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)] == [2, 2, 1]
    table = pf.read()
    assert table.column("id").to_pylist() == [10, 11, 12, 13, 14]
    np.testing.assert_array_equal(np.asarray(table.column("y")[4].as_py()), np.full(10, 4, np.float32))


def test_more_tail_gpus_than_the_local_cluster_has_is_an_option_error(caplog: pytest.LogCaptureFixture) -> None:
    from cloud_tier.batch.pipeline import ACTOR_WAIT_S, check_gpus, configure_context

    check_gpus(BatchOptions(concurrency=2), 0.5, 1.0)  # fits
    with pytest.raises(OptionError, match=r"--tail-gpus 1 x --concurrency 2 needs 2 GPUs, and the cluster has 1"):
        check_gpus(BatchOptions(concurrency=2), 1.0, 1.0)
    with pytest.raises(OptionError, match="needs 1 GPUs, and the cluster has 0"):
        check_gpus(BatchOptions(), 1.0, 0.0)
    remote = BatchOptions(ray_address="10.0.0.1:6379")
    with caplog.at_level("WARNING"):
        check_gpus(remote, 1.0, 0.0)  # a remote cluster may add GPU nodes: a warning, and a deadline
    assert "needs 1 GPUs, and the cluster has 0 now" in caplog.text

    class Ctx:
        enable_progress_bars = True
        wait_for_min_actors_s = -1.0  # Ray Data's default: wait forever

    local, far = Ctx(), Ctx()
    configure_context(local, BatchOptions(progress=False))
    configure_context(far, remote)
    assert (local.enable_progress_bars, local.wait_for_min_actors_s) == (False, -1.0)
    assert far.wait_for_min_actors_s == ACTOR_WAIT_S


def test_a_cache_another_run_holds_is_a_cache_error_not_a_traceback(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import cloud_tier.batch.cache as cache_mod

    monkeypatch.setattr(cache_mod, "BUSY_TIMEOUT_S", 0.05)
    path = tmp_path / "predictions.sqlite"
    with PredictionCache(path) as cache:
        other = sqlite3.connect(path, isolation_level=None)  # another run, writing a block
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(CacheError, match="another split-batch run is creating or writing this cache"):
            cache.put_block("id", [("d1", _outputs(1))])
        other.execute("ROLLBACK")
        cache.put_block("id", [("d1", _outputs(1))])  # once it is done, this run writes
        assert cache.count() == 1
        other.close()
    fresh = tmp_path / "new.sqlite"
    creator = sqlite3.connect(fresh, isolation_level=None)  # another run, creating the cache
    creator.execute("BEGIN EXCLUSIVE")
    with pytest.raises(CacheError, match="another split-batch run is creating or writing") as info:
        PredictionCache(fresh)
    assert "delete it" not in str(info.value)
    creator.close()


def test_the_cache_waits_for_another_run_longer_than_sqlites_default() -> None:
    from cloud_tier.batch.cache import BUSY_TIMEOUT_S

    assert BUSY_TIMEOUT_S >= 30  # sqlite3's default 5 s: a block of a large model can take longer to commit


@pytest.mark.parametrize("value_type", ["struct", "dictionary", "time32"])
def test_a_parquet_list_of_non_numbers_is_a_batch_input_error(tmp_path: Path, value_type: str) -> None:
    pa = pytest.importorskip("pyarrow")
    if value_type == "struct":
        cells = pa.array([[{"a": 1.0}] * 12], pa.list_(pa.struct([("a", pa.float32())])))
    elif value_type == "dictionary":
        values = pa.DictionaryArray.from_arrays(pa.array([0] * 12, pa.int8()), pa.array(["1.0"]))
        cells = pa.ListArray.from_arrays(pa.array([0, 12], pa.int32()), values)
    else:
        cells = pa.array([[1] * 12], pa.list_(pa.time32("s")))
    path = _parquet(tmp_path, {"id": [1], "input": cells})
    with pytest.raises(BatchInputError, match=r"column 'input' holds .* values, expected float32"):
        list(scan_dataset(path, [SPEC]))


def test_uint64_ids_above_the_int64_range_are_refused_at_scan_time(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    ids = pa.array([1, 2**63], pa.uint64())
    path = _parquet(tmp_path, {"id": ids, "input": [b"\0" * 48, b"\0" * 48]})
    with pytest.raises(BatchInputError, match=r"row 1 \(id 9223372036854775808\): id above 9223372036854775807"):
        list(scan_dataset(path, [SPEC]))
    ok = tmp_path / "ok"
    ok.mkdir()
    assert [r.id for r in scan_dataset(_parquet(ok, {"id": pa.array([1, 2**63 - 1], pa.uint64()),
                                                     "input": [b"\0" * 48] * 2}), [SPEC])] == [1, 2**63 - 1]


def test_a_run_that_fails_on_ray_is_one_line_and_exit_1(tiny_bundle: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    exceptions = pytest.importorskip("ray.exceptions")
    import cloud_tier.batch.cli as cli
    from cloud_tier.batch.pipeline import RunError, run_error

    remote = exceptions.RayTaskError("OnnxStage", "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                     "onnxruntime.InvalidArgument: bad input shape\n", ValueError("bad input shape"))
    err = run_error("cut c1, int8 head", remote)
    assert isinstance(err, RunError)
    assert str(err) == ("cut c1, int8 head: the run failed on Ray (RayTaskError: onnxruntime.InvalidArgument: "
                        "bad input shape)")

    def fails(*args: object, **kwargs: object) -> None:
        raise err

    monkeypatch.setattr(cli, "run_batch", fails)
    code = cli.main([str(tiny_bundle), "--input", str(tmp_path), "--output", str(tmp_path / "o.parquet")])
    assert code == 1
    assert capsys.readouterr().err == f"split-batch: {err}\n"


def test_tensor_names_that_collide_with_split_batchs_columns_are_option_errors(tiny_bundle: Path) -> None:
    from cloud_tier.batch.pipeline import POS, Models, Stage, check_names

    bundle = Bundle.load(tiny_bundle)
    split = split_models(bundle, None, "int8")
    check_names(split, "id")
    (output,) = split.outputs[:1]
    with pytest.raises(OptionError, match=f"model output {output!r} has the name of the id column"):
        check_names(split, output)
    for stage in (Stage(b"", ("x",), (POS,)), Stage(b"", (POS,), ("y",))):
        models = Models("cut c", "c", "fp32", "i", stage, None, ("y",))
        with pytest.raises(OptionError, match=f"a tensor named '{POS}'"):
            check_names(models, "id")


def test_split_batch_refuses_an_output_named_like_the_id_column_before_the_run(tiny_bundle: Path, tmp_path: Path,
                                                                               capsys) -> None:
    from cloud_tier.batch.cli import main

    output = Bundle.load(tiny_bundle).outputs[0].name
    data = _npy_dir(tmp_path, a=np.zeros((3, 16, 16), np.float32))
    code = main([str(tiny_bundle), "--input", str(data), "--output", str(tmp_path / "o.parquet"),
                 "--cache-dir", str(tmp_path / "cache"), "--id-column", output])
    assert code == 2
    assert "has the name of the id column" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before the cache, the dataset or Ray


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs here")
def test_only_regular_npy_files_are_read(tmp_path: Path) -> None:
    import os

    root = _npy_dir(tmp_path, a=np.ones((3, 4), np.float32))
    (root / "b.npy").mkdir()  # sorted before the FIFO: without the check, reading it fails before the FIFO hangs
    os.mkfifo(root / "c.npy")  # opening a FIFO for reading waits for a writer: forever
    assert [r.id for r in scan_dataset(root, [SPEC])] == ["a"]


def test_compute_holds_one_window_of_tensors_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cloud_tier.batch.pipeline as pipeline

    xs = {f"r{i:02d}": np.full((3, 4), i, np.float32) for i in range(11)}
    xs["r10"] = xs["r03"]  # a duplicate content: computed once
    data = pipeline.load_dataset(_npy_dir(tmp_path, **xs), [SPEC], "id")
    held: list[int] = []

    def stages(models: object, pending: list, feeds: dict, options: object, ray: object):  # type: ignore[no-untyped-def]
        held.append(len(feeds))  # what the driver holds while Ray Data runs this window
        for start in range(0, len(pending), 2):
            part = pending[start: start + 2]
            yield {pipeline.POS: np.arange(start, start + len(part)),
                   "y": np.stack([feeds[d]["input"][0].sum(keepdims=True) for d in part])}

    monkeypatch.setattr(pipeline, "_run_stages", stages)
    monkeypatch.setattr(pipeline, "WINDOW_BLOCKS", 2)
    models = pipeline.Models("test", "c", "fp32", "ident", None, None, ("y",))
    with PredictionCache(tmp_path / "c.sqlite") as cache:
        cache.put_block("ident", [(data.digests[0], {"y": np.array([0.0], np.float32)})])  # r00: cached
        report = pipeline.compute(models, data, cache, BatchOptions(batch_size=2), ray=None)
        assert (report.rows, report.unique, report.cached, report.computed) == (11, 10, 1, 9)
        assert held == [4, 4, 1]  # windows of 2 blocks x 2 rows, never the whole dataset
        got = {row_id: float(cache.get("ident", d)["y"].ravel()[0])
               for row_id, d in zip(data.ids, data.digests, strict=True)}
        assert got == {**{f"r{i:02d}": 12.0 * i for i in range(10)}, "r10": 36.0}  # each row's own prediction
