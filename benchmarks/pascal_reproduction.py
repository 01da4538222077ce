"""PASCAL (Cho et al., HPCA 2026) reproduced in the simulator, with llmsched's pascal-slack.

    .venv/bin/python benchmarks/pascal_reproduction.py           # needs ../shared/data
    .venv/bin/python benchmarks/pascal_reproduction.py --quick   # fewer requests per run
    .venv/bin/python benchmarks/pascal_reproduction.py --recompute-only  # step 3 alone

For each workload (configs/pascal/alpaca-{equal,servegen,heavy}.yaml):
1. sweep FCFS over a grid of Poisson rates and pick Low / Medium / High: Low is the highest rate
   whose p99 TTFT is within 10 % of the lightest rate's, High the first at which it has grown
   1.5x (the sharp rise), Medium the grid rate between them;
2. at each load run every named run of the config (FCFS, RR, PASCAL, its two ablations and
   pascal-slack) on the identical requests and report TTFT p50/p90/p99, tail TTFT per
   reasoning-length bin, answering SLO violations (QoE < 0.95), throughput, P99 KV-transfer
   time and P99 blocking after `</think>` (the first answer token's wait);
3. vLLM V1 cannot swap: at Medium and High load run FCFS and PASCAL again with preemption by
   recompute instead of the configs' swap (`recompute` in the results). `--recompute-only` runs
   just this step, at the loads of an earlier full run's results file, and adds it there.
Results: stdout, benchmarks/results/pascal.json and docs/img/pascal_*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmsched.config import load_config  # noqa: E402
from llmsched.experiment import load_workload, simulate  # noqa: E402
from llmsched.metrics.qoe import tail_ttft_by_reasoning_bin  # noqa: E402

WORKLOADS = {  # FCFS sweep grids (req/s over 8 instances): the workloads differ ~4x in work
    "equal": (8, 12, 14, 16, 18, 20, 22),
    "servegen": (0.2, 0.3, 0.4, 0.5, 0.6, 0.8),
    "heavy": (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
}
RUNS = ("fcfs", "rr", "pascal", "pascal-nomig", "pascal-nonadaptive", "pascal-slack")
RECOMPUTE_RUNS, RECOMPUTE_LOADS = ("fcfs", "pascal"), ("medium", "high")  # step 3
RESULTS = ROOT / "benchmarks/results/pascal.json"


def run(workload: str, name: str, rate: float, n: int, preemption: str | None = None) -> dict:
    """One named run of the workload's config; `preemption` overrides the config's (swap)."""
    base = load_config(
        ROOT / f"configs/pascal/alpaca-{workload}.yaml",
        rate=rate,
        num_requests=n,
        preemption=preemption,
    )
    start = time.perf_counter()
    result = simulate(base.variant(name), load_workload(base))
    s, c = result.summary, result.collector
    fin = c.column("finished")
    bins = tail_ttft_by_reasoning_bin(c.column("ttft")[fin], c.column("reasoning_tokens")[fin])
    return {
        "workload": workload,
        "run": name,
        "rate": rate,
        "requests": n,
        "p50_ttft_s": s["median_ttft_ms"] / 1e3,
        "p90_ttft_s": s["p90_ttft_ms"] / 1e3,
        "p99_ttft_s": s["p99_ttft_ms"] / 1e3,
        "tail_ttft_by_bin": bins,
        "answer_slo_violation_rate": s["answer_slo_violation_rate"],
        "request_throughput": s["request_throughput"],
        "output_throughput": s["output_throughput"],
        "p99_kv_transfer_ms": s["p99_migration_ms"],
        "p99_blocking_ms": s["p99_answer_gap_ms"],
        "migrations": s["total_migrations"],
        "preemptions": s["total_preemptions"],
        "failed": s["failed"],
        "sim_seconds": round(time.perf_counter() - start, 1),
    }


def workload_facts(workload: str, n: int) -> str:
    """The reasoning split as drawn for this workload's runs (docs/workload-format.md)."""
    cfg = load_config(ROOT / f"configs/pascal/alpaca-{workload}.yaml", num_requests=n)
    c = load_workload(cfg).columns
    reasoning, output = c["reasoning_tokens"], c["output_tokens"]
    answer = output - reasoning
    cap = cfg.reasoning.get("max_tokens", 16384)
    return (
        f"reasoning/answer median {np.median(reasoning / answer):.2f}, mean reasoning "
        f"{reasoning.mean():.0f} and answer {answer.mean():.0f} tokens, "
        f"{100 * np.mean(reasoning >= cap):.1f} % of requests at the {cap}-token cap"
    )


