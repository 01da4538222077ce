"""The gateway's view of its backends for llmsched's routers: the same contract as the
simulator's :class:`~llmsched.cluster.cluster.ClusterView`, built from what a proxy can know.

* A :class:`Mirror` per backend: an :class:`~llmsched.engine.instance.EngineState` holding the
  gateway's in-flight requests there (waiting until their first token arrives, then running),
  whose ``generated`` advances as tokens stream back, with each token's arrival time logged in
  the mirror's iteration log. So PASCAL's pacer reads a real answer stream as it reads a
  simulated one.
* A :class:`PrefixIndex`: the hash chains of the 16-token blocks of the prompts the gateway
  sent to each backend, LRU-bounded: its guess of what each server's prefix cache holds.
* :class:`GatewayView`: what one routing decision sees. Only routable backends (healthy, circuit
  not open) are in it, renumbered 0..n-1, so a router can never choose one that is down.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from llmsched.engine.config import EngineConfig
from llmsched.engine.instance import EngineState, InstanceView, IterationLog
from llmsched.engine.kv import blocks_for
from llmsched.engine.state import RequestState, Status
from llmsched.integrations.serve.backends import Backend
from llmsched.policies.base import InstancePolicy
from llmsched.workload.request import Request

BLOCK = 16  # tokens per hashed prefix block (vLLM's default KV block size)
#: KV blocks assumed on a backend whose /metrics does not say (no cache_config_info): so many
#: that its free KV never decides a routing choice.
UNKNOWN_BLOCKS = 1 << 30


def block_hashes(tokens: Sequence[str] | Sequence[int], block: int = BLOCK) -> list[int]:
    """The chain of hashes of the prompt's full blocks: hash k covers tokens [0, (k+1)·block),
    so equal hashes mean equal prefixes (as vLLM's prefix cache keys its blocks)."""
    out, h = [], 0
    for start in range(0, len(tokens) - block + 1, block):
        h = hash((h, tuple(tokens[start : start + block])))
        out.append(h)
    return out


class PrefixIndex:
    """Per backend, the block hashes of the prompts sent there, the `capacity` most recently
    used kept (an LRU stands in for the server's own eviction, which the gateway cannot see)."""

    def __init__(self, num_backends: int, capacity: int = 1 << 16) -> None:
        if capacity < 1:
            raise ValueError(f"the prefix index needs a capacity >= 1 block, got {capacity}")
        self.capacity = capacity
        self._blocks: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_backends)]

    def match(self, backend: int, hashes: Sequence[int]) -> int:
        """How many leading blocks of the chain `backend` holds."""
        held = self._blocks[backend]
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def insert(self, backend: int, hashes: Sequence[int]) -> None:
        held = self._blocks[backend]
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)


class ProxiedState(RequestState):
    """A request the gateway relays, as a router sees it, with its prompt's block hashes."""

    __slots__ = ("hashes",)

    def __init__(self, request: Request, hashes: list[int]) -> None:
        super().__init__(request)
        self.hashes = hashes


class Mirror(EngineState):
    """The gateway's requests on one backend. Its `index` is the backend's (token times stay
    valid across failovers and migrations); `logs` is every mirror's log, shared."""

    def __init__(self, index: int, logs: list[IterationLog]) -> None:
        super().__init__(index, EngineConfig(num_blocks=UNKNOWN_BLOCKS), InstancePolicy())
        self._logs = logs
        logs.append(self.log)

    @property
    def logs(self) -> list[IterationLog]:
        return self._logs


