"""Each baseline policy's defining decision, on small hand-made cases.

Every test builds a tiny cluster (a few KV blocks, small budgets) so that the situation a policy
exists to handle happens at a step one can find by hand, and asserts *the decision* taken there:
who runs, with how many tokens, who is preempted and how, where a request goes, when it moves.
Runs use ``fast_forward=False``, so one plan = one iteration (spans of identical iterations give
the same results: test_engine_invariants checks that).
With ``block_size=1`` a request that has generated ``g >= 1`` tokens from a prompt of ``p`` holds
``p + g - 1`` blocks and needs one more for its next decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from llmsched.cluster.cluster import Cluster
from llmsched.engine.config import EngineConfig
from llmsched.engine.instance import Instance
from llmsched.engine.plan import BatchPlan
from llmsched.engine.state import RequestState, Status
from llmsched.policies import InstancePolicy, Router, policy_class, router_class
from llmsched.workload.request import Request, Workload

from .helpers import LinearLatency

LAT = LinearLatency()


# --- harness -------------------------------------------------------------------------------------
@dataclass
class Step:
    """One plan, as the observer saw it (after preemptions and admissions, before it runs)."""

    instance: int
    now: float
    duration: float  # of its first iteration, swap-in/out time included
    items: list[tuple[str, int]]  # (request id, tokens)
    computed: dict[str, int]  # tokens with KV before the iteration
    produces: list[str]  # requests that sample a token at the end of the iteration
    preempted: list[tuple[str, str]]  # (victim id, mode)
    victim_computed: dict[str, int] = field(default_factory=dict)  # right after preemption
    running: int = 0


@dataclass
class Run:
    steps: list[Step]
    metrics: object  # MetricsCollector
    cluster: Cluster

    def col(self, name: str) -> dict[str, object]:
        """A per-request column as {request id: value}."""
        return dict(zip(self.metrics.column("request_id"), self.metrics.column(name)))

    def token_order(self) -> str:
        """Which request produced each token, in time order (one character per token)."""
        return "".join(rid for s in self.steps for rid in s.produces)

    def first(self, pred) -> tuple[int, Step]:
        return next((i, s) for i, s in enumerate(self.steps) if pred(s))


def req(rid, arrival=0.0, prompt=4, output=4, **kw) -> Request:
    return Request(rid, arrival, prompt, output, **kw)


def simulate(
    requests,
    policy="fcfs",
    *,
    instances=1,
    router=None,
    policy_kw=None,
    link_bandwidth=1e9,
    fast_forward=False,
    **engine,
) -> Run:
    cls = policy_class(policy)
    config = EngineConfig(**{**cls.engine_defaults, **engine})
    steps: list[Step] = []

    def observe(inst, span):
        steps.append(
            Step(
                instance=inst.index,
                now=inst.now,
                duration=float(span.ends[0]) - inst.now,
                items=[(s.request_id, t) for s, t in span.plan.items],
                computed={s.request_id: s.computed for s, _ in span.plan.items},
                produces=[s.request_id for s, t in span.plan.items if t == s.to_compute],
                preempted=[(v.request_id, mode) for v, mode in span.plan.preempted],
                victim_computed={v.request_id: v.computed for v, _ in span.plan.preempted},
                running=len(inst.running),
            )
        )

    cluster = Cluster(
        instances,
        config,
        lambda: cls(preemption=config.preemption, **(policy_kw or {})),
        router or router_class("round-robin")(),
        LAT,
        link_bandwidth=link_bandwidth,
        observer=observe,
        fast_forward=fast_forward,
    )
    metrics = cluster.run(Workload.from_requests(requests))
    return Run(steps, metrics, cluster)


def ids(pairs) -> list[str]:
    return [p[0] for p in pairs]


# --- FCFS (vLLM V1) -------------------------------------------------------------------------------
def test_fcfs_schedules_running_decodes_before_new_prefills():
    """A prompt arriving while A decodes gets only the budget the decode leaves (10 - 1 = 9),
    and A's decode comes first in the batch."""
    run = simulate(
        [req("A", 0.0, prompt=5, output=20), req("B", 0.02, prompt=20, output=2)],
        max_num_batched_tokens=10,
        num_blocks=100,
    )
    _, step = run.first(lambda s: "B" in ids(s.items))
    assert step.items == [("A", 1), ("B", 9)]


