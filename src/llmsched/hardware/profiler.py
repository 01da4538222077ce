"""Measure a model's operator and decoder-layer times on the local GPU (or CPU), Vidur-style.

The weights are random tensors of the model's real shapes (nothing is downloaded); the times
depend on the shapes only. Three tables come out, in the schema of Vidur's A100 profiles so that
the same calibration code reads both (see docs/profiler.md):

- ``mlp.csv``: the token-level operators of one decoder layer (embedding, norms, QKV and output
  projections, rotary embedding, MLP up/activation/down, residual add) against the token count;
- ``attention.csv``: attention alone, prefill chunks (chunk length × KV already cached) and
  batched decodes (batch size × KV length);
- ``layer.csv``: whole decoder layers for batch shapes mixing a prefill chunk and decodes;

plus ``meta.json`` (device, torch version, dtype, shapes used, date). `replay_batches` times whole
forward passes (embedding, all layers, final norm, LM head) for given batch shapes, to check a
latency model against real iteration times.

On CUDA: bf16, CUDA-event timing of each repeat after warm-up, median reported; each measured
call is captured as a CUDA graph (as vLLM runs decodes), so the times are GPU time without Python
launch gaps; the L2 cache is flushed before each repeat (a real layer streams its weights cold).
On CPU: float32, ``time.perf_counter``, and by default a tiny version of the model so that tests
run in seconds. With tensor parallelism ``tp`` > 1 one rank's share of the work is timed on one
device (heads, MLP width and vocabulary divided by ``tp``); the all-reduces are not measured.

PyTorch is imported lazily: importing this module works without it, and the functions that need
it say how to install it (``pip install 'llmsched[profile]'``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Any

from llmsched.hardware.calibration import LAYER_OPS
from llmsched.hardware.specs import ModelSpec, get_model

INSTALL_HINT = "pip install 'llmsched[profile]'"

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
PARTS = ("mlp", "attention", "layer")

# The tiny stand-in for a model on a CPU: a few microseconds per operator.
TINY_SHAPES = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_heads": 4,
    "num_kv_heads": 2,  # 4 when the real model has no GQA
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_model_len": 4096,
}
KV_BLOCK_SIZE = 16  # recorded in attention.csv for Vidur's schema; the KV here is not paged
_L2_FLUSH_BYTES = 256 * 2**20
_RMS_EPS = 1e-5

# A batch shape for `replay_batches`: (prefill chunks as (chunk length, KV already cached),
# decodes as the KV length each already has).
BatchSpec = tuple[Sequence[tuple[int, int]], Sequence[int]]


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True, slots=True)
class ProfileShapes:
    """The shapes actually profiled: the model's, or the tiny stand-in's, and the TP degree."""

    model: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_model_len: int
    gated_mlp: bool
    qkv_bias: bool
    tp: int
    tiny: bool

    # One rank's share. KV heads are replicated when tp exceeds them (as vLLM does).
    @property
    def q_heads(self) -> int:
        return self.num_heads // self.tp

    @property
    def kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.tp)

    @property
    def mlp_width(self) -> int:
        return -(-self.intermediate_size // self.tp)

    @property
    def vocab_shard(self) -> int:
        return -(-self.vocab_size // self.tp)

    @property
    def qkv_out(self) -> int:
        return (self.q_heads + 2 * self.kv_heads) * self.head_dim

    @property
    def up_out(self) -> int:
        return (2 if self.gated_mlp else 1) * self.mlp_width

    def layer_weight_elements(self) -> int:
        h = self.hidden_size
        bias = self.qkv_out if self.qkv_bias else 0
        o = self.q_heads * self.head_dim * h
        return self.qkv_out * h + bias + o + self.up_out * h + self.mlp_width * h + 2 * h

    def kv_elements_per_token(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    def per_rank(self) -> dict[str, int]:
        return {
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "qkv_out": self.qkv_out,
            "o_proj_in": self.q_heads * self.head_dim,
            "mlp_width": self.mlp_width,
            "mlp_up_out": self.up_out,
            "vocab_shard": self.vocab_shard,
        }


def profile_shapes(model: ModelSpec | str, tp: int = 1, tiny: bool = False) -> ProfileShapes:
    """The shapes to profile for `model` at tensor-parallel degree `tp` (tiny: the stand-in)."""
    spec = get_model(model)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if tiny:
        dims = dict(TINY_SHAPES)
        if spec.num_kv_heads == spec.num_heads:
            dims["num_kv_heads"] = dims["num_heads"]
    else:
        dims = {
            "num_layers": spec.num_layers,
            "hidden_size": spec.hidden_size,
            "num_heads": spec.num_heads,
            "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim,
            "intermediate_size": spec.intermediate_size,
            "vocab_size": spec.vocab_size,
            "max_model_len": spec.max_model_len,
        }
    heads, kv = dims["num_heads"], dims["num_kv_heads"]
    what = f"the tiny stand-in of {spec.name}" if tiny else spec.name
    if heads % tp:
        raise ValueError(
            f"tp={tp} does not divide the {heads} attention heads of {what}; "
            f"choose a tp that divides {heads}"
        )
    if kv % tp and tp % kv:
        raise ValueError(f"tp={tp} and the {kv} KV heads of {what}: one must divide the other")
    return ProfileShapes(
        model=spec.name,
        gated_mlp=spec.gated_mlp,
        qkv_bias=spec.qkv_bias,
        tp=tp,
        tiny=bool(tiny),
        **dims,
    )


# --------------------------------------------------------------------------- torch and devices


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise ImportError(
            f"the profiler needs PyTorch, which is not installed: {INSTALL_HINT}"
        ) from exc
    return torch


def _resolve_device(torch: Any, device: Any) -> Any:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} (use 'cuda', 'cuda:1' or 'cpu')") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asked for, but this PyTorch ({torch.__version__}) sees no "
                "CUDA GPU; use --device cpu (tiny shapes), or a CUDA build of PyTorch on a GPU"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) here")
    return dev


def _device_name(torch: Any, dev: Any) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{dev.type} ({platform.processor() or platform.machine()})"


@dataclass
class _Setup:
    torch: Any
    device: Any
    dtype: Any
    shapes: ProfileShapes
    timer: _Timer
    attention: Callable[..., Any]
    attention_backend: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def elem_bytes(self) -> int:
        return self.torch.tensor([], dtype=self.dtype).element_size()


def _setup(
    model: ModelSpec | str,
    *,
    tp: int,
    device: Any,
    tiny: bool | None,
    repeats: int | None,
    warmup: int | None,
    cuda_graph: bool,
    flush_l2: bool,
    attention_backend: str,
) -> _Setup:
    spec = get_model(model)  # unknown names fail before torch is needed
    torch = _torch()
    dev = _resolve_device(torch, device)
    cuda = dev.type == "cuda"
    if tiny is None:
        tiny = not cuda
    shapes = profile_shapes(spec, tp, tiny)
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = (20 if cuda else 5) if repeats is None else repeats
    warmup = (5 if cuda else 1) if warmup is None else warmup
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be ≥ 1 and warmup ≥ 0, got {repeats} and {warmup}")
    if cuda:
        torch.cuda.set_device(dev)
    timer = _Timer(
        torch, dev, repeats=repeats, warmup=warmup, cuda_graph=cuda_graph, flush_l2=flush_l2
    )
    backend, fn = _select_attention(torch, shapes, dev, dtype, attention_backend)
    return _Setup(torch, dev, dtype, shapes, timer, fn, backend)


# --------------------------------------------------------------------------- timing


def _stats(times_ms: Sequence[float]) -> dict[str, float]:
    return {
        "min": min(times_ms),
        "max": max(times_ms),
        "mean": statistics.fmean(times_ms),
        "median": statistics.median(times_ms),
        "std": statistics.pstdev(times_ms),
    }


class _Timer:
    """Times a callable: CUDA events (optionally over a CUDA graph) on a GPU, else wall time."""

    def __init__(
        self,
        torch: Any,
        device: Any,
        *,
        repeats: int,
        warmup: int,
        cuda_graph: bool,
        flush_l2: bool,
    ) -> None:
        self.torch, self.device = torch, device
        self.repeats, self.warmup = repeats, warmup
        self.cuda = device.type == "cuda"
        self.cuda_graph = cuda_graph and self.cuda
        self.flush_buffer = (
            torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
            if flush_l2 and self.cuda
            else None
        )
        self.graph_fallbacks: list[str] = []

    @property
    def method(self) -> str:
        if not self.cuda:
            return "perf_counter"
        return "cuda_events+cuda_graph" if self.cuda_graph else "cuda_events"

    def __call__(self, name: str, fn: Callable[[], Any]) -> list[float]:
        """Times of `repeats` calls of `fn` in milliseconds, after `warmup` calls."""
        if not self.cuda:
            return self._host_times(fn)
        graph = self._capture(name, fn) if self.cuda_graph else None
        try:
            return self._cuda_times(graph.replay if graph is not None else fn)
        finally:
            del graph

    def _sync(self) -> None:
        mod = getattr(self.torch, self.device.type, None)
        if mod is not None and hasattr(mod, "synchronize") and self.device.type != "cpu":
            mod.synchronize()

    def _host_times(self, fn: Callable[[], Any]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        self._sync()
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            self._sync()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def _cuda_times(self, fn: Callable[[], Any]) -> list[float]:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for start, end in zip(starts, ends):
            if self.flush_buffer is not None:
                self.flush_buffer.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]

    def _capture(self, name: str, fn: Callable[[], Any]) -> Any:
        """`fn` captured as a CUDA graph, or None (timed eagerly) where capture fails."""
        torch = self.torch
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up off the capture: cuBLAS handles, autotuning
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            torch.cuda.synchronize()
            return graph
        except Exception as exc:  # any capture failure: time it eagerly instead
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
            self.graph_fallbacks.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
            return None


# --------------------------------------------------------------------------- batch plans


@dataclass
class _Plan:
    """A padding-free batch: prefill chunks first, then decodes (sorted by KV length).

    Tokens are concatenated; each sequence's KV (cached + new) occupies a contiguous range of a
    packed KV buffer, into which the new tokens' K and V are written (`write_index`).
    """

    prefills: tuple[tuple[int, int], ...]
    decodes: tuple[int, ...]
    num_tokens: int
    kv_tokens: int
    # (kind, first token, sequences, query length, first KV slot, KV length per sequence)
    groups: list[tuple[str, int, int, int, int, int]]
    positions: Any
    write_index: Any
    sample_index: Any  # the last token of each sequence (the rows the LM head reads)
    cu_q: Any
    cu_k: Any
    max_q: int
    max_k: int
    masks: dict[int, Any]  # group number → causal mask for chunks with a cached prefix


def _check_batch(prefills: Iterable[Any], decodes: Iterable[Any]) -> tuple[tuple, tuple]:
    try:
        pre = tuple((int(c), int(p)) for c, p in prefills)
        dec = tuple(int(d) for d in decodes)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            "a batch shape is (prefills, decodes): prefills a list of (chunk length, KV "
            f"already cached) pairs, decodes a list of KV lengths ({exc})"
        ) from exc
    if any(c < 1 or p < 0 for c, p in pre):
        raise ValueError(f"prefill chunks need length ≥ 1 and cached KV ≥ 0, got {list(pre)}")
    if any(d < 0 for d in dec):
        raise ValueError(f"decode KV lengths must be ≥ 0, got {list(dec)}")
    if not pre and not dec:
        raise ValueError("an empty batch shape (no prefill chunk, no decode)")
    return pre, dec


def _make_plan(torch: Any, device: Any, prefills: Iterable[Any], decodes: Iterable[Any]) -> _Plan:
    pre, dec = _check_batch(prefills, decodes)
    dec = tuple(sorted(dec))
    groups: list[tuple[str, int, int, int, int, int]] = []
    positions: list[int] = []
    write: list[int] = []
    sample: list[int] = []
    q_lens: list[int] = []
    k_lens: list[int] = []
    tok = kv = 0
    for c, p in pre:
        length = p + c
        groups.append(("prefill", tok, 1, c, kv, length))
        positions.extend(range(p, length))
        write.extend(range(kv + p, kv + length))
        sample.append(tok + c - 1)
        q_lens.append(c)
        k_lens.append(length)
        tok, kv = tok + c, kv + length
    for kv_len, same in groupby(dec):
        n = len(list(same))
        length = kv_len + 1
        groups.append(("decode", tok, n, 1, kv, length))
        for i in range(n):
            positions.append(kv_len)
            write.append(kv + i * length + kv_len)
            sample.append(tok + i)
        q_lens.extend([1] * n)
        k_lens.extend([length] * n)
        tok, kv = tok + n, kv + n * length

    def index(values: list[int], dtype: Any = torch.long) -> Any:
        return torch.tensor(values, dtype=dtype, device=device)

    cu_q = [0]
    cu_k = [0]
    for q, k in zip(q_lens, k_lens):
        cu_q.append(cu_q[-1] + q)
        cu_k.append(cu_k[-1] + k)
    masks = {}
    for g, (kind, _, _, q_len, _, length) in enumerate(groups):
        if kind == "prefill" and q_len != length:
            masks[g] = _lower_right_mask(torch, device, q_len, length)
    return _Plan(
        prefills=pre,
        decodes=dec,
        num_tokens=tok,
        kv_tokens=kv,
        groups=groups,
        positions=index(positions),
        write_index=index(write),
        sample_index=index(sample),
        cu_q=index(cu_q, torch.int32),
        cu_k=index(cu_k, torch.int32),
        max_q=max(q_lens),
        max_k=max(k_lens),
        masks=masks,
    )


def _lower_right_mask(torch: Any, device: Any, q_len: int, kv_len: int) -> Any:
    """Causal mask of a chunk of `q_len` queries that follow `kv_len - q_len` cached tokens."""
    if device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(q_len, kv_len)  # lets SDPA pick its flash kernel
    ones = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    return ones.tril(diagonal=kv_len - q_len)


# --------------------------------------------------------------------------- attention


def _attention_sdpa(torch: Any, q: Any, k_buf: Any, v_buf: Any, plan: _Plan) -> Any:
    """`scaled_dot_product_attention` per prefill chunk and per group of equal-length decodes."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    heads, kv_heads, head_dim = q.shape[1], k_buf.shape[1], q.shape[2]
    gqa = {"enable_gqa": True} if heads != kv_heads else {}
    outs = []
    for g, (kind, t0, n, q_len, k0, length) in enumerate(plan.groups):
        if kind == "prefill":
            qq = q[t0 : t0 + q_len].transpose(0, 1).unsqueeze(0)
            kk = k_buf[k0 : k0 + length].transpose(0, 1).unsqueeze(0)
            vv = v_buf[k0 : k0 + length].transpose(0, 1).unsqueeze(0)
            mask = plan.masks.get(g)
            if mask is None:
                o = sdpa(qq, kk, vv, is_causal=True, **gqa)
            else:
                o = sdpa(qq, kk, vv, attn_mask=mask, **gqa)
            outs.append(o[0].transpose(0, 1))
        else:
            qq = q[t0 : t0 + n].unsqueeze(2)
            kk = k_buf[k0 : k0 + n * length].view(n, length, kv_heads, head_dim).transpose(1, 2)
            vv = v_buf[k0 : k0 + n * length].view(n, length, kv_heads, head_dim).transpose(1, 2)
            outs.append(sdpa(qq, kk, vv, **gqa).squeeze(2))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(plan.num_tokens, heads * head_dim)


