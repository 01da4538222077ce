"""The command line and the experiment runner, end to end on small runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from llmsched.cli import main
from llmsched.config import load_config
from llmsched.experiment import simulate

SMALL = ["--num-requests", "150", "--rate", "6"]


def test_simulate_writes_summary_requests_and_resolved_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", *SMALL, "--policy", "sarathi", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] + summary["failed"] == 150
    for field in ("request_throughput", "mean_ttft_ms", "p99_tpot_ms", "median_itl_ms"):
        assert field in summary
    with open(out / "requests.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 150
    config = (out / "config.yaml").read_text()
    assert "policy: sarathi" in config and "max_num_batched_tokens: 512" in config
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_same_seed_gives_byte_identical_summary(tmp_path):
    for name in ("a", "b"):
        main(["simulate", *SMALL, "--policy", "rr", "--seed", "3", "--out", str(tmp_path / name)])
    assert (tmp_path / "a/summary.json").read_bytes() == (tmp_path / "b/summary.json").read_bytes()
    assert (tmp_path / "a/requests.csv").read_bytes() == (tmp_path / "b/requests.csv").read_bytes()
    main(["simulate", *SMALL, "--policy", "rr", "--seed", "4", "--out", str(tmp_path / "c")])
    assert (tmp_path / "a/summary.json").read_bytes() != (tmp_path / "c/summary.json").read_bytes()


def test_compare_runs_every_policy_on_the_identical_workload(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *SMALL, "--policies", "fcfs,sjf", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "fcfs" in table and "sjf" in table
    assert (out / "latency_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arrivals = {}
    for name in ("fcfs", "sjf"):
        with open(out / name / "requests.csv") as fh:
            arrivals[name] = sorted((r["request_id"], r["arrival_s"]) for r in csv.DictReader(fh))
    assert arrivals["fcfs"] == arrivals["sjf"]


def test_max_concurrency_is_the_clients_as_in_vllm_bench(tmp_path):
    """One request in flight at a time: never two at once, each timed from its sending (so
    no queueing in the engine), and the run takes longer than with an open loop."""
    for name, extra in (("open", []), ("one", ["--max-concurrency", "1"])):
        main(["simulate", *SMALL, "--seed", "1", *extra, "--save-detailed",
              "--out", str(tmp_path / name)])  # fmt: skip
    open_, one = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("open", "one"))
    assert one["max_concurrency"] == 1 and open_["max_concurrency"] is None
    assert one["peak_concurrent_requests"] == 1 < open_["peak_concurrent_requests"]
    assert one["completed"] == open_["completed"]
    assert one["duration"] > open_["duration"]
    assert one["p99_queue_time_ms"] < 1e-6
    # vLLM's queue_times: what each waited for the client's limit (here most of them)
    assert not any(open_["queue_times"]) and np.count_nonzero(one["queue_times"]) > 100
    sent = np.array(one["start_times"])
    assert np.all(np.diff(sent) >= 0)
    np.testing.assert_allclose(sent - one["queue_times"], open_["start_times"], atol=1e-9)


def test_goodput_and_config_file_with_flag_override(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('policy = "fcfs"\nnum-requests = 80\nrate = 4.0\n[goodput]\nttft = 1e9\n')
    cfg = load_config(config, policy="sjf")
    assert cfg.policy == "sjf" and cfg.num_requests == 80
    result = simulate(cfg)
    # Every finished request meets a 1e9 ms TTFT SLO: goodput equals throughput.
    assert result.summary["request_goodput"] == pytest.approx(result.summary["request_throughput"])
    # ... and the SLO attainment, judged against the goodput SLOs, is complete
    assert result.summary["slo_requests"] == result.summary["completed"] > 0
    assert result.summary["slo_attainment"] == 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--policy", "nope"], "unknown policy 'nope'"),
        (["simulate", "--model", "llama-9"], "llama-9"),
        (["simulate", "--model", "llama-2-70b", "--tp", "1"], "tp=2 fits"),
        (["simulate", "--trace", "/no/such/trace.csv"], "/no/such/trace.csv"),
        (["simulate", "--rate", "-1"], "rate: got -1.0, expected a number > 0"),
        (["simulate", "--max-concurrency", "0"], "max_concurrency: got 0, expected an integer"),
        (["simulate", "--goodput", "ttft500"], "METRIC:MS"),
        (["simulate", "--policy", "vllm-v0", "--max-num-batched-tokens", "512"], "chunked"),
    ],
)
def test_bad_input_gets_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_config_key_suggests_the_right_one(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("polcy: fcfs\n")
    with pytest.raises(ValueError, match="did you mean 'policy'"):
        load_config(config)


def test_requests_too_long_for_the_kv_cache_are_rejected_and_reported(tmp_path):
    result = simulate(load_config(num_requests=50, rate=5.0, num_blocks=200))
    s = result.summary
    assert s["failed"] > 0 and s["completed"] + s["failed"] == 50
    assert any("KV cache is too small" in reason for reason in s["rejected_reasons"])


def test_trace_convert_round_trips(tmp_path):
    src = tmp_path / "lengths.csv"
    src.write_text("num_prefill_tokens,num_decode_tokens\n10,5\n20,7\n")
    dst = tmp_path / "out.jsonl"
    assert main(["trace", "convert", str(src), str(dst)]) == 0
    assert main(["trace", "info", str(dst)]) == 0
    from llmsched.workload.readers import read_trace

    w = read_trace(dst)
    assert list(w.columns["prompt_tokens"]) == [10, 20] and not w.timed


def test_list_names_every_policy(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "fcfs",
        "priority",
        "sarathi",
        "sarathi-spf",
        "vllm-v0",
        "rr",
        "sjf",
        "srpt",
        "slai",
        "rad",
        "least-kv",
    ):
        assert name in out


def test_real_azure_trace_end_to_end(tmp_path):
    """The foundation benchmark's setting on the first 500 requests of the real trace."""
    from llmsched.data import data_dir

    root = data_dir()
    if root is None:
        pytest.skip("shared data not found: set LLMSCHED_DATA to run this test")
    trace = root / "traces/azure2023/AzureLLMInferenceTrace_conv.csv"
    out = tmp_path / "azure"
    argv = [
        "simulate",
        "--trace",
        str(trace),
        "--num-requests",
        "500",
        "--model",
        "meta-llama/Llama-2-70b-hf",
        "--gpu",
        "a100-80gb",
        "--tp",
        "2",
        "--instances",
        "8",
        "--policy",
        "sarathi",
        "--seed",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    # Llama-2-70B's context is 4096 tokens: longer requests are rejected, with the reason.
    assert summary["completed"] + summary["failed"] == 500
    assert list(summary["rejected_reasons"]) == [
        "prompt + output exceeds max_model_len (4096 tokens)"
    ]
    assert 0 < summary["median_ttft_ms"] < summary["p99_ttft_ms"]
    # Replayed arrivals: the first 500 requests span about 90 s of the trace.
    assert 60 < summary["duration"] < 300


def test_policy_params_and_per_request_gaps(tmp_path):
    import numpy as np

    out = tmp_path / "rr"
    argv = [
        "simulate",
        *SMALL,
        "--policy",
        "rr",
        "--policy-param",
        "quantum=7",
        "--save-gaps",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "quantum: 7" in (out / "config.yaml").read_text()
    saved = np.load(out / "itl.npz")
    offsets, gaps = saved["offsets"], saved["gaps_s"]
    with open(out / "requests.csv") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        mine = gaps[offsets[i] : offsets[i + 1]]
        if row["status"] == "finished" and int(row["output_tokens"]) > 1:
            # the gaps of a request add up to its time from first to last token
            span = float(row["finish_s"]) - float(row["first_token_s"])
            assert abs(mine.sum() - span) < 1e-4 * max(span, 1)
            assert abs(mine.max() - float(row["max_gap_s"])) < 1e-6
    assert main(["simulate", "--policy", "rr", "--policy-param", "quantum"]) == 2
    assert main(["simulate", "--policy", "rr", "--policy-param", "quantums=3"]) == 2


def test_calibrated_latency_and_fidelity_report(tmp_path, capsys):
    """`--latency calibrated` runs with the stored A100 fit; `fidelity` reports on profiles."""
    out = tmp_path / "cal"
    assert main(["simulate", *SMALL, "--latency", "calibrated", "--out", str(out)]) == 0
    assert "latency: calibrated" in (out / "config.yaml").read_text()
    roofline = tmp_path / "roof"
    assert main(["simulate", *SMALL, "--out", str(roofline)]) == 0
    calibrated = json.loads((out / "summary.json").read_text())
    default = json.loads((roofline / "summary.json").read_text())
    assert calibrated["mean_tpot_ms"] != default["mean_tpot_ms"]  # the model really changed
    assert main(["simulate", "--latency", "guess"]) == 2  # neither a model nor a file
    assert "latency must be roofline, calibrated or a calibration file" in capsys.readouterr().err

    from llmsched.data import data_dir

    if data_dir() is None:
        pytest.skip("shared data not found: set LLMSCHED_DATA for the fidelity report")
    png = tmp_path / "fidelity.png"
    assert main(["fidelity", "profiles/vidur", "--plot", str(png)]) == 0
    report = capsys.readouterr().out
    assert "decoder layer" in report and png.read_bytes()[:4] == b"\x89PNG"


def test_compare_runs_the_configs_named_runs_with_their_routers(tmp_path, capsys):
    """A config's `runs` are what compare runs without --policies; each run's router and its
    parameters apply; a run with an unknown key or router parameter is refused clearly."""
    config = tmp_path / "runs.yaml"
    config.write_text(
        "num_requests: 60\nrate: 4\ninstances: 2\n"
        "runs:\n  base: {policy: fcfs}\n"
        "  phased: {policy: pascal, router: pascal, router_params: {migration: never}}\n"
    )
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), "--out", str(out)]) == 0
    assert {"base", "phased"} <= set(capsys.readouterr().out.split())
    saved = (out / "phased" / "config.yaml").read_text()
    assert "policy: pascal" in saved and "migration: never" in saved
    assert "router: round-robin" in (out / "base" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="unknown key"):
        load_config(config, runs={"bad": {"polcy": "fcfs"}})
    bad = load_config(config, runs={"bad": {"router": "pascal", "router_params": {"mig": 1}}})
    with pytest.raises(ValueError, match="router 'pascal' takes no parameter"):
        simulate(bad.variant("bad"))


