"""Calibration of the roofline on operator profiles: reader, fit, stored coefficients, plot."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsched.data import data_dir
from llmsched.hardware import calibration as cal
from llmsched.hardware.calibration.fitting import _weighted_huber
from llmsched.hardware.calibration.rows import OperatorParams, OperatorRows, predict_operators
from llmsched.hardware.latency import BatchShape
from llmsched.hardware.roofline import Efficiency, RooflineModel, allreduce_cost
from llmsched.hardware.specs import get_gpu, get_model

from .helpers import batch_shapes, shape_fields

STATS = ("min", "max", "mean", "median", "std")
MLP_OPS = ("emb", *cal.LAYER_OPS)

# Known coefficients for the synthetic profiles.
TRUE = Efficiency(
    gemm_compute=0.62,
    gemm_memory=0.81,
    gemm_overhead_s=4e-6,
    gemm_token_tile=128,
    elementwise_overhead_s=2e-6,
    elementwise_min_tokens=96,
    attn_compute=0.45,
    attn_diag_compute=0.2,
    attn_memory=0.75,
    attn_overhead_s=10e-6,
    attn_query_keys=500.0,
    link=0.6,
    allreduce_latency_s=20e-6,
)
TRUE_KINDS = {"norm": 0.4, "rope": 0.5, "act": 0.6, "add": 0.9}
SHAPES = {  # name: (n_head, n_kv_head, n_embd, n_expanded_embd, vocab)
    "gqa-4k": (32, 8, 4096, 14336, 32000),
    "mha-5k": (40, 40, 5120, 13824, 32000),
}
TOKENS = sorted({1, 2, 4, 8, 16, 32, 64, *range(8, 4097, 56), 4096})
TPS = (1, 2, 4, 8)


def _stat_cells(op: str, ms: float | None) -> dict[str, object]:
    if ms is None:
        return {f"time_stats.{op}.{s}": "" for s in STATS}
    return {f"time_stats.{op}.{s}": (0.0 if s == "std" else ms) for s in STATS}


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _synthetic_times(name: str) -> list[dict[str, object]]:
    """mlp.csv rows in Vidur's schema: GEMMs from RooflineModel.breakdown with TRUE, element-wise
    kernels from the calibration's per-kind model."""
    n_head, n_kv, h, ffn, vocab = SHAPES[name]
    gpu = get_gpu("a100-80gb")
    tokens = np.array([t for _ in TPS for t in TOKENS])
    tps = np.array([tp for tp in TPS for _ in TOKENS])
    prof = cal.OperatorProfile(
        name, Path(name), n_head, n_kv, h, ffn, vocab, True, tokens, tps,
        times={op: np.ones(len(tokens)) for op in cal.LAYER_OPS},
    )  # fmt: skip
    rows_model = OperatorRows([prof], None)
    p = OperatorParams(
        TRUE.gemm_compute,
        TRUE.gemm_memory,
        TRUE.gemm_overhead_s,
        TRUE.elementwise_overhead_s,
        *(TRUE_KINDS[k] for k in cal.ELEMENTWISE_KINDS),
        min_tokens=TRUE.elementwise_min_tokens,
        tile=TRUE.gemm_token_tile,
    )
    elem = predict_operators(rows_model, p, gpu)
    rows = []
    for i, (t, tp) in enumerate(zip(tokens, tps)):
        lm = RooflineModel(prof.spec(), gpu, int(tp), TRUE)
        terms = lm.breakdown(BatchShape(num_decodes=int(t)))
        row: dict[str, object] = {}
        for op in MLP_OPS:
            if op in cal.GEMM_OPS:
                ms = terms[cal.GEMM_OPS[op]] * 1e3
            elif op in cal.ELEMENTWISE_OPS:
                ms = elem[op][i] * 1e3
            else:
                ms = 0.01  # emb: not modelled
            row.update(_stat_cells(op, ms))
        row.update(
            n_head=n_head,
            n_kv_head=n_kv,
            n_embd=h,
            n_expanded_embd=ffn,
            vocab_size=vocab,
            use_gated_mlp=True,
            num_tokens=int(t),
            num_tensor_parallel_workers=int(tp),
        )
        rows.append(row)
    return rows


