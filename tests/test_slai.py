"""SLAI's defining decisions (Bari, Hegde, de Veciana; the authors' `slai_scheduler.py`), on small
hand-made cases whose every batch can be computed by hand.

The latency model here is linear in the batch's tokens only: an iteration of ``n`` tokens takes
``0.01 + 1e-4 * n`` seconds (no KV term), so a 100-token batch takes exactly 0.02 s, a lone decode
0.0101 s. Runs use ``fast_forward=False``: one plan = one iteration. Requests arriving at the same
instant as an idle engine's first step are not in that step (the engine starts on the first
arrival), so most cases start with one request and let the others arrive during its first batch.

Notation: LST = end of the decode's last batch + its TBT − Θ × mean batch duration (paper Eq. 8,
Θ = 5, or 10 once KV usage >= 96 %); a decode is critical once ``now >= LST``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from llmsched.cluster.cluster import Cluster
from llmsched.engine.config import EngineConfig
from llmsched.engine.state import RequestState
from llmsched.policies import policy_class, router_class
from llmsched.policies.slai import SLAI
from llmsched.workload.generators import assign_tiers
from llmsched.workload.request import Request, Workload

from .helpers import LinearLatency

LAT = LinearLatency(base=0.01, per_token=1e-4, per_kv=0.0)


# --- harness -------------------------------------------------------------------------------------
@dataclass
class Step:
    """One plan, as the observer saw it (after preemptions and admissions, before it runs)."""

    now: float
    duration: float
    items: list[tuple[str, int]]  # (request id, tokens), in the order the policy scheduled them
    preempted: list[tuple[str, str]]  # (victim id, mode)
    victim_computed: dict[str, int]  # right after preemption
    running: dict[str, int]  # every running request's computed tokens before the iteration
    lst: dict[str, float]  # the running decodes' LST, as the policy set it for this decision
    kv_used: int  # KV blocks held once the plan's first iteration is allocated


@dataclass
class Run:
    steps: list[Step]
    metrics: object  # MetricsCollector

    def at(self, t: float) -> Step:
        """The step that started at time t (to the microsecond)."""
        (step,) = [s for s in self.steps if abs(s.now - t) < 1e-6]
        return step

    def col(self, name: str) -> dict[str, object]:
        return dict(zip(self.metrics.column("request_id"), self.metrics.column(name)))


def req(rid, arrival=0.0, prompt=10, output=4, **kw) -> Request:
    return Request(rid, arrival, prompt, output, **kw)


def simulate(requests, policy="slai", *, policy_kw=None, **engine) -> Run:
    cls = policy_class(policy)
    config = EngineConfig(**{**cls.engine_defaults, **engine})
    steps: list[Step] = []

    def observe(inst, span):
        plan = span.plan
        steps.append(
            Step(
                now=inst.now,
                duration=float(span.ends[0]) - inst.now,
                items=[(s.request_id, t) for s, t in plan.items],
                preempted=[(v.request_id, mode) for v, mode in plan.preempted],
                victim_computed={v.request_id: v.computed for v, _ in plan.preempted},
                running={s.request_id: s.computed for s in inst.running},
                lst={
                    s.request_id: s.policy_data["lst"]
                    for s in inst.running
                    if "lst" in s.policy_data
                },
                kv_used=inst.kv.used,
            )
        )

    cluster = Cluster(
        1,
        config,
        lambda: cls(preemption=config.preemption, **(policy_kw or {})),
        router_class("round-robin")(),
        LAT,
        observer=observe,
        fast_forward=False,
    )
    metrics = cluster.run(Workload.from_requests(requests))
    return Run(steps, metrics)


def ids(step: Step) -> list[str]:
    return [rid for rid, _ in step.items]


# --- deferral and criticality ---------------------------------------------------------------------
def test_decode_is_deferred_while_it_has_slack_then_scheduled_first_once_critical():
    """Budget 100, TBT 0.2 s. A (prompt 10) runs alone in [0, 0.011] and becomes a decode; B
    (prompt 1000) arrives meanwhile. At 0.011 A's LST = 0.011 + 0.2 − 5 × 0.011 = 0.156.
    Every 100-token batch takes 0.02 s, so batches start at 0.011, 0.031, ..., 0.151 (< 0.156:
    A has slack, B takes the whole budget, A is not in the batch: 8 batches), and at 0.171
    (>= 0.156) A is critical and comes first: [A 1, B 99]. A's gap, 0.191 − 0.011 = 0.18 s, stays
    within its 0.2 s TBT. (Sarathi would give A a token in every one of those batches.)"""
    run = simulate(
        [req("A", 0.0, prompt=10, output=20), req("B", 0.001, prompt=1000, output=2)],
        policy_kw={"tbt": 0.2},
        max_num_batched_tokens=100,
        num_blocks=1000,
    )
    deferred = [s for s in run.steps if 0.01 < s.now < 0.16]
    assert [s.now for s in deferred] == pytest.approx([0.011 + 0.02 * k for k in range(8)])
    for s in deferred:
        assert s.items == [("B", 100)], f"at {s.now:.3f}: {s.items}"
        assert s.lst["A"] == pytest.approx(0.156)
    critical = run.at(0.171)
    assert critical.items == [("A", 1), ("B", 99)]
    assert run.col("max_gap")["A"] == pytest.approx(0.18)


def _three_decodes_and_a_long_prompt(max_decodes: int) -> Run:
    """X (100 tokens, one output) fills [0, 0.02]; A, B, C (prompt 10, TBTs 0.215, 0.205, 0.21)
    and D (prompt 1000) arrive meanwhile and are admitted together at 0.02: [A 10, B 10, C 10,
    D 70], ending at 0.04 with mean batch time 0.02. LSTs = 0.04 + TBT − 5 × 0.02: A 0.155,
    B 0.145, C 0.15. Batches of 100 start every 0.02 s; at 0.14 all three still have slack (D
    takes the budget), at 0.16 all three are critical."""
    return simulate(
        [
            req("X", 0.0, prompt=100, output=1),
            req("A", 0.001, prompt=10, output=30, tpot_slo=0.215),
            req("B", 0.002, prompt=10, output=30, tpot_slo=0.205),
            req("C", 0.003, prompt=10, output=30, tpot_slo=0.21),
            req("D", 0.004, prompt=1000, output=2),
        ],
        policy_kw={"max_decodes": max_decodes},
        max_num_batched_tokens=100,
        num_blocks=1000,
    )


def test_critical_decodes_go_by_increasing_lst_not_admission_order():
    """(See `_three_decodes_and_a_long_prompt`.) At 0.16 the critical decodes run in LST order
    B (0.145), C (0.15), A (0.155), although A was admitted first, then D gets the 97 left."""
    run = _three_decodes_and_a_long_prompt(max_decodes=128)
    assert run.at(0.02).items == [("A", 10), ("B", 10), ("C", 10), ("D", 70)]
    assert run.at(0.14).items == [("D", 100)]
    assert run.at(0.14).lst == pytest.approx({"A": 0.155, "B": 0.145, "C": 0.15})
    assert run.at(0.16).items == [("B", 1), ("C", 1), ("A", 1), ("D", 97)]


def test_max_decodes_lets_only_the_most_urgent_critical_decodes_run():
    """Same run with at most 2 decodes per batch: at 0.16 B and C (the two earliest LSTs) run
    and A, critical too, waits; at 0.18 A (LST 0.155, not re-keyed) is the most urgent and runs,
    while B and C, re-keyed to 0.18 + TBT − 0.1 (0.285, 0.29), have slack again."""
    run = _three_decodes_and_a_long_prompt(max_decodes=2)
    assert run.at(0.16).items == [("B", 1), ("C", 1), ("D", 98)]
    nxt = run.at(0.18)
    assert nxt.items == [("A", 1), ("D", 99)]
    assert nxt.lst == pytest.approx({"A": 0.155, "B": 0.285, "C": 0.29})


# --- prefills -------------------------------------------------------------------------------------
_MIXED_TIERS = [
    req("X", 0.0, prompt=100, output=1),  # fills [0, 0.02]; the others arrive meanwhile
    req("F1", 0.001, prompt=30, output=1, tier="free"),
    req("P1", 0.002, prompt=60, output=1, tier="paying"),
    req("F2", 0.003, prompt=20, output=1, tier="free"),
    req("P2", 0.004, prompt=50, output=1, tier="paying"),
]


@pytest.mark.parametrize(
    "order, admitted",
    [
        ("tiered", ["P2", "P1", "F2", "F1"]),  # paying first, each tier shortest first
        ("spf", ["F2", "F1", "P2", "P1"]),  # shortest first, tiers ignored
        ("fcfs", ["F1", "P1", "F2", "P2"]),  # arrival order
    ],
)
def test_new_prefills_are_admitted_in_the_configured_order(order, admitted):
    """Four prompts (160 tokens in all) wait while X runs; at 0.02 all fit in the 200 budget and
    are admitted in one batch, in the policy's order (the batch's item order)."""
    run = simulate(
        _MIXED_TIERS,
        policy_kw={"prefill_order": order},
        max_num_batched_tokens=200,
        num_blocks=1000,
    )
    assert ids(run.at(0.02)) == admitted


def test_default_prefill_order_is_tiered():
    assert SLAI().prefill_order == "tiered"
    with pytest.raises(ValueError, match="prefill_order"):
        SLAI(prefill_order="sjf")


@pytest.mark.parametrize(
    "prompt, order, admitted",
    [
        (176, "tiered", ["R"]),  # P fits whole (44 blocks <= 45 − 1): admitted, F: no budget
        (177, "tiered", []),  # P needs 45 > 44: blocked, and F behind it waits (no skipping)
        (177, "spf", ["F"]),  # F (8 tokens) first: admitted; then P is blocked
    ],
)
def test_admission_needs_kv_for_the_whole_prompt_above_the_watermark(prompt, order, admitted):
    """100 blocks of 4 tokens, watermark 1 % = 1 block, budget 100. R (prompt 220 = 55 blocks)
    prefills in chunks 100, 100, 20; paying P (`prompt` tokens) and free F (8 tokens, 2 blocks)
    arrive during R's first chunk. At 0.04 R's last chunk leaves 45 blocks free and 80 budget
    tokens: P's first chunk would take only 20 blocks, but P is admitted only if its *whole*
    prompt fits above the watermark: 176 tokens (44 blocks) yes, 177 (45 blocks) no. Under the
    tiered order P comes before F, so F, which would fit, is not admitted either (head-of-line
    blocking); under SPF F comes first and gets in."""
    run = simulate(
        [
            req("R", 0.0, prompt=220, output=10),
            req("P", 0.001, prompt=prompt, output=1, tier="paying"),
            req("F", 0.002, prompt=8, output=1, tier="free"),
        ],
        policy_kw={"prefill_order": order},
        max_num_batched_tokens=100,
        num_blocks=100,
        block_size=4,
    )
    step = run.at(0.04)
    assert step.items[0] == ("R", 20)
    assert [rid for rid in ids(step) if rid != "R"] == (["P"] if prompt == 176 else admitted)
    if prompt == 176:
        assert step.items == [("R", 20), ("P", 80)]


def test_partially_prefilled_request_continues_before_new_prefills():
    """Budget 100. L (prompt 250) is admitted at 0 and runs 100 tokens per batch; S (prompt 5,
    paying tier, shortest) arrives at 0.001 but waits: at 0.02 L takes the whole budget (its
    second chunk) and at 0.04 L's last 50 tokens come first, then S."""
    run = simulate(
        [
            req("L", 0.0, prompt=250, output=2, tier="free"),
            req("S", 0.001, prompt=5, output=2, tier="paying"),
        ],
        max_num_batched_tokens=100,
        num_blocks=1000,
    )
    assert run.at(0.0).items == [("L", 100)]
    assert run.at(0.02).items == [("L", 100)]
    assert run.at(0.04).items == [("L", 50), ("S", 5)]


