"""PASCAL: the answering phase's QoE, the intra-instance policy's defining decisions, the router's
Algorithms 1 and 2 with adaptive migration, and the reasoning workloads."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsched.cluster.cluster import Cluster
from llmsched.engine.config import EngineConfig
from llmsched.engine.state import RequestState, Status
from llmsched.metrics.qoe import (
    AnswerSLO,
    answer_qoe,
    consumption_times,
    qoe_terms,
    tail_percentile,
    tail_ttft_by_reasoning_bin,
)
from llmsched.policies.pascal import Pascal, PascalRouter, PascalSlack, is_high_priority
from llmsched.workload.reasoning import add_reasoning, read_alpaca_eval, reasoning_lengths
from llmsched.workload.request import Workload

from .helpers import LinearLatency
from .test_policies import req, simulate

SLO = AnswerSLO(ttfat=0.25, tpot=0.1, min_qoe=0.95)


# --- QoE ---------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 5), min_size=1, max_size=40),
    st.floats(0.01, 1.0),
    st.floats(-1.0, 3.0),
)
def test_consumption_times_follow_the_reader_recurrence(gaps, tpot, previous):
    """c_i = max(g_i, c_{i-1} + tpot), with c_{-1} = previous: the vectorised form agrees with
    the loop, never consumes a token before it exists, and keeps the reader's pace."""
    generated = np.cumsum(gaps)
    fast = consumption_times(generated, tpot, previous)
    c, slow = previous, []
    for g in generated:
        c = max(g, c + tpot)
        slow.append(c)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-9)
    assert np.all(fast >= generated - 1e-12)
    assert np.all(np.diff(fast) >= tpot - 1e-9)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 2), min_size=2, max_size=40), st.data())
def test_qoe_sums_fold_in_pieces(gaps, data):
    """The pacer folds an answer's tokens in as they come; any split gives the QoE of the
    whole answer computed at once (the metric)."""
    times = np.cumsum([0.0, *gaps])  # `</think>` at 0, then the answer tokens
    k = data.draw(st.integers(1, len(gaps) - 1))
    d1, w1, last = qoe_terms(times[1 : 1 + k], 0.0, SLO)
    d2, w2, _ = qoe_terms(times[1 + k :], 0.0, SLO, first=k, previous=last)
    folded = 1 - (d1 + d2) / (w1 + w2) if w1 + w2 > 0 else 1.0
    assert folded == pytest.approx(answer_qoe(times, 1, SLO), abs=1e-12)


def test_qoe_is_one_when_the_answer_keeps_ahead_of_its_reader():
    """`</think>` at 1.0 s, answer tokens every 50 ms from 1.05 s: the reader never waits."""
    times = np.concatenate([[0.5, 1.0], 1.05 + 0.05 * np.arange(20)])
    assert answer_qoe(times, 2, SLO) == 1.0


def test_qoe_of_a_stalled_answer_by_hand():
    """`</think>` at 0; 3 answer tokens at 1.25, 1.35, 1.45 s: each expected 1 s earlier
    (0.25, 0.35, 0.45), so delay = 3 x 1.0 and the consumed area = 1.25 + 1.35 + 1.45."""
    times = np.array([0.0, 1.25, 1.35, 1.45])
    assert answer_qoe(times, 1, SLO) == pytest.approx(1 - 3.0 / 4.05)
    assert np.isnan(answer_qoe(times, 0, SLO))  # no reasoning phase: no answering SLO


def test_collector_reports_violations_and_blocking_after_think():
    """A 2 s wait after `</think>` violates the answer SLO; the answer gap is that wait."""
    from llmsched.metrics.record import RequestRecord
    from llmsched.metrics.summary import MetricsCollector

    c = MetricsCollector(SLO)
    on_pace = np.concatenate([[0.1, 0.2], 0.25 + 0.05 * np.arange(30)])
    late = np.concatenate([[0.1, 0.2], 2.2 + 0.05 * np.arange(30)])
    for rid, times in (("ok", on_pace), ("late", late)):
        c.add(RequestRecord(rid, 0.0, 10, 32, reasoning_tokens=2, token_times=times))
    s = c.summary()
    assert s["answer_requests"] == 2 and s["answer_slo_violation_rate"] == 0.5
    assert s["p99_answer_gap_ms"] > 1900.0
    assert dict(zip(c.column("request_id"), c.column("answer_gap")))["late"] == pytest.approx(2.0)


