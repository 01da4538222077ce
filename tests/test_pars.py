"""PARS and vllm-ltr: their defining decisions on hand-made cases, the score sources (noisy
oracle, model, config), and exactness of their iteration counters under span fast-forwarding.

Hand-made cases follow tests/test_policies.py: tiny engines, ``fast_forward=False`` so that one
step is one iteration; with ``block_size=1`` a request holds one block per computed token.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmsched.predict
from llmsched.cli import main
from llmsched.engine.config import EngineConfig
from llmsched.metrics.ranking import kendall_tau
from llmsched.policies import policy_class
from llmsched.workload.readers import read_trace, write_jsonl
from llmsched.workload.request import Workload
from llmsched.workload.scores import (
    ScoreSpec,
    attach_scores,
    compute_scores,
    held_out,
    noisy_oracle,
)

from .helpers import LinearLatency
from .test_engine_invariants import CheckedCluster, make_router, scenarios, span_observer
from .test_policies import req, simulate


def scored(rid, arrival=0.0, prompt=4, output=4, score=0.0, **kw):
    return req(rid, arrival, prompt, output, score=float(score), **kw)


# --- pars ----------------------------------------------------------------------------------------
def test_pars_serves_the_lower_predicted_score_first_whatever_the_true_length():
    """Behind a busy engine (max_num_seqs=1) C (score 1) runs before B (score 5), though B
    arrived first and C's true output is longer: the score, not the length, decides."""
    requests = [
        scored("A", 0.0, output=5, score=9),
        scored("B", 0.001, output=2, score=5),
        scored("C", 0.002, output=8, score=1),
    ]
    first = simulate(requests, "pars", num_blocks=100, max_num_seqs=1).col("first_token")
    assert first["A"] < first["C"] < first["B"]
    # With the oracle's order the same requests run B then C.
    oracle = [
        scored(r.request_id, r.arrival, 4, r.output_tokens, r.output_tokens) for r in requests
    ]
    first = simulate(oracle, "pars", num_blocks=100, max_num_seqs=1).col("first_token")
    assert first["B"] < first["C"]


# Preempting for a better score, and never for a worse one: tests/test_policies.py (RANKED).


def test_pars_with_oracle_scores_is_sjf_unless_waiting_requests_preempt():
    """vLLM V1's priority scheduling on true lengths is exactly oracle SJF; vLLM v0.6's priority
    preemption (preempt=True) changes the schedule."""
    rng = np.random.default_rng(5)
    n = 80
    out = rng.integers(1, 200, n)
    w = Workload(
        {
            "arrival": np.sort(rng.random(n) * 2),
            "prompt_tokens": rng.integers(1, 300, n),
            "output_tokens": out,
            "score": out.astype(float),
        }
    )
    runs = {}
    variants = {"sjf": ("sjf", {}), "pars": ("pars", {}), "pars-v0.6": ("pars", {"preempt": True})}
    for label, (name, kw) in variants.items():
        cls = policy_class(name)
        cluster = CheckedCluster(
            1,
            EngineConfig(num_blocks=300, block_size=16, max_num_seqs=8),
            lambda cls=cls, kw=kw: cls(**kw),
            make_router("round-robin"),
            LinearLatency(),
        )
        runs[label] = cluster.run(w).column("e2el")
    np.testing.assert_array_equal(runs["sjf"], runs["pars"])
    assert not np.array_equal(runs["sjf"], runs["pars-v0.6"])  # priority preemption acts


# A (score 0, 40 tokens) holds the only sequence slot; X (score 100) arrives during A's first
# iteration, so X is first seen at step 1, idle.
LONG = scored("A", 0.0, output=40, score=0)
X = scored("X", 0.001, output=4, score=100)


def _first_step(run, rid):
    return run.first(lambda s: rid in dict(s.items))[0]


def test_pars_without_aging_lets_the_worst_score_wait():
    run = simulate([LONG, X], "pars", num_blocks=100, max_num_seqs=1)
    assert run.col("first_scheduled")["X"] == run.col("finish")["A"]


@pytest.mark.parametrize("aging", [3, 6])
def test_pars_aging_lifts_a_starved_request_after_exactly_n_idle_iterations(aging):
    """Idle for `aging` iterations, X is promoted above every score: with vLLM v0.6's priority
    preemption it takes A's seat at once (A is preempted by recompute) and keeps it until it
    finishes."""
    kw = {"aging": aging, "preempt": True}
    run = simulate([LONG, X], "pars", num_blocks=100, max_num_seqs=1, policy_kw=kw)
    step = _first_step(run, "X")
    assert step == 1 + aging
    assert run.steps[step].preempted == [("A", "recompute")]
    assert all("X" in dict(s.items) for s in run.steps[step : step + 4])
    assert run.col("finish")["X"] < run.col("finish")["A"]


