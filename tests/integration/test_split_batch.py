"""`split-batch`: a dataset through a bundle's head and tail on Ray Data, with the prediction cache, on a real
local Ray cluster (the session's: tests/integration/conftest.py, loopback only, 2 CPUs, token auth pinned off).

Its predictions equal the full model's run row by row (tolerance per head precision); a rerun takes every row
from the cache, whatever the dataset's form (.npy files or parquet: the cache keys rows by content); a run
SIGKILLed after its first committed block resumes without recomputing it; --compare reports the split's
agreement with the full model; bad input is one line naming the row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data", reason='the [ray] extra is not installed (pip install "splitinfer[ray]")')
pa = pytest.importorskip("pyarrow")

import pyarrow.parquet as pq  # noqa: E402

from cloud_tier.batch.cache import PredictionCache  # noqa: E402
from cloud_tier.batch.cli import main  # noqa: E402
from cloud_tier.batch.pipeline import CACHE_FILE, BatchOptions, run_batch, split_models  # noqa: E402
from models.manifest import PLAN_FILE, Bundle  # noqa: E402
from models.ortopts import make_session  # noqa: E402
from models.tiny_bundle import INPUT, OUTPUT, make_tiny_bundle, sample_input  # noqa: E402

ROWS = 24
BATCH = 4  # rows per block: 6 blocks
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny bundle (recorded as a classifier), ROWS samples as .npy files and the same as parquet."""
    root = tmp_path_factory.mktemp("split_batch")
    bundle = make_tiny_bundle(root / "tiny")
    plan = json.loads((bundle / PLAN_FILE).read_text())
    plan["model"]["task"] = "classification"  # plan.json is not among the hashed artifacts
    (bundle / PLAN_FILE).write_text(json.dumps(plan))
    npy = root / "npy"
    npy.mkdir()
    xs = [sample_input(seed=100 + i)[0] for i in range(ROWS)]
    for i, x in enumerate(xs):
        np.save(npy / f"img{i:03d}.npy", x)
    table = pa.table({"id": pa.array(range(1000, 1000 + ROWS), pa.int64()),
                      INPUT: pa.array([x.ravel() for x in xs], pa.list_(pa.float32()))})
    pq.write_table(table, root / "data.parquet")
    return {"bundle": bundle, "npy": npy, "parquet": root / "data.parquet", "root": root}


def _full_row_by_row(bundle: Path, xs: list[np.ndarray]) -> np.ndarray:
    session = make_session(Bundle.load(bundle).full)
    return np.concatenate([session.run([OUTPUT], {INPUT: x[None]})[0] for x in xs])


def _inputs(npy: Path) -> list[np.ndarray]:
    return [np.load(p, allow_pickle=False) for p in sorted(npy.glob("*.npy"))]


def _predictions(path: Path) -> tuple[list, np.ndarray]:
    table = pq.read_table(path)
    shapes = json.loads(table.schema.metadata[b"splitinfer.outputs"])["outputs"]
    values = np.array(table.column(OUTPUT).to_pylist(), dtype=np.float32)
    return table.column("id").to_pylist(), values.reshape(-1, *shapes[OUTPUT]["shape"])


def _rel_err(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)


def test_predictions_equal_the_full_model_and_a_rerun_takes_every_row_from_the_cache(
        ray_cluster, dataset, tmp_path, capsys) -> None:
    out, cache = tmp_path / "preds.parquet", dataset["root"] / "cache"  # --compare below reuses it
    common = ["--cache-dir", str(cache), "--batch-size", str(BATCH), "-q"]
    assert main([str(dataset["bundle"]), "--input", str(dataset["npy"]), "--output", str(out), *common]) == 0
    err = capsys.readouterr().err
    assert f"cut c1, int8 head: {ROWS} rows: 0 skipped (cached), {ROWS} computed" in err
    ids, got = _predictions(out)
    assert ids == [f"img{i:03d}" for i in range(ROWS)]
    xs = _inputs(dataset["npy"])
    want = _full_row_by_row(dataset["bundle"], xs)
    assert _rel_err(got, want).max() < 0.05  # the int8 head: within its quantization error of the full model
    # and exactly what the int8 head then the tail give, row by row
    models = split_models(Bundle.load(dataset["bundle"]), None, "int8")
    assert models.head is not None and models.tail is not None
    head, tail = make_session(models.head.model), make_session(models.tail.model)
    exact = np.concatenate([tail.run([OUTPUT], dict(zip(models.tail.inputs, head.run(None, {INPUT: x[None]}))))[0]
                            for x in xs])
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)

    # a rerun computes nothing; the same samples as parquet (other ids) are the same rows to the cache
    out2 = tmp_path / "preds2.parquet"
    assert main([str(dataset["bundle"]), "--input", str(dataset["parquet"]), "--output", str(out2), *common]) == 0
    assert f"{ROWS} rows: {ROWS} skipped (cached), 0 computed" in capsys.readouterr().err
    ids2, got2 = _predictions(out2)
    assert ids2 == list(range(1000, 1000 + ROWS))
    np.testing.assert_array_equal(got2, got)
    with PredictionCache(cache / CACHE_FILE) as c:
        assert c.count(models.identity) == ROWS


