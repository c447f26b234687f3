"""UniSAR: each equation's part against a direct computation, the guards for empty
histories, the ablation flags, and a two-task run."""

from __future__ import annotations

import math

import pytest
import torch

from sar_exp.methods.unisar_layers import FusionLayer, MaskedEncoder, TargetAttention, with_fallback
from sar_exp.methods.unisar_losses import BilinearSimilarity, alignment_loss, relevance_loss

D = 8


def test_the_type_mask_lets_a_slot_see_only_the_other_behaviour():
    """Eq. 4: H_m at a rec slot is a function of the search slots (and itself) only."""
    torch.manual_seed(0)
    encoder = MaskedEncoder(D, 2, 1, 0.0, 10).eval()
    types = torch.tensor([[1, 0, 1, 0, 1]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    steps = torch.randn(1, 5, D)
    out = encoder(steps, valid, types)
    other_rec = steps.clone()
    other_rec[0, 4] += 1.0  # another rec slot
    assert torch.allclose(encoder(other_rec, valid, types)[0, 0], out[0, 0], atol=1e-6)
    other_search = steps.clone()
    other_search[0, 3] += 1.0  # a search slot
    assert not torch.allclose(encoder(other_search, valid, types)[0, 0], out[0, 0], atol=1e-4)
    # without the mask (Table 5, w/o mask M) every slot sees every other
    assert not torch.allclose(
        encoder(other_rec, valid)[0, 0], encoder(steps, valid)[0, 0], atol=1e-4
    )


def test_empty_histories_give_finite_outputs():
    """The official code gives NaN for a user with no rec or no search history."""
    torch.manual_seed(0)
    encoder, fusion, attention = (
        MaskedEncoder(D, 2, 1, 0.0, 10),
        FusionLayer(D, 2, 0.0),
        TargetAttention(D),
    )
    steps, valid = torch.randn(2, 4, D), torch.tensor([[False] * 4, [True, True, False, False]])
    h = encoder(steps, valid)
    v = fusion(h, h, valid)
    out = attention(v, valid, torch.randn(2, 3, D))
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(3, D))
    assert torch.equal(h[0], torch.zeros(4, D))  # nothing valid: nothing
    assert with_fallback(torch.zeros(1, 2, 2, dtype=torch.bool)).diagonal(dim1=1, dim2=2).all()


def test_fusion_follows_eq7_or_the_official_decoder():
    torch.manual_seed(0)
    same, cross = torch.randn(1, 3, D), torch.randn(1, 3, D)
    valid = torch.ones(1, 3, dtype=torch.bool)
    paper = FusionLayer(D, 2, 0.0, paper=True).eval()
    # Eq. 7: Q = H_cross, so the output rows follow the cross sequence's rows...
    moved = cross.clone()
    moved[0, 0] += 1.0
    out, out_moved = paper(same, cross, valid), paper(same, moved, valid)
    assert not torch.allclose(out[0, 0], out_moved[0, 0]) and torch.allclose(
        out[0, 1:], out_moved[0, 1:], atol=1e-6
    )
    # ...while in the code's decoder layer, H_cross is the memory every row reads
    official = FusionLayer(D, 2, 0.0, paper=False).eval()
    out, out_moved = official(same, cross, valid), official(same, moved, valid)
    assert not torch.allclose(out[0, 1:], out_moved[0, 1:], atol=1e-6)


def test_target_attention_is_eq8():
    torch.manual_seed(0)
    attention = TargetAttention(D)
    history, valid, items = (
        torch.randn(1, 4, D),
        torch.tensor([[True, True, True, False]]),
        torch.randn(1, 2, D),
    )
    got = attention(history, valid, items)
    scores = attention.weight(history[0, :3]) @ items[0].T  # [3, K]: V W e_i
    expected = torch.softmax(scores, dim=0).T @ history[0, :3]
    assert torch.allclose(got[0], expected, atol=1e-6)


def _naive_relevance(sim, q, i, neg_items, neg_queries, form):
    total = 0.0
    for qe, ie in zip(q, i):
        pos = (torch.tanh(sim.weight(qe) @ ie) / sim.temperature).item()
        to_items = [(torch.tanh(sim.weight(qe) @ n) / sim.temperature).item() for n in neg_items]
        to_queries = [
            (torch.tanh(sim.weight(n) @ ie) / sim.temperature).item() for n in neg_queries
        ]
        if form == "printed":  # Eq. 2 as printed: negatives-only denominators, summed
            total += -(pos - math.log(sum(map(math.exp, to_items))))
            total += -(pos - math.log(sum(map(math.exp, to_queries))))
        elif form == "paper":  # Eq. 2 with the positive in each denominator
            total += -(pos - math.log(math.exp(pos) + sum(map(math.exp, to_items))))
            total += -(pos - math.log(math.exp(pos) + sum(map(math.exp, to_queries))))
        else:  # the code: cross-entropy with the positive, 0.5 x both directions
            total += 0.5 * -(pos - math.log(math.exp(pos) + sum(map(math.exp, to_items))))
            total += 0.5 * -(pos - math.log(math.exp(pos) + sum(map(math.exp, to_queries))))
    return total / len(q)


@pytest.mark.parametrize("form", ["paper", "printed", "official"])
def test_relevance_loss_per_distinct_query_and_item_equals_the_per_pair_loss(form):
    torch.manual_seed(0)
    sim = BilinearSimilarity(D, 0.5)
    queries, items = torch.randn(3, D), torch.randn(5, D)
    pair_q, pair_i = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1, 2, 2, 0, 3, 4])
    negative_items, negative_queries = torch.randn(7, D), torch.randn(6, D)
    got = relevance_loss(
        sim, queries, items, pair_q, pair_i, negative_items, negative_queries, form
    )
    expected = _naive_relevance(
        sim, queries[pair_q], items[pair_i], negative_items, negative_queries, form
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_relevance_loss_with_in_batch_negatives_adds_the_other_pairs():
    """rel_in_batch: the batch's other pairs' items (queries) join the sampled negatives,
    except those paired with the same query (item) in the batch."""
    torch.manual_seed(0)
    sim = BilinearSimilarity(D, 0.5)
    queries, items = torch.randn(3, D), torch.randn(5, D)
    pair_q, pair_i = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 2, 2, 3])
    neg_items, neg_queries = torch.randn(4, D), torch.randn(4, D)
    s = lambda a, b: (torch.tanh(sim.weight(a) @ b) / sim.temperature).item()  # noqa: E731
    pairs = list(zip(pair_q.tolist(), pair_i.tolist()))
    expected = 0.0
    for q, i in pairs:
        to_items = [s(queries[q], n) for n in neg_items]
        to_items += [s(queries[q], items[j]) for j in (1, 2, 3) if (q, j) not in pairs]
        to_queries = [s(n, items[i]) for n in neg_queries]
        to_queries += [s(queries[r], items[i]) for r in (0, 1, 2) if (r, i) not in pairs]
        expected += math.log(sum(map(math.exp, to_items)))
        expected += math.log(sum(map(math.exp, to_queries))) - 2 * s(queries[q], items[i])
    expected /= len(pairs)
    got = relevance_loss(sim, queries, items, pair_q, pair_i, neg_items, neg_queries,
                         form="printed", in_batch=True)  # fmt: skip
    assert got.item() == pytest.approx(expected, rel=1e-5)
    plain = relevance_loss(sim, queries, items, pair_q, pair_i, neg_items, neg_queries,
                           form="printed")  # fmt: skip
    assert got.item() != pytest.approx(plain.item(), rel=1e-3)


