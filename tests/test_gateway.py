"""The gateway (`llmsched serve gateway`) as a real process in front of real emulated engines
(`llmsched serve engine`) on loopback: routing, retries, failover with a continuous stream,
PASCAL migration, prefix affinity, SLO admission, PARS priorities, health and circuit breaking;
and its pieces (breaker, metric parsing, prefix index, estimator, view, router) alone.

The engine's text is checkable (output token k is the word `t{k}`, protocol.py), so every test
asserts that what the client received is exactly the request's output: no token lost, none
twice, one usage chunk that adds up, one `[DONE]`. Outcomes are asserted, never durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from llmsched.engine.state import RequestState
from llmsched.integrations.process import ServerProcess, free_port
from llmsched.integrations.serve.backends import (
    Backend,
    Breaker,
    Circuit,
    TtftEstimator,
    check_url,
    parse_metrics,
)
from llmsched.integrations.serve.gateway import main as gateway_main
from llmsched.integrations.serve.view import (
    BLOCK,
    GatewayView,
    Mirrors,
    PrefixIndex,
    ProxiedState,
    block_hashes,
)
from llmsched.policies import ROUTERS, router_class
from llmsched.workload.request import Request

MODEL = "llama-3-8b"
ENGINE = ["-m", "llmsched.integrations.serve.engine", "--model", MODEL, "--gpu", "a100-80gb",
          "--policy", "fcfs"]  # fmt: skip
GATEWAY = ["-m", "llmsched.integrations.serve.gateway", "--log-level", "warning"]
LONG = 120.0  # seconds a test waits for anything at most (the machine is shared and slow)


# --- processes ---------------------------------------------------------------------------------
def start_engine(stack: contextlib.ExitStack, log_dir, name: str, *flags: str) -> ServerProcess:
    argv = [*ENGINE, "--time-scale", "20", "--stall-seconds", "20", *flags]
    return stack.enter_context(ServerProcess(argv, log=log_dir / f"{name}.log"))


def start_gateway(stack, log_dir, name: str, urls: list[str], *flags: str) -> ServerProcess:
    argv = [*GATEWAY, "--backends", ",".join(urls), *flags]
    return stack.enter_context(ServerProcess(argv, log=log_dir / f"{name}.log"))


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def engines(logs):
    """Three emulated engines at 20x real time; a `stall` fault stays silent for 20 s."""
    with contextlib.ExitStack() as stack:
        yield [start_engine(stack, logs, f"engine{i}") for i in range(3)]


@pytest.fixture(scope="module")
def gateway(engines, logs):
    """Round-robin over the three engines; a stream silent for 2 s has stalled."""
    with contextlib.ExitStack() as stack:
        yield start_gateway(stack, logs, "gateway", [e.url for e in engines],
                            "--stall-timeout", "2", "--first-byte-timeout", "30")  # fmt: skip


# --- a client that keeps everything it receives ------------------------------------------------
@dataclass
class Reply:
    status: int
    events: list[dict] = field(default_factory=list)  # the SSE data objects, in order
    done: int = 0  # how many `[DONE]`s
    body: dict | None = None  # a JSON (non-streamed) answer
    headers: dict = field(default_factory=dict)

    @property
    def chunks(self) -> list[dict]:
        return [e for e in self.events if e.get("choices")]

    @property
    def errors(self) -> list[dict]:
        return [e for e in self.events if "error" in e]

    @property
    def usages(self) -> list[dict]:
        return [e["usage"] for e in self.events if e.get("usage")]

    def add(self, message: bytes) -> None:
        """One server-sent event (or a line of one): its data, or `[DONE]`."""
        message = message.strip()
        if message.startswith(b"data:"):
            payload = message[5:].strip()
            if payload == b"[DONE]":
                self.done += 1
            else:
                self.events.append(json.loads(payload))

    def words(self, field: str = "text") -> list[str]:
        if self.body is not None:
            choice = self.body["choices"][0]
            text = choice.get("text") if "text" in choice else choice["message"].get(field)
            return (text or "").split()
        out = []
        for e in self.chunks:
            choice = e["choices"][0]
            text = choice.get("text") if "text" in choice else choice["delta"].get(field)
            out += (text or "").split()
        return out


async def call(session, url: str, body: dict, headers: dict | None = None) -> Reply:
    async with asyncio.timeout(LONG):
        async with session.post(url, json=body, headers=headers) as r:
            reply = Reply(r.status, headers=dict(r.headers))
            if r.content_type != "text/event-stream":
                reply.body = await r.json(content_type=None)
                return reply
            async for line in r.content:
                reply.add(line)
            return reply


def post(url: str, body: dict, headers: dict | None = None) -> Reply:
    async def go():
        async with aiohttp.ClientSession() as session:
            return await call(session, url, body, headers)

    return asyncio.run(go())


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of the gateway's (or an engine's) /metrics (0 if absent)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    head = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(head + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def idle(gateway_url: str, *backends: str) -> bool:
    """The gateway has nothing in flight on these backends, and their last scrape says they
    run nothing and hold no KV (a router reads both)."""
    _, health = get_json(gateway_url + "/health")
    for url in backends:
        b = health["backends"][url]
        scraped = b["scraped"]
        if b["in_flight"] or scraped["running"] or scraped["waiting"] or scraped["kv_usage"]:
            return False
    return True


def wait_for(predicate, what: str, timeout: float = LONG) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def expected(n: int, reasoning: int = 0, start: int = 0) -> list[str]:
    """The engine's words for output tokens start..n-1 (`</think>` where reasoning ends)."""
    return ["</think>" if k == reasoning - 1 else f"t{k}" for k in range(start, n)]


