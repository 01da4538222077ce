"""A sweep's latencies against its load: one line per combination of the other swept keys.

The x axis is the arrival rate when it is swept, else the first other numeric key swept over
several values; seeds are averaged. Needs matplotlib (``pip install llmsched[plot]``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import numpy as np

from llmsched.metrics.report import new_figure

PANELS = (
    ("median_ttft_ms", "median TTFT (ms)"),
    ("p99_ttft_ms", "p99 TTFT (ms)"),
    ("mean_tpot_ms", "mean TPOT (ms)"),
    ("p99_itl_ms", "p99 ITL (ms)"),
)
# Facts that name the setting in the title when every cell shares them.
SETTING = ("model", "gpu", "tp", "instances", "policy", "num_requests", "trace")


def x_key(table: list[dict[str, Any]], keys: list[str]) -> str | None:
    """The key to plot against: `rate` if swept, else a numeric key with several values."""

    def numeric(key: str) -> bool:
        values = {row[key] for row in table}
        return len(values) > 1 and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        )

    candidates = [k for k in keys if k != "seed" and numeric(k)]
    return "rate" if "rate" in candidates else next(iter(candidates), None)


def plot_sweep(table: list[dict[str, Any]], keys: list[str], path: str | os.PathLike) -> None:
    """PANELS against `x_key` (mean over seeds), one line per combination of the other swept
    keys; a ValueError when no swept key is numeric."""
    x = x_key(table, keys)
    if x is None:
        raise ValueError("no numeric key (such as rate) is swept over several values")
    others = [k for k in keys if k not in (x, "seed") and len({str(r[k]) for r in table}) > 1]
    groups: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in table:
        if not row["error"]:
            label = ", ".join(f"{k}={row[k]}" for k in others if row[k] is not None)
            groups[label or "all cells"][row[x]].append(row)
    # Lines that coincide in every panel are drawn once, named together: one cannot hide
    # another unnoticed.
    lines: dict[tuple, list[str]] = {}
    for label, points in groups.items():
        xs = tuple(sorted(points))
        ys = tuple(tuple(_mean(r.get(m) for r in points[v]) for v in xs) for m, _ in PANELS)
        lines.setdefault((xs, ys), []).append(label)
    fig = new_figure((11, 8.5))
    axes = fig.subplots(2, 2).ravel()
    for (xs, ys), labels in lines.items():
        for ax, y in zip(axes, ys):
            ax.plot(xs, y, marker="o", markersize=3, label=" = ".join(labels))
    for ax, (_, name) in zip(axes, PANELS):
        ax.set_yscale("log")
        ax.set_xlabel("arrival rate (requests/s)" if x == "rate" else x)
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    shared = [
        f"{k}={values.pop()}"
        for k in SETTING
        if k not in keys
        and len(values := {str(row["config"].get(k)) for row in table}) == 1
        and values != {"None"}
    ]
    seeds = len({row["seed"] for row in table}) if "seed" in keys else 1
    over = f", mean over {seeds} seeds" if seeds > 1 else ""
    fig.suptitle(f"Sweep of {len(table)} cells{over}: " + ", ".join(shared), fontsize="medium")
    fig.savefig(os.fspath(path), format="png", dpi=120)


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")
