"""Optional-dependency imports that fail with the pip line that fixes them."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_LINES = {
    "edge": 'pip install "splitinfer[edge]"',
    "profile": 'pip install torch==2.13.0 && pip install "splitinfer[profile]"',
    "cloud": 'pip install "splitinfer[cloud]"',
    "dev": 'pip install torch==2.13.0 && pip install "splitinfer[dev]"',
}


class MissingExtraError(ImportError):
    """A module from an optional extra is not installed."""


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError naming the extra's install line."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module} is needed here but is not installed; it comes with the [{extra}] extra: "
            f"{INSTALL_LINES[extra]}"
        ) from exc
