"""Calibrate the roofline latency model's efficiencies on measured GPU operator profiles.

The profiles are Vidur's (microsoft/vidur, MIT): CUDA-timed operators of one decoder layer
(``mlp.csv``: norms, QKV/output projections, RoPE, MLP up/activation/down, residual add) against
the token count and tensor-parallel degree, and attention (``attention*.csv``: prefill chunks
against the KV already cached, decodes against batch size and context), on A100s. The project's
own profiler (`llmsched.hardware.profiler`) writes the same schema, so its tables read the same way.

What is fitted, by least squares on relative error (predicted / measured − 1) over the rows of a
set of *training* models, is the handful of numbers `RooflineModel` uses (see `roofline.py`):

- GEMMs (QKV, output projection, MLP gate/up, down): ``gemm_compute``, ``gemm_memory``,
  ``gemm_overhead_s`` (a fixed time per GEMM), with the token dimension quantised to whole tiles of
  ``gemm_token_tile`` rows (chosen among a few tile sizes by the fit error);
- element-wise kernels: ``elementwise_overhead_s`` per kernel, ``elementwise_min_tokens`` (kernels
  that give each token a thread block cost at least that many tokens), and a memory efficiency per
  kind of kernel (norm, RoPE, activation, residual add). The roofline has one element-wise term
  (vLLM's fused kernels), so its ``elementwise_memory`` is the single value that best reproduces
  the sum of the measured element-wise kernels of a layer;
- attention: ``attn_compute`` (pairs against the cached prefix), ``attn_diag_compute`` (the chunk's
  own causal triangle), ``attn_query_keys`` (a prefill query row's work that does not grow with
  the keys), ``attn_memory`` (decode KV reads), ``attn_overhead_s`` per kernel.

Fidelity is then measured on *held-out* models: per operator (each GEMM through
`RooflineModel.breakdown` of a one-layer model built from the CSV's own shape columns; each
element-wise kernel through its fitted efficiency), for a whole decoder layer (the sum of the
layer's operators against `RooflineModel`'s GEMM and element-wise terms), and for attention,
whose only profile is one model: there the rows are split by KV length.

Plain functions: `load_vidur_profiles`, `fit`, `evaluate`, `format_report`, `plot_fidelity`,
`save_calibration`, `read_calibration`, `load_calibration`. ``python -m
llmsched.hardware.calibration`` refits on the shared Vidur data, prints the report and writes
``calibrated/a100.json``. Nothing here runs at simulation time: `RooflineModel` only reads the
stored coefficients (`load_calibration`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from llmsched.hardware.latency import BatchShape
from llmsched.hardware.roofline import (
    ELEMENTWISE_KERNELS,
    Efficiency,
    RooflineModel,
    allreduce_cost,
)
from llmsched.hardware.specs import GPUSpec, ModelSpec, get_gpu

CALIBRATED_DIR = Path(__file__).resolve().parent / "calibrated"
VIDUR_DIR = "profiles/vidur"  # under the shared data folder (`llmsched.data`)
DEFAULT_GPU = "a100-80gb"  # Vidur's A100 profiles: A100-SXM 80 GB

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

# The split used for a100.json (see docs/calibration.md).
DEFAULT_TRAIN = ("Llama-2-7b-hf", "Llama-2-70b-hf", "CodeLlama-34b-Instruct-hf", "Qwen-72B")
DEFAULT_HELDOUT = ("Meta-Llama-3-8B", "Meta-Llama-3-70B", "internlm-20b", "phi-2")
ATTENTION_SPLIT_KV = 2048  # attention rows with kv_cache_size < this train, the rest are held out
MAX_TOKENS = 4096  # rows up to this token count (all models are profiled to 4096)
DEFAULT_NETWORK = "a100_dgx"  # Vidur's all-reduce profile of the A100-SXM machine (NVSwitch)
ALLREDUCE_TRAIN_TP = (2, 4)  # all-reduce rows at these TP degrees fit, the others are held out
ALLREDUCE_BANDS = ((0, 1 << 20), (1 << 20, 8 << 20), (8 << 20, math.inf))  # message bytes
ROW_CHOICES = ("heldout", "train", "all", "none")  # rows of the tables split by row, not model
TILE_CHOICES = (1, 64, 128, 256)
HUBER_DELTA = 0.05  # relative error beyond which a row's weight falls off (robust least squares)
HUBER_ROUNDS = 4

# Issue targets: median absolute relative error on held-out models.
TARGET_OPERATOR = 0.05
TARGET_LAYER = 0.08


# =========================================================================== reading


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


# =========================================================================== the operator model


@dataclass(frozen=True)
class Calibration:
    """Fitted coefficients: the `Efficiency` the roofline uses, plus the per-kind memory
    efficiencies of the element-wise kernels (which the roofline folds into one number)."""

    gpu: str
    efficiency: Efficiency
    elementwise: dict[str, float]
    provenance: dict[str, Any] = field(default_factory=dict)


class _OperatorRows:
    """All rows of some operator profiles, flattened per operator, with the per-rank shapes."""

    def __init__(self, profiles: Sequence[OperatorProfile], max_tokens: int | None) -> None:
        self.profiles = list(profiles)
        self.ops: dict[str, dict[str, np.ndarray]] = {}
        cols: dict[str, dict[str, list[np.ndarray]]] = {}
        for prof in self.profiles:
            keep = np.ones(len(prof), bool) if max_tokens is None else prof.num_tokens <= max_tokens
            t = prof.num_tokens[keep].astype(float)
            tp = prof.tp[keep].astype(float)
            h = float(prof.n_embd)
            hd = h / prof.n_head
            heads = prof.n_head / tp
            kv = np.maximum(1.0, np.floor(prof.n_kv_head / tp))
            ffn = prof.n_expanded_embd / tp
            up = (2.0 if prof.gated_mlp else 1.0) * ffn
            gemm = {
                "attn_pre_proj": (np.full_like(t, h), (heads + 2 * kv) * hd),
                "attn_post_proj": (heads * hd, np.full_like(t, h)),
                "mlp_up_proj": (np.full_like(t, h), up),
                "mlp_down_proj": (ffn, np.full_like(t, h)),
            }
            three_way = prof.parallel_residual
            elem = {  # bytes/element per token, kernels, one thread block per token?
                "input_layernorm": (2 * h + 0 * t, 1, True),
                "post_attention_layernorm": (2 * h + 0 * t, 1, True),
                "attn_rope": (2 * (heads + kv) * hd, 1, True),
                "mlp_act": ((up + ffn) if prof.gated_mlp else 2 * ffn, 1, prof.gated_mlp),
                # (a + b) + c in two kernels with a parallel residual, else one a + b
                "add": ((6 if three_way else 3) * h + 0 * t, 2 if three_way else 1, False),
            }
            for op, y in prof.times.items():
                y = y[keep]
                ok = np.isfinite(y) & (y > 0)
                if op not in GEMM_OPS and op not in ELEMENTWISE_OPS or not ok.any():
                    continue
                c = cols.setdefault(op, {})
                c.setdefault("model", []).append(np.full(ok.sum(), prof.name, dtype=object))
                c.setdefault("tokens", []).append(t[ok])
                c.setdefault("tp", []).append(tp[ok])
                c.setdefault("measured", []).append(y[ok])
                if op in GEMM_OPS:
                    k_in, n_out = gemm[op]
                    c.setdefault("k_in", []).append(k_in[ok])
                    c.setdefault("n_out", []).append(n_out[ok])
                else:
                    per_tok, kernels, rowwise = elem[op]
                    c.setdefault("elems", []).append(per_tok[ok])
                    c.setdefault("kernels", []).append(np.full(ok.sum(), float(kernels)))
                    c.setdefault("rowwise", []).append(np.full(ok.sum(), rowwise))
        for op, c in cols.items():
            self.ops[op] = {k: np.concatenate(v) for k, v in c.items()}

    def __len__(self) -> int:
        return sum(len(c["measured"]) for c in self.ops.values())


@dataclass(frozen=True)
class _OpParams:
    gemm_compute: float
    gemm_memory: float
    gemm_overhead_s: float
    elementwise_overhead_s: float
    norm: float
    rope: float
    act: float
    add: float
    min_tokens: float
    tile: int


def _predict_ops(rows: _OperatorRows, p: _OpParams, gpu: GPUSpec) -> dict[str, np.ndarray]:
    """Seconds per row of each operator (vectorised; GEMMs as `RooflineModel` computes them)."""
    out = {}
    peak, bw, d = gpu.bf16_flops, gpu.hbm_bandwidth, 2.0
    for op, c in rows.ops.items():
        t = c["tokens"]
        if op in GEMM_OPS:
            k, n = c["k_in"], c["n_out"]
            tq = t if p.tile == 1 else np.ceil(t / p.tile) * p.tile
            compute = 2 * k * n * tq / (peak * p.gemm_compute)
            memory = (k * n + t * (k + n)) * d / (bw * p.gemm_memory)
            out[op] = p.gemm_overhead_s + np.maximum(compute, memory)
        else:
            eff = getattr(p, ELEMENTWISE_OPS[op])
            rows_ = np.where(c["rowwise"], np.maximum(t, p.min_tokens), t)
            out[op] = c["kernels"] * p.elementwise_overhead_s + c["elems"] * rows_ * d / (bw * eff)
    return out


# =========================================================================== least squares


def _levenberg_marquardt(
    residuals: Callable[[np.ndarray], np.ndarray],
    x0: Sequence[float],
    *,
    max_iter: int = 200,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Minimise Σ (w·r(x))² over log-parameters (keeps every parameter positive). Small, dense,
    forward-difference Jacobian: a dozen parameters and some 10⁴ rows take well under a second."""
    x = np.log(np.asarray(x0, float))

    def cost(z: np.ndarray) -> tuple[np.ndarray, float]:
        r = residuals(np.exp(z))
        if weights is not None:
            r = r * weights
        r = np.where(np.isfinite(r), r, 1e6)
        return r, float(r @ r)

    r, c = cost(x)
    lam = 1e-3
    for _ in range(max_iter):
        jac = np.empty((len(r), len(x)))
        for j in range(len(x)):
            dx = np.zeros_like(x)
            dx[j] = 1e-6
            jac[:, j] = (cost(x + dx)[0] - r) / 1e-6
        a = jac.T @ jac
        g = jac.T @ r
        improved = False
        while lam < 1e10:
            step = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), -g)
            r_new, c_new = cost(x + step)
            if c_new < c:
                improved = c - c_new > 1e-12 * max(c, 1e-300)
                x, r, c = x + step, r_new, c_new
                lam = max(lam / 3, 1e-12)
                break
            lam *= 4
        if not improved or np.max(np.abs(step)) < 1e-9:
            break
    return np.exp(x)


