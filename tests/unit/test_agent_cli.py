"""split-agent's argument handling, input loading and summary, without a cloud (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent import cli
from edge_agent.results import CLOUD, EDGE, InferenceResult, StageTimes
from edge_agent.runtime import InputError
from models.manifest import TensorSpec

SPECS = (TensorSpec("input", (None, 3, 4, 4), "float32"),)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('bundle = "b"\ncloud = "h:1"\n[input]\ncount = 5\nrate = 3.0\n')
    args = cli.build_parser().parse_args(["run", "--config", str(path), "--cloud", "h:2", "--count", "9"])
    cfg = cli.load_config(args)
    assert cfg.cloud == "h:2" and cfg.input.count == 9 and cfg.input.rate == 3.0
    assert cfg.bundle == tmp_path / "b"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "--bundle", "b", "--cloud", "no-port"], "key 'cloud': expected \"host:port\""),
        (["run", "--bundle", "/nonexistent/bundle", "--cloud", "127.0.0.1:1"], "not a bundle directory"),
        (["run", "--config", "/nonexistent/agent.toml"], "config file not found"),
        (["run", "--cloud", "127.0.0.1:1"], "'bundle': is required"),
    ],
)
def test_errors_exit_2_with_one_clear_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("split-agent: error:") and message in err[0]


def test_load_inputs_from_a_folder_adds_the_batch_axis(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((3, 4, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((1, 3, 4, 4), np.float32))
    pool = cli.load_inputs(str(tmp_path), SPECS, seed=0)
    assert [p.shape for p in pool] == [(1, 3, 4, 4), (1, 3, 4, 4)]
    synthetic = cli.load_inputs("synthetic", SPECS, seed=1)
    assert len(synthetic) == cli.SYNTHETIC_VARIANTS and synthetic[0].dtype == np.float32
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .npy files"):
        cli.load_inputs(str(tmp_path / "empty"), SPECS, 0)
    with pytest.raises(InputError, match="not a folder"):
        cli.load_inputs(str(tmp_path / "missing"), SPECS, 0)


def test_summary_counts_and_percentiles():
    def result(i: int, by: str) -> InferenceResult:
        return InferenceResult(f"r{i}", {}, by, "c1", StageTimes(total_ms=float(i), head_ms=1.0))

    results = [result(i, CLOUD if i % 4 else EDGE) for i in range(1, 101)]
    stats = {"fallbacks": 25, "deadline_misses": 3, "late_replies_dropped": 1, "mode_switches": 2}
    s = cli.summarize(results, failures=0, stats=stats, wall_s=2.0)
    assert s["count"] == 100 and s["served_by"] == {CLOUD: 75, EDGE: 25} and s["throughput_rps"] == 50.0
    assert s["stages_ms"]["total_ms"]["p50"] == pytest.approx(50.5)
    assert s["stages_ms"]["total_ms"]["p99"] == pytest.approx(99.01)
    text = cli.format_summary(s)
    assert "cloud 75" in text and "fallbacks 25" in text and "total_ms" in text
