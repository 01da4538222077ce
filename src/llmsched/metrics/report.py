"""Reports of a run's metrics: per-request CSV, vLLM-style console block, comparison table, plot."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llmsched.metrics.summary import CSV_COLUMNS, CSV_HEADER, MetricsCollector

# --------------------------------------------------------------------------------------------
# Per-request CSV
# --------------------------------------------------------------------------------------------


def _csv_cells(column: np.ndarray) -> list[str]:
    """A column's cells as text: floats with full precision (``repr``), NaN as an empty cell."""
    values = column.tolist()
    if column.dtype.kind == "f":
        return ["" if math.isnan(v) else repr(v) for v in values]
    if column.dtype.kind in "iub":
        return [str(v) for v in values]
    return values


def write_requests_csv(collector: MetricsCollector, path: str | os.PathLike[str]) -> None:
    """Write one row per request (finished and rejected), columns :data:`CSV_COLUMNS` under the
    header :data:`CSV_HEADER` (a time's name ends in `_s`).

    Times are in seconds since the run's start, written with full float precision; an undefined
    value (NaN: e.g. the TPOT of a one-token request, every time of a rejected request) and a
    missing tier are empty cells. A rejected request's token counts are those it asked for.
    """
    cols = collector.columns()
    data = [_csv_cells(cols[name]) for name in CSV_COLUMNS]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        writer.writerows(zip(*data))


# --------------------------------------------------------------------------------------------
# Console block
# --------------------------------------------------------------------------------------------

_WIDTH = 50