def pick_loads(sweep: list[dict]) -> dict[str, float]:
    """Low / Medium / High from FCFS's p99 TTFT against the rate (see the module docstring)."""
    sweep = sorted(sweep, key=lambda r: r["rate"])
    base = sweep[0]["p99_ttft_s"]
    low = max((r["rate"] for r in sweep if r["p99_ttft_s"] <= 1.1 * base), default=sweep[0]["rate"])
    high = next((r["rate"] for r in sweep if r["p99_ttft_s"] >= 1.5 * base), sweep[-1]["rate"])
    between = [r["rate"] for r in sweep if low < r["rate"] < high]
    medium = between[len(between) // 2] if between else (low + high) / 2
    return {"low": low, "medium": medium, "high": high}


def table(rows: list[dict]) -> str:
    head = (
        f"{'run':<20}{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}{'viol %':>8}{'req/s':>7}"
        f"{'xfer p99 ms':>12}{'block p99 ms':>13}{'migr':>6}"
    )
    lines = [head]
    for r in rows:
        xfer = r["p99_kv_transfer_ms"]
        lines.append(
            f"{r['run']:<20}{r['p50_ttft_s']:8.1f}{r['p90_ttft_s']:8.1f}{r['p99_ttft_s']:8.1f}"
            f"{100 * (r['answer_slo_violation_rate'] or 0):8.2f}{r['request_throughput']:7.2f}"
            f"{(f'{xfer:.0f}' if xfer is not None else '-'):>12}"
            f"{r['p99_blocking_ms']:13.0f}{r['migrations']:6d}"
        )
    return "\n".join(lines)


def recompute_runs(pool, workload: str, loads: dict[str, float], n: int) -> dict[str, list]:
    """Step 3: RECOMPUTE_RUNS with preemption by recompute at RECOMPUTE_LOADS."""
    jobs = [(load, name) for load in RECOMPUTE_LOADS for name in RECOMPUTE_RUNS]
    rows = list(
        pool.map(
            run,
            [workload] * len(jobs),
            [name for _, name in jobs],
            [loads[load] for load, _ in jobs],
            [n] * len(jobs),
            ["recompute"] * len(jobs),
        )
    )
    return {load: [r for (ld, _), r in zip(jobs, rows) if ld == load] for load in RECOMPUTE_LOADS}


def print_recompute(workload: str, res: dict) -> None:
    for load in RECOMPUTE_LOADS:
        swap = [r for r in res["runs"][load] if r["run"] in RECOMPUTE_RUNS]
        rows = [{**r, "run": f"{r['run']} (swap)"} for r in swap] + [
            {**r, "run": f"{r['run']} (recompute)"} for r in res["recompute"][load]
        ]
        print(f"\n{workload}, {load} load ({res['loads'][load]} req/s): swap vs recompute")
        print(table(rows))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = ("low", "medium", "high")
    fig, axes = plt.subplots(len(results), 3, figsize=(15, 4 * len(results)), squeeze=False)
    for row, (workload, res) in enumerate(results.items()):
        for col, load in enumerate(loads):
            ax = axes[row][col]
            for r in res["runs"][load]:
                bins = r["tail_ttft_by_bin"]
                ax.plot(
                    [f"{b['lo']}-" for b in bins],
                    [b["ttft_s"] for b in bins],
                    marker="o",
                    label=r["run"],
                )
            ax.set_title(f"{workload}, {load} load ({res['loads'][load]} req/s)")
            ax.set_xlabel("reasoning tokens (bin start)")
            ax.set_ylabel("tail TTFT (s)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="800 requests per run, not 2,000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument(
        "--recompute-only",
        action="store_true",
        help=f"only step 3, at the loads in {RESULTS.relative_to(ROOT)} (which it updates)",
    )
    opts = parser.parse_args()
    n = 800 if opts.quick else 2000
    if opts.recompute_only:
        results = json.loads(RESULTS.read_text())
        with ProcessPoolExecutor(opts.workers) as pool:
            for workload in opts.workloads.split(","):
                res = results[workload]
                size = res["runs"]["medium"][0]["requests"]
                res["recompute"] = recompute_runs(pool, workload, res["loads"], size)
                print_recompute(workload, res)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {RESULTS}")
        return
    results = {}
    with ProcessPoolExecutor(opts.workers) as pool:
        for workload in opts.workloads.split(","):
            grid = WORKLOADS[workload]
            sweep = list(
                pool.map(run, [workload] * len(grid), ["fcfs"] * len(grid), grid, [n] * len(grid))
            )
            loads = pick_loads(sweep)
            print(f"\n== {workload}: {workload_facts(workload, n)}")
            print("FCFS sweep (rate req/s -> p99 TTFT s)")
            print("  ".join(f"{r['rate']}: {r['p99_ttft_s']:.1f}" for r in sweep))
            print(f"loads: {loads}")
            jobs = [(load, name) for load in loads for name in RUNS]
            rows = list(
                pool.map(
                    run,
                    [workload] * len(jobs),
                    [name for _, name in jobs],
                    [loads[load] for load, _ in jobs],
                    [n] * len(jobs),
                )
            )
            runs = {load: [r for (ld, _), r in zip(jobs, rows) if ld == load] for load in loads}
            for load in loads:
                print(f"\n{workload}, {load} load ({loads[load]} req/s, {n} requests)")
                print(table(runs[load]))
            results[workload] = {"sweep": sweep, "loads": loads, "runs": runs}
            results[workload]["recompute"] = recompute_runs(pool, workload, loads, n)
            print_recompute(workload, results[workload])
    print("\nsimulation wall time per run, median over all loads and workloads (s):")
    every = [r for res in results.values() for rows in res["runs"].values() for r in rows]
    print(
        "  ".join(
            f"{name}: {np.median([r['sim_seconds'] for r in every if r['run'] == name]):.1f}"
            for name in RUNS
        )
    )
    out = RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    try:
        img = ROOT / "docs/img/pascal_tail_ttft.png"
        plot(results, img)
        print(f"\nwrote {out} and {img}")
    except ImportError as err:
        print(f"\nwrote {out}; no plot: {err}")
    print(f"reproduce: .venv/bin/python benchmarks/pascal_reproduction.py{' --quick' * opts.quick}")


if __name__ == "__main__":
    main()
