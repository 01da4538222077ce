"""Continuum (policies/continuum.py): the estimators, the TTL decisions and the queue order on
small hand-made cases, then the pins in the engine: hits, expiry, memory pressure, invariants."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsched.cluster.cluster import Cluster
from llmsched.engine.config import EngineConfig
from llmsched.engine.state import Status
from llmsched.policies import policy_class, router_class
from llmsched.policies.continuum import (
    Continuum,
    ContinuumFixed,
    SlidingMean,
    ToolGaps,
    TurnCorrelation,
    best_ttl,
    exp_prior_ttl,
    fixed_ttl,
)
from llmsched.workload.programs import ProgramSpec, program_workload
from llmsched.workload.request import Request, Workload

from .helpers import LinearLatency


# --- the estimators ---------------------------------------------------------------------------
def test_tool_gaps_are_finish_to_next_arrival_per_tool():
    g = ToolGaps()
    g.finished("p", "run", 10.0)
    g.arrived("p", 13.0)  # 3 s of `run`
    g.finished("p", "edit", 20.0)
    g.arrived("p", 20.5)
    g.finished("q", "run", 0.0)
    g.arrived("q", 1.0)
    assert g.mean("run") == pytest.approx(2.0)
    assert g.mean("edit") == pytest.approx(0.5)
    assert g.mean("never-seen") == 0.0  # unknown tool: mean 0 (so the code pins it)
    assert g.count() == 3 and g.count("run") == 2
    assert g.all == [0.5, 1.0, 3.0]
    g.arrived("p", 99.0)  # a first turn (nothing finished before): no sample
    g.finished("q", None, 5.0)  # the program ends: its next arrival is no tool's
    g.arrived("q", 7.0)
    assert g.count() == 3


def test_fixed_ttl_is_two_seconds_for_fast_tools_only():
    g = ToolGaps()
    for i, gap in enumerate([0.5, 1.0, 5.5]):  # `slow`: mean 2.33 s
        g.finished(f"p{i}", "slow", 0.0)
        g.arrived(f"p{i}", gap)
    g.finished("x", "fast", 0.0)
    g.arrived("x", 1.9)
    assert fixed_ttl("slow", False, g) == 0.0  # mean > 2 s: not pinned
    assert fixed_ttl("fast", False, g) == 2.0
    assert fixed_ttl("unknown", False, g) == 2.0  # never seen: mean 0, pinned
    assert fixed_ttl("unknown", True, g) == 0.0  # is_last_step: never pinned
    assert fixed_ttl(None, False, g) == 0.0  # no tool call follows: the program ends
    g2 = ToolGaps()
    g2.finished("p", "t", 0.0)
    g2.arrived("p", 2.0)
    assert fixed_ttl("t", False, g2) == 2.0  # mean exactly 2 s: "<= 2.0" pins


def test_sliding_mean_and_turn_correlation():
    m = SlidingMean(3)
    assert m.mean == 0.0  # T starts at 0
    for v in (1, 2, 3, 10):
        m.add(v)
    assert m.mean == pytest.approx(5.0)  # the last 3
    c = TurnCorrelation()
    assert c.eta == 1.0  # undefined: 1
    c.program_finished(5)
    c.program_finished(5)
    assert c.eta == pytest.approx(1.0)  # equal lengths: k and N - k perfectly anti-correlated
    c.program_finished(20)
    xs = [k for n in (5, 5, 20) for k in range(n)]
    ys = [n - k for n in (5, 5, 20) for k in range(n)]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    assert c.eta == pytest.approx(-cov / (sx * sy))
    assert 0 < c.eta < 1


# --- the v6 TTL -------------------------------------------------------------------------------
def test_cold_start_closed_form():
    # U(τ) = (1 - e^(-τ/μ))·B - τ: maximum at μ·ln(B/μ) when B > μ.
    assert exp_prior_ttl(3.0, 1.0) == pytest.approx(math.log(3.0))
    assert exp_prior_ttl(8.0, 2.0) == pytest.approx(2.0 * math.log(4.0))
    assert exp_prior_ttl(1.0, 1.0) == 0.0 and exp_prior_ttl(0.5, 1.0) == 0.0
    b, mu = 5.0, 1.0
    tau = exp_prior_ttl(b, mu)
    u = lambda t: (1 - math.exp(-t / mu)) * b - t  # noqa: E731
    assert u(tau) > u(tau - 0.01) and u(tau) > u(tau + 0.01) and u(tau) > 0


def test_best_ttl_maximises_the_empirical_utility():
    samples = [0.01, 0.02, 0.03, 5.0]  # three fast returns, one slow
    # B = 1 s: τ = 0.03 catches 3/4 (U = 0.72); τ = 5 catches all (U = -4).
    assert best_ttl(samples, 1.0) == pytest.approx(0.03)
    assert best_ttl(samples, 100.0) == pytest.approx(5.0)  # reload dear: wait for the slow one
    assert best_ttl(samples, 0.0) == 0.0
    assert best_ttl([], 10.0) == 0.0
    assert best_ttl([3.0], 2.0) == 0.0  # U(3) = 2 - 3 < 0 = U(0)
    assert best_ttl([1.0, 2.0], 4.0) == pytest.approx(2.0)  # U(1) = 1, U(2) = 2
    assert best_ttl([1.0, 3.0], 4.0) == pytest.approx(1.0)  # U(1) = 1 = U(3): the smaller
    assert best_ttl([0.5, 0.5, 2.0], 3.0) == pytest.approx(0.5)  # repeats count: P(0.5) = 2/3


def _state(rid, program, turn=0, tool="run", last=False, arrival=0.0):
    request = SimpleNamespace(
        request_id=rid, session_id=program, turn=turn, tool=tool, is_last_step=last
    )
    return SimpleNamespace(request=request, request_id=rid, arrival=arrival, policy_data={})


def test_program_level_fcfs_key_is_the_programs_first_arrival():
    from llmsched.policies.continuum import ContinuumFixed

    p = ContinuumFixed()
    a0 = _state("a/0", "a", arrival=1.0)
    b0 = _state("b/0", "b", arrival=2.0)
    assert p.waiting_key(a0) < p.waiting_key(b0)
    a1 = _state("a/1", "a", turn=1, arrival=9.0)  # a's next turn comes after b's first
    b1 = _state("b/1", "b", turn=1, arrival=3.0)
    assert p.waiting_key(a1) < p.waiting_key(b1)  # ... and still goes first: a started first
    # Victim order: the program that arrived last, unless it is at its last step.
    assert p.victim_key(b1) > p.victim_key(a1)
    b_last = _state("b/2", "b", turn=2, last=True, arrival=4.0)
    assert p.victim_key(a1) > p.victim_key(b_last)


# --- pins in the engine -----------------------------------------------------------------------
def simulate(requests, policy, *, num_blocks=48, **engine):
    config = EngineConfig(num_blocks=num_blocks, **engine)
    cls = policy if isinstance(policy, type) else policy_class(policy)
    cluster = Cluster(
        1,
        config,
        lambda: cls(preemption=config.preemption),
        router_class("round-robin")(),
        LinearLatency(),
        observer=check_pool,
    )
    collector = cluster.run(Workload.from_requests(requests))
    return cluster, collector


def check_pool(inst, span):
    """On every span: the block pool's own invariants (reference counts equal the holders, none
    negative, free and used add up), with pinned requests among the holders."""
    kv = inst.kv
    if hasattr(kv, "check"):
        kv.check()
        assert set(inst.pins) <= set(kv.tables) <= set(inst.running) | set(inst.pins)
    assert all(p.status is Status.FINISHED for p in inst.pins)


def cached(collector) -> dict[str, int]:
    ids = collector.column("request_id").tolist()
    return dict(zip(ids, collector.column("cached_tokens").tolist()))


def turn(program, k, prompt, output, before=None, start=0.0, **fields):
    """Turn k of `program`; its prompt begins with the turn `before`'s prompt and output."""
    return Request(
        f"{program}/{k}",
        start,
        prompt,
        output,
        session_id=program,
        turn=k,
        prefix=before.continuation if before else None,
        closed_loop=before is not None,
        **fields,
    )


