"""Batch plans, and the packing mechanics that policies share: the builder and vLLM's loop.

A policy answers "what runs in the next iteration" with a :class:`BatchPlan`: requests with
their token counts, preemption victims, and how many identical iterations the plan may repeat
before the policy must be asked again. Policies build plans with a :class:`BatchBuilder`, which
keeps the token budget, the sequence cap and a tentative count of free KV blocks, so that a
policy file says *in which order* to schedule, admit and preempt, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from llmsched.engine.prefix_cache import NO_BLOCKS, common_tokens
from llmsched.engine.state import RequestState, Status

if TYPE_CHECKING:
    from llmsched.engine.instance import InstanceView

UNTIL_EVENT = 1 << 40  # "repeat until something else happens": the engine bounds it by events


@dataclass(slots=True, init=False)
class BatchPlan:
    """One step's decision (a policy builds it with a BatchBuilder)."""

    items: list[tuple[RequestState, int]] = field(default_factory=list)  # (request, tokens)
    preempted: list[tuple[RequestState, str]] = field(default_factory=list)  # (victim, mode)
    repeat: int = 1  # identical iterations allowed, absent arrivals and completions
    # Requests admitted with KV for more than this iteration's tokens: {request: tokens to hold}
    # (Sarathi-Serve and vLLM v0 allocate a whole prompt's blocks when they admit it).
    hold: dict[RequestState, int] = field(default_factory=dict)
    # Prefix-cache hits of the requests this plan admits: {request: tokens found cached}; the
    # request's tokens in `items` are counted from there.
    hits: dict[RequestState, int] = field(default_factory=dict)
    # Pins this plan releases (finished requests whose KV the policy kept, `view.pins`): their
    # blocks are freed before the plan's preemptions.
    released: list[RequestState] = field(default_factory=list)
    # The cached blocks the plan found for the requests in `hits` (not counting blocks of chunks
    # planned in this step), with their identities: the engine checks that they are still the
    # cached ones rather than looking them up again.
    hit_blocks: dict[RequestState, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __init__(
        self,
        items: list[tuple[RequestState, int]] | None = None,
        preempted: list[tuple[RequestState, str]] | None = None,
        repeat: int = 1,
        hold: dict[RequestState, int] | None = None,
        hits: dict[RequestState, int] | None = None,
        released: list[RequestState] | None = None,
        hit_blocks: dict[RequestState, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        # (Written out: compiled, it is a native constructor, where the dataclass's would be
        # interpreted; every step makes one.)
        self.items = [] if items is None else items
        self.preempted = [] if preempted is None else preempted
        self.repeat = repeat
        self.hold = {} if hold is None else hold
        self.hits = {} if hits is None else hits
        self.released = [] if released is None else released
        self.hit_blocks = {} if hit_blocks is None else hit_blocks

    @property
    def num_tokens(self) -> int:
        return sum(t for _, t in self.items)


class BatchBuilder:
    """Packs one iteration under the token budget, the sequence cap and the free KV blocks."""

    __slots__ = (
        "block_size",
        "budget",
        "caching",
        "chunk_cap",
        "free",
        "free0",
        "hit_blocks",
        "hits",
        "hold",
        "items",
        "kv",
        "max_seqs",
        "num_running",
        "pending",
        "plan_ref",
        "preempted",
        "released",
        "repeat_cap",
        "reserve_full_isl",
        "taken",
        "victims",
        "view",
        "watermark",
    )

    def __init__(self, view: InstanceView, *, budget: int | None = None) -> None:
        cfg = view.config
        self.view = view
        # (The engine's limits as typed ints: compiled, the packing below is native arithmetic.)
        self.budget = int(cfg.max_num_batched_tokens if budget is None else budget)
        self.kv: Any = view.kv  # (a PrefixCachingKV when kv.caching)
        self.free = self.free0 = view.kv.free
        self.taken = 0  # cached free blocks that this plan's admissions take
        self.caching = view.kv.caching  # admissions look their prefix up in the cache
        self.hits: dict[RequestState, int] = {}
        self.hit_blocks: dict[RequestState, tuple[np.ndarray, np.ndarray]] = {}
        # The prefix cache's reference counts as this plan leaves them (admissions touch their
        # hit blocks, preemptions release theirs); None until the plan changes one.
        self.plan_ref: np.ndarray | None = None
        # Prompt chunks planned here, (request, from, to): vLLM caches their blocks when it
        # schedules them, so a request admitted later in the same step finds them.
        self.pending: list[tuple[RequestState, int, int]] = []
        self.num_running = len(view.running)
        self.max_seqs = int(cfg.max_num_seqs)
        self.block_size = int(cfg.block_size)
        # vLLM caps a chunk at long_prefill_token_threshold only when another request could use
        # the budget it leaves.
        many = self.num_running + view.num_waiting > 1
        self.chunk_cap = int((many and cfg.long_prefill_token_threshold) or (1 << 62))
        self.watermark = int(cfg.watermark_blocks)
        self.reserve_full_isl = bool(cfg.reserve_full_isl)
        self.items: dict[RequestState, int] = {}
        self.preempted: list[tuple[RequestState, str]] = []
        self.victims: set[RequestState] = set()
        self.released: list[RequestState] = []
        self.hold: dict[RequestState, int] = {}
        self.repeat_cap = UNTIL_EVENT

    # --- queries ------------------------------------------------------------------------------
    @property
    def budget_left(self) -> int:
        return self.budget

    @property
    def seqs_left(self) -> int:
        return self.max_seqs - self.num_running

    def is_scheduled(self, state: RequestState) -> bool:
        return state in self.items

    def is_preempted(self, state: RequestState) -> bool:
        return state in self.victims

    # --- actions ------------------------------------------------------------------------------
    def schedule(self, state: RequestState, max_tokens: int | None = None, *, reserve: int = 0):
        """Give a running request its tokens (a decode 1, a prefill a chunk of what is left),
        up to the budget. Returns the tokens given; 0 when the budget or the KV (keeping
        `reserve` blocks free) has no room: the caller then preempts or stops."""
        # (Comparisons, not min() and properties: this runs for every request in every step.)
        computed = state.computed
        tokens = state.prompt_tokens + state.generated - computed
        if tokens > self.budget:
            tokens = self.budget
        if tokens > self.chunk_cap:
            tokens = self.chunk_cap
        if max_tokens is not None and tokens > max_tokens:
            tokens = max_tokens
        if tokens <= 0:
            return 0
        need = -(-(computed + tokens) // self.block_size) - state.blocks
        if need < 0:
            need = 0
        if need > self.free - reserve:
            return 0
        self.free -= need
        self.budget -= tokens
        self.items[state] = tokens
        if self.caching and computed < state.prompt_tokens:
            self.pending.append((state, computed, computed + tokens))
        return tokens

    def admit(
        self, state: RequestState, max_tokens: int | None = None, *, reserve: int | None = None
    ):
        """Admit a waiting request (new, preempted, swapped out or migrated in) if the sequence
        cap, the budget and the KV allow; returns the tokens given (0 = not admitted).

        As vLLM V1 (0.32) admits: KV for the request's whole sequence (`num_tokens`: its prompt
        and what it generated before a preemption) must be free, not just for the chunk it gets
        now (`reserve_full_isl`); and `reserve` blocks must stay free, by default the engine's
        watermark when anything runs. Only the chunk is allocated."""
        if self.num_running >= self.max_seqs:
            return 0
        if reserve is None:
            reserve = self.watermark if self.num_running else 0
        if self.caching and not state.computed and not state.cpu_blocks:
            hit, planned, copies = self._lookup(state)
            if len(hit) or planned:
                return self._admit_cached(state, hit, planned, copies, max_tokens, reserve)
        if (
            self.reserve_full_isl
            and -(-state.num_tokens // self.block_size) - state.blocks > self.free - reserve
        ):
            return 0
        tokens = self.schedule(state, max_tokens, reserve=reserve)
        if tokens:
            self.num_running += 1
            if self.caching and state.computed:
                # Its KV comes back (swapped in) or in (migrated from another instance) and is
                # cached in this step: a waiting request's lookup may hit those blocks in the
                # next, so the plan must not repeat.
                self.limit_repeat(1)
        return tokens

    def _lookup(self, state: RequestState) -> tuple[np.ndarray, int, np.ndarray]:
        """The request's prefix-cache hit: the cached blocks; how many blocks more come from
        prompt chunks planned in this step (other requests allocate them); and, among those,
        the free cached copies that survive this step's evictions, which vLLM's lookup returns
        first (the chunk's own blocks become their duplicates), so admitting the request takes
        them off the free queue too."""
        hit = self.kv.lookup(state)
        evicted = self.free0 - self.free - self.taken - len(self.kv.plain)
        if len(hit) and evicted > 0:  # the plan's allocations so far evict the LRU's head
            hit = hit[: self._surviving(hit, evicted)]
        bs = self.block_size
        limit = (state.num_tokens - 1) // bs
        planned = 0
        for other, start, end in self.pending:
            first = len(hit) + planned
            if start // bs <= first < min(end // bs, limit):
                common = common_tokens(self.kv.chain(state), self.kv.chain(other)) // bs
                if common > first:
                    planned = min(common, end // bs, limit) - len(hit)
        copies = NO_BLOCKS
        if planned:
            ref = self.kv.ref if self.plan_ref is None else self.plan_ref
            survives = None
            if evicted > 0:
                boundary = self._eviction_boundary(evicted)

                def survives(blocks: np.ndarray) -> np.ndarray:
                    pos = self.kv.lru.pos[blocks]
                    return (pos < 0) | (pos >= boundary) | (ref[blocks] > 0)

            at = self.kv.cached_at(state, len(hit), len(hit) + planned, survives)
            at = at[at < self.kv.num_blocks]
            copies = at[ref[at] == 0]  # (copies held by a request cost nothing)
        return hit, planned, copies

    def _surviving(self, hit: np.ndarray, evicted: int) -> int:
        """How many of the hit blocks stay cached once the `evicted` least recently freed
        blocks (those not taken by this plan's admissions) are reused (vLLM looks a request up
        after the step's earlier allocations)."""
        ref = self.kv.ref if self.plan_ref is None else self.plan_ref
        pos = self.kv.lru.pos[hit]
        free = (ref[hit] == 0) & (pos >= 0)
        if not free.any():
            return len(hit)
        gone = free & (pos < self._eviction_boundary(evicted))
        return int(np.argmax(gone)) if gone.any() else len(hit)

    def _eviction_boundary(self, evicted: int) -> int:
        """The free queue position of the first block to survive `evicted` evictions: past
        `evicted` live entries not taken by the plan, found a window at a time from the head
        (rather than over the whole queue)."""
        queue = self.kv.lru
        lo = queue.head
        step = max(2 * evicted, 1024)
        while True:
            hi = min(lo + step, queue.tail)
            window = queue.fifo[lo:hi]
            live = queue.pos[window] == np.arange(lo, hi)
            if self.plan_ref is not None:
                live &= self.plan_ref[window] == 0
            order = np.flatnonzero(live)
            if evicted < len(order):
                return lo + int(order[evicted])
            evicted -= len(order)
            if hi == queue.tail:
                return hi
            lo = hi

    def _admit_cached(
        self,
        state: RequestState,
        hit: np.ndarray,
        planned: int,
        copies: np.ndarray,
        max_tokens: int | None,
        reserve: int,
    ) -> int:
        """`admit` for a request whose first blocks are in the prefix cache (`hit`) or in
        chunks planned in this step (`planned` blocks more, of which `copies` are free cached
        copies that its lookup will find first): it starts from there, and its hit blocks and
        copies that are free now count against the free blocks (vLLM's `allocate_slots` with
        new computed blocks)."""
        bs = self.block_size
        taken = self._free_among(hit) + len(copies)
        cached = (len(hit) + planned) * bs
        extra = taken - len(hit) - planned  # blocks to take beyond the tokens' own
        if self.reserve_full_isl and -(-state.num_tokens // bs) + extra > self.free - reserve:
            return 0
        tokens = state.num_tokens - cached
        if tokens > self.budget:
            tokens = self.budget
        if tokens > self.chunk_cap:
            tokens = self.chunk_cap
        if max_tokens is not None and tokens > max_tokens:
            tokens = max_tokens
        if tokens <= 0:
            return 0
        need = -(-(cached + tokens) // bs) + extra
        if need > self.free - reserve:
            return 0
        self.free -= need
        self.budget -= tokens
        self.items[state] = tokens
        self.hits[state] = cached
        self.hit_blocks[state] = (hit, self.kv.block_hash[hit])  # (blocks, their identities)
        self.taken += taken
        ref = self._ref()
        ref[hit] += 1
        ref[copies] += 1
        self.num_running += 1
        if cached < state.prompt_tokens:
            self.pending.append((state, cached, cached + tokens))
        return tokens

    def _ref(self) -> np.ndarray:
        if self.plan_ref is None:
            self.plan_ref = self.kv.ref.copy()
        return self.plan_ref

    def _free_among(self, blocks: np.ndarray) -> int:
        """How many of these cached blocks are free at this point of the plan."""
        ref = self.kv.ref if self.plan_ref is None else self.plan_ref
        return int(np.count_nonzero(ref[blocks] == 0))

    def admit_whole(self, state: RequestState, *, reserve: int = 0) -> int:
        """Admit only if KV for the request's whole prompt fits, and allocate all of it now, so
        that its later chunks never wait for blocks (Sarathi-Serve's and vLLM v0's rule)."""
        whole = -(-(state.num_tokens) // self.block_size) - state.blocks
        if self.caching and not state.computed and not state.cpu_blocks:
            hit, planned, copies = self._lookup(state)  # cached blocks are not allocated...
            whole += self._free_among(hit) + len(copies) - len(hit) - planned  # free ones taken
        free = self.free
        if whole > free - reserve:
            return 0
        tokens = self.admit(state, reserve=reserve)
        if tokens:
            self.free = free - whole  # the chunk's blocks and the rest of the prompt's
            self.hold[state] = state.num_tokens
        return tokens

    def preempt(self, victim: RequestState, mode: str) -> None:
        """Take a running request off the GPU ("recompute" or "swap"); its blocks become free."""
        if victim.status is not Status.RUNNING:
            raise ValueError(f"can only preempt running requests, not {victim!r}")
        tokens = self.items.pop(victim, 0)
        held = max(victim.computed + tokens, self.hold.pop(victim, 0))
        self.budget += tokens
        # Its blocks come back, with those this plan had set aside for it; with a prefix
        # cache, only those that no other request holds.
        self.free += max(-(-held // self.block_size), victim.blocks)
        if self.caching and victim.blocks:
            table = self.kv.table(victim)
            ref = self._ref()
            ref[table] -= 1
            self.free -= victim.blocks - int(np.count_nonzero(ref[table] == 0))
        self.num_running -= 1
        self.preempted.append((victim, mode))
        self.victims.add(victim)

    def release(self, pinned: RequestState) -> None:
        """Release a pin: the finished request's blocks come back as a preempted request's do
        (with a prefix cache, those that no other request holds)."""
        if pinned not in self.view.pins or pinned in self.released:
            raise ValueError(f"{pinned!r} holds no pin to release")
        self.free += pinned.blocks
        if self.caching and pinned.blocks:
            table = self.kv.table(pinned)
            ref = self._ref()
            ref[table] -= 1
            self.free -= pinned.blocks - int(np.count_nonzero(ref[table] == 0))
        self.released.append(pinned)

    def is_released(self, pinned: RequestState) -> bool:
        return pinned in self.released

    def limit_repeat(self, iterations: int) -> None:
        """A policy whose next decision depends on progress (quanta, deadlines) caps repeats."""
        self.repeat_cap = min(self.repeat_cap, max(1, iterations))

    # --- result -------------------------------------------------------------------------------
    def build(self) -> BatchPlan:
        """The plan, with how often it may repeat unchanged: until a prefill chunk would change
        size or complete. Decodes repeat until an event (the engine bounds that)."""
        repeat = self.repeat_cap
        if self.preempted or self.released:
            repeat = 1
        else:
            hits = self.hits
            for state, tokens in self.items.items():
                left = state.prompt_tokens + state.generated - state.computed  # to compute
                if hits and state in hits:
                    left -= hits[state]
                if tokens < left:
                    repeat = min(repeat, -(-left // tokens) - 1)
                elif left != 1 or not state.generated:  # not a decode
                    repeat = 1  # this chunk completes a prefill: next time it is a decode
                    break
        return BatchPlan(
            list(self.items.items()),
            self.preempted,
            max(1, repeat),
            self.hold,
            self.hits,
            self.released,
            self.hit_blocks,
        )


# --- vLLM's scheduling loop, in an order a policy chooses ---------------------------------------
Key = Callable[[RequestState], Any]
# A policy's choice of a pin to release for a request that finds no KV (None: none).
Reclaim = Callable[[BatchBuilder, RequestState], "RequestState | None"]


def pack_in_order(
    view: Any,  # an InstanceView, or any object with its `running` and `waiting` (PARS's order)
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

    The loop is the engine's mechanics (compiled with it, see llmsched.native); the policy's
    decisions are its arguments.
    """
    b = builder or BatchBuilder(view)
    if running is None:
        current: list[RequestState] = view.running  # (typed: compiled, read natively)
        running = sorted(current, key=key) if sort_running and key else current
    # Still running, in order: the candidates for preemption (made at the first preemption).
    alive: dict[RequestState, None] | None = None
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
                alive = dict.fromkeys(running) if alive is None else alive
                victim = next(reversed(alive)) if key is None else max(alive, key=key)
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
    queue: Iterable[RequestState] = view.waiting if waiting is None else waiting
    for state in queue:
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
            alive = dict.fromkeys(running) if alive is None else alive
            worse = [r for r in alive if key(r) > key(state)]
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
