"""Ranking metrics against a brute-force implementation, ties included."""

from __future__ import annotations

import math

import pytest
import torch

from sar_exp.metrics.ranking import RankingMetrics, positive_rank


def brute_force(scores: torch.Tensor) -> dict[str, float]:
    hr = {1: 0, 5: 0, 10: 0}
    ndcg = {5: 0.0, 10: 0.0}
    mrr = 0.0
    for row in scores.tolist():
        pos = row[0]
        rank = sum(1 for s in row[1:] if s >= pos)  # ties count against the positive
        for k in hr:
            hr[k] += rank < k
        for k in ndcg:
            ndcg[k] += 1 / math.log2(rank + 2) if rank < k else 0.0
        mrr += 1 / (rank + 1)
    n = scores.shape[0]
    out = {f"hr@{k}": v / n for k, v in hr.items()}
    out |= {f"ndcg@{k}": v / n for k, v in ndcg.items()}
    out["mrr"] = mrr / n
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (257, 100), generator=g).float()  # many ties
    metric = RankingMetrics(100)
    for chunk in scores.split(50):
        metric.update(positive_rank(chunk))
    got = metric.compute()
    expected = brute_force(scores)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


def test_constant_scores_do_not_look_perfect():
    metric = RankingMetrics(100)
    metric.update(positive_rank(torch.zeros(10, 100)))
    got = metric.compute()
    assert got["hr@10"] == 0.0 and got["ndcg@10"] == 0.0
    assert got["mrr"] == pytest.approx(1 / 100)


def test_nan_scores_rank_last():
    scores = torch.full((4, 100), float("nan"))
    assert positive_rank(scores).tolist() == [99, 99, 99, 99]


def test_perfect_scores():
    scores = torch.zeros(3, 100)
    scores[:, 0] = 1.0
    metric = RankingMetrics(100)
    metric.update(positive_rank(scores))
    assert metric.compute() == {
        "hr@1": 1.0,
        "hr@5": 1.0,
        "hr@10": 1.0,
        "ndcg@5": 1.0,
        "ndcg@10": 1.0,
        "mrr": 1.0,
    }