def test_alignment_loss_is_eq5_with_other_users_as_negatives():
    torch.manual_seed(0)
    sim = BilinearSimilarity(D, 0.1)
    same, cross = torch.randn(4, D), torch.randn(4, D)
    user = torch.tensor([1, 2, 2, 3])
    valid = torch.ones(4, dtype=torch.bool)
    s = lambda a, b: (torch.tanh(sim.weight(a) @ b) / sim.temperature).item()  # noqa: E731
    for form, with_positive in (("printed", 0.0), ("paper", 1.0)):
        expected = 0.0
        for b in range(4):
            others = [c for c in range(4) if user[c] != user[b]]
            pos = s(same[b], cross[b])
            own = with_positive * math.exp(pos)  # the paper form's positive in the denominator
            to_cross = sum(math.exp(s(same[b], cross[c])) for c in others)
            to_same = sum(math.exp(s(same[c], cross[b])) for c in others)
            expected += -(pos - math.log(own + to_cross)) - (pos - math.log(own + to_same))
        got = alignment_loss(sim, same, cross, valid, user, form=form)
        assert got.item() == pytest.approx(expected / 4, rel=1e-5), form
    # official NT-Xent: 2B anchors, the other view of the row is the positive
    rows = torch.cat([same, cross])
    ntx = 0.0
    for a in range(8):
        positive = (a + 4) % 8
        logits = [s(rows[a], rows[c]) for c in range(8) if c != a]
        ntx += -(s(rows[a], rows[positive]) - math.log(sum(map(math.exp, logits))))
    assert alignment_loss(sim, same, cross, valid, user, form="official").item() == pytest.approx(
        ntx / 8, rel=1e-5
    )
    # rows without both histories take no part
    partial = torch.tensor([True, True, False, False])
    assert torch.isfinite(alignment_loss(sim, same, cross, partial, user))


