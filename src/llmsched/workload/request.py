"""A request, and a workload: many requests stored as columns.

A request's output may have a hidden reasoning part (tokens up to and including ``</think>``)
followed by a visible answer part; ``output_tokens`` counts both. For a reasoning request the
user-facing TTFT is the time of the first *answer* token.

A :class:`Workload` keeps requests as numpy columns so that a million requests cost tens of
megabytes, not a million Python objects; :class:`Request` rows are made on demand.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request as the workload describes it (never mutated by the simulator)."""

    request_id: str
    arrival: float  # seconds since the start of the run
    prompt_tokens: int
    output_tokens: int  # all generated tokens: reasoning (hidden) + answer (visible)
    reasoning_tokens: int = 0  # hidden tokens, the `</think>` token included; 0 = no reasoning
    prompt_text: str | None = None
    ttft_slo: float | None = None  # seconds
    tpot_slo: float | None = None  # seconds per token (also the TBT deadline)
    priority: int = 0  # vLLM semantics: lower value is served first
    tier: str | None = None
    session_id: str | None = None
    turn: int = 0
    tool_time: float = 0.0  # seconds of tool call after this turn, before the session's next turn
    # A length predictor's ranking score (higher = longer response expected); None = none
    # (NaN in the Workload column). Set by llmsched.workload.scores, read by PARS-style policies.
    score: float | None = None
    # What the prompt shares with other requests, as runs (key, tokens) from its start: two
    # prompts whose runs agree hold the same tokens there, so their KV can be shared (prefix
    # caching). Tokens past the runs are this request's own. None: nothing shared.
    prefix: Runs | None = None
    # Agent programs (a session whose turns are LLM calls with tool calls between them):
    # `tool` is the tool called after this turn (None: none, or not known); `is_last_step` marks
    # a turn that the program's step limit makes its last (Continuum never pins its KV).
    tool: str | None = None
    is_last_step: bool = False
    # Closed loop: this turn is sent when its session's previous turn (turn - 1) has finished
    # and that turn's tool_time has passed, and not before `arrival` (a lower bound then).
    # False: it arrives at `arrival`, whatever its session does (open loop).
    closed_loop: bool = False

    def __post_init__(self) -> None:
        problem = request_problem(
            self.arrival, self.prompt_tokens, self.output_tokens, self.reasoning_tokens
        )
        if problem is None and self.prefix is not None:
            problem = runs_problem(self.prefix, self.prompt_tokens)
        if problem:
            raise ValueError(f"request {self.request_id!r}: {problem}")

    @property
    def runs(self) -> Runs:
        """The whole prompt as runs: `prefix`, then the request's own tokens keyed by its id."""
        runs = self.prefix or ()
        own = self.prompt_tokens - sum(n for _, n in runs)
        return runs + ((("in", self.request_id), own),) if own > 0 else runs

    @property
    def continuation(self) -> Runs:
        """The runs of a next turn's prompt that begins with this prompt and this output (a
        multi-turn conversation or an agent's next step). Output tokens are keyed
        ("out", request_id), the key the engine gives them as it generates them."""
        return self.runs + ((("out", self.request_id), self.output_tokens),)

    @property
    def answer_tokens(self) -> int:
        return self.output_tokens - self.reasoning_tokens

    @property
    def is_reasoning(self) -> bool:
        return self.reasoning_tokens > 0


Runs = tuple[tuple[Hashable, int], ...]


def object_column(values) -> np.ndarray:
    """A 1-d object array of `values`, tuples kept whole (np.asarray would make a tuple of
    tuples into more dimensions)."""
    if isinstance(values, np.ndarray) and values.dtype == object and values.ndim == 1:
        return values
    values = list(values)
    column = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        column[i] = v
    return column


def runs_problem(prefix: Runs, prompt: int) -> str | None:
    """What is wrong with a request's prefix runs, or None."""
    total = 0
    for run in prefix:
        if not (isinstance(run, tuple) and len(run) == 2 and isinstance(run[1], int)) or run[1] < 1:
            return f"a prefix run must be (key, tokens >= 1), got {run!r:.80}"
        total += run[1]
    if total > prompt:
        return f"the prefix runs cover {total} tokens, more than the prompt's {prompt}"
    return None


def request_problem(arrival: float, prompt: int, output: int, reasoning: int) -> str | None:
    """What is wrong with these request fields, or None. Shared by readers and constructors."""
    if not math.isfinite(arrival) or arrival < 0:  # (math: once per request, no numpy call)
        return f"arrival time must be a finite number >= 0, got {arrival}"
    if prompt < 1:
        return f"prompt length must be >= 1 token, got {prompt}"
    if output < 1:
        return f"output length must be >= 1 token, got {output}"
    if reasoning < 0:
        return f"reasoning length must be >= 0, got {reasoning}"
    if reasoning and reasoning >= output:
        return (
            f"a reasoning request needs at least one answer token: reasoning {reasoning} "
            f">= output {output}"
        )
    return None


_NUMERIC = {
    "arrival": np.float64,
    "prompt_tokens": np.int64,
    "output_tokens": np.int64,
    "reasoning_tokens": np.int64,
    "ttft_slo": np.float64,  # NaN = none
    "tpot_slo": np.float64,
    "priority": np.int64,
    "turn": np.int64,
    "tool_time": np.float64,
    "score": np.float64,  # NaN = none
    "is_last_step": np.bool_,
    "closed_loop": np.bool_,
}
_NONE_IF_NAN = ("ttft_slo", "tpot_slo", "score")  # NaN in the column = None
_OBJECT = ("request_id", "prompt_text", "tier", "session_id", "prefix", "tool")
FIELDS = tuple(f.name for f in fields(Request))


