"""PASCAL: phase-aware scheduling of reasoning models (Cho, Bang, Hwang, Rhu; HPCA 2026).

A reasoning request runs prefill → reasoning (hidden) → answering (streamed to the user). Its
TTFT is the first *answer* token, so the reasoning phase is what the user waits for; once the
answer streams, the user reads at about 10 tokens/s and any faster output is slack.

Inside an instance (:class:`Pascal`):

* a high-priority (HP) queue of reasoning requests and a low-priority (LP) queue of answering
  requests, each round-robin with a token quantum (500);
* HP requests have first claim on KV memory: they preempt LP requests (swapped to host memory),
  never the reverse;
* a reasoning request that has produced more than 5,000 reasoning tokens is demoted to LP, so
  one long chain of thought cannot hold HP memory forever.

Across instances (:class:`PascalRouter`), using each instance's *pacer status* (do all of its
answering requests keep pace with their reader? :class:`AnswerPacer`):

* Algorithm 1, a new request: among SLO-compliant instances the one with the smallest KV
  footprint (GPU + swapped); if none is compliant, among all;
* Algorithm 2, at `</think>`: among compliant instances the one with the fewest reasoning
  requests; if none, the fewest reasoning + fresh answering requests (those within their first
  quantum);
* adaptive migration: stay when the current instance has room for the answer and the target has
  not; otherwise move the KV to the target (100 Gb/s link; the request waits meanwhile).

Where the paper is silent (docs/pascal.md lists each choice): the pacer status is instantaneous
and any one lagging answer makes an instance non-compliant; "room for the answer" means free KV
blocks for one quantum of answer tokens (plus, at the target, the request's own KV); ties go to
the smaller KV footprint, then the lower index; demotion counts reasoning tokens generated; a
quantum restarts when a request changes queue; prefill is chunked as in vLLM V1 and a new
request's prefill runs in the HP queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmsched.engine.kv import blocks_for
from llmsched.engine.plan import BatchPlan, pack_in_order
from llmsched.engine.state import RequestState
from llmsched.metrics.qoe import PASCAL_ANSWER_SLO, AnswerSLO, qoe_terms
from llmsched.policies.base import InstancePolicy, Router, register

if TYPE_CHECKING:
    from llmsched.cluster.cluster import ClusterView
    from llmsched.engine.instance import InstanceView

QUANTUM = 500  # tokens, both queues (and the phase-agnostic RR baseline)
DEMOTE_AFTER = 5000  # reasoning tokens


def is_answering(state: RequestState) -> bool:
    """In the answering phase: `</think>` generated (requests without reasoning never are)."""
    return 0 < state.reasoning_tokens <= state.generated


def is_high_priority(state: RequestState) -> bool:
    """In PASCAL's HP queue: reasoning (prefill included) and not demoted."""
    return state.in_reasoning and not state.policy_data.get("demoted", False)


@register
class Pascal(InstancePolicy):
    """PASCAL's intra-instance scheduler: reasoning (HP) before answering (LP), each round-robin
    with a token quantum; HP preempts LP by swapping; long reasoning is demoted to LP."""

    name = "pascal"
    phase_aware = True

    def __init__(
        self, preemption: str = "swap", quantum: int = QUANTUM, demote_after: int = DEMOTE_AFTER
    ) -> None:
        super().__init__(preemption)
        if quantum < 1 or demote_after < 1:
            raise ValueError(
                f"quantum and demote_after must be >= 1 token, got {quantum}, {demote_after}"
            )
        self.quantum = quantum
        self.demote_after = demote_after
        self._requeued = 0

    def key(self, state: RequestState):
        """(queue, position): HP before LP; in a queue, when the request last joined its back."""
        return self.key_in(state, is_high_priority(state))

    def key_in(self, state: RequestState, high: bool):
        """The key of a request known to be in HP (`high`) or in LP."""
        return (0 if high else 1, state.policy_data.get("rr", (state.arrival, 0)))

    def waiting_key(self, state: RequestState):
        return self.key(state)

    def _to_back(self, state: RequestState, now: float) -> None:
        """Send a request to the back of its queue with a fresh quantum."""
        self._requeued += 1
        state.policy_data["rr"] = (now, self._requeued)
        state.policy_data["q0"] = state.generated

    def schedule(self, view: InstanceView) -> BatchPlan:
        quantum, demote_after = self.quantum, self.demote_after
        left = quantum  # iterations until the first quantum is spent or a demotion is due
        keys = {}
        for state in view.running:
            high = is_high_priority(state)
            if high and state.generated >= demote_after:
                state.policy_data["demoted"] = True
                self._to_back(state, view.now)
                high = False
            used = state.generated - state.policy_data.get("q0", 0)
            if used >= quantum:
                self._to_back(state, view.now)
                used = 0
            if quantum - used < left:
                left = quantum - used
            if high and state.generated > 0 and demote_after - state.generated < left:
                left = demote_after - state.generated
            keys[state] = self.key_in(state, high)
        b = pack_in_order(
            view,
            mode=self.preemption,
            key=self.key,
            sort_running=True,
            preempt_for_waiting=True,
            running=sorted(keys, key=keys.__getitem__),
        )
        b.limit_repeat(left)  # replan when a quantum is spent or a request is due for demotion
        return b.build()

    def on_phase_change(self, state: RequestState, view: InstanceView) -> None:
        self._to_back(state, view.now)  # `</think>`: HP → back of LP, with a new quantum


