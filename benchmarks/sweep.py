"""What running a sweep's cells costs beyond the simulations: local processes and Ray.

    .venv/bin/python benchmarks/sweep.py    # 200 cells on local x1, local x2 and Ray x2, 3 times
    .venv/bin/python benchmarks/sweep.py --seeds 2 --repeats 1   # 20 cells once: a quick look

The sweep: fcfs and sarathi at 5 rates (2-10 req/s) with 20 seeds each, 100 synthetic requests
per cell (Llama-3-8B, one A100-80GB): 200 small cells, where the cost of handing cells out and
gathering results shows. Each backend starts from an empty results folder. Per backend:

- start: creating the executor and starting its workers with the simulator imported (Ray:
  starting a local Ray too; both are paid once per sweep, or once per Ray session);
- wall: running every cell and storing its result;
- cell time: the sum of the cells' own times (measured in the workers: workload and simulation);
- overhead per cell: (wall x workers - cell time) / cells, the worker time not spent simulating;
- speedup: local x1's wall over this backend's.

The backends take turns, each --repeats times, and each figure is reported as its median (this
machine is shared: other work slows whichever run it meets). All runs must give identical
tables (checked). Results go to stdout and benchmarks/results/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

from llmsched.parallel import make_executor
from llmsched.sweep import read_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
CASES = (("local", 1), ("local", 2), ("ray", 2))


def sweep_file(folder: Path, seeds: int) -> Path:
    spec = {
        "base": {"num_requests": 100, "model": "llama-3-8b", "gpu": "a100-80gb"},
        "grid": {
            "policy": ["fcfs", "sarathi"],
            "rate": [2, 4, 6, 8, 10],
            "seed": list(range(seeds)),
        },
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _warm(_: int) -> int:
    """Start a worker and import the simulator in it."""
    import llmsched.experiment  # noqa: F401

    return os.getpid()


def measure(sweep, backend: str, workers: int, out: Path) -> tuple[dict, list]:
    start = time.perf_counter()
    with make_executor(backend, workers) as executor:
        list(executor.map_unordered(_warm, range(2 * workers)))
        started = time.perf_counter()
        table, done = run_sweep(sweep, out, executor)
        wall = time.perf_counter() - started
    assert not done.errors, done.errors
    cells = len(table)
    cell_time = sum(row["sim_seconds"] for row in table)
    return {
        "backend": backend,
        "workers": workers,
        "cells": cells,
        "start_s": round(started - start, 3),
        "wall_s": round(wall, 3),
        "cell_time_s": round(cell_time, 3),
        "mean_cell_ms": round(1000 * cell_time / cells, 2),
        "overhead_per_cell_ms": round(1000 * (wall * workers - cell_time) / cells, 2),
        "cells_per_s": round(cells / wall, 1),
    }, [{k: v for k, v in row.items() if k != "sim_seconds"} for row in table]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds per (policy, rate): 20")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each backend: 3")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/sweep.json"))
    args = parser.parse_args()
    runs: dict[tuple[str, int], list[dict]] = {case: [] for case in CASES}
    tables = []
    load_before = os.getloadavg()[0]  # other work on a shared machine shows in the times
    with tempfile.TemporaryDirectory() as tmp:
        sweep = read_sweep(sweep_file(Path(tmp), args.seeds))
        for repeat in range(args.repeats):  # backends take turns: a busy minute hits them all
            for backend, workers in CASES:
                out = Path(tmp) / f"{backend}{workers}-{repeat}"
                result, table = measure(sweep, backend, workers, out)
                runs[backend, workers].append(result)
                tables.append(table)
                print(json.dumps(result), flush=True)
    same = all(t == tables[0] for t in tables)
    results = [median_run(r) for r in runs.values()]
    for r in results:  # what a user sees: how much sooner the table is ready than on 1 process
        r["speedup_vs_local_1"] = round(results[0]["wall_s"] / r["wall_s"], 2)
    print(
        f"\nmedians of {args.repeats} runs\n{'backend':8s} {'workers':>7s} {'start s':>8s} "
        f"{'wall s':>7s} {'cell s':>7s} {'ms/cell':>8s} {'overhead ms/cell':>17s} {'speedup':>8s}"
    )
    for r in results:
        print(
            f"{r['backend']:8s} {r['workers']:7d} {r['start_s']:8.2f} {r['wall_s']:7.2f} "
            f"{r['cell_time_s']:7.2f} {r['mean_cell_ms']:8.1f} {r['overhead_per_cell_ms']:17.1f} "
            f"{r['speedup_vs_local_1']:8.2f}"
        )
    print(f"identical tables on every backend and run: {same}")
    report = {
        "date": date.today().isoformat(),
        "machine": f"{_cpu()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "ray": _version("ray"),
        "command": f"python benchmarks/sweep.py --seeds {args.seeds} --repeats {args.repeats}",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "identical_results": same,
        "medians": results,
        "runs": [r for case in runs.values() for r in case],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if same else 1


def median_run(runs: list[dict]) -> dict:
    """Each figure's median over the runs (per figure: they need not come from one run)."""
    figures = [k for k, v in runs[0].items() if isinstance(v, float)]
    return runs[0] | {k: round(statistics.median(r[k] for r in runs), 3) for k in figures}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
