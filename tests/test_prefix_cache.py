"""vLLM 0.32's prefix caching, decision by decision (engine/prefix_cache.py): what an admission
hits, what a preempted request finds again, which cached block is evicted first, and that a run
without shared prefixes (or with caching off) is exactly the run of before."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llmsched.cluster.cluster import Cluster
from llmsched.engine.config import EngineConfig
from llmsched.engine.prefix_cache import BlockHasher, PrefixCachingKV, identities
from llmsched.engine.state import RequestState
from llmsched.metrics.report import format_summary
from llmsched.policies import policy_class, router_class
from llmsched.workload.request import Request, Workload

from .helpers import LinearLatency


def simulate(requests, *, num_blocks=1000, policy="fcfs", instances=1, **engine):
    config = EngineConfig(num_blocks=num_blocks, **engine)
    cls = policy_class(policy)
    cluster = Cluster(
        instances,
        config,
        lambda: cls(preemption=config.preemption),
        router_class("round-robin")(),
        LinearLatency(),
    )
    collector = cluster.run(Workload.from_requests(requests))
    return cluster, collector


def cached(collector) -> dict[str, int]:
    return dict(
        zip(collector.column("request_id").tolist(), collector.column("cached_tokens").tolist())
    )


# --- admissions --------------------------------------------------------------------------------


def test_a_fully_cached_32_token_prompt_hits_16_tokens():
    """The last token is recomputed for its logits, and hits are whole blocks: 16 of 32."""
    same = (("doc", 32),)
    _, metrics = simulate(
        [Request("a", 0.0, 32, 4, prefix=same), Request("b", 5.0, 32, 4, prefix=same)]
    )
    assert cached(metrics) == {"a": 0, "b": 16}
    summary = metrics.summary()
    assert summary["prefix_cache_queries"] == 64 and summary["prefix_cache_hits"] == 16
    assert summary["prefix_cache_hit_rate"] == 0.25
    assert "Prefix cache hit rate (%): 25.00" in " ".join(format_summary(summary).split())


def test_a_shared_512_token_prefix_hits_512_tokens():
    system = (("system", 512),)
    _, metrics = simulate(
        [
            Request("a", 0.0, 600, 4, prefix=system),
            Request("b", 5.0, 700, 4, prefix=system),
            Request("c", 10.0, 700, 4, prefix=(("other", 512),)),  # other tokens: no hit
            Request("d", 15.0, 530, 4, prefix=(("system", 520),)),  # the same 512, and more
        ]
    )
    assert cached(metrics) == {"a": 0, "b": 512, "c": 0, "d": 512}


def test_runs_agree_token_by_token_not_run_by_run():
    """(A, 100) then B shares 96 tokens (6 blocks) with a prompt that is (A, 300): their runs
    agree on A's first 100 tokens only."""
    _, metrics = simulate(
        [
            Request("a", 0.0, 400, 4, prefix=(("A", 300),)),
            Request("b", 5.0, 400, 4, prefix=(("A", 100), ("B", 100))),
        ]
    )
    assert cached(metrics)["b"] == 96


def test_the_next_turn_hits_the_previous_turns_prompt_and_output():
    first = Request("t0", 0.0, 100, 50, prefix=(("system", 64),))
    second = Request("t1", 20.0, 200, 8, prefix=first.continuation)  # 150 tokens + 50 new
    _, metrics = simulate([first, second])
    # t0's blocks: 149 tokens were computed (its last output token never is): 9 full blocks
    assert cached(metrics) == {"t0": 0, "t1": 144}


def test_the_admission_check_counts_only_the_blocks_past_the_hit():
    """vLLM's scheduler_reserve_full_isl: the whole prompt must fit, less what is cached. With
    20 blocks, a 256-token prompt sharing 160 cached tokens with a running request needs 6 more;
    without caching it needs 16 and waits for the first to finish."""
    shared = (("doc", 160),)
    reqs = [
        Request("a", 0.0, 176, 200, prefix=shared),  # holds 11 blocks while it decodes
        Request("b", 0.5, 256, 4, prefix=shared),
    ]
    on, m_on = simulate(reqs, num_blocks=26, max_num_batched_tokens=512)
    off, m_off = simulate(
        reqs, num_blocks=26, max_num_batched_tokens=512, enable_prefix_caching=False
    )
    assert cached(m_on)["b"] == 160
    first_on = m_on.column("first_scheduled")[m_on.column("request_id") == "b"][0]
    first_off = m_off.column("first_scheduled")[m_off.column("request_id") == "b"][0]
    assert first_on == pytest.approx(0.5, abs=0.05) and first_off > 1.0


