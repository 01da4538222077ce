"""The shapes a profile measures: the model's, or a tiny stand-in's on a CPU, and one rank's share
of them at a tensor-parallel degree (heads, MLP width and vocabulary divided by ``tp``)."""

from __future__ import annotations

from dataclasses import dataclass

from llmsched.hardware.specs import ModelSpec, get_model

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
