"""One engine instance's limits: the knobs `vllm serve` exposes, with vLLM V1's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class EngineConfig:
    """Per-instance limits. Defaults follow `vllm serve` (V1 engine, 0.32) on A100-class GPUs:
    2048 batched tokens per iteration, 256 sequences, 16-token KV blocks, recompute, and a new
    request admitted only when KV for its whole sequence is free."""

    num_blocks: int  # GPU KV blocks that hold tokens (vLLM has one more: its null block)
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 1 << 30
    preemption: str = "recompute"
    long_prefill_token_threshold: int = 0  # vLLM's cap on one request's chunk; 0 = none
    watermark: float = 0.0  # fraction of blocks new admissions must leave free (Sarathi: 0.01)
    # vLLM's scheduler_reserve_full_isl: admit a waiting request only if KV for all its tokens
    # (not just the first chunk) is free; only the chunk is allocated.
    reserve_full_isl: bool = True
    # vLLM V1's automatic prefix caching (engine/prefix_cache.py), on by default as there
    enable_prefix_caching: bool = True
    kv_bytes_per_block: int = 0  # for swap and migration times (0 = free transfers)
    pcie_bandwidth: float = 25e9  # bytes/s host<->device, for swap

    def __post_init__(self) -> None:
        problems = []
        if self.num_blocks < 1:
            problems.append(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.block_size < 1:
            problems.append(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            problems.append(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            problems.append(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.preemption not in PREEMPTION_MODES:
            problems.append(
                f"preemption must be one of {PREEMPTION_MODES}, got {self.preemption!r}"
            )
        if not 0 <= self.watermark < 1:
            problems.append(f"watermark must be in [0, 1), got {self.watermark}")
        if problems:
            raise ValueError("invalid engine config: " + "; ".join(problems))

    @cached_property  # (read at every step; the config is frozen)
    def watermark_blocks(self) -> int:
        # vLLM takes the fraction of all its blocks, its null block included
        return int(self.watermark * (self.num_blocks + 1))

    @cached_property  # (read at every arrival)
    def max_tokens_per_request(self) -> int:
        """The most KV tokens one request can ever hold here (its final token is never
        computed, so a request fits when prompt + output - 1 <= this)."""
        return min(self.max_model_len, (self.num_blocks - self.watermark_blocks) * self.block_size)
