"""Reasoning workloads: real prompts and answers, plus a hidden reasoning phase before each answer.

No public trace gives prompts together with a reasoning model's think/answer token counts.
PASCAL's authors had o4-mini answer AlpacaEval 2.0 and Arena-Hard and counted both parts
(reasoning:answer about 1:1). Here the answer lengths are real (AlpacaEval's 805 instructions
answered by a chosen model, :func:`read_alpaca_eval`) and the reasoning length is drawn per
request from one of three *splits* (:func:`add_reasoning`):

* ``equal``: about as long as the answer (PASCAL's o4-mini workloads): answer x e^N(0, sigma^2);
* ``servegen``: the real reasoning share of a production DeepSeek-R1 service (ServeGen,
  ``reason_ratio`` = reasoning / output tokens), so reasoning = answer x rho / (1 - rho);
* ``heavy``: 4 to 8 times the answer (PASCAL's MATH-500 / GPQA / LiveCodeBench mix).

Reasoning is capped at ``max_tokens`` (a served model's thinking budget); ``reasoning_tokens``
counts the `</think>` token.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np

from llmsched.workload.alpaca_eval import read_alpaca_eval_table
from llmsched.workload.request import Workload

SPLITS = ("equal", "servegen", "heavy")
DEFAULT_GENERATOR = "gpt4_1106_preview_verbose"  # GPT-4 Turbo; answers 506 tokens mean


def read_alpaca_eval(directory: str | Path, generator: str = DEFAULT_GENERATOR) -> Workload:
    """AlpacaEval's 805 instructions (text, cl100k tokens) with `generator`'s real response
    lengths as outputs; untimed (arrivals are generated)."""
    table = read_alpaca_eval_table(directory)
    lengths = table.column(generator)
    ids = [i for i in range(len(table.texts)) if table.texts[i] and lengths[i] > 0]
    return Workload(
        {
            "request_id": np.array([f"alpaca-{i}" for i in ids], dtype=object),
            "arrival": np.zeros(len(ids)),
            "prompt_tokens": np.maximum(1, table.prompt_tokens[ids]),
            "output_tokens": lengths[ids].astype(np.int64),
            "prompt_text": np.array([table.texts[i] for i in ids], dtype=object),
        },
        source=f"{directory} ({generator})",
        timed=False,
    )


def servegen_reason_ratios(directory: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """ServeGen's DeepSeek-R1 ``reason_ratio`` distribution pooled over every window of every
    ``chunk-*-dataset.json``: (values, probabilities)."""
    files = sorted(Path(directory).glob("chunk-*-dataset.json"))
    if not files:
        raise FileNotFoundError(f"no ServeGen chunk-*-dataset.json files in {directory}")
    pooled: dict[float, float] = {}
    for path in files:
        for window in json.loads(path.read_text()).values():
            # Each distribution is a Python-literal string "{value: probability, ...}".
            for value, p in ast.literal_eval(window["reason_ratio"]).items():
                pooled[float(value)] = pooled.get(float(value), 0.0) + float(p)
    values = np.array(sorted(pooled))
    probs = np.array([pooled[v] for v in values])
    if probs.sum() <= 0:
        raise ValueError(f"ServeGen data in {directory} holds no reason_ratio mass")
    return values, probs / probs.sum()


def reasoning_lengths(
    answers: np.ndarray,
    split: str,
    rng: np.random.Generator,
    *,
    sigma: float = 0.5,
    low: float = 4.0,
    high: float = 8.0,
    max_tokens: int = 16384,
    servegen: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Reasoning tokens (``</think>`` included, at least 1) for answers of these lengths."""
    answers = np.asarray(answers, dtype=np.float64)
    if split == "equal":
        factor = np.exp(rng.normal(0.0, sigma, len(answers)))
    elif split == "heavy":
        factor = rng.uniform(low, high, len(answers))
    elif split == "servegen":
        if servegen is None:
            raise ValueError("the servegen split needs the ServeGen reason_ratio distribution")
        values, probs = servegen
        rho = np.minimum(rng.choice(values, len(answers), p=probs), 0.999)
        factor = rho / (1.0 - rho)
    else:
        raise ValueError(f"reasoning split must be one of {SPLITS}, got {split!r}")
    return np.clip(np.rint(answers * factor), 1, max_tokens).astype(np.int64)


def add_reasoning(workload: Workload, spec: dict, seed: int = 0) -> Workload:
    """Put a reasoning phase before every request's answer (its current output), as `spec` says:
    ``{split: equal|servegen|heavy, max_tokens, sigma, low, high, servegen_dir}``."""
    from llmsched.data import data_path

    spec = dict(spec)
    split = spec.pop("split", "equal")
    unknown = set(spec) - {"max_tokens", "sigma", "low", "high", "servegen_dir"}
    if unknown:
        raise ValueError(
            f"unknown reasoning option(s) {', '.join(sorted(unknown))}; known: split, "
            "max_tokens, sigma, low, high, servegen_dir"
        )
    directory = spec.pop("servegen_dir", None)
    servegen = None
    if split == "servegen":
        servegen = servegen_reason_ratios(directory or data_path("traces/servegen-deepseek-r1"))
    rng = np.random.default_rng([seed, 0x7EA5])
    answers = workload.columns["output_tokens"]
    reasoning = reasoning_lengths(answers, split, rng, servegen=servegen, **spec)
    return workload.with_columns(output_tokens=answers + reasoning, reasoning_tokens=reasoning)
