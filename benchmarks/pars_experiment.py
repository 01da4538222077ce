"""PARS scheduling experiment: prompt-aware ranking vs FCFS and the oracles, in the simulator.

    .venv/bin/python benchmarks/pars_experiment.py            # both GPUs, 3,000 requests a point
    .venv/bin/python benchmarks/pars_experiment.py --quick    # 1,500 requests, A100 only
    .venv/bin/python benchmarks/pars_experiment.py --plots docs/img   # also write the PNGs

Workload and engine: configs/pars/sharegpt-llama3-8b-{a100,h100}.yaml, i.e. the first N ShareGPT
V3 turns of the predictor's held-out *test* split (hash of the conversation,
llmsched.predict.data), real response lengths (cl100k tokens), Poisson arrivals; Llama-3-8B on
one A100-80GB or H100-80GB, roofline latency model, vLLM V1 limits (2,048 batched tokens, 256
sequences), recompute. Each point is the workload `llmsched compare --config FILE --rate R`
simulates (checked below); scores are computed once and shared by all rates.

1. Rate sweep, light load to overload: fcfs; pars (vLLM V1 priority scheduling: waiting
   requests never preempt) with the trained pairwise ranker, the pointwise and the ListMLE
   predictors, and the prompt length; pars-v0.6 (pars with vLLM v0.6's priority preemption,
   preempt=True) on the pairwise ranker; ltr (vllm-ltr) with the ListMLE scores; oracle sjf and
   srpt. Mean/p50/p90/p99 E2E latency and TTFT.
2. Ranking quality: pars, pars-v0.6 and ltr with noisy-oracle scores of Kendall's tau 0 ... 1
   at a fixed high rate (A100).
3. A KV-bound engine: the A100 with 5 % and 10 % of its KV, where memory, not the sequence cap,
   limits the batch: fcfs, pars, pars-v0.6, sjf, srpt.

Trained predictors are read from models/ in the checkout (``--models DIR``); a missing one is
reported and its rows are left out. Train them (about a minute each once the embeddings are
cached; embedding the 49k train prompts the first time takes 10-45 min on 2 cores):

    .venv/bin/llmsched train-ranker --data sharegpt --mode frozen --out models/pars-sharegpt-minilm
    for m in pointwise listmle; do .venv/bin/llmsched train-ranker --data sharegpt \
        --mode frozen --method $m --out models/$m-sharegpt-minilm; done

Results: stdout and benchmarks/results/pars.json (and .md); progress on stderr.
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
from llmsched.metrics.ranking import kendall_tau  # noqa: E402
from llmsched.workload.generators import build_workload  # noqa: E402
from llmsched.workload.request import Workload  # noqa: E402
from llmsched.workload.scores import compute_scores  # noqa: E402

CONFIGS = {
    "a100-80gb": ROOT / "configs/pars/sharegpt-llama3-8b-a100.yaml",
    "h100": ROOT / "configs/pars/sharegpt-llama3-8b-h100.yaml",
}
# Light load to overload. FCFS's throughput saturates near 26.5 req/s on the A100 (with all
# 256 sequence slots full) and near 60 req/s on the H100 in this model.
# The last point, 1,000 req/s, is a burst (all requests queued within ~3 s), as vllm-ltr's.
RATES = {"a100-80gb": (10, 26, 30, 34, 40, 50, 1000), "h100": (25, 55, 62, 70, 80, 100, 1000)}
TAU_RATE = ("a100-80gb", 34)
# 3. A KV-bound engine: the A100's KV capped at these shares of what fits (--kv-fraction), so
# that KV memory, not the 256-sequence cap, limits the batch (FCFS preempts on KV shortage).
KV_BOUND = ("a100-80gb", (0.05, 0.1), (20, 26))
KV_LABELS = ("fcfs", "pars", "pars-v0.6", "sjf", "srpt")
TAUS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PREDICTORS = {  # score name -> folder under --models
    "pairwise": "pars-sharegpt-minilm",
    "pointwise": "pointwise-sharegpt-minilm",
    "listmle": "listmle-sharegpt-minilm",
}
# vLLM v0.6's priority preemption (a waiting request preempts worse-scored running ones);
# pars's default is V1's, where only a running request short of KV preempts.
V06_PREEMPT = {"preempt": True}
NO_STARVATION = {"starvation_threshold": None}
# (label, policy, score source, policy parameters)
VARIANTS = (
    ("fcfs", "fcfs", None, {}),
    ("pars", "pars", "pairwise", {}),
    ("pars-pointwise", "pars", "pointwise", {}),
    ("pars-listmle", "pars", "listmle", {}),
    ("pars-promptlen", "pars", "prompt-length", {}),
    ("pars-v0.6", "pars", "pairwise", V06_PREEMPT),  # PARS was released against vLLM v0.6
    ("ltr", "ltr", "listmle", {}),
    ("ltr-nostarv", "ltr", "listmle", NO_STARVATION),
    ("sjf", "sjf", None, {}),
    ("srpt", "srpt", None, {}),
)
METRICS = ("e2el", "ttft")
STATS = ("mean", "median", "p90", "p99")

_BASE: Workload | None = None
_SCORES: dict[str, np.ndarray] = {}


def config(gpu: str, **overrides):
    """The experiment's config for a GPU, without its score source (scores are shared)."""
    return load_config(CONFIGS[gpu], **overrides).replace(scores=None)


