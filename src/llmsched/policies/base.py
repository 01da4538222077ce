"""The two policy interfaces and their registries.

* An :class:`InstancePolicy` decides, once per iteration of one engine, what runs: it reads an
  :class:`~llmsched.engine.instance.InstanceView` and returns a
  :class:`~llmsched.engine.plan.BatchPlan`.
* A :class:`Router` decides, across instances, where a new request goes and whether a request
  migrates when it reaches a phase boundary (`</think>`).

Neither knows which surface (simulator, vLLM, gateway) runs it. Most policies pack their plan
with vLLM's scheduling loop in the order they choose (:func:`~llmsched.engine.plan.pack_in_order`,
part of the engine's mechanics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmsched.engine.plan import BatchPlan
from llmsched.engine.state import RequestState

if TYPE_CHECKING:
    from llmsched.cluster.cluster import ClusterView
    from llmsched.engine.instance import InstanceView


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
