"""From a config to results: build the workload and the cluster, run, save.

`simulate` is what `llmsched simulate` runs; `compare` runs several policies on the identical
workload (same requests, same arrival times).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmsched.cluster.cluster import Cluster
from llmsched.config import SimulationConfig, save_config
from llmsched.data import resolve
from llmsched.engine.config import EngineConfig
from llmsched.hardware.memory import kv_bytes_per_token, kv_cache_blocks
from llmsched.hardware.roofline import Efficiency, RooflineModel
from llmsched.hardware.specs import GPUSpec, ModelSpec, get_gpu, get_model, with_dtype
from llmsched.hardware.steplog import device_spec
from llmsched.metrics.programs import program_metrics
from llmsched.metrics.qoe import AnswerSLO
from llmsched.metrics.report import write_requests_csv
from llmsched.metrics.summary import MetricsCollector
from llmsched.metrics.vllm_bench import result_json, run_metadata, write_result
from llmsched.policies import policy_class, router_class
from llmsched.workload.generators import assign_tiers, build_workload, synthetic_workload
from llmsched.workload.readers import read_trace
from llmsched.workload.reasoning import DEFAULT_GENERATOR, add_reasoning, read_alpaca_eval
from llmsched.workload.request import Workload

SYNTHETIC_REQUESTS = 1000
SYNTHETIC_RATE = 4.0  # requests/s when neither a trace nor a rate is given
PROGRAM_RATE = 0.1  # programs/s when `programs` is given without a rate


@dataclass
class RunResult:
    config: SimulationConfig
    collector: MetricsCollector
    summary: dict[str, Any]
    resolved: dict[str, Any]  # what the engine derived: KV blocks, budgets, workload facts


def load_workload(cfg: SimulationConfig) -> Workload:
    """The run's requests (a trace, arrivals replayed or generated, or the synthetic default),
    with the configured TBT targets or tiers."""
    workload = _requests(cfg)
    skipped, note = getattr(workload, "skipped", 0), getattr(workload, "note", None)
    if cfg.reasoning:
        workload = add_reasoning(workload, cfg.reasoning, cfg.seed)
    if cfg.tbt is not None:
        workload = workload.with_columns(tpot_slo=np.full(len(workload), float(cfg.tbt)))
    if cfg.tiers:
        workload = assign_tiers(workload, cfg.tiers, cfg.seed)
    if cfg.scores is not None:
        from llmsched.workload.scores import attach_scores

        workload = attach_scores(workload, cfg.scores)
    workload.skipped = skipped  # unservable trace rows skipped on reading, for the report
    workload.note = note  # for the user, once (the command line prints it)
    return workload


def _requests(cfg: SimulationConfig) -> Workload:
    if cfg.programs is not None:
        from llmsched.workload.programs import ProgramSpec, program_workload

        spec = ProgramSpec.from_mapping(dict(cfg.programs))
        return program_workload(spec, rate=cfg.rate or PROGRAM_RATE, seed=cfg.seed)
    if cfg.trace is None:
        return synthetic_workload(
            cfg.num_requests or SYNTHETIC_REQUESTS,
            rate=cfg.rate or SYNTHETIC_RATE,
            cv=cfg.cv,
            seed=cfg.seed,
            max_prompt=6144,  # prompt + output <= 8192: fits every registered model's context
            max_output=2048,
        )
    if cfg.trace_format == "alpaca_eval":
        folder = resolve(cfg.trace, "AlpacaEval folder")
        source = read_alpaca_eval(folder, cfg.generator or DEFAULT_GENERATOR)
    else:
        # A run of the trace's first rows reads only those (and checks only those); counting
        # the rows skipped, or drawing rows or a split from the whole trace, reads it all.
        first_rows = cfg.sample == "head" and cfg.split is None and not cfg.skip_invalid
        source = read_trace(
            cfg.trace,
            cfg.trace_format,
            limit=cfg.num_requests if first_rows else None,
            skip_invalid=cfg.skip_invalid,
        )
    if cfg.split is not None:
        from llmsched.workload.scores import held_out

        skipped = getattr(source, "skipped", 0)
        source = held_out(source, cfg.split)
        source.skipped = skipped
    arrival = cfg.arrival
    if arrival == "auto":
        arrival = "trace" if source.timed and cfg.rate is None else "poisson"
        if not source.timed and cfg.rate is None:
            raise ValueError(
                f"trace {cfg.trace} has no timestamps: give an arrival rate (--rate REQ_PER_S)"
            )
        if arrival == "poisson" and cfg.cv != 1.0:
            arrival = "gamma"
    options: dict[str, Any] = {}
    if arrival == "trace":
        options["time_scale"] = cfg.time_scale
    else:
        options["rate"] = cfg.rate
        if arrival == "gamma":
            options["cv"] = cfg.cv
    workload = build_workload(
        source,
        num_requests=cfg.num_requests,
        arrival=arrival,
        sample=cfg.sample,
        seed=cfg.seed,
        **options,
    )
    workload.skipped = getattr(source, "skipped", 0)
    if source.timed and arrival != "trace" and cfg.arrival == "auto":
        workload.note = (
            f"{cfg.trace} has timestamps of its own: rate {cfg.rate:g} req/s replaces them with "
            f"{arrival} arrivals (without a rate, or with arrival: trace, they are replayed)"
        )
    return workload


def hardware(cfg: SimulationConfig) -> tuple[ModelSpec, GPUSpec, Efficiency | None]:
    """The served model (in its served dtype), the device, and the efficiencies of the latency
    model: a calibration file's device (a CPU engine's, say) replaces the configured GPU."""
    model = with_dtype(get_model(cfg.model), cfg.dtype)
    if cfg.latency == "roofline":
        return model, get_gpu(cfg.gpu), None
    from llmsched.hardware.calibration.store import load_calibration, read_calibration

    if cfg.latency == "calibrated":
        return model, get_gpu(cfg.gpu), load_calibration(cfg.gpu)
    cal = read_calibration(cfg.latency)
    gpu = device_spec(cal.device) if cal.device else get_gpu(cfg.gpu)
    return model, gpu, cal.efficiency


def frontend_latency(cfg: SimulationConfig) -> float:
    """Seconds the serving stack outside the engine adds to each request: the config's, else
    what the calibration file measured, else none."""
    if cfg.frontend_latency is not None:
        return cfg.frontend_latency
    if cfg.latency in ("roofline", "calibrated"):
        return 0.0
    from llmsched.hardware.calibration.store import read_calibration

    return read_calibration(cfg.latency).serving.get("frontend_latency_s", 0.0)


def engine_config(cfg: SimulationConfig) -> tuple[EngineConfig, dict[str, Any]]:
    """Per-instance limits: the policy's paper defaults, then the user's settings; KV capacity
    from the GPU's memory as vLLM computes it unless given in blocks."""
    policy = policy_class(cfg.policy)
    model, gpu, _ = hardware(cfg)
    if not gpu.memory_bytes and cfg.num_blocks is None:
        raise ValueError(
            f"{gpu.name} has no GPU memory to size the KV cache from: give --num-blocks "
            "(a CPU engine's is VLLM_CPU_KVCACHE_SPACE; its step log's header has num_blocks)"
        )
    defaults = {"max_num_batched_tokens": 2048, "max_num_seqs": 256, "watermark": 0.0}
    defaults |= policy.engine_defaults
    chosen = {
        name: getattr(cfg, name) if getattr(cfg, name) is not None else defaults[name]
        for name in ("max_num_batched_tokens", "max_num_seqs", "watermark")
    }
    max_model_len = cfg.max_model_len or model.max_model_len
    if cfg.policy == "vllm-v0" and chosen["max_num_batched_tokens"] < max_model_len:
        if cfg.max_num_batched_tokens is not None:
            raise ValueError(
                f"vllm-v0 has no chunked prefill: max_num_batched_tokens "
                f"({chosen['max_num_batched_tokens']}) must be >= max_model_len ({max_model_len}),"
                " as vLLM v0 requires; raise it or lower --max-model-len"
            )
        chosen["max_num_batched_tokens"] = max_model_len
    if gpu.memory_bytes:
        capacity = kv_cache_blocks(
            model,
            gpu,
            cfg.tp,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            block_size=cfg.block_size,
            max_num_batched_tokens=chosen["max_num_batched_tokens"],
            max_num_seqs=chosen["max_num_seqs"],
            kv_fraction=cfg.kv_fraction,
        )
        block_bytes = capacity.bytes_per_block
    else:
        capacity, block_bytes = None, kv_bytes_per_token(model, cfg.tp) * cfg.block_size
    # vLLM keeps one of the blocks it allocates as its null block (never holds tokens).
    num_blocks = cfg.num_blocks or capacity.num_blocks - 1
    engine = EngineConfig(
        num_blocks=num_blocks,
        block_size=cfg.block_size,
        max_model_len=max_model_len,
        preemption=cfg.preemption,
        enable_prefix_caching=cfg.enable_prefix_caching,
        kv_bytes_per_block=block_bytes,
        pcie_bandwidth=gpu.pcie_bandwidth,
        **chosen,
    )
    resolved = {
        "model": model.name,
        "gpu": gpu.name,
        "num_blocks": num_blocks,
        "kv_capacity": capacity.describe() if cfg.num_blocks is None else "given in blocks",
        "max_model_len": max_model_len,
        "frontend_latency_s": frontend_latency(cfg),
        **chosen,
    }
    return engine, resolved


