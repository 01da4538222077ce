"""A simulated run against measured ones: the error of each latency figure and throughput.

Both sides are `vllm bench serve` results (``llmsched bench`` writes the measured ones,
``llmsched simulate`` the simulated), so the same field means the same thing on both. A measured
run may be repeated: its figure is then the mean over the repeats, and the repeats' spread
(largest minus smallest, over their mean) says how much of an error the machine's own noise
could explain. ``llmsched fidelity --real REAL.json ... --sim SUMMARY.json`` prints the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LATENCIES = ("ttft", "tpot", "itl", "e2el")
STATISTICS = ("mean", "median", "p90", "p99")
THROUGHPUTS = ("request_throughput", "output_throughput")
#: Every compared field, in table order.
FIELDS: tuple[str, ...] = (
    tuple(f"{stat}_{name}_ms" for name in LATENCIES for stat in STATISTICS) + THROUGHPUTS
)


@dataclass(frozen=True)
class FieldError:
    field: str
    real: float  # mean over the measured repeats
    spread: float  # (max − min) / mean over the repeats; 0 with one repeat
    sim: float

    @property
    def error(self) -> float:
        """Signed relative error: > 0 the simulator says higher than measured."""
        return self.sim / self.real - 1 if self.real else float("nan")

    @property
    def within_spread(self) -> bool:
        """The simulated value lies within the measured repeats' range."""
        return abs(self.error) <= self.spread / 2 + 1e-12


def field_errors(
    real: Sequence[Mapping[str, Any]], sim: Mapping[str, Any], fields: Sequence[str] = FIELDS
) -> list[FieldError]:
    """Each field's measured mean, spread and simulated value (fields absent on a side skipped)."""
    out = []
    for name in fields:
        values = [r[name] for r in real if r.get(name) is not None]
        if not values or sim.get(name) is None:
            continue
        mean = float(np.mean(values))
        spread = (max(values) - min(values)) / mean if mean else 0.0
        out.append(FieldError(name, mean, spread, float(sim[name])))
    return out


def order_agrees(
    real: Mapping[str, Sequence[Mapping[str, Any]]],
    sim: Mapping[str, Mapping[str, Any]],
    field: str,
) -> tuple[bool, list[str], list[str]]:
    """Does the simulator order the policies on `field` as the real engine does?

    Policies whose measured repeats overlap (ranges that intersect) are tied: the real engine
    does not order them, so neither order counts against the simulator. Returns (agrees, the
    real order, the simulated order), lowest first."""
    names = [p for p in real if p in sim and sim[p].get(field) is not None]
    ranges = {p: [r[field] for r in real[p]] for p in names}
    mean = {p: float(np.mean(v)) for p, v in ranges.items()}
    real_order = sorted(names, key=mean.get)
    sim_order = sorted(names, key=lambda p: sim[p][field])
    agrees = True
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            tied = max(ranges[a]) >= min(ranges[b]) and max(ranges[b]) >= min(ranges[a])
            if tied:
                continue
            if (mean[a] < mean[b]) != (sim[a][field] < sim[b][field]):
                agrees = False
    return agrees, real_order, sim_order


def format_errors(errors: Sequence[FieldError]) -> str:
    lines = [f"{'field':22s} {'real':>11s} {'spread':>7s} {'simulated':>11s} {'error':>8s}"]
    for e in errors:
        lines.append(
            f"{e.field:22s} {e.real:11.2f} {100 * e.spread:6.1f}% {e.sim:11.2f} "
            f"{100 * e.error:+7.1f}%" + ("" if not e.within_spread else "  (within spread)")
        )
    return "\n".join(lines)
