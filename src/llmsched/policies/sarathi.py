"""Sarathi-Serve (Agrawal et al., OSDI 2024): stall-free batching with chunked prefill.

Each iteration, within a fixed token budget (the chunk size): (1) every running decode, oldest
first; a decode that cannot get a KV slot preempts the most recently arrived running request
(recompute); (2) partially prefilled requests continue, one chunk each; (3) new prompts, first
come first served, admitted only if KV for the whole prompt fits above a 1 % watermark.
Decodes are never paused for prefills, so a prefill never stalls generation.
"""

from __future__ import annotations

from llmsched.engine.plan import BatchBuilder, BatchPlan
from llmsched.engine.state import RequestState
from llmsched.policies.base import InstancePolicy, register


@register
class SarathiServe(InstancePolicy):
    """Sarathi-Serve: decodes first, then prefill chunks under a fixed budget (default 512)."""

    name = "sarathi"
    engine_defaults = {"max_num_batched_tokens": 512, "max_num_seqs": 128, "watermark": 0.01}

    def waiting_key(self, state: RequestState):
        return self.prefill_order(state)

    def prefill_order(self, state: RequestState):
        return state.arrival  # FCFS; Sarathi-SPF and SLAI order by prompt length instead

    def schedule(self, view) -> BatchPlan:
        b = BatchBuilder(view)
        self.schedule_decodes(view, b, view.running)
        self.continue_prefills(view, b)
        self.admit_prefills(view, b)
        return b.build()

    def schedule_decodes(self, view, b: BatchBuilder, decodes) -> None:
        """Give each decode in `decodes` its token; preempt the newest arrival when KV is out."""
        alive = None  # the running requests by arrival, victims from the back (made when needed)
        for state in decodes:
            if not b.budget or not state.is_decode or (alive is not None and state not in alive):
                continue
            while not b.schedule(state):
                if alive is None:
                    alive = dict.fromkeys(sorted(view.running, key=lambda r: r.arrival))
                victim, _ = alive.popitem()
                b.preempt(victim, self.preemption)
                if victim is state:
                    break

    def continue_prefills(self, view, b: BatchBuilder) -> None:
        for state in view.running:
            if not b.budget:
                return
            if not (state in b.items or state in b.victims or state.is_decode):
                b.schedule(state)

    def admit_prefills(self, view, b: BatchBuilder) -> None:
        reserve = view.config.watermark_blocks
        for state in view.waiting:
            if b.budget_left == 0 or not b.admit_whole(state, reserve=reserve):
                return


@register
class SarathiSPF(SarathiServe):
    """Sarathi-Serve with new prompts shortest first (the SLAI repository's `sarathi_spf`)."""

    name = "sarathi-spf"

    def prefill_order(self, state: RequestState):
        return (state.prompt_tokens, state.arrival)
