"""Response-length rankers for prompt-aware scheduling (PARS and its baselines).

A ranker reads prompt texts only and returns scores whose order approximates the order of the
response lengths (higher = longer), so a scheduler can serve the shortest-looking request first::

    from llmsched.predict import load_predictor
    p = load_predictor("MODEL_DIR")         # any saved ranker or baseline
    scores = p.score(list_of_prompt_texts)   # np.ndarray float64, higher = longer expected

``PromptLengthPredictor()`` (score = the prompt's token count) needs no training and has the same
``score``. Train and evaluate with ``llmsched train-ranker`` / ``llmsched eval-ranker``; the
heavy dependencies (torch, transformers, scikit-learn) are imported only when used.
"""

from llmsched.predict.predictors import (
    EncoderHeadPredictor,
    Predictor,
    PromptLengthPredictor,
    TfidfPredictor,
    load_predictor,
)

__all__ = [
    "EncoderHeadPredictor",
    "Predictor",
    "PromptLengthPredictor",
    "TfidfPredictor",
    "load_predictor",
]
