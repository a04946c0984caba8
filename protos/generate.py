"""Regenerate (or check) the committed `_pb2` / `_pb2_grpc` / `.pyi` modules beside the `.proto` sources
(every `protos/*.proto`: inference.proto, the edge <-> cloud contract, and local.proto, the agent's local API).

    python -m protos.generate           # rewrite the generated files
    python -m protos.generate --check   # exit 1 and name the stale files if they differ

The proto path equals the import path: protoc runs with the repository root as include path, so
`protos/inference.proto` becomes the module `protos.inference_pb2`. The generated grpc module refuses to
import under a grpcio older than the grpcio-tools that made it (GRPC_GENERATED_VERSION), and the pb2 module
refuses a protobuf runtime older than its gencode: both set the floors in pyproject.toml.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class ProtocError(RuntimeError):
    """protoc (grpc_tools) failed or is not installed."""


def generated_paths(proto: str) -> list[str]:
    """Repository-relative paths of the files generated from `proto`."""
    stem = proto[: -len(".proto")]
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def proto_files(root: Path = REPO_ROOT) -> list[str]:
    """Every `.proto` under `root`/protos (repository-relative, sorted): each one is generated and checked."""
    return sorted(p.relative_to(root).as_posix() for p in (root / "protos").glob("*.proto"))


def generate(out_dir: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every proto under `root`, writing the generated modules under `out_dir`; return them."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise ProtocError('grpcio-tools is needed to generate protos: pip install "splitinfer[dev]"') from exc
    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = proto_files(root)
    for proto in protos:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}",
            str(root / proto),
        ]
        if protoc.main(args) != 0:
            raise ProtocError(f"protoc failed on {proto} (see its messages above)")
    return [out_dir / p for proto in protos for p in generated_paths(proto)]


def stale_files(root: Path = REPO_ROOT) -> list[str]:
    """Generated files under `root` that are missing or differ from a fresh generation."""
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), root)
        for proto in proto_files(root):
            for rel in generated_paths(proto):
                fresh, committed = Path(tmp) / rel, root / rel
                if not committed.is_file() or committed.read_bytes() != fresh.read_bytes():
                    stale.append(rel)
    return stale


def main(argv: list[str] | None = None) -> int:
    """CLI entry: regenerate, or with --check report stale files and return 1."""
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; fail if the committed files are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated protos: {', '.join(stale)}; run `python -m protos.generate`", file=sys.stderr)
            return 1
        print("generated protos are current")
        return 0
    for path in generate(REPO_ROOT):
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
