"""Synthetic model inputs: the one maker of seeded random arrays for profiling, calibration and checks.

Floats are standard normal; integers are uniform in [0, 10) or a caller's bound (token ids, indices), or
all zeros where a caller wants inert values; bools are uniform over {False, True}. A caller passes its own
numpy Generator so that a sequence of arrays comes from one seeded stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.manifest import TensorSpec

INT_HIGH = 10  # integers are drawn from [0, INT_HIGH)


def random_array(rng: np.random.Generator, shape: Sequence[int], dtype: Any, *, zero_integers: bool = False,
                 int_high: int = INT_HIGH) -> np.ndarray:
    """One array of `shape` and `dtype` from `rng`: floats ~ N(0, 1), integers in [0, int_high) (or 0), bools 0/1."""
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if zero_integers:
        return np.zeros(shape, dtype=dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, max(int(int_high), 1), shape).astype(dtype)


def synthetic_samples(inputs: Sequence[TensorSpec], count: int, seed: int = 0,
                      int_high: Mapping[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """`count` seeded samples (batch 1 each) for the model inputs `inputs`: a stand-in for calibration data.

    An integer input named in `int_high` is drawn from [0, int_high[name]) (e.g. token ids below the vocabulary
    size), any other from [0, INT_HIGH).
    """
    rng = np.random.default_rng(seed)
    highs = dict(int_high or {})
    return [{spec.name: random_array(rng, spec.concrete_shape(1), spec.dtype, int_high=highs.get(spec.name, INT_HIGH))
             for spec in inputs} for _ in range(count)]