def test_fcfs_chunks_a_long_prompt_under_the_token_budget():
    """A 25-token prompt under a budget of 10 is prefilled as chunks 10, 10, 5; the first token
    comes at the end of the third iteration, then one decode per iteration."""
    run = simulate([req("A", prompt=25, output=3)], max_num_batched_tokens=10, num_blocks=100)
    assert [s.items for s in run.steps] == [
        [("A", 10)],
        [("A", 10)],
        [("A", 5)],
        [("A", 1)],
        [("A", 1)],
    ]
    assert [s.produces for s in run.steps] == [[], [], ["A"], ["A"], ["A"]]


def test_fcfs_preempts_most_recently_admitted_by_recompute_and_admits_nobody_that_iteration():
    """16 one-token blocks; A and B (prompt 4, output 10) decode until A's 6th token needs the
    last block and B's 5th token finds none. B, admitted after A, is preempted by recompute
    (computed -> 0); C (waiting, 1 block, would fit) is *not* admitted in that iteration, only in
    the next; B later re-prefills its prompt and 4 generated tokens (8 tokens) after A ends."""
    run = simulate(
        [req("A", output=10), req("B", output=10), req("C", prompt=1, output=1)],
        num_blocks=16,
        block_size=1,
        max_num_seqs=2,
    )
    i, step = run.first(lambda s: s.preempted)
    assert step.preempted == [("B", "recompute")]
    assert step.victim_computed == {"B": 0}
    assert step.items == [("A", 1)], "no admission in an iteration that preempted"
    assert ids(run.steps[i + 1].items) == ["A", "C"]
    _, back = run.first(lambda s: s.computed.get("B") == 0 and s.now > step.now)
    assert back.items == [("B", 8)]  # prompt 4 + 4 generated, prefilled again
    assert run.col("preemptions") == {"A": 0, "B": 1, "C": 0}
    assert run.col("first_scheduled")["B"] < step.now < run.col("finish")["A"] <= back.now


def test_fcfs_max_num_seqs_caps_the_running_requests():
    """With max_num_seqs=2, the third of three identical requests is admitted exactly when the
    first one finishes, never alongside two others."""
    run = simulate([req(r, output=3) for r in "ABC"], num_blocks=100, max_num_seqs=2)
    assert max(len(s.items) for s in run.steps) == 2
    assert max(s.running for s in run.steps) == 2
    assert run.col("first_scheduled")["C"] == run.col("finish")["A"]


def test_fcfs_first_tokens_follow_arrival_order():
    """Identical requests that queue behind each other get their first tokens in arrival order."""
    names = "ABCDE"
    run = simulate(
        [req(r, 0.001 * i, prompt=20, output=5) for i, r in enumerate(names)],
        max_num_batched_tokens=20,
        num_blocks=1000,
    )
    first = run.col("first_token")
    assert sorted(names, key=first.get) == list(names)
    assert len(set(first.values())) == len(names)  # not all in one batch: the order is decided


# --- priority -----------------------------------------------------------------------------------
def test_priority_admits_lower_value_first():
    """Behind a busy engine (max_num_seqs=1), C (priority 1) is admitted before B (priority 5)
    although B arrived first; FCFS serves B first."""
    requests = [
        req("A", 0.0, output=5),
        req("B", 0.001, output=3, priority=5),
        req("C", 0.002, output=3, priority=1),
    ]
    first = simulate(requests, "priority", num_blocks=100, max_num_seqs=1).col("first_token")
    assert first["A"] < first["C"] < first["B"]
    first = simulate(requests, "fcfs", num_blocks=100, max_num_seqs=1).col("first_token")
    assert first["A"] < first["B"] < first["C"]


# pars and ltr rank by a predictor's score where priority ranks by the user's priority.
# (policy, rank field, policy parameters): those whose waiting requests preempt (vLLM v0.6's
# priority preemption, and vllm-ltr), and those that follow vLLM V1, whose waiting requests
# never do.
PREEMPTING = [
    ("priority-v0.6", "priority", {}),
    ("pars", "score", {"preempt": True}),
    ("ltr", "score", {}),
]
V1_RANKED = [("priority", "priority", {}), ("pars", "score", {})]
RANKED = PREEMPTING + V1_RANKED


