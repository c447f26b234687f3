"""IV4Rec+: each item's instruments (its clicked-through queries, training search only),
the two stages, and a training epoch on a sequential, a CF and a CTR backbone."""

from __future__ import annotations

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sar_exp.data.datamodule import item_queries
from sar_exp.data.views import View
from sar_exp.train import train


def test_item_queries_are_the_most_clicked_through_training_queries():
    view = View({
        "item_attributes": np.zeros((4, 1)),  # items 1..3
        # item 1: query 5 twice, 7 once, 2 once; item 2: query 9
        "search.train.item": np.array([1, 1, 1, 1, 2]),
        "search.train.query": np.array([5, 7, 5, 2, 9]),
        "search.test.item": np.array([3]),  # held out: never an instrument
        "search.test.query": np.array([4]),
    })  # fmt: skip
    assert item_queries(view, 2).tolist() == [[0, 0], [5, 2], [9, 0], [0, 0]]  # ties: lower id


def test_no_held_out_search_click_becomes_an_instrument(make_cfg):
    cfg = make_cfg("method=iv4rec", "protocol=unisar", "dataset.protocol.evaluated_tasks=[rec,search]",
                   "method.scores=[rec]")  # fmt: skip
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    view = datamodule.load()
    table = datamodule.lookup_tables()["item_queries"].numpy()
    train_pairs = set(zip(view["search.train.item"].tolist(), view["search.train.query"].tolist()))
    used = {(i, int(q)) for i, row in enumerate(table) for q in row if q}
    assert used and used <= train_pairs
    held_out = {(int(i), int(q)) for split in ("val", "test")
                for i, q in zip(view[f"search.{split}.item"], view[f"search.{split}.query"])} - train_pairs  # fmt: skip
    assert held_out and not held_out & used


def build(make_cfg, *overrides):
    cfg = make_cfg("method=iv4rec", *overrides)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    model = hydra.utils.instantiate(cfg.method.module, _partial_=True, _convert_="all")(
        schema=datamodule.schema, backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        task=cfg.task, lookup_tables=datamodule.lookup_tables(),
    )  # fmt: skip
    return model, next(iter(datamodule.train_dataloader()))


def test_the_item_is_the_fitted_part_plus_a_gated_share_of_the_residual(make_cfg):
    model, batch = build(make_cfg)
    model.eval()
    items = model.items
    ids = batch["item"]
    queries = items.item_queries[ids]
    row = int((queries > 0).any(1).nonzero()[0])  # an item some query leads to
    q = queries[row][queries[row] > 0]
    fitted = items.first_stage(model.queries(q).mean(0))
    treatment = items.raw(ids[row])
    w = torch.sigmoid(items.gate(torch.cat([fitted, treatment])))
    assert torch.allclose(items(ids)[row], fitted + (1 - w) * (treatment - fitted), atol=1e-6)
    # the first stage regresses on the treatment without moving it
    model.train()
    loss = items.first_stage_loss(ids[:, None], torch.ones(len(ids), 1))
    loss.backward()
    assert items.raw.ids.weight.grad is None and items.first_stage[0].weight.grad is not None


@pytest.mark.parametrize(
    "overrides", [("backbone=sasrec",), ("backbone=mlp",), ("backbone=din", "task=ctr", "protocol=queryrec")],
    ids=["sasrec", "mlp", "din-ctr"],
)  # fmt: skip
def test_one_epoch_and_every_parameter_trains(make_cfg, overrides, tmp_path):
    model, batch = build(make_cfg, *overrides)
    loss, parts = model.training_loss(batch)
    loss.backward()
    assert "first_stage" in parts
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    metrics = train(make_cfg("method=iv4rec", *overrides, output_dir=tmp_path))
    key = "test/auc" if "task=ctr" in overrides else "test/ndcg@5"
    assert 0.0 < metrics[key] <= 1.0
