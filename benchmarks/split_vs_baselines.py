"""Split vs the baselines on emulated devices, measured end to end: does the split pay, and does the planner pick it?

For each model x emulated device (`split-emulate` presets: a cgroup CPU share calibrated to the device table, one
core, the device's memory) x network (3g, 4g, wifi), the on-device workflow, end to end:

1. `split-profile MODEL.onnx --device local --save-device-profile dev.json --threads 1` runs INSIDE the emulated
   device (per-node times at the device's speed; the cloud side of that run is the table's t4 and is not used);
2. the plan is made here from that profile (`--device dev.json`), with the cloud measured here at full speed
   (`--cloud local`, one thread, as `split-cloud` serves) and the network's link; the bundle also exports the
   plan's top 3 candidates so that each can be served;
3. one worker process INSIDE the emulated device runs a real `EdgeAgent` per mode, through a `LinkProxy` shaped to
   the network (uplink / downlink rate, one-way delay = RTT / 2) to a real `split-cloud serve` (max_batch 1, its own
   process, full speed, mTLS), and sends sequential requests, the modes interleaved (each round in a rotated order).

Modes: edge-only; cloud-only with the raw input (fp32); cloud-only with the input compressed (int8c+zstd); the
planner's chosen cut; each other of the plan's top 3 candidates; and the chosen cut again on a second agent (the
noise floor: the same configuration timed twice in the run). A cut's codec is the plan's (a candidate's `codec`,
else the plan's) unless `--codec` is given. Heads run fp32 (`--head-precision`), as the planner costs them.

Per cell: median and p95 end-to-end latency per mode; the chosen cut's speed-up over the best and the worst
baseline; its regret against the best measured mode; the error of the planner's predicted end-to-end latency of
the chosen cut (its `total_ms`) against the measured median; the noise floor (|chosen B / chosen A - 1|, and
|edge-only / chosen - 1| too when the chosen cut is edge-only: the same configuration); energy
per request from the device's power model (`partitioning.devices`: active W while the device computes, idle W
while it waits, radio nJ per uplink byte of the network), from each request's measured stage times.

The adaptive run (`--adaptive-s`, 0 to skip): mobilenet_v2's first bundle (in --devices, then --networks order)
whose plan table changes cut between 2 and 20 Mbps, on its device; the uplink steps 20 -> 2 -> 20 Mbps (a link
schedule), once with the agent's adaptive cut selection (the agent's default settings) and once on a fixed cut
(the plan table's cut at 20 Mbps); latency over time, the cut switches, and requests lost or answered twice.

Needs root (cgroups; `split-emulate` says how otherwise) and exits 3 without them. Cells run one after another,
device by device (the first device's rows for every model come first), model by model: a model's bundles (one per
network) are planned, served by their own `split-cloud`, and measured, each network behind its own proxy. With
`--json OUT.json`, the JSON and the Markdown report (OUT.md: the README table first) are rewritten after every cell,
so a run cut short still yields its rows (and `--resume` measures only the cells it lacks); `--requests 0` plans and
runs only the adaptive run. The modes of a cell are interleaved, with an idle gap of two CFS periods (40 ms) before
each request: a cgroup that has used its quota is throttled until the period ends, so without the gap a request that
follows a compute-bound one could inherit up to a period of throttling that a real device would not have. (Even with
the gap, the edge-only baseline timed 5-30% slower than the same configuration as the chosen cut in the first runs,
cause not found: it is counted in the noise floor.)

    python -m benchmarks.split_vs_baselines [--quick] [--models mobilenet_v2,resnet18,vgg11,vit_tiny,unet_small]
        [--devices rpi4,jetson-nano] [--networks 3g,4g,wifi] [--requests 40] [--plot bars.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks._common import bench_pki, host_line, median, percentile, table
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = "mobilenet_v2,resnet18,vgg11,vit_tiny,unet_small"
RAW, COMPRESSED = "fp32", "int8c+zstd"
TOP = 3
DEVICE_ID = "bench"


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# --- the worker: runs inside the emulated device --------------------------------------------------------------------

@dataclass(frozen=True)
class Mode:
    """One thing timed in a cell: a cut served with a codec (`key` names the row)."""

    key: str
    cut: str
    codec: str


def _agent(spec: dict[str, Any], cut: str, codec: str | None, **extra: Any) -> Any:
    from edge_agent import EdgeAgent
    from edge_agent.config import TlsConfig

    if codec is not None:  # None: the agent's default (with plans that name a codec per cut, the plan's)
        extra["codec"] = codec
    agent = EdgeAgent.from_bundle(spec["bundle"], cloud=spec["cloud"], cut=cut, deadline_ms=120_000,
                                  connect_timeout_s=30.0, device_id=DEVICE_ID, workers=1, intra_op_threads=1,
                                  head_precision=spec["head_precision"], tls=TlsConfig.from_folder(spec["tls"]),
                                  **extra)
    if cut != EDGE_ONLY and not agent.wait_for_mode("split", 120):
        agent.close()
        raise RuntimeError(f"agent on {cut} never reached the cloud: {agent.stats().extra}")
    return agent


def _record(res: Any, ms: float) -> dict[str, Any]:
    t = res.timing
    return {"ms": ms, "served_by": res.served_by, "cut": res.cut, "sent": res.sent_bytes, "head": t.head_ms,
            "encode": t.encode_ms, "tail": t.tail_ms, "fallback": res.fallback_reason}


def worker_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Every mode's agent, then `requests` rounds of one request per mode in a rotated order."""
    import numpy as np

    modes = [Mode(**m) for m in spec["modes"]]
    bundle = Bundle.load(spec["bundle"])
    x = np.random.default_rng(0).standard_normal(bundle.inputs[0].concrete_shape(1)).astype(np.float32)
    agents = {}
    try:
        for m in modes:
            agents[m.key] = _agent(spec, m.cut, m.codec)
        out: dict[str, list[dict[str, Any]]] = {m.key: [] for m in modes}
        for r in range(spec["warmup"] + spec["requests"]):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for m in order:
                time.sleep(spec.get("gap_s", 0.0))  # the CPU quota refills: no request inherits another's throttling
                t0 = time.perf_counter()
                res = agents[m.key].infer(x, timeout=300)
                ms = (time.perf_counter() - t0) * 1000.0
                if r >= spec["warmup"]:
                    out[m.key].append(_record(res, ms))
        return {"rows": out, "duplicates": sum(a.stats().duplicate_finishes for a in agents.values())}
    finally:
        for a in agents.values():
            a.close()


