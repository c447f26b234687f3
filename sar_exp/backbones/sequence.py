"""Helpers that sequence encoders share."""

from __future__ import annotations

import torch


def left_aligned(steps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid steps to the front, in their order, padding after them.

    GRU packing reads the first mask.sum() steps and SASRec the step at length - 1, so a
    mask with holes (a masked step between valid ones) would make them read padding and
    miss the newest steps. Batches are left-aligned already; this makes every encoder
    correct for any mask it is given."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    steps = torch.gather(steps, 1, order.unsqueeze(-1).expand_as(steps))
    return steps, torch.gather(mask, 1, order)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L, d] over the [B, L] valid slots -> [B, d] (zeros for a row with none)."""
    return (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)


def right_aligned(
    steps: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, d] -> [B, length, d] with each row's newest `length` valid steps at the end
    and zero padding before them (FMLP-Rec's sequences are left-padded: its filters act
    on a fixed-length signal whose last position is the newest event)."""
    steps, mask = left_aligned(steps, mask)
    count = mask.sum(1)
    slots = torch.arange(length, device=steps.device)
    source = slots[None, :] + (count - length)[:, None]  # the slot's step in the row
    valid = source >= 0
    index = source.clamp(min=0, max=steps.shape[1] - 1)
    out = torch.gather(steps, 1, index.unsqueeze(-1).expand(-1, -1, steps.shape[-1]))
    return out * valid.unsqueeze(-1).to(out.dtype), valid


class AdditiveAttention(torch.nn.Module):
    """Attention pooling with a learned query vector: a_i = softmax_i(q . tanh(V h_i + v))
    over the valid slots, sum_i a_i h_i (NRHUB's view and record attention). A row with no
    valid slot pools to zeros."""

    def __init__(self, dim: int, attention_dim: int = 200):
        super().__init__()
        self.project = torch.nn.Linear(dim, attention_dim)  # V, v
        self.query = torch.nn.Linear(attention_dim, 1, bias=False)  # q

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        scores = self.query(torch.tanh(self.project(h))).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        return torch.einsum("bl,bld->bd", torch.nan_to_num(weights, nan=0.0), h)