def test_the_paper_form_of_eq2_and_eq5_is_bounded_where_the_printed_one_is_not(make_cfg):
    """With the temperature at its floor and every positive beating its negatives, the
    printed denominators (negatives only) give a loss far below zero, which a learnable
    tau keeps pushing down; with the positive in each denominator the loss stays >= 0.
    UniSAR's and SESRec's configs train the bounded form."""
    torch.manual_seed(0)
    sim = BilinearSimilarity(D, 0.01)
    with torch.no_grad():
        sim.weight.weight.copy_(torch.eye(D) * 10)
    rows = torch.nn.functional.one_hot(torch.arange(4), D).float()  # orthogonal, aligned
    user, valid = torch.arange(4), torch.ones(4, dtype=torch.bool)
    printed = alignment_loss(sim, rows, rows, valid, user, form="printed")
    paper = alignment_loss(sim, rows, rows, valid, user, form="paper")
    assert printed.item() < -100 and 0.0 <= paper.item() < 1e-3
    pairs = torch.arange(4)
    rel = {form: relevance_loss(sim, rows, rows, pairs, pairs, -rows, -rows, form=form).item()
           for form in ("printed", "paper")}  # fmt: skip
    assert rel["printed"] < -100 and 0.0 <= rel["paper"] < 1e-3
    for method in ("unisar", "sesrec"):
        module = make_cfg(f"method={method}").method.module
        assert module.paper_losses and module.positive_in_denominator, method


def test_items_are_id_embeddings_as_in_the_paper_captions_only_where_asked(make_cfg, unisar_model):
    """Sec. 4.1.1: the item embedding is a table lookup; the official code's caption words
    are a flag (on in the KuaiSAR experiment, which takes the code's features)."""
    build, _ = unisar_model
    assert make_cfg("method=unisar").method.module.use_captions is False
    assert make_cfg("experiment=unisar_kuaisar", tiny=False).method.module.use_captions is True
    plain, captioned = build(), build(use_captions=True)
    assert not plain.use_captions and captioned.use_captions  # the embedded items have captions
    # the caption's word mean (16 wide here) joins the item's id and attribute embeddings
    assert captioned.item_projection[0].in_features == plain.items.out_dim + 16
    if isinstance(plain.item_projection, torch.nn.Sequential):
        assert plain.item_projection[0].in_features == plain.items.out_dim


@pytest.fixture(scope="module")
def unisar_model(tiny_folder, tmp_path_factory):
    from sar_exp.data.datamodule import SARDataModule

    dm = SARDataModule(
        "kuaisar", str(tiny_folder), str(tmp_path_factory.mktemp("c")), "sequential",
        ["search_active_level", "rec_active_level"], ["first_level_category_id", "author_id"],
        protocol={"max_interleaved_history": 30, "evaluated_tasks": ["rec", "search"]},
        batch_size=32, companion_batch_sizes={"search": 16}, interleaved=True,
        scores=["rec", "search"],
    )  # fmt: skip
    dm.setup()
    batch = next(iter(dm.train_dataloader()))

    def build(**flags):
        from sar_exp.methods.unisar import UniSAR

        torch.manual_seed(0)
        flags.setdefault("evaluated_tasks", flags.get("train_tasks", ["rec", "search"]))
        return UniSAR(dm.schema, {}, lookup_tables=dm.lookup_tables(), embedding_dim=16,
                      hidden_dim=16, rel_negatives=32, **flags)  # fmt: skip

    return build, batch


