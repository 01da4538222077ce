"""Metrics: hand-computed timelines, vLLM-equivalent summaries, reports."""

from __future__ import annotations

import csv
import dataclasses
import gc
import itertools
import json
import math
import sys
import weakref

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsched.metrics import report, vllm_bench
from llmsched.metrics.qoe import PASCAL_ANSWER_SLO
from llmsched.metrics.ranking import kendall_tau
from llmsched.metrics.record import RequestRecord
from llmsched.metrics.report import (
    ANSWER_METRICS,
    DEFAULT_COMPARISON_METRICS,
    coinciding,
    format_comparison,
    format_summary,
    plot_capacity,
    plot_distributions,
    write_requests_csv,
)
from llmsched.metrics.summary import (
    CSV_COLUMNS,
    CSV_HEADER,
    EXTRA_LATENCY_METRICS,
    PERCENTILES,
    VLLM_LATENCY_METRICS,
    MetricsCollector,
    RequestMetrics,
    max_concurrency,
    per_request_metrics,
    summarize,
)
from llmsched.metrics.vllm_bench import peaks, token_times_of

# --------------------------------------------------------------------------------------------
# Hand-made timelines (binary-exact numbers so equalities are exact)
# --------------------------------------------------------------------------------------------


def one_token() -> RequestRecord:
    # ttft = e2el = 0.25, tpot undefined, no ITL, queue 0.125
    return RequestRecord(
        "one",
        arrival=1.0,
        prompt_tokens=10,
        output_tokens=1,
        token_times=np.array([1.25]),
        first_scheduled=1.125,
        instance=0,
    )


def four_tokens() -> RequestRecord:
    # ttft 0.5, e2el 1.5, tpot (1.5-0.5)/3, gaps 0.25 0.5 0.25
    return RequestRecord(
        "four",
        arrival=0.0,
        prompt_tokens=20,
        output_tokens=4,
        token_times=np.array([0.5, 0.75, 1.25, 1.5]),
        first_scheduled=0.25,
        preemptions=1,
        instance=1,
        priority=2,
        tier="gold",
    )


def reasoning() -> RequestRecord:
    # tokens 0..2 hidden; answer tokens at 3.75, 4.0, 4.5
    # ttft 1.75, ttft_any 0.25, e2el 2.5, tpot (2.5-1.75)/2 = 0.375, ITL 0.25 0.5, max gap 1.0
    return RequestRecord(
        "think",
        arrival=2.0,
        prompt_tokens=30,
        output_tokens=6,
        reasoning_tokens=3,
        token_times=np.array([2.25, 3.25, 3.5, 3.75, 4.0, 4.5]),
        first_scheduled=2.0,
        migrations=1,
        instance=0,
    )


def rejected(arrival: float = 0.5, reason: str = "kv_capacity") -> RequestRecord:
    return RequestRecord(
        "nope",
        arrival=arrival,
        prompt_tokens=100_000,
        output_tokens=5,
        finished=False,
        reject_reason=reason,
    )


def test_one_token_request():
    m = per_request_metrics(one_token())
    assert m["status"] == "finished"
    assert m["ttft"] == 0.25
    assert m["ttft_any"] == 0.25
    assert m["e2el"] == 0.25
    assert m["queue_time"] == 0.125
    assert math.isnan(m["tpot"])
    assert math.isnan(m["max_gap"])
    assert len(m["itl"]) == 0
    assert m["first_token"] == m["first_answer_token"] == m["finish"] == 1.25


def test_four_token_request():
    m = per_request_metrics(four_tokens())
    assert m["ttft"] == 0.5
    assert m["ttft_any"] == 0.5
    assert m["e2el"] == 1.5
    assert m["tpot"] == pytest.approx(1.0 / 3.0, rel=1e-15)
    assert m["itl"].tolist() == [0.25, 0.5, 0.25]
    assert m["max_gap"] == 0.5
    assert m["queue_time"] == 0.25
    assert m["visible_tokens"] == 4


def test_reasoning_request_ttft_is_first_answer_token():
    m = per_request_metrics(reasoning())
    assert m["ttft"] == 1.75
    assert m["ttft_any"] == 0.25
    assert m["first_token"] == 2.25
    assert m["first_answer_token"] == 3.75
    assert m["e2el"] == 2.5
    assert m["tpot"] == 0.375
    assert m["itl"].tolist() == [0.25, 0.5]  # only among answer tokens
    assert m["max_gap"] == 1.0  # the stall inside the hidden part still shows here
    assert m["visible_tokens"] == 3


def test_reasoning_without_answer_sees_response_end():
    rec = RequestRecord(
        "cut",
        arrival=0.0,
        prompt_tokens=5,
        output_tokens=3,
        reasoning_tokens=3,
        token_times=np.array([0.25, 0.5, 1.0]),
    )
    m = per_request_metrics(rec)
    assert m["ttft"] == m["e2el"] == 1.0
    assert math.isnan(m["first_answer_token"])
    assert math.isnan(m["tpot"])
    assert len(m["itl"]) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"output_tokens": 3, "token_times": np.array([1.0, 2.0])}, "token_times has 2"),
        ({"output_tokens": 0, "token_times": np.zeros(0)}, "no output tokens"),
        ({"output_tokens": 2, "token_times": np.array([2.0, 1.5])}, "non-decreasing"),
        ({"output_tokens": 2, "token_times": np.array([0.5, 1.5])}, "precedes its arrival"),
        ({"output_tokens": 2, "token_times": np.array([1.5, np.nan])}, "NaN"),
        (
            {"output_tokens": 2, "reasoning_tokens": 3, "token_times": np.array([1.5, 2.0])},
            "reasoning_tokens",
        ),
    ],
)
def test_inconsistent_finished_record_is_a_clear_error(kwargs, match):
    rec = RequestRecord("bad", arrival=1.0, prompt_tokens=4, **kwargs)
    with pytest.raises(ValueError, match=match) as err:
        per_request_metrics(rec)
    assert "'bad'" in str(err.value)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def three_collector() -> MetricsCollector:
    c = MetricsCollector()
    for r in (one_token(), four_tokens(), reasoning()):
        c.add(r)
    return c


