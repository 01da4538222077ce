"""Small test fixtures shared by the test modules."""

from __future__ import annotations

import numpy as np

from llmsched.hardware.latency import BatchShape


class LinearLatency:
    """A latency model linear in a batch's tokens and KV reads: simple enough to reason about
    by hand in tests (the real models are tested in test_hardware)."""

    def __init__(self, base=0.005, per_token=2e-5, per_kv=1e-8):
        self.base, self.per_token, self.per_kv = base, per_token, per_kv

    def iteration_time(self, s: BatchShape) -> float:
        return (
            self.base
            + self.per_token * s.num_tokens
            + self.per_kv * (s.decode_kv_tokens + s.prefill_kv_tokens)
        )

    def decode_iteration_times(self, n: int, kv: int, k: int) -> np.ndarray:
        i = np.arange(k)
        return self.base + self.per_token * n + self.per_kv * (kv + i * n)
