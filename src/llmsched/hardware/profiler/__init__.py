"""Measure a model's operator and decoder-layer times on the local GPU (or CPU), Vidur-style.

The weights are random tensors of the model's real shapes (nothing is downloaded); the times
depend on the shapes only. Three tables come out, in the schema of Vidur's A100 profiles so that
the same calibration code reads both (see docs/profiler.md):

- ``mlp.csv``: the token-level operators of one decoder layer (embedding, norms, QKV and output
  projections, rotary embedding, MLP up/activation/down, residual add) against the token count;
- ``attention.csv``: attention alone, prefill chunks (chunk length × KV already cached) and
  batched decodes (batch size × KV length);
- ``layer.csv``: whole decoder layers for batch shapes mixing a prefill chunk and decodes;

plus ``meta.json`` (device, torch version, dtype, shapes used, date). `replay_batches` times whole
forward passes (embedding, all layers, final norm, LM head) for given batch shapes, to check a
latency model against real iteration times.

On CUDA: bf16, CUDA-event timing of each repeat after warm-up, median reported; each measured
call is captured as a CUDA graph (as vLLM runs decodes), so the times are GPU time without Python
launch gaps; the L2 cache is flushed before each repeat (a real layer streams its weights cold).
On CPU: float32, ``time.perf_counter``, and by default a tiny version of the model so that tests
run in seconds. With tensor parallelism ``tp`` > 1 one rank's share of the work is timed on one
device (heads, MLP width and vocabulary divided by ``tp``); the all-reduces are not measured.

PyTorch is imported lazily: importing this package works without it, and the functions that need
it say how to install it (``pip install 'llmsched[profile]'``).

- `shapes`: `ProfileShapes`, `profile_shapes` (the model's or the tiny stand-in's, per rank);
- `schema`: the tables' columns (Vidur's) and how rows are written;
- `device`: PyTorch, the device, and `Setup` (what one run is set up with);
- `timer`: `Timer` (CUDA events and graphs on a GPU, wall time on a CPU);
- `batch`: `PackedBatch`, a batch shape packed without padding;
- `attention`: the attention backends and the reference they are checked against;
- `layer`: the decoder layer, embedding and LM head with random weights;
- `grids`: the default points of each table;
- `tables`: `profile_model`; `replay`: `replay_batches`;
- `command`: ``llmsched profile`` and ``python -m llmsched.hardware.profiler``.
"""

from llmsched.hardware.profiler.batch import BatchSpec
from llmsched.hardware.profiler.command import build_parser, main
from llmsched.hardware.profiler.device import INSTALL_HINT
from llmsched.hardware.profiler.grids import (
    default_attention_grid,
    default_layer_grid,
    default_token_counts,
)
from llmsched.hardware.profiler.replay import replay_batches
from llmsched.hardware.profiler.schema import (
    ATTENTION_COLUMNS,
    KV_BLOCK_SIZE,
    LAYER_COLUMNS,
    MLP_COLUMNS,
    STATS,
    TOKEN_OPS,
)
from llmsched.hardware.profiler.shapes import TINY_SHAPES, ProfileShapes, profile_shapes
from llmsched.hardware.profiler.tables import PARTS, profile_model

__all__ = [
    "ATTENTION_COLUMNS",
    "INSTALL_HINT",
    "KV_BLOCK_SIZE",
    "LAYER_COLUMNS",
    "MLP_COLUMNS",
    "PARTS",
    "STATS",
    "TINY_SHAPES",
    "TOKEN_OPS",
    "BatchSpec",
    "ProfileShapes",
    "build_parser",
    "default_attention_grid",
    "default_layer_grid",
    "default_token_counts",
    "main",
    "profile_model",
    "profile_shapes",
    "replay_batches",
]