def test_compare_reports_the_agreement_of_the_int8_head_per_output(ray_cluster, dataset, capsys) -> None:
    cache = dataset["root"] / "cache"  # the split's rows, if the test above ran, are cached: only the full model runs
    assert main([str(dataset["bundle"]), "--input", str(dataset["npy"]), "--compare", "--cache-dir", str(cache),
                 "--batch-size", str(2 * BATCH), "-q"]) == 0
    captured = capsys.readouterr()
    assert f"full model, fp32: {ROWS} rows: 0 skipped (cached), {ROWS} computed" in captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("split (cut c1, int8 head) against the full model")
    row = lines[2].split()
    assert row[0] == OUTPUT
    assert row[1] == str(ROWS)
    assert 90.0 <= float(row[2].rstrip("%")) <= 100.0  # top-1 (the bundle says it is a classifier)
    assert 0.0 < float(row[3]) < 0.05  # int8 quantization error: present, and small
    result = run_batch(dataset["bundle"], dataset["npy"], None, BatchOptions(cache_dir=cache, progress=False),
                       compare=True, say=lambda _: None)
    assert [(p.cached, p.computed) for p in result.passes] == [(ROWS, 0), (ROWS, 0)]  # both cached now


KILLED_RUN = """
import sys
from pathlib import Path
from cloud_tier.batch.pipeline import BatchOptions, run_batch

def committed(report):
    print("COMMITTED", report.computed, flush=True)
    sys.stdin.read()  # hold here (the test kills this process)

bundle, data, cache, address = sys.argv[1:5]
run_batch(Path(bundle), Path(data), None, BatchOptions(cache_dir=Path(cache), batch_size=int(sys.argv[5]),
          head_precision="fp32", ray_address=address, progress=False), on_block=committed)
"""


def test_a_killed_run_resumes_without_recomputing_its_finished_blocks(ray_cluster, dataset, tmp_path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "killed-run.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, str(dataset["bundle"]), str(dataset["npy"]), str(cache), ray_cluster,
             str(BATCH)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the first block is committed, and the run holds (EOF if it failed)
        assert line.startswith("COMMITTED "), log.read_text()[-3000:]
        done = int(line.split()[1])
        assert 0 < done < ROWS
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    models = split_models(Bundle.load(dataset["bundle"]), None, "fp32")
    with PredictionCache(cache / CACHE_FILE) as c:
        assert c.count(models.identity) == done  # the finished block survived the kill; nothing else was written

    result = run_batch(dataset["bundle"], dataset["npy"], tmp_path / "out.parquet",
                       BatchOptions(cache_dir=cache, batch_size=BATCH, head_precision="fp32", progress=False),
                       say=lambda _: None)
    (resumed,) = result.passes
    assert (resumed.cached, resumed.computed) == (done, ROWS - done)
    _, got = _predictions(tmp_path / "out.parquet")
    want = _full_row_by_row(dataset["bundle"], _inputs(dataset["npy"]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # the fp32 head: the full model's numbers


def test_bad_input_is_one_line_naming_the_row(dataset, tmp_path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "a.npy", sample_input(seed=1)[0])
    np.save(bad / "b.npy", sample_input(seed=2)[0].astype(np.float64))
    code = main([str(dataset["bundle"]), "--input", str(bad), "--output", str(tmp_path / "o.parquet"),
                 "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "b.npy: dtype float64, expected float32 (model input 'input')" in err
    assert not (tmp_path / "o.parquet").exists()
