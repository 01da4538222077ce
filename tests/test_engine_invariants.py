"""The engine's invariants over random workloads, configurations and policies (hypothesis).

No request lost or duplicated; KV blocks never negative nor above capacity, equal to the sum
over requests, all freed at the end; tokens generated = tokens requested; time monotone; no
batch over its token budget or sequence cap; spans of identical iterations give exactly what
one iteration at a time gives.
"""

from __future__ import annotations

import dataclasses
import os
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsched.cluster.cluster import Cluster
from llmsched.engine.config import EngineConfig
from llmsched.engine.instance import IterationLog, token_times
from llmsched.engine.kv import blocks_for
from llmsched.engine.prefix_cache import has_prefix_runs
from llmsched.metrics import gaps as gaps_module
from llmsched.metrics.gaps import LoggedGaps
from llmsched.metrics.record import RequestRecord
from llmsched.metrics.summary import MetricsCollector
from llmsched.policies import INSTANCE_POLICIES, ROUTERS, Router, policy_class, router_class
from llmsched.workload.request import Workload

from .helpers import LinearLatency


class CheckedCluster(Cluster):
    """A cluster that checks every request's tokens as it finishes."""

    def on_finish(self, state, instance, t):
        times = token_times(state, self.logs)
        assert len(times) == state.output_tokens, "tokens generated != tokens requested"
        assert np.all(np.diff(times) > 0), "token times not strictly increasing"
        assert times[0] >= state.arrival
        assert state.generated == state.output_tokens
        super().on_finish(state, instance, t)


class MigratingRouter(Router):
    """Round-robin placement; every request that produces `</think>` moves to the next instance
    (exercises migration under every policy)."""

    name = "test-migrating"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._next = 0

    def route(self, state, cluster) -> int:
        self._next += 1
        return self._next % cluster.num_instances

    def on_phase_change(self, state, source, cluster) -> int:
        return (source + 1) % cluster.num_instances


ROUTER_NAMES = [*sorted(ROUTERS), MigratingRouter.name]


def make_router(name: str) -> Router:
    return MigratingRouter() if name == MigratingRouter.name else router_class(name)()


def span_observer(last_end: dict, shared: bool = False):
    """Checks of every span. `shared`: requests may share blocks (prefix caching), so the
    blocks in use are at most the sum over requests."""

    def check(inst, span):
        cfg = inst.config
        plan = span.plan
        if not plan.items:  # a step that only preempts: no work, no time
            assert plan.preempted and span.k == 1 and span.end == inst.now
            return
        assert 0 < plan.num_tokens <= cfg.max_num_batched_tokens, "batch over its token budget"
        assert len(inst.running) <= cfg.max_num_seqs
        assert 0 <= inst.kv.used <= inst.kv.num_blocks, "KV blocks out of range"
        held = sum(r.blocks for r in inst.running)
        assert inst.kv.used <= held if shared else inst.kv.used == held, "KV blocks mis-counted"
        swapped = sum(entry[2].cpu_blocks for entry in inst.waiting)
        assert inst.kv.cpu_used == swapped, "host KV blocks mis-counted"
        for state, tokens in plan.items:
            assert tokens >= 1
            assert state.blocks >= blocks_for(state.computed + tokens, cfg.block_size)
        assert np.all(np.diff(span.ends) > 0)
        assert span.ends[0] > inst.now >= last_end.get(inst.index, 0.0), "time went backwards"
        last_end[inst.index] = inst.now

    return check


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    reasoning_share = draw(st.sampled_from([0.0, 0.5]))
    output = rng.integers(1, draw(st.sampled_from([8, 64, 400])), n)
    reasoning = np.where(
        (rng.random(n) < reasoning_share) & (output > 1), rng.integers(0, output), 0
    )
    workload = Workload(
        {
            "arrival": np.sort(rng.random(n) * draw(st.sampled_from([0.01, 1.0, 20.0]))),
            "prompt_tokens": rng.integers(1, draw(st.sampled_from([16, 300, 3000])), n),
            "output_tokens": output,
            "reasoning_tokens": reasoning,
            "priority": rng.integers(0, 3, n),
            # predictor scores for pars/ltr (few distinct values: ties are exercised)
            "score": rng.integers(0, draw(st.sampled_from([3, 1000])), n).astype(float),
        }
    )
    policy = draw(st.sampled_from(sorted(INSTANCE_POLICIES)))
    budget = draw(st.sampled_from([1, 7, 64, 512, 2048]))
    block_size = draw(st.sampled_from([1, 16]))
    config = EngineConfig(
        num_blocks=draw(st.integers(2, 600)),
        block_size=block_size,
        max_num_batched_tokens=budget,
        max_num_seqs=draw(st.sampled_from([1, 3, 256])),
        preemption=draw(st.sampled_from(["recompute", "swap"])),
        watermark=draw(st.sampled_from([0.0, 0.01])),
        kv_bytes_per_block=block_size * 1000,
        # vLLM v0 has no chunked prefill: it needs a budget of at least max_model_len.
        max_model_len=budget if policy == "vllm-v0" else 1 << 30,
    )
    return workload, policy, config, draw(st.integers(1, 3)), draw(st.sampled_from(ROUTER_NAMES))


