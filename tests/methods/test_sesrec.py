"""SESRec (Si et al., SIGIR'23): each equation against a direct computation, the
ablations, the encoders and one epoch end to end."""

from __future__ import annotations

import pytest
import torch

from sar_exp.errors import ConfigError

D = 16


@pytest.fixture(scope="module")
def sesrec_model(tiny_folder, tmp_path_factory):
    from sar_exp.data.datamodule import SARDataModule

    dm = SARDataModule(
        "kuaisar", str(tiny_folder), str(tmp_path_factory.mktemp("c")), "sequential",
        ["search_active_level", "rec_active_level"], ["first_level_category_id", "author_id"],
        protocol={"require_both_histories": True, "max_rec_history": 20, "max_search_history": 8},
        batch_size=32,
    )  # fmt: skip
    dm.setup()
    batch = next(iter(dm.train_dataloader()))

    def build(backbone="sasrec", **flags):
        from sar_exp.methods.sesrec import SESRec

        torch.manual_seed(0)
        return SESRec(dm.schema, {"name": backbone}, lookup_tables=dm.lookup_tables(),
                      embedding_dim=8, hidden_dim=D, align_negatives=32, **flags)  # fmt: skip

    return build, batch


@pytest.mark.parametrize(
    "flags, parts",
    [
        ({}, {"rec", "ali", "con"}),
        ({"use_mie": False}, {"rec", "ali", "con"}),
        ({"use_mie": False, "use_contrast": False}, {"rec", "ali"}),
        ({"use_mie": False, "use_contrast": False, "use_align": False}, {"rec"}),
        ({"paper_losses": False, "threshold": "median"}, {"rec", "ali", "con"}),
        ({"backbone": "gru4rec", "threshold": 0.125}, {"rec", "ali", "con"}),
    ],
)
def test_every_table3_variant_trains_every_part_it_has(sesrec_model, flags, parts):
    """Table 3's rows (base, +L_ali, +L_con, +MIE) and the other switches: each loss part
    present, finite, and every parameter reached (DDP needs it)."""
    build, batch = sesrec_model
    model = build(**flags)
    loss, got = model.training_loss(batch)
    loss.backward()
    assert set(got) == parts and torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_without_the_search_history_base_reads_only_the_rec_history(sesrec_model):
    """use_search=false (the attribution row, not the paper's): scores ignore the searches,
    keep base's rec-side weights, and every remaining parameter trains."""
    build, batch = sesrec_model
    base_flags = {"use_align": False, "use_contrast": False, "use_mie": False}
    model = build(use_search=False, **base_flags).eval()
    scores = model.score(batch, batch["candidates"])
    other = {**batch, "search_history_query": batch["search_history_query"].flip(0),
             "search_history_clicks": batch["search_history_clicks"].flip(0),
             "search_history_mask": batch["search_history_mask"].flip(0)}  # fmt: skip
    assert torch.equal(model.score(other, batch["candidates"]), scores)
    base = build(**base_flags).eval()
    assert not torch.equal(
        base.score(other, batch["candidates"]), base.score(batch, batch["candidates"])
    )
    # every part the two share starts equal (the predictor's input is narrower)
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("predictor.")}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in shared.items())
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"queries", "query_projection", "sources"}
    model.train()
    loss, _ = model.training_loss(batch)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    with pytest.raises(ConfigError, match="use_search=false needs use_align=false"):
        build(use_search=False)


def test_total_loss_is_eq23(sesrec_model):
    build, batch = sesrec_model
    model = build(alpha=0.3, beta=0.7)
    loss, p = model.training_loss(batch)
    assert loss.item() == pytest.approx(
        (p["rec"] + 0.3 * p["ali"] + 0.7 * p["con"]).item(), rel=1e-5
    )


def test_bad_settings_are_refused_naming_the_key(sesrec_model):
    build, _ = sesrec_model
    with pytest.raises(ConfigError, match="use_mie needs use_contrast"):
        build(use_contrast=False)
    with pytest.raises(ConfigError, match="threshold must be mean, median or a number"):
        build(threshold="max")
    with pytest.raises(ConfigError, match="sasrec or gru4rec"):
        build(backbone="mlp")


def _encoded(sesrec_model, **flags):
    build, batch = sesrec_model
    model = build(**flags).eval()
    items, queries = model._lookups(batch, batch["candidates"])
    return model, batch, items, queries, model.encode(batch, items, queries)


