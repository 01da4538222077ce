"""llmsched's policies as vLLM scheduler classes: `vllm serve MODEL --scheduler-cls
llmsched.integrations.vllm.<Name>Scheduler` or `LLM(..., scheduler_cls=...)`.

Each is vLLM 0.32's own ``Scheduler`` with the policy deciding (see adapter.py); its twin
``Async<Name>Scheduler`` is the same on vLLM's ``AsyncScheduler``, for engines that schedule
asynchronously (vLLM's default; ``<Name>Scheduler`` needs ``--no-async-scheduling``).
Per-request data comes in `vllm_xargs` (`SamplingParams.extra_args`), settings in
`--additional-config '{"llmsched": {...}}'` (settings.py).
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from llmsched.integrations.vllm.adapter import PolicySchedulerMixin
from llmsched.integrations.vllm.steps import StepRecordingMixin


class RecordingScheduler(StepRecordingMixin, Scheduler):
    """vLLM's own scheduler, unchanged, recording its steps to `llmsched.step_log` (to
    calibrate llmsched's latency model on an engine served with stock scheduling)."""


class AsyncRecordingScheduler(StepRecordingMixin, AsyncScheduler):
    """RecordingScheduler on vLLM's AsyncScheduler (async scheduling)."""


class LlmschedScheduler(StepRecordingMixin, PolicySchedulerMixin, Scheduler):
    """Any registered llmsched instance policy:
    `--additional-config '{"llmsched": {"policy": "srpt", "params": {}}}'`."""


class FcfsScheduler(StepRecordingMixin, PolicySchedulerMixin, Scheduler):
    """llmsched's `fcfs`: vLLM V1's first come first served (the same batches as stock vLLM)."""

    policy_name = "fcfs"


class PriorityScheduler(StepRecordingMixin, PolicySchedulerMixin, Scheduler):
    """llmsched's `priority`: vLLM V1's priority scheduling (the request's `priority`)."""

    policy_name = "priority"


class RoundRobinScheduler(StepRecordingMixin, PolicySchedulerMixin, Scheduler):
    """Round-robin with a token quantum (params: {"quantum": 500})."""

    policy_name = "rr"


class SarathiScheduler(StepRecordingMixin, PolicySchedulerMixin, Scheduler):
    """Sarathi-Serve: decodes first, then prefill chunks, new prompts only if KV for the whole
    prompt fits (serve with --max-num-batched-tokens 512 for the paper's budget)."""

    policy_name = "sarathi"


class ParsScheduler(StepRecordingMixin, PolicySchedulerMixin, Scheduler):
    """PARS: predicted-shortest first. The score is vllm_xargs["score"], or a trained ranker's
    on the prompt (llmsched.ranker = its folder); without either, `missing_score`."""

    policy_name = "pars"


class SlaiScheduler(StepRecordingMixin, PolicySchedulerMixin, Scheduler):
    """SLAI: decodes near their TBT deadline first (LST from measured step times), then
    prefills, paying tier first; vllm_xargs {"tier": ..., "tbt": seconds}."""

    policy_name = "slai"


class PascalScheduler(StepRecordingMixin, PolicySchedulerMixin, Scheduler):
    """PASCAL's instance policy: reasoning (HP) before answering (LP), round-robin quanta,
    demotion; the boundary is the `</think>` token the engine produces. Preemption is by
    recompute (vLLM V1 has no swap)."""

    policy_name = "pascal"


SYNC = (
    LlmschedScheduler,
    FcfsScheduler,
    PriorityScheduler,
    RoundRobinScheduler,
    SarathiScheduler,
    ParsScheduler,
    SlaiScheduler,
    PascalScheduler,
)


def _async_twin(cls: type) -> type:
    return type(
        "Async" + cls.__name__,
        (StepRecordingMixin, PolicySchedulerMixin, AsyncScheduler),
        {
            "policy_name": cls.policy_name,
            "__module__": __name__,
            "__doc__": f"{cls.__name__} on vLLM's AsyncScheduler (async scheduling).",
        },
    )


ASYNC = tuple(_async_twin(cls) for cls in SYNC)
globals().update({cls.__name__: cls for cls in ASYNC})
