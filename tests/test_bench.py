"""`llmsched bench`, the load client: against a real streaming server on loopback (tests/
openai_stub.py), its result against vLLM's own benchmark code, and its requests against
`llmsched simulate`'s.
"""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

pytest.importorskip("aiohttp", reason="the load client needs the bench extra (aiohttp)")

from llmsched.bench.client import RequestSpec  # noqa: E402
from llmsched.bench.run import bench, request_specs, send_all  # noqa: E402
from llmsched.cli import main  # noqa: E402
from llmsched.config import load_config  # noqa: E402
from llmsched.experiment import load_workload  # noqa: E402
from llmsched.metrics.fidelity import FIELDS, field_errors  # noqa: E402
from llmsched.metrics.vllm_bench import (  # noqa: E402
    DETAILED_FIELDS,
    Outcomes,
    bench_metrics,
    outcomes_from_result,
    read_result,
)

from .openai_stub import FAULT_IDS, StubServer  # noqa: E402

FAULT = {name: i for i, name in FAULT_IDS.items()}


@pytest.fixture(scope="module")
def stub():
    with StubServer() as server:
        yield server


def spec(i: int, fault: str | None = None, n: int = 5) -> RequestSpec:
    prompt = [FAULT[fault] if fault else 1000 + i, 1001, 1002]
    return RequestSpec(f"r{i}", prompt, max_tokens=n, prompt_len=3)


def test_every_request_is_accounted_for_and_faults_are_counted_failures(stub):
    """Good requests and faulty ones (HTTP 503, a stall past the timeout, a stream cut after
    two chunks, a chunk that is not JSON): one outcome each, in order, the faulty ones failed
    with what went wrong; the good ones with every token. No hang: the stall times out."""
    faults = [None, "error", None, "stall", "cut", None, "malformed", None]
    specs = [spec(i, f) for i, f in enumerate(faults)]
    outcomes, duration = asyncio.run(
        send_all(specs, np.zeros(len(specs)), stub.url + "/v1/completions", "m", timeout=2.0)
    )
    assert len(outcomes) == len(specs)
    for fault, out in zip(faults, outcomes):
        assert out.success is (fault is None), (fault, out.error)
        if fault is None:
            assert out.output_len == 5 and len(out.itl) == 4 and out.error == ""
            assert 0 < out.ttft <= out.latency
    errors = {f: o.error for f, o in zip(faults, outcomes) if f}
    assert errors["error"].startswith("HTTP 503")
    assert "timed out after 2 s" in errors["stall"]
    assert "before [DONE] after 2 chunks" in errors["cut"] or "after 2 chunks" in errors["cut"]
    assert "JSONDecodeError" in errors["malformed"]
    assert 2.0 <= duration < 30


def test_requests_carry_lengths_priority_and_llmsched_data(stub):
    cfg = load_config(None, num_requests=12, rate=50.0, seed=3, scores="oracle", tbt=0.1)
    workload = load_workload(cfg)
    result = bench(workload, stub.url, seed=3, prompts="ids", request_rate=cfg.rate)
    bodies = {json.dumps(b["prompt"]): b for b in stub.bodies[-12:]}
    c = workload.columns
    specs = request_specs(workload, 3)
    for i, s in enumerate(specs):
        body = bodies[json.dumps(s.prompt)]
        assert len(body["prompt"]) == c["prompt_tokens"][i]
        assert body["max_tokens"] == c["output_tokens"][i]
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["vllm_xargs"] == {"score": float(c["score"][i]), "tbt": 0.1}
    assert result["input_lens"] == c["prompt_tokens"].tolist()
    assert result["output_lens"] == c["output_tokens"].tolist()
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["num_prompts"] == 12 and result["request_rate"] == 50.0
    assert result["errors"] == [""] * 12
    # Prompts are random ids: no two share a first block (no prefix-cache hit between them).
    assert len({tuple(s.prompt[:16]) for s in specs}) == len(specs)


def test_chat_endpoint_sends_text_and_streams_deltas(stub):
    cfg = load_config(None, num_requests=3, rate=100.0, seed=0)
    result = bench(load_workload(cfg), stub.url, chat=True)
    body = stub.bodies[-1]
    assert body["messages"][0]["role"] == "user" and isinstance(body["messages"][0]["content"], str)
    assert result["completed"] == 3 and result["backend"] == "openai-chat"
    assert all(t.startswith("w0 w1") for t in result["generated_texts"])