def _attention_varlen(torch: Any, q: Any, k_buf: Any, v_buf: Any, plan: _Plan) -> Any:
    """One FlashAttention varlen call over the whole batch, as vLLM V1 runs attention."""
    from torch.nn.attention.varlen import varlen_attn

    heads, kv_heads = q.shape[1], k_buf.shape[1]
    out = varlen_attn(
        q,
        k_buf[: plan.kv_tokens],
        v_buf[: plan.kv_tokens],
        plan.cu_q,
        plan.cu_k,
        plan.max_q,
        plan.max_k,
        window_size=(-1, 0),  # causal, aligned at the bottom right: chunks after a cached prefix
        enable_gqa=heads != kv_heads,
    )
    return out.reshape(plan.num_tokens, -1)


def _attention_reference(torch: Any, q: Any, k_buf: Any, v_buf: Any, plan: _Plan) -> Any:
    """Plain float32 attention, one sequence at a time (the check for the fast backends)."""
    heads, kv_heads, head_dim = q.shape[1], k_buf.shape[1], q.shape[2]
    rep = heads // kv_heads
    outs = []
    for _kind, t0, n, q_len, k0, length in plan.groups:
        for i in range(n):
            tq = t0 + i * q_len
            kq = k0 + i * length
            qq = q[tq : tq + q_len].float()
            kk = k_buf[kq : kq + length].float().repeat_interleave(rep, dim=1)
            vv = v_buf[kq : kq + length].float().repeat_interleave(rep, dim=1)
            scores = torch.einsum("qhd,khd->hqk", qq, kk) * head_dim**-0.5
            allowed = torch.ones(q_len, length, dtype=torch.bool, device=q.device)
            allowed = allowed.tril(diagonal=length - q_len)
            scores = scores.masked_fill(~allowed, float("-inf"))
            outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv))
    return torch.cat(outs).reshape(plan.num_tokens, heads * head_dim)