def worker_timeline(spec: dict[str, Any]) -> dict[str, Any]:
    """One agent (adaptive or on a fixed cut) at `rate` requests/s for `duration_s` after a GO on stdin."""
    import numpy as np

    bundle = Bundle.load(spec["bundle"])
    x = np.random.default_rng(0).standard_normal(bundle.inputs[0].concrete_shape(1)).astype(np.float32)
    extra = {"adaptive": {"enabled": True}} if spec["adaptive"] else {}
    # An adaptive agent whose plan names a codec per cut takes the codec with the cut: no fixed codec then.
    codec = None if spec["adaptive"] and spec.get("plan_codecs") else spec["codec"]
    agent = _agent(spec, spec["cut"], codec, **extra)
    switches: list[tuple[float, str, str]] = []
    start = [0.0]
    agent.add_state_listener(lambda mode, cut: switches.append((time.monotonic() - start[0], mode, cut)))
    try:
        print("READY", flush=True)
        sys.stdin.readline()  # GO: the link schedule starts now
        start[0] = time.monotonic()
        rows, ids, errors = [], [], 0
        period = 1.0 / spec["rate"]
        n = 0
        while time.monotonic() - start[0] < spec["duration_s"]:
            t_send = start[0] + n * period
            time.sleep(max(0.0, t_send - time.monotonic()))
            n += 1
            t0 = time.perf_counter()
            try:
                res = agent.infer(x, timeout=300)
            except Exception:  # noqa: BLE001 - counted as lost
                errors += 1
                continue
            rows.append({"t": time.monotonic() - start[0], **_record(res, (time.perf_counter() - t0) * 1000.0)})
            ids.append(res.request_id)
        stats = agent.stats()
        return {"rows": rows, "sent": n, "errors": errors, "answered_twice": len(ids) - len(set(ids))
                + stats.duplicate_finishes, "switches": switches}
    finally:
        agent.close()


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = worker_timeline(spec) if spec["kind"] == "timeline" else worker_cell(spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# --- the driver: here, at full speed ------------------------------------------------------------------------------

def _run_in_device(device: Any, args: list[str], *, timeout: float) -> str:
    """Run `python ARGS` inside the emulated device; its stdout (RuntimeError with its tail when it fails)."""
    from cloud_tier.lab.process import child_env

    proc = device.popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        cwd=ROOT, env=child_env())
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"{args[:3]} timed out in the emulated device: {err[-600:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{args[:3]} exited {proc.returncode} in the emulated device: {err[-900:]}")
    return out


READY_TIMEOUT_S = 300.0  # the timeline worker's agent reaches the cloud (its wait_for_mode is 120 s) well before


