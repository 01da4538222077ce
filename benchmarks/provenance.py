"""Where a benchmark's figures were measured: recorded beside them in benchmarks/results."""

from __future__ import annotations

import platform
import time


def provenance() -> dict[str, str]:
    """The machine, the Python and the time (UTC) of a run."""
    return {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
