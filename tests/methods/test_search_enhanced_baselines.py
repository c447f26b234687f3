"""The search-enhanced recommenders of the papers' baseline rows (Query-SeqRec, NRHUB):
what makes each that model, and a training epoch of each."""

from __future__ import annotations

import pytest
import torch

from sar_exp.train import train


@pytest.fixture
def build(build_model):
    def _build(method: str, *overrides):
        model, _, batch = build_model(f"method={method}", *overrides)
        return model.eval(), batch

    return _build


def test_query_seqrec_reads_the_queries_among_the_items_in_time_order(build):
    model, batch = build("queryseqrec")
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


def test_query_seqrec_positions_span_the_merged_history(build):
    model, _ = build("queryseqrec", "protocol=unisar")
    assert model.encoder.positions.num_embeddings == model.schema["max_interleaved_history"] == 60


def test_query_seqrec_tokens_are_items_then_each_query_and_its_clicks():
    """One user: rec click 11, then a search for query 3 with clicks 21 and 22, then rec
    click 12: tokens [11, q3, 21, 22, 12]; the newest four are kept."""
    from types import SimpleNamespace

    from sar_exp.methods.query_seqrec import QuerySeqRec

    batch = {
        "interleaved_type": torch.tensor([[1, 0, 1]]),
        "interleaved_mask": torch.tensor([[True, True, True]]),
        "interleaved_item": torch.tensor([[11, 0, 12]]),
        "interleaved_query": torch.tensor([[0, 3, 0]]),
        "interleaved_clicks": torch.tensor([[[0, 0], [21, 22], [0, 0]]]),
    }
    fake = SimpleNamespace(
        items=lambda ids: ids.unsqueeze(-1).float().expand(*ids.shape, 2),
        queries=lambda q: q.unsqueeze(-1).float(),
        query_project=lambda x: -x.expand(*x.shape[:-1], 2),  # a query q reads as -q
        behaviour_types=lambda t: torch.zeros(*t.shape, 2) + (1 - t).unsqueeze(-1) * 100,
        schema={"max_interleaved_history": 4},
    )
    steps, mask = QuerySeqRec.tokens(fake, batch)
    assert steps[0, mask[0], 0].tolist() == [97.0, 21.0, 22.0, 12.0]  # the query: -3 + 100


def test_nrhub_encodes_queries_by_a_word_cnn_and_pools_each_view_by_attention(build):
    model, batch = build("nrhub")
    views = model.views(batch)
    # a query's record: the CNN over its words then word attention
    row, slot = batch["search_history_mask"].nonzero()[0].tolist()
    words = model.queries.query_words[batch["search_history_query"][row, slot]]
    valid = words > 0
    inputs = (model.queries.words(words) * valid[:, None]).T.unsqueeze(0)
    hidden = torch.relu(model.query_encoder.conv(inputs)).squeeze(0).T
    attention = model.query_encoder.attention
    logits = attention.query(torch.tanh(attention.project(hidden))).squeeze(-1)
    weights = torch.softmax(logits.masked_fill(~valid, float("-inf")), 0)
    assert torch.allclose(views["search_queries"][0][row, slot], weights @ hidden, atol=1e-5)
    # each candidate is scored through the same item encoder as the clicked records
    user = model.user_representation(batch)
    expected = (user.unsqueeze(1) * model.item_encoder(model.items(batch["candidates"]))).sum(-1)
    assert torch.allclose(model.score(batch, batch["candidates"]), expected, atol=1e-5)
    # a user without searches is their rec clicks alone
    no_search = {**batch, "search_history_mask": torch.zeros_like(batch["search_history_mask"]),
                 "search_click_history_mask": torch.zeros_like(batch["search_click_history_mask"])}  # fmt: skip
    rec_only = model.record_attention["rec_clicks"](*views["rec_clicks"])
    has_rec = batch["rec_history_mask"].any(1)
    assert torch.allclose(
        model.user_representation(no_search)[has_rec], rec_only[has_rec], atol=1e-6
    )
    # and a batch without any search still trains, with finite gradients everywhere
    model.train()
    loss, _ = model.training_loss(no_search)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("method", ["queryseqrec", "nrhub"])
def test_one_step_reaches_every_parameter(build, method):
    model, batch = build(method)
    model.train()
    loss, _ = model.training_loss(batch)
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("method", ["queryseqrec", "nrhub"])
def test_one_epoch_on_the_embedded_data(make_cfg, method, tmp_path):
    metrics = train(make_cfg(f"method={method}", output_dir=tmp_path))
    assert 0.0 <= metrics["test/ndcg@5"] <= 1.0 and metrics["test/hr@10"] > 0.0


def test_jsr_with_din_is_two_dins_and_the_search_one_reads_the_query(build):
    from sar_exp.methods.baselines import JointSearchRec, TargetAwareJSR

    both = ("dataset.protocol.evaluated_tasks=[rec,search]", "optimized_metric=val/mean_ndcg@5")
    model, batch = build("jsr", "backbone=din", *both)
    assert type(model) is TargetAwareJSR  # method=jsr backbone=din picks it
    sasrec, _ = build("jsr", "backbone=sasrec", *both)
    assert type(sasrec) is JointSearchRec
    search = batch["search"]
    scores = model.search_scores(search, search["candidates"])
    other_query = {**search, "query": search["query"].roll(1, 0)}
    assert scores.shape == search["candidates"].shape
    assert not torch.allclose(model.search_scores(other_query, search["candidates"]), scores)
    # the rec model does not read the search tower's parameters
    model.train()
    rec = model.score(batch, batch["candidates"]).sum()
    rec.backward()
    assert all(p.grad is None for p in model.search_scorer.parameters())
    model.zero_grad(set_to_none=True)
    loss, parts = model.training_loss(batch)
    loss.backward()
    assert set(parts) == {"rec", "src"}
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
