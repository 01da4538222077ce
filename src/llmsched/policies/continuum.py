"""Continuum: KV-cache time-to-live for multi-turn agents (Li et al., arXiv 2511.02230; named
"CacheTTL" from its v4).

An agent program alternates LLM turns and tool calls; turn k + 1's prompt is turn k's context
plus the tool's output. When a turn finishes, vLLM frees its KV and the next turn, sent after
the tool returns, queues behind every other program and recomputes whatever was evicted
meanwhile. Continuum *pins* a finished turn: its KV blocks stay referenced for a time-to-live
(TTL), so that a next turn arriving within it hits them through the prefix cache, and it
serves programs first come first served at the program level, so that a program that started
first finishes first.

Two algorithms carry the name; both run on the engine's one pin mechanism (a finished
request's blocks stay referenced until the policy releases them, `InstancePolicy.pin_until`):

* :class:`ContinuumFixed` (``continuum-fixed``), the released code (Hanchenli/vllm-continuum at
  3761e57, /work/shared/papers/agents-and-surfaces.md §1.2):

  - a tool-call estimator: per tool, the running mean of the observed gap between a program's
    turn finishing and its next turn arriving (a tool never seen has mean 0);
  - on a turn's finish: release the program's earlier pin; pin for TTL = 2 s iff the tool's
    mean is at most 2 s and the turn is not its program's last step;
  - a pin is released once it has expired and no turn of its program is waiting;
  - queue: turns of pinned programs first, then program-level FCFS (the program's first
    arrival);
  - a running request that cannot grow: with at most one running, release the pin that
    expires last instead of preempting; otherwise preempt the running request whose program
    arrived last and is not at its last step (else the one that arrived last);
  - admission: when nothing runs and pins exist, release one; pins are never released just
    because a waiting request does not fit while others run.

  Without the code's defects: with one running request and no pin, it preempts as vLLM does
  (the code raises IndexError); expired pins are all released (the code edits its list while
  iterating it and can skip some).

* :class:`Continuum` (``continuum``), the paper's v6 estimator (§1.3): the TTL maximises the
  utility of pinning, U(τ) = P(τ, f)·(T·η + PrefillReload(r)) − τ over τ ∈ {0} ∪ the observed
  gaps, where P(τ, f) is the probability that tool f returns within τ, T the mean wait of the
  last 100 preempted requests, η = −corr(k, N − k) over finished programs (turn k of N) and
  PrefillReload(r) the time to prefill the turn's context again. Cold start: while at most 100
  gaps have been seen, an Exp(1 s) prior and η = 1 give τ* = μ·ln(B/μ) if B = T + PrefillReload
  exceeds μ, else 0; then the global CDF until the tool has more than 100 of its own. Queue:
  preempted requests first, then turns of pinned programs, then program-level FCFS. Under
  memory pressure whole pins go, latest program arrival first, before anything is preempted.

Every choice the paper or the code leaves open is a parameter (`--policy-param`); docs/
continuum.md tables them with their sources.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict, deque
from typing import TYPE_CHECKING

import numpy as np

from llmsched.engine.plan import BatchBuilder, BatchPlan, pack_in_order
from llmsched.engine.state import RequestState, Status
from llmsched.policies.base import InstancePolicy, register

if TYPE_CHECKING:
    from llmsched.engine.instance import InstanceView

# The released code's constants (FIXED_THRESHOLD_CONTINUUM; set_up_pin's 2.0 s cut).
FIXED_TTL_S = 2.0
TOOL_THRESHOLD_S = 2.0
# v6 §4.2: cold start while at most K gaps are known; the prior's mean.
HISTORY_THRESHOLD = 100
PRIOR_MEAN_S = 1.0
# T's sliding window (the paper gives none; the vLLM plugin port and reconstructions use 100).
WAIT_WINDOW = 100
# PrefillReload(n) = a·n² + b·n + c seconds: llmsched's roofline for Llama-3.1-8B on an
# A100-80GB, chunks of 2,048 tokens (`prefill_fit` fits them for another model or GPU).
PREFILL_FIT = (1.68e-09, 7.36e-05, 6.8e-04)


def program_of(state: RequestState) -> str:
    """A request's program (vLLM-continuum's job_id); a request without a session is its own."""
    return state.request.session_id or state.request_id


def ends_program(state: RequestState) -> bool:
    """Whether a finished turn is its program's last: no tool call follows it, or the step
    limit made it the last (`is_last_step`)."""
    return state.request.tool is None or state.request.is_last_step


# --- the estimators ---------------------------------------------------------------------------
class ToolGaps:
    """The tool-call estimator (the code's `ToolCallEstimator`): for each tool, the gaps observed
    between a program's turn finishing and its next turn arriving. A gap includes the client's
    overhead and the network (here the frontend latency), not the server's queueing."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)  # each tool's gaps, sorted
        self.all: list[float] = []  # every gap, sorted (the global CDF)
        self._sums: dict[str, float] = defaultdict(float)
        self._left: dict[str, tuple[float, str]] = {}  # program -> (finish time, tool)

    def finished(self, program: str, tool: str | None, now: float) -> None:
        """A turn of `program` finished at `now`, calling `tool` (None: its program ends)."""
        if tool is None:
            self._left.pop(program, None)
        else:
            self._left[program] = (now, tool)

    def arrived(self, program: str, now: float) -> None:
        """A turn of `program` arrived: the gap since its previous turn is a sample of that
        turn's tool."""
        left = self._left.pop(program, None)
        if left is None:
            return
        finish, tool = left
        gap = max(0.0, now - finish)
        bisect.insort(self.samples[tool], gap)
        bisect.insort(self.all, gap)
        self._sums[tool] += gap

    def mean(self, tool: str) -> float:
        """The tool's mean gap; 0 for a tool never seen (the code's `... or 0.0`)."""
        n = len(self.samples.get(tool, ()))
        return self._sums[tool] / n if n else 0.0

    def count(self, tool: str | None = None) -> int:
        return len(self.all) if tool is None else len(self.samples.get(tool, ()))


class SlidingMean:
    """The mean of the last `window` values (0 before the first): v6's T."""

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else 0.0


class TurnCorrelation:
    """v6's η = −Pearson corr(k, N − k) over the turns of finished programs (turn k = 0 .. N−1
    of a program of N turns): 1 when every program has the same length, less when lengths vary
    and a late turn says less about how much work is left. 1 until it is defined."""

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0

    def program_finished(self, turns: int) -> None:
        for k in range(turns):
            x, y = float(k), float(turns - k)
            self.n += 1
            self.sx += x
            self.sy += y
            self.sxx += x * x
            self.syy += y * y
            self.sxy += x * y

    @property
    def eta(self) -> float:
        n = self.n
        if n < 2:
            return 1.0
        vx = self.sxx - self.sx * self.sx / n
        vy = self.syy - self.sy * self.sy / n
        if vx <= 1e-12 or vy <= 1e-12:
            return 1.0
        return -(self.sxy - self.sx * self.sy / n) / math.sqrt(vx * vy)


# --- the TTL decisions ------------------------------------------------------------------------
def fixed_ttl(
    tool: str | None,
    last_step: bool,
    gaps: ToolGaps,
    ttl: float = FIXED_TTL_S,
    threshold: float = TOOL_THRESHOLD_S,
) -> float:
    """The released code's `set_up_pin`: `ttl` if a tool call follows, the turn is not the last
    step and the tool's mean gap is at most `threshold` (a tool never seen: mean 0); else 0."""
    if tool is None or last_step:
        return 0.0
    return ttl if gaps.mean(tool) <= threshold else 0.0


def exp_prior_ttl(benefit: float, mean: float = PRIOR_MEAN_S) -> float:
    """v6's cold start: with tool times Exp(`mean`) and η = 1, U(τ) = (1 − e^(−τ/μ))·B − τ is
    largest at τ* = μ·ln(B/μ) when B > μ, and pinning does not pay otherwise."""
    return mean * math.log(benefit / mean) if benefit > mean else 0.0


def best_ttl(samples: list[float], benefit: float) -> float:
    """argmax U(τ) = P(τ)·benefit − τ over τ ∈ {0} ∪ samples (sorted), P the samples' empirical
    CDF (repeats kept); ties go to the smaller τ, and U(0) = 0."""
    if not samples or benefit <= 0:
        return 0.0
    taus = np.asarray(samples)
    p = np.searchsorted(taus, taus, side="right") / len(taus)
    utility = p * benefit - taus
    i = int(np.argmax(utility))  # the first maximum: the smallest τ among ties
    return float(taus[i]) if utility[i] > 0 else 0.0


def prefill_fit(latency, budget: int = 2048, max_tokens: int = 32768) -> tuple[float, float, float]:
    """(a, b, c) of PrefillReload(n) = a·n² + b·n + c, fitted as the paper fits measured
    prefills, here to a latency model's time for n tokens in chunks of `budget`."""
    from llmsched.hardware.latency import BatchShape

    ns = np.arange(256, max_tokens + 1, 256)
    times = []
    for n in ns:
        t = done = 0
        while done < n:
            c = min(budget, n - done)
            t += latency.iteration_time(BatchShape.from_chunks([(c, done)]))
            done += c
        times.append(t)
    a, b, c = np.polyfit(ns, times, 2)
    return float(a), float(b), float(c)


# --- the policies -----------------------------------------------------------------------------
class _Pinning(InstancePolicy):
    """What both Continuums share: the estimator's bookkeeping, program-level FCFS, pins that
    expire once no turn of their program waits, and a program's newer turn replacing its pin."""

    def __init__(self, preemption: str = "recompute") -> None:
        super().__init__(preemption)
        self.gaps = ToolGaps()
        self.program_start: dict[str, float] = {}  # first arrival of each program seen here
        self.latest_turn: dict[str, int] = {}  # the latest finished turn of each program

    # Program-level FCFS. The queue key is also where an instance first sees a request (there
    # is no arrival callback): its program's gap sample and first arrival are recorded here.
    def waiting_key(self, state: RequestState):
        program = program_of(state)
        if "seen" not in state.policy_data:  # not a preempted request queued again
            state.policy_data["seen"] = True
            self.gaps.arrived(program, state.arrival)
        return (self.program_start.setdefault(program, state.arrival), state.arrival)

    def start(self, state: RequestState) -> float:
        return self.program_start.get(program_of(state), state.arrival)

    def pin_until(self, state: RequestState, view: InstanceView) -> float | None:
        program = program_of(state)
        self.gaps.finished(program, state.request.tool, view.now)
        self.latest_turn[program] = state.request.turn
        if ends_program(state):
            self.program_finished(state)
        ttl = self.ttl(state, view)
        return view.now + ttl if ttl > 0 else None

    def ttl(self, state: RequestState, view: InstanceView) -> float:
        raise NotImplementedError

    def program_finished(self, state: RequestState) -> None:
        pass

    def due(self, view: InstanceView) -> list[RequestState]:
        """Pins to release now: replaced by a newer finished turn of their program (the code
        releases those first thing when that turn finishes), or expired with no turn of their
        program waiting (`unpin_requests_regular`)."""
        pins = view.pins
        if not pins:
            return []
        now = view.now
        waiting = {program_of(s) for s in view.waiting}
        due = []
        for pinned, until in pins.items():
            program = program_of(pinned)
            if self.latest_turn.get(program, -1) > pinned.request.turn or (
                now >= until and program not in waiting
            ):
                due.append(pinned)
        return due

    def queue(self, view: InstanceView) -> list[RequestState]:
        """The waiting requests in the policy's order (pins change while requests wait)."""
        pinned = {program_of(s) for s in view.pins}
        return sorted(view.waiting, key=lambda s: self.group(s, pinned))

    def group(self, state: RequestState, pinned: set[str]) -> int:
        """The queue's tiers, served in order; program-level FCFS inside each (the queue's own
        order, which the sort keeps)."""
        return 0 if program_of(state) in pinned else 1

    def victim_key(self, state: RequestState):
        """Preempted first: the largest key. The code's choice, kept by both (v6 says nothing
        past releasing pins): the program that arrived last, not at its last step if any is."""
        return (not state.request.is_last_step, self.start(state))

    def reclaim(self, b: BatchBuilder, state: RequestState) -> RequestState | None:
        """A pin to release because `state` (running, or waiting) finds no KV, or None."""
        raise NotImplementedError

    def schedule(self, view: InstanceView) -> BatchPlan:
        due = self.due(view)
        if due:  # released first; the engine asks again with their blocks free
            b = BatchBuilder(view)
            for pinned in due:
                b.release(pinned)
            return b.build()
        b = pack_in_order(
            view,
            mode=self.preemption,
            key=self.victim_key,
            waiting=self.queue(view),
            reclaim=self.reclaim,
        )
        return b.build()


@register
class ContinuumFixed(_Pinning):
    """Continuum as released (vllm-continuum 3761e57): pin a finished turn for 2 s when its
    tool's mean time is at most 2 s; pinned programs first, then program-level FCFS."""

    name = "continuum-fixed"

    def __init__(
        self,
        preemption: str = "recompute",
        ttl: float = FIXED_TTL_S,
        tool_threshold: float = TOOL_THRESHOLD_S,
    ) -> None:
        super().__init__(preemption)
        if ttl < 0 or tool_threshold < 0:
            raise ValueError(f"ttl and tool_threshold must be >= 0 s, got {ttl}, {tool_threshold}")
        self.fixed = ttl
        self.tool_threshold = tool_threshold

    def ttl(self, state: RequestState, view: InstanceView) -> float:
        r = state.request
        return fixed_ttl(r.tool, r.is_last_step, self.gaps, self.fixed, self.tool_threshold)

    def reclaim(self, b: BatchBuilder, state: RequestState) -> RequestState | None:
        # A running request that cannot grow with at most one running (itself): the pin that
        # expires last goes instead of a preemption. A waiting one when nothing runs: one pin
        # (the code's deadlock breaker; which one it does not say: the same). Else none.
        limit = 1 if state.status is Status.RUNNING else 0
        if b.num_running > limit:
            return None
        left = [(until, p) for p, until in b.view.pins.items() if not b.is_released(p)]
        return max(left, key=lambda e: e[0])[1] if left else None


@register
class Continuum(_Pinning):
    """Continuum's v6 estimator: the TTL maximising P(tool returns)·(T·η + reload) − τ;
    preempted requests first, then pinned programs, then program-level FCFS."""

    name = "continuum"

    def __init__(
        self,
        preemption: str = "recompute",
        history_threshold: int = HISTORY_THRESHOLD,
        prior_mean: float = PRIOR_MEAN_S,
        wait_window: int = WAIT_WINDOW,
        prefill_quadratic: float = PREFILL_FIT[0],
        prefill_linear: float = PREFILL_FIT[1],
        prefill_constant: float = PREFILL_FIT[2],
        pressure: str = "any",
    ) -> None:
        super().__init__(preemption)
        if history_threshold < 0 or prior_mean <= 0 or wait_window < 1:
            raise ValueError(
                "history_threshold must be >= 0, prior_mean > 0 s and wait_window >= 1, got "
                f"{history_threshold}, {prior_mean}, {wait_window}"
            )
        if pressure not in ("any", "running"):
            raise ValueError(f"pressure must be 'any' or 'running', got {pressure!r}")
        self.history_threshold = history_threshold
        self.prior_mean = prior_mean
        self.prefill = (prefill_quadratic, prefill_linear, prefill_constant)
        self.pressure = pressure
        self.waits = SlidingMean(wait_window)  # T: preempted requests' waits for readmission
        self.turns = TurnCorrelation()  # η

    def reload(self, tokens: int) -> float:
        """PrefillReload: seconds to prefill the context again."""
        a, b, c = self.prefill
        return a * tokens * tokens + b * tokens + c

    def ttl(self, state: RequestState, view: InstanceView) -> float:
        r = state.request
        if r.tool is None or r.is_last_step:
            return 0.0
        reload = self.reload(state.num_tokens)
        k = self.history_threshold
        if self.gaps.count() <= k:  # cold start: Exp(μ) prior, η = 1
            return exp_prior_ttl(self.waits.mean + reload, self.prior_mean)
        benefit = self.waits.mean * self.turns.eta + reload
        own = self.gaps.samples.get(r.tool, [])
        return best_ttl(own if len(own) > k else self.gaps.all, benefit)

    def program_finished(self, state: RequestState) -> None:
        self.turns.program_finished(state.request.turn + 1)

    def group(self, state: RequestState, pinned: set[str]) -> int:
        if "evicted_at" in state.policy_data:  # preempted, back in the queue
            return 0
        return 1 if program_of(state) in pinned else 2

    def on_preempt(self, state: RequestState, view: InstanceView) -> None:
        state.policy_data["evicted_at"] = view.now

    def reclaim(self, b: BatchBuilder, state: RequestState) -> RequestState | None:
        # Memory pressure (a running request that cannot grow, or with `pressure="any"` a
        # waiting one that does not fit): whole pins, latest program arrival first. A waiting
        # one with nothing running always gets one (else pins would hold the KV forever).
        if state.status is not Status.RUNNING and self.pressure == "running" and b.num_running:
            return None
        left = [p for p in b.view.pins if not b.is_released(p)]
        return max(left, key=self.start) if left else None

    def schedule(self, view: InstanceView) -> BatchPlan:
        plan = super().schedule(view)
        for state, _ in plan.items:  # T: how long preempted requests waited to run again
            if state.status is Status.WAITING and "evicted_at" in state.policy_data:
                self.waits.add(view.now - state.policy_data.pop("evicted_at"))
        return plan
