"""Agent programs: the closed loop in the cluster, the program generator, program metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsched.cluster.cluster import Cluster
from llmsched.engine.config import EngineConfig
from llmsched.policies import INSTANCE_POLICIES, policy_class, router_class
from llmsched.workload.request import Request, Workload
from llmsched.workload.sessions import PROGRAM_CUT

from .helpers import LinearLatency


def config(max_model_len: int = 1 << 30, budget: int = 2048, blocks: int = 4000) -> EngineConfig:
    return EngineConfig(
        num_blocks=blocks,
        block_size=16,
        max_num_batched_tokens=budget,
        max_num_seqs=256,
        kv_bytes_per_block=16_000,
        max_model_len=max_model_len,
    )


def simulate(workload, cfg=None, *, policy="fcfs", instances=1, router="round-robin", **kw):
    cls = policy_class(policy)
    cluster = Cluster(
        instances, cfg or config(), lambda: cls(), router_class(router)(), LinearLatency(), **kw
    )
    collector = cluster.run(workload)
    cols = collector.columns()
    by_id = {rid: i for i, rid in enumerate(cols["request_id"].tolist())}
    return collector, cols, by_id


def program(session: str, start: float, turns: list[tuple[int, int, float]]) -> list[Request]:
    """A closed-loop program: (new prompt tokens, output tokens, tool time) per turn; each
    turn's prompt is the previous prompt + output + its new tokens."""
    out: list[Request] = []
    for k, (new, output, tool) in enumerate(turns):
        prev = out[-1] if out else None
        prompt = new + (prev.prompt_tokens + prev.output_tokens if prev else 0)
        out.append(
            Request(
                f"{session}/{k}",
                start,
                prompt,
                output,
                session_id=session,
                turn=k,
                tool_time=tool,
                prefix=prev.continuation if prev else None,
                closed_loop=k > 0,
                score=float(k),  # for the policies that rank by a score
            )
        )
    return out


def test_each_turn_arrives_exactly_at_its_predecessors_finish_plus_its_tool_time():
    turns = [(300, 20, 0.5), (40, 30, 1.25), (10, 5, 0.0)]
    other = Request("x", 0.01, 500, 50)  # an open-loop request beside the program
    workload = Workload.from_requests([*program("p", 0.0, turns), other])
    collector, cols, at = simulate(workload)
    assert collector.num_finished == 4
    for k in (1, 2):
        before, this = at[f"p/{k - 1}"], at[f"p/{k}"]
        assert cols["arrival"][this] == cols["finish"][before] + turns[k - 1][2]
    assert cols["arrival"][at["x"]] == 0.01  # open loop: at its own time


def test_a_lower_bound_arrival_holds_a_turn_back():
    first, second = program("p", 0.0, [(100, 5, 0.0), (10, 5, 0.0)])
    late = Request(**{**_fields(second), "arrival": 50.0})
    _, cols, at = simulate(Workload.from_requests([first, late]))
    assert cols["arrival"][at["p/1"]] == 50.0


def _fields(r: Request) -> dict:
    return {name: getattr(r, name) for name in r.__slots__}


def test_open_loop_sessions_keep_their_own_arrival_times():
    """ShareGPT-like sessions (closed_loop false) arrive when the workload says, as before."""
    reqs = [
        Request("a/0", 0.0, 100, 400, session_id="a", turn=0, tool_time=3.0),
        Request("a/1", 0.001, 100, 10, session_id="a", turn=1),
    ]
    _, cols, at = simulate(Workload.from_requests(reqs))
    assert cols["arrival"][at["a/1"]] == 0.001


def test_a_rejected_turn_ends_its_program_and_the_later_turns_are_counted():
    # turn 1's prompt is 300 + 50 + 200 = 550 tokens: with its output over max_model_len 560
    reqs = program("p", 0.0, [(300, 50, 0.1), (200, 20, 0.1), (10, 5, 0.0)])
    reqs.append(Request("q", 0.0, 100, 10))
    collector, cols, at = simulate(Workload.from_requests(reqs), config(max_model_len=560))
    assert collector.num_finished == 2 and collector.num_rejected == 2
    assert cols["status"][at["p/0"]] == "finished"
    assert cols["reject_reason"][at["p/1"]].startswith("prompt + output exceeds max_model_len")
    assert cols["reject_reason"][at["p/2"]] == PROGRAM_CUT
    # it was cut when turn 1 was refused: at turn 0's finish plus its tool time
    assert cols["arrival"][at["p/2"]] == cols["arrival"][at["p/1"]]
    reasons = collector.summary()["rejected_reasons"]
    assert reasons[PROGRAM_CUT] == 1 and sum(reasons.values()) == 2


