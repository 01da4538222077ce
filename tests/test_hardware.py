"""Hardware specs, KV-capacity arithmetic and the roofline latency model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsched.hardware.latency import BatchShape, LatencyModel
from llmsched.hardware.memory import (
    activation_bytes,
    kv_bytes_per_token,
    kv_cache_blocks,
    weight_bytes,
)
from llmsched.hardware.roofline import TERMS, Efficiency, RooflineModel
from llmsched.hardware.specs import GiB, get_gpu, get_model, list_gpus, list_models

from .helpers import batch_shapes, shape_fields

# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("llama-2-70b", "llama-2-70b"),
        ("meta-llama/Llama-2-70b-hf", "llama-2-70b"),
        ("META-LLAMA/LLAMA-2-7B-HF", "llama-2-7b"),
        ("Llama-2-7b-chat-hf", "llama-2-7b"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-7b"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
        ("deepseek-r1-distill-qwen-32b", "qwen2.5-32b"),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "qwen2.5-32b"),
        ("  Qwen2.5-32B ", "qwen2.5-32b"),
    ],
)
def test_model_names_and_aliases_resolve(alias, name):
    assert get_model(alias).name == name


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("a100", "a100-80gb"),
        ("A100-80GB", "a100-80gb"),
        ("h100", "h100-sxm-80gb"),
        ("H100-SXM-80GB", "h100-sxm-80gb"),
        ("h100-96gb", "h100-96gb"),
        ("h200", "h200"),
        ("L40S", "l40s"),
        ("rtx-6000-ada", "rtx-6000-ada"),
        ("rtx_6000_ada", "rtx-6000-ada"),
    ],
)
def test_gpu_names_and_aliases_resolve(alias, name):
    assert get_gpu(alias).name == name


def test_required_registry_entries():
    required_models = {
        "llama-2-7b",
        "llama-2-70b",
        "llama-3-8b",
        "llama-3-70b",
        "mistral-7b",
        "qwen2.5-7b",
        "qwen2.5-32b",
        "llama-3.1-8b",
    }
    required_gpus = {"a100-80gb", "h100-sxm-80gb", "h100-96gb", "h200", "l40s", "rtx-6000-ada"}
    assert required_models <= set(list_models())
    assert required_gpus <= set(list_gpus())
    for name in list_models():
        assert name == name.lower() and " " not in name
        assert get_model(name).name == name


def test_unknown_model_error_names_input_lists_and_suggests():
    with pytest.raises(ValueError) as err:
        get_model("llama-2-7")
    msg = str(err.value)
    assert "'llama-2-7'" in msg
    assert "Did you mean" in msg and "llama-2-7b" in msg
    for name in list_models():
        assert name in msg


def test_unknown_gpu_error_names_input_lists_and_suggests():
    with pytest.raises(ValueError) as err:
        get_gpu("h10")
    msg = str(err.value)
    assert "'h10'" in msg and "Did you mean" in msg
    for name in list_gpus():
        assert name in msg


def test_published_architectures():
    m = get_model("llama-2-70b")
    assert (
        m.num_layers,
        m.hidden_size,
        m.num_heads,
        m.num_kv_heads,
        m.head_dim,
        m.intermediate_size,
        m.vocab_size,
    ) == (80, 8192, 64, 8, 128, 28672, 32000)
    q = get_model("qwen2.5-32b")
    assert (
        q.num_layers,
        q.hidden_size,
        q.num_heads,
        q.num_kv_heads,
        q.head_dim,
        q.intermediate_size,
        q.vocab_size,
    ) == (64, 5120, 40, 8, 128, 27648, 152064)
    # Parameter counts computed from the shapes match the published sizes.
    for name, billions in [
        ("llama-2-7b", 6.74),
        ("llama-2-70b", 68.98),
        ("llama-3-8b", 8.03),
        ("llama-3-70b", 70.55),
        ("mistral-7b", 7.24),
        ("qwen2.5-7b", 7.62),
        ("qwen2.5-32b", 32.76),
    ]:
        assert get_model(name).num_params / 1e9 == pytest.approx(billions, abs=0.01), name


def test_gpu_datasheet_numbers():
    a100 = get_gpu("a100")
    assert a100.bf16_flops == 312e12 and a100.hbm_bandwidth == 2.039e12
    assert 79 * GiB < a100.memory_bytes < 80 * GiB
    h100 = get_gpu("h100")
    assert h100.bf16_flops == pytest.approx(989e12) and h100.hbm_bandwidth == 3.35e12
    assert get_gpu("h200").memory_bytes > 139 * GiB
    assert not get_gpu("l40s").has_nvlink
    assert get_gpu("l40s").nvlink_bandwidth == get_gpu("l40s").pcie_bandwidth


# ----------------------------------------------------------------------------- memory


def test_kv_bytes_per_token():
    assert kv_bytes_per_token("llama-2-70b", 2) == 80 * 2 * 4 * 128 * 2 == 163_840
    assert kv_bytes_per_token("llama-2-7b") == 32 * 2 * 32 * 128 * 2
    # KV heads are replicated beyond tp = kv_heads: per-GPU bytes stop shrinking.
    assert kv_bytes_per_token("llama-2-70b", 8) == kv_bytes_per_token("llama-2-70b", 16)
    assert kv_bytes_per_token("llama-2-70b", 8) == 80 * 2 * 1 * 128 * 2


def test_invalid_tp_is_rejected():
    with pytest.raises(ValueError, match="does not divide"):
        kv_bytes_per_token("llama-2-70b", 3)
    with pytest.raises(ValueError, match="positive integer"):
        kv_bytes_per_token("llama-2-7b", 0)


def test_weight_bytes_shard_over_tp():
    w1 = weight_bytes("llama-2-70b", 1)
    assert w1 == get_model("llama-2-70b").num_params * 2
    w2 = weight_bytes("llama-2-70b", 2)
    norms = get_model("llama-2-70b").norm_params  # only the norms are replicated
    assert w2 == pytest.approx(w1 / 2 + norms * 2 / 2, abs=2)
    # Replicated KV heads at tp 16 cost more than a clean split would.
    assert weight_bytes("llama-2-70b", 16) > w1 / 16 + 1e6


def test_kv_cache_blocks_llama2_7b_a100():
    cap = kv_cache_blocks("llama-2-7b", "a100-80gb")
    assert cap.bytes_per_block == 16 * 524_288
    kv_gib = cap.num_blocks * cap.bytes_per_block / GiB
    assert 50 < kv_gib < 62  # tens of GB of KV cache
    assert cap.num_blocks == int(cap.kv_bytes // cap.bytes_per_block)
    assert cap.usable_bytes == pytest.approx(0.9 * get_gpu("a100").memory_bytes, abs=1)
    assert cap.kv_bytes == (
        cap.usable_bytes - cap.weight_bytes - cap.activation_bytes - cap.non_torch_bytes
    )
    assert cap.num_tokens == cap.num_blocks * 16


def test_kv_cache_blocks_matches_vllm_logs():
    # vLLM PR #2031 (V0, Dec 2023): Llama-2-7B, 1×A100-80GB, utilisation 0.9 → 7351 GPU blocks
    # (max_num_batched_tokens was max_model_len = 4096 without chunked prefill).
    cap = kv_cache_blocks("llama-2-7b", "a100", max_num_batched_tokens=4096)
    assert cap.num_blocks == pytest.approx(7351, rel=0.02)
    # vLLM V1 log: Llama-3.1-8B on H100 80GB, 8192 batched tokens, 256 seqs → 447,776 tokens.
    cap = kv_cache_blocks("llama-3.1-8b", "h100", max_num_batched_tokens=8192)
    assert cap.num_tokens == pytest.approx(447_776, rel=0.01)
    assert cap.activation_bytes / GiB == pytest.approx(1.21, abs=0.05)


def test_kv_fraction_caps_capacity():
    full = kv_cache_blocks("llama-3-8b", "a100")
    half = kv_cache_blocks("llama-3-8b", "a100", kv_fraction=0.5)
    assert half.num_blocks == int(full.kv_bytes * 0.5 // full.bytes_per_block)
    assert abs(half.num_blocks - full.num_blocks / 2) <= 1
    with pytest.raises(ValueError, match="kv_fraction"):
        kv_cache_blocks("llama-3-8b", "a100", kv_fraction=0)


def test_kv_cache_blocks_grows_with_memory_and_shrinks_with_batch_tokens():
    small = kv_cache_blocks("llama-3-8b", "a100", max_num_batched_tokens=16384)
    base = kv_cache_blocks("llama-3-8b", "a100", max_num_batched_tokens=2048)
    big = kv_cache_blocks("llama-3-8b", "h200", max_num_batched_tokens=2048)
    assert small.num_blocks < base.num_blocks < big.num_blocks
    assert activation_bytes("llama-3-8b", max_num_batched_tokens=16384) > activation_bytes(
        "llama-3-8b", max_num_batched_tokens=2048
    )


def test_llama2_70b_tp1_does_not_fit_on_a100():
    with pytest.raises(ValueError) as err:
        kv_cache_blocks("llama-2-70b", "a100-80gb", tp=1)
    msg = str(err.value)
    assert "llama-2-70b" in msg and "a100-80gb" in msg
    assert "128.5" in msg  # the weights, GiB
    assert "tp=2" in msg
    # …and fits at TP 2, with tens of GB of KV per GPU.
    cap = kv_cache_blocks("llama-2-70b", "a100-80gb", tp=2)
    assert 5 * GiB < cap.num_blocks * cap.bytes_per_block < 15 * GiB


def test_error_suggests_a_bigger_gpu():
    with pytest.raises(ValueError, match="h200"):
        kv_cache_blocks("qwen2.5-32b", "l40s")


# ----------------------------------------------------------------------------- roofline


def prefill(c: int, p: int = 0) -> BatchShape:
    """One prefill chunk of c tokens after p already-computed tokens."""
    return BatchShape(
        prefill_tokens=c,
        prefill_attn_pairs=c * (p + (c + 1) / 2),
        prefill_kv_tokens=p + c,
        num_prefills=1,
    )


def decode(n: int, kv: int) -> BatchShape:
    return BatchShape(num_decodes=n, decode_kv_tokens=kv)


@pytest.fixture(scope="module")
def a100_7b() -> RooflineModel:
    return RooflineModel("llama-2-7b", "a100-80gb")


def test_implements_latency_model_protocol(a100_7b):
    model: LatencyModel = a100_7b
    assert isinstance(model.iteration_time(decode(1, 10)), float)


def test_sanity_llama2_7b_a100(a100_7b):
    t_dec = a100_7b.iteration_time(decode(1, 128))
    assert 6e-3 <= t_dec <= 10e-3
    t_pre = a100_7b.iteration_time(prefill(2048))
    assert 100e-3 <= t_pre <= 200e-3


def test_sanity_llama2_70b_tp2_a100():
    t = RooflineModel("llama-2-70b", "a100", tp=2).iteration_time(decode(1, 128))
    assert 25e-3 <= t <= 45e-3


def test_faster_gpu_is_faster():
    for shape in (decode(1, 128), decode(64, 64 * 1000), prefill(2048)):
        a = RooflineModel("llama-3-8b", "a100").iteration_time(shape)
        h = RooflineModel("llama-3-8b", "h100").iteration_time(shape)
        assert h < a


def test_empty_batch_costs_nothing(a100_7b):
    assert a100_7b.iteration_time(BatchShape()) == 0.0


def test_breakdown_sums_to_iteration_time(a100_7b):
    shape = BatchShape(
        prefill_tokens=512,
        prefill_attn_pairs=512 * 1000.5,
        prefill_kv_tokens=1256,
        num_prefills=2,
        num_decodes=30,
        decode_kv_tokens=30_000,
    )
    for model in (a100_7b, RooflineModel("llama-2-70b", "a100", tp=4)):
        terms = model.breakdown(shape)
        assert tuple(terms) == TERMS
        assert all(v >= 0 for v in terms.values())
        assert sum(terms.values()) == pytest.approx(model.iteration_time(shape), rel=1e-12)
    assert a100_7b.breakdown(shape)["allreduce"] == 0.0
    assert RooflineModel("llama-2-70b", "a100", tp=4).breakdown(shape)["allreduce"] > 0


def test_decode_memory_bound_and_prefill_compute_bound(a100_7b):
    dec = a100_7b.breakdown(decode(1, 128))
    # Batch-1 decode streams the weights: ≈ 13 GB at 0.85 × 2.039 TB/s.
    gemms = dec["qkv_proj"] + dec["o_proj"] + dec["mlp_gate_up"] + dec["mlp_down"]
    linear_bytes = (get_model("llama-2-7b").num_params - 2 * 32000 * 4096) * 2
    assert gemms == pytest.approx(linear_bytes / (2.039e12 * 0.85), rel=0.01)
    pre = a100_7b.breakdown(prefill(2048))
    flops = 2 * 2048 * (get_model("llama-2-7b").num_params - 2 * 32000 * 4096)
    gemms = pre["qkv_proj"] + pre["o_proj"] + pre["mlp_gate_up"] + pre["mlp_down"]
    assert gemms == pytest.approx(flops / (312e12 * 0.65), rel=0.01)


def test_efficiency_is_used_and_validated():
    slow = RooflineModel("llama-2-7b", "a100", efficiency=Efficiency(gemm_memory=0.4))
    fast = RooflineModel("llama-2-7b", "a100")
    assert slow.iteration_time(decode(1, 100)) > 1.5 * fast.iteration_time(decode(1, 100))
    with pytest.raises(ValueError, match="gemm_compute"):
        Efficiency(gemm_compute=1.5)
    bumped = dataclasses.replace(Efficiency(), iteration_overhead_s=0.01)
    t = RooflineModel("llama-2-7b", "a100", efficiency=bumped).iteration_time(decode(1, 100))
    assert t == pytest.approx(fast.iteration_time(decode(1, 100)) + 0.0095, rel=1e-9)


MODELS = [
    ("llama-2-7b", "a100", 1),
    ("llama-2-70b", "a100", 2),
    ("qwen2.5-32b", "h100", 4),
    ("llama-3-8b", "l40s", 2),
    ("mistral-7b", "h200", 1),
]


@pytest.mark.parametrize(("model", "gpu", "tp"), MODELS)
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 512), kv=st.integers(0, 2_000_000), k=st.integers(0, 300))
def test_vectorised_decode_equals_scalar(model, gpu, tp, n, kv, k):
    lm = RooflineModel(model, gpu, tp)
    kv = max(kv, n)  # each decode has at least its own token of context
    times = lm.decode_iteration_times(n, kv, k)
    assert len(times) == k and all(type(t) is float for t in times)
    expected = np.array([lm.iteration_time(decode(n, kv + i * n)) for i in range(k)])
    np.testing.assert_allclose(times, expected, rtol=1e-9, atol=0)


shapes = batch_shapes()


@pytest.mark.parametrize(("model", "gpu", "tp"), MODELS)
@settings(max_examples=80, deadline=None)
@given(
    shape=shapes,
    field=shape_fields(),
    extra=st.integers(1, 100_000),
)
def test_more_work_is_never_faster(model, gpu, tp, shape, field, extra):
    lm = RooflineModel(model, gpu, tp)
    bigger = dataclasses.replace(shape, **{field: getattr(shape, field) + extra})
    assert lm.iteration_time(bigger) >= lm.iteration_time(shape)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 256), kv=st.integers(1, 1_000_000), k=st.integers(2, 200))
def test_decode_times_non_decreasing_as_context_grows(n, kv, k):
    times = RooflineModel("llama-3-70b", "h100", 4).decode_iteration_times(n, max(kv, n), k)
    assert np.all(np.diff(times) >= 0)


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 8192), extra=st.integers(1, 8192), p=st.integers(0, 30_000))
def test_longer_chunks_and_longer_prefixes_cost_more(c, extra, p):
    lm = RooflineModel("llama-3-8b", "a100")
    assert lm.iteration_time(prefill(c + extra, p)) >= lm.iteration_time(prefill(c, p))
    assert lm.iteration_time(prefill(c, p + extra)) >= lm.iteration_time(prefill(c, p))


@settings(max_examples=40, deadline=None)
@given(shape=batch_shapes(), n=st.integers(1, 256), kv=st.integers(256, 100_000))
def test_sequence_overhead_costs_each_sequence_once(shape, n, kv):
    """A host-side cost per sequence (a CPU engine's sampling and input preparation): exactly
    that much per sequence in every path: one step, a span of decode steps, the breakdown."""
    base = Efficiency()
    lm0 = RooflineModel("llama-3-8b", "a100", 1, base)
    lm = RooflineModel("llama-3-8b", "a100", 1, dataclasses.replace(base, sequence_overhead_s=2e-3))
    if shape.num_tokens:
        extra = lm.iteration_time(shape) - lm0.iteration_time(shape)
        assert extra == pytest.approx(2e-3 * shape.num_seqs, rel=1e-9)
        assert sum(lm.breakdown(shape).values()) == pytest.approx(lm.iteration_time(shape))
        assert lm.breakdown(shape)["sequence_overhead"] == pytest.approx(2e-3 * shape.num_seqs)
    spans = np.subtract(lm.decode_iteration_times(n, kv, 3), lm0.decode_iteration_times(n, kv, 3))
    np.testing.assert_allclose(spans, 2e-3 * n, rtol=1e-9)