def test_workload(n: int, seed: int) -> Workload:
    """The config's requests (held-out ShareGPT turns) with their prompt texts; arrivals are
    drawn per rate."""
    return load_workload(config("a100-80gb", num_requests=n, seed=seed))


def model_scores(base: Workload, path: Path) -> np.ndarray:
    """`load_predictor(path).score(prompts)`; for a frozen encoder, the same numbers from the
    encoder's on-disk embedding cache, so the three rankers embed the prompts once."""
    from llmsched.predict import load_predictor

    predictor = load_predictor(path)
    encoder = getattr(predictor, "encoder", None)
    if encoder is not None and getattr(predictor, "finetuned", True) is False:
        texts = list(base.columns["prompt_text"])
        return predictor.score_embeddings(encoder.embed_cached(texts))
    return compute_scores(base, f"model:{path}")


def all_scores(base: Workload, folders: dict[str, Path]) -> tuple[dict, list[str]]:
    scores = {
        "oracle": compute_scores(base, "oracle"),
        "prompt-length": compute_scores(base, "prompt-length"),
    }
    missing = []
    for name, path in folders.items():
        if not path.exists():
            missing.append(f"{name} ({path})")
            continue
        start = time.perf_counter()
        scores[name] = model_scores(base, path)
        print(f"scored {len(base)} prompts with {path} in {time.perf_counter() - start:.1f} s")
    for tau in TAUS:
        scores[f"tau={tau}"] = compute_scores(base, {"source": "noisy-oracle", "tau": tau})
    return scores, missing


def _init(base: Workload, scores: dict[str, np.ndarray]) -> None:
    global _BASE, _SCORES
    _BASE, _SCORES = base, scores


def run(
    gpu: str,
    rate: float,
    label: str,
    policy: str,
    score: str | None,
    params: dict,
    seed: int,
    kv_fraction: float | None = None,
) -> dict:
    workload = _BASE
    if score is not None:
        workload = workload.with_columns(score=_SCORES[score])
    workload = build_workload(workload, arrival="poisson", rate=rate, seed=seed)
    cfg = config(
        gpu,
        num_requests=len(workload),
        policy=policy,
        rate=rate,
        seed=seed,
        policy_params=params,
        kv_fraction=kv_fraction,
    )
    start = time.perf_counter()
    result = simulate(cfg, workload)
    s = result.summary
    row = {"gpu": gpu, "rate": rate, "label": label, "policy": policy, "score": score}
    row["params"] = params
    row["kv_fraction"] = kv_fraction
    row |= {f"{st}_{m}_s": s[f"{st}_{m}_ms"] / 1000 for m in METRICS for st in STATS}
    row |= {
        "completed": s["completed"],
        "request_throughput": s["request_throughput"],
        "preemptions": int(result.collector.column("preemptions").sum()),
        "wall_s": time.perf_counter() - start,
    }
    return row


