"""A run, fully described: one config file (YAML or TOML) plus command-line flags.

Every field has a default, so an empty config runs the embedded synthetic workload. The
resolved config (defaults, file and flags merged, engine limits filled in) is saved beside the
results, so any run can be repeated from its output folder.

pydantic checks every value when a config is made or changed, strictly: a number is written as
a number (`rate: 5`, not `rate: "5"`), in YAML, TOML, flags and a run's overrides alike. A
wrong value is a ConfigError with one line per key, naming the value and what is expected.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

# Values are checked as given: no quoted numbers, no 1 for true, no 2.0 for an integer.
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class ConfigError(ValueError):
    """Wrong values in a config: one line per problem, each starting with the key it is about."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@with_config(STRICT)
class Tier(TypedDict):
    share: Annotated[float, Field(ge=0, le=1)]  # probability that a request is of this tier
    tbt: Annotated[float, Field(gt=0)]  # seconds


@with_config(STRICT)
class AnswerSLOSpec(TypedDict, total=False):
    ttfat: Annotated[float, Field(ge=0)]
    tpot: Annotated[float, Field(gt=0)]
    min_qoe: Annotated[float, Field(gt=0, le=1)]


@with_config(STRICT)
class ReasoningSpec(TypedDict, total=False):
    split: Literal["equal", "servegen", "heavy"]
    max_tokens: Annotated[int, Field(ge=1)]
    sigma: Annotated[float, Field(ge=0)]
    low: Annotated[float, Field(gt=0)]
    high: Annotated[float, Field(gt=0)]
    servegen_dir: str


@with_config(STRICT)
class ToolSpec(TypedDict):
    share: Annotated[float, Field(ge=0, le=1)]  # share of the tool calls
    mu: float  # ln(seconds): the duration's lognormal location
    sigma: Annotated[float, Field(ge=0)]


@with_config(STRICT)
class ProgramsSpec(TypedDict, total=False):
    count: Annotated[int, Field(ge=1)]
    turns_mean: Annotated[float, Field(ge=1)]
    turns_std: Annotated[float, Field(ge=0)]
    step_limit: Annotated[int, Field(ge=1)]
    system_prompt_tokens: Annotated[int, Field(ge=0)]
    task_median: Annotated[float, Field(ge=1)]
    task_sigma: Annotated[float, Field(ge=0)]
    new_tokens_median: Annotated[float, Field(ge=1)]
    new_tokens_sigma: Annotated[float, Field(ge=0)]
    output_median: Annotated[float, Field(ge=1)]
    output_sigma: Annotated[float, Field(ge=0)]
    max_output: Annotated[int, Field(ge=1)]
    tools: str | dict[str, ToolSpec]


PARAMS = "a mapping of parameter names to values, e.g. {quantum: 300}"