# =========================================================================== fitting


def _robust(
    residuals: Callable[[np.ndarray], np.ndarray],
    x0: Sequence[float],
    weights: np.ndarray | None = None,
    rounds: int = HUBER_ROUNDS,
) -> np.ndarray:
    """Huber-weighted least squares by reweighting: rows whose relative error exceeds
    `HUBER_DELTA` count linearly, not quadratically (launch-bound rows at 1-2 µs resolution, L2
    effects), so that the bulk of the rows sets the coefficients."""
    base = np.ones(1) if weights is None else weights
    x = _levenberg_marquardt(residuals, x0, weights=weights)
    for _ in range(rounds):
        r = np.abs(residuals(x))
        w = base * np.sqrt(np.where(r <= HUBER_DELTA, 1.0, HUBER_DELTA / np.maximum(r, 1e-300)))
        x = _levenberg_marquardt(residuals, x, weights=w)
    return x


def _operator_params(x: np.ndarray, tile: int) -> _OpParams:
    return _OpParams(*(float(v) for v in x), tile=tile)


def _operator_residuals(
    rows: _OperatorRows, gpu: GPUSpec, tile: int
) -> Callable[[np.ndarray], np.ndarray]:
    ops = list(rows.ops)
    measured = np.concatenate([rows.ops[o]["measured"] for o in ops])

    def residuals(x: np.ndarray) -> np.ndarray:
        pred = _predict_ops(rows, _operator_params(x, tile), gpu)
        return np.concatenate([pred[o] for o in ops]) / measured - 1

    return residuals


