"""One way to validate config, options and payloads (here in `models`, the bottom layer, so every package can
use it): a frozen dataclass checks its fields in `__post_init__` with these checkers, each of which returns the
normalised value or raises one error type that names the key and says what was expected (and what came).

    @dataclass(frozen=True)
    class Thing:
        count: int = 1

        def __post_init__(self) -> None:
            object.__setattr__(self, "count", check_int("count", self.count, 1, 100, error=ThingError))

`FieldError` is the base; each contract subclasses it for its wording (`ConfigError`: "key 'x': ...",
`MqttSchemaError`: "field 'x': ..."), so callers catch their own and anyone may catch `FieldError`.
The tensor codec keeps `TensorError`: it carries the gRPC status the server answers with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["FieldError", "check_bool", "check_choice", "check_int", "check_number", "check_text"]

_SHOWN = 80  # characters of a rejected value quoted in a message (a 4 MB field is not echoed back)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text)} characters)"


class FieldError(ValueError):
    """A value that does not fit its field: `key` names the field (None: the whole input), `detail` what was wrong."""

    label = "key"  # how the message names the field: "key 'x': ..."

    def __init__(self, key: str | None, detail: str):
        self.key = key
        self.detail = detail
        super().__init__(f"{self.label} {key!r}: {detail}" if key else detail)


def check_int(
    key: str, value: Any, lo: int | None = None, hi: int | None = None, *, error: type[FieldError] = FieldError
) -> int:
    """An integer (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(key, f"expected an integer, got {_show(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise error(key, f"expected an integer {f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'}, got {value}")
    return value


def check_number(
    key: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    error: type[FieldError] = FieldError,
) -> float:
    """A number (not a bool, not NaN) >= lo (> lo with `lo_open`) and <= hi, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(key, f"expected a number, got {_show(value)}")
    value = float(value)
    op = ">" if lo_open else ">="
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    if too_low or (hi is not None and value > hi) or math.isnan(value):
        raise error(key, f"expected a number {op} {lo}{'' if hi is None else f' and <= {hi}'}, got {value}")
    return value


def check_text(
    key: str,
    value: Any,
    *,
    max_len: int | None = None,
    allow_empty: bool = True,
    error: type[FieldError] = FieldError,
) -> str:
    """A string, non-empty unless `allow_empty`, of at most `max_len` characters."""
    if not isinstance(value, str):
        raise error(key, f"expected a string, got {_show(value)}")
    if not value and not allow_empty:
        raise error(key, "expected a non-empty string")
    if max_len is not None and len(value) > max_len:
        raise error(key, f"expected at most {max_len} characters, got {len(value)}")
    return value


def check_choice(key: str, value: Any, choices: Sequence[str], *, error: type[FieldError] = FieldError) -> str:
    """One of `choices`."""
    if value not in choices:
        raise error(key, f"expected one of {list(choices)}, got {_show(value)}")
    return value


def check_bool(key: str, value: Any, *, error: type[FieldError] = FieldError) -> bool:
    """true or false (not 0 or 1)."""
    if not isinstance(value, bool):
        raise error(key, f"expected true or false, got {_show(value)}")
    return value
