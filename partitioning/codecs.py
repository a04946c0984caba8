"""The activation codecs as the planner costs them: measured on a model's own activations, on this host.

`measure_codecs(arrays)` applies every codec of `planner.CODEC_SPECS` to representative tensors (the model run on a
calibration or synthetic input with every tensor exposed, `partitioning.graph.activations`) with the functions
the wire uses (`models.wirecodec`, which `protos.codec` builds its Tensors from): per tensor the compressed /
uncompressed payload ratio, and per codec the encode and the decode time, fitted over the tensors as fixed +
per MB of the tensor's size (each part of a codec timed twice, the faster kept; a quantizer's quantizing and
dequantizing once for all its compressions). The rates are this host's; another
device's are these times `device_scale` (this host's memory rate over the device's: codecs are memory-bound).

`CodecGate` is the accuracy gate of the lossy quantizers (fp16, int8, int8c): the model's outputs with a cut's
tensors sent through the codec (tail(decode(encode(head(x))))), against the model's own, by the same metric
and threshold as the int8 head's gate (`partitioning.quantize.gated_agreement`). `gate_plan` checks the pairs a
bundle exports (the chosen cut, the plan table's, cloud-only) and chooses again without those that fail.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models import wirecodec as wc
from models.manifest import CLOUD_ONLY, EDGE_ONLY
from partitioning.costtypes import CodecRate
from partitioning.graph import CutGraph
from partitioning.planner import CODEC_SPECS, CodecCosts, CostInputs, Plan, apply_measured

__all__ = ["CodecProfile", "CodecGate", "measure_codecs", "device_scale", "gate_plan", "codec_costs"]


@dataclass(frozen=True)
class CodecProfile:
    """Encode and decode rates of every codec on this host, and how much each compressed each tensor."""

    encode: Mapping[str, CodecRate]
    decode: Mapping[str, CodecRate]
    ratios: Mapping[str, Mapping[str, float]]  # compressed spec -> tensor -> compressed / uncompressed bytes
    memory_gbps: float  # this host's rate of the fp32 codec (a copy): what `device_scale` compares
    source: str
    # spec -> tensor -> ms as timed on that tensor (the planner's figure for it; the fit serves the others)
    tensor_encode: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    tensor_decode: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # tensors that held non-finite values (e.g. -inf of an attention mask): int8 and int8c cannot carry them
    unquantizable: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        """The rates as a device profile saves them (ratios depend on the data, not the device: not saved)."""
        return {spec: {"encode": [r.fixed_ms, r.ms_per_mb], "decode": [self.decode[spec].fixed_ms,
                                                                      self.decode[spec].ms_per_mb]}
                for spec, r in self.encode.items()}


def _fit(sizes: Sequence[int], times: Sequence[float]) -> CodecRate:
    """Least squares ms = fixed + per_mb * MB over the tensors; where that makes a term negative (small tensors,
    whose times are mostly fixed cost, and noise), fixed = the least time and per_mb through the rest."""
    x = np.asarray(sizes, np.float64) / 1e6
    y = np.asarray(times, np.float64)
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, fixed = np.polyfit(x, y, 1)
        if slope >= 0 and fixed >= 0:
            return CodecRate(float(fixed), float(slope))
    fixed = float(y.min())
    slope = float(x @ (y - fixed) / (x @ x)) if x @ x > 0 else 0.0
    return CodecRate(fixed, max(slope, 0.0))


def _best_of_two(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(the faster of two timed calls of `fn` in ms, its result)."""
    times, result = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), result


def _time_codecs(arr: np.ndarray, quantizer: str, compressions: Sequence[str]
                 ) -> dict[str, tuple[float, float, int, int]]:
    """{compression: (encode ms, decode ms, uncompressed payload bytes, wire payload bytes)} of `arr` under
    `quantizer` with each compression: encode = quantize + compress, decode = decompress + dequantize, each part
    timed twice (the faster kept); the quantizing and dequantizing are timed once for all the compressions."""
    floating = np.issubdtype(arr.dtype, np.floating)

    def encode() -> tuple[Any, memoryview]:
        q = wc.quantize(arr, quantizer) if floating else (arr, None, None, None)
        return q, wc.payload_bytes(q[0])

    q_ms, ((q, scale, zero, axis), raw) = _best_of_two(encode)
    found: dict[str, tuple[float, float, int, int]] = {}
    back = q
    for compression in compressions:
        c_ms, data = _best_of_two(lambda: wc.compress(raw, compression))  # noqa: B023 - called here, at once
        d_ms, back = _best_of_two(
            lambda: np.frombuffer(wc.decompress(data, compression, raw.nbytes), q.dtype).reshape(q.shape))  # noqa: B023
        found[compression] = (q_ms + c_ms, d_ms, raw.nbytes, len(data))
    if scale is not None:
        dq_ms, _ = _best_of_two(lambda: wc.dequantize(back, scale, zero, axis))
    elif back.dtype == np.float16:
        dq_ms, _ = _best_of_two(lambda: back.astype(np.float32))
    else:
        dq_ms = 0.0
    return {c: (enc, dec + dq_ms, raw_n, wire) for c, (enc, dec, raw_n, wire) in found.items()}


