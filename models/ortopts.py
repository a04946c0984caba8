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

Execution providers (`make_session(providers=..., provider_options=...)`): CPU always; CUDA and TensorRT come
with an onnxruntime-gpu build (on a Jetson, JetPack's wheel); OpenVINO either from the plugin package
`onnxruntime-ep-openvino`, registered here with `register_execution_provider_library` beside the stock
onnxruntime, or from the older `onnxruntime-openvino` build that replaces onnxruntime (never both). A provider
that is named but not usable is a `ProviderError`: one line naming what to install. TensorRT's engine cache is
on by default, in a private folder (`tensorrt_options`): building an engine takes minutes on a Jetson.
"""

from __future__ import annotations

import argparse
import os
import stat
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"
OPENVINO_EP = "OpenVINOExecutionProvider"
CPU = (CPU_EP,)

JETSON_WHEEL = ("on a Jetson: JetPack's onnxruntime-gpu wheel from NVIDIA (pip install onnxruntime-gpu --index-url "
                "https://pypi.jetson-ai-lab.io/jp6/cu126, not the public registry's), with JetPack's TensorRT")
# What to install for a provider this onnxruntime lacks (one line each).
INSTALL_HINTS = {
    OPENVINO_EP: 'pip install "splitinfer[openvino]" (the plugin package onnxruntime-ep-openvino, beside onnxruntime '
                 '>= 1.23; Intel CPUs/GPUs/NPUs)',
    TENSORRT_EP: f"{JETSON_WHEEL}; elsewhere pip install onnxruntime-gpu (it replaces onnxruntime) and TensorRT",
    CUDA_EP: f"{JETSON_WHEEL}; elsewhere pip install onnxruntime-gpu (it replaces onnxruntime)",
}
# Plugin execution-provider packages: provider name -> (module with get_library_path(), pip package).
PLUGIN_PACKAGES = {OPENVINO_EP: ("onnxruntime_ep_openvino", "onnxruntime-ep-openvino")}
# The device each plugin provider runs on unless its options say otherwise ("ov_device" of the OpenVINO EP).
PLUGIN_DEFAULT_DEVICE = {OPENVINO_EP: ("ov_device", "CPU")}
TRT_CACHE_DIR = "trt-cache"


class ProviderSpecError(argparse.ArgumentTypeError, ValueError):
    """A provider list or PROVIDER:KEY=VALUE option that cannot be parsed (argparse shows its message)."""


class ProviderError(RuntimeError):
    """An execution provider that was asked for cannot be used here; the message is one line saying what to install."""


_plugins: dict[str, list[Any]] = {}  # provider name -> its OrtEpDevices, once registered in this process
_plugins_lock = threading.Lock()


def _plugin_devices(ort: Any, name: str, device: str | None) -> list[Any]:
    """The OrtEpDevices of plugin provider `name` (registering its library once), on `device` when given."""
    module_name, package = PLUGIN_PACKAGES[name]
    with _plugins_lock:
        if name not in _plugins:
            if not hasattr(ort, "register_execution_provider_library"):
                raise ProviderError(f"{name} as a plugin needs onnxruntime >= 1.23 (this is {ort.__version__}): "
                                    f"pip install -U onnxruntime {package}")
            try:
                module = __import__(module_name)
            except ImportError:
                raise ProviderError(f"execution provider {name} is not available in this onnxruntime "
                                    f"{ort.__version__}: {INSTALL_HINTS[name]}") from None
            try:
                ort.register_execution_provider_library(name, module.get_library_path())
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
                raise ProviderError(f"{package} cannot be registered with onnxruntime {ort.__version__} "
                                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
            _plugins[name] = [d for d in ort.get_ep_devices() if d.ep_name == name]
        found = _plugins[name]
    key, _default = PLUGIN_DEFAULT_DEVICE.get(name, ("", ""))
    chosen = [d for d in found if device is None or d.ep_metadata.get(key, "") == device]
    if not chosen:
        have = sorted({d.ep_metadata.get(key, "?") for d in found})
        if found:
            raise ProviderError(f"{name} ({package}) has no {device} device here (it has {', '.join(have)})")
        raise ProviderError(f"{name} ({package}) found no device here: the plugin offers Intel CPUs, GPUs and NPUs "
                            "only (on another x86-64 CPU use the onnxruntime-openvino build, in an environment of "
                            "its own: it replaces onnxruntime)")
    return chosen


def check_providers(providers: Sequence[str]) -> None:
    """ProviderError (one line) for the first of `providers` this onnxruntime cannot run."""
    ort = require("onnxruntime", "edge")
    builtin = set(ort.get_available_providers())
    for name in providers:
        if name in builtin:
            continue
        if name in PLUGIN_PACKAGES:
            _plugin_devices(ort, name, None)
            continue
        hint = INSTALL_HINTS.get(name, "a build of onnxruntime that has it")
        raise ProviderError(f"execution provider {name} is not available in this onnxruntime {ort.__version__} "
                            f"(it has {', '.join(sorted(builtin))}): {hint}")


def option_strings(options: Mapping[str, Any]) -> dict[str, str]:
    """Provider options as onnxruntime takes them: strings, booleans "True"/"False"."""
    out = {}
    for key, value in options.items():
        if isinstance(value, bool):
            out[str(key)] = "True" if value else "False"
        elif isinstance(value, (int, float, str, os.PathLike)):
            out[str(key)] = str(value)
        else:
            raise ValueError(f"provider option {key!r}: expected a string, number or boolean, got {value!r}")
    return out


def private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) or accept it when it is a directory of this user that no one else can write.

    Engine caches hold code the runtime loads: a folder others can write to would let them swap it.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ProviderError(f"{path} is not a directory (a symlink or a file): cannot keep an engine cache there")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ProviderError(f"{path} belongs to uid {info.st_uid}, not this user ({os.getuid()}): "
                            "an engine cache must be this user's own folder")
    if info.st_mode & 0o022:
        raise ProviderError(f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):04o}): "
                            f"chmod go-w {path} (an engine cache holds code TensorRT loads)")
    return path


def tensorrt_options(options: Mapping[str, Any], state_dir: Path | None) -> dict[str, str]:
    """TensorRT provider options with the engine and timing caches on, in `state_dir`/trt-cache unless `options`
    say otherwise; the cache folder is created private (see `private_dir`)."""
    out = option_strings(options)
    if state_dir is not None:
        cache = str(Path(state_dir) / TRT_CACHE_DIR)
        out.setdefault("trt_engine_cache_enable", "True")
        out.setdefault("trt_engine_cache_path", cache)
        out.setdefault("trt_timing_cache_enable", "True")
        out.setdefault("trt_timing_cache_path", out["trt_engine_cache_path"])
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        enabled = out.get(key.replace("_path", "_enable"), "False").lower() in ("true", "1")
        if enabled and key in out:
            private_dir(Path(out[key]))
    return out


def resolve_provider_options(providers: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None,
                             state_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """Per provider of `providers`: its options as strings, TensorRT's with the cache defaults (`tensorrt_options`).

    Options for a provider that is not in `providers` are a ValueError (a typo would otherwise go unnoticed).
    """
    options = options or {}
    stray = sorted(set(options) - set(providers))
    if stray:
        raise ValueError(f"provider options for {stray}, which are not among the providers {list(providers)}")
    out = {}
    for name in providers:
        given = options.get(name, {})
        out[name] = tensorrt_options(given, state_dir) if name == TENSORRT_EP else option_strings(given)
    return out


def openvino_defaults(options: dict[str, str], intra_op_threads: int) -> dict[str, str]:
    """OpenVINO's options with its thread pool as big as the session's intra-op pool where unset (`num_of_threads`;
    0: OpenVINO's default, every core), so that a head on OpenVINO keeps to the agent's thread budget as one on the
    CPU provider does. (Measured on the 2-core host, interleaved with other sessions as the agent runs them: the
    tiny CNN's head takes ~5 ms on OpenVINO against 0.45 ms on the CPU provider whatever its thread and
    dynamic-shape settings - those moved it within the noise - so small heads are better off on the CPU provider.)"""
    if intra_op_threads > 0:
        options.setdefault("num_of_threads", str(intra_op_threads))
    return options


def cuda_defaults(options: dict[str, str]) -> dict[str, str]:
    """The CUDA provider's cuDNN convolution search set to HEURISTIC where unset. Its default, EXHAUSTIVE, times
    every algorithm of every convolution once per new input shape, and the cloud tier's dynamic batches give a new
    shape per batch size: measured on an H200 (benchmarks/batching.py --providers cuda, mobilenet_v2's tail), the
    in-process backend served 0.7-2.7 requests/s with ~2 s medians at 4 and 16 agents against 285-378 at 1 agent,
    most likely while each batch size was searched (not re-measured with this default yet). Set
    `cudnn_conv_algo_search` to EXHAUSTIVE (or DEFAULT) to choose otherwise."""
    options.setdefault("cudnn_conv_algo_search", "HEURISTIC")
    return options


ALIASES = {"cpu": CPU_EP, "cuda": CUDA_EP, "tensorrt": TENSORRT_EP, "trt": TENSORRT_EP, "openvino": OPENVINO_EP}


def parse_providers(text: str) -> tuple[str, ...]:
    """"OpenVINOExecutionProvider,CPUExecutionProvider" (or short: "openvino,cpu") -> the provider names."""
    names = tuple(ALIASES.get(p.strip().lower(), p.strip()) for p in str(text).split(",") if p.strip())
    if not names:
        raise ProviderSpecError(f"expected comma-separated execution provider names, got {text!r}")
    return names


def parse_provider_option(text: str) -> tuple[str, str, str]:
    """"TensorrtExecutionProvider:trt_fp16_enable=True" -> (provider, key, value); short provider names allowed."""
    provider, sep, rest = str(text).partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not provider.strip() or not key.strip():
        raise ProviderSpecError(f"expected PROVIDER:KEY=VALUE (e.g. TensorrtExecutionProvider:trt_fp16_enable=True), "
                         f"got {text!r}")
    return parse_providers(provider)[0], key.strip(), value.strip()


def provider_options_from(items: Sequence[tuple[str, str, str]]) -> dict[str, dict[str, str]]:
    """Parsed PROVIDER:KEY=VALUE items grouped by provider."""
    out: dict[str, dict[str, str]] = {}
    for provider, key, value in items:
        out.setdefault(provider, {})[key] = value
    return out


def make_session(model: str | Path | bytes, *, threads: int | None = 1, inter_threads: int | None = 1,
                 providers: Sequence[str] | None = None, options: onnxruntime.SessionOptions | None = None,
                 log_severity: int = 3, provider_options: Mapping[str, Mapping[str, Any]] | None = None,
                 ) -> onnxruntime.InferenceSession:
    """An onnxruntime session of `model` (a path or the model's bytes): the one place sessions are made.

    `options` (e.g. with profiling on) replaces the project's settings built from `threads`, `inter_threads`
    and `log_severity`; `providers` (in order of preference) defaults to the CPU execution provider, and every
    one named must be usable here (else ProviderError); `provider_options` maps a provider to its options
    (`resolve_provider_options` adds TensorRT's cache defaults). A plugin provider (OpenVINO from
    onnxruntime-ep-openvino) is added to the session options for its device (a caller's `options` is changed by
    that: pass a new one per session); the CPU provider backs it.
    """
    ort = require("onnxruntime", "edge")
    if options is None:
        options = session_options(threads, inter_threads, log_severity=log_severity)
    source = model if isinstance(model, bytes) else str(model)
    names = list(providers or CPU)
    check_providers(names)
    per = {name: option_strings((provider_options or {}).get(name, {})) for name in names}
    if OPENVINO_EP in per:
        openvino_defaults(per[OPENVINO_EP], options.intra_op_num_threads)
    if CUDA_EP in per:
        cuda_defaults(per[CUDA_EP])
    builtin = set(ort.get_available_providers())
    plugins = [n for n in names if n not in builtin]
    if not plugins:
        return ort.InferenceSession(source, options, providers=names, provider_options=[per[n] for n in names])
    others = [n for n in names if n in builtin and n != CPU_EP]
    if others:
        raise ProviderError(f"plugin providers {plugins} cannot be combined with {others} in one session: "
                            "name one accelerator and CPUExecutionProvider")
    for name in plugins:
        key, default = PLUGIN_DEFAULT_DEVICE.get(name, ("", ""))
        wanted = per[name].pop("device_type", default) if key else None
        options.add_provider_for_devices(_plugin_devices(ort, name, wanted), per[name])
    return ort.InferenceSession(source, options)