def two_turns(tool="t", tool_time=0.3, last_step=False, output=16):
    """Program a: turn 0 (320 prompt tokens, `output` out), `tool`, turn 1 (+32 tokens)."""
    a0 = turn("a", 0, 320, output, tool=tool, tool_time=tool_time)
    a1 = turn("a", 1, 320 + output + 32, 8, a0, is_last_step=last_step)
    return a0, a1


def pressure(a0, a1):
    """A long decode C keeps the engine busy; B (30 blocks) arrives while A's tool runs: on
    48 blocks it fits only by evicting A's cached blocks."""
    c = Request("c", 0.0, 32, 400)
    b = Request("b", 0.15, 480, 8)
    return [c, a0, a1, b]


def test_a_pinned_turn_is_hit_where_fcfs_lost_it_to_eviction():
    a0, a1 = two_turns()
    _, fcfs = simulate(pressure(a0, a1), "fcfs")
    _, pinned = simulate(pressure(a0, a1), "continuum-fixed")
    # a/0's prompt and output, less the last output token (sampled, never computed): 335
    # tokens, 20 full blocks.
    context = 320
    assert cached(pinned)["a/1"] == context
    assert 0 < cached(fcfs)["a/1"] < context  # B evicted A's last blocks
    assert cached(fcfs)["b"] == cached(pinned)["b"] == 0


