"""Measured GPU operator profiles in Vidur's schema, and their readers.

The profiles are Vidur's (microsoft/vidur, MIT): CUDA-timed operators of one decoder layer
(``mlp.csv``: norms, QKV/output projections, RoPE, MLP up/activation/down, residual add) against
the token count and tensor-parallel degree, attention (``attention*.csv``: prefill chunks against
the KV already cached, decodes against batch size and context), on A100s, and NCCL all-reduces
(``network/<machine>/all_reduce.csv``). The project's own profiler (`llmsched.hardware.profiler`)
writes the same schema, so its tables read the same way. Times in the files are milliseconds;
the profiles hold seconds.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmsched.hardware.specs import GPUSpec, ModelSpec, get_gpu

VIDUR_DIR = "profiles/vidur"  # under the shared data folder (`llmsched.data`)
DEFAULT_GPU = "a100-80gb"  # Vidur's A100 profiles: A100-SXM 80 GB
DEFAULT_NETWORK = "a100_dgx"  # Vidur's all-reduce profile of the A100-SXM machine (NVSwitch)

# Vidur's operators of one decoder layer (mlp.csv), and what each is in the roofline.
GEMM_OPS = {
    "attn_pre_proj": "qkv_proj",
    "attn_post_proj": "o_proj",
    "mlp_up_proj": "mlp_gate_up",
    "mlp_down_proj": "mlp_down",
}
ELEMENTWISE_OPS = {  # operator → kind of kernel (one memory efficiency per kind)
    "input_layernorm": "norm",
    "post_attention_layernorm": "norm",
    "attn_rope": "rope",
    "mlp_act": "act",
    "add": "add",
}
ELEMENTWISE_KINDS = ("norm", "rope", "act", "add")
LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
ATTENTION_OPS = ("attn_prefill", "attn_decode")
SHAPE_COLUMNS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp")
ATTENTION_COLUMNS = (
    "n_embd",
    "n_q_head",
    "n_kv_head",
    "num_tensor_parallel_workers",
    "batch_size",
    "prefill_chunk_size",
    "kv_cache_size",
    "is_prefill",
)
ALLREDUCE_COLUMNS = ("num_workers", "devices_per_node", "size", "collective")


@dataclass(frozen=True)
class OperatorProfile:
    """One model's token-level operator times (Vidur's ``mlp.csv``), times in seconds.

    ``times[op]`` holds the median time of each row (NaN where a row has none); only operators
    present in the file are keys. All rows share one model shape (the CSV's shape columns)."""

    name: str
    path: Path
    n_head: int
    n_kv_head: int
    n_embd: int
    n_expanded_embd: int
    vocab_size: int
    gated_mlp: bool
    num_tokens: np.ndarray
    tp: np.ndarray
    times: dict[str, np.ndarray]

    @property
    def parallel_residual(self) -> bool:
        """Attention and MLP read the same normed input (phi-2): one norm, a three-way add."""
        return "post_attention_layernorm" not in self.times

    def spec(self, num_layers: int = 1) -> ModelSpec:
        """A `ModelSpec` with this profile's shapes (head_dim = n_embd / n_head)."""
        return ModelSpec(
            name=f"profile:{self.name}",
            hf_id=self.name,
            num_layers=num_layers,
            hidden_size=self.n_embd,
            num_heads=self.n_head,
            num_kv_heads=self.n_kv_head,
            head_dim=self.n_embd // self.n_head,
            intermediate_size=self.n_expanded_embd,
            vocab_size=self.vocab_size,
            max_model_len=int(max(4096, self.num_tokens.max(initial=0))),
            gated_mlp=self.gated_mlp,
        )

    def __len__(self) -> int:
        return len(self.num_tokens)


@dataclass(frozen=True)
class AttentionProfile:
    """Attention times of one model shape (Vidur's ``attention*.csv``), in seconds.

    Prefill rows are one chunk of ``chunk`` tokens after ``kv`` cached tokens; decode rows are
    ``batch`` sequences with ``kv`` tokens of context each."""

    name: str
    path: Path
    n_embd: int
    n_q_head: int
    n_kv_head: int
    tp: np.ndarray
    is_prefill: np.ndarray
    batch: np.ndarray
    chunk: np.ndarray
    kv: np.ndarray
    time: np.ndarray

    def spec(self) -> ModelSpec:
        """A one-layer `ModelSpec` with this attention shape (MLP and vocabulary placeholders)."""
        return ModelSpec(
            name=f"profile:{self.name}",
            hf_id=self.name,
            num_layers=1,
            hidden_size=self.n_embd,
            num_heads=self.n_q_head,
            num_kv_heads=self.n_kv_head,
            head_dim=self.n_embd // self.n_q_head,
            intermediate_size=4 * self.n_embd,
            vocab_size=32000,
            max_model_len=int(max(4096, (self.kv + self.chunk).max(initial=0))),
        )

    def __len__(self) -> int:
        return len(self.time)


@dataclass(frozen=True)
class AllReduceProfile:
    """All-reduce times against message size on one machine (Vidur's
    ``network/<machine>/all_reduce.csv``), in seconds. Only the rows within one node are kept
    (``num_workers == devices_per_node`` > 1): the group a tensor-parallel instance uses."""

    name: str
    path: Path
    tp: np.ndarray
    size: np.ndarray  # message bytes
    time: np.ndarray

    def __len__(self) -> int:
        return len(self.time)


@dataclass(frozen=True)
class ProfileSet:
    """Operator and attention profiles of one GPU, keyed by model name (the CSV's folder), and
    all-reduce profiles keyed by machine (the network CSV's folder)."""

    gpu: str
    operators: dict[str, OperatorProfile]
    attention: dict[str, AttentionProfile] = field(default_factory=dict)
    root: Path | None = None
    allreduce: dict[str, AllReduceProfile] = field(default_factory=dict)

    def network(self, name: str | None = None) -> AllReduceProfile | None:
        """The all-reduce profile named ``name``; by default `DEFAULT_NETWORK` if present, else
        the only one, else None (nothing to fit the all-reduce on)."""
        if name is not None:
            if name not in self.allreduce:
                have = ", ".join(sorted(self.allreduce)) or "none"
                raise ValueError(f"no all-reduce profile {name!r}; profiled machines: {have}")
            return self.allreduce[name]
        if DEFAULT_NETWORK in self.allreduce:
            return self.allreduce[DEFAULT_NETWORK]
        return next(iter(self.allreduce.values())) if len(self.allreduce) == 1 else None

    def resolve(self, names: Iterable[str]) -> list[str]:
        """Canonical keys for user-given model names (case-insensitive; ``org/name`` accepted)."""
        out = []
        lower = {k.lower(): k for k in self.operators}
        for name in names:
            key = lower.get(str(name).lower()) or lower.get(str(name).rsplit("/", 1)[-1].lower())
            if key is None:
                raise ValueError(
                    f"no operator profile for model {name!r}; profiled models: "
                    f"{', '.join(sorted(self.operators))}"
                )
            out.append(key)
        return out


def _float(value: str, path: Path, line: int, column: str) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"{path}, line {line}: column {column!r} is not a number: {value!r}"
        ) from None


