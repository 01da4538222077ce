"""One engine instance: continuous batching, one policy decision per iteration.

An iteration is: ask the policy for a :class:`BatchPlan`, carry out its preemptions and
admissions, allocate KV for its tokens, and take the latency model's time. The cost of a
simulation must grow with *events*, not tokens, so a plan that the policy declares repeatable
is run as a *span* of up to ``k`` identical iterations priced in one vectorised call. ``k`` stops
at the first internal event (a request finishes or reaches `</think>`, a prefill chunk changes
size, KV would run out); an arrival routed here mid-span truncates it at the iteration in
progress, exactly where a per-iteration engine would first see the new request.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
from mypy_extensions import mypyc_attr
from sortedcontainers import SortedList

from llmsched.engine.config import EngineConfig
from llmsched.engine.kv import KVBlockManager
from llmsched.engine.plan import BatchPlan
from llmsched.engine.prefix_cache import BlockHasher, PrefixCachingKV
from llmsched.engine.state import RequestState, Status
from llmsched.hardware.latency import BatchShape, LatencyModel

if TYPE_CHECKING:
    from llmsched.policies.base import InstancePolicy


class IterationLog:
    """End times of an instance's iterations, in a growable float64 array. Requests refer to
    their tokens' times by iteration index, so no per-token Python objects exist."""

    __slots__ = ("data", "size")

    def __init__(self) -> None:
        self.data = np.empty(1024)
        self.size = 0

    def append(self, t: float) -> int:
        """Append one time; returns its index."""
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.empty(len(self.data))])
        self.data[self.size] = t
        self.size += 1
        return self.size - 1

    def extend(self, times: Sequence[float]) -> int:
        """Append times; returns the index of the first one."""
        first, n = self.size, len(times)
        if first + n > len(self.data):
            grown = np.empty(max(2 * len(self.data), first + n))
            grown[:first] = self.data[:first]
            self.data = grown
        data = self.data
        if n <= 8:  # (most spans: one at a time costs less than numpy converting a list)
            for i in range(n):
                data[first + i] = times[i]
        else:
            data[first : first + n] = times
        self.size = first + n
        return first


class Listener(Protocol):
    """Who hears about an instance's request events (the cluster), and keeps every instance's
    iteration log (a request's tokens may span instances after a migration)."""

    logs: list[IterationLog]

    def on_finish(self, state: RequestState, instance: Instance, time: float) -> None: ...

    def on_phase_change(self, state: RequestState, instance: Instance, time: float) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # (when compiled: setup.py)
class InstanceView:
    """The read-only view of an instance that a policy decides on. It reads an
    :class:`EngineState`: the simulator's :class:`Instance`, or the mirror of a vLLM scheduler's
    state that `llmsched.integrations.vllm` keeps."""

    __slots__ = ("_inst",)

    def __init__(self, instance: EngineState) -> None:
        self._inst = instance

    @property
    def now(self) -> float:
        return self._inst.now

    @property
    def index(self) -> int:
        return self._inst.index

    @property
    def config(self) -> EngineConfig:
        return self._inst.config

    @property
    def kv(self) -> KVBlockManager:
        return self._inst.kv

    @property
    def running(self) -> list[RequestState]:
        """Admitted requests (KV on the GPU), in admission order."""
        return self._inst.running

    @property
    def waiting(self) -> Iterator[RequestState]:
        """Queued requests in the policy's order (its `waiting_key`, ties by enqueue order)."""
        return map(itemgetter(2), self._inst.waiting)  # (lazy: a policy may stop early)

    @property
    def num_waiting(self) -> int:
        return self._inst.num_waiting

    @property
    def pins(self) -> dict[RequestState, float]:
        """Finished requests whose KV blocks the policy keeps referenced (`pin_until`), with
        the time each pin was set to last until, oldest pin first (not to be changed)."""
        return self._inst.pins

    @property
    def iterations(self) -> int:
        """Iterations completed so far."""
        return self._inst.log.size

    def requests(self) -> Iterator[RequestState]:
        """Every request on the instance: running, then waiting (swapped-out ones included)."""
        yield from self._inst.running
        yield from self.waiting

    def token_times(self, state: RequestState, start: int = 0) -> np.ndarray:
        """Generation times of `state`'s output tokens from index `start` on (all instances)."""
        return token_times(state, self._inst.logs, start)

    @property
    def mean_iteration_time(self) -> float:
        """Mean duration of the iterations completed so far (0 before the first)."""
        inst = self._inst
        return inst.busy_time / inst.log.size if inst.log.size else 0.0