def _fit_operators(rows: _OperatorRows, gpu: GPUSpec, tiles: Sequence[int]) -> _OpParams:
    """Plain least squares for each tile size; the best tile is then refitted robustly."""
    x0 = (0.7, 0.8, 3e-6, 2e-6, 0.5, 0.5, 0.5, 0.8, 64.0)
    best: tuple[float, int, np.ndarray] | None = None
    for tile in tiles:
        res = _operator_residuals(rows, gpu, tile)
        x = _levenberg_marquardt(res, x0)
        r = res(x)
        rms = float(np.sqrt(np.mean(r * r)))
        if best is None or rms < best[0]:
            best = (rms, tile, x)
    assert best is not None
    _, tile, x = best
    return _operator_params(_robust(_operator_residuals(rows, gpu, tile), x), tile)


def _one_layer(prof: OperatorProfile, gpu: GPUSpec, tp: int, eff: Efficiency) -> RooflineModel:
    return RooflineModel(prof.spec(1), gpu, tp, eff)


def _fit_elementwise_memory(
    profiles: Sequence[OperatorProfile], p: _OpParams, gpu: GPUSpec, max_tokens: int | None
) -> float:
    """The roofline's one element-wise efficiency: least squares (relative) of its element-wise
    term against the sum of a layer's measured element-wise kernels, other terms as fitted."""
    probe = Efficiency(elementwise_memory=1.0)
    kernels = ELEMENTWISE_KERNELS * p.elementwise_overhead_s
    num, den = 0.0, 0.0
    for prof in profiles:
        ops = [o for o in ELEMENTWISE_OPS if o in prof.times]
        total = sum(prof.times[o] for o in ops)
        for tp in np.unique(prof.tp):
            sel = (prof.tp == tp) & np.isfinite(total)
            if max_tokens is not None:
                sel &= prof.num_tokens <= max_tokens
            if not sel.any():
                continue
            # seconds per token at efficiency 1: the element-wise term of a one-token shape
            per_tok = _one_layer(prof, gpu, int(tp), probe).breakdown(BatchShape(num_decodes=1))[
                "elementwise"
            ]
            x = np.maximum(prof.num_tokens[sel], round(p.min_tokens)) * per_tok
            y = total[sel]
            a = x / y
            num += float(np.sum(a * (1 - kernels / y)))
            den += float(np.sum(a * a))
    if den <= 0 or num <= 0:
        return Efficiency().elementwise_memory
    return float(min(1.0, den / num))


class _AttentionRows:
    def __init__(self, profiles: Sequence[AttentionProfile], select: Callable[[Any], np.ndarray]):
        parts: dict[str, list[np.ndarray]] = {}
        for prof in profiles:
            sel = select(prof)
            tp = prof.tp[sel].astype(float)
            heads = prof.n_q_head / tp
            kvh = np.maximum(1.0, np.floor(prof.n_kv_head / tp))
            hd = prof.n_embd / prof.n_q_head
            c, kv, b = (prof.chunk[sel].astype(float), prof.kv[sel].astype(float), prof.batch[sel])
            pre = prof.is_prefill[sel]
            b = b.astype(float)
            for k, v in (
                ("model", np.full(sel.sum(), prof.name, dtype=object)),
                ("is_prefill", pre),
                ("chunk", c),
                ("kv", kv),
                ("batch", b),
                ("heads", heads),
                ("kv_heads", kvh),
                ("head_dim", np.full(sel.sum(), hd)),
                ("measured", prof.time[sel]),
            ):
                parts.setdefault(k, []).append(v)
        self.cols = {k: np.concatenate(v) for k, v in parts.items()} if parts else {}

    def __len__(self) -> int:
        return len(self.cols.get("measured", ()))


def _predict_attention(rows: _AttentionRows, x: Sequence[float], gpu: GPUSpec) -> np.ndarray:
    """Seconds per row, as `RooflineModel`'s attention terms compute them (one layer)."""
    ea, ed, em, k, w = x
    c = rows.cols
    peak, bw, d = gpu.bf16_flops, gpu.hbm_bandwidth, 2.0
    flop = 4 * c["heads"] * c["head_dim"]
    kv_byte = 2 * c["kv_heads"] * c["head_dim"] * d / (bw * em)
    q_byte = 2 * c["heads"] * c["head_dim"] * d / (bw * em)
    chunk, kv, b = c["chunk"], c["kv"], c["batch"]
    pairs = chunk * (kv + (chunk + 1) / 2)
    diag = np.minimum(pairs, chunk * (chunk + 1) / 2)
    extra = max(0.0, 1 / (peak * ed) - 1 / (peak * ea))
    prefill = np.maximum(
        flop * ((pairs + w * chunk) / (peak * ea) + diag * extra),
        kv_byte * (kv + chunk) + q_byte * chunk,
    )
    decode = np.maximum(flop * b * kv / (peak * ea), kv_byte * b * kv + q_byte * b)
    return k + np.where(c["is_prefill"], prefill, decode)


