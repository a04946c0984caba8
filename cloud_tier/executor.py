"""Tail executors: one onnxruntime session per tail file, found in the bundles of a directory."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.detect import apply_postprocess
from models.extras import require
from models.manifest import CLOUD_ONLY, PLAN_FILE, Bundle, BundleError, Postprocess, TensorSpec
from models.ortopts import ProviderError, make_session

log = logging.getLogger(__name__)


def select_providers(prefer_gpu: bool = True) -> list[str]:
    """onnxruntime execution providers in order: CUDA first when present and wanted, CPU always."""
    ort = require("onnxruntime", "edge")
    available = ort.get_available_providers()
    chosen = ["CUDAExecutionProvider"] if prefer_gpu and "CUDAExecutionProvider" in available else []
    return chosen + ["CPUExecutionProvider"]


class TailExecutor:
    """Runs one tail model; thread-safe (onnxruntime sessions allow concurrent `run`).

    `providers` (in order of preference, with `provider_options` per provider, see models/ortopts.py) replace
    the automatic choice of `select_providers(prefer_gpu)`; one that is not usable here is a ProviderError.
    """

    def __init__(self, path: Path, *, intra_op_threads: int = 1, prefer_gpu: bool = True,
                 providers: Sequence[str] | None = None,
                 provider_options: Mapping[str, Mapping[str, str]] | None = None, load: bool = True):
        """`load=False`: the tail runs elsewhere (Ray Serve replicas load `path`): no session here, `run` refuses."""
        self.path = path
        if not load:
            self.session: Any = None
            self.input_names = self.output_names = self.providers = ()
            return
        try:
            self.session = make_session(path, threads=intra_op_threads,
                                        providers=list(providers or select_providers(prefer_gpu)),
                                        provider_options=provider_options)
        except ProviderError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types for bad model files
            raise BundleError(f"{path}: onnxruntime cannot load this tail ({exc})") from exc
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.providers = tuple(self.session.get_providers())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the tail on `feeds` (input name -> array); returns output name -> array."""
        if self.session is None:
            raise RuntimeError(f"{self.path}: this tail runs on Ray Serve, not in this process")
        outs = self.session.run(list(self.output_names), dict(feeds))
        return dict(zip(self.output_names, outs))


@dataclass(frozen=True)
class ServedTail:
    """One (model hash, cut) the cloud serves: what it accepts and the executor that runs it.

    `model` is the bundle's model name (for messages); `label` names it in metrics and logs: the name, or
    "name@<first 8 hex digits of the hash>" when bundles of different models share that name.
    """

    model: str
    cut: str
    inputs: tuple[TensorSpec, ...]
    executor: TailExecutor
    model_sha256: str = ""
    label: str = ""
    postprocess: Postprocess | None = None  # the bundle's decoding after the tail (a detector's boxes)

    @property
    def key(self) -> tuple[str, str]:
        """(model hash, cut): what names this tail on the wire."""
        return (self.model_sha256, self.cut)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tail's outputs for `feeds`, plus the decoded ones when the bundle declares a postprocess."""
        return apply_postprocess(self.executor.run(feeds), self.postprocess)


