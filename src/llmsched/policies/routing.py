"""Cluster-level routers: where a new request goes."""

from __future__ import annotations

import numpy as np

from llmsched.engine.state import RequestState
from llmsched.policies.base import Router, register


@register
class RoundRobinRouter(Router):
    """Instances in turn."""

    name = "round-robin"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._next = 0

    def route(self, state: RequestState, cluster) -> int:
        index = self._next % cluster.num_instances
        self._next += 1
        return index


@register
class RandomRouter(Router):
    """Uniformly at random (seeded)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._rng = np.random.default_rng(seed)

    def route(self, state: RequestState, cluster) -> int:
        return int(self._rng.integers(cluster.num_instances))


@register
class LeastOutstandingRouter(Router):
    """Fewest outstanding (running + waiting) requests; ties to the lowest index."""

    name = "least-outstanding"

    def route(self, state: RequestState, cluster) -> int:
        loads = [cluster.outstanding(i) for i in range(cluster.num_instances)]
        return int(np.argmin(loads))


@register
class LeastKVRouter(Router):
    """Lowest KV-cache usage (GPU blocks in use, plus those swapped out), ties by load."""

    name = "least-kv"

    def route(self, state: RequestState, cluster) -> int:
        return min(
            range(cluster.num_instances),
            key=lambda i: (cluster.kv_footprint(i), cluster.outstanding(i), i),
        )