def _attention_train(prof: AttentionProfile, split_kv: int) -> np.ndarray:
    return prof.kv < split_kv


def _fit_attention(
    profiles: Sequence[AttentionProfile], gpu: GPUSpec, split_kv: int
) -> dict[str, float] | None:
    """The attention fields of `Efficiency`, fitted on the rows with KV below the split."""
    rows = _AttentionRows(profiles, lambda p: _attention_train(p, split_kv))
    if not len(rows):
        return None
    y = rows.cols["measured"]
    # Prefill and decode rows weigh the same in total (decode rows are 2-3× as many in Vidur's).
    pre = rows.cols["is_prefill"]
    n_pre, n_dec = max(1, pre.sum()), max(1, (~pre).sum())
    w = np.where(pre, np.sqrt(len(y) / (2 * n_pre)), np.sqrt(len(y) / (2 * n_dec)))
    x0 = (0.4, 0.2, 0.7, 1e-5, 100.0)
    x = _robust(lambda x: _predict_attention(rows, x, gpu) / y - 1, x0, w)
    ea, ed, em, k, keys = (float(v) for v in x)
    return {
        "attn_compute": min(ea, 1.0),
        "attn_diag_compute": min(ed, 1.0),
        "attn_memory": min(em, 1.0),
        "attn_overhead_s": k,
        "attn_query_keys": keys,
    }


def _predict_allreduce(
    prof: AllReduceProfile, sel: np.ndarray, link: float, latency: float, gpu: GPUSpec
) -> np.ndarray:
    """Seconds per selected row, as `RooflineModel`'s all-reduce term computes them."""
    e = dataclasses.replace(Efficiency(), link=min(link, 1.0), allreduce_latency_s=latency)
    cost = {int(tp): allreduce_cost(int(tp), gpu, e) for tp in np.unique(prof.tp[sel])}
    fixed = np.array([cost[int(tp)][0] for tp in prof.tp[sel]])
    per_byte = np.array([cost[int(tp)][1] for tp in prof.tp[sel]])
    return fixed + per_byte * prof.size[sel]


def _fit_allreduce(
    prof: AllReduceProfile, gpu: GPUSpec, train_tp: Sequence[int]
) -> dict[str, float] | None:
    """``link`` and ``allreduce_latency_s``, fitted on the rows at the ``train_tp`` degrees."""
    sel = np.isin(prof.tp, train_tp)
    if not sel.any():
        return None
    y = prof.time[sel]
    x = _robust(lambda x: _predict_allreduce(prof, sel, x[0], x[1], gpu) / y - 1, (0.6, 2e-5))
    return {"link": min(float(x[0]), 1.0), "allreduce_latency_s": float(x[1])}


def fit(
    profiles: ProfileSet,
    train_models: Sequence[str] = DEFAULT_TRAIN,
    *,
    base: Efficiency | None = None,
    tile: int | None = None,
    attention_split_kv: int = ATTENTION_SPLIT_KV,
    max_tokens: int | None = MAX_TOKENS,
    network: str | None = None,
    allreduce_train_tp: Sequence[int] = ALLREDUCE_TRAIN_TP,
) -> Calibration:
    """Fit the roofline's GEMM, element-wise, attention and all-reduce coefficients.

    ``tile`` fixes the GEMM token tile; by default each of `TILE_CHOICES` is fitted and the one
    with the smallest error kept. Attention is fitted on the rows of every attention profile with
    ``kv_cache_size < attention_split_kv`` (the rest are for `evaluate`); the all-reduce
    (``link``, ``allreduce_latency_s``) on the rows of the ``network`` profile (see
    `ProfileSet.network`) at the ``allreduce_train_tp`` degrees. Fields not fitted here (the
    per-layer and per-iteration overheads, and the all-reduce without a network profile) keep
    ``base``'s values (the defaults). Takes a few seconds on Vidur's data."""
    base = base if base is not None else Efficiency()
    gpu = get_gpu(profiles.gpu)
    names = profiles.resolve(train_models)
    if not names:
        raise ValueError("fit needs at least one training model")
    train = [profiles.operators[n] for n in names]
    rows = _OperatorRows(train, max_tokens)
    if not len(rows):
        raise ValueError(f"no operator rows to fit in {', '.join(names)}")
    p = _fit_operators(rows, gpu, (tile,) if tile is not None else TILE_CHOICES)
    changes: dict[str, Any] = {
        "gemm_compute": min(1.0, p.gemm_compute),
        "gemm_memory": min(1.0, p.gemm_memory),
        "gemm_overhead_s": p.gemm_overhead_s,
        "gemm_token_tile": p.tile,
        "elementwise_overhead_s": p.elementwise_overhead_s,
        "elementwise_min_tokens": int(round(p.min_tokens)),
        "elementwise_memory": _fit_elementwise_memory(train, p, gpu, max_tokens),
    }
    attn = _fit_attention(list(profiles.attention.values()), gpu, attention_split_kv)
    changes.update(attn or {})
    net = profiles.network(network)
    ar = _fit_allreduce(net, gpu, allreduce_train_tp) if net is not None else None
    changes.update(ar or {})
    eff = dataclasses.replace(base, **changes)
    return Calibration(
        gpu=profiles.gpu,
        efficiency=eff,
        elementwise={k: float(getattr(p, k)) for k in ELEMENTWISE_KINDS},
        provenance={
            "train_models": names,
            "attention_split_kv": attention_split_kv,
            "max_tokens": max_tokens,
            **(
                {"allreduce_profile": net.name, "allreduce_train_tp": list(allreduce_train_tp)}
                if ar is not None
                else {}
            ),
        },
    )


