"""The gateway's settings and command line: every flag checked, a bad one refused with a
message that names it and what it expects."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, field
from typing import Any

import yaml

from llmsched.integrations.serve.backends import check_url
from llmsched.policies import Router, router_class
from llmsched.workload.scores import ScoreSpec

#: --scores sources the gateway can compute per request (noisy-oracle needs a whole workload).
GATEWAY_SCORES = ("prompt-length", "oracle", "model")


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
