"""Reports of a run's metrics: per-request CSV, vLLM-style console block, comparison table, plot."""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llmsched.metrics.summary import CSV_COLUMNS, CSV_HEADER, MetricsCollector

# --------------------------------------------------------------------------------------------
# Per-request CSV
# --------------------------------------------------------------------------------------------


CSV_BLOCK = 1 << 13  # rows formatted at a time (as text: ~2 KB a row)


def _csv_cells(column: np.ndarray) -> list[str]:
    """A column's cells as text: floats with full precision (``repr``), NaN as an empty cell."""
    values = column.tolist()
    if column.dtype.kind == "f":
        cells = list(map(float.__repr__, values))
        for i in np.flatnonzero(np.isnan(column)).tolist():
            cells[i] = ""
        return cells
    if column.dtype.kind in "iub":
        return list(map(str, values))
    return values


def write_requests_csv(collector: MetricsCollector, path: str | os.PathLike[str]) -> None:
    """Write one row per request (finished and rejected), columns :data:`CSV_COLUMNS` under the
    header :data:`CSV_HEADER` (a time's name ends in `_s`).

    Times are in seconds since the run's start, written with full float precision; an undefined
    value (NaN: e.g. the TPOT of a one-token request, every time of a rejected request) and a
    missing tier are empty cells. A rejected request's token counts are those it asked for.
    """
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        # A block of rows at a time: a million rows' cells at once would be gigabytes of str.
        for start in range(0, len(collector), CSV_BLOCK):
            cols = collector.columns(slice(start, start + CSV_BLOCK))
            writer.writerows(zip(*[_csv_cells(cols[name]) for name in CSV_COLUMNS]))


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


