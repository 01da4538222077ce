"""Fidelity of a calibration on *held-out* profiles: predicted against measured time per row.

Per operator (each GEMM through `RooflineModel.breakdown` of a one-layer model built from the
CSV's own shape columns; each element-wise kernel through its fitted efficiency), for a whole
decoder layer (the sum of the layer's operators against `RooflineModel`'s GEMM and element-wise
terms), for attention, whose only profile is one model (there the rows are split by KV length),
and for the all-reduce (split by TP degree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmsched.hardware.calibration.fitting import (
    ALLREDUCE_TRAIN_TP,
    ATTENTION_SPLIT_KV,
    DEFAULT_HELDOUT,
    MAX_TOKENS,
    Calibration,
    as_calibration,
)
from llmsched.hardware.calibration.profiles import (
    ELEMENTWISE_KINDS,
    ELEMENTWISE_OPS,
    GEMM_OPS,
    LAYER_OPS,
    ProfileSet,
)
from llmsched.hardware.calibration.rows import (
    OperatorParams,
    OperatorRows,
    predict_allreduce,
    predict_operators,
)
from llmsched.hardware.latency import BatchShape
from llmsched.hardware.roofline import Efficiency, RooflineModel
from llmsched.hardware.specs import GPUSpec, get_gpu

ROW_CHOICES = ("heldout", "train", "all", "none")  # rows of the tables split by row, not model


@dataclass(frozen=True)
class OperatorFit:
    """Predicted against measured seconds for the rows of one operator (or layer, attention)."""

    op: str
    model: np.ndarray
    # num_tokens; for attention the chunk (prefill) or batch size (decode); for the all-reduce
    # the message bytes
    tokens: np.ndarray
    tp: np.ndarray
    measured: np.ndarray
    predicted: np.ndarray
    kv: np.ndarray | None = None  # attention: KV already cached / context per sequence

    @property
    def ape(self) -> np.ndarray:
        """Absolute relative error per row."""
        return np.abs(self.predicted / self.measured - 1)

    def median_ape(self, mask: np.ndarray | None = None) -> float:
        a = self.ape if mask is None else self.ape[mask]
        return float(np.median(a)) if len(a) else math.nan

    def mape(self) -> float:
        return float(np.mean(self.ape)) if len(self.measured) else math.nan

    def p90_ape(self) -> float:
        return float(np.quantile(self.ape, 0.9)) if len(self.measured) else math.nan

    def bias(self) -> float:
        """Median signed relative error (+: the model is slow)."""
        return float(np.median(self.predicted / self.measured - 1)) if len(self.measured) else 0.0


@dataclass(frozen=True)
class FidelityReport:
    """Errors of a calibration on some models' profiles: per operator, per layer, attention."""

    gpu: str
    models: tuple[str, ...]
    operators: dict[str, OperatorFit]  # Vidur operator → fit
    layer: OperatorFit | None  # the sum of a layer's operators against RooflineModel's terms
    elementwise: OperatorFit | None  # the layer's element-wise kernels against the roofline's term
    attention: dict[str, OperatorFit]  # attn_prefill / attn_decode
    attention_rows: str = "heldout"
    efficiency: Efficiency | None = None
    allreduce: OperatorFit | None = None  # all-reduce rows of the network profile
    allreduce_rows: str = "heldout"

    def overall(self) -> float:
        """Median absolute relative error over every operator row."""
        if not self.operators:
            return math.nan
        return float(np.median(np.concatenate([f.ape for f in self.operators.values()])))

    def as_dict(self) -> dict[str, Any]:
        """Summary numbers (no rows): for JSON and for provenance."""

        def summary(f: OperatorFit) -> dict[str, Any]:
            return {
                "rows": len(f.measured),
                "median_ape": round(f.median_ape(), 5),
                "mape": round(f.mape(), 5),
                "p90_ape": round(f.p90_ape(), 5),
                "bias": round(f.bias(), 5),
                "per_model_median_ape": {
                    m: round(f.median_ape(f.model == m), 5) for m in dict.fromkeys(f.model)
                },
            }

        out: dict[str, Any] = {
            "models": list(self.models),
            "operators": {op: summary(f) for op, f in self.operators.items()},
            "overall_median_ape": round(self.overall(), 5),
        }
        if self.layer is not None:
            out["layer"] = summary(self.layer)
        if self.elementwise is not None:
            out["elementwise_sum"] = summary(self.elementwise)
        if self.attention:
            out["attention_rows"] = self.attention_rows
            out["attention"] = {op: summary(f) for op, f in self.attention.items()}
        if self.allreduce is not None:
            out["allreduce_rows"] = self.allreduce_rows
            out["allreduce"] = summary(self.allreduce)
        return out


