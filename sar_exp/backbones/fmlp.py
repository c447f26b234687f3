"""FMLP-Rec (Zhou et al., WWW'22), a baseline of UniSAR's Table 3 and SESRec's Table 2:
an all-MLP sequential recommender whose token mixer is a learnable filter in the
frequency domain.

Embedding layer: E = Dropout(LayerNorm(item + position)) over a fixed-length,
left-padded sequence (the newest event last). Each block: a filter layer
F~ = IFFT(W * FFT(F)) along the sequence, with a learnable complex W of shape
[n//2 + 1, d], then LayerNorm(F + Dropout(F~)); then a point-wise feed-forward layer
(GELU, 4d inner width) with the same residual and LayerNorm. The user is the last
position's output, scored against the item embeddings the sequence reads. Defaults are
the paper's: 2 blocks, dropout 0.5, filters and linear weights initialised N(0, 0.02^2),
linear biases 0.

The authors draw the item and the position embeddings from one N(0, 0.02^2): neither
outweighs the other in item + position. The item embeddings here are the framework's
shared tables, N(0, 0.05^2), so the positions are drawn at that scale. PyTorch's default
N(0, 1) positions would be 20x the items: LayerNorm(item + position) would be almost
LayerNorm(position), the same for every user, and the model could not learn from the
history."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.embeddings import TABLE_STD
from sar_exp.backbones.sequence import right_aligned

# FMLP-Rec's initializer_range: its linear weights (and its embeddings, see above)
INITIALIZER_RANGE = 0.02


class FilterLayer(nn.Module):
    def __init__(self, length: int, dim: int, dropout: float):
        super().__init__()
        self.length = length
        # real and imaginary parts of W, one complex weight per frequency and channel
        self.weight = nn.Parameter(torch.randn(length // 2 + 1, dim, 2) * 0.02)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x):
        spectrum = torch.fft.rfft(x, dim=1, norm="ortho")
        filtered = torch.fft.irfft(
            spectrum * torch.view_as_complex(self.weight), n=self.length, dim=1, norm="ortho"
        )
        return self.norm(x + self.dropout(filtered))


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x):
        return self.norm(x + self.dropout(self.net(x)))


class FMLPRecEncoder(nn.Module):
    needs_history = True
    reads_user = False  # the model has no user embedding
    shares_item_embedding = True

    def __init__(self, item_dim: int, max_length: int, layers: int = 2, dropout: float = 0.5, **_):
        super().__init__()
        self.length = max_length
        self.positions = nn.Embedding(max_length, item_dim)
        self.norm = nn.LayerNorm(item_dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(
            nn.Sequential(FilterLayer(max_length, item_dim, dropout), FeedForward(item_dim, dropout))
            for _ in range(layers)
        ))  # fmt: skip
        self.out_dim = item_dim
        nn.init.normal_(self.positions.weight, std=TABLE_STD)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=INITIALIZER_RANGE)
                nn.init.zeros_(module.bias)

    def forward(self, user_emb, steps, mask):
        x, _ = right_aligned(steps, mask, self.length)
        x = self.dropout(self.norm(x + self.positions.weight))
        return self.blocks(x)[:, -1]