def test_summary_hand_computed():
    s = three_collector().summary()
    assert s["completed"] == 3
    assert s["failed"] == 0
    assert s["duration"] == 4.5  # first arrival 0.0 → last finish 4.5
    assert s["total_input_tokens"] == 60
    assert s["total_output_tokens"] == 11
    assert s["request_throughput"] == pytest.approx(3 / 4.5)
    assert s["output_throughput"] == pytest.approx(11 / 4.5)
    assert s["total_token_throughput"] == pytest.approx(71 / 4.5)
    assert s["request_goodput"] is None
    # TTFT 0.25, 0.5, 1.75 s
    assert s["mean_ttft_ms"] == pytest.approx(2500 / 3)
    assert s["median_ttft_ms"] == pytest.approx(500)
    assert s["p90_ttft_ms"] == pytest.approx(500 + 0.8 * 1250)  # linear interpolation
    assert s["std_ttft_ms"] == pytest.approx(np.std([250, 500, 1750]))
    # TPOT: the one-token request has none → mean of 1/3 and 0.375
    assert s["mean_tpot_ms"] == pytest.approx((1000 / 3 + 375) / 2)
    # ITL pooled: 0.25 0.5 0.25 | 0.25 0.5
    assert s["mean_itl_ms"] == pytest.approx(350)
    assert s["median_itl_ms"] == pytest.approx(250)
    # E2EL 0.25 1.5 2.5
    assert s["mean_e2el_ms"] == pytest.approx(4250 / 3)
    assert s["p99_e2el_ms"] == pytest.approx(1500 + 0.98 * 1000)
    # extensions
    assert s["mean_ttft_any_ms"] == pytest.approx((250 + 500 + 250) / 3)
    assert s["mean_queue_time_ms"] == pytest.approx((125 + 250 + 0) / 3)
    assert s["total_preemptions"] == 1
    assert s["total_migrations"] == 1
    assert s["rejected_reasons"] == {}
    assert s["slo_attainment"] is None
    assert s["peak_concurrent_requests"] == 2  # [0,1.5] overlaps [1,1.25]; [2,4.5] alone
    # vLLM counts per second: [0,1.5] is in seconds 0 and 1, [1,1.25] in 1, [2,4.5] in 2-4
    assert s["max_concurrent_requests"] == 2
    json.dumps(s, allow_nan=False)  # strict JSON


def test_summary_has_vllm_field_names():
    s = three_collector().summary(goodput={"ttft": 500})
    for key in (
        "completed",
        "failed",
        "duration",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "max_concurrent_requests",
        "max_output_tokens_per_s",
    ):
        assert key in s
    for m in (*VLLM_LATENCY_METRICS, *EXTRA_LATENCY_METRICS):
        for stat in ("mean", "median", "std", "p90", "p95", "p99"):
            assert f"{stat}_{m}_ms" in s


def test_one_spelling_per_percentile_the_median_is_median():
    """vLLM writes both median_ and p50_ when asked for the 50th percentile; a summary has
    median_ only, whatever percentiles are asked for, and nowhere a p50_ key."""
    c = three_collector()  # "four" is in tier gold: by_tier has statistics too
    for s in (c.summary(), c.summary(percentiles=(50, 99))):
        keys = set(s) | {k for tier in s["by_tier"].values() for k in tier}
        assert not [k for k in keys if k.startswith("p50_")]
        assert s["median_ttft_ms"] == pytest.approx(500)
    assert "p99_ttft_ms" in c.summary(percentiles=(50, 99))


def test_itl_pooling_weights_long_requests():
    # 11 tokens with 0.5 s gaps and 2 tokens with a 4.0 s gap:
    # pooled mean = (10*0.5 + 4)/11; a per-request mean would be (0.5 + 4)/2.
    long = RequestRecord("long", 0.0, 1, 11, token_times=0.5 + 0.5 * np.arange(11))
    short = RequestRecord("short", 0.0, 1, 2, token_times=np.array([1.0, 5.0]))
    s = summarize([long, short])
    assert s["mean_itl_ms"] == pytest.approx(1000 * 9 / 11)
    assert s["median_itl_ms"] == pytest.approx(500)
    assert s["p99_itl_ms"] == pytest.approx(np.percentile([0.5] * 10 + [4.0], 99) * 1000)
    # TPOT is per request, so it weighs each request once.
    assert s["mean_tpot_ms"] == pytest.approx(1000 * (0.5 + 4.0) / 2)


@pytest.mark.parametrize(
    "goodput, good",
    [
        ({"ttft": 500}, 2),  # 0.25, 0.5 ≤ 0.5; 1.75 not
        ({"ttft": 250}, 1),  # boundary: ≤ counts
        ({"ttft": 200}, 0),
        ({"tpot": 350}, 2),  # 0 (undefined), 0.333 ≤ 0.35; 0.375 not
        ({"tpot": 300}, 1),  # only the one-token request (TPOT counts as 0)
        ({"e2el": 2000}, 2),
        ({"e2el": 3000}, 3),
        ({"ttft": 2000, "tpot": 350}, 2),
        ({"ttft": 400, "e2el": 3000}, 1),
        ({"tpot": 400, "e2el": 1000}, 1),
        ({"ttft": 2000, "tpot": 400, "e2el": 3000}, 3),
        ({"ttft": 2000, "tpot": 400, "e2el": 2000}, 2),
    ],
)
def test_goodput_each_slo_subset(goodput, good):
    s = three_collector().summary(goodput=goodput)
    assert s["request_goodput"] == pytest.approx(good / 4.5)


def test_goodput_absent_or_bad():
    c = three_collector()
    assert c.summary()["request_goodput"] is None
    assert c.summary(goodput={})["request_goodput"] is None
    with pytest.raises(ValueError, match="ttft"):
        c.summary(goodput={"latency": 100})
    with pytest.raises(ValueError, match=">= 0"):
        c.summary(goodput={"ttft": -1})


