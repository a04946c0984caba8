"""The models matrix's own checks: split-profile's stderr lines past its progress and its own lines (what -q
would still let through), and the formats of one model disagreeing on its work or graph size."""

from __future__ import annotations

from benchmarks import models_matrix as mm


def test_stray_stderr_lines_are_what_is_not_progress_or_split_profile_own():
    stderr = ("[   0.2s] loading model.pt\n"
              "\x1b[0;93m2026-11-30 03:44:55.5 [W:onnxruntime:, graph.cc:5809 CleanUnusedInitializersAndNodeArgs] "
              "Removing initializer 'c'.\x1b[m\n"
              "split-profile: warning: no --calibration data\n"
              "[  12.0s] searching cuts over 65 nodes\n\n")
    stray = mm.stray_lines(stderr)
    assert len(stray) == 1 and "W:onnxruntime" in stray[0]
    row = mm.Row("m", "project", "pt", stray=stray)
    assert "(1 stray stderr line(s))" in mm.table_row(row)


def test_formats_that_disagree_on_work_or_graph_size_are_named_against_onnx():
    rows = [mm.Row("a", "x", "pt", nodes=241, gflops=8.84), mm.Row("a", "x", "pt2", nodes=232, gflops=0.40),
            mm.Row("a", "x", "onnx", nodes=232, gflops=8.83), mm.Row("b", "x", "pt", nodes=100, gflops=1.0),
            mm.Row("b", "x", "pt2", nodes=150, gflops=1.0), mm.Row("c", "x", "pt", status="exit 2: boom")]
    said = mm.format_discrepancies(rows)
    assert said == ["a pt2: 0.40 GFLOPs against 8.83 (onnx)", "b pt2: 150 nodes to search against 100 (pt)"]
    header_cells = mm.HEADER.splitlines()[0].count("|")
    assert all(mm.table_row(r).count("|") == header_cells for r in rows)
