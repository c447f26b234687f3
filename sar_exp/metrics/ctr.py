"""CTR metrics: AUC, GAUC (per-user AUC averaged over users with both labels, each
weighted by their impressions, as DIN defines it), log loss.

Predictions are gathered with their sample index and sorted by it before computing,
so the result does not depend on how samples were split across processes. AUC uses
mid-ranks, so ties count half."""

from __future__ import annotations

import numpy as np
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def _midranks(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """1-based rank of each value within its group, ties sharing their mean rank."""
    order = np.lexsort((values, groups))
    v, g = values[order], groups[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(v.size), 0))
    position = np.arange(v.size) - group_start + 1.0
    new_tie = new_group | np.r_[True, v[1:] != v[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    mean_position = np.bincount(tie_id, weights=position) / np.bincount(tie_id)
    ranks = np.empty(v.size)
    ranks[order] = mean_position[tie_id]
    return ranks


def grouped_auc(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC per group, a mask of groups that have both labels, and each group's size."""
    _, gid = np.unique(groups, return_inverse=True)
    ranks = _midranks(scores, gid)
    positives = np.bincount(gid, weights=labels)
    negatives = np.bincount(gid) - positives
    rank_sum = np.bincount(gid, weights=ranks * labels)
    valid = (positives > 0) & (negatives > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return auc, valid, np.bincount(gid)


def ctr_metrics(logits: np.ndarray, labels: np.ndarray, users: np.ndarray) -> dict[str, float]:
    auc, valid, _ = grouped_auc(logits, labels, np.zeros_like(users))
    user_auc, user_valid, impressions = grouped_auc(logits, labels, users)
    weights = impressions[user_valid]
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    probs = np.clip(probs, 1e-7, 1 - 1e-7)
    logloss = -np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
    return {
        "auc": float(auc[0]) if valid[0] else float("nan"),
        # DIN (Zhou et al. 2018), Eq. 5: sum_u #impressions_u * AUC_u / sum_u #impressions_u
        "gauc": float((weights * user_auc[user_valid]).sum() / weights.sum())
        if user_valid.any()
        else float("nan"),
        "logloss": float(logloss),
    }


class CTRMetrics(Metric):
    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("logits", "labels", "users", "index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, logits, labels, users, index) -> None:
        self.logits.append(logits.detach().double())
        self.labels.append(labels.double())
        self.users.append(users.long())
        self.index.append(index.long())

    def compute(self) -> dict[str, float]:
        index = dim_zero_cat(self.index).cpu().numpy()
        order = np.argsort(index, kind="stable")
        pick = lambda s: dim_zero_cat(s).cpu().numpy()[order]  # noqa: E731
        return ctr_metrics(pick(self.logits), pick(self.labels), pick(self.users))
