"""`llmsched bench`: a workload sent to an OpenAI-compatible server, measured as vLLM measures it.

The requests are those `llmsched simulate` would simulate with the same flags and seed (the
same `load_workload`): request i is sent at its arrival time after the first, with its prompt
and output length (`max_tokens`, `ignore_eos`), its priority and its llmsched data
(`vllm_xargs`: score, tier, TBT and TTFT targets) when the workload has them. The result is
`vllm bench serve`'s JSON (metrics/vllm_bench.py), so a measured run compares field by field
with a simulated one and with vLLM's own benchmark.

Prompts are token ids by default (`/v1/completions` takes them): exact lengths, and ids drawn
at random so that no two prompts share a cached prefix. With `prompts="text"` (and always for
chat) the workload's prompt text is sent, or as many words as it has tokens; the server's
tokenizer then decides the length, which its `usage` reports and `input_lens` records.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmsched.bench.client import Outcome, RequestSpec, request_body, send
from llmsched.metrics.summary import PERCENTILES
from llmsched.metrics.vllm_bench import Outcomes, bench_metrics, result_json, run_metadata
from llmsched.workload.request import Workload

PROMPT_IDS = (1000, 10000)  # token ids drawn for prompts: plain words in any large vocabulary
PROMPT_WORD = "hello"  # a text prompt of n tokens is this word n times, unless the trace has text


def request_specs(workload: Workload, seed: int, prompts: str = "ids") -> list[RequestSpec]:
    """What to send for each request of the workload, in arrival order."""
    c = workload.columns
    rng = np.random.default_rng([seed, 0x6265_6E63])  # "benc": not the workload's own stream
    texts = c.get("prompt_text")
    specs = []
    for i in range(len(workload)):
        n = int(c["prompt_tokens"][i])
        if prompts == "ids":
            prompt: list[int] | str = rng.integers(*PROMPT_IDS, size=n).tolist()
        elif texts is not None and texts[i]:
            prompt = str(texts[i])
        else:
            prompt = " ".join([PROMPT_WORD] * n)
        xargs: dict[str, Any] = {}
        if not math.isnan(score := float(c["score"][i])):
            xargs["score"] = score
        if c["tier"] is not None and c["tier"][i]:
            xargs["tier"] = str(c["tier"][i])
        if not math.isnan(tbt := float(c["tpot_slo"][i])):
            xargs["tbt"] = tbt
        if not math.isnan(ttft := float(c["ttft_slo"][i])):
            xargs["ttft"] = ttft
        if reasoning := int(c["reasoning_tokens"][i]):
            # The true lengths, for servers that emulate them (llmsched serve engine) and
            # gateways that resume a stream; vLLM hands them to its scheduler untouched.
            xargs |= {"output_tokens": int(c["output_tokens"][i]), "reasoning_tokens": reasoning}
        priority = int(c["priority"][i])
        specs.append(
            RequestSpec(
                request_id=str(c["request_id"][i]),
                prompt=prompt,
                max_tokens=int(c["output_tokens"][i]),
                prompt_len=n,
                priority=priority if priority else None,
                xargs=xargs,
            )
        )
    return specs


async def first_model(base_url: str) -> str:
    """The first model the server lists (`vllm bench serve` does the same)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(base_url.rstrip("/") + "/v1/models") as response:
                if response.status != 200:
                    raise ValueError(
                        f"{base_url}/v1/models answered HTTP {response.status}: name the model "
                        "with --model"
                    )
                models = (await response.json()).get("data") or []
    except aiohttp.ClientError as e:
        raise ValueError(f"cannot reach {base_url} ({e}): is the server running?") from None
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model: name it with --model")
    return str(models[0]["id"])