@pytest.mark.parametrize(
    "flags, gone",
    [
        ({}, set()),
        ({"use_align": False}, {"rec_align", "search_align"}),
        ({"use_rel": False}, {"rec_rel", "search_rel"}),
        ({"use_r2r": False}, set()),
        ({"use_mask": False, "use_mca_r": False, "use_mca_s": False, "use_mmoe": False}, set()),
        ({"train_tasks": ["rec"]}, {"search_click", "search_rel", "search_align"}),
        (
            {
                "paper_losses": False,
                "embedding_style": "official",
                "paper_fusion": False,
                "paper_prediction": False,
                "rel_in_batch": True,
            },
            set(),
        ),
    ],
)
def test_every_variant_trains_every_part_it_has(unisar_model, flags, gone):
    build, batch = unisar_model
    model = build(**flags)
    loss, parts = model.training_loss(batch)
    loss.backward()
    everything = {f"{t}_{k}" for t in ("rec", "search") for k in ("click", "rel", "align")}
    assert set(parts) == everything - gone
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    if flags.get("use_r2r") is False:
        assert "r2r" not in model.encoders and "R" not in model.align_sim  # and its L_Align^R


def test_total_loss_is_eq12(unisar_model):
    build, batch = unisar_model
    model = build(alpha=0.3, beta=0.2, gamma=0.5)
    loss, p = model.training_loss(batch)
    rec = p["rec_click"] + 0.3 * p["rec_rel"] + 0.2 * p["rec_align"]
    search = p["search_click"] + 0.3 * p["search_rel"] + 0.2 * p["search_align"]
    assert loss.item() == pytest.approx((rec + 0.5 * search).item(), rel=1e-5)


@pytest.mark.parametrize("paper_losses", [True, False])
def test_both_tasks_encoded_together_give_each_task_s_own_losses(unisar_model, paper_losses):
    """training_loss runs the rec and the search rows through the history encoders as one
    batch (padded to the wider histories) and scores L_Rel's shared negatives once for
    both: each task's parts must be those of its batch computed alone."""
    build, batch = unisar_model
    model = build(paper_losses=paper_losses).eval()  # no dropout: the same numbers
    torch.manual_seed(1)
    _, together = model.training_loss(batch)
    named = {"rec": batch, "search": batch["search"]}
    negatives = model._negatives()
    items, queries = model._lookups(list(named.values()), negatives[:1], negatives[1:])
    for task, task_batch in named.items():
        (relevance,) = model._relevance([task_batch], items, queries, negatives)
        h = model.encode(task_batch, items, queries)
        alone = model._task_loss(task_batch, task, items, queries, h, relevance)
        for part in ("click", "rel", "align"):
            assert together[f"{task}_{part}"].item() == pytest.approx(alone[part].item(), rel=1e-5)
    assert batch["rec_history"].shape[1] != batch["search"]["rec_history"].shape[1] or (
        batch["search_history_query"].shape[1] != batch["search"]["search_history_query"].shape[1]
    )  # the two batches' histories differ in width: the padding is exercised


def test_the_model_trains_the_form_its_flags_pick(unisar_model):
    """positive_in_denominator reaches both losses: the model's L_Align and L_Rel are
    alignment_loss and relevance_loss of the form the flags pick, and the two differ."""
    from sar_exp.backbones.sequence import masked_mean
    from sar_exp.methods.search_history import history_pairs

    build, batch = unisar_model
    got = {}
    for flag, form in ((True, "paper"), (False, "printed")):
        model = build(positive_in_denominator=flag).eval()
        assert model.loss_form == form
        negatives = model._negatives()
        items, queries = model._lookups([batch], negatives[:1], negatives[1:])
        h = model.encode(batch, items, queries)
        both = h["rec_valid"].any(1) & h["ses_valid"].any(1)
        expected = sum(
            alignment_loss(model.align_sim[s], masked_mean(h[a], h[v]), masked_mean(h[b], h[v]),
                           both, batch["user"], form=form)
            for s, a, b, v in (("R", "r2r", "s2r", "rec_valid"), ("S", "s2s", "r2s", "ses_valid"))
        )  # fmt: skip
        got[form] = model._alignment(batch, h).item()
        assert got[form] == pytest.approx(expected.item(), rel=1e-5)
        (rel,) = model._relevance([batch], items, queries, negatives)
        pair_q, pair_i = history_pairs(batch)
        expected_rel = relevance_loss(
            model.rel_sim, queries.table, items.table, queries.index(pair_q),
            items.index(pair_i), items(negatives[0]), queries(negatives[1]), form=form,
        )  # fmt: skip
        assert rel.item() == pytest.approx(expected_rel.item(), rel=1e-5)
    assert got["paper"] >= 0 and got["paper"] != pytest.approx(got["printed"])
    with pytest.raises(ValueError, match="form"):
        alignment_loss(model.align_sim["R"], h["r2r"][:, 0], h["s2r"][:, 0], both,
                       batch["user"], form=True)  # fmt: skip