def _readline(stream: Any, timeout: float) -> str:
    """One line of `stream`, or "" when none came within `timeout` s (the reader thread ends with the stream)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True, name="svb-readline").start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


def _result_of(out: str) -> dict[str, Any]:
    line = next((x for x in reversed(out.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the worker printed no result: {out[-600:]}")
    return dict(json.loads(line[len("RESULT "):]))


@contextlib.contextmanager
def _top_cuts_exported(top: int, fp32_heads: bool = False) -> Iterator[None]:
    """While inside, a bundle written by `partitioning.profile` also exports its plan's `top` best candidates (the
    bundle exports the chosen cut, the plan table's cuts and the baselines), so that the benchmark can serve each.

    `fp32_heads` (the benchmark serves fp32 heads): each int8 head is quantized with MinMax once, with no search
    for a mixed precision that passes the accuracy gate (synthetic calibration data never passes it, and the
    search took minutes a head: 4 min for mobilenet_v2's full model on this host under load). The plan is costed
    at the heads' planned precision either way; the int8 heads only need to exist."""
    from models.plandoc import rank_key
    from partitioning import bundle as bundle_mod
    from partitioning.quantize import QuantConfig

    original = bundle_mod.write_bundle

    def quick(q: Any) -> Any:
        return replace(q, calibration="minmax", mixed=False) if fp32_heads and isinstance(q, QuantConfig) else q

    def write(out: Path, model: Any, source: Path, graph: Any, plan: Any, document: Any, *a: Any, **k: Any) -> Any:
        best = sorted((c for c in plan.candidates if c.feasible), key=lambda c: rank_key(c, plan.budgets.objective))
        extra = tuple((0.0, c.id) for c in best[:top])
        return original(out, model, source, graph, replace(plan, plan_table=plan.plan_table + extra), document,
                        *(quick(x) for x in a), **{name: quick(v) for name, v in k.items()})

    bundle_mod.write_bundle = write  # type: ignore[assignment]
    try:
        yield
    finally:
        bundle_mod.write_bundle = original  # type: ignore[assignment]


def plan_codec(bundle: Bundle, cut: str, override: str | None) -> str:
    """The codec a cut is served with: `override`, else the plan's for that candidate (`candidates[i].codec`, see
    the codec notes of split-profile), else the plan's codec."""
    if override:
        return override
    return str(bundle.candidate(cut).get("codec") or bundle.plan.get("codec") or "int8")


def top_candidates(bundle: Bundle, k: int = TOP) -> list[str]:
    """The plan's `k` best feasible candidates, best first (its own ranking)."""
    from models.plandoc import PlanDocument

    return [c.id for c in PlanDocument.from_json(bundle.plan).ranked() if c.feasible][:k]


@dataclass
class Cell:
    model: str
    device: str
    network: str
    bundle: Path
    modes: list[Mode] = field(default_factory=list)
    predicted: dict[str, float] = field(default_factory=dict)  # mode key -> the plan's total_ms
    chosen: str = ""
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    error: str = ""


def cell_modes(bundle: Bundle, codec: str | None) -> tuple[list[Mode], dict[str, float], str]:
    """The modes of a cell, the plan's predicted e2e ms of each planned mode, and the chosen mode's key."""
    chosen = bundle.chosen
    modes = [Mode("edge-only", EDGE_ONLY, RAW), Mode("cloud-only raw", CLOUD_ONLY, RAW),
             Mode("cloud-only int8c+zstd", CLOUD_ONLY, COMPRESSED)]
    ckey = f"chosen {chosen}" + (f" ({plan_codec(bundle, chosen, codec)})" if chosen != EDGE_ONLY else "")
    modes.append(Mode(ckey, chosen, plan_codec(bundle, chosen, codec)))
    for i, cut in enumerate(top_candidates(bundle), 1):
        c = plan_codec(bundle, cut, codec)
        if not any(m.cut == cut and m.codec == c for m in modes):
            modes.append(Mode(f"top{i} {cut}" + (f" ({c})" if cut != EDGE_ONLY else ""), cut, c))
    modes.append(Mode("chosen again (noise)", chosen, plan_codec(bundle, chosen, codec)))
    predicted = {}
    for m in modes:
        with contextlib.suppress(Exception):
            cand = bundle.candidate(m.cut)
            if m.key.startswith(("chosen", "top")) and m.key != "chosen again (noise)":
                predicted[m.key] = float(cand["total_ms"])
    return modes, predicted, ckey


def energy_mj(row: dict[str, Any], power: tuple[float, float], tx_nj_per_byte: float) -> float:
    """Energy of one request on the device: active W while it computes (head + encode, and the tail when served
    on the device), idle W for the rest of the request, and the radio's nJ per uplink byte."""
    active_ms = row["head"] + row["encode"] + (row["tail"] if row["served_by"] != "cloud" else 0.0)
    active_ms = min(active_ms, row["ms"])
    return power[0] * active_ms + power[1] * (row["ms"] - active_ms) + tx_nj_per_byte * row["sent"] * 1e-6


def device_power(name: str) -> tuple[float, float]:
    """(active W, idle W) of an emulated device from the device table (its preset's table entry when the table
    has no entry of that name)."""
    from cloud_tier.lab import emulate
    from partitioning.devices import device_from_table

    try:
        dev = device_from_table(name)
    except (KeyError, ValueError):
        dev = device_from_table(emulate.preset(name).table)
    return dev.active_w, dev.idle_w


def summarize(cell: Cell, power: tuple[float, float], tx: float) -> dict[str, Any]:
    """The figures of one measured cell."""
    med = {k: median([r["ms"] for r in v]) for k, v in cell.rows.items()}
    p95 = {k: percentile([r["ms"] for r in v], 95) for k, v in cell.rows.items()}
    energy = {k: median([energy_mj(r, power, tx) for r in v]) for k, v in cell.rows.items()}
    fallbacks = {k: sum(r["fallback"] is not None for r in v) for k, v in cell.rows.items()}
    chosen = med[cell.chosen]
    baselines = {k: med[k] for k in ("edge-only", "cloud-only raw", "cloud-only int8c+zstd")}
    timed = {k: v for k, v in med.items() if k != "chosen again (noise)"}
    best_key = min(timed, key=timed.get)  # type: ignore[arg-type]
    pred = cell.predicted.get(cell.chosen, float("nan"))
    # Two timings of the same configuration in the run: the chosen cut on two agents, and the edge-only baseline
    # beside a chosen edge-only (the codec does not matter where nothing is sent).
    noise = abs(med["chosen again (noise)"] / chosen - 1.0)
    if cell.chosen.split()[1] == EDGE_ONLY:
        noise = max(noise, abs(med["edge-only"] / chosen - 1.0))
    return {
        "model": cell.model, "device": cell.device, "network": cell.network, "median": med, "p95": p95,
        "energy_mj": energy, "fallbacks": fallbacks, "chosen": cell.chosen, "best": best_key,
        "speedup_best_baseline": min(baselines.values()) / chosen, "speedup_worst_baseline": max(baselines.values())
        / chosen, "regret": chosen / timed[best_key] - 1.0, "predicted_ms": pred, "prediction_error": pred / chosen
        - 1.0, "noise_floor": noise, "n": len(cell.rows[cell.chosen]),
        "predicted": cell.predicted,
    }


class Bench:
    """Everything of one run: the calibrated devices, the bundles, the cloud and the proxy."""

    def __init__(self, args: argparse.Namespace, work: Path):
        from cloud_tier.lab import emulate

        self.args, self.work = args, work
        self.cgroups = emulate.Cgroups.detect()
        emulate.EmulatedDevice(emulate.Limits(), name="probe", cgroups=self.cgroups).close()
        self.limits: dict[str, Any] = {}
        self.calibration: dict[str, str] = {}
        self.loads: list[tuple[float, str]] = []  # (s since the start, load average) at each save
        for dev in args.devices:
            limits, how = emulate.device_limits(dev, cgroups=self.cgroups, say=say)
            self.limits[dev] = replace(limits, cpus=tuple(emulate.pick_cpus(1)))
            self.calibration[dev] = how
            say(f"{dev}: {limits.describe()}; {how}")

    def save(self, summaries: list[dict[str, Any]], timelines: list[dict[str, Any]], started: float) -> None:
        """--json (and its Markdown report beside it, .md) as the run stands: rewritten after every cell."""
        if self.args.json is None:
            return
        self.args.json.parent.mkdir(parents=True, exist_ok=True)
        self.loads.append((time.monotonic() - started, _loadavg()))
        self.args.json.write_text(json.dumps({"cells": summaries, "timelines": timelines, "calibration":
                                              self.calibration, "load": self.loads}, indent=1, default=str))
        self.args.json.with_suffix(".md").write_text(report(self, summaries, timelines, started) + "\n")

    def device(self, name: str) -> Any:
        from cloud_tier.lab import emulate

        return emulate.EmulatedDevice(self.limits[name], name=name, cgroups=self.cgroups)

    def onnx(self, model: str) -> Path:
        """The model's ONNX (exported once): split-profile in the device and the plan here read the same file."""
        out = self.work / "onnx" / f"{model}.onnx"
        if not out.is_file():
            from models.loaders import load_model

            loaded = load_model(model, self.work / "export" / model)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(loaded.onnx_path, out)
        return out

    def device_profile(self, model: str, device: str) -> Path:
        """split-profile --device local --save-device-profile, run inside the emulated device."""
        out = self.work / "profiles" / f"{model}-{device}.json"
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with self.device(device) as dev:
            _run_in_device(dev, ["-m", "partitioning.cli", str(self.onnx(model)), "--device", "local", "--cloud", "t4",
                                 "--save-device-profile", str(out), "--threads", "1", "--refine", "0", "--repeats",
                                 str(self.args.profile_repeats), "--quiet"], timeout=3600)
        say(f"{model} on {device}: device profile measured inside the emulated device in "
            f"{time.monotonic() - t0:.0f} s")
        return out

    def bundle(self, model: str, device: str, network: str) -> Path:
        """The plan from the device's profile with the cloud measured here, as a bundle with the top cuts."""
        import warnings

        from partitioning import profile

        out = self.work / "bundles" / f"{model}-{device}-{network}"
        if (out / "plan.json").is_file():
            return out
        prof = self.device_profile(model, device)
        with warnings.catch_warnings(), _top_cuts_exported(TOP, fp32_heads=self.args.head_precision == "fp32"):
            warnings.simplefilter("ignore")
            profile(str(self.onnx(model)), device=str(prof), cloud="local", network=network, out=out,
                    cloud_threads=1, repeats=self.args.profile_repeats, name=model)
        return out


def measure_cell(bench: Bench, cell: Cell, cloud: str, tls: Path) -> None:
    bundle = Bundle.load(cell.bundle)
    cell.modes, cell.predicted, cell.chosen = cell_modes(bundle, bench.args.codec)
    spec = {"kind": "cell", "bundle": str(cell.bundle), "cloud": cloud, "tls": str(tls),
            "head_precision": bench.args.head_precision, "modes": [m.__dict__ for m in cell.modes],
            "requests": bench.args.requests, "warmup": bench.args.warmup,
            "gap_s": 2 * bench.limits[cell.device].period_quota_us()[0] / 1e6}
    path = bench.work / "spec.json"
    path.write_text(json.dumps(spec))
    with bench.device(cell.device) as dev:
        out = _run_in_device(dev, ["-m", "benchmarks.split_vs_baselines", "--worker", str(path)], timeout=7200)
    cell.rows = _result_of(out)["rows"]


def timeline_bundle(cells: Sequence[Cell]) -> tuple[Path, str] | None:
    """The bundle (and its device) of the adaptive run: mobilenet_v2's, the first device (in --devices order)
    whose plan table changes cut between 2 and 20 Mbps, else the first device's (a run that shows no switch)."""
    mine = [c for c in cells if c.model == "mobilenet_v2"]
    for c in mine:
        b = Bundle.load(c.bundle)
        if b.best_cut_for(2.0) != b.best_cut_for(20.0):
            return c.bundle, c.device
    return (mine[0].bundle, mine[0].device) if mine else None


def run_timeline(bench: Bench, bundle_path: Path, device: str, cloud_port: int, tls: Path,
                 adaptive: bool) -> dict[str, Any]:
    """One timeline run behind its own proxy following the 20 -> 2 -> 20 Mbps schedule."""
    from cloud_tier.lab import emulate
    from cloud_tier.lab.linkproxy import LinkProxy
    from cloud_tier.lab.process import child_env

    phase = bench.args.adaptive_s / 3
    steps = emulate.parse_schedule(f"0:20,{phase:g}:2,{2 * phase:g}:20")
    bundle = Bundle.load(bundle_path)
    fixed = bundle.best_cut_for(20.0)
    spec = {"kind": "timeline", "bundle": str(bundle_path), "tls": str(tls),
            "head_precision": bench.args.head_precision, "adaptive": adaptive, "cut": fixed,
            "codec": plan_codec(bundle, fixed, bench.args.codec),
            "plan_codecs": bench.args.codec is None and any("codec" in c for c in bundle.plan["candidates"]),
            "rate": bench.args.rate, "duration_s": bench.args.adaptive_s}
    first = steps[0][1]
    tag = "adaptive" if adaptive else "fixed"
    with LinkProxy("127.0.0.1", cloud_port, uplink_mbps=first.uplink_mbps, downlink_mbps=first.downlink_mbps,
                   delay_ms=first.one_way_ms) as proxy, bench.device(device) as dev:
        spec["cloud"] = proxy.address
        path = bench.work / "timeline.json"
        path.write_text(json.dumps(spec))
        proc = dev.popen([sys.executable, "-m", "benchmarks.split_vs_baselines", "--worker", str(path)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=child_env())
        assert proc.stdout is not None and proc.stdin is not None
        schedule = emulate.LinkSchedule(proxy, steps, say=say, tag=tag)  # starts with the requests
        try:
            line = _readline(proc.stdout, READY_TIMEOUT_S)
            if line.strip() != "READY":
                proc.kill()
                raise RuntimeError(f"timeline worker did not start in {READY_TIMEOUT_S:.0f} s: "
                                   f"{line}{proc.communicate()[0][-600:]}")
            schedule.start()
            proc.stdin.write("GO\n")
            proc.stdin.flush()
            out, _ = proc.communicate(timeout=bench.args.adaptive_s * 10 + 300)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the timeline worker ran past {bench.args.adaptive_s * 10 + 300:.0f} s") from None
        finally:
            schedule.stop()
            if proc.poll() is None:  # an error or a deadline above: the worker does not outlive its device
                proc.kill()
                proc.wait()
    result = _result_of(out)
    result.update(bundle=str(bundle_path), adaptive=adaptive, fixed_cut=fixed, plan_table=bundle.plan_table,
                  phase_s=phase, device=device)
    return result


def timeline_table(res: dict[str, Any]) -> list[list[object]]:
    """Median latency per phase (20 / 2 / 20 Mbps), the cuts served in each, and the counts."""
    phase = res["phase_s"]
    out = []
    for i, up in enumerate((20, 2, 20)):
        rows = [r for r in res["rows"] if i * phase <= r["t"] < (i + 1) * phase]
        cuts = sorted({r["cut"] for r in rows})
        out.append([f"{'adaptive' if res['adaptive'] else 'fixed ' + res['fixed_cut']}", f"{i * phase:.0f}-"
                    f"{(i + 1) * phase:.0f} s", up, len(rows), median([r["ms"] for r in rows]),
                    percentile([r["ms"] for r in rows], 95), ", ".join(cuts)])
    return out


def plot(summaries: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars per cell: each mode's median (p95 as an error bar)."""
    try:
        import matplotlib
    except ImportError:
        print("--plot: matplotlib is not installed: pip install 'splitinfer[profile]' (or pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["edge-only", "cloud-only raw", "cloud-only int8c+zstd", "chosen", "top"]
    colors = ["#4C72B0", "#DD8452", "#C44E52", "#55A868", "#8172B2"]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(summaries)), 5))
    width = 0.8 / 6
    for ci, s in enumerate(summaries):
        keys = [k for k in s["median"] if k != "chosen again (noise)"]
        for j, k in enumerate(keys):
            kind = next((i for i, p in enumerate(kinds) if k.startswith(p)), len(kinds) - 1)
            ax.bar(ci + (j - len(keys) / 2) * width, s["median"][k], width, color=colors[kind],
                   yerr=[[0], [max(0.0, s["p95"][k] - s["median"][k])]], capsize=2,
                   label=kinds[kind] if ci == 0 and kind not in [next((i for i, p in enumerate(kinds)
                                                                        if q.startswith(p)), 4) for q in keys[:j]]
                   else None)
    ax.set_xticks(range(len(summaries)))
    ax.set_xticklabels([f"{s['model']}\n{s['device']} {s['network']}" for s in summaries], fontsize=7)
    ax.set_ylabel("end-to-end ms (median, p95 bar)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:+.0f}%"


def _ms(x: float) -> str:
    return "n/a" if x != x else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _mode_name(key: str) -> str:
    """A mode's key as the README names it: 'c021 (int8)' for 'chosen c021 (int8)', 'edge-only', ..."""
    return key.split(" ", 1)[1] if key.startswith(("chosen ", "top")) else key


def readme_table(summaries: Sequence[dict[str, Any]]) -> str:
    """The README's table: one row per cell."""
    rows = []
    for s in summaries:
        m = s["median"]
        rows.append([s["model"], s["device"], s["network"], _ms(m["edge-only"]),
                     f"{_ms(m['cloud-only raw'])} / {_ms(m['cloud-only int8c+zstd'])}",
                     f"{_ms(m[s['chosen']])} {_mode_name(s['chosen'])}", f"{_ms(m[s['best']])} {_mode_name(s['best'])}",
                     f"{s['speedup_best_baseline']:.2f}x / {s['speedup_worst_baseline']:.1f}x", _pct(s["regret"]),
                     f"{_ms(s['predicted_ms'])} ({_pct(s['prediction_error'])})", _pct(s["noise_floor"]),
                     f"{s['energy_mj'][s['chosen']]:.0f} / {s['energy_mj']['edge-only']:.0f}"])
    return table(["model", "device", "network", "edge-only", "cloud-only raw / compressed", "planner's choice",
                  "best measured", "speed-up vs best / worst baseline", "regret", "predicted (error)", "noise floor",
                  "mJ/request choice / edge-only"], rows)


def targets(s: dict[str, Any]) -> str:
    """Which of the three targets a cell meets: the choice at least as fast as the best baseline (within the noise
    floor), regret under 10%, prediction within 15%; a miss smaller than the noise floor says so."""
    floor = s["noise_floor"]
    slower, regret, error = 1.0 - s["speedup_best_baseline"], s["regret"], abs(s["prediction_error"])
    faster = "met" if slower <= 0 else "met within the noise" if slower <= floor else "MISSED"
    regret_ok = "met" if regret < 0.10 else "MISSED (inside the noise floor)" if regret <= floor else "MISSED"
    return f"faster {faster}, regret {regret_ok}, prediction {'met' if error <= 0.15 else 'MISSED'}"


def report(bench: Bench, summaries: list[dict[str, Any]], timelines: list[dict[str, Any]], started: float) -> str:
    """The run as Markdown: its settings, the README table, every mode, the adaptive run."""
    a = bench.args
    out = [f"split_vs_baselines.py: {a.requests} requests per mode per cell (+{a.warmup} warm-up), modes interleaved; "
           f"heads {a.head_precision}; cloud = split-cloud here, max_batch 1, 1 thread, mTLS; {host_line()}; "
           f"load average at the end {_loadavg()}"]
    out += [f"- {dev}: {bench.limits[dev].describe()}; {how}" for dev, how in bench.calibration.items()]
    out += ["", "Median end-to-end ms; speed-up of the planner's choice over the best and the worst baseline "
            "(edge-only, cloud-only raw, cloud-only int8c+zstd); regret against the best measured mode; the plan's "
            "predicted e2e ms of its choice (error against the measured median); the noise floor (the same "
            "configuration timed twice); energy per request from the device's power model.", "",
            readme_table(summaries), ""]
    out += [f"- {s['model']} {s['device']} {s['network']}: {targets(s)}" for s in summaries]
    out += ["", "Every mode (median / p95 ms, energy mJ per request, requests finished on the device instead):", ""]
    detail = []
    for s in summaries:
        for k in s["median"]:
            detail.append([s["model"], s["device"], s["network"], k, s["median"][k], s["p95"][k], s["energy_mj"][k],
                           f"{s['predicted'][k]:.1f}" if k in s["predicted"] else "", s["fallbacks"].get(k, "")])
    out.append(table(["model", "device", "network", "mode", "median ms", "p95 ms", "mJ", "predicted ms",
                      "fell back"], detail))
    out += [f"\nadaptive run failed: {t['error']}" for t in timelines if "error" in t]
    if timelines and all("error" not in t for t in timelines):
        out.append(f"\nAdaptive re-cut: mobilenet_v2 on {timelines[0]['device']} (its "
                   f"{Path(timelines[0]['bundle']).name} bundle), uplink 20 -> 2 -> 20 Mbps "
                   f"({timelines[0]['phase_s']:.0f} s each), {a.rate:g} requests/s; plan table "
                   + ", ".join(f"{m:g}->{c}" for m, c in timelines[0]["plan_table"]) + "\n")
        rows = [r for t in timelines for r in timeline_table(t)]
        out.append(table(["agent", "phase", "uplink Mbps", "requests", "median ms", "p95 ms", "cuts served"], rows))
        for t in timelines:
            name = "adaptive" if t["adaptive"] else f"fixed {t['fixed_cut']}"
            sw = "; ".join(f"{at:.1f} s -> {cut} ({mode})" for at, mode, cut in t["switches"]) or "none"
            out.append(f"- {name}: sent {t['sent']}, answered {len(t['rows'])}, lost {t['sent'] - len(t['rows'])} "
                       f"(errors {t['errors']}), answered twice {t['answered_twice']}; cut switches: {sw}")
    out.append(f"\n({time.monotonic() - started:.0f} s)")
    return "\n".join(out)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated zoo names (default %(default)s)")
    ap.add_argument("--devices", default="rpi4,jetson-nano", help="split-emulate presets (default %(default)s)")
    ap.add_argument("--networks", default="3g,4g,wifi", help="network profiles (default %(default)s)")
    ap.add_argument("--requests", type=int, default=40,
                    help="timed requests per mode per cell (default 40; 0: plan, then only the adaptive run)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--codec", help="serve every split cut with this codec instead of the plan's")
    ap.add_argument("--head-precision", default="fp32", choices=("fp32", "int8"))
    ap.add_argument("--profile-repeats", type=int, default=10, help="split-profile --repeats (default 10)")
    ap.add_argument("--adaptive-s", type=float, default=90.0, help="length of the adaptive run (0: skip)")
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s in the adaptive run")
    ap.add_argument("--workdir", type=Path, help="keep profiles and bundles here between runs (default: a temp dir)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the cells already in --json (a run cut short) and measure only the others")
    ap.add_argument("--plot", type=Path, help="write grouped bars per cell to this PNG")
    ap.add_argument("--json", type=Path, help="write every figure to this JSON file, and the Markdown report beside "
                    "it (.md), after every cell")
    ap.add_argument("--quick", action="store_true",
                    help="a small run: mobilenet_v2, rpi4 and jetson-nano, 3 networks, 12 requests, 45 s adaptive")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.quick:
        args.models, args.requests, args.adaptive_s = "mobilenet_v2", 12, 45.0
    # SIGTERM unwinds like Ctrl-C: the cloud process, the proxies and the device cgroups are closed, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    args.networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    started = time.monotonic()
    from cloud_tier.lab import emulate

    with tempfile.TemporaryDirectory(prefix="splitinfer-svb-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            bench = Bench(args, work)
        except emulate.EmulationError as exc:
            print(str(exc), file=sys.stderr)
            return emulate.EXIT_NO_CGROUP
        return _run(bench, started)


def _serve_dir(work: Path, name: str, bundles: Sequence[Path]) -> Path:
    """A folder of links to `bundles` for one `split-cloud` (it loads the bundles of a folder when it starts)."""
    out = work / "serve" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for b in bundles:
        (out / b.name).symlink_to(b.resolve(), target_is_directory=True)
    return out


def _plan_group(bench: Bench, model: str, dev: str) -> list[Cell]:
    """The bundles of one model on one device, one per network (a failure is a line, not the end of the run)."""
    cells = []
    for net in bench.args.networks:
        try:
            path = bench.bundle(model, dev, net)
        except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end of the run
            say(f"{model} {dev} {net}: no bundle: {exc}")
            continue
        cells.append(Cell(model, dev, net, path))
        b = Bundle.load(path)
        say(f"{model} {dev} {net}: plan chose {b.chosen} (predicted {b.candidate(b.chosen)['total_ms']:.1f} "
            f"ms), top {top_candidates(b)}")
    return cells


def _run(bench: Bench, started: float) -> int:
    """Device by device (the first device's rows for every model come first), model by model: plan the model's
    bundles (one per network), serve them from their own `split-cloud`, measure each network's cell; the JSON and
    the Markdown report are rewritten after every cell, so a run cut short still yields its rows."""
    from cloud_tier.lab.process import CloudProcess

    args, work = bench.args, bench.work
    pki, _ = bench_pki(work, DEVICE_ID)
    tls = pki / "devices" / DEVICE_ID
    cloud_args = ("--max-batch", "1", "--cpu-only", "--no-fleet", "--log-level", "WARNING")
    summaries = resumed(args.json) if args.resume else []
    done = {(s["model"], s["device"], s["network"]) for s in summaries}
    if done:
        say(f"--resume: {len(done)} cells of {args.json} kept, not measured again")
    timelines: list[dict[str, Any]] = []
    planned: list[Cell] = []
    for dev in args.devices:
        for model in args.models:
            cells = _plan_group(bench, model, dev)
            planned += cells
            cells = [c for c in cells if (c.model, c.device, c.network) not in done]
            if not cells or args.requests <= 0:
                continue
            try:
                with CloudProcess(_serve_dir(work, f"{dev}-{model}", [c.bundle for c in cells]), *cloud_args,
                                  pki=pki) as cloud:
                    assert cloud.port is not None
                    for cell in cells:
                        s = _measure_summarized(bench, cell, cloud.port, tls)
                        if s is not None:
                            summaries.append(s)
                            bench.save(summaries, timelines, started)
            except RuntimeError as exc:  # the cloud did not start: the group's cells are missing rows
                say(f"{model} {dev}: split-cloud failed: {exc}")
    timeline = timeline_bundle(planned) if args.adaptive_s > 0 else None
    if timeline is not None:
        with CloudProcess(_serve_dir(work, "timeline", [timeline[0]]), *cloud_args, pki=pki) as cloud:
            assert cloud.port is not None
            for adaptive in (True, False):
                try:
                    timelines.append(run_timeline(bench, *timeline, cloud.port, tls, adaptive))
                except Exception as exc:  # noqa: BLE001
                    timelines.append({"adaptive": adaptive, "error": str(exc)})
                bench.save(summaries, timelines, started)
    bench.save(summaries, timelines, started)
    print(report(bench, summaries, timelines, started))
    if args.plot:
        plot(summaries, args.plot)
    return 0


def resumed(path: Path | None) -> list[dict[str, Any]]:
    """The measured cells of an earlier run's --json (none when there is no such file)."""
    if path is None or not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("cells", []))


def _measure_summarized(bench: Bench, cell: Cell, cloud_port: int, tls: Path) -> dict[str, Any] | None:
    """One cell behind its own link proxy shaped to the cell's network; its figures (None when it failed)."""
    from cloud_tier.lab.linkproxy import LinkProxy
    from partitioning.devices import resolve_network

    net = resolve_network(cell.network)
    t0 = time.monotonic()
    try:
        with LinkProxy("127.0.0.1", cloud_port, uplink_mbps=net.uplink_mbps, downlink_mbps=net.downlink_mbps,
                       delay_ms=net.rtt_ms / 2) as proxy:
            measure_cell(bench, cell, proxy.address, tls)
    except Exception as exc:  # noqa: BLE001 - one cell's failure is a line, not the end of the run
        say(f"{cell.model} {cell.device} {cell.network}: failed: {exc}")
        return None
    s = summarize(cell, device_power(cell.device), net.tx_nj_per_byte)
    say(f"{cell.model} {cell.device} {cell.network} ({time.monotonic() - t0:.0f} s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in s["median"].items()))
    return s


if __name__ == "__main__":
    sys.exit(main())
