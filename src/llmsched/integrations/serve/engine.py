"""`llmsched serve engine`: an emulated vLLM server. llm-d-inference-sim's OpenAI surface, with
its timing from llmsched's engine running in real time instead of fixed latencies.

Each request becomes a simulated request (prompt = the context's tokens, output = the true
length in `vllm_xargs`, else `max_tokens`) on one simulated instance with the chosen model, GPU
and policy; its tokens are streamed when the simulated engine makes them (realtime.py). The
text is protocol.py's: output token k is the word `t{k}`, so a client can check that a stream
is whole. `priority` and `vllm_xargs` (score, tier, tbt, ttft) reach the policy as they reach
llmsched's vLLM scheduler classes; a reasoning request streams `reasoning_content` before
`content`, and vLLM's reasoning parser's rule is kept: `</think>` itself is in no chunk.
Faults are injected on request (faults.py); a full waiting queue answers 429 (or 503).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmsched.engine.prefix_cache import BlockHasher
from llmsched.engine.state import RequestState
from llmsched.integrations.serve import protocol as p
from llmsched.integrations.serve.faults import HEADER, Fault, FaultPlan, parse_rates
from llmsched.integrations.serve.metrics import EngineMetrics
from llmsched.integrations.serve.realtime import LiveRequest, RealtimeEngine
from llmsched.workload.request import Request, Runs

log = logging.getLogger("llmsched.serve.engine")


class InjectedCut(Exception):
    """Raised inside a stream to drop the connection on purpose (a `cut` or `stall` fault)."""


class _QuietCuts(logging.Filter):
    """uvicorn logs an exception that ends a stream; an injected cut is no error to report."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, InjectedCut):
                return False
            exc = exc.__cause__ or exc.__context__
        return True


@dataclass
class EngineSettings:
    served_model: str
    max_model_len: int
    max_waiting: int | None = None  # refuse new requests when this many wait
    queue_full_status: int = 429
    stall_seconds: float = 30.0  # a `stall` fault's silence before the close


def prompt_runs(context: list[str] | list[int], block_size: int) -> Runs | None:
    """The prompt's full blocks as runs keyed by their tokens: two prompts that begin with the
    same tokens share those blocks in the prefix cache (as vLLM's hash chain over token ids). A
    continuation's earlier output is text here, keyed like any prompt text, so it does not meet
    the blocks its first response cached (keyed by that request's id): only prompt text hits."""
    full = len(context) // block_size * block_size
    runs = tuple(
        (("tokens", tuple(context[i : i + block_size])), block_size)
        for i in range(0, full, block_size)
    )
    return runs or None


def create_app(engine: RealtimeEngine, settings: EngineSettings, faults: FaultPlan):
    metrics = EngineMetrics(
        engine, settings.served_model, settings.max_model_len, engine.cluster.config
    )
    finish_reasons: dict[str, str] = {}  # "length" when max_tokens cut the output, else "stop"
    engine.on_finish = lambda state, times: metrics.finished(
        state, times, finish_reasons.pop(state.request_id)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="llmsched emulated engine", lifespan=lifespan)
    app.state.engine = engine

    def error(message: str, status: int, kind: str = "invalid_request_error", headers=None):
        return JSONResponse(p.error_body(message, kind, status), status, headers=headers)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.served_model,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "llmsched",
                    "root": settings.served_model,
                    "max_model_len": settings.max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def complete(http: HttpRequest, chat: bool):
        try:
            body = await http.json()
        except ValueError:
            return error("the body is not JSON", 400)
        try:
            req = p.parse_completion(body, chat=chat)
            if req.model != settings.served_model:
                return error(f"the model `{req.model}` does not exist", 404, "NotFoundError")
            left, reasoning = req.lengths(settings.max_model_len)
            fault = faults.draw(http.headers.get(HEADER))
        except (p.BadRequest, ValueError) as e:
            return error(str(e), 400)
        if fault is not None and fault.kind == "error":
            status = faults.status(fault)
            return error(f"injected fault: HTTP {status}", status, "InternalServerError")
        if settings.max_waiting is not None and engine.num_waiting >= settings.max_waiting:
            return error(
                f"the waiting queue is full ({engine.num_waiting} requests)",
                settings.queue_full_status,
                "ServiceUnavailableError",
                headers={"Retry-After": "1"},
            )
        rid = engine.new_id("chatcmpl" if chat else "cmpl")
        remaining_reasoning = max(0, reasoning - req.already)
        args = req.args
        live = engine.submit(
            Request(
                request_id=rid,
                arrival=0.0,
                prompt_tokens=req.prompt_tokens,
                output_tokens=left,
                # A response capped inside the reasoning is all reasoning to the policy.
                reasoning_tokens=remaining_reasoning if remaining_reasoning < left else 0,
                priority=req.priority,
                score=args.score,
                tier=args.tier,
                tpot_slo=args.tbt,
                ttft_slo=args.ttft,
                prefix=prompt_runs(req.context, engine.cluster.config.block_size),
                session_id=args.session_id,
                turn=args.turn,
                tool=args.tool,
                is_last_step=args.is_last_step,
            )
        )
        if isinstance(live, str):
            return error(live, 400)  # longer than the context: vLLM's 400
        metrics.arrived(req.prompt_tokens)
        # "stop" when the request's true output ends here (its EOS), "length" when the cap did.
        total = req.args.output_tokens
        ends = total is not None and req.already + left == total
        reply = _Reply(req, rid, reasoning, "stop" if ends else "length", live.state)
        finish_reasons[rid] = reply.finish_reason
        if not req.stream:
            return await _whole(engine, live, reply, metrics)
        return StreamingResponse(
            _stream(engine, live, reply, fault, settings, metrics),
            media_type="text/event-stream",
        )

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, chat=True)

    return app


