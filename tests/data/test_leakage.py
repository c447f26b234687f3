"""No leakage across tasks: no training sample of any task, and nothing a model reads
in training (histories, QueryRec's per-query item lists), contains a validation or test
event of an evaluated task of the same user, in every view and under every protocol."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from sar_exp.data.canonical import load_canonical
from sar_exp.data.views import Protocol, build_view

USER_ATTRS = ["search_active_level", "rec_active_level"]
ITEM_ATTRS = ["first_level_category_id", "author_id"]
NEVER = np.iinfo(np.int64).max

PROTOCOLS = {
    "default": Protocol(),
    "both_evaluated": Protocol(evaluated_tasks=("rec", "search")),
    "clardrec_seq": Protocol(max_interactions_per_user=40, min_search_interactions=5),
    "both_histories": Protocol(require_both_histories=True),
    "first_shown": Protocol(no_click_session_positive="first_shown"),
}


@pytest.fixture(scope="module")
def tables(tiny_folder, tmp_path_factory):
    return load_canonical(tiny_folder, tmp_path_factory.mktemp("c"), USER_ATTRS, ITEM_ATTRS)


def _ranges(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of every [start, end) range and the row each came from."""
    lengths = np.maximum(end - start, 0)
    owner = np.repeat(np.arange(start.size), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(start, lengths) + offsets, owner


def _events(user, item, time) -> set:
    return set(zip(user.tolist(), item.tolist(), time.tolist()))


def _heldout(view, task):
    """(events (user, item, time), first held-out time per user) of one task."""
    user = np.concatenate([view[f"{task}.{s}.user"] for s in ("val", "test")])
    item = np.concatenate([view[f"{task}.{s}.item"] for s in ("val", "test")])
    time = np.concatenate([view[f"{task}.{s}.time"] for s in ("val", "test")])
    first = np.full(view["user_attributes"].shape[0], NEVER)
    np.minimum.at(first, user, time)
    return _events(user, item, time), first


def _history_events(view, train):
    """(user, item, time) of everything the training samples' histories point at."""
    found = []
    idx, row = _ranges(train["rec_start"], train["rec_end"])
    found.append((train["user"][row], view["rec_click_item"][idx], view["rec_click_time"][idx]))
    idx, row = _ranges(train["search_click_start"], train["search_click_end"])
    found.append(
        (train["user"][row], view["search_click_item"][idx], view["search_click_time"][idx])
    )
    idx, row = _ranges(train["search_start"], train["search_end"])
    clicks = view["session_clicks"][idx]
    k = clicks.shape[1]
    found.append(
        (
            np.repeat(train["user"][row], k),
            clicks.ravel(),
            np.repeat(view["session_time"][idx], k),
        )
    )
    user, item, time = (np.concatenate(parts) for parts in zip(*found))
    keep = item > 0  # padding of session clicks
    return user[keep], item[keep], time[keep]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=list(PROTOCOLS))
@pytest.mark.parametrize("name", ["sequential", "ctr"])
def test_time_ordered_views_keep_heldout_events_out_of_training(tables, name, protocol):
    protocol = PROTOCOLS[protocol]
    view = build_view(tables, name, protocol)
    evaluated = [t for t in protocol.evaluated_tasks if t in view.task_names()]
    held = {task: _heldout(view, task) for task in evaluated}
    for task in view.task_names():
        train = view.split(task, "train")
        assert train["user"].size > 0
        samples = _events(train["user"], train["item"], train["time"])
        h_user, h_item, h_time = _history_events(view, train)
        assert h_user.size > 0
        for other, (events, first) in held.items():
            assert not samples & events, (task, other)
            assert not _events(h_user, h_item, h_time) & events, (task, other)
            # everything read in training ends before the user's first held-out event
            assert (h_time < first[h_user]).all(), (task, other)
            if other != task:  # the auxiliary task's samples themselves, strictly before
                assert (train["time"] < first[train["user"]]).all(), (task, other)


def test_ctr_query_item_lists_come_from_searches_before_the_heldout_requests(tables):
    view = build_view(tables, "ctr", Protocol())
    _, first = _heldout(view, "rec")
    # one search result per (session, item), clicked if any copy was
    search = (
        tables.search.group_by("session", "item")
        .agg(pl.col("clicked").max())
        .join(tables.sessions.select("session", "user", "query", "time"), on="session")
    )
    before = search.filter(search["time"].to_numpy() < first[search["user"].to_numpy()])
    for kind, clicked in (("clicked", 1), ("unclicked", 0)):
        offsets, items = view[f"query_{kind}_offsets"], view[f"query_{kind}_items"]
        query = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
        listed = set(zip(query.tolist(), items.tolist()))
        allowed = before.filter(pl.col("clicked") == clicked)
        assert listed == set(zip(allowed["query"].to_list(), allowed["item"].to_list()))
        every = search.filter(pl.col("clicked") == clicked)
        assert listed < set(zip(every["query"].to_list(), every["item"].to_list()))


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=list(PROTOCOLS))
def test_cf_view_keeps_heldout_pairs_out_of_training(tables, protocol):
    protocol = PROTOCOLS[protocol]
    view = build_view(tables, "cf", protocol)
    pairs = {
        (task, split): set(zip(view[f"{task}.{split}.user"].tolist(), view[f"{task}.{split}.item"].tolist()))
        for task in ("rec", "search")
        for split in ("train", "val", "test")
    }  # fmt: skip
    for task in ("rec", "search"):
        # the CF scenario reads no histories: none are stored
        for split in ("train", "val", "test"):
            s = view.split(task, split)
            for name in ("rec", "search", "search_click"):
                assert (s[f"{name}_end"] == s[f"{name}_start"]).all()
        for other in protocol.evaluated_tasks:
            if other != task:
                held = pairs[(other, "val")] | pairs[(other, "test")]
                assert not pairs[(task, "train")] & held, (task, other)


def test_cf_independent_splits_is_the_literal_protocol_with_the_overlap(tables):
    literal = build_view(tables, "cf", Protocol(cf_independent_splits=True))
    held = {
        (u, i)
        for s in ("val", "test")
        for u, i in zip(literal[f"rec.{s}.user"].tolist(), literal[f"rec.{s}.item"].tolist())
    }
    train = set(zip(literal["search.train.user"].tolist(), literal["search.train.item"].tolist()))
    assert train & held  # the overlap the default removes
    default = build_view(tables, "cf", Protocol())
    assert default["search.train.user"].size < literal["search.train.user"].size
    assert np.array_equal(default["rec.test.item"], literal["rec.test.item"])
