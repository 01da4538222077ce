"""Calibrate the roofline latency model's efficiencies on measured GPU operator profiles.

The profiles (Vidur's A100 tables, or the project profiler's, same schema) give operator,
attention and all-reduce times; a least-squares fit on the relative error over some *training*
models gives the handful of numbers `RooflineModel` uses, and the fidelity report measures them on
*held-out* models. Nothing here runs at simulation time: `RooflineModel` only reads the stored
coefficients (`load_calibration`).

- `profiles`: the profile dataclasses and the readers of Vidur's CSVs (`load_vidur_profiles`);
- `rows`: profile rows with their per-rank shapes, and the roofline's time for each, vectorised;
- `fitting`: `fit` (``scipy.optimize.least_squares``) and its result, `Calibration`;
- `fidelity`: `evaluate`, giving a `FidelityReport` of `OperatorFit`s;
- `report`: `format_report`, `format_efficiency`, `plot_fidelity`;
- `store`: `save_calibration`, `read_calibration`, `load_calibration`, `calibration_path`;
- `command`: `calibrate` (fit and both reports) and ``python -m llmsched.hardware.calibration``
  (also ``llmsched calibrate``), which refits on the shared Vidur data, prints the report and
  writes ``calibrated/a100.json``.
"""

from llmsched.hardware.calibration.command import calibrate, main
from llmsched.hardware.calibration.fidelity import (
    ROW_CHOICES,
    FidelityReport,
    OperatorFit,
    evaluate,
)
from llmsched.hardware.calibration.fitting import (
    ALLREDUCE_TRAIN_TP,
    ATTENTION_SPLIT_KV,
    DEFAULT_HELDOUT,
    DEFAULT_TRAIN,
    MAX_TOKENS,
    TILE_CHOICES,
    Calibration,
    fit,
)
from llmsched.hardware.calibration.profiles import (
    ALLREDUCE_COLUMNS,
    ATTENTION_COLUMNS,
    ATTENTION_OPS,
    DEFAULT_GPU,
    DEFAULT_NETWORK,
    ELEMENTWISE_KINDS,
    ELEMENTWISE_OPS,
    GEMM_OPS,
    LAYER_OPS,
    SHAPE_COLUMNS,
    VIDUR_DIR,
    AllReduceProfile,
    AttentionProfile,
    OperatorProfile,
    ProfileSet,
    load_vidur_profiles,
    read_allreduce_csv,
    read_attention_csv,
    read_mlp_csv,
)
from llmsched.hardware.calibration.report import (
    ALLREDUCE_BANDS,
    TARGET_LAYER,
    TARGET_OPERATOR,
    format_efficiency,
    format_report,
    plot_fidelity,
)
from llmsched.hardware.calibration.store import (
    CALIBRATED_DIR,
    FORMAT_VERSION,
    calibration_path,
    load_calibration,
    read_calibration,
    save_calibration,
)
from llmsched.hardware.roofline import Efficiency

__all__ = [
    "ALLREDUCE_BANDS",
    "ALLREDUCE_COLUMNS",
    "ALLREDUCE_TRAIN_TP",
    "ATTENTION_COLUMNS",
    "ATTENTION_OPS",
    "ATTENTION_SPLIT_KV",
    "CALIBRATED_DIR",
    "DEFAULT_GPU",
    "DEFAULT_HELDOUT",
    "DEFAULT_NETWORK",
    "DEFAULT_TRAIN",
    "ELEMENTWISE_KINDS",
    "ELEMENTWISE_OPS",
    "FORMAT_VERSION",
    "GEMM_OPS",
    "LAYER_OPS",
    "MAX_TOKENS",
    "ROW_CHOICES",
    "SHAPE_COLUMNS",
    "TARGET_LAYER",
    "TARGET_OPERATOR",
    "TILE_CHOICES",
    "VIDUR_DIR",
    "AllReduceProfile",
    "AttentionProfile",
    "Calibration",
    "Efficiency",
    "FidelityReport",
    "OperatorFit",
    "OperatorProfile",
    "ProfileSet",
    "calibrate",
    "calibration_path",
    "evaluate",
    "fit",
    "format_efficiency",
    "format_report",
    "load_calibration",
    "load_vidur_profiles",
    "main",
    "plot_fidelity",
    "read_allreduce_csv",
    "read_attention_csv",
    "read_calibration",
    "read_mlp_csv",
    "save_calibration",
]