@dataclass
class _Reply:
    """What the engine writes for one request: its tokens' words, ids and chunks."""

    req: p.Completion
    rid: str
    reasoning: int  # the request's whole reasoning length (for the words' numbering)
    finish_reason: str
    state: RequestState  # the engine's request (its prefix-cache hit)
    sent: int = 0  # tokens written

    def chunk_of(self, k: int, last: bool) -> dict[str, Any] | None:
        """The chunk of output token k (numbered over the request), or None (`</think>` in
        chat, which vLLM's reasoning parser keeps out of both fields)."""
        word, req = p.output_word(k, self.reasoning), self.req
        ids = [p.output_id(k, self.reasoning)] if req.return_token_ids else None
        finish = self.finish_reason if last else None
        text = reasoning = None
        if not req.chat:
            text = " " + word
        elif k < self.reasoning - 1:
            reasoning = " " + word
        elif k >= self.reasoning:
            text = " " + word
        elif not last:
            return None
        c = p.chunk(self.rid, req.model, chat=req.chat, text=text, reasoning=reasoning,
                    finish_reason=finish, token_ids=ids)  # fmt: skip
        if req.chat and k == req.already:  # the response's first token
            c["choices"][0]["delta"]["role"] = "assistant"
        return c

    def usage(self) -> dict[str, Any]:
        # vLLM's num_cached_tokens: the prefix-cache hit at its first admission (-1: none yet)
        return p.usage(self.req.prompt_tokens, self.sent, max(self.state.cached_tokens, 0))


async def _tokens(engine: RealtimeEngine, live: LiveRequest, metrics) -> AsyncIterator[int]:
    """The request's tokens as the engine makes them; count per token; metrics at the end."""
    while True:
        batch = await live.queue.get()
        for _ in range(len(batch.times)):
            yield 1
        metrics.generation_tokens.inc(len(batch.times))
        if batch.finished:
            return


async def _stream(engine, live, reply: _Reply, fault: Fault | None, settings, metrics):
    total = live.state.output_tokens
    strike = FaultPlan.strikes_after(fault, total) if fault is not None else None
    done = False
    try:
        async for _ in _tokens(engine, live, metrics):
            if strike is not None and reply.sent == strike:
                if fault.kind == "malformed":
                    yield b'data: {"id": "' + reply.rid.encode() + b'", "choices": [\n\n'
                    strike = None
                else:
                    if fault.kind == "stall":
                        await asyncio.sleep(settings.stall_seconds)
                    raise InjectedCut(f"injected {fault.kind} after {reply.sent} tokens")
            k = reply.req.already + reply.sent
            reply.sent += 1
            c = reply.chunk_of(k, last=reply.sent == total)
            if c is not None:
                yield p.sse(c)
        done = True
        if reply.req.include_usage:
            yield p.sse(
                {"id": reply.rid, "object": _object(reply.req), "created": int(time.time()),
                 "model": reply.req.model, "choices": [], "usage": reply.usage()}
            )  # fmt: skip
        yield p.DONE
    finally:
        if not done and engine.abort(live):  # the client went away, or a fault cut it
            metrics.success.labels(*metrics.labels, "abort").inc()