def kv_short_pair(field, rank_a, rank_b):
    """10 one-token blocks; A holds 6 and its decode takes a 7th; B (prompt 6) needs 6."""
    return [
        req("A", 0.0, prompt=6, output=5, **{field: rank_a}),
        req("B", 0.001, prompt=6, output=1, **{field: rank_b}),
    ]


@pytest.mark.parametrize("policy,field,kw", PREEMPTING)
def test_better_ranked_arrival_preempts_a_worse_one_when_kv_is_short(policy, field, kw):
    """A (rank 5) runs, B (rank 0) arrives and does not fit: A is preempted and B admitted in
    the same plan."""
    run = simulate(kv_short_pair(field, 5, 0), policy, num_blocks=10, block_size=1, policy_kw=kw)
    _, step = run.first(lambda s: s.preempted)
    assert step.preempted == [("A", "recompute")]
    assert step.items == [("B", 6)]
    assert run.col("finish")["B"] < run.col("finish")["A"]


@pytest.mark.parametrize("policy,field,kw", V1_RANKED)
def test_v1_better_ranked_arrival_waits_for_kv(policy, field, kw):
    """vLLM V1 (0.32) preempts only for a running request short of KV: B (rank 0) waits until
    A (rank 5) finishes, nothing is preempted."""
    run = simulate(kv_short_pair(field, 5, 0), policy, num_blocks=10, block_size=1, policy_kw=kw)
    assert not any(s.preempted for s in run.steps)
    assert run.col("first_scheduled")["B"] == run.col("finish")["A"]


@pytest.mark.parametrize("policy,field,kw", RANKED)
def test_worse_ranked_arrival_never_preempts(policy, field, kw):
    """Same KV shortage, ranks swapped: the newcomer (rank 5) waits for A (rank 0) to finish;
    nothing is preempted."""
    run = simulate(kv_short_pair(field, 0, 5), policy, num_blocks=10, block_size=1, policy_kw=kw)
    assert not any(s.preempted for s in run.steps)
    assert run.col("first_scheduled")["B"] == run.col("finish")["A"]


def test_priority_running_kv_shortage_preempts_worst_priority_not_newest():
    """A (priority 5, admitted first) and B (priority 0) decode until KV runs out: the victim is
    A, the worst priority, where FCFS would take B, the most recently admitted."""
    requests = [req("A", output=10, priority=5), req("B", output=10)]
    run = simulate(requests, "priority", num_blocks=16, block_size=1)
    assert run.first(lambda s: s.preempted)[1].preempted == [("A", "recompute")]
    run = simulate(requests, "fcfs", num_blocks=16, block_size=1)
    assert run.first(lambda s: s.preempted)[1].preempted == [("B", "recompute")]


# --- vLLM v0 ------------------------------------------------------------------------------------
def test_vllm_v0_runs_prefill_only_batches_of_whole_prompts():
    """Z (prompt 60) runs; A and B (prompt 40 each) arrive during its first iteration. With a
    64-token budget v0 prefills A whole, alone (Z's decode waits), then B whole, alone (no
    24-token chunk of B beside A), and only then decodes Z, A, B together."""
    run = simulate(
        [req("Z", 0.0, prompt=60, output=5), req("A", 0.001, 40), req("B", 0.001, 40)],
        "vllm-v0",
        num_blocks=1000,
        max_num_batched_tokens=64,
    )
    assert [s.items for s in run.steps[:4]] == [
        [("Z", 60)],
        [("A", 40)],
        [("B", 40)],
        [("Z", 1), ("A", 1), ("B", 1)],
    ]


def test_fcfs_mixes_the_same_prompts_with_decodes_and_chunks():
    """The contrast to the v0 case above: V1 FCFS puts Z's decode, A whole and 23 tokens of B in
    one batch."""
    run = simulate(
        [req("Z", 0.0, prompt=60, output=5), req("A", 0.001, 40), req("B", 0.001, 40)],
        num_blocks=1000,
        max_num_batched_tokens=64,
    )
    assert run.steps[1].items == [("Z", 1), ("A", 40), ("B", 23)]


