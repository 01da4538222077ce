"""The emulated engine (`llmsched serve engine`) as a real process on loopback: the OpenAI
surface, its checked text, continuations, faults, metrics, and latencies that agree with
`llmsched simulate` on the same workload."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from llmsched.integrations.process import ServerProcess
from llmsched.integrations.serve.faults import FaultPlan, parse_fault, parse_rates
from llmsched.integrations.serve.protocol import BadRequest, parse_completion, trailing_output

MODEL = "llama-3-8b"
ENGINE = ["-m", "llmsched.integrations.serve.engine", "--model", MODEL, "--gpu", "a100-80gb"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """One engine for the module: 10x real time, a 1-sequence engine's queue for the 429 test
    lives in its own fixture."""
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    with ServerProcess([*ENGINE, "--time-scale", "10", "--stall-seconds", "1"], log=log) as s:
        yield s


def post(url: str, body: dict, headers: dict | None = None, timeout: float = 60):
    """(status, SSE events or JSON body, whether the stream ended with [DONE], error)."""

    async def go():
        events, done, error = [], False, ""
        async with aiohttp.ClientSession() as session:
            try:
                async with asyncio.timeout(timeout):
                    async with session.post(url, json=body, headers=headers) as r:
                        if not body.get("stream"):
                            return r.status, await r.json(), False, ""
                        async for line in r.content:
                            line = line.strip()
                            if not line.startswith(b"data:"):
                                continue
                            data = line[5:].strip()
                            if data == b"[DONE]":
                                done = True
                            else:
                                events.append(data)
            except (aiohttp.ClientError, TimeoutError) as e:
                error = type(e).__name__
        return 200, events, done, error

    return asyncio.run(go())


def words(events: list[bytes], field: str = "text") -> list[str]:
    out = []
    for e in events:
        chunk = json.loads(e)
        for c in chunk["choices"]:
            text = c.get("text") if "text" in c else (c["delta"].get(field) or "")
            out += (text or "").split()
    return out


def test_completion_streams_every_token_then_usage_and_done(engine):
    body = {"model": MODEL, "prompt": [11, 12, 13, 14], "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    status, events, done, _ = post(engine.url + "/v1/completions", body)
    assert status == 200 and done
    assert words(events) == [f"t{k}" for k in range(7)]
    usage = json.loads(events[-1])["usage"]
    assert usage["prompt_tokens"] == 4 and usage["completion_tokens"] == 7
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_chat_reasoning_comes_before_content_and_think_end_in_neither(engine):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "why is the sky blue"}],
            "stream": True, "stream_options": {"include_usage": True},
            "vllm_xargs": {"output_tokens": 9, "reasoning_tokens": 4}}  # fmt: skip
    _, events, done, _ = post(engine.url + "/v1/chat/completions", body)
    assert done
    assert words(events, "reasoning_content") == ["t0", "t1", "t2"]
    assert words(events, "content") == ["t4", "t5", "t6", "t7", "t8"]
    first = json.loads(events[0])["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert json.loads(events[-1])["usage"]["completion_tokens"] == 9  # </think> counted
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"


def test_a_continuation_numbers_on_from_the_partial_assistant_message(engine):
    body = {"model": MODEL, "continue_final_message": True, "add_generation_prompt": False,
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "t0 t1 </think> t3"}],
            "vllm_xargs": {"output_tokens": 6, "reasoning_tokens": 3}}  # fmt: skip
    status, reply, _, _ = post(engine.url + "/v1/chat/completions", body)
    assert status == 200
    assert reply["choices"][0]["message"]["content"].split() == ["t4", "t5"]
    assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                              "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def test_token_ids_continue_a_completion_prompt(engine):
    body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 3, "return_token_ids": True}
    _, reply, _, _ = post(engine.url + "/v1/completions", body)
    ids = reply["choices"][0]["token_ids"]
    body = {"model": MODEL, "prompt": [5, 6, *ids], "max_tokens": 2}
    _, reply, _, _ = post(engine.url + "/v1/completions", body)
    assert reply["choices"][0]["text"].split() == ["t3", "t4"]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"model": MODEL}, "'prompt' must be"),
        ({"model": MODEL, "prompt": "a", "max_tokens": 0}, "'max_tokens' must be"),
        ({"model": MODEL, "prompt": "a", "vllm_xargs": {"output_tokens": "x"}}, "output_tokens"),
        (
            {
                "model": MODEL,
                "prompt": "a",
                "vllm_xargs": {"output_tokens": 3, "reasoning_tokens": 3},
            },
            "leaves no answer token",
        ),  # fmt: skip
        ({"model": "other", "prompt": "a"}, "does not exist"),
        ({"model": MODEL, "prompt": [1] * 9000, "max_tokens": 2}, "max_model_len"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(engine, body, message):
    status, reply, _, _ = post(engine.url + "/v1/completions", body)
    assert status in (400, 404)
    assert message in reply["error"]["message"]


def test_injected_http_error(engine):
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 3}
    status, reply, _, _ = post(
        engine.url + "/v1/completions", body, {"X-Llmsched-Fault": "error:503"}
    )
    assert status == 503 and "injected" in reply["error"]["message"]


@pytest.mark.parametrize("fault", ["cut:3", "stall:3"])
def test_a_cut_or_stalled_stream_ends_without_done_after_its_tokens(engine, fault):
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 8, "stream": True}
    _, events, done, _ = post(engine.url + "/v1/completions", body, {"X-Llmsched-Fault": fault})
    assert not done
    assert words(events) == ["t0", "t1", "t2"]


def test_a_malformed_chunk_in_an_otherwise_whole_stream(engine):
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 6, "stream": True}
    _, events, done, _ = post(
        engine.url + "/v1/completions", body, {"X-Llmsched-Fault": "malformed:2"}
    )
    assert done
    bad = [e for e in events if not _is_json(e)]
    assert len(bad) == 1
    assert words([e for e in events if _is_json(e)]) == [f"t{k}" for k in range(6)]


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return response.read().decode()


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples whose line starts with `name`."""
    text = scrape(url)
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and ("{" in name or line[len(name)] in "{ "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_have_vllms_names_and_count_the_requests(engine):
    before = metric(engine.url, "vllm:request_success_total")
    post(engine.url + "/v1/completions", {"model": MODEL, "prompt": "a b c", "max_tokens": 4})
    assert metric(engine.url, "vllm:request_success_total") == before + 1
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count"):  # fmt: skip
        text = scrape(engine.url)
        assert re.search("^" + re.escape(name) + r"[{ ]", text, re.M), name
    assert metric(engine.url, "vllm:num_requests_running") == 0
    assert metric(engine.url, "vllm:kv_cache_usage_perc") == 0  # every block back


def test_a_client_that_goes_away_frees_its_kv(engine):
    """Cut streams (above) and this hang-up leave nothing running and every block free."""
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 4000, "stream": True}
    post(engine.url + "/v1/completions", body, timeout=0.5)  # hangs up after half a second
    deadline = time.monotonic() + 30
    while metric(engine.url, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(engine.url, "vllm:num_requests_running") == 0
    assert metric(engine.url, "vllm:kv_cache_usage_perc") == 0
    assert metric(engine.url, 'vllm:request_success_total{engine="0",finished_reason="abort"') >= 1


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    argv = [*ENGINE, "--max-num-seqs", "1", "--max-waiting", "1", "--time-scale", "5"]
    with ServerProcess(argv, log=tmp_path / "engine.log") as server:
        long = {"model": MODEL, "prompt": "a b", "max_tokens": 3000, "stream": True}

        async def go():
            async with aiohttp.ClientSession() as session:
                streams = [await session.post(server.url + "/v1/completions", json=long)
                           for _ in range(2)]  # fmt: skip
                while metric(server.url, "vllm:num_requests_waiting") < 1:
                    await asyncio.sleep(0.1)
                async with session.post(server.url + "/v1/completions", json=long) as third:
                    result = third.status, third.headers.get("Retry-After"), await third.json()
                for s in streams:
                    s.close()
                return result

        status, retry_after, reply = asyncio.run(go())
    assert status == 429 and retry_after == "1"
    assert "waiting queue is full" in reply["error"]["message"]


# --- the pieces, without a server ------------------------------------------------------------
def test_trailing_output_counts_the_output_words_at_the_end():
    assert trailing_output("hello t0 t1 </think> t3".split()) == 4
    assert trailing_output("t0 hello".split()) == 0
    assert trailing_output([5, 6, 999_999, 1_000_001]) == 2


def test_parse_completion_refuses_a_continuation_with_a_generation_prompt():
    body = {"model": "m", "continue_final_message": True,
            "messages": [{"role": "assistant", "content": "t0"}]}  # fmt: skip
    with pytest.raises(BadRequest, match="add_generation_prompt: false"):
        parse_completion(body, chat=True)


def test_fault_specs_are_checked():
    assert parse_fault("cut:3").at == 3 and parse_fault("stall").at is None
    with pytest.raises(ValueError, match="unknown fault"):
        parse_fault("explode")
    with pytest.raises(ValueError, match="400-599"):
        parse_fault("error:200")
    with pytest.raises(ValueError, match="more than 1"):
        parse_rates(["cut=0.7", "stall=0.6"])
    plan = FaultPlan(parse_rates(["cut=0.5"]), seed=1)
    drawn = [plan.draw(None) for _ in range(400)]
    assert 150 < sum(f is not None for f in drawn) < 250


def test_bad_engine_flags_fail_with_a_message():
    argv = [sys.executable, *ENGINE, "--fault", "cut=2"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--fault cut=2" in run.stderr


def test_latencies_through_http_agree_with_simulate(tmp_path):
    """The same workload (same flags, same seed) sent by `llmsched bench` to an engine running
    in real time, and simulated by `llmsched simulate`. The engine's clock is the simulator's,
    so what differs is only what HTTP adds: the client's send jitter, and the time a token
    takes from the simulated engine through the event loop and the socket (measured: 2-7 ms
    per request on this 2-core machine). Tolerance: mean and median E2E within 5 %, mean
    TTFT within 10 % + 30 ms (TTFTs are ~0.1 s, so the fixed part of HTTP weighs on them)."""
    from llmsched.bench.run import bench
    from llmsched.config import load_config
    from llmsched.experiment import load_workload, simulate

    cfg = load_config(None, num_requests=30, rate=4.0, seed=3, model=MODEL, gpu="a100-80gb")
    workload = load_workload(cfg)
    sim = simulate(cfg, workload).summary
    with ServerProcess(ENGINE, log=tmp_path / "engine.log") as server:
        real = bench(workload, server.url, seed=cfg.seed)
    for key in ("mean_ttft_ms", "mean_e2el_ms", "median_e2el_ms"):  # shown with pytest -s
        print(f"{key}: HTTP {real[key]:.1f} against simulated {sim[key]:.1f}")
    assert real["completed"] == sim["completed"] == 30
    assert real["total_output_tokens"] == sim["total_output_tokens"]
    for key in ("mean_e2el_ms", "median_e2el_ms"):
        assert real[key] == pytest.approx(sim[key], rel=0.05), key
    assert abs(real["mean_ttft_ms"] - sim["mean_ttft_ms"]) <= 0.10 * sim["mean_ttft_ms"] + 30


def test_a_shared_prompt_prefix_hits_the_prefix_cache_as_vllm_counts_it(engine):
    """Two prompts that begin with the same 48 words: the second finds the first's three full
    16-token blocks (vLLM's block size) cached; a 32-word prompt sent twice hits 16 tokens, as
    vLLM caps the hit below the whole prompt; the counters count tokens at each lookup."""
    shared = [f"w{i}" for i in range(48)]
    queries = metric(engine.url, "vllm:prefix_cache_queries_total")
    hits = metric(engine.url, "vllm:prefix_cache_hits_total")

    def cached(prompt: list[str]) -> int:
        body = {"model": MODEL, "prompt": " ".join(prompt), "max_tokens": 2}
        status, reply, _, _ = post(engine.url + "/v1/completions", body)
        assert status == 200
        return reply["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached([*shared, "a", "b"]) == 0
    assert cached([*shared, "c", "d", "e"]) == 48
    assert cached(shared[:32]) == 16  # its two blocks are cached; the last must be computed
    assert metric(engine.url, "vllm:prefix_cache_queries_total") - queries == 50 + 51 + 32
    assert metric(engine.url, "vllm:prefix_cache_hits_total") - hits == 48 + 16
