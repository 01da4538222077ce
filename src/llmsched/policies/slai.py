"""SLAI (Bari, Hegde, de Veciana, "Optimal Scheduling Algorithms for LLM Inference: Theory and
Practice", SIGMETRICS 2026): SLO-aware chunked-prefill scheduling on Sarathi-Serve's engine.

As in the authors' `slai_scheduler.py` (agrimUT/SLAI @ 5098a7a):

* After each batch, every decode that ran gets a last schedulable time
  ``LST = end of that batch + TBT - Θ × mean batch duration`` (paper Eq. 8; Θ = 5, or 10 once
  KV usage reaches 96 %). Decodes that did not run keep their LST and grow more urgent. A decode
  is *critical* once ``now >= LST``.
* Each batch, under Sarathi's token budget (512), is built in four steps:
  1. critical decodes, by increasing LST;
  2. partially prefilled requests, in the order they were admitted;
  3. new prefills, paying tier first then shortest prompt first, stopping at the first that does
     not fit (KV for the whole prompt above a 1 % watermark);
  4. non-critical decodes, by increasing LST, in whatever budget is left.
* A decode that cannot get a KV slot preempts (recompute) the newest partially prefilled request
  not yet in the batch, or else is itself preempted.

So a decode is deferred only while it has slack, and the budget it frees goes to prefills: the
source of SLAI's TTFT gains over Sarathi-Serve, which never defers a decode.
"""

from __future__ import annotations

from llmsched.engine.plan import BatchBuilder, BatchPlan
from llmsched.engine.state import RequestState, Status
from llmsched.policies.base import InstancePolicy, register

PREFILL_ORDERS = ("tiered", "spf", "fcfs")
PAYING = "paying"  # the tier whose requests are served first (`is_strict_tbt` in SLAI's code)


@register
class SLAI(InstancePolicy):
    """SLAI: decodes near their TBT deadline first, then prefills shortest (paying tier) first."""

    name = "slai"
    engine_defaults = {"max_num_batched_tokens": 512, "max_num_seqs": 128, "watermark": 0.01}

    def __init__(
        self,
        preemption: str = "recompute",
        tbt: float = 0.2,  # seconds, for requests without their own TBT (tpot_slo)
        offset: float = 5.0,  # Θ, in mean batch durations
        high_memory_offset: float | None = 10.0,  # Θ once KV usage >= memory_limit; None: fixed
        memory_limit: float = 0.96,
        prefill_order: str = "tiered",
        max_decodes: int = 128,  # critical + non-critical decodes per batch
    ) -> None:
        super().__init__(preemption)
        if prefill_order not in PREFILL_ORDERS:
            raise ValueError(f"prefill_order must be one of {PREFILL_ORDERS}: {prefill_order!r}")
        if tbt <= 0 or offset < 0 or max_decodes < 1:
            raise ValueError("SLAI needs tbt > 0, offset >= 0 and max_decodes >= 1")
        self.tbt, self.offset, self.high_memory_offset = tbt, offset, high_memory_offset
        self.memory_limit, self.prefill_order = memory_limit, prefill_order
        self.max_decodes = max_decodes
        self._ran: list[RequestState] = []  # the requests in the previous batch

    def waiting_key(self, state: RequestState):
        if self.prefill_order == "fcfs":
            return state.arrival
        length = (state.prompt_tokens, state.arrival)
        if self.prefill_order == "spf":
            return length
        return (0 if state.request.tier == PAYING else 1, *length)

    def deadline(self, state: RequestState) -> float:
        """The request's time-between-tokens target (its tier's)."""
        return state.request.tpot_slo or self.tbt

    @staticmethod
    def lst(state: RequestState) -> float:
        return state.policy_data["lst"]

    def schedule(self, view) -> BatchPlan:
        now = view.now
        self._update_lst(view)
        decodes, partial = [], []  # partial: admitted, prefill unfinished
        for state in view.running:
            (decodes if state.is_decode else partial).append(state)
        decodes.sort(key=self.lst)
        b = BatchBuilder(view)
        n_decodes = 0
        # 1. Critical decodes, most urgent first.
        waiting_decodes = []
        for state in decodes:
            if now < self.lst(state) or n_decodes >= self.max_decodes or b.budget_left == 0:
                waiting_decodes.append(state)
            elif self._give_slot(b, state, partial):
                n_decodes += 1
        critical = n_decodes > 0
        # 2. Partially prefilled requests continue, first admitted first.
        for state in partial:
            if b.budget_left == 0:
                break
            if not b.is_preempted(state):
                b.schedule(state)
        # 3. New prefills, paying tier then shortest prompt first (the waiting queue's order).
        reserve = view.config.watermark_blocks
        resumed = False  # a swapped-out decode re-enters here; next time it is a decode
        for state in view.waiting:
            if b.budget_left == 0 or not b.admit_whole(state, reserve=reserve):
                break
            resumed |= state.is_decode
        # 4. Non-critical decodes fill the budget left, by increasing LST.
        deferred = False
        for state in waiting_decodes:
            if b.is_preempted(state):
                continue
            if n_decodes >= self.max_decodes or b.budget_left == 0:
                deferred = True
            elif self._give_slot(b, state, partial):
                n_decodes += 1
        # Decide again next iteration when criticality can change the batch: a deferred decode
        # turns critical as time passes, and a critical one that ran is not critical next time,
        # leaving its budget to the prefill work waiting behind it.
        if deferred or resumed or (critical and (partial or view.num_waiting)):
            b.limit_repeat(1)
        plan = b.build()
        self._ran = [state for state, _ in plan.items]
        return plan

    def _update_lst(self, view) -> None:
        """Eq. 8 for every decode that ran in the previous batch (which ended now)."""
        theta = self.offset
        if self.high_memory_offset is not None and view.kv.usage >= self.memory_limit:
            theta = self.high_memory_offset
        slack = theta * view.mean_iteration_time
        for state in self._ran:
            if state.status is Status.RUNNING and state.is_decode:
                state.policy_data["lst"] = view.now + self.deadline(state) - slack

    def _give_slot(self, b: BatchBuilder, state: RequestState, partial: list) -> bool:
        """One decode token for `state`; when KV is out, preempt the newest partially prefilled
        request not yet in this batch, or else `state` itself (then False)."""
        while not b.schedule(state):
            victims = [p for p in partial if not (b.is_scheduled(p) or b.is_preempted(p))]
            victim = victims[-1] if victims else state
            b.preempt(victim, self.preemption)
            if victim is state:
                return False
        return True