def test_percentiles_equal_numpy():
    rng = np.random.default_rng(7)
    recs = []
    for i in range(200):
        n = int(rng.integers(1, 30))
        a = float(rng.uniform(0, 100))
        t = a + rng.exponential(0.3) + np.cumsum(rng.exponential(0.05, n))
        recs.append(RequestRecord(f"r{i}", a, 5, n, token_times=t))
    c = MetricsCollector()
    c.extend(recs)
    s = c.summary()
    ttft = np.array([r.token_times[0] - r.arrival for r in recs])
    itl = np.concatenate([np.diff(r.token_times) for r in recs])
    for p in PERCENTILES:
        assert s[f"p{p}_ttft_ms"] == pytest.approx(np.percentile(ttft, p) * 1000, rel=1e-12)
        # pooled gaps are stored as float32
        assert s[f"p{p}_itl_ms"] == pytest.approx(np.percentile(itl, p) * 1000, rel=1e-6)
    assert s["median_itl_ms"] == pytest.approx(np.median(itl) * 1000, rel=1e-6)
    assert s["std_ttft_ms"] == pytest.approx(np.std(ttft) * 1000, rel=1e-12)
    custom = c.summary(percentiles=(12.5, 75))
    assert custom["p12.5_ttft_ms"] == pytest.approx(np.percentile(ttft, 12.5) * 1000, rel=1e-12)
    assert "p99_ttft_ms" not in custom


def test_rejected_counts_as_failed_not_in_stats():
    c = MetricsCollector()
    c.add(rejected(arrival=0.0, reason="kv_capacity"))
    c.add(rejected(arrival=0.5, reason="kv_capacity"))
    c.add(rejected(arrival=0.75, reason="admission"))
    c.add(RequestRecord("ok", 1.0, 7, 2, token_times=np.array([1.5, 2.0])))
    s = c.summary()
    assert s["completed"] == 1
    assert s["failed"] == 3
    assert s["rejected_reasons"] == {"kv_capacity": 2, "admission": 1}
    assert s["mean_ttft_ms"] == 500
    assert s["mean_e2el_ms"] == 1000
    assert s["total_input_tokens"] == 7
    assert s["total_output_tokens"] == 2
    assert s["duration"] == 2.0  # from the first (rejected) arrival at 0.0
    assert s["max_concurrent_requests"] == s["peak_concurrent_requests"] == 1
    assert c.num_finished == 1 and c.num_rejected == 3 and len(c) == 4


@pytest.mark.parametrize(
    "intervals, peak",
    [
        ([], 0),
        ([(0, 1)], 1),
        ([(0, 1), (1, 2)], 1),  # touching: one ends as the other arrives
        ([(0, 1), (0.5, 2)], 2),
        ([(0, 10), (1, 2), (1.5, 3), (2, 4)], 3),
        ([(0, 10), (1, 9), (2, 8), (3, 7), (11, 12)], 4),
        ([(0, 5)] * 3 + [(5, 6)] * 2, 3),
    ],
)
def test_max_concurrency(intervals, peak):
    a = np.array([x for x, _ in intervals], dtype=float)
    f = np.array([y for _, y in intervals], dtype=float)
    assert max_concurrency(a, f) == peak


def test_concurrency_in_summary_exact_and_as_vllm_counts_it():
    recs = [
        RequestRecord(str(i), a, 1, 1, token_times=np.array([f]))
        for i, (a, f) in enumerate([(0, 10), (1, 2), (1.5, 3), (2, 4)])
    ]
    s = summarize(recs)
    assert s["peak_concurrent_requests"] == 3  # [1,2) ends as [2,4) starts
    # vLLM: one-second buckets, a request counts in every bucket from its start to its end
    # second, both included: all four are in second 2.
    assert s["max_concurrent_requests"] == 4
    assert s["max_output_tokens_per_s"] == 1.0  # one token each, at 10, 2, 3 and 4 s


def test_slo_attainment_uses_own_slos():
    recs = [
        # ttft 0.5 ≤ 1.0 and tpot 1/3 ≤ 0.5: met
        RequestRecord(
            "a", 0.0, 1, 4, token_times=np.array([0.5, 0.75, 1.25, 1.5]), ttft_slo=1.0, tpot_slo=0.5
        ),
        # ttft 0.5 > 0.25: missed
        RequestRecord("b", 0.0, 1, 1, token_times=np.array([0.5]), ttft_slo=0.25),
        # tpot undefined counts as 0: met
        RequestRecord("c", 0.0, 1, 1, token_times=np.array([3.0]), tpot_slo=0.01),
        # no SLOs: excluded
        RequestRecord("d", 0.0, 1, 1, token_times=np.array([99.0])),
        # rejected with SLO: excluded (counted in failed)
        RequestRecord("e", 0.0, 1, 1, finished=False, reject_reason="x", ttft_slo=0.1),
    ]
    s = summarize(recs)
    assert s["slo_requests"] == 3
    assert s["slo_attainment"] == pytest.approx(2 / 3)


def test_slo_attainment_with_goodput_judges_the_requests_without_slos_of_their_own():
    """--goodput gives every finished request an SLO (TTFT 0.25, 0.5, 1.75 s against 500 ms:
    2 of 3 met); a request carrying its own SLO is judged by it (TTFT 5 s, its SLO 10 s)."""
    s = three_collector().summary(goodput={"ttft": 500})
    assert s["slo_requests"] == 3 and s["slo_attainment"] == pytest.approx(2 / 3)
    own = RequestRecord("own", 0.0, 1, 1, token_times=np.array([5.0]), ttft_slo=10.0)
    s = summarize([one_token(), four_tokens(), reasoning(), own], goodput={"ttft": 500})
    assert s["slo_requests"] == 4 and s["slo_attainment"] == pytest.approx(3 / 4)
    assert "SLO attainment (%): 75.00" in " ".join(format_summary(s).split())


