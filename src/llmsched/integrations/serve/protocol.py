"""What llmsched's HTTP surfaces (the emulated engine and the gateway) agree on: the OpenAI
request fields they read, the emulated engine's word tokenizer and output text, and the SSE
chunks they write.

The emulated engine has no model, so its text is made to be checked: a word is one token, and
output token k of a request is the word ``t{k}``, except the last reasoning token, ``</think>``.
The streamed text of a token is a space and its word. A request's context may already hold
output (a continuation: the gateway resumes a request elsewhere after a failure or a
migration, with the text streamed so far as a partial assistant message, or appended to a
completion prompt): the engine counts the output words at the end of the context and numbers on
from there. So a client that concatenates what it received can check that nothing was lost or
duplicated: the words read ``t0 t1 ...`` without a gap or a repeat.

A request's true output comes in ``vllm_xargs`` (vLLM's extension field for scheduler data):
``output_tokens`` (all generated tokens, reasoning included; default ``max_tokens``) and
``reasoning_tokens`` (those up to and including ``</think>``; default 0). ``max_tokens`` caps
what one response generates, as in vLLM.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmsched.integrations.vllm.settings import RequestArgs, RequestDataError, request_args

THINK_END = "</think>"
#: Token ids the emulated engine gives output tokens (``return_token_ids``): token k is
#: OUTPUT_ID_BASE + k, ``</think>`` is THINK_END_ID. Prompts drawn by ``llmsched bench`` use ids
#: below 10,000, so a context's trailing output ids are told apart from its prompt.
OUTPUT_ID_BASE = 1_000_000
THINK_END_ID = OUTPUT_ID_BASE - 1
_OUTPUT_WORD = re.compile(r"t(\d+)")
#: vllm_xargs keys llmsched reads (besides the scheduler's: score, tier, tbt, ttft).
XARG_OUTPUT = "output_tokens"
XARG_REASONING = "reasoning_tokens"


def output_word(k: int, reasoning_tokens: int) -> str:
    """The word of output token k of a request whose reasoning is `reasoning_tokens` long."""
    return THINK_END if k == reasoning_tokens - 1 else f"t{k}"


def output_id(k: int, reasoning_tokens: int) -> int:
    return THINK_END_ID if k == reasoning_tokens - 1 else OUTPUT_ID_BASE + k


def _is_output_word(word: str) -> bool:
    return word == THINK_END or _OUTPUT_WORD.fullmatch(word) is not None


def trailing_output(context: list[str] | list[int]) -> int:
    """How many output tokens the context ends with (what a continuation has already)."""
    n = 0
    for item in reversed(context):
        is_output = item >= THINK_END_ID if isinstance(item, int) else _is_output_word(item)
        if not is_output:
            break
        n += 1
    return n


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400 (OpenAI's ``invalid_request_error``)."""


@dataclass
class Completion:
    """One request to an OpenAI-compatible endpoint, as llmsched's surfaces read it."""

    chat: bool
    model: str
    context: list[str] | list[int]  # the prompt's tokens, a partial assistant message included
    max_tokens: int | None
    stream: bool
    include_usage: bool
    priority: int
    args: RequestArgs  # vllm_xargs, checked
    return_token_ids: bool
    already: int  # output tokens the context already holds (a continuation)
    body: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.context)

    def lengths(self, max_model_len: int) -> tuple[int, int]:
        """(tokens this response generates, reasoning tokens of the request's whole output)."""
        args = self.args
        total, reasoning = args.output_tokens, args.reasoning_tokens or 0
        cap = self.max_tokens
        if total is None:
            total = self.already + (max_model_len - self.prompt_tokens if cap is None else cap)
        if reasoning and reasoning >= total:
            raise BadRequest(
                f"vllm_xargs.{XARG_REASONING}={reasoning} leaves no answer token in "
                f"{XARG_OUTPUT}={total}"
            )
        left = total - self.already if cap is None else min(total - self.already, cap)
        if left < 1:
            raise BadRequest(
                f"nothing left to generate: the context holds {self.already} of the request's "
                f"{total} output tokens"
            )
        return left, reasoning


def _words(text: str) -> list[str]:
    return text.split()


def parse_completion(body: Any, *, chat: bool) -> Completion:
    """Read a /v1/completions or /v1/chat/completions body; BadRequest names what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required (a string)")
    already_text: list[str] | list[int] = []
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        context: list = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content", ""), str):
                raise BadRequest(f"messages[{i}] must be an object with string 'content'")
            context += _words(m.get("content") or "")
        last = messages[-1]
        if body.get("continue_final_message"):
            if last.get("role") != "assistant":
                raise BadRequest("continue_final_message needs the last message's role assistant")
            if body.get("add_generation_prompt", True):  # vLLM's default, and its refusal
                raise BadRequest(
                    "continue_final_message needs add_generation_prompt: false (as in vLLM)"
                )
            already_text = _words(last.get("content") or "")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            context = _words(prompt)
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            context = list(prompt)
        else:
            raise BadRequest("'prompt' must be a string or a list of token ids")
        already_text = context
    if not context:
        raise BadRequest("the prompt is empty")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise BadRequest(f"'max_tokens' must be an integer >= 1, got {max_tokens!r}")
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise BadRequest(f"'priority' must be an integer, got {priority!r}")
    xargs = body.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        raise BadRequest("'vllm_xargs' must be an object")
    try:
        args = request_args(xargs)
    except RequestDataError as e:
        raise BadRequest(str(e)) from None
    options = body.get("stream_options") or {}
    return Completion(
        chat=chat,
        model=model,
        context=context,
        max_tokens=max_tokens,
        stream=bool(body.get("stream", False)),
        include_usage=bool(options.get("include_usage", False)),
        priority=priority,
        args=args,
        return_token_ids=bool(body.get("return_token_ids", False)),
        already=trailing_output(already_text),
        body=body,
    )


# --- what the servers write ------------------------------------------------------------------
def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event (orjson: the gateway writes one per token it relays)."""
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


DONE = sse("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chunk(
    rid: str,
    model: str,
    *,
    chat: bool,
    text: str | None = None,
    reasoning: str | None = None,
    finish_reason: str | None = None,
    token_ids: list[int] | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A streamed chunk with one choice: `text` (completions, or chat's content) and, in chat,
    `reasoning` (vLLM's `reasoning_content`)."""
    if chat:
        delta: dict[str, Any] = {}
        if reasoning is not None:
            delta["reasoning_content"] = reasoning
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice["finish_reason"] = finish_reason
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [choice],
    }


def error_body(message: str, kind: str = "invalid_request_error", code: int = 400) -> dict:
    """OpenAI's error object, as vLLM writes it."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
