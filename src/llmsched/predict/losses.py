"""Ranking losses. Scores follow one convention throughout: higher score = longer response."""

from __future__ import annotations

MARGIN = 1.0


def margin_ranking_loss(score_a, score_b, label_a_longer, margin: float = MARGIN):
    """PARS's loss: mean of max(0, -y (s_A - s_B) + margin), y = +1 when A is longer."""
    import torch.nn.functional as F

    target = 2.0 * label_a_longer.to(score_a.dtype) - 1.0
    return F.margin_ranking_loss(score_a, score_b, target, margin=margin)


def listmle_loss(scores, lengths, generator=None):
    """ListMLE (Xia et al. 2008), as vllm-ltr trains its ranker: the negative log-likelihood of
    the true order (longest first) under the Plackett-Luce model of the scores,
    ``sum_i [log sum_{k>=i} exp(s_k) - s_i]`` with items sorted by true length, averaged over
    lists. ``scores`` and ``lengths`` are (lists, items); ties in length are broken at random
    (``generator`` seeds it), so no fixed order is taught among equals."""
    import torch

    # Shuffle first, then a stable sort by length (descending): ties stay in random order.
    shuffle = torch.argsort(torch.rand(lengths.shape, generator=generator), dim=-1)
    by_length = torch.argsort(
        torch.gather(lengths, -1, shuffle), dim=-1, descending=True, stable=True
    )
    order = torch.gather(shuffle, -1, by_length)
    ranked = torch.gather(scores, -1, order)
    suffix_lse = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    return (suffix_lse - ranked).sum(-1).mean()
