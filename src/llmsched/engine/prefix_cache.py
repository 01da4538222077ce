"""vLLM V1's automatic prefix caching (0.32): a KV block pool whose full blocks are shared.

As `vllm/v1/core/block_pool.py` and `kv_cache_manager.py` do it, block by block:

* A full block's identity fingerprints every token up to its end (vLLM: a hash chain over the
  token ids). Requests here have no token ids but runs (`Request.runs`): a block's identity is
  the run its last token falls in, the runs before that run, and the offset in the run; two
  requests get the same identity for block i exactly when their runs agree on its tokens and
  all before them. Output tokens are the run ("out", request_id) after the prompt.
* Blocks are shared by reference count. A block enters the cache when the step that computes
  its last token is scheduled (`cache_blocks`), output blocks included. (Here output blocks
  enter it lazily, when the request frees its blocks or another request's lookup reaches its
  output, so that decoding costs nothing per block filled; lookups see the same cache.)
* Admission (`get_computed_blocks`, only when a request has computed nothing: new or
  preempted by recompute): the longest run of cached identities from the start, capped at
  `num_tokens - 1` and so rounded down to whole blocks. Hit blocks are touched: ref + 1, and
  taken off the free queue if they were free (they then count against the admission budget).
* Freeing (`free_blocks`): a request's blocks tail first; a block whose count reaches 0 goes
  to the free queue's tail if it has an identity (LRU), to its head if not. Allocation pops
  from the head and drops a popped block's identity then (lazy eviction). Since unhashed blocks
  always sit ahead of hashed ones, the queue is kept as a stack of unhashed blocks and a FIFO
  of hashed ones (`FreeQueue`).
* Usage counts referenced blocks only: cached-but-free blocks are free (`kv_cache_usage_perc`).

A plan is made before the engine carries it out; `BatchBuilder` predicts what vLLM's lookups see
at that point of the step (evictions by the step's earlier allocations, blocks cached by its
earlier chunks). Should a planned hit still lose a block, the block is allocated afresh and
counted as cached; the free-block count is the same either way. docs/prefix-caching.md has what
is modelled and what is not.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

import numpy as np

from llmsched.engine.kv import KVBlockManager
from llmsched.engine.state import RequestState
from llmsched.workload.request import Workload

# Each run of a request gets a node number; a block's identity is node * STRIDE + the offset
# of the block's end in the run: exact while offsets stay below STRIDE, never 0 (the "no
# identity" mark), and spread over a dict's low hash bits (a shift would leave them to the
# offset alone, and every run's first block would collide).
STRIDE = 0x9E3779B1


class BlockHasher:
    """Gives runs their node numbers: one per (runs before, key) and per (runs before, key,
    length), interned so that identities are exact integers (no hash collisions)."""

    __slots__ = ("_nodes",)

    def __init__(self) -> None:
        self._nodes: dict[tuple, int] = {}

    def _node(self, key: tuple) -> int:
        node = self._nodes.get(key)
        if node is None:
            node = self._nodes[key] = len(self._nodes) + 1
        return node

    def chain(self, runs: tuple[tuple[Hashable, int], ...]) -> list[tuple[int, int, int]]:
        """(start, end, base) of each run: the identity of a block ending at token e in the run
        is base + e - start."""
        out = []
        before = 0  # the node of all the runs so far (0: none)
        pos = 0
        for key, n in runs:
            out.append((pos, pos + n, self._node((before, key)) * STRIDE))
            before = self._node((before, key, n))
            pos += n
        return out


def identities(chain: list[tuple[int, int, int]], b0: int, b1: int, bs: int) -> list[int]:
    """The identities of blocks b0 .. b1 - 1 (all full) of a request with this chain."""
    out: list[int] = []
    e0, e1 = (b0 + 1) * bs, b1 * bs  # block ends
    for start, end, base in chain:
        if end < e0:
            continue
        if start >= e1:
            break
        lo = max(e0, (start // bs + 1) * bs)
        hi = min(e1, end - end % bs)
        if lo <= hi:
            out.extend(range(base + lo - start, base + hi - start + 1, bs))
    return out


def common_tokens(a: list[tuple[int, int, int]], b: list[tuple[int, int, int]]) -> int:
    """How many tokens from the start two requests' chains agree on."""
    for (start, end_a, base_a), (_, end_b, base_b) in zip(a, b):
        if base_a != base_b:
            return start
        if end_a != end_b:
            return min(end_a, end_b)
    return min(a[-1][1], b[-1][1])


def has_prefix_runs(workload: Workload) -> bool:
    """Whether any request of the workload shares a prefix (has runs besides its own)."""
    column = workload.columns.get("prefix")
    return column is not None and any(column)


