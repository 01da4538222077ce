"""Faults the emulated engine injects, each switchable, so that a gateway's handling of them can
be tested: what users of gateways report breaking (docs/serve.md).

- ``error``: the request is answered with an HTTP error (500 unless given: ``error:503``);
- ``cut``: the stream stops after some tokens, the connection closed without ``[DONE]``;
- ``stall``: the stream goes silent after some tokens, then the connection closes;
- ``malformed``: one chunk that is not JSON, in place of a token, then the stream goes on.

A fault comes from the request's ``X-Llmsched-Fault`` header (``cut``, ``cut:3`` = after 3
tokens, ``error:429``, ...), or at random from the engine's rates (``--fault cut=0.05``). The
stream faults strike after half the response's tokens unless the header says when.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FAULTS = ("error", "cut", "stall", "malformed")
HEADER = "x-llmsched-fault"


@dataclass(frozen=True)
class Fault:
    kind: str
    at: int | None = None  # tokens sent before it strikes (stream faults); HTTP status (error)


def parse_fault(text: str) -> Fault:
    """`cut`, `cut:3`, `error:503`, ...; ValueError names what is wrong."""
    kind, _, arg = text.strip().partition(":")
    if kind not in FAULTS:
        raise ValueError(f"unknown fault {kind!r}: one of {', '.join(FAULTS)}")
    if not arg:
        return Fault(kind)
    if not arg.isdigit():
        raise ValueError(f"fault {text!r}: the part after ':' must be a whole number")
    value = int(arg)
    if kind == "error" and not 400 <= value <= 599:
        raise ValueError(f"fault {text!r}: an error status must be 400-599")
    return Fault(kind, value)


def parse_rates(specs: list[str] | None) -> dict[str, float]:
    """`--fault NAME=RATE` flags: the share of requests that get each fault."""
    rates: dict[str, float] = {}
    for spec in specs or []:
        name, _, value = spec.partition("=")
        if name not in FAULTS:
            raise ValueError(f"--fault {spec}: unknown fault {name!r}; one of {', '.join(FAULTS)}")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"--fault {spec}: give NAME=RATE, RATE in [0, 1]") from None
        if not 0 <= rate <= 1:
            raise ValueError(f"--fault {spec}: the rate must be in [0, 1]")
        rates[name] = rate
    if sum(rates.values()) > 1:
        raise ValueError(f"--fault rates add up to {sum(rates.values()):g}, more than 1")
    return rates


class FaultPlan:
    """Which fault, if any, a request gets."""

    def __init__(
        self, rates: dict[str, float] | None = None, seed: int = 0, error_status: int = 500
    ) -> None:
        self.rates = rates or {}
        self.error_status = error_status
        self._rng = np.random.default_rng(seed)

    def draw(self, header: str | None) -> Fault | None:
        if header:
            return parse_fault(header)
        if not self.rates:
            return None
        u = self._rng.random()
        for kind, rate in self.rates.items():
            if u < rate:
                return Fault(kind)
            u -= rate
        return None

    def status(self, fault: Fault) -> int:
        return fault.at or self.error_status

    @staticmethod
    def strikes_after(fault: Fault, tokens: int) -> int:
        """How many of the response's `tokens` are sent before a stream fault strikes."""
        at = fault.at if fault.at is not None else tokens // 2
        return max(0, min(at, tokens - 1))
