"""llmsched's gateway: an OpenAI-compatible proxy that runs the simulator's routers over real
backends (llmsched's emulated engine, vLLM, any OpenAI-compatible server).

What gateways are blamed for (production-stack, LiteLLM, SGLang's router; see
/work/shared/papers/agents-and-surfaces.md 4(c)) and what this one does instead:

* **one dead backend hangs everything**: connect, first-byte and between-chunk timeouts; a
  circuit breaker per backend and a periodic ``/health`` check keep a failing backend out of
  routing (``backends.py``); the router only ever sees routable backends (``view.py``);
* **errors before the first byte**: a connect error, a first-byte timeout, HTTP 5xx or 429 is
  retried on another backend, at most ``--retries`` more times; a backend's ``Retry-After`` is
  honoured by routing around it until then. Any other 4xx is the client's error and goes back
  to it as is;
* **a stream that breaks after the first token** (cut, stall, malformed chunk, in-stream error)
  continues on another backend from what the client already has: for chat, the text so far as a
  partial assistant message with ``continue_final_message``; for completions, the text (or the
  token ids, asked for with ``return_token_ids``) appended to the prompt; ``max_tokens`` lowered
  to what is left. The client sees one stream: one id, no token twice, none missing, one usage
  chunk, one ``[DONE]``. When nothing can continue it the stream ends with an error event;
  a request never just stops;
* **PASCAL migration**: with a phase-aware router (``pascal``), at the reasoning boundary
  (``</think>``, or chat's first ``content`` after ``reasoning_content``) the router is asked
  where the answer should run; if elsewhere, the source stream is closed (vLLM aborts a request
  whose connection closes) and the answer continues on the target as after a failure;
* **PARS** (``--scores``): each prompt is scored and sent with vLLM's ``priority`` (lower
  first: the shortest predicted response first) and ``vllm_xargs.score``;
* **SLO admission** (``--slo-ttft``): a request no routable backend is expected to start in
  time is refused at once with HTTP 429 and the estimate (``backends.TtftEstimator``), and the
  router chooses only among backends expected to meet it.

Every request ends completed or with an explicit error, counted in ``/metrics``
(``llmsched_gateway_requests_total{outcome}``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yaml
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from llmsched.integrations.serve import protocol
from llmsched.integrations.serve.backends import Backend, Breaker, check_url
from llmsched.integrations.serve.view import (
    GatewayView,
    Mirrors,
    PrefixIndex,
    ProxiedState,
    block_hashes,
)
from llmsched.policies import Router, router_class
from llmsched.workload.request import Request
from llmsched.workload.scores import ScoreSpec

logger = logging.getLogger("llmsched.gateway")

FAULT_HEADER = "X-Llmsched-Fault"  # the emulated engine's fault injection (first attempt only)
DEFAULT_OUTPUT = 256  # output tokens a router assumes when the request does not say
#: --scores sources the gateway can compute per request (noisy-oracle needs a whole workload).
GATEWAY_SCORES = ("prompt-length", "oracle", "model")


# --- settings and the command line --------------------------------------------------------------
@dataclass
class Settings:
    backends: list[str]
    router: str = "round-robin"
    router_params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 8080
    retries: int = 2
    scores: ScoreSpec | None = None
    slo_ttft: float | None = None
    connect_timeout: float = 5.0
    first_byte_timeout: float = 60.0
    stall_timeout: float = 30.0
    health_interval: float = 5.0
    health_timeout: float = 2.0
    failure_threshold: int = 3
    cooldown: float = 10.0
    prefix_blocks: int = 1 << 16
    log_level: str = "info"
    predictor: Any = None  # the loaded model of --scores model:DIR


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmsched serve gateway",
        description="An OpenAI-compatible gateway that routes with llmsched's routers.",
    )
    p.add_argument(
        "--backends",
        required=True,
        metavar="URL,URL,...",
        help="base URLs of OpenAI-compatible servers, e.g. http://127.0.0.1:8000",
    )
    p.add_argument(
        "--router", default="round-robin", help="a router of `llmsched list` (default: round-robin)"
    )
    p.add_argument(
        "--router-param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a router parameter (repeatable), e.g. migration=always, beta=0.5",
    )
    p.add_argument("--seed", type=int, default=0, help="the router's seed (default 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="more backends a failed request is tried on, before or after its "
        "first token (default 2)",
    )
    p.add_argument(
        "--scores",
        metavar="SPEC",
        help="score prompts and send vLLM priorities (shortest predicted first): "
        "prompt-length, oracle (vllm_xargs.output_tokens) or model:DIR",
    )
    p.add_argument(
        "--slo-ttft",
        type=float,
        metavar="SECONDS",
        help="refuse (HTTP 429) a request no backend is expected to start in time",
    )
    p.add_argument(
        "--connect-timeout", type=float, default=5.0, help="seconds to connect to a backend (5)"
    )
    p.add_argument(
        "--first-byte-timeout",
        type=float,
        default=60.0,
        help="seconds from sending a request to its first streamed event (60)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="seconds of silence between streamed events before failing over (30)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=5.0,
        help="seconds between a backend's /health checks and /metrics scrapes (5)",
    )
    p.add_argument(
        "--health-timeout",
        type=float,
        default=2.0,
        help="seconds a /health check or /metrics scrape may take (2)",
    )
    p.add_argument(
        "--failure-threshold",
        type=int,
        default=3,
        help="failures in a row that open a backend's circuit (3)",
    )
    p.add_argument(
        "--cooldown",
        type=float,
        default=10.0,
        help="seconds an open circuit waits before a trial request (10)",
    )
    p.add_argument(
        "--prefix-blocks",
        type=int,
        default=1 << 16,
        help="16-token prompt blocks remembered per backend for prefix affinity "
        "(65536, least recently used dropped)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return p


def parse_router_params(items: list[str], router: type[Router], name: str) -> dict[str, Any]:
    """`--router-param NAME=VALUE` items, checked against the router's constructor."""
    accepted = [p for p in inspect.signature(router.__init__).parameters if p not in ("self",)]
    params: dict[str, Any] = {}
    for item in items:
        key, found, text = item.partition("=")
        key = key.strip()
        if not found or not key:
            raise ValueError(f"--router-param: expected NAME=VALUE (e.g. beta=0.5), got {item!r}")
        if key not in accepted or key == "seed":
            takes = ", ".join(p for p in accepted if p != "seed") or "none"
            raise ValueError(
                f"--router-param: router {name!r} has no parameter {key!r}; it takes: {takes}"
            )
        params[key] = yaml.safe_load(text)
    return params


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed flags; ValueError names the flag and what it expects."""
    urls = [u for u in (part.strip() for part in args.backends.split(",")) if u]
    if not urls:
        raise ValueError("--backends: give at least one URL, e.g. http://127.0.0.1:8000")
    try:
        urls = [check_url(u) for u in urls]
    except ValueError as e:
        raise ValueError(f"--backends: {e}") from None
    if len(set(urls)) != len(urls):
        raise ValueError("--backends: a URL is listed twice")
    try:
        router = router_class(args.router)
    except ValueError as e:
        raise ValueError(f"--router: {e}") from None
    params = parse_router_params(args.router_param, router, args.router)
    try:
        router(seed=args.seed, **params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--router-param: router {args.router!r}: {e}") from None
    scores = predictor = None
    if args.scores:
        try:
            scores = ScoreSpec.parse(args.scores)
        except ValueError as e:
            raise ValueError(f"--scores: {e}") from None
        if scores.source not in GATEWAY_SCORES:
            raise ValueError(
                f"--scores: {scores.source} needs a whole workload; the gateway scores one "
                "request at a time: prompt-length, oracle or model:DIR"
            )
        if scores.source == "model":
            from llmsched.predict import load_predictor

            try:
                predictor = load_predictor(scores.model_dir)
            except (OSError, ValueError, ImportError) as e:
                raise ValueError(f"--scores: {e}") from None
    checks = [
        ("--retries", args.retries, args.retries >= 0, "an integer >= 0"),
        ("--port", args.port, 0 <= args.port <= 65535, "a port number 0-65535"),
        ("--slo-ttft", args.slo_ttft, args.slo_ttft is None or args.slo_ttft > 0, "seconds > 0"),
        ("--failure-threshold", args.failure_threshold, args.failure_threshold >= 1, ">= 1"),
        ("--cooldown", args.cooldown, args.cooldown >= 0, "seconds >= 0"),
        ("--prefix-blocks", args.prefix_blocks, args.prefix_blocks >= 1, ">= 1"),
    ]
    for flag in (
        "connect_timeout",
        "first_byte_timeout",
        "stall_timeout",
        "health_interval",
        "health_timeout",
    ):
        value = getattr(args, flag)
        checks.append((f"--{flag.replace('_', '-')}", value, value > 0, "seconds > 0"))
    for flag, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"{flag}: expected {expected}, got {value}")
    return Settings(
        backends=urls,
        router=args.router,
        router_params=params,
        seed=args.seed,
        host=args.host,
        port=args.port,
        retries=args.retries,
        scores=scores,
        slo_ttft=args.slo_ttft,
        connect_timeout=args.connect_timeout,
        first_byte_timeout=args.first_byte_timeout,
        stall_timeout=args.stall_timeout,
        health_interval=args.health_interval,
        health_timeout=args.health_timeout,
        failure_threshold=args.failure_threshold,
        cooldown=args.cooldown,
        prefix_blocks=args.prefix_blocks,
        log_level=args.log_level,
        predictor=predictor,
    )


# --- metrics ------------------------------------------------------------------------------------
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
OUTCOMES = ("completed", "failed", "client_error", "refused", "cancelled")


class GatewayMetrics:
    """The gateway's own /metrics, in its own registry."""

    def __init__(self, gateway: Gateway) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "llmsched_gateway_requests",
            "Client requests by how they ended: completed, failed "
            "(an error after retries), client_error (4xx), refused (SLO), cancelled (the client "
            "left).",
            ["outcome"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.retries = Counter(
            "llmsched_gateway_retries",
            "Requests sent again to a backend before the client's "
            "first token, by the failure that caused it.",
            ["reason"],
            registry=r,
        )
        self.failovers = Counter(
            "llmsched_gateway_failovers",
            "Streams continued on another backend after the client "
            "had received part of them, by the failure that caused it.",
            ["reason"],
            registry=r,
        )
        self.migrations = Counter(
            "llmsched_gateway_migrations",
            "Requests moved to another backend at the reasoning boundary by a phase-aware router.",
            registry=r,
        )
        self.refused = Counter(
            "llmsched_gateway_admissions_refused",
            "Requests refused (HTTP 429) because no backend was expected to meet --slo-ttft.",
            registry=r,
        )
        self.sent = Counter(
            "llmsched_gateway_backend_requests",
            "Requests sent to each backend (first tries, retries, continuations).",
            ["backend"],
            registry=r,
        )
        self.failures = Counter(
            "llmsched_gateway_backend_failures",
            "Failures of requests sent to each backend.",
            ["backend", "reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmsched_gateway_time_to_first_token_seconds",
            "From the gateway receiving a "
            "request to the first token it sent back to the client (retries included).",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "llmsched_gateway_in_flight", "Client requests the gateway is serving.", registry=r
        )
        healthy = Gauge(
            "llmsched_gateway_backend_healthy",
            "1 when the backend's last /health check passed.",
            ["backend"],
            registry=r,
        )
        circuit = Gauge(
            "llmsched_gateway_backend_circuit_state",
            "The backend's circuit breaker: 0 closed, 1 open, 2 half-open.",
            ["backend"],
            registry=r,
        )
        on = Gauge(
            "llmsched_gateway_backend_in_flight",
            "The gateway's requests in flight on the backend.",
            ["backend"],
            registry=r,
        )
        for b in gateway.backends:
            healthy.labels(b.url).set_function(lambda b=b: float(b.healthy))
            circuit.labels(b.url).set_function(
                lambda b=b: float(b.breaker.state_at(time.monotonic()).value)
            )
            on.labels(b.url).set_function(lambda b=b: float(b.in_flight))


# --- the gateway --------------------------------------------------------------------------------
class Gateway:
    """Backends, the router and its view's state, one aiohttp session, the metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backends = [
            Backend(i, url, Breaker(settings.failure_threshold, settings.cooldown))
            for i, url in enumerate(settings.backends)
        ]
        cls = router_class(settings.router)
        self.router: Router = cls(seed=settings.seed, **settings.router_params)
        # Phase-aware: the router overrides Router.on_phase_change (PASCAL's Algorithm 2).
        self.phase_aware = cls.on_phase_change is not Router.on_phase_change
        self.mirrors = Mirrors(len(self.backends))
        self.prefixes = PrefixIndex(len(self.backends), settings.prefix_blocks)
        self.metrics = GatewayMetrics(self)
        self.session: aiohttp.ClientSession | None = None
        self.predictor = settings.predictor
        self._checks: asyncio.Task | None = None

    async def start(self) -> None:
        # No limit on pooled connections: every in-flight stream holds one.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        self.session = aiohttp.ClientSession(connector=connector)
        await self.check_backends()
        self._checks = asyncio.create_task(self._check_forever())

    async def stop(self) -> None:
        if self._checks is not None:
            self._checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checks
        if self.session is not None:
            await self.session.close()

    async def check_backends(self) -> None:
        assert self.session is not None
        timeout = self.settings.health_timeout
        await asyncio.gather(*(b.check(self.session, timeout) for b in self.backends))

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            try:
                await self.check_backends()
            except Exception:  # a check must never stop the loop
                logger.exception("backend checks failed")

    def routable(self, now: float) -> list[Backend]:
        return [b for b in self.backends if b.routable(now)]

    def view(self, backends: list[Backend], now: float) -> GatewayView:
        return GatewayView(backends, self.mirrors, self.prefixes, now)

    def choose(
        self, state: ProxiedState, avoid: set[int], allowed: list[Backend] | None = None
    ) -> Backend | None:
        """The router's choice among routable backends (`allowed` of them if given), avoiding
        those in `avoid` while others are left; None when no backend is routable."""
        now = time.monotonic()
        routable = self.routable(now)
        if allowed is not None:
            routable = [b for b in routable if b in allowed]
        candidates = [b for b in routable if b.index not in avoid] or routable
        if not candidates:
            return None
        i = self.router.route(state, self.view(candidates, now))
        if not 0 <= i < len(candidates):
            raise RuntimeError(f"router {self.router.name!r} chose {i} of {len(candidates)}")
        return candidates[i]

    async def score(self, c: protocol.Completion) -> float | None:
        """The request's ranking score (higher = longer response expected), or None."""
        spec = self.settings.scores
        if spec is None:
            return None
        if spec.source == "prompt-length":
            return float(c.prompt_tokens)
        if spec.source == "oracle":
            if c.args.output_tokens is None:
                raise protocol.BadRequest(
                    f"--scores oracle reads vllm_xargs.{protocol.XARG_OUTPUT}, which this "
                    "request does not give"
                )
            return float(c.args.output_tokens)
        text = prompt_text(c)
        if text is None:
            raise protocol.BadRequest(
                f"--scores model:{spec.model_dir} reads prompt text; this prompt is token ids"
            )
        scores = await asyncio.to_thread(self.predictor.score, [text])
        return float(scores[0])

    def priority(self, score: float) -> int:
        """vLLM's priority from a score: lower first, so the shortest predicted goes first.
        Length scores are token counts (whole numbers); a model's are real numbers, kept to
        three decimals."""
        assert self.settings.scores is not None
        scale = 1000 if self.settings.scores.source == "model" else 1
        return int(round(score * scale))


def prompt_text(c: protocol.Completion) -> str | None:
    if c.chat:
        return "\n".join(str(m.get("content") or "") for m in c.body["messages"])
    prompt = _unwrap(c.body["prompt"])
    return prompt if isinstance(prompt, str) else None


def _unwrap(prompt: Any) -> Any:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        return prompt[0]  # a batch of one
    return prompt


def error_response(message: str, status: int, kind: str = "invalid_request_error") -> Response:
    return JSONResponse(protocol.error_body(message, kind, status), status_code=status)


# --- one request --------------------------------------------------------------------------------
class Broken(Exception):
    """A backend's stream failed: `reason` is the metric label, the message says how."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PassThrough(Exception):
    """A backend's answer that goes to the client as it is (a 4xx other than 429)."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"HTTP {status}")
        self.response = Response(body, status_code=status, media_type=content_type)


class SSE:
    """Server-sent events from a response body, one data payload at a time."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.buffer = b""

    async def next(self) -> bytes | None:
        """The next event's data (None at the end of the body)."""
        while True:
            end = self.buffer.find(b"\n\n")
            if end >= 0:
                message, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
                lines = [ln[5:].lstrip() for ln in message.split(b"\n") if ln.startswith(b"data:")]
                if lines:  # else a comment (keep-alive) or a field the gateway does not use
                    return b"\n".join(lines)
                continue
            data = await self.response.content.readany()
            if not data:
                return None
            self.buffer = (self.buffer + data).replace(b"\r\n", b"\n")


class Relay:
    """One client request through the gateway: its attempts on backends and what the client has
    received so far (so that a continuation elsewhere starts exactly where the client is)."""

    def __init__(self, gw: Gateway, c: protocol.Completion, fault: str | None) -> None:
        self.gw = gw
        self.c = c
        self.chat = c.chat
        self.body = dict(c.body)
        self.rid = ("chatcmpl-" if c.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.received = time.monotonic()
        self.fault = fault
        self.token_prompt = isinstance(c.context[0], int)
        self.state = ProxiedState(_request(self.rid, c), block_hashes(c.context))
        self.budget = gw.settings.retries
        self.avoid: set[int] = set()  # backends that failed this request
        self.errors: list[str] = []
        # What the client has received.
        self.text = ""  # completions' text, or chat's content
        self.reasoning = ""  # chat's reasoning_content
        self.ids: list[int] = []
        self.ids_complete = True  # every token came with its id (a token prompt can continue)
        self.tokens = 0
        self.forwarded = False
        self.finish: str | None = None
        self.thought = False  # the reasoning boundary has passed
        self.hidden_end = False  # it was a `</think>` that no chunk showed (chat)
        self.prompt_tokens: int | None = None
        self.earlier_tokens = 0  # tokens of attempts that ended before the last
        # The attempt in progress.
        self.backend: Backend | None = None
        self.response: aiohttp.ClientResponse | None = None
        self.reader: SSE | None = None
        self.attempts = 0
        self.pending: dict | None = None  # its first event, read when it was connected
        self.pending_done = False
        self.sent_at = 0.0
        self.ahead = 0
        self.awaiting = False
        self.carried = 0  # tokens its context already held
        self.attempt_tokens = 0
        self.attempt_usage: dict | None = None
        self.outcome: str | None = None
        self.last_reason = ""  # of the last failure
        self.completion_tokens = 0
        self._closed = False
        gw.metrics.in_flight.inc()

    # --- bookkeeping ------------------------------------------------------------------------
    def end(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.gw.metrics.requests.labels(outcome).inc()

    def close(self) -> None:
        """Release everything the request holds (idempotent); a request that never ended
        otherwise was abandoned by its client."""
        if self.backend is not None:
            self._end_attempt(abort=True, finished=True)
        self.gw.mirrors.live.discard(self.state)
        if self.outcome is None:
            self.end("cancelled")
        if not self._closed:
            self._closed = True
            self.gw.metrics.in_flight.dec()

    def _begin(self, backend: Backend) -> None:
        now = time.monotonic()
        self.backend = backend
        self.ahead = backend.waiting
        backend.in_flight += 1
        backend.awaiting_first += 1
        backend.breaker.dispatched()
        self.awaiting = True
        self.sent_at = now
        self.carried = self.tokens
        self.attempt_tokens = 0
        self.attempt_usage = None
        self.gw.mirrors.add(self.state, backend.index, now)
        self.gw.prefixes.insert(backend.index, self.state.hashes)
        self.gw.metrics.sent.labels(backend.url).inc()

    def _first_token(self, now: float) -> None:
        b = self.backend
        assert b is not None
        if self.awaiting:
            self.awaiting = False
            b.awaiting_first -= 1
            b.ttft.add(now - self.sent_at, self.ahead)

    def _end_attempt(self, *, abort: bool, finished: bool) -> None:
        b = self.backend
        assert b is not None
        if self.awaiting:
            self.awaiting = False
            b.awaiting_first -= 1
        b.in_flight -= 1
        self.gw.mirrors.remove(self.state, finished=finished)
        if self.response is not None:
            if abort:
                self.response.close()  # closes the connection: vLLM aborts the request
            else:
                self.response.release()
        if not finished:
            self.earlier_tokens += self.attempt_tokens
        self.backend = self.response = self.reader = None

    def _failed(self, backend: Backend, reason: str, message: str, *, breaker: bool) -> None:
        self.errors.append(f"{backend.url}: {message}")
        self.last_reason = reason
        self.avoid.add(backend.index)
        self.gw.metrics.failures.labels(backend.url, reason).inc()
        if breaker:
            backend.breaker.failure(time.monotonic())
        logger.info("request %s: %s failed: %s", self.rid, backend.url, message)

    # --- sending ----------------------------------------------------------------------------
    def upstream_body(self) -> dict[str, Any]:
        """The body for the next attempt: the client's, streamed, continued from what the
        client has already received."""
        body = dict(self.body)
        body["stream"] = True
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        if self.token_prompt:
            body["return_token_ids"] = True
        if not self.tokens:
            return body
        if self.chat:
            partial = self.partial_message()
            messages = list(body["messages"])
            if body.get("continue_final_message"):  # the client's own continuation
                last = dict(messages[-1])
                last["content"] = (last.get("content") or "") + partial
                messages[-1] = last
            else:
                messages.append({"role": "assistant", "content": partial})
            body["messages"] = messages
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        elif self.token_prompt:
            body["prompt"] = list(_unwrap(self.body["prompt"])) + self.ids
        else:
            body["prompt"] = _unwrap(self.body["prompt"]) + self.text
        if self.c.max_tokens is not None:
            left = self.c.max_tokens - self.tokens
            for key in ("max_tokens", "max_completion_tokens"):
                if key in body:
                    body[key] = left
        return body

    def partial_message(self) -> str:
        """Chat's output so far as one assistant message: the reasoning, its end, the answer."""
        end = " " + protocol.THINK_END if self.hidden_end else ""
        return self.reasoning + end + self.text

    def can_continue(self) -> bool:
        return not (self.token_prompt and self.tokens and not self.ids_complete)

    def done(self) -> bool:
        """Nothing is left to generate: the finish reason came, or the token cap is reached."""
        if self.finish is not None:
            return True
        if self.c.max_tokens is not None and self.tokens >= self.c.max_tokens:
            return True
        total = self.c.args.output_tokens
        return total is not None and self.tokens >= total - self.c.already

    async def connect(self, backend: Backend) -> bool:
        """Send the request to `backend` and wait for its first event. True: it streams;
        False: it failed (recorded). Raises PassThrough for the client's own 4xx errors."""
        s = self.gw.settings
        assert self.gw.session is not None
        headers = {"X-Request-Id": f"{self.rid}-{self.attempts}"}
        if self.fault and self.attempts == 0:
            headers[FAULT_HEADER] = self.fault  # a test's fault, for the first attempt only
        self.attempts += 1
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        body = self.upstream_body()
        self._begin(backend)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout)
        try:
            async with asyncio.timeout(s.first_byte_timeout):
                self.response = await self.gw.session.post(
                    backend.url + path, json=body, headers=headers, timeout=timeout
                )
                status = self.response.status
                if status != 200:
                    await self._refused(backend, self.response)
                    return False
                self.reader = SSE(self.response)
                event = await self._next_event(None)
        except TimeoutError:
            message = f"no first event within {s.first_byte_timeout:g} s"
            self._end_attempt(abort=True, finished=False)
            self._failed(backend, "timeout", message, breaker=True)
            return False
        except aiohttp.ClientConnectorError as e:
            self._end_attempt(abort=True, finished=False)
            self._failed(backend, "connect", f"cannot connect: {e}", breaker=True)
            return False
        except aiohttp.ClientError as e:
            self._end_attempt(abort=True, finished=False)
            self._failed(backend, "cut", f"{type(e).__name__}: {e}", breaker=True)
            return False
        except Broken as e:
            self._end_attempt(abort=True, finished=False)
            self._failed(backend, e.reason, str(e), breaker=True)
            return False
        except PassThrough:
            self._end_attempt(abort=True, finished=False)
            raise
        backend.breaker.success()
        self.pending, self.pending_done = event, event is None
        return True

    async def _refused(self, backend: Backend, response: aiohttp.ClientResponse) -> None:
        """A non-200 answer: 429 and 5xx are the backend's (retry elsewhere, honouring
        Retry-After); any other is the client's error and goes back to it."""
        status = response.status
        text = await response.read()
        if status == 429 or status >= 500:
            after = _retry_after(response.headers.get("Retry-After"))
            if after:
                backend.skip_until = time.monotonic() + after
            message = f"HTTP {status}: {text[:300].decode(errors='replace')}"
            self._end_attempt(abort=False, finished=False)
            self._failed(backend, f"http_{status}", message, breaker=status >= 500)
            return
        if self.tokens:
            self._end_attempt(abort=False, finished=False)
            self._failed(
                backend,
                f"http_{status}",
                f"refused the continuation: HTTP {status}: {text[:300].decode(errors='replace')}",
                breaker=False,
            )
            self.budget = 0  # it is the continuation that is wrong: no other backend takes it
            return
        raise PassThrough(status, text, response.content_type or "application/json")

    async def dispatch(
        self, prefer: Backend | None = None, allowed: list[Backend] | None = None
    ) -> bool:
        """Connect to a backend (`prefer` first, if given): the router's choice (among
        `allowed` for the first try, if given), then others while the retry budget lasts.
        False when none streams."""
        if prefer is not None:
            if await self.connect(prefer):
                return True
            if not self._spend():
                return False
        while True:
            backend = self.gw.choose(self.state, self.avoid, allowed)
            allowed = None  # admission's filter decides the first try only
            if backend is None:
                self.errors.append("no backend is routable (all unhealthy or circuit open)")
                return False
            if await self.connect(backend):
                return True
            if not self._spend():
                return False

    def _spend(self) -> bool:
        """One more try, if the budget allows it (counted as a retry or a failover)."""
        if not self.can_continue():
            self.errors.append(
                "the prompt is token ids and a backend streamed tokens without "
                "their ids (return_token_ids): no backend can continue it"
            )
            return False
        if self.budget <= 0:
            return False
        self.budget -= 1
        counter = self.gw.metrics.failovers if self.forwarded else self.gw.metrics.retries
        counter.labels(self.last_reason).inc()
        return True

    async def _next_event(self, timeout: float | None) -> dict | None:
        """The next streamed event (None for `[DONE]`); raises Broken when the stream is."""
        assert self.reader is not None
        try:
            async with asyncio.timeout(timeout):
                payload = await self.reader.next()
        except TimeoutError:
            raise Broken("stall", f"the stream stalled (no event for {timeout:g} s)") from None
        except aiohttp.ClientError as e:
            raise Broken("cut", f"the stream broke: {type(e).__name__}: {e}") from None
        if payload is None:
            raise Broken("cut", "the stream ended before [DONE]")
        if payload == b"[DONE]":
            return None
        try:
            event = json.loads(payload)
        except ValueError:
            raise Broken("malformed", f"a malformed chunk: {payload[:80]!r}") from None
        if not isinstance(event, dict):
            raise Broken("malformed", f"a chunk that is not an object: {payload[:80]!r}")
        if "error" in event and not event.get("choices"):
            raise Broken("error", f"an error in the stream: {str(event['error'])[:200]}")
        return event

    # --- relaying ---------------------------------------------------------------------------
    async def start(self) -> Response | None:
        """Admission, then attempts until a backend streams. None: it streams; else the
        response for the client (its own error, a refusal, or the last failure)."""
        gw = self.gw
        allowed = None
        if gw.settings.slo_ttft is not None:
            refusal, allowed = self._admit(gw.settings.slo_ttft)
            if refusal is not None:
                gw.metrics.refused.inc()
                self.end("refused")
                return error_response(refusal, 429, "rate_limit_error")
        try:
            ok = await self.dispatch(allowed=allowed)
        except PassThrough as e:
            self.end("client_error")
            return e.response
        if ok:
            return None
        self.end("failed")
        return error_response(self.failure_message(), 502 if self.attempts else 503, "server_error")

    def _admit(self, slo: float) -> tuple[str | None, list[Backend] | None]:
        """SLO admission: the routable backends expected to give a first token within `slo`
        seconds, or the reason none is (TtftEstimator's estimate on the best one)."""
        now = time.monotonic()
        routable = self.gw.routable(now)
        if not routable:
            return None, None  # dispatch reports it (503), not an SLO refusal
        meets = [b for b in routable if b.estimate_ttft() <= slo]
        if meets:
            return None, meets
        best = min(routable, key=lambda b: b.estimate_ttft())
        per = best.ttft.estimate(0)
        return (
            f"refused: the estimated TTFT on the best backend ({best.url}) is "
            f"{best.estimate_ttft():.3f} s ({best.waiting} requests ahead, {per:.3f} s per "
            f"queue position over its last {len(best.ttft.samples)} requests), over the "
            f"SLO of {slo:g} s",
            None,
        )

    def failure_message(self) -> str:
        if not self.attempts:
            return self.errors[-1]
        tries = "; ".join(self.errors[-(self.gw.settings.retries + 2) :])
        return f"no backend could serve the request after {self.attempts} attempt(s): {tries}"

    async def chunks(self) -> AsyncIterator[dict]:
        """The client's chunks, across attempts; the request has ended (outcome set) when the
        iteration stops. Failures after the first byte continue elsewhere."""
        stall = self.gw.settings.stall_timeout
        while True:
            try:
                if self.pending is not None or self.pending_done:
                    event, self.pending, self.pending_done = self.pending, None, False
                else:
                    event = await self._next_event(stall)
                if event is None:  # [DONE]
                    self._finish()
                    return
                out, boundary = self._take(event)
                if out is not None:
                    yield out
                if boundary and not self.done():
                    moved = await self._migrate()
                    if moved is False:
                        self.end("failed")
                        return
            except Broken as e:
                backend = self.backend
                assert backend is not None
                if self.done():  # every token is in: the break lost nothing
                    self._finish(abort=True)
                    if self.finish is None:
                        self.finish = "length"
                        yield self._chunk_with(finish_reason="length")
                    return
                self._end_attempt(abort=True, finished=False)
                self._failed(backend, e.reason, str(e), breaker=True)
                if not (self._spend() and await self.dispatch()):
                    self.end("failed")
                    return

    def _finish(self, abort: bool = False) -> None:
        usage = self.attempt_usage or {}
        last = usage.get("completion_tokens")
        last = last if isinstance(last, int) else self.attempt_tokens
        self.completion_tokens = self.earlier_tokens + last
        self._end_attempt(abort=abort, finished=True)
        self.end("completed")

    def usage(self) -> dict[str, Any]:
        prompt = self.prompt_tokens if self.prompt_tokens is not None else self.c.prompt_tokens
        return protocol.usage(prompt, self.completion_tokens)

    def _chunk_with(self, **fields) -> dict:
        return protocol.chunk(
            self.rid, self.c.model, chat=self.chat, created=self.created, **fields
        )

    def _count(self, n: int, now: float) -> None:
        if n:
            self.gw.mirrors.tokens(self.state, n, now)
            self.tokens += n
            self.attempt_tokens += n

    def _take(self, event: dict) -> tuple[dict | None, bool]:
        """Book one event from the backend; returns the chunk for the client (None: nothing
        to forward) and whether it crossed the reasoning boundary."""
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.attempt_usage = usage
            if self.prompt_tokens is None and isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"] - self.carried
        choices = event.get("choices") or []
        if not choices:
            return None, False
        choice = dict(choices[0])
        if self.chat:
            delta = dict(choice.get("delta") or {})
            text = delta.get("content") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            if self.forwarded:
                delta.pop("role", None)  # a continuation's opening chunk
            choice["delta"] = delta
            opening = "role" in delta
        else:
            text, reasoning, opening = choice.get("text") or "", "", False
        ids = choice.get("token_ids")
        n = len(ids) if isinstance(ids, list) else int(bool(text or reasoning))
        finish = choice.get("finish_reason")
        if not n and finish is None and not opening:
            return None, False
        now = time.monotonic()
        boundary = False
        if n:
            if not isinstance(ids, list):
                self.ids_complete = False
            else:
                self.ids += ids
            if not self.tokens:
                self.gw.metrics.ttft.observe(now - self.received)
            self._first_token(now)
            state = self.state
            if not self.thought and self.chat and text and self.reasoning:
                # The answer's first token: vLLM's reasoning parser shows the `</think>` before
                # it in neither field, though it was generated and counts in the usage.
                self.hidden_end = protocol.THINK_END not in text
                self._count(int(self.hidden_end), now)
                boundary, state.reasoning_tokens = True, state.generated
            self._count(n, now)
            self.text += text
            self.reasoning += reasoning
            if not self.thought and not boundary:
                if protocol.THINK_END in text or protocol.THINK_END in reasoning:
                    boundary, state.reasoning_tokens = True, state.generated
            self.thought = self.thought or boundary
            if state.output_tokens <= max(state.generated, state.reasoning_tokens):
                state.output_tokens = max(state.generated, state.reasoning_tokens) + 1
        if finish is not None:
            self.finish = finish
        if not self.c.return_token_ids:
            choice.pop("token_ids", None)
        out = {k: v for k, v in event.items() if k not in ("usage", "prompt_token_ids")}
        if self.c.return_token_ids and self.forwarded:
            out.pop("prompt_token_ids", None)
        out.update(id=self.rid, created=self.created, model=self.c.model, choices=[choice])
        self.forwarded = True
        return out, boundary and self.gw.phase_aware

    async def _migrate(self) -> bool | None:
        """At the reasoning boundary: ask the router where the answer runs. None: it stays;
        True: it moved (or, the target failing, went on elsewhere); False: nothing took it."""
        gw, source = self.gw, self.backend
        assert source is not None
        now = time.monotonic()
        routable = gw.routable(now)
        if source not in routable:
            return None
        i = gw.router.on_phase_change(self.state, routable.index(source), gw.view(routable, now))
        target = routable[i]
        if target is source:
            return None
        logger.info("request %s migrates from %s to %s", self.rid, source.url, target.url)
        gw.metrics.migrations.inc()
        self.state.migrations += 1
        self._end_attempt(abort=True, finished=False)
        source.breaker.success()
        return await self.dispatch(prefer=target)

    # --- what the client gets ---------------------------------------------------------------
    async def sse(self) -> AsyncIterator[bytes]:
        """The streamed response: the chunks, then the usage chunk (if asked) and `[DONE]`, or
        an error event (and `[DONE]`, as vLLM ends a failed stream)."""
        try:
            try:
                async for chunk in self.chunks():
                    yield protocol.sse(chunk)
            except Exception as e:  # a bug must still end the client's stream explicitly
                logger.exception("request %s", self.rid)
                self.errors.append(f"the gateway failed: {type(e).__name__}: {e}")
                self.end("failed")
            if self.outcome == "completed":
                if self.c.include_usage:
                    final = self._chunk_with()
                    final["choices"] = []
                    final["usage"] = self.usage()
                    yield protocol.sse(final)
            else:
                message = self.failure_message()
                yield protocol.sse(protocol.error_body(message, "server_error", 502))
            yield protocol.DONE
        finally:
            self.close()

    async def collect(self) -> Response:
        """The whole response as one JSON object (a client that did not ask to stream)."""
        try:
            text, reasoning, ids = [], [], []
            async for chunk in self.chunks():
                choice = chunk["choices"][0]
                if self.chat:
                    delta = choice.get("delta") or {}
                    text.append(delta.get("content") or "")
                    reasoning.append(delta.get("reasoning_content") or "")
                else:
                    text.append(choice.get("text") or "")
                ids += choice.get("token_ids") or []
            if self.outcome != "completed":
                return error_response(self.failure_message(), 502, "server_error")
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
                if any(reasoning):
                    message["reasoning_content"] = "".join(reasoning)
                choice = {"index": 0, "message": message, "finish_reason": self.finish}
                kind = "chat.completion"
            else:
                choice = {
                    "index": 0,
                    "text": "".join(text),
                    "logprobs": None,
                    "finish_reason": self.finish,
                }
                kind = "text_completion"
            if self.c.return_token_ids:
                choice["token_ids"] = ids
            return JSONResponse(
                {
                    "id": self.rid,
                    "object": kind,
                    "created": self.created,
                    "model": self.c.model,
                    "choices": [choice],
                    "usage": self.usage(),
                }
            )
        finally:
            self.close()


class RelayStream(StreamingResponse):
    """A streamed response that releases its request however the stream ends (the client
    leaving included: the backend's request is aborted then)."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay.sse(), media_type="text/event-stream")
        self.relay = relay

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
            self.relay.close()


def _request(rid: str, c: protocol.Completion) -> Request:
    """The simulator's Request for a router: lengths from vllm_xargs (or max_tokens), and
    the request's own priority, score, tier and SLOs."""
    a = c.args
    reasoning = a.reasoning_tokens or 0
    output = max(a.output_tokens or c.max_tokens or DEFAULT_OUTPUT, reasoning + 1)
    return Request(
        rid,
        time.monotonic(),
        c.prompt_tokens,
        output,
        reasoning,
        priority=c.priority,
        score=a.score,
        tier=a.tier,
        ttft_slo=a.ttft,
        tpot_slo=a.tbt,
    )


def _retry_after(value: str | None) -> float:
    try:
        seconds = float(value) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: not worth parsing, retried elsewhere anyway
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


# --- the app ------------------------------------------------------------------------------------
def create_app(settings: Settings) -> FastAPI:
    gw = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        yield
        await gw.stop()

    app = FastAPI(title="llmsched gateway", lifespan=lifespan)
    app.state.gateway = gw

    async def relay(request: HttpRequest, chat: bool) -> Response:
        try:
            body = await request.json()
        except ValueError:
            gw.metrics.requests.labels("client_error").inc()
            return error_response("the body is not JSON", 400)
        try:
            if isinstance(body, dict) and body.get("n", 1) != 1:
                raise protocol.BadRequest("the gateway serves n=1 only")
            c = protocol.parse_completion(body, chat=chat)
            score = await gw.score(c)
        except protocol.BadRequest as e:
            gw.metrics.requests.labels("client_error").inc()
            return error_response(str(e), 400)
        if score is not None:
            c.body = dict(c.body)
            c.body["priority"] = c.priority = gw.priority(score)
            c.body["vllm_xargs"] = {**(c.body.get("vllm_xargs") or {}), "score": score}
        r = Relay(gw, c, request.headers.get(FAULT_HEADER))
        try:
            refusal = await r.start()
        except Exception:
            r.end("failed")
            r.close()
            raise
        except BaseException:
            r.close()
            raise
        if refusal is not None:
            r.close()
            return refusal
        if c.stream:
            return RelayStream(r)
        return await r.collect()

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Response:
        return await relay(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Response:
        return await relay(request, chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        assert gw.session is not None
        for b in gw.routable(time.monotonic()):
            try:
                async with asyncio.timeout(settings.health_timeout):
                    async with gw.session.get(b.url + "/v1/models") as r:
                        if r.status == 200:
                            return Response(await r.read(), media_type="application/json")
            except (TimeoutError, aiohttp.ClientError):
                continue
        return error_response("no healthy backend answered /v1/models", 503, "server_error")

    @app.get("/health")
    async def health() -> Response:
        now = time.monotonic()
        states = {
            b.url: {
                "healthy": b.healthy,
                "circuit": b.breaker.state_at(now).name.lower(),
                "routable": b.routable(now),
                "in_flight": b.in_flight,
                "scraped": {
                    "running": b.scraped.running,
                    "waiting": b.scraped.waiting,
                    "kv_usage": b.scraped.kv_usage,
                },
                **({"error": b.health_error} if b.health_error else {}),
            }
            for b in gw.backends
        }
        ok = any(s["routable"] for s in states.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "backends": states},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: list[str] | None = None) -> int:
    """`llmsched serve gateway ...`: 0 when the server stopped, 2 on bad flags."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own message already printed
        return int(e.code or 0)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
