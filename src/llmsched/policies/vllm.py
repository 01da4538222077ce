"""vLLM's own schedulers: FCFS and priority on the V1 engine, and the v0 prefill-first engine."""

from __future__ import annotations

from llmsched.engine.plan import BatchBuilder, BatchPlan, pack_in_order
from llmsched.policies.base import InstancePolicy, register


@register
class FCFS(InstancePolicy):
    """vLLM V1 default: first come first served, chunked prefill, recompute the newest on OOM."""

    name = "fcfs"

    def schedule(self, view) -> BatchPlan:
        return pack_in_order(view, mode=self.preemption).build()


@register
class Priority(InstancePolicy):
    """vLLM V1 priority scheduling (0.32): lower `priority` first (ties by arrival); a running
    request short of KV preempts the worst priority; waiting requests never preempt."""

    name = "priority"
    preempt_for_waiting = False  # V1 preempts only for a running request that lacks KV

    def key(self, state):
        return (state.priority, state.arrival)

    def waiting_key(self, state):
        return self.key(state)

    def schedule(self, view) -> BatchPlan:
        return pack_in_order(
            view, mode=self.preemption, key=self.key, preempt_for_waiting=self.preempt_for_waiting
        ).build()


@register
class PriorityV06(Priority):
    """vLLM v0.6 priority scheduling: as `priority`, and a waiting request that does not fit
    preempts running requests of worse priority (v0.6's priority preemption)."""

    name = "priority-v0.6"
    preempt_for_waiting = True


@register
class VllmV0(InstancePolicy):
    """vLLM v0 (before chunked prefill): whole prompts first in prefill-only batches, then decode
    batches. New prompts need KV for the whole prompt (1 % watermark)."""

    name = "vllm-v0"
    engine_defaults = {"max_num_batched_tokens": 8192, "watermark": 0.01}

    def schedule(self, view) -> BatchPlan:
        b = BatchBuilder(view)
        reserve = view.config.watermark_blocks
        resuming = [s for s in view.waiting if s.computed > 0]  # swapped out or migrated in
        # Prefill-first: while nothing is swapped out, a batch of new (or recomputed) prompts
        # whenever the queue head fits whole.
        if not resuming:
            for state in view.waiting:
                if state.to_compute > b.budget_left or not b.admit_whole(state, reserve=reserve):
                    break
            if b.items:
                return b.build()
        # Otherwise a decode batch: every running request, then the swapped-out ones, in order.
        b = pack_in_order(view, mode=self.preemption, admit_waiting=False)
        if not b.preempted:
            for state in resuming:
                if not b.admit(state):
                    break
                b.limit_repeat(1)  # once none is swapped out, prefills may start again
        return b.build()
