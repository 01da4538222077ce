"""The default points to profile: token counts for ``mlp.csv``, (chunk, cached KV) and (batch, KV
length) pairs for ``attention.csv``, mixed batches for ``layer.csv``, within a KV memory budget."""

from __future__ import annotations

from llmsched.hardware.profiler.device import Setup, free_bytes
from llmsched.hardware.profiler.shapes import ProfileShapes


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


def kv_budget_tokens(s: Setup, fraction: float = 0.25, cap_bytes: int = 16 * 2**30) -> int:
    """How many KV tokens the attention and layer grids may hold at once (a share of the
    device's free memory, at most `cap_bytes`); grid points beyond it are left out."""
    per_token = s.shapes.kv_elements_per_token() * s.elem_bytes
    return int(min(free_bytes(s) * fraction, cap_bytes) // per_token)
