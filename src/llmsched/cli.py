"""`llmsched`: simulate LLM-serving schedulers on real traces and compare them.

Run `llmsched demo` first: it compares the baseline policies on an embedded workload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Two libraries' process-wide switches, left as the user set them, read when each library is
# first imported (docs/performance.md):
# - pydantic looks for plugins among the entry points of every installed package when it
#   builds its first model: about 30 ms of start-up in our environment, for plugins we never use;
# - numpy asks the kernel to back large arrays with huge pages; where the kernel compacts memory
#   to find them (transparent huge pages' defrag "madvise", as on our machines) a large run's
#   summary spends more time there than computing.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

from llmsched.config import (  # noqa: E402
    SimulationConfig,
    load_config,
    parse_goodput,
    parse_params,
)

EXAMPLES = """examples:
  llmsched demo
  llmsched simulate --trace ../shared/data/traces/azure2023/AzureLLMInferenceTrace_conv.csv \\
      --num-requests 2000 --model llama-2-70b --gpu a100-80gb --tp 2 --instances 8 \\
      --policy sarathi --out runs/azure-sarathi
  llmsched compare --policies fcfs,sarathi,sjf --rate 6 --num-requests 2000 --out runs/cmp
  llmsched simulate --config configs/demo.yaml --policy rr
  llmsched capacity --config configs/slai/tiers.yaml --policies sarathi,slai \
      --slo "median_ttft<0.5s, p99_tbt<=tier" --num-requests 4096 --out runs/capacity
  llmsched trace convert traces/azure2023/AzureLLMInferenceTrace_code.csv code.jsonl
  llmsched bench --url http://127.0.0.1:8000 --rate 2 --num-requests 100 --seed 0 \\
      --out runs/real.json
  llmsched list
"""


# Written out rather than read from the registry and the readers (tests check they agree):
# building the parser imports no policy and no numpy.
TRACE_FORMATS = (
    "azure",
    "lengths",
    "mooncake",
    "mooncake_sessions",
    "sharegpt",
    "llmsched",
    "alpaca_eval",
)
ROUTER_HELP = (
    "round-robin, random, least-outstanding, least-kv, prefix-affinity, pascal (llmsched list)"
)


def _show_config_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags that set config fields default to None (a config file may set them first); their
    help shows the config's own default instead."""
    defaults = SimulationConfig()
    for action in parser._actions:
        value = getattr(defaults, action.dest, None) if action.dest in CONFIG_FLAGS else None
        if value is not None and value is not False and "default" not in (action.help or ""):
            shown = str(value).replace("%", "%%")
            action.help = (
                f"{action.help} (default: {shown})" if action.help else f"default: {shown}"
            )
    return parser


def _workload_flags(rate: bool = True) -> argparse.ArgumentParser:
    """The workload's flags: simulate, compare, capacity and bench generate the same requests
    from them. Each maps to a SimulationConfig field. Without `rate` (capacity, which searches
    the rate itself), no --rate: a flag that did nothing would mislead."""
    p = argparse.ArgumentParser(add_help=False)
    w = p.add_argument_group("workload")
    w.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings (flags win)")
    w.add_argument("--trace", metavar="PATH", help="trace file (default: embedded synthetic one)")
    w.add_argument(
        "--trace-format",
        choices=TRACE_FORMATS,
        help="the trace's format (default: detected; alpaca_eval: a folder of AlpacaEval "
        "prompts, see --config's `generator`)",
    )
    w.add_argument("--num-requests", type=int, metavar="N", help="first N requests of the trace")
    w.add_argument(
        "--programs",
        type=int,
        metavar="N",
        help="N synthetic agent programs (closed-loop multi-turn sessions with tool calls, "
        "docs/agents.md); --rate is then programs/s; the config's `programs` sets the rest",
    )
    if rate:
        w.add_argument("--rate", type=float, metavar="R", help="Poisson arrivals, requests/s")
    w.add_argument("--cv", type=float, help="burstiness: Gamma arrivals with this CV of gaps")
    w.add_argument("--arrival", choices=["auto", "trace", "poisson", "gamma"])
    w.add_argument("--time-scale", type=float, help="replay: multiply the trace's gaps")
    w.add_argument(
        "--max-concurrency",
        type=int,
        metavar="K",
        help="the client keeps at most K requests in flight (vllm bench serve's flag)",
    )
    w.add_argument("--sample", choices=["head", "random"], help="which requests of the trace")
    w.add_argument(
        "--skip-invalid",
        action="store_true",
        default=None,
        help="skip unservable trace rows (e.g. 0 output tokens) and report them",
    )
    w.add_argument("--seed", type=int)
    w.add_argument(
        "--scores",
        metavar="SPEC",
        help="predictor scores for pars/ltr: oracle, prompt-length, model:DIR, or "
        "noisy-oracle,tau=0.6,seed=0",
    )
    return _show_config_defaults(p)