def test_a_preempted_request_hits_its_blocks_that_survived():
    """Two requests fill the cache; the later one is preempted (recompute), its blocks freed
    (kept cached). Readmitted before they are reused, it finds them again: its second admission
    hits (vLLM counts it), not its first."""
    reqs = [
        Request("a", 0.0, 64, 150, prefix=(("x", 64),)),
        Request("b", 0.0, 64, 150, prefix=(("y", 64),)),
    ]
    cluster, metrics = simulate(reqs, num_blocks=20)
    assert metrics.summary()["total_preemptions"] >= 1
    assert cached(metrics) == {"a": 0, "b": 0}  # first admissions: nothing cached
    # b's re-admissions hit its prompt and the output it had computed, in whole blocks
    assert metrics.summary()["prefix_cache_hits"] > 0


def test_kv_usage_counts_referenced_blocks_only():
    """A finished request's blocks stay cached but count as free (vllm:kv_cache_usage_perc)."""
    cluster, _ = simulate([Request("a", 0.0, 100, 4, prefix=(("x", 100),))])
    kv = cluster.instances[0].kv
    assert kv.used == 0 and kv.free == kv.num_blocks and kv.usage == 0
    assert len(kv.lru) == 6 and len(kv.cached_blocks()) == 6  # 103 tokens computed: 6 full blocks


# --- the pool, block by block ------------------------------------------------------------------


def state_of(rid, prompt, runs, output=10):
    return RequestState(Request(rid, 0.0, prompt, output, prefix=runs))


def admit(kv, state):
    hit = kv.lookup(state)
    kv.admit_cached(state, len(hit) * kv.block_size)
    state.computed = len(hit) * kv.block_size
    kv.grow_to(state, state.num_tokens)  # its prompt computed
    state.computed = state.num_tokens
    return len(hit)


def test_a_recomputed_output_is_cached_when_its_chunk_is_scheduled():
    """Blocks filled by decoding enter the cache lazily, but a preempted request recomputing
    its output is scheduled like a prompt: vLLM caches those blocks in that step, so a next
    turn admitted later in the same step finds them (the planner counts on it; found by the
    hypothesis test, where the engine then over-allocated KV)."""
    kv = PrefixCachingKV(40, 16)
    turn = state_of("t0", 32, (("s", 32),), output=60)
    turn.generated = 40  # preempted by recompute: 72 tokens to compute again, 40 of them output
    kv.grow_to(turn, 72, 72)  # the recompute chunk, scheduled
    follower = state_of("t1", 120, turn.request.continuation)
    assert len(kv.lookup(follower)) == 4  # 72 tokens: 4 full blocks, 2 of them output
    decoding = state_of("d", 32, (("s2", 32),), output=60)
    decoding.computed, decoding.generated = 71, 40  # decoding: its next block is not cached yet
    kv.grow_to(decoding, 72, 72)
    assert len(kv.lookup(state_of("d1", 120, decoding.request.continuation))) == 4  # on lookup
    kv.check()


def test_freed_blocks_go_tail_first_and_the_least_recently_freed_is_evicted_first():
    kv = PrefixCachingKV(8, 16)
    a = state_of("a", 65, (("A", 64),))  # 4 full blocks, then one partial
    admit(kv, a)
    blocks = list(kv.table(a).tolist())
    kv.free_request(a)
    # tail first: the partial (unhashed) block to the head, full ones to the LRU tail last
    # block first, so the prompt's start is evicted last
    assert list(kv.lru) == blocks[3::-1]
    assert kv.plain[-1] == blocks[4]
    b = state_of("b", 33, (("B", 32),))
    admit(kv, b)  # 3 blocks: 4 unhashed free ones go first
    assert len(kv.lru) == 4
    c = state_of("c", 33, (("C", 32),))
    admit(kv, c)  # 3 blocks: the unhashed one left, then A's last block, then its third
    assert list(kv.lru) == blocks[1::-1]
    again = state_of("a2", 65, (("A", 64),))
    assert len(kv.lookup(again)) == 2  # A's first two blocks survived
    kv.check()


def test_lru_order_follows_the_last_free_not_the_first_use():
    kv = PrefixCachingKV(6, 16)
    a, b = state_of("a", 33, (("A", 32),)), state_of("b", 33, (("B", 32),))
    admit(kv, a)
    admit(kv, b)
    kv.free_request(a)  # A's blocks freed first...
    kv.free_request(b)
    a2 = state_of("a2", 33, (("A", 32),))
    assert admit(kv, a2) == 2  # ...then touched again: out of the free queue
    kv.free_request(a2)  # and freed last: now B's are the least recently freed
    d = state_of("d", 64, (("D", 64),))
    admit(kv, d)  # 4 blocks: 2 unhashed (partials), then B's two
    assert not len(kv.lookup(state_of("b2", 33, (("B", 32),))))
    assert len(kv.lookup(state_of("a3", 33, (("A", 32),)))) == 2
    kv.check()