def run(workload, policy, config, instances, router, *, fast_forward=True):
    last_end: dict = {}
    cls = policy_class(policy)
    cluster = CheckedCluster(
        instances,
        config,
        lambda: cls(preemption=config.preemption),
        make_router(router),
        LinearLatency(),
        observer=(prefix_observer if has_prefix_runs(workload) else span_observer)(last_end),
        fast_forward=fast_forward,
    )
    collector = cluster.run(workload)
    return cluster, collector


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_request_ends_once_and_kv_is_returned(scenario):
    workload, policy, config, instances, router = scenario
    cluster, collector = run(workload, policy, config, instances, router)
    ids = collector.column("request_id")
    assert len(ids) == len(workload) == len(set(ids)), "request lost or duplicated"
    assert collector.num_finished + collector.num_rejected == len(workload)
    for inst in cluster.instances:
        assert inst.kv.used == 0 and inst.kv.cpu_used == 0, "KV blocks not all freed"
        assert not inst.running and not inst.waiting
    finished = collector.column("finished")
    assert np.array_equal(
        collector.column("output_tokens")[finished],
        np.asarray([workload[i].output_tokens for i in range(len(workload))])[
            _order(workload, ids)
        ][finished],
    )


def _order(workload, ids):
    position = {workload[i].request_id: i for i in range(len(workload))}
    return np.array([position[r] for r in ids])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_spans_equal_one_iteration_at_a_time(scenario):
    assert_spans_equal_iterations(*scenario)


def reasoning_burst(rng, max_output: int, n: int = 40) -> Workload:
    """n reasoning requests arriving within a second: the migration regressions' load."""
    output = rng.integers(2, max_output, n)
    return Workload(
        {
            "arrival": np.sort(rng.random(n)),
            "prompt_tokens": rng.integers(1, 300, n),
            "output_tokens": output,
            "reasoning_tokens": rng.integers(1, output),
        }
    )


@pytest.mark.parametrize("router", ["pascal", MigratingRouter.name])
@pytest.mark.parametrize("seed", range(6))
def test_rad_rotation_is_exact_when_requests_migrate_in(router, seed):
    """Regression: RAD's least-recently-served stamps counted plans, so a request migrated in
    with another instance's stamp sorted differently in spans than one iteration at a time."""
    rng = np.random.default_rng(seed)
    workload = reasoning_burst(rng, max_output=400)
    config = EngineConfig(
        num_blocks=int(rng.integers(40, 80)),
        block_size=16,
        max_num_batched_tokens=1,
        max_num_seqs=3,
        kv_bytes_per_block=16000,
    )
    assert_spans_equal_iterations(workload, "rad", config, 3, router)


@pytest.mark.parametrize("seed", range(6))
def test_a_request_migrated_in_is_cached_before_a_span_repeats(seed):
    """Regression (found by hypothesis in a fresh clone): a request migrated in at `</think>`
    brings its computed KV, which is cached in the step that admits it; a waiting request's
    lookup can hit those blocks in the next step, so that plan must not repeat. It did: one
    iteration at a time admitted the waiting request an iteration later, spans not until the
    span ended (seeds 0, 3 and 4 here differed in their iterations and preemptions)."""
    rng = np.random.default_rng(seed)
    workload = reasoning_burst(rng, max_output=150)
    config = EngineConfig(
        num_blocks=int(rng.integers(350, 500)),
        block_size=1,
        max_num_batched_tokens=7,
        max_num_seqs=3,
        kv_bytes_per_block=1000,
    )
    assert config.enable_prefix_caching
    workload = with_prefixes(workload, seed, 0.6, 0.3)
    assert_spans_equal_iterations(workload, "sjf", config, 2, "pascal")