def test_tail_ttft_per_bin_uses_a_percentile_the_bin_can_estimate():
    assert [tail_percentile(n) for n in (1, 9, 10, 99, 100, 999, 1000)] == [
        100.0, 100.0, 90.0, 90.0, 95.0, 95.0, 99.0
    ]  # fmt: skip
    ttft = np.arange(1, 16, dtype=float)
    reasoning = np.array([10] * 5 + [300] * 10)
    bins = tail_ttft_by_reasoning_bin(ttft, reasoning)
    assert [(b["lo"], b["count"], b["percentile"]) for b in bins] == [
        (0, 5, 100.0),
        (256, 10, 90.0),
    ]
    assert bins[0]["ttft_s"] == 5.0 and bins[1]["ttft_s"] == pytest.approx(
        np.percentile(ttft[5:], 90)
    )


def reasoning_workload(seed, *, n, output, prompt, horizon) -> Workload:
    """Random reasoning requests: every one thinks for 1 .. output-1 tokens, then answers."""
    rng = np.random.default_rng(seed)
    out = rng.integers(2, output, n)
    return Workload(
        {
            "arrival": np.sort(rng.random(n) * horizon),
            "prompt_tokens": rng.integers(1, prompt, n),
            "output_tokens": out,
            "reasoning_tokens": rng.integers(1, out),
        }
    )


# --- the intra-instance policy ------------------------------------------------------------------
def test_reasoning_request_swaps_out_an_answering_one_never_the_reverse():
    """20 KV blocks of 1 token. A (prompt 4, 2 reasoning + 14 answer tokens) is answering when B
    (prompt 4, all reasoning but 1) arrives; when KV runs out, PASCAL swaps out A, the answering
    request, although B was admitted last (FCFS would preempt B), and B is safe until its own
    `</think>`."""
    requests = [
        req("A", 0.0, prompt=4, output=16, reasoning_tokens=2),
        req("B", 0.03, prompt=4, output=12, reasoning_tokens=11),
    ]
    kw = dict(num_blocks=20, block_size=1, preemption="swap")
    pascal = simulate(requests, "pascal", **kw)
    _, step = pascal.first(lambda s: s.preempted)
    assert step.preempted == [("A", "swap")]
    # B is preempted only once it has produced `</think>` (11 tokens) and joined the LP queue
    for i, s in enumerate(pascal.steps):
        if ("B", "swap") in s.preempted:
            assert sum(p.produces.count("B") for p in pascal.steps[:i]) >= 11
    _, step = simulate(requests, "fcfs", **kw).first(lambda s: s.preempted)
    assert step.preempted == [("B", "swap")]


def _lone_instance(policy, request: RequestState, generated: int):
    cluster = Cluster(1, EngineConfig(num_blocks=1000, block_size=1), lambda: policy, None, LAT)
    inst = cluster.instances[0]
    request.generated, request.computed = generated, request.prompt_tokens + generated - 1
    request.status = Status.RUNNING
    inst.kv.grow_to(request, request.computed)
    inst.running.append(request)
    return inst


LAT = LinearLatency()


def test_long_reasoning_is_demoted_to_the_low_priority_queue():
    """demote_after = 5: a request with 5 reasoning tokens generated (of 100) leaves HP."""
    policy = Pascal(demote_after=5)
    young = RequestState(req("Y", prompt=4, output=200, reasoning_tokens=100))
    inst = _lone_instance(policy, young, 4)
    policy.schedule(inst.view)
    assert is_high_priority(young) and policy.key(young)[0] == 0
    young.generated = 5
    plan = policy.schedule(inst.view)
    assert not is_high_priority(young) and policy.key(young)[0] == 1
    assert plan.items  # still served: demotion lowers priority, it does not stop the request


def test_think_token_moves_a_request_to_the_back_of_the_low_priority_queue():
    policy = Pascal()
    state = RequestState(req("R", prompt=4, output=20, reasoning_tokens=5))
    inst = _lone_instance(policy, state, 5)
    policy.on_phase_change(state, inst.view)
    assert policy.key(state)[0] == 1 and state.policy_data["q0"] == 5


@pytest.mark.parametrize("policy", [Pascal(quantum=7, demote_after=20), PascalSlack(refresh=3)])
@pytest.mark.parametrize("seed", range(4))
def test_spans_equal_one_iteration_at_a_time(policy, seed):
    """Small quanta, demotion and slack refreshes happen often here; a run in spans must equal
    the run one iteration at a time, token for token."""
    workload = reasoning_workload(seed, n=40, output=120, prompt=200, horizon=2.0)
    results = []
    for fast in (True, False):
        cluster = Cluster(
            2,
            EngineConfig(num_blocks=300, block_size=4, max_num_batched_tokens=64),
            lambda: type(policy)(**_params(policy)),
            PascalRouter(),
            LAT,
            fast_forward=fast,
        )
        c = cluster.run(workload)
        results.append({k: c.column(k) for k in ("finish", "ttft", "preemptions", "migrations")})
    for k in results[0]:  # times agree to rounding (a span sums its iterations' durations)
        np.testing.assert_allclose(results[0][k], results[1][k], rtol=1e-12, err_msg=k)


