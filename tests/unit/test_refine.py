"""`profile(..., refine=K)`: with edge and cloud measured here, the best cuts are timed as real head and tail."""

from __future__ import annotations

import json
import time

import pytest

from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle
from partitioning import profile
from partitioning.cli import _refine_note, main
from partitioning.costs import MIN_SECONDS
from partitioning.refine import Refiner, time_cuts, timed_runs


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
        assert cand.total_ms == pytest.approx(cand.edge_ms + cand.encode_ms + cand.transfer_ms + cand.decode_ms
                                              + cand.cloud_ms)  # the codec's time is part of the total
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
def test_the_two_best_timed_cuts_are_timed_again_head_to_head_when_close(tie):
    # inf: any two timed cuts count as close; -1: none do
    result = profile("tiny_cnn", device="local", cloud="local", network="ethernet", threads=1, cloud_threads=2,
                     repeats=3, refine=2, refiner=Refiner(tie=tie))
    record, plan = result.document["refined"], result.plan
    if tie < 0:  # none is close; a pair is timed again only when the timing overturned the per-node model's order
        if record["tie_break"] is not None:
            first, second = record["tie_break"]["candidates"]
            before, predicted = record["tie_break"]["before"], record["tie_break"]["predicted"]
            assert record["tie_break"]["reason"] == "timing overturned the prediction"
            assert before[first] <= before[second] and predicted[first] > predicted[second]
        return
    assert record["tie_break"]["reason"] == "within inf%"
    pair = record["tie_break"]["candidates"]
    assert len(set(pair)) == 2 and set(pair) <= set(record["candidates"])
    assert record["tie_break"]["runs"] == 6 and record["tie_break"]["rounds"] == 2
    assert record["tie_break"]["min_seconds"] == 2 * record["min_seconds"] == 2 * MIN_SECONDS
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


def test_timing_goes_on_in_rounds_until_they_span_min_seconds(tmp_path):
    import onnx

    from models.loaders import load_model

    loaded = load_model("tiny_cnn", tmp_path)
    proto = onnx.load(str(loaded.onnx_path))
    plan = profile("tiny_cnn", device="rpi4", repeats=3, refine=0).plan
    baselines = [plan.candidate(EDGE_ONLY), plan.candidate(CLOUD_ONLY)]
    calls = []

    def counted(part, runs):
        calls.append(runs)
        return timed_runs(part, runs)

    def count(seconds: float) -> int:
        calls.clear()
        time_cuts(proto, loaded.onnx_path, loaded.inputs, baselines, repeats=3, rounds=1, min_seconds=seconds,
                  run=counted)
        return len(calls)

    assert count(0) == 2 + 2  # warm-up and one round, for each baseline's one session
    start = time.perf_counter()
    assert count(0.3) > 4 + 2 and time.perf_counter() - start >= 0.3
    with pytest.raises(ValueError, match="min_seconds >= 0"):
        count(-1)


def test_a_timing_that_overturns_the_per_node_model_is_checked_head_to_head():
    # The refinement's timing (a stand-in here, so that the case is certain) puts the model's best cut between
    # its second and third; the head-to-head times both as the model predicts them and restores the order.
    calls = []

    def stand_in(model, path, inputs, cands, **kw):
        calls.append([c.id for c in cands])
        factor = dict.fromkeys((c.id for c in cands), 1.0)
        if len(calls) == 1:
            best, second, third = sorted(cands, key=lambda c: c.total_ms)[:3]
            target = (second.total_ms + third.total_ms) / 2
            factor[best.id] = (target - best.transfer_ms) / (best.edge_ms + best.cloud_ms)
        modelled = {c.id: (c.predicted_edge_ms, c.predicted_cloud_ms) if c.measured else (c.edge_ms, c.cloud_ms)
                    for c in cands}
        return {cid: (edge * factor[cid], cloud * factor[cid]) for cid, (edge, cloud) in modelled.items()}

    refiner = Refiner(stand_in, tie=-1.0)  # only an overturn can call for a head-to-head
    result = profile("tiny_cnn", device="local", cloud="local", network="ethernet", threads=1, cloud_threads=2,
                     repeats=3, refine=3, measure_seconds=0, refiner=refiner)
    tie = result.document["refined"]["tie_break"]
    assert len(calls) == 2 and tie is not None and tie["reason"] == "timing overturned the prediction"
    first, second = tie["candidates"]
    assert tie["before"][first] < tie["before"][second] and tie["predicted"][first] > tie["predicted"][second]
    assert set(calls[1]) == {first, second}
    assert result.plan.chosen == second == min(tie["predicted"], key=tie["predicted"].get)


def test_a_head_to_head_that_hands_the_choice_to_an_untimed_cut_has_that_cut_timed():
    # Stand-in timings make the case certain: the first pass times the model's two best cuts as predicted (the
    # rest of what it times, 1000x slower); the head-to-head then finds that pair 1000x slower too, so an untimed
    # cut's prediction comes out best. That cut is timed, and the best pair settled by a second head-to-head.
    calls = []

    def stand_in(model, path, inputs, cands, **kw):
        calls.append([c.id for c in cands])
        modelled = {c.id: (c.predicted_edge_ms, c.predicted_cloud_ms) if c.measured else (c.edge_ms, c.cloud_ms)
                    for c in cands}
        slow = set()
        if len(calls) == 1:
            slow = {c.id for c in sorted(cands, key=lambda c: c.total_ms)[2:]}
        elif len(calls) == 2:
            slow = set(calls[1])
        return {cid: (edge * (1000 if cid in slow else 1), cloud * (1000 if cid in slow else 1))
                for cid, (edge, cloud) in modelled.items()}

    refiner = Refiner(stand_in, tie=float("inf"))  # every pair counts as close
    result = profile("tiny_cnn", device="local", cloud="local", network="ethernet", threads=1, cloud_threads=2,
                     repeats=3, refine=2, measure_seconds=0, refiner=refiner)
    record, plan = result.document["refined"], result.plan
    assert len(calls) == 4, calls
    first_pass, handed_over = set(calls[0]), calls[2]
    assert len(handed_over) == 1 and handed_over[0] not in first_pass  # the untimed cut, timed on its own
    assert [e["candidates"] for e in record["earlier_tie_breaks"]] == [calls[1]]
    assert handed_over[0] in record["tie_break"]["candidates"] == calls[3]
    assert record["chosen_timed"] is True and plan.best.measured
    assert record["candidates"] == [*calls[0], *handed_over]
    note = _refine_note(result.document)
    assert f"before that, {' and '.join(calls[1])} were timed head to head and handed the choice" in note
    assert "was not timed" not in note