def test_slow_tools_and_last_steps_are_not_pinned():
    seen = []

    class Spy(ContinuumFixed):
        def pin_until(self, state, view):
            until = super().pin_until(state, view)
            seen.append((state.request_id, until and until - view.now))
            return until

    # A tool whose mean is 3 s (learnt from program x): a's turn after it is not pinned.
    x0 = turn("x", 0, 64, 4, tool="slow", tool_time=3.0)
    x1 = turn("x", 1, 84, 4, x0)
    a0 = turn("a", 0, 64, 4, start=5.0, tool="slow", tool_time=0.1)
    a1 = turn("a", 1, 84, 4, a0, start=5.0, tool="fast", tool_time=0.1)
    a2 = turn("a", 2, 104, 4, a1, start=5.0, tool="fast", tool_time=0.1, is_last_step=True)
    simulate([x0, x1, a0, a1, a2], Spy, num_blocks=200)
    ttl = dict(seen)
    assert ttl["x/0"] == pytest.approx(2.0)  # `slow` never seen yet: mean 0, pinned
    assert ttl["a/0"] is None  # `slow` now has mean ~3 s: not pinned
    assert ttl["a/1"] == pytest.approx(2.0)  # `fast` never seen: pinned
    assert ttl["a/2"] is None  # is_last_step: never pinned
    assert ttl["x/1"] is None  # its program ends (no tool call follows)


def watched(requests, policy=ContinuumFixed, params=None, *, num_blocks=400, **engine):
    """Run a Continuum policy that logs, at every plan, (now, pins, waiting, pins released);
    returns the log, the cached tokens of each request and the metrics."""
    log = []

    class Watch(policy):
        def schedule(self, view):
            plan = super().schedule(view)
            pins = {p.request_id: u for p, u in view.pins.items()}
            waiting = [s.request_id for s in view.waiting]
            log.append((view.now, pins, waiting, [p.request_id for p in plan.released]))
            return plan

    config = EngineConfig(num_blocks=num_blocks, **engine)
    cluster = Cluster(
        1,
        config,
        lambda: Watch(**(params or {})),
        router_class("round-robin")(),
        LinearLatency(),
        observer=check_pool,
    )
    m = cluster.run(Workload.from_requests(requests))
    return log, cached(m), m


def test_an_expired_pin_goes_once_no_turn_of_its_program_waits():
    # a/1 returns after 3 s, past the 2 s TTL; c keeps the engine planning meanwhile.
    a0, a1 = two_turns(tool_time=3.0)
    log, hits, _ = watched([a0, a1, Request("c", 0.0, 16, 2000)])
    expiry = next(p["a/0"] for _, p, _, _ in log if "a/0" in p)
    released = [t for t, _, _, r in log if "a/0" in r]
    assert len(released) == 1 and expiry <= released[0] < expiry + 0.05  # at its expiry
    assert hits["a/1"] == 320  # released to the free queue, not evicted: still a hit
    # With one seat taken by c, a/1 (back after 0.5 s) waits for seconds: the expired pin is
    # kept while it waits, and released only once a/1 runs.
    a0, a1 = two_turns(tool_time=0.5)
    log, hits, _ = watched([a0, a1, Request("c", 0.4, 16, 2000)], max_num_seqs=1)
    expiry = next(p["a/0"] for _, p, _, _ in log if "a/0" in p)
    kept = [t for t, p, w, _ in log if "a/0" in p and t >= expiry and "a/1" in w]
    assert kept and max(kept) > expiry + 5  # a/1 waited long past the TTL, pin held
    released = [(t, w) for t, _, w, r in log if "a/0" in r]
    assert len(released) == 1 and "a/1" not in released[0][1]
    assert hits["a/1"] == 320


