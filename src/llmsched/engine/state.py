"""A request's progress inside the engine: what policies read (and never write).

Token accounting follows vLLM V1, one rule for prefill, decode and recompute: a request has
``num_tokens = prompt + generated`` tokens; ``computed`` of them have KV in the cache. Scheduling
``n`` tokens computes ``n`` more; when ``computed`` reaches ``num_tokens`` the engine samples one
new token. A decode is a request with exactly one token left to compute. Preemption by
recompute resets ``computed`` to 0, so the prompt *and* the tokens generated so far are
prefilled again.
"""

from __future__ import annotations

from enum import Enum

from mypy_extensions import mypyc_attr

from llmsched.workload.request import Request


class Status(Enum):
    WAITING = "waiting"  # queued: new, preempted (recompute or swapped out) or migrated in
    RUNNING = "running"  # admitted: holds KV blocks on the GPU
    MIGRATING = "migrating"  # KV in flight between instances
    FINISHED = "finished"
    REJECTED = "rejected"


class Phase(Enum):
    PREFILL = "prefill"  # first prompt pass not done yet
    REASONING = "reasoning"  # generating hidden tokens, up to and including </think>
    ANSWER = "answer"  # generating visible tokens


@mypyc_attr(allow_interpreted_subclasses=True)  # (when compiled: setup.py)
class RequestState:
    """Mutable progress of one request. The engine updates it; policies only read it."""

    __slots__ = (
        "arrival",
        "block_chain",
        "blocks",
        "cached_tokens",
        "computed",
        "cpu_blocks",
        "first_scheduled",
        "generated",
        "instance",
        "migrations",
        "output_tokens",
        "policy_data",
        "preemptions",
        "priority",
        "prompt_tokens",
        "queue_entry",
        "reasoning_tokens",
        "request",
        "request_id",
        "segments",
        "status",
    )

    def __init__(self, request: Request) -> None:
        self.request = request
        self.request_id = request.request_id
        # Typed, so that compiled code does native arithmetic on them (setup.py).
        self.arrival: float = float(request.arrival)
        self.prompt_tokens: int = int(request.prompt_tokens)
        self.output_tokens: int = int(request.output_tokens)
        self.reasoning_tokens: int = int(request.reasoning_tokens)
        self.priority: int = int(request.priority)
        self.status = Status.WAITING
        self.computed = 0  # tokens whose KV is in the cache (GPU, or CPU while swapped out)
        self.generated = 0  # output tokens sampled so far
        self.blocks = 0  # KV blocks held on the GPU
        self.cpu_blocks = 0  # KV blocks swapped out to host memory
        # prompt tokens found in the prefix cache at its first admission (vLLM's
        # num_cached_tokens); -1 until then
        self.cached_tokens = -1
        self.first_scheduled = float("nan")
        # (hasher, chain): its prefix-cache identities, once worked out
        self.block_chain: tuple | None = None
        self.preemptions = 0
        self.migrations = 0
        self.instance = -1
        # Token generation times, compactly: runs of (instance, first iteration, count) that
        # index the instances' iteration-end logs. Flat list: [inst, start, count, inst, ...].
        self.segments: list[int] = []
        self.queue_entry: tuple | None = None  # its entry in an instance's waiting queue
        self.policy_data: dict = {}  # scratch space for the policy (scores, quanta, ...)

    # --- derived quantities -------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def to_compute(self) -> int:
        """Tokens to compute before the next token can be sampled (1 for a decode)."""
        return self.prompt_tokens + self.generated - self.computed

    @property
    def is_decode(self) -> bool:
        return self.generated > 0 and self.prompt_tokens + self.generated - self.computed == 1

    @property
    def remaining_output(self) -> int:
        return self.output_tokens - self.generated

    @property
    def phase(self) -> Phase:
        if self.generated == 0:
            return Phase.PREFILL
        if self.generated < self.reasoning_tokens:
            return Phase.REASONING
        return Phase.ANSWER

    @property
    def in_reasoning(self) -> bool:
        """True until `</think>` has been generated (prefill included) for a reasoning request."""
        return self.generated < self.reasoning_tokens

    @property
    def swapped(self) -> bool:
        return self.cpu_blocks > 0

    def __repr__(self) -> str:
        return (
            f"<{self.request_id} {self.status.value} computed={self.computed} "
            f"generated={self.generated}/{self.output_tokens} blocks={self.blocks}>"
        )