# --- Θ and per-request TBT ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_blocks, high, theta",
    [(100, 10.0, 10), (101, 10.0, 5), (100, None, 5)],
    ids=["usage-96%-theta-10", "usage-95%-theta-5", "fixed-offset"],
)
def test_offset_doubles_once_kv_usage_reaches_96_percent(num_blocks, high, theta):
    """One-token blocks. A (prompt 96) prefills alone in 0.01 + 96e-4 = 0.0196 s and then holds
    96 blocks: 96 % of 100 blocks (Θ = 10) but 95 % of 101 (Θ = 5); with the fixed offset
    (high_memory_offset=None) Θ stays 5. A's LST = 0.0196 + 0.2 − Θ × 0.0196: Θ = 10 moves it
    5 mean batch durations (0.098 s) earlier."""
    run = simulate(
        [req("A", 0.0, prompt=96, output=3)],
        policy_kw={"tbt": 0.2, "high_memory_offset": high},
        num_blocks=num_blocks,
        block_size=1,
    )
    step = run.at(0.0196)
    assert step.items == [("A", 1)]
    assert step.lst["A"] == pytest.approx(0.0196 + 0.2 - theta * 0.0196)


def test_tbt_comes_from_the_request_and_falls_back_to_the_policy_parameter():
    """X fills [0, 0.02]; A (tpot_slo 0.3) and B (no TBT of its own; policy tbt 0.15) are
    prefilled together at 0.02 in 0.01 + 20e-4 = 0.012 s. At 0.032 the mean batch time is
    (0.02 + 0.012) / 2 = 0.016, so LST_A = 0.032 + 0.3 − 0.08 = 0.252 and LST_B = 0.032 + 0.15
    − 0.08 = 0.102."""
    run = simulate(
        [
            req("X", 0.0, prompt=100, output=1),
            req("A", 0.001, prompt=10, output=3, tpot_slo=0.3),
            req("B", 0.002, prompt=10, output=3),
        ],
        policy_kw={"tbt": 0.15},
        num_blocks=1000,
    )
    assert run.at(0.032).lst == pytest.approx({"A": 0.252, "B": 0.102})