def _bool(value: str) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _read_rows(path: Path, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; expected Vidur's profile schema "
                "(time_stats.<op>.median plus the shape columns)"
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return columns, rows


def _constant(rows: list[dict[str, str]], column: str, path: Path) -> str:
    values = {r[column] for r in rows}
    if len(values) != 1:
        raise ValueError(
            f"{path}: column {column!r} must be the same on every row (one model shape per "
            f"file), found {sorted(values)[:5]}"
        )
    return values.pop()


def read_mlp_csv(path: str | os.PathLike[str], name: str | None = None) -> OperatorProfile:
    """Read one Vidur-schema ``mlp.csv`` (times in ms become seconds; the median column)."""
    path = Path(path)
    columns, rows = _read_rows(path, (*SHAPE_COLUMNS, "num_tokens", "num_tensor_parallel_workers"))
    ops = [
        c.split(".")[1] for c in columns if c.startswith("time_stats.") and c.endswith(".median")
    ]
    if not ops:
        raise ValueError(f"{path}: no time_stats.<op>.median columns")
    shape = {c: _constant(rows, c, path) for c in SHAPE_COLUMNS}
    tokens = np.array(
        [_float(r["num_tokens"], path, i + 2, "num_tokens") for i, r in enumerate(rows)]
    )
    tp = np.array(
        [_float(r["num_tensor_parallel_workers"], path, i + 2, "tp") for i, r in enumerate(rows)]
    )
    if np.isnan(tokens).any() or np.isnan(tp).any() or (tokens < 1).any() or (tp < 1).any():
        raise ValueError(
            f"{path}: num_tokens and num_tensor_parallel_workers must be ≥ 1 on every row"
        )
    times = {}
    for op in ops:
        col = f"time_stats.{op}.median"
        t = np.array([_float(r[col], path, i + 2, col) for i, r in enumerate(rows)]) * 1e-3
        if np.isfinite(t).any():
            times[op] = t
    return OperatorProfile(
        name=name or path.parent.name,
        path=path,
        n_head=int(shape["n_head"]),
        n_kv_head=int(shape["n_kv_head"]),
        n_embd=int(shape["n_embd"]),
        n_expanded_embd=int(shape["n_expanded_embd"]),
        vocab_size=int(shape["vocab_size"]),
        gated_mlp=_bool(shape["use_gated_mlp"]),
        num_tokens=tokens.astype(np.int64),
        tp=tp.astype(np.int64),
        times=times,
    )


def read_attention_csv(path: str | os.PathLike[str], name: str | None = None) -> AttentionProfile:
    """Read one Vidur-schema attention table (``attn_prefill`` / ``attn_decode`` medians, ms)."""
    path = Path(path)
    columns, rows = _read_rows(path, ATTENTION_COLUMNS)
    for op in ATTENTION_OPS:
        if f"time_stats.{op}.median" not in columns:
            raise ValueError(f"{path}: missing column time_stats.{op}.median")
    shape = {c: _constant(rows, c, path) for c in ("n_embd", "n_q_head", "n_kv_head")}

    def col(c: str) -> np.ndarray:
        return np.array([_float(r[c], path, i + 2, c) for i, r in enumerate(rows)])

    is_prefill = np.array([_bool(r["is_prefill"]) for r in rows])
    pre = col("time_stats.attn_prefill.median")
    dec = col("time_stats.attn_decode.median")
    time = np.where(is_prefill, pre, dec) * 1e-3
    keep = np.isfinite(time)
    return AttentionProfile(
        name=name or path.parent.name,
        path=path,
        n_embd=int(shape["n_embd"]),
        n_q_head=int(shape["n_q_head"]),
        n_kv_head=int(shape["n_kv_head"]),
        tp=col("num_tensor_parallel_workers")[keep].astype(np.int64),
        is_prefill=is_prefill[keep],
        batch=col("batch_size")[keep].astype(np.int64),
        chunk=col("prefill_chunk_size")[keep].astype(np.int64),
        kv=col("kv_cache_size")[keep].astype(np.int64),
        time=time[keep],
    )


def read_allreduce_csv(path: str | os.PathLike[str], name: str | None = None) -> AllReduceProfile:
    """Read one Vidur-schema ``all_reduce.csv`` (``size`` in bytes, times in ms become seconds;
    the median column), keeping the rows within one node."""
    path = Path(path)
    col = "time_stats.all_reduce.median"
    _, rows = _read_rows(path, (*ALLREDUCE_COLUMNS, col))
    keep = [(i, r) for i, r in enumerate(rows) if r["collective"] == "all_reduce"]

    def column(c: str) -> np.ndarray:
        return np.array([_float(r[c], path, i + 2, c) for i, r in keep])

    tp, per_node, size = column("num_workers"), column("devices_per_node"), column("size")
    time = column(col) * 1e-3
    ok = (tp > 1) & (tp == per_node) & (size > 0) & np.isfinite(time) & (time > 0)
    if not ok.any():
        raise ValueError(
            f"{path}: no all-reduce rows within one node (num_workers == devices_per_node > 1, "
            "size > 0, a median time)"
        )
    return AllReduceProfile(
        name=name or path.parent.name,
        path=path,
        tp=tp[ok].astype(np.int64),
        size=size[ok],
        time=time[ok],
    )


def load_vidur_profiles(
    root: str | os.PathLike[str] | None = None, gpu: str | GPUSpec = DEFAULT_GPU
) -> ProfileSet:
    """Every ``mlp.csv`` and ``attention*.csv`` under ``root``, one model per folder, and every
    ``all_reduce.csv``, one machine per folder.

    ``root`` defaults to the shared data's ``profiles/vidur`` (`llmsched.data.data_path`); Vidur's
    layout is ``compute/<gpu>/<org>/<model>/mlp.csv`` and ``network/<machine>/all_reduce.csv``,
    the project profiler's ``<out>/mlp.csv``.
    ``gpu`` names the GPU the profiles were measured on (its peaks are what efficiencies divide)."""
    if root is None:
        from llmsched.data import data_path

        root = data_path(VIDUR_DIR)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"profile folder {root} does not exist")
    gpu_name = get_gpu(gpu).name

    def key(path: Path, taken: Mapping[str, Any]) -> str:
        name = path.parent.name
        return name if name not in taken else str(path.parent.relative_to(root))

    operators: dict[str, OperatorProfile] = {}
    for path in sorted(root.rglob("mlp.csv")):
        name = key(path, operators)
        operators[name] = read_mlp_csv(path, name)
    attention: dict[str, AttentionProfile] = {}
    for path in sorted(root.rglob("attention*.csv")):
        name = key(path, attention)
        attention[name] = read_attention_csv(path, name)
    allreduce: dict[str, AllReduceProfile] = {}
    for path in sorted(root.rglob("all_reduce.csv")):
        name = key(path, allreduce)
        allreduce[name] = read_allreduce_csv(path, name)
    if not operators and not attention:
        raise FileNotFoundError(f"no mlp.csv or attention*.csv under {root}")
    return ProfileSet(
        gpu=gpu_name, operators=operators, attention=attention, root=root, allreduce=allreduce
    )
