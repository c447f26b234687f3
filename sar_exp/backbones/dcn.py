"""DCN (Wang et al., ADKDD'17), a CTR baseline of QueryRec's Table 4: a cross network
beside a deep network over the same stacked input, their outputs concatenated into a
logit. The input x_0 per candidate is [user | item | mean of the clicked-item history]
(DCN has no attention; a behaviour sequence enters as its mean, as CTR libraries feed
variable-length features)."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.sequence import masked_mean
from sar_exp.errors import ConfigError


def candidate_features(user_emb, items, rec_history, rec_mask) -> torch.Tensor:
    """[B, K, user + 2 item] inputs: user, candidate, mean of the rec history."""
    b, k, _ = items.shape
    pooled = masked_mean(rec_history, rec_mask)
    return torch.cat(
        [user_emb.unsqueeze(1).expand(b, k, -1), items, pooled.unsqueeze(1).expand(b, k, -1)],
        dim=-1,
    )


def deep_network(in_dim: int, dims, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in dims:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    return nn.Sequential(*layers)


class CrossNetwork(nn.Module):
    """x_{l+1} = x_0 x_l^T w_l + b_l + x_l (DCN Eq. 3): each layer adds one degree of
    feature interaction with 2d parameters."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(dim) * 0.01) for _ in range(layers)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.weights, self.biases):
            x = x0 * (x @ w).unsqueeze(-1) + b + x
        return x


class DCNScorer(nn.Module):
    """Scores [B, K] candidates: [cross(x_0) | deep(x_0)] -> linear -> logit (DCN Eq. 5)."""

    needs_history = True
    scores_items = True

    def __init__(self, user_dim: int, item_dim: int, cross_layers: int = 2,
                 deep_dims: tuple[int, ...] = (200, 80), dropout: float = 0.0, **_):  # fmt: skip
        super().__init__()
        if not deep_dims:
            raise ConfigError("backbone.encoder.deep_dims needs at least one layer width")
        width = user_dim + 2 * item_dim
        self.cross = CrossNetwork(width, cross_layers)
        self.deep = deep_network(width, deep_dims, dropout)
        self.combine = nn.Linear(width + deep_dims[-1], 1)

    def forward(self, user_emb, items, rec_history, rec_mask, query_history=None, query_mask=None):
        x0 = candidate_features(user_emb, items, rec_history, rec_mask)
        return self.combine(torch.cat([self.cross(x0), self.deep(x0)], dim=-1)).squeeze(-1)