@pytest.mark.parametrize("with_rejected", [False, True])
def test_empty_run(with_rejected, tmp_path):
    c = MetricsCollector()
    if with_rejected:
        c.add(rejected(arrival=1.0))
        c.add(rejected(arrival=3.0))
    s = c.summary(goodput={"ttft": 100})
    assert s["completed"] == 0
    assert s["failed"] == (2 if with_rejected else 0)
    assert s["duration"] == (2.0 if with_rejected else 0.0)
    assert s["max_concurrent_requests"] == s["peak_concurrent_requests"] == 0
    assert s["total_output_tokens"] == 0
    for m in (*VLLM_LATENCY_METRICS, *EXTRA_LATENCY_METRICS):
        assert s[f"mean_{m}_ms"] is None and s[f"p99_{m}_ms"] is None
    if with_rejected:
        assert s["request_throughput"] == 0.0 and s["request_goodput"] == 0.0
    else:
        assert s["request_throughput"] is None and s["request_goodput"] is None
    assert s["slo_attainment"] is None
    json.dumps(s, allow_nan=False)
    assert "n/a" in format_summary(s)
    assert "-" in format_comparison({"fcfs": s})
    write_requests_csv(c, tmp_path / "r.csv")
    plot_distributions({"fcfs": c}, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collector_does_not_keep_token_times():
    times = np.array([0.5, 1.0, 1.5])
    ref = weakref.ref(times)
    c = MetricsCollector()
    c.add(RequestRecord("x" * 40, 0.0, 1, 3, token_times=times))  # also widens the id column
    del times
    gc.collect()
    assert ref() is None
    assert c.columns()["request_id"].tolist() == ["x" * 40]
    assert c.itl().tolist() == [0.5, 0.5]


def test_collector_grows_past_initial_capacity():
    c = MetricsCollector()
    for i in range(3000):
        c.add(RequestRecord(f"req-{i}", float(i), 1, 3, token_times=i + np.array([1.0, 2, 4])))
    assert len(c) == 3000
    assert len(c.itl()) == 6000
    assert c.columns()["request_id"][-1] == "req-2999"
    assert c.column("ttft").tolist() == [1.0] * 3000
    assert c.summary()["mean_itl_ms"] == pytest.approx(1500)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _parse(name: str, text: str):
    if name in ("request_id", "status", "reject_reason", "tier", "session_id"):
        return text
    if name in (
        "turn",
        "prompt_tokens",
        "output_tokens",
        "reasoning_tokens",
        "preemptions",
        "migrations",
        "instance",
        "priority",
    ):
        return int(text)
    return float(text) if text else float("nan")


def test_csv_round_trip(tmp_path):
    recs = [one_token(), four_tokens(), rejected(), reasoning()]
    c = MetricsCollector()
    c.extend(recs)
    path = tmp_path / "requests.csv"
    write_requests_csv(c, path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_HEADER
        # every time and duration says its unit; counts say theirs already
        assert {"arrival_s", "ttft_s", "tpot_s", "e2el_s", "prompt_tokens"} <= set(CSV_HEADER)
        assert "ttft" not in CSV_HEADER
        rows = [dict(zip(CSV_COLUMNS, row.values())) for row in reader]
    assert len(rows) == 4
    for rec, row in zip(recs, rows):
        expected = per_request_metrics(rec)
        for name in CSV_COLUMNS:
            got = _parse(name, row[name])
            want = expected[name]
            if name in ("tier", "session_id"):
                want = want or ""
            if isinstance(want, float) and math.isnan(want):
                assert math.isnan(got), (rec.request_id, name)
            else:
                assert got == want, (rec.request_id, name, got, want)
    assert rows[2]["status"] == "rejected" and rows[2]["reject_reason"] == "kv_capacity"
    assert rows[2]["ttft"] == "" and rows[0]["tpot"] == ""
    assert rows[1]["tier"] == "gold" and rows[1]["preemptions"] == "1"
    assert float(rows[3]["ttft"]) == 1.75 and float(rows[3]["first_answer_token"]) == 3.75


def test_csv_written_in_blocks_is_the_csv_written_at_once(tmp_path, monkeypatch):
    """requests.csv is formatted a block of rows at a time (memory): blocks that end inside the
    run, and at its end, give the bytes of one block."""
    c = MetricsCollector()
    c.extend([one_token(), four_tokens(), rejected(), reasoning(), four_tokens()])
    write_requests_csv(c, tmp_path / "whole.csv")
    for block in (1, 2, 5):
        monkeypatch.setattr(report, "CSV_BLOCK", block)
        write_requests_csv(c, tmp_path / f"{block}.csv")
        assert (tmp_path / f"{block}.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_format_summary_block():
    text = format_summary(three_collector().summary())
    lines = text.splitlines()
    assert "Serving Benchmark Result" in lines[0]
    assert any(ln.startswith("Successful requests:") and ln.split()[-1] == "3" for ln in lines)
    assert any(ln.startswith("Benchmark duration (s):") and "4.50" in ln for ln in lines)
    assert "Request goodput" not in text
    for label in ("Mean TTFT (ms):", "Median TPOT (ms):", "P99 ITL (ms):", "Mean E2EL (ms):"):
        assert label in text
    ttft_line = next(ln for ln in lines if ln.startswith("Mean TTFT (ms):"))
    assert float(ttft_line.split()[-1]) == pytest.approx(833.33)
    with_goodput = format_summary(three_collector().summary(goodput={"ttft": 500}))
    gl = next(ln for ln in with_goodput.splitlines() if ln.startswith("Request goodput"))
    assert float(gl.split()[-1]) == pytest.approx(2 / 4.5, abs=0.005)


def test_format_comparison_table():
    good = three_collector().summary()
    c = MetricsCollector()
    c.add(rejected())
    c.add(one_token())
    other = c.summary()
    text = format_comparison({"fcfs": good, "pascal-long-name": other})
    lines = text.splitlines()
    header = lines[0].split()
    assert header[0] == "policy" and "done" in header and "failed" in header
    fcfs = lines[2].split()
    assert fcfs[0] == "fcfs" and fcfs[1] == "3" and fcfs[2] == "0"
    pascal = lines[3].split()
    assert pascal[0] == "pascal-long-name" and pascal[1] == "1" and pascal[2] == "1"
    # columns are aligned: every value ends where its column's rule ends
    rule = lines[1]
    ends = [
        i + 1
        for i, ch in enumerate(rule)
        if ch == "-" and (i + 1 == len(rule) or rule[i + 1] == " ")
    ]
    # a reasoning request among them adds the answering phase's columns
    assert good["answer_requests"] == 1 and "viol" in header
    assert len(ends) == 1 + len(DEFAULT_COMPARISON_METRICS) + len(ANSWER_METRICS)
    for row in (lines[0], *lines[2:4]):
        for e in ends[1:]:
            assert row[e - 1] != " " and (e == len(row) or row[e] == " "), (row, e)
    sel = format_comparison({"a": good}, metrics=["p99_ttft_ms", "mean_itl_ms"])
    assert sel.splitlines()[0].split() == ["policy", "TTFT", "p99", "ITL", "mean"]
    assert sel.splitlines()[2].split() == ["a", f"{good['p99_ttft_ms']:.2f}", "350.00"]


def test_plot_is_png(tmp_path):
    a = three_collector()
    b = MetricsCollector()
    b.add(four_tokens())
    path = tmp_path / "cdf.png"
    plot_distributions({"fcfs": a, "sjf": b}, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000


def test_coinciding_curves_are_grouped_and_named_together():
    base = np.array([10.0, 20.0, 40.0])
    groups = coinciding({"fcfs": base, "rr": base.copy(), "sjf": base * 1.02, "srpt": base * 1.2})
    assert groups == [(["fcfs", "rr", "sjf"], False), (["srpt"], True)]
    assert coinciding({"a": base, "b": base.copy()}) == [(["a", "b"], True)]


def test_plot_names_identical_policies_together_under_the_runs_title(tmp_path):
    """Two policies with the same finished requests are one line, "fcfs = rr (identical)", in
    both panels; a third stays apart; the title names the run."""
    same, other = three_collector(), MetricsCollector()
    other.add(four_tokens())
    fig = plot_distributions(
        {"fcfs": three_collector(), "rr": same, "sjf": other}, tmp_path / "p.png", title="RUN"
    )
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["fcfs = rr (identical)", "sjf"]
    assert "RUN" in fig.get_suptitle()


def test_capacity_plot_labels_limits_and_legend(tmp_path):
    """The y label names the statistic (not the condition), every limit lies inside its panel,
    a policy's tiers that coincide are one legend entry, and the capacities are explained."""
    evaluations = [
        {"rate": r, "values": {"p99_itl<=tier": {"free": v, "paying": v * 1.01}}}
        for r, v in ((1.0, 40.0), (2.0, 60.0), (4.0, 90.0))
    ]
    results = {
        "sarathi": {
            "capacity_rps": 2.0,
            "evaluations": evaluations,
            "limits_ms": {"p99_itl<=tier": {"free": 500.0, "paying": 100.0}},
        }
    }
    fig = plot_capacity(results, tmp_path / "c.png", title="mistral-7b on l40s")
    (ax,) = fig.axes
    assert ax.get_ylabel() == "p99 ITL (ms)"
    low, high = ax.get_ylim()
    assert low < 40 and high > 500  # the highest limit and its label fit
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [
        "sarathi (free) ≈ sarathi (paying) (within 3 %)",
        "each policy's capacity",
    ]
    assert "mistral-7b on l40s" in fig.get_suptitle()


def test_titles_name_model_gpu_load_and_workload():
    from llmsched.config import load_config
    from llmsched.experiment import run_title

    cfg = load_config(None, model="llama-2-70b", tp=2, instances=4, rate=3.5, num_requests=80)
    title = run_title(cfg, 80)
    for part in ("llama-2-70b", "a100-80gb", "TP 2", "4 instances", "Poisson 3.5 req/s", "80"):
        assert part in title
    assert "req/s" not in run_title(cfg, 80, load=False)
    summary = summarize([one_token()])
    assert format_summary(summary, title=title).splitlines()[0] == title
    assert format_comparison({"fcfs": summary}, title=title).splitlines()[0] == title


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=r"pip install llmsched\[plot\]"):
        plot_distributions({"x": three_collector()}, tmp_path / "x.png")


# --------------------------------------------------------------------------------------------
# Collector vs a direct computation from full arrays
# --------------------------------------------------------------------------------------------


@st.composite
def records(draw):
    n_req = draw(st.integers(0, 25))
    out = []
    for i in range(n_req):
        arrival = draw(st.floats(0, 100, allow_nan=False))
        prompt = draw(st.integers(1, 1000))
        n = draw(st.integers(1, 12))
        if draw(st.integers(0, 4)) == 0:
            out.append(
                RequestRecord(
                    f"r{i}",
                    arrival,
                    prompt,
                    n,
                    finished=False,
                    reject_reason=draw(st.sampled_from(["kv", "slo"])),
                    preemptions=draw(st.integers(0, 2)),
                )
            )
            continue
        reasoning_tokens = draw(st.integers(0, n))
        delay = draw(st.floats(0, 10, allow_nan=False))
        gaps = draw(st.lists(st.floats(0, 2, allow_nan=False), min_size=n - 1, max_size=n - 1))
        times = arrival + delay + np.concatenate([[0.0], np.cumsum(gaps)])
        sched = draw(st.one_of(st.just(float("nan")), st.floats(0, 1, allow_nan=False)))
        out.append(
            RequestRecord(
                f"r{i}",
                arrival,
                prompt,
                n,
                reasoning_tokens=reasoning_tokens,
                token_times=times,
                first_scheduled=sched if math.isnan(sched) else arrival + sched,
                preemptions=draw(st.integers(0, 3)),
                ttft_slo=draw(st.one_of(st.none(), st.floats(0, 5, allow_nan=False))),
                tpot_slo=draw(st.one_of(st.none(), st.floats(0, 1, allow_nan=False))),
            )
        )
    return out


def _stats(values):
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return None
    return [
        np.mean(v) * 1000,
        np.median(v) * 1000,
        np.std(v) * 1000,
        *(np.percentile(v, p) * 1000 for p in PERCENTILES),
    ]


def _direct_summary(recs, goodput):
    """Independent reference: full arrays, plain loops, no collector code."""
    fin = [r for r in recs if r.finished]
    ttft, ttft_any, tpot, tpot0, e2el, itl, queue = [], [], [], [], [], [], []
    slo_hits = slo_n = 0
    for r in fin:
        t = list(r.token_times)
        vis = t[r.reasoning_tokens :]
        e = t[-1] - r.arrival
        f = (vis[0] if vis else t[-1]) - r.arrival
        ttft.append(f)
        ttft_any.append(t[0] - r.arrival)
        e2el.append(e)
        if len(vis) > 1:
            tpot.append((e - f) / (len(vis) - 1))
            tpot0.append(tpot[-1])
        else:
            tpot0.append(0.0)
        itl += [b - a for a, b in itertools.pairwise(vis)]
        if not math.isnan(r.first_scheduled):
            queue.append(r.first_scheduled - r.arrival)
        if r.ttft_slo is not None or r.tpot_slo is not None:
            slo_n += 1
            slo_hits += (r.ttft_slo is None or f <= r.ttft_slo) and (
                r.tpot_slo is None or tpot0[-1] <= r.tpot_slo
            )
        elif goodput:  # no SLOs of its own: the run's goodput SLOs
            slo_n += 1
            slo_hits += all(
                v <= goodput[k] / 1000
                for k, v in (("ttft", f), ("tpot", tpot0[-1]), ("e2el", e))
                if k in goodput
            )
    if recs:
        ends = [r.token_times[-1] for r in fin] + [r.arrival for r in recs if not r.finished]
        duration = max(ends) - min(r.arrival for r in recs)
    else:
        duration = 0.0
    events = sorted([(r.arrival, 1) for r in fin] + [(r.token_times[-1], -1) for r in fin])
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    # vLLM's one-second buckets (calculate_metrics): visible tokens, and requests from their
    # start second to their end second.
    tokens_per_s: dict[int, int] = {}
    conc_per_s: dict[int, int] = {}
    if fin:
        origin = min(r.arrival for r in fin)
        for r in fin:
            for t in list(r.token_times[r.reasoning_tokens :]) or [r.token_times[-1]]:
                b = int(t - origin)
                tokens_per_s[b] = tokens_per_s.get(b, 0) + 1
            for b in range(int(r.arrival - origin), int(r.token_times[-1] - origin) + 1):
                conc_per_s[b] = conc_per_s.get(b, 0) + 1
    good = (
        sum(
            all(
                v <= goodput[k] / 1000
                for k, v in (("ttft", a), ("tpot", b), ("e2el", c))
                if k in goodput
            )
            for a, b, c in zip(ttft, tpot0, e2el)
        )
        if goodput
        else None
    )
    div = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    n_in = sum(r.prompt_tokens for r in fin)
    n_out = sum(r.output_tokens for r in fin)
    reasons: dict[str, int] = {}
    for r in recs:
        if not r.finished:
            reasons[r.reject_reason] = reasons.get(r.reject_reason, 0) + 1
    return {
        "completed": len(fin),
        "failed": len(recs) - len(fin),
        "duration": duration,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": div(len(fin)),
        "output_throughput": div(n_out),
        "total_token_throughput": div(n_in + n_out),
        "request_goodput": None if good is None else div(good),
        "peak_concurrent_requests": peak,
        "max_concurrent_requests": max(conc_per_s.values(), default=0),
        "max_output_tokens_per_s": float(max(tokens_per_s.values(), default=0)),
        "total_preemptions": sum(r.preemptions for r in recs),
        "rejected_reasons": reasons,
        "slo_requests": slo_n,
        "slo_attainment": slo_hits / slo_n if slo_n else None,
        "stats": {
            "ttft": _stats(ttft),
            "tpot": _stats(tpot),
            # The collector stores pooled gaps as float32: so does the reference, or a std of
            # gaps that differ by less than float32's resolution would not compare.
            "itl": _stats([float(g) for g in np.float32(itl)]),
            "e2el": _stats(e2el),
            "ttft_any": _stats(ttft_any),
            "queue_time": _stats(queue),
        },
    }


def _close(a, b, rel=1e-9):
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recs=records(),
    goodput=st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(["ttft", "tpot", "e2el"]),
            st.floats(0, 5000, allow_nan=False),
            min_size=1,
        ),
    ),
)
def test_collector_matches_direct_computation(recs, goodput):
    c = MetricsCollector()
    for r in recs:
        c.add(r)
    s = c.summary(goodput=goodput)
    ref = _direct_summary(recs, goodput)
    for key in (
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "peak_concurrent_requests",
        "max_concurrent_requests",
        "max_output_tokens_per_s",
        "total_preemptions",
        "rejected_reasons",
        "slo_requests",
    ):
        assert s[key] == ref[key], key
    for key in (
        "duration",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "request_goodput",
        "slo_attainment",
    ):
        assert _close(s[key], ref[key]), (key, s[key], ref[key])
    stat_names = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES)]
    for metric, values in ref["stats"].items():
        for i, stat in enumerate(stat_names):
            want = None if values is None else values[i]
            rel = 1e-6 if metric == "itl" else 1e-9  # pooled gaps are stored as float32
            assert _close(s[f"{stat}_{metric}_ms"], want, rel), (metric, stat)
    # the CSV rows carry the same per-request numbers
    cols = c.columns()
    assert cols["request_id"].tolist() == [r.request_id for r in recs]
    assert cols["status"].tolist() == ["finished" if r.finished else "rejected" for r in recs]