def _synthetic_attention() -> list[dict[str, object]]:
    n_head, n_kv, h = 64, 8, 8192
    spec = cal.AttentionProfile(
        "a", Path("a"), h, n_head, n_kv, *(np.zeros(0, int) for _ in range(5)), np.zeros(0)
    ).spec()
    lm = RooflineModel(spec, "a100-80gb", 2, TRUE)
    rows = []
    common = dict(
        n_embd=h,
        n_q_head=n_head,
        n_kv_head=n_kv,
        block_size=16,
        num_tensor_parallel_workers=2,
        max_model_len=4096,
        attention_backend="AttentionBackend.FLASH_ATTENTION",
        profile_method="ProfileMethod.KINETO",
    )
    for c in (64, 128, 256, 512, 1024, 2048, 4096):
        for p in range(0, 4096 - c + 1, 256):
            shape = BatchShape(c, c * (p + (c + 1) / 2), p + c, 1)
            ms = lm.breakdown(shape)["attn_prefill"] * 1e3
            rows.append(
                {
                    **_stat_cells("attn_prefill", ms),
                    **_stat_cells("attn_decode", None),
                    **common,
                    "batch_size": 1,
                    "prefill_chunk_size": c,
                    "kv_cache_size": p,
                    "is_prefill": True,
                }
            )
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        for kv in range(32, 4097, 256):
            ms = lm.breakdown(BatchShape(num_decodes=b, decode_kv_tokens=b * kv))["attn_decode"]
            rows.append(
                {
                    **_stat_cells("attn_prefill", None),
                    **_stat_cells("attn_decode", ms * 1e3),
                    **common,
                    "batch_size": b,
                    "prefill_chunk_size": 0,
                    "kv_cache_size": kv,
                    "is_prefill": False,
                }
            )
    return rows


NETWORK_STATS = {f"time_stats.all_reduce.{s}": None for s in STATS}


def _allreduce_rows(sizes, ms_of) -> list[dict[str, object]]:
    """all_reduce.csv rows in Vidur's schema: in-node rows at TP 2, 4, 8 and cross-node rows
    (which the reader must drop), times from ``ms_of(tp, size)``."""
    rows = []
    for workers, per_node in ((2, 2), (4, 4), (8, 8), (2, 1), (16, 8)):
        for size in sizes:
            ms = ms_of(workers, size) * (1 if workers == per_node else 3)
            rows.append(
                {
                    **{k: (0.0 if k.endswith("std") else ms) for k in NETWORK_STATS},
                    "rank": 0, "num_workers": workers, "size": size, "collective": "all_reduce",
                    "devices_per_node": per_node, "max_devices_per_node": 8,
                }
            )  # fmt: skip
    return rows


def _true_allreduce_ms(tp: int, size: int) -> float:
    fixed, per_byte = allreduce_cost(tp, get_gpu("a100-80gb"), TRUE)
    return (fixed + per_byte * size) * 1e3


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """Vidur's folder layout with synthetic tables generated from known coefficients."""
    root = tmp_path_factory.mktemp("vidur")
    for name in SHAPES:
        _write_csv(root / "compute" / "a100" / "org" / name / "mlp.csv", _synthetic_times(name))
    _write_csv(
        root / "compute" / "a100" / "org" / "gqa-4k" / "attention_tp2.csv", _synthetic_attention()
    )
    sizes = [2048 * 4**i for i in range(11)]
    _write_csv(
        root / "network" / "a100_dgx" / "all_reduce.csv", _allreduce_rows(sizes, _true_allreduce_ms)
    )
    return root


