"""Per-request data checked where vLLM's API takes the request, so that a bad `vllm_xargs`
gets an HTTP 400 that says what is wrong (without it, the scheduler fails the request alone and
logs why). `vllm serve ... --logits-processors llmsched.integrations.vllm:RequestArgsCheck`.

A logits processor only because that is the hook vLLM 0.32 gives for checking a request's
parameters at admission (`validate_params`); it leaves every logit as it is. Tiers are checked
by the scheduler, which knows the engine's settings.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from llmsched.integrations.vllm.settings import request_args


class RequestArgsCheck(LogitsProcessor):
    """Rejects a request whose llmsched data (score, tbt, ttft, reasoning) is malformed."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        request_args(sampling_params.extra_args)  # RequestDataError is a ValueError: HTTP 400

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass
