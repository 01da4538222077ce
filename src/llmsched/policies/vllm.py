"""vLLM's own schedulers: FCFS and priority on the V1 engine, and the v0 prefill-first engine."""

from __future__ import annotations

from llmsched.engine.plan import BatchBuilder, BatchPlan
from llmsched.policies.base import InstancePolicy, pack_in_order, register


@register
class FCFS(InstancePolicy):
    """vLLM V1 default: first come first served, chunked prefill, recompute the newest on OOM."""

    name = "fcfs"

    def schedule(self, view) -> BatchPlan:
        return pack_in_order(view, mode=self.preemption).build()


@register
class Priority(InstancePolicy):
    """vLLM priority scheduling: lower `priority` first (ties by arrival); a waiting request
    that does not fit preempts running requests of worse priority (vLLM's priority preemption)."""

    name = "priority"

    def key(self, state):
        return (state.priority, state.arrival)

    def waiting_key(self, state):
        return self.key(state)

    def schedule(self, view) -> BatchPlan:
        return pack_in_order(
            view, mode=self.preemption, key=self.key, preempt_for_waiting=True
        ).build()


@register
class VllmV0(InstancePolicy):
    """vLLM v0 (before chunked prefill): whole prompts first in prefill-only batches, then decode
    batches. New prompts need KV for the whole prompt (1 % watermark)."""

    name = "vllm-v0"
    engine_defaults = {"max_num_batched_tokens": 8192, "watermark": 0.01}

    def schedule(self, view) -> BatchPlan:
        b = BatchBuilder(view)
        reserve = view.config.watermark_blocks
        # Prefill-first: a batch of new (or recomputed) prompts if the queue head fits.
        for state in view.waiting:
            if state.computed > 0:
                continue  # swapped out or migrated in: resumes in a decode batch
            if state.to_compute > b.budget_left or not b.admit_whole(state, reserve=reserve):
                break
        if b.items:
            return b.build()
        # Otherwise every running decode, then resumed (swapped-out) requests.
        b = pack_in_order(view, mode=self.preemption)
        if not b.preempted:
            for state in view.waiting:
                if state.computed > 0 and not b.admit(state):
                    break
        return b.build()
