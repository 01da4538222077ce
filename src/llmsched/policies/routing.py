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
    """Fewest outstanding (running + waiting) requests; ties to the lowest index.

    Behind the gateway (`llmsched serve gateway`) this is also "least loaded from scraped
    /metrics": there `outstanding` is the larger of the gateway's own requests in flight on a
    backend and its scraped ``vllm:num_requests_running + vllm:num_requests_waiting``.
    """

    name = "least-outstanding"

    def route(self, state: RequestState, cluster) -> int:
        loads = cluster.loads()
        return loads.index(min(loads))  # the first of the least loaded


@register
class LeastKVRouter(Router):
    """Lowest KV-cache usage (GPU blocks in use, plus those swapped out), ties by load."""

    name = "least-kv"

    def route(self, state: RequestState, cluster) -> int:
        return min(
            range(cluster.num_instances),
            key=lambda i: (cluster.kv_footprint(i), cluster.outstanding(i), i),
        )


@register
class PrefixAffinityRouter(Router):
    """Prefix cache hits traded against load, with one exchange rate (beta).

    score_i = matched_i / prompt_tokens − beta · (load_i − mean_load) / max(1, mean_load); the
    highest score wins, ties to the lowest index.

    matched_i is `cluster.prefix_match(i, state)` (prompt tokens whose KV instance i is believed
    to hold) and load_i is `cluster.outstanding(i)`. Routing by cache hits alone sends every
    request with a hot prefix (a shared system prompt, a long conversation) to the one worker
    that holds it until it drowns (production-stack's `kvaware`, SGLang's cache-aware "death
    spiral"); the load term, relative to the mean, is the single exchange rate between a full
    prefix hit and being one mean load above the others. beta = 1.0 as production-stack's
    `loadaware` (PR #1035); beta = 0 is cache affinity alone.
    """

    name = "prefix-affinity"

    def __init__(self, seed: int = 0, beta: float = 1.0) -> None:
        super().__init__(seed)
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def route(self, state: RequestState, cluster) -> int:
        n = cluster.num_instances
        loads = cluster.loads()
        mean = sum(loads) / n
        scale = max(1.0, mean)
        prompt = max(1, state.prompt_tokens)

        def score(i: int) -> float:
            hit = cluster.prefix_match(i, state) / prompt
            return hit - self.beta * (loads[i] - mean) / scale

        return max(range(n), key=lambda i: (score(i), -i))