def _params(policy):
    if isinstance(policy, PascalSlack):
        return {"refresh": policy.refresh}
    return {"quantum": policy.quantum, "demote_after": policy.demote_after}


def test_high_priority_requests_are_preempted_only_when_no_answer_runs():
    """Over a random reasoning workload under KV pressure with a short quantum (so reasoning
    requests also take turns among themselves), no plan preempts a reasoning request while an
    answering (LP) request keeps running; answers are preempted while reasoning runs."""
    workload = reasoning_workload(3, n=60, output=200, prompt=100, horizon=3.0)
    victims = {"HP": 0, "LP with HP running": 0}

    def observe(inst, span):
        for victim, _ in span.plan.preempted:
            if is_high_priority(victim):
                assert all(is_high_priority(r) for r in inst.running)
                victims["HP"] += 1
            elif any(is_high_priority(r) for r in inst.running):
                victims["LP with HP running"] += 1

    cluster = Cluster(
        1,
        EngineConfig(num_blocks=200, block_size=4, preemption="swap"),
        lambda: Pascal(quantum=20),
        PascalRouter(),
        LAT,
        observer=observe,
    )
    cluster.run(workload)
    assert victims["HP"] > 0 and victims["LP with HP running"] > 0


# --- the router -----------------------------------------------------------------------------------
def _cluster(n=2, blocks=1000):
    return Cluster(n, EngineConfig(num_blocks=blocks, block_size=1), Pascal, PascalRouter(), LAT)


def _place_answering(cluster, i, *, answer_times, think_at, running=True, prompt=50):
    """An answering request on instance i: `</think>` at `think_at`, then answer tokens."""
    inst = cluster.instances[i]
    times = np.concatenate([[think_at], answer_times])
    first = inst.log.extend(times)
    r = RequestState(req(f"A{i}", prompt=prompt, output=len(times) + 50, reasoning_tokens=1))
    r.segments = [i, first, len(times)]
    r.generated = len(times)
    r.computed = prompt + r.generated - (1 if running else 0)
    if running:
        r.status = Status.RUNNING
        inst.kv.grow_to(r, r.computed)
        inst.running.append(r)
    else:
        inst.kv.grow_to(r, r.computed)
        inst.kv.swap_out(r)
        inst.enqueue(r)
    return r


def _at(cluster, t):
    cluster.now = t
    for inst in cluster.instances:
        inst.now = t


def test_algorithm_1_avoids_instances_whose_answers_lag():
    """Instance 0 holds less KV, but its answer (swapped out, reader waiting since 1.35 s) lags
    at 2 s: the new request goes to instance 1. Once 0's reader is served again, KV decides."""
    cluster = _cluster()
    _place_answering(cluster, 0, answer_times=[1.05, 1.15], think_at=1.0, running=False)
    _place_answering(cluster, 1, answer_times=np.arange(1.05, 2.0, 0.02), think_at=1.0, prompt=200)
    _at(cluster, 2.0)
    new = RequestState(req("N", 2.0))
    router = cluster.router
    assert cluster.view.kv_footprint(0) < cluster.view.kv_footprint(1)
    assert router.route(new, cluster.view) == 1
    _at(cluster, 1.2)  # the lagging reader still has a buffered token at 1.2 s
    assert router.route(new, cluster.view) == 0


def _think(cluster, source=0, prompt=20):
    """A request that just produced `</think>` on `source` (running there)."""
    inst = cluster.instances[source]
    first = inst.log.extend(np.array([cluster.now]))
    r = RequestState(req("T", prompt=prompt, output=100, reasoning_tokens=1))
    r.segments, r.generated, r.computed = [source, first, 1], 1, prompt
    r.status = Status.RUNNING
    inst.kv.grow_to(r, r.computed)
    inst.running.append(r)
    return r


def _reasoning(cluster, i, count):
    for k in range(count):
        r = RequestState(req(f"H{i}{k}", prompt=5, output=500, reasoning_tokens=400))
        cluster.instances[i].enqueue(r)


@pytest.mark.parametrize(
    "mode, source_blocks, expected",
    [
        ("adaptive", 1000, 0),  # the answer fits at home and not at the target: stay
        ("adaptive", 515, 1),  # no room at home: move although the target is short too
        ("always", 1000, 1),  # without the adaptive rule: move to the target
        ("never", 1000, 0),
    ],
)
def test_algorithm_2_and_adaptive_migration(mode, source_blocks, expected):
    """Instance 0 (source) has 3 reasoning requests waiting, instance 1 one: Algorithm 2 picks 1.
    Instance 1 has 520 blocks, 500 of them used, so it lacks room for the answer's next quantum
    (500 tokens) plus its own KV."""
    cluster = Cluster(
        2,
        EngineConfig(num_blocks=1000, block_size=1),
        Pascal,
        PascalRouter(migration=mode),
        LAT,
    )
    cluster.instances[0].kv.num_blocks = source_blocks
    cluster.instances[1].kv.num_blocks = 520
    filler = RequestState(req("F", prompt=500, output=10))
    cluster.instances[1].kv.grow_to(filler, 500)
    _reasoning(cluster, 0, 3)
    _reasoning(cluster, 1, 1)
    state = _think(cluster, 0)
    assert cluster.router.on_phase_change(state, 0, cluster.view) == expected


