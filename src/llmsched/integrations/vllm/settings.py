"""What a user tells llmsched's vLLM schedulers, checked: the engine's settings (vLLM's
`--additional-config '{"llmsched": {...}}'`) and each request's data (`vllm_xargs` in the OpenAI
API, `SamplingParams(extra_args=...)` offline).

Both are validated with pydantic (which vLLM itself uses); a bad value fails with a message
that names the field, the value and what is expected. This module does not import vLLM, so a
client can check its per-request data before sending it (:func:`request_args`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator


def _problems(error: ValidationError, where: str) -> str:
    parts = []
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = f" = {e['input']!r}" if "input" in e and not isinstance(e["input"], dict) else ""
        parts.append(f"{where}{field}{value}: {e['msg']}")
    return "; ".join(parts)


class Tier(BaseModel):
    """A class of users: the time-between-tokens target its requests get unless they set one."""

    model_config = ConfigDict(extra="forbid")
    tbt: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # seconds


class Settings(BaseModel):
    """`--additional-config '{"llmsched": {...}}'`: the policy and what it needs."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = None  # a registered instance policy (`llmsched list`)
    params: dict[str, Any] = Field(default_factory=dict)  # its constructor's parameters
    # Tiers a request may name in vllm_xargs["tier"]; SLAI serves "paying" first.
    tiers: dict[str, Tier] = Field(default_factory=lambda: {"paying": Tier(), "free": Tier()})
    # The token that ends a reasoning model's hidden part; None: look "</think>" up in the
    # model's tokenizer (needed only by phase-aware policies).
    think_end_token_id: int | None = Field(default=None, ge=0)
    reasoning: bool | None = None  # requests start in a reasoning phase (default: per class)
    ranker: str | None = None  # a trained ranker's folder (llmsched train-ranker): scores prompts
    # Score of a request that brings none, under a policy that ranks by score: +inf serves it
    # after every scored request (first come first served among themselves).
    missing_score: float = math.inf
    # Raise when vLLM's batch differs from the policy's plan (tests); otherwise count and log.
    strict: bool = False
    # Record every engine step to this file (JSON lines, integrations/vllm/steps.py): what
    # `llmsched calibrate --from-steps` fits the latency model on. None: no recording.
    step_log: str | None = None

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> Settings:
        raw = additional_config.get("llmsched", {}) if isinstance(additional_config, dict) else {}
        if not isinstance(raw, dict):
            raise ValueError(
                "--additional-config's 'llmsched' entry must be an object, e.g. "
                '\'{"llmsched": {"policy": "pars"}}\', got ' + repr(raw)
            )
        try:
            return cls(**raw)
        except ValidationError as e:
            raise ValueError(
                _problems(e, "--additional-config llmsched.")
                + ". Fields: "
                + ", ".join(cls.model_fields)
            ) from None


def check_params(policy_cls: type, params: dict[str, Any]) -> None:
    """Fail with the accepted names when `params` are not parameters of the policy."""
    accepted = [
        name
        for name, p in inspect.signature(policy_cls.__init__).parameters.items()
        if name not in ("self", "preemption") and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    if "preemption" in params and params["preemption"] != "recompute":
        raise ValueError(
            f"llmsched.params.preemption = {params['preemption']!r}: vLLM 0.32's scheduler "
            "preempts by recompute only; leave it out"
        )
    unknown = sorted(set(params) - set(accepted) - {"preemption"})
    if unknown:
        raise ValueError(
            f"llmsched.params: {', '.join(map(repr, unknown))} not a parameter of policy "
            f"{policy_cls.name!r}; its parameters: {', '.join(accepted) or 'none'}"
        )


class RequestArgs(BaseModel):
    """One request's data for llmsched's policies, from `vllm_xargs` / `extra_args`. Keys that
    are not llmsched's are ignored (they may be another plugin's)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    score: float | None = None  # a length predictor's score: higher = longer expected
    tier: str | None = None
    tbt: float | None = Field(default=None, gt=0)  # seconds between tokens (SLAI's deadline)
    ttft: float | None = Field(default=None, gt=0)  # seconds
    reasoning: bool | None = None  # starts in a reasoning phase (PASCAL)
    # The true output of the request (llmsched's emulated engine generates exactly this, and
    # its gateway resumes from it): all tokens, and those up to and including `</think>`.
    output_tokens: StrictInt | None = Field(default=None, ge=1)
    reasoning_tokens: StrictInt | None = Field(default=None, ge=0)
    # Agent programs (Continuum): the program (session) the request is a turn of, which turn,
    # the tool its answer calls (None: none, the program ends), and whether the program's step
    # limit makes it the last. The released Continuum passes the same as its `job_id`.
    session_id: str | None = None
    turn: int = Field(default=0, ge=0)
    tool: str | None = None
    is_last_step: bool = False

    @field_validator("score", "tbt", "ttft", mode="before")
    @classmethod
    def _not_a_bool(cls, value):
        if isinstance(value, bool):
            raise ValueError("expected a number, not a boolean")
        return value

    @field_validator("session_id", mode="before")
    @classmethod
    def _id_as_text(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # aiperf's session ids are numbers
        return value


class RequestDataError(ValueError):
    """A request's vllm_xargs cannot be used; the message names the field and the fix."""


def request_args(
    extra_args: dict[str, Any] | None, request_id: str = "", tiers: dict | None = None
) -> RequestArgs:
    """The request's llmsched data, checked (tiers: the names allowed, if any)."""
    who = f"request {request_id!r}: " if request_id else ""
    try:
        args = RequestArgs(**(extra_args or {}))
    except ValidationError as e:
        raise RequestDataError(
            who
            + _problems(e, "vllm_xargs.")
            + ' (e.g. vllm_xargs={"score": 3.5, "tier": "paying", "tbt": 0.1})'
        ) from None
    if args.tier is not None and tiers is not None and args.tier not in tiers:
        raise RequestDataError(
            f"{who}vllm_xargs.tier = {args.tier!r} is not a known tier; known: "
            f"{', '.join(sorted(tiers))} (add tiers with --additional-config "
            '\'{"llmsched": {"tiers": {"gold": {"tbt": 0.05}}}}\')'
        )
    return args
