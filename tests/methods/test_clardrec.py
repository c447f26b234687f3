"""ClardRec: loss terms against hand-worked values, the disentangling identity, and
each ablation flag removing exactly its part."""

from __future__ import annotations

import math

import pytest
import torch

from sar_exp.data.datamodule import SARDataModule
from sar_exp.methods.clardrec import ClardRec, GatedDisentangler
from sar_exp.methods.clardrec_losses import (
    constraint_loss,
    constraint_term,
    counterfactual_loss,
    data_augmentation_loss,
    matching_wise_loss,
    removal_wise_loss,
    search_loss,
)


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))  # -log sigma(-x)


def nls(x: float) -> float:
    return softplus(-x)  # -log sigma(x)


# One positive (column 0) and M = 2 negatives.
D = {
    "qi/q": torch.tensor([[-1.0, 0.5, 0.0]]),
    "ui/q": torch.tensor([[-0.2, 0.1, 0.3]]),
    "ui/u": torch.tensor([[-0.8, 0.2, 0.0]]),
    "qi/u": torch.tensor([[-0.1, 0.4, -0.2]]),
}


def test_matching_wise_terms_eq13():
    # Eq. 13 with the variations read as drops (-Delta), as Eq. 10-11 require:
    # L^{/q} = -log s(dui/q - dqi/q) - 1/M sum -log s(dqi-/q - dui-/q)
    l_q, l_u = matching_wise_loss(D)
    expected_q = nls(-0.2 - -1.0) + (nls(0.5 - 0.1) + nls(0.0 - 0.3)) / 2
    # L^{/u} = -log s(dqi/u - dui/u) - 1/M sum -log s(dui-/u - dqi-/u)
    expected_u = nls(-0.1 - -0.8) + (nls(0.2 - 0.4) + nls(0.0 - -0.2)) / 2
    assert l_q.item() == pytest.approx(expected_q, rel=1e-6)
    assert l_u.item() == pytest.approx(expected_u, rel=1e-6)
    assert expected_q == pytest.approx(
        1.05479, abs=1e-5
    )  # softplus(-0.8) + (softplus(-0.4) + softplus(0.3)) / 2
    # the literal printed form is the same expression with the signs of Delta flipped
    l_q_printed, _ = matching_wise_loss(D, "printed")
    assert l_q_printed.item() == pytest.approx(
        nls(-1.0 - -0.2) + (nls(0.1 - 0.5) + nls(0.3 - 0.0)) / 2, rel=1e-6
    )


def test_removal_wise_terms_eq14_and_total_eq15():
    l_qi, l_ui = removal_wise_loss(D)
    expected_qi = nls(-0.1 - -1.0) + (nls(0.5 - 0.4) + nls(0.0 - -0.2)) / 2
    expected_ui = nls(-0.2 - -0.8) + (nls(0.2 - 0.1) + nls(0.0 - 0.3)) / 2
    assert l_qi.item() == pytest.approx(expected_qi, rel=1e-6)
    assert l_ui.item() == pytest.approx(expected_ui, rel=1e-6)
    total = sum(t.item() for t in (*matching_wise_loss(D), l_qi, l_ui))
    assert counterfactual_loss(D).item() == pytest.approx(total, rel=1e-6)


# Each relation of Eq. 10-12 as (term, the variation that must move more, the one that
# must move less). Delta = after - before: a positive's scores drop (Delta < 0), a
# negative's rise (Delta > 0); "moves more" is the larger |Delta|.
RELATIONS = [
    ("/q", "qi/q", "ui/q"),  # Eq. 10
    ("/u", "ui/u", "qi/u"),  # Eq. 11
    ("qi", "qi/q", "qi/u"),  # Eq. 12, left
    ("ui", "ui/u", "ui/q"),  # Eq. 12, right
]


def _term(name: str, d: dict, direction: str = "drop") -> float:
    l_q, l_u = matching_wise_loss(d, direction)
    l_qi, l_ui = removal_wise_loss(d, direction)
    return {"/q": l_q, "/u": l_u, "qi": l_qi, "ui": l_ui}[name].item()


def _variations(more: str, less: str, positive: tuple, negative: tuple) -> dict:
    """One positive and one negative; `positive`/`negative` give (Delta_more, Delta_less)."""
    d = {k: torch.zeros(1, 2) for k in ("qi/q", "ui/q", "ui/u", "qi/u")}
    d[more] = torch.tensor([[positive[0], negative[0]]])
    d[less] = torch.tensor([[positive[1], negative[1]]])
    return d