def evaluate(
    calibration: Calibration | Efficiency,
    profiles: ProfileSet,
    models: Sequence[str] = DEFAULT_HELDOUT,
    *,
    attention: str = "heldout",
    attention_split_kv: int | None = None,
    max_tokens: int | None = MAX_TOKENS,
    allreduce: str = "heldout",
    network: str | None = None,
) -> FidelityReport:
    """Predicted against measured times on ``models``' profiles.

    GEMM operators go through `RooflineModel.breakdown` of a one-layer model with the profile's
    shapes; element-wise operators through the calibration's per-kind efficiencies (a bare
    `Efficiency` uses its ``elementwise_memory`` for all); the layer compares the sum of the
    measured operators with the roofline's GEMM and element-wise terms. ``attention`` picks the
    attention rows: ``"heldout"`` (``kv_cache_size`` ≥ the split), ``"train"``, ``"all"`` or
    ``"none"``; ``allreduce`` the same for the rows of the ``network`` all-reduce profile
    (held out: the TP degrees the calibration was not fitted on)."""
    for arg, value in (("attention", attention), ("allreduce", allreduce)):
        if value not in ROW_CHOICES:
            raise ValueError(f"{arg} must be heldout, train, all or none, got {value!r}")
    cal = as_calibration(calibration, profiles.gpu)
    eff = cal.efficiency
    gpu = get_gpu(profiles.gpu)
    names = profiles.resolve(models)
    profs = [profiles.operators[n] for n in names]
    rows = OperatorRows(profs, max_tokens)
    p = OperatorParams(
        eff.gemm_compute,
        eff.gemm_memory,
        eff.gemm_overhead_s,
        eff.elementwise_overhead_s,
        *(cal.elementwise[k] for k in ELEMENTWISE_KINDS),
        min_tokens=float(eff.elementwise_min_tokens),
        tile=eff.gemm_token_tile,
    )
    predicted = predict_operators(rows, p, gpu)

    # The GEMMs and the layer through RooflineModel itself, one (model, tp) at a time.
    layer_parts: dict[str, list[np.ndarray]] = {}
    elem_parts: dict[str, list[np.ndarray]] = {}
    gemm_pred: dict[str, dict[tuple[str, int], dict[int, float]]] = {op: {} for op in GEMM_OPS}
    for prof in profs:
        ops = [o for o in LAYER_OPS if o in prof.times]
        total = sum(prof.times[o] for o in ops)
        elem_total = sum(prof.times[o] for o in ops if o in ELEMENTWISE_OPS)
        for tp in np.unique(prof.tp):
            lm = RooflineModel(prof.spec(1), gpu, int(tp), eff)
            sel = prof.tp == tp
            if max_tokens is not None:
                sel &= prof.num_tokens <= max_tokens
            sel &= np.isfinite(total)
            pred_layer, pred_elem = [], []
            for t in prof.num_tokens[sel]:
                terms = lm.breakdown(BatchShape(num_decodes=int(t)))
                for op, term in GEMM_OPS.items():
                    gemm_pred[op].setdefault((prof.name, int(tp)), {})[int(t)] = terms[term]
                pred_layer.append(sum(terms[t_] for t_ in GEMM_OPS.values()) + terms["elementwise"])
                pred_elem.append(terms["elementwise"])
            common = (
                ("model", np.full(sel.sum(), prof.name, dtype=object)),
                ("tokens", prof.num_tokens[sel].astype(float)),
                ("tp", prof.tp[sel].astype(float)),
            )
            for parts, measured, pred in (
                (layer_parts, total, pred_layer),
                (elem_parts, elem_total, pred_elem),
            ):
                for k, v in (*common, ("measured", measured[sel]), ("predicted", np.array(pred))):
                    parts.setdefault(k, []).append(v)
    for op in GEMM_OPS:
        if op in rows.ops:
            c = rows.ops[op]
            table = gemm_pred[op]
            predicted[op] = np.array(
                [table[(m, int(tp))][int(t)] for m, tp, t in zip(c["model"], c["tp"], c["tokens"])]
            )
    operators = {
        op: OperatorFit(
            op=op,
            model=rows.ops[op]["model"],
            tokens=rows.ops[op]["tokens"],
            tp=rows.ops[op]["tp"],
            measured=rows.ops[op]["measured"],
            predicted=predicted[op],
        )
        for op in LAYER_OPS
        if op in rows.ops
    }
    layer = elementwise = None
    if layer_parts:
        layer = OperatorFit(op="layer", **{k: np.concatenate(v) for k, v in layer_parts.items()})
        elementwise = OperatorFit(
            op="elementwise (sum)", **{k: np.concatenate(v) for k, v in elem_parts.items()}
        )

    attn_fits: dict[str, OperatorFit] = {}
    if attention != "none" and profiles.attention:
        split = attention_split_kv
        if split is None:
            split = int(cal.provenance.get("attention_split_kv", ATTENTION_SPLIT_KV))
        attn_fits = _evaluate_attention(profiles, eff, gpu, attention, split)
    ar_fit = None
    if allreduce != "none" and profiles.allreduce:
        ar_fit = _evaluate_allreduce(profiles, cal, gpu, allreduce, network)
    return FidelityReport(
        gpu=profiles.gpu,
        models=tuple(names),
        operators=operators,
        layer=layer,
        elementwise=elementwise,
        attention=attn_fits,
        attention_rows=attention,
        efficiency=eff,
        allreduce=ar_fit,
        allreduce_rows=allreduce,
    )


