"""No leakage across tasks: no training sample of any task, and nothing a model reads
in training (histories, QueryRec's per-query item lists), contains a validation or test
event of an evaluated task of the same user, in every view and under every protocol."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from sar_exp.data.canonical import load_canonical
from sar_exp.data.views import Protocol, build_view

USER_ATTRS = ["search_active_level", "rec_active_level"]
ITEM_ATTRS = ["first_level_category_id", "author_id"]
NEVER = np.iinfo(np.int64).max

PROTOCOLS = {
    "default": Protocol(),
    "both_evaluated": Protocol(evaluated_tasks=("rec", "search")),
    "clardrec_seq": Protocol(max_interactions_per_user=40, min_search_interactions=5,
                             train_negatives_avoid="user"),
    "both_histories": Protocol(require_both_histories=True),
    "first_shown": Protocol(no_click_session_positive="first_shown"),
    "time_split": Protocol(split="time", local_time_offset_hours=8),
    "popularity": Protocol(negatives="popularity"),
    "unisar_kuaisar": Protocol(
        split="time", drop_last_days=2, k_core=5, require_both_behaviours=True,
        require_both_histories=True, train_negatives="popularity", rec_negatives_avoid="user",
        search_negatives_avoid="user", local_time_offset_hours=8, evaluated_tasks=("rec", "search"),
        num_eval_negatives=20,  # the tiny data after 5-core has few items
    ),
    # SESRec on KuaiSAR: UniSAR's filters, both histories before each interaction, caps
    # 150/25, uniform stored and popularity training negatives
    "sesrec": Protocol(
        require_both_histories=True, require_both_behaviours=True, drop_last_days=2, k_core=5,
        max_rec_history=150, max_search_history=25, train_negatives="popularity",
        local_time_offset_hours=8, num_eval_negatives=20,
    ),
}  # fmt: skip
TIME_ONLY = {"time_split", "unisar_kuaisar"}  # the cf view splits at random


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
    _check_time_ordered(build_view(tables, name, PROTOCOLS[protocol]), PROTOCOLS[protocol])


@pytest.mark.parametrize("evaluated", [("rec",), ("rec", "search")])
def test_amazon_purchases_are_both_tasks_and_never_leak(tmp_path, evaluated):
    """On Amazon a purchase is a rec click and a search click at one time: the search
    twin of a held-out rec purchase must not train (nor sit in a training history)."""
    from pathlib import Path

    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "amazon"
    amazon = load_canonical(fixture, tmp_path, [], [], source="amazon",
                            reader_options={"category": "Toy_Store"})  # fmt: skip
    protocol = Protocol(num_eval_negatives=9, evaluated_tasks=evaluated)
    _check_time_ordered(build_view(amazon, "sequential", protocol), protocol)


def _check_time_ordered(view, protocol):
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
    clicked_before = before.filter(pl.col("clicked") == 1)
    clicked_pairs = set(zip(clicked_before["query"].to_list(), clicked_before["item"].to_list()))
    for kind, clicked in (("clicked", 1), ("unclicked", 0)):
        offsets, items = view[f"query_{kind}_offsets"], view[f"query_{kind}_items"]
        query = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
        listed = set(zip(query.tolist(), items.tolist()))
        allowed = before.filter(pl.col("clicked") == clicked)
        pairs = set(zip(allowed["query"].to_list(), allowed["item"].to_list()))
        # I_q- is shown under q and clicked under q by no one (before the cut-offs)
        assert listed == (pairs if clicked else pairs - clicked_pairs)
        every = search.filter(pl.col("clicked") == clicked)
        assert listed < set(zip(every["query"].to_list(), every["item"].to_list()))


@pytest.mark.parametrize(
    "protocol, view_name",
    [("popularity", "sequential"), ("unisar_kuaisar", "sequential"), ("sesrec", "sequential"),
     ("clardrec_seq", "sequential"), ("clardrec_seq", "cf")],
)  # fmt: skip
def test_negatives_are_drawn_from_training_clicks_only(tables, protocol, view_name):
    """What training negatives are drawn by: training clicks per item (popularity), and
    the users' training clicks they avoid (popularity: their task's; ClardRec's uniform
    ones: both tasks'); no held-out event of either task counts."""
    protocol = PROTOCOLS[protocol]
    view = build_view(tables, view_name, protocol)

    def keys(task, split):
        part = view.split(task, split)
        return (part["user"].astype(np.int64) << 32) + part["item"].astype(np.int64)

    both = np.union1d(keys("rec", "train"), keys("search", "train"))
    for task in ("rec", "search"):
        if "popularity" in (protocol.negatives, protocol.train_negatives):
            size = view["item_attributes"].shape[0]
            counts = np.bincount(view.split(task, "train")["item"], minlength=size)
            assert np.array_equal(view[f"{task}_popularity"], counts)
        mine = np.unique(keys(task, "train"))
        expected = both if protocol.train_negatives_avoid == "user" else mine
        assert np.array_equal(view[f"{task}_train_clicks"], expected)


@pytest.mark.parametrize("protocol", sorted(set(PROTOCOLS) - TIME_ONLY))
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