def test_vllm_v0_admits_new_prompts_only_in_prefill_only_batches_above_the_watermark():
    """100 blocks of 16 (1 % watermark = 1 block); A (prompt 100) decodes holding 7 blocks, 93
    free. B's 1488-token prompt needs all 93: above the watermark it does not fit, so v0 must keep
    B waiting until A finishes, and must never run a prefill of B beside A's decode."""
    run = simulate(
        [req("A", 0.0, prompt=100, output=30), req("B", 0.01, prompt=16 * 93, output=2)],
        "vllm-v0",
        num_blocks=100,
    )
    _, step = run.first(lambda s: "B" in s.computed)
    assert step.items == [("B", 16 * 93)], f"B admitted as {step.items}"
    assert run.col("first_scheduled")["B"] == run.col("finish")["A"]


# --- Sarathi-Serve ------------------------------------------------------------------------------
def test_sarathi_decodes_never_stall_during_a_long_prefill():
    """A decodes while B's 1500-token prompt is prefilled under the 512 budget: every iteration
    gives A its token first and B a chunk of 511, until B's last chunk (1500 = 511 + 511 + 478)."""
    run = simulate(
        [req("A", 0.0, prompt=100, output=30), req("B", 0.02, prompt=1500, output=2)],
        "sarathi",
        num_blocks=1000,
    )
    assert run.cluster.config.max_num_batched_tokens == 512
    prefill = [s.items for s in run.steps if "B" in s.computed and s.computed["B"] < 1500]
    assert prefill == [[("A", 1), ("B", 511)], [("A", 1), ("B", 511)], [("A", 1), ("B", 478)]]


@pytest.mark.parametrize(
    "blocks, admitted_now",
    [(60, False), (59, False), (58, True)],
    ids=["whole-prompt-too-big", "fits-only-into-the-watermark", "fits-above-the-watermark"],
)
def test_sarathi_admits_only_whole_prompts_above_the_watermark(blocks, admitted_now):
    """100 blocks of 16, watermark 1 % = 1 block. A decodes holding 41 blocks (59 free). B's
    prompt of `blocks` blocks is admitted at once only if it fits whole with 1 block to spare;
    otherwise it waits for A to finish, although a first 512-token chunk (32 blocks) would fit."""
    run = simulate(
        [req("A", 0.0, prompt=640, output=40), req("B", 0.05, prompt=16 * blocks, output=2)],
        "sarathi",
        num_blocks=100,
    )
    _, step = run.first(lambda s: s.now > 0.05)
    assert step.computed["A"] in range(641, 656)  # A holds exactly 41 blocks here
    assert ("B" in step.computed) == admitted_now
    if not admitted_now:
        assert run.col("first_scheduled")["B"] == run.col("finish")["A"]


def _instance_with(policy, config, running):
    """An instance whose running list (admission order) holds `running` as decodes."""
    inst = Instance(0, config, policy, LAT, listener=None)
    for request, generated in running:
        state = RequestState(request)
        state.generated = generated
        state.computed = request.prompt_tokens + generated - 1
        state.status = Status.RUNNING
        inst.kv.grow_to(state, state.computed)
        inst.running.append(state)
    return inst


def test_sarathi_victim_is_the_latest_arrival_not_the_latest_admission():
    """Running, in admission order: L (arrived at 1.0) then E (arrived at 0.0, e.g. migrated in
    later); each holds 5 of 10 blocks and needs a 6th to decode. Sarathi preempts L, the most
    recent *arrival*; FCFS (vLLM V1) preempts E, the most recently *admitted*."""
    running = [(req("L", 1.0, prompt=4, output=9), 2), (req("E", 0.0, prompt=4, output=9), 2)]
    config = EngineConfig(num_blocks=10, block_size=1)
    for name, victim in (("sarathi", "L"), ("fcfs", "E")):
        inst = _instance_with(policy_class(name)(), config, running)
        plan = inst.policy.schedule(inst.view)
        assert [(v.request_id, m) for v, m in plan.preempted] == [(victim, "recompute")], name
        assert [s.request_id for s, _ in plan.items] == [
            r.request_id for r, _ in running if r.request_id != victim
        ]


class _Greedy(InstancePolicy):
    """Plans every waiting request's whole prompt at once: over the engine's limits."""

    name = "greedy"

    def schedule(self, view):
        return BatchPlan([(s, s.prompt_tokens) for s in view.waiting])


