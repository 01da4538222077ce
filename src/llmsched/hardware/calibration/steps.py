"""Calibration on a real engine's steps: ``llmsched calibrate --from-steps LOG ... --out CAL.json``.

A step log (``llmsched.hardware.steplog``) holds every step a vLLM engine ran: its batch and when
it started. What the simulator charges for a step is its *cycle*, from one ``schedule()`` to the
next while the engine has work: the forward pass and sampling, and the engine's own scheduling,
input preparation and output processing around them. The roofline (``roofline.py``) prices the
step's batch; the fit chooses its efficiencies so that it prices the cycles, by least squares on
the relative error with Huber's loss (scipy), over every busy step of the given logs.

Fitted, per device: ``gemm_compute``, ``gemm_memory``, ``attn_compute``, ``attn_memory``,
``elementwise_memory`` (fractions of the device's peaks) and ``layer_overhead_s``,
``iteration_overhead_s``, ``sequence_overhead_s`` (seconds: per layer, per step, per sequence in the
batch; the last is the engine's per-request work on the host, which on a CPU engine makes a decode
step grow with the batch long before its GEMMs are compute-bound). The other terms keep their
defaults: the kernel-level ones (a fixed time per kernel, GEMM tiles) are what operator profiles
measure, not whole steps; the all-reduce does not occur at TP 1. Steps of several model shapes on
one device fit together, which is what separates a per-layer cost from a weight read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from llmsched.hardware.calibration.fitting import ROBUST_SCALE, Calibration
from llmsched.hardware.calibration.profiles import ELEMENTWISE_KINDS
from llmsched.hardware.latency import BatchShape
from llmsched.hardware.replay import kind_of, shape_of
from llmsched.hardware.roofline import Efficiency, RooflineModel
from llmsched.hardware.specs import GPUSpec, ModelSpec, model_from_config, with_dtype
from llmsched.hardware.steplog import (
    batch_of_step,
    cycle_times,
    device_spec,
    frontend_latencies,
    read_step_log,
)

#: The efficiencies fitted (fractions of the device's peaks), then the overheads (seconds).
FRACTIONS = ("gemm_compute", "gemm_memory", "attn_compute", "attn_memory", "elementwise_memory")
OVERHEADS = ("layer_overhead_s", "iteration_overhead_s", "sequence_overhead_s")


@dataclass
class StepSet:
    """The busy steps of some step logs: each one's model, batch shape, kind and cycle."""

    models: list[ModelSpec]  # one per log
    log: np.ndarray  # index into `models` / `sources`, per step
    shapes: list[BatchShape]
    kinds: np.ndarray  # decode | mixed | prefill
    cycle: np.ndarray  # seconds
    sources: list[str]
    device: dict[str, Any]
    engines: list[dict[str, Any]]  # each log's engine limits (for the report)

    def __len__(self) -> int:
        return len(self.shapes)


def model_of(header: dict[str, Any], name: str) -> ModelSpec:
    """The served model of a step log: its config.json fields in the dtype it was served in."""
    return with_dtype(model_from_config(header["model_config"], name), header.get("dtype"))


