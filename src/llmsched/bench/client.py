"""One streamed request to an OpenAI-compatible server, timed as ``vllm bench serve`` times it.

The client is aiohttp, as vLLM's own benchmark client: one connection pool for the whole run,
chunks read as they arrive. TTFT is the first chunk that carries a choice; each later such chunk
adds one inter-token gap; the output length is the server's `usage.completion_tokens` (asked for
with `stream_options.include_usage`), else the number of chunks. Whatever goes wrong (an HTTP
error, a timeout, a stream cut before `[DONE]`, a chunk that is not JSON) ends the request as
failed with the reason, never as a silent drop.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class RequestSpec:
    """What to send: the body's variable parts and the request's own extras."""

    request_id: str
    prompt: list[int] | str  # token ids (exact length) or text
    max_tokens: int
    prompt_len: int  # what the workload asked for (the server's count replaces it if given)
    priority: int | None = None  # vLLM's `priority` (lower first)
    xargs: dict[str, Any] = field(default_factory=dict)  # `vllm_xargs` (llmsched's policies)


@dataclass
class Outcome:
    """What the client saw (times in seconds, `time.perf_counter`)."""

    success: bool = False
    start_time: float = 0.0
    ttft: float = float("nan")
    latency: float = float("nan")
    itl: list[float] = field(default_factory=list)
    prompt_len: int = 0
    output_len: int = 0
    generated_text: str = ""
    error: str = ""
    queue_time: float = 0.0  # waited for the client's concurrency limit before sending
    request_id: str = ""  # the X-Request-Id sent


def request_body(spec: RequestSpec, model: str, chat: bool, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        text = spec.prompt if isinstance(spec.prompt, str) else " ".join(map(str, spec.prompt))
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = spec.prompt
    if ignore_eos:  # vLLM's (and SGLang's) extension: generate exactly max_tokens tokens
        body["ignore_eos"] = True
    if spec.priority is not None:
        body["priority"] = spec.priority
    if spec.xargs:
        body["vllm_xargs"] = spec.xargs
    return body


def _chunk_text(choice: dict[str, Any]) -> str:
    delta = choice.get("delta")
    if delta is not None:  # chat
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    prompt_len: int,
    timeout: float,
    request_id: str | None = None,
) -> Outcome:
    """POST `body` to `url` and read its SSE stream to `[DONE]`; `request_id` goes in the
    X-Request-Id header (vLLM makes it part of its own request id)."""
    out = Outcome(prompt_len=prompt_len)
    chunks = 0
    st = time.perf_counter()
    out.start_time = last = st
    try:
        async with asyncio.timeout(timeout):
            headers = {"X-Request-Id": request_id} if request_id else None
            async with session.post(url, json=body, headers=headers) as response:
                if response.status != 200:
                    text = (await response.text())[:300]
                    out.error = f"HTTP {response.status}: {text}"
                    return out
                done = False
                buffer = b""
                async for data in response.content.iter_any():
                    buffer += data
                    while b"\n\n" in buffer:
                        message, buffer = buffer.split(b"\n\n", 1)
                        message = message.strip()
                        if not message or message.startswith(b":"):
                            continue  # SSE comment (keep-alive)
                        if not message.startswith(b"data:"):
                            raise ValueError(f"not an SSE data line: {message[:80]!r}")
                        payload = message[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            continue
                        chunk = json.loads(payload)
                        if "error" in chunk and not chunk.get("choices"):
                            raise ValueError(f"server error in stream: {chunk['error']}")
                        now = time.perf_counter()
                        if chunk.get("choices"):
                            if chunks == 0:
                                out.ttft = now - st
                            else:
                                out.itl.append(now - last)
                            last = now
                            chunks += 1
                            out.generated_text += _chunk_text(chunk["choices"][0])
                        usage = chunk.get("usage")
                        if usage:
                            out.output_len = int(usage.get("completion_tokens") or 0)
                            out.prompt_len = int(usage.get("prompt_tokens") or prompt_len)
                if not done:
                    out.error = f"stream ended before [DONE] after {chunks} chunks"
                    return out
    except TimeoutError:
        out.error = f"timed out after {timeout:g} s ({chunks} chunks received)"
        return out
    except (aiohttp.ClientError, ValueError, json.JSONDecodeError) as e:
        out.error = f"{type(e).__name__}: {e}"[:300] + f" (after {chunks} chunks)"
        return out
    if chunks == 0:
        out.error = "no token in the response"
        return out
    out.success = True
    out.latency = last - st
    out.output_len = out.output_len or chunks
    return out