def test_bench_command_writes_vllm_bench_json(stub, tmp_path):
    out = tmp_path / "real.json"
    code = main(
        ["bench", "--url", stub.url, "--rate", "40", "--num-requests", "5", "--seed", "1",
         "--goodput", "ttft:1000", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    for key in ("date", "backend", "model_id", "num_prompts", "request_rate", "burstiness",
                "max_concurrency", "duration", "completed", "failed", "request_goodput",
                "max_output_tokens_per_s", "max_concurrent_requests", "input_lens",
                "output_lens", "ttfts", "itls", "latencies", "start_times", "errors",
                "mean_ttft_ms", "p99_itl_ms", "median_e2el_ms"):  # fmt: skip
        assert key in result, key
    assert result["model_id"] == "stub-model" and result["completed"] == 5


def test_bench_refuses_a_bad_out_path_before_sending(stub, capsys):
    assert main(["bench", "--url", stub.url, "--rate", "1", "--out", "x.csv"]) == 2
    assert "FILE.json" in capsys.readouterr().err


def test_simulate_and_bench_generate_the_same_requests(stub, tmp_path, capsys):
    """One seed, one set of flags: the requests `simulate` simulates are those `bench` sends
    (lengths and arrival order), and their per-request arrays line up."""
    flags = ["--num-requests", "20", "--rate", "30", "--seed", "7", "--cv", "2"]
    assert main(["simulate", *flags, "--out", str(tmp_path / "sim"), "--save-detailed"]) == 0
    assert main(["bench", "--url", stub.url, *flags, "--out", str(tmp_path / "real.json")]) == 0
    # One reader for both: a simulate folder and a bench file.
    sim, real = read_result(tmp_path / "sim"), read_result(tmp_path / "real.json")
    for result in (sim, real):
        assert set(DETAILED_FIELDS) <= set(result)
        assert len(outcomes_from_result(result)) == 20
    assert sim["input_lens"] == real["input_lens"]
    assert sim["output_lens"] == real["output_lens"]
    assert sim["burstiness"] == real["burstiness"] == 0.25  # cv 2
    assert sim["num_prompts"] == real["num_prompts"] == 20
    gaps_sim = np.diff(sim["start_times"])
    assert np.all(gaps_sim >= 0)  # arrival order
    shared = set(sim) & set(real)
    assert {"mean_ttft_ms", "p99_e2el_ms", "max_concurrent_requests", "itls"} <= shared
    # ... and `llmsched fidelity` compares them on every field it knows
    assert {e.field for e in field_errors([real], sim)} == set(FIELDS)
    real_json, sim_dir = str(tmp_path / "real.json"), str(tmp_path / "sim")
    assert main(["fidelity", "--real", real_json, "--sim", sim_dir]) == 0
    assert "median_ttft_ms" in capsys.readouterr().out


def test_metrics_equal_vllms_own_benchmark_code():
    """The same per-request data through vLLM's `calculate_metrics` and through llmsched's:
    every aggregate field equal (vLLM's module is installed with vLLM)."""
    serve = pytest.importorskip("vllm.benchmarks.serve", reason="needs vLLM (make test)")
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

    rng = np.random.default_rng(0)
    outputs, raw = [], []
    for i in range(40):
        ok = i % 7 != 3
        n = int(rng.integers(1, 30))
        itl = rng.exponential(0.03, n - 1).tolist() if ok else []
        ttft = float(rng.exponential(0.5)) if ok else 0.0
        start = float(rng.uniform(0, 20))
        latency = ttft + sum(itl) if ok else 0.0
        outputs.append(
            RequestFuncOutput(
                success=ok, latency=latency, output_tokens=n if ok else 0, ttft=ttft, itl=itl,
                prompt_len=int(rng.integers(1, 500)), start_time=start,
                error="" if ok else "HTTP 500",
            )
        )  # fmt: skip
        raw.append(outputs[-1])
    percentiles = [50, 90, 95, 99]
    goodput = {"ttft": 600.0, "tpot": 40.0}
    duration = 25.0
    metrics, output_lens = serve.calculate_metrics(
        input_requests=[], outputs=outputs, dur_s=duration, tokenizer=None,
        selected_percentiles=percentiles, goodput_config_dict=goodput,
    )  # fmt: skip
    ours = bench_metrics(
        Outcomes(
            success=np.array([o.success for o in raw]),
            input_lens=np.array([o.prompt_len for o in raw]),
            output_lens=np.array([o.output_tokens for o in raw]),
            ttfts=np.array([o.ttft if o.success else math.nan for o in raw]),
            latencies=np.array([o.latency if o.success else math.nan for o in raw]),
            start_times=np.array([o.start_time for o in raw]),
            itls=[np.array(o.itl) for o in raw],
            errors=[o.error for o in raw],
        ),
        duration,
        goodput,
        percentiles,
    )
    assert ours["completed"] == metrics.completed and ours["failed"] == metrics.failed
    assert ours["total_input_tokens"] == metrics.total_input
    assert ours["total_output_tokens"] == metrics.total_output == sum(output_lens)
    for key in ("request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput", "max_output_tokens_per_s"):  # fmt: skip
        assert ours[key] == pytest.approx(getattr(metrics, key), rel=1e-12), key
    assert ours["max_concurrent_requests"] == metrics.max_concurrent_requests
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std"):
            key = f"{stat}_{name}_ms"
            assert ours[key] == pytest.approx(getattr(metrics, key), rel=1e-9), key
        for p, value in getattr(metrics, f"percentiles_{name}_ms"):
            key = f"median_{name}_ms" if p == 50 else f"p{p}_{name}_ms"  # one spelling
            assert ours[key] == pytest.approx(value, rel=1e-9), (name, p)
        assert f"p50_{name}_ms" not in ours


def test_an_unreachable_server_is_a_clear_error(tmp_path, capsys):
    import socket

    from llmsched.cli import main

    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        code = main(["bench", "--url", url, "--num-requests", "2", "--rate", "1",
                     "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert code == 2 and f"cannot reach {url}" in capsys.readouterr().err
