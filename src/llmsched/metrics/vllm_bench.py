"""`vllm bench serve`'s result: its aggregate fields, its per-request arrays, its run metadata.

One implementation of vLLM's definitions (``vllm/benchmarks/serve.py``, ``calculate_metrics``
and ``benchmark``), used by the simulator's summary (``MetricsCollector.summary``) and by the
load client (``llmsched bench``), so that a measured run and a simulated one compare
field by field, and both compare with ``vllm bench serve``'s own JSON.

- :func:`serving_metrics`: completed/failed, token totals, throughputs, goodput and the
  mean/median/std/percentile statistics of TTFT, TPOT, ITL and E2EL;
- :func:`peaks`: ``max_output_tokens_per_s`` and ``max_concurrent_requests`` as vLLM counts them,
  in one-second buckets from the first request's start (token times from :func:`token_times_of`);
- :func:`outcome_arrays`: the per-request arrays (``input_lens``, ``output_lens``, ``ttfts``,
  ``itls``, ``latencies``, ``start_times``, ``queue_times``, ``generated_texts``, ``errors``);
- :func:`run_metadata`: ``date``, ``backend``, ``model_id``, ``num_prompts``, ``request_rate``,
  ``burstiness``, ``max_concurrency``, ...;
- :func:`result_json`, :func:`write_result`, :func:`read_result`: the whole result, as both
  ``llmsched simulate --out`` (summary.json) and ``llmsched bench --out`` write it and as
  ``llmsched fidelity`` reads it; :func:`outcomes_from_result` turns its arrays back into
  :class:`Outcomes`.

Where llmsched departs from vLLM it says so in docs/metrics.md: a statistic with no data is None
(vLLM writes 0).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from llmsched.metrics.gaps import GapStore

#: Keys a ``goodput`` SLO dict may hold (values in milliseconds), as ``vllm bench serve --goodput``.
GOODPUT_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2el")
#: Latency metrics with vLLM's names, in vLLM's order.
VLLM_LATENCY_METRICS: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")
#: Values a gap store's mean sums at a time (latency_stats_ms).
MEAN_BLOCK = 1 << 22
#: Values the one-second peaks work through at a time, in buffers kept from pass to pass.
PASS = 1 << 18
#: The per-request arrays vLLM writes (it drops all but `latencies` and `queue_times` unless
#: `--save-detailed`).
DETAILED_FIELDS: tuple[str, ...] = (
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "latencies",
    "start_times",
    "queue_times",
    "generated_texts",
    "errors",
)

#: The arrays vLLM keeps without `--save-detailed`: a few numbers per request.
BRIEF_FIELDS: tuple[str, ...] = ("latencies", "queue_times")


@dataclass
class Outcomes:
    """What the client saw of each request, one entry per request in send order, as vLLM's
    ``RequestFuncOutput`` list: times in seconds; a failed request has ``success`` False, its
    ``error``, and output length 0."""

    success: np.ndarray  # bool
    input_lens: np.ndarray  # int: prompt tokens (the server's count when it reported one)
    output_lens: np.ndarray  # int: generated tokens (0 when failed)
    ttfts: np.ndarray  # first token − start (NaN when failed)
    latencies: np.ndarray  # last token − start (NaN when failed)
    start_times: np.ndarray  # when the request was sent
    itls: list[np.ndarray]  # gaps between consecutive streamed chunks
    errors: list[str] = field(default_factory=list)
    queue_times: np.ndarray | None = None  # waited for the client's concurrency limit
    generated_texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.success)


def latency_stats_ms(
    name: str, values_s: np.ndarray | GapStore, percentiles: Sequence[float]
) -> dict[str, float | None]:
    """``mean_/median_/std_/p{P}_{name}_ms`` of values in seconds, as vLLM computes them:
    mean, median, population std (``np.std``) and ``np.percentile`` (linear), times 1000.
    The 50th percentile is ``median_`` only: vLLM writes it twice when asked for 50, llmsched
    keeps one spelling per statistic. With no values every statistic is None.

    `values_s` may be a gap store (metrics/gaps.py), read a block at a time: its mean is then
    summed over blocks of :data:`MEAN_BLOCK` values (the same as ``np.mean`` up to that many;
    beyond, it may differ in the last digit), its percentiles come from its order statistics.
    """
    percentiles = [p for p in percentiles if float(p) != 50]
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"]
    keys += [f"p{_pct_key(p)}_{name}_ms" for p in percentiles]
    v = values_s
    if not isinstance(v, GapStore):
        v = np.asarray(v)
        if v.dtype.kind != "f":
            v = v.astype(np.float64)
    n = len(v)
    if n == 0:
        return dict.fromkeys(keys, None)
    # Frugal with memory (the pooled ITL can hold 10^8 gaps): one partitioned copy in the
    # input's dtype, float64 accumulation in chunks, and numpy's "linear" percentile rule by
    # hand: value at position (n - 1) * q / 100, interpolated between its neighbours. Only
    # those neighbours need to be in their sorted places (a partition, not a sort).
    if isinstance(v, np.ndarray):
        mean = float(np.mean(v, dtype=np.float64))
    else:
        total = sum(
            float(np.sum(v[i : i + MEAN_BLOCK], dtype=np.float64)) for i in range(0, n, MEAN_BLOCK)
        )
        mean = total / n
    chunk = 1 << 20
    square_sum = sum(
        float(np.sum((v[i : i + chunk].astype(np.float64) - mean) ** 2)) for i in range(0, n, chunk)
    )

    def neighbours(q: float) -> tuple[float, int, int]:
        h = (n - 1) * q / 100.0
        return h, int(h), min(int(h) + 1, n - 1)

    wanted = [neighbours(q) for q in [50, *percentiles]]
    ranks = sorted({i for _, lo, hi in wanted for i in (lo, hi)})
    if isinstance(v, np.ndarray):
        at = np.partition(v, ranks)[ranks]
    else:
        at = v.order_statistics(ranks)
    ordered = dict(zip(ranks, at.tolist()))

    def percentile(h: float, lo: int, hi: int) -> float:
        low = float(ordered[lo])
        return low + (h - lo) * (float(ordered[hi]) - low)

    stats = [mean, percentile(*wanted[0]), (square_sum / n) ** 0.5]
    stats += [percentile(*w) for w in wanted[1:]]
    return {k: s * 1000.0 for k, s in zip(keys, stats)}


def _pct_key(p: float) -> str:
    return str(int(p)) if float(p) == int(p) else str(p)


def goodput_slos_seconds(goodput: Mapping[str, float] | None) -> dict[str, float] | None:
    """`{"ttft": ms, ...}` → seconds; None when empty; a clear error for a bad entry."""
    if not goodput:
        return None
    unknown = set(goodput) - set(GOODPUT_METRICS)
    if unknown:
        raise ValueError(
            f"goodput SLO keys {sorted(unknown)} are not known; use any of "
            f"{list(GOODPUT_METRICS)} with values in milliseconds, e.g. {{'ttft': 500}}"
        )
    out = {}
    for key, ms in goodput.items():
        v = float(ms)
        if not v >= 0:
            raise ValueError(f"goodput SLO {key}={ms!r} must be a number of milliseconds >= 0")
        out[key] = v / 1000.0
    return out


def good_mask(
    ttft: np.ndarray, tpot: np.ndarray, e2el: np.ndarray, slos_s: Mapping[str, float]
) -> np.ndarray:
    """Requests meeting every SLO; an undefined TPOT (NaN) counts as 0, as in vLLM."""
    good = np.ones(len(ttft), dtype=bool)
    if "ttft" in slos_s:
        good &= ttft <= slos_s["ttft"]
    if "tpot" in slos_s:
        good &= np.where(np.isnan(tpot), 0.0, tpot) <= slos_s["tpot"]
    if "e2el" in slos_s:
        good &= e2el <= slos_s["e2el"]
    return good


def serving_metrics(
    *,
    duration: float,
    failed: int,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    ttft: np.ndarray,
    tpot: np.ndarray,
    itl: np.ndarray,
    e2el: np.ndarray,
    goodput: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = (99,),
) -> dict[str, Any]:
    """vLLM's aggregate fields from the completed requests' values (seconds).

    ``tpot`` is one value per completed request, NaN where undefined (one token): left out of
    the statistics, counted as 0 for goodput, as vLLM does. ``itl`` is every gap, pooled.
    Throughputs are None when ``duration`` is 0.
    """
    slos = goodput_slos_seconds(goodput)
    completed = len(ttft)
    total_in, total_out = int(np.sum(input_lens)), int(np.sum(output_lens))

    def rate(x: float) -> float | None:
        return x / duration if duration > 0 else None

    out: dict[str, Any] = {
        "duration": duration,
        "completed": completed,
        "failed": int(failed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": rate(completed),
        "request_goodput": (
            None if slos is None else rate(int(np.count_nonzero(good_mask(ttft, tpot, e2el, slos))))
        ),
        "output_throughput": rate(total_out),
        "total_token_throughput": rate(total_in + total_out),
    }
    tpot = np.asarray(tpot, dtype=np.float64)
    series = {"ttft": ttft, "tpot": tpot[~np.isnan(tpot)], "itl": itl, "e2el": e2el}
    for name in VLLM_LATENCY_METRICS:
        out.update(latency_stats_ms(name, series[name], percentiles))
    return out


def peaks(
    start_times: np.ndarray, latencies: np.ndarray, token_times: Iterable[np.ndarray]
) -> dict[str, float | int]:
    """vLLM's ``max_output_tokens_per_s`` and ``max_concurrent_requests`` over completed requests.

    Time is cut into one-second buckets from the earliest start; a streamed token counts in its
    bucket, a request in every bucket from the one it starts in to the one it ends in.
    `token_times` are the completed requests' token times in any number of pieces (a million
    requests' tokens need not be in memory at once).
    """
    start = np.asarray(start_times, dtype=np.float64)
    if start.size == 0:
        return {"max_output_tokens_per_s": 0.0, "max_concurrent_requests": 0}
    origin = float(start.min())
    end = start + np.asarray(latencies, dtype=np.float64)
    buckets = int(math.ceil(float(end.max()) - origin)) + 1
    per_second = np.zeros(buckets, dtype=np.int64)
    # A piece's buckets PASS values at a time, in two buffers kept from piece to piece: a fresh
    # array per piece is tens of megabytes the kernel maps and zeroes again each time (half of
    # this function's time at 200k requests).
    t_buf, b_buf = np.empty(PASS, dtype=np.float64), np.empty(PASS, dtype=np.int64)
    for times in token_times:
        times = np.asarray(times)
        for p in range(0, len(times), PASS):
            part = times[p : p + PASS]
            t = np.subtract(part, origin, out=t_buf[: len(part)], dtype=np.float64)
            b = b_buf[: len(part)]
            b[...] = np.floor(t, out=t)
            if b.min() < 0 or b.max() >= buckets:
                b = b[(b >= 0) & (b < buckets)]
            per_second += np.bincount(b, minlength=buckets)
    # Concurrency: +1 at a request's first bucket, −1 after its last (a difference array).
    first = np.floor(start - origin).astype(np.int64)
    last = np.floor(end - origin).astype(np.int64)
    delta = np.zeros(buckets + 1, dtype=np.int64)
    np.add.at(delta, first, 1)
    np.add.at(delta, np.minimum(last + 1, buckets), -1)
    concurrent = np.cumsum(delta[:buckets])
    return {
        "max_output_tokens_per_s": float(per_second.max()),
        "max_concurrent_requests": int(concurrent.max()),
    }


def token_times_of(
    first_token: np.ndarray, offsets: np.ndarray, gaps: np.ndarray, block: int = 1 << 22
) -> Iterator[np.ndarray]:
    """The token times of requests whose first (streamed) token is at `first_token[i]` and whose
    later tokens follow at `gaps[offsets[i]:offsets[i + 1]]`, in pieces of about `block` gaps.
    The pieces of later tokens share a buffer: each is valid until the next one is asked for."""
    n = len(first_token)
    buffer = np.empty(0, dtype=np.float64)  # the sums of every block, grown when one is longer
    i = 0
    while i < n:
        j = int(np.searchsorted(offsets, offsets[i] + block, side="right"))
        j = min(max(j - 1, i + 1), n)
        lo, hi = int(offsets[i]), int(offsets[j])
        first = np.asarray(first_token[i:j], dtype=np.float64)
        yield first
        if hi == lo:
            i = j
            continue
        if hi - lo > len(buffer):
            buffer = np.empty(hi - lo, dtype=np.float64)
        sums = np.cumsum(gaps[lo:hi], dtype=np.float64, out=buffer[: hi - lo])
        # Within request k, gap number m ends at first + (its cumsum − cumsum before request k),
        # summed in that order: the difference first, so that a first token time far smaller
        # than the block's sum of gaps is not lost to rounding.
        at = offsets[i:j] - lo  # (the sum before a request's gaps: 0 for the block's first)
        before = np.where(at > 0, sums[at - 1], 0.0)
        # (sums - before) + first, PASS gaps at a time: the requests' values repeated over
        # their gaps in that pass only (small temporaries, reused by malloc).
        ends = np.append(at[1:], hi - lo)  # where each request's gaps end
        for p in range(0, hi - lo, PASS):
            q = min(p + PASS, hi - lo)
            r0 = int(np.searchsorted(ends, p, side="right"))  # the first with a gap in p..q-1
            r1 = int(np.searchsorted(at, q, side="left"))  # one past the last
            counts = np.minimum(ends[r0:r1], q) - np.maximum(at[r0:r1], p)
            part = sums[p:q]
            part -= np.repeat(before[r0:r1], counts)
            part += np.repeat(first[r0:r1], counts)
        yield sums
        i = j


def bench_metrics(
    outcomes: Outcomes,
    duration: float,
    goodput: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = (99,),
) -> dict[str, Any]:
    """The aggregate fields of a client's run, exactly as ``vllm bench serve`` computes them
    from the same per-request data (TPOT = (latency − TTFT) / (output tokens − 1))."""
    ok = np.asarray(outcomes.success, dtype=bool)
    out_lens = np.asarray(outcomes.output_lens, dtype=np.int64)[ok]
    ttft = np.asarray(outcomes.ttfts, dtype=np.float64)[ok]
    e2el = np.asarray(outcomes.latencies, dtype=np.float64)[ok]
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(out_lens > 1, (e2el - ttft) / (out_lens - 1), np.nan)
    itl = [np.asarray(outcomes.itls[i], dtype=np.float64) for i in np.flatnonzero(ok)]
    pooled = np.concatenate(itl) if itl else np.zeros(0)
    result = serving_metrics(
        duration=duration,
        failed=int(np.count_nonzero(~ok)),
        input_lens=np.asarray(outcomes.input_lens, dtype=np.int64)[ok],
        output_lens=out_lens,
        ttft=ttft,
        tpot=tpot,
        itl=pooled,
        e2el=e2el,
        goodput=goodput,
        percentiles=percentiles,
    )
    starts = np.asarray(outcomes.start_times, dtype=np.float64)[ok]
    offsets = np.zeros(len(itl) + 1, dtype=np.int64)
    np.cumsum([len(g) for g in itl], out=offsets[1:])
    result.update(peaks(starts, e2el, token_times_of(starts + ttft, offsets, pooled)))
    return result


def outcome_arrays(outcomes: Outcomes, fields: Sequence[str] = DETAILED_FIELDS) -> dict[str, list]:
    """The per-request arrays of vLLM's result named in `fields` (by default all of
    :data:`DETAILED_FIELDS`), JSON-ready: failed requests have output length 0 and TTFT/latency
    0.0, as in vLLM. Only the fields asked for are built (`itls` holds every gap)."""
    ok = np.asarray(outcomes.success, dtype=bool)
    n = len(outcomes)

    def zero_failed(values) -> list[float]:
        return np.where(ok, np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0).tolist()

    def queue_times() -> list[float]:
        queue = outcomes.queue_times if outcomes.queue_times is not None else np.zeros(n)
        return np.asarray(queue, dtype=np.float64).tolist()

    build = {
        "input_lens": lambda: np.asarray(outcomes.input_lens, dtype=np.int64).tolist(),
        "output_lens": lambda: np.where(ok, outcomes.output_lens, 0).astype(np.int64).tolist(),
        "ttfts": lambda: zero_failed(outcomes.ttfts),
        "itls": lambda: [np.asarray(g, dtype=np.float64).tolist() for g in outcomes.itls],
        "latencies": lambda: zero_failed(outcomes.latencies),
        "start_times": lambda: np.asarray(outcomes.start_times, dtype=np.float64).tolist(),
        "queue_times": queue_times,
        "generated_texts": lambda: list(outcomes.generated_texts or [""] * n),
        "errors": lambda: list(outcomes.errors or [""] * n),
    }
    return {name: build[name]() for name in fields}


def run_metadata(
    *,
    backend: str,
    model_id: str,
    num_prompts: int,
    request_rate: float | None,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    label: str | None = None,
    tokenizer_id: str | None = None,
    dated: bool = True,
) -> dict[str, Any]:
    """The run description vLLM writes before its metrics; `request_rate` None (all at once,
    or the trace's own timestamps) is vLLM's "inf". `dated` False writes `date` as null: a
    simulation is a function of its config, so its summary must not change from one run to
    the next."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S") if dated else None,
        "endpoint_type": backend,
        "backend": backend,
        "label": label,
        "model_id": model_id,
        "tokenizer_id": tokenizer_id or model_id,
        "num_prompts": num_prompts,
        "request_rate": "inf" if request_rate is None or math.isinf(request_rate) else request_rate,
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
    }