class FreeQueue:
    """The cached free blocks in LRU order (vLLM's free queue past its unhashed head): a FIFO
    array with lazy deletion, so that appending, taking out and popping many blocks are numpy
    operations, not a Python step per block."""

    __slots__ = ("fifo", "head", "pos", "size", "tail")

    def __init__(self, num_blocks: int) -> None:
        self.fifo = np.empty(max(16, 4 * num_blocks), dtype=np.int64)
        self.pos = np.full(num_blocks, -1, dtype=np.int64)  # a block's index in fifo, or -1
        self.head = self.tail = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        """Blocks from the head (evicted first) to the tail."""
        window = self.fifo[self.head : self.tail]
        live = self.pos[window] == np.arange(self.head, self.tail)
        return iter(window[live].tolist())

    def append(self, blocks: np.ndarray) -> None:
        m = len(blocks)
        if self.tail + m > len(self.fifo):
            self._compact(m)
        self.fifo[self.tail : self.tail + m] = blocks
        self.pos[blocks] = np.arange(self.tail, self.tail + m)
        self.tail += m
        self.size += m

    def remove(self, blocks: np.ndarray) -> None:
        """Take blocks out (touched by a hit): their entries become stale."""
        self.pos[blocks] = -1
        self.size -= len(blocks)

    def pop(self, n: int) -> np.ndarray:
        """The n blocks at the head (the caller knows there are n)."""
        out = []
        while n:
            assert self.head < self.tail, "popped more cached free blocks than there are"
            window = self.fifo[self.head : min(self.head + max(4 * n, 256), self.tail)]
            live = np.flatnonzero(self.pos[window] == np.arange(self.head, self.head + len(window)))
            if len(live) > n:
                live = live[:n]
                self.head += int(live[-1]) + 1
            else:
                self.head += len(window)
            out.append(window[live])
            n -= len(live)
        blocks = out[0] if len(out) == 1 else np.concatenate(out)
        self.pos[blocks] = -1
        self.size -= len(blocks)
        return blocks

    def _compact(self, extra: int) -> None:
        window = self.fifo[self.head : self.tail]
        live = window[self.pos[window] == np.arange(self.head, self.tail)]
        if len(live) + extra > len(self.fifo):
            self.fifo = np.empty(2 * (len(live) + extra), dtype=np.int64)
        self.fifo[: len(live)] = live
        self.pos[live] = np.arange(len(live))
        self.head, self.tail = 0, len(live)


