"""Closed-loop sessions: which turn follows which.

A request with ``closed_loop`` set is sent when its session's previous turn (``turn - 1``) has
finished and that turn's ``tool_time`` has passed (docs/agents.md). The cluster asks this
module, once per run, for each request's follower and for the requests that arrive on their own.
"""

from __future__ import annotations

import numpy as np

from llmsched.workload.request import Workload

#: Why a turn never ran: an earlier turn of its program was rejected (the summary's reason).
PROGRAM_CUT = "not run: an earlier turn of its program was rejected"


def successors(workload: Workload) -> np.ndarray | None:
    """For each request, the index of the closed-loop turn that follows it (-1: none); None
    when the workload has no closed-loop turn (every request arrives at its own time).

    A closed-loop turn whose predecessor is not in the workload, or a turn that a session
    holds twice, is an error naming the request."""
    closed = workload.columns["closed_loop"]
    if not closed.any():
        return None
    c = workload.columns
    sessions = c["session_id"]
    turns = c["turn"]
    ids = c["request_id"]
    if sessions is None:
        raise ValueError(
            f"request {ids[int(np.flatnonzero(closed)[0])]!r} is closed-loop but has no "
            "session_id: a closed-loop turn follows its session's previous turn"
        )
    where: dict[tuple, int] = {}
    for i, (s, t) in enumerate(zip(sessions.tolist(), turns.tolist())):
        if s is None:
            continue
        if (s, t) in where:
            raise ValueError(
                f"session {s!r} has turn {t} twice (requests {ids[where[s, t]]!r} and "
                f"{ids[i]!r}): a closed-loop session's turns must be distinct"
            )
        where[s, t] = i
    follower = np.full(len(workload), -1, dtype=np.int64)
    for i in np.flatnonzero(closed).tolist():
        s, t = sessions[i], int(turns[i])
        before = where.get((s, t - 1)) if s is not None else None
        if before is None:
            raise ValueError(
                f"request {ids[i]!r} (session {s!r}, turn {t}) is closed-loop, but its session "
                f"has no turn {t - 1} in the workload to follow"
            )
        follower[before] = i
    return follower
