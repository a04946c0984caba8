"""The dashboard in real headless Chromium, driven over the DevTools protocol, with live MQTT telemetry."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from cloud_tier.controller import FleetController
from cloud_tier.dashboard import Dashboard
from cloud_tier.fleet_store import FleetStore
from cloud_tier.lab.mosquitto import Mosquitto
from cloud_tier.server import RequestCounters
from edge_agent.mqtt_control import AgentControl
from protos.mqtt import Ack, TelemetryRecord
from protos.serde import CloudReply, CloudRequest
from tests.integration.cdp import Chromium, Page, chromium_path

HOSTILE = "<img src=x onerror=alert(1)>"
# The page's picture goes to the test's temp dir; SPLITINFER_SCREENSHOT=docs/dashboard.png refreshes the docs' copy.
SCREENSHOT_ENV = "SPLITINFER_SCREENSHOT"
PROFILES = {"cam-1": (2.0, 1.0, 6.0, 0.5, 3.0), "cam-2": (4.0, 0.6, 14.0, 1.5, 3.5)}
# (cut, share answered on the device): cam-2 runs split mode on the edge-only cut (its uplink is too slow)
CUTS = {"cam-1": ("c3", 0.2), "cam-2": ("edge-only", 1.0)}


class Feeder:
    """Simulated devices: each records a request every few ms until stopped."""

    def __init__(self, agents: list[AgentControl]) -> None:
        self.agents = agents
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def _run(self) -> None:
        rng = random.Random(11)
        i = 0
        while not self._stop.wait(0.01):
            for agent in self.agents:
                base = PROFILES[agent.device_id]
                wobble = 1.0 + 0.5 * abs(((time.time() / 4) % 2) - 1)  # a slow sawtooth: the chart moves
                st = [max(0.01, rng.gauss(b * wobble, b * 0.1)) for b in base]
                cut, edge_share = CUTS[agent.device_id]
                edge = rng.random() < edge_share
                agent.record(TelemetryRecord(f"{agent.device_id}-{i}", time.time(), *st, sum(st),
                                             "edge" if edge else "cloud", cut))
            i += 1

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture()
def live_fleet(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[tuple[Dashboard, list[AgentControl]]]:  # noqa: F811
    store = FleetStore(tmp_path / "fleet.sqlite")
    ctl = FleetController(store, mosquitto.host, mosquitto.port).start()
    # The gRPC tier's per-device counters (cloud_tier.server), fed the requests it answered for cam-1 only.
    counters = RequestCounters({("resnet18", "c3")})
    for i, (code, compute_ms) in enumerate([(0, 2.0), (0, 3.0), (0, 4.0), (14, 1.0)]):
        request = CloudRequest(request_id=f"r{i}", device_id="cam-1", model="resnet18", cut="c3")
        reply = CloudReply(request_id=f"r{i}", code=code, message="", decode_ms=0.25, queue_ms=0.5,
                           compute_ms=compute_ms)
        counters.record(request, reply)
    dash = Dashboard(store, cloud_view=counters.devices)
    dash.start()
    ack = lambda c: Ack(c.command_id, True)  # noqa: E731
    agents = [AgentControl("cam-1", mosquitto.host, mosquitto.port, on_command=ack, label=HOSTILE,
                           flush_interval_ms=100).start(),
              AgentControl("cam-2", mosquitto.host, mosquitto.port, on_command=ack, label="line 2, wifi",
                           flush_interval_ms=100).start()]
    agents[0].publish_state(mode="split", cut="c3", bandwidth_mbps=18.9, model="resnet18")
    agents[1].publish_state(mode="split", cut="edge-only", bandwidth_mbps=5.85, model="resnet18")
    gone = AgentControl("cam-3", mosquitto.host, mosquitto.port, on_command=ack, label="spare").start()
    gone.publish_state(mode="local", cut="edge-only", model="resnet18")
    gone.close()
    yield dash, agents
    for agent in agents:
        agent.close()
    dash.stop()
    ctl.stop()
    store.close()


def test_security_headers(live_fleet: tuple[Dashboard, list[AgentControl]]) -> None:
    dash, _ = live_fleet
    for path in ("/", "/static/app.js", "/api/fleet"):
        with urllib.request.urlopen(dash.url + path, timeout=10) as resp:
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp, (path, csp)
    html = urllib.request.urlopen(dash.url + "/", timeout=10).read().decode()
    assert "<script>" not in html and "http" not in html  # no inline script, nothing from a CDN
    for bad in ("/api/devices/a%2Fb/series", "/api/devices/nobody/series"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(dash.url + bad, timeout=10)
        assert err.value.code in (400, 404)


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed")
def test_dashboard_in_headless_chromium(live_fleet: tuple[Dashboard, list[AgentControl]], tmp_path: Path) -> None:
    dash, agents = live_fleet
    browser = Chromium(tmp_path / "profile")
    try:
        with Feeder(agents):
            asyncio.run(drive(browser, dash.url, Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")))
    finally:
        browser.close()


@contextlib.asynccontextmanager
async def open_page(browser: Chromium) -> AsyncIterator[Page]:
    """A DevTools page of `browser` with the Page and Runtime domains on; closed on leaving."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(browser.page_ws_url(), max_msg_size=64 * 1024 * 1024,
                                      timeout=aiohttp.ClientWSTimeout(ws_close=5))
        page = Page(ws)
        try:
            await page.send("Page.enable")
            await page.send("Runtime.enable")
            yield page
        finally:
            await page.close()