class TailLookupError(LookupError):
    """A request names no served tail; `status` is the grpc.StatusCode name to answer with."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


SHORT_HASH = 8  # hex digits of a model hash shown in labels


class ModelRegistry:
    """Every tail of every bundle under a directory, by (model hash, cut).

    Bundles are told apart by their model's hash (plan.json model.onnx_sha256), not by name: one cloud serves the
    same model profiled for several devices (their cuts add up; a cut both have is served once) and different
    models that share a name. Identical tail files (same sha256) are loaded once, whichever bundles hold them.
    """

    def __init__(self, tails: Mapping[tuple[str, str], ServedTail]):
        self._tails = dict(tails)
        self._hashes: dict[str, set[str]] = {}  # model name -> the model hashes served under it
        for t in self._tails.values():
            self._hashes.setdefault(t.model, set()).add(t.model_sha256)

    @classmethod
    def load(cls, bundles_dir: str | Path, *, intra_op_threads: int = 1, prefer_gpu: bool = True,
             providers: Sequence[str] | None = None,
             provider_options: Mapping[str, Mapping[str, str]] | None = None,
             load_sessions: bool = True) -> ModelRegistry:
        """Load each subdirectory of `bundles_dir` holding a plan.json; BundleError on any bad bundle, ProviderError
        when a provider of `providers` is not usable (see TailExecutor). `load_sessions=False` (the tails run on
        Ray Serve): the bundles' metadata and tail files only, no onnxruntime session in this process (the
        replicas check the tails' inputs)."""
        root = Path(bundles_dir)
        if not root.is_dir():
            raise BundleError(f"{root}: not a directory of bundles")
        dirs = sorted(p for p in root.iterdir() if (p / PLAN_FILE).is_file())
        if (root / PLAN_FILE).is_file():
            dirs.insert(0, root)  # a single bundle given directly
        if not dirs:
            raise BundleError(f"{root}: no bundles (subdirectories with {PLAN_FILE}); make one with split-profile")
        sessions: dict[str, TailExecutor] = {}  # by the tail file's sha256: identical tails are loaded once
        tails: dict[tuple[str, str], ServedTail] = {}
        owners: dict[tuple[str, str], Path] = {}
        names: dict[str, set[str]] = {}
        for bdir in dirs:
            bundle = Bundle.load(bdir)
            name, sha = bundle.model_name, bundle.model_sha256
            names.setdefault(name, set()).add(sha)
            added = []
            for cut_id in bundle.cut_ids:
                cut = bundle.cut(cut_id)
                files = bundle.artifacts.cuts[cut_id]
                if cut.tail is not None and files.tail is not None:
                    path, digest = cut.tail, files.tail.sha256
                elif cut_id == CLOUD_ONLY:
                    path, digest = bundle.full, bundle.artifacts.full.sha256
                else:
                    continue  # edge-only: nothing runs in the cloud
                want = sorted(t.name for t in cut.tensors)
                if (sha, cut_id) in tails:  # the same model profiled again (another device): one tail per cut
                    known = tails[(sha, cut_id)]
                    if sorted(s.name for s in known.inputs) != want:
                        raise BundleError(f"{bdir}: cut {cut_id!r} of model {name!r} ({sha[:12]}) takes {want}, but "
                                          f"{owners[(sha, cut_id)]} serves it taking "
                                          f"{sorted(s.name for s in known.inputs)}")
                    continue
                if digest not in sessions:
                    sessions[digest] = TailExecutor(path, intra_op_threads=intra_op_threads, prefer_gpu=prefer_gpu,
                                                    providers=providers, provider_options=provider_options,
                                                    load=load_sessions)
                executor = sessions[digest]
                if load_sessions and sorted(executor.input_names) != want:
                    raise BundleError(
                        f"{path}: tail inputs {sorted(executor.input_names)} do not match cut {cut_id!r} tensors {want}"
                    )
                tails[(sha, cut_id)] = ServedTail(name, cut_id, cut.tensors, executor, sha,
                                                  postprocess=bundle.postprocess)
                owners[(sha, cut_id)] = bdir
                added.append(cut_id)
            log.info("serving %s (model %s) from %s: cuts %s", name, sha[:12], bdir, added)
        labelled = {k: dataclasses.replace(t, label=t.model if len(names[t.model]) == 1
                                           else f"{t.model}@{t.model_sha256[:SHORT_HASH]}")
                    for k, t in tails.items()}
        log.info("%d tails served by %d onnxruntime sessions", len(labelled), len(sessions))
        return cls(labelled)

    def lookup(self, model: str, cut: str, model_sha256: str = "") -> ServedTail:
        """The tail a request names: by (model hash, cut) when it gives the hash, else by (model name, cut) when
        one model of that name is served. TailLookupError (NOT_FOUND, or INVALID_ARGUMENT for an ambiguous
        name) says what is served instead."""
        if model_sha256:
            tail = self._tails.get((model_sha256, cut))
            if tail is not None:
                return tail
            cuts = sorted(c for (h, c) in self._tails if h == model_sha256)
            if cuts:
                raise TailLookupError("NOT_FOUND", f"model {model!r} ({model_sha256[:12]}) has no served cut {cut!r}; "
                                                   f"served cuts: {cuts}")
            raise TailLookupError("NOT_FOUND", f"model {model!r} with model_sha256 {model_sha256[:12]}... is not "
                                               f"served; served models: {self._models()}")
        hashes = self._hashes.get(model)
        if not hashes:
            raise TailLookupError("NOT_FOUND", f"model {model!r} is not served; served models: "
                                               f"{sorted(self._hashes)}")
        if len(hashes) > 1:
            raise TailLookupError("INVALID_ARGUMENT", f"model {model!r} is served by {len(hashes)} different models "
                                                      f"(model_sha256 {sorted(hashes)}): the request must say which "
                                                      "by model_sha256")
        (sha,) = hashes
        tail = self._tails.get((sha, cut))
        if tail is None:
            cuts = sorted(c for (h, c) in self._tails if h == sha)
            raise TailLookupError("NOT_FOUND", f"model {model!r} has no served cut {cut!r}; served cuts: {cuts}")
        return tail

    def get(self, model: str, cut: str, model_sha256: str = "") -> ServedTail | None:
        """The served tail a request names (see `lookup`), or None."""
        try:
            return self.lookup(model, cut, model_sha256)
        except TailLookupError:
            return None

    def _models(self) -> list[str]:
        return sorted({f"{t.model} ({t.model_sha256[:12]})" for t in self._tails.values()})

    def served(self) -> list[ServedTail]:
        """Every served tail, sorted by (model name, model hash, cut)."""
        return sorted(self._tails.values(), key=lambda t: (t.model, t.model_sha256, t.cut))
