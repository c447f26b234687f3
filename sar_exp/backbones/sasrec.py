"""SASRec (Kang and McAuley, ICDM'18) as ClardRec Appendix B.3.4 uses it: a causal
self-attentive encoder over the history (Eq. 31) combined with the user (Eq. 28 / 30)."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.embeddings import TABLE_STD, mlp
from sar_exp.backbones.sequence import LENGTH_GROUPS, LengthGroups, grouped_outputs, left_aligned

# Length groups pay off where padding is most of the batch (ms per step of base + sasrec,
# bench --preset small: protocol=clardrec_seq, a third of the slots valid, 178.5 -> 98.2;
# unisar_kuaisar, 0.38 valid, 109.6 -> 86.7; with the default protocol's 0.67 valid the
# groups were slower, 69 -> 82): below this share of valid slots the rows run in groups.
GROUP_BELOW_FILL = 0.5


class SASRecEncoder(nn.Module):
    needs_history = True

    def __init__(
        self, user_dim: int, step_dim: int, hidden_dim: int, layers: int = 1, heads: int = 2,
        dropout: float = 0.0, max_length: int = 200, length_groups: int = LENGTH_GROUPS, **_,
    ):  # fmt: skip
        super().__init__()
        self.project = nn.Linear(step_dim, hidden_dim)
        self.positions = nn.Embedding(max_length, hidden_dim)
        # at the item tables' scale: torch's N(0, 1) is ~30x the projected items (~0.03),
        # so item + position was nearly the position alone; the authors' code draws the
        # positions of the same order as the (sqrt(d)-scaled) items (0.5-3x with Xavier)
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
        self.length_groups = length_groups

    def forward(self, user_emb, steps, mask):
        steps, mask = left_aligned(steps, mask)
        lengths = mask.sum(1)
        newest = (lengths - 1).clamp(min=0)
        if self.length_groups > 1 and mask.float().mean() < GROUP_BELOW_FILL:
            # rows in groups of similar length, each cut to its longest history: causal
            # attention with padding masked gives every valid slot what one call on the
            # whole batch gives, without the work on padding
            grouped = LengthGroups(mask, self.length_groups)
            pieces = grouped_outputs(self._encode, grouped, (steps,), (mask,), mask)
            (sequence,) = grouped.read(pieces, (newest[:, None], (lengths > 0)[:, None]))
            sequence = sequence[:, 0]
        else:
            out = self._encode(steps, mask)
            sequence = out[torch.arange(len(out), device=out.device), newest]
            sequence = sequence * (lengths > 0).unsqueeze(-1).to(sequence.dtype)
        return self.combine(torch.cat([user_emb, sequence], dim=-1))  # empty history: zeros

    def _encode(self, steps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[rows, n, step_dim] left-aligned steps of one length group -> [rows, n, d]."""
        length = steps.shape[1]
        x = self.project(steps) + self.positions(newest_first_positions(valid))
        causal = torch.triu(
            torch.ones(length, length, dtype=torch.bool, device=steps.device), diagonal=1
        )
        # A row with no history would attend to nothing (NaN): let it see its first slot
        # (its output is not read).
        padding = ~valid
        padding[:, 0] = padding[:, 0] & valid.any(1)
        return self.norm(self.encoder(x, mask=causal, src_key_padding_mask=padding))


def newest_first_positions(valid: torch.Tensor) -> torch.Tensor:
    """[rows, n] position index of each slot of left-aligned histories, counted back from
    the row's newest step (0). SASRec pads every history on the left to one length, so its
    newest step always has the last position, whatever the history's length; counting
    from the oldest step (RecBole's convention, and this encoder's before) gave the newest
    step a position that moved with the length. Padding slots get 0 (masked anyway)."""
    lengths = valid.sum(1, keepdim=True)
    slots = torch.arange(valid.shape[1], device=valid.device)
    return (lengths - 1 - slots).clamp(min=0)
