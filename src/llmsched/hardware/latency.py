"""The latency model's interface: the time of one engine iteration from the batch's shape.

A batch's cost depends on a few sums over its requests, so a shape is six numbers. Decode-only
stretches, where the same requests decode for many iterations, are priced in one call
(`decode_iteration_times`), which is what lets the simulator advance by events, not tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True, init=False)
class BatchShape:
    """What one iteration computes. A decode is one new token of a request that has context.
    (A value: nothing changes one once made.)"""

    prefill_tokens: int = 0  # Σ chunk lengths of prefill (or recompute) chunks
    prefill_attn_pairs: float = 0.0  # Σ c·(p + (c+1)/2): causal query-key pairs of the chunks
    prefill_kv_tokens: int = 0  # Σ (p + c): KV tokens the chunks' attention reads
    num_prefills: int = 0  # chunks in the batch
    num_decodes: int = 0
    decode_kv_tokens: int = 0  # Σ context length (KV tokens read) over the decodes

    def __init__(
        self,
        prefill_tokens: int = 0,
        prefill_attn_pairs: float = 0.0,
        prefill_kv_tokens: int = 0,
        num_prefills: int = 0,
        num_decodes: int = 0,
        decode_kv_tokens: int = 0,
    ) -> None:
        # (Written out: compiled, it is a native constructor, where the dataclass's would be
        # interpreted; the engine makes one for every iteration with a prefill chunk.)
        self.prefill_tokens = prefill_tokens
        self.prefill_attn_pairs = prefill_attn_pairs
        self.prefill_kv_tokens = prefill_kv_tokens
        self.num_prefills = num_prefills
        self.num_decodes = num_decodes
        self.decode_kv_tokens = decode_kv_tokens

    @classmethod
    def from_chunks(
        cls, chunks: Iterable[tuple[int, int]], num_decodes: int = 0, decode_kv_tokens: int = 0
    ) -> BatchShape:
        """The shape of prefill chunks given as (chunk length, KV already cached), beside
        `num_decodes` decodes that read `decode_kv_tokens` KV tokens in all."""
        tokens = kv = n = 0
        pairs = 0.0
        for c, p in chunks:
            tokens += c
            pairs += c * (p + (c + 1) / 2)
            kv += p + c
            n += 1
        return cls(tokens, pairs, kv, n, num_decodes, decode_kv_tokens)

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.num_decodes

    @property
    def num_seqs(self) -> int:
        return self.num_prefills + self.num_decodes


class LatencyModel(Protocol):
    """Iteration time in seconds. Implementations must be cheap: a few arithmetic operations."""

    def iteration_time(self, shape: BatchShape) -> float: ...

    def decode_iteration_times(self, num_decodes: int, kv_tokens: int, k: int) -> Sequence[float]:
        """Times of k decode-only iterations of the same `num_decodes` requests, whose summed
        context starts at `kv_tokens` and grows by `num_decodes` each iteration (a list of
        floats, or any sequence of them, e.g. a numpy array)."""
        ...
