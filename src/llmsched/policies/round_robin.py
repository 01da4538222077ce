"""Round-robin with a token quantum (the phase-agnostic baseline of PASCAL).

Requests are served in queue order. A request that has generated `quantum` tokens since it was
last (re)queued goes to the back of the queue; when KV runs short, the request at the back is
preempted so that requests ahead of it run. New arrivals join the back.
"""

from __future__ import annotations

from llmsched.engine.plan import BatchPlan, pack_in_order
from llmsched.engine.state import RequestState
from llmsched.policies.base import InstancePolicy, register


@register
class RoundRobin(InstancePolicy):
    """Round-robin over requests with a token quantum (default 500); preempts the queue's back."""

    name = "rr"

    def __init__(self, preemption: str = "recompute", quantum: int = 500) -> None:
        super().__init__(preemption)
        if quantum < 1:
            raise ValueError(f"round-robin quantum must be >= 1 token, got {quantum}")
        self.quantum = quantum
        self._requeued = 0

    def key(self, state: RequestState):
        """Position in the round-robin queue: when it last joined the back."""
        return state.policy_data.get("rr", (state.arrival, 0))

    def waiting_key(self, state: RequestState):
        return self.key(state)

    def schedule(self, view) -> BatchPlan:
        quantum = self.quantum
        left = quantum  # iterations until the first running quantum is spent
        for state in view.running:
            data = state.policy_data
            used = state.generated - data.get("q0", 0)
            if used >= quantum:  # quantum spent: back of the queue
                self._requeued += 1
                data["rr"] = (view.now, self._requeued)
                data["q0"] = state.generated
                used = 0
            if quantum - used < left:
                left = quantum - used
        b = pack_in_order(
            view, mode=self.preemption, key=self.key, sort_running=True, preempt_for_waiting=True
        )
        b.limit_repeat(left)  # ask again when the first running quantum is spent
        return b.build()
