"""BERT4Rec (Sun et al., CIKM'19), a baseline of UniSAR's Table 3: a bidirectional
Transformer over the rec history, trained with the Cloze objective.

Input: item embedding + learned position, LayerNorm and dropout; L post-norm Transformer
layers with GELU feed-forward layers (4d wide), attending in both directions. Output
layer: GELU(W_P h + b_P), scored against the same item embeddings plus an item bias.
Training (Cloze): the sequence [history..., clicked item] with each event replaced by a
learned [mask] embedding with probability `mask_prob`, every masked event predicted from
both sides; a sequence left with no mask gets its last event masked (BERT4Rec also trains
on sequences whose last item alone is masked, to match the prediction task: with
`last_item_samples`, every sequence is also trained that way, beside its Cloze sample). Prediction:
[history..., mask], read at the mask. Defaults are the paper's: 2 layers, 2 heads,
dropout 0.1; mask_prob 0.4 (the paper uses 0.6 on Beauty, 0.4 on Steam, 0.2 on MovieLens,
more for shorter sequences; the S&R protocols cap histories at 30 to 150 events)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sar_exp.backbones.embeddings import TABLE_STD
from sar_exp.backbones.sequence import left_aligned
from sar_exp.errors import ConfigError
from sar_exp.methods.losses import sampled_softmax_ce


def cloze_sequences(history, mask, target, mask_prob: float, generator=None,
                    last_item_samples: bool = False):  # fmt: skip
    """[history..., target] per row, left-aligned, and which events are masked.

    history [B, L] item ids with mask [B, L]; target [B]. Returns ids [B', L + 1], valid
    [B', L + 1] and masked [B', L + 1] (a subset of valid, at least one per row). With
    `last_item_samples`, B' = 2B: after the B Cloze rows, the same B sequences with their
    last event (the clicked item) alone masked."""
    ids, mask = left_aligned(history.unsqueeze(-1), mask)
    ids = torch.cat([ids.squeeze(-1), torch.zeros_like(ids[:, :1, 0])], dim=1)
    mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    lengths = mask.sum(1)
    ids[rows, lengths] = target
    valid = mask.clone()
    valid[rows, lengths] = True
    draw = torch.rand(ids.shape, generator=generator).to(ids.device)
    masked = (draw < mask_prob) & valid
    none = ~masked.any(1)
    masked[rows[none], lengths[none]] = True
    if last_item_samples:
        last = torch.zeros_like(masked)
        last[rows, lengths] = True
        ids, valid, masked = (
            torch.cat([x, y]) for x, y in ((ids, ids), (valid, valid), (masked, last))
        )
    return ids, valid, masked


def cloze_loss(dot_scores, outputs, positives, negatives) -> torch.Tensor:
    """Each masked event's output [P, d] against its item and its row's sampled negatives
    [P, M], by the framework's sampled-softmax CE (Eq. 4; BERT4Rec's softmax over every
    item, sampled as the framework samples every other model's). A negative that is the
    masked event's own item is left out of its softmax."""
    candidates = torch.cat([positives[:, None], negatives], dim=1)
    scores = dot_scores(outputs, candidates)
    own = torch.cat([torch.zeros_like(positives[:, None], dtype=torch.bool),
                     negatives == positives[:, None]], dim=1)  # fmt: skip
    return sampled_softmax_ce(scores.masked_fill(own, float("-inf")))


class BERT4RecEncoder(nn.Module):
    needs_history = True
    reads_user = False  # the model has no user embedding
    shares_item_embedding = True
    item_bias = True  # the output layer's b_O
    objective = "cloze"  # PlainBackbone trains it with cloze_loss instead of next-item CE

    def __init__(self, item_dim: int, max_length: int, layers: int = 2, heads: int = 2,
                 dropout: float = 0.1, mask_prob: float = 0.4, last_item_samples: bool = True,
                 **_):  # fmt: skip
        super().__init__()
        if item_dim % heads:
            raise ConfigError(
                f"backbone.encoder.heads={heads} must divide the item embedding width {item_dim}"
            )
        if not 0.0 < mask_prob <= 1.0:
            raise ConfigError(f"backbone.encoder.mask_prob must be in (0, 1], got {mask_prob}")
        self.mask_prob, self.last_item_samples = mask_prob, last_item_samples
        self.mask_token = nn.Parameter(torch.randn(item_dim) * 0.02)
        self.positions = nn.Embedding(max_length + 1, item_dim)  # the history and the [mask]
        # BERT4Rec draws items and positions from one N(0, 0.02^2); the framework's item
        # tables are N(0, 0.05^2), so the positions take that scale (PyTorch's N(0, 1)
        # would swamp the items in LayerNorm(item + position), as it did in FMLP-Rec)
        nn.init.normal_(self.positions.weight, std=TABLE_STD)
        self.norm = nn.LayerNorm(item_dim)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            item_dim, heads, dim_feedforward=4 * item_dim, dropout=dropout, activation="gelu",
            batch_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.output = nn.Linear(item_dim, item_dim)  # W_P, b_P
        self.out_dim = item_dim

    def encode(self, steps, valid, masked):
        """Outputs GELU(W_P h + b_P) at every position; `masked` events read [mask]."""
        steps = torch.where(masked.unsqueeze(-1), self.mask_token.to(steps.dtype), steps)
        x = self.dropout(self.norm(steps + self.positions.weight[: steps.shape[1]]))
        return F.gelu(self.output(self.encoder(x, src_key_padding_mask=~valid)))

    def forward(self, user_emb, steps, mask):
        """The user: the output at a [mask] appended after the newest event."""
        steps, mask = left_aligned(steps, mask)
        steps = torch.cat([steps, torch.zeros_like(steps[:, :1])], dim=1)
        mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
        rows = torch.arange(steps.shape[0], device=steps.device)
        lengths = mask.sum(1)
        slot = torch.zeros_like(mask)
        slot[rows, lengths] = True
        return self.encode(steps, mask | slot, slot)[rows, lengths]
