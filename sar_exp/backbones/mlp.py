"""MLP user encoder (Huang et al. 2013, DSSM) as ClardRec Appendix B.3.1 uses it.
u = ReLU(... ReLU(u_emb W_1 + b_1) ...) W_L + b_L   (Eq. 24)."""

from __future__ import annotations

from torch import nn

from sar_exp.backbones.embeddings import mlp


class MLPEncoder(nn.Module):
    needs_history = False

    def __init__(self, user_dim: int, hidden_dim: int, layers: int = 3, dropout: float = 0.0, **_):
        super().__init__()
        if layers < 1:
            raise ValueError(f"backbone.encoder.layers must be >= 1, got {layers}")
        self.net = mlp(user_dim, hidden_dim, layers, dropout=dropout)
        self.out_dim = hidden_dim

    def forward(self, user_emb, steps=None, mask=None):
        return self.net(user_emb)