def progress(i: int, total: int, row: dict, start: float) -> dict:
    print(
        f"[{i + 1}/{total}, {time.perf_counter() - start:.0f} s] {row['gpu']} {row['rate']} req/s "
        f"{row['label']}: mean E2E {row['mean_e2el_s']:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def table(rows: list[dict], key: str, title: str) -> str:
    lines = [title]
    head = f"{key:>6s} {'policy':16s}" + "".join(
        f" {m.upper()[:4]}{st[:4]:>6s}" for m in METRICS for st in STATS
    )
    lines.append(head + "   done  req/s  preempt")
    for r in rows:
        values = "".join(f" {r[f'{st}_{m}_s']:10.2f}" for m in METRICS for st in STATS)
        lines.append(
            f"{r[key]:>6} {r['label']:16s}{values} {r['completed']:6d} "
            f"{r['request_throughput']:6.2f} {r['preemptions'] or 0:8d}"
        )
    lines.append("(seconds)")
    return "\n".join(lines)


def markdown(rows: list[dict], key: str) -> str:
    """The same table in Markdown (for docs/pars-scheduling.md)."""
    cols = [f"{m.upper()} {st}" for m in ("E2E", "TTFT") for st in ("mean", "p50", "p90", "p99")]
    lines = [
        f"| {key} | policy | " + " | ".join(cols) + " | req/s | preemptions |",
        "|" + "---|" * (len(cols) + 4),
    ]
    for r in rows:
        values = " | ".join(f"{r[f'{st}_{m}_s']:.2f}" for m in METRICS for st in STATS)
        lines.append(
            f"| {r[key]} | {r['label']} | {values} | {r['request_throughput']:.2f} | "
            f"{r['preemptions']} |"
        )
    return "\n".join(lines)


def plot(results: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for gpu in {r["gpu"] for r in results["rates"]}:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for ax, (metric, title) in zip(
            axes,
            (
                ("mean_e2el_s", "mean E2E latency"),
                ("p99_e2el_s", "p99 E2E latency"),
                ("mean_ttft_s", "mean TTFT"),
            ),
            strict=True,
        ):
            # Rates as evenly spaced categories: the burst would squeeze the others together.
            rates = sorted({r["rate"] for r in results["rates"] if r["gpu"] == gpu})
            for label in dict.fromkeys(r["label"] for r in results["rates"]):
                pts = [r for r in results["rates"] if r["gpu"] == gpu and r["label"] == label]
                style = "--" if label in ("sjf", "srpt") else "-"
                ax.plot(
                    [rates.index(p["rate"]) for p in pts],
                    [p[metric] for p in pts],
                    style,
                    marker="o",
                    ms=3,
                    label=label,
                )
            ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates[:-1]] + ["burst"])
            ax.set_xlabel("Poisson rate (req/s); burst: 1,000 req/s")
            ax.set_ylabel("seconds")
            ax.set_yscale("log")
            ax.set_title(f"{title}, Llama-3-8B on {gpu}")
            ax.grid(alpha=0.3)
        _save(fig, axes, folder / f"pars-rate-{gpu}.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    taus = results["taus"]
    refs = {r["label"]: r for r in results["tau_refs"]}
    for ax, metric, title in zip(
        axes, ("mean_e2el_s", "p99_e2el_s"), ("mean E2E latency", "p99 E2E latency"), strict=True
    ):
        for label in ("pars", "pars-v0.6", "ltr"):
            pts = [r for r in taus if r["label"].split()[0] == label]
            ax.plot(
                [p["tau_realized"] for p in pts],
                [p[metric] for p in pts],
                marker="o",
                label=f"{label} (noisy oracle)",
            )
        for label, color in (("fcfs", "grey"), ("sjf", "black"), ("srpt", "green")):
            if label in refs:
                ax.axhline(refs[label][metric], color=color, ls=":", label=label)
        for label, marker in (
            ("pars", "*"),
            ("pars-v0.6", "P"),
            ("pars-pointwise", "s"),
            ("pars-listmle", "^"),
        ):
            if label in refs and refs[label].get("tau") is not None:
                ax.plot(
                    refs[label]["tau"],
                    refs[label][metric],
                    marker,
                    ms=10,
                    ls="",
                    label=f"{label} (trained)",
                )
        ax.set_xlabel("Kendall's tau of the scores vs true lengths")
        ax.set_ylabel("seconds")
        ax.set_title(f"{title} at {TAU_RATE[1]} req/s, {TAU_RATE[0]}")
        ax.grid(alpha=0.3)
    _save(fig, axes, folder / "pars-tau.png")


def _save(fig, axes, path: Path) -> None:
    """One legend (the first panel's), then write and close the figure."""
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio_to_fcfs(label: str, metric: str = "mean_e2el_s"):
    """FCFS's latency over `label`'s (> 1: better than FCFS), as a seed-table column."""
    return lambda get: get("fcfs", metric) / get(label, metric)


def _share_of_oracle_gain(get) -> float:
    """The share of oracle SJF's gain over FCFS, in mean E2E, that default (V1) pars gets."""
    gain = get("fcfs") - get("sjf")
    # Below saturation every policy can give FCFS's exact latency: no gain to share.
    return (get("fcfs") - get("pars")) / gain if gain else float("nan")


# Cross-seed columns: (title, format, value from `get(label, metric="mean_e2el_s")`).
SEED_COLUMNS = (
    ("FCFS mean E2E (s)", "{:.1f}", lambda get: get("fcfs")),
    # v0.6's priority preemption makes pars worse than FCFS under Poisson overload: by how much.
    ("pars-v0.6 / FCFS, mean", "{:.2f}", lambda get: get("pars-v0.6") / get("fcfs")),
    ("FCFS / pars-v0.6, mean", "{:.2f}", _ratio_to_fcfs("pars-v0.6")),
    ("FCFS / pars-v0.6, median", "{:.1f}", _ratio_to_fcfs("pars-v0.6", "median_e2el_s")),
    ("FCFS / pars, mean", "{:.2f}", _ratio_to_fcfs("pars")),
    ("FCFS / pars, median", "{:.1f}", _ratio_to_fcfs("pars", "median_e2el_s")),
    ("FCFS / SJF, mean", "{:.2f}", _ratio_to_fcfs("sjf")),
    ("FCFS / SJF, median", "{:.1f}", _ratio_to_fcfs("sjf", "median_e2el_s")),
    ("pars's share of SJF's gain", "{:.0%}", _share_of_oracle_gain),
)


def seed_table(paths: list[str]) -> str:
    """The cross-seed figures of docs/pars-scheduling.md from result files of different seeds:
    per point, each column's value per seed (seed order as given)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]

    def getter(run: dict, part: str, point: tuple):
        def get(label: str, metric: str = "mean_e2el_s") -> float:
            return next(r[metric] for r in run[part] if _point(r) == point and r["label"] == label)

        return get

    lines = []
    for part in ("rates", "kv_bound"):
        points = list(dict.fromkeys(_point(r) for r in runs[0].get(part, [])))
        lines += ["", f"| {part} point | " + " | ".join(c[0] for c in SEED_COLUMNS) + " |"]
        lines.append("|---" * (len(SEED_COLUMNS) + 1) + "|")
        for point in points:
            cells = [
                " / ".join(fmt.format(value(getter(run, part, point))) for run in runs)
                for _, fmt, value in SEED_COLUMNS
            ]
            lines.append(f"| {', '.join(map(str, point))} | " + " | ".join(cells) + " |")
    lines += ["", spread(runs)]
    return "\n".join(lines)


def spread(runs: list[dict]) -> str:
    """How far the seed moves absolute latencies: per rate point and policy, the largest over
    the smallest mean E2E across the runs; their median, and each policy's largest."""
    by: dict[tuple, list[float]] = {}
    for run in runs:
        for r in run["rates"]:
            by.setdefault((r["label"], r["gpu"], r["rate"]), []).append(r["mean_e2el_s"])
    ratios = {k: max(v) / min(v) for k, v in by.items() if len(v) == len(runs)}
    worst: dict[str, tuple] = {}
    for (label, gpu, rate), x in ratios.items():
        if x > worst.get(label, (0,))[0]:
            worst[label] = (x, gpu, rate)
    return (
        f"mean E2E, max/min across the {len(runs)} runs, per rate point and policy: median "
        f"{np.median(list(ratios.values())):.3f}; each policy's largest: "
        + ", ".join(f"{label} {x:.2f} ({g} {rate})" for label, (x, g, rate) in worst.items())
    )


def _point(row: dict) -> tuple:
    return (row["gpu"], row["rate"], row.get("kv_fraction"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,500 requests, A100 only")
    parser.add_argument("--requests", type=int, help="requests per point (default 3,000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=str(ROOT / "models"), help="trained predictors' folder")
    for name, folder in PREDICTORS.items():
        parser.add_argument(f"--{name}", metavar="DIR", help=f"default: MODELS/{folder}")
    parser.add_argument("--plots", metavar="DIR", help="write PNG plots there")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/pars.json"))
    parser.add_argument("--replot", action="store_true", help="only redraw --plots from --out")
    parser.add_argument(
        "--seed-table", nargs="+", metavar="JSON", help="only print the cross-seed ratios of these"
    )
    opts = parser.parse_args()
    if opts.seed_table:
        print(seed_table(opts.seed_table))
        return
    if opts.replot:
        plot(json.loads(Path(opts.out).read_text()), Path(opts.plots or "."))
        return
    n = opts.requests or (1500 if opts.quick else 3000)
    gpus = ["a100-80gb"] if opts.quick else list(RATES)
    start = time.perf_counter()

    base = test_workload(n, opts.seed)
    print(f"workload: {base.describe()} (held-out test split of {base.source})")
    # The benchmark's arrivals are those of `llmsched compare --config FILE --rate R`:
    rate = RATES["a100-80gb"][0]
    again = build_workload(base, arrival="poisson", rate=rate, seed=opts.seed)
    cli = load_workload(config("a100-80gb", num_requests=n, seed=opts.seed, rate=rate))
    assert np.array_equal(again.arrivals, cli.arrivals), "benchmark and CLI workloads differ"
    folders = {
        name: Path(getattr(opts, name) or Path(opts.models) / folder)
        for name, folder in PREDICTORS.items()
    }
    scores, missing = all_scores(base, folders)
    # Prompt texts are scored: the workers need only the numbers.
    base = Workload(
        {k: v for k, v in base.columns.items() if v is not None and k != "prompt_text"},
        source=base.source,
        timed=base.timed,
    )
    truth = base.columns["output_tokens"]
    taus = {name: kendall_tau(s, truth) for name, s in scores.items()}
    print("Kendall's tau of each score vs true output length on this workload:")
    for name, tau in taus.items():
        print(f"  {name:14s} {tau:6.3f}")
    if missing:
        print("MISSING predictors (rows left out): " + ", ".join(missing))
    variants = [v for v in VARIANTS if v[2] is None or v[2] in scores]
    left_out = [v[0] for v in VARIANTS if v not in variants]
    if left_out:
        print("left out for want of their predictor: " + ", ".join(left_out))

    jobs = [
        (gpu, rate, label, policy, score, params, opts.seed, None)
        for gpu in gpus
        for rate in RATES[gpu]
        for label, policy, score, params in variants
    ]
    gpu, rate = TAU_RATE
    tau_jobs = [
        (gpu, rate, f"{label} tau={tau}", policy, f"tau={tau}", params, opts.seed, None)
        for tau in TAUS
        for label, policy, params in (
            ("pars", "pars", {}),
            ("pars-v0.6", "pars", V06_PREEMPT),
            ("ltr", "ltr", {}),
        )
    ]
    kv_gpu, kv_fractions, kv_rates = KV_BOUND
    kv_jobs = [
        (kv_gpu, rate, label, policy, score, params, opts.seed, kv)
        for kv in kv_fractions
        for rate in kv_rates
        for label, policy, score, params in variants
        if label in KV_LABELS
    ]
    everything = [*jobs, *tau_jobs, *kv_jobs]
    with ProcessPoolExecutor(opts.workers, initializer=_init, initargs=(base, scores)) as pool:
        results = pool.map(run, *zip(*everything, strict=True))
        done = [progress(i, len(everything), r, start) for i, r in enumerate(results)]
    rows, tau_rows = done[: len(jobs)], done[len(jobs) : len(jobs) + len(tau_jobs)]
    kv_rows = done[len(jobs) + len(tau_jobs) :]
    for r in tau_rows:
        r["tau_target"] = float(r["score"].split("=")[1])
        r["tau_realized"] = taus[r["score"]]
    tau_refs = [r for r in rows if (r["gpu"], r["rate"]) == TAU_RATE]
    for r in tau_refs:
        r["tau"] = taus.get(r["score"]) if r["score"] else None

    for g in gpus:
        print()
        print(table([r for r in rows if r["gpu"] == g], "rate", f"Llama-3-8B on {g}, {n} requests"))
    print()
    print(table(tau_rows, "tau_target", f"noisy-oracle scores at {rate} req/s on {gpu}"))
    for kv in kv_fractions:
        print()
        title = f"KV-bound: {kv_gpu} with {kv:.0%} of its KV"
        print(table([r for r in kv_rows if r["kv_fraction"] == kv], "rate", title))
    results = {
        "requests": n,
        "seed": opts.seed,
        "workload": base.describe(),
        "score_tau": taus,
        "missing_predictors": missing,
        "predictors": {k: str(v) for k, v in folders.items()},
        "rates": rows,
        "taus": tau_rows,
        "tau_refs": tau_refs,
        "kv_bound": kv_rows,
        "wall_s": time.perf_counter() - start,
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    md = [
        f"### Llama-3-8B on {g}, {n} requests (seconds)\n\n"
        + markdown([r for r in rows if r["gpu"] == g], "rate")
        for g in gpus
    ]
    md.append(
        f"### Noisy-oracle scores at {rate} req/s on {gpu} (seconds)\n\n"
        + markdown(tau_rows, "tau_target")
    )
    md += [
        f"### KV-bound: {kv_gpu} with {kv:.0%} of its KV (seconds)\n\n"
        + markdown([r for r in kv_rows if r["kv_fraction"] == kv], "rate")
        for kv in kv_fractions
    ]
    out.with_suffix(".md").write_text("\n\n".join(md) + "\n")
    print(f"\nwrote {out} and .md ({results['wall_s']:.0f} s wall, {opts.workers} workers)")
    if opts.plots:
        plot(results, Path(opts.plots))
        print(f"wrote {opts.plots}/pars-rate-*.png and pars-tau.png")
    print(
        f"reproduce: .venv/bin/python benchmarks/pars_experiment.py --requests {n} "
        f"--seed {opts.seed}"
        + ("" if len(gpus) > 1 else " --quick")
        + "".join(f" --{k} {v}" for k, v in folders.items())
        + (" --plots DIR" if opts.plots else "")
    )


if __name__ == "__main__":
    main()
