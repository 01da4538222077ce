"""Attention over a `PackedBatch`: SDPA per chunk and per group of equal-length decodes,
FlashAttention varlen over the whole batch (as vLLM V1), and a plain float32 reference that the
chosen backend must agree with."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from llmsched.hardware.profiler.batch import PackedBatch, pack_batch
from llmsched.hardware.profiler.shapes import ProfileShapes


def attention_sdpa(torch: Any, q: Any, k_buf: Any, v_buf: Any, plan: PackedBatch) -> Any:
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


def attention_varlen(torch: Any, q: Any, k_buf: Any, v_buf: Any, plan: PackedBatch) -> Any:
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


def attention_reference(torch: Any, q: Any, k_buf: Any, v_buf: Any, plan: PackedBatch) -> Any:
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


ATTENTION_BACKENDS = {"sdpa": attention_sdpa, "varlen": attention_varlen}


def select_attention(
    torch: Any, shapes: ProfileShapes, device: Any, dtype: Any, requested: str
) -> tuple[str, Callable[..., Any]]:
    """The first attention backend that runs here and agrees with the reference on a mixed
    batch (chunks with and without a cached prefix, decodes of several lengths)."""
    if requested == "auto":
        candidates = ["varlen", "sdpa"] if device.type == "cuda" else ["sdpa"]
    elif requested in ATTENTION_BACKENDS:
        candidates = [requested]
    else:
        raise ValueError(
            f"unknown attention backend {requested!r}: use auto, {', '.join(ATTENTION_BACKENDS)}"
        )
    plan = pack_batch(torch, device, [(5, 3), (4, 0)], [0, 2, 2, 7])
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(
        plan.num_tokens, shapes.q_heads, shapes.head_dim, generator=gen, device=device
    ).to(dtype)
    kv_shape = (plan.kv_tokens, shapes.kv_heads, shapes.head_dim)
    k = torch.randn(kv_shape, generator=gen, device=device).to(dtype)
    v = torch.randn(kv_shape, generator=gen, device=device).to(dtype)
    ref = attention_reference(torch, q, k, v, plan)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    reasons = []
    for name in candidates:
        fn = ATTENTION_BACKENDS[name]
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
