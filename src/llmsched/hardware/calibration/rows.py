"""Profile rows flattened per operator with their per-rank shapes, and the roofline's time for
each row, vectorised: what `fit` minimises over and `evaluate` reports (GEMMs as `RooflineModel`
computes them, element-wise kernels with one memory efficiency per kind)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmsched.hardware.calibration.profiles import (
    ELEMENTWISE_OPS,
    GEMM_OPS,
    AllReduceProfile,
    AttentionProfile,
    OperatorProfile,
)
from llmsched.hardware.roofline import Efficiency, allreduce_cost
from llmsched.hardware.specs import GPUSpec


class OperatorRows:
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
class OperatorParams:
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


def predict_operators(rows: OperatorRows, p: OperatorParams, gpu: GPUSpec) -> dict[str, np.ndarray]:
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


class AttentionRows:
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


def predict_attention(rows: AttentionRows, x: Sequence[float], gpu: GPUSpec) -> np.ndarray:
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


def predict_allreduce(
    prof: AllReduceProfile, sel: np.ndarray, link: float, latency: float, gpu: GPUSpec
) -> np.ndarray:
    """Seconds per selected row, as `RooflineModel`'s all-reduce term computes them."""
    e = dataclasses.replace(Efficiency(), link=min(link, 1.0), allreduce_latency_s=latency)
    cost = {int(tp): allreduce_cost(int(tp), gpu, e) for tp in np.unique(prof.tp[sel])}
    fixed = np.array([cost[int(tp)][0] for tp in prof.tp[sel]])
    per_byte = np.array([cost[int(tp)][1] for tp in prof.tp[sel]])
    return fixed + per_byte * prof.size[sel]