def _evaluate_allreduce(
    profiles: ProfileSet, cal: Calibration, gpu: GPUSpec, which: str, network: str | None
) -> OperatorFit | None:
    prof = profiles.network(network or cal.provenance.get("allreduce_profile"))
    if prof is None:
        return None
    train = np.isin(prof.tp, cal.provenance.get("allreduce_train_tp", ALLREDUCE_TRAIN_TP))
    sel = {"heldout": ~train, "train": train}.get(which, np.ones(len(prof), bool))
    if not sel.any():
        return None
    eff = cal.efficiency
    return OperatorFit(
        op="all_reduce",
        model=np.full(sel.sum(), prof.name, dtype=object),
        tokens=prof.size[sel],
        tp=prof.tp[sel].astype(float),
        measured=prof.time[sel],
        predicted=predict_allreduce(prof, sel, eff.link, eff.allreduce_latency_s, gpu),
    )


def _evaluate_attention(
    profiles: ProfileSet, eff: Efficiency, gpu: GPUSpec, which: str, split: int
) -> dict[str, OperatorFit]:
    parts: dict[str, dict[str, list[np.ndarray]]] = {}
    for prof in profiles.attention.values():
        if which == "heldout":
            sel = prof.kv >= split
        elif which == "train":
            sel = prof.kv < split
        else:
            sel = np.ones(len(prof), bool)
        models = {
            int(tp): RooflineModel(prof.spec(), gpu, int(tp), eff) for tp in np.unique(prof.tp)
        }
        for op, want in (("attn_prefill", True), ("attn_decode", False)):
            s = sel & (prof.is_prefill == want)
            pred = []
            for tp, c, kv, b in zip(prof.tp[s], prof.chunk[s], prof.kv[s], prof.batch[s]):
                c, kv, b = int(c), int(kv), int(b)
                if want:
                    shape = BatchShape(
                        prefill_tokens=c,
                        prefill_attn_pairs=c * (kv + (c + 1) / 2),
                        prefill_kv_tokens=kv + c,
                        num_prefills=1,
                    )
                else:
                    shape = BatchShape(num_decodes=b, decode_kv_tokens=b * kv)
                pred.append(models[int(tp)].breakdown(shape)[op])
            d = parts.setdefault(op, {})
            for k, v in (
                ("model", np.full(s.sum(), prof.name, dtype=object)),
                ("tokens", np.where(want, prof.chunk[s], prof.batch[s]).astype(float)),
                ("tp", prof.tp[s].astype(float)),
                ("measured", prof.time[s]),
                ("predicted", np.array(pred, dtype=float)),
                ("kv", prof.kv[s].astype(float)),
            ):
                d.setdefault(k, []).append(v)
    return {
        op: OperatorFit(op=op, **{k: np.concatenate(v) for k, v in d.items()})
        for op, d in parts.items()
        if sum(len(v) for v in d["measured"])
    }