def _goodput_flag(group) -> None:
    group.add_argument(
        "--goodput",
        nargs="+",
        metavar="METRIC:MS",
        help="SLOs for request_goodput, as vllm bench serve: ttft:500 tpot:50",
    )


def _progress_flag(group) -> None:
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on when stderr is a terminal)",
    )


def _backend_flags(parser) -> None:
    """Where the simulations of `sweep` and `capacity` run."""
    g = parser.add_argument_group("parallel runs")
    g.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local processes, or a Ray cluster (pip install 'llmsched[ray]')",
    )
    g.add_argument(
        "--address",
        metavar="auto|URL",
        help="with --backend ray: the cluster, auto (the one this machine belongs to), "
        "ray://HOST:PORT or HOST:PORT (default: a Ray started here)",
    )
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="simulations at once (default: all local cores, or the Ray cluster's CPUs)",
    )


def _executor(args):
    """The executor --backend names; a missing Ray or an unreachable cluster is an error of
    the command line, with its fix."""
    from llmsched.parallel import make_executor

    try:
        return make_executor(args.backend, args.workers, args.address)
    except (ImportError, ConnectionError) as err:
        raise ValueError(str(err)) from None


def engine_flags(cluster: bool = True) -> argparse.ArgumentParser:
    """The hardware's and the engine's flags (simulate, compare, capacity; `serve engine`, one
    engine, without the cluster's --instances and --router)."""
    p = argparse.ArgumentParser(add_help=False)
    h = p.add_argument_group("hardware and engine")
    h.add_argument("--model", help="e.g. llama-3-8b, llama-2-70b, or a Hugging Face id")
    h.add_argument("--gpu", help="e.g. a100-80gb, h100, h200, l40s")
    h.add_argument("--tp", type=int, help="tensor-parallel GPUs per instance")
    if cluster:
        h.add_argument("--instances", type=int, help="engine instances in the cluster")
        h.add_argument("--router", help=ROUTER_HELP)
    h.add_argument(
        "--policy-param",
        action="append",
        metavar="NAME=VALUE",
        help="a policy parameter, e.g. quantum=300 for rr (repeatable)",
    )
    h.add_argument("--max-num-batched-tokens", type=int, metavar="TOKENS")
    h.add_argument("--max-num-seqs", type=int, metavar="SEQS")
    h.add_argument("--max-model-len", type=int, metavar="TOKENS")
    h.add_argument("--preemption", choices=["recompute", "swap"])
    h.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION")
    h.add_argument("--kv-fraction", type=float, help="cap KV at this share of what fits")
    h.add_argument("--num-blocks", type=int, help="KV blocks per instance (overrides memory)")
    h.add_argument(
        "--latency",
        metavar="MODEL",
        help="latency model: roofline (defaults), calibrated (fitted on measured profiles), or "
        "a calibration file (llmsched calibrate --from-steps ... --out CAL.json)",
    )
    h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="served dtype")
    h.add_argument("--block-size", type=int, metavar="TOKENS", help="KV block size (vLLM: 16)")
    h.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        help="vLLM's automatic prefix caching: requests share the KV of common prompt prefixes "
        "(docs/prefix-caching.md)",
    )
    h.add_argument(
        "--frontend-latency",
        type=float,
        metavar="SECONDS",
        help="what the serving stack outside the engine adds to each TTFT and E2E latency "
        "(default: the --latency file's measure, else 0)",
    )
    return _show_config_defaults(p)


def _run_flags(search: bool = False) -> argparse.ArgumentParser:
    """Flags shared by simulate, compare and capacity: the workload's, the engine's, output. A
    search (capacity) sets the rate itself and keeps no run's files: no --rate, --goodput,
    --save-gaps or --save-detailed there."""
    p = argparse.ArgumentParser(
        add_help=False, parents=[_workload_flags(rate=not search), engine_flags()]
    )
    o = p.add_argument_group("output")
    if search:
        o.add_argument("--out", metavar="DIR", help="write capacity.json and capacity.png")
        _progress_flag(o)
        return p
    _goodput_flag(o)
    o.add_argument("--out", metavar="DIR", help="write summary.json, requests.csv, config.yaml")
    o.add_argument(
        "--save-gaps",
        action="store_true",
        help="also write DIR/itl.npz: every request's inter-token gaps",
    )
    o.add_argument(
        "--save-detailed",
        action="store_true",
        help="summary.json also holds vllm bench serve's per-request arrays (input_lens, "
        "ttfts, itls, latencies, ...), as `vllm bench serve --save-detailed`",
    )
    _progress_flag(o)
    return p


