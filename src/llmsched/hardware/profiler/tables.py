"""`profile_model`: time the operators, attention and whole layers of a model and write
``mlp.csv``, ``attention.csv``, ``layer.csv`` and ``meta.json``."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from llmsched.hardware.profiler.batch import check_batch, pack_batch
from llmsched.hardware.profiler.device import Setup, device_name, setup
from llmsched.hardware.profiler.grids import (
    default_attention_grid,
    default_layer_grid,
    default_token_counts,
    kv_budget_tokens,
)
from llmsched.hardware.profiler.layer import DecoderLayer, Embedding, kv_buffers
from llmsched.hardware.profiler.schema import (
    ATTENTION_COLUMNS,
    KV_BLOCK_SIZE,
    LAYER_COLUMNS,
    MLP_COLUMNS,
    TOKEN_OPS,
    shape_columns,
    time_stats,
    write_csv,
)
from llmsched.hardware.specs import ModelSpec, get_model

PARTS = ("mlp", "attention", "layer")


def _token_op_calls(
    layer: DecoderLayer,
    emb: Embedding,
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
    s: Setup, layer: DecoderLayer, emb: Embedding, counts: list[int], say: Callable
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
            row.update(time_stats(op, s.timer(f"{op}[{n}]", ops[op])))
        row.update(shape_columns(sh), num_tokens=n)
        rows.append(row)
        say(f"[mlp] {i}/{len(counts)} num_tokens={n}")
        del x, ids, positions, h, q, k, o, u, a, ops
    return rows


def _profile_attention(
    s: Setup,
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
            pack_batch(torch, s.device, [(a, b)], [])
            if is_prefill
            else pack_batch(torch, s.device, [], [b] * a)
        )
        q = torch.randn(
            plan.num_tokens, sh.q_heads, sh.head_dim, generator=gen, device=s.device, dtype=s.dtype
        )
        op = "attn_prefill" if is_prefill else "attn_decode"
        times = s.timer(f"{op}[{a},{b}]", partial(s.attention, q, k_buf, v_buf, plan))
        row = dict(common, **time_stats(op, times))
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
    s: Setup,
    layer: DecoderLayer,
    grid: list[tuple[int, int, int, int]],
    kv: tuple[Any, Any],
    say: Callable,
) -> list[dict[str, Any]]:
    torch, sh = s.torch, s.shapes
    gen = torch.Generator(device=s.device).manual_seed(5)
    k_buf, v_buf = kv
    rows = []
    for i, (c, p, b, d) in enumerate(grid, 1):
        plan = pack_batch(torch, s.device, [(c, p)] if c else [], [d] * b)
        x = torch.randn(plan.num_tokens, sh.hidden_size, generator=gen, device=s.device)
        x = x.to(s.dtype)
        times = s.timer(f"layer[{c},{p},{b},{d}]", partial(layer.forward, x, plan, k_buf, v_buf))
        rows.append(
            {
                **time_stats("layer", times),
                "num_tokens": plan.num_tokens,
                "num_prefill_tokens": c,
                "prefill_kv_len": p if c else 0,
                "num_decodes": b,
                "decode_kv_len": d if b else 0,
                **shape_columns(sh),
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
    s = setup(
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
    budget = kv_budget_tokens(s)
    prefill_grid, decode_grid = attention_grid or default_attention_grid(sh, budget)
    layers = default_layer_grid(sh, budget) if layer_grid is None else list(layer_grid)
    prefill_grid = [(int(c), int(p)) for c, p in prefill_grid]
    decode_grid = [(int(b), int(d)) for b, d in decode_grid]
    layers = [tuple(int(v) for v in g) for g in layers]
    for c, p in prefill_grid:
        check_batch([(c, p)], [])
    for b, d in decode_grid:
        check_batch([], [d] * b)
    for c, p, b, d in layers:
        check_batch([(c, p)] if c else [], [d] * b)
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
        f"{device_name(torch, s.device)}, {str(s.dtype).removeprefix('torch.')}, "
        f"attention backend {s.attention_backend}, {s.timer.method}"
    )
    started = time.perf_counter()
    paths: dict[str, Path] = {}
    with torch.inference_mode():
        layer = DecoderLayer(s, max_pos)
        if "mlp" in parts:
            emb = Embedding(s)
            rows = _profile_token_ops(s, layer, emb, counts, say)
            paths["mlp"] = write_csv(out / "mlp.csv", MLP_COLUMNS, rows)
            del emb
        kv = kv_buffers(s, kv_tokens) if {"attention", "layer"} & set(parts) else None
        if "attention" in parts:
            rows = _profile_attention(s, prefill_grid, decode_grid, kv, say)
            paths["attention"] = write_csv(out / "attention.csv", ATTENTION_COLUMNS, rows)
        if "layer" in parts:
            rows = _profile_layers(s, layer, layers, kv, say)
            paths["layer"] = write_csv(out / "layer.csv", LAYER_COLUMNS, rows)
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


def _meta(s: Setup) -> dict[str, Any]:
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
        "device": device_name(torch, s.device),
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
