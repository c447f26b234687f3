"""QueryRec (Wang et al., CIKM'24): each loss against the relation its paper argues for,
the diffusion augmentation, the per-batch extras, the ablations and one epoch end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sar_exp.errors import ConfigError
from sar_exp.methods.queryrec import contrastive_loss, next_item_loss


def test_next_item_loss_pulls_the_query_list_toward_later_clicks():
    """Eq. 14 as its argument requires: a query-list embedding that points at the items
    clicked after t and away from the skipped ones costs less than the reverse (the
    printed '+' before the negatives' term would reward the reverse)."""
    pos, neg = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    ones, row = torch.ones(1, 1, dtype=torch.bool), torch.ones(1, dtype=torch.bool)
    toward = next_item_loss(torch.tensor([[3.0, -3.0]]), pos, ones, neg, ones, row)
    away = next_item_loss(torch.tensor([[-3.0, 3.0]]), pos, ones, neg, ones, row)
    assert toward < 0.2 < 6.0 < away
    # exactly binary cross-entropy on sigma(<e_q, e_j>): -log s(3) - log(1 - s(-3))
    assert toward.item() == pytest.approx(-2 * np.log(1 / (1 + np.exp(-3.0))), rel=1e-5)


def test_next_item_loss_ignores_rows_without_a_history_or_a_future():
    pos = torch.randn(3, 2, 4)
    mask = torch.tensor([[True, True], [False, False], [True, False]])
    rows = torch.tensor([True, True, False])  # row 2: no query history
    query = torch.randn(3, 4)
    only_row0 = next_item_loss(query[:1], pos[:1], mask[:1], pos[:1], mask[:1], rows[:1])
    assert next_item_loss(query, pos, mask, pos, mask, rows) == pytest.approx(only_row0.item())


def test_contrastive_loss_is_lower_when_the_positive_is_the_most_similar():
    """-Eq. 15: the mean over I_q+ of -(s+/beta - log sum_j exp(s_j/beta)), j over the
    sampled other items (the positives left out); rows without positives count nothing."""
    negatives = torch.tensor([[0.1, -0.2, 0.0], [0.1, -0.2, 0.0]])
    all_neg = torch.ones(2, 3, dtype=torch.bool)
    positives = torch.tensor([[0.9, 0.0], [-0.5, 0.0]])
    mask = torch.tensor([[True, False], [True, False]])
    per_row = [
        contrastive_loss(
            positives[i : i + 1], mask[i : i + 1], negatives[i : i + 1], all_neg[i : i + 1], 0.1
        )  # fmt: skip
        for i in range(2)
    ]
    assert per_row[0] < per_row[1]
    expected = -(0.9 / 0.1 - torch.logsumexp(negatives[0] / 0.1, 0))
    assert per_row[0].item() == pytest.approx(expected.item(), rel=1e-5)
    empty = torch.zeros(2, 2, dtype=torch.bool)
    assert contrastive_loss(positives, empty, negatives, all_neg, 0.1).item() == 0.0


@pytest.fixture(scope="module")
def ctr_data(tiny_folder, tmp_path_factory):
    from sar_exp.data.datamodule import SARDataModule

    queryrec = {"next_positives": 3, "next_negatives": 3, "query_positives": 2,
                "contrast_negatives": 32, "use_diffusion": True,
                "diffusion": {"epochs": 3, "hidden_dim": 32}}  # fmt: skip
    dm = SARDataModule(
        "kuaisar", str(tiny_folder), str(tmp_path_factory.mktemp("c")), "ctr",
        ["search_active_level", "rec_active_level"], ["first_level_category_id", "author_id"],
        protocol={"require_both_histories": True, "views": ["ctr"]}, batch_size=64,
        queryrec=queryrec,
    )  # fmt: skip
    dm.setup()
    return dm, next(iter(dm.train_dataloader()))


def _model(dm, **flags):
    from sar_exp.methods.queryrec import QueryRec

    torch.manual_seed(0)
    backbone = {"name": "din", "encoder": {"_target_": "sar_exp.backbones.din.DINScorer"}}
    return QueryRec(dm.schema, backbone, task="ctr", embedding_dim=8, hidden_dim=16,
                    lookup_tables=dm.lookup_tables(), **flags)  # fmt: skip


@pytest.mark.parametrize(
    "flags, parts",
    [
        ({}, {"ctr", "nip", "contrast"}),
        ({"use_contrastive": False, "use_diffusion": False}, {"ctr", "nip"}),
        ({"use_nip": False, "use_diffusion": False}, {"ctr", "contrast"}),
        ({"use_nip": False}, {"ctr", "contrast"}),
    ],
)
def test_every_table5_variant_trains_every_part_it_has(ctr_data, flags, parts):
    dm, batch = ctr_data
    model = _model(dm, **flags)
    loss, got = model.training_loss(batch)
    loss.backward()
    assert set(got) == parts and torch.isfinite(loss) and all(v > 0 for v in got.values())
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_variants_share_the_din_weights(ctr_data):
    dm, _ = ctr_data
    full, nip_only = _model(dm), _model(dm, use_contrastive=False, use_diffusion=False)
    for name, weight in full.encoder.state_dict().items():
        assert torch.equal(weight, nip_only.encoder.state_dict()[name]), name


def test_the_batch_carries_the_auxiliary_samples(ctr_data):
    dm, batch = ctr_data
    b = batch["user"].numel()
    assert batch["next_positive"].shape == batch["next_positive_mask"].shape == (b, 3)
    assert batch["query_positive"].shape == (b, 2) and batch["contrast_negatives"].shape == (32,)
    assert batch["next_positive_mask"].any() and batch["query_positive_mask"].any()
    # q^t is the query of the newest session in the history
    last = batch["search_history_query"].gather(
        1, (batch["search_history_mask"].sum(1) - 1).clamp(min=0)[:, None]
    )[:, 0]
    has = batch["search_history_mask"].any(1)
    assert torch.equal(batch["last_query"][has], last[has])
    # a drawn positive of q^t is in its (augmented) I_q+
    offsets, items = dm.query_positives
    for row in torch.nonzero(batch["query_positive_mask"][:, 0]).flatten()[:50]:
        q = batch["last_query"][row]
        assert batch["query_positive"][row, 0] in items[offsets[q] : offsets[q + 1]]


def test_refuses_what_queryrec_is_not():
    from sar_exp.methods.queryrec import QueryRec

    schema = {"num_users": 3, "num_items": 4, "num_words": 5, "num_queries": 2,
              "user_attribute_sizes": [], "item_attribute_sizes": [], "max_search_history": 4,
              "max_rec_history": 4}  # fmt: skip
    with pytest.raises(ConfigError, match="backbone=din"):
        QueryRec(schema, {"name": "sasrec", "encoder": {}})
    with pytest.raises(ConfigError, match="needs use_contrastive=true"):
        QueryRec(schema, {"name": "din", "encoder": {}}, use_contrastive=False)


def test_queryrec_needs_the_ctr_task(make_cfg):
    from sar_exp.train import train

    with pytest.raises(ConfigError):
        train(make_cfg("method=queryrec", "backbone=din"))


def test_one_epoch_end_to_end(make_cfg, tmp_path):
    from sar_exp.train import train

    cfg = make_cfg("method=queryrec", "backbone=din", "task=ctr", "protocol=queryrec",
                   "method.queryrec_data.diffusion.epochs=2", output_dir=tmp_path)  # fmt: skip
    metrics = train(cfg)
    assert 0.0 <= metrics["test/auc"] <= 1.0 and metrics["test/logloss"] > 0
    log = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/nip" in log and "train/contrast" in log


def _toy_view():
    """Queries 1-3 over items 1-6: q1 clicked {1}, shown {2, 3}; q2 shown {4} only (no
    click); q3 clicked {5, 6}. CSR offsets over query ids 0..3 (+1), as the ctr view has."""
    return {
        "query_clicked_offsets": np.array([0, 0, 1, 1, 3, 3]),
        "query_clicked_items": np.array([1, 5, 6], np.int32),
        "query_unclicked_offsets": np.array([0, 0, 2, 3, 3, 3]),
        "query_unclicked_items": np.array([2, 3, 4], np.int32),
        "item_attributes": np.zeros((7, 1), np.int32),
    }


def test_query_vectors_hold_r_p_r_n_and_r_0():
    from sar_exp.methods.queryrec_diffusion import DiffusionSettings, query_vectors

    vectors = query_vectors(_toy_view(), DiffusionSettings())
    assert vectors.queries.tolist() == [1, 2, 3]
    assert vectors.candidates.tolist() == [1, 2, 3, 4, 5, 6]
    assert vectors.dense(np.arange(3)).tolist() == [
        [0.5, -0.5, -0.5, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, -0.5, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.5, 0.5],
    ]
    assert vectors.dense(np.array([2, 0])).tolist()[0] == [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]
    capped = query_vectors(_toy_view(), DiffusionSettings(max_items=2))
    assert capped.candidates.size == 2 and capped.dense(np.arange(3)).shape == (3, 2)
    assert capped.dropped == 6 - 2  # entries of the items beyond the cap


def test_augmentation_keeps_i_plus_and_adds_k_new_items_to_every_query():
    from sar_exp.methods.queryrec_diffusion import DiffusionSettings, augment

    settings = DiffusionSettings(epochs=2, hidden_dim=8, top_k=2)
    arrays, meta = augment(_toy_view(), settings, seed=0)
    offsets, items = arrays["offsets"], arrays["items"]
    sets = [set(items[offsets[q] : offsets[q + 1]].tolist()) for q in range(4)]
    assert sets[0] == set()  # padding query
    assert 1 in sets[1] and len(sets[1]) == 3  # I+ plus 2 new
    assert len(sets[2]) == 2  # no click: 2 generated
    assert {5, 6} <= sets[3] and len(sets[3]) == 4
    assert meta["queries"] == 3 and meta["share_of_queries_without_clicks"] == pytest.approx(1 / 3)


def test_augmentation_is_cached_per_seed(tmp_path):
    from sar_exp.methods.queryrec_diffusion import DiffusionSettings, cached_augmentation

    settings = DiffusionSettings(epochs=2, hidden_dim=8)
    first = cached_augmentation(_toy_view(), settings, 0, tmp_path)
    again = cached_augmentation(_toy_view(), settings, 0, tmp_path)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    cached_augmentation(_toy_view(), settings, 1, tmp_path)
    assert len(list(tmp_path.glob("queryrec-diffusion-*"))) == 2


def test_bad_diffusion_settings_are_named():
    from sar_exp.methods.queryrec_diffusion import DiffusionSettings

    with pytest.raises(ConfigError, match=r"r_n in \[-1, 0\)"):
        DiffusionSettings(r_n=0.2)


def test_without_diffusion_the_positive_sets_are_the_clicked_lists(tiny_folder, tmp_path):
    """use_diffusion=false (DIN+con): I_q+ is what was clicked, nothing generated."""
    from sar_exp.data.datamodule import SARDataModule

    queryrec = {"next_positives": 1, "next_negatives": 1, "query_positives": 1,
                "contrast_negatives": 8, "use_diffusion": False,
                "diffusion": {"epochs": 1, "hidden_dim": 8}}  # fmt: skip
    dm = SARDataModule(
        "kuaisar", str(tiny_folder), str(tmp_path), "ctr",
        ["search_active_level", "rec_active_level"], ["first_level_category_id", "author_id"],
        protocol={"views": ["ctr"]}, queryrec=queryrec,
    )  # fmt: skip
    view = dm.load()
    offsets, items = dm.query_positives
    assert np.array_equal(offsets.numpy(), view["query_clicked_offsets"])
    assert np.array_equal(items.numpy(), view["query_clicked_items"])
    assert not list(tmp_path.glob("queryrec-diffusion-*"))


def test_the_contrast_denominator_leaves_out_every_member_of_i_plus(ctr_data):
    dm, batch = ctr_data
    offsets, items = dm.query_positives
    masked = ~batch["contrast_negative_mask"]
    for row in range(batch["user"].numel()):
        q = batch["last_query"][row]
        members = set(items[offsets[q] : offsets[q + 1]].tolist())
        for n, item in enumerate(batch["contrast_negatives"].tolist()):
            assert bool(masked[row, n]) == (item in members)
    assert masked.any()  # some draws do hit a positive set


@pytest.mark.parametrize(
    "method, backbone", [("base", "dcn"), ("base", "ple"), ("sesrec", "sasrec")]
)
def test_table4_baselines_train_one_epoch(make_cfg, tmp_path, method, backbone):
    """DCN and PLE (QueryRec's Table 4) as method=base backbones under task=ctr, and
    SESRec adapted to CTR (5.3.3); PLE's loss holds every feedback task of the rec log."""
    from sar_exp.train import train

    metrics = train(make_cfg(f"method={method}", f"backbone={backbone}", "task=ctr",
                             "protocol=queryrec", output_dir=tmp_path))  # fmt: skip
    assert 0.0 <= metrics["test/auc"] <= 1.0
    if backbone == "ple":
        header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
        for task in ("click", "like", "follow", "forward"):
            assert f"train/{task}" in header


def test_ple_post_click_tasks_learn_on_clicked_impressions_only(ctr_data):
    """PLE Sec. 4.3: each task's loss over its own sample space; like, follow and forward
    happen after a click, so an unclicked row's labels for them count nothing."""
    from sar_exp.methods.base import PlainBackbone

    dm, batch = ctr_data
    torch.manual_seed(0)
    backbone = {"name": "ple", "encoder": {"_target_": "sar_exp.backbones.ple.PLEScorer"}}
    model = PlainBackbone(dm.schema, backbone, task="ctr", embedding_dim=8,
                          lookup_tables=dm.lookup_tables())  # fmt: skip
    loss, parts = model.training_loss(batch)
    assert set(parts) == {"click", "like", "follow", "forward"}
    changed = dict(batch)
    unclicked = batch["label"] < 0.5
    assert unclicked.any() and (~unclicked).any()
    changed["label_follow"] = torch.where(unclicked, 1.0, batch["label_follow"])
    assert torch.equal(model.training_loss(changed)[0], loss)
    changed["label_follow"] = torch.where(
        unclicked, batch["label_follow"], 1 - batch["label_follow"]
    )
    assert not torch.equal(model.training_loss(changed)[0], loss)


def test_sesrec_under_ctr_refuses_a_schedule_on_a_ranking_metric(ctr_data):
    from sar_exp.methods.sesrec import SESRec

    dm, _ = ctr_data
    with pytest.raises(ConfigError, match="monitor=val/mrr is not logged under task=ctr"):
        SESRec(dm.schema, {"name": "sasrec"}, task="ctr", lr_scheduler=True,
               lookup_tables=dm.lookup_tables())  # fmt: skip