@pytest.mark.parametrize("flags", [{}, {"paper": False}, {"mmoe": False}])
def test_the_head_takes_the_per_row_part_once_per_row(flags):
    """X_b = [e_u, e_i, e_q, agg_s, agg_r] (Sec. 4.3.2): given e_u and e_q once per row,
    the head gives what it gives on X_b itself, with the same weights."""
    from sar_exp.methods.unisar_layers import MultiTaskHead

    torch.manual_seed(0)
    per_row = [*range(D), *range(2 * D, 3 * D)]
    head = MultiTaskHead(5 * D, D, {"shared": 2, "rec": 2, "search": 2}, 0.0,
                         per_row_columns=per_row, **flags).eval()  # fmt: skip
    e_u, e_q = torch.randn(3, D), torch.randn(3, D)
    e_i, agg_s, agg_r = torch.randn(3, 4, D), torch.randn(3, 4, D), torch.randn(3, 4, D)
    x_b = torch.cat([e_u[:, None].expand(-1, 4, -1), e_i, e_q[:, None].expand(-1, 4, -1),
                     agg_s, agg_r], dim=-1)  # fmt: skip
    split = torch.cat([e_i, agg_s, agg_r], dim=-1)
    for task in ("rec", "search"):
        got = head(split, task, rows=torch.cat([e_u, e_q], dim=-1))
        assert torch.allclose(got, head(x_b, task), atol=1e-5)


def test_attention_is_torch_multihead_attention():
    """The attention blocks (per-head slices, scales folded into the projections) give
    nn.MultiheadAttention's outputs and input gradients with the same weights."""
    from sar_exp.methods.unisar_layers import Attention

    torch.manual_seed(0)
    ours = Attention(D, 2, 0.0).eval()
    reference = torch.nn.MultiheadAttention(D, 2, batch_first=True).eval()
    weights = ours.state_dict()
    reference.load_state_dict({"in_proj_weight": weights["in_proj.weight"],
                               "in_proj_bias": weights["in_proj.bias"],
                               "out_proj.weight": weights["out_proj.weight"],
                               "out_proj.bias": weights["out_proj.bias"]})  # fmt: skip
    allowed = torch.rand(3, 5, 6) < 0.7
    allowed[..., 0] = True  # every query has a key
    for self_attention in (True, False):
        query = torch.randn(3, 5 if not self_attention else 6, D, requires_grad=True)
        keys = query if self_attention else torch.randn(3, 6, D, requires_grad=True)
        mask = allowed[:, :1].expand(-1, 6, -1) if self_attention else allowed
        got = ours(query, keys, mask)
        expected, _ = reference(query, keys, keys, attn_mask=(~mask).repeat_interleave(2, 0))
        assert torch.allclose(got, expected, atol=1e-5)
        (a,) = torch.autograd.grad(got.sum(), query)
        (b,) = torch.autograd.grad(expected.sum(), query)
        assert torch.allclose(a, b, atol=1e-5)


def test_relevance_segments_are_each_batch_s_own_loss_and_an_empty_one_is_zero():
    """Pairs of two batches scored against the shared negatives in one call: each run's
    loss is its batch's alone; a batch without pairs gets a zero that reaches tau."""
    torch.manual_seed(0)
    sim = BilinearSimilarity(D, 0.5)
    queries, items = torch.randn(5, D), torch.randn(7, D)
    neg_items, neg_queries = torch.randn(9, D), torch.randn(9, D)
    pair_q, pair_i = torch.tensor([0, 1, 1, 3, 4]), torch.tensor([2, 2, 5, 6, 0])
    first, second, empty = relevance_loss(sim, queries, items, pair_q, pair_i, neg_items,
                                          neg_queries, segments=[2, 3, 0])  # fmt: skip
    alone = [relevance_loss(sim, queries, items, q, i, neg_items, neg_queries)
             for q, i in ((pair_q[:2], pair_i[:2]), (pair_q[2:], pair_i[2:]))]  # fmt: skip
    assert first.item() == pytest.approx(alone[0].item(), rel=1e-6)
    assert second.item() == pytest.approx(alone[1].item(), rel=1e-6)
    assert empty.item() == 0.0
    empty.backward()
    assert sim.log_temperature.grad is not None


