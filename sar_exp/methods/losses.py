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
