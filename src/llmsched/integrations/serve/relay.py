"""One client request through the gateway: its attempts on backends (retries before the first
byte, failover and migration after it) and the one continuous stream the client receives.

A continuation starts exactly where the client is: the text (or token ids) it has received
is sent again as context (protocol.py), `max_tokens` lowered to what is left; the client sees
one id, each token once, one usage chunk and one `[DONE]`, or an error event that ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmsched.integrations.serve import protocol
from llmsched.integrations.serve.backends import Backend
from llmsched.integrations.serve.faults import HEADER as FAULT_HEADER
from llmsched.integrations.serve.view import (
    ProxiedState,
    block_hashes,
)
from llmsched.workload.request import Request

logger = logging.getLogger("llmsched.gateway")

DEFAULT_OUTPUT = 256  # output tokens a router assumes when the request does not say

if TYPE_CHECKING:
    from llmsched.integrations.serve.gateway import Gateway


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

    def ready(self) -> bool:
        """A whole event is buffered: the next `next()` returns without waiting."""
        return b"\n\n" in self.buffer

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
        self.watchdog: asyncio.TimerHandle | None = None  # the stall watchdog (_watch)
        self.deadline = 0.0  # when the stream counts as stalled, unless an event comes first
        self.stalled = False
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

    def _watch(self) -> None:
        """Watch the attempt's stream for a stall. One timer per stall period, not one per
        event: each event only moves `deadline`; when the timer fires before it, it waits on;
        after it, the connection is closed, and the read in progress fails as a stall."""
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.stalled = False
        self.deadline = time.monotonic() + self.gw.settings.stall_timeout
        loop = asyncio.get_running_loop()

        def check() -> None:
            now = time.monotonic()
            if now < self.deadline:
                self.watchdog = loop.call_at(loop.time() + self.deadline - now, check)
            elif self.response is not None:
                self.stalled = True
                self.response.close()

        self.watchdog = loop.call_at(loop.time() + self.gw.settings.stall_timeout, check)

    def _end_attempt(self, *, abort: bool, finished: bool) -> None:
        b = self.backend
        assert b is not None
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
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
                event = await self._next_event()
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
        self._watch()
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

    async def _next_event(self) -> dict | None:
        """The next streamed event (None for `[DONE]`); raises Broken when the stream is."""
        assert self.reader is not None
        self.deadline = time.monotonic() + self.gw.settings.stall_timeout
        try:
            payload = await self.reader.next()
        except aiohttp.ClientError as e:
            if self.stalled:
                stall = self.gw.settings.stall_timeout
                raise Broken("stall", f"the stream stalled (no event for {stall:g} s)") from None
            raise Broken("cut", f"the stream broke: {type(e).__name__}: {e}") from None
        if payload is None:
            raise Broken("cut", "the stream ended before [DONE]")
        if payload == b"[DONE]":
            return None
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
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
        while True:
            try:
                if self.pending is not None or self.pending_done:
                    event, self.pending, self.pending_done = self.pending, None, False
                else:
                    event = await self._next_event()
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
        batch: list[bytes] = []
        try:
            try:
                async for chunk in self.chunks():
                    batch.append(protocol.sse(chunk))
                    if not (self.reader is not None and self.reader.ready()):
                        yield b"".join(batch)  # one write for the events that came together
                        batch.clear()
            except Exception as e:  # a bug must still end the client's stream explicitly
                logger.exception("request %s", self.rid)
                self.errors.append(f"the gateway failed: {type(e).__name__}: {e}")
                self.end("failed")
            if batch:  # what was relayed reaches the client, whatever follows
                yield b"".join(batch)
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