def test_embedding_init_std_redraws_the_shared_tables_only(unisar_model):
    build, _ = unisar_model
    framework, wide = build(embedding_init_std=None), build()  # the default: 0.5
    official = build(embedding_style="official")  # xavier, whatever the std
    for name in ("items.ids", "users.ids", "queries.words", "items.attributes.0"):
        table = wide.get_submodule(name).weight
        assert table[1:].std().item() == pytest.approx(0.5, rel=0.1)
        assert not table[0].any()  # padding
        assert framework.get_submodule(name).weight[1:].std().item() == pytest.approx(0.05, rel=0.1)
        assert official.get_submodule(name).weight[1:].std().item() < 0.3
    positions = wide.encoders["r2r"].positions.weight  # not a shared table: as by default
    assert positions.std().item() == pytest.approx(1.0, rel=0.2)
    from sar_exp.errors import ConfigError

    with pytest.raises(ConfigError, match="embedding_init_std must be a positive std"):
        build(embedding_init_std=0.0)


def test_two_task_run_end_to_end(make_cfg, tmp_path):
    from sar_exp.train import train

    metrics = train(make_cfg(
        "method=unisar", "dataset.protocol.max_interleaved_history=30",
        "dataset.protocol.evaluated_tasks=[rec,search]", "optimized_metric=val/mean_ndcg@5",
        "method.module.rel_negatives=64", output_dir=tmp_path,
    ))  # fmt: skip
    assert 0.0 <= metrics["test/ndcg@5"] <= 1.0 and 0.0 <= metrics["test/search/ndcg@5"] <= 1.0


def test_a_single_task_half_refuses_to_score_the_other_task(unisar_model):
    from sar_exp.errors import ConfigError

    build, _ = unisar_model
    with pytest.raises(
        ConfigError, match="train_tasks=\\['search'\\] cannot score the evaluated task rec"
    ):
        build(train_tasks=["search"], evaluated_tasks=["rec", "search"])


def test_official_initialisation_keeps_padding_rows_zero_and_ablations_share_weights(unisar_model):
    build, _ = unisar_model
    model = build(embedding_style="official")
    padded = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None
    ]
    assert padded and all(
        torch.equal(m.weight[m.padding_idx], torch.zeros_like(m.weight[0])) for m in padded
    )
    # an ablation starts from the same weights in every part it keeps
    ablated = build(embedding_style="official", use_mca_r=False)
    assert torch.equal(ablated.fusion["s"].ffn[0].weight, model.fusion["s"].ffn[0].weight)
    assert torch.equal(ablated.head.gates["rec"].weight, model.head.gates["rec"].weight)


def test_merged_history_steps_are_the_two_histories_events(unisar_model):
    """Eq. 4's input is gathered from the rec and search histories' steps by position:
    it must equal encoding the merged history's own items, queries and clicks."""
    from sar_exp.methods.search_history import Lookup, mean_clicks

    build, batch = unisar_model
    model = build()
    items = Lookup([batch[k] for k in ("rec_history", "search_history_clicks",
                                       "interleaved_item", "interleaved_clicks")],
                   model._item_embedding)  # fmt: skip
    queries = Lookup([batch["search_history_query"], batch["interleaved_query"]],
                     model._query_embedding)  # fmt: skip
    rec_steps = items(batch["rec_history"])
    ses_steps = queries(batch["search_history_query"]) + mean_clicks(
        items, batch["search_history_clicks"]
    )
    direct = torch.where(
        (batch["interleaved_type"] == 1)[..., None],
        items(batch["interleaved_item"]),
        queries(batch["interleaved_query"]) + mean_clicks(items, batch["interleaved_clicks"]),
    )
    position = batch["interleaved_position"]
    valid = batch["interleaved_mask"]
    assert valid.any() and (batch["interleaved_type"][valid] == 0).any()
    for steps, kind in ((rec_steps, 1), (ses_steps, 0)):
        slots = valid & (batch["interleaved_type"] == kind)
        rows, cols = slots.nonzero(as_tuple=True)
        assert torch.allclose(steps[rows, position[rows, cols]], direct[rows, cols], atol=1e-6)


