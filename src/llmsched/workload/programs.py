"""Synthetic agent programs: multi-turn closed-loop sessions with tool calls between turns.

A program (a coding agent solving one task) is a sequence of turns. Programs start as a
Poisson process of `rate` programs/s. Turn 0's prompt is a system prompt shared by every
program plus the task; turn k's prompt is turn k − 1's prompt, its output and the tool's
observation (new tokens), so its prefix is turn k − 1's `continuation`. After every turn but
the last the agent calls a tool, drawn from a catalogue with a lognormal duration per tool; the
next turn is sent when the turn finishes plus that duration (closed loop, docs/agents.md). The
number of turns is drawn per program and capped by the step limit; a turn that the cap makes
the last has `is_last_step` (as mini-swe-agent marks it for Continuum).

Every default says where it comes from (docs/agents.md tables them):

* turns: mean 10.9, std 2.1 per SWE-bench program (Continuum, arXiv 2511.02230, Table 1 /
  §2.2); step limit 50 and output at most 2,048 tokens a turn (mini-swe-agent's
  `config/extra/swebench.yaml` and `max_completion_tokens` in Continuum's released code);
* tool durations, prompt growth and output lengths: fitted on the real agent runs in
  `$LLMSCHED_DATA/agents` (:func:`fit_agent_data` refits them; the numbers are embedded so
  that the generator runs without the data, and a test checks them against it).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from llmsched.workload.request import Workload, object_column


@dataclass(frozen=True)
class ToolTime:
    """A tool's share of the calls and its duration: lognormal, ln(seconds) ~ N(mu, sigma²)."""

    share: float
    mu: float
    sigma: float

    @property
    def median(self) -> float:
        return math.exp(self.mu)

    @property
    def mean(self) -> float:
        return math.exp(self.mu + self.sigma**2 / 2)


# Fitted by fit_agent_data() on agents/openhands_tool_gaps.csv (OpenHands, 3 Multi-SWE-bench
# trajectories, 103 tool calls, MIT): per action, share = its count / 103, mu and sigma = the
# mean and standard deviation of ln(tool_duration_s). `run` (shell commands: builds, tests) has
# the heavy tail (median 0.62 s, max 265 s); file reads and edits take milliseconds.
OPENHANDS_TOOLS: dict[str, ToolTime] = {
    "run": ToolTime(share=0.4757, mu=-0.3615, sigma=0.8578),
    "edit": ToolTime(share=0.2816, mu=-5.2088, sigma=0.3714),
    "read": ToolTime(share=0.2233, mu=-5.0312, sigma=0.4542),
    "think": ToolTime(share=0.0194, mu=-6.8452, sigma=0.0807),
}
# Fitted the same way on agents/swe_agent_demo_step_times.csv (SWE-agent's demonstration
# trajectories, 40 steps, MIT): per command (the first word of `action_head`), its
# execution_time_s; commands seen fewer than 3 times are pooled as `other`.
SWE_AGENT_TOOLS: dict[str, ToolTime] = {
    "edit": ToolTime(share=0.175, mu=-0.3335, sigma=0.2227),
    "python": ToolTime(share=0.15, mu=-1.2487, sigma=0.1811),
    "open": ToolTime(share=0.125, mu=-1.6061, sigma=0.313),
    "find_file": ToolTime(share=0.1, mu=-1.6046, sigma=0.3177),
    "ls": ToolTime(share=0.1, mu=-1.8435, sigma=0.3138),
    "submit": ToolTime(share=0.1, mu=-1.6055, sigma=0.301),
    "create": ToolTime(share=0.075, mu=-1.6138, sigma=0.2593),
    "rm": ToolTime(share=0.075, mu=-1.7427, sigma=0.297),
    "other": ToolTime(share=0.1, mu=-0.6277, sigma=0.7622),
}
TOOL_SETS = {"openhands": OPENHANDS_TOOLS, "swe-agent": SWE_AGENT_TOOLS}
MIN_CALLS = 3  # commands seen fewer times are pooled as "other"


