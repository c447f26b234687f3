"""SASRec (Kang and McAuley, ICDM'18) as ClardRec Appendix B.3.4 uses it: a causal
self-attentive encoder over the history (Eq. 31) combined with the user (Eq. 28 / 30)."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.embeddings import TABLE_STD, mlp
from sar_exp.backbones.sequence import left_aligned


class SASRecEncoder(nn.Module):
    needs_history = True

    def __init__(
        self, user_dim: int, step_dim: int, hidden_dim: int, layers: int = 1, heads: int = 2,
        dropout: float = 0.0, max_length: int = 200, **_,
    ):  # fmt: skip
        super().__init__()
        self.project = nn.Linear(step_dim, hidden_dim)
        self.positions = nn.Embedding(max_length, hidden_dim)
        # at the item tables' scale: torch's N(0, 1) is ~30x the projected items (~0.03),
        # so item + position was nearly the position alone; the authors' code draws the
        # positions no larger than the (sqrt(d)-scaled) items
        nn.init.normal_(self.positions.weight, std=TABLE_STD)
        layer = nn.TransformerEncoderLayer(
            hidden_dim,
            heads,
            dim_feedforward=hidden_dim,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        self.combine = mlp(user_dim + hidden_dim, hidden_dim, 2)
        self.out_dim = hidden_dim

    def forward(self, user_emb, steps, mask):
        steps, mask = left_aligned(steps, mask)
        batch, length, _ = steps.shape
        positions = torch.arange(length, device=steps.device)
        x = self.project(steps) + self.positions(positions)
        causal = torch.triu(
            torch.ones(length, length, dtype=torch.bool, device=steps.device), diagonal=1
        )
        lengths = mask.sum(1)
        # A row with no history would attend to nothing (NaN): let it see its first slot.
        padding = ~mask
        padding[:, 0] = padding[:, 0] & (lengths > 0)
        out = self.norm(self.encoder(x, mask=causal, src_key_padding_mask=padding))
        last = (lengths - 1).clamp(min=0)
        sequence = out[torch.arange(batch, device=steps.device), last]
        sequence = sequence * (lengths > 0).unsqueeze(-1).to(sequence.dtype)
        return self.combine(torch.cat([user_emb, sequence], dim=-1))
