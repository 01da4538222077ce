"""A run, fully described: one config file (YAML or TOML) plus command-line flags.

Every field has a default, so an empty config runs the embedded synthetic workload. The
resolved config (defaults, file and flags merged, engine limits filled in) is saved beside the
results, so any run can be repeated from its output folder.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ARRIVALS = ("auto", "trace", "poisson", "gamma")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class SimulationConfig:
    # --- workload ---
    # A trace file, or a path inside the shared data folder ($LLMSCHED_DATA), e.g.
    # traces/azure2023/AzureLLMInferenceTrace_conv.csv; None = the embedded synthetic workload.
    trace: str | None = None
    trace_format: str | None = None  # azure | lengths | mooncake | sharegpt | llmsched (auto)
    # alpaca_eval: a folder of AlpacaEval prompts; `generator` picks whose answer lengths.
    generator: str | None = None
    # A hidden reasoning phase before each answer (workload/reasoning.py), e.g.
    # {split: servegen, max_tokens: 16384}; None = the trace's own reasoning lengths (if any).
    reasoning: dict[str, Any] | None = None
    num_requests: int | None = None  # None = the whole trace (synthetic: 1000)
    arrival: str = "auto"  # auto: the trace's timestamps if it has them and no rate is given
    rate: float | None = None  # requests/s for poisson or gamma arrivals
    cv: float = 1.0  # burstiness of gamma arrivals (coefficient of variation of the gaps)
    time_scale: float = 1.0  # trace replay: multiply the gaps (0.5 = twice as fast)
    # A client that keeps at most this many requests in flight (vllm bench serve's
    # --max-concurrency): a request waits for a free slot and is timed from its sending.
    max_concurrency: int | None = None
    sample: str = "head"  # head: the first N requests; random: N drawn with replacement
    skip_invalid: bool = False  # skip trace rows that are not servable (reported)
    seed: int = 0
    # Per-request predictor scores for PARS-style policies (llmsched.workload.scores), e.g.
    # {source: noisy-oracle, tau: 0.6, seed: 0}, "oracle", "prompt-length", "model:DIR".
    scores: str | dict | None = None
    # Keep only one split (train | val | test) of the length predictor's hash split by
    # conversation (llmsched.predict.data): schedule prompts the predictor never trained on.
    split: str | None = None
    # --- hardware ---
    model: str = "llama-3-8b"
    gpu: str = "a100-80gb"
    tp: int = 1
    gpu_memory_utilization: float = 0.9
    kv_fraction: float = 1.0  # cap the KV cache at this share of what memory allows
    num_blocks: int | None = None  # KV blocks per instance; None = from memory arithmetic
    # roofline: the roofline's default efficiencies; calibrated: fitted on measured profiles
    # (docs/calibration.md; other GPUs use the A100 fit); or a calibration file
    # (`llmsched calibrate ... --out CAL.json`), whose device replaces `gpu` when it names one.
    latency: str = "roofline"
    dtype: str | None = None  # the served dtype (vLLM's --dtype); None: the model's own
    # Seconds the serving stack outside the engine (HTTP, API server, IPC) adds to every
    # request's TTFT and E2E latency; None: the calibration file's measure, else 0.
    frontend_latency: float | None = None
    # --- engine and policies ---
    instances: int = 1
    policy: str = "fcfs"
    policy_params: dict[str, Any] = field(default_factory=dict)
    router: str = "round-robin"
    router_params: dict[str, Any] = field(default_factory=dict)
    max_num_batched_tokens: int | None = None  # None = the policy's default (vLLM: 2048)
    max_num_seqs: int | None = None  # None = the policy's default (vLLM: 256)
    max_model_len: int | None = None  # None = the model's context length
    preemption: str = "recompute"
    block_size: int = 16
    watermark: float | None = None  # None = the policy's default
    link_gbps: float = 100.0  # inter-instance link for migrations, Gb/s
    # --- SLOs ---
    tbt: float | None = None  # every request's time-between-tokens target, seconds (SLAI: 0.2)
    tiers: dict[str, dict] | None = None  # {name: {share, tbt}}: tiers drawn per request
    # --- metrics ---
    goodput: dict[str, float] | None = None  # SLOs in ms, e.g. {"ttft": 500, "tpot": 50}
    # Reasoning requests' answering-phase SLO (seconds): {ttfat: 0.25, tpot: 0.1, min_qoe: 0.95}
    answer_slo: dict[str, float] | None = None
    # --- comparisons ---
    # Named variants that `llmsched compare` runs on the same workload when no --policies are
    # given: {name: {policy: ..., router: ..., policy_params: ..., router_params: ...}}.
    runs: dict[str, dict[str, Any]] | None = None

    def validate(self) -> SimulationConfig:
        problems = []
        if self.latency not in ("roofline", "calibrated") and not Path(self.latency).is_file():
            problems.append(
                f"latency must be roofline, calibrated or a calibration file (.json), got "
                f"{self.latency!r}" + (" (no such file)" if self.latency.endswith(".json") else "")
            )
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.frontend_latency is not None and not self.frontend_latency >= 0:
            problems.append(f"frontend_latency must be >= 0 s, got {self.frontend_latency}")
        if self.block_size < 1:
            problems.append(f"block_size must be >= 1 token, got {self.block_size}")
        if self.arrival not in ARRIVALS:
            problems.append(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if self.arrival in ("poisson", "gamma") and self.rate is None:
            problems.append(f"arrival={self.arrival} needs a rate (--rate REQ_PER_S)")
        if self.rate is not None and self.rate <= 0:
            problems.append(f"rate must be > 0 requests/s, got {self.rate}")
        if self.num_requests is not None and self.num_requests < 1:
            problems.append(f"num_requests must be >= 1, got {self.num_requests}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            problems.append(f"max_concurrency must be >= 1 request, got {self.max_concurrency}")
        if self.instances < 1:
            problems.append(f"instances must be >= 1, got {self.instances}")
        if self.tp < 1:
            problems.append(f"tp must be >= 1, got {self.tp}")
        if not 0 < self.kv_fraction <= 1:
            problems.append(f"kv_fraction must be in (0, 1], got {self.kv_fraction}")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cv <= 0:
            problems.append(f"cv must be > 0, got {self.cv}")
        if self.time_scale <= 0:
            problems.append(f"time_scale must be > 0, got {self.time_scale}")
        for name, value in (self.goodput or {}).items():
            if name not in GOODPUT_METRICS:
                problems.append(f"goodput metric must be one of {GOODPUT_METRICS}, got {name!r}")
            elif value <= 0:
                problems.append(f"goodput {name} SLO must be > 0 ms, got {value}")
        known = {f.name for f in dataclasses.fields(self)} - {"runs"}
        for name, changes in (self.runs or {}).items():
            if not isinstance(changes, dict) or set(changes) - known:
                problems.append(
                    f"run {name!r} must map config keys to values, got {changes!r}"
                    if not isinstance(changes, dict)
                    else f"run {name!r} has unknown key(s) {sorted(set(changes) - known)}"
                )
        if self.scores is not None:
            from llmsched.workload.scores import ScoreSpec

            try:
                ScoreSpec.parse(self.scores)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        return self

    def variant(self, name: str) -> SimulationConfig:
        """The config of one named run of `runs` (its keys override this config's)."""
        if not self.runs or name not in self.runs:
            known = ", ".join(self.runs or {}) or "none"
            raise ValueError(f"no run named {name!r} in the config; runs: {known}")
        return self.replace(runs=None, **self.runs[name]).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SimulationConfig:
        return dataclasses.replace(self, **changes)


def load_config(path: str | Path | None = None, **overrides: Any) -> SimulationConfig:
    """Defaults, then the file's values, then `overrides` (flags; None means "not given")."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_config_file(path))
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            value = values[key] | value  # flags add to (or override) the file's entries
        values[key] = value
    known = {f.name for f in dataclasses.fields(SimulationConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib

        hints = [
            f"{u!r}"
            + (
                f" (did you mean {m[0]!r}?)"
                if (m := difflib.get_close_matches(u, known, 1))
                else ""
            )
            for u in unknown
        ]
        raise ValueError(
            f"unknown config key(s) {', '.join(hints)}"
            + (f" in {path}" if path else "")
            + f"; known keys: {', '.join(sorted(known))}"
        )
    return SimulationConfig(**values).validate()


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"config file {path}: use .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"config file {path} does not parse: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _parse_pairs(items: list[str] | None, sep: str, flag: str, example: str, value) -> dict | None:
    """`NAME<sep>VALUE` command-line items → {name: value(text)}, with a clear error."""
    if not items:
        return None
    out = {}
    for item in items:
        name, found, text = item.partition(sep)
        try:
            if not found or not name.strip():
                raise ValueError
            out[name.strip()] = value(text)
        except ValueError:
            raise ValueError(f"{flag} takes NAME{sep}VALUE like {example}, got {item!r}") from None
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float] | None:
    """`["ttft:500", "tpot:50"]` (as `vllm bench serve --goodput`) → {"ttft": 500.0, ...}."""
    return _parse_pairs(items, ":", "--goodput", "ttft:500 (METRIC:MS)", float)


def parse_params(items: list[str] | None) -> dict[str, Any] | None:
    """`["quantum=300"]` → {"quantum": 300}; values are read as YAML scalars (numbers, bools)."""
    return _parse_pairs(items, "=", "--policy-param", "quantum=300", yaml.safe_load)


def save_config(config: SimulationConfig, path: Path, resolved: dict[str, Any]) -> None:
    """The config as run, with the values the engine derived (KV blocks, budgets) beside it."""
    data = config.to_dict() | {"resolved": resolved}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
