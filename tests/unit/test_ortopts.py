"""models.ortopts: one set of onnxruntime session settings for the profiler, the agent and the cloud."""

from __future__ import annotations

import pytest

from models.ortopts import session_options

ort = pytest.importorskip("onnxruntime")
SPIN = "session.intra_op.allow_spinning"


def _spin(opts) -> str | None:
    try:
        return opts.get_session_config_entry(SPIN)
    except RuntimeError:  # onnxruntime raises for an entry that was never set
        return None


def test_single_threaded_sessions_keep_the_defaults() -> None:
    opts = session_options(1, 1)
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert _spin(opts) in (None, "1")  # no pool threads: nothing spins


@pytest.mark.parametrize("threads", [2, 0, None])
def test_sessions_with_a_thread_pool_do_not_spin(threads) -> None:
    opts = session_options(threads, None)
    assert _spin(opts) == "0"
    if threads is not None:
        assert opts.intra_op_num_threads == threads


def test_the_profiler_uses_them() -> None:
    from partitioning.costs import session_options as profiler_options

    assert _spin(profiler_options(2)) == "0"


def test_cuda_searches_convolutions_heuristically_unless_told_otherwise() -> None:
    from models.ortopts import cuda_defaults

    # EXHAUSTIVE (onnxruntime's default) re-times every convolution for each new batch size the batcher forms.
    assert cuda_defaults({}) == {"cudnn_conv_algo_search": "HEURISTIC"}
    given = {"cudnn_conv_algo_search": "EXHAUSTIVE", "device_id": "1"}
    assert cuda_defaults(dict(given)) == given
