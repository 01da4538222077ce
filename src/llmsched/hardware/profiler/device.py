"""PyTorch (imported lazily, with an install hint), the device a run profiles on, and `Setup`:
what one profiling run is set up with (device, dtype, shapes, timer, attention backend)."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmsched.hardware.profiler.attention import select_attention
from llmsched.hardware.profiler.shapes import ProfileShapes, profile_shapes
from llmsched.hardware.profiler.timer import Timer
from llmsched.hardware.specs import ModelSpec, get_model

INSTALL_HINT = "pip install 'llmsched[profile]'"


def import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise ImportError(
            f"the profiler needs PyTorch, which is not installed: {INSTALL_HINT}"
        ) from exc
    return torch


def resolve_device(torch: Any, device: Any) -> Any:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} (use 'cuda', 'cuda:1' or 'cpu')") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asked for, but this PyTorch ({torch.__version__}) sees no "
                "CUDA GPU; use --device cpu (tiny shapes), or a CUDA build of PyTorch on a GPU"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) here")
    return dev


def device_name(torch: Any, dev: Any) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{dev.type} ({platform.processor() or platform.machine()})"


@dataclass
class Setup:
    """One profiling run: PyTorch, the device and dtype, the shapes, the timer and the attention
    backend chosen (see `setup`)."""

    torch: Any
    device: Any
    dtype: Any
    shapes: ProfileShapes
    timer: Timer
    attention: Callable[..., Any]
    attention_backend: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def elem_bytes(self) -> int:
        return self.torch.tensor([], dtype=self.dtype).element_size()


def setup(
    model: ModelSpec | str,
    *,
    tp: int,
    device: Any,
    tiny: bool | None,
    repeats: int | None,
    warmup: int | None,
    cuda_graph: bool,
    flush_l2: bool,
    attention_backend: str,
) -> Setup:
    """The run's `Setup`: by default CUDA where PyTorch sees a GPU, else the CPU with the tiny
    stand-in shapes; bf16 on CUDA, float32 on a CPU; 20 repeats after 5 warm-up calls on a GPU,
    5 after 1 on a CPU; the first attention backend that agrees with the reference."""
    spec = get_model(model)  # unknown names fail before torch is needed
    torch = import_torch()
    dev = resolve_device(torch, device)
    cuda = dev.type == "cuda"
    if tiny is None:
        tiny = not cuda
    shapes = profile_shapes(spec, tp, tiny)
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = (20 if cuda else 5) if repeats is None else repeats
    warmup = (5 if cuda else 1) if warmup is None else warmup
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be ≥ 1 and warmup ≥ 0, got {repeats} and {warmup}")
    if cuda:
        torch.cuda.set_device(dev)
    timer = Timer(
        torch, dev, repeats=repeats, warmup=warmup, cuda_graph=cuda_graph, flush_l2=flush_l2
    )
    backend, fn = select_attention(torch, shapes, dev, dtype, attention_backend)
    return Setup(torch, dev, dtype, shapes, timer, fn, backend)


def free_bytes(s: Setup) -> int:
    """Free memory on the profiling device (GPU memory, or available host memory)."""
    if s.cuda:
        return int(s.torch.cuda.mem_get_info(s.device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not Linux: assume a modest machine
        return 8 * 2**30
