"""Arrival-time and length generators, and building a run's workload from a trace.

Conventions shared by every arrival generator: times are seconds, the first request arrives at
t = 0 (as ``vllm bench serve`` sends its first request at once, and as a replayed trace starts at
its first timestamp), and the n - 1 gaps after it are drawn from the process. So ``n`` arrivals
span n - 1 gaps and the mean gap is 1 / rate.

``rng`` arguments take a ``numpy.random.Generator`` or a seed (int or None).
"""

from __future__ import annotations

import math

import numpy as np

from llmsched.workload.request import Workload

ARRIVALS = ("trace", "poisson", "gamma")
SAMPLES = ("head", "random")

# Lognormal sigmas fitted to the Azure 2023 conversation trace's p50/p90 (data README):
# p90/p50 = exp(1.2816 * sigma) -> prompt 2734/1020 -> 0.77, output 424/129 -> 0.93.
PROMPT_SIGMA = 0.77
OUTPUT_SIGMA = 0.93


def _generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check(n: int, rate: float) -> None:
    if n < 0:
        raise ValueError(f"number of arrivals must be >= 0, got {n}")
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a finite number of requests per second > 0, got {rate}")


def _cumulative(gaps: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate(([0.0], np.cumsum(gaps)))[:n]


def poisson_arrivals(
    n: int, rate: float, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """n arrival times of a Poisson process of ``rate`` requests/s; the first at 0."""
    _check(n, rate)
    gaps = _generator(rng).exponential(1.0 / rate, size=max(n - 1, 0))
    return _cumulative(gaps, n)


def gamma_arrivals(
    n: int, rate: float, cv: float, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """n arrival times with Gamma gaps: mean 1/rate, coefficient of variation ``cv``.

    ``cv`` measures burstiness: shape = 1/cv². cv = 1 is the Poisson process (and then gives
    exactly :func:`poisson_arrivals`' times for the same rng); cv > 1 is burstier; cv = 0 (or
    below 1e-6) is evenly spaced arrivals.
    """
    _check(n, rate)
    if not (cv >= 0 and math.isfinite(cv)):
        raise ValueError(f"cv (coefficient of variation of the gaps) must be >= 0, got {cv}")
    if cv == 1:
        return poisson_arrivals(n, rate, rng)
    size = max(n - 1, 0)
    if cv < 1e-6:  # shape 1/cv² beyond 10¹²: as good as even spacing, and no overflow
        gaps = np.full(size, 1.0 / rate)
    else:
        shape = 1.0 / cv**2
        gaps = _generator(rng).gamma(shape, 1.0 / (rate * shape), size=size)
    return _cumulative(gaps, n)


def replay_arrivals(timestamps: np.ndarray, time_scale: float = 1.0) -> np.ndarray:
    """A trace's timestamps, re-based to start at 0, with every gap multiplied by time_scale.

    time_scale 0.5 replays the trace twice as fast (double the rate), 2 half as fast.
    """
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ValueError(f"time_scale must be a finite number > 0, got {time_scale}")
    t = np.asarray(timestamps, dtype=np.float64)
    if len(t) == 0:
        return t.copy()
    return (t - t.min()) * time_scale


def build_workload(
    source: Workload,
    *,
    num_requests: int | None = None,
    arrival: str = "trace",
    rate: float | None = None,
    cv: float = 1.0,
    time_scale: float = 1.0,
    sample: str = "head",
    seed: int = 0,
) -> Workload:
    """A run's workload: lengths (and every other column) from ``source``, arrivals assigned.

    Rows: the first ``num_requests`` rows of ``source`` (all when None) with ``sample="head"``;
    ``num_requests`` rows drawn uniformly *with replacement* with ``sample="random"``, or when
    more rows are asked for than ``source`` has. Drawn rows are independent requests: their
    ``request_id`` (and ``session_id``, if any) get a ``#<position>`` suffix so that repeats
    stay distinct.

    Arrivals: ``"trace"`` replays the source's first ``num_requests`` timestamps (gaps times
    ``time_scale``); ``"poisson"`` and ``"gamma"`` (burstiness ``cv``) draw them at ``rate``
    requests/s. Options that the chosen arrival process does not use are an error, not ignored.
    The same arguments and seed give the same workload.
    """
    if arrival not in ARRIVALS:
        raise ValueError(
            f"unknown arrival process {arrival!r}; choose one of {', '.join(ARRIVALS)}"
        )
    if sample not in SAMPLES:
        raise ValueError(f"unknown sampling {sample!r}; choose one of {', '.join(SAMPLES)}")
    size = len(source)
    n = size if num_requests is None else num_requests
    if size == 0:
        raise ValueError(f"the source workload {source.source!r} has no requests")
    if n < 1:
        raise ValueError(f"num_requests must be >= 1, got {n}")

    if arrival == "trace":
        if not source.timed:
            raise ValueError(
                f"{source.source or 'the source workload'} has no timestamps of its own; give an "
                "arrival process and a rate (arrival='poisson' or 'gamma', rate=requests/s)"
            )
        if rate is not None:
            raise ValueError("rate is not used with arrival='trace'; use time_scale to speed it up")
        if cv != 1.0:
            raise ValueError("cv is only used with arrival='gamma'")
        if n > size:
            raise ValueError(
                f"the trace has {size} timestamps, fewer than the {n} requests asked for; ask for "
                "fewer, or draw arrivals with arrival='poisson' or 'gamma' and a rate"
            )
    else:
        if rate is None or not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"arrival={arrival!r} needs a rate > 0 (requests/s), got {rate}")
        if time_scale != 1.0:
            raise ValueError("time_scale only applies to arrival='trace'; change the rate instead")
        if arrival == "poisson" and cv != 1.0:
            raise ValueError("cv is only used with arrival='gamma' (poisson has cv = 1)")

    rng = np.random.default_rng(seed)
    resample = sample == "random" or n > size
    closed = source.columns["closed_loop"]
    if resample and closed.any():
        raise ValueError(
            f"{source.source or 'the source workload'} has closed-loop sessions: its requests "
            "cannot be drawn one by one (a turn needs its predecessor); take the first N "
            f"(sample='head', N <= {size})"
        )
    index = rng.integers(0, size, size=n) if resample else np.arange(n)
    columns = {k: v[index] for k, v in source.columns.items() if v is not None}
    if resample:
        suffix = np.array([f"#{i}" for i in range(n)], dtype=object)
        columns["request_id"] = columns["request_id"].astype(str).astype(object) + suffix
        if "session_id" in columns:
            sessions = columns["session_id"]
            has = np.array([s is not None for s in sessions], dtype=bool)
            sessions = sessions.copy()
            sessions[has] = np.array(
                [f"{s}{x}" for s, x in zip(sessions[has], suffix[has])], dtype=object
            )
            columns["session_id"] = sessions

    if arrival == "trace":
        columns["arrival"] = replay_arrivals(source.arrivals[:n], time_scale)
        how = f"trace arrivals x{time_scale:g}"
    elif closed[:n].any():  # sessions start at the drawn times, their later turns follow
        shape = cv if arrival == "gamma" else 1.0
        columns["arrival"] = _session_arrivals(columns, rate, shape, rng)
        how = f"{arrival} {rate:g} sessions/s" + (f" cv {cv:g}" if arrival == "gamma" else "")
    else:
        columns["arrival"] = gamma_arrivals(n, rate, cv if arrival == "gamma" else 1.0, rng)
        how = f"{arrival} {rate:g} req/s" + (f" cv {cv:g}" if arrival == "gamma" else "")
    picked = f"{n} {'sampled' if resample else 'first'} rows"
    return Workload(columns, source=f"{source.source} ({picked}, {how}, seed {seed})", timed=True)


def _session_arrivals(columns: dict, rate: float, cv: float, rng) -> np.ndarray:
    """Arrivals drawn for the requests that start on their own (open loop: first turns, and
    requests outside sessions), in row order; a closed-loop turn gets its session's start (its
    lower bound: the cluster sends it when its predecessor finishes)."""
    closed = columns["closed_loop"]
    opened = np.flatnonzero(~closed)
    arrivals = np.zeros(len(closed))
    arrivals[opened] = gamma_arrivals(len(opened), rate, cv, rng)
    start = {}
    for i, (s, c) in enumerate(zip(columns["session_id"].tolist(), closed.tolist())):
        if c:
            arrivals[i] = start.get(s, 0.0)
        elif s is not None:
            start.setdefault(s, arrivals[i])
    return arrivals


def lognormal_lengths(
    n: int, median: float, sigma: float, maximum: int, rng: np.random.Generator | int | None
) -> np.ndarray:
    """n token counts from a lognormal (median, sigma), rounded and clipped to [1, maximum]."""
    if median < 1 or sigma < 0 or maximum < 1:
        raise ValueError(
            f"need median >= 1, sigma >= 0, maximum >= 1; got {median}, {sigma}, {maximum}"
        )
    x = _generator(rng).lognormal(math.log(median), sigma, size=n)
    return np.clip(np.rint(x), 1, maximum).astype(np.int64)


def synthetic_workload(
    num_requests: int,
    *,
    rate: float,
    seed: int = 0,
    prompt_median: float = 1020,
    prompt_sigma: float = PROMPT_SIGMA,
    output_median: float = 129,
    output_sigma: float = OUTPUT_SIGMA,
    max_prompt: int = 8192,
    max_output: int = 2048,
    reasoning_ratio: float = 0.0,
    cv: float = 1.0,
) -> Workload:
    """A workload needing no data files, shaped like the Azure 2023 conversation trace.

    Lognormal prompt and output lengths whose defaults match that trace's p50 and p90 (its tails
    are lighter: the lognormal's p99 is higher, hence the clipping), Poisson arrivals (Gamma when
    cv != 1). With ``reasoning_ratio`` > 0 each output starts with round(ratio × output) hidden
    reasoning tokens, always leaving at least one answer token. The embedded default workload
    of ``llmsched demo``.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not 0 <= reasoning_ratio <= 1:
        raise ValueError(f"reasoning_ratio must be in [0, 1], got {reasoning_ratio}")
    rng = np.random.default_rng(seed)
    prompt = lognormal_lengths(num_requests, prompt_median, prompt_sigma, max_prompt, rng)
    output = lognormal_lengths(num_requests, output_median, output_sigma, max_output, rng)
    reasoning = np.minimum(np.rint(reasoning_ratio * output).astype(np.int64), output - 1)
    arrivals = gamma_arrivals(num_requests, rate, cv, rng)
    return Workload(
        {
            "request_id": np.array([f"syn-{i}" for i in range(num_requests)], dtype=object),
            "arrival": arrivals,
            "prompt_tokens": prompt,
            "output_tokens": output,
            "reasoning_tokens": reasoning,
        },
        source=f"synthetic({num_requests} requests, {rate:g} req/s, cv {cv:g}, seed {seed})",
        timed=True,
    )


def assign_tiers(workload: Workload, tiers: dict[str, dict], seed: int = 0) -> Workload:
    """Draw each request's tier independently, with its TBT/TPOT target.

    ``tiers`` maps a tier name to ``{"share": probability, "tbt": seconds}`` (SLAI's setting:
    ``{"paying": {"share": 0.05, "tbt": 0.1}, "free": {"share": 0.95, "tbt": 0.5}}``); the
    shares must sum to 1. The draw uses its own stream of ``seed``, so arrivals are unchanged.
    """
    if not tiers:
        raise ValueError("tiers: give at least one tier, e.g. {free: {share: 1.0, tbt: 0.2}}")
    names = list(tiers)
    try:
        shares = np.array([float(tiers[n]["share"]) for n in names])
        tbts = np.array([float(tiers[n]["tbt"]) for n in names])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"tiers must map each name to {{share: P, tbt: SECONDS}}, got {tiers!r}"
        ) from None
    if (shares < 0).any() or not np.isclose(shares.sum(), 1.0) or (tbts <= 0).any():
        raise ValueError(f"tier shares must be >= 0 and sum to 1, tbt > 0: got {tiers!r}")
    rng = np.random.default_rng([seed, 0x7135])
    pick = rng.choice(len(names), size=len(workload), p=shares / shares.sum())
    return workload.with_columns(tier=np.array(names, dtype=object)[pick], tpot_slo=tbts[pick])
