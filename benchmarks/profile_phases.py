"""Where the time of one `llmsched simulate` goes, phase by phase (issue 16's 10k case).

    .venv/bin/python benchmarks/profile_phases.py                 # 10k Azure-conv requests, 5 runs
    .venv/bin/python benchmarks/profile_phases.py --requests 2000 --repeats 1   # quick

The case: the first 10,000 requests of the Azure 2023 conversation trace, Llama-2-70B, TP 2,
A100-80GB, Sarathi-Serve 512/128, 8 instances, round-robin, the trace's arrivals (needs the
shared data, `$LLMSCHED_DATA`). Three kinds of runs, each in its own process, alternating:

* the whole command, as a user runs it: wall time and peak RSS;
* the interpreter alone (`python -c pass`), and the interpreter importing exactly the modules
  the command ends up with (listed by a first run): the start-up;
* the command's steps in-process, after those imports, each timed: parsing the flags and config,
  reading the trace, building the workload, building the cluster, the event loop, the metrics
  and the console table, writing the files. Inside the event loop, the policy's decisions and
  the latency model are timed per call (a timer around each call adds a little to them) in a
  separate run, so that the other phases are not slowed by the timers.

Medians over the repeats go to stdout and benchmarks/results/phases.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
AZURE = "traces/azure2023/AzureLLMInferenceTrace_conv.csv"


def command(requests: int) -> list[str]:
    return [
        "simulate",
        "--config",
        str(ROOT / "configs/azure-conv-llama2-70b.yaml"),
        "--num-requests",
        str(requests),
        "--router",
        "round-robin",
        "--out",
        "/tmp/llmsched-profile-phases",
    ]


def timed_calls(obj, names: list[str], into: list[float]) -> None:
    """Wrap obj's methods `names` so that the seconds spent in them add up in into[0]."""
    for name in names:
        method = getattr(obj, name)

        def wrapper(*a, _method=method, **k):
            start = time.perf_counter()
            try:
                return _method(*a, **k)
            finally:
                into[0] += time.perf_counter() - start

        setattr(obj, name, wrapper)


class TimedLatency:
    """A latency model's two methods, on an object whose methods timed_calls can wrap."""

    def __init__(self, model) -> None:
        self.iteration_time = model.iteration_time
        self.decode_iteration_times = model.decode_iteration_times


def import_all(modules: list[str]) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (an alias in sys.modules, not importable by its name)
            pass


def steps(requests: int, modules: list[str], inner: bool) -> dict[str, float]:
    """The command's steps in this process, after importing `modules`; seconds per phase."""
    import_all(modules)
    from llmsched import cli, experiment
    from llmsched.metrics.report import format_summary

    out: dict[str, float] = {}
    t = time.perf_counter()
    args = cli.build_parser().parse_args(command(requests))
    cfg = cli.config_from_flags(args, policy=args.policy)
    experiment.check(cfg)
    out["flags and config"] = time.perf_counter() - t

    reading = [0.0]
    timed_calls(experiment, ["read_trace"], reading)
    t = time.perf_counter()
    workload = experiment.load_workload(cfg)
    out["reading the trace"] = reading[0]
    out["building the workload"] = time.perf_counter() - t - reading[0]

    t = time.perf_counter()
    cfg.validate()
    cluster, resolved = experiment.build_cluster(cfg)
    out["building the cluster"] = time.perf_counter() - t

    decisions, latency = [0.0], [0.0]
    if inner:
        # The instances share one latency model: a timed stand-in for it (a compiled model's
        # methods cannot be replaced on the object).
        timed = TimedLatency(cluster.instances[0].latency)
        timed_calls(timed, ["iteration_time", "decode_iteration_times"], latency)
        for inst in cluster.instances:
            inst.latency = timed
            timed_calls(inst.policy, ["schedule"], decisions)
    t = time.perf_counter()
    collector = cluster.run(workload)
    out["event loop"] = time.perf_counter() - t
    if inner:
        out["  policy decisions (timed per call)"] = decisions[0]
        out["  latency model (timed per call)"] = latency[0]

    t = time.perf_counter()
    result = experiment.summarize(cfg, cluster, workload, collector, resolved)
    table = format_summary(result.summary, title=experiment.run_title(cfg, len(workload)))
    out["metrics and the console table"] = time.perf_counter() - t
    assert table

    t = time.perf_counter()
    experiment.save(result, args.out)
    out["writing the files"] = time.perf_counter() - t
    return out


