"""Prompt texts with the real length of their responses, and a fixed held-out split.

Three sources give ``(prompt, length)`` rows:

- ShareGPT V3 turns (``prompts/sharegpt/sharegpt_v3_prefix_pairs.jsonl.gz``): length is
  ``response_tokens_cl100k``; turns with an empty prompt or response are dropped.
- AlpacaEval (``prompts/alpaca_eval/``): 805 instructions answered by 227 generators; length is
  one generator's ``output_tokens_cl100k``. The whole table (instructions × generators) is the
  cross-model test.
- A user's JSONL of ``{"prompt": ..., "output_tokens": ...}`` rows.

The split is by a hash of the group (ShareGPT: the conversation, AlpacaEval: the instruction), not
by a random draw: it is the same on every machine and in every run, and the turns of one
conversation never straddle train and test (they share topic and style, so straddling would
inflate test scores).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmsched.data import data_path, resolve
from llmsched.workload.alpaca_eval import AlpacaEval, read_alpaca_eval_table

SHAREGPT = "prompts/sharegpt/sharegpt_v3_prefix_pairs.jsonl.gz"
ALPACA_DIR = "prompts/alpaca_eval"

SPLITS = ("train", "val", "test")
# ShareGPT has 17k conversations: 10 % each for validation and test is plenty.
SHAREGPT_FRACTIONS = (0.8, 0.1, 0.1)
# AlpacaEval has only 805 instructions: a larger test share keeps tau's noise down.
ALPACA_FRACTIONS = (0.6, 0.1, 0.3)
DEFAULT_GENERATOR = "gpt4_1106_preview"


@dataclass
class LengthData:
    """Prompts, their response lengths, and the group each row belongs to (for the split)."""

    prompts: list[str]
    lengths: np.ndarray
    groups: list[str]
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.float64)
        if not (len(self.prompts) == len(self.lengths) == len(self.groups)):
            raise ValueError("prompts, lengths and groups must have the same length")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: np.ndarray | list[int], name: str | None = None) -> LengthData:
        index = np.asarray(index, dtype=np.int64)
        return LengthData(
            [self.prompts[i] for i in index],
            self.lengths[index],
            [self.groups[i] for i in index],
            name if name is not None else self.name,
            dict(self.meta),
        )

    def head(self, n: int | None) -> LengthData:
        """The first ``n`` rows (all when ``n`` is None): a cap that keeps the split's order."""
        return self if n is None or n >= len(self) else self.subset(np.arange(n))