def latency_model(cfg: SimulationConfig) -> RooflineModel:
    model, gpu, efficiency = hardware(cfg)
    return RooflineModel(model, gpu, cfg.tp, efficiency)


def build_cluster(cfg: SimulationConfig, *, observer=None) -> tuple[Cluster, dict[str, Any]]:
    engine, resolved = engine_config(cfg)
    policy = policy_class(cfg.policy)
    params = _checked_params(policy, cfg.policy, "policy", cfg.policy_params)
    params.setdefault("preemption", cfg.preemption)
    router = router_class(cfg.router)
    router_params = _checked_params(router, cfg.router, "router", cfg.router_params)
    cluster = Cluster(
        cfg.instances,
        engine,
        lambda: policy(**params),
        router(seed=cfg.seed, **router_params),
        latency_model(cfg),
        link_bandwidth=cfg.link_gbps * 1e9 / 8,
        frontend_latency=frontend_latency(cfg),
        max_concurrency=cfg.max_concurrency,
        observer=observer,
        answer_slo=AnswerSLO(**(cfg.answer_slo or {})),
    )
    return cluster, resolved


def _checked_params(cls, name: str, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """A policy's or router's parameters, refused with the list it takes when one is unknown."""
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(params) - set(accepted) - {"self"})
    if unknown:
        raise ValueError(
            f"{kind} {name!r} takes no parameter(s) {', '.join(unknown)}; it takes: "
            + ", ".join(p for p in accepted if p not in ("self", "seed"))
        )
    return dict(params)