def _one_by_one(record) -> dict:
    """Reference: a finished request's timeline metrics in plain Python floats, in the order of
    operations of their definitions (so equal to the last bit)."""
    t, n, r, a = [float(x) for x in record.token_times], record.output_tokens, 0, record.arrival
    r = record.reasoning_tokens
    gaps = [t[i + 1] - t[i] for i in range(n - 1)]
    visible = n - r
    e2el = t[-1] - a
    ttft = t[r] - a if visible else e2el
    return {
        "first_token": t[0],
        "first_answer_token": t[r] if visible else math.nan,
        "finish": t[-1],
        "ttft": ttft,
        "ttft_any": t[0] - a,
        "e2el": e2el,
        "tpot": (e2el - ttft) / (visible - 1) if visible > 1 else math.nan,
        "max_gap": max(gaps) if gaps else math.nan,
        "answer_gap": gaps[r - 1] if 0 < r < n else math.nan,
        "visible_tokens": visible,
        "itl": gaps[r:] if visible > 1 else [],
    }


def _same(a, b) -> bool:
    return a == b or (a != a and b != b)  # (NaN is NaN)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recs=records())
def test_request_metrics_of_many_requests_at_once_are_each_ones_own(recs):
    """Computed together (vectorised, as a collector does), every request's metrics are its
    own: those of it alone, and those of the definitions computed one float at a time."""
    together = RequestMetrics(recs, PASCAL_ANSWER_SLO)
    for i, record in enumerate(recs):
        alone = per_request_metrics(record)
        for name, values in together.columns.items():
            if name in alone and name not in ("ttft_slo", "tpot_slo", "slo_met"):  # (None)
                assert _same(values[i].item(), alone[name]), (record.request_id, name)
        assert together.itl(i).tolist() == alone["itl"].tolist()
        if record.finished:
            for name, value in _one_by_one(record).items():
                got = alone[name].tolist() if name == "itl" else alone[name]
                assert _same(got, value), (record.request_id, name, got, value)
            assert together.columns["slo_met"][i] == (
                -1 if alone["slo_met"] is None else alone["slo_met"]
            )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recs=records(), batch=st.integers(2, 30))
