"""The config: every value checked against its type and range, with a message naming the key,
the value and what is expected; and the checks that come before any work (issue 17)."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsched.cli import main
from llmsched.config import ConfigError, SimulationConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--num-requests", "20", "--rate", "5"]
AZURE = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:47.1234500,120,30\n"
    "2023-11-16 18:15:49.0000000,800,12\n"
)


def _refused(tmp_path, capsys, text: str, name: str = "bad.yaml") -> str:
    """`simulate --config` on a file holding `text`: exit status 2, the error on stderr."""
    config = tmp_path / name
    config.write_text(text)
    assert main(["simulate", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# The malformed configs of the issue (all ended in tracebacks), then more of the same kind:
# each refused with its key, the value as given and what the key takes.
@pytest.mark.parametrize(
    "text, expected",
    [
        ('rate: "5"', "rate: got '5', expected a number > 0"),
        ('tp: "2"', "tp: got '2', expected an integer >= 1"),
        ('gpu_memory_utilization: "0.9"', "gpu_memory_utilization: got '0.9', expected a number"),
        ("num_requests: fifty", "num_requests: got 'fifty', expected an integer >= 1"),
        ("num_requests: 50.7", "num_requests: got 50.7, expected an integer >= 1"),
        ("instances: 2.5", "instances: got 2.5, expected an integer >= 1"),
        ("seed: abc", "seed: got 'abc', expected an integer >= 0"),
        ("policy: 42", "policy: got 42, expected a string"),
        ("goodput: ttft500", "goodput: 'ttft500' is not METRIC:MS"),
        ("runs: 5", "runs: got 5, expected a mapping of run names"),
        ("policy_params: [1, 2]", "policy_params: got [1, 2], expected a mapping"),
        ("tp: 0", "tp: got 0, expected an integer >= 1"),
        ("tp: true", "tp: got True, expected an integer"),
        ("gpu_memory_utilization: 1.5", "gpu_memory_utilization: got 1.5, expected a number > 0"),
        ("rate: .inf", "rate: got inf, expected a number > 0 (a finite one)"),
        ("cv: 0", "cv: got 0, expected a number > 0"),
        ("arrival: posson", "arrival: got 'posson', expected one of auto, trace, poisson"),
        ("sample: first", "sample: got 'first', expected one of head, random"),
        ("preemption: kill", "preemption: got 'kill', expected one of recompute, swap"),
        ('skip_invalid: "yes"', "skip_invalid: got 'yes', expected true or false"),
        ("goodput: {ttft: -5}", "goodput: got {'ttft': -5}, expected a mapping of ttft"),
        ("goodput: {ttfb: 500}", "goodput: got {'ttfb': 500}, expected a mapping of ttft"),
        ("tiers: {a: {share: 1.0}}", "tiers: got {'a': {'share': 1.0}}, expected a mapping"),
        ("tiers: {a: {share: 0.5, tbt: 0.1}}", "tiers: the shares must sum to 1, got 0.5"),
        ("answer_slo: {tpot: 0}", "answer_slo: got {'tpot': 0}, expected a mapping"),
        ("reasoning: {split: long}", "reasoning: got {'split': 'long'}, expected a mapping"),
        ("scores: 5", "scores: scores must be a mapping or a string, got 5"),
        ("latency: guess", "latency: latency must be roofline, calibrated or a calibration"),
        ("trace_format: csv", "trace_format: unknown trace format 'csv'"),
        ("policy: bogus", "policy: unknown policy 'bogus'"),
        ("router: closest", "router: unknown router 'closest'"),
        ("arrival: poisson", "arrival: poisson needs a rate"),
        ("runs: {a: {policy: bogus}}", "runs.a.policy: unknown policy 'bogus'"),
        ('runs: {a: {rate: "5"}}', "runs.a.rate: got '5', expected a number > 0"),
    ],
)
def test_a_wrong_value_names_the_file_key_value_and_expectation(tmp_path, capsys, text, expected):
    err = _refused(tmp_path, capsys, text + "\n")
    assert f"bad.yaml: {expected}" in err


def test_every_wrong_key_is_reported_at_once(tmp_path, capsys):
    err = _refused(tmp_path, capsys, 'rate: "5"\nnum_requests: fifty\npolicy: 42\n')
    assert "rate: got '5'" in err and "num_requests: got 'fifty'" in err and "policy: got 42" in err


def test_a_quoted_number_is_refused_everywhere_alike(tmp_path, capsys):
    """YAML, TOML and a run's overrides all refuse "5" for a number, and say why."""
    hint = "a quoted value is a string: write it without quotes"
    assert hint in _refused(tmp_path, capsys, 'rate: "5"\n')
    assert hint in _refused(tmp_path, capsys, 'rate = "5"\n', "bad.toml")
    assert hint in _refused(tmp_path, capsys, 'runs: {a: {rate: "5"}}\n')
    with pytest.raises(ConfigError, match=hint):
        load_config(rate="5")


