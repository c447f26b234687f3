"""GRU4Rec (Hidasi et al., ICLR'16) as ClardRec Appendix B.3.3 uses it:
u_seq = GRU(step_1..step_n) (Eq. 27 / 29), u = MLP([u_emb | u_seq]) (Eq. 28 / 30)."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.embeddings import mlp
from sar_exp.backbones.sequence import left_aligned


class GRU4RecEncoder(nn.Module):
    needs_history = True

    def __init__(
        self,
        user_dim: int,
        step_dim: int,
        hidden_dim: int,
        layers: int = 1,
        dropout: float = 0.0,
        **_,
    ):
        super().__init__()
        self.gru = nn.GRU(
            step_dim,
            hidden_dim,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.combine = mlp(user_dim + hidden_dim, hidden_dim, 2)  # Eq. 28
        self.out_dim = hidden_dim

    def forward(self, user_emb, steps, mask):
        steps, mask = left_aligned(steps, mask)
        lengths = mask.sum(1)
        # An empty history packs as one padding step (zeros); its state is then ignored.
        packed = nn.utils.rnn.pack_padded_sequence(
            steps, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, hidden = self.gru(packed)
        sequence = hidden[-1] * (lengths > 0).unsqueeze(-1).to(hidden.dtype)
        return self.combine(torch.cat([user_emb, sequence], dim=-1))
