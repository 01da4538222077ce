"""Evaluating a ranker on held-out prompts, and across the 227 AlpacaEval generators."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmsched.metrics.ranking import kendall_tau
from llmsched.predict.data import (
    ALPACA_FRACTIONS,
    LengthData,
    alpaca_table,
    split_of,
)
from llmsched.predict.metrics import latency_per_request, pairwise_accuracy
from llmsched.predict.pairs import DELTA, K_PAIRS, SEED, make_pairs

# Cross-model test set: Llama-3, Qwen2, Mixtral, Claude, GPT-4 variants and a few others.
CROSS_MODEL_GENERATORS = (
    "gpt4_1106_preview",
    "gpt-4o-2024-05-13",
    "gpt4_0613",
    "gpt-3.5-turbo-0613",
    "claude-3-opus-20240229",
    "claude-2.1",
    "Meta-Llama-3-70B-Instruct",
    "Meta-Llama-3-8B-Instruct",
    "Meta-Llama-3.1-405B-Instruct-Turbo",
    "Qwen2-72B-Instruct",
    "Qwen1.5-72B-Chat",
    "Mixtral-8x7B-Instruct-v0.1",
    "Mixtral-8x22B-Instruct-v0.1",
    "Mistral-7B-Instruct-v0.2",
    "gemma-7b-it",
    "llama-2-70b-chat-hf",
    "vicuna-13b-v1.5",
)


def evaluate(
    predictor,
    data: LengthData,
    k: int = K_PAIRS,
    delta: float = DELTA,
    seed: int = SEED + 2,
    latency: bool = True,
    latency_batch: int = 32,
    repeats: int = 20,
    progress: bool = False,
    scores: np.ndarray | None = None,
) -> dict:
    """Kendall's tau-b and pairwise accuracy (pairs built with ``delta``) on ``data``, and the
    median latency per request scoring one prompt at a time and ``latency_batch`` at a time.
    ``scores`` may be given when already computed (e.g. from cached embeddings)."""
    if scores is None:
        scores = score_all(predictor, data.prompts, progress)
    pairs = make_pairs(data.lengths, k, delta, seed)
    result = {
        "prompts": len(data),
        "pairs": len(pairs),
        "kendall_tau": kendall_tau(scores, data.lengths),
        "pairwise_accuracy": pairwise_accuracy(scores, pairs),
    }
    if latency:
        sample = data.prompts[: max(repeats * latency_batch, repeats)]
        result["latency_ms_batch1"] = 1e3 * latency_per_request(predictor.score, sample, 1, repeats)
        result[f"latency_ms_batch{latency_batch}"] = 1e3 * latency_per_request(
            predictor.score, sample, latency_batch, max(3, repeats // 4)
        )
    return result


def score_all(predictor, prompts: Sequence[str], progress: bool = False) -> np.ndarray:
    """``predictor.score`` in chunks, with a progress bar when asked."""
    prompts = list(prompts)
    if not progress or len(prompts) <= 256:
        return predictor.score(prompts)
    from tqdm import tqdm

    chunks = [prompts[s : s + 256] for s in range(0, len(prompts), 256)]
    return np.concatenate([predictor.score(c) for c in tqdm(chunks, desc="scoring", unit="chunk")])


def cross_model(
    predictor,
    generators: Sequence[str] | None = None,
    split: str = "test",
    k: int = K_PAIRS,
    delta: float = DELTA,
    seed: int = SEED + 2,
    score_fn=None,
) -> list[dict]:
    """tau and pairwise accuracy of one set of scores against each generator's lengths, on the
    AlpacaEval instructions of ``split`` (all when ``split`` is None). ``score_fn`` replaces
    ``predictor.score`` (e.g. a reference that reads true lengths)."""
    table = alpaca_table()
    texts = table.texts
    columns = {g: table.column(g) for g in generators or CROSS_MODEL_GENERATORS}  # names checked
    rows = [
        i
        for i in range(len(texts))
        if texts[i].strip()
        and (split is None or split_of(f"alpaca:{i}", ALPACA_FRACTIONS) == split)
    ]
    scores = (score_fn or predictor.score)([texts[i] for i in rows])
    out = []
    for g, column in columns.items():
        col = column[rows]
        ok = np.isfinite(col) & (col > 0)
        pairs = make_pairs(col[ok], k, delta, seed)
        out.append(
            {
                "generator": g,
                "prompts": int(ok.sum()),
                "kendall_tau": kendall_tau(scores[ok], col[ok]),
                "pairwise_accuracy": pairwise_accuracy(scores[ok], pairs),
            }
        )
    return out


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """A plain aligned text table (numbers with 3 decimals)."""

    def cell(v) -> str:
        if isinstance(v, float):
            return "nan" if np.isnan(v) else f"{v:.3f}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