def test_pascal_router_rejects_an_unknown_migration_mode():
    with pytest.raises(ValueError, match="adaptive, always, never|migration must be"):
        PascalRouter(migration="sometimes")


# --- reasoning workloads ------------------------------------------------------------------------
def test_reasoning_splits_draw_the_documented_ratios():
    rng = np.random.default_rng(0)
    answers = np.full(20_000, 400)
    equal = reasoning_lengths(answers, "equal", rng, sigma=0.5)
    assert np.median(equal / answers) == pytest.approx(1.0, abs=0.03)
    heavy = reasoning_lengths(answers, "heavy", rng)
    assert heavy.min() >= 4 * 400 and heavy.max() <= 8 * 400
    ratios = (np.array([0.5, 0.75]), np.array([0.5, 0.5]))  # reasoning = 1x or 3x the answer
    sg = reasoning_lengths(answers, "servegen", rng, servegen=ratios)
    assert set(np.unique(sg)) == {400, 1200}
    capped = reasoning_lengths(answers, "heavy", rng, max_tokens=1000)
    assert capped.max() == 1000
    with pytest.raises(ValueError, match="split must be one of"):
        reasoning_lengths(answers, "long", rng)


def test_add_reasoning_keeps_the_answer_and_prepends_the_thinking(tmp_path):
    """The answer stays what the trace said; output = reasoning + answer. ServeGen's literal
    distributions are read from its chunk files."""
    chunk = {"0": {"input_tokens": "{}", "output_tokens": "{}", "reason_ratio": "{0.8: 1.0}"}}
    (tmp_path / "chunk-0-dataset.json").write_text(json.dumps(chunk))
    w = Workload(
        {"arrival": np.zeros(3), "prompt_tokens": [5, 6, 7], "output_tokens": [10, 20, 30]}
    )
    out = add_reasoning(w, {"split": "servegen", "servegen_dir": str(tmp_path)}, seed=1)
    np.testing.assert_array_equal(out.columns["reasoning_tokens"], [40, 80, 120])
    np.testing.assert_array_equal(out.columns["output_tokens"], [50, 100, 150])
    with pytest.raises(ValueError, match="unknown reasoning option"):
        add_reasoning(w, {"split": "equal", "sigm": 1})


def test_alpaca_eval_reader_takes_one_generators_lengths(tmp_path):
    rows = [{"instruction_id": i, "instruction": f"do {i}", "instruction_tokens_cl100k": 3 + i}
            for i in range(3)]  # fmt: skip
    (tmp_path / "alpaca_eval_instructions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    lines = [
        "instruction_id,model_dir,generator,dataset,output_chars,output_words,output_tokens_cl100k"
    ]
    lines += [f"{i},m,gpt-x,base,1,1,{100 + i}" for i in range(3)] + ["0,m,other,base,1,1,7"]
    with gzip.open(tmp_path / "alpaca_eval_output_lengths.csv.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    w = read_alpaca_eval(tmp_path, "gpt-x")
    assert list(w.columns["output_tokens"]) == [100, 101, 102]
    assert list(w.columns["prompt_tokens"]) == [3, 4, 5]
    assert w[1].prompt_text == "do 1"
    from llmsched.predict.data import load_alpaca_eval  # the predictor reads the same table

    assert list(load_alpaca_eval("gpt-x", folder=tmp_path).lengths) == [100, 101, 102]
    with pytest.raises(ValueError, match="Close: gpt-x"):
        read_alpaca_eval(tmp_path, "gpt-y")
    with pytest.raises(FileNotFoundError, match="AlpacaEval data"):
        read_alpaca_eval(tmp_path / "missing")


def test_real_alpaca_eval_and_servegen_data():
    from llmsched.data import data_dir

    root = data_dir()
    if root is None or not (root / "prompts/alpaca_eval").is_dir():
        pytest.skip("shared data folder (../shared/data or $LLMSCHED_DATA) not present")
    w = read_alpaca_eval(root / "prompts/alpaca_eval")
    assert len(w) == 805
    out = add_reasoning(w, {"split": "servegen"}, seed=0)
    share = out.columns["reasoning_tokens"].sum() / out.columns["output_tokens"].sum()
    assert 0.6 < share < 0.99  # production DeepSeek-R1: most output tokens are reasoning