def test_a_collector_batching_its_records_stores_the_same(recs, batch):
    one, many = MetricsCollector(), MetricsCollector(batch=batch)
    for r in recs:
        one.add(r)
        many.add(r)
        assert len(many) == len(one)
    assert np.array_equal(one.itl(), many.itl())
    for name, values in one.columns().items():
        assert np.array_equal(values, many.columns()[name], equal_nan=values.dtype.kind == "f")
    assert json.dumps(one.summary()) == json.dumps(many.summary())


def test_a_batching_collector_refuses_the_first_inconsistent_record_by_name():
    good = dataclasses.replace(four_tokens(), request_id="ok")
    bad = dataclasses.replace(four_tokens(), request_id="late", arrival=0.75)
    worse = dataclasses.replace(four_tokens(), request_id="later", output_tokens=3)
    c = MetricsCollector(batch=4)
    for record in (good, bad, worse):
        c.add(record)  # (held: their metrics come with the fourth record, or when read)
    with pytest.raises(ValueError, match=r"'late': first token at 0.5 s precedes its arrival"):
        c.summary()


# --- ranking ---------------------------------------------------------------------------------
def _brute_tau(a, b):
    num = den_a = den_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        num += da * db
        den_a += da != 0
        den_b += db != 0
    return num / np.sqrt(den_a * den_b)


