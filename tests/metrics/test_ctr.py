"""AUC, GAUC and log loss against brute force, with ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sar_exp.metrics.ctr import CTRMetrics, ctr_metrics


def pairwise_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 400
    logits = rng.integers(-3, 4, n).astype(float)  # ties
    labels = (rng.random(n) < 0.4).astype(float)
    users = rng.integers(0, 30, n)
    got = ctr_metrics(logits, labels, users)
    assert got["auc"] == pytest.approx(pairwise_auc(logits, labels), abs=1e-12)
    per_user = [
        (pairwise_auc(logits[users == u], labels[users == u]), (users == u).sum())
        for u in np.unique(users)
        if 0 < labels[users == u].sum() < (users == u).sum()
    ]
    aucs, impressions = np.array(per_user).T
    assert got["gauc"] == pytest.approx((aucs * impressions).sum() / impressions.sum(), abs=1e-12)
    p = 1 / (1 + np.exp(-logits))
    expected = -np.mean([y * math.log(q) + (1 - y) * math.log(1 - q) for q, y in zip(p, labels)])
    assert got["logloss"] == pytest.approx(expected, rel=1e-9)


def test_metric_state_is_order_independent():
    rng = np.random.default_rng(3)
    logits, labels, users = (
        rng.normal(size=200),
        (rng.random(200) < 0.5).astype(float),
        rng.integers(0, 9, 200),
    )
    index = np.arange(200)

    def run(order):
        metric = CTRMetrics()
        for part in np.array_split(order, 4):
            metric.update(*(torch.from_numpy(a[part]) for a in (logits, labels, users, index)))
        return metric.compute()

    assert run(index) == run(rng.permutation(200))


def test_gauc_weights_each_user_by_impressions():
    # user 1: 4 impressions ranked perfectly (AUC 1); user 2: 2 ranked backwards (AUC 0);
    # user 3 has one label only and does not count
    logits = np.array([4.0, 3.0, 1.0, 0.0, 0.0, 1.0, 0.5])
    labels = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    users = np.array([1, 1, 1, 1, 2, 2, 3])
    assert ctr_metrics(logits, labels, users)["gauc"] == pytest.approx(4 / 6)  # not (1 + 0) / 2