@pytest.fixture(scope="module")
def synthetic(synthetic_root) -> cal.ProfileSet:
    return cal.load_vidur_profiles(synthetic_root)


@pytest.fixture(scope="module")
def synthetic_fit(synthetic) -> cal.Calibration:
    return cal.fit(synthetic, list(SHAPES))


# ----------------------------------------------------------------------------- reader


def test_reader_round_trip(tmp_path):
    rows = []
    for tp in (1, 2):
        for t, ms in ((1, 0.065), (4096, 1.911)):
            row: dict[str, object] = {}
            for op in MLP_OPS:
                row.update(_stat_cells(op, ms if op == "attn_pre_proj" else 0.005))
            row.update(
                n_head=32, n_kv_head=32, n_embd=4096, n_expanded_embd=11008, vocab_size=32768,
                use_gated_mlp=True, num_tokens=t, num_tensor_parallel_workers=tp,
            )  # fmt: skip
            rows.append(row)
    path = _write_csv(
        tmp_path / "compute" / "a100" / "meta-llama" / "Llama-2-7b-hf" / "mlp.csv", rows
    )
    profiles = cal.load_vidur_profiles(tmp_path)
    assert profiles.gpu == "a100-80gb" and list(profiles.operators) == ["Llama-2-7b-hf"]
    prof = profiles.operators["Llama-2-7b-hf"]
    assert prof.path == path and len(prof) == 4
    np.testing.assert_array_equal(prof.num_tokens, [1, 4096, 1, 4096])
    np.testing.assert_array_equal(prof.tp, [1, 1, 2, 2])
    np.testing.assert_allclose(prof.times["attn_pre_proj"], [65e-6, 1.911e-3] * 2)  # ms → s
    assert set(prof.times) == set(MLP_OPS)
    spec = prof.spec()
    assert (spec.hidden_size, spec.num_heads, spec.head_dim, spec.intermediate_size) == (
        4096, 32, 128, 11008,
    )  # fmt: skip
    assert spec.gated_mlp and not prof.parallel_residual
    assert profiles.resolve(["meta-llama/llama-2-7b-HF"]) == ["Llama-2-7b-hf"]
    with pytest.raises(ValueError, match="no operator profile for model 'llama-3'.*Llama-2-7b-hf"):
        profiles.resolve(["llama-3"])


