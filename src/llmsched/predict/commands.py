"""``llmsched train-ranker`` and ``llmsched eval-ranker``."""

from __future__ import annotations

import argparse
import json

from llmsched.predict.data import load_dataset, split
from llmsched.predict.train import METHODS, MODES, TrainConfig

DATA_HELP = (
    "sharegpt, alpaca_eval[:GENERATOR], a trace with prompt text (llmsched JSONL with "
    "prompt_text: the file a simulation replays), or a JSONL of {prompt, output_tokens} rows"
)


def add_commands(subparsers) -> None:
    t = subparsers.add_parser(
        "train-ranker",
        help="train a response-length ranker (PARS or a baseline)",
        description="Train a ranker on the train split of a prompt/length data set, keep the "
        "checkpoint with the best pairwise validation accuracy, save it to --out.",
    )
    t.add_argument("--data", required=True, help=DATA_HELP)
    t.add_argument("--mode", choices=MODES, default="frozen", help="frozen encoder (CPU) or full")
    t.add_argument("--method", choices=METHODS, default="pairwise")
    t.add_argument("--out", required=True, metavar="MODEL_DIR")
    t.add_argument("--max-train", type=int, metavar="N", help="first N train prompts only")
    t.add_argument("--max-val", type=int, metavar="N", help="first N validation prompts only")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, help="default 2e-5 (full), 1e-3 (frozen head)")
    t.add_argument("--head", choices=["mlp", "linear"], help="default mlp (frozen), linear (full)")
    t.add_argument("--k-pairs", type=int, default=10, help="pairs per prompt (K)")
    t.add_argument("--delta", type=float, default=0.2, help="min relative length difference")
    t.add_argument("--max-steps", type=int, help="stop after this many steps")
    t.add_argument("--seed", type=int, default=42)
    t.set_defaults(func=cmd_train_ranker)

    e = subparsers.add_parser(
        "eval-ranker",
        help="Kendall's tau, pairwise accuracy and latency of a saved ranker",
        description="Evaluate a saved ranker on the test split of a data set; --cross-model "
        "also scores it against many AlpacaEval generators' response lengths.",
    )
    e.add_argument("--model", required=True, metavar="MODEL_DIR")
    e.add_argument("--data", default="sharegpt", help=DATA_HELP)
    e.add_argument("--split", choices=["train", "val", "test", "all"], default="test")
    e.add_argument("--max-prompts", type=int, metavar="N", help="first N prompts of the split")
    e.add_argument("--cross-model", action="store_true", help="AlpacaEval generators' lengths")
    e.add_argument("--generators", help="comma-separated AlpacaEval generators (--cross-model)")
    e.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    e.set_defaults(func=cmd_eval_ranker)


def cmd_train_ranker(args: argparse.Namespace) -> int:
    config = TrainConfig(
        method=args.method,
        mode=args.mode,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        head=args.head,
        k_pairs=args.k_pairs,
        delta=args.delta,
        max_steps=args.max_steps,
        seed=args.seed,
    )
    parts = split(load_dataset(args.data))
    train, val = parts["train"].head(args.max_train), parts["val"].head(args.max_val)
    print(f"{args.data}: {len(train)} train, {len(val)} validation prompts")
    from llmsched.predict.train import train_predictor

    predictor = train_predictor(train, val, config)
    predictor.save(args.out)
    m = predictor.meta
    print(
        f"saved {args.out}: validation pairwise accuracy {m['val_pairwise_accuracy']:.3f}, "
        f"Kendall tau {m['val_kendall_tau']:.3f} ({m['train_seconds']} s)"
    )
    return 0


def cmd_eval_ranker(args: argparse.Namespace) -> int:
    from llmsched.predict import load_predictor
    from llmsched.predict.evaluate import cross_model, evaluate, format_table

    predictor = load_predictor(args.model)
    data = load_dataset(args.data)
    data = data if args.split == "all" else split(data)[args.split]
    data = data.head(args.max_prompts)
    result = {"model": args.model, "data": data.name, **evaluate(predictor, data, progress=True)}
    columns = ["data", "prompts", "pairs", "kendall_tau", "pairwise_accuracy"]
    columns += [c for c in result if c.startswith("latency_ms")]
    print(format_table([result], columns))
    if args.cross_model:
        generators = args.generators.split(",") if args.generators else None
        result["cross_model"] = cross_model(predictor, generators)
        print("\nAlpacaEval test instructions, each generator's response lengths:")
        print(
            format_table(
                result["cross_model"], ["generator", "prompts", "kendall_tau", "pairwise_accuracy"]
            )
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0