def test_dropout_drops_at_the_rate_and_keeps_the_expectation():
    from sar_exp.methods.unisar_layers import dropout_mask, dropout_scale

    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    out = x * dropout_mask(x.shape, 0.1, x.device) * dropout_scale(0.1)
    assert (out == 0).float().mean().item() == pytest.approx(0.1, abs=0.002)
    assert out.mean().item() == pytest.approx(1.0, abs=0.003)
    assert dropout_scale(0.0) == 1.0 and not (dropout_mask(x.shape, 0.0, x.device) == 0).any()


def test_grouping_rows_by_length_changes_no_valid_output_nor_gradient():
    """by_length runs the encoders on groups of rows cut to their longest history: the
    valid slots (and the gradients) must be those of one call on the whole batch, for
    every mask it can get (empty rows, holes, full rows)."""
    from sar_exp.backbones.sequence import LengthGroups, by_length, grouped_outputs

    torch.manual_seed(0)
    encoder = MaskedEncoder(D, 2, 1, 0.0, 12).eval()
    fusion = FusionLayer(D, 2, 0.0).eval()
    valid = torch.rand(9, 12) < 0.5
    valid[0] = False  # no history
    valid[1] = True  # a full one
    valid[2, :3] = True  # a short one
    steps = torch.randn(9, 12, D, requires_grad=True)
    pairs = with_fallback(valid[:, None, :] & valid[:, :, None])

    def whole(x):
        out = encoder._layers(x + encoder.positions.weight, pairs)
        return torch.where(valid[..., None], out, 0.0)

    for groups in (1, 3, 9):
        grouped = by_length(encoder.group, valid, (steps,), (valid,), groups=groups)
        assert torch.allclose(grouped, whole(steps), atol=1e-5)
        weight = torch.randn(9, 12, D)
        (a,) = torch.autograd.grad((grouped * weight).sum(), steps)
        (b,) = torch.autograd.grad((whole(steps) * weight).sum(), steps)
        assert torch.allclose(a, b, atol=1e-5)
        # read: any slots of the groups' output (past a row's extent, unkept: zero)
        grouped_rows = LengthGroups(valid, groups)
        pieces = grouped_outputs(encoder.group, grouped_rows, (steps,), (valid,), valid)
        slots = torch.randint(0, 12, (9, 7))
        keep = torch.rand(9, 7) < 0.8
        (read,) = grouped_rows.read(pieces, (slots, keep))
        expected = torch.gather(whole(steps), 1, slots[..., None].expand(-1, -1, D))
        assert torch.allclose(read, expected * keep[..., None], atol=1e-5)
        assert (read[~keep] == 0).all() and (read[0] == 0).all()  # row 0: no history
    # the fusion layer (two sequences) likewise, against its Eq. 7 computed in one piece
    cross = torch.randn(9, 12, D)
    allowed = with_fallback(valid[:, None, :].expand(-1, 12, -1), "all")
    direct = torch.where(valid[..., None], fusion._fuse(steps, cross, allowed), 0.0)
    assert torch.allclose(fusion(steps, cross, valid), direct, atol=1e-5)


def test_mean_of_clicked_items_skips_padding(unisar_model):
    from sar_exp.methods.search_history import Lookup, mean_clicks

    build, batch = unisar_model
    model = build()
    clicks = batch["search_history_clicks"]
    assert (clicks > 0).any() and (clicks == 0).any()
    items = Lookup([clicks], model._item_embedding)
    emb = model._item_embedding(clicks)
    real = (clicks > 0).unsqueeze(-1).float()
    direct = (emb * real).sum(-2) / real.sum(-2).clamp(min=1)
    assert torch.allclose(mean_clicks(items, clicks), direct, atol=1e-6)


def test_dropout_after_a_linear_layer_keeps_the_rate_and_the_expectation():
    from sar_exp.methods.unisar_layers import dropped_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(200_000, 4)
    out = dropped_linear(x, layer, 0.1, True, "relu")
    expected = torch.relu(layer(x))
    dropped = (out == 0) & (expected != 0)
    assert dropped.float().sum() / (expected != 0).float().sum() == pytest.approx(0.1, abs=0.003)
    kept = ~dropped & (expected != 0)
    assert torch.allclose(out[kept], expected[kept] / (1 - 0.1), rtol=1e-3, atol=1e-5)
    assert torch.equal(dropped_linear(x, layer, 0.1, False, "relu"), expected)