# =========================================================================== evaluation


@dataclass(frozen=True)
class OperatorFit:
    """Predicted against measured seconds for the rows of one operator (or layer, attention)."""

    op: str
    model: np.ndarray
    # num_tokens; for attention the chunk (prefill) or batch size (decode); for the all-reduce
    # the message bytes
    tokens: np.ndarray
    tp: np.ndarray
    measured: np.ndarray
    predicted: np.ndarray
    kv: np.ndarray | None = None  # attention: KV already cached / context per sequence

    @property
    def ape(self) -> np.ndarray:
        """Absolute relative error per row."""
        return np.abs(self.predicted / self.measured - 1)

    def median_ape(self, mask: np.ndarray | None = None) -> float:
        a = self.ape if mask is None else self.ape[mask]
        return float(np.median(a)) if len(a) else math.nan

    def mape(self) -> float:
        return float(np.mean(self.ape)) if len(self.measured) else math.nan

    def p90_ape(self) -> float:
        return float(np.quantile(self.ape, 0.9)) if len(self.measured) else math.nan

    def bias(self) -> float:
        """Median signed relative error (+: the model is slow)."""
        return float(np.median(self.predicted / self.measured - 1)) if len(self.measured) else 0.0


@dataclass(frozen=True)
class FidelityReport:
    """Errors of a calibration on some models' profiles: per operator, per layer, attention."""

    gpu: str
    models: tuple[str, ...]
    operators: dict[str, OperatorFit]  # Vidur operator → fit
    layer: OperatorFit | None  # the sum of a layer's operators against RooflineModel's terms
    elementwise: OperatorFit | None  # the layer's element-wise kernels against the roofline's term
    attention: dict[str, OperatorFit]  # attn_prefill / attn_decode
    attention_rows: str = "heldout"
    efficiency: Efficiency | None = None
    allreduce: OperatorFit | None = None  # all-reduce rows of the network profile
    allreduce_rows: str = "heldout"

    def overall(self) -> float:
        """Median absolute relative error over every operator row."""
        if not self.operators:
            return math.nan
        return float(np.median(np.concatenate([f.ape for f in self.operators.values()])))

    def as_dict(self) -> dict[str, Any]:
        """Summary numbers (no rows): for JSON and for provenance."""

        def summary(f: OperatorFit) -> dict[str, Any]:
            return {
                "rows": len(f.measured),
                "median_ape": round(f.median_ape(), 5),
                "mape": round(f.mape(), 5),
                "p90_ape": round(f.p90_ape(), 5),
                "bias": round(f.bias(), 5),
                "per_model_median_ape": {
                    m: round(f.median_ape(f.model == m), 5) for m in dict.fromkeys(f.model)
                },
            }

        out: dict[str, Any] = {
            "models": list(self.models),
            "operators": {op: summary(f) for op, f in self.operators.items()},
            "overall_median_ape": round(self.overall(), 5),
        }
        if self.layer is not None:
            out["layer"] = summary(self.layer)
        if self.elementwise is not None:
            out["elementwise_sum"] = summary(self.elementwise)
        if self.attention:
            out["attention_rows"] = self.attention_rows
            out["attention"] = {op: summary(f) for op, f in self.attention.items()}
        if self.allreduce is not None:
            out["allreduce_rows"] = self.allreduce_rows
            out["allreduce"] = summary(self.allreduce)
        return out


def _as_calibration(cal: Calibration | Efficiency, gpu: str) -> Calibration:
    if isinstance(cal, Calibration):
        return cal
    e = cal.elementwise_memory  # one efficiency for every element-wise kernel
    return Calibration(gpu=gpu, efficiency=cal, elementwise=dict.fromkeys(ELEMENTWISE_KINDS, e))


