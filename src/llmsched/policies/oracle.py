"""Oracle shortest-job-first and shortest-remaining-first: the bounds learned rankers aim at.

They read the true output length, which no deployment knows: they show how much a perfect
length predictor could buy.
"""

from __future__ import annotations

from llmsched.engine.plan import BatchPlan, pack_in_order
from llmsched.engine.state import RequestState
from llmsched.policies.base import InstancePolicy, register


@register
class OracleSJF(InstancePolicy):
    """Oracle SJF: waiting requests by true output length, shortest first; no preemption for it."""

    name = "sjf"

    def key(self, state: RequestState):
        return (state.output_tokens, state.arrival)

    def waiting_key(self, state: RequestState):
        return self.key(state)

    def schedule(self, view) -> BatchPlan:
        return pack_in_order(view, mode=self.preemption, key=self.key).build()


@register
class OracleSRPT(InstancePolicy):
    """Oracle SRPT: fewest remaining output tokens first, preempting requests with more left."""

    name = "srpt"

    def key(self, state: RequestState):
        return (state.output_tokens - state.generated, state.arrival)

    def waiting_key(self, state: RequestState):
        return self.key(state)

    def schedule(self, view) -> BatchPlan:
        return pack_in_order(
            view, mode=self.preemption, key=self.key, sort_running=True, preempt_for_waiting=True
        ).build()
