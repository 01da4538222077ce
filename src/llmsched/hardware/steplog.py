"""A real engine's step log, as the latency model reads it: the format, its reader, its device.

llmsched's vLLM scheduler classes write it (``llmsched.integrations.vllm.steps``: a header line,
then one JSON line per engine step); ``llmsched calibrate --from-steps`` fits the latency model
on it. This module needs no vLLM.

A step's batch is the simulator's own :data:`llmsched.hardware.replay.Batch`: prefill (or
recompute) chunks as (tokens, KV already cached) and decodes as the KV each already has.

**The device.** A GPU engine names its GPU, and the registered datasheet (``hardware/specs.py``)
describes it. A CPU engine (vLLM's CPU build) is described from what the header measured where
it ran: the cores vLLM's worker computes on (its OpenMP threads: every core but the reserved ones),
their clock and vector ISA, which give a peak FLOP rate for the served dtype, and the memory
bandwidth of one copy measured when the log was opened. The latency model's efficiencies are
fractions of these peaks, as they are of a GPU's datasheet peaks.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmsched.hardware.specs import GPUSpec, get_gpu

STEP_LOG_VERSION = 1
CLIENT_ID = re.compile(r"llmsched-[0-9a-f]+-\d+")  # the X-Request-Id `llmsched bench` sends

# FLOPs per cycle per core (fused multiply-adds count 2) for the served dtype. A CPU without
# native bf16 arithmetic converts to fp32 and computes there.
_FP32_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32))
_BF16_FLOPS_PER_CYCLE = (("amx_bf16", 2048), ("avx512_bf16", 128))


def _cpu_flags() -> tuple[str, float, set[str]]:
    name, mhz, flags = platform.processor() or platform.machine(), 0.0, set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, mhz, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            name = value.strip()
        elif key == "cpu MHz" and not mhz:
            mhz = float(value)
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name, mhz, flags


def worker_cores(tp: int = 1) -> int:
    """The cores vLLM's CPU workers compute on: with VLLM_CPU_OMP_THREADS_BIND=auto (its
    default) every core this process may use but VLLM_CPU_NUM_OF_RESERVED_CPU (default: one
    per worker, for the engine's own process); else the cores of the given binding."""
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if bind == "auto":
        reserved = int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", tp))
        return max(1, (cpus or 1) - reserved)
    cores = 0
    for rank in bind.split("|"):
        for part in rank.split(","):
            lo, _, hi = part.partition("-")
            cores += int(hi or lo) - int(lo) + 1
    return max(1, cores)


def memory_bandwidth(megabytes: int = 256, repeats: int = 3) -> float:
    """Bytes/s of one thread copying a large array (read + write), best of `repeats`."""
    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def cpu_description(dtype: str = "float32", tp: int = 1) -> dict[str, Any]:
    """The CPU a vLLM CPU engine computes on, for a step log's header (measures bandwidth)."""
    name, mhz, flags = _cpu_flags()
    table = _BF16_FLOPS_PER_CYCLE + _FP32_FLOPS_PER_CYCLE if dtype != "float32" else ()
    table = table or _FP32_FLOPS_PER_CYCLE
    per_cycle = next((n for flag, n in table if flag in flags), 16)
    cores = worker_cores(tp)
    return {
        "kind": "cpu",
        "name": name,
        "cores": cores,
        "mhz": mhz,
        "isa": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}),
        "peak_flops": cores * mhz * 1e6 * per_cycle,
        "memory_bandwidth": memory_bandwidth(),
    }


def device_spec(device: dict[str, Any]) -> GPUSpec:
    """The latency model's description of the device a step log was recorded on."""
    if device.get("kind") != "cpu":
        return get_gpu(device.get("name", ""))
    name = f"cpu: {device.get('name', 'unknown')} ({device['cores']} cores)"
    return GPUSpec(
        name,
        memory_bytes=0,  # a CPU engine's KV is VLLM_CPU_KVCACHE_SPACE: give --num-blocks
        bf16_flops=float(device["peak_flops"]),
        hbm_bandwidth=float(device["memory_bandwidth"]),
        nvlink_bandwidth=float(device["memory_bandwidth"]),  # TP ranks share the memory
        pcie_bandwidth=float(device["memory_bandwidth"]),
        datasheet_memory_gb=0,
        has_nvlink=False,
    )


