"""Instances together on one event clock: arrivals, routing, iteration spans, migrations.

Events are arrivals (routed when they happen), the end of an instance's span of iterations, and
the delivery of a migrated request's KV. An arrival routed to a busy instance cuts its span at
the iteration in progress, so each instance replans exactly when a real engine would first see
the new request. Every request ends finished or rejected; the run checks it.

Closed loop (agent programs, docs/agents.md): a `closed_loop` turn is not sent at a time of its
own but when its predecessor finishes (the client has its last token) plus the predecessor's
`tool_time`: the finish releases it, one more arrival event. A rejected turn ends its program:
its later turns are recorded as rejected, never run (`PROGRAM_CUT`).
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
from mypy_extensions import mypyc_attr

from llmsched.engine.config import EngineConfig
from llmsched.engine.instance import Instance, Span, token_times
from llmsched.engine.prefix_cache import BlockHasher, PrefixCachingKV, has_prefix_runs
from llmsched.engine.state import RequestState, Status
from llmsched.hardware.latency import LatencyModel
from llmsched.metrics.gaps import LoggedGaps
from llmsched.metrics.qoe import PASCAL_ANSWER_SLO, AnswerSLO
from llmsched.metrics.record import RequestRecord
from llmsched.metrics.summary import RECORDS_BATCH, MetricsCollector
from llmsched.policies.base import InstancePolicy, Router
from llmsched.workload.request import Workload
from llmsched.workload.sessions import PROGRAM_CUT, successors


class ClusterView:
    """What a router sees: per-instance load summaries, as of now."""

    __slots__ = ("_cluster",)

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    @property
    def num_instances(self) -> int:
        return len(self._cluster.instances)

    @property
    def now(self) -> float:
        return self._cluster.now

    def instance(self, i: int) -> Instance:
        """The instance itself (state as of now), for cluster policies that need more."""
        return self._synced(i)

    def outstanding(self, i: int) -> int:
        """Requests running or waiting on instance i (migrations heading there included)."""
        return self._cluster.instances[i].outstanding + self._cluster.inbound[i]

    def loads(self) -> list[int]:
        """`outstanding` of every instance, in index order (a router reads them all at each
        arrival: one call, not one per instance)."""
        c = self._cluster
        return [len(i.running) + i.num_waiting + b for i, b in zip(c.instances, c.inbound)]

    def num_running(self, i: int) -> int:
        return len(self._cluster.instances[i].running)

    def kv_footprint(self, i: int) -> int:
        """KV blocks of instance i's requests: on its GPU plus swapped out to its host."""
        kv = self._synced(i).kv
        return kv.used + kv.cpu_used

    def kv_free(self, i: int) -> int:
        return self._synced(i).kv.free

    def prefix_match(self, i: int, state: RequestState) -> int:
        """Prompt tokens of `state` whose KV instance i holds already: the hit its prefix cache
        would give it now (0 without a cache)."""
        kv = self._synced(i).kv
        if not kv.caching:
            return 0
        return len(cast(PrefixCachingKV, kv).lookup(state)) * kv.block_size

    def _synced(self, i: int) -> Instance:
        """Instance i with its state brought to now (it may be in the middle of a span)."""
        inst = self._cluster.instances[i]
        inst.sync(self._cluster.now)
        return inst


@dataclass
class RunStats:
    """How the simulation itself went (not the served requests' metrics)."""

    wall_seconds: float = 0.0
    steps: int = 0  # policy decisions (spans)
    iterations: int = 0  # engine iterations simulated
    preemptions: int = 0
    swap_bytes: float = 0.0
    migrations: int = 0
    migration_seconds: list[float] = field(default_factory=list)
    busy_fraction: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        mig = np.asarray(self.migration_seconds)
        return {
            "sim_wall_seconds": round(self.wall_seconds, 3),
            "sim_steps": self.steps,
            "sim_iterations": self.iterations,
            "total_swap_gb": round(self.swap_bytes / 1e9, 3),
            "p99_migration_ms": float(np.percentile(mig, 99) * 1e3) if len(mig) else None,
            "mean_instance_busy_fraction": (
                float(np.mean(self.busy_fraction)) if self.busy_fraction else None
            ),
        }