def test_kendall_tau_b_matches_the_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(3, 40))
        a, b = rng.integers(0, 4, n).astype(float), rng.integers(0, 6, n).astype(float)
        if len(set(a)) > 1 and len(set(b)) > 1:
            assert kendall_tau(a, b) == pytest.approx(_brute_tau(a, b), abs=1e-12)
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # One discordant pair among 10: (9 - 1) / 10.
    assert kendall_tau([1, 2, 3, 5, 4], [10, 20, 30, 40, 50]) == pytest.approx(0.8)
    assert np.isnan(kendall_tau([1.0], [2.0]))
    with pytest.raises(ValueError, match="equal shapes"):
        kendall_tau([1, 2], [1, 2, 3])


# --------------------------------------------------------------------------------------------
# A simulated run against measured ones (llmsched.metrics.fidelity)
# --------------------------------------------------------------------------------------------


def test_field_errors_use_the_mean_and_spread_of_the_repeats():
    from llmsched.metrics.fidelity import field_errors

    real = [{"mean_ttft_ms": 100.0, "p99_e2el_ms": None}, {"mean_ttft_ms": 120.0}]
    (e,) = field_errors(real, {"mean_ttft_ms": 121.0, "p99_e2el_ms": 5.0})
    assert (e.real, e.sim) == (110.0, 121.0)
    assert e.error == pytest.approx(0.1) and e.spread == pytest.approx(20 / 110)
    assert not e.within_spread  # 10 % off, the repeats span ±9.1 %
    (inside,) = field_errors(real, {"mean_ttft_ms": 115.0})
    assert inside.within_spread


def test_policy_order_counts_only_what_the_real_engine_orders():
    from llmsched.metrics.fidelity import order_agrees

    real = {
        "fcfs": [{"x": 10.0}, {"x": 12.0}],
        "pars": [{"x": 5.0}, {"x": 6.0}],
        "srpt": [{"x": 11.0}, {"x": 13.0}],  # overlaps fcfs: tied
    }
    agrees, real_order, _ = order_agrees(real, {"fcfs": {"x": 9}, "pars": {"x": 4},
                                                "srpt": {"x": 8}}, "x")  # fmt: skip
    assert agrees and real_order == ["pars", "fcfs", "srpt"]  # fcfs/srpt swapped: a tie
    agrees, _, sim_order = order_agrees(real, {"fcfs": {"x": 9}, "pars": {"x": 10},
                                               "srpt": {"x": 8}}, "x")  # fmt: skip
    assert not agrees and sim_order == ["srpt", "fcfs", "pars"]  # pars is not below fcfs


