"""Times a callable: CUDA events after warm-up, each call captured as a CUDA graph and the L2
cache flushed before each repeat on a GPU; ``time.perf_counter`` on a CPU. Milliseconds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

L2_FLUSH_BYTES = 256 * 2**20


def stats(times_ms: Sequence[float]) -> dict[str, float]:
    return {
        "min": min(times_ms),
        "max": max(times_ms),
        "mean": statistics.fmean(times_ms),
        "median": statistics.median(times_ms),
        "std": statistics.pstdev(times_ms),
    }


class Timer:
    """Times a callable: CUDA events (optionally over a CUDA graph) on a GPU, else wall time."""

    def __init__(
        self,
        torch: Any,
        device: Any,
        *,
        repeats: int,
        warmup: int,
        cuda_graph: bool,
        flush_l2: bool,
    ) -> None:
        self.torch, self.device = torch, device
        self.repeats, self.warmup = repeats, warmup
        self.cuda = device.type == "cuda"
        self.cuda_graph = cuda_graph and self.cuda
        self.flush_buffer = (
            torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
            if flush_l2 and self.cuda
            else None
        )
        self.graph_fallbacks: list[str] = []

    @property
    def method(self) -> str:
        if not self.cuda:
            return "perf_counter"
        return "cuda_events+cuda_graph" if self.cuda_graph else "cuda_events"

    def __call__(self, name: str, fn: Callable[[], Any]) -> list[float]:
        """Times of `repeats` calls of `fn` in milliseconds, after `warmup` calls."""
        if not self.cuda:
            return self._host_times(fn)
        graph = self._capture(name, fn) if self.cuda_graph else None
        try:
            return self._cuda_times(graph.replay if graph is not None else fn)
        finally:
            del graph

    def _sync(self) -> None:
        mod = getattr(self.torch, self.device.type, None)
        if mod is not None and hasattr(mod, "synchronize") and self.device.type != "cpu":
            mod.synchronize()

    def _host_times(self, fn: Callable[[], Any]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        self._sync()
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            self._sync()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def _cuda_times(self, fn: Callable[[], Any]) -> list[float]:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for start, end in zip(starts, ends):
            if self.flush_buffer is not None:
                self.flush_buffer.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]

    def _capture(self, name: str, fn: Callable[[], Any]) -> Any:
        """`fn` captured as a CUDA graph, or None (timed eagerly) where capture fails."""
        torch = self.torch
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up off the capture: cuBLAS handles, autotuning
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            torch.cuda.synchronize()
            return graph
        except Exception as exc:  # any capture failure: time it eagerly instead
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
            self.graph_fallbacks.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
            return None