def test_program_level_fcfs_in_the_engine():
    """b/1 returns from its tool before a/1 but a started first: once both wait, a/1 runs
    first (a vLLM FCFS engine would run b/1 first)."""

    def program(name, start, tool_time):
        t0 = turn(name, 0, 64, 4, start=start, tool="t", tool_time=tool_time)
        return [t0, turn(name, 1, 84, 4, t0, start=start)]

    # z holds a seat throughout; y and w take the other two once a/0 and b/0 are done, so
    # that b/1 and a/1 both queue until y finishes.
    busy = [Request("z", 0.0, 16, 3000), Request("y", 0.05, 16, 200), Request("w", 0.06, 16, 400)]
    reqs = [*busy, *program("a", 0.001, 0.5), *program("b", 0.002, 0.1)]
    # Pins off (TTL 0) so that only the queue order differs.
    orders = {}
    for name, params in (("fcfs", {}), ("continuum-fixed", {"ttl": 0.0})):
        cls = policy_class(name)
        cluster = Cluster(
            1,
            EngineConfig(num_blocks=400, max_num_seqs=3),
            lambda cls=cls, params=params: cls(**params),
            router_class("round-robin")(),
            LinearLatency(),
        )
        m = cluster.run(Workload.from_requests(reqs))
        first = dict(zip(m.column("request_id").tolist(), m.column("first_scheduled").tolist()))
        orders[name] = first["a/1"] < first["b/1"]
    assert orders == {"fcfs": False, "continuum-fixed": True}


def test_with_one_running_a_pin_goes_instead_of_a_preemption():
    """continuum-fixed: c runs alone and cannot grow while a/0's pin holds 21 of the 30 blocks:
    the pin is released and nothing is preempted (vLLM would preempt c, its only request)."""
    a0, a1 = two_turns(tool_time=1.0)
    c = Request("c", 0.05, 16, 300)  # grows to 20 blocks
    log, _, m = watched([a0, a1, c], num_blocks=30)
    released = [t for t, _, _, r in log if "a/0" in r]
    assert len(released) == 1 and released[0] < 1.0  # before its TTL and a/1's return
    assert sum(m.column("preemptions").tolist()) == 0
    # With another request running, c's growth preempts instead (the code's rule: pins are
    # released only with at most one running): the pin survives until a/1 returns.
    d = Request("d", 0.05, 16, 300)
    log, _, m = watched([a0, a1, c, d], num_blocks=34)
    assert sum(m.column("preemptions").tolist()) > 0
    assert not any("a/0" in r for t, _, _, r in log if t < 1.0)


def test_v6_releases_the_latest_programs_pin_under_pressure():
    """continuum (v6): a waiting request that does not fit releases whole pins, the latest
    program's first; the earlier program's pin is kept while that suffices."""
    reqs = []
    for name, start in (("a", 0.0), ("b", 0.01)):
        t0 = turn(name, 0, 160, 8, start=start, tool="t", tool_time=1.0)
        reqs += [t0, turn(name, 1, 184, 8, t0, start=start)]
    reqs.append(Request("big", 0.2, 300, 8))  # 19 blocks; 14 free while both pins hold 22
    params = {"prefill_constant": 5.0}  # reload dear: B > μ, so the cold start pins (ln 5 s)
    log, hits, _ = watched(reqs, Continuum, params, num_blocks=36)
    assert [r for _, _, _, r in log if r][0] == ["b/0"]  # the latest program's pin first
    assert hits["a/1"] == 160  # a's pin held
    assert hits["b/1"] < 160  # b's blocks went to the free queue, and big took some
    # Cold start with a cheap reload (B < μ = 1 s): nothing is pinned.
    log, hits, _ = watched(reqs, Continuum, {"prefill_constant": 0.5}, num_blocks=36)
    assert not any(p for _, p, _, _ in log)


