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

import asyncio
import contextlib
import logging
import sys
import time

import aiohttp
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from llmsched.integrations.serve import protocol
from llmsched.integrations.serve.backends import Backend, Breaker
from llmsched.integrations.serve.gateway_settings import Settings, build_parser, settings_from_args
from llmsched.integrations.serve.relay import (
    FAULT_HEADER,
    Relay,
    RelayStream,
    error_response,
    prompt_text,
)
from llmsched.integrations.serve.view import (
    GatewayView,
    Mirrors,
    PrefixIndex,
    ProxiedState,
)
from llmsched.policies import Router, router_class

logger = logging.getLogger("llmsched.gateway")

disable_created_metrics()  # as vLLM: no `_created` series beside every counter

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
        except Exception as e:  # a bug: logged with its traceback, and an OpenAI error body
            logger.exception("request %s failed before its first byte", r.rid)
            r.end("failed")
            r.close()
            return error_response(
                f"the gateway failed: {type(e).__name__}: {e}", 500, "server_error"
            )
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
