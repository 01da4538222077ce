"""A roofline latency model: each piece of an iteration costs max(FLOPs / compute, bytes / memory).

Per layer and per GPU (work split over `tp` ranks where vLLM splits it):

- GEMMs — QKV projection, attention output projection, MLP gate/up, MLP down — each
  max(2·W·T / (peak·e_gemm_compute), (W + T·(in + out))·dtype / (bw·e_gemm_memory)), with W the
  rank's weight elements and T the batch's tokens;
- attention of the prefill chunks: 4·pairs·heads·head_dim FLOPs against the chunks' KV reads (plus
  Q and output), and attention of the decodes: 4·Σcontext·heads·head_dim FLOPs against reading
  Σcontext tokens of KV, each a roofline max with the attention efficiencies;
- element-wise work (RMSNorms with residual adds, RoPE, SiLU·mul, KV-cache writes), memory-bound;
- with tp > 1, two ring all-reduces of T × hidden activations, each
  latency + 2(tp−1)/tp · bytes / (link bandwidth · e_link);
- a fixed per-layer overhead (kernel launches and tails).

Terms that measured kernels need (calibration, `llmsched.hardware.calibration`), each off by
default so that `Efficiency()` gives the plain roofline above:

- a fixed time per kernel launched (`gemm_overhead_s` per GEMM, `elementwise_overhead_s` per
  element-wise kernel, `attn_overhead_s` per attention kernel): launch latency and tail;
- GEMM tile quantisation (`gemm_token_tile`): the FLOPs of T tokens are those of ⌈T/tile⌉·tile
  rows, as cuBLAS computes whole tiles of the token dimension;
- a floor on element-wise work (`elementwise_min_tokens`): vLLM's norm, RoPE, activation and
  cache-write kernels give each token one thread block, so fewer tokens than that leave SMs idle
  and cost as much as that many tokens;
- a separate efficiency for the chunk's own causal triangle in prefill attention
  (`attn_diag_compute`): its diagonal tiles are masked and unevenly loaded. The triangle's pairs
  are taken as min(pairs, T(T+1)/2), T the prefill tokens: exact for one chunk, an upper bound
  for several;
- a per-query cost in prefill attention (`attn_query_keys`): each chunk token also pays for that
  many key positions at the prefix rate, the work of a query row that does not grow with the keys
  (loading Q, the softmax's final rescaling, writing O).

Once per iteration: the LM head over the sequences that sample (`num_seqs`), a CPU/scheduler
overhead, and a host-side cost per sequence (`sequence_overhead_s`, off by default). The
efficiencies and overheads are the fields of `Efficiency`, to be calibrated against measured
profiles; `RooflineModel.breakdown` gives each named term for one shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from llmsched.hardware.latency import BatchShape
from llmsched.hardware.memory import kv_heads_per_gpu
from llmsched.hardware.specs import GPUSpec, ModelSpec, get_gpu, get_model

# Element-wise kernels of one layer: two fused add+RMSNorms, RoPE, SiLU·mul, KV-cache write.
ELEMENTWISE_KERNELS = 5

TERMS = (
    "qkv_proj",
    "o_proj",
    "mlp_gate_up",
    "mlp_down",
    "attn_prefill",
    "attn_decode",
    "elementwise",
    "allreduce",
    "layer_overhead",
    "lm_head",
    "iteration_overhead",
    "sequence_overhead",
)


@mypyc_attr(native_class=False)  # (a setting checked in __post_init__, not a hot path)
@dataclass(frozen=True, slots=True)
class Efficiency:
    """Achieved fractions of the datasheet peaks, and fixed overheads (seconds)."""

    gemm_compute: float = 0.65  # dense bf16 GEMMs at prefill sizes reach 60-70 % of peak
    gemm_memory: float = 0.85  # weight streaming in small-batch GEMMs (GEMV-like)
    attn_compute: float = 0.5  # FlashAttention-2 forward, causal, on A100
    attn_memory: float = 0.7  # paged decode attention reads scattered 16-token blocks
    elementwise_memory: float = 0.7  # norms, RoPE, activation, cache writes
    link: float = 0.7  # all-reduce bus bandwidth / per-direction link bandwidth
    allreduce_latency_s: float = 8e-6  # per all-reduce call (custom all-reduce / NCCL LL)
    layer_overhead_s: float = 10e-6  # per layer: launch gaps and kernel tails
    iteration_overhead_s: float = 0.5e-3  # per iteration: scheduling, input prep, sampling glue
    # Kernel-level terms (see the module docstring); the defaults switch them off.
    gemm_overhead_s: float = 0.0  # per GEMM kernel (each layer's 4, and the LM head)
    elementwise_overhead_s: float = 0.0  # per element-wise kernel (ELEMENTWISE_KERNELS a layer)
    attn_overhead_s: float = 0.0  # per attention kernel (prefill, decode) per layer
    gemm_token_tile: int = 1  # GEMM FLOPs count ⌈T/tile⌉·tile token rows
    elementwise_min_tokens: int = 0  # element-wise kernels cost at least this many tokens
    attn_diag_compute: float | None = None  # the chunk's causal triangle; None: attn_compute
    attn_query_keys: float = 0.0  # prefill: each query token also pays for this many keys
    # Per sequence in the batch: the host's per-request work (input preparation, sampling,
    # output processing), which grows with the batch where the GPU's does not (off by default;
    # fitted on a real engine's steps, docs/fidelity-vllm.md).
    sequence_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "gemm_compute",
            "gemm_memory",
            "attn_compute",
            "attn_memory",
            "elementwise_memory",
            "link",
        ):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"Efficiency.{name} must be in (0, 1], got {v}")
        for name in (
            "allreduce_latency_s",
            "layer_overhead_s",
            "iteration_overhead_s",
            "gemm_overhead_s",
            "elementwise_overhead_s",
            "attn_overhead_s",
            "attn_query_keys",
            "sequence_overhead_s",
        ):
            v = getattr(self, name)
            if v < 0:
                raise ValueError(f"Efficiency.{name} must be non-negative, got {v}")
        # (getattr: read as given, when compiled too, not as the int it should be)
        for name, least, kind in (
            ("gemm_token_tile", 1, "a positive"),
            ("elementwise_min_tokens", 0, "a non-negative"),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < least:
                raise ValueError(f"Efficiency.{name} must be {kind} integer, got {v!r}")
        d = self.attn_diag_compute
        if d is not None and not 0 < d <= 1:
            raise ValueError(f"Efficiency.attn_diag_compute must be in (0, 1] or None, got {d}")


def allreduce_cost(tp: int, gpu: GPUSpec, e: Efficiency) -> tuple[float, float]:
    """One ring all-reduce over `tp` GPUs as (fixed seconds, seconds per byte of the message):
    2(tp−1)/tp of the message crosses each link, at `e.link` of its bandwidth. (0, 0) for tp 1."""
    if tp <= 1:
        return 0.0, 0.0
    return e.allreduce_latency_s, 2 * (tp - 1) / tp / (gpu.nvlink_bandwidth * e.link)


class RooflineModel:
    """Iteration time of a `BatchShape` on `tp` GPUs of one kind. Implements `LatencyModel`."""

    def __init__(
        self,
        model: ModelSpec | str,
        gpu: GPUSpec | str,
        tp: int = 1,
        efficiency: Efficiency | None = None,
    ) -> None:
        m = get_model(model)
        g = get_gpu(gpu)
        e = efficiency if efficiency is not None else Efficiency()
        kv_gpu = kv_heads_per_gpu(m, tp)  # validates tp
        self.model, self.gpu, self.tp, self.efficiency = m, g, tp, e

        h, hd, d = m.hidden_size, m.head_dim, m.dtype_bytes
        heads = m.num_heads // tp
        ffn = m.intermediate_size / tp
        up_out = (2 if m.gated_mlp else 1) * ffn
        qkv_out = (heads + 2 * kv_gpu) * hd
        self.num_layers = L = m.num_layers

        # The terms are stored as floats (and ints): compiled, the latency model is then native
        # arithmetic (setup.py). Rates: seconds per FLOP and per byte, efficiency folded in.
        c_gemm = 1.0 / (g.bf16_flops * e.gemm_compute)
        b_gemm = 1.0 / (g.hbm_bandwidth * e.gemm_memory)
        c_attn = 1.0 / (g.bf16_flops * e.attn_compute)
        b_attn = 1.0 / (g.hbm_bandwidth * e.attn_memory)
        b_elem = 1.0 / (g.hbm_bandwidth * e.elementwise_memory)

        # Each GEMM of T tokens: max(cf·T, bw0 + bf·T) seconds for all L layers.
        def gemm(w_in: float, w_out: float) -> tuple[float, float, float]:
            w = w_in * w_out
            return (L * 2 * w * c_gemm, L * w * d * b_gemm, L * (w_in + w_out) * d * b_gemm)

        self._qkv = gemm(h, qkv_out)
        self._o = gemm(heads * hd, h)
        self._up = gemm(h, up_out)
        self._down = gemm(ffn, h)

        # Attention, all layers. Prefill: FLOPs per causal pair; bytes per KV token read and per
        # query token (Q read, output written). Decode: the same per context token / per decode.
        self._attn_flop = float(L * 4 * heads * hd * c_attn)
        # Extra seconds per pair of the chunk's own causal triangle (never negative, so that more
        # tokens never cost less).
        if e.attn_diag_compute is None:
            self._attn_diag = 0.0
        else:
            c_diag = 1.0 / (g.bf16_flops * e.attn_diag_compute)
            self._attn_diag = float(L * 4 * heads * hd * max(0.0, c_diag - c_attn))
        self._attn_query = float(self._attn_flop * e.attn_query_keys)  # per prefill query token
        self._attn_kv_byte = float(L * 2 * kv_gpu * hd * d * b_attn)
        self._attn_q_byte = float(L * 2 * heads * hd * d * b_attn)

        # Element-wise bytes per token, all layers: 2 fused add+RMSNorms (read x and residual,
        # write both: 4·h each), RoPE on Q and K (read+write), SiLU·mul (read up_out, write ffn),
        # KV-cache write (read+write K and V).
        per_tok = 8 * h + 2 * (heads + kv_gpu) * hd + up_out + ffn + 4 * kv_gpu * hd
        self._elem = float(L * per_tok * d * b_elem)

        # All-reduce of the T × hidden activations: 2 per layer when tp > 1.
        ar_latency, ar_byte = allreduce_cost(tp, g, e)
        self._ar_fixed = float(2 * L * ar_latency)
        self._ar_tok = float(2 * L * ar_byte * h * d)

        # LM head (vocab-parallel) over the sampled rows: max(cf·S, bw0 + bf·S).
        v = m.vocab_size / tp
        self._lm_c = float(2 * h * v * c_gemm)
        self._lm_w = float(h * v * d * b_gemm)
        self._lm_s = float((h + v) * d * b_gemm)

        self._layer_overhead = float(L * e.layer_overhead_s)
        self._iter_overhead = float(e.iteration_overhead_s)
        self._seq_overhead = float(e.sequence_overhead_s)

        # Kernel-level terms: fixed seconds per kernel (all layers), tile and floor sizes.
        self._gemm_k = float(L * e.gemm_overhead_s)  # each of the 4 GEMMs
        self._lm_k = float(e.gemm_overhead_s)
        self._elem_k = float(L * ELEMENTWISE_KERNELS * e.elementwise_overhead_s)
        self._attn_k = float(L * e.attn_overhead_s)  # each attention kernel (prefill, decode)
        self._tile = int(e.gemm_token_tile)
        self._elem_min = int(e.elementwise_min_tokens)

        # Everything of a decode-only iteration except decode attention, as (fixed, per decode).
        (qc, qw, qt), (oc, ow, ot), (uc, uw, ut), (dc, dw, dt) = (
            self._qkv,
            self._o,
            self._up,
            self._down,
        )
        self._decode_terms = (qc, qw, qt, oc, ow, ot, uc, uw, ut, dc, dw, dt)
        self._decode_constants: dict[int, tuple[float, float, float]] = {}  # by batch size

    @classmethod
    def calibrated(
        cls,
        model: ModelSpec | str,
        gpu: GPUSpec | str,
        tp: int = 1,
        path: str | os.PathLike[str] | None = None,
    ) -> RooflineModel:
        """The model with efficiencies fitted on measured profiles: the calibration file at
        ``path``, else the GPU's own (``hardware/calibrated/<gpu>.json``), else the A100's
        (`llmsched.hardware.calibration.load_calibration`)."""
        from llmsched.hardware.calibration import load_calibration

        return cls(model, gpu, tp, load_calibration(path if path is not None else gpu))

    # ------------------------------------------------------------------ LatencyModel

    def iteration_time(self, shape: BatchShape) -> float:
        """Seconds for one iteration; 0 for an empty batch."""
        t = shape.prefill_tokens + shape.num_decodes
        if t <= 0:
            return 0.0
        tile = self._tile
        tq = t if tile == 1 else -(-t // tile) * tile
        qc, qw, qt = self._qkv
        oc, ow, ot = self._o
        uc, uw, ut = self._up
        dc, dw, dt = self._down
        total = (
            4 * self._gemm_k
            + max(qc * tq, qw + qt * t)
            + max(oc * tq, ow + ot * t)
            + max(uc * tq, uw + ut * t)
            + max(dc * tq, dw + dt * t)
        )
        if shape.prefill_tokens > 0:
            total += self._prefill_attention(shape)
        if shape.num_decodes > 0:
            total += self._attn_k + max(
                self._attn_flop * shape.decode_kv_tokens,
                self._attn_kv_byte * shape.decode_kv_tokens + self._attn_q_byte * shape.num_decodes,
            )
        s = shape.num_prefills + shape.num_decodes
        sq = s if tile == 1 else -(-s // tile) * tile
        total += (
            self._elem_k
            + self._elem * (t if t > self._elem_min else self._elem_min)
            + (self._ar_fixed + self._ar_tok * t)
            + self._layer_overhead
            + self._lm_k
            + max(self._lm_c * sq, self._lm_w + self._lm_s * s)
            + self._iter_overhead
            + self._seq_overhead * s
        )
        return total

    def _prefill_attention(self, shape: BatchShape) -> float:
        """Seconds of the prefill chunks' attention, all layers (prefill_tokens > 0)."""
        pairs = shape.prefill_attn_pairs
        p = shape.prefill_tokens
        flops = self._attn_flop * pairs + self._attn_query * p
        if self._attn_diag:
            flops += self._attn_diag * min(pairs, p * (p + 1) / 2)
        return self._attn_k + max(
            flops,
            self._attn_kv_byte * shape.prefill_kv_tokens + self._attn_q_byte * shape.prefill_tokens,
        )

    def decode_iteration_times(self, num_decodes: int, kv_tokens: int, k: int) -> list[float]:
        """Times of k decode-only iterations of `num_decodes` requests whose summed context starts
        at `kv_tokens` and grows by `num_decodes` per iteration (iteration_time's terms, those
        that do not change with the context computed once)."""
        n = num_decodes
        if n <= 0:
            return [0.0] * max(k, 0)
        terms = self._decode_constants.get(n)
        if terms is None:
            terms = self._decode_constants[n] = self._decode_terms_of(n)
        fixed, q_bytes, rest = terms
        flop, kv_byte = self._attn_flop, self._attn_kv_byte
        # A loop, not numpy: spans are short (median 2-4 iterations), and compiled (mypyc) a
        # loop of a few floats costs less than one numpy call.
        out = []
        context = kv_tokens
        for _ in range(k):
            kv = float(context)
            compute, memory = kv * flop, kv * kv_byte + q_bytes
            out.append((compute if compute >= memory else memory) + fixed + rest)
            context += n
        return out

    def _decode_terms_of(self, n: int) -> tuple[float, float, float]:
        """What a decode-only iteration of n requests costs besides attention over their
        context: (the GEMMs, attention's per-query bytes, everything else)."""
        qc, qw, qt, oc, ow, ot, uc, uw, ut, dc, dw, dt = self._decode_terms
        tile = self._tile
        nq = n if tile == 1 else -(-n // tile) * tile
        fixed = (
            4 * self._gemm_k
            + max(qc * nq, qw + qt * n)
            + max(oc * nq, ow + ot * n)
            + max(uc * nq, uw + ut * n)
            + max(dc * nq, dw + dt * n)
        )
        rest = (
            self._attn_k
            + self._elem_k
            + self._elem * (n if n > self._elem_min else self._elem_min)
            + (self._ar_fixed + self._ar_tok * n)
            + self._layer_overhead
            + self._lm_k
            + max(self._lm_c * nq, self._lm_w + self._lm_s * n)
            + self._iter_overhead
            + self._seq_overhead * n
        )
        return fixed, self._attn_q_byte * n, rest

    # ------------------------------------------------------------------ reports

    def breakdown(self, shape: BatchShape) -> dict[str, float]:
        """Seconds per named term (see `TERMS`) for one shape; they sum to iteration_time."""
        terms = dict.fromkeys(TERMS, 0.0)
        t = shape.prefill_tokens + shape.num_decodes
        if t <= 0:
            return terms
        tile = self._tile
        tq = t if tile == 1 else -(-t // tile) * tile
        for name, (c, w, b) in (
            ("qkv_proj", self._qkv),
            ("o_proj", self._o),
            ("mlp_gate_up", self._up),
            ("mlp_down", self._down),
        ):
            terms[name] = self._gemm_k + max(c * tq, w + b * t)
        if shape.prefill_tokens > 0:
            terms["attn_prefill"] = self._prefill_attention(shape)
        if shape.num_decodes > 0:
            terms["attn_decode"] = self._attn_k + max(
                self._attn_flop * shape.decode_kv_tokens,
                self._attn_kv_byte * shape.decode_kv_tokens + self._attn_q_byte * shape.num_decodes,
            )
        s = shape.num_prefills + shape.num_decodes
        sq = s if tile == 1 else -(-s // tile) * tile
        terms["elementwise"] = self._elem_k + self._elem * max(t, self._elem_min)
        terms["allreduce"] = self._ar_fixed + self._ar_tok * t
        terms["layer_overhead"] = self._layer_overhead
        terms["lm_head"] = self._lm_k + max(self._lm_c * sq, self._lm_w + self._lm_s * s)
        terms["iteration_overhead"] = self._iter_overhead
        terms["sequence_overhead"] = self._seq_overhead * s
        return terms

    def __repr__(self) -> str:
        return f"RooflineModel({self.model.name!r}, {self.gpu.name!r}, tp={self.tp})"