def evaluate(
    calibration: Calibration | Efficiency,
    profiles: ProfileSet,
    models: Sequence[str] = DEFAULT_HELDOUT,
    *,
    attention: str = "heldout",
    attention_split_kv: int | None = None,
    max_tokens: int | None = MAX_TOKENS,
    allreduce: str = "heldout",
    network: str | None = None,
) -> FidelityReport:
    """Predicted against measured times on ``models``' profiles.

    GEMM operators go through `RooflineModel.breakdown` of a one-layer model with the profile's
    shapes; element-wise operators through the calibration's per-kind efficiencies (a bare
    `Efficiency` uses its ``elementwise_memory`` for all); the layer compares the sum of the
    measured operators with the roofline's GEMM and element-wise terms. ``attention`` picks the
    attention rows: ``"heldout"`` (``kv_cache_size`` ≥ the split), ``"train"``, ``"all"`` or
    ``"none"``; ``allreduce`` the same for the rows of the ``network`` all-reduce profile
    (held out: the TP degrees the calibration was not fitted on)."""
    for arg, value in (("attention", attention), ("allreduce", allreduce)):
        if value not in ROW_CHOICES:
            raise ValueError(f"{arg} must be heldout, train, all or none, got {value!r}")
    cal = _as_calibration(calibration, profiles.gpu)
    eff = cal.efficiency
    gpu = get_gpu(profiles.gpu)
    names = profiles.resolve(models)
    profs = [profiles.operators[n] for n in names]
    rows = _OperatorRows(profs, max_tokens)
    p = _OpParams(
        eff.gemm_compute,
        eff.gemm_memory,
        eff.gemm_overhead_s,
        eff.elementwise_overhead_s,
        *(cal.elementwise[k] for k in ELEMENTWISE_KINDS),
        min_tokens=float(eff.elementwise_min_tokens),
        tile=eff.gemm_token_tile,
    )
    predicted = _predict_ops(rows, p, gpu)

    # The GEMMs and the layer through RooflineModel itself, one (model, tp) at a time.
    layer_parts: dict[str, list[np.ndarray]] = {}
    elem_parts: dict[str, list[np.ndarray]] = {}
    gemm_pred: dict[str, dict[tuple[str, int], dict[int, float]]] = {op: {} for op in GEMM_OPS}
    for prof in profs:
        ops = [o for o in LAYER_OPS if o in prof.times]
        total = sum(prof.times[o] for o in ops)
        elem_total = sum(prof.times[o] for o in ops if o in ELEMENTWISE_OPS)
        for tp in np.unique(prof.tp):
            lm = _one_layer(prof, gpu, int(tp), eff)
            sel = prof.tp == tp
            if max_tokens is not None:
                sel &= prof.num_tokens <= max_tokens
            sel &= np.isfinite(total)
            pred_layer, pred_elem = [], []
            for t in prof.num_tokens[sel]:
                terms = lm.breakdown(BatchShape(num_decodes=int(t)))
                for op, term in GEMM_OPS.items():
                    gemm_pred[op].setdefault((prof.name, int(tp)), {})[int(t)] = terms[term]
                pred_layer.append(sum(terms[t_] for t_ in GEMM_OPS.values()) + terms["elementwise"])
                pred_elem.append(terms["elementwise"])
            common = (
                ("model", np.full(sel.sum(), prof.name, dtype=object)),
                ("tokens", prof.num_tokens[sel].astype(float)),
                ("tp", prof.tp[sel].astype(float)),
            )
            for parts, measured, pred in (
                (layer_parts, total, pred_layer),
                (elem_parts, elem_total, pred_elem),
            ):
                for k, v in (*common, ("measured", measured[sel]), ("predicted", np.array(pred))):
                    parts.setdefault(k, []).append(v)
    for op in GEMM_OPS:
        if op in rows.ops:
            c = rows.ops[op]
            table = gemm_pred[op]
            predicted[op] = np.array(
                [table[(m, int(tp))][int(t)] for m, tp, t in zip(c["model"], c["tp"], c["tokens"])]
            )
    operators = {
        op: OperatorFit(
            op=op,
            model=rows.ops[op]["model"],
            tokens=rows.ops[op]["tokens"],
            tp=rows.ops[op]["tp"],
            measured=rows.ops[op]["measured"],
            predicted=predicted[op],
        )
        for op in LAYER_OPS
        if op in rows.ops
    }
    layer = elementwise = None
    if layer_parts:
        layer = OperatorFit(op="layer", **{k: np.concatenate(v) for k, v in layer_parts.items()})
        elementwise = OperatorFit(
            op="elementwise (sum)", **{k: np.concatenate(v) for k, v in elem_parts.items()}
        )

    attn_fits: dict[str, OperatorFit] = {}
    if attention != "none" and profiles.attention:
        split = attention_split_kv
        if split is None:
            split = int(cal.provenance.get("attention_split_kv", ATTENTION_SPLIT_KV))
        attn_fits = _evaluate_attention(profiles, eff, gpu, attention, split)
    ar_fit = None
    if allreduce != "none" and profiles.allreduce:
        ar_fit = _evaluate_allreduce(profiles, cal, gpu, allreduce, network)
    return FidelityReport(
        gpu=profiles.gpu,
        models=tuple(names),
        operators=operators,
        layer=layer,
        elementwise=elementwise,
        attention=attn_fits,
        attention_rows=attention,
        efficiency=eff,
        allreduce=ar_fit,
        allreduce_rows=allreduce,
    )


def _evaluate_allreduce(
    profiles: ProfileSet, cal: Calibration, gpu: GPUSpec, which: str, network: str | None
) -> OperatorFit | None:
    prof = profiles.network(network or cal.provenance.get("allreduce_profile"))
    if prof is None:
        return None
    train = np.isin(prof.tp, cal.provenance.get("allreduce_train_tp", ALLREDUCE_TRAIN_TP))
    sel = {"heldout": ~train, "train": train}.get(which, np.ones(len(prof), bool))
    if not sel.any():
        return None
    eff = cal.efficiency
    return OperatorFit(
        op="all_reduce",
        model=np.full(sel.sum(), prof.name, dtype=object),
        tokens=prof.size[sel],
        tp=prof.tp[sel].astype(float),
        measured=prof.time[sel],
        predicted=_predict_allreduce(prof, sel, eff.link, eff.allreduce_latency_s, gpu),
    )


def _evaluate_attention(
    profiles: ProfileSet, eff: Efficiency, gpu: GPUSpec, which: str, split: int
) -> dict[str, OperatorFit]:
    parts: dict[str, dict[str, list[np.ndarray]]] = {}
    for prof in profiles.attention.values():
        if which == "heldout":
            sel = prof.kv >= split
        elif which == "train":
            sel = prof.kv < split
        else:
            sel = np.ones(len(prof), bool)
        models = {
            int(tp): RooflineModel(prof.spec(), gpu, int(tp), eff) for tp in np.unique(prof.tp)
        }
        for op, want in (("attn_prefill", True), ("attn_decode", False)):
            s = sel & (prof.is_prefill == want)
            pred = []
            for tp, c, kv, b in zip(prof.tp[s], prof.chunk[s], prof.kv[s], prof.batch[s]):
                c, kv, b = int(c), int(kv), int(b)
                if want:
                    shape = BatchShape(
                        prefill_tokens=c,
                        prefill_attn_pairs=c * (kv + (c + 1) / 2),
                        prefill_kv_tokens=kv + c,
                        num_prefills=1,
                    )
                else:
                    shape = BatchShape(num_decodes=b, decode_kv_tokens=b * kv)
                pred.append(models[int(tp)].breakdown(shape)[op])
            d = parts.setdefault(op, {})
            for k, v in (
                ("model", np.full(s.sum(), prof.name, dtype=object)),
                ("tokens", np.where(want, prof.chunk[s], prof.batch[s]).astype(float)),
                ("tp", prof.tp[s].astype(float)),
                ("measured", prof.time[s]),
                ("predicted", np.array(pred, dtype=float)),
                ("kv", prof.kv[s].astype(float)),
            ):
                d.setdefault(k, []).append(v)
    return {
        op: OperatorFit(op=op, **{k: np.concatenate(v) for k, v in d.items()})
        for op, d in parts.items()
        if sum(len(v) for v in d["measured"])
    }


