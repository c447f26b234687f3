"""CoPPS's contrastive part (Dai, Liu, Dou, Wang, Liu, Long, Wen, KDD'23, "Contrastive
Learning for User Sequence Representation in Personalized Product Search"): the
augmentations of a user's search history and the contrastive tasks built on them. The
ranking model is TEM's (ProductSearch, model=copps); this module holds what makes it CoPPS.

The paper is not on disk; what is known of it here is its abstract: three data
augmentation and contrastive learning strategies build self-supervision from the user's
search behaviours, using an external knowledge graph and "the correlations within and
between user sequences", on top of a Transformer user-sequence encoder (TEM, Bi et al.
2020, is its backbone family). Section numbers of the paper are therefore not cited; what
follows is what a researcher would expect from that description, said where it is ours:

- within a sequence (intra-user): two views of the user's history, each by one operator
  drawn per row from CL4SRec's three (Xie et al., ICDE'22; the operators CoPPS's group
  uses for behaviour sequences): crop (a contiguous span), mask (a share of the steps
  replaced by a learned [mask] vector) and reorder (a contiguous window shuffled); the two
  views of a row are positives, the other rows' views negatives (NT-Xent);
- between sequences (cross-user): rows of other users whose histories share a (query,
  clicked item) pair with this row's are its positives: users who clicked the same item
  for the same query share a search intent (ours: how CoPPS pairs users is not known
  here). Only the histories the batch holds are read: no target, no other sample;
- the knowledge-graph task is not reproduced: the S&R data have no knowledge graph.

Every draw comes from the caller's generator (the model's (seed, rank, step) generator):
no global random state."""

from __future__ import annotations

import torch

from sar_exp.backbones.sequence import left_aligned
from sar_exp.methods.losses import info_nce

OPERATORS = ("crop", "mask", "reorder")


def _uniform(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator).to(device)


def crop(valid: torch.Tensor, ratio: float, generator=None) -> torch.Tensor:
    """The valid steps of a contiguous span of max(1, floor(ratio n)) of a row's n steps,
    at a uniform start (CL4SRec's crop). valid [B, L] is left-aligned; returns [B, L]."""
    n = valid.sum(1)
    keep = torch.clamp((ratio * n).floor().long(), min=1)
    start = (_uniform(n.shape, generator, valid.device) * (n - keep + 1)).floor().long()
    start = torch.minimum(start, (n - keep).clamp(min=0))  # rand < 1, but floats
    slots = torch.arange(valid.shape[1], device=valid.device)
    span = (slots >= start[:, None]) & (slots < (start + keep)[:, None])
    return span & valid


def mask(valid: torch.Tensor, ratio: float, generator=None) -> torch.Tensor:
    """Exactly floor(ratio n) of a row's n valid steps, drawn uniformly without
    replacement (CL4SRec's mask): the steps whose embedding becomes the [mask] vector."""
    n = valid.sum(1)
    count = (ratio * n).floor().long()
    keys = _uniform(valid.shape, generator, valid.device).masked_fill(~valid, 2.0)
    rank = keys.argsort(1).argsort(1)  # 0 for the smallest key of the row
    return (rank < count[:, None]) & valid


def reorder(valid: torch.Tensor, ratio: float, generator=None) -> torch.Tensor:
    """A permutation [B, L] of each row's slots that shuffles a contiguous window of
    floor(ratio n) of its n valid steps (CL4SRec's reorder) and keeps every other slot
    in place. valid [B, L] is left-aligned."""
    n = valid.sum(1)
    size = (ratio * n).floor().long()
    start = (_uniform(n.shape, generator, valid.device) * (n - size + 1)).floor().long()
    start = torch.minimum(start, (n - size).clamp(min=0))
    slots = torch.arange(valid.shape[1], device=valid.device)
    window = (slots >= start[:, None]) & (slots < (start + size)[:, None])
    # a window slot's key is uniform in [start, start + size): it sorts among the window's
    # slots only, since every other slot keeps its integer position as its key. In float64
    # (a float32 u < 1 times size stays below size; in float32, start + u size can round
    # up to start + size, the next slot's key), with a stable sort for ties
    u = _uniform(valid.shape, generator, valid.device).double()
    draw = start[:, None] + u * size[:, None]
    keys = torch.where(window, draw, slots.to(draw.dtype).expand_as(draw))
    return keys.argsort(dim=1, stable=True)


def augment(ids: torch.Tensor, valid: torch.Tensor, ratios: dict, generator=None):
    """One view of each row's history: an operator drawn uniformly per row (CL4SRec's
    random choice), applied with its ratio. ids, valid [B, L]; returns ids, valid and
    masked [B, L], left-aligned (masked: the steps to read as the [mask] vector)."""
    ids, valid = left_aligned(ids.unsqueeze(-1), valid)
    ids = ids.squeeze(-1)
    choice = torch.randint(0, len(OPERATORS), (ids.shape[0],), generator=generator)
    choice = choice.to(ids.device)[:, None]
    cropped = crop(valid, ratios["crop"], generator)
    masked = mask(valid, ratios["mask"], generator)
    order = reorder(valid, ratios["reorder"], generator)
    reordered = torch.gather(ids, 1, order)
    out_ids = torch.where(choice == 2, reordered, ids)
    out_valid = torch.where(choice == 0, cropped, valid)
    out_masked = (choice == 1) & masked
    aligned, out_valid = left_aligned(torch.stack([out_ids, out_masked.long()], -1), out_valid)
    return aligned[..., 0], out_valid, aligned[..., 1].bool() & out_valid


def shared_pairs(queries: torch.Tensor, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, B]: whether rows i and j have a (query, clicked item) pair in common among
    their valid history steps."""
    keys = queries * (int(items.max()) + 1) + items
    _, inverse = torch.unique(keys[valid], return_inverse=True)
    rows = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)[valid]
    hits = torch.zeros(valid.shape[0], int(inverse.max()) + 1 if inverse.numel() else 0,
                       device=valid.device)  # fmt: skip
    hits[rows, inverse] = 1.0
    return (hits @ hits.T) > 0


def sequence_contrast(view_a, view_b, user, temperature: float) -> torch.Tensor:
    """Intra-user task: NT-Xent over the 2R views (cosine similarity / temperature); a
    row's two views are positives. The same user's other rows (several samples of one
    user in a batch hold nearly the same history) are left out of the denominators
    rather than pushed apart (ours)."""
    z = torch.nn.functional.normalize(torch.cat([view_a, view_b]), dim=-1)
    r = view_a.shape[0]
    own = torch.arange(2 * r, device=z.device)
    positive = torch.zeros(2 * r, 2 * r, dtype=torch.bool, device=z.device)
    positive[own, (own + r) % (2 * r)] = True
    users = torch.cat([user, user])
    ignore = (users[:, None] == users[None, :]) & ~positive  # self included
    return info_nce(z @ z.T / temperature, positive, ignore)


def cross_user_contrast(view_a, view_b, user, similar, temperature: float) -> torch.Tensor:
    """Cross-user task: each row's first view against the others' second views; rows of
    other users sharing a (query, clicked item) pair (`similar` [R, R]) are positives,
    the same user's rows are left out, every other row is a negative."""
    a = torch.nn.functional.normalize(view_a, dim=-1)
    b = torch.nn.functional.normalize(view_b, dim=-1)
    same_user = user[:, None] == user[None, :]
    return info_nce(a @ b.T / temperature, similar & ~same_user, same_user)