# --- the pacer: how far each answer is ahead of (or behind) its reader -----------------------
class AnswerPacer:
    """Online view of each answering request's stream against its reader (metrics/qoe.py).

    Tokens generated ahead of the reader wait in a buffer; the request's *slack* is how long
    the reader can go on before the buffer runs dry (negative: the reader is stalled now). An
    answer keeps pace while its slack is non-negative and its QoE so far meets the SLO. The
    state per request is folded incrementally, so each look costs only the new tokens.
    """

    def __init__(self, slo: AnswerSLO = PASCAL_ANSWER_SLO) -> None:
        self.slo = slo

    def _fold(self, state: RequestState, view: InstanceView) -> dict:
        p = state.policy_data.get("pacer")
        if p is None:
            (t_s,) = view.token_times(state, state.reasoning_tokens - 1)[:1]
            p = state.policy_data["pacer"] = {
                "t_s": float(t_s),  # the `</think>` token
                "n": 0,  # answer tokens folded in
                "last": float("-inf"),  # when the reader consumed the last of them
                "delay": 0.0,
                "whole": 0.0,
            }
        if state.generated - state.reasoning_tokens > p["n"]:
            gen = view.token_times(state, state.reasoning_tokens + p["n"])
            delay, whole, p["last"] = qoe_terms(gen, p["t_s"], self.slo, p["n"], p["last"])
            p["delay"] += delay
            p["whole"] += whole
            p["n"] += len(gen)
        return p

    def _due(self, p: dict) -> float:
        return p["t_s"] + self.slo.ttfat if p["n"] == 0 else p["last"] + self.slo.tpot

    def deadline(self, state: RequestState, view: InstanceView) -> float:
        """When the reader of this answer next waits for a token: the pacer's buffer runs dry."""
        return self._due(self._fold(state, view))

    def keeps_pace(self, state: RequestState, view: InstanceView, now: float) -> bool:
        """At `now` the reader is not waiting for a token and the QoE so far meets the SLO."""
        p = self._fold(state, view)
        qoe = 1.0 - p["delay"] / p["whole"] if p["whole"] > 0 else 1.0
        return qoe >= self.slo.min_qoe and self._due(p) >= now

    def instance_ok(self, view: InstanceView, now: float) -> bool:
        """PASCAL's t_i at `now` (the cluster's clock: an instance's own clock stays at the
        start of the span it is running): every answering request on it keeps pace."""
        return all(self.keeps_pace(s, view, now) for s in view.requests() if is_answering(s))


