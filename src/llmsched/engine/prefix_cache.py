"""vLLM V1's automatic prefix caching (0.32): a KV block pool whose full blocks are shared.

As `vllm/v1/core/block_pool.py` and `kv_cache_manager.py` do it, block by block:

* A full block's identity fingerprints every token up to its end (vLLM: a hash chain over the
  token ids). Requests here have no token ids but runs (`Request.runs`): a block's identity is
  the run its last token falls in, the runs before that run, and the offset in the run; two
  requests get the same identity for block i exactly when their runs agree on its tokens and
  all before them. Output tokens are the run ("out", request_id) after the prompt.
* Blocks are shared by reference count. A block enters the cache when the step that computes
  its last token is scheduled (`cache_blocks`), output blocks included. (Here blocks filled
  by decoding enter it lazily, when the request frees its blocks or another request's lookup
  reaches its output, so that decoding costs nothing per block filled; lookups see the same
  cache. Output blocks recomputed after a preemption enter it when scheduled, as a prompt's.)
* The cache itself (vLLM: a dict from block hash to block) is a table with a slot per block
  position of each run cached here, side by side (`PrefixCachingKV`), so that caching,
  looking up and evicting are array operations rather than a dict operation per block.
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

from collections.abc import Callable, Hashable

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
        self.fifo: np.ndarray = np.empty(max(16, 4 * num_blocks), dtype=np.int64)
        # a block's index in fifo, or -1
        self.pos: np.ndarray = np.full(num_blocks, -1, dtype=np.int64)
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
            window = self.fifo[self.head : min(self.head + n + 64, self.tail)]
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
    blocks; `queries` and `hits` are vLLM's prefix-cache counters (tokens, at admissions).

    The cache (vLLM: a dict from block hash to block) is a table of slots, one per block
    position of each run that has had a block cached here: the blocks of a run sit side by
    side, so that caching, looking up and evicting a request's blocks are array operations,
    not a dict operation per block. A slot's entry counts only while its block still holds the
    slot's identity (`block_hash`): evicting a block just drops its identity, and entries left
    behind are overwritten or compacted away."""

    __slots__ = (
        "block_hash",
        "by_output",
        "compact_at",
        "duplicate",
        "duplicates",
        "hasher",
        "hashed",
        "hits",
        "lru",
        "n_slots",
        "plain",
        "queries",
        "ref",
        "slot_block",
        "slot_ident",
        "slots",
        "steps",
        "tables",
    )

    def __init__(self, num_blocks: int, block_size: int = 16, hasher: BlockHasher | None = None):
        super().__init__(num_blocks, block_size, caching=True)
        self.hasher = hasher or BlockHasher()
        self.ref: np.ndarray = np.zeros(num_blocks, dtype=np.int64)
        # a block's identity (0: none); one entry more, 0, for the table's empty mark
        self.block_hash: np.ndarray = np.zeros(num_blocks + 1, dtype=np.int64)
        self.plain = list(range(num_blocks - 1, -1, -1))  # free, no identity (head = end)
        self.lru = FreeQueue(num_blocks)  # free, with identity: head first
        # run (its identity base) -> (first slot, slots, the run's first token)
        self.slots: dict[int, tuple[int, int, int]] = {}
        size = 2 * num_blocks + 64  # (compacted at 2 * num_blocks: small caches compact too)
        # slot -> block (num_blocks: none), and the identity the slot holds
        self.slot_block: np.ndarray = np.full(size, num_blocks, dtype=np.int64)
        self.slot_ident: np.ndarray = np.zeros(size, dtype=np.int64)
        # identity steps in a run
        self.steps: np.ndarray = block_size * np.arange(1024, dtype=np.int64)
        self.n_slots = 0
        self.compact_at = 2 * num_blocks
        # identity -> the blocks cached with it after the first (vLLM keeps duplicates: a block
        # computed again while an identical one is cached, e.g. a fully cached prompt's last)
        self.duplicates: dict[int, list[int]] = {}
        self.duplicate: np.ndarray = np.zeros(num_blocks, dtype=bool)  # in duplicates' lists
        # a request's blocks in order: the first `state.blocks` of an array sized for its
        # whole sequence (so that allocating and freeing are array operations)
        self.tables: dict[RequestState, np.ndarray] = {}
        self.hashed: dict[RequestState, int] = {}  # its leading blocks that have identities
        # the requests holding blocks, by the identity base of their output run: output blocks
        # are cached lazily (when the request frees them, or a lookup needs them)
        self.by_output: dict[int, RequestState] = {}
        self.queries = 0
        self.hits = 0

    # --- identities ---------------------------------------------------------------------------
    def chain(self, state: RequestState) -> list[tuple[int, int, int]]:
        """The request's runs as (start, end, identity base), worked out once per request."""
        known = state.block_chain
        if known is not None and known[0] is self.hasher:
            return known[1]
        chain = self.hasher.chain(state.request.continuation)
        state.block_chain = (self.hasher, chain)
        return chain

    def _cache_output(self, state: RequestState) -> None:
        """Cache the request's full blocks up to what it has computed: its output's (and a
        recomputed output's) blocks are cached only now, not as each one fills."""
        full = state.computed // self.block_size
        if full > self.hashed.get(state, 0):
            self._cache(state, full)

    # --- the slot table -----------------------------------------------------------------------
    def _place(self, base: int, start: int, end: int) -> int:
        """The slot of the first block that ends in this run, with a slot for every block that
        ends in it (a run seen again longer moves to a larger range; the caller made room)."""
        bs = self.block_size
        need = end // bs - start // bs
        entry = self.slots.get(base)
        if entry is not None and entry[1] >= need:
            return entry[0]
        first = self.n_slots
        self.n_slots += need
        # the identity of the run's k-th block: its end's offset in the run
        if need > len(self.steps):
            self.steps = bs * np.arange(2 * need, dtype=np.int64)
        np.add(
            self.steps[:need],
            base + (start // bs + 1) * bs - start,
            out=self.slot_ident[first : first + need],
        )
        if entry is not None:  # move the cached blocks along; the old range is left empty
            old, n, _ = entry
            self.slot_block[first : first + n] = self.slot_block[old : old + n]
            self.slot_block[old : old + n] = self.num_blocks
        self.slots[base] = (first, need, start)
        return first

    def _slot(self, ident: int) -> int:
        """The slot of an identity whose run is in the table."""
        offset = ident % STRIDE
        first, _, start = self.slots[ident - offset]
        return first + (start + offset) // self.block_size - 1 - start // self.block_size

    def _make_room(self, need: int) -> None:
        if self.n_slots > self.compact_at:
            self._compact()
        if self.n_slots + need > len(self.slot_block):
            size = max(2 * len(self.slot_block), self.n_slots + need)
            table: np.ndarray = np.full(size, self.num_blocks, dtype=np.int64)
            table[: self.n_slots] = self.slot_block[: self.n_slots]
            ident: np.ndarray = np.zeros(size, dtype=np.int64)
            ident[: self.n_slots] = self.slot_ident[: self.n_slots]
            self.slot_block, self.slot_ident = table, ident

    def _compact(self) -> None:
        """Drop the runs with no block cached any more and close up the others' ranges, so that
        the table stays proportional to the cache, not to every run ever cached."""
        n = self.n_slots
        items = list(self.slots.items())
        first = np.fromiter((e[0] for _, e in items), np.int64, len(items))
        size = np.fromiter((e[1] for _, e in items), np.int64, len(items))
        valid = self.block_hash[self.slot_block[:n]] == self.slot_ident[:n]
        counts = np.concatenate(([0], np.cumsum(valid)))
        live = np.flatnonzero(counts[first + size] > counts[first])
        index = _ranges(first[live], size[live])
        m = len(index)
        self.slot_block[:m] = self.slot_block[index]
        self.slot_ident[:m] = self.slot_ident[index]
        self.slot_block[m:n] = self.num_blocks
        moved = (np.cumsum(size[live]) - size[live]).tolist()
        self.slots = {
            items[i][0]: (new, items[i][1][1], items[i][1][2])
            for i, new in zip(live.tolist(), moved)
        }
        self.n_slots = m
        self.compact_at = max(2 * self.num_blocks, 2 * m)

    def cached_blocks(self) -> dict[int, int]:
        """Identity -> the block cached under it (the first, if duplicates): vLLM's hash map."""
        out: dict[int, int] = {}
        for first, n, _ in self.slots.values():
            blocks = self.slot_block[first : first + n]
            idents = self.slot_ident[first : first + n]
            live = self.block_hash[blocks] == idents
            out.update(zip(idents[live].tolist(), blocks[live].tolist()))
        return out

    def lookup(self, state: RequestState, known: int = 0) -> np.ndarray:
        """The blocks a request admitted now would hit: the longest cached run of its blocks
        from the start, below its last token (vLLM recomputes that one for its logits).
        With `known`, its first `known` blocks are known to be cached (the caller checked
        them): only the blocks after them are returned, and only those are looked up."""
        bs = self.block_size
        limit = (state.num_tokens - 1) // bs  # blocks that may hit
        if limit <= known:
            return NO_BLOCKS
        chain = self.chain(state)
        holders = self.by_output
        for _, _, base in chain:
            holder = holders.get(base)
            if holder is not None and holder is not state:  # a running request's output
                self._cache_output(holder)
        slots = self.slots
        ranges: list[tuple[int, int]] = []
        for start, end, base in chain:
            lo, hi = start // bs, end // bs  # the blocks ending in this run
            if hi <= known:
                continue
            if lo < known:
                lo = known
            if hi > limit:
                hi = limit
            if lo < hi:
                entry = slots.get(base)
                if entry is None:
                    break
                first, n, run_start = entry
                first -= run_start // bs
                if hi > run_start // bs + n:  # seen shorter: the rest is not cached
                    hi = run_start // bs + n
                    if lo < hi:
                        ranges.append((first + lo, hi - lo))
                    break
                ranges.append((first + lo, hi - lo))
            if hi >= limit:
                break
        if not ranges:
            return NO_BLOCKS
        blocks, idents = self._slots_of(ranges)
        live = self.block_hash[blocks] == idents
        if live.all():
            return blocks.copy() if len(ranges) == 1 else blocks
        return blocks[: int(np.argmin(live))].copy()

    def cached_at(
        self,
        state: RequestState,
        j0: int,
        j1: int,
        survives: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        """The block a lookup would find at each of the request's block positions j0 .. j1 - 1
        (`num_blocks` where none), past misses too: the cached one, or, where it does not
        `survive` (evictions a caller foresees), the first surviving duplicate (vLLM keeps
        identical blocks in the order they were cached and returns the first)."""
        bs = self.block_size
        nb = self.num_blocks
        out: np.ndarray = np.full(j1 - j0, nb, dtype=np.int64)
        idents: np.ndarray = np.zeros(j1 - j0, dtype=np.int64)
        for start, end, base in self.chain(state):
            lo, hi = start // bs, end // bs  # the blocks ending in this run
            if hi <= j0:
                continue
            if lo >= j1:
                break
            entry = self.slots.get(base)
            if entry is None:
                continue
            first, n = entry[0] - lo, entry[1]
            a, b = max(lo, j0), min(hi, j1, lo + n)
            if a < b:
                blocks, ids = self._slots_of([(first + a, b - a)])
                live = self.block_hash[blocks] == ids
                out[a - j0 : b - j0] = np.where(live, blocks, nb)
                idents[a - j0 : b - j0] = ids
        if survives is not None:
            cached = out < nb
            lost = cached.copy()
            lost[cached] = ~survives(out[cached])
            out[lost] = nb
            for k in np.flatnonzero(lost).tolist() if self.duplicates else ():
                for b in self.duplicates.get(int(idents[k]), ()):
                    if survives(np.array([b]))[0]:
                        out[k] = b
                        break
        return out

    def _slots_of(self, ranges: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """The blocks and identities of these slot ranges (first slot, count), side by side:
        views of the table for one range, copies for several."""
        if len(ranges) == 1:
            a, n = ranges[0]
            return self.slot_block[a : a + n], self.slot_ident[a : a + n]
        return (
            np.concatenate([self.slot_block[a : a + n] for a, n in ranges]),
            np.concatenate([self.slot_ident[a : a + n] for a, n in ranges]),
        )

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
        n = hit_tokens // self.block_size
        if found is not None and len(found[0]) and self._still_cached(*found):
            k = len(found[0])
            blocks = found[0][:n]
            if k < n:
                blocks = np.concatenate((blocks, self.lookup(state, k)[: n - k]))
        else:
            blocks = self.lookup(state)[:n]
        if len(blocks):
            free = blocks[self.ref[blocks] == 0]
            self.lru.remove(free)
            self.used += len(free)
            self.ref[blocks] += 1
        table = self.tables[state] = self._new_table(state, len(blocks))
        table[: len(blocks)] = blocks
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
                table = self.tables[state] = self._new_table(state, need)
                self.by_output[self.chain(state)[-1][2]] = state
            elif state.blocks + need > len(table):
                table = self.tables[state] = np.concatenate((table, table))
            self._pop(table, state.blocks, need)
            state.blocks += need
            self.used += need
        else:
            need = 0
        # (Comparisons, not min() and max(): this runs for every request in every step.)
        if computed is None:
            computed = tokens
        if (
            computed > state.prompt_tokens
            and state.computed + 1 >= state.prompt_tokens + state.generated
        ):
            computed = state.prompt_tokens  # a decode: its output's blocks later (_cache_output)
        full = computed // bs
        if full and full > self.hashed.get(state, 0):
            self._cache(state, full)
        return need

    def _new_table(self, state: RequestState, blocks: int) -> np.ndarray:
        """An empty block table with room for the request's whole sequence."""
        whole = -(-(state.prompt_tokens + state.output_tokens) // self.block_size)
        return np.empty(whole if whole > blocks else blocks, dtype=np.int64)

    def table(self, state: RequestState) -> np.ndarray:
        """The blocks the request holds, in order."""
        return self.tables[state][: state.blocks]

    def _pop(self, table: np.ndarray, at: int, n: int) -> None:
        """Put n blocks from the free queue's head in table[at : at + n]: unhashed ones first,
        then the least recently freed cached ones, whose identities are evicted now (their
        slots in the cache lapse)."""
        plain = self.plain
        rest = len(plain) - n
        if rest < 0:
            rest = 0
        take = len(plain) - rest
        ref = self.ref
        if n <= 4:  # a decode's next block: scalar steps (item(), not numpy scalars) cost less
            for b in plain[rest:]:
                table[at] = b
                ref[b] = 1
                at += 1
            del plain[rest:]
            if n > take:
                lru = self.lru
                fifo, pos, head = lru.fifo, lru.pos, lru.head
                block_hash, duplicates = self.block_hash, self.duplicates
                for _ in range(n - take):
                    b = fifo.item(head)
                    while pos.item(b) != head:  # stale entries
                        head += 1
                        b = fifo.item(head)
                    head += 1
                    pos[b] = -1
                    if duplicates:
                        self._evict(block_hash.item(b), b)
                    block_hash[b] = 0
                    ref[b] = 1
                    table[at] = b
                    at += 1
                lru.head = head
                lru.size -= n - take
            return
        if take:
            table[at : at + take] = plain[rest:]
            del plain[rest:]
        if n > take:
            evicted = self.lru.pop(n - take)
            if self.duplicates:
                for b, ident in zip(evicted.tolist(), self.block_hash[evicted].tolist()):
                    self._evict(ident, b)
            self.block_hash[evicted] = 0
            table[at + take : at + n] = evicted
        ref[table[at : at + n]] = 1

    def _evict(self, ident: int, block: int) -> None:
        """Evict a block that has duplicates: the next one becomes the cached one."""
        others = self.duplicates.get(ident)
        if others is None:
            return  # the table's entry lapses with the identity
        slot = self._slot(ident)
        if self.slot_block[slot] == block:
            first = others.pop(0)
            self.slot_block[slot] = first
            self.duplicate[first] = False
        else:
            others.remove(block)
            self.duplicate[block] = False
        if not others:
            del self.duplicates[ident]

    def _cache(self, state: RequestState, full: int) -> None:
        """Give blocks hashed .. full - 1 of the request their identities, and enter each in
        its run's slot unless an identical block is cached there already (a duplicate)."""
        first = self.hashed.get(state, 0)
        bs = self.block_size
        runs = [r for r in self.chain(state) if r[1] // bs > first and r[0] // bs < full]
        need = 0  # slots for the runs not in the table yet (or longer now)
        for start, end, base in runs:
            entry = self.slots.get(base)
            if entry is None or entry[1] < end // bs - start // bs:
                need += end // bs - start // bs
        if self.n_slots + need > len(self.slot_block):
            self._make_room(need)
        ranges = []
        for start, end, base in runs:
            lo, hi = start // bs, end // bs  # the blocks ending in this run
            slot = self._place(base, start, end) - lo
            if lo < first:
                lo = first
            if hi > full:
                hi = full
            if lo < hi:
                ranges.append((slot + lo, hi - lo))
        blocks = self.tables[state][first:full]
        current, idents = self._slots_of(ranges)
        held = self.block_hash[current] == idents  # an identical block is cached: a duplicate
        self.block_hash[blocks] = idents
        if held.any():
            for ident, b in zip(idents[held].tolist(), blocks[held].tolist()):
                self.duplicates.setdefault(ident, []).append(b)
                self.duplicate[b] = True
            blocks = np.where(held, current, blocks)  # (those cached stay in their slots)
        at = 0
        for a, n in ranges:
            self.slot_block[a : a + n] = blocks[at : at + n]
            at += n
        self.hashed[state] = full

    def free_request(self, state: RequestState) -> None:
        """Free the request's blocks tail first: cached ones to the LRU tail, others to the
        head (reused first)."""
        if state not in self.tables:
            state.blocks = 0
            return
        self._cache_output(state)
        blocks = self.table(state)[::-1]
        del self.tables[state]
        self.hashed.pop(state, None)
        self.by_output.pop(self.chain(state)[-1][2], None)
        state.blocks = 0
        if not len(blocks):
            return
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
        add up; reference counts equal the requests holding each block; every identity is the
        one its position in its holder's runs gives, and is found where lookups look."""
        held: np.ndarray = np.zeros(self.num_blocks, dtype=np.int64)
        for state in self.tables:
            held[self.table(state)] += 1  # (a request holds a block once)
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
        for state in self.tables:
            hashed = self.hashed.get(state, 0)
            want = identities(self.chain(state), 0, hashed, self.block_size)
            assert self.block_hash[self.table(state)[:hashed]].tolist() == want, (
                "identity off its position"
            )
        cached = self.cached_blocks()
        holders = {b: i for i, b in cached.items()}
        assert len(holders) == len(cached), "a block cached under two identities"
        for ident, others in self.duplicates.items():
            assert others and ident in cached
            holders.update((b, ident) for b in others)
        dup = [b for others in self.duplicates.values() for b in others]
        assert sorted(dup) == np.flatnonzero(self.duplicate).tolist()
        identified = np.flatnonzero(self.block_hash)
        assert sorted(holders) == identified.tolist(), "a block with an identity is not cached"
        assert all(self.block_hash[b] == i for b, i in holders.items())
        assert all(
            self._slot(i) >= 0 and self.slot_block[self._slot(i)] == b for i, b in cached.items()
        )


NO_BLOCKS: np.ndarray = np.empty(0, dtype=np.int64)
NO_BLOCKS.flags.writeable = False


def _ranges(first: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The indexes first[0] .. first[0] + size[0] - 1, then first[1] .. , side by side."""
    ends = np.cumsum(size)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(first - (ends - size), size)