# --- ltr -----------------------------------------------------------------------------------------
def test_ltr_resorts_running_requests_pars_does_not():
    """Budget 8: A (score 5, prompt 40) is prefilling in chunks when B (score 1, prompt 8)
    arrives. ltr re-sorts everything and gives B the whole budget next; pars (vLLM priority)
    serves the running A's chunk first and B waits for budget."""
    requests = [
        scored("A", 0.0, prompt=40, output=2, score=5),
        scored("B", 0.001, prompt=8, output=2, score=1),
    ]
    ltr = simulate(requests, "ltr", num_blocks=1000, max_num_batched_tokens=8)
    assert ltr.steps[1].items == [("B", 8)]
    pars = simulate(requests, "pars", num_blocks=1000, max_num_batched_tokens=8)
    assert pars.steps[1].items == [("A", 8)]


@pytest.mark.parametrize("threshold,period", [(4, 2), (5, 3)])
def test_ltr_starvation_boost_fires_at_the_threshold_for_the_period(threshold, period):
    """X (score 100, 10 tokens) idles from step 1; at idle = threshold it gets top priority and
    runs `period` scheduled iterations, then reverts and a better-score request preempts it."""
    x = scored("X", 0.001, output=10, score=100)
    run = simulate(
        [LONG, x],
        "ltr",
        num_blocks=100,
        max_num_seqs=1,
        policy_kw={"starvation_threshold": threshold, "starvation_period": period},
    )
    step = _first_step(run, "X")
    assert step == 1 + threshold
    assert all("X" in dict(s.items) for s in run.steps[step : step + period])
    after = run.steps[step + period]
    assert after.preempted == [("X", "recompute")] and set(dict(after.items)) == {
        "A"
    }  # A recomputes
    # ... and idles again: the next boost comes `threshold` iterations later.
    assert _first_step(run.__class__(run.steps[step + period :], None, None), "X") == threshold


def test_ltr_without_starvation_guard_serves_the_worst_score_last():
    run = simulate(
        [LONG, X],
        "ltr",
        num_blocks=100,
        max_num_seqs=1,
        policy_kw={"starvation_threshold": None},
    )
    assert run.col("first_scheduled")["X"] == run.col("finish")["A"]


def test_policies_without_scores_fail_clearly():
    for policy in ("pars", "ltr"):
        with pytest.raises(ValueError, match="predictor score"):
            simulate([req("A"), req("B", 0.001)], policy, num_blocks=100)


# --- exactness of the iteration counters under spans ---------------------------------------------
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenarios(),
    st.sampled_from(
        [
            ("pars", {"aging": 1}),
            ("pars", {"aging": 7}),
            ("ltr", {}),
            ("ltr", {"starvation_threshold": 2, "starvation_period": 1}),
            ("ltr", {"starvation_threshold": 6, "starvation_period": 4}),
            ("ltr", {"starvation_threshold": None}),
        ]
    ),
)
def test_pars_and_ltr_spans_equal_one_iteration_at_a_time(scenario, policy):
    workload, _, config, instances, router = scenario
    name, kw = policy
    cls = policy_class(name)
    runs = []
    for fast in (True, False):
        cluster = CheckedCluster(
            instances,
            config,
            lambda: cls(preemption=config.preemption, **kw),
            make_router(router),
            LinearLatency(),
            observer=span_observer({}),
            fast_forward=fast,
        )
        runs.append((cluster, cluster.run(workload)))
    (fast, fm), (slow, sm) = runs
    assert [i.log.size for i in fast.instances] == [i.log.size for i in slow.instances]
    assert fast.stats.preemptions == slow.stats.preemptions
    fo = np.argsort(fm.column("request_id"), kind="stable")
    so = np.argsort(sm.column("request_id"), kind="stable")
    for col in ("request_id", "finished", "preemptions", "instance"):
        assert np.array_equal(fm.column(col)[fo], sm.column(col)[so]), col
    for col in ("ttft", "e2el"):
        np.testing.assert_allclose(
            fm.column(col)[fo], sm.column(col)[so], rtol=1e-9, equal_nan=True
        )


# --- score sources -------------------------------------------------------------------------------
def lengths(n=2000, seed=3):
    """ShareGPT-like output lengths: lognormal, many ties."""
    return np.maximum(1, np.random.default_rng(seed).lognormal(5.0, 1.1, n).astype(int))