@pytest.mark.parametrize(
    "config, error",
    [
        (
            EngineConfig(num_blocks=100, max_num_batched_tokens=6),
            "planned 8 tokens, over the budget of 6",
        ),
        (EngineConfig(num_blocks=100, max_num_seqs=1), "runs 2 sequences, over max_num_seqs=1"),
    ],
    ids=["token-budget", "sequence-cap"],
)
def test_a_plan_over_the_engines_limits_is_refused_naming_the_policy(config, error):
    inst = Instance(0, config, _Greedy(), LAT, listener=None)
    for rid in "AB":
        inst.enqueue(RequestState(req(rid, prompt=4)))
    with pytest.raises(RuntimeError, match=f"policy 'greedy' {error}"):
        inst.start_step(0.0)


# --- round-robin --------------------------------------------------------------------------------
def test_rr_alternates_every_quantum_when_kv_fits_one_request():
    """23 one-token blocks fit one request (prompt 12 + output 9 needs 20) but not two prompts.
    With quantum 3, A and B take turns every 3 tokens; each turn ends with a recompute
    preemption of the one whose quantum is spent (A twice, B twice)."""
    run = simulate(
        [req("A", prompt=12, output=9), req("B", prompt=12, output=9)],
        "rr",
        policy_kw={"quantum": 3},
        num_blocks=23,
        block_size=1,
    )
    assert run.token_order() == "AAABBBAAABBBAAABBB"
    assert [v for s in run.steps for v in ids(s.preempted)] == ["A", "B", "A", "B"]
    assert run.col("preemptions") == {"A": 2, "B": 2}


def test_rr_preempts_nobody_when_kv_is_plentiful():
    """Same requests and quantum with 1000 blocks: both run side by side, nobody is preempted."""
    run = simulate(
        [req("A", prompt=12, output=9), req("B", prompt=12, output=9)],
        "rr",
        policy_kw={"quantum": 3},
        num_blocks=1000,
        block_size=1,
    )
    assert not any(s.preempted for s in run.steps)
    assert any(ids(s.items) == ["A", "B"] or ids(s.items) == ["B", "A"] for s in run.steps)


# --- oracles ------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["sjf", "srpt"])
def test_oracles_serve_the_shorter_output_first(policy):
    """Behind Z (max_num_seqs=1), L (output 20) arrived before S (output 3); the oracle serves S
    first, FCFS would serve L first. Z has 1 token left when they are considered: no preemption."""
    requests = [
        req("Z", 0.0, output=2),
        req("L", 0.001, output=20),
        req("S", 0.002, output=3),
    ]
    run = simulate(requests, policy, num_blocks=100, max_num_seqs=1)
    first = run.col("first_token")
    assert first["Z"] < first["S"] < first["L"]
    assert run.col("first_scheduled")["S"] == run.col("finish")["Z"]
    assert not any(s.preempted for s in run.steps)


@pytest.mark.parametrize("policy, preempts", [("srpt", True), ("sjf", False)])
def test_srpt_preempts_longer_remaining_for_a_shorter_arrival_sjf_does_not(policy, preempts):
    """12 one-token blocks: L (prompt 6, 5 tokens left) runs holding 7; S (prompt 6, output 2)
    needs 6. SRPT preempts L and admits S in the same plan; SJF lets S wait for L."""
    run = simulate(
        [req("L", 0.0, prompt=6, output=6), req("S", 0.001, prompt=6, output=2)],
        policy,
        num_blocks=12,
        block_size=1,
    )
    preempted = [s for s in run.steps if s.preempted]
    if preempts:
        assert [(s.preempted, s.items) for s in preempted] == [([("L", "recompute")], [("S", 6)])]
        assert run.col("finish")["S"] < run.col("finish")["L"]
    else:
        assert preempted == []
        assert run.col("first_scheduled")["S"] == run.col("finish")["L"]


# --- swap vs recompute --------------------------------------------------------------------------
SWAP_CASE = dict(num_blocks=16, block_size=1, pcie_bandwidth=1e9)


def _swap_run(preemption, kv_bytes_per_block):
    requests = [req("A", output=10), req("B", output=10)]
    return simulate(
        requests, preemption=preemption, kv_bytes_per_block=kv_bytes_per_block, **SWAP_CASE
    )


