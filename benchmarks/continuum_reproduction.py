"""Continuum (arXiv 2511.02230) reproduced in the simulator: mean job completion time (JCT) of
agent programs against their arrival rate.

    .venv/bin/python benchmarks/continuum_reproduction.py            # about 1 min on 2 cores
    .venv/bin/python benchmarks/continuum_reproduction.py --programs 60 --jobs 1  # quick

Runs, on the identical programs at each rate:
* vllm: vLLM's FCFS with prefix caching (vLLM's default), the paper's baseline;
* vllm-no-cache: FCFS without prefix caching;
* continuum-fixed: Continuum as released (2 s TTL for tools whose mean time is <= 2 s);
* continuum: the paper's v6 estimator, its PrefillReload fitted to the run's latency model;
* continuum-running: the same, with pins released only for running requests that cannot grow
  (or when nothing runs), not for waiting requests that do not fit;
* program-fcfs: continuum-fixed with TTL 0 (its program-level FCFS queue alone, no pin), to
  tell the two halves of Continuum apart.

Setups: Llama-3.1-8B on an A100-80GB, and Llama-3.1-70B with TP 4 on H100-SXM-80GB (the
paper's 70B setup); one engine instance each. Workloads, both from
`llmsched.workload.programs` (SWE-bench-like: 10.9 +- 2.1 turns, OpenHands tool times):
* openhands: the generator's defaults (5k-token shared system prompt, 154 new tokens a turn:
  contexts of 6-7k tokens);
* long: 1,500 new tokens a turn (tool observations of file contents and test logs), contexts
  growing to about 20k tokens, the regime where the KV cache, not compute, binds.
Results: stdout, benchmarks/results/continuum.json and docs/img/continuum_jct.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmsched.config import SimulationConfig  # noqa: E402
from llmsched.experiment import latency_model, simulate  # noqa: E402
from llmsched.policies.continuum import prefill_fit  # noqa: E402

RESULTS = ROOT / "benchmarks/results/continuum.json"
PLOT = ROOT / "docs/img/continuum_jct.png"

SETUPS = {
    "llama-3.1-8b / a100-80gb": {
        "hardware": {"model": "llama-3.1-8b", "gpu": "a100-80gb", "tp": 1},
        "rates": {"openhands": (0.2, 0.4, 0.6, 0.8, 1.0), "long": (0.05, 0.1, 0.15, 0.2, 0.3)},
    },
    "llama-3.1-70b / h100-sxm-80gb x4": {
        "hardware": {"model": "llama-3.1-70b", "gpu": "h100-sxm-80gb", "tp": 4},
        "rates": {"openhands": (0.5, 1.0, 1.5, 2.0, 3.0), "long": (0.1, 0.2, 0.3, 0.4, 0.5)},
    },
}
WORKLOADS = {"openhands": {}, "long": {"new_tokens_median": 1500}}
RUNS = {  # label: (policy, prefix caching, parameters)
    "vllm": ("fcfs", True, {}),
    "vllm-no-cache": ("fcfs", False, {}),
    "continuum-fixed": ("continuum-fixed", True, {}),
    "continuum": ("continuum", True, {}),  # + the fitted PrefillReload
    "continuum-running": ("continuum", True, {"pressure": "running"}),
    "program-fcfs": ("continuum-fixed", True, {"ttl": 0.0}),
}


def run(setup: str, workload: str, rate: float, label: str, programs: int) -> dict:
    policy, caching, params = RUNS[label]
    hardware = SETUPS[setup]["hardware"]
    base = SimulationConfig(**hardware, programs={"count": programs, **WORKLOADS[workload]})
    if policy == "continuum":
        a, b, c = prefill_fit(latency_model(base))
        params = {"prefill_quadratic": a, "prefill_linear": b, "prefill_constant": c, **params}
    cfg = base.model_copy(
        update={
            "policy": policy,
            "policy_params": params,
            "enable_prefix_caching": caching,
            "rate": rate,
            "seed": 0,
        }
    )
    start = time.perf_counter()
    s = simulate(cfg).summary
    return {
        "setup": setup,
        "workload": workload,
        "rate": rate,
        "run": label,
        "programs": programs,
        "completed_programs": s["completed_programs"],
        "mean_jct_s": s["mean_jct_ms"] / 1e3,
        "median_jct_s": s["median_jct_ms"] / 1e3,
        "p90_jct_s": s["p90_jct_ms"] / 1e3,
        "p99_jct_s": s["p99_jct_ms"] / 1e3,
        "mean_turn_queue_s": s["mean_turn_queue_time_ms"] / 1e3,
        "prefix_cache_hit_rate": s.get("prefix_cache_hit_rate") or 0.0,
        "preemptions": s["total_preemptions"],
        "sim_seconds": round(time.perf_counter() - start, 1),
    }


def table(rows: list[dict]) -> str:
    out = []
    for setup in SETUPS:
        for workload in WORKLOADS:
            cells = [r for r in rows if r["setup"] == setup and r["workload"] == workload]
            if not cells:
                continue
            out.append(f"\n{setup}, {workload} programs: mean JCT in s (prefix-cache hit rate)")
            rates = sorted({r["rate"] for r in cells})
            out.append("rate/s  " + "".join(f"{label:>22}" for label in RUNS))
            for rate in rates:
                line = f"{rate:<8g}"
                for label in RUNS:
                    r = next(x for x in cells if x["rate"] == rate and x["run"] == label)
                    line += f"{r['mean_jct_s']:>14.1f} ({r['prefix_cache_hit_rate']:.2f})"
                out.append(line)
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for i, setup in enumerate(SETUPS):
        for j, workload in enumerate(WORKLOADS):
            ax = axes[i][j]
            for label in RUNS:
                cells = sorted(
                    (r["rate"], r["mean_jct_s"])
                    for r in rows
                    if r["setup"] == setup and r["workload"] == workload and r["run"] == label
                )
                if cells:
                    ax.plot(*zip(*cells), marker="o", label=label)
            ax.set_yscale("log")
            ax.set_title(f"{setup}\n{workload} programs", fontsize=9)
            ax.set_xlabel("program arrival rate (programs/s)")
            ax.set_ylabel("mean JCT (s)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=200, help="programs per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    args = parser.parse_args()
    cells = [
        (setup, workload, rate, label, args.programs)
        for setup, spec in SETUPS.items()
        for workload in WORKLOADS
        for rate in spec["rates"][workload]
        for label in RUNS
    ]
    start = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for k, row in enumerate(pool.map(run, *zip(*cells)), 1):
            rows.append(row)
            print(
                f"[{k}/{len(cells)}] {row['setup']} {row['workload']} {row['rate']:g}/s "
                f"{row['run']}: mean JCT {row['mean_jct_s']:.1f} s ({row['sim_seconds']} s)",
                file=sys.stderr,
                flush=True,
            )
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": "benchmarks/continuum_reproduction.py " + " ".join(sys.argv[1:]),
                "wall_seconds": round(time.perf_counter() - start),
                "rows": rows,
            },
            indent=1,
        )
    )
    plot(rows, PLOT)
    print(f"\n{RESULTS.relative_to(ROOT)}, {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
