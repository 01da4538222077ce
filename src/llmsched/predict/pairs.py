"""Training pairs exactly as PARS's released code builds them (docs/pars.md, "Predictor").

For each prompt A, up to ``k`` random partners B are drawn (at most ``10*k`` draws); a pair is
kept only when the lengths differ by at least ``delta`` relative to the larger one, so the ranker
trains on the decisions that matter for scheduling and not on near-ties. The label is 1 when A's
response is the longer one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

K_PAIRS = 10
DELTA = 0.2
SEED = 42


def relative_difference(a: float, b: float) -> float:
    """|a - b| / max(a, b), and 0 when both are 0 (as in the released code)."""
    top = max(a, b)
    return abs(a - b) / top if top > 0 else 0.0


def make_pairs(
    lengths: Sequence[float] | np.ndarray, k: int = K_PAIRS, delta: float = DELTA, seed: int = SEED
) -> np.ndarray:
    """Pairs as an int64 array of rows ``(i, j, label)``: label 1 when ``lengths[i] >
    lengths[j]``. Deterministic for a given seed (Python's ``random``, as the released code)."""
    if k < 1:
        raise ValueError("k (pairs per prompt) must be at least 1")
    lengths = [float(x) for x in lengths]
    n = len(lengths)
    rng = random.Random(seed)
    rows: list[tuple[int, int, int]] = []
    if n < 2:
        return np.zeros((0, 3), dtype=np.int64)
    for i, len_a in enumerate(lengths):
        generated = attempts = 0
        while generated < k and attempts < 10 * k:
            attempts += 1
            j = rng.randint(0, n - 1)
            if j == i:
                continue
            len_b = lengths[j]
            if relative_difference(len_a, len_b) < delta:
                continue
            rows.append((i, j, 1 if len_a > len_b else 0))
            generated += 1
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)