def test_flags_go_through_the_same_checks(capsys):
    assert main(["simulate", "--rate", "0"]) == 2
    assert "rate: got 0.0, expected a number > 0" in capsys.readouterr().err
    assert main(["simulate", "--policy", "bogus"]) == 2
    assert "policy: unknown policy 'bogus'" in capsys.readouterr().err
    assert main(["simulate", "--goodput", "ttft:-1"]) == 2
    assert "goodput: got {'ttft': -1.0}" in capsys.readouterr().err
    assert main(["simulate", "--policy-param", "quantum"]) == 2
    assert "--policy-param: 'quantum' is not NAME=VALUE" in capsys.readouterr().err


def test_a_flag_overriding_a_bad_file_value_wins_and_is_not_blamed_on_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text('tp: "2"\nrate: 5\n')
    assert load_config(config, tp=1).tp == 1
    with pytest.raises(ConfigError) as err:
        load_config(config, rate=-1.0)
    assert err.value.problems == [
        "rate: got -1.0, expected a number > 0",
        f"{config}: tp: got '2', expected an integer >= 1 (a quoted value is a string: write it "
        "without quotes)",
    ]


def test_unknown_keys_suggest_the_closest_or_list_the_known(tmp_path):
    with pytest.raises(ConfigError, match=r"polcy: unknown key \(did you mean 'policy'\?\)"):
        load_config(polcy="fcfs")
    with pytest.raises(ConfigError, match=r"zzz: unknown key; known keys: trace, .*runs"):
        load_config(zzz=1)
    with pytest.raises(ConfigError, match=r"runs.a.polcy: unknown key \(did you mean"):
        load_config(runs={"a": {"polcy": "fcfs"}})


def test_the_flags_mini_languages_are_accepted_in_a_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("goodput: ttft:500 tpot:50\npolicy: rr\npolicy_params: quantum=64\n")
    cfg = load_config(config)
    assert cfg.goodput == {"ttft": 500.0, "tpot": 50.0}
    assert cfg.policy_params == {"quantum": 64}


def test_assignment_and_replace_are_checked_too():
    cfg = load_config()
    with pytest.raises(ValueError, match="tp"):
        cfg.tp = "2"
    with pytest.raises(ConfigError, match="instances: got 0"):
        cfg.replace(instances=0)
    cfg.goodput = {"ttft": 500.0}
    cfg.goodput["ttft"] = -1.0  # in place: not seen until checked again
    with pytest.raises(ConfigError, match="goodput: got"):
        cfg.validate()


# --- any wrong type, for any key ------------------------------------------------------------


def _accepted(name: str) -> set[type]:
    """The Python types a key takes (its values may still be refused for their range)."""
    annotation = SimulationConfig.model_fields[name].annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    accepted: set[type] = set()
    for t in typing.get_args(annotation) if union else (annotation,):
        if t is float:
            accepted |= {int, float}
        elif t is str or typing.get_origin(t) is typing.Literal:
            accepted.add(str)
        elif t is typing.Any:  # scores: a spec string or mapping, or none
            accepted |= {str, dict, type(None)}
        elif t is type(None) or t in (int, bool):
            accepted.add(t)
        else:  # dict[...] and the TypedDicts (tiers, answer_slo, reasoning)
            accepted.add(dict)
    if name in ("goodput", "policy_params"):  # the flags' forms: "ttft:500", "quantum=300"
        accepted.add(str)
    return accepted


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(SimulationConfig.model_fields)), value=VALUES)
def test_any_value_of_a_wrong_type_is_refused_naming_the_key(name, value):
    if type(value) in _accepted(name):
        return
    with pytest.raises(ConfigError) as err:
        SimulationConfig(**{name: value})
    assert err.value.problems[0].startswith(f"{name}: ")


# --- the configs that must keep loading ------------------------------------------------------


def test_the_default_config_loads_and_a_saved_run_repeats(tmp_path):
    assert load_config() == SimulationConfig()
    out = tmp_path / "run"
    assert main(["simulate", *SMALL, "--policy", "rr", "--out", str(out)]) == 0
    again = tmp_path / "again"
    assert main(["simulate", "--config", str(out / "config.yaml"), "--out", str(again)]) == 0
    assert (out / "summary.json").read_bytes() == (again / "summary.json").read_bytes()