@register
class PascalSlack(Pascal):
    """PASCAL with slack-paced answers (llmsched's improvement): the LP queue is ordered by each
    answer's reader deadline (its pacer buffer), so the answer about to stall runs first and the
    one with the most buffered tokens is preempted first."""

    name = "pascal-slack"

    def __init__(
        self,
        preemption: str = "swap",
        quantum: int = QUANTUM,
        demote_after: int = DEMOTE_AFTER,
        refresh: int = 16,
        ttfat: float = 0.25,
        tpot: float = 0.1,
    ) -> None:
        super().__init__(preemption, quantum, demote_after)
        if refresh < 1:
            raise ValueError(f"refresh must be >= 1 iteration, got {refresh}")
        self.refresh = refresh
        self.pacer = AnswerPacer(AnswerSLO(ttfat, tpot))
        self._next_refresh = 0

    def key_in(self, state: RequestState, high: bool):
        """HP: round-robin position. LP: the reader's deadline, else (no answer yet) RR time."""
        if high:
            return super().key_in(state, high)
        data = state.policy_data
        return (1, (data.get("deadline", data.get("rr", (state.arrival, 0))[0]), 0))

    def _set_deadline(self, state: RequestState, view: InstanceView) -> None:
        if is_answering(state):
            state.policy_data["deadline"] = self.pacer.deadline(state, view)

    def schedule(self, view: InstanceView) -> BatchPlan:
        # Running answers' deadlines move as they generate; refreshing them on a fixed
        # iteration clock (not at every look) keeps the plan the same whether the engine
        # replays iterations one by one or as a span.
        if view.iterations >= self._next_refresh:
            for state in view.running:
                self._set_deadline(state, view)
            self._next_refresh = view.iterations + self.refresh
        plan = super().schedule(view)
        plan.repeat = min(plan.repeat, self._next_refresh - view.iterations)
        return plan

    def on_phase_change(self, state: RequestState, view: InstanceView) -> None:
        super().on_phase_change(state, view)
        self._set_deadline(state, view)

    def on_preempt(self, state: RequestState, view: InstanceView) -> None:
        self._set_deadline(state, view)  # a swapped-out answer's deadline no longer moves


# --- cluster level ---------------------------------------------------------------------------
MIGRATION_MODES = ("adaptive", "always", "never")


@register
class PascalRouter(Router):
    """PASCAL's instance-level scheduler: Algorithm 1 for new requests, Algorithm 2 with
    adaptive migration at `</think>` (migration: adaptive | always | never)."""

    name = "pascal"

    def __init__(
        self,
        seed: int = 0,
        migration: str = "adaptive",
        quantum: int = QUANTUM,
        ttfat: float = 0.25,
        tpot: float = 0.1,
        min_qoe: float = 0.95,
    ) -> None:
        super().__init__(seed)
        if migration not in MIGRATION_MODES:
            raise ValueError(f"migration must be one of {MIGRATION_MODES}, got {migration!r}")
        self.migration = migration
        self.quantum = quantum
        self.pacer = AnswerPacer(AnswerSLO(ttfat, tpot, min_qoe))

    def _views(self, cluster: ClusterView) -> list[InstanceView]:
        return [cluster.instance(i).view for i in range(cluster.num_instances)]

    def _compliant(self, views: list[InstanceView], now: float) -> list[int]:
        return [v.index for v in views if self.pacer.instance_ok(v, now)]

    def route(self, state: RequestState, cluster: ClusterView) -> int:
        """Algorithm 1: the smallest KV footprint among SLO-compliant instances (else all)."""
        views = self._views(cluster)
        candidates = self._compliant(views, cluster.now) or range(len(views))
        return min(candidates, key=lambda i: (cluster.kv_footprint(i), i))

    def on_phase_change(self, state: RequestState, source: int, cluster: ClusterView) -> int:
        if self.migration == "never":
            return source
        views = self._views(cluster)
        target = self._answer_target(views, cluster)
        if target == source:
            return source
        if (
            self.migration == "adaptive"
            and self._has_room(views[source], state, moving=False)
            and not self._has_room(views[target], state, moving=True)
        ):
            return source  # the answer fits where it is and not there: spare the transfer
        return target

    def _answer_target(self, views: list[InstanceView], cluster: ClusterView) -> int:
        """Algorithm 2: the fewest reasoning requests among compliant instances; if none is
        compliant, the fewest reasoning + fresh answering requests."""

        def load(i: int, fresh: bool) -> tuple:
            n = 0
            for s in views[i].requests():
                if is_high_priority(s):
                    n += 1
                elif fresh and is_answering(s) and s.generated - s.reasoning_tokens < self.quantum:
                    n += 1
            return (n, cluster.kv_footprint(i), i)

        compliant = self._compliant(views, cluster.now)
        if compliant:
            return min(compliant, key=lambda i: load(i, fresh=False))
        return min(range(len(views)), key=lambda i: load(i, fresh=True))

    def _has_room(self, view: InstanceView, state: RequestState, *, moving: bool) -> bool:
        """Free KV for one quantum of answer tokens (and, at a target, the request's own KV)."""
        need = blocks_for(self.quantum, view.config.block_size)
        if moving:
            need += state.blocks + state.cpu_blocks
        return view.kv.free >= need