def assert_whole(reply: Reply, n: int, prompt_tokens: int, reasoning: int = 0, chat=False):
    """The client got one continuous response: exactly the n tokens, one id, one usage chunk
    that adds up, one [DONE], no error."""
    assert reply.status == 200, reply.body
    if chat:
        assert reply.words("reasoning_content") == expected(reasoning - 1)
        assert reply.words("content") == expected(n, start=reasoning)
    else:
        assert reply.words() == expected(n, reasoning)
    if reply.body is not None:
        usage = reply.body["usage"]
    else:
        assert reply.done == 1 and not reply.errors
        assert len({e["id"] for e in reply.events}) == 1
        assert len(reply.usages) == 1 and reply.events[-1].get("usage")
        usage = reply.usages[0]
        finishes = [e["choices"][0]["finish_reason"] for e in reply.chunks]
        assert all(f is None for f in finishes[:-1]) and finishes[-1] is not None
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["completion_tokens"] == n
    assert usage["total_tokens"] == prompt_tokens + n


def completion(prompt, n: int, reasoning: int = 0, stream: bool = True, **extra) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "stream": stream,
            "vllm_xargs": {"output_tokens": n, "reasoning_tokens": reasoning}, **extra}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def chat(text: str, n: int, reasoning: int = 0, stream: bool = True) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream,
            "vllm_xargs": {"output_tokens": n, "reasoning_tokens": reasoning}}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


# --- every request through three engines -------------------------------------------------------
def test_every_request_completes_through_three_engines(gateway, engines):
    before = {e.url: metric(gateway.url, "llmsched_gateway_backend_requests_total",
                            backend=e.url) for e in engines}  # fmt: skip
    done_before = metric(gateway.url, "llmsched_gateway_requests_total", outcome="completed")
    cases = []
    for i in range(24):
        n = 5 + i
        kind = i % 4
        if kind == 0:
            cases.append((completion("why is the sky blue", n), n, 5, 0, False))
        elif kind == 1:
            cases.append((completion([7, 8, 9], n, stream=False), n, 3, 0, False))
        elif kind == 2:
            cases.append((chat("tell me a story", n, reasoning=3), n, 4, 3, True))
        else:
            cases.append((completion("a b", n, reasoning=2), n, 2, 2, False))

    async def go():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(
                call(session, gateway.url + ("/v1/chat/completions" if c[4] else
                                             "/v1/completions"), c[0])
                for c in cases
            ))  # fmt: skip

    for reply, (_, n, prompt, reasoning, is_chat) in zip(asyncio.run(go()), cases):
        assert_whole(reply, n, prompt, reasoning, chat=is_chat)
    after = metric(gateway.url, "llmsched_gateway_requests_total", outcome="completed")
    assert after - done_before == 24
    for e in engines:  # round-robin, and nothing failed: eight each
        sent = metric(gateway.url, "llmsched_gateway_backend_requests_total", backend=e.url)
        assert sent - before[e.url] == 8
    wait_for(lambda: metric(gateway.url, "llmsched_gateway_in_flight") == 0, "in-flight 0")


def test_models_health_and_metrics(gateway, engines):
    status, models = get_json(gateway.url + "/v1/models")
    assert status == 200 and models["data"][0]["id"] == MODEL
    status, health = get_json(gateway.url + "/health")
    assert status == 200 and health["status"] == "ok"
    assert set(health["backends"]) == {e.url for e in engines}
    assert all(b["routable"] and b["circuit"] == "closed" for b in health["backends"].values())
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    for name in ("requests_total", "retries_total", "failovers_total", "migrations_total",
                 "admissions_refused_total", "in_flight", "backend_healthy",
                 "backend_circuit_state", "backend_in_flight", "backend_requests_total",
                 "backend_failures_total", "time_to_first_token_seconds"):  # fmt: skip
        assert f"# TYPE llmsched_gateway_{name} " in text, name


