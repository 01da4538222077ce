"""Prompt-aware scheduling on a predictor's ranking score: PARS and vllm-ltr.

Both read a per-request score (``Request.score``; higher = longer response expected) computed
once, before the request runs (``llmsched.workload.scores``: a trained predictor, a noisy
oracle, ...). Both serve lower scores first, i.e. approximate shortest-job-first.

- ``pars`` (Tao et al., PARS, arXiv 2510.03243): the released code says to "assign request
  priorities through ... vLLM's priority scheduler". So: the score is the vLLM priority, and the
  policy *is* :class:`~llmsched.policies.vllm.Priority` with the key (score, arrival).
- ``ltr`` (Fu et al., "Efficient LLM Scheduling by Learning to Rank", hao-ai-lab/vllm-ltr):
  every iteration all waiting and running requests are re-sorted by score and the batch is
  filled greedily in that order, lower-ranked running requests being preempted; a starvation
  guard boosts a request that went unscheduled for too long.

Iteration counts (starvation, aging) are kept per instance and are exact under the engine's
span fast-forwarding: the policy learns how many iterations its last plan ran from
``view.iterations`` and caps each plan's repeats (``limit_repeat``) at the first iteration at
which a counter would change a decision.
"""

from __future__ import annotations

import math

from llmsched.engine.plan import BatchBuilder, BatchPlan, pack_in_order
from llmsched.engine.state import RequestState, Status
from llmsched.policies.base import InstancePolicy, register
from llmsched.policies.vllm import Priority


def score_of(state: RequestState, policy: str) -> float:
    """The request's predictor score; a clear error when the workload has none."""
    score = state.request.score
    if score is None or math.isnan(score):
        raise ValueError(
            f"policy {policy!r} orders requests by a predictor score, but request "
            f"{state.request_id!r} has none: give the run a score source (config `scores: "
            "{source: noisy-oracle, tau: 0.8}`, or --scores oracle | prompt-length | model:DIR "
            "| noisy-oracle,tau=0.8)"
        )
    return score


class StarvationCounter:
    """Per request on one instance: consecutive iterations not scheduled (`idle`), the
    scheduled iterations left of a boost (`boost`; -1 = boosted for good) and the instance's
    iteration count when the boost began (`since`).

    vllm-ltr's rule: when ``idle`` reaches ``threshold`` the request is boosted for ``period``
    scheduled iterations (``period=None``: until it finishes), then its idle count restarts.
    One deviation: a boost counts down only in iterations in which the request *produces a
    token* (a decode, or the last chunk of its prefill). Counting every scheduled iteration
    lets two starving requests evict each other forever when re-prefilling a preempted request
    takes more iterations than the period (a small token budget or a long prompt): each
    boost is spent recomputing what the other's boost discarded. With vLLM's 2,048-token
    budget and ShareGPT prompts the two counts differ only for prompts above the budget.
    Call :meth:`update` at the start of ``schedule`` and :meth:`record` with the finished
    builder.
    """

    def __init__(self, threshold: int, period: int | None) -> None:
        if threshold < 1:
            raise ValueError(f"starvation threshold must be >= 1 iteration, got {threshold}")
        if period is not None and period < 1:
            raise ValueError(f"starvation period must be >= 1 iteration, got {period}")
        self.threshold = threshold
        self.period = period
        self.counts: dict[RequestState, list[int]] = {}  # request -> [idle, boost, since]
        self._scheduled: dict[RequestState, bool] = {}  # last plan: request -> produces?
        self._iterations = 0

    def update(self, view) -> None:
        elapsed = view.iterations - self._iterations  # iterations the last plan ran
        self._iterations = view.iterations
        counts: dict[RequestState, list[int]] = {}
        for state in (*view.running, *view.waiting):
            c = self.counts.get(state)
            if c is None:
                c = [0, 0, 0]  # new here (arrived, or migrated in)
            elif state in self._scheduled:
                c[0] = 0
                if c[1] > 0 and self._scheduled[state]:
                    c[1] = max(0, c[1] - elapsed)
            else:
                c[0] += elapsed
            if c[1] == 0 and c[0] >= self.threshold:
                c[0], c[1], c[2] = 0, (-1 if self.period is None else self.period), self._iterations
            counts[state] = c
        self.counts = counts

    def boosted(self, state: RequestState) -> bool:
        c = self.counts.get(state)
        return c is not None and c[1] != 0

    def boosted_since(self, state: RequestState) -> int:
        return self.counts[state][2]

    def record(self, b: BatchBuilder) -> None:
        """Remember who runs in the plan; cap its repeats at the next boost or boost end."""
        # A request produces a token in every iteration of the plan when it decodes; a chunk
        # that completes a prefill makes a plan of one iteration (BatchBuilder.build).
        self._scheduled = {s: tokens == s.to_compute for s, tokens in b.items.items()}
        for state, (idle, boost, _) in self.counts.items():
            if state in self._scheduled:
                if boost > 0 and self._scheduled[state]:
                    b.limit_repeat(boost)
            elif boost == 0:
                b.limit_repeat(self.threshold - idle)


class _Ordered:
    """A view whose running and waiting requests are in the policy's current order."""

    __slots__ = ("running", "waiting")

    def __init__(self, running, waiting) -> None:
        self.running, self.waiting = running, waiting


