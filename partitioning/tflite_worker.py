"""ONNX head -> head.tflite (fp32) and head.int8.tflite (full integer), run INSIDE the converter environment.

This file is executed by the converter venv's Python (3.12+, onnx2tf with its flatbuffer_direct backend, which needs
no TensorFlow), never imported by the project: it imports only what that environment has (onnx2tf, ai-edge-litert,
onnxruntime, numpy). `partitioning/tflite.py` drives it: `python tflite_worker.py JOBS.json` prints one line per job.

After onnx2tf, the two .tflite files are made self-describing, so the edge needs nothing but the runtime:
- every input and output tensor is renamed to its ONNX name;
- where onnx2tf turned a 3-5-D tensor channel-last (NCHW -> NHWC), a TRANSPOSE inside the model turns it back
  (prepended for an input, appended for an output), so the model's ends keep the ONNX layout the tail expects.
Which tflite tensor is which ONNX tensor, and in which layout, is decided numerically: the fp32 .tflite and the ONNX
head run on the same sample and every output is matched to the ONNX output (and permutation) it equals.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

TRANSPOSE = 39  # tflite BuiltinOperator.TRANSPOSE


def _channel_last(rank: int) -> tuple[int, ...]:
    """The permutation onnx2tf applies: NCHW -> NHWC (N, C, *S) -> (N, *S, C)."""
    return (0, *range(2, rank), 1)


def _candidates(onnx_shape: tuple[int, ...], tfl_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Permutations p with onnx.transpose(p) shaped like the tflite tensor (identity first)."""
    out = []
    for perm in (tuple(range(len(onnx_shape))), _channel_last(len(onnx_shape))):
        if len(perm) == len(tfl_shape) and tuple(onnx_shape[i] for i in perm) == tfl_shape and perm not in out:
            out.append(perm)
    return out


def _interpreter(path: Path) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    return interp


def _run_tflite(path: Path, feeds: list[np.ndarray]) -> list[np.ndarray]:
    interp = _interpreter(path)
    for detail, x in zip(interp.get_input_details(), feeds):
        interp.set_tensor(detail["index"], x.astype(detail["dtype"]))
    interp.invoke()
    return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]


def _match(onnx_path: Path, fp32: Path, sample: dict[str, np.ndarray]) -> dict[str, Any]:
    """Which tflite input/output is which ONNX tensor, and the permutation onnx -> tflite layout of each."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_in = [(i.name, sample[i.name]) for i in sess.get_inputs()]
    onnx_out_names = [o.name for o in sess.get_outputs()]
    reference = dict(zip(onnx_out_names, sess.run(None, dict(onnx_in))))
    details = _interpreter(fp32).get_input_details()
    if len(details) != len(onnx_in):
        raise RuntimeError(f"the tflite head has {len(details)} inputs, the ONNX head {len(onnx_in)}")
    # Inputs: by position (onnx2tf keeps their order); the layout by shape, trying each possibility on ambiguity.
    options = [_candidates(x.shape, tuple(int(v) for v in d["shape"])) for (_, x), d in zip(onnx_in, details)]
    if any(not o for o in options):
        raise RuntimeError("a tflite input's shape is no layout of the ONNX input's: "
                           f"{[tuple(d['shape']) for d in details]} vs {[x.shape for _, x in onnx_in]}")
    best: tuple[float, list[tuple[int, ...]], dict[str, tuple[int, tuple[int, ...]]]] | None = None
    for choice in _product(options):
        got = _run_tflite(fp32, [x.transpose(p) for (_, x), p in zip(onnx_in, choice)])
        err, outs = _assign(reference, got)
        if best is None or err < best[0]:
            best = (err, choice, outs)
    assert best is not None
    err, in_perms, out_map = best
    return {"inputs": [{"onnx": n, "perm": list(p)} for (n, _), p in zip(onnx_in, in_perms)],
            "outputs": [{"onnx": n, "index": out_map[n][0], "perm": list(out_map[n][1])} for n in onnx_out_names],
            "fp32_match_error": err}


def _product(options: list[list[tuple[int, ...]]]) -> list[list[tuple[int, ...]]]:
    combos: list[list[tuple[int, ...]]] = [[]]
    for opts in options:
        combos = [c + [o] for c in combos for o in opts]
    return combos


def _assign(reference: dict[str, np.ndarray], got: list[np.ndarray]) -> tuple[float, dict[str, Any]]:
    """Each ONNX output's closest tflite output (index, perm) and the worst error among them."""
    worst, out = 0.0, {}
    used: set[int] = set()
    for name, ref in reference.items():
        best: tuple[float, int, tuple[int, ...]] | None = None
        for j, arr in enumerate(got):
            if j in used:
                continue
            for perm in _candidates(ref.shape, arr.shape):
                err = float(np.max(np.abs(ref.transpose(perm).astype(np.float32) - arr))) if ref.size else 0.0
                if best is None or err < best[0]:
                    best = (err, j, perm)
        if best is None:
            raise RuntimeError(f"no tflite output has the shape of ONNX output {name!r} {ref.shape} in any layout "
                               f"(tflite outputs: {[a.shape for a in got]})")
        used.add(best[1])
        out[name] = (best[1], best[2])
        worst = max(worst, best[0])
    return worst, out