def test_tiers_give_each_request_its_tiers_tbt():
    """assign_tiers writes the tier's TBT into tpot_slo, which is the SLAI deadline."""
    w = Workload.from_requests([req(str(i)) for i in range(20)])
    tiers = {"paying": {"share": 0.5, "tbt": 0.1}, "free": {"share": 0.5, "tbt": 0.5}}
    policy = SLAI(tbt=0.2)
    seen = set()
    for r in assign_tiers(w, tiers, seed=1):
        seen.add(r.tier)
        assert policy.deadline(RequestState(r)) == {"paying": 0.1, "free": 0.5}[r.tier]
    assert seen == {"paying", "free"}
    assert policy.deadline(RequestState(req("none"))) == 0.2


# --- preemption -----------------------------------------------------------------------------------
def test_decode_without_kv_preempts_the_partially_prefilled_request():
    """One-token blocks, 100 of them (watermark 1), budget 20, TBT 0.01 s: A is critical in every
    batch (its LST is 0.01 − 5 × ~0.012 before the batch's end). A (prompt 20) runs alone, then P
    (prompt 78) is admitted at 0.012: its whole prompt fits (78 <= 100 − 21 − 1). Each batch A
    takes a block and P 19: after 4 such batches the cache is full while P (76 of 78 tokens) is
    still prefilling. A, critical, needs a block: P, the partially prefilled request not yet in
    the batch, is preempted by recompute (computed -> 0), and A is never preempted. (With the
    whole prompt reserved at admission, as in the authors' engine, this happens earlier but is
    the same decision.)"""
    run = simulate(
        [req("A", 0.0, prompt=20, output=60), req("P", 0.001, prompt=78, output=2)],
        policy_kw={"tbt": 0.01},
        max_num_batched_tokens=20,
        num_blocks=100,
        block_size=1,
    )
    first = next(s for s in run.steps if s.preempted)
    assert first.preempted == [("P", "recompute")]
    assert first.victim_computed == {"P": 0}
    assert first.items[0] == ("A", 1)
    assert all(victim != "A" for s in run.steps for victim, _ in s.preempted)