class Span:
    """A plan being executed for k identical iterations, with their end times (increasing); the
    first `done` of them are already applied to the requests' state."""

    __slots__ = ("done", "ends", "k", "plan")

    def __init__(self, plan: BatchPlan, ends: list[float]) -> None:
        self.plan, self.ends, self.k, self.done = plan, ends, len(ends), 0

    @property
    def end(self) -> float:
        return self.ends[-1]


@mypyc_attr(allow_interpreted_subclasses=True)  # (when compiled: setup.py)
class EngineState:
    """What a policy's view reads of one engine: its requests in the policy's order, its KV
    blocks, its clock and the end times of its iterations (which the requests' token times
    index). The simulator's :class:`Instance` and the vLLM adapter's mirror of a real
    scheduler are both one."""

    def __init__(self, index: int, config: EngineConfig, policy: InstancePolicy) -> None:
        self.index = index
        self.config = config
        self.policy = policy
        self.kv = KVBlockManager(config.num_blocks, config.block_size)
        self.waiting: SortedList = SortedList()  # (policy's key, enqueue order, request)
        self.num_waiting = 0  # len(waiting), read every step (SortedList's len is Python code)
        self.running: list[RequestState] = []  # admission order
        # Pins: finished requests still holding their KV blocks (Continuum), until when.
        self.pins: dict[RequestState, float] = {}
        self.view = InstanceView(self)
        self.log = IterationLog()
        self.now = 0.0
        self.busy_time = 0.0
        self._enqueued = 0

    @property
    def logs(self) -> list[IterationLog]:
        """Every engine's iteration log, by index (a request's tokens may span engines)."""
        return [self.log]

    def use_prefix_cache(self, hasher: BlockHasher | None = None) -> None:
        """Keep KV blocks in vLLM's prefix-caching block pool (before any request comes)."""
        if self.kv.used or self.running or self.waiting:
            raise RuntimeError("the prefix cache is set up before requests come")
        self.kv = PrefixCachingKV(self.config.num_blocks, self.config.block_size, hasher)

    def enqueue(self, state: RequestState) -> None:
        """Put a request in the waiting queue, ordered by the policy's key."""
        state.status = Status.WAITING
        state.instance = self.index
        self._enqueued += 1
        state.queue_entry = (self.policy.waiting_key(state), self._enqueued, state)
        self.waiting.add(state.queue_entry)
        self.num_waiting += 1

    def dequeue(self, state: RequestState) -> None:
        """Take a request off the waiting queue."""
        self.waiting.remove(state.queue_entry)
        self.num_waiting -= 1
        state.queue_entry = None

    def pin(self, state: RequestState, until: float) -> None:
        """Keep a finished request's KV blocks referenced (so that they are neither reused nor
        evicted), nominally until `until`; the policy releases the pin."""
        self.pins[state] = until

    def release_pin(self, state: RequestState) -> None:
        """A pinned request's blocks are freed, as at an ordinary finish (cached ones stay
        hittable on the free queue until reused)."""
        del self.pins[state]
        self.kv.free_request(state)

    def release_pins(self) -> None:
        """Release every pin (the run is over)."""
        for state in list(self.pins):
            self.release_pin(state)

    def record_tokens(self, state: RequestState, first: int, count: int) -> None:
        """`state` produced `count` tokens at iterations first, first + 1, ... of this engine."""
        seg = state.segments
        if seg and seg[-3] == self.index and seg[-2] + seg[-1] == first:
            seg[-1] += count
        else:
            seg.extend((self.index, first, count))