def _inverse(perm: list[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


def _rewrite(path: Path, mapping: dict[str, Any]) -> None:
    """Rename the model's ends to the ONNX names and transpose them back to the ONNX layout, in place."""
    from ai_edge_litert import schema_py_generated as fb
    from flatbuffers import Builder

    model = fb.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)
    graph = model.subgraphs[0]

    def opcode() -> int:
        for i, code in enumerate(model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == TRANSPOSE:
                return i
        code = fb.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = TRANSPOSE
        code.version = 2
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def new_tensor(like: Any, shape: list[int], name: str) -> int:
        t = fb.TensorT()
        t.shape, t.type, t.name, t.buffer = list(shape), like.type, name.encode(), 0
        t.quantization = like.quantization
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def const_perm(perm: list[int]) -> int:
        buf = fb.BufferT()
        buf.data = np.asarray(perm, dtype=np.int32).tobytes()
        model.buffers.append(buf)
        t = fb.TensorT()
        t.shape, t.type, t.buffer = [len(perm)], fb.TensorType.INT32, len(model.buffers) - 1
        t.name = f"splitinfer_perm_{len(graph.tensors)}".encode()
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def transpose_op(src: int, dst: int, perm: list[int]) -> Any:
        op = fb.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = opcode(), [src, const_perm(perm)], [dst]
        op.builtinOptionsType = fb.BuiltinOptions.TransposeOptions
        op.builtinOptions = fb.TransposeOptionsT()
        return op

    for k, spec in enumerate(mapping["inputs"]):
        idx, perm = graph.inputs[k], spec["perm"]
        if perm != sorted(perm):
            t = graph.tensors[idx]
            onnx_shape = [int(t.shape[i]) for i in _inverse(perm)]
            new = new_tensor(t, onnx_shape, spec["onnx"])
            graph.operators.insert(0, transpose_op(new, idx, perm))
            graph.inputs[k] = new
        else:
            graph.tensors[idx].name = spec["onnx"].encode()
    old_outputs = list(graph.outputs)
    new_outputs = []
    for spec in mapping["outputs"]:
        idx, perm = old_outputs[spec["index"]], spec["perm"]
        if perm != sorted(perm):
            t = graph.tensors[idx]
            inv = _inverse(perm)
            new = new_tensor(t, [int(t.shape[i]) for i in inv], spec["onnx"])
            graph.operators.append(transpose_op(idx, new, inv))
            new_outputs.append(new)
        else:
            graph.tensors[idx].name = spec["onnx"].encode()
            new_outputs.append(idx)
    graph.outputs = new_outputs
    for sig in model.signatureDefs or []:  # keep the signature consistent with the graph's ends
        sig.inputs = _sig(fb, graph, graph.inputs)
        sig.outputs = _sig(fb, graph, graph.outputs)
    builder = Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def _sig(fb: Any, graph: Any, indices: list[int]) -> list[Any]:
    out = []
    for idx in indices:
        m = fb.TensorMapT()
        m.name, m.tensorIndex = graph.tensors[idx].name, idx
        out.append(m)
    return out


def _batch_one(src: Path, dst: Path) -> Path:
    """`src` with the batch dimension of its inputs and outputs fixed at 1 (what the device runs): with a dynamic
    batch, onnx2tf computes padding shapes at run time (SHAPE, FILL), which full-integer quantization refuses."""
    import onnx

    model = onnx.load(str(src))
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    del model.graph.value_info[:]  # inferred again from the fixed ends
    onnx.save(model, str(dst))
    return dst


def convert(job: dict[str, Any]) -> dict[str, Any]:
    """Run the job (paths: onnx, calibration .npz, work dir, fp32 and int8 outputs); return the report."""
    import onnx2tf

    work = Path(job["work"])
    calib = dict(np.load(job["calibration"]))
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = _batch_one(Path(job["onnx"]), work / "head.onnx")
    names = list(calib)
    cind: list[list[Any]] = []
    for name, data in calib.items():
        npy = work / f"calib_{len(cind)}.npy"
        np.save(npy, data.astype(np.float32))
        cind.append([name, str(npy), np.zeros(1, np.float32), np.ones(1, np.float32)])
    _skip_int16_variants()
    _bias_axis_zero()
    # Per-channel int8 weights, else (should onnx2tf refuse that for a graph) per tensor.
    for quant_type in ("per-channel", "per-tensor"):
        try:
            onnx2tf.convert(
                input_onnx_file_path=str(onnx_path), output_folder_path=str(work / quant_type),
                tflite_backend="flatbuffer_direct", output_integer_quantized_tflite=True,
                custom_input_op_name_np_data_path=cind, quant_type=quant_type,
                keep_ncw_or_nchw_or_ncdhw_input_names=names, non_verbose=True,
            )
            break
        except RuntimeError as exc:
            if _written(work / quant_type):  # a later variant (not ours) failed; ours are checked below
                break
            if quant_type == "per-tensor":
                raise
            print(f"splitinfer: per-channel quantization failed ({_causes(exc).strip()[-300:]}); trying per-tensor",
                  file=sys.stderr)
    made = sorted((work / quant_type).glob("*.tflite"))
    fp32 = next((p for p in made if p.name.endswith("_float32.tflite")), None)
    int8 = next((p for p in made if p.name.endswith("_full_integer_quant.tflite")), None)
    if fp32 is None or int8 is None:
        raise RuntimeError(f"onnx2tf wrote {[p.name for p in made]}, without a float32 and a full_integer_quant model")
    sample = {n: a[:1].astype(np.float32) for n, a in calib.items()}
    mapping = _match(onnx_path, fp32, sample)
    for src, dst in ((fp32, Path(job["fp32"])), (int8, Path(job["int8"]))):
        _rewrite(src, mapping)
        dst.write_bytes(src.read_bytes())
    return {"mapping": mapping, "quant_type": quant_type, "onnx2tf": getattr(onnx2tf, "__version__", "?")}


def _written(folder: Path) -> bool:
    names = [p.name for p in folder.glob("*.tflite")]
    return any(n.endswith("_float32.tflite") for n in names) and any(n.endswith("_full_integer_quant.tflite")
                                                                      for n in names)


def _skip_int16_variants() -> None:
    """onnx2tf also writes int16-activation variants, which nothing here uses and which its own validation refuses
    for depthwise convolutions (an int32 bias where int64 is due): report them as skipped, the way onnx2tf skips
    them for graphs it cannot quantize so."""
    import onnx2tf.tflite_builder as builder

    if hasattr(builder, "strict_int16_activation_skip_reasons"):
        builder.strict_int16_activation_skip_reasons = lambda model_ir: ["not needed by splitinfer"]


def _bias_axis_zero() -> None:
    """onnx2tf 2.6.9 gives a per-channel bias the quantized dimension of its weights (3 for a depthwise convolution's
    [1, H, W, C] filter), which LiteRT refuses for the 1-D bias: its channels are axis 0."""
    from onnx2tf.tflite_builder import quantization as q

    original = getattr(q, "_quantize_bias_tensor", None)
    if original is None or getattr(original, "splitinfer", False):
        return

    def quantize_bias(**kwargs: Any) -> Any:
        result = original(**kwargs)
        tensor = kwargs["tensor"]
        if getattr(tensor, "quantization", None) is not None and np.ndim(tensor.data) == 1:
            tensor.quantization.quantized_dimension = 0
        return result

    quantize_bias.splitinfer = True  # type: ignore[attr-defined]
    q._quantize_bias_tensor = quantize_bias


def _causes(exc: BaseException | None) -> str:
    """The messages of `exc` and of every exception it came from."""
    text = ""
    while exc is not None:
        text += f" {exc}"
        exc = exc.__cause__ or exc.__context__
    return text


def main() -> int:
    """Run every job of the file (one process for all: importing onnx2tf costs more than converting a head);
    print `SPLITINFER_REPORT <i> <json>` or `SPLITINFER_ERROR <i> <one line>` for job i."""
    jobs = json.loads(Path(sys.argv[1]).read_text())["jobs"]
    for i, job in enumerate(jobs):
        try:
            report = convert(job)
        except Exception as exc:  # noqa: BLE001 - one head's failure is reported; the others still convert
            import traceback

            traceback.print_exc()
            print(f"SPLITINFER_ERROR {i} " + " ".join(f"{type(exc).__name__}: {_causes(exc).strip()}".split())[-500:],
                  flush=True)
            continue
        print(f"SPLITINFER_REPORT {i} " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