class SimulationConfig(BaseModel):
    model_config = STRICT | ConfigDict(validate_assignment=True)

    # --- workload ---
    # A trace file, or a path inside the shared data folder ($LLMSCHED_DATA), e.g.
    # traces/azure2023/AzureLLMInferenceTrace_conv.csv; None = the embedded synthetic workload.
    trace: str | None = None
    # azure | lengths | mooncake | sharegpt | llmsched (None: detected) | alpaca_eval
    trace_format: str | None = None
    # alpaca_eval: a folder of AlpacaEval prompts; `generator` picks whose answer lengths.
    generator: str | None = None
    # A hidden reasoning phase before each answer (workload/reasoning.py), e.g.
    # {split: servegen, max_tokens: 16384}; None = the trace's own reasoning lengths (if any).
    reasoning: ReasoningSpec | None = Field(
        None,
        description="a mapping {split: equal|servegen|heavy, max_tokens: N, sigma: S, low: L, "
        "high: H, servegen_dir: DIR}",
    )
    # Synthetic agent programs (llmsched.workload.programs, docs/agents.md): closed-loop
    # multi-turn sessions with tool calls, starting as a Poisson process of `rate` programs/s;
    # e.g. {count: 200, tools: openhands}. Every key has a default from real agent data.
    programs: ProgramsSpec | None = Field(
        None,
        description="a mapping {count: N, turns_mean: T, turns_std: S, step_limit: L, "
        "system_prompt_tokens: N, task_median: N, task_sigma: S, new_tokens_median: N, "
        "new_tokens_sigma: S, output_median: N, output_sigma: S, max_output: N, tools: "
        "openhands|swe-agent|{NAME: {share: P, mu: LN_SECONDS, sigma: S}}}",
    )
    num_requests: int | None = Field(None, ge=1)  # None = the whole trace (synthetic: 1000)
    # auto: the trace's timestamps if it has them and no rate is given
    arrival: Literal["auto", "trace", "poisson", "gamma"] = "auto"
    # requests/s for poisson or gamma arrivals; with `programs`, programs/s
    rate: float | None = Field(None, gt=0)
    cv: float = Field(1.0, gt=0)  # burstiness of gamma arrivals (coefficient of variation)
    time_scale: float = Field(1.0, gt=0)  # trace replay: multiply the gaps (0.5 = 2x as fast)
    # A client that keeps at most this many requests in flight (vllm bench serve's
    # --max-concurrency): a request waits for a free slot and is timed from its sending.
    max_concurrency: int | None = Field(None, ge=1)
    # head: the first N requests; random: N drawn with replacement
    sample: Literal["head", "random"] = "head"
    skip_invalid: bool = False  # skip trace rows that are not servable (reported)
    seed: int = Field(0, ge=0)
    # Per-request predictor scores for PARS-style policies (llmsched.workload.scores), e.g.
    # {source: noisy-oracle, tau: 0.6, seed: 0}, "oracle", "prompt-length", "model:DIR".
    scores: Any = None
    # Keep only one split of the length predictor's hash split by conversation
    # (llmsched.predict.data): schedule prompts the predictor never trained on.
    split: Literal["train", "val", "test"] | None = None
    # --- hardware ---
    model: str = "llama-3-8b"
    gpu: str = "a100-80gb"
    tp: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_fraction: float = Field(1.0, gt=0, le=1)  # cap the KV cache at this share of memory's
    num_blocks: int | None = Field(None, ge=1)  # KV blocks per instance; None: from memory
    # roofline: the roofline's default efficiencies; calibrated: fitted on measured profiles
    # (docs/calibration.md; other GPUs use the A100 fit); or a calibration file
    # (`llmsched calibrate ... --out CAL.json`), whose device replaces `gpu` when it names one.
    latency: str = "roofline"
    # the served dtype (vLLM's --dtype); None: the model's own
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # Seconds the serving stack outside the engine (HTTP, API server, IPC) adds to every
    # request's TTFT and E2E latency; None: the calibration file's measure, else 0.
    frontend_latency: float | None = Field(None, ge=0)
    # --- engine and policies ---
    instances: int = Field(1, ge=1)
    policy: str = "fcfs"
    policy_params: dict[str, Any] = Field(
        default_factory=dict, description=PARAMS + ", or 'quantum=300' as the flag takes it"
    )
    router: str = "round-robin"
    router_params: dict[str, Any] = Field(default_factory=dict, description=PARAMS)
    # None = the policy's default (vLLM: 2048 tokens, 256 sequences)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=1)  # None = the model's context length
    preemption: Literal["recompute", "swap"] = "recompute"
    block_size: int = Field(16, ge=1)
    # vLLM V1's automatic prefix caching, on by default as in vLLM (docs/prefix-caching.md):
    # requests whose prompts share prefix runs share their KV blocks
    enable_prefix_caching: bool = True
    # share of the KV blocks new admissions must leave free; None = the policy's default
    watermark: float | None = Field(None, ge=0, lt=1)
    link_gbps: float = Field(100.0, gt=0)  # inter-instance link for migrations, Gb/s
    # --- SLOs ---
    # every request's time-between-tokens target, seconds (SLAI: 0.2)
    tbt: float | None = Field(None, gt=0)
    tiers: dict[str, Tier] | None = Field(
        None,
        min_length=1,
        description="a mapping of tier names to {share: 0..1, tbt: SECONDS > 0}, e.g. "
        "{paying: {share: 0.05, tbt: 0.1}, free: {share: 0.95, tbt: 0.5}}",
    )
    # --- metrics ---
    goodput: dict[Literal["ttft", "tpot", "e2el"], Annotated[float, Field(gt=0)]] | None = Field(
        None,
        description="a mapping of ttft, tpot or e2el to milliseconds > 0, e.g. "
        "{ttft: 500, tpot: 50}, or 'ttft:500 tpot:50' as the flag takes it",
    )
    # Reasoning requests' answering-phase SLO (seconds): {ttfat: 0.25, tpot: 0.1, min_qoe: 0.95}
    answer_slo: AnswerSLOSpec | None = Field(
        None, description="a mapping {ttfat: SECONDS >= 0, tpot: SECONDS > 0, min_qoe: 0..1}"
    )
    # --- comparisons ---
    # Named variants that `llmsched compare` runs on the same workload when no --policies are
    # given: {name: {policy: ..., router: ..., policy_params: ..., router_params: ...}}.
    runs: dict[str, dict[str, Any]] | None = Field(
        None,
        description="a mapping of run names to the keys they change, e.g. "
        "{fast: {policy: sarathi}}",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(_problems(err, values)) from None

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        from llmsched.policies import policy_class

        policy_class(name)  # the registry's error names the known ones and the closest
        return name

    @field_validator("router")
    @classmethod
    def _known_router(cls, name: str) -> str:
        from llmsched.policies import router_class

        router_class(name)
        return name

    @field_validator("trace_format")
    @classmethod
    def _known_format(cls, fmt: str | None) -> str | None:
        from llmsched.workload.readers import FORMATS

        known = (*FORMATS, "alpaca_eval")
        if fmt is not None and fmt not in known:
            raise ValueError(f"unknown trace format {fmt!r}; known: {', '.join(known)}")
        return fmt

    @field_validator("latency")
    @classmethod
    def _latency_model(cls, latency: str) -> str:
        if latency not in ("roofline", "calibrated") and not Path(latency).is_file():
            raise ValueError(
                f"latency must be roofline, calibrated or a calibration file (.json), got "
                f"{latency!r}" + (" (no such file)" if latency.endswith(".json") else "")
            )
        return latency

    @field_validator("scores")
    @classmethod
    def _score_spec(cls, spec: Any) -> Any:
        if spec is not None:
            from llmsched.workload.scores import ScoreSpec

            ScoreSpec.parse(spec)
        return spec

    # A file may use the flags' mini-languages: `goodput: ttft:500 tpot:50`,
    # `policy_params: quantum=300`.
    @field_validator("goodput", mode="before")
    @classmethod
    def _goodput_text(cls, value: Any) -> Any:
        return parse_goodput(value.split()) if isinstance(value, str) else value

    @field_validator("policy_params", mode="before")
    @classmethod
    def _params_text(cls, value: Any) -> Any:
        return parse_params(value.split()) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> SimulationConfig:
        """Checks across keys; each line names the key it is about."""
        problems = []
        if self.arrival in ("poisson", "gamma") and self.rate is None:
            problems.append(f"arrival: {self.arrival} needs a rate (rate: REQ_PER_S, --rate)")
        if self.arrival == "trace" and self.rate is not None:
            problems.append(
                f"rate: {self.rate:g} is not used with arrival: trace, which replays the "
                "trace's timestamps (time_scale speeds them up)"
            )
        if self.programs is not None:
            problems += self._programs_problems()
        total = sum(t["share"] for t in (self.tiers or {}).values())
        if self.tiers and not math.isclose(total, 1):
            problems.append(f"tiers: the shares must sum to 1, got {total:g}")
        for name in self.runs or {}:
            try:
                self.variant(name)
            except ConfigError as err:
                problems += [f"runs.{name}.{line}" for line in err.problems]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _programs_problems(self) -> list[str]:
        from llmsched.workload.programs import ProgramSpec

        problems = []
        try:
            ProgramSpec.from_mapping(dict(self.programs))
        except ValueError as err:
            problems.append(str(err))
        if self.trace is not None:
            problems.append(
                f"programs: generated programs and trace {self.trace!r} are two workloads: "
                "give one (a session trace is read with trace_format: mooncake_sessions)"
            )
        if self.num_requests is not None:
            problems.append(
                "num_requests: not used with programs (programs.count sets how many programs)"
            )
        if self.arrival not in ("auto", "poisson"):
            problems.append(
                f"arrival: programs start as a Poisson process of `rate` programs/s; "
                f"arrival: {self.arrival} does not apply"
            )
        return problems

    def validate(self) -> SimulationConfig:
        """Check again: a nested value (a goodput entry, say) may have been changed in place."""
        return SimulationConfig(**self.to_dict())

    def variant(self, name: str) -> SimulationConfig:
        """The config of one named run of `runs` (its keys override this config's)."""
        if not self.runs or name not in self.runs:
            known = ", ".join(self.runs or {}) or "none"
            raise ConfigError([f"runs: no run named {name!r}; runs: {known}"])
        return self.replace(**{"runs": None} | self.runs[name])

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> SimulationConfig:
        return SimulationConfig(**self.to_dict() | changes)


# --- error messages -------------------------------------------------------------------------
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _expected(key: str) -> str:
    """What a key takes, in words: its description, or its type and bounds."""
    info = SimulationConfig.model_fields[key]
    if info.description:
        return info.description
    kind = info.annotation
    if get_origin(kind) in (Union, UnionType):  # X | None: what X takes
        kind = next(t for t in get_args(kind) if t is not type(None))
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(get_args(kind))
    bounds = [
        f"{op} {getattr(m, name):g}" for m in info.metadata for name, op in _BOUNDS
        if getattr(m, name, None) is not None
    ]  # fmt: skip
    return " ".join([_KINDS.get(kind, "a value"), " and ".join(bounds)]).strip()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _hint(value: Any) -> str:
    """Why a value that looks right is refused: a quoted number (YAML and TOML read it as a
    string), or an infinite one."""
    if isinstance(value, float) and not math.isfinite(value):
        return " (a finite one)"
    if isinstance(value, str):
        try:
            plain = yaml.safe_load(value)
        except yaml.YAMLError:
            return ""
        if isinstance(plain, int | float | bool):
            return " (a quoted value is a string: write it without quotes)"
    return ""


def _problems(err: ValidationError, values: dict[str, Any]) -> list[str]:
    """pydantic's errors as one line per key: the key, the value given, what is expected."""
    problems = []
    for e in err.errors(include_url=False):
        if not e["loc"]:  # a cross-key check's own lines
            problems += str(e["ctx"]["error"]).splitlines()
            continue
        key = str(e["loc"][0])
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
            close = difflib.get_close_matches(key, SimulationConfig.model_fields, 1)
            known = "; known keys: " + ", ".join(SimulationConfig.model_fields)
            problems.append(
                f"{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else known)
            )
        elif e["type"] == "value_error":  # a validator's own words
            problems.append(f"{key}: {e['ctx']['error']}")
        else:  # a nested value is shown whole: the expectation describes its form
            value = values.get(key)
            problems.append(f"{key}: got {_show(value)}, expected {_expected(key)}{_hint(value)}")
    return list(dict.fromkeys(problems))  # several errors inside one value: one line


def _key(problem: str) -> str:
    return problem.split(":", 1)[0].split(".", 1)[0]


# --- reading -----------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, **overrides: Any) -> SimulationConfig:
    """Defaults, then the file's values, then `overrides` (flags; None means "not given")."""
    values: dict[str, Any] = read_config_file(path) if path is not None else {}
    from_file = set(values)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            value = values[key] | value  # flags add to (or override) the file's entries
        else:
            from_file.discard(key)
        values[key] = value
    try:
        return SimulationConfig(**values)
    except ConfigError as err:  # name the file in the lines about its values
        raise ConfigError(
            [f"{path}: {p}" if _key(p) in from_file else p for p in err.problems]
        ) from None


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
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    # A saved run's config.yaml (save_config) ends with what the engine derived from it.
    values.pop("resolved", None)
    return values


def _parse_pairs(items: list[str] | None, sep: str, form: str, value) -> dict | None:
    """`NAME<sep>VALUE` items → {name: value(text)}, with a clear error."""
    if not items:
        return None
    out = {}
    for item in items:
        name, found, text = item.partition(sep)
        try:
            if not found or not name.strip():
                raise ValueError
            out[name.strip()] = value(text)
        except (ValueError, yaml.YAMLError):
            raise ValueError(f"{item!r} is not {form}") from None
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float] | None:
    """`["ttft:500", "tpot:50"]` (as `vllm bench serve --goodput`) → {"ttft": 500.0, ...}."""
    return _parse_pairs(items, ":", "METRIC:MS like ttft:500", float)


def parse_params(items: list[str] | None) -> dict[str, Any] | None:
    """`["quantum=300"]` → {"quantum": 300}; values are read as YAML scalars (numbers, bools)."""
    return _parse_pairs(items, "=", "NAME=VALUE like quantum=300", yaml.safe_load)


def save_config(config: SimulationConfig, path: Path, resolved: dict[str, Any]) -> None:
    """The config as run, with the values the engine derived (KV blocks, budgets) beside it."""
    data = config.to_dict() | {"resolved": resolved}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
