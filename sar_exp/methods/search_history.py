"""What the methods that read a user's search sessions share (UniSAR, SESRec): the
step's distinct items and queries encoded once, a session's mean clicked item, the
(query, clicked item) pairs of the history sessions that their query-item contrastive
losses align (UniSAR Eq. 2, SESRec Eq. 6-8), and those losses' sampled negatives."""

from __future__ import annotations

import torch

from sar_exp.data.batches import stable_seed


class Lookup:
    """Embeddings of the distinct ids of one step, encoded once, for any id tensor."""

    def __init__(self, ids: list[torch.Tensor], encode):
        self.ids = torch.unique(torch.cat([t.reshape(-1) for t in ids]))
        self.table = encode(self.ids)

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.ids, ids)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        # index_select: its gradient is an index_add (advanced indexing's sorts first)
        rows = self.table.index_select(0, self.index(ids).reshape(-1))
        return rows.view(*ids.shape, self.table.shape[-1])


def mean_clicks(items: Lookup, clicks: torch.Tensor) -> torch.Tensor:
    """[B, S, C] clicked item ids (0 = none) -> [B, S, d] their mean (zeros for a session
    without a click); only the real clicks are looked up (most slots are padding)."""
    flat = clicks.reshape(-1)
    real = torch.nonzero(flat > 0).squeeze(1)
    session = torch.div(real, clicks.shape[-1], rounding_mode="floor")
    d = items.table.shape[-1]
    sums = items.table.new_zeros(flat.numel() // clicks.shape[-1], d)
    sums = sums.index_add(0, session, items(flat.index_select(0, real)))
    counts = (clicks > 0).sum(-1, keepdim=True).clamp(min=1)
    return sums.view(*clicks.shape[:-1], d) / counts


def history_pairs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The (query, clicked item) id pairs of a batch's valid history sessions, one per
    click: what the query-item losses align (never the row's own target)."""
    clicks = batch["search_history_clicks"]
    pair_mask = batch["search_history_mask"][..., None] & (clicks > 0)
    queries = batch["search_history_query"][..., None].expand_as(clicks)[pair_mask]
    return queries, clicks[pair_mask]


def sampled_negatives(
    n: int, schema: dict, tag: str, rank: int, step: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """n item ids and n query ids drawn uniformly, shared by a training step, from the
    run's seed, the rank and the step (a resumed run draws the same); `tag` keeps two
    methods' draws apart."""
    generator = torch.Generator().manual_seed(stable_seed(tag, torch.initial_seed(), rank, step))
    items = torch.randint(1, schema["num_items"] + 1, (n,), generator=generator)
    queries = torch.randint(1, max(2, schema["num_queries"] + 1), (n,), generator=generator)
    return items.to(device), queries.to(device)
