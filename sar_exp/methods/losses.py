"""Loss functions shared by methods, named after the papers' terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_softmax_ce(scores: torch.Tensor) -> torch.Tensor:
    """ClardRec Eq. 4: CE over the positive (column 0) and M sampled negatives.

    Only the positive has r = 1, so the sum reduces to -log softmax(positive); the
    paper's 1 / (1 + M) factor is kept, then averaged over the batch."""
    log_prob = torch.log_softmax(scores, dim=-1)[:, 0]
    return -(log_prob / scores.shape[1]).mean()


def binary_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """QueryRec Eq. 5 / SESRec Eq. 22: binary cross-entropy on click labels."""
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def info_nce(scores: torch.Tensor, positive: torch.Tensor, ignore=None) -> torch.Tensor:
    """InfoNCE with any number of positives per anchor: SimCLR's NT-Xent (Chen et al.,
    ICML'20) when each anchor has one, the supervised-contrastive "out" form (Khosla et
    al., NeurIPS'20) when it has several.

    scores [N, M]: similarities already divided by the temperature; positive [N, M];
    ignore [N, M]: slots left out of the denominator (the anchor itself, known false
    negatives such as the same user's other rows). Per anchor: -mean over its positives
    p of log(exp(s_p) / sum over the slots not ignored exp(s)); averaged over the anchors
    that have a positive, 0 (still on the graph) when none has."""
    allowed = torch.ones_like(positive) if ignore is None else ~ignore
    positive = positive & allowed
    lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=1, keepdim=True)
    log_prob = torch.where(positive, scores - lse, torch.zeros_like(scores))
    has = positive.any(1)
    if not has.any():
        return 0.0 * scores.sum()
    per_anchor = -log_prob.sum(1) / positive.sum(1).clamp(min=1)
    return per_anchor[has].mean()