def check(cfg: SimulationConfig) -> None:
    """Refuse what the config alone shows to be wrong, before any workload is read or run: an
    unknown model or GPU, a model that does not fit, engine limits or policy and router
    parameters that do not go together."""
    build_cluster(cfg)


def simulate(
    cfg: SimulationConfig, workload: Workload | None = None, *, progress: bool = False
) -> RunResult:
    cfg.validate()
    cluster, resolved = build_cluster(cfg)  # an unknown model or GPU before reading a trace
    workload = load_workload(cfg) if workload is None else workload
    collector = cluster.run(workload, progress=progress)
    return summarize(cfg, cluster, workload, collector, resolved)


def summarize(
    cfg: SimulationConfig,
    cluster: Cluster,
    workload: Workload,
    collector: MetricsCollector,
    resolved: dict[str, Any],
) -> RunResult:
    """A finished run's result: the collector's summary with the run's settings, the cluster's
    statistics and the programs' metrics, and the resolved config with the workload's."""
    summary = collector.summary(goodput=cfg.goodput)
    summary |= {"policy": cfg.policy, "router": cfg.router, "instances": cfg.instances}
    summary |= cluster.stats.as_dict()
    summary["skipped_trace_rows"] = getattr(workload, "skipped", 0)
    summary |= program_metrics(workload, collector) or {}  # JCT, cold/warm TTFT of sessions
    resolved |= {
        "workload": workload.describe(),
        "workload_source": workload.source or "synthetic",
        "skipped_trace_rows": summary["skipped_trace_rows"],
    }
    return RunResult(cfg, collector, summary, resolved)