@pytest.mark.parametrize("tau", [0.0, 0.2, 0.5, 0.8, 0.95])
def test_noisy_oracle_hits_its_tau_and_is_deterministic_per_seed(tau):
    y = lengths()
    s, realized = noisy_oracle(y, tau, seed=1)
    assert abs(kendall_tau(s, y) - tau) <= 0.02
    assert realized == pytest.approx(kendall_tau(s, y))
    again, _ = noisy_oracle(y, tau, seed=1)
    assert np.array_equal(s, again)
    other, _ = noisy_oracle(y, tau, seed=2)
    assert not np.array_equal(s, other)


def test_noisy_oracle_tau_one_is_the_oracle_order():
    y = lengths()
    w = Workload(
        {"arrival": np.zeros(len(y)), "prompt_tokens": np.ones(len(y)), "output_tokens": y}
    )
    noisy = compute_scores(w, {"source": "noisy-oracle", "tau": 1.0})
    oracle = compute_scores(w, "oracle")
    assert kendall_tau(noisy, oracle) == pytest.approx(1.0)
    assert np.array_equal(np.argsort(noisy, kind="stable"), np.argsort(oracle, kind="stable"))


def test_score_specs_parse_and_reject_nonsense():
    assert ScoreSpec.parse("noisy-oracle,tau=0.6,seed=4") == ScoreSpec("noisy-oracle", 0.6, 4)
    assert ScoreSpec.parse({"source": "noisy-oracle", "tau": 0.6}).seed == 0
    assert ScoreSpec.parse("model:/m/x").model_dir == "/m/x"
    assert ScoreSpec.parse("prompt-length").source == "prompt-length"
    for bad in ("noisy-oracle", "noisy-oracle,tau=1.5", "oracle,tau=0.5", "bert", "model:"):
        with pytest.raises(ValueError):
            ScoreSpec.parse(bad)


def test_model_source_needs_prompt_text():
    w = Workload({"arrival": [0.0, 1.0], "prompt_tokens": [3, 4], "output_tokens": [5, 6]})
    with pytest.raises(ValueError, match="prompt text"):
        compute_scores(w, "model:/nowhere")


def test_model_source_calls_the_predictor_contract(monkeypatch):
    """`load_predictor(DIR).score(texts)`: one score per prompt text, in workload order."""
    seen = {}

    class Fake:
        def score(self, texts):
            seen["texts"] = texts
            return np.array([float(len(t)) for t in texts])

    def load(folder):
        seen["dir"] = folder
        return Fake()

    monkeypatch.setattr(llmsched.predict, "load_predictor", load, raising=False)
    w = Workload(
        {
            "arrival": [0.0, 1.0],
            "prompt_tokens": [3, 4],
            "output_tokens": [5, 6],
            "prompt_text": np.array(["hello there", "hi"], dtype=object),
        }
    )
    scored_w = attach_scores(w, "model:/m/pars")
    assert seen == {"dir": "/m/pars", "texts": ["hello there", "hi"]}
    assert scored_w.columns["score"].tolist() == [11.0, 2.0]
    assert scored_w[1].score == 2.0


def test_score_column_round_trips_through_llmsched_jsonl(tmp_path):
    w = Workload(
        {
            "arrival": [0.0, 0.5, 1.0],
            "prompt_tokens": [3, 4, 5],
            "output_tokens": [5, 6, 7],
            "score": [0.25, np.nan, -3.5],
        }
    )
    path = write_jsonl(w, tmp_path / "w.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [r.get("score") for r in rows] == [0.25, None, -3.5]  # NaN = not written
    back = read_trace(path)
    assert np.array_equal(back.columns["score"], w.columns["score"], equal_nan=True)
    assert [r.score for r in back] == [0.25, None, -3.5]


def test_cli_runs_pars_with_a_score_flag_and_explains_a_missing_one(capsys):
    args = ["simulate", "--num-requests", "60", "--rate", "4", "--policy", "pars"]
    assert main([*args, "--scores", "noisy-oracle,tau=0.7,seed=1"]) == 0
    assert main(args) == 2
    assert "predictor score" in capsys.readouterr().err


def test_held_out_split_keeps_only_the_predictors_test_conversations():
    from llmsched.predict.data import split_of

    ids = [f"conv{i}_{i % 3}" for i in range(300)]  # ShareGPT ids: conversation + "_N"
    w = Workload(
        {
            "arrival": np.zeros(300),
            "prompt_tokens": np.ones(300),
            "output_tokens": np.ones(300),
            "session_id": np.array(ids, dtype=object),
        }
    )
    test = held_out(w, "test")
    kept = set(test.columns["session_id"])
    assert 0 < len(kept) < 300
    assert kept == {i for i in ids if split_of(i.rsplit("_", 1)[0]) == "test"}
    with pytest.raises(ValueError, match="conversation ids"):
        held_out(Workload({"arrival": [0.0], "prompt_tokens": [1], "output_tokens": [1]}), "test")
