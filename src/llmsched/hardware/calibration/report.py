"""A `FidelityReport` for people: Markdown tables against the issue's targets, the fitted
coefficients one per line, and a predicted-against-measured plot."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from llmsched.hardware.calibration.fidelity import FidelityReport, OperatorFit
from llmsched.hardware.calibration.fitting import Calibration
from llmsched.hardware.roofline import Efficiency

# Issue targets: median absolute relative error on held-out models.
TARGET_OPERATOR = 0.05
TARGET_LAYER = 0.08
ALLREDUCE_BANDS = ((0, 1 << 20), (1 << 20, 8 << 20), (8 << 20, math.inf))  # message bytes


def _pct(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{100 * x:.1f} %"


def format_report(report: FidelityReport, title: str | None = None) -> str:
    """A Markdown table: median, mean and p90 absolute relative error and the median bias per
    operator, per model (median), for the whole layer and attention, against the issue targets."""
    models = list(report.models)
    short = [m.replace("-hf", "").replace("-Instruct", "") for m in models]
    lines = [f"### {title}" if title else f"### Fidelity on {report.gpu}: {', '.join(models)}", ""]
    head = "| operator | rows | median | MAPE | p90 | bias | " + " | ".join(short) + " |"
    lines += [head, "|" + "---|" * (6 + len(models))]

    def row(name: str, f: OperatorFit) -> str:
        cells = [
            name,
            str(len(f.measured)),
            _pct(f.median_ape()),
            _pct(f.mape()),
            _pct(f.p90_ape()),
            f"{100 * f.bias():+.1f} %",
        ]
        cells += [_pct(f.median_ape(f.model == m)) if (f.model == m).any() else "—" for m in models]
        return "| " + " | ".join(cells) + " |"

    for op, f in report.operators.items():
        lines.append(row(op, f))
    if report.operators:
        all_ape = np.concatenate([f.ape for f in report.operators.values()])
        cells = ["**all operators**", str(len(all_ape)), f"**{_pct(report.overall())}**"]
        cells += [_pct(float(np.mean(all_ape))), _pct(float(np.quantile(all_ape, 0.9))), ""]
        cells += [
            _pct(
                float(
                    np.median(
                        np.concatenate([f.ape[f.model == m] for f in report.operators.values()])
                    )
                )
            )
            for m in models
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if report.elementwise is not None:
        lines.append(row("element-wise sum (RooflineModel)", report.elementwise))
    if report.layer is not None:
        lines.append(row("**decoder layer** (RooflineModel)", report.layer))
    lines.append("")
    if report.attention:
        owners = sorted(set(np.concatenate([f.model for f in report.attention.values()])))
        lines += [
            f"Attention ({report.attention_rows} rows of {', '.join(owners)}):",
            "",
            "| attention | rows | median | MAPE | p90 | bias |",
            "|---|---|---|---|---|---|",
        ]
        for op, f in report.attention.items():
            cells = [op, str(len(f.measured)), _pct(f.median_ape()), _pct(f.mape())]
            cells += [_pct(f.p90_ape()), f"{100 * f.bias():+.1f} %"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if report.allreduce is not None:
        lines += _allreduce_table(report.allreduce, report.allreduce_rows)
    ops = report.operators
    if ops:
        worst = max(ops.values(), key=lambda f: f.median_ape())
        ok_ops = [op for op, f in ops.items() if f.median_ape() <= TARGET_OPERATOR]
        lines.append(
            f"Targets: per-operator median ≤ {100 * TARGET_OPERATOR:.0f} %: "
            f"{len(ok_ops)}/{len(ops)} operators "
            f"(overall {_pct(report.overall())}; worst {worst.op} {_pct(worst.median_ape())}); "
            + (
                f"decoder layer ≤ {100 * TARGET_LAYER:.0f} %: {_pct(report.layer.median_ape())} "
                + ("(met)" if report.layer.median_ape() <= TARGET_LAYER else "(not met)")
                if report.layer is not None
                else ""
            )
        )
    return "\n".join(lines).rstrip() + "\n"


def _allreduce_table(f: OperatorFit, rows: str) -> list[str]:
    """Median error (bias) of the all-reduce per TP degree and band of message sizes."""

    def band(lo: float, hi: float) -> str:
        if hi == math.inf:
            return f"≥ {lo / (1 << 20):g} MiB"
        return (
            f"< {hi / (1 << 20):g} MiB" if lo == 0 else f"{lo / (1 << 20):g}–{hi / (1 << 20):g} MiB"
        )

    lines = [
        f"All-reduce ({rows} rows of {', '.join(dict.fromkeys(f.model))}): median error "
        "(median bias)",
        "",
        "| TP | rows | all sizes | " + " | ".join(band(*b) for b in ALLREDUCE_BANDS) + " |",
        "|---|---|---|" + "---|" * len(ALLREDUCE_BANDS),
    ]
    signed = f.predicted / f.measured - 1
    for tp in np.unique(f.tp):
        cells = [str(int(tp)), str(int((f.tp == tp).sum()))]
        for lo, hi in ((0, math.inf), *ALLREDUCE_BANDS):
            m = (f.tp == tp) & (f.tokens >= lo) & (f.tokens < hi)
            cells.append(
                f"{_pct(f.median_ape(m))} ({100 * float(np.median(signed[m])):+.0f} %)"
                if m.any()
                else "—"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def format_efficiency(cal: Calibration | Efficiency) -> str:
    """The fitted coefficients, one per line."""
    eff = cal.efficiency if isinstance(cal, Calibration) else cal
    lines = []
    for f in dataclasses.fields(eff):
        v = getattr(eff, f.name)
        if f.name.endswith("_s"):
            text = f"{v * 1e6:.2f} µs"
        elif isinstance(v, float):
            text = f"{v:.4f}"
        else:
            text = str(v)
        lines.append(f"  {f.name:24s} {text}")
    if isinstance(cal, Calibration):
        lines.append(
            "  element-wise kernels     "
            + ", ".join(f"{k} {v:.3f}" for k, v in cal.elementwise.items())
        )
    return "\n".join(lines) + "\n"


def plot_fidelity(report: FidelityReport, path: str | os.PathLike[str]) -> None:
    """Predicted against measured time (µs, log-log) per operator, the layer and attention, one
    colour per model, with the y = x line and ±20 % bands. Needs matplotlib (Agg canvas; pyplot's
    state is not touched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib, which is not installed: pip install llmsched[plot]"
        ) from exc
    fits = list(report.operators.values())
    if report.elementwise is not None:
        fits.append(report.elementwise)
    if report.layer is not None:
        fits.append(report.layer)
    fits += list(report.attention.values())
    if report.allreduce is not None:
        fits.append(report.allreduce)
    if not fits:
        raise ValueError("nothing to plot: the report has no rows")
    ncol = 4
    nrow = -(-len(fits) // ncol)
    fig = Figure(figsize=(4 * ncol, 3.6 * nrow), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    models = list(dict.fromkeys(np.concatenate([f.model for f in fits])))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    for ax, f in zip(axes, fits):
        x, y = f.measured * 1e6, f.predicted * 1e6
        for m in dict.fromkeys(f.model):
            s = f.model == m
            ax.scatter(x[s], y[s], s=4, alpha=0.5, color=colors[m], label=str(m), linewidths=0)
        lo = float(min(x.min(), y.min())) * 0.8
        hi = float(max(x.max(), y.max())) * 1.25
        line = np.array([lo, hi])
        ax.plot(line, line, "k-", lw=0.8)
        ax.plot(line, line * 1.2, "k:", lw=0.6)
        ax.plot(line, line / 1.2, "k:", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{f.op}: median {_pct(f.median_ape())}", fontsize="medium")
        ax.set_xlabel("measured (µs)")
        ax.set_ylabel("predicted (µs)")
        ax.grid(True, which="both", alpha=0.2)
    for ax in axes[len(fits) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes[: len(fits)]:
        for h, lab in zip(*ax.get_legend_handles_labels()[::-1]):
            seen.setdefault(h, lab)
    fig.legend(
        [seen[m] for m in models if m in seen],
        [m for m in models if m in seen],
        loc="outside lower center",
        ncol=min(len(models), 6),
        markerscale=4,
    )
    fig.suptitle(f"Roofline fidelity on {report.gpu} ({report.attention_rows} attention rows)")
    fig.savefig(os.fspath(path), format="png", dpi=110)
