"""DIN (Zhou et al., KDD'18) target attention, as QueryRec (Eq. 1-4) and SESRec use it.
Histories are pooled with weights a(e_j, e_i) from an MLP on [e_j, e_i, e_j - e_i,
e_j * e_i]; [user | item | pooled rec history | pooled query history] -> MLP -> logit."""

from __future__ import annotations

import torch
from torch import nn


class TargetAttention(nn.Module):
    def __init__(self, dim: int, hidden=(80, 40)):
        super().__init__()
        self.score = nn.Sequential(
            nn.Linear(4 * dim, hidden[0]),
            nn.PReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.PReLU(),
            nn.Linear(hidden[1], 1),
        )

    def forward(self, history, mask, target):
        """history [B, L, d], mask [B, L], target [B, K, d] -> pooled [B, K, d] (Eq. 1)."""
        first, rest = self.score[0], self.score[1:]
        # The first layer on [h, t, h - t, h * t] split by its four column blocks: the h and
        # t blocks are computed once per slot and once per candidate, only the h * t block
        # per (candidate, slot) pair, a quarter of the concatenation's multiplications
        w_h, w_t, w_diff, w_prod = first.weight.chunk(4, dim=1)
        per_slot = history @ (w_h + w_diff).T  # [B, L, H]
        per_candidate = target @ (w_t - w_diff).T + first.bias  # [B, K, H]
        per_pair = torch.einsum("bld,bkd,hd->bklh", history, target, w_prod)
        hidden = per_pair + per_slot.unsqueeze(1) + per_candidate.unsqueeze(2)
        weights = rest(hidden).squeeze(-1)
        # DIN keeps un-normalised weights (no softmax) so the pooled norm reflects intensity.
        weights = weights * mask.unsqueeze(1).to(weights.dtype)
        return torch.einsum("bkl,bld->bkd", weights, history)


class DINScorer(nn.Module):
    """Scores [B, K] candidate items directly (no user vector): a target-aware backbone."""

    needs_history = True
    scores_items = True

    def __init__(self, user_dim: int, item_dim: int, query_dim: int, hidden_dim: int = 200,
                 use_query_history: bool = False, dropout: float = 0.0, **_):  # fmt: skip
        super().__init__()
        self.rec_attention = TargetAttention(item_dim)
        self.use_query_history = use_query_history
        if use_query_history:
            self.query_project = nn.Linear(query_dim, item_dim)
            self.query_attention = TargetAttention(item_dim)
        width = user_dim + item_dim * (3 if use_query_history else 2)
        self.predict = nn.Sequential(
            nn.Linear(width, hidden_dim),
            nn.PReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 80),
            nn.PReLU(),
            nn.Linear(80, 1),
        )

    def forward(self, user_emb, items, rec_history, rec_mask, query_history=None, query_mask=None):
        b, k, _ = items.shape
        parts = [
            user_emb.unsqueeze(1).expand(b, k, -1),
            items,
            self.rec_attention(rec_history, rec_mask, items),
        ]
        if self.use_query_history:
            parts.append(
                self.query_attention(self.query_project(query_history), query_mask, items)
            )  # Eq. 2
        return self.predict(torch.cat(parts, dim=-1)).squeeze(-1)  # Eq. 3-4