# --- invariants with pins (hypothesis, as tests/test_engine_invariants.py) ----------------------
@st.composite
def program_runs(draw):
    spec = ProgramSpec(
        count=draw(st.integers(1, 12)),
        turns_mean=draw(st.sampled_from([2.0, 5.0])),
        turns_std=1.0,
        step_limit=draw(st.sampled_from([3, 50])),  # 3: some turns are last steps
        system_prompt_tokens=draw(st.sampled_from([0, 40])),
        task_median=30.0,
        new_tokens_median=20.0,
        output_median=draw(st.sampled_from([4.0, 40.0])),
        max_output=200,
        tools={
            "fast": {"share": 0.6, "mu": math.log(0.02), "sigma": 1.0},
            "slow": {"share": 0.4, "mu": math.log(draw(st.sampled_from([0.5, 3.0]))), "sigma": 1.0},
        },
    )
    workload = program_workload(
        spec, rate=draw(st.sampled_from([0.5, 5.0, 50.0])), seed=draw(st.integers(0, 2**31))
    )
    policy = draw(st.sampled_from(["continuum-fixed", "continuum"]))
    params = {}
    if policy == "continuum":
        params = {
            "history_threshold": draw(st.sampled_from([0, 3, 100])),
            "prefill_constant": draw(st.sampled_from([0.01, 3.0])),  # pins rare, or frequent
            "pressure": draw(st.sampled_from(["any", "running"])),
        }
    block_size = draw(st.sampled_from([1, 16]))
    config = EngineConfig(
        num_blocks=draw(st.integers(4, 200)) * (16 // block_size),
        block_size=block_size,
        max_num_batched_tokens=draw(st.sampled_from([7, 64, 2048])),
        max_num_seqs=draw(st.sampled_from([1, 3, 256])),
        preemption=draw(st.sampled_from(["recompute", "swap"])),
        enable_prefix_caching=draw(st.booleans()),
        kv_bytes_per_block=block_size * 1000,
    )
    return workload, policy, params, config


def run_programs(workload, policy, params, config, *, fast_forward=True):
    cls = policy_class(policy)
    cluster = Cluster(
        1,
        config,
        lambda: cls(preemption=config.preemption, **params),
        router_class("round-robin")(),
        LinearLatency(),
        observer=check_pool,
        fast_forward=fast_forward,
    )
    return cluster, cluster.run(workload)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program_runs())
def test_with_pins_no_request_is_lost_and_every_block_comes_back(scenario):
    workload, policy, params, config = scenario
    cluster, m = run_programs(*scenario)
    ids = m.column("request_id")
    assert len(ids) == len(workload) == len(set(ids)), "request lost or duplicated"
    assert m.num_finished + m.num_rejected == len(workload)
    inst = cluster.instances[0]
    assert not inst.pins and not inst.running and not inst.waiting
    assert inst.kv.used == 0 and inst.kv.cpu_used == 0, "KV blocks not all freed"
    if hasattr(inst.kv, "ref"):
        assert (inst.kv.ref == 0).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program_runs())
def test_with_pins_spans_equal_one_iteration_at_a_time(scenario):
    """A pin's expiry ends a span where an engine planning every iteration would release it."""
    fast, fm = run_programs(*scenario)
    slow, sm = run_programs(*scenario, fast_forward=False)
    assert fast.instances[0].log.size == slow.instances[0].log.size
    fo = np.argsort(fm.column("request_id"), kind="stable")
    so = np.argsort(sm.column("request_id"), kind="stable")
    for name in ("request_id", "finished", "preemptions", "cached_tokens"):
        assert np.array_equal(fm.column(name)[fo], sm.column(name)[so]), name
    for name in ("ttft", "e2el", "first_scheduled"):
        np.testing.assert_allclose(
            fm.column(name)[fo], sm.column(name)[so], rtol=1e-9, equal_nan=True
        )
