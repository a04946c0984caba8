"""When the dashboard requires a token: off loopback always (refusing to start without one), on loopback when set."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="needs the [cloud] extra")

from cloud_tier.dashboard import DashboardTokenError, is_loopback, load_token  # noqa: E402

TOKEN = "0123456789abcdef0123"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "192.168.1.2", "example.com", "dash.local"])
def test_anything_else_is_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def test_loopback_needs_no_token_unless_asked(tmp_path: Path) -> None:
    assert load_token("127.0.0.1", None) is None
    with pytest.raises(DashboardTokenError, match="--dashboard-token-file"):
        load_token("127.0.0.1", None, require_token=True)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "example.com"])
def test_off_loopback_a_token_file_is_required(host: str, tmp_path: Path) -> None:
    with pytest.raises(DashboardTokenError) as err:
        load_token(host, None)
    message = str(err.value)
    assert "\n" not in message and host in message and "--dashboard-token-file" in message
    token_file = tmp_path / "dashboard.token"
    token_file.write_text(TOKEN + "\n")
    assert load_token(host, token_file) == TOKEN


def test_a_bad_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DashboardTokenError, match="cannot be read"):
        load_token("0.0.0.0", tmp_path / "missing")
    for bad in ("", "short", "has a space in it somewhere"):
        (tmp_path / "t").write_text(bad)
        with pytest.raises(DashboardTokenError, match="at least 16"):
            load_token("0.0.0.0", tmp_path / "t")


def test_split_cloud_fleet_takes_the_ca_folders_token_by_default(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud_tier import fleet_cli

    monkeypatch.setenv("SPLITINFER_STATE_DIR", str(tmp_path))
    assert fleet_cli._token(None) is None  # no CA folder token: none sent (a loopback dashboard needs none)
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "dashboard.token").write_text(TOKEN + "\n")
    assert fleet_cli._token(None) == TOKEN
    with pytest.raises(FileNotFoundError):  # a token file named on the command line must exist
        fleet_cli._token(tmp_path / "missing")


def test_fleet_ls_table_and_health_summary() -> None:
    from cloud_tier import fleet_cli
    from cloud_tier.dashboard import overall

    text = fleet_cli.format_fleet({"now": 100.0, "warnings": ["store degraded: disk_full"], "devices": [
        {"device": "cam-1", "status": "stale", "mode": "split", "cut": "c021", "p50_ms": 12.345, "req_per_s": 3.0,
         "last_seen": 80.0}]})
    lines = text.splitlines()
    assert lines[1].split() == ["cam-1", "stale", "split", "c021", "12.35", "3.0", "20", "s", "ago"]
    assert lines[-1] == "warning: store degraded: disk_full"
    assert overall({"grpc": {"status": "ok"}, "store": {"status": "ok"}}) == "ok"
    assert overall({"grpc": {"status": "ok"}, "store": {"status": "degraded"}}) == "degraded"
    assert overall({"grpc": {"status": "down"}, "store": {"status": "ok"}}) == "down"


def test_fleet_ls_says_the_store_is_down_rather_than_that_there_are_no_devices() -> None:
    from cloud_tier.fleet_cli import format_fleet

    down = format_fleet({"devices": [], "warnings": ["fleet store degraded: file is not a database"]})
    assert "the fleet store is down" in down and "no devices yet" not in down
    assert "no devices yet" in format_fleet({"devices": [], "warnings": []})
