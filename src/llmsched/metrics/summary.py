"""Request timelines → per-request metrics → a run summary with vLLM `bench serve` field names.

Definitions follow ``vllm bench serve`` (``vllm/benchmarks/serve.py``) and are spelled out, with
every place llmsched extends them, in ``docs/metrics.md``. In short, per finished request:

* visible tokens: a reasoning request's answer tokens (indices ``reasoning_tokens..``), otherwise
  all tokens;
* ``ttft`` = first visible token − arrival; ``ttft_any`` = first token of any kind − arrival;
  ``queue_time`` = first scheduled − arrival; ``e2el`` = last token − arrival;
* ``tpot`` = (e2el − ttft) / (visible − 1) when visible > 1, else undefined (NaN);
* ``itl`` = the gaps between consecutive visible tokens, pooled across requests.

:class:`MetricsCollector` takes one :class:`~llmsched.metrics.record.RequestRecord` per request as
it ends and keeps only per-request scalars (one row of a structured numpy array) and the pooled ITL
gaps — never the records nor their ``token_times`` arrays. The gaps are kept as float32 values, or,
for a simulated run, read from its iteration logs when asked (``metrics/gaps.py``), so a run of a
million requests costs memory proportional to its requests and iterations, not its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter
from typing import Any

import numpy as np

from llmsched.metrics.gaps import GapPool, Growable, LoggedGaps
from llmsched.metrics.qoe import PASCAL_ANSWER_SLO, AnswerSLO, answer_qoe
from llmsched.metrics.record import RequestRecord
from llmsched.metrics.vllm_bench import (
    GOODPUT_METRICS,
    VLLM_LATENCY_METRICS,
    Outcomes,
    good_mask,
    goodput_slos_seconds,
    latency_stats_ms,
    peaks,
    serving_metrics,
    token_times_of,
)

#: Percentiles reported for every latency metric besides the median (``median_*``), as
#: ``vllm bench serve --metric-percentiles 90,95,99``.
PERCENTILES: tuple[float, ...] = (90, 95, 99)
#: Rejected requests listed per rejection reason in the summary (`rejected_examples`).
REJECTED_EXAMPLES = 3
#: Latency metrics llmsched adds (same statistics, same naming pattern).
EXTRA_LATENCY_METRICS: tuple[str, ...] = ("ttft_any", "queue_time")
__all__ = ["GOODPUT_METRICS", "VLLM_LATENCY_METRICS", "latency_stats_ms"]  # re-exported

#: Per-request columns, in the order of the per-request CSV.
CSV_COLUMNS: tuple[str, ...] = (
    "request_id",
    "status",
    "reject_reason",
    "arrival",
    "first_scheduled",
    "first_token",
    "first_answer_token",
    "finish",
    "prompt_tokens",
    "output_tokens",
    "reasoning_tokens",
    "queue_time",
    "ttft",
    "ttft_any",
    "tpot",
    "e2el",
    "max_gap",
    "answer_gap",
    "qoe",
    "preemptions",
    "migrations",
    "instance",
    "priority",
    "tier",
    "session_id",
    "turn",
    "cached_tokens",
)
#: Columns in seconds (times since the run's start, or durations).
SECONDS_COLUMNS: frozenset[str] = frozenset(
    {
        "arrival",
        "first_scheduled",
        "first_token",
        "first_answer_token",
        "finish",
        "queue_time",
        "ttft",
        "ttft_any",
        "tpot",
        "e2el",
        "max_gap",
        "answer_gap",
    }
)
#: The per-request CSV's header: the columns with their unit where they have one (`ttft_s`).
CSV_HEADER: tuple[str, ...] = tuple(
    f"{name}_s" if name in SECONDS_COLUMNS else name for name in CSV_COLUMNS
)

# Numeric per-request scalars kept by the collector, one structured row per request.
_ROW_DTYPE = np.dtype(
    [
        ("arrival", np.float64),
        ("client_wait", np.float64),  # waited for the client's concurrency limit (vLLM's queue)
        ("first_scheduled", np.float64),
        ("first_token", np.float64),
        ("first_answer_token", np.float64),
        ("finish", np.float64),
        ("queue_time", np.float64),
        ("ttft", np.float64),
        ("ttft_any", np.float64),
        ("tpot", np.float64),
        ("e2el", np.float64),
        ("max_gap", np.float64),
        ("answer_gap", np.float64),  # reasoning requests: `</think>` to first answer token
        ("qoe", np.float64),  # reasoning requests: the answer's QoE (metrics/qoe.py)
        ("ttft_slo", np.float64),  # NaN = none
        ("tpot_slo", np.float64),  # NaN = none
        ("prompt_tokens", np.int64),
        ("output_tokens", np.int64),
        ("reasoning_tokens", np.int64),
        ("visible_tokens", np.int64),
        ("preemptions", np.int64),
        ("migrations", np.int64),
        ("cached_tokens", np.int64),  # prefix-cache hit at its first admission (vLLM's)
        ("instance", np.int64),
        ("priority", np.int64),
        ("finished", np.bool_),
        ("slo_met", np.int8),  # 1 met, 0 missed, -1 no SLO (or rejected)
        ("reject_code", np.int32),  # index into the collector's reason table
        ("tier_code", np.int32),  # index into the collector's tier table; -1 = None
        ("session_code", np.int32),  # index into the collector's session table; -1 = None
        ("turn", np.int64),
    ]
)
_NAN = float("nan")
#: Records a collector of a whole run's requests computes at once (`MetricsCollector.batch`).
RECORDS_BATCH = 1024
# A collector computes the metrics of the records it holds once their tokens reach this many
# (float64 token times: 2 MB), however few records it waits for.
_PENDING_TOKENS = 1 << 18


# --------------------------------------------------------------------------------------------
# One request
# --------------------------------------------------------------------------------------------


def per_request_metrics(
    record: RequestRecord, answer_slo: AnswerSLO = PASCAL_ANSWER_SLO
) -> dict[str, Any]:
    """The metrics of one request, in seconds.

    Returns a dict with every :data:`CSV_COLUMNS` key, plus ``visible_tokens``, ``itl`` (a float64
    array of this request's gaps between consecutive visible tokens), ``ttft_slo``/``tpot_slo``
    (seconds or None) and ``slo_met`` (True/False against the record's own SLOs, None when it has
    none or was rejected). Undefined times are NaN: every token-derived time of a rejected request,
    ``tpot`` with fewer than two visible tokens, ``max_gap`` with fewer than two tokens,
    ``queue_time`` without a ``first_scheduled``, ``answer_gap`` and ``qoe`` of a request without
    a reasoning phase (``answer_gap``: from the `</think>` token to the first answer token, the
    wait a phase change causes; ``qoe``: the answer's QoE against `answer_slo`).

    Raises ValueError, naming the request, for a finished record whose timeline is inconsistent.
    It is :class:`RequestMetrics` of this one record, which is what :class:`MetricsCollector`
    stores.
    """
    m = RequestMetrics([record], answer_slo)
    c = {name: values[0].item() for name, values in m.columns.items()}
    slo_met = int(c["slo_met"])
    return {
        "request_id": record.request_id,
        "arrival": c["arrival"],
        "client_wait": c["client_wait"],
        "first_scheduled": c["first_scheduled"],
        "prompt_tokens": c["prompt_tokens"],
        "output_tokens": c["output_tokens"],
        "reasoning_tokens": c["reasoning_tokens"],
        "preemptions": c["preemptions"],
        "migrations": c["migrations"],
        "cached_tokens": c["cached_tokens"],
        "instance": c["instance"],
        "priority": c["priority"],
        "tier": record.tier,
        "session_id": record.session_id,
        "turn": record.turn,
        "ttft_slo": record.ttft_slo,
        "tpot_slo": record.tpot_slo,
        "status": "finished" if record.finished else "rejected",
        "reject_reason": m.reject_reasons[0],
        **{name: c[name] for name in _TIMELINE},
        "visible_tokens": c["visible_tokens"],
        "itl": m.itl(0),
        "slo_met": None if slo_met < 0 else bool(slo_met),
    }


# The metrics that are times (and QoE), in CSV order, but for the record's own: what a
# finished request's token times give (NaN for a rejected one), and the queue time.
_TIMELINE = tuple(
    name
    for name in CSV_COLUMNS
    if (name in SECONDS_COLUMNS or name == "qoe") and name not in ("arrival", "first_scheduled")
)
_RECORD_FLOATS = ("arrival", "client_wait", "first_scheduled")
_RECORD_INTS = (
    "prompt_tokens",
    "output_tokens",
    "reasoning_tokens",
    "preemptions",
    "migrations",
    "cached_tokens",
    "instance",
    "priority",
    "turn",
)


class RequestMetrics:
    """The metrics of many requests at once, as numpy columns (:func:`per_request_metrics` says
    what each is): a simulated run finishes requests by the thousand, and one vectorised pass
    over their token times costs far less than a pass per request.

    ``columns``: every numeric per-request column of the collector's rows (times, counts,
    ``finished``, ``visible_tokens``, ``slo_met`` as 1/0/-1) but its string codes;
    ``reject_reasons``: a string per request ("" when finished); ``itl(i)``: request i's gaps
    between visible tokens. Raises ValueError, naming the first such request, when a finished
    record's timeline is inconsistent.
    """

    def __init__(self, records: Sequence[RequestRecord], answer_slo: AnswerSLO) -> None:
        n_req = len(records)
        floats = np.array(list(map(attrgetter(*_RECORD_FLOATS), records)), np.float64)
        ints = np.array(list(map(attrgetter(*_RECORD_INTS), records)), np.int64)
        floats = floats.reshape(n_req, len(_RECORD_FLOATS))
        ints = ints.reshape(n_req, len(_RECORD_INTS))
        cols: dict[str, np.ndarray] = {name: floats[:, i] for i, name in enumerate(_RECORD_FLOATS)}
        cols |= {name: ints[:, i] for i, name in enumerate(_RECORD_INTS)}
        finished = np.array([r.finished for r in records], dtype=bool)
        cols["finished"] = finished
        cols["ttft_slo"] = np.array([_NAN if r.ttft_slo is None else r.ttft_slo for r in records])
        cols["tpot_slo"] = np.array([_NAN if r.tpot_slo is None else r.tpot_slo for r in records])
        cols["queue_time"] = cols["first_scheduled"] - cols["arrival"]
        for name in _TIMELINE:
            if name != "queue_time":
                cols[name] = np.full(n_req, _NAN)
        cols["visible_tokens"] = np.zeros(n_req, np.int64)
        cols["slo_met"] = np.full(n_req, -1, np.int8)
        self.reject_reasons = [
            "" if r.finished else (r.reject_reason or "unspecified") for r in records
        ]
        self.columns = cols
        self._itl_bounds = np.zeros((n_req, 2), np.int64)
        self.gaps = np.zeros(0)
        fin = np.flatnonzero(finished)
        if len(fin):
            self._timelines([records[i] for i in fin.tolist()], fin, answer_slo)

    def itl(self, i: int) -> np.ndarray:
        lo, hi = self._itl_bounds[i].tolist()
        return self.gaps[lo:hi]

    def itls(self) -> list[np.ndarray]:
        """Every request's gaps between visible tokens, in order."""
        gaps = self.gaps
        return [gaps[lo:hi] for lo, hi in self._itl_bounds.tolist()]

    def _timelines(
        self, records: list[RequestRecord], fin: np.ndarray, answer_slo: AnswerSLO
    ) -> None:
        """The finished requests' (rows `fin`) metrics from their token times, laid end to end:
        request i's at offsets first[i]..last[i]."""
        cols = self.columns
        times = [np.asarray(r.token_times, dtype=np.float64) for r in records]
        n, r = cols["output_tokens"][fin], cols["reasoning_tokens"][fin]
        sizes = np.array([len(t) if t.ndim == 1 else -1 for t in times], np.int64)
        _refuse_first(records, (sizes != n) | (n < 1) | (r < 0) | (r > n))
        t = np.concatenate(times)
        first = np.zeros(len(n), np.int64)
        np.cumsum(n[:-1], out=first[1:])
        last = first + n - 1
        # Every token's gap to the next, NaN after each request's last token: the reductions
        # over a request's [first, last] then skip that NaN (fmin/fmax) and see its gaps only.
        gaps = np.empty(len(t))
        np.subtract(t[1:], t[:-1], out=gaps[:-1])
        gaps[last] = _NAN
        smallest, largest = np.fmin.reduceat(gaps, first), np.fmax.reduceat(gaps, first)
        one = n == 1
        smallest[one], largest[one] = 0.0, _NAN
        arrival = cols["arrival"][fin]
        first_token, finish = t[first], t[last]
        # (A NaN or infinite time anywhere: the checks one record at a time find which.)
        finite = np.isfinite(smallest) & (one | np.isfinite(largest))  # (overflowing gaps)
        finite &= np.isfinite(t).all()
        _refuse_first(records, ~finite | (smallest < 0) | (first_token < arrival))

        visible = n - r
        e2el = finish - arrival
        answers = visible > 0
        # (Reasoning that never reached an answer: the user sees nothing until the response
        # ends, so its TTFT is its E2EL.)
        first_answer = np.where(answers, t[np.minimum(first + r, last)], _NAN)
        ttft = np.where(answers, first_answer - arrival, e2el)
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(visible > 1, (e2el - ttft) / (visible - 1), _NAN)
        thinking = (r > 0) & (r < n)
        qoe = np.full(len(n), _NAN)
        for i in np.flatnonzero(thinking).tolist():
            qoe[i] = answer_qoe(times[i], int(r[i]), answer_slo)
        for name, values in (
            ("first_token", first_token),
            ("first_answer_token", first_answer),
            ("finish", finish),
            ("ttft", ttft),
            ("ttft_any", first_token - arrival),
            ("tpot", tpot),
            ("e2el", e2el),
            ("max_gap", largest),
            ("answer_gap", np.where(thinking, gaps[np.maximum(first + r - 1, 0)], _NAN)),
            ("qoe", qoe),
            ("visible_tokens", visible),
        ):
            cols[name][fin] = values
        # Judged by its own SLOs, where it has any.
        ttft_slo, tpot_slo = cols["ttft_slo"][fin], cols["tpot_slo"][fin]
        own = ~np.isnan(ttft_slo) | ~np.isnan(tpot_slo)
        met = (np.isnan(ttft_slo) | (ttft <= ttft_slo)) & (
            np.isnan(tpot_slo) | (np.where(np.isnan(tpot), 0.0, tpot) <= tpot_slo)
        )
        cols["slo_met"][fin] = np.where(own, met, -1)
        # gaps[i] = t[i+1] - t[i]: a request's gaps between visible tokens are from index r on.
        self.gaps = gaps
        self._itl_bounds[fin] = np.where(
            (visible > 1)[:, None], np.stack([first + r, last], axis=1), 0
        )


def _refuse_first(records: list[RequestRecord], bad: np.ndarray) -> None:
    """When `bad` flags any record, raise the error of the first inconsistent one (the checks
    one record at a time say which, and what is wrong: errors are rare, and this is exact)."""
    if bad.any():
        for record in records:
            _check_timeline(record)
        raise AssertionError(f"request {records[int(np.argmax(bad))].request_id!r} flagged")


def _check_timeline(record: RequestRecord) -> None:
    """Raise ValueError, naming the request, for a finished record's inconsistent timeline."""
    rid = record.request_id
    times = np.asarray(record.token_times, dtype=np.float64)
    n = int(record.output_tokens)
    r = int(record.reasoning_tokens)
    if times.ndim != 1 or len(times) != n:
        raise ValueError(
            f"request {rid!r}: token_times has {len(times)} entries but output_tokens is {n}; "
            "a finished record needs the generation time of every output token"
        )
    if n < 1:
        raise ValueError(
            f"request {rid!r}: finished with no output tokens; a finished request must have "
            "generated at least one token (mark it finished=False with a reject_reason instead)"
        )
    if not 0 <= r <= n:
        raise ValueError(
            f"request {rid!r}: reasoning_tokens {r} must lie in 0..output_tokens ({n})"
        )
    if not np.isfinite(times).all() or not np.isfinite(np.diff(times)).all():
        raise ValueError(f"request {rid!r}: token_times contains NaN or infinite values")
    if (np.diff(times) < 0).any():
        raise ValueError(f"request {rid!r}: token_times must be non-decreasing")
    if times[0] < record.arrival:
        raise ValueError(
            f"request {rid!r}: first token at {times[0]} s precedes its arrival at "
            f"{float(record.arrival)} s"
        )


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


class _Categories:
    """Small string table: a value ↔ an int code (reasons, tiers: few distinct values)."""

    __slots__ = ("codes", "values")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.values: list[str] = []

    def code(self, value: str | None) -> int:
        if value is None:
            return -1
        c = self.codes.get(value)
        if c is None:
            c = self.codes[value] = len(self.values)
            self.values.append(value)
        return c

    def decode(self, codes: np.ndarray, none: str = "") -> np.ndarray:
        table = np.array([*self.values, none], dtype=str)  # code -1 → the last entry
        return table[codes]


# --------------------------------------------------------------------------------------------
# Collector
# --------------------------------------------------------------------------------------------


class MetricsCollector:
    """Accumulates per-request metrics of a run; :meth:`summary` gives vLLM-named results.

    Call :meth:`add` once per request as it ends (finished or rejected). Memory: one fixed-size
    structured row per request, the request id in a fixed-width string column, and the pooled ITL
    gaps: a :class:`~llmsched.metrics.gaps.GapPool` of their values by default, or the
    :class:`~llmsched.metrics.gaps.LoggedGaps` of a simulated run. Nothing per request is kept
    as a Python object, and records' ``token_times`` arrays are not retained.
    """

    def __init__(
        self,
        answer_slo: AnswerSLO = PASCAL_ANSWER_SLO,
        gaps: GapPool | LoggedGaps | None = None,
        batch: int = 1,
    ) -> None:
        self.answer_slo = answer_slo
        # Records wait until `batch` of them (or their tokens) are added, then their metrics
        # are computed together (RequestMetrics): a simulated run's collector batches
        # thousands. 1: each at once, and an inconsistent record is refused when added.
        self.batch = batch
        self._pending: list[RequestRecord] = []
        self._pending_tokens = 0
        self._rows = Growable(_ROW_DTYPE)
        self._ids = Growable("U16")
        # The pooled gaps, the one store that grows with tokens: kept as values, or read from
        # a simulated run's iteration logs (metrics/gaps.py).
        self._itl = GapPool() if gaps is None else gaps
        self._reasons = _Categories()
        self._tiers = _Categories()
        self._sessions = _Categories()
        # vLLM's prefix-cache counters of the run (the simulator sets them): {"enabled",
        # "prefix_runs" (whether any request shares a prefix), "queries", "hits"}; None: unknown
        self.prefix_cache: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self._rows) + len(self._pending)

    def add(self, record: RequestRecord) -> None:
        """Record one request (its metrics are computed at once, or with the next `batch`)."""
        self._pending.append(record)
        self._pending_tokens += len(record.token_times)
        if len(self._pending) >= self.batch or self._pending_tokens > _PENDING_TOKENS:
            self._flush()

    def extend(self, records: Iterable[RequestRecord]) -> None:
        """:meth:`add` each record."""
        for record in records:
            self.add(record)

    def _flush(self) -> None:
        """Compute and store the metrics of the records added since the last flush."""
        records = self._pending
        if not records:
            return
        self._pending, self._pending_tokens = [], 0
        m = RequestMetrics(records, self.answer_slo)
        self._itl.add_many(records, m.itls())
        rows = np.empty(len(records), _ROW_DTYPE)
        for name, values in m.columns.items():
            rows[name] = values
        rows["reject_code"] = [self._reasons.code(x) for x in m.reject_reasons]
        rows["tier_code"] = [self._tiers.code(r.tier) for r in records]
        rows["session_code"] = [self._sessions.code(r.session_id) for r in records]
        self._rows.extend(rows)
        ids = [str(r.request_id) for r in records]
        longest = max(map(len, ids))
        if longest > self._ids.dtype.itemsize // 4:
            self._ids.widen(f"U{max(longest, 2 * (self._ids.dtype.itemsize // 4))}")
        self._ids.extend(ids)

    # ---- views -------------------------------------------------------------------------------
    def _table(self) -> np.ndarray:
        """The rows, every record added so far among them."""
        self._flush()
        return self._rows.view()

    @property
    def num_finished(self) -> int:
        return int(np.count_nonzero(self._table()["finished"]))

    @property
    def num_rejected(self) -> int:
        return len(self) - self.num_finished

    def column(self, name: str) -> np.ndarray:
        """One per-request numeric column (a read-only view), e.g. ``"ttft"`` or ``"finished"``."""
        if name == "request_id":
            self._flush()
            col = self._ids.view()
        else:
            col = self._table()[name]
        col = col.view()
        col.flags.writeable = False
        return col

    def finished_values(self, name: str) -> np.ndarray:
        """A numeric column restricted to finished requests (e.g. the TTFTs to plot)."""
        rows = self._table()
        return rows[name][rows["finished"]]

    def itl(self) -> np.ndarray:
        """All pooled inter-token gaps (seconds), read-only (read from the iteration logs at
        once, for a simulated run's collector)."""
        self._flush()
        v = np.asarray(self._itl).view()
        v.flags.writeable = False
        return v

    def gaps_by_request(self) -> tuple[np.ndarray, GapPool | LoggedGaps]:
        """Every request's inter-token gaps: (offsets, gaps) with request i's gaps (seconds,
        among its visible tokens) at ``gaps[offsets[i]:offsets[i + 1]]``, in request order.
        `gaps` is the store: blocks of it are arrays, ``np.asarray`` gives all of it."""
        rows = self._table()
        counts = np.where(rows["finished"], np.maximum(rows["visible_tokens"] - 1, 0), 0)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        assert offsets[-1] == len(self._itl), "pooled gaps out of step with the requests"
        return offsets, self._itl

    def _prefix_cache_summary(self) -> dict[str, Any]:
        """vLLM's prefix-cache hit rate: hit tokens / looked-up tokens, over every admission of
        a request that had computed nothing (vllm:prefix_cache_hits / _queries)."""
        pc = self.prefix_cache
        if pc is None:
            return {}
        if not pc["enabled"]:
            note = "off"
        elif not pc["prefix_runs"]:
            note = "on; the workload shares no prefix runs: no hits are possible"
        else:
            note = "on"
        queries, hits = pc["queries"], pc["hits"]
        return {
            "prefix_cache": note,
            "prefix_cache_queries": queries,
            "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else None,
        }

    def _peaks(self) -> dict[str, float | int]:
        """vLLM's one-second peaks (vllm_bench.peaks) over the finished requests' visible
        tokens: the first at arrival + TTFT, the rest after their gaps."""
        rows = self._table()
        offsets, gaps = self.gaps_by_request()
        fin = np.flatnonzero(rows["finished"])
        counts = np.diff(offsets)[fin]
        fin_offsets = np.zeros(len(fin) + 1, dtype=np.int64)
        np.cumsum(counts, out=fin_offsets[1:])
        # Finished requests' gaps in order (a rejected request has none).
        first = rows["arrival"][fin] + rows["ttft"][fin]
        return peaks(
            rows["arrival"][fin], rows["e2el"][fin], token_times_of(first, fin_offsets, gaps)
        )

    def _rejected_examples(self) -> dict[str, list[dict[str, Any]]]:
        """The first few requests rejected for each reason, with the lengths they asked for:
        a reason names the limit, these show which requests ran into it."""
        rows = self._table()
        rejected = ~rows["finished"]
        ids = self._ids.view()
        out = {}
        for code in np.unique(rows["reject_code"][rejected]).tolist():
            first = np.flatnonzero(rejected & (rows["reject_code"] == code))[:REJECTED_EXAMPLES]
            out[self._reasons.values[code]] = [
                {
                    "request_id": str(ids[i]),
                    "prompt_tokens": int(rows["prompt_tokens"][i]),
                    "output_tokens": int(rows["output_tokens"][i]),
                }
                for i in first
            ]
        return out

    def outcomes(self, itls: bool = True) -> Outcomes:
        """The run as `vllm bench serve`'s client would have seen it, one entry per request in
        arrival order: a finished request's TTFT, E2E latency and gaps between visible tokens;
        a rejected one failed, with its reason as the error; `queue_times` what it waited for
        the client's concurrency limit. `itls=False` leaves the gaps out (empty), for a result
        without them: a million requests' views of them alone take a hundred megabytes."""
        rows = self._table()
        order = np.argsort(rows["arrival"], kind="stable")

        def r(name: str) -> np.ndarray:  # a column in arrival order (not every row copied)
            return rows[name][order]

        gaps_of: list[np.ndarray] = []
        if itls:
            offsets, store = self.gaps_by_request()
            gaps = np.asarray(store)
            gaps_of = [gaps[offsets[i] : offsets[i + 1]] for i in order]
        success = r("finished")
        return Outcomes(
            success=success,
            input_lens=r("prompt_tokens"),
            output_lens=np.where(success, r("output_tokens"), 0),
            ttfts=r("ttft"),
            latencies=r("e2el"),
            start_times=r("arrival"),
            queue_times=r("client_wait"),
            itls=gaps_of,
            errors=self._reasons.decode(r("reject_code")).tolist(),
        )

    def tier_summary(self, percentiles: Sequence[float] = PERCENTILES) -> dict[str, dict]:
        """Per tier (e.g. SLAI's paying and free users): TTFT, TPOT and ITL statistics of its
        finished requests, the ITL pooled over the tier's gaps (its time between tokens)."""
        rows = self._table()
        offsets, store = self.gaps_by_request()
        gaps = np.asarray(store)  # (all of them at once: tiers are for runs of modest size)
        gap_tier = np.repeat(rows["tier_code"], np.diff(offsets))  # the tier of every gap
        out = {}
        for code, name in enumerate(self._tiers.values):
            mine = rows["finished"] & (rows["tier_code"] == code)
            tier_gaps = gaps[gap_tier == code]
            tpot = rows["tpot"][mine]
            out[name] = {"completed": int(np.count_nonzero(mine))}
            out[name] |= latency_stats_ms("ttft", rows["ttft"][mine], percentiles)
            out[name] |= latency_stats_ms("tpot", tpot[~np.isnan(tpot)], percentiles)
            out[name] |= latency_stats_ms("itl", tier_gaps, percentiles)
        return out

    def columns(self, requests: slice = slice(None)) -> dict[str, np.ndarray]:
        """One numpy array per :data:`CSV_COLUMNS` entry (plus the SLO columns), in request order
        (of the `requests` in that slice of it).

        String columns (request_id, status, reject_reason, tier) are numpy ``str`` arrays (``""``
        for none); numeric ones are copies of the stored columns.
        """
        rows = self._table()[requests]
        finished = rows["finished"]
        out: dict[str, np.ndarray] = {}
        for name in CSV_COLUMNS:
            if name == "request_id":
                out[name] = self._ids.view()[requests].copy()
            elif name == "status":
                out[name] = np.where(finished, "finished", "rejected")
            elif name == "reject_reason":
                out[name] = self._reasons.decode(rows["reject_code"])
            elif name == "tier":
                out[name] = self._tiers.decode(rows["tier_code"])
            elif name == "session_id":
                out[name] = self._sessions.decode(rows["session_code"])
            else:
                out[name] = rows[name].copy()
        out["ttft_slo"] = rows["ttft_slo"].copy()
        out["tpot_slo"] = rows["tpot_slo"].copy()
        return out

    rows = columns

    # ---- summary -----------------------------------------------------------------------------

    def summary(
        self,
        goodput: Mapping[str, float] | None = None,
        percentiles: Sequence[float] = PERCENTILES,
    ) -> dict[str, Any]:
        """The run's summary: vLLM `bench serve` fields (durations in ms) plus extensions.

        ``goodput``: SLOs in milliseconds for any subset of ``ttft``, ``tpot``, ``e2el``, as
        ``vllm bench serve --goodput``; ``request_goodput`` is None when it is None or empty.
        Statistics with no data (e.g. no finished request) are None, never NaN, so the dict
        serialises as strict JSON.
        """
        rows = self._table()
        finished = rows["finished"]
        everyone = bool(finished.all())  # (then no copy of every row: 222 bytes a request)
        fin = rows if everyone else rows[finished]
        rejected = rows[:0] if everyone else rows[~finished]
        if len(rows):
            end = max(
                float(fin["finish"].max()) if len(fin) else -math.inf,
                float(rejected["arrival"].max()) if len(rejected) else -math.inf,
            )
            duration = max(0.0, end - float(rows["arrival"].min()))
        else:
            duration = 0.0
        out = serving_metrics(
            duration=duration,
            failed=len(rejected),
            input_lens=fin["prompt_tokens"],
            output_lens=fin["output_tokens"],
            ttft=fin["ttft"],
            tpot=fin["tpot"],
            itl=self._itl,
            e2el=fin["e2el"],
            goodput=goodput,
            percentiles=percentiles,
        )
        out.update(self._peaks())
        queue = fin["queue_time"]
        out.update(latency_stats_ms("ttft_any", fin["ttft_any"], percentiles))
        out.update(latency_stats_ms("queue_time", queue[~np.isnan(queue)], percentiles))

        # Extensions.
        out["peak_concurrent_requests"] = max_concurrency(fin["arrival"], fin["finish"])
        out["total_preemptions"] = int(rows["preemptions"].sum())
        out["total_migrations"] = int(rows["migrations"].sum())
        out.update(self._prefix_cache_summary())
        codes, counts = np.unique(rejected["reject_code"], return_counts=True)
        out["rejected_reasons"] = {
            self._reasons.values[c]: int(k) for c, k in zip(codes.tolist(), counts.tolist())
        }
        out["rejected_examples"] = self._rejected_examples()
        out["by_tier"] = self.tier_summary(percentiles) if len(self._tiers.values) else None
        # A request is judged by its own SLOs (tiers, TBT targets) where it carries any, else
        # by the run's goodput SLOs: then every finished request has an SLO to meet.
        met = fin["slo_met"].astype(np.int8)
        slos = goodput_slos_seconds(goodput)
        if slos is not None:
            good = good_mask(fin["ttft"], fin["tpot"], fin["e2el"], slos)
            met = np.where(met < 0, good.astype(np.int8), met)
        n_slo = int(np.count_nonzero(met >= 0))
        out["slo_requests"] = n_slo
        out["slo_attainment"] = float(np.count_nonzero(met == 1)) / n_slo if n_slo else None
        # Reasoning requests' answering phase (PASCAL): QoE below the SLO's floor, and the wait
        # between `</think>` and the first answer token (migration, queueing, swap-in).
        qoe = fin["qoe"][~np.isnan(fin["qoe"])]
        out["answer_requests"] = len(qoe)
        out["answer_slo_violation_rate"] = (
            float(np.count_nonzero(qoe < self.answer_slo.min_qoe)) / len(qoe) if len(qoe) else None
        )
        out["mean_answer_qoe"] = float(qoe.mean()) if len(qoe) else None
        gaps = fin["answer_gap"]
        out.update(latency_stats_ms("answer_gap", gaps[~np.isnan(gaps)], percentiles))
        return out


# --------------------------------------------------------------------------------------------
# Helpers shared by the collector and anyone holding full arrays
# --------------------------------------------------------------------------------------------


def max_concurrency(arrivals: np.ndarray, finishes: np.ndarray) -> int:
    """Peak number of requests in flight: sweep over [arrival, finish) intervals.

    A request finishing at the instant another arrives is not counted together with it.
    """
    a = np.asarray(arrivals, dtype=np.float64)
    f = np.asarray(finishes, dtype=np.float64)
    if a.size == 0:
        return 0
    times = np.concatenate([a, f])
    delta = np.concatenate([np.ones(a.size, np.int64), -np.ones(f.size, np.int64)])
    order = np.lexsort((delta, times))  # by time, ends (-1) before starts (+1) at equal times
    return int(np.cumsum(delta[order]).max())


def summarize(
    records: Iterable[RequestRecord],
    goodput: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = PERCENTILES,
) -> dict[str, Any]:
    """Summary of a finished collection of records (a :class:`MetricsCollector` under the hood)."""
    collector = MetricsCollector(batch=RECORDS_BATCH)
    collector.extend(records)
    return collector.summary(goodput=goodput, percentiles=percentiles)
