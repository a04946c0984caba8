"""`split-cloud fleet`: list the fleet and send control commands to devices, through the node's dashboard API.

    split-cloud fleet ls [--json]
    split-cloud fleet send DEVICE switch-cut c021 | switch-mode local|split | ping [--timeout 10]

Both talk to a running node's dashboard (`--url`, default http://127.0.0.1:8080): `GET /api/fleet` and
`POST /api/devices/{id}/commands`, with the dashboard's token (`--token-file`, default the CA folder's
dashboard.token when it exists). `send` waits for the device's ack: exit 0 when the device applied the command,
1 when it refused it or did not answer within --timeout, 2 when the node could not be asked (unreachable,
unknown device, bad command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cloud_tier.config import default_pki_dir

__all__ = ["DEFAULT_URL", "FleetApi", "FleetApiError", "add_parser", "format_fleet", "run"]

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT_S = 10.0
HTTP_SLACK_S = 5.0  # the HTTP call outlives the ack wait it asks the node for by this much
MODES = ("split", "local")


class FleetApiError(RuntimeError):
    """The dashboard API could not answer (unreachable, refused, or an error status); `status` is the HTTP code."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FleetApi:
    """A client of a node's dashboard API: `url` its base, `token` the dashboard token (None: none sent)."""

    url: str = DEFAULT_URL
    token: str | None = None

    def _call(self, method: str, path: str, body: dict[str, Any] | None, timeout_s: float) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            try:
                payload = json.loads(err.read() or b"null")
            except ValueError:
                payload = None
            return err.code, payload
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FleetApiError(f"cannot reach the node's dashboard at {self.url} ({reason}); is `split-cloud serve` "
                                "running, and is --url right?") from exc

    def fleet(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """GET /api/fleet."""
        status, payload = self._call("GET", "/api/fleet", None, timeout_s)
        if status != 200:
            raise FleetApiError(_error(status, payload), status)
        return payload

    def send(self, device_id: str, command: dict[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S
             ) -> tuple[int, dict[str, Any]]:
        """POST a command ({"kind": ..., "cut"/"mode": ...}) and return (HTTP status, answer): 200 with the ack
        ({"ok", "message", "command_id"}), 504 when the device did not answer within `timeout_s`."""
        status, payload = self._call("POST", f"/api/devices/{device_id}/commands",
                                     {**command, "timeout_s": timeout_s}, timeout_s + HTTP_SLACK_S)
        if status not in (200, 504):
            raise FleetApiError(_error(status, payload), status)
        return status, payload if isinstance(payload, dict) else {}


def _error(status: int, payload: Any) -> str:
    detail = payload.get("error") if isinstance(payload, dict) else None
    if status == 401:
        return f"the dashboard refused the token (HTTP 401): give --token-file ({detail or 'token required'})"
    return f"HTTP {status}: {detail or 'no details'}"


def _age(now: float, then: float | None) -> str:
    return "—" if then is None else f"{max(0.0, now - then):.0f} s ago"


def format_fleet(data: dict[str, Any]) -> str:
    """The fleet as a text table: device, status, mode, cut, p50, req/s, last seen."""
    now = data.get("now") or time.time()
    header = ("DEVICE", "STATUS", "MODE", "CUT", "P50 MS", "REQ/S", "LAST SEEN")
    rows = [header]
    for d in data.get("devices", []):
        p50 = d.get("p50_ms")
        rows.append((d["device"], d.get("status") or "—", d.get("mode") or "—", d.get("cut") or "—",
                     "—" if p50 is None else f"{p50:.2f}", f"{d.get('req_per_s') or 0.0:.1f}",
                     _age(now, d.get("last_seen"))))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"warning: {w}" for w in data.get("warnings", [])]
    if len(rows) == 1 and any("store degraded" in w for w in data.get("warnings", [])):
        lines.append("(no devices shown: the fleet store is down, so nothing is recorded; see the warning above)")
    elif len(rows) == 1:
        lines.append("(no devices yet: agents appear when they publish state or telemetry)")
    return "\n".join(lines)


def _token(path: Path | None) -> str | None:
    """The token in `path`; with no path, the CA folder's dashboard.token if there is one (else no token)."""
    explicit = path is not None
    path = path if path is not None else default_pki_dir() / "dashboard.token"
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        if explicit:
            raise
        return None


def add_parser(sub: Any) -> None:
    """Add `fleet ls` and `fleet send` to split-cloud's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help=f"the node's dashboard (default {DEFAULT_URL})")
    common.add_argument("--token-file", type=Path, default=argparse.SUPPRESS,
                        help="the dashboard token (default: the CA folder's dashboard.token, when it exists)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help=f"seconds to wait for the node, and for the device's ack (default {DEFAULT_TIMEOUT_S})")
    fleet = sub.add_parser("fleet", help="list the fleet, send commands to devices (through the dashboard API)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    ls = fleet_sub.add_parser("ls", parents=[common], help="devices: status, mode, cut, p50, last seen")
    ls.add_argument("--json", action="store_true", help="print /api/fleet's JSON")
    send = fleet_sub.add_parser("send", parents=[common], help="send a command and wait for the device's ack")
    send.add_argument("device_id", metavar="DEVICE")
    kinds = send.add_subparsers(dest="kind", required=True)
    cut = kinds.add_parser("switch-cut", parents=[common], help="run with another cut (a plan's cut id, or auto)")
    cut.add_argument("cut", metavar="CUT")
    mode = kinds.add_parser("switch-mode", parents=[common], help="split (head here, tail in the cloud) or local")
    mode.add_argument("mode", choices=MODES)
    kinds.add_parser("ping", parents=[common], help="ask for an ack (is the device there?)")


def _command(args: argparse.Namespace) -> dict[str, Any]:
    if args.kind == "switch-cut":
        return {"kind": "switch_cut", "cut": args.cut}
    if args.kind == "switch-mode":
        return {"kind": "switch_mode", "mode": args.mode}
    return {"kind": "ping"}


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """`split-cloud fleet ...`: 0 done, 1 the device refused or did not answer, 2 the node could not be asked."""
    timeout_s = getattr(args, "timeout", DEFAULT_TIMEOUT_S)
    if not 0 < timeout_s <= 60:
        print("split-cloud fleet: --timeout expects seconds in (0, 60]", file=err)
        return 2
    try:
        api = FleetApi(getattr(args, "url", DEFAULT_URL), _token(getattr(args, "token_file", None)))
        if args.fleet_command == "ls":
            data = api.fleet(timeout_s)
            print(json.dumps(data, indent=2) if args.json else format_fleet(data), file=out)
            return 0
        status, answer = api.send(args.device_id, _command(args), timeout_s)
    except (FleetApiError, OSError) as exc:
        print(f"split-cloud fleet: {exc}", file=err)
        return 2
    what = f"{args.kind} to {args.device_id}"
    if status == 504:
        print(f"split-cloud fleet: {what}: no ack within {timeout_s} s (command {answer.get('command_id')}; the "
              "broker keeps it for the device until it is back)", file=err)
        return 1
    if not answer.get("ok"):
        print(f"split-cloud fleet: {what} refused by the device: {answer.get('message') or 'no reason given'}",
              file=err)
        return 1
    print(f"{what}: ok ({answer.get('message') or 'acknowledged'}; command {answer.get('command_id')})", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cloud_tier.fleet_cli ...` (the same as `split-cloud fleet ...`)."""
    parser = argparse.ArgumentParser(prog="split-cloud")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["fleet", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