def split_of(group: str, fractions: tuple[float, float, float] = SHAREGPT_FRACTIONS) -> str:
    """'train', 'val' or 'test' for a group key, from a hash: fixed across runs and machines."""
    digest = hashlib.sha256(group.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def split(
    data: LengthData, fractions: tuple[float, float, float] | None = None
) -> dict[str, LengthData]:
    """The rows of each split, in their original order."""
    fractions = fractions or tuple(data.meta.get("fractions", SHAREGPT_FRACTIONS))
    index: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, group in enumerate(data.groups):
        index[split_of(group, fractions)].append(i)
    return {s: data.subset(idx, f"{data.name}:{s}") for s, idx in index.items()}


def conversation_of(session_id: str) -> str:
    """The key the split groups by. ShareGPT ids like ``QWJhYvA_0``/``QWJhYvA_1`` are pieces of
    one conversation cut by the cleaning script, so the key is the part before a last ``_N``
    (for any trace's session ids, so that training and simulation split alike)."""
    return re.sub(r"_\d+$", "", session_id)


def load_sharegpt(path: str | Path | None = None) -> LengthData:
    """All ShareGPT turns with a non-empty prompt and response."""
    path = resolve(path) if path is not None else data_path(SHAREGPT)
    if not Path(path).exists():
        raise FileNotFoundError(f"ShareGPT pairs file not found: {path}")
    prompts, lengths, groups = [], [], []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if not row["prompt"].strip() or not row["response"].strip():
                continue
            prompts.append(row["prompt"])
            lengths.append(row["response_tokens_cl100k"])
            groups.append(conversation_of(row["id"]))
    return _nonempty(
        LengthData(prompts, lengths, groups, "sharegpt", {"fractions": SHAREGPT_FRACTIONS}),
        path,
    )


def alpaca_table(folder: str | Path | None = None) -> AlpacaEval:
    """The AlpacaEval instructions x generators table (from the shared data by default)."""
    return read_alpaca_eval_table(folder or data_path(ALPACA_DIR))


def load_alpaca_eval(
    generator: str = DEFAULT_GENERATOR, folder: str | Path | None = None
) -> LengthData:
    """The AlpacaEval instructions with one generator's response lengths (rows without an
    answer, or with an empty one, are dropped)."""
    table = alpaca_table(folder)
    col = table.column(generator)
    keep = [i for i, text in enumerate(table.texts) if text.strip() and col[i] > 0]
    return _nonempty(
        LengthData(
            [table.texts[i] for i in keep],
            col[keep],
            [f"alpaca:{i}" for i in keep],
            f"alpaca_eval:{generator}",
            {"fractions": ALPACA_FRACTIONS, "instruction_ids": keep},
        ),
        generator,
    )


def load_jsonl(path: str | Path) -> LengthData:
    """A user's JSONL: one ``{"prompt": str, "output_tokens": int}`` per line (an optional
    ``"group"`` keeps related prompts in one split; by default each prompt is its own group)."""
    path = resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt/length file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    prompts, lengths, groups = [], [], []
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "output_tokens" not in row:
                raise ValueError(f"{path}:{n}: a row needs 'prompt' and 'output_tokens'")
            if not str(row["prompt"]).strip():
                continue
            prompts.append(str(row["prompt"]))
            lengths.append(float(row["output_tokens"]))
            groups.append(str(row.get("group", row["prompt"])))
    return _nonempty(
        LengthData(prompts, lengths, groups, path.stem, {"fractions": SHAREGPT_FRACTIONS}), path
    )


def load_trace_prompts(path: str | Path) -> LengthData:
    """Prompt texts and output lengths from a trace that `llmsched.workload.read_trace` reads
    and that carries prompt text (llmsched JSONL with ``prompt_text``, ShareGPT pairs): the same
    file a simulation replays. Requests of one ``session_id`` stay in one split."""
    from llmsched.workload.readers import read_trace

    path = resolve(path)
    workload = read_trace(path, skip_invalid=True)
    c = workload.columns
    if c["prompt_text"] is None:
        raise ValueError(
            f"{path} is a trace without prompt text: a ranker reads prompts (llmsched JSONL "
            "with a `prompt_text` field per request, docs/workload-format.md)"
        )
    sessions = c["session_id"] if c["session_id"] is not None else c["request_id"]
    keep = [i for i, text in enumerate(c["prompt_text"]) if text and str(text).strip()]
    return _nonempty(
        LengthData(
            [str(c["prompt_text"][i]) for i in keep],
            c["output_tokens"][keep],
            # The key `llmsched.workload.scores.held_out` splits a simulated trace by.
            [conversation_of(str(sessions[i] or c["request_id"][i])) for i in keep],
            path.stem,
            {"fractions": SHAREGPT_FRACTIONS},
        ),
        path,
    )


def load_dataset(spec: str) -> LengthData:
    """``sharegpt``, ``alpaca_eval[:GENERATOR]``, a trace with prompt text (any format
    `read_trace` detects), or a JSONL of ``{"prompt", "output_tokens"}`` rows."""
    from llmsched.workload.readers import TraceFormatError, detect_format

    if spec == "sharegpt":
        return load_sharegpt()
    if spec == "alpaca_eval" or spec.startswith("alpaca_eval:"):
        _, _, generator = spec.partition(":")
        return load_alpaca_eval(generator or DEFAULT_GENERATOR)
    try:
        detect_format(resolve(spec))
    except TraceFormatError:
        return load_jsonl(spec)  # not a trace: prompt/length rows
    return load_trace_prompts(spec)


def _nonempty(data: LengthData, source: object) -> LengthData:
    if len(data) == 0:
        raise ValueError(f"no usable (prompt, length) rows in {source}")
    return data