@register
class Pars(Priority):
    """PARS: predicted-shortest first via vLLM priority scheduling (priority = predictor score).

    Paper and code: the score is computed once, at arrival, and passed to vLLM's priority
    scheduler. Where they are silent, this choice is made:

    - Scheduler semantics: vLLM V1's priority mode as :class:`Priority` implements it (queue by
      (score, arrival), lower first; a running request short of KV preempts the worst score;
      running requests are not re-sorted; waiting requests never preempt). With oracle scores
      that is exactly ``sjf``. ``preempt=True`` adds vLLM v0.6's priority preemption (a waiting
      request that does not fit preempts running requests with a worse score, by recompute):
      PARS was released against vLLM v0.6, and whether it relies on that is not stated
      (notes §2.6, gap 1).
    - Starvation: none by default (the abstract describes none). ``aging=N`` adds a guard: a
      request not scheduled for N consecutive iterations is promoted for good, ahead of every
      unpromoted request; promoted requests rank among themselves by when they were promoted
      (then arrival), so a request it preempts, starving in turn, queues behind it instead of
      taking the seat back. Permanent, not vllm-ltr's temporary boost, because reverting a
      recompute-preempted request to a bad score only re-queues it behind the requests that
      starved it.
    - The predictor's latency is not charged (PARS reports it as negligible).
    """

    name = "pars"
    needs_scores = True

    def __init__(
        self, preemption: str = "recompute", aging: int | None = None, preempt: bool = False
    ) -> None:
        super().__init__(preemption)
        self.starvation = None if aging is None else StarvationCounter(aging, None)
        self.preempt_for_waiting = preempt

    def waiting_key(self, state: RequestState):
        return (1, score_of(state, self.name), state.arrival)

    def key(self, state: RequestState):
        if self.starvation is not None and self.starvation.boosted(state):
            return (0, self.starvation.boosted_since(state), state.arrival)
        return self.waiting_key(state)

    def schedule(self, view) -> BatchPlan:
        if self.starvation is None:
            return super().schedule(view)
        self.starvation.update(view)
        ordered = _Ordered(list(view.running), sorted(view.waiting, key=self.key))
        b = pack_in_order(
            ordered,
            mode=self.preemption,
            key=self.key,
            preempt_for_waiting=self.preempt_for_waiting,
            builder=BatchBuilder(view),
        )
        self.starvation.record(b)
        return b.build()


@register
class LearningToRank(InstancePolicy):
    """vllm-ltr: every iteration all requests re-sorted by predicted score, greedy fill,
    lower-ranked running requests preempted; starvation boost after 200 idle iterations.

    Following vllm-ltr's scheduler (schedule type ``opt-*``) with ``starv200-period10``:

    - Order: (boosted first, score, arrival). The score is fixed per request, so this is
      preemptive shortest-predicted-job-first.
    - Fill: walk the global order; a running request gets its next tokens (a decode 1, a
      prefill a chunk), a waiting one is admitted. One that cannot get KV preempts the
      lowest-ranked running request (possibly itself); a waiting request that does not fit
      after preempting every lower-ranked running request stops admissions (as vLLM's
      priority scheduler), while running requests further down still get their tokens.
    - Starvation: a request not scheduled for ``starvation_threshold`` consecutive iterations
      gets top priority for ``starvation_period`` scheduled iterations in which it produces a
      token (see :class:`StarvationCounter` for why tokens), then reverts; its idle count
      restarts. Boosted requests rank among themselves by score. ``starvation_threshold=None``
      turns the guard off.
    - Preemption: recompute (vllm-ltr also swaps; the engine setting applies).
    """

    name = "ltr"
    needs_scores = True

    def __init__(
        self,
        preemption: str = "recompute",
        starvation_threshold: int | None = 200,
        starvation_period: int = 10,
    ) -> None:
        super().__init__(preemption)
        self.starvation = (
            None
            if starvation_threshold is None
            else StarvationCounter(starvation_threshold, starvation_period)
        )

    def waiting_key(self, state: RequestState):
        return (1, score_of(state, self.name), state.arrival)

    def key(self, state: RequestState):
        if self.starvation is not None and self.starvation.boosted(state):
            return (0, score_of(state, self.name), state.arrival)
        return self.waiting_key(state)

    def schedule(self, view) -> BatchPlan:
        if self.starvation is not None:
            self.starvation.update(view)
        key = self.key
        order = sorted((*view.running, *view.waiting), key=key)
        b = BatchBuilder(view)
        alive = sorted(view.running, key=key)  # running, not preempted: victims from the end
        admitting = True
        for state in order:
            if b.budget_left == 0:
                break
            if state.status is Status.RUNNING:
                if b.is_preempted(state) or not state.to_compute:
                    continue  # (nothing to compute: its last token in flight, as in vLLM)
                while not b.schedule(state):
                    victim = alive.pop()  # the lowest-ranked running request
                    b.preempt(victim, self.preemption)
                    if victim is state:
                        break
            elif admitting:
                while not b.admit(state):
                    if not alive or key(alive[-1]) <= key(state):
                        admitting = False  # nothing ranked lower to make room
                        break
                    b.preempt(alive.pop(), self.preemption)
                else:
                    b.limit_repeat(1)  # conservative: re-plan once the newcomer runs
        if self.starvation is not None:
            self.starvation.record(b)
        return b.build()