async def send_all(
    specs: Sequence[RequestSpec],
    offsets: np.ndarray,
    url: str,
    model: str,
    *,
    chat: bool = False,
    ignore_eos: bool = True,
    max_concurrency: int | None = None,
    timeout: float = 600.0,
    progress: bool = False,
) -> tuple[list[Outcome], float]:
    """Send each request at its offset (seconds) from now; every request's outcome, in the
    order given, and the run's duration (from the first send to the last response)."""
    import aiohttp
    from tqdm import tqdm

    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    run = secrets.token_hex(4)  # X-Request-Id llmsched-<run>-<i>: a server's logs find them
    bar = tqdm(total=len(specs), desc="requests", unit="req", file=sys.stderr, disable=not progress)
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, force_close=False)
    session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=True
    )

    async def one(i: int, spec: RequestSpec, at: float) -> Outcome:
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = request_body(spec, model, chat, ignore_eos)
        rid = f"llmsched-{run}-{i}"
        if limit is None:
            out = await send(session, url, body, spec.prompt_len, timeout, rid)
        else:
            waited = time.perf_counter()
            async with limit:
                waited = time.perf_counter() - waited
                out = await send(session, url, body, spec.prompt_len, timeout, rid)
            out.queue_time = waited
        out.request_id = rid
        bar.update(1)
        if not out.success:
            bar.set_postfix_str(f"failed: {out.error[:60]}", refresh=False)
        return out

    try:
        start = time.perf_counter()
        tasks = [
            asyncio.ensure_future(one(i, s, start + float(t)))
            for i, (s, t) in enumerate(zip(specs, offsets))
        ]
        outcomes = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    finally:
        await session.close()
        bar.close()
    return outcomes, duration


def bench(
    workload: Workload,
    base_url: str,
    *,
    model: str | None = None,
    chat: bool = False,
    prompts: str = "ids",
    seed: int = 0,
    max_concurrency: int | None = None,
    timeout: float = 600.0,
    ignore_eos: bool = True,
    goodput: dict[str, float] | None = None,
    percentiles: Sequence[float] = PERCENTILES,
    request_rate: float | None = None,
    burstiness: float = 1.0,
    label: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Send the workload, return `vllm bench serve`'s result (metadata, metrics, and every
    per-request array: they are the measurement, which calibration and fidelity read)."""
    if prompts not in ("ids", "text"):
        raise ValueError(f"prompts must be 'ids' or 'text', got {prompts!r}")
    if chat and prompts == "ids":
        prompts = "text"  # a chat message is text
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    if workload.columns["closed_loop"].any():
        raise ValueError(
            "the workload has closed-loop turns (agent programs, docs/agents.md): the load "
            "client sends every request at a fixed time and cannot run them yet; simulate them "
            "(llmsched simulate)"
        )
    base_url = base_url.rstrip("/")
    model = model or asyncio.run(first_model(base_url))
    url = base_url + ("/v1/chat/completions" if chat else "/v1/completions")
    specs = request_specs(workload, seed, prompts)
    arrivals = workload.columns["arrival"]
    offsets = arrivals - arrivals[0] if len(arrivals) else arrivals
    outcomes, duration = asyncio.run(
        send_all(
            specs,
            offsets,
            url,
            model,
            chat=chat,
            ignore_eos=ignore_eos,
            max_concurrency=max_concurrency,
            timeout=timeout,
            progress=progress,
        )
    )
    table = Outcomes(
        success=np.array([o.success for o in outcomes], dtype=bool),
        input_lens=np.array([o.prompt_len for o in outcomes], dtype=np.int64),
        output_lens=np.array([o.output_len for o in outcomes], dtype=np.int64),
        ttfts=np.array([o.ttft for o in outcomes]),
        latencies=np.array([o.latency for o in outcomes]),
        start_times=np.array([o.start_time for o in outcomes]),
        itls=[np.asarray(o.itl) for o in outcomes],
        errors=[o.error for o in outcomes],
        queue_times=np.array([o.queue_time for o in outcomes]),
        generated_texts=[o.generated_text for o in outcomes],
    )
    meta = run_metadata(
        backend="openai-chat" if chat else "openai",
        model_id=model,
        num_prompts=len(specs),
        request_rate=request_rate,
        burstiness=burstiness,
        max_concurrency=max_concurrency,
        label=label,
    )
    metrics = bench_metrics(table, duration, goodput, percentiles)
    result = result_json(meta, metrics, table, detailed=True)
    result["request_ids"] = [o.request_id for o in outcomes]  # llmsched's: the X-Request-Id sent
    result["skipped_trace_rows"] = getattr(workload, "skipped", 0)
    return result