def test_a_sample_at_the_exact_time_of_a_heldout_event_is_dropped():
    """Ties: "strictly before" the first held-out event, for samples and for CTR lists."""
    from sar_exp.data.views import (
        DROPPED,
        _drop_training_after_heldout,
        _leave_one_out,
        _strictly_before,
    )

    user = np.ones(4, np.int32)
    rec = {"user": user, "time": np.array([10, 20, 30, 40])}  # validation at 30
    search = {"user": user, "time": np.array([5, 30, 50, 60])}  # 5 and 30 train
    tasks = {"rec": (rec, _leave_one_out(user)), "search": (search, _leave_one_out(user))}
    _drop_training_after_heldout(tasks, ("rec",), n_users=1)
    assert tasks["search"][1].tolist() == [0, DROPPED, 1, 2]
    assert tasks["rec"][1].tolist() == [0, 0, 1, 2]  # its own split is left as it was
    frame = pl.DataFrame({"user": [1, 1, 1], "time": [29, 30, 31]})
    cutoff = np.array([0, 30])
    assert _strictly_before(frame, cutoff)["time"].to_list() == [29]


def test_twin_search_clicks_are_one_event(tables):
    """Two sessions of one user in the same millisecond clicking the same item are one
    search event, so a twin cannot train while the original is held out."""
    from sar_exp.data.canonical import CanonicalTables

    clicked = tables.search.filter(pl.col("clicked") == 1).row(0, named=True)
    original = tables.sessions.filter(pl.col("session") == clicked["session"])
    twin_id = int(tables.sessions["session"].max()) + 1
    twin = original.with_columns(session=pl.lit(twin_id, original["session"].dtype))
    twin_rows = tables.search.filter(
        (pl.col("session") == clicked["session"]) & (pl.col("item") == clicked["item"])
    ).with_columns(session=pl.lit(twin_id, tables.search["session"].dtype))
    doubled = CanonicalTables(
        users=tables.users, items=tables.items, queries=tables.queries, rec=tables.rec,
        sessions=pl.concat([tables.sessions, twin]), search=pl.concat([tables.search, twin_rows]),
        meta=tables.meta, key=tables.key,
    )  # fmt: skip
    view = build_view(doubled, "sequential", Protocol(evaluated_tasks=("rec", "search")))
    events = list(
        zip(view["search_click_user"], view["search_click_item"], view["search_click_time"])
    )
    assert len(events) == len(set(events))
    assert len(events) == build_view(tables, "sequential", Protocol())["search_click_user"].size


def test_the_interaction_window_drops_a_session_whose_clicks_were_all_cut():
    """Two sessions at the cut-off time, one click each, a window of one click: the later
    one keeps its click; the other goes with its shown items (not left click-less)."""
    from sar_exp.data.views import _keep_recent_interactions

    rec = pl.DataFrame({"user": [1], "item": [3], "time": [1], "click": [1], "order": [0]})
    sessions = pl.DataFrame({"session": [1, 2], "user": [1, 1], "time": [10, 10], "query": [1, 1]})
    search = pl.DataFrame({
        "session": [1, 1, 2, 2], "item": [7, 8, 9, 6], "clicked": [1, 0, 1, 0],
        "position": [0, 1, 0, 1], "user": [1, 1, 1, 1], "query": [1, 1, 1, 1],
        "time": [10, 10, 10, 10],
    })  # fmt: skip
    rec, sessions, search = _keep_recent_interactions(rec, sessions, search, limit=1)
    assert rec.height == 0
    assert sessions["session"].to_list() == [2]
    assert search["item"].to_list() == [9, 6]


@pytest.mark.parametrize("protocol", ["unisar", "unisar_kuaisar"])
def test_unisar_training_steps_read_nothing_from_a_heldout_event(make_cfg, protocol):
    """UniSAR trains both tasks in every step, each row with its rec, search and merged
    histories (and L_Rel's pairs from the search history): every rec row and companion
    search row comes before the user's first held-out event of the other task, and
    every event in their histories before the first held-out event of either task."""
    import hydra

    cfg = make_cfg("method=unisar", "backbone=sasrec", f"protocol={protocol}",
                   "dataset.protocol.evaluated_tasks=[rec,search]",
                   "dataset.protocol.num_eval_negatives=20", "data.batch_size=64")  # fmt: skip
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    view = datamodule.view
    held = {task: _heldout(view, task)[1] for task in ("rec", "search")}
    first = np.minimum(held["rec"], held["search"])
    seen = {"rec": 0, "search": 0}
    for batch in datamodule.train_dataloader():
        for task, rows in (("rec", batch), ("search", batch["search"])):
            other = "search" if task == "rec" else "rec"
            user = rows["user"].numpy()
            time = view.split(task, "train")["time"][rows["sample_index"].numpy()]
            # the other task's held-out events: strictly after; the task's own: not
            # before (a click sent in the same request as the held-out one trains)
            assert (time < held[other][user]).all() and (time <= held[task][user]).all(), task
            valid = rows["interleaved_mask"]
            # the merged history holds every event of the two histories (Eq. 4's input)...
            both = rows["rec_history_mask"].sum(1) + rows["search_history_mask"].sum(1)
            assert torch.equal(valid.sum(1), both), task
            # ...and each of them happened before the user's first held-out event
            owner = np.broadcast_to(user[:, None], valid.shape)[valid.numpy()]
            assert (rows["interleaved_time"][valid].numpy() < first[owner]).all(), task
            seen[task] += int(valid.sum())
    assert seen["rec"] > 0 and seen["search"] > 0