@pytest.mark.parametrize(
    "path", sorted(ROOT.glob("configs/**/*.yaml")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_config_in_the_repository_loads(path):
    if set(yaml.safe_load(path.read_text())) <= {"base", "grid", "cells"}:
        pytest.skip("a sweep file (llmsched sweep), not a run's config")
    cfg = load_config(path)
    for name in cfg.runs or {}:
        assert cfg.variant(name).runs is None


# --- checks before any work (issue 17, item 6) ---------------------------------------------


def test_compare_refuses_an_unknown_policy_before_running_any(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *SMALL, "--policies", "fcfs,bogus", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "unknown policy 'bogus'" in captured.err
    assert "workload:" not in captured.out and not out.exists()


def test_compare_refuses_a_bad_run_parameter_before_running_any(tmp_path, capsys):
    config = tmp_path / "runs.yaml"
    config.write_text(
        "num_requests: 20\nrate: 5\nruns:\n  a: {policy: fcfs}\n"
        "  b: {policy: rr, policy_params: {quantums: 3}}\n"
    )
    assert main(["compare", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert "policy 'rr' takes no parameter(s) quantums" in captured.err
    assert "workload:" not in captured.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--slo", "p99_tbt<=tier"], "has 'tier' limits: the config needs tiers"),
        (["--slo", "p99_tbt<1s", "--policies", "fcfs,bogus"], "unknown policy 'bogus'"),
        (["--slo", "p99_tbt<1s", "--seeds", "0"], "capacity needs --seeds >= 1"),
        (["--slo", "p99_tbt<1s", "--arrival", "trace"], "not arrival: trace"),
        (["--slo", "p99_tbt<1s", "--model", "llama-9"], "unknown model 'llama-9'"),
    ],
)
def test_capacity_refuses_before_searching(argv, message, capsys):
    assert main(["capacity", "--num-requests", "20", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "searching" not in err


def test_an_unknown_model_is_refused_before_the_trace_is_read(tmp_path, capsys, monkeypatch):
    import llmsched.workload.readers as readers

    def unread(*args, **kwargs):
        raise AssertionError("the trace was read")

    monkeypatch.setattr(readers, "read_trace", unread)
    monkeypatch.setattr("llmsched.experiment.read_trace", unread)
    trace = tmp_path / "az.csv"
    trace.write_text(AZURE)
    assert main(["simulate", "--trace", str(trace), "--model", "llama-9"]) == 2
    assert "unknown model 'llama-9'" in capsys.readouterr().err
    assert main(["compare", "--trace", str(trace), "--policies", "fcfs", "--gpu", "b300"]) == 2
    assert "unknown GPU 'b300'" in capsys.readouterr().err


def test_trace_convert_checks_its_arguments_before_reading(tmp_path, capsys, monkeypatch):
    trace = tmp_path / "az.csv"
    trace.write_text(AZURE)
    out = tmp_path / "out.jsonl"
    assert main(["trace", "convert", str(trace), str(out)]) == 0
    written = out.read_bytes()
    monkeypatch.setattr(
        "llmsched.workload.readers.read_trace",
        lambda *a, **k: pytest.fail("the trace was read before the arguments were checked"),
    )
    capsys.readouterr()
    assert main(["trace", "convert", str(trace)]) == 2
    assert "needs an output path" in capsys.readouterr().err
    out.write_text("keep me\n")
    assert main(["trace", "convert", str(trace), str(out)]) == 2
    assert "exists: give --force to overwrite it" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"
    assert main(["trace", "convert", str(trace), str(trace), "--force"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main(["trace", "info", str(trace), str(out)]) == 2
    assert main(["trace", "convert", str(tmp_path / "none.csv"), str(out)]) == 2
    assert "trace file not found" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["trace", "convert", str(trace), str(out), "--force"]) == 0
    assert out.read_bytes() == written


def test_trace_not_found_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMSCHED_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--trace", "traces/nope.csv"]) == 2
    err = capsys.readouterr().err
    assert "trace file not found: traces/nope.csv" in err
    assert str(tmp_path / "traces/nope.csv") in err and "set by $LLMSCHED_DATA" in err
    monkeypatch.setenv("LLMSCHED_DATA", str(tmp_path / "missing"))
    assert main(["simulate", "--trace", "traces/nope.csv"]) == 2
    assert f"$LLMSCHED_DATA is {tmp_path / 'missing'}, which is not a folder" in (
        capsys.readouterr().err
    )


def test_a_rate_replacing_a_traces_timestamps_is_said_once(tmp_path, capsys):
    trace = tmp_path / "az.csv"
    trace.write_text(AZURE)
    note = "has timestamps of its own: rate 5 req/s replaces them with poisson arrivals"
    assert main(["compare", "--trace", str(trace), "--rate", "5", "--policies", "fcfs,sjf"]) == 0
    assert capsys.readouterr().err.count(note) == 1
    assert main(["simulate", "--trace", str(trace), "--rate", "5"]) == 0
    assert capsys.readouterr().err.count(note) == 1
    assert main(["simulate", "--trace", str(trace)]) == 0  # replayed: nothing to say
    assert "note:" not in capsys.readouterr().err