@pytest.mark.parametrize("name,more,less", RELATIONS, ids=[r[0] for r in RELATIONS])
def test_each_cd_term_prefers_the_relation_it_encodes(name, more, less):
    neutral = (0.0, 0.0)
    # positive: removing features lowers its scores; the relation holds when `more` drops more
    satisfied = _term(name, _variations(more, less, (-1.0, -0.2), neutral))
    violated = _term(name, _variations(more, less, (-0.2, -1.0), neutral))
    assert satisfied < violated
    # negative: removing features raises its scores; the relation holds when `more` rises more
    satisfied = _term(name, _variations(more, less, neutral, (1.0, 0.2)))
    violated = _term(name, _variations(more, less, neutral, (0.2, 1.0)))
    assert satisfied < violated


@pytest.mark.parametrize("name,more,less", RELATIONS, ids=[r[0] for r in RELATIONS])
def test_the_printed_form_of_eq13_14_rewards_the_reverse_relation(name, more, less):
    """Why cd_direction defaults to "drop": the literal Eq. 13-14 prefer the violation."""
    neutral = (0.0, 0.0)
    satisfied = _term(name, _variations(more, less, (-1.0, -0.2), neutral), "printed")
    violated = _term(name, _variations(more, less, (-0.2, -1.0), neutral), "printed")
    assert satisfied > violated


def test_constraint_eq16_eq17():
    # positive: max(delta, 0); negatives: mean of max(-delta, 0)
    assert constraint_term(D["ui/q"]).item() == pytest.approx(0.0 + (0.0 + 0.0) / 2)
    assert constraint_term(D["qi/u"]).item() == pytest.approx(0.0 + (0.0 + 0.2) / 2)
    assert constraint_term(torch.tensor([[0.3, -0.4, 0.1]])).item() == pytest.approx(0.3 + 0.4 / 2)
    assert constraint_loss(D).item() == pytest.approx(
        0.1 + 0.0 + 0.0 + 0.0
    )  # only qi/u contributes


def test_search_loss_eq22():
    s_ui = torch.tensor([[2.0, 0.0, 1.0]])
    s_qi = torch.tensor([[0.0, 0.0, 0.0]])
    ce_ui = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1))) / 3  # Eq. 4 with 1/(1+M)
    ce_qi = -math.log(1 / 3) / 3
    assert search_loss(s_ui, s_qi).item() == pytest.approx(ce_ui + ce_qi, rel=1e-6)


def test_data_augmentation_eq21_and_eq32():
    r_aug = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    confidence = torch.tensor([1.0, 0.0])
    ce = [-math.log(math.exp(2) / (math.exp(2) + 1)) / 2, -math.log(1 / (1 + math.e)) / 2]
    w = [math.e / (math.e + 1), 1 / (math.e + 1)]  # in-batch softmax of s_{ui/q}
    assert data_augmentation_loss(r_aug, confidence).item() == pytest.approx(
        w[0] * ce[0] + w[1] * ce[1], rel=1e-6
    )
    assert data_augmentation_loss(r_aug, None).item() == pytest.approx(
        (ce[0] + ce[1]) / 2, rel=1e-6
    )


def test_disentangling_identity_and_gate_ranges():
    torch.manual_seed(0)
    gate = GatedDisentangler(part_dim=8, num_attributes=3, hidden_dim=16)
    parts = [torch.randn(5, 4, 8) for _ in range(4)]
    i_q, i_u, z_id, z_attr = gate(parts)
    assert torch.allclose(
        (i_q + i_u) / 2, torch.cat(parts, -1), atol=1e-6
    )  # i_emb = (i_/q + i_/u) / 2
    assert z_id.shape == (5, 4, 8) and z_attr.shape == (5, 4, 3)
    assert ((z_id > 0) & (z_id < 1)).all() and ((z_attr > 0) & (z_attr < 1)).all()
    # one scalar gate per attribute: each attribute block is scaled uniformly
    ratio = i_q[..., 8:16] / (2 * parts[1])
    assert torch.allclose(ratio, z_attr[..., :1].expand_as(ratio), atol=1e-5)


@pytest.fixture(scope="module")
def batch_and_schema(tiny_folder, tmp_path_factory):
    dm = SARDataModule(
        "kuaisar", str(tiny_folder), str(tmp_path_factory.mktemp("c")), "sequential",
        ["search_active_level", "rec_active_level"], ["first_level_category_id", "author_id"],
        batch_size=16, companion_batch_sizes={"search": 8},
    )  # fmt: skip
    dm.setup()
    return next(iter(dm.train_dataloader())), dm.schema, dm.lookup_tables()


SASREC = {
    "encoder": {"_target_": "sar_exp.backbones.sasrec.SASRecEncoder", "layers": 1, "heads": 2}
}


def _model(batch_and_schema, **flags):
    torch.manual_seed(0)
    _, schema, tables = batch_and_schema
    return ClardRec(schema, SASREC, lookup_tables=tables, hidden_dim=16, embedding_dim=8, **flags)


def _grads(model, batch):
    model.zero_grad()
    loss, parts = model.training_loss(batch)
    loss.backward()
    return loss, parts


