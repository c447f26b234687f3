"""Multi-process training: every method/backbone pair trains in two CPU processes
(DDP, the same code path as trainer=ddp on GPUs), each rank on its own share of every
batch source; and trainer=ddp_sim (spawned processes) trains end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from sar_exp.train import run
from tests.conftest import REPO
from tests.ddp_pairs import PAIRS


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("ddp")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "ddp_pairs.py"), str(out), str(cache_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
             "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method,backbone", PAIRS, ids=[f"{m}-{b}" for m, b in PAIRS])
def test_every_pair_trains_in_two_processes(ddp_runs, method, backbone):
    out, results = ddp_runs
    result = results[f"{method}/{backbone}"]
    assert result["error"] is None, result["error"]
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    ranks = [
        json.loads((out / f"{method}_{backbone}" / f"probe_rank{r}.json").read_text())
        for r in (0, 1)
    ]
    # each rank its own share: disjoint rec samples, its own negatives and companions
    assert not set(ranks[0]["rec"]) & set(ranks[1]["rec"])
    a, b = (torch.tensor(r["negatives"]) for r in ranks)
    assert (a == b).float().mean() < 0.1  # independent draws, not one stream
    if "search" in ranks[0]:
        same = sum(x == y for x, y in zip(ranks[0]["search"], ranks[1]["search"]))
        assert same < 0.1 * len(ranks[0]["search"])
    assert [r["threads"] for r in ranks] == [1, 1]  # the config's count, in every rank


@pytest.mark.slow  # 28 s; every pair trains in two processes in the test above
def test_ddp_sim_trains_end_to_end(make_cfg, tmp_path):
    """trainer=ddp_sim spawns two processes (the old failure: unused parameters); the
    CSV log keeps every epoch and a sweep gets the best validation score."""
    cfg = make_cfg("backbone=mlp", "trainer=ddp_sim", "trainer.max_epochs=2",
                   "+trainer.limit_train_batches=3", output_dir=tmp_path)  # fmt: skip
    metrics, best_validation = run(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text())["test/mrr"] == metrics["test/mrr"]
    with (tmp_path / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["0", "1", "test"]
    assert rows[0]["val/ndcg@10"] and rows[1]["train/loss"]
    assert best_validation == max(float(r["val/ndcg@10"]) for r in rows[:2])
