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
