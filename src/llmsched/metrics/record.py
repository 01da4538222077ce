"""What the simulator (or a real surface) hands to metrics for each request when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    """A finished or rejected request's timeline. Times are seconds since the run's start."""

    request_id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int  # tokens generated (reasoning + answer)
    reasoning_tokens: int = 0  # hidden tokens, `</think>` included; 0 = no reasoning part
    # Generation time of every output token, len == output_tokens (empty when rejected).
    token_times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    first_scheduled: float = float("nan")  # first time any of its tokens was scheduled
    finished: bool = True
    reject_reason: str = ""  # why it was rejected (finished == False)
    preemptions: int = 0
    migrations: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at its first admission
    instance: int = -1  # instance it finished on
    priority: int = 0
    tier: str | None = None
    session_id: str | None = None  # the program (agent run, conversation) it is a turn of
    turn: int = 0
    ttft_slo: float | None = None  # seconds; request-level SLOs, if the workload set them
    tpot_slo: float | None = None
    client_wait: float = 0.0  # s it waited for the client's concurrency limit before `arrival`
    # A simulated request's tokens as runs in the run's iteration logs: flat (instance, first
    # iteration, count, ...), `RequestState.segments` (metrics.gaps.LoggedGaps reads them).
    token_runs: list[int] | None = None

    @property
    def finish(self) -> float:
        return float(self.token_times[-1]) if len(self.token_times) else float("nan")