def load_steps(paths: Sequence[str | os.PathLike[str]]) -> StepSet:
    """Every busy step of the logs (their cycle is known); the logs must share one device."""
    if not paths:
        raise ValueError("no step log given: --from-steps LOG [LOG ...]")
    models, log, shapes, kinds, cycles, engines = [], [], [], [], [], []
    device: dict[str, Any] | None = None
    for i, path in enumerate(paths):
        head, steps, _ = read_step_log(path)
        dev = dict(head["device"])
        if device is None:
            device = dev
        elif (dev.get("kind"), dev.get("name"), dev.get("cores")) != (
            device.get("kind"),
            device.get("name"),
            device.get("cores"),
        ):
            raise ValueError(
                f"{path} was recorded on {dev.get('name')!r} ({dev.get('cores')} cores), "
                f"{paths[0]} on {device.get('name')!r} ({device.get('cores')} cores): "
                "calibrate one device at a time"
            )
        elif "memory_bandwidth" in dev:  # measured at each start: keep the best (least loaded)
            device["memory_bandwidth"] = max(device["memory_bandwidth"], dev["memory_bandwidth"])
        if head.get("tensor_parallel_size", 1) != 1:
            raise ValueError(f"{path}: TP {head['tensor_parallel_size']} (only TP 1 is fitted)")
        models.append(model_of(head, Path(path).stem))
        limits = ("num_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs")
        engines.append({k: head[k] for k in limits if k in head})
        for step, cycle in zip(steps, cycle_times(steps)):
            if np.isnan(cycle):
                continue
            batch = batch_of_step(step)
            log.append(i)
            shapes.append(shape_of(batch))
            kinds.append(kind_of(batch))
            cycles.append(cycle)
    if not shapes:
        raise ValueError(
            "the step logs hold no step followed by another while the engine was busy: "
            "record a run with some load"
        )
    return StepSet(
        models, np.array(log), shapes, np.array(kinds), np.array(cycles),
        [str(p) for p in paths], device or {}, engines,
    )  # fmt: skip


def efficiency_of(x: np.ndarray) -> Efficiency:
    """Fitted parameters → Efficiency: fractions through a logistic (always in (0, 1)),
    overheads through an exponential (always positive)."""
    fractions = 1.0 / (1.0 + np.exp(-x[: len(FRACTIONS)]))
    overheads = np.exp(x[len(FRACTIONS) :])
    values = dict(zip(FRACTIONS, map(float, fractions))) | dict(
        zip(OVERHEADS, map(float, overheads))
    )
    return Efficiency(**values)


def predict(steps: StepSet, gpu: GPUSpec, efficiency: Efficiency) -> np.ndarray:
    """The roofline's time for every step."""
    models = [RooflineModel(m, gpu, 1, efficiency) for m in steps.models]
    return np.array([models[i].iteration_time(s) for i, s in zip(steps.log, steps.shapes)])


def fit_steps(steps: StepSet, gpu: GPUSpec) -> Efficiency:
    """The efficiencies that price the steps' cycles best (robust least squares, relative)."""
    from scipy.optimize import least_squares

    # 0.5 each; 0.1 ms a layer, 1 ms a step, 0.1 ms a sequence
    x0 = np.concatenate([np.zeros(len(FRACTIONS)), np.log([1e-4, 1e-3, 1e-4])])
    measured = steps.cycle
    # Each kind of step weighs alike, however many of it the logs hold (decode-only steps are
    # most of a run; prefills and mixed steps set the compute terms).
    counts = {k: np.count_nonzero(steps.kinds == k) for k in set(steps.kinds)}
    weights = np.sqrt(np.array([len(steps) / (len(counts) * counts[k]) for k in steps.kinds]))

    def residuals(x: np.ndarray) -> np.ndarray:
        return weights * (predict(steps, gpu, efficiency_of(x)) / measured - 1.0)

    result = least_squares(residuals, x0, loss="huber", f_scale=ROBUST_SCALE, x_scale=1.0)
    return efficiency_of(result.x)


def step_errors(steps: StepSet, gpu: GPUSpec, efficiency: Efficiency) -> dict[str, Any]:
    """Relative errors of the priced steps: per log and kind, median |error| and median error
    (signed: > 0 the model is slow), and over all steps."""
    err = predict(steps, gpu, efficiency) / steps.cycle - 1.0

    def stats(mask: np.ndarray) -> dict[str, float | int]:
        e, measured = err[mask], steps.cycle[mask]
        return {
            "steps": int(mask.sum()),
            "median_abs_error": float(np.median(np.abs(e))),
            "median_error": float(np.median(e)),
            # the steps' summed time, priced against measured: what a run's length sees
            "total_error": float(np.sum(measured * (1 + e)) / np.sum(measured) - 1),
        }

    out: dict[str, Any] = {"all": stats(np.ones(len(steps), dtype=bool))}
    for i, source in enumerate(steps.sources):
        mine = steps.log == i
        out[source] = {"all": stats(mine)} | {
            kind: stats(mine & (steps.kinds == kind))
            for kind in ("decode", "mixed", "prefill")
            if np.any(mine & (steps.kinds == kind))
        }
    return out


