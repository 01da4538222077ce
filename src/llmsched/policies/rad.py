"""RAD, the throughput-optimal scheduler of Bari, Hegde, de Veciana (SIGMETRICS 2026): a reading.

The paper proves RAD maximally stable; its pseudo-code is not public. What is known: it cycles
between a Prefill Mode and a Decode Mode with at most N prefills per cycle, sizes prefill chunks
to whole GEMM tiles and decode batches to multiples of the tile width ("optimal tiling"), and
allocates the GPU between prefill and decode dynamically. It ignores latency SLOs.

This file implements the clearest reading of that, with every assumption a parameter:

* **Prefill Mode**: admit up to ``max_prefills`` waiting requests (first come first served, KV
  for the whole prompt above the watermark) and prefill them in prefill-only iterations whose
  token budget is rounded down to a multiple of ``tile``. It ends when those prompts are done.
* **Decode Mode**: decode-only iterations. With ``d >= tile`` decodes, a batch holds the largest
  multiple of ``tile`` that fits, the decodes served least recently first (so the ones held back
  rotate); with fewer, all run.
* **Dynamic allocation** (the mode switch): decoding continues while a prefill could not grow
  the decode batch, that is, while nothing waits, the KV cache has no room for the next prompt,
  or ``max_num_seqs`` requests are running. Otherwise the next cycle's Prefill Mode starts. This
  keeps the decode batch, whose cost is dominated by reading the weights, as large as memory
  allows.

The latency model prices GEMMs without tile quantisation, so the tiling can only hold decodes
back here: ``tile=1`` turns it off (docs/slai.md compares both).
"""

from __future__ import annotations

from llmsched.engine.plan import BatchBuilder, BatchPlan
from llmsched.engine.state import RequestState
from llmsched.policies.base import InstancePolicy, register


@register
class RAD(InstancePolicy):
    """RAD (a reading): alternate prefill and decode modes, <= N prefills a cycle, tiled batches."""

    name = "rad"
    engine_defaults = {"max_num_batched_tokens": 512, "max_num_seqs": 128, "watermark": 0.01}

    def __init__(self, preemption: str = "recompute", max_prefills: int = 8, tile: int = 64):
        super().__init__(preemption)
        if max_prefills < 1 or tile < 1:
            raise ValueError(f"RAD needs max_prefills >= 1 and tile >= 1: {max_prefills}, {tile}")
        self.max_prefills, self.tile = max_prefills, tile
        self.admitted_this_cycle = 0
        self._served = 0  # counts decode batches, to rotate the decodes held back

    def schedule(self, view) -> BatchPlan:
        prefilling = [s for s in view.running if not s.is_decode]
        if prefilling or self._prefill_can_grow_batch(view):
            plan = self._prefill_mode(view, prefilling)
            if plan.items:
                return plan
        self.admitted_this_cycle = 0  # the cycle's prefills are done: decode
        b = self._decode_mode(view)
        if self._prefill_can_grow_batch(view):
            b.limit_repeat(1)  # room for the next cycle's prefills after this batch
        return b.build()

    def _prefill_can_grow_batch(self, view) -> bool:
        if self.admitted_this_cycle >= self.max_prefills:
            return False
        head = next(iter(view.waiting), None)
        if head is None or len(view.running) >= view.config.max_num_seqs:
            return False
        need = -(-head.num_tokens // view.config.block_size)
        return need <= view.kv.free - view.config.watermark_blocks

    def _prefill_mode(self, view, prefilling: list[RequestState]) -> BatchPlan:
        budget = view.config.max_num_batched_tokens
        whole_tiles = budget // self.tile * self.tile
        b = BatchBuilder(view, budget=whole_tiles or budget)
        for state in prefilling:
            if b.budget_left == 0:
                break
            b.schedule(state)
        reserve = view.config.watermark_blocks
        for state in view.waiting:
            if self.admitted_this_cycle >= self.max_prefills or b.budget_left == 0:
                break
            if not b.admit_whole(state, reserve=reserve):
                break
            self.admitted_this_cycle += 1
            b.limit_repeat(1)  # the cycle's count changed: decide again
        return b.build()

    def _decode_mode(self, view) -> BatchBuilder:
        b = BatchBuilder(view)

        def last_served(s: RequestState) -> int:
            # Stamps of another instance (a request migrated in) count as never served here.
            where, when = s.policy_data.get("rad_served", (view.index, -1))
            return when if where == view.index else -1

        decodes = sorted((s for s in view.running if s.is_decode), key=last_served)
        limit = min(len(decodes), view.config.max_num_batched_tokens)
        if limit >= self.tile:
            limit = limit // self.tile * self.tile
        alive = sorted(view.running, key=lambda s: s.arrival)
        for state in decodes:
            if len(b.items) >= limit:
                break
            if b.is_preempted(state):
                continue
            while not b.schedule(state):  # out of KV: recompute the latest arrival
                victim = alive.pop()
                b.preempt(victim, self.preemption)
                if victim is state:
                    break
        self._served += 1
        for state in b.items:
            state.policy_data["rad_served"] = (view.index, self._served)
        if len(b.items) < len(decodes):
            b.limit_repeat(1)  # the held-back decodes go first next time
        return b
