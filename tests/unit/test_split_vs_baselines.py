"""The split-vs-baselines benchmark's arithmetic: energy per request, a cell's speed-ups, regret, prediction error
and noise floor, and which codec each cut is served with."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.split_vs_baselines import (
    Cell,
    _readline,
    energy_mj,
    plan_codec,
    readme_table,
    resumed,
    summarize,
    targets,
)


def _row(ms: float, served_by: str = "cloud", head: float = 0.0, tail: float = 0.0, sent: int = 0) -> dict:
    return {"ms": ms, "served_by": served_by, "cut": "", "sent": sent, "head": head, "encode": 0.0, "tail": tail,
            "fallback": None}


def _cell(model: str = "m") -> Cell:
    """A cell whose chosen cut c021 (50 ms, predicted 55) beats edge-only (100) and cloud-only (200 and 400), behind
    the runner-up c038 (40), with the chosen cut timed again at 55 (the noise floor)."""
    cell = Cell(model, "rpi4", "4g", Path("b"))
    cell.chosen = "chosen c021 (int8)"
    cell.predicted = {cell.chosen: 55.0}
    times = {"edge-only": 100.0, "cloud-only raw": 400.0, "cloud-only int8c+zstd": 200.0, cell.chosen: 50.0,
             "top2 c038 (int8)": 40.0, "chosen again (noise)": 55.0}
    cell.rows = {k: [_row(v), _row(v)] for k, v in times.items()}
    return cell


def test_energy_counts_compute_active_waiting_idle_and_radio_bytes():
    # 6.4 W for 40 ms of head, 2.7 W for the other 60 ms, 100 nJ per byte for 10 KB: 256 + 162 + 1 mJ.
    assert energy_mj(_row(100.0, head=40.0, sent=10_000), (6.4, 2.7), 100.0) == pytest.approx(256 + 162 + 1.0)
    # On the device the tail is compute too.
    assert energy_mj(_row(50.0, "edge", head=20.0, tail=30.0), (6.4, 2.7), 0.0) == pytest.approx(6.4 * 50)


def test_a_cells_figures():
    cell = _cell()
    s = summarize(cell, (6.4, 2.7), 0.0)
    assert s["speedup_best_baseline"] == pytest.approx(2.0) and s["speedup_worst_baseline"] == pytest.approx(8.0)
    assert s["best"] == "top2 c038 (int8)" and s["regret"] == pytest.approx(0.25)
    assert s["prediction_error"] == pytest.approx(0.1) and s["noise_floor"] == pytest.approx(0.1)
    # A chosen edge-only is the edge-only baseline again: that pair counts in the noise floor too.
    cell.chosen = "chosen edge-only"
    cell.rows[cell.chosen] = cell.rows.pop("chosen c021 (int8)")
    cell.rows[cell.chosen] = [_row(80.0)]
    cell.rows["chosen again (noise)"] = [_row(84.0)]
    assert summarize(cell, (6.4, 2.7), 0.0)["noise_floor"] == pytest.approx(0.25)


def test_the_plans_codec_unless_overridden():
    plan = {"codec": "int8", "candidates": [{"id": "c1", "codec": "int8c+zstd"}, {"id": "c2"}]}
    bundle = SimpleNamespace(plan=plan, candidate=lambda cid: next(c for c in plan["candidates"] if c["id"] == cid))
    assert plan_codec(bundle, "c1", None) == "int8c+zstd"
    assert plan_codec(bundle, "c2", None) == "int8"
    assert plan_codec(bundle, "c1", "fp16") == "fp16"


def test_the_readme_table_has_one_row_per_cell_and_says_which_targets_are_met():
    cell = _cell("mobilenet_v2")
    s = summarize(cell, (6.4, 2.7), 0.0)
    lines = readme_table([s, s]).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| model | device | network | edge-only |")
    assert "| 50.0 c021 (int8) | 40.0 c038 (int8) | 2.00x / 8.0x | +25% | 55.0 (+10%) | +10% |" in lines[2]
    # at least as fast as the best baseline: met; regret 25% against a 10% floor: missed; prediction +10%: met
    assert targets(s) == "faster met, regret MISSED, prediction met"


def test_a_worker_line_is_read_with_a_deadline():
    r, w = os.pipe()
    with os.fdopen(r) as reader, os.fdopen(w, "w") as writer:
        assert _readline(reader, 0.05) == ""  # nothing came: the caller kills the worker instead of hanging
    r, w = os.pipe()
    with os.fdopen(r) as reader, os.fdopen(w, "w") as writer:
        writer.write("READY\n")
        writer.flush()
        assert _readline(reader, 5.0) == "READY\n"


def test_resume_keeps_the_cells_of_a_run_cut_short(tmp_path):
    out = tmp_path / "out.json"
    assert resumed(out) == [] and resumed(None) == []
    out.write_text('{"cells": [{"model": "m", "device": "rpi4", "network": "3g"}], "timelines": []}')
    assert resumed(out) == [{"model": "m", "device": "rpi4", "network": "3g"}]