class Instance(EngineState):
    """A simulated engine instance: the policy's plans run as spans of iterations on the
    latency model's clock."""

    def __init__(
        self,
        index: int,
        config: EngineConfig,
        policy: InstancePolicy,
        latency: LatencyModel,
        listener: Listener,
        observer: Callable[[Instance, Span], None] | None = None,
        fast_forward: bool = True,
    ) -> None:
        super().__init__(index, config, policy)
        self.fast_forward = fast_forward  # False: one iteration per step (the reference path)
        self.latency = latency
        self.listener = listener
        self.observer = observer  # tests hook in here to check invariants on every span
        self.span: Span | None = None
        # statistics
        self.num_preemptions = 0
        self.swap_bytes = 0.0

    @property
    def logs(self) -> list[IterationLog]:
        return self.listener.logs

    def remove(self, state: RequestState) -> None:
        """Take a request off this instance (it migrates away); frees its GPU blocks."""
        if state.status is Status.RUNNING:
            self.running.remove(state)
            self.kv.free_request(state)
        elif state.queue_entry is not None:
            self.dequeue(state)
        if state.cpu_blocks:
            self.kv.drop_cpu_copy(state)

    @property
    def outstanding(self) -> int:
        return len(self.running) + self.num_waiting

    # --- one step: plan, then a span of identical iterations ------------------------------------
    def start_step(self, now: float) -> float | None:
        """Plan the next iteration(s) at `now`; returns when they end, or None when idle."""
        self.now = now
        plan: BatchPlan = self.policy.schedule(self.view)  # (typed: compiled, read natively)
        extra = self._apply_preemptions(plan)
        while (plan.preempted or plan.released) and not plan.items:
            # A step that only preempts (vLLM V1 serves no running request after one that had
            # to preempt itself) or releases pins: it runs nothing and takes no time; plan
            # again on freed KV.
            if self.observer is not None:
                self.observer(self, Span(plan, [now]))
            plan = self.policy.schedule(self.view)
            extra += self._apply_preemptions(plan)
        if not plan.items:
            if self.running or self.waiting:
                raise RuntimeError(
                    f"policy {self.policy.name!r} scheduled nothing on instance {self.index} with "
                    f"{len(self.running)} running and {len(self.waiting)} waiting requests and "
                    f"{self.kv.free}/{self.kv.num_blocks} KV blocks free: it would never progress"
                )
            return None
        extra += self._admit_and_allocate(plan, now)
        n_dec, dec_kv, chunks, k, tokens = self._batch(plan)
        k = self._span_length(plan, k, tokens)
        durations = self._durations(n_dec, dec_kv, chunks, k)
        # Each iteration ends at the previous end plus its time, added in that order, as when
        # iterations run one at a time: a span's times are theirs to the last bit (a sum of
        # the durations first, then `now`, rounds otherwise, and a policy comparing times
        # could then decide otherwise).
        end = now + (durations[0] + extra)
        ends = [end]
        for i in range(1, k):
            end += durations[i]
            ends.append(end)
        if self.pins and k > 1:
            # A pin's expiry is an event: the policy is asked again at the first iteration
            # that ends after it (as vLLM's scheduler looks at pins every step).
            expiry = min((t for t in self.pins.values() if t > now), default=math.inf)
            del ends[bisect_left(ends, expiry) + 1 :]
        self.span = Span(plan, ends)
        if self.observer is not None:
            self.observer(self, self.span)
        return self.span.end

    def _apply_preemptions(self, plan: BatchPlan) -> float:
        """Release the plan's pins and carry out its preemptions; returns the seconds spent
        swapping out."""
        seconds = 0.0
        for pinned in plan.released:
            self.release_pin(pinned)
        for victim, mode in plan.preempted:
            self.running.remove(victim)
            victim.preemptions += 1
            self.num_preemptions += 1
            if mode == "swap":
                moved = self.kv.swap_out(victim)
                seconds += self._transfer_time(moved)
            else:
                self.kv.free_request(victim)
                victim.computed = 0
            self.policy.on_preempt(victim, self.view)  # before queueing: its key may change
            self.enqueue(victim)
        return seconds

    def _admit_and_allocate(self, plan: BatchPlan, now: float) -> float:
        """Admit the plan's waiting requests (from their prefix-cache hits) and allocate KV for
        the first iteration; returns the seconds spent swapping requests back in."""
        seconds = 0.0
        kv = self.kv
        caching, bs = kv.caching, int(self.config.block_size)
        hold = plan.hold
        running, waiting = Status.RUNNING, Status.WAITING
        for state, tokens in plan.items:
            status = state.status
            if status is waiting:
                self.dequeue(state)
                state.status = running
                self.running.append(state)
                if state.cpu_blocks:
                    seconds += self._transfer_time(self.kv.drop_cpu_copy(state))
                elif caching and not state.computed:  # new, or preempted by recompute
                    hit = plan.hits.get(state, 0)
                    cast(PrefixCachingKV, kv).admit_cached(state, hit, plan.hit_blocks.get(state))
                    state.computed = hit
                    if state.cached_tokens < 0:
                        state.cached_tokens = hit
                if math.isnan(state.first_scheduled):
                    state.first_scheduled = now
            elif status is not running:
                raise RuntimeError(f"policy {self.policy.name!r} scheduled {state!r}")
            end = state.computed + tokens
            if hold and hold.get(state, 0) > end:  # (most plans hold nothing: no dict lookup)
                kv.grow_to(state, hold[state], end)
            elif caching or end > state.blocks * bs:  # (else it has the blocks: nothing to do)
                kv.grow_to(state, end, end)
        if len(self.running) > int(self.config.max_num_seqs):
            raise RuntimeError(
                f"policy {self.policy.name!r} runs {len(self.running)} sequences, over "
                f"max_num_seqs={self.config.max_num_seqs}"
            )
        return seconds

    def _transfer_time(self, blocks: int) -> float:
        moved = blocks * self.config.kv_bytes_per_block
        self.swap_bytes += moved
        return moved / self.config.pcie_bandwidth

    def _batch(self, plan: BatchPlan) -> tuple[int, int, list[tuple[int, int]], int, int]:
        """The plan's batch in one pass over its requests: the decodes (how many, the KV tokens
        they read), the prefill chunks as (tokens computed, chunk), how many times the plan can
        repeat before a decode finishes or reaches `</think>` (at the span's last iteration),
        and the tokens of one iteration."""
        k = plan.repeat if self.fast_forward else 1
        n_dec = dec_kv = total = 0
        chunks = []
        for state, tokens in plan.items:
            total += tokens
            generated, computed = state.generated, state.computed
            if generated and state.prompt_tokens + generated - computed == 1:  # a decode
                n_dec += 1
                dec_kv += computed + 1
                if k > state.output_tokens - generated:
                    k = state.output_tokens - generated
                if generated < state.reasoning_tokens < generated + k:
                    k = state.reasoning_tokens - generated
            else:
                chunks.append((computed, tokens))
        if total > int(self.config.max_num_batched_tokens):
            raise RuntimeError(
                f"policy {self.policy.name!r} planned {total} tokens, over the budget of "
                f"{self.config.max_num_batched_tokens}"
            )
        return n_dec, dec_kv, chunks, k, total

    def _span_length(self, plan: BatchPlan, k: int, tokens: int) -> int:
        """How many of the plan's k repeats (of `tokens` tokens each) fit in the free KV
        blocks."""
        if k == 1:
            return 1
        free = self.kv.free
        # A request holds the blocks of its first iteration, so k iterations need at most
        # ⌈k·tokens / block⌉ more each: when their sum fits, k does (no exact count needed).
        if -(-k * tokens // int(self.config.block_size)) + len(plan.items) <= free:
            return k
        if self._blocks_needed(plan, k) > free:
            lo, hi = 1, k  # the largest k whose extra blocks still fit
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._blocks_needed(plan, mid) <= free:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
        return k

    def _blocks_needed(self, plan: BatchPlan, k: int) -> int:
        """Blocks beyond those already held that k iterations of the plan need."""
        bs = int(self.config.block_size)
        need = 0
        for state, tokens in plan.items:
            more = -(-(state.computed + tokens * k) // bs) - state.blocks
            if more > 0:
                need += more
        return need

    def _durations(
        self, n_dec: int, dec_kv: int, chunks: list[tuple[int, int]], k: int
    ) -> list[float]:
        """The latency model's times of k iterations of the batch (the chunks advance by their
        length and the decodes' context by one token each, every iteration)."""
        if not chunks:
            times = self.latency.decode_iteration_times(n_dec, dec_kv, k)
            return times if isinstance(times, list) else [float(t) for t in times]
        iteration_time = self.latency.iteration_time
        if len(chunks) == 1:  # (the usual batch: one prompt's chunk beside the decodes)
            done, c = chunks[0]
            return [
                iteration_time(
                    BatchShape(c, c * (p + (c + 1) / 2), p + c, 1, n_dec, dec_kv + i * n_dec)
                )
                for i, p in enumerate(range(done, done + k * c, c))
            ]
        return [
            iteration_time(
                BatchShape.from_chunks(
                    ((c, done + i * c) for done, c in chunks), n_dec, dec_kv + i * n_dec
                )
            )
            for i in range(k)
        ]

    # --- applying a span's iterations ---------------------------------------------------------
    def sync(self, t: float) -> None:
        """Bring the requests' state to time `t` inside the span: apply the iterations that have
        ended, and allocate KV for the one in progress, as a per-iteration engine would have."""
        span = self.span
        if span is None:
            return
        ended = bisect_right(span.ends, t)
        if span.done < ended < span.k:
            self._advance(span, ended - span.done)
            for state, tokens in span.plan.items:
                self.kv.grow_to(state, state.computed + tokens)

    def interrupt(self, t: float) -> float:
        """A request arrives at `t`: cut the span after the iteration in progress at `t`.
        Returns when the instance next schedules."""
        span = self.span
        assert span is not None
        self.sync(t)
        j = bisect_right(span.ends, t) + 1
        if j < span.k:
            span.ends = span.ends[:j]
            span.k = j
        return span.end

    def finish_span(self) -> None:
        """The span ran to its end: apply its remaining iterations and fire their events."""
        span = self.span
        assert span is not None
        events = self._advance(span, span.k - span.done)
        end = span.end
        self.busy_time += end - self.now
        self.span = None
        self.now = end
        for state, finished in events:
            if finished:
                self.running.remove(state)
                until = self.policy.pin_until(state, self.view)
                if until is None:
                    self.kv.free_request(state)
                else:
                    self.pin(state, until)
                state.status = Status.FINISHED
                self.policy.on_finish(state, self.view)
                self.listener.on_finish(state, self, end)
            else:
                self.policy.on_phase_change(state, self.view)
                self.listener.on_phase_change(state, self, end)

    def _advance(self, span: Span, j: int) -> list[tuple[RequestState, bool]]:
        """Apply j more iterations of the span; returns (request, finished?) events: requests
        that finished or produced `</think>` (these happen only at a span's last iteration)."""
        first = self.log.extend(span.ends[span.done : span.done + j])
        span.done += j
        events = []
        bs = int(self.config.block_size)  # (typed: compiled, the loop's arithmetic is native)
        kv = self.kv
        caching = kv.caching
        index = self.index
        for state, tokens in span.plan.items:
            generated = state.generated
            before = state.prompt_tokens + generated - state.computed  # to compute
            computed = state.computed = state.computed + tokens * j
            # Within its blocks, a request needs no more; with a prefix cache, a chunk may
            # complete blocks to cache (a decode's prompt blocks are cached already).
            if computed > state.blocks * bs or (caching and before != 1):
                kv.grow_to(state, computed)
            if tokens * j < before:
                continue  # a prefill chunk that has not completed yet
            emitted = j if before == 1 else 1  # decodes emit every iteration, a prefill once
            # (record_tokens, inline: this runs for every request of every span)
            at, seg = first + j - emitted, state.segments
            if seg and seg[-3] == index and seg[-2] + seg[-1] == at:
                seg[-1] += emitted
            else:
                seg.extend((index, at, emitted))
            state.generated = generated + emitted
            if generated + emitted >= state.output_tokens:
                events.append((state, True))
            elif generated < state.reasoning_tokens <= generated + emitted:
                events.append((state, False))
        return events


def token_times(state: RequestState, logs: list[IterationLog], start: int = 0) -> np.ndarray:
    """Generation times of the request's output tokens from index `start` on, read from its runs
    in the iteration logs (so a policy that looks only at new tokens pays only for them)."""
    seg = state.segments
    parts = []
    skip = start
    for i in range(0, len(seg), 3):
        inst, first, count = seg[i], seg[i + 1], seg[i + 2]
        if skip >= count:
            skip -= count
            continue
        parts.append(logs[inst].data[first + skip : first + count])
        skip = 0
    if len(parts) == 1:  # (the usual request: one run)
        return parts[0].copy()
    return np.concatenate(parts) if parts else np.zeros(0)