def format_summary(summary: Mapping[str, Any], title: str | None = None) -> str:
    """The summary as vLLM's "Serving Benchmark Result" console block (plus an extensions part),
    under `title` (the model, GPU, load and workload: experiment.run_title) when given.

    Lines appear in vLLM's order; "Request goodput" only when goodput SLOs were given. Missing or
    undefined values read ``n/a``.
    """
    s = summary
    lines = [title] if title else []
    lines += [
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
    if s.get("prefix_cache") == "on":
        rate = s.get("prefix_cache_hit_rate")
        ext.append(_line("Prefix cache hit rate (%):", None if rate is None else 100.0 * rate))
    elif s.get("prefix_cache"):  # off, or nothing to share
        ext.append(f"Prefix cache: {s['prefix_cache']}")
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
    summaries: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """An aligned text table, one row per policy (the mapping's keys), latencies in ms, under
    `title` (the model, GPU, load and workload: experiment.run_title) when given.

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

    lines = [title] if title else []
    lines += [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in body]
    lines.append("(latencies in ms; throughputs per second of run duration)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------

_MAX_POINTS = 2000  # points per CDF line; large runs are thinned to evenly spaced quantiles
# Curves closer than this, relative, at every point lie on top of each other (about a line's
# width on a log axis spanning three decades): they are drawn once, and the legend names them all.
_SAME = 0.03
_QUANTILES = np.arange(1, 100)  # where two CDFs are compared (their extreme tails left aside)


def _ecdf(values_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(np.asarray(values_ms, dtype=np.float64))
    x = x[x > 0]  # a log axis cannot show 0
    n = len(x)
    y = np.arange(1, n + 1) / n
    if n > _MAX_POINTS:
        idx = np.unique(np.linspace(0, n - 1, _MAX_POINTS).round().astype(np.int64))
        x, y = x[idx], y[idx]
    return x, y


def coinciding(
    shapes: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray] | None = None
) -> list[tuple[list[str], bool]]:
    """Curves grouped by those that would hide each other, in the given order: each group's
    names and whether its curves are identical. Curves coincide when their `shapes` (the points
    compared) agree within 3 % at every point; they are identical when their `data` (default:
    the shapes) are equal."""
    data = shapes if data is None else data
    groups: list[tuple[list[str], str, list[bool]]] = []
    for name, values in shapes.items():
        v = np.asarray(values, dtype=np.float64)
        for names, first, exact in groups:
            ref = np.asarray(shapes[first], dtype=np.float64)
            if len(ref) == len(v) and np.allclose(v, ref, rtol=_SAME, atol=0.0):
                names.append(name)
                exact[0] = exact[0] and np.array_equal(data[name], data[first])
                break
        else:
            groups.append(([name], name, [True]))
    return [(names, exact[0]) for names, _, exact in groups]


def _label(names: Sequence[str], exact: bool) -> str:
    if len(names) == 1:
        return names[0]
    if exact:
        return " = ".join(names) + " (identical)"
    return " ≈ ".join(names) + f" (within {100 * _SAME:.0f} %)"


def _plain_log_axis(axis, low: float, high: float) -> None:
    """Log-scale tick labels as plain numbers (50, 200, 1000), not 5×10¹; the 2s and 5s between
    powers of ten labelled too when the axis spans two decades or less (else they would crowd)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(plain if high <= 100 * low else NullFormatter())


def plot_distributions(
    collectors: Mapping[str, MetricsCollector],
    path: str | os.PathLike[str],
    title: str | None = None,
):
    """One PNG with the empirical CDFs of TTFT and of E2E latency (ms, log x) for each policy,
    under `title` (the model, GPU, load and workload). Policies whose curves coincide are drawn
    once and named together in the legend.

    Needs matplotlib (``pip install llmsched[plot]``); uses the Agg canvas directly, so it neither
    needs a display nor changes pyplot's global backend. Returns the figure.
    """
    fig = new_figure((11, 4.8))
    axes = fig.subplots(1, 2)
    panels = (
        ("ttft", "TTFT (ms)", "Time to first token"),
        ("e2el", "E2E latency (ms)", "End-to-end latency"),
    )
    colors = {str(name): f"C{i % 10}" for i, name in enumerate(collectors)}
    for ax, (col, xlabel, panel_title) in zip(axes, panels):
        values = {
            str(name): np.sort(c.finished_values(col)) * 1000.0 for name, c in collectors.items()
        }
        shapes = {name: np.percentile(v, _QUANTILES) if len(v) else v for name, v in values.items()}
        drawn = []
        for names, exact in coinciding(shapes, values):
            x, y = _ecdf(values[names[0]])
            if len(x):
                color = colors[names[0]]  # a policy's colour in both panels
                ax.step(x, y, where="post", color=color, label=_label(names, exact))
                drawn.append(x)
        if drawn:
            ax.set_xscale("log")
            _plain_log_axis(ax.xaxis, min(x[0] for x in drawn), max(x[-1] for x in drawn))
            ax.legend(fontsize="small")
        else:
            ax.text(
                0.5, 0.5, "no finished requests", ha="center", va="center", transform=ax.transAxes
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of finished requests ≤ x")
        ax.set_title(panel_title)
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Latency distributions by policy" + (f"\n{title}" if title else ""))
    fig.savefig(os.fspath(path), format="png", dpi=120)
    return fig


def new_figure(size: tuple[float, float]):
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


_METRIC_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def _condition_parts(condition: str) -> tuple[str, str, str]:
    """`"p99_itl<=tier"` → ("p99 ITL", "≤", "tier")."""
    stat_metric, op, limit = re.match(r"^(\w+?)(<=|<)(.*)$", condition).groups()
    stat, _, metric = stat_metric.partition("_")
    return f"{stat} {_METRIC_NAMES.get(metric, metric)}", "≤" if op == "<=" else "<", limit


def plot_capacity(
    results: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None
):
    """For each SLO condition, its measured value (ms, mean over seeds) against the arrival rate,
    one line per policy and tier, with each limit and each policy's capacity (dotted) marked;
    `title` names the model, GPU and workload. Curves that coincide are drawn once and named
    together in the legend, below the panels.

    ``results`` maps a policy to :meth:`llmsched.capacity.CapacityResult.as_dict` output plus
    ``"limits_ms"`` ({condition: {tier or "all": limit}}). Returns the figure."""
    from matplotlib.lines import Line2D

    conditions = sorted(
        {c for r in results.values() for e in r["evaluations"] for c in e["values"]}
    )
    fig = new_figure((5.5 * max(1, len(conditions)), 4.8))
    axes = fig.subplots(1, max(1, len(conditions)), squeeze=False)[0]
    colors = {policy: f"C{i % 10}" for i, policy in enumerate(results)}
    tiers = sorted(
        {t for r in results.values() for lim in r.get("limits_ms", {}).values() for t in lim}
    )
    styles = {tier: ("-", "--", "-.", (0, (5, 1, 1, 1)))[i % 4] for i, tier in enumerate(tiers)}
    legend: dict[str, Any] = {}
    for ax, cond in zip(axes, conditions):
        curves, drawn = {}, {}  # label → (rates, values) and how to draw it
        for policy, r in results.items():
            points: dict[str, dict[float, list[float]]] = {}
            for e in r["evaluations"]:
                for tier, value in e["values"].get(cond, {}).items():
                    if value is not None:
                        points.setdefault(tier, {}).setdefault(e["rate"], []).append(value)
            for tier, by_rate in sorted(points.items()):
                rates = sorted(by_rate)
                name = policy if tier == "all" else f"{policy} ({tier})"
                curves[name] = (rates, [float(np.mean(by_rate[x])) for x in rates])
                drawn[name] = (colors[policy], styles.get(tier, "-"))
            ax.axvline(r["capacity_rps"], color=colors[policy], linestyle=":", alpha=0.8)
        shapes = {name: np.concatenate(curve) for name, curve in curves.items()}
        for names, exact in coinciding(shapes):
            rates, values = curves[names[0]]
            color, style = drawn[names[0]]
            label = _label(names, exact)
            (line,) = ax.plot(
                rates, values, marker="o", markersize=3, color=color, linestyle=style, label=label
            )
            legend.setdefault(label, line)
        limits = next(iter(results.values())).get("limits_ms", {}).get(cond, {})
        for tier, limit in limits.items():
            ax.axhline(limit, color="grey", linestyle=styles.get(tier, "--"), linewidth=1)
            text = f"limit {limit:g} ms" if tier == "all" else f"{tier}'s limit {limit:g} ms"
            ax.annotate(
                text,
                (0.01, limit),
                xycoords=("axes fraction", "data"),
                xytext=(0, 2),
                textcoords="offset points",
                fontsize="x-small",
                color="dimgrey",
                va="bottom",
            )
        # The limits inside the panel, with room for their labels above them.
        shown = [v for _, values in curves.values() for v in values] + list(limits.values())
        ax.set_yscale("log")
        if shown:
            ax.set_ylim(min(shown) / 1.3, max(shown) * 1.6)
            _plain_log_axis(ax.yaxis, min(shown) / 1.3, max(shown) * 1.6)
        quantity, op, limit = _condition_parts(cond)
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(f"{quantity} (ms)")
        ax.set_title(f"{quantity} {op} " + ("each tier's target" if limit == "tier" else limit))
        ax.grid(True, which="both", alpha=0.3)
    legend["each policy's capacity"] = Line2D([], [], color="grey", linestyle=":")
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="outside lower center",
        ncols=min(4, len(legend)),
        fontsize="small",
    )
    fig.suptitle("SLO metrics against load" + (f"\n{title}" if title else ""))
    fig.savefig(os.fspath(path), format="png", dpi=120)
    return fig
