"""Running a sweep's cells on an executor, resumably, and gathering them into one table.

Each finished cell's result is written at once to ``OUT/cells/<id>.json`` (id: a hash of its
resolved config), so a sweep stopped halfway, or rerun after cells were added, runs only the
cells without a result. A result file that does not read back as the same config's result
(cut short, edited) is reported and its cell run again. The stored results are the simulator's
of the day: delete ``OUT/cells`` after changing llmsched to run everything again.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmsched.config import SimulationConfig
from llmsched.parallel import Executor
from llmsched.sweep.spec import Cell, Sweep, swept_value

# The summary's fields in the table (the whole summary stays in each cell's file).
METRICS = (
    "completed",
    "failed",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "p99_itl_ms",
    "mean_e2el_ms",
    "median_e2el_ms",
    "p99_e2el_ms",
    "slo_attainment",
    "answer_slo_violation_rate",
    "total_preemptions",
    "total_migrations",
)


def run_cell(config: SimulationConfig) -> dict[str, Any]:
    """One simulation, in a worker: its summary and its own time, or the error that stopped it
    (recorded in the table rather than ending the sweep)."""
    from llmsched.experiment import simulate

    start = time.perf_counter()
    try:
        summary = simulate(config).summary
    except Exception as err:  # any failure is this cell's, reported in its row
        return {"error": f"{type(err).__name__}: {err}"}
    summary.pop("sim_wall_seconds", None)  # the time is kept apart: a summary is reproducible
    return {"summary": summary, "seconds": time.perf_counter() - start}


@dataclass
class Plan:
    """What a run of the sweep has to do: results already stored, and cells still to run."""

    done: dict[str, dict[str, Any]]  # cell id -> stored result
    todo: list[Cell]
    corrupt: list[Path] = field(default_factory=list)  # unreadable results, run again
    errors: dict[str, str] = field(default_factory=dict)  # cell id -> error, this run's


def cell_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / f"{cell.id}.json"


def plan(sweep: Sweep, out: str | Path) -> Plan:
    out = Path(out)
    result = Plan({}, [])
    for cell in sweep.cells:
        path = cell_path(out, cell)
        if not path.exists():
            result.todo.append(cell)
            continue
        try:
            record = json.loads(path.read_text())
            if record.get("config") != _as_json(cell.config.to_dict()):
                raise ValueError("another config")
            if not isinstance(record.get("summary"), dict):
                raise ValueError("no summary")
        except (ValueError, AttributeError):  # bad JSON, not a mapping, or not this cell's
            result.corrupt.append(path)
            result.todo.append(cell)
            continue
        result.done[cell.id] = record
    return result


def run(plan: Plan, out: str | Path, executor: Executor, *, progress: bool = False) -> None:
    """Run the plan's cells, storing each result as it arrives (in plan.done) and each
    failure in plan.errors; a progress bar with the time left."""
    from tqdm import tqdm

    folder = Path(out) / "cells"
    folder.mkdir(parents=True, exist_ok=True)
    configs = [cell.config for cell in plan.todo]
    bar = tqdm(total=len(configs), unit="cell", desc="sweep", disable=not progress)
    with bar:
        for i, result in executor.map_unordered(run_cell, configs):
            cell = plan.todo[i]
            if "error" in result:
                plan.errors[cell.id] = result["error"]
                bar.set_postfix(failed=len(plan.errors))
            else:
                record = {"id": cell.id, "config": _as_json(cell.config.to_dict()), **result}
                _write_atomically(cell_path(Path(out), cell), json.dumps(record, indent=1))
                plan.done[cell.id] = record
            bar.update()


def run_sweep(
    sweep: Sweep, out: str | Path, executor: Executor, *, progress: bool = False
) -> tuple[list[dict[str, Any]], Plan]:
    """Run the cells without a stored result; the table of every cell, and the plan."""
    todo = plan(sweep, out)
    run(todo, out, executor, progress=progress)
    return rows(sweep, todo), todo


def rows(sweep: Sweep, plan: Plan) -> list[dict[str, Any]]:
    """One row per cell, in the sweep's order: its swept keys' resolved values, the summary's
    main metrics, its simulation time, its error if it failed, and its whole config."""
    table = []
    for cell in sweep.cells:
        record = plan.done.get(cell.id, {})
        summary = record.get("summary", {})
        row = {"cell": cell.id}
        row |= {key: swept_value(cell.config, key) for key in sweep.keys}
        row |= {name: summary.get(name) for name in METRICS}
        row["sim_seconds"] = record.get("seconds")
        row["error"] = plan.errors.get(cell.id, "" if record else "not run")
        row["config"] = _as_json(cell.config.to_dict())
        table.append(row)
    return table


def write_results(table: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """OUT/results.json (rows with their whole configs) and OUT/results.csv (without)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "results.json", out / "results.csv"
    _write_atomically(json_path, json.dumps(table, indent=1) + "\n")
    columns = [c for c in table[0] if c != "config"] if table else []
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in table:
            writer.writerow(_csv_cell(row[c]) for c in columns)
    return [csv_path, json_path]


def format_rows(table: list[dict[str, Any]], keys: list[str], limit: int = 20) -> str:
    """The first rows as a console table: the swept keys, a few metrics, errors."""
    metrics = ["request_throughput", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms"]
    columns = [*keys, *metrics] + (["error"] if any(row["error"] for row in table) else [])

    def text(row: dict[str, Any], column: str) -> str:
        value = row[column]
        if column in metrics and isinstance(value, int | float):
            return f"{value:.1f}"
        return _csv_cell(value)[:60]

    lines = [columns] + [[text(row, c) for c in columns] for row in table[:limit]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    out = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines]
    if len(table) > limit:
        out.append(f"... {len(table) - limit} more rows in results.csv")
    return "\n".join(out)


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _as_json(value: Any) -> Any:
    """What a value reads back as from JSON (tuples become lists): stored and fresh compare."""
    return json.loads(json.dumps(value, default=str))


def _write_atomically(path: Path, text: str) -> None:
    """A reader (or a rerun after a crash) sees the old file or the new one, never half."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