def assert_spans_equal_iterations(workload, policy, config, instances, router):
    fast, fast_metrics = run(workload, policy, config, instances, router)
    slow, slow_metrics = run(workload, policy, config, instances, router, fast_forward=False)
    assert [i.log.size for i in fast.instances] == [i.log.size for i in slow.instances]
    assert fast.stats.preemptions == slow.stats.preemptions
    # Per request (requests finishing in the same iteration may be recorded in either order).
    fast_order = np.argsort(fast_metrics.column("request_id"), kind="stable")
    slow_order = np.argsort(slow_metrics.column("request_id"), kind="stable")
    for name in ("request_id", "finished", "preemptions", "instance", "cached_tokens"):
        assert np.array_equal(
            fast_metrics.column(name)[fast_order], slow_metrics.column(name)[slow_order]
        ), name
    # A span's iterations end when they would one at a time, to the last bit: so do the tokens.
    for a, b in zip(fast.instances, slow.instances):
        assert np.array_equal(a.log.data[: a.log.size], b.log.data[: b.log.size])
    for name in ("ttft", "e2el", "first_token"):
        assert np.array_equal(
            fast_metrics.column(name)[fast_order],
            slow_metrics.column(name)[slow_order],
            equal_nan=True,
        ), name
    assert np.array_equal(np.sort(fast_metrics.itl()), np.sort(slow_metrics.itl()))


