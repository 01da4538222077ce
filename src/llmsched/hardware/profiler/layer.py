"""One rank's decoder layer, embedding and LM head with random weights of the real shapes, as
plain functions named after Vidur's operators, and the KV buffers they write."""

from __future__ import annotations

from typing import Any

from llmsched.hardware.profiler.batch import PackedBatch
from llmsched.hardware.profiler.device import Setup

RMS_EPS = 1e-5


class DecoderLayer:
    """One rank's share of a Llama-style decoder layer, random weights, as plain functions."""

    def __init__(self, s: Setup, max_positions: int, seed: int = 0) -> None:
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
        return self.F.rms_norm(x, (self.sh.hidden_size,), weight, eps=RMS_EPS)

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

    def forward(self, x: Any, plan: PackedBatch, k_buf: Any, v_buf: Any) -> Any:
        """The whole layer: norm, QKV, rope, KV write, attention, o_proj, add, norm, MLP, add."""
        q, k, v = self.split(self.qkv(self.norm(x, self.norm1)))
        q, k = self.rope(q, k, plan.positions)
        k_buf.index_copy_(0, plan.write_index, k)
        v_buf.index_copy_(0, plan.write_index, v)
        x = x + self.o_proj(self.s.attention(q, k_buf, v_buf, plan))
        return x + self.down(self.act(self.up(self.norm(x, self.norm2))))


class Embedding:
    """The vocab-parallel embedding (masking the ids of other ranks when tp > 1), final norm
    and LM head of one rank."""

    def __init__(self, s: Setup, seed: int = 1) -> None:
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
        h = self.F.rms_norm(x, (self.sh.hidden_size,), self.final_norm, eps=RMS_EPS)
        return self.F.linear(h, self.lm_head)


def kv_buffers(s: Setup, tokens: int) -> tuple[Any, Any]:
    """Random K and V buffers of `tokens` slots (the cached KV that attention reads)."""
    torch, sh = s.torch, s.shapes
    gen = torch.Generator(device=s.device).manual_seed(3)
    shape = (max(tokens, 1), sh.kv_heads, sh.head_dim)
    k = torch.randn(shape, generator=gen, device=s.device, dtype=s.dtype)
    v = torch.randn(shape, generator=gen, device=s.device, dtype=s.dtype)
    return k, v