def measure_codecs(arrays: Mapping[str, np.ndarray], specs: Sequence[str] = CODEC_SPECS) -> CodecProfile:
    """Every codec in `specs` on every array (see the module docstring); int8c only on arrays of rank >= 2."""
    encode: dict[str, CodecRate] = {}
    decode: dict[str, CodecRate] = {}
    ratios: dict[str, dict[str, float]] = {}
    tensor_enc: dict[str, dict[str, float]] = {}
    tensor_dec: dict[str, dict[str, float]] = {}
    items = [(name, np.ascontiguousarray(a)) for name, a in arrays.items() if a.size]
    if not items:
        raise ValueError("measure_codecs: no non-empty arrays to measure the codecs on")
    by_quantizer: dict[str, dict[str, str]] = {}  # quantizer -> compression -> spec, in the order of `specs`
    for spec in specs:
        quantizer, compression = wc.split_spec(spec)
        by_quantizer.setdefault(quantizer, {})[compression] = spec
    # int8 and int8c refuse non-finite values (models.wirecodec); a cut through such a tensor is never sent so
    unquantizable = frozenset(n for n, a in items if a.dtype.kind == "f" and not np.isfinite(a).all())
    for quantizer, specs_of in by_quantizer.items():
        usable = [(n, a) for n, a in items if not (quantizer == "int8c" and a.ndim < 2 and a.dtype.kind == "f")
                  and not (quantizer in ("int8", "int8c") and n in unquantizable)]
        if not usable:
            continue
        _time_codecs(usable[0][1], quantizer, list(specs_of))  # warm-up: imports, first allocation
        sizes: list[int] = []
        enc_ms: dict[str, list[float]] = {spec: [] for spec in specs_of.values()}
        dec_ms: dict[str, list[float]] = {spec: [] for spec in specs_of.values()}
        timed = _spread(usable)
        for name, arr in usable:
            if name not in timed:  # its compression ratios only; its times from the fit
                for compression, (raw, wire) in _ratios(arr, quantizer, list(specs_of)).items():
                    ratios.setdefault(specs_of[compression], {})[name] = wire / raw if raw else 1.0
                continue
            sizes.append(arr.nbytes)
            for compression, (enc, dec, raw, wire) in _time_codecs(arr, quantizer, list(specs_of)).items():
                spec = specs_of[compression]
                enc_ms[spec].append(enc)
                dec_ms[spec].append(dec)
                tensor_enc.setdefault(spec, {})[name] = enc
                tensor_dec.setdefault(spec, {})[name] = dec
                if compression != "none":
                    ratios.setdefault(spec, {})[name] = wire / raw if raw else 1.0
        for spec in specs_of.values():
            encode[spec], decode[spec] = _fit(sizes, enc_ms[spec]), _fit(sizes, dec_ms[spec])
    encode, decode = {s: encode[s] for s in specs if s in encode}, {s: decode[s] for s in specs if s in decode}
    copy = encode.get("fp32")
    gbps = 1.0 / copy.ms_per_mb if copy is not None and copy.ms_per_mb > 0 else float("nan")
    total = sum(a.nbytes for _, a in items)
    timed_count = min(len(items), TIMED_TENSORS)
    source = (f"codecs timed on this host on {timed_count} of the model's {len(items)} tensors (spread over their "
              f"sizes; {total / 1e6:.1f} MB in all at batch 1), each part (quantize, compress, decompress, "
              "dequantize) twice (faster kept): those times for those tensors, fitted as fixed + per MB for the "
              "others; compression ratios of every tensor as measured")
    if unquantizable:
        source += f"; {len(unquantizable)} tensor(s) with non-finite values, never sent as int8/int8c"
    return CodecProfile(encode, decode, ratios, gbps, source, tensor_enc, tensor_dec, unquantizable)