def test_coattention_and_the_split_are_eq9_to_12(sesrec_model):
    model, batch, _, _, h = _encoded(sesrec_model)
    for b in range(4):
        r_valid, s_valid = h["rec_valid"][b], h["search_valid"][b]
        h_r, h_s = h["rec"][b][r_valid], h["search"][b][s_valid]
        a = torch.tanh(h_s @ model.affinity.weight.T @ h_r.T)  # Eq. 9, [Ts, Tr]
        a_s = torch.softmax(model.coattention["rec"].weight @ h_r.T @ a.T, dim=-1)[0]  # Eq. 10
        a_r = torch.softmax(model.coattention["search"].weight @ h_s.T @ a, dim=-1)[0]
        assert torch.allclose(h["search_scores"][b][s_valid], a_s, atol=1e-5)
        assert torch.allclose(h["rec_scores"][b][r_valid], a_r, atol=1e-5)
        for side, scores, valid in (("rec", a_r, r_valid), ("search", a_s, s_valid)):
            similar = scores > 1.0 / len(scores)  # Eq. 11-12, gamma = 1 / T
            if similar.all() or not similar.any():  # one set empty: both are everything
                similar = torch.ones_like(similar)
                dissimilar = similar
            else:
                dissimilar = ~similar
            assert torch.equal(h[f"{side}_similar"][b][valid], similar)
            assert torch.equal(h[f"{side}_dissimilar"][b][valid], dissimilar)
            assert not (h[f"{side}_similar"][b] & ~valid).any()
    # some rows do split (the test would not see a wrong split otherwise)
    assert (h["rec_similar"] != h["rec_dissimilar"]).any()