def test_an_encoder_refuses_a_sequence_longer_than_its_positions():
    encoder = MaskedEncoder(D, 2, 1, 0.0, 2).eval()
    with pytest.raises(ValueError, match="3 slots, positions for 2"):
        encoder(torch.randn(2, 3, D), torch.ones(2, 3, dtype=torch.bool))


def test_a_batch_without_any_history_still_reaches_every_encoder_parameter():
    """Multi-process training needs a gradient for every parameter on every rank, also
    when no row of the rank's batch has a history (the grouping then encodes nothing)."""
    for valid in (torch.zeros(4, 6, dtype=torch.bool), torch.zeros(4, 0, dtype=torch.bool)):
        encoder, fusion = MaskedEncoder(D, 2, 1, 0.1, 6), FusionLayer(D, 2, 0.1)
        steps = torch.randn(*valid.shape, D)
        out = fusion(encoder(steps, valid), steps, valid)
        assert not out.any()
        out.sum().backward()
        for module in (encoder, fusion):
            assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("use_mask, layers", [(True, 1), (False, 1), (True, 2)])
def test_cross_transitions_are_the_merged_encoding_read_at_each_type_s_slots(
    unisar_model, use_mask, layers
):
    """Eq. 4 computed directly, in one call over the padded merged history: H_s2r is the
    encoder's output at the rec slots in time order, H_r2s at the search slots; with the
    type mask a slot with no slot of the other type to attend to is zero. (The model runs
    it in length groups, its steps read from the two histories' and its output read out
    of the groups.)"""
    build, batch = unisar_model
    model = build(use_mask=use_mask, layers=layers).eval()
    steps = {1: torch.randn(*batch["rec_history_mask"].shape, 16),
             0: torch.randn(*batch["search_history_mask"].shape, 16)}  # fmt: skip
    got = model._cross_transitions(batch, steps[1], steps[0])
    types, valid, position = (
        batch["interleaved_type"], batch["interleaved_mask"], batch["interleaved_position"]
    )  # fmt: skip
    merged_steps = torch.zeros(*valid.shape, 16)
    for b, j in valid.nonzero().tolist():
        merged_steps[b, j] = steps[int(types[b, j])][b, position[b, j]]
    encoder = model.encoders["merged"]
    x = merged_steps + encoder.positions(torch.arange(valid.shape[1]))
    allowed = valid[:, None, :] & valid[:, :, None]
    if use_mask:
        allowed = allowed & (types[:, :, None] != types[:, None, :])
    for layer in encoder.layers:
        x = layer(x, with_fallback(allowed))
    found = 0
    for name, kind in (("s2r", 1), ("r2s", 0)):
        for b in range(valid.shape[0]):
            slots = (valid[b] & (types[b] == kind)).nonzero().squeeze(1)
            for k, j in enumerate(slots.tolist()):
                expected = x[b, j] if allowed[b, j].any() else torch.zeros(16)
                assert torch.allclose(got[name][b, k], expected, atol=1e-5), (name, b, k)
                found += int(allowed[b, j].any())
            assert not got[name][b, len(slots) :].any()
    assert found > 0


def test_dropout_on_the_attention_weights_keeps_the_expected_output():
    from sar_exp.methods.unisar_layers import Attention

    torch.manual_seed(0)
    attention = Attention(D, 2, 0.5)
    x = torch.randn(1, 5, D)
    allowed = torch.ones(1, 5, 5, dtype=torch.bool)
    expected = attention.eval()(x, x, allowed)
    attention.train()
    with torch.no_grad():
        mean = torch.stack([attention(x, x, allowed) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, expected, atol=0.03)
    assert not torch.allclose(attention(x, x, allowed), expected, atol=1e-3)


def test_the_paper_trains_at_a_fixed_rate_and_the_presets_use_the_code_s_scheduler(
    make_cfg, unisar_model
):
    """Sec. 5.1.4: Adam at a tuned learning rate (the default); the official code's
    ReduceLROnPlateau only where asked for (and in the papers' presets)."""
    build, _ = unisar_model
    assert isinstance(build().configure_optimizers(), torch.optim.Adam)
    scheduled = build(lr_scheduler=True).configure_optimizers()
    assert isinstance(
        scheduled["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau
    )
    assert make_cfg("method=unisar").method.module.lr_scheduler is False
    for preset in ("unisar_kuaisar", "unisar_amazon"):
        assert make_cfg(f"experiment={preset}", tiny=False).method.module.lr_scheduler is True
