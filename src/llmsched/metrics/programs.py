"""Metrics of multi-turn programs (agents, conversations): one program = one session.

* job completion time (JCT) of a program = its last turn's finish − its first turn's arrival,
  over the programs whose every turn finished (Continuum's metric, measured server-side);
* a turn's queue wait = first scheduled − arrival (the "scheduling bubble" a closed loop pays
  at every turn), over the programs' turns; and per program, the sum over its turns;
* TTFT cold (turn 0: nothing of the program cached yet) and warm (turn ≥ 1), as BLIS reports;
* programs cut short: a rejected turn ends its program, its later turns are counted as not run.

The statistics are `vllm bench serve`'s (mean, median, std, percentiles, in ms), named as the
summary names them (`mean_jct_ms`, `p99_ttft_warm_ms`, ...). Requests without a session are
not programs and are left out here (they are in the summary's request metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llmsched.metrics.summary import MetricsCollector
from llmsched.metrics.vllm_bench import latency_stats_ms
from llmsched.workload.request import Workload
from llmsched.workload.sessions import PROGRAM_CUT

#: Percentiles of the program metrics besides the median (Continuum reports p95 and p99).
PROGRAM_PERCENTILES: tuple[float, ...] = (90, 95, 99)


def program_metrics(
    workload: Workload,
    collector: MetricsCollector,
    percentiles: Sequence[float] = PROGRAM_PERCENTILES,
) -> dict[str, Any] | None:
    """The program metrics of a run of `workload`; None when it has no sessions."""
    sessions = workload.columns["session_id"]
    if sessions is None or all(s is None for s in sessions):
        return None
    cols = collector.columns()
    row_of = {rid: i for i, rid in enumerate(cols["request_id"].tolist())}
    ids = workload.columns["request_id"].tolist()
    try:
        rows = np.array([row_of[rid] for rid in ids], dtype=np.int64)
    except KeyError as missing:
        raise ValueError(f"request {missing} of the workload has no result") from None
    has = np.array([s is not None for s in sessions], dtype=bool)
    rows = rows[has]
    program = np.asarray([str(s) for s in sessions[has]], dtype=object)
    turn = workload.columns["turn"][has]
    finished = cols["status"][rows] == "finished"
    arrival = cols["arrival"][rows]
    finish = cols["finish"][rows]
    queue = cols["queue_time"][rows]
    ttft = cols["ttft"][rows]
    not_run = cols["reject_reason"][rows] == PROGRAM_CUT

    names, index = np.unique(program, return_inverse=True)
    count = len(names)
    all_done = np.bincount(index, weights=(~finished).astype(float), minlength=count) == 0
    first = np.full(count, np.inf)
    np.minimum.at(first, index, arrival)
    last = np.full(count, -np.inf)
    np.maximum.at(last, index, np.where(finished, finish, -np.inf))
    jct = (last - first)[all_done]
    waits = np.where(np.isnan(queue), 0.0, queue)
    program_wait = np.bincount(index, weights=waits, minlength=count)[all_done]

    out: dict[str, Any] = {
        "num_programs": count,
        "completed_programs": int(all_done.sum()),
        "cut_programs": int(count - all_done.sum()),
        "program_turns": len(rows),
        "mean_turns_per_program": len(rows) / count,
        "turns_not_run": int(not_run.sum()),
    }
    out |= latency_stats_ms("jct", jct, percentiles)
    out["program_makespan_s"] = float(last.max() - first.min()) if all_done.any() else None
    done_queue = queue[finished & ~np.isnan(queue)]
    out |= latency_stats_ms("turn_queue_time", done_queue, percentiles)
    out |= latency_stats_ms("program_queue_time", program_wait, percentiles)
    out |= latency_stats_ms("ttft_cold", ttft[finished & (turn == 0)], percentiles)
    out |= latency_stats_ms("ttft_warm", ttft[finished & (turn > 0)], percentiles)
    return out
