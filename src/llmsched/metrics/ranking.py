"""How well one ordering agrees with another: Kendall's tau-b.

One function for the whole project: the length predictor's evaluation (`llmsched.predict`) and
the noisy oracle that hits a chosen tau (`llmsched.workload.scores`) both measure with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def kendall_tau(scores: Sequence[float] | np.ndarray, truth: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b (ties in either variable corrected; scipy's, O(n log n)); NaN when
    undefined (fewer than 2 values, or one side constant)."""
    from scipy.stats import kendalltau

    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if scores.shape != truth.shape:
        raise ValueError(f"kendall_tau needs equal shapes, got {scores.shape} and {truth.shape}")
    if len(scores) < 2:
        return float("nan")
    return float(kendalltau(scores, truth, variant="b").statistic)