_ATTENTION_BACKENDS = {"sdpa": _attention_sdpa, "varlen": _attention_varlen}


def _select_attention(
    torch: Any, shapes: ProfileShapes, device: Any, dtype: Any, requested: str
) -> tuple[str, Callable[..., Any]]:
    """The first attention backend that runs here and agrees with the reference on a mixed
    batch (chunks with and without a cached prefix, decodes of several lengths)."""
    if requested == "auto":
        candidates = ["varlen", "sdpa"] if device.type == "cuda" else ["sdpa"]
    elif requested in _ATTENTION_BACKENDS:
        candidates = [requested]
    else:
        raise ValueError(
            f"unknown attention backend {requested!r}: use auto, {', '.join(_ATTENTION_BACKENDS)}"
        )
    plan = _make_plan(torch, device, [(5, 3), (4, 0)], [0, 2, 2, 7])
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(
        plan.num_tokens, shapes.q_heads, shapes.head_dim, generator=gen, device=device
    ).to(dtype)
    kv_shape = (plan.kv_tokens, shapes.kv_heads, shapes.head_dim)
    k = torch.randn(kv_shape, generator=gen, device=device).to(dtype)
    v = torch.randn(kv_shape, generator=gen, device=device).to(dtype)
    ref = _attention_reference(torch, q, k, v, plan)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    reasons = []
    for name in candidates:
        fn = _ATTENTION_BACKENDS[name]
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn(torch, q, k, v, plan).float()
            err = (out - ref).abs().max().item()
            if out.shape == ref.shape and err <= tol * (1 + ref.abs().max().item()):
                return name, lambda *args, _fn=fn: _fn(torch, *args)
            reasons.append(f"{name}: differs from the reference by {err:.3g}")
        except Exception as exc:  # not available on this device or build
            reasons.append(f"{name}: {type(exc).__name__}: {exc}")
    raise RuntimeError(
        "no attention backend works here: " + "; ".join(reasons) + " (try --attention-backend)"
    )