def _object(req: p.Completion) -> str:
    return "chat.completion.chunk" if req.chat else "text_completion"


async def _whole(engine, live, reply: _Reply, metrics) -> dict[str, Any]:
    total = live.state.output_tokens
    texts, reasoning, ids = [], [], []
    async for _ in _tokens(engine, live, metrics):
        k = reply.req.already + reply.sent
        reply.sent += 1
        word = " " + p.output_word(k, reply.reasoning)
        ids.append(p.output_id(k, reply.reasoning))
        if reply.req.chat and k < reply.reasoning - 1:
            reasoning.append(word)
        elif not reply.req.chat or k >= reply.reasoning:
            texts.append(word)
    assert reply.sent == total
    if reply.req.chat:
        message = {"role": "assistant", "content": "".join(texts)}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        choice: dict[str, Any] = {"index": 0, "message": message}
    else:
        choice = {"index": 0, "text": "".join(texts)}
    choice["finish_reason"] = reply.finish_reason
    if reply.req.return_token_ids:
        choice["token_ids"] = ids
    return {
        "id": reply.rid,
        "object": "chat.completion" if reply.req.chat else "text_completion",
        "created": int(time.time()),
        "model": reply.req.model,
        "choices": [choice],
        "usage": reply.usage(),
    }


# --- the command -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from llmsched.cli import engine_flags

    parser = argparse.ArgumentParser(
        prog="llmsched serve engine",
        parents=[engine_flags(cluster=False)],
        description="An emulated vLLM server: the OpenAI API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics in vLLM's names) over llmsched's "
        "simulated engine running in real time. No GPU, no weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s = parser.add_argument_group("server")
    s.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings (flags win)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--policy", help="the engine's scheduling policy (llmsched list; default fcfs)")
    s.add_argument(
        "--served-model-name", metavar="NAME", help="the model's name in the API (default: --model)"
    )
    s.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="S",
        help="simulated seconds per wall second (1: real time; tests run faster)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the random faults")
    f = parser.add_argument_group("faults")
    f.add_argument(
        "--fault",
        action="append",
        metavar="NAME=RATE",
        help="inject a fault into this share of requests: error, cut, stall, malformed "
        "(repeatable; a request's X-Llmsched-Fault header also chooses one)",
    )
    f.add_argument("--error-status", type=int, default=500, help="HTTP status of `error`")
    f.add_argument("--stall-seconds", type=float, default=30.0, help="a stall's silence")
    f.add_argument(
        "--max-waiting",
        type=int,
        metavar="N",
        help="refuse requests while N wait (default: never)",
    )
    f.add_argument("--queue-full-status", type=int, choices=[429, 503], default=429)
    f.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def build(args: argparse.Namespace):
    """The app for parsed flags (no server started)."""
    from llmsched.cli import config_from_flags
    from llmsched.experiment import build_cluster

    cfg = config_from_flags(args, policy=args.policy, instances=1)
    cfg.validate()
    cluster, resolved = build_cluster(cfg)
    if cluster.config.enable_prefix_caching:  # on by default, as in vLLM V1 (prompts bring runs)
        hasher = BlockHasher()
        for inst in cluster.instances:
            inst.use_prefix_cache(hasher)
    engine = RealtimeEngine(cluster, args.time_scale)
    settings = EngineSettings(
        served_model=args.served_model_name or cfg.model,
        max_model_len=cluster.config.max_model_len,
        max_waiting=args.max_waiting,
        queue_full_status=args.queue_full_status,
        stall_seconds=args.stall_seconds,
    )
    if not 400 <= args.error_status <= 599:
        raise ValueError(f"--error-status {args.error_status}: give an HTTP error status 400-599")
    faults = FaultPlan(parse_rates(args.fault), args.seed, args.error_status)
    return create_app(engine, settings, faults), resolved


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    try:
        app, resolved = build(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"llmsched serve engine: error: {err}", file=sys.stderr)
        return 2
    logging.getLogger("uvicorn.error").addFilter(_QuietCuts())
    print(
        f"llmsched serve engine: {resolved['model']} on {resolved['gpu']}, policy "
        f"{args.policy or 'fcfs'}, {resolved['num_blocks']} KV blocks, time x{args.time_scale:g}, "
        f"http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
