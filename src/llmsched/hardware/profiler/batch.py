"""A batch shape packed as the profiler runs it: prefill chunks and decodes concatenated without
padding, each sequence's KV in a contiguous range of one buffer, with the indices and masks that
attention needs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

# A batch shape for `replay_batches`: (prefill chunks as (chunk length, KV already cached),
# decodes as the KV length each already has).
BatchSpec = tuple[Sequence[tuple[int, int]], Sequence[int]]


@dataclass
class PackedBatch:
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


def check_batch(prefills: Iterable[Any], decodes: Iterable[Any]) -> tuple[tuple, tuple]:
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


def pack_batch(
    torch: Any, device: Any, prefills: Iterable[Any], decodes: Iterable[Any]
) -> PackedBatch:
    pre, dec = check_batch(prefills, decodes)
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
    return PackedBatch(
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