def run_title(cfg: SimulationConfig, requests: int | None = None, *, load: bool = True) -> str:
    """What a run's table and plots are about, in one line: the model and hardware, the load
    (unless the caller varies it) and the workload."""
    hardware = f"{cfg.model} on {cfg.gpu}" + (f", TP {cfg.tp}" if cfg.tp > 1 else "")
    if cfg.instances > 1:
        hardware += f", {cfg.instances} instances ({cfg.router})"
    parts = [hardware]
    if load:
        if cfg.trace is not None and cfg.rate is None:
            speed = f", gaps x{cfg.time_scale:g}" if cfg.time_scale != 1 else ""
            arrivals = f"the trace's arrivals{speed}"
        elif cfg.programs is not None:
            arrivals = f"Poisson {cfg.rate or PROGRAM_RATE:g} programs/s, closed loop"
        elif cfg.cv != 1:
            arrivals = f"Gamma arrivals {cfg.rate or SYNTHETIC_RATE:g} req/s (CV {cfg.cv:g})"
        else:
            arrivals = f"Poisson {cfg.rate or SYNTHETIC_RATE:g} req/s"
        if cfg.max_concurrency:
            arrivals += f", at most {cfg.max_concurrency} in flight"
        parts.append(arrivals)
    source = Path(cfg.trace).name if cfg.trace else "synthetic, Azure-conversation-like lengths"
    if cfg.programs is not None:
        source = f"{cfg.programs.get('count', 100)} synthetic agent programs"
    parts.append(f"{requests} requests ({source})" if requests else source)
    return "; ".join(parts)


def run_description(result: RunResult) -> dict[str, Any]:
    """`vllm bench serve`'s run metadata for a simulated run (backend "llmsched-simulator"),
    undated so that the same config gives the same bytes."""
    cfg = result.config
    generated = cfg.rate is not None or cfg.trace is None
    return run_metadata(
        backend="llmsched-simulator",
        model_id=cfg.model,
        num_prompts=len(result.collector),
        request_rate=(cfg.rate or SYNTHETIC_RATE) if generated else None,
        burstiness=1.0 / cfg.cv**2,
        max_concurrency=cfg.max_concurrency,
        dated=False,
    )


def save(result: RunResult, out: str | Path, *, gaps: bool = False, detailed: bool = False) -> Path:
    """Write summary.json (`vllm bench serve`'s result, as `llmsched bench` writes it: run
    metadata, metrics with llmsched's extensions, and the per-request arrays, all of them with
    `detailed`), requests.csv and config.yaml (the resolved config) to `out`; with `gaps`,
    also itl.npz: every request's inter-token gaps (MetricsCollector.gaps_by_request)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if gaps:
        offsets, values = result.collector.gaps_by_request()
        ids = result.collector.column("request_id")
        np.savez_compressed(out / "itl.npz", request_id=ids, offsets=offsets, gaps_s=values)
    # The wall time differs from run to run: left out, the same config gives the same bytes.
    metrics = {k: v for k, v in result.summary.items() if k != "sim_wall_seconds"}
    outcomes = result.collector.outcomes(itls=detailed)  # (only a detailed result has them)
    summary = result_json(run_description(result), metrics, outcomes, detailed=detailed)
    write_result(summary, out / "summary.json")
    write_requests_csv(result.collector, out / "requests.csv")
    save_config(result.config, out / "config.yaml", result.resolved)
    return out