def test_full_model_trains_every_part(batch_and_schema):
    batch = batch_and_schema[0]
    model = _model(batch_and_schema)
    loss, parts = _grads(model, batch)
    assert set(parts) == {"rec", "src", "cd", "con", "da"}
    assert torch.isfinite(loss)
    for name in ("disentangler", "fusion_gate", "search_user_encoder", "rec_user_encoder"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_total_loss_is_eq23(batch_and_schema):
    batch = batch_and_schema[0]
    model = _model(batch_and_schema, lambda_=0.3, alpha=0.5, beta=0.7, gamma=0.11)
    loss, p = model.training_loss(batch)
    expected = p["rec"] + 0.3 * (p["src"] + 0.5 * p["cd"] + 0.7 * p["da"] + 0.11 * p["con"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_without_da_exactly_the_da_term_is_gone(batch_and_schema):
    batch = batch_and_schema[0]
    full_loss, full = _model(batch_and_schema).training_loss(batch)
    model = _model(batch_and_schema, use_da=False)
    loss, parts = _grads(model, batch)
    assert "da" not in parts
    assert loss.item() == pytest.approx((full_loss - 0.02 * 0.5 * full["da"]).item(), rel=1e-5)
    # the data-augmentation path (rec user encoder applied to search clicks) gets no gradient
    with_da = _model(batch_and_schema)
    _grads(with_da, batch)
    da_only = [(a.grad - b.grad).abs().sum() for a, b in zip(with_da.rec_user_encoder.parameters(),
               model.rec_user_encoder.parameters()) if a.grad is not None]  # fmt: skip
    assert sum(da_only) > 0  # with DA, extra gradient reaches the rec encoder via L_da


def test_without_cd_no_disentangling(batch_and_schema):
    batch = batch_and_schema[0]
    model = _model(batch_and_schema, use_cd=False)
    _, parts = _grads(model, batch)
    assert "cd" not in parts and "con" not in parts
    assert not hasattr(model, "disentangler")  # nothing left untrained
    # i_/q^src is replaced by the plain search item representation
    items = model.query_independent_items(batch["candidates"])
    assert torch.equal(items["i_/q"], items["i_src"])


def test_without_fa_score_is_eq3(batch_and_schema):
    batch = batch_and_schema[0]
    model = _model(batch_and_schema, use_fa=False)
    _grads(model, batch)
    assert not hasattr(model, "fusion_gate")
    user = model.rec_user(batch)
    items = model.rec_item_encoder(model.items(batch["candidates"]))
    assert torch.allclose(model.score(batch, batch["candidates"]), (user[:, None] * items).sum(-1))


def test_without_cs_da_is_eq32(batch_and_schema):
    batch = batch_and_schema[0]
    model = _model(batch_and_schema, use_cs=False)
    _, parts = model.training_loss(batch)
    search = batch["search"]
    i_q = model.query_independent_items(search["candidates"])["i_/q"]
    r_aug = (model.rec_user(search)[:, None] * i_q).sum(-1)
    assert parts["da"].item() == pytest.approx(data_augmentation_loss(r_aug, None).item(), rel=1e-5)


def _deltas(model, batch):
    """Delta_/q and Delta_/u (after - before) for the user (u) and query (q) scores."""
    search = batch["search"]
    items = model.query_independent_items(search["candidates"])
    removed_q, removed_u = {}, {}
    for who, vec in (("u", model.search_user(search)), ("q", model.queries(search["query"]))):
        score = {k: (vec.unsqueeze(1) * v).sum(-1) for k, v in items.items()}
        removed_q[who] = score["i_/q"] - score["i_src"]
        removed_u[who] = score["i_/u"] - score["i_src"]
    return removed_q, removed_u


def test_one_item_encoder_layer_makes_the_matching_terms_coincide_and_says_so(
    batch_and_schema, caplog
):
    batch = batch_and_schema[0]
    with caplog.at_level("WARNING", logger="sar_exp.methods.clardrec"):
        affine = _model(batch_and_schema, item_layers=1)
    assert "L_cd^/q and L_cd^/u coincide" in caplog.text
    assert "L_con pulls i_/q back to i" in caplog.text
    removed_q, removed_u = _deltas(affine, batch)
    for who in ("u", "q"):  # Delta_/u = -Delta_/q when Enc^i_src is affine
        assert torch.allclose(removed_u[who], -removed_q[who], atol=1e-6, rtol=1e-4)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sar_exp.methods.clardrec"):
        deep = _model(batch_and_schema, item_layers=2)
    assert "coincide" not in caplog.text
    removed_q, removed_u = _deltas(deep, batch)
    gap = (removed_u["u"] + removed_q["u"]).abs().max()
    assert gap > 0.01 * removed_q["u"].abs().max(), gap


def test_an_unknown_cd_direction_is_refused(batch_and_schema):
    with pytest.raises(Exception, match="method.module.cd_direction must be one of"):
        _model(batch_and_schema, cd_direction="reversed")
