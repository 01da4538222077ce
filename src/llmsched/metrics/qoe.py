"""The answering phase of a reasoning request, as its reader experiences it (PASCAL §V-A).

A reasoning model's answer is streamed to a user who reads at a steady pace. Andes (arXiv
2404.16283) scores such a stream by how far the tokens the user *consumes* lag behind an
expected timeline; PASCAL keeps only the per-token part of that score (no TTFT term, since
reasoning lengths vary too much for a fixed target) and calls an answer's SLO violated when the
score falls below 0.95.

With ``t_s`` the time of the `</think>` token (the phase change), the answer's tokens
``i = 0..n-1`` are expected at ``t_s + ttfat + i * tpot``; a token generated early waits in the
pacer's buffer, and the user consumes token ``i`` at
``c_i = max(generated_i, c_{i-1} + tpot)``. Then

    QoE = 1 - sum_i max(0, c_i - expected_i) / sum_i (c_i - t_s)

which is 1 for an answer that never fell behind and tends to 0 for one that stalled for long.
The normalisation (the area under the actual timeline) follows a public reimplementation of
Andes; PASCAL's own is not published (see docs/pascal.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AnswerSLO:
    """PASCAL's answering-phase targets: first answer token within `ttfat` of `</think>`, then
    one token per `tpot` (10 tokens/s, human reading speed); violated when QoE < `min_qoe`."""

    ttfat: float = 0.25  # seconds from the phase change to the first answer token
    tpot: float = 0.1  # seconds per answer token
    min_qoe: float = 0.95

    def __post_init__(self) -> None:
        if self.ttfat < 0 or self.tpot <= 0 or not 0 < self.min_qoe <= 1:
            raise ValueError(
                f"answer SLO needs ttfat >= 0, tpot > 0 and 0 < min_qoe <= 1, got {self}"
            )


PASCAL_ANSWER_SLO = AnswerSLO()


def consumption_times(generated: np.ndarray, tpot: float, previous: float = -np.inf) -> np.ndarray:
    """When a reader at `tpot` s/token consumes each token: c_i = max(g_i, c_{i-1} + tpot),
    where `previous` is when the token before the first given one was consumed (none: -inf).
    Vectorised: c_i - i*tpot is a running maximum."""
    steps = np.arange(len(generated)) * tpot
    return np.maximum.accumulate(np.maximum(generated - steps, previous + tpot)) + steps


def qoe_terms(
    answer_times: np.ndarray, t_s: float, slo: AnswerSLO, first: int = 0, previous: float = -np.inf
) -> tuple[float, float, float]:
    """The QoE sums of answer tokens `first`, `first + 1`, ... generated at `answer_times`
    (after `</think>` at `t_s`; the token before them consumed at `previous`): (delay, whole,
    when the last of them is consumed). Sums of consecutive runs add up, so a pacer can fold
    tokens in as they come."""
    consumed = consumption_times(answer_times, slo.tpot, previous)
    expected = t_s + slo.ttfat + (first + np.arange(len(answer_times))) * slo.tpot
    delay = float(np.maximum(consumed - expected, 0.0).sum())
    return delay, float((consumed - t_s).sum()), float(consumed[-1])


def answer_qoe(token_times: np.ndarray, reasoning_tokens: int, slo: AnswerSLO) -> float:
    """QoE of a reasoning request's answer (NaN for a request without a reasoning phase)."""
    if reasoning_tokens < 1 or reasoning_tokens >= len(token_times):
        return float("nan")
    t_s = float(token_times[reasoning_tokens - 1])
    answer = np.asarray(token_times[reasoning_tokens:], dtype=np.float64)
    delay, whole, _ = qoe_terms(answer, t_s, slo)
    return 1.0 - delay / whole if whole > 0 else 1.0


# PASCAL plots tail TTFT per reasoning-length bin, with the percentile chosen by the bin's size
# (its cut-offs are not published; these are llmsched's).
REASONING_BINS = (0, 256, 512, 1024, 2048, 4096, 8192, 1 << 62)


def tail_percentile(count: int) -> float:
    """The tail a bin of `count` requests can estimate: max below 10, then p90, p95, p99."""
    return 100.0 if count < 10 else 90.0 if count < 100 else 95.0 if count < 1000 else 99.0


def tail_ttft_by_reasoning_bin(
    ttft: np.ndarray, reasoning: np.ndarray, edges: tuple[int, ...] = REASONING_BINS
) -> list[dict]:
    """Per reasoning-length bin [lo, hi): request count, the percentile used and its TTFT."""
    ttft, reasoning = np.asarray(ttft, dtype=np.float64), np.asarray(reasoning)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        values = ttft[(reasoning >= lo) & (reasoning < hi)]
        if len(values):
            q = tail_percentile(len(values))
            out.append(
                {
                    "lo": lo,
                    "hi": hi,
                    "count": len(values),
                    "percentile": q,
                    "ttft_s": float(np.percentile(values, q)),
                }
            )
    return out