@pytest.mark.parametrize("policy, victim", [("slai", "A"), ("sarathi", "B")])
def test_decode_without_kv_and_no_partial_prefill_preempts_itself(policy, victim):
    """39 one-token blocks, two decodes A (TBT 0.01) and B (TBT 0.02, arrived later), both
    critical in every batch, growing one block each per batch until the cache is full at 0.1139.
    SLAI's most urgent decode, A, finds no free block and no partially prefilled request to
    evict: A itself is preempted (recompute) and B runs. Sarathi instead evicts the latest
    arrival, B, to keep A running."""
    run = simulate(
        [
            req("A", 0.0, prompt=10, output=30, tpot_slo=0.01),
            req("B", 0.001, prompt=10, output=30, tpot_slo=0.02),
        ],
        policy,
        max_num_batched_tokens=20,
        num_blocks=39,
        block_size=1,
    )
    first = next(s for s in run.steps if s.preempted)
    assert first.preempted == [(victim, "recompute")]
    assert first.victim_computed == {victim: 0}
    assert ids(first) == [{"A": "B", "B": "A"}[victim]]


def test_partial_prefill_is_never_stalled_behind_new_prefills():
    """One-token blocks, 100 (watermark 1), budget 20, TBT 0.01 (A always critical). A (prompt
    10) runs alone; P (prompt 88) is admitted at 0.011 (88 <= 100 − 11 − 1) and gets 19 tokens
    per batch while A takes one block per batch. At 0.059 P has 76 tokens, 12 to go, but only 9
    blocks are free after A's: we observe P left out of the batch (not preempted) for 10
    batches, W (prompt 3, arriving at 0.06) admitted ahead of it, and P finally preempted at 0.16
    with its 76 tokens lost. Expected (authors' semantics): every batch either continues P or
    preempts it, and no new prompt is admitted while P is partially prefilled."""
    run = simulate(
        [
            req("A", 0.0, prompt=10, output=60),
            req("P", 0.001, prompt=88, output=2),
            req("W", 0.06, prompt=3, output=2),
        ],
        policy_kw={"tbt": 0.01},
        max_num_batched_tokens=20,
        num_blocks=100,
        block_size=1,
    )
    stalled = [
        round(s.now, 4)
        for s in run.steps
        if 0 < s.running.get("P", 88) < 88 and "P" not in ids(s) and "P" not in dict(s.preempted)
    ]
    assert stalled == []
    w_admitted = run.col("first_scheduled")["W"]
    p_left = [s for s in run.steps if s.preempted and s.preempted[0][0] == "P"]
    p_done = min(
        [s.now for s in p_left] + [s.now for s in run.steps if s.running.get("P", 0) >= 88]
    )
    assert w_admitted >= p_done