def test_reader_errors_name_the_file(tmp_path):
    good = _synthetic_times("gqa-4k")[:3]
    bad = [{k: v for k, v in r.items() if k != "n_embd"} for r in good]
    path = _write_csv(tmp_path / "m" / "mlp.csv", bad)
    with pytest.raises(ValueError, match=r"mlp\.csv: missing column\(s\) n_embd"):
        cal.read_mlp_csv(path)
    mixed = [dict(r) for r in good]
    mixed[1]["n_embd"] = 8192
    path = _write_csv(tmp_path / "m2" / "mlp.csv", mixed)
    with pytest.raises(ValueError, match="n_embd.*same on every row"):
        cal.read_mlp_csv(path)
    broken = [dict(r) for r in good]
    broken[2]["time_stats.add.median"] = "fast"
    path = _write_csv(tmp_path / "m3" / "mlp.csv", broken)
    with pytest.raises(ValueError, match="line 4: column 'time_stats.add.median'"):
        cal.read_mlp_csv(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no mlp.csv"):
        cal.load_vidur_profiles(tmp_path / "empty")


def test_allreduce_reader_keeps_the_rows_within_one_node(tmp_path):
    rows = _allreduce_rows([2048, 1 << 20], lambda tp, size: 0.01 * tp + size / 1e8)
    path = _write_csv(tmp_path / "network" / "box" / "all_reduce.csv", rows)
    prof = cal.read_allreduce_csv(path)
    assert prof.name == "box" and len(prof) == 6  # TP 2, 4, 8 × 2 sizes; cross-node dropped
    np.testing.assert_array_equal(prof.tp, [2, 2, 4, 4, 8, 8])
    np.testing.assert_array_equal(prof.size, [2048, 1 << 20] * 3)
    np.testing.assert_allclose(prof.time, [(0.01 * tp + s / 1e8) * 1e-3 for tp in (2, 4, 8)
                                           for s in (2048, 1 << 20)])  # fmt: skip
    cross = _write_csv(tmp_path / "x" / "all_reduce.csv", [r for r in rows if r["rank"] == 0][-2:])
    with pytest.raises(ValueError, match=r"x/all_reduce\.csv: no all-reduce rows within one node"):
        cal.read_allreduce_csv(cross)
    broken = [{k: v for k, v in r.items() if k != "size"} for r in rows]
    with pytest.raises(ValueError, match=r"missing column\(s\) size"):
        cal.read_allreduce_csv(_write_csv(tmp_path / "y" / "all_reduce.csv", broken))


def test_network_profile_choice(synthetic):
    assert (
        synthetic.network().name == "a100_dgx" and synthetic.network("a100_dgx").name == "a100_dgx"
    )
    with pytest.raises(
        ValueError, match="no all-reduce profile 'dgx-h100'; profiled machines: a100_dgx"
    ):
        synthetic.network("dgx-h100")


def test_attention_reader(synthetic):
    (att,) = synthetic.attention.values()
    assert att.name == "gqa-4k"
    assert att.is_prefill.any() and (~att.is_prefill).any()
    assert np.all(att.batch[att.is_prefill] == 1) and np.all(att.chunk[~att.is_prefill] == 0)
    assert np.all(att.time > 0)


# ----------------------------------------------------------------------------- fit


def test_fit_recovers_known_coefficients(synthetic_fit):
    e = synthetic_fit.efficiency
    assert e.gemm_token_tile == TRUE.gemm_token_tile
    assert e.elementwise_min_tokens == pytest.approx(TRUE.elementwise_min_tokens, abs=1)
    for name in (
        "gemm_compute",
        "gemm_memory",
        "gemm_overhead_s",
        "elementwise_overhead_s",
        "attn_compute",
        "attn_diag_compute",
        "attn_memory",
        "attn_overhead_s",
        "attn_query_keys",
        "link",
        "allreduce_latency_s",
    ):
        assert getattr(e, name) == pytest.approx(getattr(TRUE, name), rel=0.01), name
    for kind, value in TRUE_KINDS.items():
        assert synthetic_fit.elementwise[kind] == pytest.approx(value, rel=0.01), kind
    # Not fitted: kept from the base (defaults).
    assert e.layer_overhead_s == Efficiency().layer_overhead_s
    assert e.iteration_overhead_s == Efficiency().iteration_overhead_s
    assert synthetic_fit.provenance["allreduce_train_tp"] == list(cal.ALLREDUCE_TRAIN_TP)


def test_without_a_network_profile_the_allreduce_keeps_its_defaults(synthetic):
    bare = dataclasses.replace(synthetic, allreduce={})
    e = cal.fit(bare, list(SHAPES)).efficiency
    assert (e.link, e.allreduce_latency_s) == (Efficiency().link, Efficiency().allreduce_latency_s)
    assert cal.evaluate(e, bare, ["gqa-4k"]).allreduce is None


def test_synthetic_fit_reproduces_operators_exactly(synthetic, synthetic_fit):
    report = cal.evaluate(synthetic_fit, synthetic, list(SHAPES), attention="all")
    for op, f in report.operators.items():
        assert f.median_ape() < 0.01, op
    assert report.layer.median_ape() < 0.03
    assert set(report.attention) == {"attn_prefill", "attn_decode"}
    for op, f in report.attention.items():
        assert f.median_ape() < 0.01, op
    # The all-reduce is held out by TP degree: TP 8 was not fitted on.
    held = cal.evaluate(synthetic_fit, synthetic, list(SHAPES), attention="none")
    assert set(np.unique(held.allreduce.tp)) == {8.0}
    assert held.allreduce.median_ape() < 0.01
    train = cal.evaluate(synthetic_fit, synthetic, list(SHAPES), allreduce="train")
    assert set(np.unique(train.allreduce.tp)) == {2.0, 4.0}
    with pytest.raises(ValueError, match="allreduce must be heldout, train, all or none"):
        cal.evaluate(synthetic_fit, synthetic, list(SHAPES), allreduce="some")


def test_wrong_model_form_shows_in_the_errors(synthetic, synthetic_fit):
    """Without tile quantisation the same data cannot be fitted: the errors say so."""
    untiled = cal.fit(synthetic, list(SHAPES), tile=1)
    bad = cal.evaluate(untiled, synthetic, list(SHAPES), attention="none")
    good = cal.evaluate(synthetic_fit, synthetic, list(SHAPES), attention="none")
    for op in cal.GEMM_OPS:
        assert bad.operators[op].median_ape() > max(0.01, 5 * good.operators[op].median_ape()), op


def test_row_weighted_huber_loss_and_its_derivatives():
    """The loss `fit` hands to scipy's least_squares: Huber's ρ(z) (z the squared scaled
    residual) with ρ' and ρ'', each times the row's weight."""
    z = np.array([0.0, 0.25, 1.0, 4.0, 9.0])
    w2 = np.array([1.0, 2.0, 1.0, 0.5, 3.0])
    rho, d1, d2 = _weighted_huber(w2)(z)
    np.testing.assert_allclose(rho, w2 * [0.0, 0.25, 1.0, 3.0, 5.0])
    np.testing.assert_allclose(d1, w2 * [1.0, 1.0, 1.0, 0.5, 1 / 3])
    np.testing.assert_allclose(d2, w2 * [0.0, 0.0, 0.0, -0.5 / 8, -0.5 / 27])


def test_bare_efficiency_evaluates_with_one_elementwise_efficiency(synthetic, synthetic_fit):
    report = cal.evaluate(synthetic_fit.efficiency, synthetic, ["gqa-4k"], attention="none")
    assert report.operators["attn_pre_proj"].median_ape() < 0.01  # GEMMs are the roofline's
    assert report.models == ("gqa-4k",)


# ----------------------------------------------------------------------------- storage


def test_save_and_read_round_trip(tmp_path, synthetic_fit):
    path = cal.save_calibration(synthetic_fit, tmp_path / "x.json", {"date": "2024-01-01"})
    back = cal.read_calibration(path)
    assert back.efficiency == synthetic_fit.efficiency
    assert back.elementwise == pytest.approx(synthetic_fit.elementwise)
    assert back.provenance["date"] == "2024-01-01"
    assert cal.load_calibration(path) == synthetic_fit.efficiency
    doc = json.loads(path.read_text())
    doc["efficiency"]["warp_speed"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown efficiency field.*warp_speed"):
        cal.read_calibration(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cal.read_calibration(tmp_path / "missing.json")


def test_stored_a100_calibration_loads():
    path = cal.calibration_path("a100")
    assert path.name == "a100.json"
    stored = cal.read_calibration(path)
    e = cal.load_calibration("a100-80gb")
    assert e == stored.efficiency
    assert e.gemm_token_tile > 1 and e.gemm_overhead_s > 0 and e.attn_diag_compute is not None
    prov = stored.provenance
    for key in ("data_source", "train_models", "heldout_models", "date", "fit_error", "method"):
        assert key in prov, key
    assert set(prov["train_models"]).isdisjoint(prov["heldout_models"])
    # Other GPUs use the A100's efficiencies (against their own peaks) until they have a file.
    assert cal.load_calibration("h100") == e
    lm = RooflineModel.calibrated("llama-2-7b", "a100")
    assert lm.efficiency == e and lm.tp == 1
    assert RooflineModel.calibrated("llama-2-7b", "a100", path=path).efficiency == e
    RooflineModel("llama-3-8b", "h100", 1, efficiency=e).iteration_time(BatchShape(num_decodes=1))


@pytest.mark.skipif(
    data_dir() is None or not (data_dir() / cal.VIDUR_DIR).is_dir(),
    reason="shared data (profiles/vidur) not found: set LLMSCHED_DATA to the data folder",
)
def test_stored_a100_calibration_on_held_out_vidur_models():
    profiles = cal.load_vidur_profiles()
    stored = cal.read_calibration(cal.calibration_path("a100"))
    report = cal.evaluate(stored, profiles, cal.DEFAULT_HELDOUT)
    assert report.models == cal.DEFAULT_HELDOUT
    # Issue target for a whole decoder layer: ≤ 8 % median on held-out models.
    assert report.layer.median_ape() <= cal.TARGET_LAYER
    # Per operator (issue target 5 %): met by mlp_up_proj and mlp_act; the other GEMMs reach
    # 5-6.5 %, norms and the residual add ~10-12 % (see docs/calibration.md).
    assert report.operators["mlp_up_proj"].median_ape() <= cal.TARGET_OPERATOR
    for op in cal.GEMM_OPS:
        assert report.operators[op].median_ape() <= 0.07, op
    assert report.overall() <= 0.08
    assert report.attention["attn_decode"].median_ape() <= 0.12
    assert report.attention["attn_prefill"].median_ape() <= 0.08
    # All-reduce: fitted at TP 2 and 4, held out at TP 8 (NCCL on a DGX A100).
    assert report.allreduce is not None and set(np.unique(report.allreduce.tp)) == {8.0}
    assert report.allreduce.median_ape() <= 0.2
    assert recorded_allreduce(stored) == pytest.approx(report.allreduce.median_ape(), abs=1e-4)
    # The stored errors are the ones this data gives (the file is reproducible).
    recorded = stored.provenance["fit_error"]["heldout"]
    assert recorded["layer"]["median_ape"] == pytest.approx(report.layer.median_ape(), abs=1e-4)
    assert recorded["overall_median_ape"] == pytest.approx(report.overall(), abs=1e-4)


# ----------------------------------------------------------------------------- report, plot, CLI


def test_format_report_and_plot(tmp_path, synthetic, synthetic_fit):
    pytest.importorskip("matplotlib")
    report = cal.evaluate(synthetic_fit, synthetic, list(SHAPES), attention="heldout")
    text = cal.format_report(report)
    assert "| attn_pre_proj |" in text and "decoder layer" in text and "attn_prefill" in text
    assert "All-reduce (heldout rows of a100_dgx)" in text and "| 8 | 11 |" in text
    assert "Targets:" in text
    summary = report.as_dict()
    assert summary["operators"]["mlp_up_proj"]["rows"] == len(TOKENS) * len(TPS) * len(SHAPES)
    png = tmp_path / "fidelity.png"
    cal.plot_fidelity(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_refits_and_writes(tmp_path, synthetic_root, capsys):
    out = tmp_path / "fitted.json"
    args = ["--data", str(synthetic_root), "--train", "gqa-4k", "--heldout", "mha-5k"]
    assert cal.main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Held-out models" in text and "wrote" in text
    stored = cal.read_calibration(out)
    assert stored.provenance["train_models"] == ["gqa-4k"]
    assert stored.provenance["heldout_models"] == ["mha-5k"]
    assert cal.main([*args[:4], "--heldout", "nope", "--no-write"]) == 2
    assert "no operator profile for model 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- roofline terms


def recorded_allreduce(stored: cal.Calibration) -> float:
    return stored.provenance["fit_error"]["heldout"]["allreduce"]["median_ape"]


def test_new_efficiency_fields_are_validated():
    for bad in (
        {"gemm_token_tile": 0},
        {"gemm_token_tile": 1.5},
        {"elementwise_min_tokens": -1},
        {"gemm_overhead_s": -1e-6},
        {"attn_diag_compute": 1.5},
        {"attn_query_keys": -1.0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Efficiency(**bad)


def test_kernel_terms_are_off_by_default():
    plain = RooflineModel("llama-2-7b", "a100")
    zeroed = RooflineModel(
        "llama-2-7b",
        "a100",
        efficiency=dataclasses.replace(Efficiency(), gemm_token_tile=1, elementwise_min_tokens=0),
    )
    shape = BatchShape(300, 300 * 600.5, 750, 1, 20, 20_000)
    assert plain.iteration_time(shape) == zeroed.iteration_time(shape)


def test_prefill_query_term_prices_keys_per_chunk_token():
    """attn_query_keys: each chunk token pays for that many extra keys at the prefix rate."""
    base = dataclasses.replace(Efficiency(), attn_overhead_s=5e-6)
    with_q = dataclasses.replace(base, attn_query_keys=800.0)
    c, p = 512, 3000
    shape = BatchShape(c, c * (p + (c + 1) / 2), p + c, 1)
    plain = RooflineModel("llama-2-7b", "a100", efficiency=base).breakdown(shape)
    more = RooflineModel("llama-2-7b", "a100", efficiency=with_q).breakdown(shape)
    m, g = get_model("llama-2-7b"), get_gpu("a100")
    per_key = m.num_layers * 4 * m.num_heads * m.head_dim / (g.bf16_flops * base.attn_compute)
    assert more["attn_prefill"] - plain["attn_prefill"] == pytest.approx(per_key * 800 * c)
    assert more["attn_decode"] == plain["attn_decode"]  # decodes are not charged
    # The same as a prefix 800 tokens longer (compute-bound here).
    longer = BatchShape(c, c * (p + 800 + (c + 1) / 2), p + c, 1)
    assert more["attn_prefill"] == pytest.approx(
        RooflineModel("llama-2-7b", "a100", efficiency=base).breakdown(longer)["attn_prefill"]
    )


def test_tile_quantisation_and_floors():
    e = dataclasses.replace(Efficiency(), gemm_token_tile=128, elementwise_min_tokens=100)
    lm = RooflineModel("llama-2-7b", "a100", efficiency=e)
    one = lm.breakdown(BatchShape(num_decodes=129))
    two = lm.breakdown(BatchShape(num_decodes=256))
    assert one["mlp_gate_up"] == pytest.approx(two["mlp_gate_up"], rel=0.01)  # both 2 tiles
    b1 = lm.breakdown(BatchShape(num_decodes=1))["elementwise"]
    assert b1 == lm.breakdown(BatchShape(num_decodes=100))["elementwise"]


CALIBRATED = cal.load_calibration("a100")
shapes = batch_shapes()


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    field=shape_fields(),
    extra=st.integers(1, 100_000),
)
def test_calibrated_roofline_more_work_is_never_faster(shape, field, extra):
    lm = RooflineModel("llama-2-70b", "a100", 2, efficiency=CALIBRATED)
    bigger = dataclasses.replace(shape, **{field: getattr(shape, field) + extra})
    assert lm.iteration_time(bigger) >= lm.iteration_time(shape)
    terms = lm.breakdown(shape)
    assert sum(terms.values()) == pytest.approx(lm.iteration_time(shape), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 512), kv=st.integers(0, 2_000_000), k=st.integers(0, 100))
def test_calibrated_vectorised_decode_equals_scalar(n, kv, k):
    lm = RooflineModel("llama-3-8b", "a100", 1, efficiency=CALIBRATED)
    kv = max(kv, n)
    times = lm.decode_iteration_times(n, kv, k)
    expected = [
        lm.iteration_time(BatchShape(num_decodes=n, decode_kv_tokens=kv + i * n)) for i in range(k)
    ]
    np.testing.assert_allclose(times, np.array(expected, dtype=float), rtol=1e-9, atol=0)
