"""The two policy interfaces, their registries, and vLLM's packing loop that most policies share.

* An :class:`InstancePolicy` decides, once per iteration of one engine, what runs: it reads an
  :class:`~llmsched.engine.instance.InstanceView` and returns a
  :class:`~llmsched.engine.plan.BatchPlan`.
* A :class:`Router` decides, across instances, where a new request goes and whether a request
  migrates when it reaches a phase boundary (`</think>`).

Neither knows which surface (simulator, vLLM, gateway) runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from llmsched.engine.plan import BatchBuilder, BatchPlan
from llmsched.engine.state import RequestState

if TYPE_CHECKING:
    from llmsched.cluster.cluster import ClusterView
    from llmsched.engine.instance import InstanceView

Key = Callable[[RequestState], Any]
# A policy's choice of a pin to release for a request that finds no KV (None: none).
Reclaim = Callable[[BatchBuilder, RequestState], "RequestState | None"]


class InstancePolicy:
    """Decides what one engine instance runs in each iteration."""

    name = "base"
    # Engine settings of the policy's paper, used unless the user sets them (e.g. Sarathi: 512).
    engine_defaults: dict[str, Any] = {}
    needs_scores = False  # orders requests by a length predictor's score (Request.score)
    phase_aware = False  # acts on the reasoning/answer boundary (`</think>`)

    def __init__(self, preemption: str = "recompute") -> None:
        self.preemption = preemption

    def waiting_key(self, state: RequestState) -> Any:
        """Order of the waiting queue (lower first), fixed when a request is queued."""
        return state.arrival

    def schedule(self, view: InstanceView) -> BatchPlan:
        raise NotImplementedError

    # Lifecycle callbacks for policies that keep state.
    def on_preempt(self, state: RequestState, view: InstanceView) -> None:
        pass

    def on_phase_change(self, state: RequestState, view: InstanceView) -> None:
        pass

    def on_finish(self, state: RequestState, view: InstanceView) -> None:
        pass

    def pin_until(self, state: RequestState, view: InstanceView) -> float | None:
        """A request has finished: None frees its KV blocks now; a time *pins* them (they stay
        referenced, `view.pins`) until a plan releases the pin (`BatchBuilder.release`)."""
        return None


class Router:
    """Decides where requests go across instances."""

    name = "base"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # for routers that draw at random

    def route(self, state: RequestState, cluster: ClusterView) -> int:
        raise NotImplementedError

    def on_phase_change(self, state: RequestState, source: int, cluster: ClusterView) -> int:
        """Where a request that just produced `</think>` should continue; `source` = stay."""
        return source


def pack_in_order(
    view: InstanceView,
    *,
    mode: str,
    key: Key | None = None,
    sort_running: bool = False,
    preempt_for_waiting: bool = False,
    admit_waiting: bool = True,
    builder: BatchBuilder | None = None,
    running: list[RequestState] | None = None,
    waiting: Iterable[RequestState] | None = None,
    reclaim: Reclaim | None = None,
) -> BatchBuilder:
    """vLLM V1's scheduling loop, ordered by `key` (None = FCFS).

    Running requests are served first (in admission order, or by `key` when `sort_running`);
    one that cannot get KV preempts the running request that comes last (by `key`, or the most
    recently admitted), possibly itself, and if it preempted itself no further running request
    is served this step. If nothing was preempted, waiting requests are admitted in queue order
    until one does not fit (`BatchBuilder.admit`). This is vLLM 0.32's `Scheduler.schedule`
    (tests/test_vllm_differential.py runs both). With `preempt_for_waiting` (vLLM v0.6's
    priority preemption), a waiting request that does not fit preempts running requests with a
    worse key, worst first, until it fits. `admit_waiting=False` stops after the running
    requests. `running`: the running requests already in `key` order (a policy that computed
    the keys anyway saves sorting by calling `key` again). `waiting`: the waiting requests in
    the order to admit them (default: the queue's). `reclaim(b, state)`: called when `state`
    finds no KV (a running request that cannot grow, or a waiting one that does not fit), it
    names a pin to release first (Continuum), or None: preempt or stop as above.
    """
    b = builder or BatchBuilder(view)
    if running is None:
        running = sorted(view.running, key=key) if sort_running and key else view.running
    # Still running, in order: the candidates for preemption (made at the first preemption).
    alive: dict[RequestState, None] | None = None

    def candidates() -> dict[RequestState, None]:
        nonlocal alive
        if alive is None:
            alive = dict.fromkeys(running)
        return alive

    def worst() -> RequestState:
        order = candidates()
        return next(reversed(order)) if key is None else max(order, key=key)

    for state in running:
        if not b.budget:
            break
        if (alive is not None and state not in alive) or (
            state.computed == state.prompt_tokens + state.generated
        ):
            # Preempted earlier in this loop; or nothing to compute, its last token in flight
            # (vLLM's async scheduling; never in the simulator): vLLM skips it, seat and KV held.
            continue
        # vLLM sizes the request's tokens once, on the budget left now: a victim served
        # earlier this step gives its tokens back to the budget, but not to this request.
        budget = b.budget
        if b.schedule(state):
            continue
        victim = None
        while True:  # no KV for it: preempt from the back, until it fits or it is the victim
            pin = reclaim(b, state) if reclaim is not None else None
            if pin is not None:  # the policy releases a pin instead
                b.release(pin)
            else:
                victim = worst()
                del alive[victim]
                b.preempt(victim, mode)
                if victim is state:
                    break
            if b.schedule(state, budget):
                break
        if victim is state:
            break  # it preempted itself: vLLM serves no running request after it this step
    if not admit_waiting or (b.preempted and not preempt_for_waiting):
        return b
    for state in view.waiting if waiting is None else waiting:
        if b.budget_left == 0:
            break
        while not b.admit(state):
            if reclaim is not None and b.seqs_left > 0:  # it found no KV: a pin may go
                pin = reclaim(b, state)
                if pin is not None:
                    b.release(pin)
                    continue
            if not preempt_for_waiting or key is None:
                return b
            worse = [r for r in candidates() if key(r) > key(state)]
            if not worse:
                return b
            victim = max(worse, key=key)
            del alive[victim]
            b.preempt(victim, mode)
        if sort_running:
            # Next iteration the newcomer is sorted among the running requests, possibly ahead
            # of those served before it this time: the plan is not repeatable.
            b.limit_repeat(1)
    return b


# --- registries (a user selects policies by name) -------------------------------------------------
INSTANCE_POLICIES: dict[str, type[InstancePolicy]] = {}
ROUTERS: dict[str, type[Router]] = {}


def register(cls):
    """Class decorator: make a policy or router selectable by its `name`."""
    registry = ROUTERS if issubclass(cls, Router) else INSTANCE_POLICIES
    registry[cls.name] = cls
    return cls


def _lookup(registry: dict, kind: str, name: str):
    import llmsched.policies  # noqa: F401  (importing the package registers every policy)

    if name not in registry:
        import difflib

        close = difflib.get_close_matches(name, registry, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}.{hint}")
    return registry[name]


def policy_class(name: str) -> type[InstancePolicy]:
    return _lookup(INSTANCE_POLICIES, "policy", name)


def router_class(name: str) -> type[Router]:
    return _lookup(ROUTERS, "router", name)


def describe(cls) -> str:
    """The first sentence of a class's docstring, on one line (`llmsched list`)."""
    paragraph = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]
