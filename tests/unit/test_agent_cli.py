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


def test_serve_without_a_config_names_the_path_and_enroll(tmp_path, capsys):
    missing = tmp_path / "agent.toml"
    assert cli.main(["serve", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "split-cloud enroll" in err
    assert cli.build_parser().parse_args(["serve"]).config == cli.DEFAULT_CONFIG


def test_serve_with_a_bad_service_key_exits_2_naming_it(tmp_path, capsys):
    path = tmp_path / "agent.toml"
    path.write_text('bundle = "b"\n[service]\nlisten = "0.0.0.0:9"\n')
    assert cli.main(["serve", "--config", str(path)]) == 2
    assert "'service.listen'" in capsys.readouterr().err


def test_run_help_says_it_is_the_load_driver_and_serve_is_the_service(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    assert "load driver" in out and "split-agent serve" in out and "SIGTERM" in out


def test_infer_flags_and_install_print(tmp_path, capsys):
    args = cli.build_parser().parse_args(["infer", "x.npy", "--json", "--socket", "/tmp/a.sock"])
    assert args.json and args.socket == "/tmp/a.sock" and args.address is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["infer", "x.npy", "--socket", "/a", "--address", "127.0.0.1:1"])
    path = tmp_path / "agent.toml"
    path.write_text('bundle = "b"\ninsecure = true\n')
    assert cli.main(["install", "--config", str(path), "--print", "--user", "edge"]) == 0
    unit = capsys.readouterr().out
    assert "Type=notify" in unit and "User=edge" in unit and "serve --config /etc/splitinfer/agent.toml" in unit
