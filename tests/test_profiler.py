"""The operator profiler (llmsched.hardware.profiler), on the CPU with the tiny shapes.

Tests that need PyTorch skip without it (it is the optional `profile` extra)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmsched.data import data_dir
from llmsched.hardware import profiler
from llmsched.hardware.profiler import (
    ATTENTION_COLUMNS,
    LAYER_COLUMNS,
    MLP_COLUMNS,
    TOKEN_OPS,
    profile_model,
    profile_shapes,
    replay_batches,
)
from llmsched.hardware.profiler.attention import (
    ATTENTION_BACKENDS,
    attention_reference,
    attention_sdpa,
)
from llmsched.hardware.profiler.batch import check_batch, pack_batch
from llmsched.hardware.profiler.layer import DecoderLayer, Embedding
from llmsched.hardware.profiler.timer import Timer

VIDUR_MLP = "profiles/vidur/compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv"
VIDUR_ATTENTION = "profiles/vidur/compute/a100/meta-llama/Llama-2-70b-hf/attention_tp2_2024-05.csv"
# Vidur's mlp.csv header (Llama-2-7b-hf), for when the shared data is not here.
VIDUR_MLP_HEADER = [
    f"time_stats.{op}.{s}"
    for op in (
        "emb",
        "input_layernorm",
        "attn_pre_proj",
        "attn_rope",
        "attn_post_proj",
        "post_attention_layernorm",
        "mlp_up_proj",
        "mlp_act",
        "mlp_down_proj",
        "add",
    )
    for s in ("min", "max", "mean", "median", "std")
] + [
    "n_head",
    "n_kv_head",
    "n_embd",
    "n_expanded_embd",
    "vocab_size",
    "use_gated_mlp",
    "num_tokens",
    "num_tensor_parallel_workers",
]
VIDUR_ATTENTION_KEY_COLUMNS = [
    *(f"time_stats.attn_{k}.{s}" for k in ("prefill", "decode") for s in profiler.STATS),
    "n_embd",
    "n_q_head",
    "n_kv_head",
    "block_size",
    "num_tensor_parallel_workers",
    "batch_size",
    "prefill_chunk_size",
    "kv_cache_size",
    "is_prefill",
]
GEMMS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")


def _vidur_header(relative: str) -> list[str] | None:
    root = data_dir()
    if root is None or not (root / relative).exists():
        return None
    with (root / relative).open(newline="") as f:
        return next(csv.reader(f))


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("profile")
    messages: list[str] = []
    paths = profile_model("llama-3-8b", out_dir=out, device="cpu", progress=messages.append)
    return paths, messages


# ----------------------------------------------------------------------------- without torch


def test_import_and_clear_error_without_torch(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from llmsched.hardware import profiler\n"
        "try:\n"
        f"    profiler.profile_model('llama-3-8b', out_dir={str(tmp_path)!r})\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ERR" in done.stdout and "pip install 'llmsched[profile]'" in done.stdout


def test_unknown_model_and_bad_tp_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        profile_model("no-such-model", out_dir=tmp_path)
    with pytest.raises(ValueError, match="tp=3"):
        profile_shapes("llama-2-7b", tp=3)
    with pytest.raises(ValueError, match="tp=3"):
        profile_shapes("llama-2-7b", tp=3, tiny=True)


def test_shapes_per_rank():
    s = profile_shapes("llama-2-70b", tp=2)
    assert (s.q_heads, s.kv_heads, s.head_dim) == (32, 4, 128)
    assert s.qkv_out == (32 + 2 * 4) * 128
    assert s.up_out == 2 * 28672 // 2 and s.mlp_width == 14336
    # KV heads are replicated beyond their count, as vLLM does
    assert profile_shapes("llama-2-70b", tp=16).kv_heads == 1
    tiny = profile_shapes("llama-2-7b", tiny=True)  # MHA stays MHA in the stand-in
    assert tiny.tiny and tiny.num_heads == tiny.num_kv_heads == 4 and tiny.hidden_size == 64


# ----------------------------------------------------------------------------- profile_model


def test_files_and_columns(profiled):
    paths, messages = profiled
    assert set(paths) == {"mlp", "attention", "layer", "meta"}
    assert all(p.exists() for p in paths.values())
    for name, columns in (
        ("mlp", MLP_COLUMNS),
        ("attention", ATTENTION_COLUMNS),
        ("layer", LAYER_COLUMNS),
    ):
        header, rows = _read(paths[name])
        assert header == list(columns), name
        assert rows, name
    meta = json.loads(paths["meta"].read_text())
    for key in ("device", "torch_version", "dtype", "tiny", "date", "model", "shapes", "tp"):
        assert key in meta
    assert meta["tiny"] is True and meta["dtype"] == "float32" and meta["model"] == "llama-3-8b"
    assert meta["shapes"]["hidden_size"] == 64
    assert any(m.startswith("[mlp]") for m in messages) and messages[-1].startswith("done")


def test_mlp_csv_has_vidurs_columns_and_parses_like_it(profiled):
    paths, _ = profiled
    vidur = _vidur_header(VIDUR_MLP) or VIDUR_MLP_HEADER
    header, rows = _read(paths["mlp"])
    assert header == vidur
    for row in rows:  # what a reader of Vidur's file does with each column
        for col in vidur:
            if col == "use_gated_mlp":
                assert row[col] in ("True", "False")
            else:
                float(row[col])
    # the shapes recorded are the ones used (the tiny stand-in)
    assert {(r["n_embd"], r["n_head"], r["n_kv_head"]) for r in rows} == {("64", "4", "2")}


def test_attention_csv_has_vidurs_columns(profiled):
    paths, _ = profiled
    header, rows = _read(paths["attention"])
    assert set(VIDUR_ATTENTION_KEY_COLUMNS) <= set(header)
    vidur = _vidur_header(VIDUR_ATTENTION)
    if vidur is not None:
        assert set(header) <= set(vidur)
    prefill = [r for r in rows if r["is_prefill"] == "True"]
    decode = [r for r in rows if r["is_prefill"] == "False"]
    assert prefill and decode
    assert all(r["time_stats.attn_decode.median"] == "" for r in prefill)
    assert all(r["time_stats.attn_prefill.median"] == "" for r in decode)
    assert all(r["prefill_chunk_size"] == "0" for r in decode)


def test_times_are_positive(profiled):
    paths, _ = profiled
    for name in ("mlp", "attention", "layer"):
        header, rows = _read(paths[name])
        for row in rows:
            for col in header:
                if col.startswith("time_stats.") and row[col] != "" and not col.endswith(".std"):
                    assert float(row[col]) > 0, (name, col)


# What each timing measures, checked on the calls the timer is handed (not on the times: wall
# times on a shared CPU are noise). Vidur's operators and the layer's methods that compute them.
LAYER_METHODS = {
    "emb": "embed",
    "input_layernorm": "norm",
    "attn_pre_proj": "qkv",
    "attn_rope": "rope",
    "attn_post_proj": "o_proj",
    "post_attention_layernorm": "norm",
    "mlp_up_proj": "up",
    "mlp_act": "act",
    "mlp_down_proj": "down",
    "add": None,  # x + h, no method
}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """`profile_model` with a timer that runs each measured call once and records, instead of
    its time, the shape of its result and the layer methods it called (with their token rows)."""
    pytest.importorskip("torch")
    calls: dict[str, dict] = {}
    timing: list[str] = []

    def shape(value):
        if isinstance(value, tuple):
            return tuple(shape(v) for v in value)
        return tuple(value.shape)

    def record(timer, name, fn):
        calls[name] = {"methods": []}
        timing.append(name)
        try:
            calls[name]["result"] = shape(fn())
        finally:
            timing.pop()
        return [1.0] * timer.repeats

    def spy(method, original):
        def call(*args, **kwargs):
            if timing:
                calls[timing[-1]]["methods"].append((method, len(args[1])))
            return original(*args, **kwargs)

        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Timer, "__call__", record)
        for cls, method in [(Embedding, "embed")] + [
            (DecoderLayer, m) for m in ("norm", "qkv", "rope", "o_proj", "up", "act", "down")
        ]:
            mp.setattr(cls, method, spy(method, getattr(cls, method)))
        mp.setitem(ATTENTION_BACKENDS, "sdpa", spy("attention", ATTENTION_BACKENDS["sdpa"]))
        paths = profile_model(
            "llama-3-8b", out_dir=tmp_path_factory.mktemp("recorded"), device="cpu"
        )
    return paths, calls


def test_each_mlp_row_times_its_operator_on_its_tokens(recorded):
    paths, calls = recorded
    _, rows = _read(paths["mlp"])
    counts = [int(r["num_tokens"]) for r in rows]
    assert len(counts) > 1 and counts == sorted(set(counts))
    sh = profile_shapes("llama-3-8b", tiny=True)
    gemm_out = {
        "attn_pre_proj": sh.qkv_out,
        "attn_post_proj": sh.hidden_size,
        "mlp_up_proj": sh.up_out,
        "mlp_down_proj": sh.hidden_size,
    }
    for n in counts:
        for op in TOKEN_OPS:
            call = calls[f"{op}[{n}]"]
            method = LAYER_METHODS[op]
            assert call["methods"] == ([(method, n)] if method else []), (op, n)
            if op in gemm_out:  # n token rows by the per-rank weights: more tokens, more work
                assert call["result"] == (n, gemm_out[op]), (op, n)


def test_each_layer_row_times_every_operator_of_the_layer(recorded):
    paths, calls = recorded
    _, rows = _read(paths["layer"])
    assert rows
    layer_methods = [m for op, m in LAYER_METHODS.items() if op != "emb" and m] + ["attention"]
    for row in rows:
        c, p, b, d = (
            int(row[k])
            for k in ("num_prefill_tokens", "prefill_kv_len", "num_decodes", "decode_kv_len")
        )
        n = int(row["num_tokens"])
        assert n == c + b
        call = calls[f"layer[{c},{p},{b},{d}]"]
        assert sorted(call["methods"]) == sorted((m, n) for m in layer_methods), row
        assert call["result"] == (n, profile_shapes("llama-3-8b", tiny=True).hidden_size)


def test_tp2_records_the_full_shapes_and_the_degree(tmp_path):
    pytest.importorskip("torch")
    paths = profile_model(
        "llama-3-70b", tp=2, out_dir=tmp_path, token_counts=[1, 8], parts=["mlp"], device="cpu"
    )
    assert set(paths) == {"mlp", "meta"}
    _, rows = _read(paths["mlp"])
    assert [r["num_tokens"] for r in rows] == ["1", "8"]
    assert {r["num_tensor_parallel_workers"] for r in rows} == {"2"}
    assert {r["n_head"] for r in rows} == {"4"}  # tiny stand-in's full count, not per rank
    meta = json.loads(paths["meta"].read_text())
    assert meta["per_rank"]["q_heads"] == 2 and "all-reduce" in meta["tp_note"]


def test_cli(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "p"
    args = ["--model", "llama-2-7b", "--out", str(out), "--tokens", "1,4", "--parts", "mlp"]
    assert profiler.main(args) == 0
    printed = capsys.readouterr().out
    assert "[mlp] 2/2" in printed and (out / "mlp.csv").exists()
    assert profiler.main(["--model", "nope", "--out", str(out)]) == 2
    assert "unknown model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- attention, replay


def test_attention_matches_the_reference_on_a_mixed_batch():
    torch = pytest.importorskip("torch")
    device = torch.device("cpu")
    # chunks with and without a cached prefix, decodes of several lengths, GQA 4:2
    plan = pack_batch(torch, device, [(6, 10), (3, 0)], [5, 0, 5, 9])
    assert plan.num_tokens == 6 + 3 + 4
    assert plan.kv_tokens == 16 + 3 + (6 + 1 + 6 + 10)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(plan.num_tokens, 4, 8, generator=gen)
    k = torch.randn(plan.kv_tokens, 2, 8, generator=gen)
    v = torch.randn(plan.kv_tokens, 2, 8, generator=gen)
    ref = attention_reference(torch, q, k, v, plan)
    out = attention_sdpa(torch, q, k, v, plan)
    assert torch.allclose(out, ref, atol=1e-5)
    # the last query of the cached-prefix chunk sees every key of its sequence (lower-right)
    seq0 = ref[5].view(4, 8)
    keys = k[:16].repeat_interleave(2, dim=1)
    vals = v[:16].repeat_interleave(2, dim=1)
    weights = torch.einsum("hd,khd->hk", q[5], keys).mul(8**-0.5).softmax(-1)
    assert torch.allclose(seq0, torch.einsum("hk,khd->hd", weights, vals), atol=1e-5)


def test_bad_batch_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="empty batch"):
        check_batch([], [])
    with pytest.raises(ValueError, match="length ≥ 1"):
        check_batch([(0, 4)], [])
    with pytest.raises(ValueError, match="decode KV"):
        check_batch([], [-1])


def test_replay_batches():
    pytest.importorskip("torch")
    shapes = [([(32, 0)], []), ([], [16] * 4), ([(16, 48)], [8, 24, 24]), ([(64, 0)], [64] * 8)]
    times = replay_batches("llama-3-8b", shapes, device="cpu", repeats=3, warmup=1)
    assert len(times) == len(shapes)
    assert all(t > 0 for t in times)
    assert all(t < 1.0 for t in times)  # seconds, tiny model
    with pytest.raises(ValueError, match="not a \\(prefills, decodes\\) pair"):
        replay_batches("llama-3-8b", [[(1, 0)]], device="cpu")
    assert replay_batches("llama-3-8b", [], device="cpu") == []
