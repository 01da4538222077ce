"""The tables' schema: the columns of ``mlp.csv``, ``attention.csv`` and ``layer.csv`` (Vidur's,
so that the calibration reads the profiler's tables and Vidur's alike), and how rows are written."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmsched.hardware.calibration.profiles import LAYER_OPS
from llmsched.hardware.profiler.shapes import ProfileShapes
from llmsched.hardware.profiler.timer import stats

# Vidur's mlp.csv operators, in its column order (the calibration reads the same schema).
TOKEN_OPS = ("emb", *LAYER_OPS)
STATS = ("min", "max", "mean", "median", "std")


def _stat_columns(op: str) -> tuple[str, ...]:
    return tuple(f"time_stats.{op}.{s}" for s in STATS)


MLP_COLUMNS = (
    *(c for op in TOKEN_OPS for c in _stat_columns(op)),
    "n_head",
    "n_kv_head",
    "n_embd",
    "n_expanded_embd",
    "vocab_size",
    "use_gated_mlp",
    "num_tokens",
    "num_tensor_parallel_workers",
)
ATTENTION_COLUMNS = (
    *_stat_columns("attn_prefill"),
    *_stat_columns("attn_decode"),
    "n_embd",
    "n_q_head",
    "n_kv_head",
    "block_size",
    "num_tensor_parallel_workers",
    "max_model_len",
    "batch_size",
    "prefill_chunk_size",
    "kv_cache_size",
    "is_prefill",
    "attention_backend",
    "profile_method",
)
LAYER_COLUMNS = (
    *_stat_columns("layer"),
    "num_tokens",
    "num_prefill_tokens",
    "prefill_kv_len",
    "num_decodes",
    "decode_kv_len",
    "n_head",
    "n_kv_head",
    "n_embd",
    "n_expanded_embd",
    "vocab_size",
    "use_gated_mlp",
    "num_tensor_parallel_workers",
    "attention_backend",
    "profile_method",
)
KV_BLOCK_SIZE = 16  # recorded in attention.csv for Vidur's schema; the KV here is not paged


def shape_columns(sh: ProfileShapes) -> dict[str, Any]:
    return {
        "n_head": sh.num_heads,
        "n_kv_head": sh.num_kv_heads,
        "n_embd": sh.hidden_size,
        "n_expanded_embd": sh.intermediate_size,
        "vocab_size": sh.vocab_size,
        "use_gated_mlp": sh.gated_mlp,
        "num_tensor_parallel_workers": sh.tp,
    }


def time_stats(op: str, times: Sequence[float]) -> dict[str, float]:
    return {f"time_stats.{op}.{k}": v for k, v in stats(times).items()}


def write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path
