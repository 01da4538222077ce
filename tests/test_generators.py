"""Arrival and length generators, and build_workload: statistics, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsched.data import data_dir
from llmsched.workload.generators import (
    build_workload,
    gamma_arrivals,
    lognormal_lengths,
    poisson_arrivals,
    replay_arrivals,
    synthetic_workload,
)
from llmsched.workload.readers import read_trace
from llmsched.workload.request import Workload

N = 200_000


def cv_of(arrivals: np.ndarray) -> float:
    gaps = np.diff(arrivals)
    return float(gaps.std() / gaps.mean())


# --- arrival processes ------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.5, 5.0, 200.0])
def test_poisson_mean_gap_and_cv(rate):
    t = poisson_arrivals(N, rate, np.random.default_rng(1))
    assert len(t) == N and t[0] == 0.0
    # standard error of the mean gap is 1/(rate*sqrt(N)) ~ 0.2 %: 1 % is ~4.5 sigma
    assert np.diff(t).mean() == pytest.approx(1 / rate, rel=0.01)
    assert cv_of(t) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("cv", [0.25, 0.5, 2.0, 4.0])
def test_gamma_mean_gap_and_cv(cv):
    t = gamma_arrivals(N, 10.0, cv, np.random.default_rng(2))
    assert len(t) == N and t[0] == 0.0
    assert np.diff(t).mean() == pytest.approx(0.1, rel=0.03)
    assert cv_of(t) == pytest.approx(cv, rel=0.05)


def test_gamma_cv1_is_poisson_and_cv0_is_even():
    assert np.array_equal(gamma_arrivals(1000, 3.0, 1.0, 7), poisson_arrivals(1000, 3.0, 7))
    assert gamma_arrivals(5, 4.0, 0.0).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_gamma_with_cv_near_one_is_close_to_exponential():
    # the Gamma branch itself (not the cv == 1 shortcut) at cv ~ 1: exponential quantiles
    gaps = np.diff(gamma_arrivals(N, 2.0, 1.0 + 1e-9, 3))
    for q in (0.1, 0.5, 0.9, 0.99):
        assert np.quantile(gaps, q) == pytest.approx(-np.log(1 - q) / 2.0, rel=0.03)


def test_small_n():
    assert poisson_arrivals(0, 1.0, 0).tolist() == []
    assert poisson_arrivals(1, 1.0, 0).tolist() == [0.0]
    assert gamma_arrivals(1, 1.0, 3.0, 0).tolist() == [0.0]


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan")])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(10, rate, 0)
    with pytest.raises(ValueError, match="rate"):
        gamma_arrivals(10, rate, 2.0, 0)


def test_bad_cv_and_n():
    with pytest.raises(ValueError, match="cv"):
        gamma_arrivals(10, 1.0, -0.5, 0)
    with pytest.raises(ValueError, match=">= 0"):
        poisson_arrivals(-1, 1.0, 0)


def test_replay_scaling_is_exact():
    ts = np.array([10.0, 11.0, 13.0, 13.0, 17.0])
    assert replay_arrivals(ts, 1.0).tolist() == [0.0, 1.0, 3.0, 3.0, 7.0]
    assert replay_arrivals(ts, 0.5).tolist() == [0.0, 0.5, 1.5, 1.5, 3.5]
    assert replay_arrivals(ts, 2.0).tolist() == [0.0, 2.0, 6.0, 6.0, 14.0]
    assert replay_arrivals(np.zeros(0), 2.0).tolist() == []
    with pytest.raises(ValueError, match="time_scale"):
        replay_arrivals(ts, 0.0)


def test_same_seed_same_arrivals_different_seed_different():
    assert np.array_equal(poisson_arrivals(100, 2.0, 5), poisson_arrivals(100, 2.0, 5))
    assert not np.array_equal(poisson_arrivals(100, 2.0, 5), poisson_arrivals(100, 2.0, 6))
    assert np.array_equal(gamma_arrivals(100, 2.0, 3.0, 5), gamma_arrivals(100, 2.0, 3.0, 5))
    assert not np.array_equal(gamma_arrivals(100, 2.0, 3.0, 5), gamma_arrivals(100, 2.0, 3.0, 6))


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 2000),
    rate=st.floats(1e-3, 1e5),
    cv=st.floats(0.0, 20.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_arrivals_are_n_long_finite_non_decreasing(n, rate, cv, seed):
    for t in (poisson_arrivals(n, rate, seed), gamma_arrivals(n, rate, cv, seed)):
        assert t.shape == (n,)
        assert np.isfinite(t).all()
        assert (np.diff(t) >= 0).all()
        if n:
            assert t[0] == 0.0


# --- build_workload ---------------------------------------------------------------------------


def timed_source(n: int = 10) -> Workload:
    return Workload(
        {
            "request_id": np.array([f"r{i}" for i in range(n)], dtype=object),
            "arrival": 100.0 + 2.0 * np.arange(n),
            "prompt_tokens": np.arange(1, n + 1) * 10,
            "output_tokens": np.arange(1, n + 1),
            "prompt_text": np.array([f"text {i}" for i in range(n)], dtype=object),
            "session_id": np.array([f"s{i // 2}" for i in range(n)], dtype=object),
            "turn": np.arange(n) % 2,
        },
        source="src",
        timed=True,
    )


def untimed_source(n: int = 10) -> Workload:
    w = timed_source(n)
    return Workload(
        {**{k: v for k, v in w.columns.items() if v is not None}, "arrival": np.zeros(n)},
        source="lengths.csv",
        timed=False,
    )


def test_trace_arrivals_head():
    w = build_workload(timed_source(), num_requests=4, arrival="trace", time_scale=0.5)
    assert w.arrivals.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert w.columns["request_id"].tolist() == ["r0", "r1", "r2", "r3"]
    assert w.columns["prompt_tokens"].tolist() == [10, 20, 30, 40]
    assert w.columns["prompt_text"].tolist() == ["text 0", "text 1", "text 2", "text 3"]
    assert w.columns["turn"].tolist() == [0, 1, 0, 1]
    assert w.timed
    assert len(build_workload(timed_source())) == 10  # all rows by default


def test_trace_arrivals_need_a_timed_source():
    with pytest.raises(ValueError, match="lengths.csv has no timestamps.*rate"):
        build_workload(untimed_source(), num_requests=4, arrival="trace")


def test_trace_arrivals_cannot_invent_timestamps():
    with pytest.raises(ValueError, match="10 timestamps, fewer than the 11"):
        build_workload(timed_source(), num_requests=11, arrival="trace")


def test_poisson_on_untimed_source():
    src = untimed_source()
    w = build_workload(src, num_requests=6, arrival="poisson", rate=2.0, seed=3)
    assert w.timed
    assert w.arrivals.tolist() == poisson_arrivals(6, 2.0, np.random.default_rng(3)).tolist()
    assert w.columns["output_tokens"].tolist() == [1, 2, 3, 4, 5, 6]  # the head, in order
    assert not src.timed  # the source is left alone


def test_gamma_arrivals_statistics():
    w = build_workload(untimed_source(), num_requests=N, arrival="gamma", rate=4.0, cv=3.0)
    assert np.diff(w.arrivals).mean() == pytest.approx(0.25, rel=0.05)
    assert cv_of(w.arrivals) == pytest.approx(3.0, rel=0.05)


def test_random_sampling_with_replacement_keeps_ids_unique():
    src = timed_source(5)
    w = build_workload(src, num_requests=50, arrival="poisson", rate=1.0, sample="random", seed=1)
    ids = w.columns["request_id"].tolist()
    assert len(set(ids)) == 50
    base = [i.split("#")[0] for i in ids]
    assert set(base) == {"r0", "r1", "r2", "r3", "r4"}  # all drawn, with repeats
    # every other column travels with its row
    for rid, prompt, text, session in zip(
        base, w.columns["prompt_tokens"], w.columns["prompt_text"], w.columns["session_id"]
    ):
        k = int(rid[1:])
        assert prompt == 10 * (k + 1) and text == f"text {k}"
        assert session.split("#")[0] == f"s{k // 2}"
    assert len(set(w.columns["session_id"])) == 50  # drawn rows are independent sessions


def test_more_requests_than_rows_samples_with_replacement():
    w = build_workload(untimed_source(3), num_requests=10, arrival="poisson", rate=1.0)
    assert len(w) == 10 and len(set(w.columns["request_id"])) == 10
    assert set(w.columns["prompt_tokens"]) <= {10, 20, 30}


def test_random_sampling_with_trace_arrivals_uses_the_trace_times():
    w = build_workload(timed_source(), num_requests=5, sample="random", seed=2)
    assert w.arrivals.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_build_is_deterministic_per_seed():
    src = untimed_source()

    def build(seed):
        return build_workload(
            src, num_requests=30, arrival="gamma", rate=3.0, cv=2.0, sample="random", seed=seed
        )

    a, b, c = build(0), build(0), build(1)
    for name, col in a.columns.items():
        if col is not None and col.dtype == object:
            assert col.tolist() == b.columns[name].tolist(), name
        elif col is not None:
            assert np.array_equal(col, b.columns[name], equal_nan=col.dtype.kind == "f"), name
    assert a.arrivals.tolist() != c.arrivals.tolist()
    assert a.columns["request_id"].tolist() != c.columns["request_id"].tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arrival": "poisson"}, "needs a rate > 0"),
        ({"arrival": "poisson", "rate": 0.0}, "needs a rate > 0"),
        ({"arrival": "gamma", "rate": -2.0}, "needs a rate > 0"),
        ({"arrival": "trace", "rate": 2.0}, "rate is not used with arrival='trace'"),
        ({"arrival": "poisson", "rate": 2.0, "time_scale": 2.0}, "time_scale only applies"),
        ({"arrival": "poisson", "rate": 2.0, "cv": 2.0}, "cv is only used"),
        ({"arrival": "trace", "cv": 2.0}, "cv is only used"),
        ({"arrival": "trace", "time_scale": 0.0}, "time_scale must be"),
        ({"arrival": "uniform"}, "unknown arrival process 'uniform'"),
        ({"sample": "tail"}, "unknown sampling 'tail'"),
        ({"num_requests": 0}, "num_requests must be >= 1"),
    ],
)
def test_build_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_workload(timed_source(), **kwargs)


def test_build_from_empty_source():
    empty = Workload({"arrival": np.zeros(0)}, source="empty.csv")
    with pytest.raises(ValueError, match="no requests"):
        build_workload(empty, arrival="poisson", rate=1.0)


@pytest.mark.skipif(data_dir() is None, reason="shared data folder not found (LLMSCHED_DATA)")
def test_build_from_real_azure_at_double_speed():
    src = read_trace(data_dir() / "traces/azure2023/AzureLLMInferenceTrace_conv.csv")
    w = build_workload(src, num_requests=1000, time_scale=0.5)
    assert np.allclose(w.arrivals, src.arrivals[:1000] * 0.5)
    assert w.columns["prompt_tokens"].tolist() == src.columns["prompt_tokens"][:1000].tolist()


# --- lengths and the synthetic workload -------------------------------------------------------


def test_synthetic_matches_azure_conv_p50_p90():
    w = synthetic_workload(100_000, rate=10.0, seed=0)
    prompt, output = w.columns["prompt_tokens"], w.columns["output_tokens"]
    assert np.percentile(prompt, 50) == pytest.approx(1020, rel=0.05)
    assert np.percentile(prompt, 90) == pytest.approx(2734, rel=0.05)
    assert np.percentile(output, 50) == pytest.approx(129, rel=0.05)
    assert np.percentile(output, 90) == pytest.approx(424, rel=0.05)
    assert prompt.min() >= 1 and prompt.max() == 8192  # clipped
    assert output.min() >= 1 and output.max() == 2048
    assert (w.columns["reasoning_tokens"] == 0).all()
    assert np.diff(w.arrivals).mean() == pytest.approx(0.1, rel=0.02)
    assert w.timed and len(set(w.columns["request_id"])) == len(w)


def test_synthetic_reasoning_split():
    w = synthetic_workload(20_000, rate=5.0, reasoning_ratio=0.7, seed=4)
    out, reason = w.columns["output_tokens"], w.columns["reasoning_tokens"]
    assert (out - reason >= 1).all()  # at least one answer token
    long = out >= 10
    assert np.array_equal(reason[long], np.rint(0.7 * out[long]).astype(int))
    assert (reason[out == 1] == 0).all()
    everything = synthetic_workload(1000, rate=5.0, reasoning_ratio=1.0)
    assert (everything.columns["output_tokens"] - everything.columns["reasoning_tokens"] == 1).all()


def test_synthetic_is_deterministic_and_bursty_on_request():
    a = synthetic_workload(500, rate=2.0, seed=9)
    b = synthetic_workload(500, rate=2.0, seed=9)
    c = synthetic_workload(500, rate=2.0, seed=10)
    assert a.columns["prompt_tokens"].tolist() == b.columns["prompt_tokens"].tolist()
    assert a.arrivals.tolist() == b.arrivals.tolist()
    assert a.columns["prompt_tokens"].tolist() != c.columns["prompt_tokens"].tolist()
    bursty = synthetic_workload(N, rate=2.0, cv=3.0, max_prompt=100, max_output=100)
    assert cv_of(bursty.arrivals) == pytest.approx(3.0, rel=0.05)
    assert bursty.columns["prompt_tokens"].max() <= 100


def test_synthetic_errors():
    with pytest.raises(ValueError, match="reasoning_ratio"):
        synthetic_workload(10, rate=1.0, reasoning_ratio=1.5)
    with pytest.raises(ValueError, match="rate"):
        synthetic_workload(10, rate=0.0)
    with pytest.raises(ValueError, match="num_requests"):
        synthetic_workload(0, rate=1.0)


def test_lognormal_lengths_median():
    x = lognormal_lengths(N, 300, 1.0, 10**6, 0)
    assert np.median(x) == pytest.approx(300, rel=0.02)
    assert lognormal_lengths(10, 5, 0.0, 100, 0).tolist() == [5] * 10