class PoolingCluster(CheckedCluster):
    """Also gives every record to a collector that keeps the gaps themselves (a GapPool)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pooled = MetricsCollector()
        add = self.collector.add

        def both(record):
            self.pooled.add(record)
            return add(record)

        self.collector.add = both


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.sampled_from([0.0, 0.0375]), st.data())
def test_gaps_read_from_the_iteration_logs_are_the_pooled_gaps(scenario, frontend, data):
    """A simulated run's collector reads its ITL gaps from the iteration logs (LoggedGaps):
    the same float32 gaps in the same order as a collector that keeps them, in any block, the
    same order statistics, and the same summary to the last bit, whatever the preemptions,
    migrations, reasoning tokens and frontend latency."""
    workload, policy, config, instances, router = scenario
    cls = policy_class(policy)
    cluster = PoolingCluster(
        instances, config, lambda: cls(preemption=config.preemption), make_router(router),
        LinearLatency(), frontend_latency=frontend,
    )  # fmt: skip
    logged, pooled = cluster.run(workload), cluster.pooled
    assert isinstance(logged.gaps_by_request()[1], LoggedGaps)
    assert np.array_equal(logged.itl(), pooled.itl())
    assert logged.itl().dtype == pooled.itl().dtype == np.float32
    (offsets, gaps), (pool_offsets, pool) = logged.gaps_by_request(), pooled.gaps_by_request()
    assert np.array_equal(offsets, pool_offsets) and len(gaps) == len(pool)
    n = len(gaps)
    for _ in range(3):
        lo = data.draw(st.integers(0, n))
        hi = data.draw(st.integers(lo, n))
        assert np.array_equal(gaps[lo:hi], pool[lo:hi]), (lo, hi)
    if n:
        ranks = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=5)))
        assert np.array_equal(gaps.order_statistics(ranks), pool.order_statistics(ranks))
    # Read a few gaps at a time (as a long run's are, a million at a time): the same gaps.
    # (Order statistics sum their weights a few at a time then too.)
    with mock.patch.object(gaps_module, "PIECE", data.draw(st.integers(1, 7))):
        assert np.array_equal(np.asarray(gaps), np.asarray(pool))
        gaps._block = (0, np.zeros(0, dtype=np.float32))  # (not the block read above)
        lo = data.draw(st.integers(0, n))
        assert np.array_equal(gaps[lo:n], pool[lo:n])
        if n:
            assert np.array_equal(gaps.order_statistics(ranks), pool.order_statistics(ranks))
    pooled.prefix_cache = logged.prefix_cache  # (the cluster's counters)
    assert logged.summary() == pooled.summary()


def test_logged_gaps_need_the_token_runs_of_a_finished_request():
    """A finished record without its runs in the iteration logs, or with runs that do not
    hold its tokens, is refused with the request named."""
    log = IterationLog()
    log.extend(np.array([1.0, 2.0, 3.0]))
    collector = MetricsCollector(gaps=LoggedGaps([log]))
    times = np.array([1.0, 2.0, 3.0])
    record = RequestRecord("a", 0.0, 5, 3, token_times=times)
    with pytest.raises(ValueError, match="'a' has no token_runs"):
        collector.add(record)
    with pytest.raises(ValueError, match="'b': its token runs hold 2 visible tokens"):
        collector.add(dataclasses.replace(record, request_id="b", token_runs=[0, 0, 2]))
    collector.add(dataclasses.replace(record, request_id="c", token_runs=[0, 0, 3]))
    assert collector.itl().tolist() == [1.0, 1.0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(1, 4), st.sampled_from([0.0, 0.05]))
def test_a_client_keeps_at_most_k_requests_in_flight(scenario, k, frontend):
    """`--max-concurrency K` (vllm bench serve's client): a request is sent at its arrival or,
    when K are in flight, the moment one completes (in arrival order), and timed from then."""
    workload, policy, config, instances, router = scenario
    cls = policy_class(policy)
    cluster = CheckedCluster(
        instances, config, lambda: cls(preemption=config.preemption), make_router(router),
        LinearLatency(), frontend_latency=frontend, max_concurrency=k,
    )  # fmt: skip
    collector = cluster.run(workload)
    assert len(collector) == len(workload), "request lost"
    order = _order(workload, collector.column("request_id"))
    sent = np.empty(len(workload))
    sent[order] = collector.column("arrival")
    done = sent.copy()
    done[order] = collector.column("arrival") + np.nan_to_num(collector.column("e2el"))
    assert np.all(sent >= workload.arrivals), "sent before it arrived"
    assert np.all(np.diff(sent) >= 0), "not sent in arrival order"
    waited = sent > workload.arrivals
    gap = np.abs(sent[waited, None] - done[None, :]).min(axis=1, initial=np.inf)
    assert np.all(gap < 1e-9), "a waiting request went without a completion"
    for t in sent:  # in flight when each is sent: itself and those sent before, not yet done
        assert np.sum((sent <= t) & (done > t + 1e-9)) <= k


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.lists(st.tuples(st.integers(0, 59), st.floats(0, 0.5)), max_size=30))
def test_online_use_with_aborts_loses_nothing_and_frees_every_block(scenario, aborts):
    """The online API of the emulated engine (submit at arrival, abort when a client goes
    away): every request is recorded exactly once when it generated all its tokens, or was
    aborted before it had (a running request's abort takes effect after the iteration in
    progress, which may be its last); the KV of aborted requests comes back."""
    from llmsched.engine.state import RequestState, Status

    workload, policy, config, instances, router = scenario
    last_end: dict = {}
    cls = policy_class(policy)
    cluster = CheckedCluster(
        instances, config, lambda: cls(preemption=config.preemption), make_router(router),
        LinearLatency(), observer=span_observer(last_end),
    )  # fmt: skip
    states = [RequestState(workload[i]) for i in range(len(workload))]
    # Each abort strikes `delay` seconds after its request's arrival, in time order.
    events = [(s.arrival, 0, i) for i, s in enumerate(states)]
    events += [(states[i].arrival + delay, 1, i) for i, delay in aborts if i < len(states)]
    refused: set[int] = set()
    dropped: dict[int, float] = {}  # aborted request -> when
    for t, kind, i in sorted(events):
        cluster.advance_to(t)
        state = states[i]
        if kind == 0:
            if cluster.submit(state, t):
                refused.add(i)
        elif state.status in (Status.WAITING, Status.RUNNING):
            cluster.abort(state, t)
            dropped[i] = t
    cluster.advance_to(np.inf)
    recorded = cluster.collector.column("request_id").tolist()
    assert len(recorded) == len(set(recorded)), "a request recorded twice"
    for i, state in enumerate(states):
        whole = state.generated == state.output_tokens
        if i in refused:
            assert state.request_id not in recorded
        elif state.request_id in recorded:
            assert whole, "recorded before its last token"
            if i in dropped:  # it finished in the iteration in progress at its abort
                log = cluster.logs[state.instance]
                ends = log.data[: log.size]
                in_progress = ends[np.searchsorted(ends, dropped[i], side="right")]
                assert token_times(state, cluster.logs)[-1] <= in_progress, "abort ignored"
        else:
            assert i in dropped and not whole, "request lost"
    for inst in cluster.instances:
        assert inst.kv.used == 0 and inst.kv.cpu_used == 0, "KV blocks not all freed"
        assert not inst.running and not inst.waiting


# --- prefix caching (engine/prefix_cache.py) ----------------------------------------------------


def _truncate(runs, tokens):
    """The first `tokens` tokens of runs (None when empty)."""
    out, left = [], tokens
    for key, n in runs:
        if left <= 0:
            break
        out.append((key, min(n, left)))
        left -= n
    return tuple(out) or None


def with_prefixes(workload, seed, share, follow):
    """The workload with prefix runs: a `share` of requests start with one of a few shared
    prefixes (nested: a system prompt, then maybe a document), a `follow` share continue an
    earlier request (its prompt and output), cut to their own prompt's length."""
    rng = np.random.default_rng(seed)
    prefixes = [
        ((("sys", s), int(rng.integers(1, 200))),)
        + (((("doc", d), int(rng.integers(1, 300))),) if d >= 0 else ())
        for s, d in zip(rng.integers(0, 3, 6), rng.integers(-1, 3, 6))
    ]
    rows = list(workload)
    for i, r in enumerate(rows):
        u = rng.random()
        if u < follow and i:
            runs = rows[int(rng.integers(0, i))].continuation
        elif u < follow + share:
            runs = prefixes[int(rng.integers(0, len(prefixes)))]
        else:
            continue
        rows[i] = dataclasses.replace(r, prefix=_truncate(runs, r.prompt_tokens))
    return Workload.from_requests(rows)


def prefix_observer(last_end: dict):
    """The span checks, with shared blocks: the pool's own invariants (every block free or
    referenced, never both; counts add up; reference counts = the requests holding each block),
    and the plan's hits: whole blocks, below the sequence's last token."""
    base = span_observer(last_end, shared=True)

    def check(inst, span):
        base(inst, span)
        kv = inst.kv
        if kv.caching:
            kv.check()
            assert kv.used == len({b for s in kv.tables for b in kv.table(s).tolist()})
            assert set(kv.tables) == set(inst.running)
        for state, hit in span.plan.hits.items():
            assert hit % inst.config.block_size == 0 and 0 < hit < state.num_tokens
            assert hit <= state.computed

    return check


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenarios(),
    st.integers(0, 2**31),
    st.sampled_from([0.3, 0.9]),
    st.sampled_from([0.0, 0.4]),
)
def test_prefix_sharing_keeps_every_block_accounted_for(scenario, seed, share, follow):
    run_with_prefixes(scenario, seed, share, follow)