# --- failures before and after the first token -------------------------------------------------
FAULTS = [
    # (fault on the first attempt, counter, reason)
    ("cut:4", "failovers", "cut"),
    ("stall:4", "failovers", "stall"),
    ("malformed:4", "failovers", "malformed"),
    ("error:503", "retries", "http_503"),
    ("cut:0", "retries", "cut"),  # headers, then the connection closes: no first event
]
REQUESTS = {
    # (path, body, tokens, prompt tokens, reasoning, chat)
    "text": ("/v1/completions", completion("hello there you", 10), 10, 3, 0, False),
    "ids": ("/v1/completions", completion([5, 6, 7, 8], 10), 10, 4, 0, False),
    "reasoning": ("/v1/completions", completion("think hard", 12, reasoning=6), 12, 2, 6, False),
    "chat": ("/v1/chat/completions", chat("hi there", 12, reasoning=3), 12, 2, 3, True),
    "chat-in-reasoning": ("/v1/chat/completions", chat("hi", 12, reasoning=8), 12, 1, 8, True),
    "whole": ("/v1/completions", completion("not streamed", 9, stream=False), 9, 2, 0, False),
}


@pytest.mark.parametrize("kind", list(REQUESTS))
@pytest.mark.parametrize("fault, counter, reason", FAULTS)
def test_a_failed_attempt_continues_elsewhere_as_one_stream(gateway, kind, fault, counter, reason):
    """The engine breaks the first attempt (the header is forwarded on it only); the client
    still gets the whole output once, from the gateway's one id, with usage that adds up."""
    path, body, n, prompt, reasoning, is_chat = REQUESTS[kind]
    name = f"llmsched_gateway_{counter}_total"
    before = metric(gateway.url, name, reason=reason)
    reply = post(gateway.url + path, body, {"X-Llmsched-Fault": fault})
    assert_whole(reply, n, prompt, reasoning, chat=is_chat)
    assert metric(gateway.url, name, reason=reason) == before + 1


def test_the_clients_own_errors_come_back_as_they_are(gateway):
    before = metric(gateway.url, "llmsched_gateway_requests_total", outcome="client_error")
    reply = post(gateway.url + "/v1/completions", {"model": "nope", "prompt": "a", "max_tokens": 2})
    assert reply.status == 404 and "does not exist" in reply.body["error"]["message"]
    reply = post(gateway.url + "/v1/completions", {"model": MODEL, "max_tokens": 2})
    assert reply.status == 400 and "'prompt'" in reply.body["error"]["message"]
    after = metric(gateway.url, "llmsched_gateway_requests_total", outcome="client_error")
    assert after == before + 2


def test_a_stream_nothing_can_continue_ends_with_an_error_event(engines, logs):
    """One backend that cuts every stream (--fault cut=1) and no other: the client's stream
    ends with an error event after the retries, never silently; counted as failed."""
    with contextlib.ExitStack() as stack:
        bad = start_engine(stack, logs, "cutter", "--fault", "cut=1")
        gw = start_gateway(stack, logs, "gateway-cutter", [bad.url], "--retries", "2")
        reply = post(gw.url + "/v1/completions", completion("a b c", 40))
        assert reply.status == 200 and reply.done == 1
        assert len(reply.errors) == 1 and reply.events[-1] is reply.errors[0]
        assert "after 3 attempt(s)" in reply.errors[0]["error"]["message"]
        assert not reply.usages
        words = reply.words()
        assert words == expected(len(words))  # what came was right, and it said it stopped
        assert metric(gw.url, "llmsched_gateway_requests_total", outcome="failed") == 1
        assert metric(gw.url, "llmsched_gateway_failovers_total", reason="cut") == 2
        reply = post(gw.url + "/v1/completions", completion("a b c", 40, stream=False))
        assert reply.status == 502 and "attempt" in reply.body["error"]["message"]


# --- an engine dies mid-run ---------------------------------------------------------------------
def test_killing_an_engine_mid_run_loses_nothing(logs):
    """Nine long streams over three engines (at 3x real time each lasts at least 5 s);
    once every client has its first tokens one engine is killed. Its three streams continue
    on the others: every client gets its whole output."""
    n = 2000
    with contextlib.ExitStack() as stack:
        es = [start_engine(stack, logs, f"mortal{i}", "--time-scale", "3") for i in range(3)]
        gw = start_gateway(stack, logs, "gateway-mortal", [e.url for e in es])

        async def go():
            async with aiohttp.ClientSession() as session:
                responses = [
                    await session.post(gw.url + "/v1/completions",
                                       json=completion(f"story number {i}", n))
                    for i in range(9)
                ]  # fmt: skip
                firsts = []
                for r in responses:  # each has started: its first token is here
                    first = await r.content.readuntil(b"\n\n")
                    assert b" t0" in first
                    firsts.append(first)
                es[1].kill()
                replies = []
                for r, first in zip(responses, firsts):
                    rest = await asyncio.wait_for(r.content.read(), LONG)
                    replies.append(_parse_sse(first + rest))
                    r.close()
                return replies

        replies = asyncio.run(go())
        for reply in replies:
            assert_whole(reply, n, 3)
        assert metric(gw.url, "llmsched_gateway_failovers_total", reason="cut") >= 3
        assert metric(gw.url, "llmsched_gateway_requests_total", outcome="completed") == 9


