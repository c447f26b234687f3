"""IV4Rec+: each item's instruments (its clicked-through queries, training search only),
the two stages, and a training epoch on a sequential, a CF and a CTR backbone."""

from __future__ import annotations

import hydra
import numpy as np
import pytest
import torch

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


def test_the_item_is_the_fitted_part_plus_a_gated_share_of_the_residual(build_model):
    model, _, batch = build_model("method=iv4rec")
    model.eval()
    items = model.items
    ids = batch["rec_history"][batch["rec_history_mask"]]
    has_iv = (items.item_queries[ids] > 0).any(1)
    assert has_iv.any() and (~has_iv).any()  # the embedded data have both kinds
    row = int(has_iv.nonzero()[0])
    queries = items.item_queries[ids[row]]
    fitted = items.first_stage(model.queries(queries[queries > 0]).mean(0))
    treatment = items.raw(ids[row])
    w = torch.sigmoid(items.gate(torch.cat([fitted, treatment])))
    out = items(ids)
    assert torch.allclose(out[row], w * fitted + (1 - w) * treatment, atol=1e-6)
    assert not torch.allclose(out[row], treatment)
    # an item no query leads to is read untreated and is not regressed
    plain = int((~has_iv).nonzero()[0])
    assert torch.equal(out[plain], items.raw(ids[plain]))
    model.train()
    none_loss = items.first_stage_loss(
        ids[~has_iv], torch.ones(int((~has_iv).sum()), dtype=torch.bool)
    )
    assert none_loss.item() == 0.0
    # the first stage regresses on the treatment without moving it
    loss = items.first_stage_loss(ids, torch.ones(len(ids), dtype=torch.bool))
    loss.backward()
    assert items.raw.ids.weight.grad is None and items.first_stage[0].weight.grad is not None


def test_ctr_instruments_rank_queries_by_their_clicks():
    """The CTR view keeps each (query, clicked item) pair once with its click count: an
    item's instruments are its most clicked-through queries, not its lowest query ids."""
    view = View({
        "item_attributes": np.zeros((3, 1)),
        # query 1 -> item 2 (1 click); query 2 -> item 2 (1 click); query 3 -> item 2 (5 clicks)
        "query_clicked_offsets": np.array([0, 0, 1, 2, 3, 3]),
        "query_clicked_items": np.array([2, 2, 2]),
        "query_clicked_counts": np.array([1, 1, 5]),
    })  # fmt: skip
    assert item_queries(view, 2)[2].tolist() == [3, 1]


def test_ctr_view_counts_clicks_per_query_and_item(make_cfg):
    cfg = make_cfg("method=iv4rec", "backbone=din", "task=ctr", "protocol=queryrec")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    view = datamodule.load()
    counts = view["query_clicked_counts"]
    assert counts.shape == view["query_clicked_items"].shape and counts.min() >= 1
    assert counts.max() > 1  # some pair is clicked more than once


@pytest.mark.parametrize(
    "overrides", [("backbone=sasrec",), ("backbone=mlp",), ("backbone=din", "task=ctr", "protocol=queryrec")],
    ids=["sasrec", "mlp", "din-ctr"],
)  # fmt: skip
def test_one_epoch_and_every_parameter_trains(make_cfg, build_model, overrides, tmp_path):
    model, _, batch = build_model("method=iv4rec", *overrides)
    loss, parts = model.training_loss(batch)
    loss.backward()
    assert "first_stage" in parts
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    metrics = train(make_cfg("method=iv4rec", *overrides, output_dir=tmp_path))
    key = "test/auc" if "task=ctr" in overrides else "test/ndcg@5"
    assert 0.0 < metrics[key] <= 1.0
