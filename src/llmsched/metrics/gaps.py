"""A run's inter-token gaps, pooled: vLLM's ITL is a statistic of every gap of every request.

Two stores behind one interface. :class:`GapPool` keeps the gaps themselves: what a client
measured (``llmsched bench``, a gateway). :class:`LoggedGaps` keeps where a simulated request's
tokens are in the instances' iteration logs, and reads the gaps from there when asked: a token
is made at the end of an iteration, a request's tokens are runs of consecutive iterations of one
instance, so most of its gaps are durations of iterations shared by every request decoding in
them. At a million requests that is 12 bytes per run instead of 4 per gap (0.8 GB).

Both give the same float32 gaps, in the same order (requests as they ended, each request's gaps
in token order): ``gaps[lo:hi]`` is a block of them, ``len(gaps)`` their number, and
``order_statistics(ranks)`` the values at those ranks of the sorted gaps, which is what exact
percentiles need. ``np.asarray(gaps)`` is all of them at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from llmsched.engine.instance import IterationLog
    from llmsched.metrics.record import RequestRecord


class Growable:
    """A 1-D numpy array with amortised O(1) appends (capacity grows by `growth`)."""

    __slots__ = ("_buf", "_growth", "_n")

    def __init__(self, dtype: Any, capacity: int = 256, growth: float = 2.0) -> None:
        self._buf = np.empty(capacity, dtype=dtype)
        self._n = 0
        self._growth = growth

    def __len__(self) -> int:
        return self._n

    def _reserve(self, extra: int) -> None:
        need = self._n + extra
        if need > len(self._buf):
            new = np.empty(max(need, int(self._growth * len(self._buf))), dtype=self._buf.dtype)
            new[: self._n] = self._buf[: self._n]
            self._buf = new

    def append(self, value: Any) -> None:
        if self._n == len(self._buf):
            self._reserve(1)
        self._buf[self._n] = value
        self._n += 1

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` values in all (a no-op when there is)."""
        self._reserve(capacity - self._n)

    def extend(self, values: Sequence | np.ndarray) -> None:
        k = len(values)
        if k:
            self._reserve(k)
            self._buf[self._n : self._n + k] = values
            self._n += k

    def widen(self, dtype: Any) -> None:
        """Change the element type (used to make a fixed-width string column wider)."""
        self._buf = self._buf.astype(dtype)

    @property
    def dtype(self) -> np.dtype:
        return self._buf.dtype

    def view(self) -> np.ndarray:
        return self._buf[: self._n]


@runtime_checkable
class GapStore(Protocol):
    """What statistics read of a run's pooled gaps (GapPool, LoggedGaps)."""

    def __len__(self) -> int: ...

    def __getitem__(self, block: slice) -> np.ndarray: ...

    def order_statistics(self, ranks: Sequence[int]) -> np.ndarray: ...


LOW_HALF = np.uint64(0xFFFFFFFF)
#: Gaps a LoggedGaps reads at a time (its temporaries: 16 bytes a gap).
PIECE = 1 << 20


class GapPool:
    """The gaps themselves, float32 (7 significant digits: far below a microsecond for any
    gap), in a buffer that grows by half."""

    def __init__(self) -> None:
        self._pool = Growable(np.float32, capacity=4096, growth=1.5)

    def add(self, record: RequestRecord, itl: np.ndarray) -> None:
        """The request's gaps between visible tokens (`itl`, as per_request_metrics gives)."""
        self._pool.extend(itl)

    def add_many(self, records: Sequence[RequestRecord], itls: Sequence[np.ndarray]) -> None:
        """:meth:`add` each record with its gaps, in order."""
        if records:
            self._pool.extend(np.concatenate(itls))

    def __len__(self) -> int:
        return len(self._pool)

    def __getitem__(self, block: slice) -> np.ndarray:
        return self._pool.view()[block]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        v = self._pool.view()
        return v if dtype is None else v.astype(dtype)

    def order_statistics(self, ranks: Sequence[int]) -> np.ndarray:
        """The gaps at these 0-based ranks of the sorted pool (one partitioned copy)."""
        return np.partition(self._pool.view(), list(ranks))[list(ranks)]