def _parse_sse(data: bytes) -> Reply:
    reply = Reply(200)
    for message in data.split(b"\n\n"):
        reply.add(message)
    return reply


# --- health and circuit breaking -----------------------------------------------------------------
def test_the_circuit_opens_on_a_hanging_backend_and_a_dead_one_is_never_used(engines, logs):
    """Behind the gateway: a good engine, an engine that stops answering (SIGSTOP: it still
    accepts connections) and a port nobody listens on. The dead one fails its first health
    check and is never routed to; the hanging one costs one first-byte timeout per request
    until `--failure-threshold 2` failures open its circuit; from then on no request goes
    there, and every request completes."""
    dead = f"http://127.0.0.1:{free_port()}"
    with contextlib.ExitStack() as stack:
        hanging = start_engine(stack, logs, "hanging")
        gw = start_gateway(stack, logs, "gateway-breaker", [engines[0].url, hanging.url, dead],
                           "--first-byte-timeout", "1", "--failure-threshold", "2",
                           "--cooldown", "600", "--health-interval", "600")  # fmt: skip
        os.killpg(hanging.process.pid, signal.SIGSTOP)
        stack.callback(os.killpg, hanging.process.pid, signal.SIGCONT)
        for i in range(8):
            reply = post(gw.url + "/v1/completions", completion(f"request {i}", 6))
            assert_whole(reply, 6, 2)
        sent = metric(gw.url, "llmsched_gateway_backend_requests_total", backend=hanging.url)
        assert sent == 2  # round-robin sent it two; they timed out; the circuit opened
        assert metric(gw.url, "llmsched_gateway_retries_total", reason="timeout") == 2
        assert metric(gw.url, "llmsched_gateway_backend_requests_total", backend=dead) == 0
        assert metric(gw.url, "llmsched_gateway_backend_circuit_state", backend=hanging.url) == 1
        assert metric(gw.url, "llmsched_gateway_backend_healthy", backend=dead) == 0
        status, health = get_json(gw.url + "/health")
        assert status == 200
        assert health["backends"][hanging.url]["circuit"] == "open"
        assert not health["backends"][dead]["healthy"] and health["backends"][dead]["error"]


# --- PASCAL: migration at the reasoning boundary -------------------------------------------------
@pytest.fixture(scope="module")
def pascal_gateway(engines, logs):
    with contextlib.ExitStack() as stack:
        yield start_gateway(stack, logs, "gateway-pascal", [engines[0].url, engines[1].url],
                            "--router", "pascal", "--router-param", "migration=always",
                            "--health-interval", "0.5")  # fmt: skip


@pytest.mark.parametrize("kind", ["ids", "text", "chat"])
def test_pascal_migrates_the_answer_and_the_stream_stays_whole(pascal_gateway, engines, kind):
    """PASCAL (migration=always) moves a request to the other engine at `</think>` (chat: at
    its first content, `</think>` being in no chunk); the client sees one stream."""
    gw = pascal_gateway
    wait_for(lambda: idle(gw.url, engines[0].url, engines[1].url), "idle engines")
    sent = [metric(gw.url, "llmsched_gateway_backend_requests_total", backend=e.url)
            for e in engines[:2]]  # fmt: skip
    migrations = metric(gw.url, "llmsched_gateway_migrations_total")
    if kind == "chat":
        reply = post(gw.url + "/v1/chat/completions", chat("why", 14, reasoning=5))
        assert_whole(reply, 14, 1, 5, chat=True)
    else:
        prompt = [3, 4, 5] if kind == "ids" else "one two three"
        reply = post(gw.url + "/v1/completions", completion(prompt, 14, reasoning=5))
        assert_whole(reply, 14, 3, 5)
    assert metric(gw.url, "llmsched_gateway_migrations_total") == migrations + 1
    for e, before in zip(engines[:2], sent):  # one engine reasoned, the other answered
        assert metric(gw.url, "llmsched_gateway_backend_requests_total", backend=e.url) == (
            before + 1
        )


def test_pascal_leaves_a_request_without_reasoning_where_it_is(pascal_gateway):
    migrations = metric(pascal_gateway.url, "llmsched_gateway_migrations_total")
    reply = post(pascal_gateway.url + "/v1/completions", completion("plain", 8))
    assert_whole(reply, 8, 1)
    assert metric(pascal_gateway.url, "llmsched_gateway_migrations_total") == migrations


# --- prefix affinity ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefix_gateway(engines, logs):
    with contextlib.ExitStack() as stack:
        yield start_gateway(stack, logs, "gateway-prefix", [engines[0].url, engines[1].url],
                            "--router", "prefix-affinity", "--stall-timeout", "60",
                            "--health-interval", "0.3")  # fmt: skip


