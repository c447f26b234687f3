"""HR@k, NDCG@k and MRR from the rank of the positive among its candidates.

The state is a histogram of ranks (integer counts), so the sums are exact and the
reduction across processes gives bit-identical results to one process."""

from __future__ import annotations

import torch
from torchmetrics import Metric

HR_CUTOFFS = (1, 5, 10)
NDCG_CUTOFFS = (5, 10)


def positive_rank(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of column 0 among the row's scores. A tie counts against the
    positive, so a model that scores everything equal ranks it last, not first."""
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    return (scores[:, 1:] >= scores[:, :1]).sum(dim=1)


def metrics_from_ranks(rank_counts: torch.Tensor) -> dict[str, float]:
    counts = rank_counts.double()
    total = counts.sum().clamp(min=1)
    ranks = torch.arange(counts.numel(), dtype=torch.float64, device=counts.device)
    out = {f"hr@{k}": counts[:k].sum() / total for k in HR_CUTOFFS}
    discount = 1.0 / torch.log2(ranks + 2.0)
    out.update({f"ndcg@{k}": (counts[:k] * discount[:k]).sum() / total for k in NDCG_CUTOFFS})
    out["mrr"] = (counts / (ranks + 1.0)).sum() / total
    return {k: float(v) for k, v in out.items()}


class RankingMetrics(Metric):
    full_state_update = False

    def __init__(self, max_rank: int):
        super().__init__()
        self.max_rank = max_rank
        self.add_state("rank_counts", torch.zeros(max_rank, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ranks: torch.Tensor) -> None:
        self.rank_counts += torch.bincount(
            ranks.long().clamp(max=self.max_rank - 1), minlength=self.max_rank
        )

    def compute(self) -> dict[str, float]:
        return metrics_from_ranks(self.rank_counts)