class Workload:
    """Requests as columns, sorted by arrival time (ties keep their input order)."""

    def __init__(
        self, columns: dict[str, np.ndarray], *, source: str = "", timed: bool = True
    ) -> None:
        n = len(columns["arrival"])
        self.source = source
        # False when the trace has no timestamps of its own (arrivals must be generated).
        self.timed = timed
        self.columns: dict[str, np.ndarray] = {}
        for name, dtype in _NUMERIC.items():
            default = np.nan if name in _NONE_IF_NAN else 0
            col = columns.get(name)
            self.columns[name] = (
                np.full(n, default, dtype=dtype) if col is None else np.asarray(col, dtype=dtype)
            )
        for name in _OBJECT:
            col = columns.get(name)
            if name == "request_id" and col is None:
                col = [str(i) for i in range(n)]
            self.columns[name] = None if col is None else object_column(col)
        for name, col in self.columns.items():
            if col is not None and len(col) != n:
                raise ValueError(f"workload column {name!r} has {len(col)} rows, expected {n}")
        self._validate()
        order = np.argsort(self.columns["arrival"], kind="stable")
        if not np.array_equal(order, np.arange(n)):
            for name, col in self.columns.items():
                if col is not None:
                    self.columns[name] = col[order]

    def _validate(self) -> None:
        c = self.columns
        bad = (
            ~np.isfinite(c["arrival"])
            | (c["arrival"] < 0)
            | (c["prompt_tokens"] < 1)
            | (c["output_tokens"] < 1)
            | (c["reasoning_tokens"] < 0)
            | ((c["reasoning_tokens"] > 0) & (c["reasoning_tokens"] >= c["output_tokens"]))
        )
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            problem = request_problem(
                float(c["arrival"][i]),
                int(c["prompt_tokens"][i]),
                int(c["output_tokens"][i]),
                int(c["reasoning_tokens"][i]),
            )
            where = f" from {self.source}" if self.source else ""
            raise ValueError(
                f"request {c['request_id'][i]!r} (row {i}){where}: {problem}"
                f" ({int(bad.sum())} invalid rows in all)"
            )

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_requests(
        cls, requests: Iterable[Request], *, source: str = "", timed: bool = True
    ) -> Workload:
        rows = list(requests)
        columns: dict[str, np.ndarray] = {}
        for name in FIELDS:
            values = [getattr(r, name) for r in rows]
            if name in _OBJECT:
                if name == "request_id" or any(v is not None for v in values):
                    columns[name] = object_column(values)
            elif name in _NONE_IF_NAN:
                columns[name] = np.array([np.nan if v is None else v for v in values], float)
            else:
                columns[name] = np.array(values, dtype=_NUMERIC[name])
        if not rows:
            columns["arrival"] = np.zeros(0)
        return cls(columns, source=source, timed=timed)

    # --- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.columns["arrival"])

    def __getitem__(self, i: int) -> Request:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"request {i} of a workload of {n}")
        i %= n
        return Request(*(cells[0] for cells in self._cells(slice(i, i + 1))))

    def __iter__(self) -> Iterator[Request]:
        return self.requests(np.arange(len(self)))

    def requests(self, rows: np.ndarray, block: int = 4096) -> Iterator[Request]:
        """The requests at these row indices, in their order, made a block at a time (much
        cheaper per request than `workload[i]`, and never a Python object per cell of the
        whole workload)."""
        for lo in range(0, len(rows), block):
            yield from (Request(*cells) for cells in zip(*self._cells(rows[lo : lo + block])))

    def _cells(self, rows: np.ndarray | slice) -> list[list]:
        """Every field's values at `rows`, as the Python values a Request holds (NaN SLOs and
        scores are None), in the Request's field order."""
        out = []
        absent = [None] * len(self.columns["arrival"][rows])
        for name in FIELDS:
            col = self.columns[name]
            if col is None:
                out.append(absent)
                continue
            values = col[rows].tolist()
            if name == "request_id":
                values = [str(v) for v in values]
            elif name in _NONE_IF_NAN:
                values = [None if v != v else v for v in values]  # (NaN != NaN)
            out.append(values)
        return out

    @property
    def arrivals(self) -> np.ndarray:
        return self.columns["arrival"]

    def take(self, index: np.ndarray | slice, *, source: str | None = None) -> Workload:
        """A new workload of the selected rows."""
        cols = {k: v[index] for k, v in self.columns.items() if v is not None}
        return Workload(cols, source=self.source if source is None else source, timed=self.timed)

    def head(self, n: int) -> Workload:
        return self.take(slice(0, n))

    def with_columns(self, **columns: np.ndarray) -> Workload:
        """A copy with some columns replaced (e.g. new arrival times)."""
        cols = {k: v for k, v in self.columns.items() if v is not None}
        cols.update(columns)
        timed = self.timed or "arrival" in columns
        return Workload(cols, source=self.source, timed=timed)

    def describe(self) -> str:
        c = self.columns
        if len(self) == 0:
            return "0 requests"
        span = float(c["arrival"][-1] - c["arrival"][0])
        text = (
            f"{len(self)} requests over {span:.1f} s; prompt median "
            f"{np.median(c['prompt_tokens']):.0f} tokens, output median "
            f"{np.median(c['output_tokens']):.0f}"
        )
        if (c["reasoning_tokens"] > 0).any():
            text += f", reasoning median {np.median(c['reasoning_tokens']):.0f}"
        return text
