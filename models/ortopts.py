"""The onnxruntime session settings every part of splitinfer uses (profiler, agent heads, cloud tails), and
`make_session`, the one place an InferenceSession is made.

One place, so that what the planner measures is what the agent and the cloud run:
- graph optimizations ORT_ENABLE_ALL, sequential execution;
- `intra_op_threads` (None: onnxruntime's default, one per core);
- spinning off whenever a session has a thread pool. A process holds several sessions (the heads of the plan
  table's cuts and the local tails on a device, the tails of every bundle in the cloud, the candidates while
  profiling), and an idle pool that spins keeps the cores from the next session to run: measured on a 2-core
  host, a resnet18 run right after another 2-thread session's run took 2-3x its time alone (vit_tiny 6.9 ms
  instead of 2.4 ms). Without spinning a pool run costs 5-25% more alone and the same after a switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from models.extras import require

if TYPE_CHECKING:
    import onnxruntime


def session_options(intra_op_threads: int | None = 1, inter_op_threads: int | None = 1,
                    *, log_severity: int = 3) -> onnxruntime.SessionOptions:
    """SessionOptions with the project's settings (see the module docstring)."""
    ort = require("onnxruntime", "edge")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = log_severity  # 3: warnings about unused initializers etc. are noise
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    if intra_op_threads != 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


CPU = ("CPUExecutionProvider",)


def make_session(model: str | Path | bytes, *, threads: int | None = 1, inter_threads: int | None = 1,
                 providers: Sequence[str] | None = None, options: onnxruntime.SessionOptions | None = None,
                 log_severity: int = 3) -> onnxruntime.InferenceSession:
    """An onnxruntime session of `model` (a path or the model's bytes): the one place sessions are made.

    `options` (e.g. with profiling on) replaces the project's settings built from `threads`, `inter_threads`
    and `log_severity`; `providers` defaults to the CPU execution provider.
    """
    ort = require("onnxruntime", "edge")
    if options is None:
        options = session_options(threads, inter_threads, log_severity=log_severity)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=list(providers or CPU))
