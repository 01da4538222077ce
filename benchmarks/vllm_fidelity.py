"""The simulator against a real vLLM engine on this machine's CPU, end to end.

    .venv/bin/python benchmarks/vllm_fidelity.py            # the whole study (needs ../shared/data)
    .venv/bin/python benchmarks/vllm_fidelity.py --quick    # one experiment, two policies, once
    .venv/bin/python benchmarks/vllm_fidelity.py --report   # tables again from the saved runs

For every experiment (a model shape, a token budget, a workload at a load) and every policy:

1. **measure**: vLLM's OpenAI server (CPU build, random weights, float32) serves with the
   policy's scheduler class, recording its steps (`step_log`); `llmsched bench` sends the
   workload, each run repeated (`--repeats`) on the same requests;
2. **calibrate**: `llmsched calibrate --from-steps` fits the latency model on the steps of the
   calibration runs (the `CALIBRATE` experiments, FCFS, first repeat), every other run's steps
   held out;
3. **predict**: `llmsched simulate` runs the same flags, the same engine limits (KV blocks,
   block size, budget, sequences) and the policy, with `--latency` the calibration;
4. **compare** field by field (`llmsched.metrics.fidelity`): mean, p50, p90 and p99 of TTFT,
   TPOT, ITL and E2E and the throughputs, real and simulated; and whether the simulator orders
   the policies as the real engine does.

Prefix caching is off on the server (llmsched's engine has no prefix cache yet; the prompts are
random token ids, which would share none anyway) and scheduling synchronous (the simulator's
step follows the one before; the `Async` classes are proven equal to stock separately).
Results: stdout, benchmarks/results/fidelity_vllm.json; runs (bench JSON, step logs, server
logs, simulations) under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmsched.cli import main as llmsched  # noqa: E402
from llmsched.hardware.calibration.steps import load_steps, predict  # noqa: E402
from llmsched.hardware.calibration.store import read_calibration  # noqa: E402
from llmsched.hardware.steplog import (  # noqa: E402
    cycle_times,
    device_spec,
    frontend_latencies,
    read_step_log,
)
from llmsched.integrations.vllm import harness  # noqa: E402
from llmsched.integrations.vllm.server import VllmServer  # noqa: E402
from llmsched.metrics.fidelity import (  # noqa: E402
    FIELDS,
    field_errors,
    order_agrees,
)

RESULTS = ROOT / "benchmarks/results/fidelity_vllm.json"
MAX_MODEL_LEN = 8192
MAX_NUM_SEQS = 8  # few enough that requests queue under load: where policies differ
BLOCK_SIZE = 32  # vLLM's CPU attention needs a multiple of 32
KV_SPACE_GIB = 3  # VLLM_CPU_KVCACHE_SPACE: no KV pressure (no preemption) in these runs

# Llama shapes with random weights: the tiny model of the vLLM tests, and a larger one.
MODELS = {
    "tiny": harness.TINY_LLAMA | {"max_position_embeddings": MAX_MODEL_LEN},
    "large": harness.TINY_LLAMA
    | {
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "max_position_embeddings": MAX_MODEL_LEN,
    },
}
WORKLOADS = {
    "sharegpt": ["--trace", "prompts/sharegpt/sharegpt_v3_prefix_pairs.jsonl.gz", "--skip-invalid"],
    "azure-conv": ["--trace", "traces/azure2023/AzureLLMInferenceTrace_conv.csv"],
}
# PARS's scores: a noisy oracle at the Kendall tau PARS's ranker reaches on ShareGPT (0.334,
# docs/pars.md); the prompts are token ids here, so no ranker could read them.
SCORES = ["--scores", "noisy-oracle,tau=0.33,seed=0"]
# policy -> (scheduler class, llmsched settings, the simulated policy, extra workload flags)
POLICIES = {
    "fcfs": ("RecordingScheduler", {}, "fcfs", []),  # vLLM's own scheduler, recording
    "pars": ("ParsScheduler", {}, "pars", SCORES),
    "srpt": ("LlmschedScheduler", {"policy": "srpt"}, "srpt", []),
}


@dataclass(frozen=True)
class Experiment:
    model: str
    budget: int  # max_num_batched_tokens
    workload: str
    load: str  # light | medium | saturating | burst
    rate: float  # requests/s (a burst: 1000)
    requests: int

    @property
    def name(self) -> str:
        return f"{self.model}-b{self.budget}-{self.workload}-{self.load}"

    def workload_flags(self, policy: str) -> list[str]:
        flags = [*WORKLOADS[self.workload], "--rate", str(self.rate)]
        return flags + ["--num-requests", str(self.requests), "--seed", "0", *POLICIES[policy][3]]


def E(model, budget, workload, load, rate, n) -> Experiment:  # noqa: N802 (a table row)
    return Experiment(model, budget, workload, load, rate, n)


# Loads against what 8 sequences serve (measured here): the tiny model decodes about 230 tokens/s
# at 8 (ShareGPT's answers, 280 tokens on average: 0.8 req/s) and prefills about 1,600 tokens/s
# (Azure's 1,150-token prompts and 210-token answers: about 0.6 req/s); the large one is 5-10x
# slower.
EXPERIMENTS = [
    E("tiny", 1024, "sharegpt", "light", 0.2, 12),
    E("tiny", 1024, "sharegpt", "medium", 0.5, 20),
    E("tiny", 1024, "sharegpt", "saturating", 1.0, 24),
    E("tiny", 1024, "sharegpt", "burst", 1000.0, 20),
    E("tiny", 1024, "azure-conv", "light", 0.15, 10),
    E("tiny", 1024, "azure-conv", "medium", 0.4, 16),
    E("tiny", 1024, "azure-conv", "saturating", 0.8, 20),
    E("tiny", 1024, "azure-conv", "burst", 1000.0, 16),
    E("tiny", 256, "sharegpt", "saturating", 1.0, 24),
    E("tiny", 256, "azure-conv", "medium", 0.4, 16),
    E("tiny", 256, "azure-conv", "saturating", 0.8, 20),
    E("large", 1024, "sharegpt", "saturating", 0.2, 12),
    E("large", 1024, "sharegpt", "burst", 1000.0, 12),
    E("large", 1024, "azure-conv", "medium", 0.08, 8),
]
# The experiments whose FCFS runs (first repeat) the latency model is fitted on: each model
# shape, both budgets, light to saturating. Every other run is held out.
CALIBRATE = {
    "tiny-b1024-sharegpt-saturating",
    "tiny-b1024-azure-conv-light",
    "tiny-b256-azure-conv-saturating",
    "large-b1024-sharegpt-burst",
}
QUICK = [E("tiny", 1024, "sharegpt", "saturating", 1.0, 12)]


def server_args(folder: Path, exp: Experiment, policy: str, step_log: Path) -> list[str]:
    cls, settings, _, _ = POLICIES[policy]
    return [
        "--load-format", "dummy", "--dtype", "float32", "--enforce-eager",
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
        "--max-num-batched-tokens", str(exp.budget), "--block-size", str(BLOCK_SIZE),
        "--no-enable-prefix-caching", "--no-async-scheduling",
        "--scheduler-cls", f"llmsched.integrations.vllm.{cls}",
        "--additional-config", json.dumps({"llmsched": settings | {"step_log": str(step_log)}}),
    ]  # fmt: skip


def _started(line: dict) -> float:
    return line["t"] if "add" in line else line["t"][0]  # a request's arrival, or a step


def split_steps(step_log: Path, windows: dict[Path, tuple[float, float]]) -> None:
    """One step log per run: the server's steps that started inside the run's window (the
    monotonic clock the client's times are on)."""
    lines = step_log.read_text().splitlines()
    head = json.loads(lines[0])
    origin = head["monotonic"]
    steps = [json.loads(line) for line in lines[1:]]
    for path, (start, end) in windows.items():
        mine = [s for s in steps if start <= origin + _started(s) <= end]
        path.write_text("\n".join([lines[0], *map(json.dumps, mine)]) + "\n")


def measure(exps: list[Experiment], policies: list[str], repeats: int, out: Path) -> None:
    """Real runs, one server per (model, budget, policy, repeat): a repeat runs every policy
    once before the next begins, so that a slow hour of this shared machine falls on all of
    them (and shows as the repeats' spread), not on one policy."""
    servers: dict[tuple, list[Experiment]] = {}
    for r in range(repeats):
        for exp in exps:
            for policy in policies:
                servers.setdefault((exp.model, exp.budget, r, policy), []).append(exp)
    for (model, budget, r, policy), group in servers.items():
        todo = [
            (exp, r) for exp in group if not real_path(out, exp, policy, r).is_file()
        ]  # measured before: kept
        if not todo:
            continue
        folder = harness.model_folder(out / "models" / model, MODELS[model])
        harness.write_tokenizer(folder)
        base = out / "servers" / f"{model}-b{budget}-{policy}-r{r}"
        step_log = base.with_suffix(".steps.jsonl")
        print(f"== server {base.name}: {len(todo)} runs", file=sys.stderr, flush=True)
        windows: dict[Path, tuple[float, float]] = {}
        env = {"VLLM_CPU_KVCACHE_SPACE": str(KV_SPACE_GIB)}
        args = server_args(folder, group[0], policy, step_log)
        try:
            with VllmServer(folder, args, log=base.with_suffix(".log"), env=env) as server:
                # A fresh engine's first requests are slow (first allocations, lazy inits), as
                # vLLM's own benchmark knows (--num-warmups): a few go first, unmeasured.
                warmup = ["--num-requests", "4", "--rate", "1000", "--seed", "99"]
                with contextlib.redirect_stdout(None):
                    llmsched(
                        [
                            "bench",
                            "--url",
                            server.url,
                            *WORKLOADS["sharegpt"],
                            *warmup,
                            "--out",
                            str(base.with_suffix(".warmup.json")),
                            "--no-progress",
                        ]
                    )
                for exp, r in todo:
                    path = real_path(out, exp, policy, r)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    start = time.perf_counter()
                    label = f"{exp.name} {policy} r{r}"
                    code = llmsched(
                        ["bench", "--url", server.url, *exp.workload_flags(policy),
                         "--out", str(path), "--label", label, "--no-progress"]
                    )  # fmt: skip
                    windows[path.with_suffix(".steps.jsonl")] = (start, time.perf_counter())
                    print(f"   {exp.name} {policy} r{r}: exit {code}", file=sys.stderr, flush=True)
        finally:
            if step_log.is_file():
                split_steps(step_log, windows)


def real_path(out: Path, exp: Experiment, policy: str, repeat: int) -> Path:
    return out / "real" / exp.name / f"{policy}-r{repeat}.json"


def steps_path(out: Path, exp: Experiment, policy: str = "fcfs", repeat: int = 0) -> Path:
    return real_path(out, exp, policy, repeat).with_suffix(".steps.jsonl")


def calibrate(exps: list[Experiment], repeats: int, out: Path) -> Path:
    fit = [steps_path(out, e) for e in exps if e.name in CALIBRATE]
    if not fit:  # --quick: fit on what there is
        fit = [steps_path(out, exps[0])]
    held = sorted(
        p for p in (out / "real").glob("*/*.steps.jsonl") if p not in fit and p.stat().st_size
    )
    cal = out / "cpu-calibration.json"
    bench = [p.with_suffix("").with_suffix(".json") for p in fit]  # the client's side of them
    command = ["calibrate", "--from-steps", *map(str, fit), "--bench", *map(str, bench)]
    command += ["--out", str(cal)]
    if held:
        command += ["--heldout-steps", *map(str, held)]
    print("$ llmsched " + shlex.join(command), file=sys.stderr)
    if llmsched(command) != 0:
        raise SystemExit("calibration failed")
    return cal


def speed_factor(steps: Path, cal: Path) -> float:
    """How fast this shared machine ran during one run, against the calibration: the median
    over the run's steps of measured cycle / priced cycle (> 1: slower than the fit)."""
    fitted = read_calibration(cal)
    log = load_steps([steps])
    priced = predict(log, device_spec(fitted.device), fitted.efficiency)
    return float(np.median(log.cycle / priced))


def at_speed(cal: Path, k: float, out: Path) -> Path:
    """The calibration on a device k times slower: every roofline term scales by k (the
    peaks divided by it, the fixed times multiplied), the stack outside the engine kept."""
    doc = json.loads(cal.read_text())
    doc["device"]["peak_flops"] /= k
    doc["device"]["memory_bandwidth"] /= k
    for name, value in doc["efficiency"].items():
        if name.endswith("_s"):
            doc["efficiency"][name] = value * k
    out.write_text(json.dumps(doc))
    return out


def simulate(exp: Experiment, policy: str, cal: Path, out: Path, tag: str = "") -> dict:
    head, _, _ = read_step_log(steps_path(out, exp))
    folder = out / "models" / exp.model
    sim = out / "sim" / exp.name / f"{policy}{tag}"
    command = [
        "simulate", *exp.workload_flags(policy), "--model", str(folder), "--dtype", "float32",
        "--num-blocks", str(head["num_blocks"] - 1), "--block-size", str(BLOCK_SIZE),
        "--max-num-batched-tokens", str(exp.budget), "--max-num-seqs", str(MAX_NUM_SEQS),
        "--max-model-len", str(MAX_MODEL_LEN), "--policy", POLICIES[policy][2],
        "--latency", str(cal), "--out", str(sim), "--save-detailed", "--no-progress",
    ]  # fmt: skip
    with contextlib.redirect_stdout(None):
        if llmsched(command) != 0:
            raise SystemExit(f"simulation failed: llmsched {shlex.join(command)}")
    return json.loads((sim / "summary.json").read_text())


def report(exps: list[Experiment], policies: list[str], repeats: int, out: Path, cal: Path):
    rows, orders = [], []
    for exp in exps:
        real = {
            p: [json.loads(real_path(out, exp, p, r).read_text()) for r in range(repeats)]
            for p in policies
        }
        sim = {p: simulate(exp, p, cal, out) for p in policies}
        own_speed: dict[str, dict] = {}
        for p in policies:
            failed = sum(r["failed"] for r in real[p])
            # Diagnostic: each repeat predicted at the speed its own steps show, to tell this
            # machine's drift from the model's own error (not a prediction: it uses the run).
            speeds = [speed_factor(steps_path(out, exp, p, r), cal) for r in range(repeats)]
            at_own = [
                simulate(exp, p, at_speed(cal, k, out / "sim" / f"cal-{exp.name}-{p}-r{r}.json"),
                         out, f"-r{r}-own-speed")
                for r, k in enumerate(speeds)
            ]  # fmt: skip
            own_speed[p] = {f: float(np.mean([s[f] for s in at_own])) for f in FIELDS}
            for e in field_errors(real[p], sim[p]):
                own = own_speed[p][e.field]
                rows.append(
                    {
                        "experiment": exp.name, "policy": p, "field": e.field,
                        "real": e.real, "spread": e.spread, "sim": e.sim, "error": e.error,
                        "speeds": speeds, "sim_own_speed": own, "error_own_speed": own / e.real - 1,
                        "heldout": not (exp.name in CALIBRATE and p == "fcfs"),
                        "failed": failed,
                    }
                )  # fmt: skip
        for field in FIELDS:
            agrees, _, _ = order_agrees(real, sim, field)
            agrees_own, _, _ = order_agrees(real, own_speed, field)
            orders.append(
                {"experiment": exp.name, "field": field, "agrees": agrees,
                 "agrees_own_speed": agrees_own,
                 "real": {p: float(np.mean([r[field] for r in real[p]])) for p in policies},
                 "sim": {p: sim[p][field] for p in policies},
                 "sim_own_speed": {p: own_speed[p][field] for p in policies}}
            )  # fmt: skip
    return rows, orders


def mechanisms(exps: list[Experiment], policies: list[str], repeats: int, out: Path,
               rows: list[dict]) -> dict:  # fmt: skip
    """The measurements docs/fidelity-vllm.md explains the errors with: how the signed error
    follows the machine's speed; the stack's latency outside the engine, request by request; a
    decode step's cycle by batch size; and runs whose client received its tokens in clumps
    (gaps the engine never made: more than 100 under 5 ms)."""
    held = [r for r in rows if r["heldout"] and r["field"] == "mean_e2el_ms"]
    speed = [float(np.mean(r["speeds"])) for r in held]
    stack, clumped, cycles = [], [], {}
    for exp in exps:
        for p in policies:
            for r in range(repeats):
                bench = json.loads(real_path(out, exp, p, r).read_text())
                head, steps, added = read_step_log(steps_path(out, exp, p, r))
                stack += list(frontend_latencies(head, steps, added, bench))
                cycle = cycle_times(steps)
                gaps = np.concatenate([np.asarray(g, dtype=float) for g in bench["itls"]] or [[]])
                if np.count_nonzero(gaps < 0.005) > 100:
                    clumped.append({"run": f"{exp.name} {p} r{r}", "gaps": len(gaps),
                                    "under_5ms": int(np.count_nonzero(gaps < 0.005)),
                                    "over_300ms": int(np.count_nonzero(gaps > 0.3)),
                                    "longest_step_ms": 1e3 * float(np.nanmax(cycle))})  # fmt: skip
                if p == "fcfs":
                    for s, c in zip(steps, cycle, strict=True):
                        if not s["p"] and not np.isnan(c):
                            cycles.setdefault(exp.model, {}).setdefault(len(s["d"]), []).append(c)
    ms = 1e3 * np.asarray(stack)
    errors, own = [r["error"] for r in held], [r["error_own_speed"] for r in held]
    all_speeds = sorted({k for r in rows for k in r["speeds"]})
    return {
        "speed_vs_signed_mean_e2el_error": float(np.corrcoef(speed, errors)[0, 1]),
        "median_signed_mean_e2el_error_own_speed": float(np.median(own)),
        "mean_e2el_within_half_the_repeats_range": sum(
            abs(r["error"]) <= r["spread"] / 2 for r in held
        ),
        "run_speeds": {"min": min(all_speeds), "median": float(np.median(all_speeds)),
                       "max": max(all_speeds)},
        "stack_latency_ms": {"requests": len(ms), "p10": float(np.percentile(ms, 10)),
                             "p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
                             "max": float(ms.max())},
        "decode_cycle_ms_by_sequences": {
            m: {n: 1e3 * float(np.median(c)) for n, c in sorted(by.items())}
            for m, by in cycles.items()
        },
        "clumped_runs": clumped,
    }  # fmt: skip


def summarize(rows: list[dict], orders: list[dict]) -> dict:
    held = [r for r in rows if r["heldout"]]
    by_field = {}
    for f in FIELDS:
        mine = [r for r in held if r["field"] == f]
        if mine:
            by_field[f] = {
                "median_abs_error": float(np.median([abs(r["error"]) for r in mine])),
                "median_error": float(np.median([r["error"] for r in mine])),
                "median_spread": float(np.median([r["spread"] for r in mine])),
                "median_abs_error_own_speed": float(
                    np.median([abs(r["error_own_speed"]) for r in mine])
                ),
            }
    return {
        "heldout_runs": len({(r["experiment"], r["policy"]) for r in held}),
        "median_abs_error_mean_e2el": by_field.get("mean_e2el_ms", {}).get("median_abs_error"),
        "median_abs_error_mean_ttft": by_field.get("mean_ttft_ms", {}).get("median_abs_error"),
        "by_field": by_field,
        "order_agrees": sum(o["agrees"] for o in orders),
        "order_agrees_own_speed": sum(o["agrees_own_speed"] for o in orders),
        "order_total": len(orders),
    }


def print_tables(rows: list[dict], orders: list[dict], summary: dict) -> None:
    print(f"{'experiment':36s} {'policy':6s} {'field':20s} {'real':>10s} {'spread':>7s} "
          f"{'sim':>10s} {'error':>8s}")  # fmt: skip
    for r in rows:
        mark = "" if r["heldout"] else "  (fitted)"
        print(
            f"{r['experiment']:36s} {r['policy']:6s} {r['field']:20s} {r['real']:10.1f} "
            f"{100 * r['spread']:6.1f}% {r['sim']:10.1f} {100 * r['error']:+7.1f}%{mark}"
        )
    print(
        "\nheld-out medians by field: |error|, signed error, the real repeats' spread, and "
        "|error| when each run is predicted at the speed its own steps show"
    )
    for f, s in summary["by_field"].items():
        print(
            f"  {f:22s} {100 * s['median_abs_error']:6.1f}%  {100 * s['median_error']:+6.1f}%  "
            f"{100 * s['median_spread']:6.1f}%  {100 * s['median_abs_error_own_speed']:6.1f}%"
        )
    speeds = sorted({(r["experiment"], r["policy"]): tuple(r["speeds"]) for r in rows}.items())
    print("\nthe machine's speed per run (measured / priced step cycle, median; repeats):")
    for (exp, policy), ks in speeds:
        print(f"  {exp:36s} {policy:6s} " + "  ".join(f"{k:.3f}" for k in ks))
    bad = [o for o in orders if not o["agrees"]]
    print(f"\npolicy order as the real engine's: {summary['order_agrees']} of "
          f"{summary['order_total']} (experiment, field) pairs; each run at its own speed: "
          f"{summary['order_agrees_own_speed']}")  # fmt: skip
    for o in bad:
        real = ", ".join(f"{p} {v:.1f}" for p, v in o["real"].items())
        sim = ", ".join(f"{p} {v:.1f}" for p, v in o["sim"].items())
        print(f"  differs: {o['experiment']} {o['field']}: real {real}; simulated {sim}")


def figure(value: float) -> str:
    """Milliseconds to 0.1 ms; a throughput (requests/s can be 0.1) to three digits."""
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def markdown(results: dict) -> str:
    """The results file as docs/fidelity-vllm.md's tables: per experiment, each field's real
    value (mean of the repeats, their spread), the simulated one and the error, per policy."""
    rows, orders = results["rows"], results["orders"]
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    lines = []
    for exp in experiments:
        mine = [r for r in rows if r["experiment"] == exp]
        fitted = sorted({r["policy"] for r in mine if not r["heldout"]})
        note = f" (fitted on: {', '.join(fitted)} first repeat)" if fitted else ""
        lines += [f"#### {exp}{note}", ""]
        head = "| field | " + " | ".join(f"{p}: real (spread) | sim | error" for p in policies)
        lines += [head + " | order |", "|---|" + "---:|---:|---:|" * len(policies) + "---|"]
        by = {(r["policy"], r["field"]): r for r in mine}
        agree = {o["field"]: o["agrees"] for o in orders if o["experiment"] == exp}
        for field in FIELDS:
            cells = []
            for p in policies:
                r = by.get((p, field))
                cells += (
                    [f"{figure(r['real'])} ({100 * r['spread']:.0f} %)", figure(r['sim']),
                     f"{100 * r['error']:+.1f} %"] if r else ["-", "-", "-"]
                )  # fmt: skip
            order = "yes" if agree.get(field) else "no"
            lines.append(f"| {field} | " + " | ".join(cells) + f" | {order} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Two panels: simulated against real (mean E2E and mean TTFT of every (experiment, policy),
    held out or fitted), and the signed mean-E2E error against the machine's measured speed
    during the run, as predicted and at the run's own speed."""
    from llmsched.metrics.report import new_figure

    rows = results["rows"]
    fig = new_figure((12, 5))
    left, right = fig.subplots(1, 2)
    for field, marker in (("mean_e2el_ms", "o"), ("mean_ttft_ms", "^")):
        for held, color in ((True, "tab:blue"), (False, "tab:orange")):
            mine = [r for r in rows if r["field"] == field and r["heldout"] == held]
            left.scatter(
                [r["real"] for r in mine],
                [r["sim"] for r in mine],
                s=18,
                c=color,
                marker=marker,
                label=f"{field[:-3]}, {'held out' if held else 'fitted'}",
            )
    values = [
        r[k]
        for r in rows
        if r["field"] in ("mean_e2el_ms", "mean_ttft_ms")
        for k in ("real", "sim")
    ]
    xs = np.geomspace(min(values) / 1.5, max(values) * 1.5, 50)
    left.plot(xs, xs, "k-", lw=1)
    for k in (0.9, 1.1):
        left.plot(xs, k * xs, "k:", lw=0.8)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="real (ms, mean of repeats)",
        ylabel="simulated (ms)",
        title="simulated against real vLLM (dotted: ±10 %)",
    )
    left.legend(fontsize=8)
    e2e = [r for r in rows if r["field"] == "mean_e2el_ms" and r["heldout"]]
    speed = [float(np.mean(r["speeds"])) for r in e2e]
    right.scatter(speed, [100 * r["error"] for r in e2e], s=18, label="predicted")
    right.scatter(
        speed,
        [100 * r["error_own_speed"] for r in e2e],
        s=18,
        marker="x",
        label="at the run's own speed",
    )
    right.axhline(0, color="k", lw=1)
    right.set(
        xlabel="machine speed during the run (measured / priced step cycle; > 1: slower)",
        ylabel="mean E2E error (%)",
        title="held-out error against this machine's drift",
    )
    right.legend(fontsize=8)
    fig.savefig(str(path), format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one experiment, fcfs and pars, once")
    parser.add_argument("--repeats", type=int, default=2, help="real runs per experiment")
    parser.add_argument("--out", default=str(ROOT / "runs/fidelity-vllm"), help="runs folder")
    parser.add_argument("--report", action="store_true", help="no new real runs: tables only")
    parser.add_argument("--only", help="comma-separated experiment names to run")
    parser.add_argument(
        "--markdown", action="store_true", help="print the results file's tables as Markdown"
    )
    parser.add_argument("--plot", metavar="PNG", help="plot the results file's figures")
    opts = parser.parse_args()
    if opts.markdown or opts.plot:
        results = json.loads(RESULTS.read_text())
        if opts.markdown:
            print(markdown(results))
        if opts.plot:
            plot(results, Path(opts.plot))
            print(f"wrote {opts.plot}")
        return
    out = Path(opts.out)
    exps = QUICK if opts.quick else EXPERIMENTS
    if opts.only:
        exps = [e for e in exps if e.name in opts.only.split(",")]
    policies = ["fcfs", "pars"] if opts.quick else list(POLICIES)
    repeats = 1 if opts.quick else opts.repeats
    started = time.time()
    if not opts.report:
        measure(exps, policies, repeats, out)
    measured_s = time.time() - started
    if opts.report and RESULTS.exists():  # the measuring run's time, kept
        measured_s = json.loads(RESULTS.read_text()).get("measure_seconds", measured_s)
    cal = calibrate(exps, repeats, out)
    rows, orders = report(exps, policies, repeats, out, cal)
    summary = summarize(rows, orders)
    print_tables(rows, orders, summary)
    found = mechanisms(exps, policies, repeats, out, rows)
    print("\nwhat explains the errors:\n" + json.dumps(found, indent=1))
    if not opts.quick:
        RESULTS.write_text(
            json.dumps(
                {
                    "machine": f"{platform.processor() or platform.machine()}, "
                    f"{platform.python_version()}, vLLM 0.32.0 CPU build",
                    "date": time.strftime("%Y-%m-%d"),
                    "repeats": repeats,
                    "calibrated_on": sorted(CALIBRATE),
                    "calibration": json.loads(cal.read_text()),
                    "summary": summary,
                    "rows": rows,
                    "orders": orders,
                    "mechanisms": found,
                    "measure_seconds": measured_s,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