@pytest.mark.parametrize("protocol", ["default", "both_histories", "time_split"])
def test_queryrec_future_lists_stop_at_the_training_cutoff(tables, protocol):
    """QueryRec's next-item lists r+_{u,t} and r-_{u,t} hold future impressions: every
    one drawn for a training sample is the same user's, strictly after the sample and
    strictly before the user's first held-out request, and clicked (r+) or not (r-)."""
    from sar_exp.data.batches import BatchAssembler
    from sar_exp.data.queryrec_batches import QueryRecExtras

    view = build_view(tables, "ctr", PROTOCOLS[protocol])
    _, first = _heldout(view, "rec")
    assembler = BatchAssembler(view, "rec", "train")
    clicked = view["query_clicked_offsets"], view["query_clicked_items"]
    assembler.extras = QueryRecExtras(
        assembler.samples, assembler.context, 8, 8,
        tuple(torch.from_numpy(a).long() for a in clicked), 4, 16,
        int(view.meta["num_items"]),
    )  # fmt: skip
    train = view.split("rec", "train")
    times: dict[tuple, list] = {}  # (user, item, label) -> training impression times
    for u, i, t, y in zip(train["user"], train["item"], train["time"], train["label"]):
        times.setdefault((u, i, y), []).append(t)
    batch = assembler(torch.arange(len(assembler)))
    user, time = train["user"], train["time"]
    checked = 0
    for kind, label in (("positive", 1.0), ("negative", 0.0)):
        items = batch[f"next_{kind}"].numpy()
        rows, cols = np.nonzero(batch[f"next_{kind}_mask"].numpy())
        assert rows.size > 0
        for r, c in zip(rows, cols):
            later = [t for t in times.get((user[r], items[r, c], label), []) if t > time[r]]
            assert later and min(later) < first[user[r]], (kind, r)
            checked += 1
    assert checked > 1000


def test_ctr_query_item_lists_under_the_time_split_end_before_the_held_out_days(tables):
    """Held out by day, no one's searches from the held-out days count, not even those
    of a user without a held-out request (their cut-off would otherwise be never)."""
    view = build_view(tables, "ctr", PROTOCOLS["time_split"])
    _, first = _heldout(view, "rec")
    assert (first == NEVER).any()  # users without a held-out request exist here
    search = tables.search.filter(pl.col("clicked") == 1).join(
        tables.sessions.select("session", "query", "time"), on="session"
    )
    late = search.filter(pl.col("time") >= first.min())
    late_pairs = set(zip(late["query"].to_list(), late["item"].to_list()))
    early = search.filter(pl.col("time") < first.min())
    late_only = late_pairs - set(zip(early["query"].to_list(), early["item"].to_list()))
    assert late_only  # pairs that only the held-out days have
    offsets, items = view["query_clicked_offsets"], view["query_clicked_items"]
    listed = set(
        zip(np.repeat(np.arange(offsets.size - 1), np.diff(offsets)).tolist(), items.tolist())
    )
    assert not listed & late_only


@pytest.mark.parametrize("protocol", ["default", "both_evaluated", "time_split"])
@pytest.mark.parametrize("name", ["sequential", "ctr"])
def test_iv4rec_instruments_come_from_search_clicks_before_the_cut_offs(tables, name, protocol):
    """IV4Rec+'s instruments (each item's most clicked-through queries) count only search
    clicks made before their user's first held-out event: a (item, query) pair that was
    clicked only after those cut-offs, which a reader of the whole log would take in,
    never becomes an instrument."""
    from sar_exp.data.datamodule import item_queries

    protocol = PROTOCOLS[protocol]
    view = build_view(tables, name, protocol)
    first = np.full(view["user_attributes"].shape[0], NEVER)
    for task in protocol.evaluated_tasks:
        if task in view.task_names():
            first = np.minimum(first, _heldout(view, task)[1])
    clicks = tables.search.filter(pl.col("clicked") == 1).join(
        tables.sessions.select("session", "user", "query", "time"), on="session"
    )
    before = clicks["time"].to_numpy() < first[clicks["user"].to_numpy()]
    item, query = clicks["item"].to_numpy(), clicks["query"].to_numpy()
    allowed = set(zip(item[before].tolist(), query[before].tolist()))
    only_after = set(zip(item[~before].tolist(), query[~before].tolist())) - allowed
    assert len(only_after) > 10  # the embedded data hold such post-cut-off clicks
    table = item_queries(view, 1000)
    used = {(i, int(q)) for i, row in enumerate(table) for q in row if q}
    assert len(used) > 100 and used <= allowed
    assert not used & only_after