# --------------------------------------------------------------------------- the layer


class _DecoderLayer:
    """One rank's share of a Llama-style decoder layer, random weights, as plain functions."""

    def __init__(self, s: _Setup, max_positions: int, seed: int = 0) -> None:
        torch, dev, dt, sh = s.torch, s.device, s.dtype, s.shapes
        self.torch, self.s, self.sh = torch, s, sh
        self.F = torch.nn.functional
        gen = torch.Generator(device=dev).manual_seed(seed)

        def weight(out_features: int, in_features: int) -> Any:
            w = torch.randn(out_features, in_features, generator=gen, device=dev, dtype=dt)
            return w.mul_(in_features**-0.5)

        h = sh.hidden_size
        self.norm1 = torch.ones(h, device=dev, dtype=dt)
        self.norm2 = torch.ones(h, device=dev, dtype=dt)
        self.w_qkv = weight(sh.qkv_out, h)
        self.b_qkv = torch.zeros(sh.qkv_out, device=dev, dtype=dt) if sh.qkv_bias else None
        self.w_o = weight(h, sh.q_heads * sh.head_dim)
        self.w_up = weight(sh.up_out, h)
        self.w_down = weight(h, sh.mlp_width)
        half = sh.head_dim // 2
        inv_freq = 1.0 / (500000.0 ** (torch.arange(half, device=dev).float() / half))
        angles = torch.outer(torch.arange(max_positions, device=dev).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos().to(dt), angles.sin().to(dt)

    # The operators, as Vidur names them.
    def norm(self, x: Any, weight: Any) -> Any:  # input_ / post_attention_layernorm
        return self.F.rms_norm(x, (self.sh.hidden_size,), weight, eps=_RMS_EPS)

    def qkv(self, h: Any) -> Any:  # attn_pre_proj
        return self.F.linear(h, self.w_qkv, self.b_qkv)

    def split(self, qkv: Any) -> tuple[Any, Any, Any]:
        sh = self.sh
        sizes = [sh.q_heads * sh.head_dim, sh.kv_heads * sh.head_dim, sh.kv_heads * sh.head_dim]
        q, k, v = qkv.split(sizes, dim=-1)
        return (
            q.unflatten(-1, (sh.q_heads, sh.head_dim)),
            k.unflatten(-1, (sh.kv_heads, sh.head_dim)),
            v.unflatten(-1, (sh.kv_heads, sh.head_dim)),
        )

    def rope(self, q: Any, k: Any, positions: Any) -> tuple[Any, Any]:  # attn_rope
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)

        def rotate(x: Any) -> Any:
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos + self.torch.cat((-x2, x1), dim=-1) * sin

        return rotate(q), rotate(k)

    def o_proj(self, o: Any) -> Any:  # attn_post_proj
        return self.F.linear(o, self.w_o)

    def up(self, h: Any) -> Any:  # mlp_up_proj (gate and up fused)
        return self.F.linear(h, self.w_up)

    def act(self, u: Any) -> Any:  # mlp_act
        if self.sh.gated_mlp:
            gate, up = u.chunk(2, dim=-1)
            return self.F.silu(gate) * up
        return self.F.gelu(u, approximate="tanh")

    def down(self, a: Any) -> Any:  # mlp_down_proj
        return self.F.linear(a, self.w_down)

    def forward(self, x: Any, plan: _Plan, k_buf: Any, v_buf: Any) -> Any:
        """The whole layer: norm, QKV, rope, KV write, attention, o_proj, add, norm, MLP, add."""
        q, k, v = self.split(self.qkv(self.norm(x, self.norm1)))
        q, k = self.rope(q, k, plan.positions)
        k_buf.index_copy_(0, plan.write_index, k)
        v_buf.index_copy_(0, plan.write_index, v)
        x = x + self.o_proj(self.s.attention(q, k_buf, v_buf, plan))
        return x + self.down(self.act(self.up(self.norm(x, self.norm2))))


