"""MMoE user encoder (Ma et al., KDD'18) as ClardRec Appendix B.3.2 uses it:
u = sum_e w_e MLP_e(u_emb) (Eq. 25), w = softmax(MLP_w(u_emb)) (Eq. 26), N = 2 experts."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.embeddings import mlp


class MMoEEncoder(nn.Module):
    needs_history = False

    def __init__(
        self,
        user_dim: int,
        hidden_dim: int,
        layers: int = 3,
        experts: int = 2,
        dropout: float = 0.0,
        **_,
    ):
        super().__init__()
        self.experts = nn.ModuleList(
            mlp(user_dim, hidden_dim, layers, dropout=dropout) for _ in range(experts)
        )
        self.gate = mlp(user_dim, hidden_dim, 2, out_dim=experts)
        self.out_dim = hidden_dim

    def forward(self, user_emb, steps=None, mask=None):
        weights = torch.softmax(self.gate(user_emb), dim=-1)  # Eq. 26
        outputs = torch.stack([expert(user_emb) for expert in self.experts], dim=-2)
        return (weights.unsqueeze(-1) * outputs).sum(-2)  # Eq. 25