def child(kind: str, requests: int, modules_file: str | None) -> None:
    if kind == "modules":  # run the command, then list what it imported
        from llmsched import cli

        cli.main(command(requests))
        print(json.dumps(sorted(m for m in sys.modules if m != "__main__")))
        return
    modules = json.loads(Path(modules_file).read_text()) if modules_file else []
    if kind == "imports":
        import_all(modules)
        print(json.dumps({}))
        return
    print(json.dumps(steps(requests, modules, inner=kind == "inner")))


def run(args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB, this child's own: wait4) and stdout of a child process."""
    start = time.perf_counter()
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT) as child_process:
        stdout = child_process.stdout.read()
        _, status, usage = os.wait4(child_process.pid, 0)
        child_process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child_process.returncode:
        sys.exit(f"{' '.join(args)} failed ({child_process.returncode})")
    return wall, usage.ru_maxrss / 1024, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=["modules", "imports", "steps", "inner"])
    parser.add_argument("--modules-file")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests, args.modules_file)
        return
    from llmsched.data import data_dir

    if data_dir() is None or not (data_dir() / AZURE).exists():
        sys.exit("the Azure 2023 conversation trace is not found ($LLMSCHED_DATA): nothing to do")

    py = sys.executable
    me = [py, __file__, "--requests", str(args.requests)]
    _, _, listing = run([*me, "--child", "modules"])
    modules_file = Path("/tmp/llmsched-profile-modules.json")
    modules_file.write_text(listing.strip().splitlines()[-1])
    mods = ["--modules-file", str(modules_file)]

    whole, peaks, bare, imported = [], [], [], []
    phases: dict[str, list[float]] = {}
    for i in range(args.repeats):
        wall, peak, _ = run([py, "-m", "llmsched.cli", *command(args.requests)])
        whole.append(wall)
        peaks.append(peak)
        bare.append(run([py, "-c", "pass"])[0])
        imported.append(run([*me, "--child", "imports", *mods])[0])
        for kind in ("steps", "inner"):
            found = json.loads(run([*me, "--child", kind, *mods])[2].strip().splitlines()[-1])
            for name, seconds in found.items():
                if kind == "steps" or name.startswith("  "):
                    phases.setdefault(name, []).append(seconds)
        print(f"run {i + 1}: whole command {wall:.2f} s, peak {peak:.0f} MB", flush=True)

    med = statistics.median
    rows = {
        "interpreter start-up": med(bare),
        "imports": med(imported) - med(bare),
        **{name: med(values) for name, values in phases.items()},
    }
    total = med(whole)
    print(
        f"\n{args.requests:,} Azure-conv requests, Llama-2-70B TP 2, Sarathi 512/128, 8 instances, "
        f"medians of {args.repeats}:\n  whole command {total:.2f} s, peak RSS {med(peaks):.0f} MB"
    )
    for name, seconds in rows.items():
        print(f"  {name:40} {seconds:6.3f} s  {seconds / total:5.1%}")
    counted = sum(s for n, s in rows.items() if not n.startswith("  "))
    print(f"  {'(the phases add up to)':40} {counted:6.3f} s")
    print(f"reproduce: .venv/bin/python benchmarks/profile_phases.py --requests {args.requests}")
    out = ROOT / "benchmarks/results/phases.json"
    out.write_text(
        json.dumps(
            {
                "requests": args.requests,
                "repeats": args.repeats,
                **provenance(),
                "whole_command_s": total,
                "peak_rss_mb": med(peaks),
                "phases_s": rows,
                "runs": {"whole": whole, "peak_mb": peaks},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