def test_shared_blocks_are_reference_counted():
    kv = PrefixCachingKV(20, 16)
    a, b = state_of("a", 80, (("S", 64),)), state_of("b", 80, (("S", 64),))
    admit(kv, a)
    assert admit(kv, b) == 4
    assert kv.table(a).tolist()[:4] == kv.table(b).tolist()[:4]
    assert [kv.ref[x] for x in kv.table(a).tolist()[:5]] == [2, 2, 2, 2, 1]
    assert kv.used == 6  # a's 5 full blocks; b shares 4 (its hit stops below its last token)
    assert sum(kv.ref[x] == 1 for x in kv.table(a).tolist()) == 1  # freeing a returns one block
    kv.free_request(a)
    assert [kv.ref[x] for x in kv.table(b).tolist()[:4]] == [1, 1, 1, 1]
    kv.free_request(b)
    assert kv.used == 0
    kv.check()


def test_identities_are_exact_per_token_prefix():
    hasher = BlockHasher()
    one = hasher.chain(((("s",), 40), ("x", 30)))
    two = hasher.chain(((("s",), 40), ("y", 30)))
    three = hasher.chain(((("s",), 48), ("x", 30)))
    assert identities(one, 0, 4, 16)[:2] == identities(two, 0, 4, 16)[:2]
    assert identities(one, 0, 4, 16)[2:] != identities(two, 0, 4, 16)[2:]  # from token 40 on
    assert identities(one, 0, 2, 16) == identities(three, 0, 2, 16)
    assert identities(one, 2, 4, 16) == identities(one, 0, 4, 16)[2:]
    assert identities(one, 3, 4, 16) != identities(three, 3, 4, 16)


# --- nothing shared: exactly the run of before --------------------------------------------------


def _workload(seed=0, n=150, prefixes=False):
    rng = np.random.default_rng(seed)
    rows = [
        Request(
            f"r{i}",
            float(t),
            int(p),
            int(o),
            reasoning_tokens=int(rng.integers(0, o)) if i % 3 == 0 else 0,
            priority=int(rng.integers(0, 3)),
        )
        for i, (t, p, o) in enumerate(
            zip(
                np.sort(rng.random(n) * 8),
                rng.integers(16, 3000, n),
                rng.integers(2, 400, n),
            )
        )
    ]
    if prefixes:  # each request's prefix is its own: nothing is shared
        rows = [dataclasses.replace(r, prefix=((("own", r.request_id), 16),)) for r in rows]
    return rows


@pytest.mark.parametrize("policy", ["fcfs", "priority", "sarathi", "pascal", "vllm-v0"])
@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_no_shared_prefix_or_caching_off_gives_exactly_the_same_summary(policy, preemption):
    engine = dict(num_blocks=400, max_num_batched_tokens=4096, preemption=preemption)
    if policy == "vllm-v0":
        engine["max_model_len"] = 4096
    reqs = _workload()
    off = simulate(reqs, enable_prefix_caching=False, instances=2, policy=policy, **engine)[1]
    on = simulate(reqs, instances=2, policy=policy, **engine)[1]
    a, b = off.summary(), on.summary()
    assert a["total_preemptions"] > 0  # the runs exercise preemption
    assert b.pop("prefix_cache") == "on; the workload shares no prefix runs: no hits are possible"
    assert a.pop("prefix_cache") == "off"
    assert a == b
    for name in ("ttft", "e2el", "preemptions", "cached_tokens"):
        assert np.array_equal(off.column(name), on.column(name), equal_nan=True)


@pytest.mark.parametrize("policy", ["fcfs", "sarathi"])
def test_prefixes_that_share_nothing_change_nothing_but_the_counters(policy):
    """With caching on and prefix runs that no two requests share, no request hits, and (no
    preemption happening) every decision is the one made with caching off."""
    engine = dict(num_blocks=40000, max_num_batched_tokens=4096, policy=policy)
    reqs = _workload(seed=1, prefixes=True)
    off = simulate(reqs, enable_prefix_caching=False, **engine)[1].summary()
    on_metrics = simulate(reqs, **engine)[1]
    on = on_metrics.summary()
    assert on["total_preemptions"] == 0 and on["prefix_cache_hits"] == 0
    assert on["prefix_cache_queries"] == sum(r.prompt_tokens for r in reqs)
    for key in [k for k in on if k.startswith("prefix_cache")]:
        on.pop(key), off.pop(key)
    assert on == off


def test_prefix_affinity_routes_to_the_instance_that_holds_the_prefix():
    """The router's `prefix_match` is the hit each instance's cache would give now."""
    config = EngineConfig(num_blocks=1000)
    cluster = Cluster(
        3, config, policy_class("fcfs"), router_class("prefix-affinity")(), LinearLatency()
    )
    docs = [(("doc", d), 512) for d in range(3)]
    reqs = [Request(f"first{d}", 0.001 * d, 600, 4, prefix=(docs[d],)) for d in range(3)]
    reqs += [Request(f"again{d}", 10.0 + d, 700, 4, prefix=(docs[d],)) for d in (2, 0, 1)]
    metrics = cluster.run(Workload.from_requests(reqs))
    where = dict(zip(metrics.column("request_id").tolist(), metrics.column("instance").tolist()))
    assert [where[f"again{d}"] for d in range(3)] == [where[f"first{d}"] for d in range(3)]
    assert all(cached(metrics)[f"again{d}"] == 512 for d in range(3))