TIMED_TENSORS = 48  # tensors whose codec times are measured; the rest are costed by the fit over them


def _spread(items: Sequence[tuple[str, np.ndarray]], count: int = TIMED_TENSORS) -> set[str]:
    """The names of up to `count` of `items`, spread evenly over their sizes (smallest and largest included)."""
    if len(items) <= count:
        return {name for name, _ in items}
    by_size = sorted(items, key=lambda item: (item[1].nbytes, item[0]))
    picks = np.unique(np.linspace(0, len(by_size) - 1, count).round().astype(int))
    return {by_size[i][0] for i in picks}


def _ratios(arr: np.ndarray, quantizer: str, compressions: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{compression: (uncompressed payload bytes, wire payload bytes)} of `arr` under `quantizer`, untimed."""
    q = wc.quantize(arr, quantizer)[0] if np.issubdtype(arr.dtype, np.floating) else arr
    raw = wc.payload_bytes(q)
    return {c: (raw.nbytes, raw.nbytes if c == "none" else len(wc.compress(raw, c))) for c in compressions}


def device_scale(host_gbps: float | None, device_gbps: float | None) -> float:
    """How many times slower a device runs the (memory-bound) codecs than this host: the ratio of their
    memory rates, within [0.05, 100]; 1 when either is unknown."""
    if not host_gbps or not device_gbps or not np.isfinite(host_gbps) or not np.isfinite(device_gbps):
        return 1.0
    return float(min(max(host_gbps / device_gbps, 0.05), 100.0))


def codec_costs(profile: CodecProfile, edge_scale: float = 1.0, cloud_scale: float = 1.0,
                encode: Mapping[str, CodecRate] | None = None) -> CodecCosts:
    """The planner's codec inputs: encode on the device (`encode` when measured there, else this host's rates x
    `edge_scale`), decode in the cloud (this host's x `cloud_scale`), the measured ratios."""
    enc = {s: (encode[s] if encode and s in encode else r.scaled(edge_scale)) for s, r in profile.encode.items()}
    dec = {s: r.scaled(cloud_scale) for s, r in profile.decode.items()}
    how = "measured on the device" if encode else f"this host's x {edge_scale:.2f}"
    source = f"{profile.source}; device encode {how}; cloud decode this host's x {cloud_scale:.2f}"
    tensor_enc = {} if encode else {s: {t: ms * edge_scale for t, ms in per.items()}
                                    for s, per in profile.tensor_encode.items()}
    tensor_dec = {s: {t: ms * cloud_scale for t, ms in per.items()} for s, per in profile.tensor_decode.items()}
    return CodecCosts(enc, dec, profile.ratios, {}, source, tensor_enc, tensor_dec, profile.unquantizable)


class CodecGate:
    """The accuracy gate of lossy codecs per cut (module docstring); heads and tails extracted once per cut."""

    def __init__(self, model: Any, samples: Sequence[Mapping[str, np.ndarray]], task: str,
                 agreement: Callable[[list, Callable[[int], list], str], dict]) -> None:
        from partitioning.extract import session

        self.model, self.samples, self.task, self.agreement = model, list(samples), task, agreement
        self._tmp = tempfile.TemporaryDirectory(prefix="splitinfer-codecgate-")
        self._full = session(model.SerializeToString())
        self._reference = [self._full.run(None, dict(x)) for x in self.samples]
        self._parts: dict[str, tuple[Any, Any]] = {}
        self._acts: dict[tuple[str, int], dict[str, np.ndarray]] = {}  # (cut, sample) -> the head's outputs
        self._acts_cut: str | None = None  # the cut whose head outputs `_acts` holds (one cut at a time)
        self._splitter: Any = None  # made on the first cut: the model's shapes inferred once for every cut

    def close(self) -> None:
        """Remove the extracted parts."""
        self._tmp.cleanup()

    def _split(self, cut_id: str, cut: Sequence[str]) -> tuple[Any, Any]:
        from partitioning.extract import Splitter, session

        if cut_id not in self._parts:
            where = Path(self._tmp.name) / str(len(self._parts))
            if self._splitter is None:
                graph = self.model.graph
                self._splitter = Splitter(self.model, [*(i.name for i in graph.input), *(o.name for o in graph.output),
                                                       *cut])
            head, tail = self._splitter.split(cut, where / "head.onnx", where / "tail.onnx")
            self._parts[cut_id] = session(head), session(tail)
        return self._parts[cut_id]

    def check(self, cut_id: str, cut: Sequence[str], quantizer: str) -> dict:
        """The agreement of the model's outputs with `cut`'s tensors sent as `quantizer` ({metric, value,
        threshold, passed, samples}); a top-1 gate stops once it cannot pass (`quantize.gated_agreement`)."""

        def run(i: int) -> list:
            x = self.samples[i]
            if cut_id == CLOUD_ONLY:
                sent = {k: wc.round_trip(np.asarray(v), quantizer)[0] for k, v in x.items()}
                return list(self._full.run(None, _as_model_input(sent, x)))
            head, tail = self._split(cut_id, cut)
            if self._acts_cut != cut_id:  # the head's outputs serve every quantizer checked on this cut
                self._acts.clear()
                self._acts_cut = cut_id
            if (cut_id, i) not in self._acts:
                names = [o.name for o in head.get_outputs()]
                self._acts[(cut_id, i)] = dict(zip(names, head.run(None, dict(x))))
            acts = self._acts[(cut_id, i)]
            sent = {k: wc.round_trip(np.asarray(v), quantizer)[0] for k, v in acts.items()}
            return list(tail.run(None, _as_model_input(sent, acts)))

        try:
            return self.agreement(self._reference, run, self.task)
        except wc.WireError as exc:  # e.g. a check input whose cut tensor holds -inf: the codec cannot send it
            return {"metric": "wire", "value": float("nan"), "threshold": float("nan"), "passed": False,
                    "samples": 0, "error": str(exc)}


def _as_model_input(sent: Mapping[str, np.ndarray], original: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The decoded tensors in the dtypes the model reads (float32 for any float; integers as they were)."""
    return {k: v.astype(np.asarray(original[k]).dtype, copy=False) for k, v in sent.items()}


def gate_plan(plan: Plan, graph: CutGraph, costs: CostInputs, gate: CodecGate, rounds: int = 4
              ) -> tuple[Plan, CostInputs]:
    """Check the lossy codecs of the pairs a bundle exports, drop those that fail, choose again; repeat until the
    exported pairs all passed (at most `rounds` times). Returns the plan and the costs with the rejections."""
    if costs.codecs is None:
        return plan, costs
    checked: dict[tuple[str, str], dict] = {}
    denied = {cid: dict(v) for cid, v in costs.codecs.denied.items()}
    for _ in range(rounds):
        pairs = _exported_pairs(plan)
        todo = [(cid, q) for cid, q in pairs if q in wc.LOSSY and (cid, q) not in checked]
        if not todo:
            break
        failed = False
        for cid, quantizer in todo:
            verdict = checked[(cid, quantizer)] = gate.check(cid, plan.candidate(cid).cut, quantizer)
            if not verdict.get("passed"):
                failed = True
                why = (f"{quantizer} on this cut: {verdict['metric']} {verdict['value']:.4g} vs threshold "
                       f"{verdict['threshold']:g} on {verdict['samples']} samples"
                       + (f" (stopped after {verdict['stopped_after']} of {verdict['of']}: it could not pass)"
                          if "stopped_after" in verdict else "")
                       + (f": {verdict['error']}" if "error" in verdict else ""))
                for spec in costs.codecs.encode:
                    if spec.split("+", 1)[0] == quantizer:
                        denied.setdefault(cid, {})[spec] = why
        if not failed:
            break
        costs = replace(costs, codecs=replace(costs.codecs, denied=denied))
        plan = apply_measured(plan, graph, costs, {})
    return plan, costs


def _exported_pairs(plan: Plan) -> list[tuple[str, str]]:
    """(cut id, quantizer) of the chosen cut, each plan-table row and cloud-only (the bundle exports it) with the
    codec it is costed at (its other options are only ever used once this one fails the gate: then it is
    chosen again and that one checked; each full-model check is 8 runs of the whole model)."""
    pairs = [(plan.chosen, plan.best.codec)]
    pairs += list(zip((cid for _, cid in plan.plan_table), plan.table_codecs))
    if any(c.id == CLOUD_ONLY for c in plan.candidates):
        pairs.append((CLOUD_ONLY, plan.candidate(CLOUD_ONLY).codec))
    found = []
    for cid, spec in pairs:
        if cid != EDGE_ONLY and spec is not None:
            found.append((cid, spec.split("+", 1)[0]))
    return list(dict.fromkeys(found))
