"""Whole iterations: the simulator's own batches, timed on a real decoder stack, beside the model.

Operator profiles check the latency model term by term (`calibration`); this checks what a
simulation actually charges per iteration. `record_batches` runs a simulation and keeps the first
iteration of every span the engine plans, per request: a prefill chunk with the KV it already has
cached, or a decode's cached KV. `sample_batches` picks a spread of them, the profiler's
`replay_batches` times them on a GPU, and `compare` sets the model's times beside the measured ones.

The replay times the GPU's work of one rank (embedding, layers, final norm, LM head) as a CUDA
graph, so the model's side leaves out the CPU-side `iteration_overhead` and
`sequence_overhead` terms.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmsched.config import SimulationConfig
from llmsched.hardware.latency import BatchShape

# (prefill chunks as (chunk length, KV already cached), decodes as the KV each already has):
# the profiler's BatchSpec.
Batch = tuple[tuple[tuple[int, int], ...], tuple[int, ...]]
KINDS = ("decode", "mixed", "prefill")
CPU_TERMS = ("iteration_overhead", "sequence_overhead")  # host-side: not in a GPU replay


def batch_of(plan) -> Batch:
    """The batch of a plan's first iteration."""
    prefills = tuple((tokens, s.computed) for s, tokens in plan.items if not s.is_decode)
    decodes = tuple(s.computed for s, _ in plan.items if s.is_decode)
    return prefills, decodes


def shape_of(batch: Batch) -> BatchShape:
    prefills, decodes = batch
    return BatchShape.from_chunks(prefills, len(decodes), sum(d + 1 for d in decodes))


def kind_of(batch: Batch) -> str:
    prefills, decodes = batch
    return "mixed" if prefills and decodes else "prefill" if prefills else "decode"


def record_batches(cfg: SimulationConfig, workload=None) -> list[Batch]:
    """Every planned span's first-iteration batch in a simulation of `cfg`."""
    from llmsched.experiment import build_cluster, load_workload

    cfg.validate()
    batches: list[Batch] = []

    def record(_inst, span) -> None:
        if span.plan.items:  # steps that only preempt run nothing
            batches.append(batch_of(span.plan))

    cluster, _ = build_cluster(cfg, observer=record)
    cluster.run(load_workload(cfg) if workload is None else workload)
    return batches


def sample_batches(batches: Sequence[Batch], n: int) -> list[Batch]:
    """Up to `n` distinct batches spread over kinds and sizes: an equal share per kind (what a
    kind cannot fill goes to the others), evenly spaced through the kind's batches ordered by
    tokens and KV read."""
    if n < 1:
        raise ValueError(f"sample size must be >= 1, got {n}")
    pools = {k: [] for k in KINDS}
    for b in dict.fromkeys(batches):  # distinct, in order
        pools[kind_of(b)].append(b)
    for pool in pools.values():
        pool.sort(key=_size)
    quota = dict.fromkeys(KINDS, 0)
    left = min(n, sum(map(len, pools.values())))
    while left:
        open_kinds = [k for k in KINDS if quota[k] < len(pools[k])]
        for k in open_kinds[:left]:
            quota[k] += 1
            left -= 1
    picked = []
    for k in KINDS:
        pool, q = pools[k], quota[k]
        if q:
            picked += [
                pool[i] for i in np.unique(np.linspace(0, len(pool) - 1, q).round().astype(int))
            ]
    return picked


def _size(batch: Batch) -> tuple[int, int]:
    """Tokens computed, then KV read: the order a sample is spread along."""
    shape = shape_of(batch)
    return shape.num_tokens, shape.prefill_kv_tokens + shape.decode_kv_tokens


@dataclass
class ReplayComparison:
    """Measured and modelled seconds per batch."""

    batches: list[Batch]
    measured: np.ndarray
    predicted: np.ndarray

    @property
    def kinds(self) -> np.ndarray:
        return np.array([kind_of(b) for b in self.batches])

    @property
    def errors(self) -> np.ndarray:
        """Relative error, predicted / measured - 1 (+ = the model is slow)."""
        return self.predicted / self.measured - 1

    def summary(self) -> dict[str, dict[str, float]]:
        """Per kind and overall: count, median and p90 absolute error, median signed error, and
        the median gap predicted - measured in ms (a fixed cost the model misses shows here)."""
        out = {}
        for name in (*KINDS, "all"):
            mask = np.ones(len(self.batches), bool) if name == "all" else self.kinds == name
            if not mask.any():
                continue
            err = self.errors[mask]
            out[name] = {
                "batches": int(mask.sum()),
                "median_ape": float(np.median(np.abs(err))),
                "p90_ape": float(np.percentile(np.abs(err), 90)),
                "bias": float(np.median(err)),
                "median_gap_ms": float(np.median(self.predicted[mask] - self.measured[mask]) * 1e3),
            }
        return out

    def format(self) -> str:
        lines = [
            "| batches | n | median error | p90 error | bias | median predicted − measured |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in self.summary().items():
            lines.append(
                f"| {name} | {s['batches']} | {s['median_ape']:.1%} | {s['p90_ape']:.1%} | "
                f"{s['bias']:+.1%} | {s['median_gap_ms']:+.2f} ms |"
            )
        return "\n".join(lines)


def compare(latency, batches: Sequence[Batch], measured_s: Sequence[float]) -> ReplayComparison:
    """The model's GPU time per batch (every term of `latency.breakdown` but the CPU's) beside
    the measured seconds."""
    if len(batches) != len(measured_s):
        raise ValueError(f"{len(batches)} batches but {len(measured_s)} measured times")
    measured = np.asarray(measured_s, dtype=np.float64)
    if not (measured > 0).all():
        raise ValueError("measured times must be > 0 seconds")
    predicted = np.array(
        [
            sum(v for k, v in latency.breakdown(shape_of(b)).items() if k not in CPU_TERMS)
            for b in batches
        ]
    )
    return ReplayComparison(list(batches), measured, predicted)


def save_batches(path: str | Path, batches: Sequence[Batch], **meta) -> Path:
    """Batches (and what produced them) as JSON; `load_batches` reads them back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [[[list(p) for p in pre], list(dec)] for pre, dec in batches]
    path.write_text(json.dumps({**meta, "batches": rows}) + "\n")
    return path


def load_batches(path: str | Path) -> tuple[list[Batch], dict]:
    data = json.loads(Path(path).read_text())
    try:
        batches = [
            (tuple((int(c), int(p)) for c, p in pre), tuple(int(d) for d in dec))
            for pre, dec in data.pop("batches")
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a batch file (a JSON object whose 'batches' are [prefills, decodes] "
            f"pairs): {exc}"
        ) from exc
    return batches, data
