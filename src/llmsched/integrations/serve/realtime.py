"""llmsched's engine on a real-time clock: the simulator's cluster, fed requests as they arrive
and advanced to the wall clock, so that each token leaves when the simulated engine makes it.

Simulated time runs `time_scale` times faster than the wall clock (1 = real time; tests use
more). The driver sleeps until the next thing that happens (an iteration's end, a span's end,
a new request), advances the cluster to now and hands each request the tokens it made. A
machine that falls behind only delays delivery: the simulated times stay exact, and the tokens
of the iterations missed leave together, as from a real engine whose frontend lagged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llmsched.cluster.cluster import Cluster
from llmsched.engine.instance import token_times
from llmsched.engine.state import RequestState, Status
from llmsched.workload.request import Request


@dataclass
class Tokens:
    """Tokens a request made since the last delivery: their simulated times, and whether the
    request is done."""

    times: np.ndarray
    finished: bool = False


@dataclass
class LiveRequest:
    """A request in the engine, and where its tokens go."""

    state: RequestState
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    delivered: int = 0  # tokens handed to the queue so far


class RealtimeEngine:
    """The cluster's online driver (one asyncio task). `submit` a request and read its queue:
    one :class:`Tokens` per delivery, the last with `finished` set."""

    def __init__(
        self,
        cluster: Cluster,
        time_scale: float = 1.0,
        on_finish: Callable[[RequestState, np.ndarray], None] | None = None,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.cluster = cluster
        self.time_scale = time_scale
        self.on_finish = on_finish  # the request's token times (simulated seconds), for metrics
        self.live: dict[str, LiveRequest] = {}
        self._ids = itertools.count()
        self._t0 = time.perf_counter()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.aborted = 0

    # --- the clock ------------------------------------------------------------------------------
    def now(self) -> float:
        """Simulated seconds since the engine started."""
        return (time.perf_counter() - self._t0) * self.time_scale

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # --- requests -------------------------------------------------------------------------------
    def submit(self, request: Request) -> LiveRequest | str:
        """Queue a request now (its `arrival` is replaced by now); the reason when refused."""
        now = self.now()
        self.cluster.advance_to(now)
        self._deliver()
        state = RequestState(dataclasses.replace(request, arrival=now))
        reason = self.cluster.submit(state, now)
        if reason:
            return reason
        live = self.live[state.request_id] = LiveRequest(state)
        self._wake.set()
        return live

    def abort(self, live: LiveRequest) -> bool:
        """The client went away before the end: free the request's place and KV. False when
        the request had already finished."""
        if self.live.pop(live.state.request_id, None) is None:
            return False
        self.aborted += 1
        now = self.now()
        self.cluster.advance_to(now)
        self.cluster.abort(live.state, now)
        self._wake.set()
        return True

    def new_id(self, prefix: str = "cmpl") -> str:
        return f"{prefix}-{next(self._ids)}"

    @property
    def num_running(self) -> int:
        return sum(len(inst.running) for inst in self.cluster.instances)

    @property
    def num_waiting(self) -> int:
        return sum(len(inst.waiting) for inst in self.cluster.instances)

    @property
    def prefix_cache_counts(self) -> tuple[int, int] | None:
        """(queries, hits) of the prefix cache in tokens, over the instances; None when off."""
        kv = [inst.kv for inst in self.cluster.instances]
        if not all(hasattr(k, "queries") for k in kv):
            return None
        return sum(k.queries for k in kv), sum(k.hits for k in kv)

    @property
    def kv_usage(self) -> float:
        kv = [inst.kv for inst in self.cluster.instances]
        return sum(k.used for k in kv) / sum(k.num_blocks for k in kv)

    # --- the loop -------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self.cluster.advance_to(self.now())
            self._deliver()
            delay = (self.cluster.next_event_time() - self.now()) / self.time_scale
            self._wake.clear()
            if math.isinf(delay):
                await self._wake.wait()
            elif delay > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(0)  # behind: let the streams write what they have

    def _deliver(self) -> None:
        logs = self.cluster.logs
        done = []
        for rid, live in self.live.items():
            state = live.state
            finished = state.status is Status.FINISHED
            if state.generated > live.delivered or finished:
                times = token_times(state, logs, live.delivered)
                live.delivered = state.generated
                live.queue.put_nowait(Tokens(times, finished))
            if finished:
                done.append(rid)
        for rid in done:
            live = self.live.pop(rid)
            if self.on_finish is not None:
                self.on_finish(live.state, token_times(live.state, logs))
