"""``python -m llmsched.hardware.calibration`` and ``llmsched calibrate``: refit on the shared
Vidur data (or any folder of profiles), print the fidelity report, write the calibration JSON."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from llmsched.hardware.calibration.fidelity import FidelityReport, evaluate
from llmsched.hardware.calibration.fitting import (
    ATTENTION_SPLIT_KV,
    DEFAULT_HELDOUT,
    DEFAULT_TRAIN,
    MAX_TOKENS,
    ROBUST_SCALE,
    TILE_CHOICES,
    Calibration,
    fit,
)
from llmsched.hardware.calibration.profiles import (
    DEFAULT_GPU,
    DEFAULT_NETWORK,
    ProfileSet,
    load_vidur_profiles,
)
from llmsched.hardware.calibration.report import format_efficiency, format_report, plot_fidelity
from llmsched.hardware.calibration.store import CALIBRATED_DIR, save_calibration


def calibrate(
    profiles: ProfileSet,
    train: Sequence[str] = DEFAULT_TRAIN,
    heldout: Sequence[str] = DEFAULT_HELDOUT,
    *,
    attention_split_kv: int = ATTENTION_SPLIT_KV,
    max_tokens: int | None = MAX_TOKENS,
    network: str | None = None,
) -> tuple[Calibration, FidelityReport, FidelityReport]:
    """Fit on ``train``, evaluate on ``train`` and ``heldout``; the calibration carries both
    reports' summaries in its provenance."""
    cal = fit(
        profiles,
        train,
        attention_split_kv=attention_split_kv,
        max_tokens=max_tokens,
        network=network,
    )
    train_report = evaluate(
        cal, profiles, train, attention="train", allreduce="train", max_tokens=max_tokens
    )
    held_report = evaluate(cal, profiles, heldout, attention="heldout", max_tokens=max_tokens)
    root = profiles.root
    source = str(root) if root is not None else "?"
    try:
        from llmsched.data import data_dir

        base = data_dir()
        if root is not None and base is not None:
            source = str(Path(root).resolve().relative_to(base.resolve()))
    except ValueError:
        pass
    fitted_allreduce = "allreduce_profile" in cal.provenance
    prov = {
        "data_source": (
            f"{source}: microsoft/vidur operator profiles (MIT), CUDA-timed on A100 "
            "(mlp.csv per model; attention_tp2_2024-05.csv, Llama-2-70B shape at TP 2, "
            "FlashAttention"
            + (
                f"; network/{cal.provenance['allreduce_profile']}/all_reduce.csv, NCCL)"
                if fitted_allreduce
                else ")"
            )
        ),
        "gpu_profiled": profiles.gpu,
        "train_models": list(profiles.resolve(train)),
        "heldout_models": list(profiles.resolve(heldout)),
        "attention_profiles": sorted(profiles.attention),
        "attention_split": (
            f"rows with kv_cache_size < {attention_split_kv} fit, ≥ {attention_split_kv} held out"
        ),
        "max_tokens": max_tokens,
        **(
            {
                "allreduce_split": (
                    f"rows within one node at TP {cal.provenance['allreduce_train_tp']} fit, "
                    "the other TP degrees held out"
                )
            }
            if fitted_allreduce
            else {}
        ),
        "date": datetime.now(UTC).date().isoformat(),
        "method": (
            f"least squares on relative error with Huber's loss (scale {ROBUST_SCALE}), "
            "scipy.optimize.least_squares over log-parameters; GEMM token tile chosen among "
            f"{list(TILE_CHOICES)} by plain least squares; see docs/calibration.md"
        ),
        "not_calibrated": [
            *(() if fitted_allreduce else ("link", "allreduce_latency_s")),
            "layer_overhead_s",
            "iteration_overhead_s",
        ],
        "fit_error": {"train": train_report.as_dict(), "heldout": held_report.as_dict()},
        "command": "python -m llmsched.hardware.calibration",
    }
    cal = dataclasses.replace(cal, provenance={**cal.provenance, **prov})
    return cal, train_report, held_report