def test_prefix_affinity_follows_the_prefix_unless_the_load_is_much_higher(prefix_gateway, engines):
    gw, (a, b) = prefix_gateway, (engines[0].url, engines[1].url)
    shared = " ".join(f"w{i}" for i in range(4 * BLOCK))  # four blocks

    def sent(url):
        return metric(gw.url, "llmsched_gateway_backend_requests_total", backend=url)

    def settle():
        wait_for(lambda: idle(gw.url, a, b), "idle engines")

    async def hold(session, prompt):
        """A stream that stays open (the engine stalls it after one token) until closed."""
        r = await session.post(gw.url + "/v1/completions", json=completion(prompt, 50),
                               headers={"X-Llmsched-Fault": "stall:1"})  # fmt: skip
        assert b" t0" in await r.content.readuntil(b"\n\n")
        return r

    async def go():
        async with aiohttp.ClientSession() as session:
            settle()
            # The prefix lands on b: a is busy (a held stream) and nobody has it yet.
            held = await hold(session, "something else entirely")
            assert (sent(a), sent(b)) == (1, 0)
            reply = await call(session, gw.url + "/v1/completions",
                               completion(shared + " first", 3, stream=False))  # fmt: skip
            assert_whole(reply, 3, 4 * BLOCK + 1)
            assert (sent(a), sent(b)) == (1, 1)
            held.close()
            await asyncio.to_thread(settle)
            # Equal loads: the prefix wins over the lower index.
            reply = await call(session, gw.url + "/v1/completions",
                               completion(shared + " second", 3, stream=False))  # fmt: skip
            assert_whole(reply, 3, 4 * BLOCK + 1)
            assert (sent(a), sent(b)) == (1, 2)
            await asyncio.to_thread(settle)
            # b is one request above the mean (1 against 0): load outweighs the prefix.
            held = await hold(session, shared + " third")
            assert (sent(a), sent(b)) == (1, 3)
            reply = await call(session, gw.url + "/v1/completions",
                               completion(shared + " fourth", 3, stream=False))  # fmt: skip
            assert_whole(reply, 3, 4 * BLOCK + 1)
            assert (sent(a), sent(b)) == (2, 3)
            held.close()

    asyncio.run(go())
    # The client that hung up ended as cancelled, and its engine request was aborted.
    settle()  # every request gone from the engines
    assert metric(gw.url, "llmsched_gateway_requests_total", outcome="cancelled") == 2


# --- SLO admission --------------------------------------------------------------------------------
def test_slo_admission_refuses_with_the_estimate(engines, logs):
    """With no TTFT measured yet nothing is refused; once one is, a 1 µs SLO cannot be met:
    HTTP 429 with the estimate and the SLO in the message."""
    with contextlib.ExitStack() as stack:
        gw = start_gateway(stack, logs, "gateway-slo", [engines[2].url], "--slo-ttft", "1e-6")
        assert_whole(post(gw.url + "/v1/completions", completion("first one", 4)), 4, 2)
        reply = post(gw.url + "/v1/completions", completion("second one", 4))
        assert reply.status == 429
        message = reply.body["error"]["message"]
        assert "estimated TTFT" in message and "SLO of 1e-06 s" in message
        assert engines[2].url in message
        assert metric(gw.url, "llmsched_gateway_admissions_refused_total") == 1
        assert metric(gw.url, "llmsched_gateway_requests_total", outcome="refused") == 1