# --- against Sarathi, and per-tier metrics -------------------------------------------------------
def test_slai_gives_lower_median_ttft_than_sarathi_on_a_prefill_burst():
    """Budget 100. D (prompt 100, output 200, TBT 1 s) prefills in [0, 0.02]; four 200-token
    prompts Q0..Q3 arrive meanwhile (overload: 800 prompt tokens queued at once). Sarathi gives
    D a token every batch, so the prompts get 99 tokens per 0.02 s batch and finish at the ends
    of batches 3, 5, 7, 9 after 0.02: 0.08, 0.12, 0.16, and 0.1909 (the last batch holds only
    D's token and Q3's last 8). SLAI defers D (LST = 0.02 + 1 − 5 × 0.02 = 0.92) and gives the
    prompts all 100: they finish at 0.06, 0.10, 0.14, 0.18. Median TTFT over the five requests
    (D's is 0.02 in both): Q1's, 0.118 s vs 0.098 s."""
    reqs = [req("D", 0.0, prompt=100, output=200, tpot_slo=1.0)]
    reqs += [req(f"Q{i}", 0.001 * (i + 1), prompt=200, output=1) for i in range(4)]
    ttft = {}
    for policy in ("sarathi", "slai"):
        run = simulate(reqs, policy, max_num_batched_tokens=100, num_blocks=1000)
        ttft[policy] = run.col("ttft")
    assert [ttft["sarathi"][f"Q{i}"] + 0.001 * (i + 1) for i in range(4)] == pytest.approx(
        [0.08, 0.12, 0.16, 0.1909]
    )
    assert [ttft["slai"][f"Q{i}"] + 0.001 * (i + 1) for i in range(4)] == pytest.approx(
        [0.06, 0.10, 0.14, 0.18]
    )
    median = {p: float(np.median(list(t.values()))) for p, t in ttft.items()}
    assert median["slai"] < median["sarathi"]


def test_per_tier_p99_itl_is_the_p99_of_that_tiers_own_gaps():
    """A mixed-tier SLAI run: summary()["by_tier"][tier]["p99_itl_ms"] is the p99 (numpy's
    linear rule) of the gaps of that tier's requests only, from gaps_by_request()."""
    reqs = [req("X", 0.0, prompt=300, output=30, tier="free", tpot_slo=0.5)]
    for i in range(8):
        tier, tbt = ("paying", 0.1) if i % 3 == 0 else ("free", 0.5)
        reqs.append(req(f"R{i}", 0.003 * (i + 1), 40 + 25 * i, 5 + 3 * i, tier=tier, tpot_slo=tbt))
    run = simulate(reqs, max_num_batched_tokens=64, num_blocks=1000)
    m = run.metrics
    summary = m.summary()
    offsets, gaps = m.gaps_by_request()
    tiers = m.columns()["tier"]
    counted = 0
    for tier in ("paying", "free"):
        mine = np.concatenate(
            [gaps[offsets[i] : offsets[i + 1]] for i in range(len(tiers)) if tiers[i] == tier]
        )
        counted += len(mine)
        by_hand = np.percentile(mine.astype(np.float64), 99) * 1000
        assert summary["by_tier"][tier]["p99_itl_ms"] == pytest.approx(by_hand, rel=1e-9)
    assert counted == len(gaps) == sum(r.output_tokens - 1 for r in reqs)
