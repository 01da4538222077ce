"""Model and GPU specifications, selectable by name.

Model numbers are the `config.json` values of the Hugging Face checkpoints; GPU numbers are the
vendors' datasheet figures (dense bf16 tensor-core FLOP/s, HBM bandwidth, link bandwidths), except
`memory_bytes`, which is the total that CUDA reports (`cudaMemGetInfo`, what vLLM multiplies by
`gpu_memory_utilization`), a little below the datasheet capacity.

Names are lowercase and hyphenated (`llama-2-70b`, `h100-sxm-80gb`); aliases and Hugging Face ids
are accepted, case-insensitively.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024**3


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A dense decoder-only transformer, as far as serving cost is concerned."""

    name: str
    hf_id: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # MLP width
    vocab_size: int
    max_model_len: int  # max_position_embeddings
    gated_mlp: bool = True  # SwiGLU: gate and up projections (3 matrices), else up/down (2)
    dtype_bytes: int = 2  # bf16/fp16 weights and KV cache
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    qkv_bias: bool = False  # Qwen2 has biases on the Q, K, V projections
    num_params: int = field(default=0)  # 0: computed from the shapes

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model {self.name!r}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_params <= 0:
            object.__setattr__(self, "num_params", self.params_from_shapes())

    def params_from_shapes(self) -> int:
        """Parameter count implied by the shapes (embeddings, LM head, layers, norms)."""
        h, hd = self.hidden_size, self.head_dim
        q = h * self.num_heads * hd
        kv = 2 * h * self.num_kv_heads * hd
        o = self.num_heads * hd * h
        bias = (self.num_heads + 2 * self.num_kv_heads) * hd if self.qkv_bias else 0
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        norms = 2 * h
        per_layer = q + kv + o + bias + mlp + norms
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + embed + lm_head + h  # + final norm

    @property
    def norm_params(self) -> int:
        """Parameters replicated on every tensor-parallel rank (the RMSNorm weights)."""
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes


@dataclass(frozen=True, slots=True)
class GPUSpec:
    """One accelerator. Bandwidths in bytes/s, FLOP/s dense (no 2:4 sparsity)."""

    name: str
    memory_bytes: int  # total CUDA reports (what vLLM's gpu_memory_utilization multiplies)
    bf16_flops: float  # dense bf16 tensor-core peak
    hbm_bandwidth: float  # device memory bandwidth
    nvlink_bandwidth: float  # GPU↔GPU per direction, for TP all-reduce; PCIe for PCIe-only cards
    pcie_bandwidth: float  # host↔device per direction, for KV swap
    datasheet_memory_gb: float  # the capacity the vendor states
    has_nvlink: bool = True

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


# --------------------------------------------------------------------------- models
# Shapes from each checkpoint's config.json on the Hugging Face Hub.

