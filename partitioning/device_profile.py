"""Saved device profiles (`splitinfer.device/v1` JSON): node costs measured on a device, checked when read.

A user measures a model on the real device (`split-profile full.onnx --device local --save-device-profile
pi.json`, the [edge] extra suffices) and plans with `--device pi.json` elsewhere: the measured costs when the
model is the measured one, else a roofline estimate from the throughput the device achieved.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partitioning.costtypes import BoundaryRates, CodecRate, DeviceProfileError, NodeCosts, Throughput
from partitioning.devices import DeviceProfile, device_from_table
from partitioning.estimate import roofline

if TYPE_CHECKING:
    import onnx

DEVICE_SCHEMA = "splitinfer.device/v1"


@dataclass(frozen=True)
class MeasuredDeviceProfile:
    """Node costs measured on a device for one model, plus the throughput fitted from them."""

    name: str
    model_sha256: str
    host: Mapping[str, Any]
    costs: NodeCosts
    fitted: Throughput | None
    path: Path | None = None
    active_w: float | None = None  # the device's power when the user gave it at save time
    idle_w: float | None = None
    codec_encode: Mapping[str, CodecRate] | None = None  # activation codecs timed on the device (spec -> rate)

    def costs_for(self, model: onnx.ModelProto, model_sha256: str) -> NodeCosts:
        """The measured costs when `model` is the measured model, else an estimate from the fitted rates.

        The model is the measured one when its sha256 matches, or when its node names are exactly the
        measured ones: re-saving a model (the loader normalizes every file) changes its bytes, not its
        nodes, so a profile measured on a bundle's full.onnx on the device matches the same model here.
        """
        names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]
        if model_sha256 == self.model_sha256:
            missing = [n for n in names if n not in self.costs.per_node_ms]
            if missing:
                raise DeviceProfileError(
                    f"device profile {self.name}: model sha256 matches but nodes {missing[:5]} are not in it"
                )
            return self.costs
        if set(names) == set(self.costs.per_node_ms):
            return replace(self.costs, source=f"{self.costs.source} (profile {self.name}, matched by node names)")
        return self.estimate(model)

    def estimate(self, model: onnx.ModelProto) -> NodeCosts:
        """Roofline costs of another model from the throughput this device achieved on the measured one."""
        if self.fitted is None:
            raise DeviceProfileError(
                f"device profile {self.name} was measured on model sha256 {self.model_sha256[:12]}... and has no "
                "fitted throughput to estimate another model from: measure this model on the device"
            )
        fit = self.fitted
        per_node, free = roofline(model, fit.gflops, fit.gbps, fit.launch_ms)
        source = (
            f"estimated from measured profile {self.name} (host {self.host.get('machine', '?')}, measured on "
            f"another model, sha256 {self.model_sha256[:12]}...): roofline with its {fit.source}; "
            f"{free} nodes constant-folded or fused (0 ms); overhead as measured"
        )
        boundary = self.costs.boundary or BoundaryRates(fit.launch_ms, fit.gbps)
        return NodeCosts(per_node, self.costs.overhead_ms, "estimated", source, boundary=boundary)


def save_device_profile(
    path: Path | str,
    costs: NodeCosts,
    *,
    model_sha256: str,
    host: Mapping[str, Any],
    name: str | None = None,
    active_w: float | None = None,
    idle_w: float | None = None,
    codecs: Mapping[str, Any] | None = None,
) -> None:
    """Write measured node costs as a `splitinfer.device/v1` JSON profile; `codecs`: the activation codecs timed
    here (`partitioning.codecs.CodecProfile.to_json`), whose encode rates plans for this device use."""
    if costs.kind != "measured":
        raise ValueError(f"only measured costs make a device profile, got kind {costs.kind!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", model_sha256 or ""):
        raise ValueError(f"model_sha256 must be 64 lowercase hex digits, got {model_sha256!r}")
    fit = costs.fitted
    doc = {
        "schema": DEVICE_SCHEMA,
        "name": name or f"measured-{host.get('machine', 'host')}",
        "model_sha256": model_sha256,
        "host": dict(host),
        "source": costs.source,
        "overhead_ms": costs.overhead_ms,
        "per_node_ms": dict(costs.per_node_ms),
        "fitted": None if fit is None else {"gflops": fit.gflops, "gbps": fit.gbps, "launch_ms": fit.launch_ms,
                                            "source": fit.source},
        "power": {"active_w": active_w, "idle_w": idle_w},
        "boundary": None if costs.boundary is None else {"launch_ms": costs.boundary.launch_ms,
                                                         "gbps": costs.boundary.gbps,
                                                         "reorders": costs.boundary.reorders},
    }
    if codecs is not None:
        doc["codecs"] = dict(codecs)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)  # never leave a half-written profile


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DeviceProfileError(f"{where}: expected a finite number >= 0, got {value!r}")
    return float(value)


def load_device_profile(path: Path | str) -> MeasuredDeviceProfile:
    """Read a `splitinfer.device/v1` profile written by `save_device_profile`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise DeviceProfileError(f"device profile {path}: cannot read it ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeviceProfileError(f"device profile {path}: not JSON ({exc})") from exc
    where = f"device profile {path}"
    if not isinstance(doc, dict) or doc.get("schema") != DEVICE_SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise DeviceProfileError(f"{where}: expected schema {DEVICE_SCHEMA!r}, got {got!r}")
    sha = doc.get("model_sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise DeviceProfileError(f"{where}: model_sha256 must be 64 hex digits, got {sha!r}")
    nodes = doc.get("per_node_ms")
    if not isinstance(nodes, dict) or not nodes:
        raise DeviceProfileError(f"{where}: per_node_ms must be a non-empty object of node name -> ms")
    per_node = {str(k): _number(v, f"{where}: per_node_ms[{k!r}]") for k, v in nodes.items()}
    overhead = _number(doc.get("overhead_ms"), f"{where}: overhead_ms")
    host = doc.get("host")
    if not isinstance(host, dict):
        raise DeviceProfileError(f"{where}: host must be an object, got {host!r}")
    fitted = None
    fit = doc.get("fitted")
    if fit is not None:
        if not isinstance(fit, dict):
            raise DeviceProfileError(f"{where}: fitted must be an object or null, got {fit!r}")
        fitted = Throughput(
            gflops=_number(fit.get("gflops"), f"{where}: fitted.gflops"),
            gbps=_number(fit.get("gbps"), f"{where}: fitted.gbps"),
            launch_ms=_number(fit.get("launch_ms"), f"{where}: fitted.launch_ms"),
            source=str(fit.get("source", "")),
        )
        if fitted.gflops <= 0 or fitted.gbps <= 0:
            raise DeviceProfileError(f"{where}: fitted gflops and gbps must be > 0, got {fit!r}")
    power = doc.get("power") or {}
    if not isinstance(power, dict):
        raise DeviceProfileError(f"{where}: power must be an object, got {power!r}")
    watts = {k: None if power.get(k) is None else _number(power[k], f"{where}: power.{k}")
             for k in ("active_w", "idle_w")}
    boundary = None
    rates = doc.get("boundary")  # absent in profiles saved before it was measured: the fitted rates stand in
    if rates is not None:
        if not isinstance(rates, dict) or not isinstance(rates.get("reorders", False), bool):
            raise DeviceProfileError(f"{where}: boundary must be an object with launch_ms, gbps, reorders, "
                                     f"got {rates!r}")
        gbps = _number(rates.get("gbps"), f"{where}: boundary.gbps")
        if gbps <= 0:
            raise DeviceProfileError(f"{where}: boundary.gbps must be > 0, got {gbps}")
        boundary = BoundaryRates(_number(rates.get("launch_ms"), f"{where}: boundary.launch_ms"), gbps,
                                 rates.get("reorders", False))
    elif fitted is not None:
        boundary = BoundaryRates(fitted.launch_ms, fitted.gbps)
    codec_encode = _codec_rates(doc.get("codecs"), where)  # absent in profiles saved before codecs were timed
    name = str(doc.get("name") or path.stem)
    costs = NodeCosts(per_node, overhead, "measured", f"{doc.get('source', 'measured')} (loaded from {path})",
                      fitted, boundary)
    return MeasuredDeviceProfile(name, sha, host, costs, fitted, path, watts["active_w"], watts["idle_w"],
                                 codec_encode)


def _codec_rates(obj: Any, where: str) -> dict[str, CodecRate] | None:
    """The encode rates of a profile's `codecs` object ({spec: {"encode": [fixed_ms, ms_per_mb], ...}})."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise DeviceProfileError(f"{where}: codecs must be an object of codec spec -> rates, got {obj!r}")
    rates = {}
    for spec, entry in obj.items():
        enc = entry.get("encode") if isinstance(entry, dict) else None
        if not isinstance(enc, list) or len(enc) != 2:
            raise DeviceProfileError(f"{where}: codecs.{spec}.encode must be [fixed_ms, ms_per_mb], got {enc!r}")
        rates[str(spec)] = CodecRate(_number(enc[0], f"{where}: codecs.{spec}.encode"),
                                     _number(enc[1], f"{where}: codecs.{spec}.encode"))
    return rates


def resolve_device(name_or_path: str) -> DeviceProfile | MeasuredDeviceProfile:
    """The edge profile named `name_or_path` (partitioning.devices), or a measured profile from a `.json` path."""
    key = str(name_or_path)
    if key.lower().endswith(".json"):
        return load_device_profile(Path(key))
    return device_from_table(key)