@dataclass(frozen=True)
class ProgramSpec:
    """What a program set looks like. Lengths are lognormal: median and sigma of ln(tokens)."""

    count: int = 100  # programs
    # Continuum (arXiv 2511.02230) Table 1: SWE-bench programs take 10.9 +- 2.1 turns.
    turns_mean: float = 10.9
    turns_std: float = 2.1
    step_limit: int = 50  # mini-swe-agent's swebench.yaml step_limit
    # OpenHands' first prompts are 5,282-5,920 tokens (agents/openhands_llm_calls.csv): a
    # system prompt with the tools' descriptions that every program shares, then the task.
    system_prompt_tokens: int = 5000
    task_median: float = 580.0  # 5,282-5,920 - 5,000: the task's own tokens
    task_sigma: float = 0.5
    # Tokens a tool's observation adds to the context: consecutive OpenHands calls' prompt
    # growth minus the previous output (agents/openhands_llm_calls.csv, 102 pairs; median of the
    # positive ones 154, ln-std 1.25).
    new_tokens_median: float = 154.0
    new_tokens_sigma: float = 1.254
    # Output tokens a turn: OpenHands' completion_tokens (median 105 in ln-space, ln-std 0.48),
    # at most 2,048 (Continuum's client sets max_completion_tokens 2048).
    output_median: float = 105.0
    output_sigma: float = 0.479
    max_output: int = 2048
    tools: str | dict[str, ToolTime] = "openhands"  # a TOOL_SETS name or {name: ToolTime}
    catalogue: dict[str, ToolTime] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        for name, low in (
            ("count", 1),
            ("step_limit", 1),
            ("max_output", 1),
            ("turns_mean", 1),
            ("task_median", 1),
            ("new_tokens_median", 1),
            ("output_median", 1),
            ("system_prompt_tokens", 0),
            ("turns_std", 0),
            ("task_sigma", 0),
            ("new_tokens_sigma", 0),
            ("output_sigma", 0),
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= low):
                problems.append(f"{name} must be a number >= {low}, got {value!r}")
        tools = self.tools
        if isinstance(tools, str):
            if tools not in TOOL_SETS:
                problems.append(f"tools: unknown tool set {tools!r}; known: {', '.join(TOOL_SETS)}")
                tools = {}
            else:
                tools = TOOL_SETS[tools]
        else:
            try:
                tools = {
                    str(k): v if isinstance(v, ToolTime) else ToolTime(**v)
                    for k, v in tools.items()
                }
            except (TypeError, AttributeError):
                problems.append(
                    "tools: a tool set name or a mapping {tool: {share: P, mu: LN_S, sigma: S}}"
                )
                tools = {}
            if tools and (
                any(t.share < 0 or t.sigma < 0 for t in tools.values())
                or not math.isclose(sum(t.share for t in tools.values()), 1, abs_tol=1e-3)
            ):
                problems.append("tools: shares must be >= 0 and sum to 1, sigmas >= 0")
        if problems:
            raise ValueError("programs: " + "; ".join(problems))
        object.__setattr__(self, "catalogue", dict(tools))

    @classmethod
    def from_mapping(cls, values: dict) -> ProgramSpec:
        known = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"programs: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        return cls(**values)