# --- a recording backend: what the gateway sends -------------------------------------------------
async def _empty(request: web.Request) -> web.Response:
    return web.Response(text="")


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class Recorder:
    """A small OpenAI-compatible server in a thread that records each request's body and
    headers, streams `n` words, and answers 429 (Retry-After: 60) to prompts that start with
    "busy"."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.url = ""

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if str(body.get("prompt", "")).startswith("busy"):
            return web.json_response({"error": {"message": "busy"}}, status=429,
                                     headers={"Retry-After": "60"})  # fmt: skip
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(request)
        n = body["max_tokens"]
        for k in range(n):
            finish = "length" if k == n - 1 else None
            choice = {"index": 0, "text": f" t{k}", "finish_reason": finish}
            await r.write(_event({"id": "x", "choices": [choice]}))
        prompt = body["prompt"]
        size = len(prompt if isinstance(prompt, list) else prompt.split())
        usage = {"prompt_tokens": size, "completion_tokens": n}
        await r.write(_event({"id": "x", "choices": [], "usage": usage}))
        await r.write(b"data: [DONE]\n\n")
        return r

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_get("/health", _empty)
        app.router.add_get("/metrics", _empty)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> Recorder:
        threading.Thread(target=self._serve, daemon=True).start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.parametrize("source", ["prompt-length", "model"])
def test_pars_scores_become_vllm_priorities(logs, tmp_path, source):
    """prompt-length, and a saved predictor (model:DIR; here one that counts words): each
    prompt's score goes in vllm_xargs.score and its priority orders shortest first (a model's
    real-valued score kept to three decimals)."""
    from llmsched.predict.predictors import PromptLengthPredictor

    spec = source
    if source == "model":
        spec = f"model:{PromptLengthPredictor(tokenizer='words').save(tmp_path / 'words')}"
    with Recorder() as rec, contextlib.ExitStack() as stack:
        gw = start_gateway(stack, logs, f"gateway-pars-{source}", [rec.url], "--scores", spec)
        for prompt in ("a b c d e", "a b"):
            body = completion(prompt, 3)
            body["vllm_xargs"]["tier"] = "gold"
            assert_whole(post(gw.url + "/v1/completions", body), 3, len(prompt.split()))
        reply = post(gw.url + "/v1/completions", completion([1, 2, 3], 3))
        if source == "model":  # a predictor reads text, and this prompt is token ids
            assert reply.status == 400 and "token ids" in reply.body["error"]["message"]
    scale = 1000 if source == "model" else 1
    assert [b["priority"] for b in rec.bodies[:2]] == [5 * scale, 2 * scale]
    assert [b["vllm_xargs"]["score"] for b in rec.bodies[:2]] == [5.0, 2.0]
    assert all(b["vllm_xargs"]["tier"] == "gold" for b in rec.bodies[:2])  # the client's, kept
    assert len(rec.bodies) == (2 if source == "model" else 3)


def test_a_gateway_with_no_routable_backend_says_so(logs):
    dead = f"http://127.0.0.1:{free_port()}"
    port = free_port()
    argv = [sys.executable, *GATEWAY, "--backends", dead, "--port", str(port)]
    with open(logs / "gateway-dead.log", "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                get_json(url + "/health")
                return True
            except OSError:
                return False

        wait_for(answers, "the gateway to answer")
        status, health = get_json(url + "/health")
        assert status == 503 and health["status"] == "unavailable"
        assert "/health" in health["backends"][dead]["error"]
        reply = post(url + "/v1/completions", completion("a b", 3, stream=False))
        assert reply.status == 503 and "no backend is routable" in reply.body["error"]["message"]
        status, _ = get_json(url + "/v1/models")
        assert status == 503
    finally:
        process.terminate()
        process.wait(30)


def test_retry_after_is_honoured_by_routing_around_the_backend(engines, logs):
    with Recorder() as rec, contextlib.ExitStack() as stack:
        gw = start_gateway(stack, logs, "gateway-busy", [rec.url, engines[2].url])
        # round-robin's first choice is the recorder: it answers 429, the engine serves it
        assert_whole(post(gw.url + "/v1/completions", completion("busy now", 5)), 5, 2)
        assert metric(gw.url, "llmsched_gateway_retries_total", reason="http_429") == 1
        _, health = get_json(gw.url + "/health")
        assert not health["backends"][rec.url]["routable"]  # for the next 60 s
        for i in range(3):
            assert_whole(post(gw.url + "/v1/completions", completion(f"then {i}", 3)), 3, 2)
        assert len(rec.bodies) == 1


# --- bad flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backends", "localhost:8000"], "--backends: 'localhost:8000' is not an http(s) URL"),
        (["--backends", "http://h:1", "--router", "nope"], "--router: unknown router 'nope'"),
        (["--backends", "http://h:1", "--router", "least-outstandin"], "'least-outstanding'"),
        (["--backends", "http://h:1", "--router", "pascal", "--router-param", "speed=3"],
         "--router-param: router 'pascal' has no parameter 'speed'; it takes: migration"),
        (["--backends", "http://h:1", "--router", "pascal", "--router-param", "migration=x"],
         "--router-param: router 'pascal': migration must be one of"),
        (["--backends", "http://h:1", "--router-param", "beta"], "expected NAME=VALUE"),
        (["--backends", "http://h:1", "--scores", "noisy-oracle,tau=0.5"], "--scores:"),
        (["--backends", "http://h:1", "--scores", "model:/no/such/dir"],
         "--scores: /no/such/dir is not a saved predictor"),
        (["--backends", "http://h:1", "--retries", "-1"], "--retries: expected an integer >= 0"),
        (["--backends", "http://h:1", "--stall-timeout", "0"], "--stall-timeout: expected"),
        (["--backends", "http://h:1,http://h:1"], "--backends: a URL is listed twice"),
    ],
)  # fmt: skip
def test_bad_flags_fail_with_one_clear_line(argv, message, capsys):
    assert gateway_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_python_dash_m_runs_the_command():
    argv = [sys.executable, *GATEWAY, "--backends", "http://h:1", "--router", "nope"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=LONG)
    assert run.returncode == 2 and "--router: unknown router 'nope'" in run.stderr


# --- the pieces -----------------------------------------------------------------------------------
def test_breaker_closed_open_half_open():
    b = Breaker(threshold=2, cooldown=10)
    assert b.available(0) and b.state is Circuit.CLOSED
    b.failure(1)
    b.success()  # a success resets the count: failures must be consecutive
    b.failure(2)
    assert b.available(2) and b.state is Circuit.CLOSED
    b.failure(3)
    assert b.state is Circuit.OPEN and not b.available(12.9)
    assert b.available(13) and b.state is Circuit.HALF_OPEN
    b.dispatched()  # the trial request
    assert not b.available(13.5)  # one trial at a time
    b.failure(14)
    assert b.state is Circuit.OPEN and not b.available(23.9)
    assert b.available(24)
    b.dispatched()
    b.success()
    assert b.state is Circuit.CLOSED and b.available(24) and b.available(24)


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="2000"} 1.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"""