@mypyc_attr(allow_interpreted_subclasses=True)  # (when compiled: setup.py)
class Cluster:
    def __init__(
        self,
        num_instances: int,
        config: EngineConfig,
        policy_factory: Callable[[], InstancePolicy],
        router: Router,
        latency: LatencyModel,
        *,
        link_bandwidth: float = 100e9 / 8,  # bytes/s between instances (100 Gb/s)
        frontend_latency: float = 0.0,  # s the serving stack adds to every token the user sees
        max_concurrency: int | None = None,  # the client's requests in flight at most
        observer: Callable[[Instance, Span], None] | None = None,
        fast_forward: bool = True,
        answer_slo: AnswerSLO = PASCAL_ANSWER_SLO,
    ) -> None:
        if num_instances < 1:
            raise ValueError(f"need at least one instance, got {num_instances}")
        self.config = config
        self.router = router
        self.link_bandwidth = link_bandwidth
        # HTTP, the API server and its IPC: a request reaches an engine this much later than
        # the client sent it, and its tokens the client after the engine made them. Only the
        # sum matters to what the client measures (a constant shift of arrivals changes no
        # decision), so it is added to the token times the metrics see.
        self.frontend_latency = frontend_latency
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        # A client that keeps at most K requests in flight (vllm bench serve --max-concurrency):
        # when each of its K slots is next free. A request is sent at its arrival or, when every
        # slot is taken, once one frees (in arrival order, as asyncio's semaphore wakes its
        # waiters), and is timed from then, as the client times it.
        self._slots = [0.0] * max_concurrency if max_concurrency else None
        self.instances = [
            Instance(i, config, policy_factory(), latency, self, observer, fast_forward)
            for i in range(num_instances)
        ]
        self.logs = [inst.log for inst in self.instances]
        self.inbound = [0] * num_instances  # migrations in flight to each instance
        self.view = ClusterView(self)
        self.now = 0.0
        # ITL gaps read from the iteration logs, not kept one by one (metrics/gaps.py)
        self.collector = MetricsCollector(
            answer_slo, LoggedGaps(self.logs, frontend_latency), batch=RECORDS_BATCH
        )
        self.stats = RunStats()
        self._events: list = []
        self._seq = 0
        self._version = [0] * num_instances
        self._aborted: set[RequestState] = set()  # running requests whose client went away
        self._prefix_runs = False  # whether the workload run has any prefix runs
        # Closed loop: the workload being run, each request's follower index (-1: none), the
        # followers of requests in flight, and the released followers (time, seq, index).
        self._workload: Workload | None = None
        self._follower: np.ndarray | None = None
        self._next_turn: dict[RequestState, int] = {}
        self._released: list[tuple[float, int, int]] = []

    # --- admission control ----------------------------------------------------------------------
    def rejection_reason(self, state: RequestState) -> str | None:
        """Why the request can never run, or None. The reason names the limit, not the
        request's own lengths (its record has them), so that rejections group by reason."""
        cfg = self.config
        total = state.prompt_tokens + state.output_tokens
        if total > cfg.max_model_len:
            return f"prompt + output exceeds max_model_len ({cfg.max_model_len} tokens)"
        if total - 1 > cfg.max_tokens_per_request:
            return (
                f"needs more KV than an instance holds ({cfg.max_tokens_per_request} tokens: "
                "the KV cache is too small for it)"
            )
        return None

    # --- events ---------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload))

    def _schedule_instance(self, inst: Instance, end: float | None) -> None:
        self._version[inst.index] += 1
        if end is not None:
            self._push(end, 0, (inst.index, self._version[inst.index]))

    def _wake(self, inst: Instance, now: float) -> None:
        """Instance `inst` has new work at `now`: start it, or cut its span."""
        if inst.span is None:
            self._schedule_instance(inst, inst.start_step(now))
            self.stats.steps += 1
        else:
            old = inst.span.end
            end = inst.interrupt(now)
            if end != old:
                self._schedule_instance(inst, end)

    def run(self, workload: Workload, *, progress: bool = False) -> MetricsCollector:
        """Serve every request of `workload`; returns the metrics collector."""
        start = time.perf_counter()
        arrivals = workload.arrivals
        n = len(workload)
        self._setup_prefix_cache(workload)
        follower = successors(workload)
        # Requests that arrive at their own times, in arrival order (closed-loop turns are
        # released by their predecessors instead).
        if follower is None:
            order = np.arange(n)
        else:
            order = np.flatnonzero(~workload.columns["closed_loop"])
        m = len(order)
        requests = workload.requests(order)  # (made a block at a time)
        self._workload, self._follower = workload, follower
        released = self._released
        bar = _progress_bar(n, progress)
        done_before = 0
        i = 0
        slots = self._slots
        while i < m or released or self._events:
            t_open = float(arrivals[order[i]]) if i < m else np.inf
            t_next = min(t_open, released[0][0]) if released else t_open
            if slots is not None and (i < m or released):
                t_next = max(t_next, slots[0]) if slots else np.inf
            if self._events and self._events[0][0] < t_next:
                self._next_event()
            else:
                self.now = float(t_next)
                if released and released[0][0] < t_open:
                    sent, _, index = heapq.heappop(released)
                    state = RequestState(replace(workload[index], arrival=sent))
                else:
                    index = int(order[i])
                    state = RequestState(next(requests))
                    i += 1
                if follower is not None and follower[index] >= 0:
                    self._next_turn[state] = int(follower[index])
                if slots is not None:
                    heapq.heappop(slots)
                    state.arrival = self.now  # sent now: the client's clock starts here
                self._arrive(state, self.now)
            if bar is not None and len(self.collector) - done_before >= 256:
                done = len(self.collector)
                bar.update(done - done_before)
                done_before = done
        if bar is not None:
            bar.update(len(self.collector) - done_before)
            bar.close()
        for inst in self.instances:
            inst.release_pins()  # the run is over: KV kept for next turns that never come
        self._check_all_done(n)
        self.stats.wall_seconds = time.perf_counter() - start
        self.collector.prefix_cache = self._prefix_cache_counts()
        for inst in self.instances:
            self.stats.iterations += inst.log.size
            self.stats.preemptions += inst.num_preemptions
            self.stats.swap_bytes += inst.swap_bytes
            self.stats.busy_fraction.append(inst.busy_time / self.now if self.now > 0 else 0.0)
        return self.collector

    def _setup_prefix_cache(self, workload: Workload) -> None:
        """vLLM's prefix cache, when the config has it on and some request of the workload has
        prefix runs. Without any, no request can hit another's blocks, so the cache is left out
        (its one remaining effect, a recompute-preempted request finding its own blocks again,
        is not modelled then): results are those of caching off, at no cost."""
        self._prefix_runs = has_prefix_runs(workload)
        if self.config.enable_prefix_caching and self._prefix_runs:
            hasher = BlockHasher()  # shared: identities agree across instances
            for inst in self.instances:
                inst.use_prefix_cache(hasher)

    def _prefix_cache_counts(self) -> dict:
        """vLLM's prefix-cache counters over the instances (tokens), for the summary."""
        queries = sum(getattr(inst.kv, "queries", 0) for inst in self.instances)
        hits = sum(getattr(inst.kv, "hits", 0) for inst in self.instances)
        return {
            "enabled": self.config.enable_prefix_caching,
            "prefix_runs": self._prefix_runs,
            "queries": queries,
            "hits": hits,
        }

    def _next_event(self) -> None:
        """Handle the earliest event: a span's end, or a migrated request's arrival."""
        t, _, kind, payload = heapq.heappop(self._events)
        self.now = t
        if kind == 0:
            index, version = payload
            if version != self._version[index]:
                return  # superseded by an interrupt
            inst = self.instances[index]
            inst.finish_span()
            if self._aborted:
                self._drop_aborted(inst)
            self._schedule_instance(inst, inst.start_step(t))
            self.stats.steps += 1
        else:
            state, dst = payload
            self.inbound[dst] -= 1
            if state in self._aborted:  # its client left while its KV was in flight
                self._aborted.discard(state)
                state.status = Status.FINISHED
                return
            inst = self.instances[dst]
            inst.enqueue(state)
            self._wake(inst, t)

    # --- online use: requests arrive as the run goes (llmsched's emulated engine) ---------------
    def advance_to(self, t: float) -> None:
        """Handle every event up to time `t`, and bring each instance's requests to `t`."""
        while self._events and self._events[0][0] <= t:
            self._next_event()
        self.now = max(self.now, t)
        for inst in self.instances:
            inst.sync(t)

    def next_event_time(self) -> float:
        """When something next happens: an event, or the end of an iteration in progress
        (tokens appear at each iteration's end); inf when idle."""
        t = self._events[0][0] if self._events else np.inf
        for inst in self.instances:
            span = inst.span
            if span is not None:
                j = bisect_right(span.ends, self.now)
                if j < span.k:
                    t = min(t, span.ends[j])
        return t

    def submit(self, state: RequestState, now: float) -> str | None:
        """A request arrives at `now` (after `advance_to(now)`): routed and queued; or refused,
        with the reason, and then not recorded (an API server answers it with an error)."""
        reason = self.rejection_reason(state)
        if reason:
            state.status = Status.REJECTED
            return reason
        self._arrive(state, now)
        return None

    def abort(self, state: RequestState, now: float) -> None:
        """The client went away: a waiting request leaves at once; a running one after the
        iteration in progress (its KV is freed then, as vLLM frees an aborted request's); a
        migrating one when its KV lands (it may start migrating in that iteration, too)."""
        if state.status is Status.WAITING:
            self.instances[state.instance].remove(state)
            state.status = Status.FINISHED
        elif state.status is Status.RUNNING:
            self._aborted.add(state)
            inst = self.instances[state.instance]
            self._wake(inst, now)
        elif state.status is Status.MIGRATING:
            self._aborted.add(state)

    def _drop_aborted(self, inst: Instance) -> None:
        for state in list(self._aborted):
            # Running, or preempted back to waiting in that iteration: it leaves now.
            if state.status in (Status.RUNNING, Status.WAITING) and state.instance == inst.index:
                inst.remove(state)
                state.status = Status.FINISHED
            if state.status in (Status.FINISHED, Status.REJECTED):
                self._aborted.discard(state)  # removed now, or it finished first
            # A request that began migrating in the iteration stays: dropped when it lands.

    def _arrive(self, state: RequestState, now: float) -> None:
        reason = self.rejection_reason(state)
        if reason:
            state.status = Status.REJECTED
            self.collector.add(_record(state, np.zeros(0), reject_reason=reason))
            self._free_slot(now)  # refused at once
            self._cut_program(state, now)
            return
        index = self.router.route(state, self.view)
        inst = self.instances[index]
        inst.enqueue(state)
        self._wake(inst, now)

    def _check_all_done(self, n: int) -> None:
        if len(self.collector) != n:
            raise RuntimeError(f"{n - len(self.collector)} of {n} requests never ended")
        for inst in self.instances:
            if inst.running or inst.waiting or inst.kv.used or inst.kv.cpu_used:
                raise RuntimeError(
                    f"instance {inst.index} ended with {len(inst.running)} running, "
                    f"{len(inst.waiting)} waiting, {inst.kv.used} GPU and {inst.kv.cpu_used} "
                    "host KV blocks in use"
                )

    # --- listener callbacks from instances -------------------------------------------------------
    def on_finish(self, state: RequestState, instance: Instance, t: float) -> None:
        times = token_times(state, self.logs)
        if self.frontend_latency:
            times = times + self.frontend_latency
        self.collector.add(_record(state, times))
        done = float(times[-1]) if len(times) else t  # when the client has the last token
        self._free_slot(done)
        follower = self._next_turn.pop(state, None)
        if follower is not None:  # closed loop: the next turn after the tool call
            assert self._workload is not None
            sent = max(done + state.request.tool_time, self._workload.arrivals[follower])
            self._seq += 1
            heapq.heappush(self._released, (sent, self._seq, follower))

    def _cut_program(self, state: RequestState, now: float) -> None:
        """A rejected turn ends its program: every later turn is recorded as rejected, not run."""
        follower = self._next_turn.pop(state, None)
        while follower is not None and follower >= 0:
            assert self._workload is not None and self._follower is not None
            later = RequestState(replace(self._workload[follower], arrival=now))
            later.status = Status.REJECTED
            self.collector.add(_record(later, np.zeros(0), reject_reason=PROGRAM_CUT))
            follower = int(self._follower[follower])

    def _free_slot(self, t: float) -> None:
        if self._slots is not None:
            heapq.heappush(self._slots, t)

    def on_phase_change(self, state: RequestState, instance: Instance, t: float) -> None:
        target = self.router.on_phase_change(state, instance.index, self.view)
        if target != instance.index:
            self.migrate(state, instance.index, target, t)

    # --- migration ------------------------------------------------------------------------------
    def migrate(self, state: RequestState, src: int, dst: int, now: float) -> float:
        """Move a request's KV from instance `src` to `dst` over the inter-instance link. It makes
        no progress while in flight; returns the transfer time."""
        blocks = state.blocks + state.cpu_blocks
        seconds = blocks * self.config.kv_bytes_per_block / self.link_bandwidth
        self.instances[src].remove(state)
        state.status = Status.MIGRATING
        state.migrations += 1
        self.stats.migrations += 1
        self.stats.migration_seconds.append(seconds)
        self.inbound[dst] += 1
        self._push(now + seconds, 1, (state, dst))
        return seconds


def _record(state: RequestState, times: np.ndarray, reject_reason: str = "") -> RequestRecord:
    r = state.request
    return RequestRecord(
        request_id=state.request_id,
        arrival=state.arrival,
        prompt_tokens=state.prompt_tokens,
        output_tokens=state.output_tokens,  # a rejected request's: what it asked for
        reasoning_tokens=state.reasoning_tokens,
        token_times=times,
        first_scheduled=state.first_scheduled,
        finished=not reject_reason,
        reject_reason=reject_reason,
        preemptions=state.preemptions,
        migrations=state.migrations,
        cached_tokens=max(state.cached_tokens, 0),
        instance=state.instance,
        priority=state.priority,
        tier=r.tier,
        session_id=r.session_id,
        turn=r.turn,
        ttft_slo=r.ttft_slo,
        tpot_slo=r.tpot_slo,
        client_wait=state.arrival - r.arrival,
        token_runs=state.segments,
    )


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="simulating", mininterval=0.5)
