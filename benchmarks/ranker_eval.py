"""PARS's pairwise ranker against its baselines, on ShareGPT and across AlpacaEval generators.

1. ShareGPT V3 (hashed conversation split, 80/10/10): frozen-MiniLM PARS pairwise (MLP head,
   and PARS's linear head), pointwise regression and ListMLE on the same embeddings, TF-IDF +
   ridge, and prompt length alone. Kendall's tau-b and pairwise accuracy (delta = 0.2 pairs) on
   the test conversations, latency per request on this CPU.
2. Cross-model (AlpacaEval, hashed instruction split 60/10/30): PARS trained on one generator's
   lengths (train instructions), tau on the test instructions against other generators' lengths;
   beside it the ShareGPT-trained PARS (no AlpacaEval training at all), prompt length, and the
   training generator's true lengths used as scores (how well one model's lengths rank
   another's: a ceiling for any predictor trained on that model).
3. Optionally (``--full-steps N``) a short full fine-tune (encoder + linear head, PARS's recipe)
   on a ShareGPT subset, on the CPU.

Needs ../shared/data (or LLMSCHED_DATA) and the 'predict' extra. Embeddings are cached
(``LLMSCHED_CACHE``), so a second run skips the ~12 min of MiniLM on 2 cores.

    .venv/bin/python benchmarks/ranker_eval.py [--max-train N] [--full-steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from llmsched.predict import PromptLengthPredictor
from llmsched.predict.data import load_alpaca_eval, load_sharegpt, split
from llmsched.predict.encoder import Encoder
from llmsched.predict.evaluate import CROSS_MODEL_GENERATORS, cross_model, evaluate, format_table
from llmsched.predict.predictors import EncoderHeadPredictor
from llmsched.predict.train import TrainConfig, train_predictor

RESULTS = Path(__file__).resolve().parent / "results" / "ranker_eval.json"
COLUMNS = [
    "method",
    "kendall_tau",
    "pairwise_accuracy",
    "val_pairwise_accuracy",
    "latency_ms_batch1",
    "latency_ms_batch32",
    "train_seconds",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-train", type=int, help="first N ShareGPT train prompts (default all)")
    ap.add_argument("--train-generator", default="gpt4_1106_preview")
    ap.add_argument("--full-steps", type=int, default=0, help="full fine-tune steps (0: skip)")
    ap.add_argument("--full-train", type=int, default=2000, help="prompts for the full mode")
    ap.add_argument("--save-model", help="save the ShareGPT PARS (frozen) model here")
    ap.add_argument("--full-only", action="store_true", help="only the full fine-tune")
    ap.add_argument("--out", help=f"result JSON (default {RESULTS.name} or ranker_eval_full.json)")
    args = ap.parse_args(argv)
    if args.full_only:
        return full_finetune(args)

    started = time.perf_counter()
    encoder = Encoder()
    parts = split(load_sharegpt())
    train, val, test = parts["train"].head(args.max_train), parts["val"], parts["test"]
    print(f"ShareGPT: {len(train)} train, {len(val)} val, {len(test)} test prompts")
    t0 = time.perf_counter()
    x_test = encoder.embed_cached(test.prompts, progress=True)
    for data in (train, val):
        encoder.embed_cached(data.prompts, progress=True)
    embed_s = time.perf_counter() - t0

    variants = [
        ("PARS pairwise (MLP head)", TrainConfig(method="pairwise")),
        ("PARS pairwise (linear head)", TrainConfig(method="pairwise", head="linear")),
        ("pointwise MSE log-length", TrainConfig(method="pointwise")),
        ("ListMLE (vllm-ltr style)", TrainConfig(method="listmle")),
        ("TF-IDF + ridge", TrainConfig(method="tfidf")),
    ]
    rows, pars = [], None
    for name, config in variants:
        predictor = train_predictor(train, val, config, encoder=encoder)
        cached = (
            predictor.score_embeddings(x_test)
            if isinstance(predictor, EncoderHeadPredictor)
            else None
        )
        row = {"method": name, **evaluate(predictor, test, scores=cached, progress=True)}
        row.update(
            val_pairwise_accuracy=predictor.meta["val_pairwise_accuracy"],
            train_seconds=predictor.meta["train_seconds"],
            history=predictor.meta.get("history"),
        )
        rows.append(row)
        print(format_table([row], COLUMNS), flush=True)
        if pars is None:
            pars = predictor
    plen = PromptLengthPredictor()
    rows.append({"method": "prompt length (tokens)", **evaluate(plen, test), "train_seconds": 0})
    print("\nShareGPT test split:")
    print(format_table(rows, COLUMNS))
    if args.save_model:
        pars.meta["test"] = {k: v for k, v in rows[0].items() if k not in ("history", "method")}
        pars.save(args.save_model)
        print(f"saved PARS model to {args.save_model}")

    # Cross-model on AlpacaEval.
    gen = args.train_generator
    alpaca = split(load_alpaca_eval(gen))
    alpaca_pars = train_predictor(
        alpaca["train"], alpaca["val"], TrainConfig(method="pairwise"), encoder=encoder
    )
    truth = dict(zip(load_alpaca_eval(gen).prompts, load_alpaca_eval(gen).lengths))
    generators = [g for g in CROSS_MODEL_GENERATORS]
    columns = {
        f"PARS trained on {gen}": cross_model(alpaca_pars, generators),
        "PARS trained on ShareGPT": cross_model(pars, generators),
        "prompt length": cross_model(plen, generators),
        f"{gen}'s true lengths": cross_model(
            None,
            generators,
            score_fn=lambda texts: np.array([truth.get(t, np.nan) for t in texts]),
        ),
    }
    cross = []
    for i, g in enumerate(generators):
        row = {"generator": g, "prompts": columns[next(iter(columns))][i]["prompts"]}
        for name, res in columns.items():
            row[name] = res[i]["kendall_tau"]
        cross.append(row)
    print("\nAlpacaEval test instructions, Kendall tau against each generator's lengths:")
    print(format_table(cross, ["generator", "prompts", *columns]))

    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "sharegpt": {
            "train": len(train),
            "val": len(val),
            "test": len(test),
            "embed_seconds_all_splits": round(embed_s, 1),
            "rows": rows,
        },
        "cross_model": {"train_generator": gen, "rows": cross},
        "seconds": round(time.perf_counter() - started, 1),
        "command": "python benchmarks/ranker_eval.py " + " ".join(argv or sys.argv[1:]),
    }
    out = Path(args.out or RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"\nwrote {out}; reproduce with: {result['command']}")
    return 0


def full_finetune(args) -> int:
    """A short full fine-tune (encoder + linear head, lr 2e-5) on a ShareGPT subset, on the CPU:
    what PARS does on a GPU, here only a few dozen steps."""
    parts = split(load_sharegpt())
    sub_train, sub_val = parts["train"].head(args.full_train), parts["val"].head(500)
    test = parts["test"].head(1000)
    steps = args.full_steps or 40
    config = TrainConfig(mode="full", max_steps=steps, batch_size=32, epochs=1)
    ft = train_predictor(sub_train, sub_val, config)
    row = {
        "method": f"PARS full fine-tune, {steps} steps x 32 pairs, {len(sub_train)} prompts",
        **evaluate(ft, test, progress=True, repeats=10),
        "val_pairwise_accuracy": ft.meta["val_pairwise_accuracy"],
        "train_seconds": ft.meta["train_seconds"],
        "test_prompts": len(test),
        "history": ft.meta["history"],
    }
    print("\nFull fine-tune on the CPU (subset; first 1000 test prompts):")
    print(format_table([row], COLUMNS))
    out = Path(args.out or RESULTS.with_name("ranker_eval_full.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/ranker_eval.py --full-only --full-steps " + str(steps)
    out.write_text(json.dumps({"full_finetune": row, "command": command}, indent=2) + "\n")
    print(f"wrote {out}; reproduce with: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