def test_router_help_names_every_registered_router():
    from llmsched.cli import ROUTER_HELP
    from llmsched.policies import ROUTERS

    named = {name.strip() for name in ROUTER_HELP.split("(")[0].split(",")}
    assert named == set(ROUTERS)


@pytest.mark.parametrize("command", ["simulate", "compare", "capacity"])
def test_only_the_demo_writes_to_runs_demo_by_default(command):
    from llmsched.cli import build_parser

    extra = ["--slo", "median_ttft<1s"] if command == "capacity" else []
    assert build_parser().parse_args([command, *extra]).out is None


def test_trace_formats_offered_are_the_readers_and_alpaca_eval():
    from llmsched.cli import TRACE_FORMATS
    from llmsched.workload.readers import FORMATS

    assert TRACE_FORMATS == (*FORMATS, "alpaca_eval")


def test_list_shows_each_description_whole():
    from llmsched.policies import INSTANCE_POLICIES, ROUTERS
    from llmsched.policies.base import describe

    for cls in [*INSTANCE_POLICIES.values(), *ROUTERS.values()]:
        assert describe(cls).endswith((".", ")")), cls


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("llmsched ")
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: llama-3-8b)" in out and "default: 0" in out  # from the config's defaults


@pytest.mark.parametrize("flag", [["--rate", "5"], ["--save-gaps"], ["--goodput", "ttft:500"]])
def test_capacity_refuses_flags_that_would_do_nothing(flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["capacity", "--slo", "median_ttft<1s", *flag])
    assert e.value.code == 2 and flag[0] in capsys.readouterr().err


def test_trace_info_gives_length_percentiles_span_and_rate(tmp_path, capsys):
    """Eleven requests 2 s apart, prompts 100..1100 tokens: a span of 20 s, 0.5 req/s, evenly
    spaced (CV 0), and the prompt lengths' mean, median and maximum."""
    trace = tmp_path / "t.jsonl"
    rows = [
        {
            "request_id": str(i),
            "arrival": 2.0 * i,
            "prompt_tokens": 100 * (i + 1),
            "output_tokens": 7,
        }
        for i in range(11)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["trace", "info", str(trace)]) == 0
    out = capsys.readouterr().out
    prompt = next(line for line in out.splitlines() if line.startswith("prompt_tokens"))
    mean, median, p90, p99, most = map(float, prompt.split()[1:])
    assert (mean, median, p90, most) == (600, 600, 1000, 1100)
    assert "20.0 s from the first to the last, 0.5 req/s on average (CV of the gaps 0.00" in out
