"""The stored calibration: fitted coefficients and their provenance as JSON, one file per GPU
(family) under ``hardware/calibrated/``. The simulator reads these; it never fits."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmsched.hardware.calibration.fitting import Calibration, as_calibration
from llmsched.hardware.calibration.profiles import DEFAULT_GPU, ELEMENTWISE_KINDS
from llmsched.hardware.roofline import Efficiency
from llmsched.hardware.specs import GPUSpec, get_gpu

CALIBRATED_DIR = Path(__file__).resolve().parent.parent / "calibrated"
FORMAT_VERSION = 1


def save_calibration(
    calibration: Calibration | Efficiency,
    path: str | os.PathLike[str],
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the coefficients and their provenance (data source, models, date, errors) as JSON."""
    cal = as_calibration(calibration, DEFAULT_GPU)
    prov = {**cal.provenance, **(provenance or {})}
    doc = {
        "format": FORMAT_VERSION,
        "gpu": cal.gpu,
        **({"device": cal.device} if cal.device else {}),
        **({"serving": cal.serving} if cal.serving else {}),
        "efficiency": dataclasses.asdict(cal.efficiency),
        "elementwise_kernels": dict(cal.elementwise),
        "provenance": prov,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return path


def read_calibration(path: str | os.PathLike[str]) -> Calibration:
    """A calibration file written by `save_calibration` (the whole record)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "efficiency" not in doc:
        raise ValueError(f"{path}: not a calibration file (no 'efficiency' object)")
    known = {f.name for f in dataclasses.fields(Efficiency)}
    unknown = sorted(set(doc["efficiency"]) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown efficiency field(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(known))}"
        )
    try:
        eff = Efficiency(**doc["efficiency"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    elementwise = doc.get("elementwise_kernels") or {}
    elementwise = {k: float(elementwise.get(k, eff.elementwise_memory)) for k in ELEMENTWISE_KINDS}
    return Calibration(
        gpu=str(doc.get("gpu", DEFAULT_GPU)),
        efficiency=eff,
        elementwise=elementwise,
        provenance=dict(doc.get("provenance") or {}),
        device=doc.get("device"),
        serving={k: float(v) for k, v in (doc.get("serving") or {}).items()},
    )


def calibration_path(gpu: str | GPUSpec = DEFAULT_GPU) -> Path:
    """The stored calibration a GPU uses: ``calibrated/<name>.json``, else the file of its family
    (``a100.json`` for ``a100-40gb``, ``h100.json`` for ``h100-sxm-80gb``), else ``a100.json`` —
    the A100's efficiencies, applied to the other GPU's own peaks."""
    name = get_gpu(gpu).name
    for candidate in (name, name.split("-")[0], "a100"):
        path = CALIBRATED_DIR / f"{candidate}.json"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no calibration in {CALIBRATED_DIR} (expected a100.json): run "
        "python -m llmsched.hardware.calibration"
    )


def load_calibration(gpu: str | GPUSpec | os.PathLike[str] = DEFAULT_GPU) -> Efficiency:
    """The calibrated `Efficiency` for a GPU name (see `calibration_path`) or a JSON file path.

    Pass it to `RooflineModel(model, gpu, tp, efficiency=load_calibration(gpu))`."""
    if isinstance(gpu, os.PathLike) or (
        isinstance(gpu, str) and (gpu.endswith(".json") or Path(gpu).is_file())
    ):
        return read_calibration(gpu).efficiency
    return read_calibration(calibration_path(gpu)).efficiency