@pytest.mark.parametrize("threshold, strict", [("median", True), ("median", False), (0.125, True)])
def test_other_thresholds_split_at_the_median_or_the_constant(sesrec_model, threshold, strict):
    """Table 4's thresholds; paper_split=false is the code's a >= gamma, which puts the
    median slot itself among the similar ones."""
    _, _, _, _, h = _encoded(sesrec_model, threshold=threshold, paper_split=strict)
    checked = 0
    for b in range(8):
        valid = h["rec_valid"][b]
        scores = h["rec_scores"][b][valid]
        gamma = scores.sort().values[(len(scores) - 1) // 2] if threshold == "median" else threshold
        similar = scores > gamma if strict else scores >= gamma
        if similar.any() and not similar.all():
            assert torch.equal(h["rec_similar"][b][valid], similar)
            checked += 1
    assert checked > 0


def test_interest_contrast_is_eq13_to_16(sesrec_model):
    model, _, _, _, h = _encoded(sesrec_model, margin=0.5)
    expected = 0.0
    rows = h["rec_valid"].shape[0]
    for b in range(rows):
        for side in ("rec", "search"):
            x, a = h[side][b], h[f"{side}_scores"][b]
            anchor = (a[:, None] * x).sum(0)  # Eq. 13-14
            positive = x[h[f"{side}_similar"][b]].mean(0)
            negative = x[h[f"{side}_dissimilar"][b]].mean(0)
            d_p, d_n = (anchor - positive).norm(), (anchor - negative).norm()
            expected += max(d_p - d_n + 0.5, 0.0)  # Eq. 15, summed over the two (Eq. 16)
    assert model._contrast(h).item() == pytest.approx(float(expected) / rows, rel=1e-4)


def test_alignment_is_eq6_to_8_over_the_history_pairs(sesrec_model):
    from sar_exp.methods.search_history import history_pairs
    from tests.methods.test_unisar import _naive_relevance

    build, batch = sesrec_model
    for form in ("paper", "printed", "official"):
        paper = form != "official"
        model = build(paper_losses=paper, positive_in_denominator=form == "paper").eval()
        negatives = (torch.arange(1, 9), torch.arange(1, 6))
        items, queries = model._lookups(batch, batch["candidates"], negatives)
        pair_q, pair_i = history_pairs(batch)
        assert len(pair_q) > 0
        naive = _naive_relevance(
            model.align_sim, queries(pair_q), items(pair_i), items(negatives[0]),
            queries(negatives[1]), form,
        )  # fmt: skip
        # Eq. 8 halves the two directions' sum (the code's form is halved already)
        expected = 0.5 * naive if paper else naive
        got = model._alignment(batch, items, queries, negatives)
        assert got.item() == pytest.approx(expected, rel=1e-4)


def test_interest_extraction_is_eq17_to_21(sesrec_model):
    model, batch, items, queries, h = _encoded(sesrec_model)
    candidates = batch["candidates"][:2]
    sub = {k: v[:2] for k, v in h.items()}
    got = model._predict({"user": batch["user"][:2]}, candidates, items, sub)
    e_v = items(candidates)
    for b in range(2):
        parts = []
        for side in ("rec", "search"):
            attention = model.target_attention[side]
            for mask in ("valid", "similar", "dissimilar"):
                slots = h[side][b][h[f"{side}_{mask}"][b]]  # [n, d]
                weights = torch.softmax(attention.weight(slots) @ e_v[b].T, dim=0)  # Eq. 17-19
                parts.append(weights.T @ slots)  # [K, d]
        e_u = model.users(batch["user"][b : b + 1]).expand(len(candidates[b]), -1)
        x = torch.cat([*parts, e_v[b], e_u], dim=-1)  # Eq. 20-21
        assert torch.allclose(got[b], model.predictor(x).squeeze(-1), atol=1e-5)


def test_a_query_is_its_id_embedding_beside_its_mean_word(sesrec_model):
    model, batch, *_ = _encoded(sesrec_model)
    q = batch["search_history_query"][batch["search_history_mask"]][:5]
    words = model.queries.mean_of_words(model.queries.query_words[q])
    assert torch.equal(model.queries(q), torch.cat([model.queries.ids(q), words], dim=-1))
    assert model.queries.out_dim == 2 * model.queries.words.embedding_dim


def test_gru_states_follow_the_newest_step_and_refuse_holes():
    from sar_exp.methods.sesrec import GRUStates

    torch.manual_seed(0)
    gru = GRUStates(D, 1, 0.0)
    steps = torch.randn(3, 6, D)
    valid = torch.arange(6) < torch.tensor([[4], [6], [0]])
    out = gru(steps, valid)
    assert out.shape == (3, 6, D) and not out[0, 4:].any() and not out[2].any()
    changed = steps.clone()
    changed[0, 3] += 1.0  # the newest valid step of row 0
    after = gru(changed, valid)
    assert torch.equal(after[0, :3], out[0, :3]) and not torch.allclose(after[0, 3], out[0, 3])
    holes = valid.clone()
    holes[1, 2] = False
    with pytest.raises(ValueError, match="left-aligned without holes"):
        gru(steps, holes)


def test_one_epoch_end_to_end(make_cfg, tmp_path):
    from sar_exp.train import train

    cfg = make_cfg("method=sesrec", "protocol=sesrec", "dataset.protocol.max_rec_history=20",
                   "method.module.align_negatives=64", output_dir=tmp_path)  # fmt: skip
    metrics = train(cfg)
    assert set(metrics) >= {"test/ndcg@5", "test/hr@10", "test/mrr"}
    assert 0.0 <= metrics["test/ndcg@5"] <= 1.0


def test_every_ablation_starts_from_the_same_weights_and_the_code_s_init(sesrec_model):
    """Table 3's rows differ only in what trains: the parts they share start equal; with
    init=official (the code's xavier) the tables are no longer the framework's N(0, 0.05^2)."""
    build, _ = sesrec_model
    full = build()
    base = build(use_align=False, use_contrast=False, use_mie=False)
    for name in (
        "target_attention.rec.weight.weight",
        "items.ids.weight",
        "encoders.rec.positions.weight",
    ):
        assert torch.equal(full.get_parameter(name), base.get_parameter(name))
    framework = build(init="framework")
    assert framework.items.ids.weight[1:].std().item() == pytest.approx(0.05, rel=0.15)
    xavier = (2 / sum(full.items.ids.weight.shape)) ** 0.5
    assert full.items.ids.weight[1:].std().item() == pytest.approx(xavier, rel=0.15)
    assert not full.items.ids.weight[0].any()  # padding stays zero
    positions = full.encoders["rec"].positions.weight
    assert positions.std().item() < 0.5  # not PyTorch's N(0, 1)


def test_the_code_s_learning_rate_schedule_is_a_flag(sesrec_model):
    build, _ = sesrec_model
    assert isinstance(build().configure_optimizers(), torch.optim.Adam)  # the paper: Adam
    scheduled = build(lr_scheduler=True, plateau_patience=5, min_lr=1e-5).configure_optimizers()
    plateau = scheduled["lr_scheduler"]["scheduler"]
    assert (plateau.patience, plateau.min_lrs[0], plateau.factor) == (5, 1e-5, 0.1)
    assert scheduled["lr_scheduler"]["monitor"] == "val/mrr"