class PrefixCachingKV(KVBlockManager):
    """The GPU KV blocks of one instance with vLLM's prefix cache. `used` counts referenced
    blocks; `queries` and `hits` are vLLM's prefix-cache counters (tokens, at admissions)."""

    caching = True
    __slots__ = (
        "block_hash",
        "by_output",
        "cached",
        "chains",
        "duplicate",
        "duplicates",
        "hasher",
        "hashed",
        "hits",
        "lru",
        "plain",
        "queries",
        "ref",
        "tables",
    )

    def __init__(self, num_blocks: int, block_size: int = 16, hasher: BlockHasher | None = None):
        super().__init__(num_blocks, block_size)
        self.hasher = hasher or BlockHasher()
        self.ref = np.zeros(num_blocks, dtype=np.int64)
        self.block_hash = np.zeros(num_blocks, dtype=np.int64)  # 0: no identity
        self.plain = list(range(num_blocks - 1, -1, -1))  # free, no identity (head = end)
        self.lru = FreeQueue(num_blocks)  # free, with identity: head first
        self.cached: dict[int, int] = {}  # identity -> block (the first one cached)
        # identity -> the blocks cached with it after the first (vLLM keeps duplicates: a block
        # computed again while an identical one is cached, e.g. a fully cached prompt's last)
        self.duplicates: dict[int, list[int]] = {}
        self.duplicate = np.zeros(num_blocks, dtype=bool)  # a block in duplicates' lists
        self.tables: dict[RequestState, list[int]] = {}  # a request's blocks, in order
        self.hashed: dict[RequestState, int] = {}  # its leading blocks that have identities
        self.chains: dict[RequestState, list[tuple[int, int, int]]] = {}
        # the requests holding blocks, by the identity base of their output run: output blocks
        # are cached lazily (when the request frees them, or a lookup needs them)
        self.by_output: dict[int, RequestState] = {}
        self.queries = 0
        self.hits = 0

    # --- identities ---------------------------------------------------------------------------
    def chain(self, state: RequestState) -> list[tuple[int, int, int]]:
        chain = self.chains.get(state)
        if chain is None:
            chain = self.hasher.chain(state.request.continuation)
            if state in self.tables:  # kept while it holds blocks
                self.chains[state] = chain
        return chain

    def _cache_output(self, state: RequestState) -> None:
        """Cache the request's full blocks up to what it has computed: its output's (and a
        recomputed output's) blocks are cached only now, not as each one fills."""
        full = state.computed // self.block_size
        if full > self.hashed.get(state, 0):
            self._cache(state, full)

    def lookup(self, state: RequestState, known: int = 0) -> list[int]:
        """The blocks a request admitted now would hit: the longest cached run of its blocks
        from the start, below its last token (vLLM recomputes that one for its logits).
        With `known`, its first `known` blocks are known to be cached (the caller checked
        them): only the blocks after them are returned, and only those are looked up."""
        bs = self.block_size
        limit = (state.num_tokens - 1) // bs
        cached = self.cached
        hit: list[int] = []
        if not limit or not cached:
            return hit
        e_max = limit * bs
        e_known = known * bs  # the end of the last known block
        get = cached.get
        holders = self.by_output
        for start, end, base in self.chain(state):
            holder = holders.get(base)
            if holder is not None and holder is not state:  # a running request's output
                self._cache_output(holder)
            lo = (start // bs + 1) * bs
            if lo <= e_known:
                lo = e_known + bs
            hi = end - end % bs
            if hi > e_max:
                hi = e_max
            if lo <= hi:
                if get(base + lo - start) is None:
                    return hit
                found = list(map(get, range(base + lo - start, base + hi - start + 1, bs)))
                if None in found:
                    hit += found[: found.index(None)]
                    return hit
                hit += found
            if hi == e_max:
                break
        return hit

    def _still_cached(self, blocks: np.ndarray, idents: np.ndarray) -> bool:
        """Whether these blocks, found by a lookup with these identities, are still what a
        lookup returns: each still holds its identity and is the block cached under it (not a
        duplicate)."""
        return np.array_equal(self.block_hash[blocks], idents) and not self.duplicate[blocks].any()

    # --- admission, growth, freeing -----------------------------------------------------------
    def admit_cached(
        self,
        state: RequestState,
        hit_tokens: int,
        found: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """A request that has computed nothing is admitted with `hit_tokens` from the cache:
        touch its hit blocks (vLLM's counters record the admission). `found`: the hit blocks
        the plan found and their identities, if any; when they are still cached they are not
        looked up again."""
        self.queries += state.num_tokens
        self.hits += hit_tokens
        if not hit_tokens:
            return
        if state not in self.chains:  # kept from now on (it holds blocks)
            self.chains[state] = self.hasher.chain(state.request.continuation)
        n = hit_tokens // self.block_size
        if found is not None and len(found[0]) and self._still_cached(*found):
            k = len(found[0])
            rest = self.lookup(state, k)[: n - k]
            arr = np.concatenate((found[0], np.asarray(rest, dtype=np.int64))) if rest else found[0]
            blocks = arr.tolist()
        else:
            blocks = self.lookup(state)[:n]
            arr = np.asarray(blocks)
        if blocks:
            free = arr[self.ref[arr] == 0]
            self.lru.remove(free)
            self.used += len(free)
            self.ref[arr] += 1
        self.tables[state] = blocks
        self.hashed[state] = len(blocks)
        self.by_output[self.chain(state)[-1][2]] = state
        state.blocks = len(blocks)

    def grow_to(self, state: RequestState, tokens: int, computed: int | None = None) -> int:
        """Allocate so that `state` holds blocks for `tokens` tokens, and cache its full blocks
        among the first `computed` tokens (default `tokens`): those computed or being computed
        in the step now scheduled. Returns blocks added."""
        bs = self.block_size
        need = -(-tokens // bs) - state.blocks
        if need > 0:
            if need > self.num_blocks - self.used:
                raise RuntimeError(
                    f"KV over-allocation on {state.request_id}: needs {need} blocks, "
                    f"{self.num_blocks - self.used} free (a policy scheduled more than fits)"
                )
            table = self.tables.get(state)
            if table is None:
                table = self.tables[state] = []
                self.by_output[self.chain(state)[-1][2]] = state
            table += self._pop(need)
            state.blocks += need
            self.used += need
        else:
            need = 0
        # (Comparisons, not min() and max(): this runs for every request in every step.)
        if computed is None:
            computed = tokens
        if computed > state.prompt_tokens:  # the output's blocks: later (_cache_output)
            computed = state.prompt_tokens
        full = computed // bs
        if full and full > self.hashed.get(state, 0):
            self._cache(state, full)
        return need

    def _pop(self, n: int) -> list[int]:
        """n blocks from the free queue's head: unhashed ones first, then the least recently
        freed cached ones, whose identities are evicted now."""
        plain = self.plain
        rest = len(plain) - n
        if rest < 0:
            rest = 0
        take = len(plain) - rest
        out = plain[rest:]
        del plain[rest:]
        ref = self.ref
        if n <= 4:  # a decode's next block: scalar steps (item(), not numpy scalars) cost less
            if n > take:
                lru = self.lru
                fifo, pos, head = lru.fifo, lru.pos, lru.head
                block_hash, cached, duplicates = self.block_hash, self.cached, self.duplicates
                for _ in range(n - take):
                    b = fifo.item(head)
                    while pos.item(b) != head:  # stale entries
                        head += 1
                        b = fifo.item(head)
                    head += 1
                    pos[b] = -1
                    ident = block_hash.item(b)
                    block_hash[b] = 0
                    if duplicates and ident in duplicates:
                        self._evict(ident, b)
                    else:
                        del cached[ident]
                    out.append(b)
                lru.head = head
                lru.size -= n - take
            for b in out:
                ref[b] = 1
            return out
        if n > take:
            evicted = self.lru.pop(n - take)
            idents = self.block_hash[evicted].tolist()
            self.block_hash[evicted] = 0
            ref[evicted] = 1
            evicted = evicted.tolist()
            if self.duplicates and not self.duplicates.keys().isdisjoint(idents):
                for b, ident in zip(evicted, idents):
                    self._evict(ident, b)
            else:
                deque(map(self.cached.__delitem__, idents), maxlen=0)
        if take:
            ref[out] = 1
        return out + evicted if n > take else out

    def _evict(self, ident: int, block: int) -> None:
        others = self.duplicates.get(ident)
        if others is None:
            del self.cached[ident]
        elif self.cached[ident] == block:
            first = self.cached[ident] = others.pop(0)
            self.duplicate[first] = False
        else:
            others.remove(block)
            self.duplicate[block] = False
        if others is not None and not others:
            del self.duplicates[ident]

    def _cache(self, state: RequestState, full: int) -> None:
        """Give blocks hashed .. full - 1 of the request their identities."""
        first = self.hashed.get(state, 0)
        blocks = self.tables[state][first:full]
        idents = identities(self.chain(state), first, full, self.block_size)
        m = len(blocks)  # (arrays from iterators: numpy converts lists more slowly)
        self.block_hash[np.fromiter(blocks, np.int64, m)] = np.fromiter(idents, np.int64, m)
        # (one pass: a block is new under its identity unless another one is cached there, a
        # duplicate; the blocks given identities now had none, so none of them is cached yet)
        first_cached = list(map(self.cached.setdefault, idents, blocks))
        if first_cached != blocks:
            duplicates = self.duplicates
            for ident, b, c in zip(idents, blocks, first_cached):
                if c != b:
                    duplicates.setdefault(ident, []).append(b)
                    self.duplicate[b] = True
        self.hashed[state] = full

    def free_request(self, state: RequestState) -> None:
        """Free the request's blocks tail first: cached ones to the LRU tail, others to the
        head (reused first)."""
        if state not in self.tables:
            state.blocks = 0
            return
        self._cache_output(state)
        table = self.tables.pop(state)
        self.hashed.pop(state, None)
        self.by_output.pop(self.chain(state)[-1][2], None)
        self.chains.pop(state, None)
        state.blocks = 0
        if not table:
            return
        blocks = np.asarray(table[::-1])
        ref = self.ref
        ref[blocks] -= 1
        freed = blocks[ref[blocks] == 0]
        hashed = self.block_hash[freed] != 0
        self.lru.append(freed[hashed])
        self.plain += freed[~hashed].tolist()
        self.used -= len(freed)
        assert self.used >= 0, "KV blocks under-counted"

    # --- checks (tests) -----------------------------------------------------------------------
    def check(self) -> None:
        """Assert the pool's invariants: every block free or referenced, never both; counts
        add up; reference counts equal the requests holding each block."""
        held = np.zeros(self.num_blocks, dtype=np.int64)
        for table in self.tables.values():
            held[table] += 1  # (a request holds a block once)
        assert np.array_equal(held, self.ref), "reference counts differ from holders"
        lru = list(self.lru)
        assert len(lru) == len(self.lru)
        free = set(self.plain) | set(lru)
        assert len(free) == len(self.plain) + len(lru), "a block is free twice"
        for b in range(self.num_blocks):
            assert self.ref[b] >= 0
            assert (b in free) == (self.ref[b] == 0), f"block {b} free and referenced"
        assert all(self.block_hash[lru]) and not any(self.block_hash[self.plain])
        assert self.used == self.num_blocks - len(free), "used != referenced blocks"
        holders = {b: i for i, b in self.cached.items()}
        for ident, others in self.duplicates.items():
            assert others and ident in self.cached
            holders.update((b, ident) for b in others)
        dup = [b for others in self.duplicates.values() for b in others]
        assert sorted(dup) == np.flatnonzero(self.duplicate).tolist()
        hashed = np.flatnonzero(self.block_hash)
        assert sorted(holders) == hashed.tolist()
        assert all(self.block_hash[b] == i for b, i in holders.items())