def result_json(
    metadata: Mapping[str, Any],
    metrics: Mapping[str, Any],
    outcomes: Outcomes,
    *,
    detailed: bool,
) -> dict[str, Any]:
    """`vllm bench serve`'s result: the run's metadata, its metrics, then the per-request
    arrays: every one of :data:`DETAILED_FIELDS` when `detailed` (vLLM's `--save-detailed`),
    else only :data:`BRIEF_FIELDS`, as vLLM does (a long run's `itls` hold every gap)."""
    arrays = outcome_arrays(outcomes, DETAILED_FIELDS if detailed else BRIEF_FIELDS)
    return {**metadata, **metrics, **arrays}


def write_result(result: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """The result as JSON, one top-level field per line: the figures read at a glance, and an
    array stays on one line (indented JSON would give every number a line of its own)."""
    # A field at a time: a million requests' arrays are tens of megabytes of text each.
    with open(path, "w") as fh:
        fh.write("{\n")
        separator = ""
        for key, value in result.items():
            fh.write(f"{separator}  {json.dumps(key)}: ")
            fh.write(json.dumps(value))
            separator = ",\n"
        fh.write("\n}\n")


def read_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A result of `llmsched bench --out FILE.json`, of `llmsched simulate --out DIR` (the
    folder or its summary.json) or of `vllm bench serve --save-result`."""
    p = Path(path)
    p = p / "summary.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (a bench JSON or a simulate --out folder)")
    result = json.loads(p.read_text())
    if not isinstance(result, dict) or "completed" not in result:
        raise ValueError(f"{p} is not a vllm bench serve result (it has no 'completed' field)")
    return result


def outcomes_from_result(result: Mapping[str, Any]) -> Outcomes:
    """The per-request arrays of a detailed result back as :class:`Outcomes` (a request with an
    error failed; its times are NaN again)."""
    missing = [name for name in DETAILED_FIELDS if name not in result]
    if missing:
        raise ValueError(f"the result has no {', '.join(missing)}: write it with --save-detailed")
    ok = np.array([not e for e in result["errors"]], dtype=bool)
    return Outcomes(
        success=ok,
        input_lens=np.asarray(result["input_lens"], dtype=np.int64),
        output_lens=np.asarray(result["output_lens"], dtype=np.int64),
        ttfts=np.where(ok, np.asarray(result["ttfts"], dtype=np.float64), np.nan),
        latencies=np.where(ok, np.asarray(result["latencies"], dtype=np.float64), np.nan),
        start_times=np.asarray(result["start_times"], dtype=np.float64),
        itls=[np.asarray(g, dtype=np.float64) for g in result["itls"]],
        errors=list(result["errors"]),
        queue_times=np.asarray(result["queue_times"], dtype=np.float64),
        generated_texts=list(result["generated_texts"]),
    )