# =========================================================================== reporting


def _pct(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{100 * x:.1f} %"


def format_report(report: FidelityReport, title: str | None = None) -> str:
    """A Markdown table: median, mean and p90 absolute relative error and the median bias per
    operator, per model (median), for the whole layer and attention, against the issue targets."""
    models = list(report.models)
    short = [m.replace("-hf", "").replace("-Instruct", "") for m in models]
    lines = [f"### {title}" if title else f"### Fidelity on {report.gpu}: {', '.join(models)}", ""]
    head = "| operator | rows | median | MAPE | p90 | bias | " + " | ".join(short) + " |"
    lines += [head, "|" + "---|" * (6 + len(models))]

    def row(name: str, f: OperatorFit) -> str:
        cells = [
            name,
            str(len(f.measured)),
            _pct(f.median_ape()),
            _pct(f.mape()),
            _pct(f.p90_ape()),
            f"{100 * f.bias():+.1f} %",
        ]
        cells += [_pct(f.median_ape(f.model == m)) if (f.model == m).any() else "—" for m in models]
        return "| " + " | ".join(cells) + " |"

    for op, f in report.operators.items():
        lines.append(row(op, f))
    if report.operators:
        all_ape = np.concatenate([f.ape for f in report.operators.values()])
        cells = ["**all operators**", str(len(all_ape)), f"**{_pct(report.overall())}**"]
        cells += [_pct(float(np.mean(all_ape))), _pct(float(np.quantile(all_ape, 0.9))), ""]
        cells += [
            _pct(
                float(
                    np.median(
                        np.concatenate([f.ape[f.model == m] for f in report.operators.values()])
                    )
                )
            )
            for m in models
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if report.elementwise is not None:
        lines.append(row("element-wise sum (RooflineModel)", report.elementwise))
    if report.layer is not None:
        lines.append(row("**decoder layer** (RooflineModel)", report.layer))
    lines.append("")
    if report.attention:
        owners = sorted(set(np.concatenate([f.model for f in report.attention.values()])))
        lines += [
            f"Attention ({report.attention_rows} rows of {', '.join(owners)}):",
            "",
            "| attention | rows | median | MAPE | p90 | bias |",
            "|---|---|---|---|---|---|",
        ]
        for op, f in report.attention.items():
            cells = [op, str(len(f.measured)), _pct(f.median_ape()), _pct(f.mape())]
            cells += [_pct(f.p90_ape()), f"{100 * f.bias():+.1f} %"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if report.allreduce is not None:
        lines += _allreduce_table(report.allreduce, report.allreduce_rows)
    ops = report.operators
    if ops:
        worst = max(ops.values(), key=lambda f: f.median_ape())
        ok_ops = [op for op, f in ops.items() if f.median_ape() <= TARGET_OPERATOR]
        lines.append(
            f"Targets: per-operator median ≤ {100 * TARGET_OPERATOR:.0f} %: "
            f"{len(ok_ops)}/{len(ops)} operators "
            f"(overall {_pct(report.overall())}; worst {worst.op} {_pct(worst.median_ape())}); "
            + (
                f"decoder layer ≤ {100 * TARGET_LAYER:.0f} %: {_pct(report.layer.median_ape())} "
                + ("(met)" if report.layer.median_ape() <= TARGET_LAYER else "(not met)")
                if report.layer is not None
                else ""
            )
        )
    return "\n".join(lines).rstrip() + "\n"


def _allreduce_table(f: OperatorFit, rows: str) -> list[str]:
    """Median error (bias) of the all-reduce per TP degree and band of message sizes."""

    def band(lo: float, hi: float) -> str:
        if hi == math.inf:
            return f"≥ {lo / (1 << 20):g} MiB"
        return (
            f"< {hi / (1 << 20):g} MiB" if lo == 0 else f"{lo / (1 << 20):g}–{hi / (1 << 20):g} MiB"
        )

    lines = [
        f"All-reduce ({rows} rows of {', '.join(dict.fromkeys(f.model))}): median error "
        "(median bias)",
        "",
        "| TP | rows | all sizes | " + " | ".join(band(*b) for b in ALLREDUCE_BANDS) + " |",
        "|---|---|---|" + "---|" * len(ALLREDUCE_BANDS),
    ]
    signed = f.predicted / f.measured - 1
    for tp in np.unique(f.tp):
        cells = [str(int(tp)), str(int((f.tp == tp).sum()))]
        for lo, hi in ((0, math.inf), *ALLREDUCE_BANDS):
            m = (f.tp == tp) & (f.tokens >= lo) & (f.tokens < hi)
            cells.append(
                f"{_pct(f.median_ape(m))} ({100 * float(np.median(signed[m])):+.0f} %)"
                if m.any()
                else "—"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def format_efficiency(cal: Calibration | Efficiency) -> str:
    """The fitted coefficients, one per line."""
    eff = cal.efficiency if isinstance(cal, Calibration) else cal
    lines = []
    for f in dataclasses.fields(eff):
        v = getattr(eff, f.name)
        if f.name.endswith("_s"):
            text = f"{v * 1e6:.2f} µs"
        elif isinstance(v, float):
            text = f"{v:.4f}"
        else:
            text = str(v)
        lines.append(f"  {f.name:24s} {text}")
    if isinstance(cal, Calibration):
        lines.append(
            "  element-wise kernels     "
            + ", ".join(f"{k} {v:.3f}" for k, v in cal.elementwise.items())
        )
    return "\n".join(lines) + "\n"


def plot_fidelity(report: FidelityReport, path: str | os.PathLike[str]) -> None:
    """Predicted against measured time (µs, log-log) per operator, the layer and attention, one
    colour per model, with the y = x line and ±20 % bands. Needs matplotlib (Agg canvas; pyplot's
    state is not touched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib, which is not installed: pip install llmsched[plot]"
        ) from exc
    fits = list(report.operators.values())
    if report.elementwise is not None:
        fits.append(report.elementwise)
    if report.layer is not None:
        fits.append(report.layer)
    fits += list(report.attention.values())
    if report.allreduce is not None:
        fits.append(report.allreduce)
    if not fits:
        raise ValueError("nothing to plot: the report has no rows")
    ncol = 4
    nrow = -(-len(fits) // ncol)
    fig = Figure(figsize=(4 * ncol, 3.6 * nrow), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    models = list(dict.fromkeys(np.concatenate([f.model for f in fits])))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    for ax, f in zip(axes, fits):
        x, y = f.measured * 1e6, f.predicted * 1e6
        for m in dict.fromkeys(f.model):
            s = f.model == m
            ax.scatter(x[s], y[s], s=4, alpha=0.5, color=colors[m], label=str(m), linewidths=0)
        lo = float(min(x.min(), y.min())) * 0.8
        hi = float(max(x.max(), y.max())) * 1.25
        line = np.array([lo, hi])
        ax.plot(line, line, "k-", lw=0.8)
        ax.plot(line, line * 1.2, "k:", lw=0.6)
        ax.plot(line, line / 1.2, "k:", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{f.op}: median {_pct(f.median_ape())}", fontsize="medium")
        ax.set_xlabel("measured (µs)")
        ax.set_ylabel("predicted (µs)")
        ax.grid(True, which="both", alpha=0.2)
    for ax in axes[len(fits) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes[: len(fits)]:
        for h, lab in zip(*ax.get_legend_handles_labels()[::-1]):
            seen.setdefault(h, lab)
    fig.legend(
        [seen[m] for m in models if m in seen],
        [m for m in models if m in seen],
        loc="outside lower center",
        ncol=min(len(models), 6),
        markerscale=4,
    )
    fig.suptitle(f"Roofline fidelity on {report.gpu} ({report.attention_rows} attention rows)")
    fig.savefig(os.fspath(path), format="png", dpi=110)


# =========================================================================== storage

FORMAT_VERSION = 1


def save_calibration(
    calibration: Calibration | Efficiency,
    path: str | os.PathLike[str],
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the coefficients and their provenance (data source, models, date, errors) as JSON."""
    cal = _as_calibration(calibration, DEFAULT_GPU)
    prov = {**cal.provenance, **(provenance or {})}
    doc = {
        "format": FORMAT_VERSION,
        "gpu": cal.gpu,
        "efficiency": dataclasses.asdict(cal.efficiency),
        "elementwise_kernels": dict(cal.elementwise),
        "provenance": prov,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return path


def read_calibration(path: str | os.PathLike[str]) -> Calibration:
    """A calibration file written by `save_calibration` (the whole record)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "efficiency" not in doc:
        raise ValueError(f"{path}: not a calibration file (no 'efficiency' object)")
    known = {f.name for f in dataclasses.fields(Efficiency)}
    unknown = sorted(set(doc["efficiency"]) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown efficiency field(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(known))}"
        )
    try:
        eff = Efficiency(**doc["efficiency"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    elementwise = doc.get("elementwise_kernels") or {}
    elementwise = {k: float(elementwise.get(k, eff.elementwise_memory)) for k in ELEMENTWISE_KINDS}
    return Calibration(
        gpu=str(doc.get("gpu", DEFAULT_GPU)),
        efficiency=eff,
        elementwise=elementwise,
        provenance=dict(doc.get("provenance") or {}),
    )


def calibration_path(gpu: str | GPUSpec = DEFAULT_GPU) -> Path:
    """The stored calibration a GPU uses: ``calibrated/<name>.json``, else the file of its family
    (``a100.json`` for ``a100-40gb``, ``h100.json`` for ``h100-sxm-80gb``), else ``a100.json`` —
    the A100's efficiencies, applied to the other GPU's own peaks."""
    name = get_gpu(gpu).name
    for candidate in (name, name.split("-")[0], "a100"):
        path = CALIBRATED_DIR / f"{candidate}.json"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no calibration in {CALIBRATED_DIR} (expected a100.json): run "
        "python -m llmsched.hardware.calibration"
    )


def load_calibration(gpu: str | GPUSpec | os.PathLike[str] = DEFAULT_GPU) -> Efficiency:
    """The calibrated `Efficiency` for a GPU name (see `calibration_path`) or a JSON file path.

    Pass it to `RooflineModel(model, gpu, tp, efficiency=load_calibration(gpu))`."""
    if isinstance(gpu, os.PathLike) or (
        isinstance(gpu, str) and (gpu.endswith(".json") or Path(gpu).is_file())
    ):
        return read_calibration(gpu).efficiency
    return read_calibration(calibration_path(gpu)).efficiency


# =========================================================================== command line


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
            f"Huber-weighted least squares (delta {HUBER_DELTA}) on relative error, "
            "log-parameter Levenberg-Marquardt; GEMM token tile chosen among "
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmsched.hardware.calibration",
        description="Fit the roofline's efficiencies on Vidur's A100 operator profiles, print "
        "the held-out fidelity report and write the calibration JSON.",
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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