def test_swap_keeps_computed_tokens_and_resumes_with_a_decode():
    """B (7 blocks: prompt 4 + 3 decoded) is preempted when A's decode takes the last block.
    Swapped, it keeps computed=7 and resumes with a 1-token decode; recomputed, it restarts from
    0 and re-prefills 8 tokens (prompt + 4 generated)."""
    for mode, kept, back_tokens in (("swap", 7, 1), ("recompute", 0, 8)):
        run = _swap_run(mode, 1_000_000)
        _, out = run.first(lambda s: s.preempted)
        assert out.preempted == [("B", mode)] and out.victim_computed == {"B": kept}, mode
        _, back = run.first(lambda s, t=out.now: "B" in s.computed and s.now > t)
        assert back.items == [("B", back_tokens)] and back.computed["B"] == kept, mode


def test_swap_time_is_blocks_times_bytes_over_pcie_both_ways():
    """7 blocks of 1 MB over 1 GB/s: 7 ms added to the preempting iteration (swap-out) and 7 ms to
    the resuming one (swap-in). A, which finishes in between, ends 7 ms later than with free
    transfers; B 14 ms later. The resuming iteration is B's lone decode over 8 KV tokens."""
    slow, free = _swap_run("swap", 1_000_000), _swap_run("swap", 0)
    assert [s.items for s in slow.steps] == [s.items for s in free.steps]  # same decisions
    finish_slow, finish_free = slow.col("finish"), free.col("finish")
    assert finish_slow["A"] - finish_free["A"] == pytest.approx(0.007, abs=1e-12)
    assert finish_slow["B"] - finish_free["B"] == pytest.approx(0.014, abs=1e-12)
    _, out = slow.first(lambda s: s.preempted)
    assert out.duration == pytest.approx(LAT.base + LAT.per_token + LAT.per_kv * 9 + 0.007)
    _, back = slow.first(lambda s: "B" in s.computed and s.now > out.now)
    assert back.duration == pytest.approx(LAT.base + LAT.per_token + LAT.per_kv * 8 + 0.007)
    # Recompute pays no transfer but re-prefills 8 tokens from scratch instead.
    rec = _swap_run("recompute", 1_000_000)
    _, out = rec.first(lambda s: s.preempted)
    _, back = rec.first(lambda s: s.computed.get("B") == 0 and s.now > out.now)
    assert back.duration == pytest.approx(LAT.base + 8 * LAT.per_token + 8 * LAT.per_kv)


# --- routers ------------------------------------------------------------------------------------
def _placement(router, requests, **engine) -> list[int]:
    run = simulate(requests, instances=2, router=router, num_blocks=1000, **engine)
    where = run.col("instance")
    return [int(where[r.request_id]) for r in requests]


LOAD_CASE = [
    req("R0", 0.0, output=100),
    req("R1", 0.0, output=1),
    req("R2", 0.1, output=5),
    req("R3", 0.1, output=5),
]


def test_round_robin_router_alternates_instances():
    """Instances in turn, whatever their load."""
    assert _placement(router_class("round-robin")(), LOAD_CASE) == [0, 1, 0, 1]


def test_least_outstanding_router_picks_the_least_loaded():
    """R0 (long) -> 0, R1 (1 token) -> 1 and is done by 0.1 s; at 0.1 s R2 goes to idle instance
    1 (loads 1 vs 0) and R3 to 0 (loads 1 vs 1: lowest index)."""
    assert _placement(router_class("least-outstanding")(), LOAD_CASE) == [0, 1, 1, 0]


def test_cluster_loads_are_every_instances_outstanding_requests():
    """`ClusterView.loads()` (what the load-based routers read at each arrival) is
    `outstanding(i)` of every instance, as the placements above see them."""

    class Recording(Router):
        seen: list[list[int]] = []

        def route(self, state, cluster):
            loads = cluster.loads()
            assert loads == [cluster.outstanding(i) for i in range(cluster.num_instances)]
            self.seen.append(loads)
            return loads.index(min(loads))

    router = Recording()
    assert _placement(router, LOAD_CASE) == [0, 1, 1, 0]
    assert router.seen == [[0, 0], [1, 0], [1, 0], [1, 1]]


