"""AlpacaEval 2.0 response lengths: 805 instructions answered by 227 generators.

One reader for the shared data's ``prompts/alpaca_eval`` folder serves both users of it: the
simulator's reasoning workloads (one generator's answers as outputs,
:func:`llmsched.workload.reasoning.read_alpaca_eval`) and the length predictor's cross-model
evaluation (the whole instructions x generators table, :mod:`llmsched.predict`).
"""

from __future__ import annotations

import csv
import difflib
import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INSTRUCTIONS = "alpaca_eval_instructions.jsonl"
LENGTHS = "alpaca_eval_output_lengths.csv.gz"


@dataclass(frozen=True)
class AlpacaEval:
    """The table, indexed by ``instruction_id``: texts, prompt tokens and, per generator, output
    tokens (cl100k; NaN where a generator has no answer)."""

    texts: tuple[str, ...]
    prompt_tokens: np.ndarray  # (instructions,)
    lengths: np.ndarray  # (instructions, generators)
    generators: list[str]
    source: Path

    def column(self, generator: str) -> np.ndarray:
        """One generator's output tokens per instruction; a clear error naming close matches."""
        if generator not in self.generators:
            close = difflib.get_close_matches(generator, self.generators, n=3, cutoff=0.5)
            hint = f" Close: {', '.join(close)}." if close else ""
            raise ValueError(
                f"unknown AlpacaEval generator {generator!r} ({len(self.generators)} generators "
                f"in {self.source / LENGTHS}).{hint}"
            )
        return self.lengths[:, self.generators.index(generator)]


@functools.lru_cache(maxsize=4)
def _read(directory: Path) -> AlpacaEval:
    for name in (INSTRUCTIONS, LENGTHS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"AlpacaEval data: {directory / name} not found")
    with open(directory / INSTRUCTIONS, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    n = max(int(r["instruction_id"]) for r in rows) + 1
    texts, prompt_tokens = [""] * n, np.zeros(n, dtype=np.int64)
    for r in rows:
        texts[int(r["instruction_id"])] = r["instruction"]
        prompt_tokens[int(r["instruction_id"])] = int(r["instruction_tokens_cl100k"])
    cells: dict[str, dict[int, float]] = {}
    with gzip.open(directory / LENGTHS, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            cells.setdefault(row["generator"], {})[int(row["instruction_id"])] = float(
                row["output_tokens_cl100k"]
            )
    generators = sorted(cells)
    lengths = np.full((n, len(generators)), np.nan)
    for j, generator in enumerate(generators):
        for i, tokens in cells[generator].items():
            if i < n:  # an answer to an instruction that is not in the instructions file
                lengths[i, j] = tokens
    prompt_tokens.flags.writeable = lengths.flags.writeable = False  # shared by the cache
    return AlpacaEval(tuple(texts), prompt_tokens, lengths, generators, directory)


def read_alpaca_eval_table(directory: str | Path) -> AlpacaEval:
    """The AlpacaEval table in ``directory`` (read once per process; the arrays are read-only)."""
    return _read(Path(directory).resolve())