def frontend_latency(
    paths: Sequence[str | os.PathLike[str]], bench: Sequence[str | os.PathLike[str]]
) -> tuple[float, int]:
    """The serving stack's latency outside the engine: the median, over every request of the
    `bench` results (`llmsched bench` JSON) that one of the step logs served, of its client TTFT
    less the engine's part (steplog.frontend_latencies); and how many requests it rests on."""
    logs = [read_step_log(p) for p in paths]
    found = []
    for path in bench:
        result = json.loads(Path(path).read_text())
        if "request_ids" not in result:
            raise ValueError(f"{path}: no request_ids (an `llmsched bench` result has them)")
        for head, steps, added in logs:
            found.append(frontend_latencies(head, steps, added, result))
    values = np.concatenate(found) if found else np.zeros(0)
    if not len(values):
        raise ValueError(
            "no request of the --bench results is in the step logs: give the results of runs "
            "that the logged engine served"
        )
    return float(np.median(values)), len(values)


def calibrate_from_steps(
    paths: Sequence[str | os.PathLike[str]],
    heldout: Sequence[str | os.PathLike[str]] = (),
    bench: Sequence[str | os.PathLike[str]] = (),
) -> tuple[Calibration, dict[str, Any], dict[str, Any] | None]:
    """Fit on the steps of `paths`; the errors on them and on the `heldout` logs' steps. With
    `bench` (the client's results of runs those engines served), also the serving stack's
    latency outside the engine."""
    steps = load_steps(paths)
    gpu = device_spec(steps.device)
    efficiency = fit_steps(steps, gpu)
    train = step_errors(steps, gpu, efficiency)
    held = None
    if heldout:
        other = load_steps(heldout)
        held = step_errors(other, gpu, efficiency)
    serving, serving_note = {}, "not measured (no --bench results)"
    if bench:
        latency, n = frontend_latency(paths, bench)
        serving = {"frontend_latency_s": latency}
        serving_note = f"median over {n} requests of client TTFT less the engine's part"
    cal = Calibration(
        gpu=gpu.name,
        serving=serving,
        efficiency=efficiency,
        elementwise=dict.fromkeys(ELEMENTWISE_KINDS, efficiency.elementwise_memory),
        device=steps.device if steps.device.get("kind") == "cpu" else None,
        provenance={
            "data_source": "engine step logs (llmsched's vLLM scheduler classes, step_log)",
            "step_logs": steps.sources,
            "heldout_step_logs": [str(p) for p in heldout],
            "models": [dataclasses.asdict(m) for m in steps.models],
            "engines": steps.engines,
            "fitted": [*FRACTIONS, *OVERHEADS],
            "frontend_latency": serving_note,
            "method": (
                "each busy step's cycle (schedule() to the next schedule()) priced by the "
                "roofline; least squares on relative error with Huber's loss (scale "
                f"{ROBUST_SCALE}), each kind of step (decode, mixed, prefill) weighing alike, "
                "scipy.optimize.least_squares"
            ),
            "fit_error": {"train": train, "heldout": held},
            "date": datetime.now(UTC).date().isoformat(),
            "command": "llmsched calibrate --from-steps",
        },
    )
    return cal, train, held


def format_step_errors(errors: dict[str, Any], title: str) -> str:
    lines = [title, f"{'log':40s} {'kind':8s} {'steps':>6s} {'median |err|':>13s} {'median':>8s}"]
    for source, by_kind in errors.items():
        if source == "all":
            continue
        for kind, s in by_kind.items():
            lines.append(
                f"{Path(source).name[-40:]:40s} {kind:8s} {s['steps']:6d} "
                f"{100 * s['median_abs_error']:12.1f}% {100 * s['median_error']:+7.1f}%"
            )
    s = errors["all"]
    lines.append(
        f"{'all':40s} {'':8s} {s['steps']:6d} {100 * s['median_abs_error']:12.1f}% "
        f"{100 * s['median_error']:+7.1f}%  (total time {100 * s['total_error']:+.1f}%)"
    )
    return "\n".join(lines)
