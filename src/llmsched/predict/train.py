"""Training the rankers: PARS pairwise, and the pointwise and listwise baselines.

One loop serves both modes. In ``frozen`` mode the prompts are embedded once (cached) and only a
head is trained, on a CPU in minutes; in ``full`` mode the encoder is fine-tuned with the head, as
PARS does on a GPU (it runs on a CPU too, slowly: for small subsets and smoke tests).

PARS's recipe (released code): margin ranking loss (margin 1), AdamW lr 2e-5, weight decay 0.01,
linear warm-up over 10 % of the steps then linear decay, batch 128 pairs, 3 epochs, gradient
norm clipped at 1, the checkpoint with the best pairwise validation accuracy kept. The frozen
mode keeps all of it except the learning rate (default 1e-3): a freshly initialised head alone,
with no encoder to adapt, barely moves at 2e-5 in 3 epochs.

The baselines use the same encoder, head, optimiser, schedule and checkpoint rule; only the loss
and the batches differ: pointwise = MSE on standardised log(1 + length), listmle = ListMLE on
lists of 32 prompts (4 lists a batch). Each of their epochs shows every prompt ``k`` times, as
the pairwise epoch does (each prompt is the first of ``k`` pairs).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from llmsched.metrics.ranking import kendall_tau
from llmsched.predict.data import LengthData
from llmsched.predict.metrics import pairwise_accuracy
from llmsched.predict.pairs import DELTA, K_PAIRS, SEED, make_pairs

METHODS = ("pairwise", "pointwise", "listmle", "tfidf")
MODES = ("frozen", "full")
NEURAL_METHODS = ("pairwise", "pointwise", "listmle")


@dataclass
class TrainConfig:
    method: str = "pairwise"
    mode: str = "frozen"
    epochs: int = 3
    batch_size: int = 128
    lr: float | None = None  # None: 2e-5 in full mode, 1e-3 for a frozen-mode head
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    margin: float = 1.0
    k_pairs: int = K_PAIRS
    delta: float = DELTA
    list_size: int = 32
    head: str | None = None  # None: mlp in frozen mode, linear (as PARS) in full mode
    head_hidden: int = 256
    dropout: float = 0.1
    seed: int = SEED
    max_steps: int | None = None  # stop early (smoke tests of the full mode)
    tfidf_alpha: float = 1.0
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.lr is None:
            self.lr = 2e-5 if self.mode == "full" else 1e-3
        if self.head is None:
            self.head = "linear" if self.mode == "full" else "mlp"


def train_predictor(train: LengthData, val: LengthData, config: TrainConfig, encoder=None):
    """A trained predictor (``predictors.Predictor``) with its history in ``meta``."""
    if len(train) < 2 or len(val) < 2:
        raise ValueError(
            f"need at least 2 train and 2 validation prompts ({len(train)}, {len(val)})"
        )
    started = time.perf_counter()
    if config.method == "tfidf":
        predictor = _train_tfidf(train, config)
        val_scores = predictor.score(val.prompts)
    else:
        predictor, score_val = _train_neural(train, val, config, encoder)
        val_scores = score_val()  # frozen mode: from the cached embeddings
    val_pairs = make_pairs(val.lengths, config.k_pairs, config.delta, config.seed + 1)
    predictor.meta.update(
        method=config.method,
        mode=config.mode if config.method != "tfidf" else None,
        train_data=train.name,
        train_prompts=len(train),
        val_prompts=len(val),
        train_config={k: v for k, v in asdict(config).items() if k != "progress"},
        val_pairwise_accuracy=pairwise_accuracy(val_scores, val_pairs),
        val_kendall_tau=kendall_tau(val_scores, val.lengths),
        train_seconds=round(time.perf_counter() - started, 1),
    )
    return predictor


def _train_tfidf(train: LengthData, config: TrainConfig):
    from llmsched.predict.predictors import TfidfPredictor

    pipeline = TfidfPredictor.build(config.tfidf_alpha)
    pipeline.fit(train.prompts, np.log1p(train.lengths))
    return TfidfPredictor(pipeline)


def _train_neural(train: LengthData, val: LengthData, config: TrainConfig, encoder):
    import torch

    from llmsched.predict.encoder import Encoder
    from llmsched.predict.predictors import EncoderHeadPredictor, build_head

    torch.manual_seed(config.seed)
    encoder = encoder or Encoder()
    head_config = {"head": config.head, "hidden": config.head_hidden, "dropout": config.dropout}
    head = build_head(encoder.hidden_size, **head_config)
    finetune = config.mode == "full"
    predictor = EncoderHeadPredictor(encoder, head, head_config, finetuned=finetune)
    if finetune:
        params = list(encoder.model.parameters()) + list(head.parameters())

        def score_train(idx: np.ndarray):
            batch = encoder.tokenize([train.prompts[i] for i in idx])
            return head(encoder.forward(batch)).squeeze(-1)

        def score_val() -> np.ndarray:
            return predictor.score(val.prompts)

        def set_train(on: bool) -> None:
            encoder.model.train(on)
            head.train(on)
    else:
        x_train = torch.as_tensor(encoder.embed_cached(train.prompts, progress=config.progress))
        x_val = encoder.embed_cached(val.prompts, progress=config.progress)
        params = list(head.parameters())

        def score_train(idx: np.ndarray):
            return head(x_train[torch.as_tensor(idx)]).squeeze(-1)

        def score_val() -> np.ndarray:
            return predictor.score_embeddings(x_val)

        def set_train(on: bool) -> None:
            head.train(on)

    # A small head's matrices are too small to share between threads: with two threads each
    # step is mostly synchronisation (8x slower measured on 2 busy cores), so one thread trains.
    threads = torch.get_num_threads()
    if not finetune:
        torch.set_num_threads(1)
    try:
        history = _fit(train, val, config, params, score_train, score_val, set_train, head, encoder)
    finally:
        torch.set_num_threads(threads)
    predictor.meta["history"] = history
    return predictor, score_val


def _fit(
    train: LengthData,
    val: LengthData,
    config: TrainConfig,
    params: list,
    score_train: Callable,
    score_val: Callable[[], np.ndarray],
    set_train: Callable[[bool], None],
    head,
    encoder,
) -> list[dict]:
    """The loop: AdamW, linear warm-up then decay, clipping, best pairwise val accuracy kept."""
    import torch

    from llmsched.predict.losses import listmle_loss, margin_ranking_loss

    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    lengths = torch.as_tensor(train.lengths, dtype=torch.float32)
    log_len = np.log1p(train.lengths)
    z_mean, z_std = float(log_len.mean()), float(log_len.std() or 1.0)
    targets = torch.as_tensor((log_len - z_mean) / z_std, dtype=torch.float32)
    train_pairs = make_pairs(train.lengths, config.k_pairs, config.delta, config.seed)
    val_pairs = make_pairs(val.lengths, config.k_pairs, config.delta, config.seed + 1)
    if config.method == "pairwise" and len(train_pairs) == 0:
        raise ValueError(f"no training pair differs by delta={config.delta}: lengths too similar")

    def epoch_batches() -> list[np.ndarray]:
        if config.method == "pairwise":
            order = rng.permutation(len(train_pairs))
            return [train_pairs[order[s : s + config.batch_size]] for s in _starts(order, config)]
        visits = np.concatenate([rng.permutation(len(train)) for _ in range(config.k_pairs)])
        if config.method == "pointwise":
            return [visits[s : s + config.batch_size] for s in _starts(visits, config)]
        per_batch = max(1, config.batch_size // config.list_size)
        lists = visits[: len(visits) // config.list_size * config.list_size]
        lists = lists.reshape(-1, config.list_size) if len(lists) else visits[None, :]
        return [lists[s : s + per_batch] for s in range(0, len(lists), per_batch)]

    def loss_of(batch: np.ndarray):
        if config.method == "pairwise":
            n = len(batch)
            scores = score_train(np.concatenate([batch[:, 0], batch[:, 1]]))
            label = torch.as_tensor(batch[:, 2])
            return margin_ranking_loss(scores[:n], scores[n:], label, config.margin)
        if config.method == "pointwise":
            return torch.mean((score_train(batch) - targets[torch.as_tensor(batch)]) ** 2)
        scores = score_train(batch.reshape(-1)).reshape(batch.shape)
        return listmle_loss(scores, lengths[torch.as_tensor(batch)], generator)

    first = epoch_batches()
    total = len(first) * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_ratio * total))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    bar = _progress(total, f"train {config.method} ({config.mode})", config.progress)
    history: list[dict] = []
    best_acc, best_state, step = -1.0, None, 0
    for epoch in range(config.epochs):
        batches = first if epoch == 0 else epoch_batches()
        set_train(True)
        running = []
        for batch in batches:
            if step >= total:
                break
            loss = loss_of(batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            schedule.step()
            running.append(loss.item())
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(running[-50:]):.4f}")
        set_train(False)
        val_scores = score_val()
        acc = pairwise_accuracy(val_scores, val_pairs)
        history.append(
            {
                "epoch": epoch + 1,
                "steps": step,
                "train_loss": float(np.mean(running)) if running else float("nan"),
                "val_pairwise_accuracy": acc,
                "val_kendall_tau": kendall_tau(val_scores, val.lengths),
            }
        )
        if acc > best_acc:
            best_acc = acc
            best_state = _snapshot(head, encoder if config.mode == "full" else None)
        if step >= total:
            break
    bar.close()
    _restore(best_state, head, encoder if config.mode == "full" else None)
    return history


def _starts(items, config: TrainConfig) -> range:
    return range(0, len(items), config.batch_size)


def _snapshot(head, encoder) -> dict:
    state = {"head": copy.deepcopy(head.state_dict())}
    if encoder is not None:
        state["encoder"] = copy.deepcopy(encoder.model.state_dict())
    return state


def _restore(state: dict | None, head, encoder) -> None:
    if state is None:
        return
    head.load_state_dict(state["head"])
    head.eval()
    if encoder is not None:
        encoder.model.load_state_dict(state["encoder"])
        encoder.model.eval()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, on: bool):
    if not on:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step")
