"""`profile(..., refine=K)`: with edge and cloud measured here, the best cuts are timed as real head and tail."""

from __future__ import annotations

import json

import pytest

from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle
from partitioning import api, profile
from partitioning.cli import main


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    """tiny_cnn on a 1-thread edge and a 2-thread cloud, both this host, refine=2, bundle written."""
    out = tmp_path_factory.mktemp("refined") / "tiny"
    with pytest.warns(UserWarning, match="synthetic"):
        result = profile("tiny_cnn", device="local", cloud="local", network="ethernet", threads=1, cloud_threads=2,
                         repeats=3, refine=2, out=out)
    return result, out


def test_the_best_cuts_are_timed_and_the_chosen_one_is_among_them(refined):
    result, _ = refined
    plan, doc = result.plan, result.document
    timed = plan.measured
    assert plan.best.measured
    assert {EDGE_ONLY, CLOUD_ONLY} <= set(timed)  # the baselines are always timed
    assert 2 <= len(timed) <= 6 + 2  # refine=2: at most 3 * 2 however the choice moves, plus the baselines
    assert doc["refined"]["candidates"] and set(doc["refined"]["candidates"]) == set(timed)
    assert doc["refined"]["chosen_timed"] is True and doc["refined"]["runs"] >= 3
    for cid in timed:
        cand = plan.candidate(cid)
        assert cand.predicted_edge_ms is not None and cand.predicted_cloud_ms is not None
        if cid == EDGE_ONLY:
            assert cand.edge_ms > 0 and cand.cloud_ms == 0
        elif cid == CLOUD_ONLY:
            assert cand.edge_ms == 0 and cand.cloud_ms > 0
        else:
            assert cand.edge_ms > 0 and cand.cloud_ms > 0
        assert cand.total_ms == pytest.approx(cand.edge_ms + cand.transfer_ms + cand.cloud_ms)
    for cand in doc["candidates"]:
        assert cand["measured"] is (cand["id"] in timed)
        assert ("predicted" in cand) is cand["measured"]


def test_a_refined_bundle_loads_and_records_the_timings(refined):
    result, out = refined
    bundle = Bundle.load(out)
    assert bundle.chosen == result.plan.chosen
    assert bundle.candidate(bundle.chosen)["measured"] is True
    assert json.loads((out / "plan.json").read_text())["refined"] == result.document["refined"]


@pytest.mark.parametrize("tie", [float("inf"), -1.0])
def test_the_two_best_timed_cuts_are_timed_again_head_to_head_when_close(monkeypatch, tie):
    # inf: any two timed cuts count as close; -1: none do
    monkeypatch.setattr(api, "REFINE_TIE", tie)
    result = profile("tiny_cnn", device="local", cloud="local", network="ethernet", threads=1, cloud_threads=2,
                     repeats=3, refine=2)
    record, plan = result.document["refined"], result.plan
    if tie < 0:
        assert record["tie_break"] is None
        return
    pair = record["tie_break"]["candidates"]
    assert len(set(pair)) == 2 and set(pair) <= set(record["candidates"])
    assert record["tie_break"]["runs"] == 6 and record["tie_break"]["rounds"] == 2
    assert all(plan.candidate(cid).measured for cid in pair)
    assert record["chosen_timed"] is plan.best.measured


def test_refine_zero_and_estimated_devices_time_nothing():
    off = profile("tiny_cnn", device="local", cloud="local", repeats=3, refine=0)
    assert not off.plan.measured and off.document["refined"] == {"candidates": [], "reason": "refine 0"}
    estimated = profile("tiny_cnn", device="rpi4", cloud="local", repeats=3, refine=3)
    assert not estimated.plan.measured and estimated.document["refined"]["candidates"] == []
    assert "not both measured" in estimated.document["refined"]["reason"]
    assert all(c["measured"] is False for c in estimated.document["candidates"])
    with pytest.raises(ValueError, match="refine"):
        profile("tiny_cnn", device="rpi4", repeats=3, refine=-1)


def test_cli_marks_the_timed_rows(capsys):
    assert main(["tiny_cnn", "--refine", "1", "--threads", "1", "--cloud-threads", "2", "-q", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "edge ms" in line)
    assert header.rstrip().endswith("timed")
    chosen_row = next(line for line in out.splitlines() if line.startswith("* "))
    assert chosen_row.split()[-2:] == ["yes", "yes"]  # feasible, timed
    assert "compute: timed as extracted fp32 head + tail for" in out
    assert main(["tiny_cnn", "--device", "rpi4", "--refine", "2", "-q", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "timed" not in next(line for line in out.splitlines() if "edge ms" in line)
    assert "per-node model for every cut (not timed:" in out