CONFIG_FLAGS = [
    "trace",
    "trace_format",
    "num_requests",
    "rate",
    "cv",
    "arrival",
    "time_scale",
    "max_concurrency",
    "sample",
    "skip_invalid",
    "seed",
    "scores",
    "model",
    "gpu",
    "tp",
    "instances",
    "router",
    "max_num_batched_tokens",
    "max_num_seqs",
    "max_model_len",
    "preemption",
    "gpu_memory_utilization",
    "kv_fraction",
    "num_blocks",
    "latency",
    "dtype",
    "block_size",
    "enable_prefix_caching",
    "frontend_latency",
]


def config_from_flags(args, **extra):
    """The run's SimulationConfig: the config file's settings, then the flags given."""
    overrides = {name: getattr(args, name, None) for name in CONFIG_FLAGS}
    if getattr(args, "programs", None) is not None:
        overrides["programs"] = {"count": args.programs}
    for key, flag, parse in (
        ("goodput", "goodput", parse_goodput),
        ("policy_params", "policy_param", parse_params),
    ):
        try:
            overrides[key] = parse(getattr(args, flag, None))
        except ValueError as err:
            raise ValueError(f"--{flag.replace('_', '-')}: {err}") from None
    return load_config(getattr(args, "config", None), **(overrides | extra))


def _progress(args) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def cmd_simulate(args) -> int:
    from llmsched.experiment import check, load_workload, run_title, save, simulate
    from llmsched.metrics.report import format_summary

    cfg = config_from_flags(args, policy=args.policy)
    check(cfg)  # the model, GPU and engine before a trace is read
    workload = load_workload(cfg)
    _note(workload)
    result = simulate(cfg, workload, progress=_progress(args))
    print(format_summary(result.summary, title=run_title(cfg, len(workload))))
    _report_run(result)
    if args.out:
        folder = save(result, args.out, gaps=args.save_gaps, detailed=args.save_detailed)
        print(f"wrote {folder}/{{summary.json,requests.csv,config.yaml}}")
    return 0