class _Embedding:
    """The vocab-parallel embedding (masking the ids of other ranks when tp > 1), final norm
    and LM head of one rank."""

    def __init__(self, s: _Setup, seed: int = 1) -> None:
        torch, sh = s.torch, s.shapes
        gen = torch.Generator(device=s.device).manual_seed(seed)
        self.torch, self.F, self.sh = torch, torch.nn.functional, sh
        shape = (sh.vocab_shard, sh.hidden_size)
        self.table = torch.randn(shape, generator=gen, device=s.device, dtype=s.dtype)
        self.lm_head = torch.randn(shape, generator=gen, device=s.device, dtype=s.dtype)
        self.lm_head.mul_(sh.hidden_size**-0.5)
        self.final_norm = torch.ones(sh.hidden_size, device=s.device, dtype=s.dtype)

    def embed(self, ids: Any) -> Any:
        if self.sh.tp == 1:
            return self.F.embedding(ids, self.table)
        outside = ids >= self.sh.vocab_shard  # this rank holds the first shard
        out = self.F.embedding(ids.masked_fill(outside, 0), self.table)
        return out.masked_fill_(outside.unsqueeze(-1), 0)

    def logits(self, x: Any) -> Any:
        h = self.F.rms_norm(x, (self.sh.hidden_size,), self.final_norm, eps=_RMS_EPS)
        return self.F.linear(h, self.lm_head)


# --------------------------------------------------------------------------- default grids


def default_token_counts(tiny: bool) -> list[int]:
    """Token counts for mlp.csv: powers of two to 4096 and every multiple of 128 (GPU)."""
    if tiny:
        return [1, 4, 16, 64, 256, 1024]
    counts = {2**i for i in range(13)} | {16 * i for i in range(1, 8)}
    counts |= set(range(128, 4097, 128))
    return sorted(counts)