def test_parse_metrics_reads_vllms_load_gauges():
    s = parse_metrics(VLLM_METRICS)
    assert (s.running, s.waiting, s.kv_usage, s.num_gpu_blocks, s.block_size) == (
        5, 4, 0.25, 2000, 16
    )  # fmt: skip
    s = parse_metrics("# TYPE other gauge\nother 1\n")
    assert s.running is None and s.num_gpu_blocks is None


def test_check_url():
    assert check_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    for bad in ("127.0.0.1:8000", "ftp://h", "http://h:port"):
        with pytest.raises(ValueError):
            check_url(bad)


def test_prefix_index_matches_leading_blocks_and_forgets_the_least_recent():
    a = [f"w{i}" for i in range(3 * BLOCK + 5)]
    b = a[:BLOCK] + ["other"] + a[BLOCK + 1 :]
    ha, hb = block_hashes(a), block_hashes(b)
    assert len(ha) == 3 and ha[0] == hb[0] and ha[1] != hb[1] and ha[2] != hb[2]
    index = PrefixIndex(2, capacity=4)
    index.insert(0, ha)
    assert index.match(0, ha) == 3 and index.match(0, hb) == 1 and index.match(1, ha) == 0
    index.insert(0, block_hashes([f"x{i}" for i in range(2 * BLOCK)]))  # evicts ha's first two
    assert index.match(0, ha) == 0


def test_ttft_estimator_scales_per_queue_position():
    est = TtftEstimator(window=4)
    assert est.estimate(10) == 0.0  # no evidence: no refusal
    est.add(0.2, ahead=0)  # 0.2 s per position
    est.add(0.6, ahead=2)  # 0.2
    est.add(5.0, ahead=0)  # an outlier
    assert est.estimate(0) == pytest.approx(0.2)
    assert est.estimate(4) == pytest.approx(1.0)
    for _ in range(4):
        est.add(0.1, ahead=0)  # the window keeps the last four
    assert est.estimate(1) == pytest.approx(0.2)


def _state(rid: str, prompt: list[str], output: int = 50, reasoning: int = 0) -> ProxiedState:
    return ProxiedState(Request(rid, 0.0, len(prompt), output, reasoning), block_hashes(prompt))


def _fake_view(loads: list[int], matches: list[int]) -> SimpleNamespace:
    return SimpleNamespace(
        num_instances=len(loads),
        outstanding=lambda i: loads[i],
        loads=lambda: list(loads),
        prefix_match=lambda i, state: matches[i],
    )


def test_prefix_affinity_score():
    router = router_class("prefix-affinity")()
    state = RequestState(Request("r", 0.0, 100, 10))
    # score = matched/100 - (load - mean)/max(1, mean)
    assert router.route(state, _fake_view([0, 0, 0], [0, 0, 0])) == 0  # ties: lowest index
    assert router.route(state, _fake_view([0, 0, 0], [0, 64, 32])) == 1
    # mean 2: b's 0.96 - 0.5 = 0.46 against a's 0 + 0.5: the load wins
    assert router.route(state, _fake_view([1, 3, 2], [0, 96, 0])) == 0
    # mean 20: b's 0.96 - 0.05 beats a's 0 + 0.05: among heavy loads one more is cheap
    assert router.route(state, _fake_view([19, 21, 20], [0, 96, 0])) == 1
    lazy = router_class("prefix-affinity")(beta=0.0)  # cache affinity alone
    assert lazy.route(state, _fake_view([0, 50, 0], [0, 16, 0])) == 1
    with pytest.raises(ValueError, match="beta"):
        router_class("prefix-affinity")(beta=-1)


