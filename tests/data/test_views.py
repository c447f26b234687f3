"""Task views: splits, histories without leakage, stored negatives, protocol filters."""

from __future__ import annotations

import numpy as np
import pytest

from sar_exp.data.canonical import load_canonical
from sar_exp.data.views import Protocol, build_view, load_view, sample_negatives
from sar_exp.errors import ConfigError, DataError

USER_ATTRS = ["search_active_level", "rec_active_level"]
ITEM_ATTRS = ["first_level_category_id", "author_id"]


@pytest.fixture(scope="module")
def tables(tiny_folder, tmp_path_factory):
    return load_canonical(tiny_folder, tmp_path_factory.mktemp("c"), USER_ATTRS, ITEM_ATTRS)


def _events(view, task, split):
    s = view.split(task, split)
    return set(zip(s["user"].tolist(), s["item"].tolist(), s["time"].tolist(), s["query"].tolist()))


@pytest.mark.parametrize("name", ["sequential", "ctr"])  # the CF view stores none
def test_histories_hold_only_strictly_earlier_events(tables, name):
    view = build_view(tables, name, Protocol())
    for task in view.task_names():
        for split in ("train", "val", "test"):
            s = view.split(task, split)
            for i in range(0, s["user"].size, max(1, s["user"].size // 300)):
                rec = slice(s["rec_start"][i], s["rec_end"][i])
                assert (view["rec_click_user"][rec] == s["user"][i]).all()
                assert (view["rec_click_time"][rec] < s["time"][i]).all()
                ses = slice(s["search_start"][i], s["search_end"][i])
                assert (view["session_user"][ses] == s["user"][i]).all()
                assert (view["session_time"][ses] < s["time"][i]).all()
                clicks = slice(s["search_click_start"][i], s["search_click_end"][i])
                assert (view["search_click_user"][clicks] == s["user"][i]).all()
                assert (view["search_click_time"][clicks] < s["time"][i]).all()
                # and nothing earlier of this user was left out of the window
                earlier = (view["rec_click_user"] == s["user"][i]) & (
                    view["rec_click_time"] < s["time"][i]
                )
                assert earlier.sum() == s["rec_end"][i] - s["rec_start"][i]


@pytest.mark.parametrize("name", ["sequential", "cf"])
def test_evaluation_events_are_never_training_events(tables, name):
    view = build_view(tables, name, Protocol())
    for task in view.task_names():
        train = _events(view, task, "train")
        held_out = _events(view, task, "val") | _events(view, task, "test")
        assert held_out and not (train & held_out)
        assert not (_events(view, task, "val") & _events(view, task, "test"))


def test_leave_one_out_holds_out_each_users_last_clicks(tables):
    view = build_view(tables, "sequential", Protocol())
    train, test, val = (view.split("rec", s) for s in ("train", "test", "val"))
    last_train = {}
    for u, t in zip(train["user"], train["time"]):
        last_train[u] = max(last_train.get(u, -1), t)
    for u, t_val, t_test in zip(val["user"], val["time"], test["time"]):
        assert last_train[u] <= t_val <= t_test


def test_cf_split_is_eight_one_one_of_unique_clicks(tables):
    view = build_view(tables, "cf", Protocol())
    sizes = np.array([view.split("rec", s)["user"].size for s in ("train", "val", "test")])
    assert np.allclose(sizes / sizes.sum(), [0.8, 0.1, 0.1], atol=0.01)
    pairs = list(zip(*(view.split("rec", s)["user"] for s in ("train", "val", "test"))))
    everything = np.concatenate([np.stack([view.split("rec", s)["user"], view.split("rec", s)["item"]], 1)
                                 for s in ("train", "val", "test")])  # fmt: skip
    assert len(np.unique(everything, axis=0)) == len(everything) and pairs


def _clicked_negatives(view, split: str) -> int:
    """How many stored rec negatives of the split are items their user clicked, in rec
    or in search."""
    clicked = set(zip(view["rec_click_user"].tolist(), view["rec_click_item"].tolist()))
    clicked |= set(zip(view["search_click_user"].tolist(), view["search_click_item"].tolist()))
    part = view.split("rec", split)
    return sum((u, i) in clicked for u, row in zip(part["user"].tolist(),
                                                   part["negatives"].tolist()) for i in row)  # fmt: skip


@pytest.mark.parametrize("name", ["sequential", "cf"])
def test_negatives_are_99_distinct_never_clicked_items(tables, name):
    view = build_view(tables, name, Protocol(rec_negatives_avoid="user"))  # every preset's
    test = view.split("rec", "test")
    negatives = test["negatives"]
    assert negatives.shape == (test["user"].size, 99)
    assert all(len(set(row)) == 99 for row in negatives.tolist())
    assert not (negatives == test["item"][:, None]).any()
    # "never interacted with": not clicked in rec, nor in search (the papers' protocols)
    assert _clicked_negatives(view, "test") == _clicked_negatives(view, "val") == 0
    # rec_negatives_avoid=rec avoids the rec clicks only: search clicks turn up
    rec_only = build_view(tables, name, Protocol(rec_negatives_avoid="rec"))
    assert _clicked_negatives(rec_only, "test") > 0
    pool = set(view["rec_item_pool"].tolist())
    assert set(negatives.ravel().tolist()) <= pool
    # search negatives are never clicked under that query
    search = view.split("search", "test")
    clicked_under = {}
    for s in ("train", "val", "test"):
        part = view.split("search", s)
        for q, i in zip(part["query"].tolist(), part["item"].tolist()):
            clicked_under.setdefault(q, set()).add(i)
    for q, row in zip(search["query"].tolist(), search["negatives"].tolist()):
        assert not clicked_under[q] & set(row)


def test_full_ranking_leaves_out_what_the_stored_negatives_avoid(tables):
    """eval.mode=full masks each user's clicked items: under rec_negatives_avoid=user the
    items they clicked in search as well, as the stored negatives avoid them."""
    import torch

    from sar_exp.data.batches import BatchAssembler

    masked = {}
    for rule in ("rec", "user"):
        view = build_view(tables, "sequential", Protocol(rec_negatives_avoid=rule))
        test = view.split("rec", "test")
        batch = BatchAssembler(view, "rec", "test", full_ranking_exclusions=True)(
            torch.arange(test["user"].size)
        )
        masked[rule] = {(u, i) for u, row in zip(batch["user"].tolist(),
                                                 batch["exclude_items"].tolist()) for i in row if i}  # fmt: skip
        searched = set(zip(view["search_click_user"].tolist(), view["search_click_item"].tolist()))
        searched = {(u, i) for u, i in searched if u in set(test["user"].tolist())}
    clicked = set(zip(view["rec_click_user"].tolist(), view["rec_click_item"].tolist()))
    assert masked["rec"] <= clicked and not searched - clicked <= masked["rec"]
    assert masked["user"] == masked["rec"] | searched


def test_negatives_are_stored_with_the_view(tables, tmp_path):
    first = load_view(tables, "sequential", Protocol(), tmp_path)
    again = load_view(tables, "sequential", Protocol(), tmp_path)
    assert np.array_equal(first["rec.test.negatives"], again["rec.test.negatives"])
    other_seed = build_view(tables, "sequential", Protocol(split_seed=1))
    assert not np.array_equal(first["rec.test.negatives"], other_seed["rec.test.negatives"])


def test_protocol_filters(tables):
    base = build_view(tables, "sequential", Protocol())
    strict = build_view(tables, "sequential", Protocol(min_search_interactions=12))
    assert np.unique(strict["rec.train.user"]).size < np.unique(base["rec.train.user"]).size
    both = build_view(tables, "sequential", Protocol(require_both_histories=True))
    s = both.split("rec", "train")
    assert ((s["rec_end"] > s["rec_start"]) & (s["search_end"] > s["search_start"])).all()
    assert both["search.train.user"].size == base["search.train.user"].size  # rec's only
    unisar = build_view(tables, "sequential", Protocol(require_both_histories=True,
                                                       both_histories_tasks=("rec", "search")))  # fmt: skip
    for task in ("rec", "search"):  # every sample of both tasks, as UniSAR's data has them
        s = unisar.split(task, "train")
        assert ((s["rec_end"] > s["rec_start"]) & (s["search_end"] > s["search_start"])).all()
        assert 0 < s["user"].size < base.split(task, "train")["user"].size
    capped = build_view(tables, "sequential", Protocol(max_interactions_per_user=20))
    per_user = np.bincount(capped["rec_click_user"])
    assert per_user.max() <= 20
    first_shown = build_view(
        tables, "sequential", Protocol(no_click_session_positive="first_shown")
    )
    assert first_shown["search.train.user"].size > base["search.train.user"].size


def test_ctr_view_keeps_labels_and_query_item_lists(tables):
    view = build_view(tables, "ctr", Protocol())
    test = view.split("rec", "test")
    assert set(np.unique(test["label"]).tolist()) == {0.0, 1.0}
    # the whole last request of each user is the test action
    assert (
        np.unique(np.stack([test["user"], test["time"]], 1), axis=0).shape[0]
        == np.unique(test["user"]).size
    )
    offsets, items = view["query_clicked_offsets"], view["query_clicked_items"]
    assert offsets[-1] == items.size and (np.diff(offsets) >= 0).all()
    assert view["query_unclicked_items"].size > 0
    # I_q- is what was shown under q and clicked under q by no one (QueryRec 4.2)
    un_offsets, unclicked = view["query_unclicked_offsets"], view["query_unclicked_items"]
    clicked_pairs = set(zip(np.repeat(np.arange(offsets.size - 1), np.diff(offsets)), items))
    unclicked_pairs = set(
        zip(np.repeat(np.arange(un_offsets.size - 1), np.diff(un_offsets)), unclicked)
    )
    assert clicked_pairs and unclicked_pairs and not clicked_pairs & unclicked_pairs


def test_bad_protocol_values_are_named():
    with pytest.raises(
        ConfigError, match="dataset.protocol.max_rec_history must be a positive integer, got 0"
    ):
        Protocol(max_rec_history=0)
    with pytest.raises(ConfigError, match="cf_split"):
        Protocol(cf_split=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match=r"dataset.protocol.views must be a non-empty subset"):
        Protocol(views=("graph",))
    with pytest.raises(ConfigError, match=r"protocol=clardrec_cf is defined for the cf view"):
        build_view(None, "sequential", Protocol(name="clardrec_cf", views=("cf",)))


def test_negative_sampling_reports_impossible_requests():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="only 5 candidate items"):
        sample_negatives(
            rng, np.arange(1, 6), np.array([1]), np.array([1]), np.zeros(0, np.int64), 99, "rec"
        )


def test_view_cache_is_keyed_on_the_code_that_built_it(tables, tmp_path, monkeypatch):
    from sar_exp.data import views

    load_view(tables, "sequential", Protocol(), tmp_path)
    load_view(tables, "sequential", Protocol(), tmp_path)
    assert len(list(tmp_path.glob("view-sequential-*"))) == 1  # same code: reused
    monkeypatch.setattr(views, "code_fingerprint", lambda *modules: "changed-preprocessing")
    load_view(tables, "sequential", Protocol(), tmp_path)
    assert len(list(tmp_path.glob("view-sequential-*"))) == 2  # changed code: rebuilt, not stale


def test_clardrec_window_comes_before_the_search_filter(tables):
    """B.1: keep each user's last N interactions, then drop users with fewer than K
    search clicks in that window, so every kept user has K of them."""
    view = build_view(
        tables, "sequential", Protocol(max_interactions_per_user=20, min_search_interactions=5)
    )
    users = np.unique(view["rec_click_user"])
    search_clicks = np.bincount(view["search_click_user"], minlength=users.max() + 1)
    assert users.size > 0 and (search_clicks[users] >= 5).all()
    rec_clicks = np.bincount(view["rec_click_user"], minlength=users.max() + 1)
    assert (rec_clicks[users] + search_clicks[users] <= 20).all()


def test_a_reader_change_that_keeps_row_counts_builds_a_new_view(
    tiny_folder, tmp_path, monkeypatch
):
    """Views are keyed on the canonical tables' cache key, not on their row counts."""
    from sar_exp.data import canonical
    from sar_exp.data.datamodule import SARDataModule

    def load():
        dm = SARDataModule(
            "kuaisar", str(tiny_folder), str(tmp_path), "sequential", USER_ATTRS, ITEM_ATTRS
        )
        return dm.load()  # fmt: skip

    first = load()
    monkeypatch.setattr(canonical, "code_fingerprint", lambda *modules: "changed-reader")
    second = load()
    assert first.meta == second.meta  # same sizes and counts...
    assert len(list(tmp_path.glob("view-sequential-*"))) == 2  # ...yet a fresh view
