"""Small test fixtures shared by the test modules."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import strategies as st

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


def batch_shapes():
    """Hypothesis strategy: batch shapes of up to 4 prefill chunks (with prefixes) and decodes."""
    return st.builds(
        lambda c, p, nd, kvd, npf: BatchShape(
            prefill_tokens=c * npf,
            prefill_attn_pairs=c * npf * (p + (c + 1) / 2),
            prefill_kv_tokens=(p + c) * npf,
            num_prefills=npf if c else 0,
            num_decodes=nd,
            decode_kv_tokens=kvd + nd,
        ),
        c=st.integers(0, 4096),
        p=st.integers(0, 32_000),
        nd=st.integers(0, 512),
        kvd=st.integers(0, 4_000_000),
        npf=st.integers(1, 4),
    )


def shape_fields():
    """Hypothesis strategy: the name of one of BatchShape's work fields."""
    return st.sampled_from([f.name for f in dataclasses.fields(BatchShape)])