_MODELS: tuple[tuple[ModelSpec, tuple[str, ...]], ...] = (
    (
        # meta-llama/Llama-2-7b-hf: 32 layers, 4096 hidden, 32 heads (MHA), 11008 MLP, 32000 vocab
        ModelSpec(
            "llama-2-7b",
            "meta-llama/Llama-2-7b-hf",
            32,
            4096,
            32,
            32,
            128,
            11008,
            32000,
            max_model_len=4096,
        ),
        ("meta-llama/Llama-2-7b-chat-hf",),
    ),
    (
        # meta-llama/Llama-2-13b-hf: 40 layers, 5120 hidden, 40 heads (MHA), 13824 MLP
        ModelSpec(
            "llama-2-13b",
            "meta-llama/Llama-2-13b-hf",
            40,
            5120,
            40,
            40,
            128,
            13824,
            32000,
            max_model_len=4096,
        ),
        ("meta-llama/Llama-2-13b-chat-hf",),
    ),
    (
        # meta-llama/Llama-2-70b-hf: 80 layers, 8192 hidden, 64 heads, 8 KV heads, 28672 MLP
        ModelSpec(
            "llama-2-70b",
            "meta-llama/Llama-2-70b-hf",
            80,
            8192,
            64,
            8,
            128,
            28672,
            32000,
            max_model_len=4096,
        ),
        ("meta-llama/Llama-2-70b-chat-hf",),
    ),
    (
        # meta-llama/Meta-Llama-3-8B: 32 layers, 4096 hidden, 32/8 heads, 14336 MLP, 128256 vocab
        ModelSpec(
            "llama-3-8b",
            "meta-llama/Meta-Llama-3-8B",
            32,
            4096,
            32,
            8,
            128,
            14336,
            128256,
            max_model_len=8192,
        ),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b-instruct"),
    ),
    (
        # meta-llama/Meta-Llama-3-70B: 80 layers, 8192 hidden, 64/8 heads, 28672 MLP
        ModelSpec(
            "llama-3-70b",
            "meta-llama/Meta-Llama-3-70B",
            80,
            8192,
            64,
            8,
            128,
            28672,
            128256,
            max_model_len=8192,
        ),
        ("meta-llama/Meta-Llama-3-70B-Instruct", "llama-3-70b-instruct"),
    ),
    (
        # meta-llama/Llama-3.1-8B: Llama-3-8B shapes, 131072 positions. The R1 distill of Llama-8B
        # (deepseek-ai/DeepSeek-R1-Distill-Llama-8B) has the same config.
        ModelSpec(
            "llama-3.1-8b",
            "meta-llama/Llama-3.1-8B",
            32,
            4096,
            32,
            8,
            128,
            14336,
            128256,
            max_model_len=131072,
        ),
        (
            "meta-llama/Llama-3.1-8B-Instruct",
            "meta-llama/Meta-Llama-3.1-8B",
            "meta-llama/Meta-Llama-3.1-8B-Instruct",
            "llama-3.1-8b-instruct",
            "deepseek-r1-distill-llama-8b",
            "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        ),
    ),
    (
        # meta-llama/Llama-3.1-70B: Llama-3-70B shapes, 131072 positions. DeepSeek-R1-Distill-
        # Llama-70B (from Llama-3.3-70B-Instruct) has the same shapes.
        ModelSpec(
            "llama-3.1-70b",
            "meta-llama/Llama-3.1-70B",
            80,
            8192,
            64,
            8,
            128,
            28672,
            128256,
            max_model_len=131072,
        ),
        (
            "meta-llama/Llama-3.1-70B-Instruct",
            "meta-llama/Meta-Llama-3.1-70B-Instruct",
            "llama-3.1-70b-instruct",
            "llama-3.3-70b",
            "meta-llama/Llama-3.3-70B-Instruct",
            "deepseek-r1-distill-llama-70b",
            "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
        ),
    ),
    (
        # mistralai/Mistral-7B-Instruct-v0.2: 32 layers, 4096 hidden, 32/8 heads, 14336 MLP,
        # 32000 vocab, 32768 positions, no sliding window (v0.1 had a 4096-token window)
        ModelSpec(
            "mistral-7b",
            "mistralai/Mistral-7B-Instruct-v0.2",
            32,
            4096,
            32,
            8,
            128,
            14336,
            32000,
            max_model_len=32768,
        ),
        ("mistral-7b-instruct-v0.2", "mistral-7b-instruct"),
    ),
    (
        # Qwen/Qwen2.5-7B: 28 layers, 3584 hidden, 28/4 heads, 18944 MLP, 152064 vocab, QKV bias,
        # untied embeddings; 131072 positions in the base config (the Instruct config says 32768,
        # YaRN beyond). DeepSeek-R1-Distill-Qwen-7B (from Qwen2.5-Math-7B) has the same shapes.
        ModelSpec(
            "qwen2.5-7b",
            "Qwen/Qwen2.5-7B",
            28,
            3584,
            28,
            4,
            128,
            18944,
            152064,
            max_model_len=131072,
            qkv_bias=True,
        ),
        (
            "Qwen/Qwen2.5-7B-Instruct",
            "qwen2.5-7b-instruct",
            "deepseek-r1-distill-qwen-7b",
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        ),
    ),
    (
        # Qwen/Qwen2.5-14B: 48 layers, 5120 hidden, 40/8 heads, 13824 MLP, 152064 vocab
        ModelSpec(
            "qwen2.5-14b",
            "Qwen/Qwen2.5-14B",
            48,
            5120,
            40,
            8,
            128,
            13824,
            152064,
            max_model_len=131072,
            qkv_bias=True,
        ),
        (
            "Qwen/Qwen2.5-14B-Instruct",
            "qwen2.5-14b-instruct",
            "deepseek-r1-distill-qwen-14b",
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
        ),
    ),
    (
        # Qwen/Qwen2.5-32B: 64 layers, 5120 hidden, 40/8 heads, 27648 MLP, 152064 vocab;
        # deepseek-ai/DeepSeek-R1-Distill-Qwen-32B has the same config (131072 positions)
        ModelSpec(
            "qwen2.5-32b",
            "Qwen/Qwen2.5-32B",
            64,
            5120,
            40,
            8,
            128,
            27648,
            152064,
            max_model_len=131072,
            qkv_bias=True,
        ),
        (
            "Qwen/Qwen2.5-32B-Instruct",
            "qwen2.5-32b-instruct",
            "deepseek-r1-distill-qwen-32b",
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
        ),
    ),
)

# --------------------------------------------------------------------------- GPUs
# Link bandwidths are per direction: NVIDIA quotes NVLink and PCIe as the sum of both directions
# (A100: NVLink 600 GB/s, PCIe Gen4 x16 64 GB/s), so they are halved here.

_GPUS: tuple[tuple[GPUSpec, tuple[str, ...]], ...] = (
    (
        # A100 SXM4 80GB datasheet: bf16 312 TFLOPS dense, HBM2e 2,039 GB/s, NVLink3 600 GB/s,
        # PCIe Gen4 64 GB/s. CUDA reports 79.15 GiB (vLLM logs "total_gpu_memory (79.15GiB)").
        GPUSpec("a100-80gb", int(79.15 * GiB), 312e12, 2.039e12, 300e9, 32e9, 80),
        ("a100", "a100-sxm-80gb", "a100-sxm4-80gb", "nvidia a100-sxm4-80gb"),
    ),
    (
        # A100 SXM4 40GB datasheet: bf16 312 TFLOPS, HBM2 1,555 GB/s. CUDA reports 39.39-39.56 GiB
        # depending on the driver (vLLM logs); 39.39 is the conservative end.
        GPUSpec("a100-40gb", int(39.39 * GiB), 312e12, 1.555e12, 300e9, 32e9, 40),
        ("a100-sxm4-40gb", "nvidia a100-sxm4-40gb"),
    ),
    (
        # H100 SXM5 80GB datasheet: bf16 989 TFLOPS dense (1,979 sparse), HBM3 3.35 TB/s,
        # NVLink4 900 GB/s, PCIe Gen5 128 GB/s. CUDA reports 79.11 GiB (vLLM logs).
        GPUSpec("h100-sxm-80gb", int(79.11 * GiB), 989e12, 3.35e12, 450e9, 64e9, 80),
        ("h100", "h100-sxm", "h100-80gb", "h100-sxm5-80gb", "nvidia h100 80gb hbm3"),
    ),
    (
        # H100 with 96 GB on PCIe 5.0, as in PASCAL's testbed: the H100 NVL card (datasheet:
        # 94 GB of its 96 GB HBM3 usable, 3.9 TB/s, bf16 835 TFLOPS dense, NVLink bridge
        # 600 GB/s both ways, PCIe Gen5 x16 128 GB/s both ways, so swap runs at PCIe speed).
        # CUDA total estimated at 93.0 GiB (about 0.6 GiB under nvidia-smi's 95,830 MiB).
        GPUSpec("h100-96gb", int(93.0 * GiB), 835e12, 3.9e12, 300e9, 64e9, 96),
        ("h100-nvl", "h100-pcie-96gb", "h100-96gb-pcie"),
    ),
    (
        # The 96 GB HBM3 H100 of the GH200 Grace Hopper Superchip (GH200 datasheet: 96 GB HBM3,
        # 4 TB/s; H100 compute, 989 TFLOPS bf16 dense; NVLink4 900 GB/s between GPUs; host link
        # NVLink-C2C 900 GB/s). CUDA total estimated at 95.0 GiB.
        GPUSpec("gh200", int(95.0 * GiB), 989e12, 4.0e12, 450e9, 450e9, 96),
        ("gh200-96gb", "h100-96gb-hbm3"),
    ),
    (
        # H200 SXM datasheet: bf16 989 TFLOPS dense, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s,
        # PCIe Gen5 128 GB/s. CUDA reports 139.81 GiB (vLLM logs).
        GPUSpec("h200", int(139.81 * GiB), 989e12, 4.8e12, 450e9, 64e9, 141),
        ("h200-sxm", "h200-141gb", "nvidia h200"),
    ),
    (
        # L40S datasheet: bf16 362.05 TFLOPS dense (733 sparse), 48 GB GDDR6 at 864 GB/s, PCIe
        # Gen4 x16 (64 GB/s both ways), no NVLink. CUDA reports 44.39 GiB (vLLM logs).
        GPUSpec("l40s", int(44.39 * GiB), 362.05e12, 864e9, 32e9, 32e9, 48, has_nvlink=False),
        ("nvidia l40s",),
    ),
    (
        # RTX 6000 Ada datasheet: 1,457 TFLOPS FP8 sparse → bf16 dense (FP32 accumulate) 364.2
        # TFLOPS; 48 GB GDDR6 at 960 GB/s; PCIe Gen4 x16; no NVLink. CUDA total ≈ 47.50 GiB.
        GPUSpec(
            "rtx-6000-ada", int(47.50 * GiB), 364.2e12, 960e9, 32e9, 32e9, 48, has_nvlink=False
        ),
        ("rtx6000-ada", "rtx-6000-ada-generation", "nvidia rtx 6000 ada generation"),
    ),
)


def _normalise(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


def _index(entries: tuple) -> tuple[dict[str, object], tuple[str, ...]]:
    index: dict[str, object] = {}
    names = []
    for spec, aliases in entries:
        names.append(spec.name)
        keys = [spec.name, *aliases]
        if getattr(spec, "hf_id", None):
            keys.append(spec.hf_id)
        for key in keys:
            for variant in (key, key.split("/")[-1]):  # HF ids also without the organisation
                k = _normalise(variant)
                if index.setdefault(k, spec) is not spec:
                    raise RuntimeError(f"name {variant!r} is registered twice")
    return index, tuple(names)


_MODEL_INDEX, _MODEL_NAMES = _index(_MODELS)
_GPU_INDEX, _GPU_NAMES = _index(_GPUS)


def _lookup(kind: str, name: str, index: dict, names: tuple[str, ...]):
    key = _normalise(name)
    found = index.get(key) or index.get(key.replace("_", "-").replace(" ", "-"))
    if found is not None:
        return found
    close = difflib.get_close_matches(key, list(index), n=3, cutoff=0.5)
    suggestion = ""
    if close:
        canonical = []
        for c in close:
            n = index[c].name
            if n not in canonical:
                canonical.append(n)
        suggestion = f" Did you mean {' or '.join(repr(c) for c in canonical)}?"
    raise ValueError(
        f"unknown {kind} {name!r}.{suggestion} Known {kind}s: {', '.join(names)} "
        f"(aliases and Hugging Face ids are accepted, case-insensitively)."
    )


_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def model_from_config(config: dict, name: str = "model") -> ModelSpec:
    """A dense decoder's ModelSpec from its Hugging Face ``config.json`` fields (Llama, Qwen2,
    Mistral and their kin)."""
    try:
        h = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        spec = ModelSpec(
            name,
            str(config.get("_name_or_path") or name),
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=h,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or h // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            max_model_len=int(config.get("max_position_embeddings") or 4096),
            dtype_bytes=_DTYPE_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias") or config.get("model_type") == "qwen2"),
        )
    except KeyError as e:
        raise ValueError(
            f"model {name!r}: its config.json has no {e.args[0]!r}; llmsched reads dense "
            "decoder configs (hidden_size, num_attention_heads, num_hidden_layers, "
            "intermediate_size, vocab_size)"
        ) from None
    return spec


def with_dtype(model: ModelSpec, dtype: str | None) -> ModelSpec:
    """The model served in another dtype (vLLM's --dtype): float32, bfloat16, float16."""
    if dtype is None:
        return model
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not known; use one of {', '.join(_DTYPE_BYTES)}")
    return dataclasses.replace(model, dtype_bytes=_DTYPE_BYTES[dtype], num_params=0)


def get_model(name: str | ModelSpec) -> ModelSpec:
    """The model registered under `name` (canonical name, alias or Hugging Face id), or the
    model of a local folder or ``config.json`` (a Hugging Face model folder, as vLLM takes)."""
    if isinstance(name, ModelSpec):
        return name
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {path}: not valid JSON ({e})") from None
        return model_from_config(config, str(name))
    return _lookup("model", name, _MODEL_INDEX, _MODEL_NAMES)


def get_gpu(name: str | GPUSpec) -> GPUSpec:
    """The GPU registered under `name` (canonical name or alias)."""
    if isinstance(name, GPUSpec):
        return name
    return _lookup("GPU", name, _GPU_INDEX, _GPU_NAMES)


def list_models() -> list[str]:
    return list(_MODEL_NAMES)


def list_gpus() -> list[str]:
    return list(_GPU_NAMES)