def program_workload(spec: ProgramSpec, *, rate: float, seed: int = 0) -> Workload:
    """`spec.count` programs starting as a Poisson process of `rate` programs/s (the first at
    0), as closed-loop turns. The same spec, rate and seed give the same workload."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a number of programs per second > 0, got {rate}")
    rng = np.random.default_rng(seed)
    n = spec.count
    starts = np.concatenate(([0.0], np.cumsum(rng.exponential(1.0 / rate, n - 1))))
    drawn = np.rint(rng.normal(spec.turns_mean, spec.turns_std, n)).astype(np.int64)
    turns = np.clip(drawn, 1, spec.step_limit)
    total = int(turns.sum())
    task = _lengths(rng, n, spec.task_median, spec.task_sigma, None)
    new = _lengths(rng, total, spec.new_tokens_median, spec.new_tokens_sigma, None)
    output = _lengths(rng, total, spec.output_median, spec.output_sigma, spec.max_output)
    names = list(spec.catalogue)
    table = list(spec.catalogue.values())
    shares = np.array([t.share for t in table])
    tool = rng.choice(len(names), size=total, p=shares / shares.sum())
    mu = np.array([t.mu for t in table])[tool]
    sigma = np.array([t.sigma for t in table])[tool]
    duration = np.exp(mu + sigma * rng.standard_normal(total))

    system = ((("system",), spec.system_prompt_tokens),) if spec.system_prompt_tokens else ()
    cols: dict[str, list] = defaultdict(list)
    j = 0
    for p in range(n):
        session = f"prog{p}"
        context: tuple = ()  # the previous turn's continuation
        prompt = 0
        for k in range(int(turns[p])):
            rid = f"{session}/{k}"
            own = int(task[p]) + spec.system_prompt_tokens if k == 0 else int(new[j])
            prefix = system if k == 0 else context
            prompt += own
            last = k == turns[p] - 1
            cols["request_id"].append(rid)
            cols["arrival"].append(starts[p])
            cols["prompt_tokens"].append(prompt)
            cols["output_tokens"].append(int(output[j]))
            cols["session_id"].append(session)
            cols["turn"].append(k)
            cols["tool"].append(None if last else names[tool[j]])
            cols["tool_time"].append(0.0 if last else float(duration[j]))
            cols["is_last_step"].append(bool(last and drawn[p] >= spec.step_limit))
            cols["closed_loop"].append(k > 0)
            cols["prefix"].append(prefix or None)
            own_run = ((("in", rid), prompt - sum(t for _, t in prefix)),)
            context = prefix + own_run + ((("out", rid), int(output[j])),)
            prompt += int(output[j])
            j += 1
    columns = {
        k: object_column(v) if k in ("request_id", "session_id", "tool", "prefix") else np.array(v)
        for k, v in cols.items()
    }
    source = (
        f"programs({n} programs, {rate:g} programs/s, {total} turns, tools "
        f"{spec.tools if isinstance(spec.tools, str) else 'custom'}, seed {seed})"
    )
    return Workload(columns, source=source, timed=True)


def _lengths(rng, n: int, median: float, sigma: float, maximum: int | None) -> np.ndarray:
    x = np.rint(rng.lognormal(math.log(median), sigma, n))
    return np.clip(x, 1, maximum).astype(np.int64)


# --- where the defaults come from ---------------------------------------------------------------


def fit_agent_data(folder: str | Path) -> dict[str, dict[str, ToolTime]]:
    """Per-tool lognormal fits of the agent data in `folder` (the shared data's `agents/`):
    {"openhands": ..., "swe-agent": ...}, rounded as the embedded defaults are."""
    folder = Path(folder)
    openhands: dict[str, list[float]] = defaultdict(list)
    with open(folder / "openhands_tool_gaps.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            openhands[row["action"]].append(float(row["tool_duration_s"]))
    swe: dict[str, list[float]] = defaultdict(list)
    with open(folder / "swe_agent_demo_step_times.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            words = row["action_head"].split()
            swe[words[0] if words else ""].append(float(row["execution_time_s"]))
    pooled: dict[str, list[float]] = defaultdict(list)
    for name, times in swe.items():
        pooled[name if len(times) >= MIN_CALLS else "other"] += times
    return {"openhands": _fit(openhands), "swe-agent": _fit(pooled)}


def _fit(samples: dict[str, list[float]]) -> dict[str, ToolTime]:
    total = sum(len(v) for v in samples.values())
    order = sorted(samples, key=lambda k: (k == "other", -len(samples[k]), k))
    out = {}
    for name in order:
        logs = np.log(np.asarray(samples[name]))
        out[name] = ToolTime(
            share=round(len(logs) / total, 4),
            mu=round(float(logs.mean()), 4),
            sigma=round(float(logs.std()), 4),
        )
    return out