def test_gateway_view_shows_routable_backends_renumbered():
    backends = [Backend(i, f"http://h:{i + 1}") for i in range(3)]
    mirrors, prefixes = Mirrors(3), PrefixIndex(3)
    backends[2].scraped.running, backends[2].scraped.waiting = 4, 3
    backends[2].scraped.num_gpu_blocks, backends[2].scraped.kv_usage = 1000, 0.5
    prompt = [f"w{i}" for i in range(2 * BLOCK)]
    s = _state("a", prompt)
    mirrors.add(s, 2, now=1.0)
    backends[2].in_flight = 1
    mirrors.tokens(s, 3, now=2.0)
    prefixes.insert(2, s.hashes)
    view = GatewayView([backends[0], backends[2]], mirrors, prefixes, now=3.0)  # 1 is down
    assert view.num_instances == 2 and view.now == 3.0
    assert view.outstanding(1) == 7  # the scrape (4 + 3) is more than the gateway's 1
    assert view.loads() == [view.outstanding(i) for i in range(view.num_instances)]
    assert view.num_running(1) == 4 and view.kv_footprint(1) == 500 and view.kv_free(1) == 500
    assert view.outstanding(0) == 0 and view.kv_footprint(0) == 0
    assert view.prefix_match(1, _state("b", prompt)) == 2 * BLOCK
    assert view.prefix_match(0, _state("b", prompt)) == 0
    inst = view.instance(1)
    assert inst.view.index == 1 and inst.backend is backends[2]
    assert list(inst.view.running) == [s] and s.generated == 3
    assert list(inst.view.token_times(s)) == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_decides_on_the_gateway_view(name):
    backends = [Backend(i, f"http://h:{i + 1}") for i in range(3)]
    mirrors, prefixes = Mirrors(3), PrefixIndex(3)
    busy = _state("busy", ["w"] * 40, output=20, reasoning=5)
    mirrors.add(busy, 1, now=0.0)
    mirrors.tokens(busy, 6, now=0.5)
    backends[1].in_flight = 1
    router = router_class(name)()
    view = GatewayView([backends[1], backends[2]], mirrors, prefixes, now=0.6)
    new = _state("new", ["w"] * 40)
    assert all(0 <= router.route(new, view) < 2 for _ in range(4))
    assert router.on_phase_change(busy, 0, view) in (0, 1)


def test_prefix_affinity_runs_in_the_simulator():
    """The simulator has no prefix cache (prefix_match is 0): the router balances load."""
    from llmsched.config import load_config
    from llmsched.experiment import simulate

    cfg = load_config(None, num_requests=40, rate=8.0, seed=1, model=MODEL, gpu="a100-80gb")
    cfg.instances, cfg.router = 2, "prefix-affinity"
    summary = simulate(cfg).summary
    assert summary["completed"] == 40


def test_pascal_reads_the_mirror_like_an_engine():
    """PASCAL's router on the gateway's view: a request that just produced `</think>` on
    backend 0 goes to backend 1 (fewer reasoning requests there, smaller KV footprint); its
    token times are kept across the move."""
    backends = [Backend(i, f"http://h:{i + 1}") for i in range(2)]
    mirrors, prefixes = Mirrors(2), PrefixIndex(2)
    s = _state("a", ["w"] * 20, output=10, reasoning=4)
    mirrors.add(s, 0, now=0.0)
    for k in range(4):
        mirrors.tokens(s, 1, now=float(k))
    router = router_class("pascal")(migration="always")
    view = GatewayView(backends, mirrors, prefixes, now=3.01)
    assert router.on_phase_change(s, 0, view) == 1
    mirrors.remove(s, finished=False)
    mirrors.add(s, 1, now=3.02)
    mirrors.tokens(s, 2, now=3.1)
    view = GatewayView(backends, mirrors, prefixes, now=3.2)
    assert list(view.instance(1).view.token_times(s)) == [0.0, 1.0, 2.0, 3.0, 3.1, 3.1]
    assert router.pacer.instance_ok(view.instance(1).view, 3.2)
    assert not router.pacer.instance_ok(view.instance(1).view, 30.0)  # its reader waits


def test_mirror_logs_drop_what_no_live_request_refers_to():
    Mirrors.COMPACT_AT = 8
    try:
        mirrors = Mirrors(1)
        old = _state("old", ["w"], output=1000)
        mirrors.add(old, 0, now=0.0)
        for k in range(6):
            mirrors.tokens(old, 1, now=float(k))
        mirrors.remove(old, finished=True)
        live = _state("live", ["w"], output=1000)
        mirrors.add(live, 0, now=10.0)
        for k in range(3):
            mirrors.tokens(live, 1, now=10.0 + k)
        other = _state("other", ["w"], output=1000)
        mirrors.add(other, 0, now=20.0)
        mirrors.tokens(other, 1, now=20.0)
        mirrors.remove(other, finished=True)  # the log has 10 entries: compacted
        assert mirrors.logs[0].size == 4  # live's three and other's one
        view = GatewayView([Backend(0, "http://h:1")], mirrors, PrefixIndex(1), now=30.0)
        assert list(view.instance(0).view.token_times(live)) == [10.0, 11.0, 12.0]
    finally:
        Mirrors.COMPACT_AT = 1 << 16