def test_least_kv_router_picks_the_smallest_kv_footprint():
    """R0's 1000-token prompt fills 63 blocks of instance 0; two 10-token requests on instance 1
    hold 1 block each. R3 goes to instance 1 (2 blocks < 63) although it has more requests."""
    requests = [
        req("R0", 0.0, prompt=1000, output=100),
        req("R1", 0.0, prompt=10, output=100),
        req("R2", 0.0, prompt=10, output=100),
        req("R3", 0.05, prompt=10, output=5),
    ]
    assert _placement(router_class("least-kv")(), requests) == [0, 1, 1, 1]
    assert _placement(router_class("least-outstanding")(), requests) == [0, 1, 0, 1]


def test_random_router_is_reproducible_with_a_seed():
    """Same seed, same placements; another seed, other placements; both instances are used."""
    requests = [req(f"R{i}", 0.01 * i, output=2) for i in range(20)]
    a = _placement(router_class("random")(seed=7), requests)
    assert a == _placement(router_class("random")(seed=7), requests)
    assert a != _placement(router_class("random")(seed=8), requests)
    assert set(a) == {0, 1}


# --- cluster: rejection and migration ----------------------------------------------------------
def test_request_longer_than_the_kv_cache_is_rejected_with_a_reason():
    """4 blocks of 16 hold 64 tokens of KV. X needs 69 (prompt 60 + output 10 - 1): rejected with
    a reason. Y needs exactly 64 (prompt 60 + output 5 - 1: the last token's KV is never
    computed): it fits and finishes, as does the small Z."""
    run = simulate(
        [req("X", prompt=60, output=10), req("Y", prompt=60, output=5), req("Z", output=2)],
        num_blocks=4,
    )
    cols = run.metrics.columns()
    status = dict(zip(cols["request_id"], cols["status"]))
    reason = dict(zip(cols["request_id"], cols["reject_reason"]))
    assert run.metrics.num_rejected == 1 and run.metrics.num_finished == 2
    assert status == {"X": "rejected", "Y": "finished", "Z": "finished"}
    # The reason names the limit; the record keeps the lengths the request asked for.
    assert "64 tokens" in reason["X"] and "KV cache" in reason["X"]
    assert dict(zip(cols["request_id"], cols["output_tokens"]))["X"] == 10
    assert reason["Y"] == reason["Z"] == ""


class MoveAfterThinking(Router):
    """Everything starts on instance 0; a reasoning request moves to instance 1 at `</think>`."""

    name = "test-move-after-thinking"

    def __init__(self, move: bool = True) -> None:
        super().__init__()
        self.move = move

    def route(self, state, cluster) -> int:
        return 0

    def on_phase_change(self, state, source, cluster) -> int:
        return 1 if self.move and state.reasoning_tokens > 0 else source


def test_migration_moves_the_request_and_costs_blocks_times_bytes_over_the_link():
    """R (prompt 32, 3 reasoning + 3 answer tokens, 16-token blocks) holds 3 blocks (34 tokens)
    when it emits `</think>`; at 1 MB per block over 1 GB/s it is in flight 3 ms, makes no progress
    meanwhile, resumes on instance 1 with a plain decode (its KV came along), and every later
    time (TTFT, finish) is 3 ms later than without migration."""
    r = req("R", prompt=32, output=6, reasoning_tokens=3)
    kw = dict(instances=2, num_blocks=100, kv_bytes_per_block=1_000_000, link_bandwidth=1e9)
    moved = simulate([r], router=MoveAfterThinking(), **kw)
    stayed = simulate([r], router=MoveAfterThinking(move=False), **kw)
    assert moved.col("migrations") == {"R": 1} and moved.col("instance") == {"R": 1}
    assert stayed.col("migrations") == {"R": 0} and stayed.col("instance") == {"R": 0}
    assert moved.cluster.stats.migration_seconds == [pytest.approx(0.003)]
    src = [s for s in moved.steps if s.instance == 0]
    dst = [s for s in moved.steps if s.instance == 1]
    phase_end = src[-1].now + src[-1].duration
    assert dst[0].now == pytest.approx(phase_end + 0.003)
    assert dst[0].items == [("R", 1)] and dst[0].computed == {"R": 34}
    for name in ("ttft", "finish"):
        assert moved.col(name)["R"] - stayed.col(name)["R"] == pytest.approx(0.003, abs=1e-12)
    assert moved.col("first_token")["R"] == stayed.col("first_token")["R"]  # before the move
