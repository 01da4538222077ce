"""What llmsched's vLLM scheduler classes cost per engine step, against vLLM's own scheduler.

    .venv/bin/python benchmarks/vllm_scheduling.py                # 32, 128 and 256 running
    .venv/bin/python benchmarks/vllm_scheduling.py --steps 100 --rounds 3   # quicker

For each number of running requests, each class's scheduler is built over the same KV cache
(no model: the harness of the differential tests makes the model's outputs), filled with that
many requests decoding, and timed on `schedule()` + `update_from_output()` for every step;
the figure is the median over all timed steps. The classes are timed in turns, round after
round, in one process, so that the machine's load falls on all of them alike; the ratio to
vLLM's stock `Scheduler` (FCFS, or priority for the priority-ordered classes) is the
comparison that counts. Target (the vLLM issue): at most 10 % over stock at 256 running.

Two cases per class: "steady", the requests decoding with nothing else happening, where a
policy's plan may repeat (llmsched's classes then skip asking the policy, as the simulator's
spans do), and "replan", where the policy is asked every step as if a request arrived or
finished every step: the cost of the policy itself. SLAI runs with max_decodes at the number
of running requests, so that it schedules the same decodes as the others.

Output: a table on stdout and benchmarks/results/vllm_scheduling.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402

from llmsched.integrations import vllm as ours  # noqa: E402
from llmsched.integrations.vllm import harness as h  # noqa: E402
from llmsched.workload.request import Request  # noqa: E402

STEP_LOG = str(Path(tempfile.gettempdir()) / "llmsched-vllm-scheduling-steps.jsonl")
# (label, class, vLLM's policy for the stock queue it is compared with, llmsched settings)
CLASSES = [
    ("stock fcfs", Scheduler, "fcfs", {}),
    ("stock priority", Scheduler, "priority", {}),
    ("FcfsScheduler", ours.FcfsScheduler, "fcfs", {}),
    ("PriorityScheduler", ours.PriorityScheduler, "priority", {}),
    ("RoundRobinScheduler", ours.RoundRobinScheduler, "fcfs", {}),
    ("SarathiScheduler", ours.SarathiScheduler, "fcfs", {}),
    ("ParsScheduler", ours.ParsScheduler, "priority", {}),
    ("SlaiScheduler", ours.SlaiScheduler, "fcfs", {"params": {"max_decodes": 1024}}),
    ("PascalScheduler", ours.PascalScheduler, "fcfs", {"think_end_token_id": h.THINK_END}),
    # vLLM's own scheduler with llmsched's step recorder: off, then writing every step
    ("Recording, off", ours.RecordingScheduler, "fcfs", {}),
    ("Recording, on", ours.RecordingScheduler, "fcfs", {"step_log": STEP_LOG}),
]
BASELINE = {"fcfs": "stock fcfs", "priority": "stock priority"}
CASES = ("steady", "replan")
PROMPT, OUTPUT = 64, 4000  # decodes that do not finish while timed


def decoding(model: Path, cls, policy: str, settings: dict, n: int):
    """A scheduler of class `cls` with `n` requests past their prefill, all decoding."""
    config = h.vllm_config(
        model,
        num_blocks=n * (PROMPT + OUTPUT) // 16 + n + 1,
        max_num_batched_tokens=max(2048, n),
        max_num_seqs=n,
        max_model_len=4096,
        policy=policy,
        additional_config={"llmsched": settings},
    )
    sched = h.make_scheduler(config, cls)
    if hasattr(sched, "clock"):
        sched.clock = time.monotonic
    for i in range(n):
        sched.add_request(h.vllm_request(Request(f"r{i:04d}", 0.0, PROMPT, OUTPUT, score=i)))
    while any(r.num_output_tokens == 0 for r in sched.requests.values()):
        step(sched)
    return sched


def step(sched, replan: bool = False) -> float:
    """One step; returns the seconds spent in schedule() and update_from_output(). `replan`:
    llmsched's classes ask the policy this step, as after an arrival or a finish."""
    if replan and hasattr(sched, "_engine"):
        sched._engine.changed = True
    t0 = time.perf_counter()
    out = sched.schedule()
    t1 = time.perf_counter()
    ids = list(out.num_scheduled_tokens)
    requests = sched.requests
    runner = ModelRunnerOutput(
        req_ids=ids,
        req_id_to_index={rid: k for k, rid in enumerate(ids)},
        sampled_token_ids=[[] if requests[r].is_prefill_chunk else [h.TOKEN] for r in ids],
    )
    t2 = time.perf_counter()
    sched.update_from_output(out, runner)
    t3 = time.perf_counter()
    return (t1 - t0) + (t3 - t2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per class per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/vllm_scheduling.json"))
    args = parser.parse_args()

    model = h.model_folder(Path(tempfile.mkdtemp()) / "tiny-llama")
    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/vllm_scheduling.py " + " ".join(sys.argv[1:]),
        "steps": args.steps,
        "rounds": args.rounds,
        "running": {},
    }
    for n in args.running:
        schedulers = {label: decoding(model, c, p, s, n) for label, c, p, s in CLASSES}
        times = {(label, case): [] for label in schedulers for case in CASES}
        for r in range(args.rounds):
            print(f"{n} running: round {r + 1}/{args.rounds}", file=sys.stderr)
            for case in CASES:
                for label, sched in schedulers.items():
                    for _ in range(10):  # warm the caches after the previous class
                        step(sched, case == "replan")
                    times[label, case] += [step(sched, case == "replan") for _ in range(args.steps)]
        medians = {key: float(np.median(t)) * 1e6 for key, t in times.items()}
        results["running"][str(n)] = {
            case: {
                label: {
                    "median_us": round(medians[label, case], 1),
                    "vs_stock": round(medians[label, case] / medians[BASELINE[policy], case], 3),
                }
                for label, _, policy, _ in CLASSES
            }
            for case in CASES
        }
    for case in CASES:
        print(format_table(results, case))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}; reproduce with: {results['command']}")


def machine() -> str:
    """The CPU model and core count, the Python and vLLM versions."""
    import os

    import vllm

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores ({platform.machine()}); python "
        f"{platform.python_version()}, vLLM {vllm.__version__}"
    )


def format_table(results: dict, case: str) -> str:
    ns = list(results["running"])
    head = f"{'class':<22}" + "".join(f"{n + ' running':>22}" for n in ns)
    lines = [
        f"{case}: schedule() + update_from_output(), median µs per step (ratio to vLLM's stock"
        " scheduler with the same queue policy)",
        head,
        "-" * len(head),
    ]
    for label in results["running"][ns[0]][case]:
        cells = []
        for n in ns:
            r = results["running"][n][case][label]
            cells.append(f"{r['median_us']:>12.1f} ({r['vs_stock']:.2f}x)")
        lines.append(f"{label:<22}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