class LoggedGaps:
    """Gaps read from the iteration logs of a simulated run (instance `i`'s iteration `j` ended
    at ``logs[i].data[j]``), each token time plus `offset` (what the serving stack adds).

    A request is kept as the runs ``(instance, first iteration, count)`` of its visible tokens
    (`RequestRecord.token_runs`, less its reasoning tokens). Its gaps inside a run are
    differences of consecutive iteration ends; between runs (it waited, was preempted or
    migrated), of the ends around the wait. Each is computed as the pooled gap would be, the
    difference of the two float64 token times rounded to float32, so the gaps, their order and
    every statistic of them are those of a :class:`GapPool` fed the records' token times.
    """

    def __init__(self, logs: list[IterationLog], offset: float = 0.0) -> None:
        self.logs = logs  # (live: the run appends to them)
        self.offset = offset
        self._runs = Growable(np.int32, capacity=3 * 4096)  # flat: instance, first, count, ...
        self._per_request = Growable(np.int32, capacity=4096)  # each request's gaps, in order
        self._n = 0
        self._times_key: tuple[int, ...] = ()
        self._times = self._starts = np.zeros(0)
        # The last block read, (gaps before it, its gaps): statistics read a block, then
        # smaller pieces of it (latency_stats_ms's mean, then its squared deviations).
        self._block: tuple[int, np.ndarray] = (0, np.zeros(0, dtype=np.float32))
        self._index_of = -1  # the requests _index_cache was made for
        self._index_cache: tuple[np.ndarray, ...] = ()

    def add(self, record: RequestRecord, itl: np.ndarray) -> None:
        """The request's gaps between visible tokens are `itl`: its runs from its first visible
        token on are kept instead (checked against `itl`'s length)."""
        self.add_many([record], [itl])

    def add_many(self, records: Sequence[RequestRecord], itls: Sequence[np.ndarray]) -> None:
        """:meth:`add` each record with its gaps, in order (all of them, or on an error none)."""
        kept_runs: list[int] = []
        counts: list[int] = []
        for record, itl in zip(records, itls):
            n = len(itl)
            counts.append(n)
            if not n:
                continue
            runs = record.token_runs
            if runs is None:
                raise ValueError(
                    f"request {record.request_id!r} has no token_runs: gaps read from iteration "
                    "logs need every finished request's runs (a simulator's record)"
                )
            kept = 0
            skip = record.reasoning_tokens  # hidden tokens: not among the gaps
            for i in range(0, len(runs), 3):
                inst, first, count = runs[i], runs[i + 1], runs[i + 2]
                if skip >= count:
                    skip -= count
                    continue
                kept_runs += (inst, first + skip, count - skip)
                kept += count - skip
                skip = 0
            if kept != n + 1:
                raise ValueError(
                    f"request {record.request_id!r}: its token runs hold {kept} visible tokens, "
                    f"its token times {n + 1}"
                )
        self._runs.extend(kept_runs)
        self._per_request.extend(counts)
        self._n += sum(counts)

    def __len__(self) -> int:
        return self._n

    # --- reading the logs -------------------------------------------------------------------
    def _token_times(self) -> tuple[np.ndarray, np.ndarray]:
        """Every iteration's end plus the offset, instance after instance (float64, as a record's
        token times are), and where each instance's part starts."""
        key = tuple(log.size for log in self.logs)
        if key != self._times_key:
            parts = [log.data[: log.size] for log in self.logs]
            times = np.concatenate(parts) if parts else np.zeros(0)
            if self.offset:
                times += self.offset
            self._times, self._times_key = times, key
            self._starts = np.concatenate(([0], np.cumsum(key)[:-1])).astype(np.int64)
        return self._times, self._starts

    def __getitem__(self, block: slice) -> np.ndarray:
        lo, hi, step = block.indices(self._n)
        if step != 1:
            raise ValueError("gaps are read in contiguous blocks")
        at, gaps = self._block
        if not (at <= lo and hi <= at + len(gaps)):  # (a request's gaps never change)
            at, gaps = self._block = self._read(lo, hi)
        return gaps[lo - at : hi - at]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        at, gaps = self._read(0, self._n)  # (not kept: it may be every gap of a long run)
        return gaps if dtype is None else gaps.astype(dtype)

    def _read(self, lo: int, hi: int) -> tuple[int, np.ndarray]:
        """The gaps of the requests that hold gaps lo..hi-1, and the offset of the first: read
        PIECE gaps at a time into one float32 array (the reading takes 16 bytes a gap)."""
        if hi <= lo:
            return lo, np.zeros(0, dtype=np.float32)
        counts, ends, tokens, run_ends = self._index()
        a = int(np.searchsorted(ends, lo, side="right"))  # first request with a gap >= lo
        b = min(int(np.searchsorted(ends, hi, side="left")) + 1, len(counts))  # one past the last
        first = int(ends[a] - counts[a])
        gaps = np.empty(int(ends[b - 1]) - first, dtype=np.float32)
        i = a
        while i < b:
            j = int(np.searchsorted(ends, ends[i] - counts[i] + PIECE, side="right"))
            j = min(max(j, i + 1), b)
            done = int(ends[i] - counts[i]) - first
            gaps[done : int(ends[j - 1]) - first] = self._gaps_of(i, j, tokens, run_ends)
            i = j
        return first, gaps

    def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per request, its gaps, where they end and where its tokens end (cumulated: a request
        with gaps has runs holding exactly its gaps + 1 tokens); where each run's tokens end."""
        if self._index_of != len(self._per_request):
            counts = self._per_request.view().astype(np.int64)
            tokens = np.cumsum(np.where(counts > 0, counts + 1, 0))
            run_ends = np.cumsum(self._runs.view()[2::3], dtype=np.int64)
            self._index_cache = (counts, np.cumsum(counts), tokens, run_ends)
            self._index_of = len(self._per_request)
        return self._index_cache

    def _gaps_of(self, a: int, b: int, tokens: np.ndarray, run_ends: np.ndarray) -> np.ndarray:
        """The gaps of requests a..b-1, in order (`tokens`, `run_ends`: from _index)."""
        times, starts = self._token_times()
        runs = self._runs.view().reshape(-1, 3)
        tok_lo = int(tokens[a - 1]) if a else 0
        tok_hi = int(tokens[b - 1])
        if tok_hi == tok_lo:
            return np.zeros(0, dtype=np.float32)
        r0 = int(np.searchsorted(run_ends, tok_lo, side="right"))
        r1 = int(np.searchsorted(run_ends, tok_hi, side="left")) + 1
        mine = runs[r0:r1]
        start = starts[mine[:, 0]] + mine[:, 1]
        count = mine[:, 2].astype(np.int64)
        # Each run's token positions: start, start + 1, ..., start + count - 1.
        pos = np.repeat(start - (np.cumsum(count) - count), count)
        pos += np.arange(tok_hi - tok_lo)
        t = times[pos]
        del pos
        np.subtract(t[1:], t[:-1], out=t[:-1])  # the gaps, in place (as float64, then float32)
        gaps = t[:-1].astype(np.float32)
        del t
        # Not the step from one request's last token to the next one's first.
        keep = np.ones(len(gaps), dtype=bool)
        # (`tokens` never decreases: its distinct values are where it steps; requests without
        # gaps add none)
        ends = tokens[a : b - 1]
        distinct = np.ones(len(ends), dtype=bool)
        distinct[1:] = ends[1:] != ends[:-1]
        boundaries = ends[distinct] - tok_lo
        keep[boundaries[(boundaries > 0) & (boundaries <= len(gaps))] - 1] = False
        return gaps[keep]

    def order_statistics(self, ranks: Sequence[int]) -> np.ndarray:
        """The gaps at these 0-based ranks of the sorted gaps, from the iterations' durations
        weighted by how many requests have a gap there, and the gaps between runs."""
        times, starts = self._token_times()
        runs = self._runs.view().reshape(-1, 3)
        start = starts[runs[:, 0]] + runs[:, 1]
        last = start + runs[:, 2] - 1
        # How many runs step from token position p to p + 1: +1 where a run starts, -1 where it
        # ends (a difference array over the positions), summed in place. Frugal: at a million
        # requests the positions are ten million iterations; about 35 bytes each at the peak.
        steps = np.zeros(len(times), dtype=np.int32)
        np.add.at(steps, start, 1)
        np.add.at(steps, last, -1)
        np.cumsum(steps, out=steps)
        steps = steps[:-1]
        used = steps > 0
        inside = np.empty(len(steps), dtype=np.float32)  # each step's gap, as the pool's:
        np.subtract(times[1:], times[:-1], out=inside)  # float64, rounded to float32
        inside = inside[used]
        weights = steps[used]
        del steps, used
        # A run after another of the same request: the gap over the wait between them.
        counts, _, tokens, run_ends = self._index()
        has = counts > 0  # (each request with gaps starts a run where its tokens start)
        first_runs = np.searchsorted(run_ends, tokens[has] - counts[has] - 1, side="right")
        later = np.ones(len(runs), dtype=bool)
        later[first_runs] = False  # (run 0 is a request's first)
        later_idx = np.flatnonzero(later)
        between = (times[start[later_idx]] - times[last[later_idx - 1]]).astype(np.float32)
        # Sort (value, weight) pairs as one uint64 each: a non-negative float32's bits order as
        # the float does, and the weight fits the low half. One array, sorted in place.
        k = len(inside)
        keys = np.empty(k + len(between), dtype=np.uint64)
        keys[:k] = inside.view(np.uint32)
        del inside
        keys[k:] = between.view(np.uint32)
        keys <<= np.uint64(32)
        np.bitwise_or(keys[:k], weights.view(np.uint32), out=keys[:k])  # (no uint64 copy)
        keys[k:] |= np.uint64(1)
        del weights
        keys.sort()
        # The rank r-th gap is at the first key whose running sum of weights exceeds r; the sum
        # is taken a piece at a time (a running sum of every key would double the memory).
        ranks = np.asarray(ranks, dtype=np.int64)
        out = np.empty(len(ranks), dtype=np.float32)
        total = 0
        for lo in range(0, len(keys), PIECE):
            cum = np.cumsum(keys[lo : lo + PIECE] & LOW_HALF, dtype=np.uint64).astype(np.int64)
            cum += total
            here = (ranks >= total) & (ranks < cum[-1])
            at = lo + np.searchsorted(cum, ranks[here], side="right")
            out[here] = (keys[at] >> np.uint64(32)).astype(np.uint32).view(np.float32)
            total = int(cum[-1])
        assert total == self._n, "gap runs out of step with the requests"
        return out