def test_a_closed_loop_turn_without_its_predecessor_is_refused():
    _, second = program("p", 0.0, [(100, 5, 0.0), (10, 5, 0.0)])
    with pytest.raises(ValueError, match=r"'p/1' \(session 'p', turn 1\) is closed-loop.*turn 0"):
        simulate(Workload.from_requests([second]))


@st.composite
def programs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    num = draw(st.integers(1, 8))
    reqs: list[Request] = []
    for p in range(num):
        turns = [
            (int(rng.integers(1, 400)), int(rng.integers(1, 60)), float(rng.exponential(0.2)))
            for _ in range(draw(st.integers(1, 6)))
        ]
        reqs += program(f"p{p}", float(rng.random() * 2), turns)
    n_open = draw(st.integers(0, 10))
    reqs += [
        Request(f"o{i}", float(rng.random() * 2), int(rng.integers(1, 500)), 20, score=1.0)
        for i in range(n_open)
    ]
    cfg = config(
        max_model_len=draw(st.sampled_from([1 << 30, 1500])),
        budget=draw(st.sampled_from([64, 2048])),
        blocks=draw(st.sampled_from([120, 4000])),
    )
    return (
        Workload.from_requests(reqs),
        cfg,
        draw(st.sampled_from(sorted(set(INSTANCE_POLICIES) - {"vllm-v0"}))),
        draw(st.integers(1, 3)),
        draw(st.sampled_from([None, 1, 4])),
        draw(st.sampled_from([0.0, 0.02])),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_no_turn_is_lost_and_every_turn_arrives_after_its_predecessor_finished(scenario):
    workload, cfg, policy, instances, concurrency, frontend = scenario
    collector, cols, at = simulate(
        workload,
        cfg,
        policy=policy,
        instances=instances,
        max_concurrency=concurrency,
        frontend_latency=frontend,
    )
    assert len(collector) == len(workload) == len(at), "a turn lost or duplicated"
    for r in workload:
        if not r.closed_loop:
            continue
        before, this = at[f"{r.session_id}/{r.turn - 1}"], at[r.request_id]
        if cols["status"][before] == "finished":
            sent = cols["finish"][before] + workload[_index(workload, before, cols)].tool_time
            assert cols["arrival"][this] >= sent  # == but for a client's concurrency limit
            if concurrency is None:
                assert cols["arrival"][this] == sent
            if cols["status"][this] == "finished":
                assert cols["first_token"][this] > cols["finish"][before]
        else:  # a rejected turn ends its program
            assert cols["status"][this] == "rejected"
            assert cols["reject_reason"][this] == PROGRAM_CUT


def _index(workload: Workload, row: int, cols) -> int:
    rid = cols["request_id"][row]
    return int(np.flatnonzero(workload.columns["request_id"] == rid)[0])


# --- program metrics --------------------------------------------------------------------------


def test_job_completion_time_and_cold_and_warm_ttft_on_a_hand_made_case():
    from llmsched.metrics.programs import program_metrics
    from llmsched.metrics.record import RequestRecord
    from llmsched.metrics.summary import MetricsCollector

    reqs = [
        *program("p", 1.0, [(10, 2, 1.0), (5, 2, 0.0)]),
        *program("q", 0.0, [(10, 1, 0.5), (5, 1, 0.0), (5, 1, 0.0)]),
        Request("solo", 0.0, 10, 1),  # no session: not a program
    ]
    c = MetricsCollector()
    for rid, arrival, first_scheduled, times in [
        ("p/0", 1.0, 1.25, [1.5, 2.0]),
        ("p/1", 3.0, 3.1, [3.2, 4.0]),
        ("q/0", 0.0, 0.25, [0.5]),
        ("solo", 0.0, 0.0, [9.0]),
    ]:
        c.add(RequestRecord(rid, arrival, 10, len(times), token_times=np.array(times),
                            first_scheduled=first_scheduled))  # fmt: skip
    c.add(RequestRecord("q/1", 1.0, 16, 1, finished=False, reject_reason="too long"))
    c.add(RequestRecord("q/2", 1.0, 22, 1, finished=False, reject_reason=PROGRAM_CUT))
    m = program_metrics(Workload.from_requests(reqs), c)
    assert m["num_programs"] == 2 and m["completed_programs"] == 1 and m["cut_programs"] == 1
    assert m["program_turns"] == 5 and m["turns_not_run"] == 1
    assert m["mean_jct_ms"] == pytest.approx(3000.0)  # p: last finish 4.0 - first arrival 1.0
    assert m["p99_jct_ms"] == pytest.approx(3000.0)
    assert m["mean_ttft_cold_ms"] == pytest.approx(500.0)  # p/0: 0.5 s, q/0: 0.5 s
    assert m["mean_ttft_warm_ms"] == pytest.approx(200.0)  # p/1: 3.2 - 3.0
    assert m["mean_turn_queue_time_ms"] == pytest.approx((250 + 100 + 250) / 3)
    assert m["mean_program_queue_time_ms"] == pytest.approx(350.0)  # p's turns: 0.25 + 0.1


def test_a_workload_without_sessions_has_no_program_metrics():
    from llmsched.metrics.programs import program_metrics
    from llmsched.metrics.summary import MetricsCollector

    assert (
        program_metrics(Workload.from_requests([Request("a", 0.0, 1, 1)]), MetricsCollector())
        is None
    )


# --- the program generator ----------------------------------------------------------------------


def _programs(**spec):
    from llmsched.workload.programs import ProgramSpec, program_workload

    rate = spec.pop("rate", 0.5)
    seed = spec.pop("seed", 0)
    return program_workload(ProgramSpec(**spec), rate=rate, seed=seed)


def _by_program(w: Workload) -> dict[str, list[Request]]:
    out: dict[str, list[Request]] = {}
    for r in w:
        out.setdefault(r.session_id, []).append(r)
    return {k: sorted(v, key=lambda r: r.turn) for k, v in out.items()}


def test_generated_turns_grow_their_predecessors_context_and_share_the_system_prompt():
    w = _programs(count=20)
    assert len(w) == len({r.request_id for r in w})
    for turns in _by_program(w).values():
        first = turns[0]
        assert not first.closed_loop and first.prefix == ((("system",), 5000),)
        for before, this in zip(turns, turns[1:]):
            assert this.closed_loop and this.arrival == first.arrival
            assert this.prefix == before.continuation  # the previous prompt and output
            assert this.prompt_tokens > before.prompt_tokens + before.output_tokens
            assert before.tool is not None and before.tool_time > 0
        assert turns[-1].tool is None and turns[-1].tool_time == 0.0
        assert not any(r.is_last_step for r in turns)  # 10.9 +- 2.1 turns never reach 50


def test_the_same_seed_gives_the_same_programs_and_another_seed_others():
    a, b, c = _programs(count=30), _programs(count=30), _programs(count=30, seed=1)
    assert [tuple(r.__slots__ and (getattr(r, f) for f in r.__slots__)) for r in a] == [
        tuple(getattr(r, f) for f in r.__slots__) for r in b
    ]
    assert a.columns["prompt_tokens"].tolist() != c.columns["prompt_tokens"].tolist()


def test_the_step_limit_caps_programs_and_marks_their_last_step():
    w = _programs(count=200, turns_mean=9, turns_std=3, step_limit=8)
    programs = _by_program(w)
    assert max(len(t) for t in programs.values()) == 8
    for turns in programs.values():
        assert [r.is_last_step for r in turns[:-1]] == [False] * (len(turns) - 1)
        assert turns[-1].is_last_step == (len(turns) == 8)
    assert 0 < sum(t[-1].is_last_step for t in programs.values()) < 200


def test_the_defaults_reproduce_their_targets():
    from llmsched.workload.programs import OPENHANDS_TOOLS

    w = _programs(count=4000, rate=1.0, seed=7)
    turns = np.array([len(t) for t in _by_program(w).values()])
    assert turns.mean() == pytest.approx(10.9, abs=0.1)  # Continuum: 10.9 +- 2.1 turns
    assert turns.std() == pytest.approx(2.1, abs=0.1)
    out = w.columns["output_tokens"]
    assert out.max() <= 2048
    assert np.median(out) == pytest.approx(105, rel=0.05)
    starts = np.sort(w.arrivals[w.columns["turn"] == 0])
    assert np.diff(starts).mean() == pytest.approx(1.0, rel=0.05)  # 1 program/s
    tools = w.columns["tool"]
    called = tools[tools != None]  # noqa: E711 (an object column)
    for name, t in OPENHANDS_TOOLS.items():
        mine = tools == name
        assert mine.sum() / len(called) == pytest.approx(t.share, abs=0.02)
        if t.share > 0.1:
            logs = np.log(w.columns["tool_time"][mine])
            assert logs.mean() == pytest.approx(t.mu, abs=0.05)
            assert logs.std() == pytest.approx(t.sigma, abs=0.05)


def test_the_embedded_tool_times_are_the_fit_of_the_agent_data():
    from llmsched.data import data_dir
    from llmsched.workload.programs import TOOL_SETS, fit_agent_data

    root = data_dir()
    if root is None or not (root / "agents" / "openhands_tool_gaps.csv").is_file():
        pytest.skip("the shared data's agents/ folder is absent (set LLMSCHED_DATA)")
    assert fit_agent_data(root / "agents") == TOOL_SETS


def test_bad_program_settings_are_refused_with_the_key():
    from llmsched.workload.programs import ProgramSpec

    with pytest.raises(ValueError, match="tools: unknown tool set 'claude'; known: openhands"):
        ProgramSpec(tools="claude")
    with pytest.raises(ValueError, match="unknown key.*turns; known: count"):
        ProgramSpec.from_mapping({"turns": 3})
    with pytest.raises(ValueError, match="shares must be >= 0 and sum to 1"):
        ProgramSpec(tools={"a": {"share": 0.5, "mu": 0.0, "sigma": 1.0}})


def test_programs_round_trip_through_llmsched_jsonl(tmp_path):
    from llmsched.workload.readers import read_trace, write_jsonl

    w = _programs(count=5)
    back = read_trace(write_jsonl(w, tmp_path / "p.jsonl"))
    assert list(back) == list(w)


def test_a_session_trace_with_a_rate_draws_session_starts_and_keeps_the_loop():
    from llmsched.workload.generators import build_workload

    w = _programs(count=50)
    drawn = build_workload(w, arrival="poisson", rate=2.0, seed=3)
    for turns in _by_program(drawn).values():
        assert all(r.arrival == turns[0].arrival for r in turns)
    starts = np.sort(drawn.arrivals[drawn.columns["turn"] == 0])
    assert starts[0] == 0.0 and len(np.unique(starts)) == 50
    with pytest.raises(ValueError, match="closed-loop sessions: its requests cannot be drawn"):
        build_workload(w, arrival="poisson", rate=2.0, sample="random", num_requests=10)


# --- configs and the command line ---------------------------------------------------------------


def test_a_programs_config_runs_and_reports_job_completion_times():
    from llmsched.config import SimulationConfig
    from llmsched.experiment import simulate

    cfg = SimulationConfig(
        programs={"count": 6, "tools": "swe-agent"}, rate=0.5, model="llama-3.1-8b"
    )
    result = simulate(cfg)
    s = result.summary
    assert s["num_programs"] == 6 and s["completed_programs"] == 6
    assert s["completed"] == s["program_turns"]
    assert s["mean_jct_ms"] > 0 and s["p99_jct_ms"] >= s["median_jct_ms"]
    assert s["mean_ttft_cold_ms"] > 0 and s["mean_ttft_warm_ms"] > 0
    assert "programs/s" in __import__("llmsched.experiment").experiment.run_title(cfg)


def test_a_context_that_outgrows_the_model_cuts_its_program_counted():
    from llmsched.config import SimulationConfig
    from llmsched.experiment import simulate

    s = simulate(SimulationConfig(programs={"count": 6}, rate=0.5)).summary  # 8,192 tokens
    reasons = s["rejected_reasons"]
    assert reasons["prompt + output exceeds max_model_len (8192 tokens)"] == s["cut_programs"]
    assert s["failed"] == s["cut_programs"] + s["turns_not_run"]
    assert s["completed"] + s["failed"] == s["program_turns"]


def test_programs_config_mistakes_name_their_keys():
    from llmsched.config import ConfigError, SimulationConfig

    with pytest.raises(ConfigError, match="two workloads"):
        SimulationConfig(programs={}, trace="x.csv")
    with pytest.raises(ConfigError, match="num_requests: not used with programs"):
        SimulationConfig(programs={"count": 3}, num_requests=5)
    with pytest.raises(ConfigError, match="unknown tool set"):
        SimulationConfig(programs={"tools": "nope"})
    with pytest.raises(ConfigError, match="programs"):
        SimulationConfig(programs={"count": "3"})


def test_the_command_line_runs_programs(tmp_path, capsys):
    from llmsched.cli import main

    out = tmp_path / "run"
    argv = ["simulate", "--programs", "4", "--rate", "1", "--model", "llama-3.1-8b"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "programs: 4 (4 completed, 0 cut short" in capsys.readouterr().out
    assert (out / "summary.json").is_file()
    import csv

    with open(out / "requests.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    turns: dict[str, list[int]] = {}
    for row in rows:  # every turn says its program and its place in it
        turns.setdefault(row["session_id"], []).append(int(row["turn"]))
    assert len(turns) == 4 and "" not in turns
    assert all(sorted(t) == list(range(len(t))) for t in turns.values())


def test_the_load_client_refuses_closed_loop_programs_instead_of_sending_them_open_loop():
    from llmsched.bench.run import bench

    with pytest.raises(ValueError, match="closed-loop turns.*cannot run them yet"):
        bench(_programs(count=2), "http://127.0.0.1:9", model="m")