async def drive(browser: Chromium, url: str, screenshot: Path) -> None:
    async with open_page(browser) as page:
        await page.send("Emulation.setDeviceMetricsOverride", width=1400, height=820, deviceScaleFactor=1,
                        mobile=False)
        await page.send("Page.navigate", url=url)

        # One row per device, the offline one included.
        await page.wait_for("document.querySelectorAll('#fleet-rows tr').length === 3", "three device rows")
        devices = await page.eval("[...document.querySelectorAll('#fleet-rows tr')].map(r => r.dataset.device)")
        assert devices == ["cam-1", "cam-2", "cam-3"]
        # a secure node warns of nothing
        assert await page.eval("document.getElementById('warnings').hidden") is True
        await page.wait_for(
            "document.querySelector('tr[data-device=\"cam-3\"] .col-status').textContent === 'offline'",
            "cam-3 offline")

        # The hostile label is shown as literal text: no element was created, no script ran.
        label = await page.wait_for(
            "document.querySelector('tr[data-device=\"cam-1\"] .col-label').textContent", "cam-1 label")
        assert label == HOSTILE
        assert await page.eval("document.querySelectorAll('img').length") == 0
        assert await page.eval(
            "document.querySelector('tr[data-device=\"cam-1\"] .col-label').childElementCount") == 0

        # The columns are explained on the page, and split mode on the edge-only cut says why.
        legend = await page.eval("document.getElementById('columns-legend').innerText")
        for term in ("mode", "cut", "uplink", "edge share", "split + edge-only", "switches when the link allows"):
            assert term in legend, (term, legend)
        assert await page.eval("document.getElementById('columns-legend').getBoundingClientRect().height") > 0
        await page.wait_for("document.querySelector('tr[data-device=\"cam-2\"] .col-cut').textContent === "
                            "'edge-only'", "cam-2 on the edge-only cut")
        notes = await page.eval("['cam-1', 'cam-2', 'cam-3'].map(d => { const td = document.querySelector("
                                "'tr[data-device=\"' + d + '\"] .col-cut'); "
                                "return [td.classList.contains('split-edge'), td.title]; })")
        assert notes[0] == [False, ""] and notes[2] == [False, ""]  # a split cut; local mode on the device
        assert notes[1][0] is True and "device alone fastest" in notes[1][1]
        assert await page.eval("getComputedStyle(document.querySelector('tr[data-device=\"cam-2\"] .col-cut'), "
                               "'::after').content") == '" †"'

        # The cloud tier's own view: cam-1's 4 answered requests (1 failed), mean 0.75 + 2.5 ms; none for cam-2.
        cloud = await page.eval("['cloud_requests', 'cloud_mean_ms'].map(k => "
                                "document.querySelector('tr[data-device=\"cam-1\"] .col-' + k).textContent)")
        assert cloud == ["4 (1 failed)", "3.25"]
        assert await page.eval("document.querySelector('tr[data-device=\"cam-2\"] .col-cloud_mean_ms')"
                               ".textContent") == "—"

        # The chart follows the flowing telemetry.
        await page.wait_for("document.getElementById('chart').dataset.device === 'cam-1' && "
                            "Number(document.getElementById('chart').dataset.points) >= 2", "cam-1 chart")
        first = await page.eval("document.getElementById('chart').dataset.lastT")
        await page.wait_for(f"document.getElementById('chart').dataset.lastT !== '{first}'",
                            "the chart to move on with new data")
        rate = await page.eval("document.querySelector('tr[data-device=\"cam-1\"] .col-req_per_s').textContent")
        assert float(rate) > 0

        # Selecting a row switches the chart.
        await page.eval("document.querySelector('tr[data-device=\"cam-2\"]').click()")
        await page.wait_for("document.getElementById('chart').dataset.device === 'cam-2'", "chart of cam-2")
        await page.eval("document.querySelector('tr[data-device=\"cam-1\"]').click()")
        await page.wait_for("document.getElementById('chart').dataset.device === 'cam-1' && "
                            "Number(document.getElementById('chart').dataset.points) >= 6",
                            "a few seconds of chart", timeout_s=30)

        # The tails run in-process here: no Deployments view, and nothing about Ray on the page.
        assert await page.eval("document.getElementById('deployments').hidden") is True
        assert await page.eval("document.querySelectorAll('#deployment-rows tr').length") == 0
        assert "deployments" not in await page.eval("document.getElementById('status').textContent")

        shot = await page.send("Page.captureScreenshot", format="png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))

        dialogs = [e for e in page.events if e["method"] == "Page.javascriptDialogOpening"]
        assert dialogs == []
        errors = [e for e in page.events if e["method"] == "Runtime.exceptionThrown"]
        assert errors == []


TOKEN = "t0ken-for-the-dashboard-test"


@pytest.fixture()
def secured(tmp_path: Path) -> Iterator[Dashboard]:
    """A dashboard on 127.0.0.1 that requires a token (as one bound off loopback must)."""
    token_file = tmp_path / "dashboard.token"
    token_file.write_text(TOKEN + "\n")
    store = FleetStore(tmp_path / "fleet.sqlite")
    dash = Dashboard(store, token_file=token_file, require_token=True)
    dash.start()
    yield dash
    dash.stop()
    store.close()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def test_a_dashboard_without_a_token_answers_only_to_loopback_names(
        live_fleet: tuple[Dashboard, list[AgentControl]]) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends its own Host; it must get nothing."""
    url = live_fleet[0].url
    for path in ("/", "/api/fleet", "/metrics"):
        status, body, _ = _get(url + path, {"Host": "evil.example"})
        assert status == 403 and "loopback" in body, (path, status)
        assert _get(url + path, {"Host": f"localhost:{live_fleet[0].port}"})[0] == 200
    assert _get(url + "/api/fleet")[0] == 200  # 127.0.0.1:port, as the page itself asks
    assert _get(url + "/healthz", {"Host": "evil.example"})[0] == 200  # ok / not ok only


def test_a_dashboard_requiring_a_token_refuses_requests_without_it(secured: Dashboard) -> None:
    url = secured.url
    for path in ("/", "/api/fleet", "/metrics", "/static/app.js", "/api/devices/cam-1/series"):
        status, body, headers = _get(url + path)
        assert status == 401 and "token" in body, (path, status)
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert _get(url + path, {"Authorization": "Bearer wrong-token-of-some-length"})[0] == 401
        assert _get(url + path, {"Cookie": "splitinfer_dashboard=wrong"})[0] == 401
        assert _get(url + path + "?token=wrong")[0] == 401
    assert _get(url + "/healthz") == (200, '{"ok": true}', _get(url + "/healthz")[2])
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert _get(url + "/api/fleet", bearer)[0] == 200
    status, body, _ = _get(url + "/metrics", bearer)  # what a Prometheus scrape with the token does
    assert status == 200 and "# TYPE" in body
    assert _get(url + f"/metrics?token={TOKEN}")[0] == 200
    assert _get(url + "/api/fleet", {"Cookie": f"splitinfer_dashboard={TOKEN}"})[0] == 200
    # the page opened with its token: a cookie for its fetches, and the token dropped from the address
    status, _, headers = _get(url + f"/?token={TOKEN}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"splitinfer_dashboard={TOKEN};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie


WARNING = "WARNING: a test node that runs --insecure"


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed")
def test_the_page_opened_with_its_token_keeps_working_in_chromium(
    live_fleet: tuple[Dashboard, list[AgentControl]], tmp_path: Path
) -> None:
    open_dash, _ = live_fleet
    token_file = tmp_path / "dashboard.token"
    token_file.write_text(TOKEN)
    dash = Dashboard(open_dash.store, token_file=token_file, require_token=True, warnings=[WARNING])
    dash.start()
    browser = Chromium(tmp_path / "profile")
    try:
        asyncio.run(_drive_with_token(browser, dash.url))
    finally:
        browser.close()
        dash.stop()


async def _drive_with_token(browser: Chromium, url: str) -> None:
    async with open_page(browser) as page:
        await page.send("Page.navigate", url=f"{url}/?token={TOKEN}")
        # the page's own fetches (/api/fleet, series) carry the cookie: the rows appear
        await page.wait_for("document.querySelectorAll('#fleet-rows tr').length === 3", "three device rows")
        assert await page.eval("location.search") == ""  # the token left the address bar
        # the node's security warnings (e.g. --insecure) stand above the table
        await page.wait_for("!document.getElementById('warnings').hidden", "the warning banner")
        assert await page.eval("document.getElementById('warnings').textContent") == WARNING
        assert await page.eval("document.cookie") == ""  # HttpOnly: no script can read it
        errors = [e for e in page.events if e["method"] == "Runtime.exceptionThrown"]
        assert errors == []


def test_split_cloud_refuses_a_dashboard_off_loopback_without_a_token(tmp_path: Path) -> None:
    import subprocess
    import sys

    from models.tiny_bundle import make_tiny_bundle

    make_tiny_bundle(tmp_path / "bundles" / "tiny")
    proc = subprocess.run([sys.executable, "-m", "cloud_tier.cli", "serve", "--bundles", str(tmp_path / "bundles"),
                           "--dashboard-host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--dashboard-token-file" in lines[0] and "0.0.0.0" in lines[0]
    assert "listening" not in proc.stdout


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed")
def test_the_deployments_view_shows_each_ray_serve_deployment(tmp_path: Path) -> None:
    from cloud_tier.ray_backend import DeploymentStats, deployment_rows, serve_deployments

    # What RayBackend.rows() builds: the front's counts of a deployment, and Serve's details as its controller
    # answers them (one replica running, one starting: the autoscaler's target is 2).
    stats = DeploymentStats("splitinfer-tail-resnet18-c3", model=HOSTILE, model_sha256="0123456789abcdef" * 4, cut="c3")
    for rows in (4, 16, 7):
        stats.batch(rows)
    stats.outstanding = 5
    details = {"applications": {stats.name: {"deployments": {stats.name: {
        "status": "UPSCALING", "target_num_replicas": 2, "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}]}}}}}

    def rows() -> list[dict]:
        return deployment_rows({stats.name: {**stats.snapshot(), **serve_deployments(details)[stats.name],
                                             "status_age_s": 1.0, "status_error": ""}})

    dash = Dashboard(None, deployments=rows)
    dash.start()
    browser = Chromium(tmp_path / "profile")
    try:
        asyncio.run(_drive_deployments(browser, dash.url, stats.name))
    finally:
        browser.close()
        dash.stop()


async def _drive_deployments(browser: Chromium, url: str, name: str) -> None:
    async with open_page(browser) as page:
        await page.send("Page.navigate", url=url)
        await page.wait_for("document.querySelectorAll('#deployment-rows tr').length === 1 && "
                            "!document.getElementById('deployments').hidden", "the Deployments view")
        cells = await page.eval(f"[...document.querySelector('tr[data-deployment=\"{name}\"]').children]"
                                ".map(td => td.textContent)")
        assert cells == [HOSTILE, "0123456789ab", "c3", "UPSCALING", "1 / 2 (1 starting)", "5", "3", "9.0", "16"]
        assert await page.eval("document.querySelectorAll('img').length") == 0  # the label stayed text
        note = await page.eval("document.getElementById('deployments-note').textContent")
        assert "as Ray Serve reported them 1 s ago" in note
        errors = [e for e in page.events if e["method"] == "Runtime.exceptionThrown"]
        assert errors == []