def test_token_times_keep_a_first_token_far_smaller_than_the_gaps_before_it():
    """Found by the test above: tokens at 1e-282 s, after a request whose gaps sum to 1 s,
    were put at 0 (the first token time was lost to rounding against the running sum of gaps):
    both tokens at 1e-282 s fall in the first one-second bucket with the run's origin there."""
    tiny = 1.3788371123063556e-282
    c = MetricsCollector()
    for r in (
        RequestRecord("r0", 0.0, 1, 1, token_times=np.zeros(0), finished=False, reject_reason="kv"),
        RequestRecord("r1", 1.0, 1, 2, token_times=np.array([1.0, 2.0])),
        RequestRecord("r3", tiny, 1, 2, token_times=np.array([tiny, tiny])),
    ):
        c.add(r)
    assert c.summary()["max_output_tokens_per_s"] == 2.0


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    block=st.integers(1, 9),
    passes=st.integers(1, 4),
    data=st.data(),
)
def test_token_times_in_blocks_are_each_requests_first_token_and_its_gaps(
    counts, block, passes, data
):
    """However the requests fall into blocks (requests without gaps among them, a request longer
    than a block) and blocks into passes, the pieces hold each request's first token time, then
    each gap's end: the first token plus the request's own gaps summed, and nothing else. The
    pieces share a buffer, so each is copied as it comes."""
    n = len(counts)
    first = np.array(data.draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n)), float)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    total = int(offsets[-1])
    eighths = data.draw(st.lists(st.integers(1, 50), min_size=total, max_size=total))
    gaps = np.array(eighths, dtype=np.float32) / np.float32(8)  # (every sum here is exact)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vllm_bench, "PASS", passes)
        pieces = [p.copy() for p in token_times_of(first, offsets, gaps, block=block)]
    expected = list(first) + [
        first[k] + float(np.sum(gaps[offsets[k] : offsets[k] + m + 1], dtype=np.float64))
        for k in range(n)
        for m in range(counts[k])
    ]
    assert sorted(np.concatenate(pieces).tolist()) == sorted(expected)
    # ... and vLLM's peaks over those pieces are the peaks over all the times at once.
    ends = first + np.array([float(np.sum(gaps[a:b])) for a, b in zip(offsets, offsets[1:])])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vllm_bench, "PASS", passes)
        in_pieces = peaks(first, ends - first, iter(pieces))
    assert in_pieces == peaks(first, ends - first, [np.array(expected)])


# --------------------------------------------------------------------------------------------
# Whole runs: rejections, summary.json, skipped trace rows
# --------------------------------------------------------------------------------------------


def test_rejections_group_by_reason_with_a_few_examples():
    """A context of 2048 tokens against synthetic prompts of up to 6144: many over-long requests,
    nearly every one of a different length, make one reason, one console line, and the first
    three rejected as examples with the lengths they asked for."""
    from llmsched.config import load_config
    from llmsched.experiment import load_workload, simulate

    cfg = load_config(None, num_requests=300, rate=5.0, max_model_len=2048)
    c = load_workload(cfg).columns
    total = c["prompt_tokens"] + c["output_tokens"]
    too_long = np.flatnonzero(total > 2048)
    assert len(np.unique(total[too_long])) > 20  # one line per length, before
    s = simulate(cfg).summary
    reason = "prompt + output exceeds max_model_len (2048 tokens)"
    assert s["rejected_reasons"] == {reason: len(too_long)}
    examples = s["rejected_examples"][reason]
    assert [e["request_id"] for e in examples] == [str(c["request_id"][i]) for i in too_long[:3]]
    assert all(e["prompt_tokens"] + e["output_tokens"] > 2048 for e in examples)
    lines = [line for line in format_summary(s).splitlines() if line.startswith("Rejected")]
    assert lines == [lines[0]] and f"{reason}: {len(too_long)}; e.g. " in lines[0]


def test_summary_json_is_read_back_as_a_vllm_bench_result(tmp_path):
    """What `simulate --out` writes is what `llmsched bench` writes: one reader reads it, its
    per-request arrays give back the summary's vLLM fields through the client's own
    computation (bench_metrics), rejected requests are failed with their reason as error; and
    without --save-detailed only vLLM's brief arrays are written."""
    from llmsched.config import load_config
    from llmsched.experiment import save, simulate
    from llmsched.metrics.vllm_bench import (
        BRIEF_FIELDS,
        DETAILED_FIELDS,
        bench_metrics,
        outcomes_from_result,
        read_result,
    )

    result = simulate(load_config(None, num_requests=120, rate=8.0, max_model_len=4096, seed=2))
    save(result, tmp_path / "full", detailed=True)
    save(result, tmp_path / "brief")
    full = read_result(tmp_path / "full")  # the folder, as `llmsched fidelity --sim` takes it
    assert full == json.loads((tmp_path / "full" / "summary.json").read_text())
    assert full["backend"] == "llmsched-simulator" and full["num_prompts"] == 120
    outcomes = outcomes_from_result(full)
    assert int(np.count_nonzero(~outcomes.success)) == full["failed"] > 0
    assert set(full["rejected_reasons"]) == {e for e in outcomes.errors if e}
    again = bench_metrics(outcomes, full["duration"], percentiles=PERCENTILES)
    for key, value in again.items():
        assert value == (None if full[key] is None else pytest.approx(full[key], rel=1e-6)), key
    brief = read_result(tmp_path / "brief")
    assert set(brief) & set(DETAILED_FIELDS) == set(BRIEF_FIELDS)  # vLLM's, without detail
    assert brief["latencies"] == full["latencies"]
    with pytest.raises(ValueError, match="--save-detailed"):
        outcomes_from_result(brief)
    assert not [k for k in full if k.startswith("p50_")]


def test_skipped_trace_rows_are_counted_in_the_summary(tmp_path):
    from llmsched.config import load_config
    from llmsched.experiment import simulate

    trace = tmp_path / "lengths.csv"
    trace.write_text("num_prefill_tokens,num_decode_tokens\n10,5\n20,0\n30,7\n40,0\n")
    cfg = load_config(None, trace=str(trace), rate=2.0, skip_invalid=True)
    s = simulate(cfg).summary
    assert s["skipped_trace_rows"] == 2 and s["completed"] == 2
    assert "Skipped trace rows (unservable): 2" in " ".join(format_summary(s).split())