def cmd_bench(args) -> int:
    """Send the workload simulate would simulate to a real server; vLLM bench's JSON."""
    from llmsched.bench.run import bench
    from llmsched.experiment import load_workload
    from llmsched.metrics.report import format_summary
    from llmsched.metrics.vllm_bench import write_result

    cfg = config_from_flags(args)
    if not args.out:
        raise ValueError("bench needs --out FILE.json (vllm bench serve's result format)")
    out = Path(args.out)
    if out.suffix != ".json":
        raise ValueError(f"--out {out}: bench writes one JSON file, name it FILE.json")
    workload = load_workload(cfg)
    print(f"workload: {workload.describe()}", file=sys.stderr)
    _note(workload)
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    result = bench(
        workload,
        args.url,
        model=args.served_model,
        chat=args.endpoint == "chat",
        prompts=args.prompts,
        seed=cfg.seed,
        max_concurrency=cfg.max_concurrency,
        timeout=args.timeout,
        ignore_eos=args.ignore_eos,
        goodput=cfg.goodput,
        percentiles=percentiles,
        request_rate=cfg.rate,
        burstiness=1.0 / cfg.cv**2,
        label=args.label,
        progress=_progress(args),
    )
    result["workload"] = workload.describe()
    result["seed"] = cfg.seed
    print(format_summary(result))
    failed = [e for e in result["errors"] if e]
    if failed:
        print(f"{len(failed)} request(s) failed; first: {failed[0]}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(result, out)
    print(f"wrote {out}")
    return 0


def _report_run(result) -> None:
    s, r = result.summary, result.resolved
    print(
        f"workload: {r['workload']}"
        + (
            f" ({r['skipped_trace_rows']} unservable trace rows skipped)"
            if r["skipped_trace_rows"]
            else ""
        )
    )
    print(
        f"engine: {r['model']} on {r['gpu']}, {r['num_blocks']} KV blocks per instance, "
        f"budget {r['max_num_batched_tokens']} tokens, {r['max_num_seqs']} seqs"
    )
    print(
        f"simulated {s['completed'] + s['failed']} requests ({s['failed']} rejected) in "
        f"{s['sim_wall_seconds']:.2f} s wall, {s['sim_steps']} policy decisions, "
        f"{s['sim_iterations']} iterations"
    )
    if s.get("num_programs"):
        jct = s["mean_jct_ms"]
        print(
            f"programs: {s['num_programs']} ({s['completed_programs']} completed, "
            f"{s['cut_programs']} cut short by a rejected turn); job completion time mean "
            + (f"{jct / 1000:.2f} s, p90 {s['p90_jct_ms'] / 1000:.2f} s" if jct else "n/a")
        )


def _note(workload) -> None:
    """What reading the workload decided that the user did not say, told once."""
    if workload.note:
        print(f"note: {workload.note}", file=sys.stderr)


def cmd_compare(args, policies: list[str] | None = None, out: str | None = None) -> int:
    from llmsched.experiment import check, load_workload, run_title, save, simulate
    from llmsched.metrics.report import format_comparison, plot_distributions

    base = config_from_flags(args)
    if policies is None and args.policies:
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    policies = policies or list(base.runs or {})
    if not policies:
        raise ValueError("compare needs --policies, or a config file with named `runs`")
    # Every run's config, engine and parameters are checked before anything is read or run.
    configs = {
        name: base.variant(name) if name in (base.runs or {}) else base.replace(policy=name)
        for name in policies
    }
    for cfg in configs.values():
        check(cfg)
    workload = load_workload(base)  # identical requests and arrival times for every policy
    print(f"workload: {workload.describe()}")
    _note(workload)
    summaries, collectors = {}, {}
    for name, cfg in configs.items():
        start = time.perf_counter()
        result = simulate(cfg, workload, progress=_progress(args))
        summaries[name], collectors[name] = result.summary, result.collector
        print(f"  {name}: {time.perf_counter() - start:.2f} s", file=sys.stderr)
        if out or args.out:
            save(result, Path(out or args.out) / name, gaps=args.save_gaps)
    title = run_title(base, len(workload))
    print(format_comparison(summaries, title=title))
    out = out or args.out
    if out:
        plot = Path(out) / "latency_cdf.png"
        try:
            plot_distributions(collectors, plot, title=title)
            print(f"wrote {plot}")
        except ImportError as err:
            print(f"no plot: {err}", file=sys.stderr)
        (Path(out) / "comparison.json").write_text(json.dumps(summaries, indent=2) + "\n")
        print(f"wrote {out}/comparison.json and one folder per policy")
    return 0


def cmd_demo(args) -> int:
    # A load at which the policies differ: about 90 % of this engine's capacity.
    args.rate = args.rate or 7.0
    args.num_requests = args.num_requests or 1500
    args.out = args.out or "runs/demo"
    print(
        "llmsched demo: baseline schedulers on an embedded workload shaped like the Azure 2023\n"
        "conversation trace (synthetic lengths, Poisson arrivals), Llama-3-8B on one A100-80GB.\n"
    )
    return cmd_compare(args, ["fcfs", "sarathi", "vllm-v0", "rr", "sjf", "srpt"], args.out)


def cmd_capacity(args) -> int:
    from tqdm import tqdm

    from llmsched.capacity import parse_slo, search_capacity, tier_limits_ms, tiers_needed
    from llmsched.experiment import check, run_title
    from llmsched.metrics.report import plot_capacity

    conditions = parse_slo(args.slo)
    policies = [p.strip() for p in (args.policies or args.policy or "fcfs").split(",") if p.strip()]
    # Everything that can be refused is refused before a search (or a Ray cluster) starts.
    if args.seeds < 1 or not args.start_rate > 0 or not 0 < args.tolerance < 1:
        raise ValueError(
            f"capacity needs --seeds >= 1, --start-rate > 0 and 0 < --tolerance < 1; got "
            f"{args.seeds}, {args.start_rate:g} and {args.tolerance:g}"
        )
    configs = {name: config_from_flags(args, policy=name) for name in policies}
    for cfg in configs.values():
        if cfg.arrival == "trace":
            raise ValueError("capacity tries rates of generated arrivals: not arrival: trace")
        if tiers_needed(conditions) and not cfg.tiers:
            raise ValueError(
                f"--slo {args.slo!r} has 'tier' limits: the config needs tiers, e.g. "
                "tiers: {paying: {share: 0.05, tbt: 0.1}, free: {share: 0.95, tbt: 0.5}}"
            )
        check(cfg.replace(rate=args.start_rate))
    results = {}
    with _executor(args) as executor:  # one for every policy: a Ray cluster is joined once
        for name, cfg in configs.items():
            print(
                f"{name}: searching the highest rate with {', '.join(map(str, conditions))} "
                f"({cfg.num_requests or 'all'} requests, {args.seeds} seed(s), "
                f"{executor.workers} workers, {args.backend} backend)",
                file=sys.stderr,
            )

            def show(e, name=name):
                values = "; ".join(
                    f"{c} "
                    + ",".join(
                        f"{t}={v:.0f}" if v is not None else f"{t}=-" for t, v in vals.items()
                    )
                    for c, vals in e.values.items()
                )
                tqdm.write(  # above the progress bar, not through it
                    f"  {name} {e.rate:8.3f} req/s seed {e.seed}: {'ok  ' if e.ok else 'FAIL'} "
                    f"{values}",
                    file=sys.stderr,
                )

            result = search_capacity(
                cfg,
                conditions,
                seeds=args.seeds,
                executor=executor,
                start_rate=args.start_rate,
                tolerance=args.tolerance,
                on_evaluation=show,
                progress=_progress(args),
            )
            limits = tier_limits_ms(cfg)
            results[name] = result.as_dict() | {
                "limits_ms": {
                    str(c): ({"all": c.limit_ms} if c.limit_ms is not None else limits)
                    for c in conditions
                }
            }
    first = next(iter(configs.values()))
    title = run_title(first, first.num_requests, load=False) + " per rate"
    print(title)
    print(f"{'policy':12s} {'capacity (req/s)':>16s}  bracket")
    base = next(iter(results.values()))["capacity_rps"]
    for name, r in results.items():
        lo, hi = r["bracket_rps"]
        gain = f"  {100 * (r['capacity_rps'] / base - 1):+.1f} % vs {policies[0]}" if base else ""
        print(f"{name:12s} {r['capacity_rps']:16.3f}  [{lo:.3f}, {hi:.3f}]{gain}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "capacity.json").write_text(json.dumps(results, indent=2) + "\n")
        try:
            plot_capacity(results, out / "capacity.png", title=title)
        except ImportError as err:
            print(f"no plot: {err}", file=sys.stderr)
        print(f"wrote {out}/capacity.json and capacity.png")
    return 0


def cmd_sweep(args) -> int:
    from llmsched.parallel import check_backend
    from llmsched.sweep import plan, read_sweep, rows, run, write_results
    from llmsched.sweep.plot import plot_sweep
    from llmsched.sweep.run import format_rows
    from llmsched.sweep.spec import describe

    check_backend(args.backend, args.address)
    sweep = read_sweep(args.config)  # every cell's config is checked before any runs
    out = Path(args.out or Path("runs") / f"sweep-{sweep.path.stem}")
    todo = plan(sweep, out)
    for path in todo.corrupt:
        print(f"unreadable result {path}: its cell runs again", file=sys.stderr)
    print(
        f"sweep {sweep.path}: {len(sweep.cells)} cells, {len(todo.done)} done before "
        f"(skipped), {len(todo.todo)} to run",
        file=sys.stderr,
    )
    if todo.todo:
        with _executor(args) as executor:
            print(f"{executor.workers} workers, {args.backend} backend", file=sys.stderr)
            run(todo, out, executor, progress=_progress(args))
    table = rows(sweep, todo)
    print(format_rows(table, sweep.keys))
    written = write_results(table, out)
    try:
        plot_sweep(table, sweep.keys, out / "sweep.png")
        written.append(out / "sweep.png")
    except (ImportError, ValueError) as err:
        print(f"no plot: {err}", file=sys.stderr)
    print("wrote " + ", ".join(map(str, written)))
    if todo.errors:
        cell = next(c for c in sweep.cells if c.id in todo.errors)
        print(
            f"{len(todo.errors)} cell(s) failed (the table's error column; a rerun tries them "
            f"again), e.g. {describe(cell.number, cell.overrides)}: {todo.errors[cell.id]}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_trace(args) -> int:
    from llmsched.data import resolve
    from llmsched.workload.readers import read_trace, write_jsonl

    # The arguments first: a large trace takes a while to read.
    source = resolve(args.input, "trace file")
    if args.action == "convert":
        if not args.output:
            raise ValueError("trace convert needs an output path: llmsched trace convert IN OUT")
        output = Path(args.output)
        if output.exists() and output.resolve() == source.resolve():
            raise ValueError(f"{output} is the input: convert it into another file")
        if output.exists() and not args.force:
            raise ValueError(f"{output} exists: give --force to overwrite it")
        if not output.parent.is_dir():
            raise ValueError(f"no folder {output.parent} to write {output.name} in")
    elif args.output:
        raise ValueError(f"trace info takes one trace, got a second path {args.output!r}")
    workload = read_trace(source, args.format, skip_invalid=args.skip_invalid)
    print(
        f"{args.input}: {workload.describe()}"
        + ("" if workload.timed else " (no timestamps)")
        + (
            f"; skipped {workload.skipped} unservable rows"
            if getattr(workload, "skipped", 0)
            else ""
        )
    )
    if args.action == "info":
        print(trace_info(workload))
    if args.action == "convert":
        write_jsonl(workload, output)
        print(f"wrote {args.output} (llmsched JSONL, see docs/workload-format.md)")
    return 0


def trace_info(workload) -> str:
    """`trace info`'s figures: the lengths' percentiles and, for a timed trace, the time it
    spans and its arrival rate (what --rate and --time-scale are chosen against)."""
    import numpy as np

    c = workload.columns
    names = ["prompt_tokens", "output_tokens"]
    if (c["reasoning_tokens"] > 0).any():
        names.append("reasoning_tokens")
    lines = [f"{'tokens':<18}{'mean':>8}{'median':>8}{'p90':>8}{'p99':>8}{'max':>8}"]
    for name in names if len(workload) else []:
        v = c[name]
        stats = [v.mean(), *np.percentile(v, [50, 90, 99]), v.max()]
        lines.append(f"{name:<18}" + "".join(f"{x:8.0f}" for x in stats))
    arrival = c["arrival"]
    if workload.timed and len(workload) > 1:
        span = float(arrival[-1] - arrival[0])
        gaps = np.diff(arrival)
        cv = float(gaps.std() / gaps.mean()) if gaps.mean() > 0 else float("nan")
        rate = f"{(len(workload) - 1) / span:.3g} req/s" if span > 0 else "all at once"
        lines.append(
            f"arrivals: {span:.1f} s from the first to the last, {rate} on average "
            f"(CV of the gaps {cv:.2f}; Poisson: 1)"
        )
    return "\n".join(lines)


def cmd_fidelity(args) -> int:
    from llmsched.data import resolve
    from llmsched.hardware import calibration as cal

    if args.real or args.sim:
        return _fidelity_runs(args)
    if not args.profiles:
        raise ValueError("fidelity needs a profile folder, or --real RUN.json ... --sim RUN.json")

    profiles = cal.load_vidur_profiles(resolve(args.profiles), args.gpu)
    calibration = cal.read_calibration(args.calibration or cal.calibration_path(args.gpu))
    report = cal.evaluate(
        calibration, profiles, sorted(profiles.operators), attention="all", allreduce="all"
    )
    print(cal.format_report(report, f"Calibrated model against {args.profiles}"))
    if args.plot:
        cal.plot_fidelity(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _fidelity_runs(args) -> int:
    """A simulated run against measured ones (vllm bench serve results on both sides)."""
    from llmsched.metrics.fidelity import field_errors, format_errors
    from llmsched.metrics.vllm_bench import read_result

    if not (args.real and args.sim):
        raise ValueError("compare runs with both --real RUN.json [...] and --sim RUN.json")
    errors = field_errors([read_result(r) for r in args.real], read_result(args.sim))
    if not errors:
        raise ValueError("the runs share no latency or throughput field: are both results?")
    print(format_errors(errors))
    return 0


def cmd_list(args) -> int:
    import shutil
    import textwrap

    from llmsched.hardware.specs import list_gpus, list_models
    from llmsched.policies import INSTANCE_POLICIES, ROUTERS
    from llmsched.policies.base import describe

    width = min(shutil.get_terminal_size().columns, 100)
    for title, registry in (
        ("policies (--policy)", INSTANCE_POLICIES),
        ("routers (--router)", ROUTERS),
    ):
        print(f"{title}:")
        column = max(map(len, registry)) + 3
        for name, cls in sorted(registry.items()):
            print(
                textwrap.fill(
                    describe(cls),
                    width,
                    initial_indent=f"  {name:{column - 3}s} ",
                    subsequent_indent=" " * column,
                )
            )
    for title, names in (("models (--model)", list_models()), ("gpus (--gpu)", list_gpus())):
        print(
            textwrap.fill(
                ", ".join(names), width, initial_indent=f"{title}: ", subsequent_indent="  "
            )
        )
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each flag's default where it has one (not None or off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if (
            "%(default)" in help
            or "default" in help
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return help
        return f"{help} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """llmsched's parsers and subparsers all show defaults (subparsers take the parent's class)."""

    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from llmsched import __version__

    parser = _Parser(
        prog="llmsched",
        description="Simulate and compare LLM-serving schedulers (vLLM FCFS and priority, "
        "Sarathi-Serve, round-robin, oracle SJF/SRPT, ...) on real traces.",
        epilog=EXAMPLES,
    )
    parser.add_argument("--version", action="version", version=f"llmsched {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_flags = _run_flags()
    s = sub.add_parser(
        "simulate",
        parents=[run_flags],
        help="run one policy, print the summary",
        description="Simulate one scheduling policy on a workload.",
    )
    s.add_argument("--policy", help="scheduling policy (llmsched list)")
    s.set_defaults(func=cmd_simulate)
    c = sub.add_parser(
        "compare",
        parents=[run_flags],
        help="run policies on the same workload",
        description="Run several policies on the identical workload; print a "
        "table and plot TTFT/E2E distributions.",
    )
    c.add_argument(
        "--policies",
        help="comma-separated policies or names of the config's `runs`, e.g. fcfs,sarathi,sjf "
        "(default: every run the config names)",
    )
    c.set_defaults(func=cmd_compare)
    cap = sub.add_parser(
        "capacity",
        parents=[_run_flags(search=True)],
        help="highest rate that meets SLOs",
        description="Find the highest Poisson arrival rate at which each policy meets the SLOs "
        "(every seed must), simulating several rates at once on the local cores or a Ray cluster.",
    )
    cap.add_argument("--policy", help="one policy")
    cap.add_argument("--policies", help="several, comma-separated (the first is the baseline)")
    cap.add_argument(
        "--slo",
        required=True,
        help='conditions, e.g. "median_ttft<0.5s, p99_tbt<=tier" (tbt = ITL)',
    )
    cap.add_argument("--seeds", type=int, default=1, help="seeds per rate (all must meet SLOs)")
    cap.add_argument("--start-rate", type=float, default=1.0, help="first rate tried, req/s")
    cap.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="stop when the bracket is this narrow, relative (default 0.02)",
    )
    _backend_flags(cap)
    cap.set_defaults(func=cmd_capacity)
    sw = sub.add_parser(
        "sweep",
        help="many simulations from one sweep file, in parallel, resumable",
        description="Run every cell of a sweep file (a base config crossed with a grid of "
        "values and/or a list of cells; docs/sweep.md) on local processes or a Ray cluster; "
        "cells with a stored result are skipped. Writes DIR/results.csv, results.json (one row "
        "per cell), sweep.png and cells/ (each cell's result).",
    )
    sw.add_argument("--config", metavar="SWEEP.yaml", required=True, help="the sweep file")
    sw.add_argument("--out", metavar="DIR", help="results folder (default: runs/sweep-NAME)")
    _progress_flag(sw)
    _backend_flags(sw)
    sw.set_defaults(func=cmd_sweep)
    b = sub.add_parser(
        "bench",
        parents=[_workload_flags()],
        help="send the workload to an OpenAI-compatible server and measure it",
        description="Stream the workload `simulate` would simulate (same flags, same seed, same "
        "requests) to a real OpenAI-compatible server (vLLM, SGLang, llmsched's own), with "
        "arrivals, prompt lengths and output lengths enforced; write vllm bench serve's JSON.",
    )
    g = b.add_argument_group("server")
    g.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    g.add_argument(
        "--model",
        dest="served_model",
        metavar="NAME",
        help="the served model's name (default: the first /v1/models lists)",
    )
    g.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="/v1/completions (default) or /v1/chat/completions",
    )
    g.add_argument(
        "--prompts",
        choices=["ids", "text"],
        default="ids",
        help="prompts as token ids (exact lengths; default) or text (chat always sends text)",
    )
    g.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for exactly max_tokens tokens (vLLM's ignore_eos; default on)",
    )
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    o = b.add_argument_group("output")
    _goodput_flag(o)
    o.add_argument("--out", metavar="FILE.json", help="vllm bench serve's result JSON")
    o.add_argument("--label", help="the run's label in the JSON")
    o.add_argument(
        "--metric-percentiles",
        default="90,95,99",
        help="percentiles reported besides the median, which is always median_* (vllm bench "
        "serve's flag; default 90,95,99)",
    )
    _progress_flag(o)
    b.set_defaults(func=cmd_bench)
    d = sub.add_parser(
        "demo",
        parents=[run_flags],
        help="compare baselines on built-in data",
        description="Compare six baseline schedulers (fcfs, sarathi, vllm-v0, rr, sjf, srpt) on "
        "an embedded workload shaped like the Azure 2023 conversation trace: 1,500 requests, "
        "Poisson at 7 req/s, Llama-3-8B on one A100-80GB (about 90 %% of its capacity). Writes "
        "runs/demo (or --out): one folder per policy and latency_cdf.png.",
    )
    # Not a parser default: the run flags' actions are shared with simulate, compare and
    # capacity, so a default set here would become theirs too.
    d.set_defaults(func=cmd_demo)
    t = sub.add_parser(
        "trace",
        help="inspect or convert a trace to llmsched JSONL",
        description="info: a trace's requests, lengths and arrivals. convert: the trace as "
        "llmsched JSONL (docs/formats.md), the format every reader round-trips.",
    )
    t.add_argument("action", choices=["info", "convert"], help="what to do with the trace")
    t.add_argument("input", help="trace file, or a path under $LLMSCHED_DATA")
    t.add_argument("output", nargs="?", help="convert: the JSONL file to write")
    t.add_argument(
        "--format", choices=TRACE_FORMATS[:-1], help="the input's format (default: detected)"
    )
    t.add_argument(
        "--skip-invalid", action="store_true", help="skip unservable rows and report them"
    )
    t.add_argument("--force", action="store_true", help="convert: overwrite an existing output")
    t.set_defaults(func=cmd_trace)
    fid = sub.add_parser(
        "fidelity",
        help="the model against measurements: profiles, or a simulated run against real ones",
        description="Compare the calibrated latency model with measured operator, layer and "
        "attention times (a folder in Vidur's or `llmsched profile`'s CSV schema); or, with "
        "--real and --sim, a simulated run (simulate --save-detailed) with measured runs "
        "(llmsched bench or vllm bench serve JSON), field by field.",
    )
    fid.add_argument(
        "profiles", nargs="?", help="profile folder, e.g. profiles/vidur or a profile --out"
    )
    fid.add_argument("--real", nargs="+", metavar="RUN.json", help="measured runs (repeats)")
    fid.add_argument("--sim", metavar="RUN", help="a simulated run: summary.json or its folder")
    fid.add_argument("--gpu", default="a100-80gb", help="GPU the profiles were measured on")
    fid.add_argument("--calibration", help="calibration JSON (default: the GPU's stored one)")
    fid.add_argument("--plot", metavar="PNG", help="write predicted-vs-measured scatter plots")
    fid.set_defaults(func=cmd_fidelity)
    sub.add_parser(
        "calibrate",
        add_help=False,
        help="fit the latency model on measured profiles:"
        " llmsched calibrate --data DIR --gpu NAME --out FILE.json",
    )
    # `llmsched profile ARGS` and `llmsched calibrate ARGS` go to their own parsers (see main).
    sub.add_parser(
        "serve",
        add_help=False,
        help="HTTP surfaces: llmsched serve engine --model NAME --gpu GPU --policy P (an emulated "
        "vLLM server), llmsched serve gateway --backends URL,URL --router NAME (an OpenAI proxy)",
    )
    sub.add_parser(
        "profile",
        help="measure operator and layer times on the GPU (or a tiny CPU "
        "shape): llmsched profile --model NAME --tp 1 --out DIR",
        add_help=False,
    )
    from llmsched.predict.commands import add_commands as add_predict_commands

    add_predict_commands(sub)  # train-ranker, eval-ranker
    lst = sub.add_parser("list", help="policies, routers, models and GPUs")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["profile"]:
        from llmsched.hardware import profiler

        return profiler.main(argv[1:])
    if argv[:1] == ["calibrate"]:
        from llmsched.hardware import calibration

        return calibration.main(argv[1:])
    if argv[:2] in (["serve", "engine"], ["serve", "gateway"]):
        import importlib

        return importlib.import_module(f"llmsched.integrations.serve.{argv[1]}").main(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"llmsched: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `llmsched list | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
