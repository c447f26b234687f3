"""A method that trains search as well can be evaluated on both tasks in one run: rec
metrics under their usual keys, search under `search/`, and their mean for selection."""

from __future__ import annotations

import csv
import json

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from sar_exp.errors import ConfigError
from sar_exp.metrics.ranking import metrics_from_ranks, positive_rank
from sar_exp.train import run, train

BOTH = ("dataset.protocol.evaluated_tasks=[rec,search]", "optimized_metric=val/mean_ndcg@5")


def test_both_tasks_are_validated_and_tested(make_cfg, tmp_path):
    cfg = make_cfg(
        "method=jsr", "backbone=sasrec", "trainer.max_epochs=2", *BOTH, output_dir=tmp_path
    )
    metrics, best = run(cfg)
    assert {k.removeprefix("test/search/") for k in metrics if k.startswith("test/search/")} == {
        "hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr",
    }  # fmt: skip
    assert (
        json.loads((tmp_path / "metrics.json").read_text())["test/search/mrr"]
        == metrics["test/search/mrr"]
    )
    with (tmp_path / "csv" / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["epoch"].isdigit()]
    for row in rows:  # the selection metric is the mean of the two NDCG@5s
        mean = (float(row["val/ndcg@5"]) + float(row["val/search/ndcg@5"])) / 2
        assert float(row["val/mean_ndcg@5"]) == pytest.approx(mean, abs=1e-6)
    assert best == pytest.approx(max(float(r["val/mean_ndcg@5"]) for r in rows), abs=1e-6)

    # the search metrics are the search model's ranks of each clicked item under its query
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    model_class = hydra.utils.get_class(cfg.method.module._target_)
    model = model_class.load_from_checkpoint(
        tmp_path / "checkpoints" / "best.ckpt", lookup_tables=datamodule.lookup_tables()
    ).eval()
    ranks = []
    with torch.no_grad():
        for batch in datamodule.evaluation_loader("test", "search"):
            ranks.append(positive_rank(model.search_scores(batch, batch["candidates"])))
    counts = torch.bincount(torch.cat(ranks), minlength=100)
    assert metrics_from_ranks(counts)["mrr"] == pytest.approx(metrics["test/search/mrr"], abs=1e-6)
    assert int(counts.sum()) == datamodule.load().split("search", "test")["user"].size


def test_a_method_without_a_search_model_is_scored_on_rec_with_search_held_out(make_cfg, tmp_path):
    """Baselines of a two-task table train on the same data (search held out) and report
    rec only; selecting on a search metric is refused before any data is read."""
    metrics = train(make_cfg("backbone=mlp", BOTH[0], output_dir=tmp_path))
    assert sorted(metrics) == sorted(
        f"test/{k}" for k in ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")
    )
    with pytest.raises(
        ConfigError,
        match=r"optimized_metric=val/mean_ndcg@5 needs that task scored: method=base scores \[.rec.\]",
    ):
        train(
            make_cfg("backbone=mlp", *BOTH, "dataset.source=kuaisar", "dataset.path=/nonexistent")
        )


def test_the_two_task_run_keeps_rec_out_of_search_evaluation_and_vice_versa(make_cfg):
    """With search evaluated too, rec training ends before each user's search
    validation event as well (the cross-task rule runs both ways)."""
    cfg = make_cfg("method=jsr", "backbone=sasrec", *BOTH)  # the sequential view
    view = hydra.utils.instantiate(cfg.data, _convert_="all").load()
    first = {}
    for split in ("val", "test"):
        s = view.split("search", split)
        for u, t in zip(s["user"].tolist(), s["time"].tolist()):
            first[u] = min(first.get(u, t), t)
    train_rec = view.split("rec", "train")
    late = [
        t >= first.get(u, float("inf"))
        for u, t in zip(train_rec["user"].tolist(), train_rec["time"].tolist())
    ]
    assert not any(late)
    assert OmegaConf.select(cfg, "dataset.protocol.evaluated_tasks") == ["rec", "search"]


@pytest.mark.parametrize(
    "method, tasks, monitor",
    [("unisar", ["rec", "search"], "val/mean_ndcg@5"), ("zam", ["rec", "search"], "val/search/ndcg@5"),
     ("jsr", ["rec"], "val/ndcg@10")],
)  # fmt: skip
def test_a_method_that_needs_both_tasks_gets_them_by_default(make_cfg, method, tasks, monitor):
    """`python -m sar_exp method=unisar` holds out and scores both tasks and selects on the
    mean NDCG@5, with no other override; a method that asks nothing keeps the protocol's."""
    cfg = make_cfg(f"method={method}")
    assert list(cfg.dataset.protocol.evaluated_tasks) == tasks
    assert cfg.optimized_metric == monitor
    override = make_cfg(f"method={method}", "dataset.protocol.evaluated_tasks=[rec]",
                        "optimized_metric=val/ndcg@5")  # fmt: skip
    assert list(override.dataset.protocol.evaluated_tasks) == ["rec"]
