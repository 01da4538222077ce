"""The roofline latency model's iteration times for a few models, GPUs and batch shapes.

    .venv/bin/python benchmarks/latency_table.py [--latency calibrated]

Prints the "More shapes" table of docs/latency-model.md (milliseconds): decode batches of b
requests with 1,024 tokens of context each, prefill chunks, and a 2,048-token chunk after a
14,336-token prefix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmsched.hardware.latency import BatchShape  # noqa: E402
from llmsched.hardware.roofline import RooflineModel  # noqa: E402
from llmsched.hardware.specs import get_gpu, get_model  # noqa: E402

CASES = [
    ("llama-2-7b", "a100", 1),
    ("llama-2-7b", "h100", 1),
    ("llama-3-8b", "a100", 1),
    ("llama-2-70b", "a100", 2),
    ("llama-2-70b", "a100", 4),
]


def decode(b: int, context: int = 1024) -> BatchShape:
    return BatchShape(num_decodes=b, decode_kv_tokens=b * (context + 1))


def prefill(c: int, prefix: int = 0) -> BatchShape:
    return BatchShape(c, c * (prefix + (c + 1) / 2), prefix + c, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", choices=["roofline", "calibrated"], default="roofline")
    opts = parser.parse_args()
    shapes = {
        "decode 1": decode(1),
        "decode 32": decode(32),
        "decode 128": decode(128),
        "prefill 512": prefill(512),
        "prefill 2048": prefill(2048),
        "2048 @ 14k": prefill(2048, 14336),
    }
    print("| model | GPU | TP | " + " | ".join(shapes) + " |")
    print("|---" * (3 + len(shapes)) + "|")
    for model, gpu, tp in CASES:
        args = (get_model(model), get_gpu(gpu), tp)
        lm = (
            RooflineModel.calibrated(*args)
            if opts.latency == "calibrated"
            else RooflineModel(*args)
        )
        times = " | ".join(f"{1e3 * lm.iteration_time(s):.1f}" for s in shapes.values())
        print(f"| {model} | {gpu} | {tp} | {times} |")


if __name__ == "__main__":
    main()
