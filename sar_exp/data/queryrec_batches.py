"""QueryRec's training extras, drawn per batch from the ctr view's training split.

* Next-item prediction (Eq. 13-14): for a training impression (u, i, t), n_pos items
  from r+_{u,t} (u's clicked rec impressions after t) and n_neg from r-_{u,t} (shown
  after t, not clicked). Both lists hold training impressions only, so they stop at the
  user's training cut-off: no validation or test label reaches them.
* Query-item contrast (Eq. 15): q^t, the user's last query before t; members of its
  positive set I_q+ (the view's clicked lists, or those lists extended by diffusion,
  both built from search events before their user's cut-off); and items drawn from the
  whole item set for the denominator, with a mask leaving out every member of I_q+.
Every draw is seeded by (run seed, rank, epoch, batch), like the training negatives.
"""

from __future__ import annotations

import torch

from sar_exp.data.batches import stable_seed

TIME_BITS = 40  # times are ms since the dataset's first event: 2^40 ms is 34 years


def _draw(generator, lo: torch.Tensor, hi: torch.Tensor, count: int):
    """`count` positions uniform in [lo, hi) per row (with replacement), and a mask of
    the rows with anything to draw from."""
    size = (hi - lo).clamp(min=0)
    u = torch.rand((lo.numel(), count), generator=generator, dtype=torch.float64)
    pick = lo[:, None] + (u * size[:, None]).long().clamp(max=(size - 1).clamp(min=0)[:, None])
    return pick, (size > 0)[:, None].expand(-1, count)


class QueryRecExtras:
    def __init__(
        self, samples: dict, context: dict, next_positives: int, next_negatives: int,
        query_positives: tuple[torch.Tensor, torch.Tensor] | None, per_row: int,
        contrast_negatives: int, num_items: int, seed: int = 0, rank: int = 0,
    ):  # fmt: skip
        self.samples, self.context = samples, context
        self.n_pos, self.n_neg = next_positives, next_negatives
        self.query_positives, self.per_row = query_positives, per_row
        self.contrast_negatives, self.num_items = contrast_negatives, num_items
        self.seed, self.rank = seed, rank
        # (query, item) keys of every I_q+, sorted: Eq. 15's denominator leaves them out
        self.positive_keys = None
        if query_positives is not None:
            offsets, items = query_positives
            owner = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
            self.positive_keys = torch.sort((owner << 32) | items).values
        # training impressions by (user, time): the clicked ones and the skipped ones
        key = (samples["user"] << TIME_BITS) | samples["time"]
        clicked = samples["label"] > 0.5
        self.lists = {}
        for name, rows in (("positive", clicked), ("negative", ~clicked)):
            index = torch.nonzero(rows).squeeze(1)
            order = torch.argsort(key[index], stable=True)
            self.lists[name] = (key[index][order], samples["item"][index][order])

    def _after(self, name: str, user: torch.Tensor, time: torch.Tensor):
        """[lo, hi) of the list's entries of `user` strictly after `time`."""
        keys, _ = self.lists[name]
        lo = torch.searchsorted(keys, (user << TIME_BITS) | time, right=True)
        hi = torch.searchsorted(keys, (user + 1) << TIME_BITS)
        return lo, hi

    def __call__(self, batch: dict, index: torch.Tensor, epoch: int, batch_number: int) -> None:
        generator = torch.Generator().manual_seed(
            stable_seed("queryrec", self.seed, self.rank, epoch, batch_number)
        )
        user, time = self.samples["user"][index], self.samples["time"][index]
        for name, count in (("positive", self.n_pos), ("negative", self.n_neg)):
            lo, hi = self._after(name, user, time)
            pick, valid = _draw(generator, lo, hi, count)
            items = self.lists[name][1]
            batch[f"next_{name}"] = torch.where(valid, items[pick.clamp(max=items.numel() - 1)], 0)
            batch[f"next_{name}_mask"] = valid
        # q^t: the query of the user's last search session before t
        start, end = self.samples["search_start"][index], self.samples["search_end"][index]
        has = end > start
        last = torch.where(has, self.context["session_query"][(end - 1).clamp(min=0)], 0)
        batch["last_query"] = last
        if self.query_positives is not None:
            offsets, items = self.query_positives
            pick, valid = _draw(generator, offsets[last], offsets[last + 1], self.per_row)
            valid = valid & has[:, None]
            batch["query_positive"] = torch.where(
                valid, items[pick.clamp(max=max(items.numel() - 1, 0))], 0
            )
            batch["query_positive_mask"] = valid
            negatives = torch.randint(
                1, self.num_items + 1, (self.contrast_negatives,), generator=generator
            )
            batch["contrast_negatives"] = negatives
            batch["contrast_negative_mask"] = ~self._in_positive_set(last, negatives)

    def _in_positive_set(self, query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, N]: whether items[n] is in I_q+ of query[b]."""
        keys = self.positive_keys
        if keys.numel() == 0:
            return torch.zeros(query.numel(), items.numel(), dtype=torch.bool)
        wanted = (query[:, None] << 32) | items[None, :]
        found = torch.searchsorted(keys, wanted).clamp(max=keys.numel() - 1)
        return keys[found] == wanted
