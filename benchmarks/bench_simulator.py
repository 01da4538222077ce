"""Simulator speed: wall time of the whole `llmsched simulate` command, and its peak memory.

    .venv/bin/python benchmarks/bench_simulator.py            # all cases (needs ../shared/data)
    .venv/bin/python benchmarks/bench_simulator.py --quick    # skip the 1M-request case
    .venv/bin/python benchmarks/bench_simulator.py --vidur 'CMD'   # and Vidur, side by side
    .venv/bin/python benchmarks/bench_simulator.py --repeats 5     # medians of 5 (default 3)
    LLMSCHED_PURE_PYTHON=1 .venv/bin/python benchmarks/bench_simulator.py   # the engine interpreted

Cases: issue 16's, the first 10,000 requests of the Azure 2023 conversation trace with
Llama-2-70B, TP 2, A100, Sarathi-Serve (chunk 512, batch 128), on 8 instances (round-robin, the
trace's arrivals) and on 1 (arrival gaps × 4: loaded but stable); the full trace (19,366
requests) the same two ways (least-outstanding on 8); then 10k, 100k and 1M synthetic requests on
64 instances, to show how cost grows. Each case runs as its own process, `--repeats` times
(the median wall time is reported; the 1M case runs once); peak memory is the largest of the
processes' maximum resident set sizes; events are policy decisions plus engine iterations.

Vidur: `--vidur CMD` times the shell command CMD (Vidur on the 10k case, as its user runs it)
right after llmsched's 10k case, the same way. Without it, the figure issue 16 recorded for Vidur
on that work on this machine kind is printed beside llmsched's, and labelled as recorded.
Results go to stdout and benchmarks/results/simulator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLMSCHED = [sys.executable, "-m", "llmsched.cli"]
AZURE = "traces/azure2023/AzureLLMInferenceTrace_conv.csv"
VIDUR_CASE = "azure-conv first 10k, 8 instances"
# Vidur on VIDUR_CASE, as issue 16 records it for this machine kind (not run by this script).
VIDUR_RECORDED_S = 46.7


def cases(data: Path | None, quick: bool) -> list[tuple[str, int, list[str]]]:
    out = []
    if data is not None:
        azure = [
            "--config",
            str(ROOT / "configs/azure-conv-llama2-70b.yaml"),
            "--trace",
            str(data / AZURE),
        ]
        first = [*azure, "--num-requests", "10000"]
        out += [
            (VIDUR_CASE, 10000, [*first, "--instances", "8", "--router", "round-robin"]),
            (
                "azure-conv first 10k, 1 instance, gaps x4",
                10000,
                [*first, "--instances", "1", "--time-scale", "4"],
            ),
            (
                "azure-conv, 1 instance, gaps x4",
                19366,
                [*azure, "--instances", "1", "--time-scale", "4"],
            ),
            ("azure-conv, 8 instances", 19366, [*azure, "--instances", "8"]),
        ]
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
    steps, iterations = (
        int(m.replace(",", "")) for m in re.findall(r"(\d+) (?:policy|iter)", line)
    )
    return {"wall_s": wall, "report": line, "events": steps + iterations}


def measure_one(args: list[str]) -> None:
    """Run one case in this (fresh) process and print its figures as JSON."""
    result = run_case(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


def measure_command(command: str) -> dict:
    """Wall time and peak memory of a shell command (Vidur), in a fresh process as the cases."""
    code = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "subprocess.run(sys.argv[1], shell=True, check=True, capture_output=True)\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps({'wall_s': wall, 'peak_rss_mb': rss}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, command], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 1M-request case")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the 8-instance Azure case instead"
    )
    parser.add_argument("--latency", default="roofline", choices=["roofline", "calibrated"])
    parser.add_argument(
        "--vidur",
        metavar="CMD",
        help=f"a shell command that runs Vidur on the {VIDUR_CASE!r} case, timed beside it",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each case under a million requests (the median is reported; default 3)",
    )
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one is not None:
        return measure_one(opts.one)
    sys.path.insert(0, str(ROOT / "src"))
    from llmsched import native
    from llmsched.data import data_dir

    print(f"engine: {native.MODE}", flush=True)  # (each case's process decides the same way)

    if opts.profile:
        return profile(opts.latency)

    rows = []
    vidur = None
    for name, n, args in cases(data_dir(), opts.quick):
        repeats = opts.repeats if n < 1_000_000 else 1  # (a million requests: once, a minute)
        print(f"running: {name} ({repeats} run{'s' if repeats > 1 else ''}) ...", flush=True)
        runs = []
        for _ in range(repeats):
            proc = subprocess.run(
                [sys.executable, __file__, "--one", *args],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = dict(runs[0])
        r["walls_s"] = [x["wall_s"] for x in runs]
        r["wall_s"] = statistics.median(r["walls_s"])
        r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in runs)
        r |= {"case": name, "requests": n, "req_per_wall_s": n / r["wall_s"]}
        r["events_per_wall_s"] = r["events"] / r["wall_s"]
        rows.append(r)
        walls = ", ".join(f"{w:.2f}" for w in r["walls_s"])
        print(
            f"  {r['wall_s']:.2f} s wall (median of {walls}), "
            f"{r['req_per_wall_s']:,.0f} requests/s, {r['events_per_wall_s']:,.0f} events/s, "
            f"peak {r['peak_rss_mb']:.0f} MB\n  {r['report']}",
            flush=True,
        )
        if name == VIDUR_CASE:
            vidur = vidur_beside(r["wall_s"], opts.vidur)
    print("\n| case | requests | wall (s) | requests / wall-s | events / wall-s | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['requests']:,} | {r['wall_s']:.2f} | "
            f"{r['req_per_wall_s']:,.0f} | {r['events_per_wall_s']:,.0f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    if vidur is not None:
        print(f"\n{vidur['line']}")
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(f"\nmachine: {machine}\nengine: {native.MODE}")
    print("reproduce: .venv/bin/python benchmarks/bench_simulator.py")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["engine"] = native.MODE
    result |= {"cases": rows, "vidur": vidur}
    (out / "simulator.json").write_text(json.dumps(result, indent=2))


def vidur_beside(llmsched_s: float, command: str | None) -> dict:
    """Vidur's wall time on the 10k case (run now with `command`, or the recorded figure) and
    llmsched's speed-up over it."""
    if command:
        v = measure_command(command)
        seconds, how = v["wall_s"], f"measured now, peak {v['peak_rss_mb']:.0f} MB"
    else:
        seconds, how = VIDUR_RECORDED_S, "recorded in issue 16 on this machine kind, not run here"
    line = (
        f"{VIDUR_CASE}: llmsched {llmsched_s:.2f} s, Vidur {seconds:.1f} s ({how}): "
        f"{seconds / llmsched_s:.1f}x"
    )
    print(f"  {line}", flush=True)
    return {"seconds": seconds, "how": how, "speedup": seconds / llmsched_s, "line": line}


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
