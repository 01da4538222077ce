"""How well scores order response lengths, and how long scoring takes.

- Kendall's tau-b between scores and true lengths (the PARS and vllm-ltr metric):
  `llmsched.metrics.ranking.kendall_tau`;
- pairwise accuracy on held-out pairs built with the same delta filter as training (the metric
  PARS selects its checkpoint on);
- latency per request: one prompt at a time, and in a batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np


def pairwise_accuracy(scores: Sequence[float] | np.ndarray, pairs: np.ndarray) -> float:
    """Share of pairs ``(i, j, label)`` whose score order agrees with the label (a score tie
    counts as wrong, as ``score_A > score_B`` does in the released code)."""
    scores = np.asarray(scores, dtype=np.float64)
    pairs = np.asarray(pairs)
    if len(pairs) == 0:
        return float("nan")
    predicted = scores[pairs[:, 0]] > scores[pairs[:, 1]]
    return float(np.mean(predicted == (pairs[:, 2] == 1)))


def latency_per_request(
    score: Callable[[list[str]], np.ndarray],
    prompts: Sequence[str],
    batch_size: int = 1,
    repeats: int = 20,
) -> float:
    """Median seconds per request of ``score`` on batches of ``batch_size`` prompts (after one
    warm-up call), over ``repeats`` batches cycling through ``prompts``."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to time")
    batches = [
        [prompts[(r * batch_size + i) % len(prompts)] for i in range(batch_size)]
        for r in range(repeats)
    ]
    score(batches[0])
    times = []
    for batch in batches:
        start = time.perf_counter()
        score(batch)
        times.append((time.perf_counter() - start) / batch_size)
    return statistics.median(times)
