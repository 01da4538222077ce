"""Per-request ranking scores for prompt-aware schedulers (PARS, vllm-ltr).

A score is what a length predictor says about a request before it runs: **higher = longer
response expected**. Only its order matters to the schedulers, so its unit is free. Sources:

- ``oracle``: the true output length (what no deployment knows; the ranking upper bound).
- ``noisy-oracle``: the true log-length plus Gaussian noise, the noise's weight found by
  bisection so that Kendall's tau-b between scores and true lengths on *this* workload hits a
  target (``tau``, within ``TAU_TOLERANCE``). Seeded. tau = 1 gives the oracle's order, tau ~ 0
  a random order. It answers "how good must a predictor be?" independently of any model.
- ``prompt-length``: the prompt's token count (the free heuristic: longer prompt, longer answer).
- ``model:DIR``: a trained predictor, through ``llmsched.predict.load_predictor(DIR).score(texts)``
  on the requests' prompt texts. Needs a trace with prompt text (e.g. ShareGPT pairs).

A spec is a mapping ``{source: noisy-oracle, tau: 0.6, seed: 0}`` (config files) or a string
``"noisy-oracle,tau=0.6,seed=0"`` / ``"model:/path/to/dir"`` (``--scores``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import yaml

from llmsched.metrics.ranking import kendall_tau
from llmsched.workload.request import Workload

SOURCES = ("oracle", "noisy-oracle", "prompt-length", "model")
TAU_TOLERANCE = 0.02


@dataclass(frozen=True)
class ScoreSpec:
    source: str
    tau: float | None = None  # noisy-oracle only
    seed: int = 0  # noisy-oracle only
    model_dir: str | None = None  # model only

    @classmethod
    def parse(cls, spec: str | dict | ScoreSpec) -> ScoreSpec:
        if isinstance(spec, ScoreSpec):
            return spec
        if isinstance(spec, str):
            head, *items = [part.strip() for part in spec.split(",")]
            values: dict = {"source": head}
            for item in items:
                name, found, text = item.partition("=")
                if not found:
                    raise ValueError(f"score spec items are NAME=VALUE, got {item!r} in {spec!r}")
                values[name.strip()] = yaml.safe_load(text)
        elif isinstance(spec, dict):
            values = dict(spec)
        else:
            raise ValueError(f"scores must be a mapping or a string, got {spec!r}")
        source = str(values.pop("source", ""))
        model_dir = values.pop("model_dir", values.pop("dir", None))
        if source.startswith("model:"):
            source, model_dir = "model", source.partition(":")[2]
        if source not in SOURCES:
            raise ValueError(
                f"unknown score source {source!r}; known: oracle, noisy-oracle (with tau=), "
                "prompt-length, model:DIR"
            )
        tau = values.pop("tau", None)
        seed = int(values.pop("seed", 0))
        if values:
            raise ValueError(f"score spec has unknown field(s) {', '.join(sorted(values))}")
        if source == "noisy-oracle":
            if tau is None or not 0.0 <= float(tau) <= 1.0:
                raise ValueError(f"noisy-oracle scores need a target tau in [0, 1], got {tau!r}")
            tau = float(tau)
        elif tau is not None:
            raise ValueError(f"tau applies only to noisy-oracle scores, not {source!r}")
        if source == "model" and not model_dir:
            raise ValueError("model scores need a predictor folder: model:DIR")
        return cls(source, tau, seed, model_dir)

    def describe(self) -> str:
        if self.source == "noisy-oracle":
            return f"noisy-oracle(tau={self.tau}, seed={self.seed})"
        if self.source == "model":
            return f"model:{self.model_dir}"
        return self.source


def compute_scores(workload: Workload, spec: str | dict | ScoreSpec) -> np.ndarray:
    """One score per request of `workload` (in its order), higher = longer expected."""
    spec = ScoreSpec.parse(spec)
    c = workload.columns
    if spec.source == "oracle":
        return c["output_tokens"].astype(np.float64)
    if spec.source == "prompt-length":
        return c["prompt_tokens"].astype(np.float64)
    if spec.source == "noisy-oracle":
        return noisy_oracle(c["output_tokens"], spec.tau, seed=spec.seed)[0]
    texts = c["prompt_text"]
    missing = len(workload) if texts is None else sum(t is None for t in texts)
    if missing:
        where = workload.source or "this workload"
        raise ValueError(
            f"score source model:{spec.model_dir} reads prompt text, but {where} has none for "
            f"{missing} of {len(workload)} requests; use a trace with prompts (e.g. "
            "prompts/sharegpt/sharegpt_v3_prefix_pairs.jsonl.gz) or a score source that needs "
            "no text (oracle, noisy-oracle, prompt-length)"
        )
    from llmsched.predict import load_predictor  # the predictor package's one entry point

    scores = np.asarray(load_predictor(spec.model_dir).score(list(texts)), dtype=np.float64)
    if scores.shape != (len(workload),):
        raise ValueError(
            f"predictor {spec.model_dir} returned {scores.shape} scores for {len(workload)} prompts"
        )
    return scores


def attach_scores(workload: Workload, spec: str | dict | ScoreSpec) -> Workload:
    """A copy of `workload` with its `score` column from `spec`."""
    return workload.with_columns(score=compute_scores(workload, spec))


def held_out(workload: Workload, split: str) -> Workload:
    """The rows of one split (train, val, test) of the length predictor's fixed hash split by
    conversation (``llmsched.predict.data``), so that a scheduler is evaluated on prompts its
    predictor never trained on. Needs conversation ids (``session_id``, as ShareGPT has)."""
    from llmsched.predict.data import SPLITS, conversation_of, split_of

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    sessions = workload.columns["session_id"]
    if sessions is None:
        raise ValueError(
            f"split {split!r} keys on conversation ids, and {workload.source or 'the workload'} "
            "has none (ShareGPT pairs have them)"
        )
    keep = np.array([split_of(conversation_of(str(s))) == split for s in sessions], dtype=bool)
    return workload.take(np.flatnonzero(keep))


# --- noisy oracle -------------------------------------------------------------------------------


def noisy_oracle(
    lengths: np.ndarray, tau: float, *, seed: int = 0, tolerance: float = 1e-3
) -> tuple[np.ndarray, float]:
    """Scores whose Kendall tau-b against `lengths` is `tau` (within TAU_TOLERANCE when the
    workload allows it), and the tau they realise.

    score = (1 - w) * z(log length) + w * noise, with z() standardisation and noise ~ N(0, 1)
    drawn once from `seed`; w is found by bisection: tau falls from 1 at w = 0 to the noise's
    own tau at w = 1 (about 0, by chance a little above or below) and below 0 beyond, so w in
    [0, 2] reaches any target in [0, 1]. The same lengths, tau and seed give the same scores.
    """
    y = np.asarray(lengths, dtype=np.float64)
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"target tau must be in [0, 1], got {tau}")
    if len(y) < 2:
        return y.copy(), 1.0
    x = np.log(np.maximum(y, 1e-9))
    x = (x - x.mean()) / (x.std() or 1.0)
    noise = np.random.default_rng(seed).standard_normal(len(y))

    def scores(w: float) -> np.ndarray:
        return (1.0 - w) * x + w * noise

    if tau >= 1.0:
        return x, kendall_tau(x, y)
    lo, hi = 0.0, 2.0  # tau(lo) = 1 >= target > tau(hi), about -0.3
    realized_hi = kendall_tau(scores(hi), y)
    if realized_hi >= tau:
        return scores(hi), realized_hi
    best_w, best = hi, realized_hi
    for _ in range(60):
        mid = (lo + hi) / 2
        realized = kendall_tau(scores(mid), y)
        if abs(realized - tau) < abs(best - tau):
            best_w, best = mid, realized
        if abs(realized - tau) <= tolerance:
            break
        if realized > tau:
            lo = mid
        else:
            hi = mid
    return scores(best_w), best