def _line(label: str, value: Any, fmt: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "n/a"
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        text = str(int(value))
    else:
        text = format(float(value), fmt)
    return f"{label:<40} {text:<10}".rstrip()


def _rule(title: str, fill: str = "-") -> str:
    return "{s:{c}^{n}}".format(s=title, n=_WIDTH, c=fill)


_SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as vLLM's "Serving Benchmark Result" console block (plus an extensions part).

    Lines appear in vLLM's order; "Request goodput" only when goodput SLOs were given. Missing or
    undefined values read ``n/a``.
    """
    s = summary
    lines = [
        _rule(" Serving Benchmark Result ", "="),
        _line("Successful requests:", s.get("completed")),
        _line("Failed requests:", s.get("failed")),
        _line("Benchmark duration (s):", s.get("duration")),
        _line("Total input tokens:", s.get("total_input_tokens")),
        _line("Total generated tokens:", s.get("total_output_tokens")),
        _line("Request throughput (req/s):", s.get("request_throughput")),
    ]
    if s.get("request_goodput") is not None:
        lines.append(_line("Request goodput (req/s):", s["request_goodput"]))
    lines += [
        _line("Output token throughput (tok/s):", s.get("output_throughput")),
        _line("Peak concurrent requests:", s.get("max_concurrent_requests")),
        _line("Total Token throughput (tok/s):", s.get("total_token_throughput")),
    ]
    for key, short, title in _SECTIONS:
        lines.append(_rule(title))
        lines.append(_line(f"Mean {short} (ms):", s.get(f"mean_{key}_ms")))
        lines.append(_line(f"Median {short} (ms):", s.get(f"median_{key}_ms")))
        lines.append(_line(f"P99 {short} (ms):", s.get(f"p99_{key}_ms")))

    # llmsched extensions (only the ones the summary carries).
    ext: list[str] = []
    if "mean_ttft_any_ms" in s:
        ext.append(_line("Mean TTFT, any token (ms):", s.get("mean_ttft_any_ms")))
        ext.append(_line("P99 TTFT, any token (ms):", s.get("p99_ttft_any_ms")))
    if "mean_queue_time_ms" in s:
        ext.append(_line("Mean queue time (ms):", s.get("mean_queue_time_ms")))
        ext.append(_line("P99 queue time (ms):", s.get("p99_queue_time_ms")))
    if "total_preemptions" in s:
        ext.append(_line("Preemptions:", s.get("total_preemptions")))
    if "total_migrations" in s:
        ext.append(_line("Migrations:", s.get("total_migrations")))
    if s.get("slo_attainment") is not None:
        ext.append(_line("SLO attainment (%):", 100.0 * s["slo_attainment"]))
    if s.get("skipped_trace_rows"):
        ext.append(_line("Skipped trace rows (unservable):", s["skipped_trace_rows"]))
    examples = s.get("rejected_examples") or {}
    for reason, count in (s.get("rejected_reasons") or {}).items():
        ext.append(_rejected_line(reason, count, examples.get(reason, [])))
    if ext:
        lines.append(_rule("llmsched extensions"))
        lines += ext
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def _rejected_line(reason: str, count: int, examples: Sequence[Mapping[str, Any]]) -> str:
    """One line per reason, however many requests it rejected, with a few of them."""
    line = f"Rejected, {reason}: {count}"
    if examples:
        shown = ", ".join(
            f"{e['request_id']} ({e['prompt_tokens']} + {e['output_tokens']})" for e in examples
        )
        line += f"; e.g. {shown} tokens"
    return line


# --------------------------------------------------------------------------------------------
# Comparison table
# --------------------------------------------------------------------------------------------

#: Summary keys of :func:`format_comparison`'s default columns.
DEFAULT_COMPARISON_METRICS: tuple[str, ...] = (
    "completed",
    "failed",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p90_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "p99_tpot_ms",
    "p99_itl_ms",
    "mean_e2el_ms",
    "p99_e2el_ms",
)

_HEADERS = {
    "completed": "done",
    "failed": "failed",
    "duration": "dur s",
    "request_throughput": "req/s",
    "request_goodput": "good req/s",
    "output_throughput": "out tok/s",
    "total_token_throughput": "tok/s",
    "max_concurrent_requests": "peak conc",
    "total_preemptions": "preempt",
    "total_migrations": "migr",
    "slo_attainment": "SLO att",
    "answer_slo_violation_rate": "ans viol",
}
# Reasoning workloads add the answering phase's columns (PASCAL).
ANSWER_METRICS: tuple[str, ...] = ("answer_slo_violation_rate", "p99_answer_gap_ms")
_SHORT = {
    "ttft": "TTFT",
    "tpot": "TPOT",
    "itl": "ITL",
    "e2el": "E2EL",
    "ttft_any": "TTFT*",
    "queue_time": "queue",
    "answer_gap": "ans gap",
}


def _header(key: str) -> str:
    if key in _HEADERS:
        return _HEADERS[key]
    if key.endswith("_ms"):
        stat, _, rest = key[:-3].partition("_")
        if rest in _SHORT:
            return f"{_SHORT[rest]} {stat}"
    return key


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.2f}"
    return str(value)


def format_comparison(
    summaries: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] | None = None
) -> str:
    """An aligned text table, one row per policy (the mapping's keys), latencies in ms.

    ``metrics``: summary keys to show as columns; default :data:`DEFAULT_COMPARISON_METRICS`, plus
    ``request_goodput`` when any summary has one. A missing or undefined value reads ``-``.
    """
    if metrics is None:
        metrics = list(DEFAULT_COMPARISON_METRICS)
        if any(s.get("request_goodput") is not None for s in summaries.values()):
            metrics.insert(metrics.index("request_throughput") + 1, "request_goodput")
        if any(s.get("answer_requests") for s in summaries.values()):
            metrics += ANSWER_METRICS
    header = ["policy", *(_header(m) for m in metrics)]
    body = [[str(name), *(_cell(s.get(m)) for m in metrics)] for name, s in summaries.items()]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in body]
    lines.append("(latencies in ms; throughputs per second of run duration)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------

_MAX_POINTS = 2000  # points per CDF line; large runs are thinned to evenly spaced quantiles


def _ecdf(values_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(np.asarray(values_s, dtype=np.float64)) * 1000.0
    x = x[x > 0]  # a log axis cannot show 0
    n = len(x)
    y = np.arange(1, n + 1) / n
    if n > _MAX_POINTS:
        idx = np.unique(np.linspace(0, n - 1, _MAX_POINTS).round().astype(np.int64))
        x, y = x[idx], y[idx]
    return x, y


def plot_distributions(
    collectors: Mapping[str, MetricsCollector], path: str | os.PathLike[str]
) -> None:
    """One PNG with the empirical CDFs of TTFT and of E2E latency (ms, log x) for each policy.

    Needs matplotlib (``pip install llmsched[plot]``); uses the Agg canvas directly, so it neither
    needs a display nor changes pyplot's global backend.
    """
    fig = _figure((11, 4.5))
    axes = fig.subplots(1, 2)
    panels = (
        ("ttft", "TTFT (ms)", "Time to first token"),
        ("e2el", "E2E latency (ms)", "End-to-end latency"),
    )
    for ax, (col, xlabel, title) in zip(axes, panels):
        plotted = False
        for name, collector in collectors.items():
            x, y = _ecdf(collector.finished_values(col))
            if len(x):
                ax.step(x, y, where="post", label=str(name))
                plotted = True
        if plotted:
            ax.set_xscale("log")
            ax.legend(fontsize="small")
        else:
            ax.text(
                0.5, 0.5, "no finished requests", ha="center", va="center", transform=ax.transAxes
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of finished requests ≤ x")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Latency distributions by policy")
    fig.savefig(os.fspath(path), format="png", dpi=120)


def _figure(size: tuple[float, float]):
    """A matplotlib figure on the Agg canvas (no display, pyplot's state untouched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib, which is not installed: pip install llmsched[plot]"
        ) from exc
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_capacity(results: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """For each SLO condition, its measured value (ms, mean over seeds) against the arrival rate,
    one line per policy and tier, with the limit and each policy's capacity marked.

    ``results`` maps a policy to :meth:`llmsched.capacity.CapacityResult.as_dict` output plus
    ``"limits_ms"`` ({condition: {tier or "all": limit}})."""
    conditions = sorted(
        {c for r in results.values() for e in r["evaluations"] for c in e["values"]}
    )
    fig = _figure((5.5 * max(1, len(conditions)), 4.2))
    axes = fig.subplots(1, max(1, len(conditions)), squeeze=False)[0]
    colors = [f"C{i}" for i in range(10)]
    styles = ["-", "--", ":", "-."]
    for ax, cond in zip(axes, conditions):
        for index, (policy, r) in enumerate(results.items()):
            color = colors[index % len(colors)]
            series: dict[str, dict[float, list[float]]] = {}
            for e in r["evaluations"]:
                for tier, value in e["values"].get(cond, {}).items():
                    if value is not None:
                        series.setdefault(tier, {}).setdefault(e["rate"], []).append(value)
            for j, (tier, points) in enumerate(sorted(series.items())):
                rates = sorted(points)
                label = policy if tier == "all" else f"{policy} ({tier})"
                ax.plot(
                    rates,
                    [np.mean(points[x]) for x in rates],
                    marker="o",
                    markersize=3,
                    color=color,
                    linestyle=styles[j % len(styles)],
                    label=label,
                )
            ax.axvline(r["capacity_rps"], color=color, linestyle=":", alpha=0.7)
        limits = next(iter(results.values())).get("limits_ms", {}).get(cond, {})
        for tier, limit in limits.items():
            ax.axhline(limit, color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                f"limit {tier}",
                (0, limit),
                xycoords=("axes fraction", "data"),
                fontsize="x-small",
                va="bottom",
            )
        ax.set_yscale("log")
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(f"{cond} (ms)")
        ax.set_title(cond)
        ax.legend(fontsize="x-small")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("SLO metrics against load (dotted: each policy's capacity)")
    fig.savefig(os.fspath(path), format="png", dpi=120)