def read_step_log(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    """A step log's header, its steps, and when each request arrived at the server (request
    id -> seconds on the log's clock); a clear error for a file that is not a step log. A last
    line without its newline (the engine is writing it, or was killed) is left out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"step log {path} does not exist")
    with path.open() as f:
        try:
            head = json.loads(f.readline())
        except json.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or "llmsched_step_log" not in head:
            raise ValueError(
                f"{path}: not an llmsched step log (its first line must be the header that "
                "llmsched's vLLM schedulers write with --additional-config "
                '\'{"llmsched": {"step_log": "FILE"}}\')'
            )
        if head["llmsched_step_log"] > STEP_LOG_VERSION:
            raise ValueError(
                f"{path}: step log version {head['llmsched_step_log']} is newer than this "
                f"llmsched reads ({STEP_LOG_VERSION})"
            )
        steps, added = [], {}
        for line_no, line in enumerate(f, start=2):
            if not line.endswith("\n"):
                break  # a line still being written (a live engine's) or cut (a killed one's)
            if not line.strip():
                continue
            try:
                step = json.loads(line)
                if "add" in step:
                    added[str(step["add"])] = float(step.get("arrived", step["t"]))
                    continue
                if len(step["t"]) != 4:
                    raise ValueError(f"'t' holds {len(step['t'])} times, not 4")
                if not isinstance(step["p"], list) or not isinstance(step["d"], list):
                    raise ValueError("'p' and 'd' must be lists")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: not a step ({e})") from None
            steps.append(step)
    return head, steps, added


def frontend_latencies(
    head: dict[str, Any],
    steps: list[dict[str, Any]],
    added: dict[str, float],
    bench: dict[str, Any],
) -> np.ndarray:
    """What the serving stack outside the engine adds to each request's TTFT, in seconds: from
    the client's send to the server's receipt (HTTP), and from the end of the step that made the
    first token to the client's receipt of it (IPC, detokenisation, the stream). The engine's
    part between them (waiting for a step, the steps) is what the simulator models. Requests are
    matched by the id the client sent (X-Request-Id, `llmsched bench`'s `request_ids`), which
    vLLM keeps in its own; times on both sides are this machine's monotonic clock."""
    origin = head["monotonic"]
    first_end = {rid: origin + s["t"][3] for s in steps for rid in s.get("first", ())}
    engine_ids = {}
    for rid in added:
        match = CLIENT_ID.search(rid)
        if match:
            engine_ids[match.group(0)] = rid
    out = []
    for i, client_id in enumerate(bench.get("request_ids") or ()):
        rid = engine_ids.get(client_id)
        if rid is None or rid not in first_end or bench["errors"][i]:
            continue
        sent, first = bench["start_times"][i], bench["start_times"][i] + bench["ttfts"][i]
        out.append((origin + added[rid] - sent) + (first - first_end[rid]))
    return np.array(out)


def cycle_times(steps: list[dict[str, Any]]) -> np.ndarray:
    """Each step's engine cycle: from its schedule() to the next one's, when the engine went
    straight on (it still had requests: `busy`); NaN for a step after which it waited."""
    out = np.full(len(steps), np.nan)
    for i in range(len(steps) - 1):
        if steps[i]["busy"]:
            out[i] = steps[i + 1]["t"][0] - steps[i]["t"][0]
    return out


def batch_of_step(step: dict[str, Any]) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """The step's batch as the simulator's replay writes one (prefills, decodes)."""
    return tuple((int(c), int(p)) for c, p in step["p"]), tuple(int(d) for d in step["d"])