class Mirrors:
    """One mirror per backend and the requests in flight through the gateway."""

    COMPACT_AT = 1 << 16  # log entries before old, unreferenced ones are dropped

    def __init__(self, num_backends: int) -> None:
        self.logs: list[IterationLog] = []
        self.mirrors = [Mirror(i, self.logs) for i in range(num_backends)]
        self.live: set[ProxiedState] = set()
        self._compact_at = [self.COMPACT_AT] * num_backends

    def add(self, state: ProxiedState, backend: int, now: float) -> None:
        """The request was sent to `backend`: waiting there until its first token."""
        mirror = self.mirrors[backend]
        mirror.now = now
        self.live.add(state)
        state.computed = 0
        mirror.enqueue(state)

    def tokens(self, state: ProxiedState, count: int, now: float) -> None:
        """`count` tokens of `state` arrived at `now` from its backend."""
        mirror = self.mirrors[state.instance]
        mirror.now = now
        if state.status is Status.WAITING:
            mirror.dequeue(state)
            state.status = Status.RUNNING
            state.first_scheduled = now
            mirror.running.append(state)
        log = mirror.log
        first = log.append(now) if count == 1 else log.extend(np.full(count, now))
        mirror.record_tokens(state, first, count)
        state.generated += count
        state.computed = state.prompt_tokens + state.generated - 1
        state.blocks = blocks_for(state.computed, mirror.config.block_size)

    def remove(self, state: ProxiedState, *, finished: bool) -> None:
        """The request left its backend: finished, failed, or moving to another."""
        mirror = self.mirrors[state.instance]
        if state.status is Status.RUNNING:
            mirror.running.remove(state)
        elif state.queue_entry is not None:
            mirror.dequeue(state)
        state.status = Status.FINISHED if finished else Status.MIGRATING
        state.blocks = 0
        if finished:
            self.live.discard(state)
            if mirror.log.size >= self._compact_at[mirror.index]:
                self._compact(mirror.index)

    def _compact(self, backend: int) -> None:
        """Drop the log entries of `backend` that no live request's tokens refer to."""
        log = self.logs[backend]
        low = log.size
        for state in self.live:
            seg = state.segments
            for k in range(0, len(seg), 3):
                if seg[k] == backend:
                    low = min(low, seg[k + 1])
        if low > 0:
            log.data[: log.size - low] = log.data[low : log.size]
            log.size -= low
            for state in self.live:
                seg = state.segments
                for k in range(0, len(seg), 3):
                    if seg[k] == backend:
                        seg[k + 1] -= low
        self._compact_at[backend] = max(self.COMPACT_AT, 2 * log.size)

    def sync_kv(self, backend: Backend) -> None:
        """The mirror's KV from the backend's scrape: its blocks and block size when it says,
        blocks in use as the scrape says or as the gateway's own requests need, if more."""
        mirror = self.mirrors[backend.index]
        s = backend.scraped
        size = s.block_size or BLOCK
        blocks = s.num_gpu_blocks or UNKNOWN_BLOCKS
        if mirror.config.block_size != size or mirror.config.num_blocks != blocks:
            mirror.config = dataclasses.replace(mirror.config, block_size=size, num_blocks=blocks)
            mirror.kv.num_blocks, mirror.kv.block_size = blocks, size
        own = sum(blocks_for(r.computed, size) for r in mirror.running)
        scraped = int(round(s.kv_usage * blocks)) if s.kv_usage is not None else 0
        if s.num_gpu_blocks is None:
            scraped = 0  # a usage fraction of an unknown total says nothing in blocks
        mirror.kv.used = min(blocks, max(own, scraped))


class _MappedView(InstanceView):
    """A mirror's view under the index the router knows it by (its place among the routable)."""

    __slots__ = ("_index",)

    def __init__(self, mirror: Mirror, index: int) -> None:
        super().__init__(mirror)
        self._index = index

    @property
    def index(self) -> int:
        return self._index


@dataclasses.dataclass(frozen=True)
class _Instance:
    """What `GatewayView.instance(i)` gives: the view a cluster policy reads, and the backend."""

    view: InstanceView
    backend: Backend


class GatewayView:
    """A :class:`ClusterView` over the routable backends, renumbered 0..n-1 (`backends[i]` is
    router index i). Built for one decision: loads are read when asked."""

    def __init__(
        self,
        backends: Sequence[Backend],
        mirrors: Mirrors,
        prefixes: PrefixIndex,
        now: float,
    ) -> None:
        self.backends = list(backends)
        self._mirrors = mirrors
        self._prefixes = prefixes
        self._now = now
        for b in self.backends:
            mirrors.sync_kv(b)
            mirrors.mirrors[b.index].now = now

    @property
    def num_instances(self) -> int:
        return len(self.backends)

    @property
    def now(self) -> float:
        return self._now

    def _mirror(self, i: int) -> Mirror:
        return self._mirrors.mirrors[self.backends[i].index]

    def instance(self, i: int) -> _Instance:
        return _Instance(_MappedView(self._mirror(i), i), self.backends[i])

    def outstanding(self, i: int) -> int:
        """Requests running or waiting on backend i: the gateway's own in flight there, or the
        scraped ``num_requests_running + num_requests_waiting`` when larger. The gateway's count
        is exact and current but misses other clients of the server; the scrape sees every
        client but is one scrape interval old and misses what the gateway sent since. Each
        undercounts in its own way, so the larger is the better estimate of the two."""
        b = self.backends[i]
        s = b.scraped
        scraped = (s.running or 0) + (s.waiting or 0)
        return max(b.in_flight, scraped)

    def loads(self) -> list[int]:
        """`outstanding` of every backend, in router index order."""
        return [self.outstanding(i) for i in range(len(self.backends))]

    def num_running(self, i: int) -> int:
        """The gateway's requests with a token back, or the scraped running count if larger."""
        return max(len(self._mirror(i).running), self.backends[i].scraped.running or 0)

    def kv_footprint(self, i: int) -> int:
        """KV blocks in use on backend i (scraped usage × blocks, or what the gateway's own
        requests hold if more; the gateway cannot see a server's swapped-out blocks)."""
        return self._mirror(i).kv.used

    def kv_free(self, i: int) -> int:
        return self._mirror(i).kv.free

    def prefix_match(self, i: int, state: RequestState) -> int:
        """Prompt tokens of `state` in blocks the gateway sent to backend i before (its guess
        of the server's prefix cache)."""
        hashes = getattr(state, "hashes", None)
        if not hashes:
            return 0
        return self._prefixes.match(self.backends[i].index, hashes) * BLOCK
