"""``llmsched profile`` and ``python -m llmsched.hardware.profiler``: profile a model and write the
tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from llmsched.hardware.profiler.attention import ATTENTION_BACKENDS
from llmsched.hardware.profiler.tables import PARTS, profile_model


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc


def build_parser(prog: str = "llmsched profile") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Measure a model's operator and decoder-layer times on this machine's GPU (random "
            "weights of the real shapes; nothing downloaded) and write Vidur-schema CSVs "
            "(mlp.csv, attention.csv, layer.csv, meta.json) for the latency-model calibration. "
            "Without a GPU it profiles a tiny stand-in of the model on the CPU."
        ),
    )
    p.add_argument("--model", required=True, help="model name, alias or Hugging Face id")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (one rank timed)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--tokens", type=_int_list, help="token counts for mlp.csv, e.g. 1,8,512")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument(
        "--tiny",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tiny stand-in shapes (default: on a CPU only)",
    )
    p.add_argument("--repeats", type=int, help="timed repeats per point (default 20 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, help="warm-up calls per point (default 5 GPU, 1 CPU)")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    p.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", *ATTENTION_BACKENDS],
        help="auto: FlashAttention varlen on CUDA when it works, else SDPA",
    )
    p.add_argument("--no-cuda-graph", action="store_true", help="time eagerly, no CUDA graphs")
    p.add_argument("--no-flush-l2", action="store_true", help="keep L2 warm between repeats")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = [t.strip() for t in args.parts.split(",") if t.strip()]
    try:
        paths = profile_model(
            args.model,
            tp=args.tp,
            out_dir=args.out,
            token_counts=args.tokens,
            device=args.device,
            tiny=args.tiny,
            repeats=args.repeats,
            warmup=args.warmup,
            parts=parts,
            cuda_graph=not args.no_cuda_graph,
            flush_l2=not args.no_flush_l2,
            attention_backend=args.attention_backend,
            progress=lambda msg: print(msg, flush=True),
        )
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