def with_swap(scenario):
    """The scenario with swap preemption, whatever its policy."""
    workload, policy, config, instances, router = scenario
    return workload, policy, dataclasses.replace(config, preemption="swap"), instances, router


def as_slai_swap(scenario):
    """The scenario as SLAI with swap preemption and 1-token blocks (the case that once
    over-allocated KV on a swap-in beside cache hits)."""
    workload, _, config, instances, router = scenario
    config = dataclasses.replace(
        config, preemption="swap", block_size=1, kv_bytes_per_block=1000, max_model_len=1 << 30
    )
    return workload, "slai", config, instances, router


@pytest.mark.skipif(
    not os.environ.get("LLMSCHED_HUNT"),
    reason="a hunt, not a check: LLMSCHED_HUNT=1 runs it (docs/prefix-caching.md, swap)",
)
@pytest.mark.parametrize("force", [as_slai_swap, with_swap])
def test_hunt_prefix_caching_under_swap(force):
    """The invariant test above, longer, on scenarios forced to swap preemption: 1,500 cases
    of each kind."""

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        scenarios().map(force),
        st.integers(0, 2**31),
        st.sampled_from([0.3, 0.9]),
        st.sampled_from([0.0, 0.4]),
    )
    def hunt(scenario, seed, share, follow):
        run_with_prefixes(scenario, seed, share, follow)

    hunt()


def run_with_prefixes(scenario, seed, share, follow) -> None:
    workload, policy, config, instances, router = scenario
    workload = with_prefixes(workload, seed, share, follow)
    last_end: dict = {}
    cls = policy_class(policy)
    cluster = CheckedCluster(
        instances, config, lambda: cls(preemption=config.preemption), make_router(router),
        LinearLatency(), observer=prefix_observer(last_end),
    )  # fmt: skip
    collector = cluster.run(workload)
    ids = collector.column("request_id")
    assert len(ids) == len(workload) == len(set(ids)), "request lost or duplicated"
    for inst in cluster.instances:
        assert inst.kv.used == 0 and inst.kv.cpu_used == 0, "KV blocks not all freed"
        if inst.kv.caching:
            inst.kv.check()
            assert not inst.kv.tables and len(inst.kv.plain) + len(inst.kv.lru) == config.num_blocks
    cached = collector.column("cached_tokens")
    prompts = collector.column("prompt_tokens")
    assert np.all((cached >= 0) & (cached < prompts) & (cached % config.block_size == 0))
    pc = collector.prefix_cache
    assert 0 <= pc["hits"] <= pc["queries"]
    assert pc["hits"] >= cached.sum()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(0, 2**31))
def test_prefix_sharing_spans_equal_one_iteration_at_a_time(scenario, seed):
    workload, policy, config, instances, router = scenario
    assert_spans_equal_iterations(
        with_prefixes(workload, seed, 0.6, 0.3), policy, config, instances, router
    )
