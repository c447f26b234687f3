"""The search-enhanced recommenders of the papers' baseline rows (Query-SeqRec, NRHUB):
what makes each that model, and a training epoch of each."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from sar_exp.train import train


def build(make_cfg, method: str, *overrides):
    cfg = make_cfg(f"method={method}", *overrides)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    module = hydra.utils.instantiate(cfg.method.module, _partial_=True, _convert_="all")(
        schema=datamodule.schema, backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        task=cfg.task, lookup_tables=datamodule.lookup_tables(),
    )  # fmt: skip
    return module.eval(), next(iter(datamodule.train_dataloader()))


def test_query_seqrec_reads_the_queries_among_the_items_in_time_order(make_cfg):
    model, batch = build(make_cfg, "queryseqrec")
    kind, mask = batch["interleaved_type"], batch["interleaved_mask"]
    row = int(((kind == 0) & mask).sum(1).argmax())  # a user with searches in the window
    slot = int(((kind[row] == 0) & mask[row]).nonzero()[-1])  # their newest search
    user = model.user_representation(batch)
    other = {**batch, "interleaved_query": batch["interleaved_query"].clone()}
    other["interleaved_query"][row, slot] = (batch["interleaved_query"][row, slot] % 50) + 1
    assert not torch.allclose(model.user_representation(other)[row], user[row])
    # the same tokens in another order are another sequence (positions, causal attention)
    swapped = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    first_rec = int(((kind[row] == 1) & mask[row]).nonzero()[0])
    for key in ("interleaved_type", "interleaved_item", "interleaved_query"):
        swapped[key][row, [first_rec, slot]] = batch[key][row, [slot, first_rec]]
    assert not torch.allclose(model.user_representation(swapped)[row], user[row])
    # a search slot's item id is not read (only its query is)
    noise = {**batch, "interleaved_item": batch["interleaved_item"].clone()}
    noise["interleaved_item"][row, slot] = 7
    assert torch.allclose(model.user_representation(noise), user, atol=1e-6)


def test_query_seqrec_positions_span_the_merged_history(make_cfg):
    model, _ = build(make_cfg, "queryseqrec", "protocol=unisar")
    assert model.encoder.positions.num_embeddings == model.schema["max_interleaved_history"] == 60


def test_nrhub_pools_three_behaviour_views_by_attention(make_cfg):
    model, batch = build(make_cfg, "nrhub")
    views = model.views(batch)
    assert list(views) == ["rec_clicks", "search_queries", "search_clicks"]
    pooled = torch.stack([model.record_attention[n](*views[n]) for n in views], 1)
    present = torch.stack([valid.any(1) for _, valid in views.values()], 1)
    # the view attention by hand: softmax of q . tanh(V h + v) over the present views
    attention = model.view_attention
    scores = attention.query(torch.tanh(attention.project(pooled))).squeeze(-1)
    weights = torch.softmax(scores.masked_fill(~present, float("-inf")), -1)
    expected = (weights.nan_to_num(0.0).unsqueeze(-1) * pooled).sum(1)  # no behaviour: zeros
    assert torch.allclose(model.user_representation(batch), expected, atol=1e-5)
    # a user without searches is their rec clicks alone
    no_search = {**batch, "search_history_mask": torch.zeros_like(batch["search_history_mask"]),
                 "search_click_history_mask": torch.zeros_like(batch["search_click_history_mask"])}  # fmt: skip
    rec_only = model.record_attention["rec_clicks"](*views["rec_clicks"])
    has_rec = batch["rec_history_mask"].any(1)
    assert torch.allclose(
        model.user_representation(no_search)[has_rec], rec_only[has_rec], atol=1e-6
    )


@pytest.mark.parametrize("method", ["queryseqrec", "nrhub"])
def test_one_step_reaches_every_parameter(make_cfg, method):
    model, batch = build(make_cfg, method)
    model.train()
    loss, _ = model.training_loss(batch)
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("method", ["queryseqrec", "nrhub"])
def test_one_epoch_on_the_embedded_data(make_cfg, method, tmp_path):
    metrics = train(make_cfg(f"method={method}", output_dir=tmp_path))
    assert 0.0 <= metrics["test/ndcg@5"] <= 1.0 and metrics["test/hr@10"] > 0.0
