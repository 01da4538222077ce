"""Capacity search: the highest Poisson arrival rate at which a policy still meets its SLOs.

An SLO is a list of conditions on a run's summary, written as people say them:
``"median_ttft<0.5s, p99_tbt<=tier"`` (TBT is the time between tokens, vLLM's ITL; ``tier``
means every tier's own TBT target). A rate is feasible when every seed's run meets every
condition. Capacity is found by growing the rate until it fails, then narrowing the bracket,
several rates at a time (on the local cores, or a Ray cluster: llmsched.parallel); it assumes
the SLO metrics worsen with load.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tqdm import tqdm

from llmsched.config import SimulationConfig
from llmsched.parallel import Executor, LocalExecutor

STATS = ("mean", "median", "p50", "p90", "p95", "p99")
METRICS = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "tbt": "itl", "e2el": "e2el"}
_TERM = re.compile(r"^\s*(\w+?)_(\w+)\s*(<=|<)\s*(tier|[0-9.eE+-]+)\s*(ms|s)?\s*$")


@dataclass(frozen=True)
class Condition:
    stat: str  # mean, median, p99, ...
    metric: str  # summary metric: ttft, tpot, itl, e2el
    strict: bool  # < rather than <=
    limit_ms: float | None  # None: each tier's own TBT target

    def __str__(self) -> str:
        limit = "tier" if self.limit_ms is None else f"{self.limit_ms:g}ms"
        return f"{self.stat}_{self.metric}{'<' if self.strict else '<='}{limit}"

    def values(self, summary: dict) -> dict[str, float | None]:
        """The measured value(s): one for the run, or one per tier."""
        key = f"{self.stat}_{self.metric}_ms"
        if self.limit_ms is not None:
            return {"all": summary.get(key)}
        tiers = summary.get("by_tier") or {}
        return {name: t.get(key) for name, t in tiers.items()}

    def holds(self, summary: dict, tier_limits_ms: dict[str, float]) -> bool:
        values = self.values(summary)
        if not values:
            return False
        for name, value in values.items():
            limit = self.limit_ms if self.limit_ms is not None else tier_limits_ms.get(name)
            if value is None or limit is None:
                return False
            if value > limit or (self.strict and value == limit):
                return False
        return True


def parse_slo(text: str) -> list[Condition]:
    """`"median_ttft<0.5s, p99_tbt<=tier"` → conditions; a clear error for anything else."""
    conditions = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = _TERM.match(term)
        if not m:
            raise ValueError(
                f"SLO term {term!r} is not STAT_METRIC<VALUE[s|ms], e.g. median_ttft<0.5s or "
                "p99_tbt<=tier"
            )
        stat, metric, op, value, unit = m.groups()
        if stat not in STATS or metric not in METRICS:
            raise ValueError(
                f"SLO term {term!r}: statistic must be one of {STATS} and metric one of "
                f"{tuple(METRICS)}"
            )
        if value == "tier":
            if unit or METRICS[metric] not in ("itl", "tpot"):
                raise ValueError(f"SLO term {term!r}: 'tier' limits apply to tbt, itl or tpot")
            limit = None
        else:
            try:
                limit = float(value) * (1000.0 if unit in (None, "s") else 1.0)
            except ValueError:
                raise ValueError(f"SLO term {term!r}: {value!r} is not a number") from None
            if not limit > 0 or math.isinf(limit):
                raise ValueError(f"SLO term {term!r}: the limit must be a positive number")
        # p50 is accepted as people write it; summaries spell it median (as vLLM does).
        stat = "median" if stat == "p50" else stat
        conditions.append(Condition(stat, METRICS[metric], op == "<", limit))
    if not conditions:
        raise ValueError("empty SLO: give conditions like 'median_ttft<0.5s, p99_tbt<=tier'")
    return conditions


@dataclass
class Evaluation:
    rate: float
    seed: int
    ok: bool
    values: dict[str, dict[str, float | None]]  # condition → tier (or "all") → value in ms
    completed: int
    throughput: float | None


@dataclass
class CapacityResult:
    policy: str
    capacity: float  # highest feasible rate found (0 if none)
    bracket: tuple[float, float]  # (feasible, infeasible)
    evaluations: list[Evaluation] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "capacity_rps": self.capacity,
            "bracket_rps": list(self.bracket),
            "evaluations": [e.__dict__ for e in sorted(self.evaluations, key=lambda e: e.rate)],
        }


def tier_limits_ms(cfg: SimulationConfig) -> dict[str, float]:
    if cfg.tiers:
        return {name: float(t["tbt"]) * 1000 for name, t in cfg.tiers.items()}
    return {}


def evaluate(cfg: SimulationConfig, conditions: list[Condition]) -> Evaluation:
    """One simulation at cfg.rate and cfg.seed (run in a worker process)."""
    from llmsched.experiment import simulate

    s = simulate(cfg).summary
    limits = tier_limits_ms(cfg)
    return Evaluation(
        rate=cfg.rate,
        seed=cfg.seed,
        ok=all(c.holds(s, limits) for c in conditions),
        values={str(c): c.values(s) for c in conditions},
        completed=s["completed"],
        throughput=s["request_throughput"],
    )


def search_capacity(
    cfg: SimulationConfig,
    conditions: list[Condition],
    *,
    seeds: int = 1,
    workers: int = 1,
    start_rate: float = 1.0,
    tolerance: float = 0.02,
    max_rate: float = 1e4,
    on_evaluation: Callable[[Evaluation], None] | None = None,
    executor: Executor | None = None,
    progress: bool = False,
) -> CapacityResult:
    """The highest rate (within `tolerance`, relative) at which every seed meets `conditions`.

    Rates are tried `workers` at a time (`executor.workers` when an executor is given; without
    one, local processes): first growing geometrically from `start_rate` until one fails, then
    splitting the (feasible, infeasible) bracket evenly. With `progress`, a bar of the
    simulations run and (estimate_rounds) those still to come, with the time left.
    """
    if tiers_needed(conditions) and not cfg.tiers:
        raise ValueError("an SLO with 'tier' limits needs tiers in the config (tiers: {...})")
    result = CapacityResult(cfg.policy, 0.0, (0.0, math.inf))
    lo, hi = 0.0, math.inf
    # A caller's executor is the caller's to close; one made here is closed here.
    with (
        nullcontext(executor) if executor else LocalExecutor(workers) as pool,
        tqdm(desc=cfg.policy, unit="run", disable=not progress, leave=False) as bar,
    ):
        workers = pool.workers
        run = partial(evaluate, conditions=conditions)

        def feasible(rates: list[float]) -> dict[float, bool]:
            runs = [cfg.replace(rate=r, seed=cfg.seed + s) for r in rates for s in range(seeds)]
            done: dict[int, Evaluation] = {}
            for i, e in pool.map_unordered(run, runs):
                done[i] = e
                if on_evaluation:
                    on_evaluation(e)
                bar.update()
            ok = dict.fromkeys(rates, True)
            for i in sorted(done):  # in the order asked, not as finished: the same result
                result.evaluations.append(done[i])
                ok[done[i].rate] &= done[i].ok
            return ok

        def update(verdict: dict[float, bool]) -> None:
            # The highest feasible rate seen, and the lowest failure above it: noisy metrics
            # (not monotone in load) cannot cross the bracket.
            nonlocal lo, hi
            lo = max([lo, *(r for r, good in verdict.items() if good)])
            failures = [r for r, good in result_rates.items() if not good and r > lo]
            hi = min(failures, default=math.inf)
            bar.total = bar.n + estimate_rounds(lo, hi, tolerance, width) * width * seeds
            bar.refresh()

        result_rates: dict[float, bool] = {}
        rate, width = start_rate, max(1, workers)
        while hi == math.inf:  # grow until a rate fails
            rates = [rate * 2**i for i in range(width)]
            verdict = feasible(rates)
            result_rates |= verdict
            update(verdict)
            rate = rates[-1] * 2
            if hi == math.inf and rate > max_rate:
                raise ValueError(f"the SLO still holds at {rates[-1]:g} req/s: nothing saturates")
        floor = start_rate * 2.0**-10
        while lo == 0.0:  # even the start rate fails: shrink until one passes
            rates = [hi * 2.0 ** -(i + 1) for i in range(width)]
            if rates[-1] < floor:
                result.bracket = (0.0, hi)
                return result  # capacity 0: no rate down to `floor` meets the SLO
            verdict = feasible(rates)
            result_rates |= verdict
            update(verdict)
        while hi - lo > tolerance * hi:  # narrow the bracket
            step = (hi - lo) / (width + 1)
            verdict = feasible([lo + step * (i + 1) for i in range(width)])
            result_rates |= verdict
            update(verdict)
    result.capacity, result.bracket = lo, (lo, hi)
    return result


def estimate_rounds(lo: float, hi: float, tolerance: float, width: int) -> int:
    """Rounds of `width` rates still to run: each splits the bracket into width + 1 parts until
    it is `tolerance` narrow. Before a rate has failed (hi infinite) or passed (lo 0), one more
    round is assumed to find the bracket, as wide as one doubling."""
    if hi == math.inf or lo == 0.0:
        return 1 + estimate_rounds(0.5, 1.0, tolerance, width)
    return max(0, math.ceil(math.log((hi - lo) / (tolerance * hi)) / math.log(width + 1)))


def tiers_needed(conditions: list[Condition]) -> bool:
    return any(c.limit_ms is None for c in conditions)
