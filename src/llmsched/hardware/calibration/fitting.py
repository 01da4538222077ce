"""Fit the roofline's efficiencies on operator profiles: least squares on relative error
(predicted / measured − 1) over the rows of a set of *training* models.

What is fitted is the handful of numbers `RooflineModel` uses (see `roofline.py`):

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
  the keys), ``attn_memory`` (decode KV reads), ``attn_overhead_s`` per kernel;
- the all-reduce: ``link`` and ``allreduce_latency_s``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmsched.hardware.calibration.profiles import (
    ELEMENTWISE_KINDS,
    ELEMENTWISE_OPS,
    AllReduceProfile,
    AttentionProfile,
    OperatorProfile,
    ProfileSet,
)
from llmsched.hardware.calibration.rows import (
    AttentionRows,
    OperatorParams,
    OperatorRows,
    predict_allreduce,
    predict_attention,
    predict_operators,
)
from llmsched.hardware.latency import BatchShape
from llmsched.hardware.roofline import ELEMENTWISE_KERNELS, Efficiency, RooflineModel
from llmsched.hardware.specs import GPUSpec, get_gpu

# The split used for a100.json (see docs/calibration.md).
DEFAULT_TRAIN = ("Llama-2-7b-hf", "Llama-2-70b-hf", "CodeLlama-34b-Instruct-hf", "Qwen-72B")
DEFAULT_HELDOUT = ("Meta-Llama-3-8B", "Meta-Llama-3-70B", "internlm-20b", "phi-2")
ATTENTION_SPLIT_KV = 2048  # attention rows with kv_cache_size < this train, the rest are held out
ALLREDUCE_TRAIN_TP = (2, 4)  # all-reduce rows at these TP degrees fit, the others are held out
MAX_TOKENS = 4096  # rows up to this token count (all models are profiled to 4096)
TILE_CHOICES = (1, 64, 128, 256)
ROBUST_SCALE = 0.05  # relative error beyond which a row counts linearly (Huber's loss)


@dataclass(frozen=True)
class Calibration:
    """Fitted coefficients: the `Efficiency` the roofline uses, plus the per-kind memory
    efficiencies of the element-wise kernels (which the roofline folds into one number)."""

    gpu: str
    efficiency: Efficiency
    elementwise: dict[str, float]
    provenance: dict[str, Any] = field(default_factory=dict)
    # A device that is not a registered GPU (a CPU engine's, from its step log): the
    # description `llmsched.hardware.steplog.device_spec` turns into the roofline's peaks.
    device: dict[str, Any] | None = None
    # The serving stack's own latency, outside the engine (seconds): frontend_latency_s, what
    # HTTP, the API server and its IPC add to every request's TTFT and E2E latency.
    serving: dict[str, float] = field(default_factory=dict)


def as_calibration(cal: Calibration | Efficiency, gpu: str) -> Calibration:
    """A bare `Efficiency` as a `Calibration`: its one element-wise efficiency for every kind."""
    if isinstance(cal, Calibration):
        return cal
    e = cal.elementwise_memory  # one efficiency for every element-wise kernel
    return Calibration(gpu=gpu, efficiency=cal, elementwise=dict.fromkeys(ELEMENTWISE_KINDS, e))


def _least_squares(
    residuals: Callable[[np.ndarray], np.ndarray],
    x0: Sequence[float],
    weights: np.ndarray | None = None,
    *,
    robust: bool = True,
) -> np.ndarray:
    """The parameters minimising Σ wᵢ²·ρ(rᵢ(x)), by `scipy.optimize.least_squares` over their
    logarithms (so that every parameter stays positive).

    ρ is the square, or with ``robust`` Huber's loss at `ROBUST_SCALE`: rows whose relative error
    exceeds it count linearly, not quadratically (launch-bound rows at 1-2 µs resolution, L2
    effects), so that the bulk of the rows sets the coefficients. ``weights`` scale each row's
    loss, not its residual, so that the scale is the same relative error on every row."""
    from scipy.optimize import least_squares  # here: loading a calibration needs no optimiser

    w = np.ones(1) if weights is None else np.asarray(weights, float)
    z0 = np.log(np.asarray(x0, float))
    if robust:
        loss = _weighted_huber(w**2)
        result = least_squares(lambda z: residuals(np.exp(z)), z0, loss=loss, f_scale=ROBUST_SCALE)
    else:  # squares: weighting the residual is weighting the loss. MINPACK's Levenberg-Marquardt
        # is as fast as the default solver alone and, unlike it, does not wait on busy BLAS threads
        result = least_squares(lambda z: w * residuals(np.exp(z)), z0, method="lm")
    return np.exp(result.x)


def _weighted_huber(w2: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """scipy's "huber" loss, ρ(z) = z up to 1 and 2√z − 1 beyond, times each row's weight."""

    def loss(z: np.ndarray) -> np.ndarray:
        inner = z <= 1
        root = np.sqrt(np.maximum(z, 1.0))
        rho = np.where(inner, z, 2 * root - 1)
        return w2 * np.stack(
            [rho, np.where(inner, 1.0, 1 / root), np.where(inner, 0.0, -0.5 / root**3)]
        )

    return loss


def _operator_params(x: np.ndarray, tile: int) -> OperatorParams:
    return OperatorParams(*(float(v) for v in x), tile=tile)


def _operator_residuals(
    rows: OperatorRows, gpu: GPUSpec, tile: int
) -> Callable[[np.ndarray], np.ndarray]:
    ops = list(rows.ops)
    measured = np.concatenate([rows.ops[o]["measured"] for o in ops])

    def residuals(x: np.ndarray) -> np.ndarray:
        pred = predict_operators(rows, _operator_params(x, tile), gpu)
        return np.concatenate([pred[o] for o in ops]) / measured - 1

    return residuals


def _fit_operators(rows: OperatorRows, gpu: GPUSpec, tiles: Sequence[int]) -> OperatorParams:
    """Plain least squares for each tile size; the best tile is then refitted robustly."""
    x0 = (0.7, 0.8, 3e-6, 2e-6, 0.5, 0.5, 0.5, 0.8, 64.0)
    best: tuple[float, int, np.ndarray] | None = None
    for tile in tiles:
        res = _operator_residuals(rows, gpu, tile)
        x = _least_squares(res, x0, robust=False)
        r = res(x)
        rms = float(np.sqrt(np.mean(r * r)))
        if best is None or rms < best[0]:
            best = (rms, tile, x)
    assert best is not None
    _, tile, x = best
    return _operator_params(_least_squares(_operator_residuals(rows, gpu, tile), x), tile)


def _fit_elementwise_memory(
    profiles: Sequence[OperatorProfile], p: OperatorParams, gpu: GPUSpec, max_tokens: int | None
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
            one_layer = RooflineModel(prof.spec(1), gpu, int(tp), probe)
            per_tok = one_layer.breakdown(BatchShape(num_decodes=1))["elementwise"]
            x = np.maximum(prof.num_tokens[sel], round(p.min_tokens)) * per_tok
            y = total[sel]
            a = x / y
            num += float(np.sum(a * (1 - kernels / y)))
            den += float(np.sum(a * a))
    if den <= 0 or num <= 0:
        return Efficiency().elementwise_memory
    return float(min(1.0, den / num))


def _attention_train(prof: AttentionProfile, split_kv: int) -> np.ndarray:
    return prof.kv < split_kv


def _fit_attention(
    profiles: Sequence[AttentionProfile], gpu: GPUSpec, split_kv: int
) -> dict[str, float] | None:
    """The attention fields of `Efficiency`, fitted on the rows with KV below the split."""
    rows = AttentionRows(profiles, lambda p: _attention_train(p, split_kv))
    if not len(rows):
        return None
    y = rows.cols["measured"]
    # Prefill and decode rows weigh the same in total (decode rows are 2-3× as many in Vidur's).
    pre = rows.cols["is_prefill"]
    n_pre, n_dec = max(1, pre.sum()), max(1, (~pre).sum())
    w = np.where(pre, np.sqrt(len(y) / (2 * n_pre)), np.sqrt(len(y) / (2 * n_dec)))
    x0 = (0.4, 0.2, 0.7, 1e-5, 100.0)
    x = _least_squares(lambda x: predict_attention(rows, x, gpu) / y - 1, x0, w)
    ea, ed, em, k, keys = (float(v) for v in x)
    return {
        "attn_compute": min(ea, 1.0),
        "attn_diag_compute": min(ed, 1.0),
        "attn_memory": min(em, 1.0),
        "attn_overhead_s": k,
        "attn_query_keys": keys,
    }


def _fit_allreduce(
    prof: AllReduceProfile, gpu: GPUSpec, train_tp: Sequence[int]
) -> dict[str, float] | None:
    """``link`` and ``allreduce_latency_s``, fitted on the rows at the ``train_tp`` degrees."""
    sel = np.isin(prof.tp, train_tp)
    if not sel.any():
        return None
    y = prof.time[sel]
    x = _least_squares(lambda x: predict_allreduce(prof, sel, x[0], x[1], gpu) / y - 1, (0.6, 2e-5))
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
    ``base``'s values (the defaults). Takes about half a second on Vidur's data."""
    base = base if base is not None else Efficiency()
    gpu = get_gpu(profiles.gpu)
    names = profiles.resolve(train_models)
    if not names:
        raise ValueError("fit needs at least one training model")
    train = [profiles.operators[n] for n in names]
    rows = OperatorRows(train, max_tokens)
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