def default_attention_grid(
    shapes: ProfileShapes, kv_budget_tokens: int | None = None
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(prefill (chunk, cached KV) pairs, decode (batch size, KV length) pairs)."""
    if shapes.tiny:
        return [(c, p) for c in (8, 32) for p in (0, 32)], [
            (b, kv) for b in (1, 4) for kv in (16, 64)
        ]
    cap = min(shapes.max_model_len, 32768)
    chunks = (16, 64, 128, 256, 512, 1024, 2048, 4096)
    prefixes = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    prefill = [(c, p) for c in chunks for p in prefixes if p + c <= cap]
    batches = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    kvs = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    decode = [
        (b, kv)
        for b in batches
        for kv in kvs
        if kv + 1 <= cap and (kv_budget_tokens is None or b * (kv + 1) <= kv_budget_tokens)
    ]
    return prefill, decode


def default_layer_grid(
    shapes: ProfileShapes, kv_budget_tokens: int | None = None
) -> list[tuple[int, int, int, int]]:
    """Whole-layer batch shapes: (prefill tokens, their cached KV, decodes, decode KV length)."""
    if shapes.tiny:
        return [(16, 0, 0, 0), (0, 0, 4, 32), (16, 16, 4, 32), (64, 0, 8, 64)]
    cap = min(shapes.max_model_len, 32768)
    grid = [(c, p, 0, 0) for c in (128, 512, 1024, 2048, 4096) for p in (0, 2048)]
    grid += [(0, 0, b, kv) for b in (1, 8, 32, 128, 256) for kv in (512, 2048, 8192)]
    grid += [(c, 0, b, 1024) for c in (128, 512, 2048) for b in (16, 64, 128)]
    grid += [(1024, 4096, 64, 4096)]
    return [
        (c, p, b, kv)
        for c, p, b, kv in grid
        if p + c <= cap
        and kv + 1 <= cap
        and (kv_budget_tokens is None or p + c + b * (kv + 1) <= kv_budget_tokens)
    ]


def _free_bytes(s: _Setup) -> int:
    """Free memory on the profiling device (GPU memory, or available host memory)."""
    if s.cuda:
        return int(s.torch.cuda.mem_get_info(s.device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not Linux: assume a modest machine
        return 8 * 2**30


def _kv_budget_tokens(s: _Setup, fraction: float = 0.25, cap_bytes: int = 16 * 2**30) -> int:
    """How many KV tokens the attention and layer grids may hold at once (a share of the
    device's free memory, at most `cap_bytes`); grid points beyond it are left out."""
    per_token = s.shapes.kv_elements_per_token() * s.elem_bytes
    return int(min(_free_bytes(s) * fraction, cap_bytes) // per_token)


# --------------------------------------------------------------------------- profiling


def _shape_columns(sh: ProfileShapes) -> dict[str, Any]:
    return {
        "n_head": sh.num_heads,
        "n_kv_head": sh.num_kv_heads,
        "n_embd": sh.hidden_size,
        "n_expanded_embd": sh.intermediate_size,
        "vocab_size": sh.vocab_size,
        "use_gated_mlp": sh.gated_mlp,
        "num_tensor_parallel_workers": sh.tp,
    }


def _time_stats(op: str, times: Sequence[float]) -> dict[str, float]:
    return {f"time_stats.{op}.{k}": v for k, v in _stats(times).items()}


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _token_op_calls(
    layer: _DecoderLayer,
    emb: _Embedding,
    x: Any,
    ids: Any,
    positions: Any,
    h: Any,
    q: Any,
    k: Any,
    o: Any,
    u: Any,
    a: Any,
) -> dict[str, Callable[[], Any]]:
    """Each token-level operator as a call on prepared inputs of one token count."""
    return {
        "emb": lambda: emb.embed(ids),
        "input_layernorm": lambda: layer.norm(x, layer.norm1),
        "attn_pre_proj": lambda: layer.qkv(h),
        "attn_rope": lambda: layer.rope(q, k, positions),
        "attn_post_proj": lambda: layer.o_proj(o),
        "post_attention_layernorm": lambda: layer.norm(x, layer.norm2),
        "mlp_up_proj": lambda: layer.up(h),
        "mlp_act": lambda: layer.act(u),
        "mlp_down_proj": lambda: layer.down(a),
        "add": lambda: x + h,
    }


def _profile_token_ops(
    s: _Setup, layer: _DecoderLayer, emb: _Embedding, counts: list[int], say: Callable
) -> list[dict[str, Any]]:
    torch, sh = s.torch, s.shapes
    gen = torch.Generator(device=s.device).manual_seed(2)
    rows = []
    for i, n in enumerate(counts, 1):
        x = torch.randn(n, sh.hidden_size, generator=gen, device=s.device, dtype=s.dtype)
        ids = torch.randint(0, sh.vocab_size, (n,), generator=gen, device=s.device)
        positions = torch.arange(n, device=s.device)
        h = layer.norm(x, layer.norm1)
        q, k, _ = layer.split(layer.qkv(h))
        o = torch.randn(n, sh.q_heads * sh.head_dim, generator=gen, device=s.device, dtype=s.dtype)
        u = layer.up(h)
        a = layer.act(u)
        ops = _token_op_calls(layer, emb, x, ids, positions, h, q, k, o, u, a)
        row: dict[str, Any] = {}
        for op in TOKEN_OPS:
            row.update(_time_stats(op, s.timer(f"{op}[{n}]", ops[op])))
        row.update(_shape_columns(sh), num_tokens=n)
        rows.append(row)
        say(f"[mlp] {i}/{len(counts)} num_tokens={n}")
        del x, ids, positions, h, q, k, o, u, a, ops
    return rows


def _kv_buffers(s: _Setup, tokens: int) -> tuple[Any, Any]:
    torch, sh = s.torch, s.shapes
    gen = torch.Generator(device=s.device).manual_seed(3)
    shape = (max(tokens, 1), sh.kv_heads, sh.head_dim)
    k = torch.randn(shape, generator=gen, device=s.device, dtype=s.dtype)
    v = torch.randn(shape, generator=gen, device=s.device, dtype=s.dtype)
    return k, v


def _profile_attention(
    s: _Setup,
    prefill: list[tuple[int, int]],
    decode: list[tuple[int, int]],
    kv: tuple[Any, Any],
    say: Callable,
) -> list[dict[str, Any]]:
    torch, sh = s.torch, s.shapes
    gen = torch.Generator(device=s.device).manual_seed(4)
    common = {
        "n_embd": sh.hidden_size,
        "n_q_head": sh.num_heads,
        "n_kv_head": sh.num_kv_heads,
        "block_size": KV_BLOCK_SIZE,
        "num_tensor_parallel_workers": sh.tp,
        "max_model_len": sh.max_model_len,
        "attention_backend": s.attention_backend,
        "profile_method": s.timer.method,
    }
    k_buf, v_buf = kv
    rows = []
    total = len(prefill) + len(decode)
    shapes = [(True, c, p) for c, p in prefill] + [(False, b, n) for b, n in decode]
    for i, (is_prefill, a, b) in enumerate(shapes, 1):
        plan = (
            _make_plan(torch, s.device, [(a, b)], [])
            if is_prefill
            else _make_plan(torch, s.device, [], [b] * a)
        )
        q = torch.randn(
            plan.num_tokens, sh.q_heads, sh.head_dim, generator=gen, device=s.device, dtype=s.dtype
        )
        op = "attn_prefill" if is_prefill else "attn_decode"
        times = s.timer(f"{op}[{a},{b}]", partial(s.attention, q, k_buf, v_buf, plan))
        row = dict(common, **_time_stats(op, times))
        if is_prefill:
            row.update(batch_size=1, prefill_chunk_size=a, kv_cache_size=b, is_prefill=True)
            label = f"chunk={a} kv={b}"
        else:
            row.update(batch_size=a, prefill_chunk_size=0, kv_cache_size=b, is_prefill=False)
            label = f"decodes={a} kv={b}"
        rows.append(row)
        say(f"[attention] {i}/{total} {op} {label}")
    return rows


def _profile_layers(
    s: _Setup,
    layer: _DecoderLayer,
    grid: list[tuple[int, int, int, int]],
    kv: tuple[Any, Any],
    say: Callable,
) -> list[dict[str, Any]]:
    torch, sh = s.torch, s.shapes
    gen = torch.Generator(device=s.device).manual_seed(5)
    k_buf, v_buf = kv
    rows = []
    for i, (c, p, b, d) in enumerate(grid, 1):
        plan = _make_plan(torch, s.device, [(c, p)] if c else [], [d] * b)
        x = torch.randn(plan.num_tokens, sh.hidden_size, generator=gen, device=s.device)
        x = x.to(s.dtype)
        times = s.timer(f"layer[{c},{p},{b},{d}]", partial(layer.forward, x, plan, k_buf, v_buf))
        rows.append(
            {
                **_time_stats("layer", times),
                "num_tokens": plan.num_tokens,
                "num_prefill_tokens": c,
                "prefill_kv_len": p if c else 0,
                "num_decodes": b,
                "decode_kv_len": d if b else 0,
                **_shape_columns(sh),
                "attention_backend": s.attention_backend,
                "profile_method": s.timer.method,
            }
        )
        say(f"[layer] {i}/{len(grid)} prefill={c} (kv {p}) decodes={b} (kv {d})")
    return rows


def _check_counts(values: Iterable[Any], what: str) -> list[int]:
    try:
        out = sorted({int(v) for v in values})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be positive integers ({exc})") from exc
    if not out or out[0] < 1:
        raise ValueError(f"{what} must be positive integers, got {out}")
    return out


def profile_model(
    model: ModelSpec | str,
    *,
    tp: int = 1,
    out_dir: str | Path,
    token_counts: Iterable[int] | None = None,
    device: Any = None,
    tiny: bool | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    parts: Iterable[str] = PARTS,
    attention_grid: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = None,
    layer_grid: list[tuple[int, int, int, int]] | None = None,
    cuda_graph: bool = True,
    flush_l2: bool = True,
    attention_backend: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Profile `model` and write ``mlp.csv``, ``attention.csv``, ``layer.csv`` and ``meta.json``
    under `out_dir`; returns their paths by name (``mlp``, ``attention``, ``layer``, ``meta``).

    `device`: default the GPU when CUDA sees one, else the CPU. `tiny`: profile the small
    stand-in shapes (default on a CPU). `repeats`/`warmup`: default 20/5 on a GPU, 5/1 on a CPU.
    `attention_grid`: (prefill (chunk, cached KV) pairs, decode (batch, KV length) pairs);
    `layer_grid`: (prefill tokens, their cached KV, decodes, decode KV length) tuples.
    """
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"unknown profile parts {unknown or parts}: choose from {PARTS}")
    s = _setup(
        model,
        tp=tp,
        device=device,
        tiny=tiny,
        repeats=repeats,
        warmup=warmup,
        cuda_graph=cuda_graph,
        flush_l2=flush_l2,
        attention_backend=attention_backend,
    )
    torch, sh = s.torch, s.shapes
    say = progress or (lambda _msg: None)
    counts = _check_counts(
        default_token_counts(sh.tiny) if token_counts is None else token_counts, "token counts"
    )
    budget = _kv_budget_tokens(s)
    prefill_grid, decode_grid = attention_grid or default_attention_grid(sh, budget)
    layers = default_layer_grid(sh, budget) if layer_grid is None else list(layer_grid)
    prefill_grid = [(int(c), int(p)) for c, p in prefill_grid]
    decode_grid = [(int(b), int(d)) for b, d in decode_grid]
    layers = [tuple(int(v) for v in g) for g in layers]
    for c, p in prefill_grid:
        _check_batch([(c, p)], [])
    for b, d in decode_grid:
        _check_batch([], [d] * b)
    for c, p, b, d in layers:
        _check_batch([(c, p)] if c else [], [d] * b)
    max_pos = max(
        [counts[-1]]
        + [c + p for c, p in prefill_grid]
        + [d + 1 for _, d in decode_grid]
        + [max(c + p, d + 1) for c, p, _, d in layers]
    )
    kv_tokens = max(
        [c + p for c, p in prefill_grid]
        + [b * (d + 1) for b, d in decode_grid]
        + [(c + p if c else 0) + b * (d + 1) for c, p, b, d in layers]
        + [1]
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(
        f"profiling {sh.model}{' (tiny shapes)' if sh.tiny else ''} at tp={sh.tp} on "
        f"{_device_name(torch, s.device)}, {str(s.dtype).removeprefix('torch.')}, "
        f"attention backend {s.attention_backend}, {s.timer.method}"
    )
    started = time.perf_counter()
    paths: dict[str, Path] = {}
    with torch.inference_mode():
        layer = _DecoderLayer(s, max_pos)
        if "mlp" in parts:
            emb = _Embedding(s)
            rows = _profile_token_ops(s, layer, emb, counts, say)
            paths["mlp"] = _write_csv(out / "mlp.csv", MLP_COLUMNS, rows)
            del emb
        kv = _kv_buffers(s, kv_tokens) if {"attention", "layer"} & set(parts) else None
        if "attention" in parts:
            rows = _profile_attention(s, prefill_grid, decode_grid, kv, say)
            paths["attention"] = _write_csv(out / "attention.csv", ATTENTION_COLUMNS, rows)
        if "layer" in parts:
            rows = _profile_layers(s, layer, layers, kv, say)
            paths["layer"] = _write_csv(out / "layer.csv", LAYER_COLUMNS, rows)
        del kv, layer
    meta = _meta(s)
    meta.update(
        {
            "parts": list(parts),
            "token_counts": counts,
            "attention_grid": {"prefill": prefill_grid, "decode": decode_grid},
            "layer_grid": layers,
            "elapsed_s": round(time.perf_counter() - started, 3),
            "files": {k: p.name for k, p in paths.items()},
        }
    )
    paths["meta"] = out / "meta.json"
    paths["meta"].write_text(json.dumps(meta, indent=2) + "\n")
    if s.timer.graph_fallbacks:
        say(f"note: {len(s.timer.graph_fallbacks)} measurement(s) ran without a CUDA graph")
    say(f"done in {meta['elapsed_s']:.1f} s: " + ", ".join(str(p) for p in paths.values()))
    return paths


def _meta(s: _Setup) -> dict[str, Any]:
    torch, sh = s.torch, s.shapes
    spec = get_model(sh.model)
    return {
        "model": spec.name,
        "hf_id": spec.hf_id,
        "tiny": sh.tiny,
        "shapes": asdict(sh),
        "per_rank": sh.per_rank(),
        "tp": sh.tp,
        "tp_note": (
            "one rank's share of the work (heads, MLP width, vocabulary divided by tp) timed on "
            "one device; the tensor-parallel all-reduces are not measured"
            if sh.tp > 1
            else "tp 1: the whole layer on one device"
        ),
        "device": _device_name(torch, s.device),
        "device_type": s.device.type,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "dtype": str(s.dtype).removeprefix("torch."),
        "attention_backend": s.attention_backend,
        "profile_method": s.timer.method,
        "repeats": s.timer.repeats,
        "warmup": s.timer.warmup,
        "l2_flush": s.timer.flush_buffer is not None,
        "cuda_graph_fallbacks": list(s.timer.graph_fallbacks),
        "kv_block_size_recorded": KV_BLOCK_SIZE,
        "kv_layout": "contiguous per sequence (not paged)",
        "time_unit": "ms",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- replay


def replay_batches(
    model: ModelSpec | str,
    batch_shapes: Iterable[BatchSpec],
    *,
    tp: int = 1,
    device: Any = None,
    tiny: bool | None = None,
    num_layers: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    cuda_graph: bool = True,
    flush_l2: bool = True,
    attention_backend: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Median time in **seconds** of one whole forward pass per batch shape: embedding, every
    decoder layer (the model's count, 2 in tiny mode, or `num_layers`), final norm, and the LM
    head over the last token of each sequence — what one engine iteration computes on one rank
    (no all-reduce, no sampling, no scheduler). Comparable with `LatencyModel.iteration_time`.

    A batch shape is ``(prefills, decodes)``: prefills a list of ``(chunk length, KV already
    cached)`` pairs, decodes a list of the KV length each decode already has. Tokens are
    concatenated without padding. Where the layers' weights and KV do not all fit in GPU memory,
    fewer distinct copies are allocated and reused in turn (a warning says so).
    """
    shapes_in = list(batch_shapes)
    if not shapes_in:
        return []
    checked = []
    for i, shape in enumerate(shapes_in):
        try:
            prefills, decodes = shape
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"batch shape {i} ({shape!r}) is not a (prefills, decodes) pair"
            ) from exc
        checked.append(_check_batch(prefills, decodes))
    s = _setup(
        model,
        tp=tp,
        device=device,
        tiny=tiny,
        repeats=repeats,
        warmup=warmup,
        cuda_graph=cuda_graph,
        flush_l2=flush_l2,
        attention_backend=attention_backend,
    )
    torch, sh = s.torch, s.shapes
    say = progress or (lambda _msg: None)
    n_layers = sh.num_layers if num_layers is None else int(num_layers)
    if n_layers < 1:
        raise ValueError(f"num_layers must be ≥ 1, got {num_layers}")
    kv_tokens = max(sum(c + p for c, p in pre) + sum(d + 1 for d in dec) for pre, dec in checked)
    max_pos = max(max([c + p for c, p in pre] + [d + 1 for d in dec]) for pre, dec in checked)
    slots = _layer_slots(s, n_layers, kv_tokens)
    if slots < n_layers:
        warnings.warn(
            f"replay_batches: {n_layers} layers of {sh.model} and their KV do not fit in "
            f"{s.device.type} memory; {slots} distinct copies are reused in turn (each larger "
            "than a GPU's L2 cache, so the times are unaffected)",
            stacklevel=2,
        )
    times = []
    with torch.inference_mode():
        emb = _Embedding(s)
        layers = [_DecoderLayer(s, max_pos, seed=10 + i) for i in range(slots)]
        kvs = [_kv_buffers(s, kv_tokens) for _ in range(slots)]
        gen = torch.Generator(device=s.device).manual_seed(6)
        for i, (pre, dec) in enumerate(checked, 1):
            plan = _make_plan(torch, s.device, pre, dec)
            ids = torch.randint(
                0, sh.vocab_size, (plan.num_tokens,), generator=gen, device=s.device
            )

            def forward(plan: _Plan = plan, ids: Any = ids) -> Any:
                x = emb.embed(ids)
                for j in range(n_layers):
                    k_buf, v_buf = kvs[j % slots]
                    x = layers[j % slots].forward(x, plan, k_buf, v_buf)
                return emb.logits(x[plan.sample_index])

            median_ms = _stats(s.timer(f"replay[{i}]", forward))["median"]
            times.append(median_ms / 1e3)
            say(
                f"[replay] {i}/{len(checked)} {plan.num_tokens} tokens "
                f"({len(pre)} chunks, {len(dec)} decodes): {median_ms:.3f} ms"
            )
    return times


def _layer_slots(s: _Setup, n_layers: int, kv_tokens: int) -> int:
    """Distinct (weights, KV) copies that fit: all layers where memory allows."""
    sh = s.shapes
    if sh.tiny:
        return n_layers
    per_layer = (sh.layer_weight_elements() + kv_tokens * sh.kv_elements_per_token()) * s.elem_bytes
    embeddings = 2 * sh.vocab_shard * sh.hidden_size * s.elem_bytes
    budget = 0.85 * _free_bytes(s) - embeddings - 2 * 2**30  # room for activations and graphs
    return max(1, min(n_layers, int(budget // per_layer)))


# --------------------------------------------------------------------------- command line


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
        choices=["auto", *_ATTENTION_BACKENDS],
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


if __name__ == "__main__":
    sys.exit(main())
