"""Simulator speed with prefix caching: caching on against off, on the same workload.

    .venv/bin/python benchmarks/bench_prefix_cache.py             # 12,000 requests, 3 runs each
    .venv/bin/python benchmarks/bench_prefix_cache.py --requests 2000 --repeats 1  # quick

The workload is Mooncake-shaped and generated (no trace needed): long prompts (about 8k tokens on
average) that begin with shared prefix runs of 512-token chunks, as Mooncake's `hash_ids`: 300
document prefixes of 1 to 12 chunks, picked with Zipf popularity, each behind one of 10 system
prompts (one chunk); then the request's own tokens. Llama-3.1-8B (max_model_len 32k) on
A100s, 8 instances behind least-outstanding routing, vLLM's FCFS, Poisson arrivals at 9
requests/s. Each run is its own process (so peak memory is that run's maximum resident set
size); runs alternate off and on, and the medians are reported. Then one run of each at a
quarter and half the requests shows how peak memory grows with requests. Results go to stdout
and benchmarks/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 512  # tokens per Mooncake hash id


def mooncake_like(n: int, seed: int = 0, rate: float = 9.0):
    """n requests: arrivals, prompts, outputs and prefix runs of 512-token chunks."""
    from llmsched.workload.request import Workload, object_column

    rng = np.random.default_rng(seed)
    docs = 300
    doc_chunks = rng.integers(1, 13, docs)  # 0.5k .. 6k tokens
    popularity = 1.0 / np.arange(1, docs + 1) ** 1.1  # Zipf
    doc = rng.choice(docs, n, p=popularity / popularity.sum())
    own = np.minimum(rng.lognormal(np.log(3000), 0.8, n).astype(int) + 1, 24_000)
    prefixes, prompts = [], []
    for d, extra in zip(doc.tolist(), own.tolist()):
        runs = ((("system", d % 10), CHUNK),) + tuple(
            (("doc", d, j), CHUNK) for j in range(int(doc_chunks[d]))
        )
        prefixes.append(runs)
        prompts.append(CHUNK * len(runs) + extra)
    return Workload(
        {
            "arrival": np.cumsum(rng.exponential(1 / rate, n)),
            "prompt_tokens": np.array(prompts),
            "output_tokens": np.minimum(rng.lognormal(np.log(250), 0.7, n).astype(int) + 1, 2000),
            "prefix": object_column(prefixes),
        },
        source="mooncake-like (generated)",
    )


def run_one(caching: bool, n: int) -> dict:
    from llmsched.config import SimulationConfig
    from llmsched.experiment import simulate

    workload = mooncake_like(n)
    cfg = SimulationConfig(
        model="llama-3.1-8b",
        max_model_len=32768,
        gpu="a100-80gb",
        instances=8,
        router="least-outstanding",
        policy="fcfs",
        enable_prefix_caching=caching,
    )
    start = time.perf_counter()
    result = simulate(cfg, workload)
    wall = time.perf_counter() - start
    s = result.summary
    return {
        "caching": caching,
        "wall_s": wall,
        "sim_wall_s": s["sim_wall_seconds"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "hit_rate": s["prefix_cache_hit_rate"],
        "mean_ttft_ms": s["mean_ttft_ms"],
        "completed": s["completed"],
        "preemptions": s["total_preemptions"],
        "steps": s["sim_steps"],
        "iterations": s["sim_iterations"],
    }


def run_process(mode: str, n: int) -> dict:
    """One run in its own process (so that its peak RSS is its own)."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", mode, "--requests", str(n)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=12_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-scaling", action="store_true", help="skip the runs at 1/4 and 1/2 the requests"
    )
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one == "on", args.requests)))
        return
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(args.repeats):
        for mode in ("off", "on"):
            runs[mode].append(run_process(mode, args.requests))
            r = runs[mode][-1]
            print(
                f"run {i + 1} caching {mode:3}: {r['wall_s']:6.1f} s, peak "
                f"{r['peak_rss_mb']:5.0f} MB, hit rate {r['hit_rate']}, mean TTFT "
                f"{r['mean_ttft_ms']:.0f} ms",
                flush=True,
            )
    med = {
        mode: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss_mb")}
        for mode, rs in runs.items()
    }
    ratio = med["on"]["wall_s"] / med["off"]["wall_s"]
    print(
        f"\n{args.requests:,} requests, 8 instances, medians of {args.repeats}: caching off "
        f"{med['off']['wall_s']:.1f} s, {med['off']['peak_rss_mb']:.0f} MB; on "
        f"{med['on']['wall_s']:.1f} s, {med['on']['peak_rss_mb']:.0f} MB; on/off wall "
        f"{ratio:.2f}x (target <= 1.5x)"
    )
    scaling = {}
    if not args.no_scaling:
        print("\npeak RSS (MB) by requests, one run each:")
        for n in (args.requests // 4, args.requests // 2):
            scaling[n] = {mode: run_process(mode, n)["peak_rss_mb"] for mode in ("off", "on")}
        scaling[args.requests] = {mode: med[mode]["peak_rss_mb"] for mode in ("off", "on")}
        for n, mb in scaling.items():
            print(f"  {n:7,} requests: off {mb['off']:5.0f}, on {mb['on']:5.0f}")
        sizes = sorted(scaling)
        for mode in ("off", "on"):
            per_k = np.polyfit(sizes, [scaling[n][mode] for n in sizes], 1)[0] * 1000
            print(f"  caching {mode:3}: {per_k:.1f} MB per 1,000 requests (least squares)")
    print(
        f"reproduce: .venv/bin/python benchmarks/bench_prefix_cache.py --requests {args.requests}"
    )
    out = ROOT / "benchmarks/results/prefix_cache.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "requests": args.requests,
                "repeats": args.repeats,
                **provenance(),
                "median": med,
                "on_over_off_wall": ratio,
                "peak_rss_mb_by_requests": scaling,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
