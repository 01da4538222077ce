"""The gateway's backends: where each OpenAI-compatible server stands, as the gateway knows it.

Three sources, each with its own blind spot, kept apart so that a router can weigh them:

* the gateway's own requests on the backend (in flight, and those still waiting for their
  first token): exact and current, but blind to other clients of the same server;
* the server's ``/metrics`` (vLLM's ``num_requests_running``, ``num_requests_waiting``,
  ``kv_cache_usage_perc``, and ``cache_config_info``'s ``num_gpu_blocks``): every client's
  load, but as old as the last scrape;
* its ``/health`` and the outcome of each request sent to it: a :class:`Breaker` opens after
  `threshold` failures in a row and keeps the backend out of routing for `cooldown` seconds,
  then lets one trial request through (half-open) that closes it again or reopens it. This is
  what keeps one unresponsive server from hanging every request (production-stack #749).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger("llmsched.gateway")


class Circuit(Enum):
    CLOSED = 0  # requests flow
    OPEN = 1  # failing: no request until the cooldown has passed
    HALF_OPEN = 2  # cooldown over: one trial request decides


class Breaker:
    """Closed → Open after `threshold` consecutive failures; Open → HalfOpen after `cooldown`
    seconds; HalfOpen admits one trial request: its success closes the circuit, its failure
    opens it again for another cooldown."""

    def __init__(self, threshold: int = 3, cooldown: float = 10.0) -> None:
        if threshold < 1:
            raise ValueError(f"the failure threshold must be >= 1, got {threshold}")
        if cooldown < 0:
            raise ValueError(f"the cooldown must be >= 0 s, got {cooldown}")
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = Circuit.CLOSED
        self.failures = 0  # consecutive
        self.opened_at = 0.0
        self.trial = False  # a half-open trial request is in flight

    def state_at(self, now: float) -> Circuit:
        """The state at `now` (Open turns HalfOpen once the cooldown is over)."""
        if self.state is Circuit.OPEN and now - self.opened_at >= self.cooldown:
            self.state = Circuit.HALF_OPEN
            self.trial = False
        return self.state

    def available(self, now: float) -> bool:
        """May a request be sent now?"""
        if self.state_at(now) is Circuit.HALF_OPEN:
            return not self.trial
        return self.state is Circuit.CLOSED

    def dispatched(self) -> None:
        """A request was sent: in HalfOpen it is the trial, and no other goes until it ends."""
        if self.state is Circuit.HALF_OPEN:
            self.trial = True

    def success(self) -> None:
        self.state = Circuit.CLOSED
        self.failures = 0
        self.trial = False

    def failure(self, now: float) -> None:
        self.failures += 1
        self.trial = False
        if self.state is Circuit.HALF_OPEN or self.failures >= self.threshold:
            self.state = Circuit.OPEN
            self.opened_at = now


class TtftEstimator:
    """The TTFT a new request would see on one backend, for SLO admission.

    Each request the gateway sends records its measured TTFT (sent → first token, as the
    gateway sees it) together with the number of the gateway's requests on that backend that
    were still waiting for their first token when it was sent (its queue position q). One
    sample gives a time per queue position, TTFT / (q + 1); the estimate for a new request is
    ``(waiting + 1) × median`` of the last `window` such per-position times, where `waiting` is
    the requests ahead of it now (the gateway's own that have no token yet, or the scraped
    ``num_requests_waiting`` when larger). The median shrugs off one slow outlier; the per-
    position time makes samples taken at different queue depths comparable, on the assumption
    that first tokens come out in queue order at a steady rate. With no sample yet the estimate
    is 0: no evidence, so no refusal.
    """

    def __init__(self, window: int = 32) -> None:
        self.samples: deque[float] = deque(maxlen=window)

    def add(self, ttft: float, ahead: int) -> None:
        self.samples.append(ttft / (ahead + 1))

    def estimate(self, waiting: int) -> float:
        if not self.samples:
            return 0.0
        return (waiting + 1) * statistics.median(self.samples)


@dataclass
class Scraped:
    """What the backend's last /metrics said (None: not exported, or not scraped yet)."""

    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None  # fraction of GPU KV blocks in use, 0..1
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    at: float | None = None  # when (monotonic seconds)


def parse_metrics(text: str) -> Scraped:
    """vLLM's load gauges from Prometheus text (summed over label sets, e.g. several models)."""
    out = Scraped()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        name = family.name
        if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            sums[name] = sums.get(name, 0.0) + sum(s.value for s in family.samples)
        elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            values = [s.value for s in family.samples]
            if values:
                out.kv_usage = max(values)
        elif name in ("vllm:cache_config_info", "vllm:cache_config"):  # gauge, or info type
            for s in family.samples:
                blocks = s.labels.get("num_gpu_blocks")
                size = s.labels.get("block_size")
                if blocks not in (None, "", "None"):
                    out.num_gpu_blocks = int(float(blocks))
                if size not in (None, "", "None"):
                    out.block_size = int(float(size))
    if "vllm:num_requests_running" in sums:
        out.running = int(sums["vllm:num_requests_running"])
    if "vllm:num_requests_waiting" in sums:
        out.waiting = int(sums["vllm:num_requests_waiting"])
    return out


def check_url(url: str) -> str:
    """A backend's base URL, normalised (no trailing slash, no /v1); ValueError says why not."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL such as http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    base = url.strip().rstrip("/")
    return base.removesuffix("/v1")


@dataclass
class Backend:
    """One OpenAI-compatible server behind the gateway."""

    index: int
    url: str
    breaker: Breaker = field(default_factory=Breaker)
    healthy: bool = True  # the last /health answered 200 in time
    health_error: str = ""
    scraped: Scraped = field(default_factory=Scraped)
    ttft: TtftEstimator = field(default_factory=TtftEstimator)
    # The gateway's own requests on it: exact and current.
    in_flight: int = 0
    awaiting_first: int = 0  # of which no token has come back yet
    skip_until: float = 0.0  # a Retry-After it sent (429/503): not routed before then

    def routable(self, now: float) -> bool:
        return self.healthy and now >= self.skip_until and self.breaker.available(now)

    @property
    def waiting(self) -> int:
        """Requests ahead of a new one: the gateway's without a first token, or the scraped
        waiting queue when larger (other clients' requests)."""
        return max(self.awaiting_first, self.scraped.waiting or 0)

    def estimate_ttft(self) -> float:
        return self.ttft.estimate(self.waiting)

    # --- the periodic checks ------------------------------------------------------------------
    async def check(self, session: aiohttp.ClientSession, timeout: float) -> None:
        """GET /health, then (if healthy) scrape /metrics; each within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                async with session.get(self.url + "/health") as r:
                    await r.read()
                    ok, why = r.status == 200, f"/health answered HTTP {r.status}"
        except TimeoutError:
            ok, why = False, f"/health did not answer within {timeout:g} s"
        except aiohttp.ClientError as e:
            ok, why = False, f"/health: {type(e).__name__}: {e}"
        if ok != self.healthy:
            logger.warning(
                "backend %s is %s%s",
                self.url,
                "healthy" if ok else "unhealthy",
                "" if ok else f" ({why})",
            )
        self.healthy, self.health_error = ok, "" if ok else why
        if not ok:
            return
        try:
            async with asyncio.timeout(timeout):
                async with session.get(self.url + "/metrics") as r:
                    if r.status != 200:
                        return
                    text = await r.text()
            self.scraped = parse_metrics(text)
            self.scraped.at = time.monotonic()
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            logger.debug("scraping %s/metrics failed: %s", self.url, e)
