"""Simulator speed: wall time of the whole `llmsched simulate` command, and its peak memory.

    .venv/bin/python benchmarks/bench_simulator.py            # all cases (needs ../shared/data)
    .venv/bin/python benchmarks/bench_simulator.py --quick    # skip the 1M-request case

Cases: the full Azure 2023 conversation trace (19,366 requests) with Llama-2-70B, TP 2, A100,
Sarathi-Serve (chunk 512, batch 128) on 1 instance (arrival gaps × 4: loaded but stable) and on
8 instances (the trace's own arrivals); then 10k, 100k and 1M synthetic requests on 64
instances, to show how cost grows. Each case runs as its own process; peak memory is that
process's maximum resident set size. Results go to stdout and benchmarks/results/*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLMSCHED = [sys.executable, "-m", "llmsched.cli"]
AZURE = "traces/azure2023/AzureLLMInferenceTrace_conv.csv"


def cases(data: Path | None, quick: bool) -> list[tuple[str, int, list[str]]]:
    out = []
    if data is not None:
        azure = [
            "--config",
            str(ROOT / "configs/azure-conv-llama2-70b.yaml"),
            "--trace",
            str(data / AZURE),
        ]
        out.append(
            (
                "azure-conv, 1 instance, gaps x4",
                19366,
                [*azure, "--instances", "1", "--time-scale", "4"],
            )
        )
        out.append(("azure-conv, 8 instances", 19366, [*azure, "--instances", "8"]))
    else:
        print("shared data not found (LLMSCHED_DATA): skipping the Azure trace cases")
    for n in (10_000, 100_000) + (() if quick else (1_000_000,)):
        # 64 Llama-3-8B instances on A100 at ~4.7 req/s each: loaded, stable.
        out.append(
            (
                f"synthetic {n:,}, 64 instances",
                n,
                [
                    "--num-requests",
                    str(n),
                    "--rate",
                    "300",
                    "--instances",
                    "64",
                    "--router",
                    "least-outstanding",
                    "--policy",
                    "fcfs",
                ],
            )
        )
    return out


def run_case(args: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*LLMSCHED, "simulate", "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    # communicate() reaped the child; its peak RSS is in the children's rusage high-water mark,
    # which is why every case runs in a fresh benchmark subprocess (see main).
    if proc.returncode != 0:
        raise RuntimeError(f"llmsched failed ({proc.returncode}):\n{err}")
    line = next(x for x in out.splitlines() if x.startswith("simulated "))
    return {"wall_s": wall, "report": line}


def measure_one(args: list[str]) -> None:
    """Run one case in this (fresh) process and print its figures as JSON."""
    import resource

    result = run_case(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 1M-request case")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the 8-instance Azure case instead"
    )
    parser.add_argument("--latency", default="roofline", choices=["roofline", "calibrated"])
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one is not None:
        return measure_one(opts.one)
    sys.path.insert(0, str(ROOT / "src"))
    from llmsched.data import data_dir

    if opts.profile:
        return profile(opts.latency)

    rows = []
    for name, n, args in cases(data_dir(), opts.quick):
        print(f"running: {name} ...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", *args], capture_output=True, text=True, check=True
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r |= {"case": name, "requests": n, "req_per_wall_s": n / r["wall_s"]}
        rows.append(r)
        print(
            f"  {r['wall_s']:.2f} s wall, {r['req_per_wall_s']:,.0f} requests/s, "
            f"peak {r['peak_rss_mb']:.0f} MB\n  {r['report']}",
            flush=True,
        )
    print("\n| case | requests | wall (s) | requests / wall-s | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['requests']:,} | {r['wall_s']:.2f} | "
            f"{r['req_per_wall_s']:,.0f} | {r['peak_rss_mb']:.0f} |"
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(f"\nmachine: {machine}\nreproduce: .venv/bin/python benchmarks/bench_simulator.py")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "simulator.json").write_text(json.dumps({"machine": machine, "cases": rows}, indent=2))


def profile(latency: str = "roofline") -> None:
    """Where the time goes: own time per function on the 8-instance Azure case, and the latency
    model's share (its cumulative time)."""
    import cProfile
    import pstats

    from llmsched.config import load_config
    from llmsched.experiment import simulate

    cfg = load_config(ROOT / "configs/azure-conv-llama2-70b.yaml", latency=latency)
    profiler = cProfile.Profile()
    profiler.runcall(simulate, cfg)
    stats = pstats.Stats(profiler)
    total = sum(s[2] for s in stats.stats.values())
    print(f"own time of the top functions, % of {total:.2f} s (profiled):")
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]
    for (file, line, name), (_, calls, own, _, _) in top:
        print(f"  {100 * own / total:5.1f} %  {calls:>9,} calls  {Path(file).name}:{line} {name}")
    model = sum(
        v[3]
        for (file, _, name), v in stats.stats.items()
        if file.endswith("roofline.py") and name in ("iteration_time", "decode_iteration_times")
    )
    print(f"latency model ({latency}), cumulative: {100 * model / total:.1f} % of the run")


if __name__ == "__main__":
    main()