def _from_steps(args) -> int:
    from llmsched.hardware.calibration.steps import calibrate_from_steps, format_step_errors

    if args.no_write is False and args.out == str(CALIBRATED_DIR / "a100.json"):
        print("error: --from-steps needs --out CAL.json (not the A100 file)", file=sys.stderr)
        return 2
    try:
        cal, train, held = calibrate_from_steps(args.from_steps, args.heldout_steps, args.bench)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Fitted on {len(args.from_steps)} step log(s), device: {cal.gpu}")
    print(format_efficiency(cal))
    for name, value in cal.serving.items():
        print(f"  {name:24s} {value * 1e3:.2f} ms")
    print(format_step_errors(train, "Step cycles, fitted logs:"))
    if held is not None:
        print(format_step_errors(held, "Step cycles, held-out logs:"))
    if not args.no_write:
        print(f"wrote {save_calibration(cal, args.out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmsched calibrate",
        description="Fit the roofline's efficiencies, and print their fidelity: on operator "
        "profiles (default: Vidur's A100 tables; writes calibrated/a100.json), or on a real "
        "engine's step logs (--from-steps LOG ... --out CAL.json).",
    )
    parser.add_argument(
        "--data", help="profile folder (default: the shared data's profiles/vidur)", default=None
    )
    parser.add_argument("--gpu", default=DEFAULT_GPU, help="GPU the profiles were measured on")
    parser.add_argument("--train", nargs="+", default=list(DEFAULT_TRAIN), help="models to fit")
    parser.add_argument("--heldout", nargs="+", default=list(DEFAULT_HELDOUT), help="to evaluate")
    parser.add_argument("--attention-split-kv", type=int, default=ATTENTION_SPLIT_KV)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument(
        "--network",
        help=f"all-reduce profile (machine folder) to fit link and latency on (default: "
        f"{DEFAULT_NETWORK} if present, else the only one)",
    )
    parser.add_argument(
        "--out",
        default=str(CALIBRATED_DIR / "a100.json"),
        help="where to write the calibration (default: the package's calibrated/a100.json)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--plot", help="write the held-out predicted-vs-measured PNG here")
    steps = parser.add_argument_group(
        "from a real engine's steps (instead of operator profiles)",
        "logs that llmsched's vLLM scheduler classes wrote with "
        '--additional-config \'{"llmsched": {"step_log": "FILE"}}\'',
    )
    steps.add_argument("--from-steps", nargs="+", metavar="LOG", help="step logs to fit on")
    steps.add_argument("--heldout-steps", nargs="+", metavar="LOG", default=[], help="to evaluate")
    steps.add_argument(
        "--bench",
        nargs="+",
        metavar="RUN.json",
        default=[],
        help="llmsched bench results of runs the logged engines served: measures the serving "
        "stack's latency outside the engine (frontend_latency_s)",
    )
    args = parser.parse_args(argv)
    if args.from_steps:
        return _from_steps(args)
    try:
        profiles = load_vidur_profiles(args.data, args.gpu)
        cal, train_report, held_report = calibrate(
            profiles,
            args.train,
            args.heldout,
            attention_split_kv=args.attention_split_kv,
            max_tokens=args.max_tokens,
            network=args.network,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Fitted on {', '.join(cal.provenance['train_models'])} ({profiles.gpu}):")
    print(format_efficiency(cal))
    print(format_report(train_report, "Training models (attention: rows with short KV)"))
    print(format_report(held_report, "Held-out models (attention: rows with long KV)"))
    if not args.no_write:
        path = save_calibration(cal, args.out)
        print(f"wrote {path}")
    if args.plot:
        plot_fidelity(held_report, args.plot)
        print(f"wrote {args.plot}")
    return 0
