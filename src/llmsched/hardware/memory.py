"""Memory arithmetic: weights per GPU, KV bytes per token, and the KV-cache size an engine gets.

`kv_cache_blocks` follows vLLM's start-up profiling (V1 `gpu_worker.determine_available_memory`,
and V0's `worker.determine_num_available_blocks` before it):

    KV bytes = total GPU memory × gpu_memory_utilization
               − weights (this rank's shard)
               − peak activation memory of a forward pass over max_num_batched_tokens tokens
               − non-torch memory (CUDA context, cuBLAS/NCCL workspaces)
    blocks   = ⌊KV bytes / (block_size × KV bytes per token)⌋

The activation peak is modelled from the shapes rather than measured; see `activation_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmsched.hardware.specs import GiB, GPUSpec, ModelSpec, get_gpu, get_model, list_gpus

# Memory outside PyTorch's allocator that vLLM's profiler subtracts: the CUDA context, cuBLAS and
# attention-backend workspaces. vLLM (0.6.4+) logs 0.1-0.35 GiB at TP 1 on A100/H100; CUDA graphs
# are captured after the KV cache is sized and live in the (1 − utilisation) headroom. With TP > 1,
# NCCL and custom all-reduce buffers add to it (vLLM logged ~1.8 GiB more at TP 2 in late 2024);
# pass `non_torch_bytes` to model that.
DEFAULT_NON_TORCH_BYTES = int(0.35 * GiB)

# fp32 logits [max_num_seqs, vocab] plus two working copies (probabilities; top-k/top-p sort or
# log-probabilities) in vLLM's dummy sampler run.
SAMPLER_COPIES = 3


def _check_tp(model: ModelSpec, tp: int) -> None:
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer, got {tp!r}")
    if model.num_heads % tp:
        raise ValueError(
            f"tensor-parallel size {tp} does not divide {model.name}'s {model.num_heads} "
            f"attention heads; use a divisor of {model.num_heads} (vLLM requires it)"
        )
    kv = model.num_kv_heads
    if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
        raise ValueError(
            f"tensor-parallel size {tp} and {model.name}'s {kv} KV heads: one must divide the "
            f"other (vLLM shards KV heads when tp ≤ {kv} and replicates them when tp > {kv})"
        )


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    """KV heads each rank stores: kv_heads / tp, at least 1. When tp exceeds the number of KV heads
    (e.g. Llama-2-70B's 8 at TP 16) each head is replicated on tp / kv_heads ranks, as vLLM does,
    so the per-GPU KV footprint stops shrinking."""
    _check_tp(model, tp)
    return max(1, model.num_kv_heads // tp)


def kv_bytes_per_token(model: ModelSpec | str, tp: int = 1) -> int:
    """KV-cache bytes one token occupies on each GPU:
    layers × 2 (K and V) × KV heads per GPU × head_dim × dtype bytes, with KV heads per GPU =
    max(1, kv_heads / tp) — heads are replicated, not split, when tp > kv_heads."""
    m = get_model(model)
    return m.num_layers * 2 * kv_heads_per_gpu(m, tp) * m.head_dim * m.dtype_bytes


def weight_bytes(model: ModelSpec | str, tp: int = 1) -> int:
    """Weight bytes on each GPU. Linear layers, embeddings and the LM head are sharded over the tp
    ranks (vLLM's column/row-parallel and vocab-parallel layers); norms are replicated, and so are
    the K/V projections of heads replicated when tp > kv_heads."""
    m = get_model(model)
    kv_gpu = kv_heads_per_gpu(m, tp)
    replicated = m.norm_params
    sharded = m.num_params - replicated
    kv_extra = 0.0
    if kv_gpu * tp > m.num_kv_heads:  # replicated KV heads: each rank holds a full head's K and V
        kv_proj = 2 * m.hidden_size * m.head_dim + (2 * m.head_dim if m.qkv_bias else 0)
        kv_extra = m.num_layers * kv_proj * (kv_gpu - m.num_kv_heads / tp)
    params = sharded / tp + replicated + kv_extra
    return math.ceil(params) * m.dtype_bytes


def activation_bytes(
    model: ModelSpec | str,
    tp: int = 1,
    *,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 256,
) -> int:
    """Peak activation memory of vLLM's profiling run (one forward pass over
    max_num_batched_tokens tokens, then a dummy sampler over max_num_seqs rows). An approximation:

    forward: N × dtype × (3 × hidden + MLP up-output / tp + MLP width / tp), the tensors alive at
        the MLP — residual stream, normed input and down-projection output (3 × hidden), the
        gate/up output (2 × intermediate / tp for a gated MLP, 1 × otherwise) and the activated
        product (intermediate / tp);
    sampler: max_num_seqs × vocab × 4 bytes × 3 (fp32 logits gathered over ranks, probabilities,
        one working copy for top-k/top-p or log-probabilities).

    Calibrated on vLLM logs: Llama-3.1-8B with 8192 batched tokens and 256 sequences logs a
    1.21-1.24 GiB activation peak; this gives 1.21 GiB.
    """
    m = get_model(model)
    _check_tp(m, tp)
    if max_num_batched_tokens < 1 or max_num_seqs < 1:
        raise ValueError(
            f"max_num_batched_tokens ({max_num_batched_tokens}) and max_num_seqs "
            f"({max_num_seqs}) must be positive"
        )
    ffn = m.intermediate_size / tp
    up_out = (2 if m.gated_mlp else 1) * ffn
    forward = max_num_batched_tokens * m.dtype_bytes * (3 * m.hidden_size + up_out + ffn)
    sampler = max_num_seqs * m.vocab_size * 4 * SAMPLER_COPIES
    return int(forward + sampler)


@dataclass(frozen=True, slots=True)
class KVCapacity:
    """KV-cache size of one engine instance (per GPU; all ranks hold the same number of blocks)."""

    num_blocks: int
    block_size: int  # tokens per block
    bytes_per_block: int  # per GPU
    total_memory_bytes: int  # what CUDA reports
    usable_bytes: int  # total × gpu_memory_utilization
    weight_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    kv_bytes: int  # usable − weights − activations − non-torch, before kv_fraction
    kv_fraction: float

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        g = GiB
        return (
            f"{self.num_blocks} blocks of {self.block_size} tokens ({self.num_tokens:,} tokens): "
            f"{self.total_memory_bytes / g:.2f} GiB × utilisation = {self.usable_bytes / g:.2f} "
            f"GiB − weights {self.weight_bytes / g:.2f} − activations "
            f"{self.activation_bytes / g:.2f} − non-torch {self.non_torch_bytes / g:.2f} = "
            f"{self.kv_bytes / g:.2f} GiB for KV"
            + (f", capped at {self.kv_fraction:.0%}" if self.kv_fraction < 1 else "")
        )


def _fitting_tp(m: ModelSpec, gpu: GPUSpec, util: float, overhead: float) -> int | None:
    for tp in (1, 2, 4, 8, 16):
        try:
            if weight_bytes(m, tp) + overhead < gpu.memory_bytes * util:
                return tp
        except ValueError:
            continue
    return None


def kv_cache_blocks(
    model: ModelSpec | str,
    gpu: GPUSpec | str,
    tp: int = 1,
    *,
    gpu_memory_utilization: float = 0.9,
    block_size: int = 16,
    max_num_batched_tokens: int = 2048,
    kv_fraction: float = 1.0,
    max_num_seqs: int = 256,
    non_torch_bytes: int = DEFAULT_NON_TORCH_BYTES,
) -> KVCapacity:
    """Number of KV blocks vLLM would allocate, with the breakdown.

    `kv_fraction` keeps only that share of the KV memory (PASCAL's "50 % of what memory allows").
    Raises ValueError when the weights (plus activations) do not fit, suggesting a TP or a GPU
    that would work.
    """
    m = get_model(model)
    g = get_gpu(gpu)
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if not 0 < kv_fraction <= 1:
        raise ValueError(f"kv_fraction must be in (0, 1], got {kv_fraction}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if non_torch_bytes < 0:
        raise ValueError(f"non_torch_bytes must be non-negative, got {non_torch_bytes}")

    usable = int(g.memory_bytes * gpu_memory_utilization)
    weights = weight_bytes(m, tp)
    act = activation_bytes(
        m, tp, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs
    )
    kv = usable - weights - act - non_torch_bytes
    per_block = block_size * kv_bytes_per_token(m, tp)

    if kv < per_block:
        need = weights + act + non_torch_bytes + per_block
        why = (
            "the weights alone exceed it"
            if weights >= usable
            else "nothing is left for even one KV block"
        )
        fix = []
        tp_ok = _fitting_tp(m, g, gpu_memory_utilization, act + non_torch_bytes + per_block)
        if tp_ok is not None and tp_ok > tp:
            fix.append(f"a higher tensor parallelism (tp={tp_ok} fits)")
        gpus = [
            name
            for name in list_gpus()
            if need < get_gpu(name).memory_bytes * gpu_memory_utilization
        ]
        if gpus:
            fix.append(f"a GPU with more memory ({', '.join(gpus)})")
        if gpu_memory_utilization < 0.95 and need < g.memory_bytes * 0.95:
            fix.append("gpu_memory_utilization=0.95")
        raise ValueError(
            f"{m.name} does not fit on {g.name} at TP {tp}: it needs {need / GiB:.1f} GiB per GPU "
            f"(weights {weights / GiB:.1f}, activations {act / GiB:.2f}, non-torch "
            f"{non_torch_bytes / GiB:.2f}, one KV block) but {g.memory_gib:.2f} GiB × "
            f"gpu_memory_utilization {gpu_memory_utilization} = {usable / GiB:.1f} GiB, and {why}. "
            f"Try " + (" or ".join(fix) if fix else "a larger deployment") + "."
        )

    num_blocks = int((kv * kv_fraction) // per_block)
    return KVCapacity(
        num_blocks=num_blocks,
        block_size=block_size,
        bytes_per_block=per_block,
        total_memory_bytes=g.memory_bytes,
        usable_bytes=usable,
        weight_bytes=weights,
        activation_bytes=act,
        non_torch_bytes=non_torch_bytes,
        kv_bytes=kv,
        kv_fraction=kv_fraction,
    )
