"""Protocol options on small hand-built tables with hand-checked splits: time split (local
days), dropped last days, k-core, users with both behaviours, popularity negatives; the
papers' presets and the statistics command."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from sar_exp.data.canonical import CanonicalTables
from sar_exp.data.views import Protocol, build_view
from sar_exp.errors import ConfigError

HOUR, DAY = 3_600_000, 86_400_000
ORIGIN = 1_684_713_600_000  # 2023-05-22 00:00 UTC = 08:00 in Beijing


def tables(rec_events, search_events, n_items=40, n_users=4) -> CanonicalTables:
    """rec_events: (user, item, time_ms); search_events: (user, item, time_ms, query)."""
    rec = pl.DataFrame(
        {
            "user": [u for u, _, _ in rec_events], "item": [i for _, i, _ in rec_events],
            "time": [t for _, _, t in rec_events], "click": [1] * len(rec_events),
            "order": list(range(len(rec_events))),
        },
        schema={"user": pl.Int32, "item": pl.Int32, "time": pl.Int64, "click": pl.Int8, "order": pl.UInt32},
    )  # fmt: skip
    # a 5th field puts several clicks in one session; else each event is its own
    session_of = [e[4] if len(e) > 4 else k + 1 for k, e in enumerate(search_events)]
    first = {}
    for e, sid in zip(search_events, session_of):
        first.setdefault(sid, e)
    sessions = pl.DataFrame(
        {"session": list(first), "user": [e[0] for e in first.values()],
         "query": [e[3] for e in first.values()], "time": [e[2] for e in first.values()],
         "source": [1] * len(first)},
        schema={"session": pl.Int32, "user": pl.Int32, "query": pl.Int32, "time": pl.Int64, "source": pl.Int32},
    )  # fmt: skip
    search = pl.DataFrame(
        {"session": session_of, "item": [e[1] for e in search_events],
         "clicked": [1] * len(search_events), "position": [0] * len(search_events)},
        schema={"session": pl.Int32, "item": pl.Int32, "clicked": pl.Int8, "position": pl.Int32},
    )  # fmt: skip
    items = pl.DataFrame({"item": range(1, n_items + 1), "in_rec": True, "in_search": True},
                         schema={"item": pl.Int32, "in_rec": pl.Boolean, "in_search": pl.Boolean})  # fmt: skip
    meta = {"num_users": n_users, "num_items": n_items, "num_words": 3, "num_queries": 3,
            "num_sources": 1, "user_attributes": [], "item_attributes": [],
            "user_attribute_sizes": [], "item_attribute_sizes": [], "max_query_words": 1,
            "time_origin_ms": ORIGIN}  # fmt: skip
    return CanonicalTables(
        users=pl.DataFrame({"user": range(1, n_users + 1)}, schema={"user": pl.Int32}),
        items=items,
        queries=pl.DataFrame({"query": [1, 2, 3], "words": [[1], [2], [3]]}),
        rec=rec, sessions=sessions, search=search, meta=meta, key="hand-built",
    )  # fmt: skip


def split_of(view, task):
    return {s: sorted(zip(view[f"{task}.{s}.user"].tolist(), view[f"{task}.{s}.item"].tolist()))
            for s in ("train", "val", "test")}  # fmt: skip


def test_time_split_uses_the_datasets_local_days():
    # Beijing days begin at 16:00 UTC; the origin is 08:00 in Beijing on day D
    t = lambda day, hour: day * DAY + hour * HOUR  # noqa: E731  (hours after the origin)
    rec = [(1, 1, t(0, 1)), (1, 2, t(1, 1)), (1, 3, t(1, 15)), (1, 4, t(2, 2)), (2, 5, t(1, 2)),
           (2, 6, t(2, 20))]  # fmt: skip
    search = [(1, 7, t(0, 2), 1), (2, 8, t(2, 3), 2)]
    view = build_view(tables(rec, search), "sequential",
                      Protocol(split="time", local_time_offset_hours=8, num_eval_negatives=3))  # fmt: skip
    # local days: t(2,20) is 04:00 of day D+3 (the last, test); day D+2 (validation) runs
    # from t(1,16) to t(2,16): (1,4), (2,8) search; (1,3) at t(1,15) is still day D+1
    assert split_of(view, "rec") == {
        "train": [(1, 1), (1, 2), (1, 3), (2, 5)], "val": [(1, 4)], "test": [(2, 6)],
    }  # fmt: skip
    assert split_of(view, "search")["val"] == [(2, 8)]
    utc = build_view(tables(rec, search), "sequential",
                     Protocol(split="time", num_eval_negatives=3))  # fmt: skip
    assert split_of(utc, "rec")["test"] == [(1, 4), (2, 6)]  # UTC days: both on day D+2


def test_last_days_are_dropped_before_the_split():
    rec = [(1, i, i * DAY) for i in range(1, 7)] + [(2, 10 + i, i * DAY) for i in range(1, 5)]
    search = [(1, 20, 2 * DAY + 5, 1), (2, 21, 3 * DAY + 5, 1)]
    search += [(3, 22 + k, DAY, 2) for k in range(6)]  # enough searched items for negatives
    view = build_view(tables(rec, search), "sequential",
                      Protocol(split="time", drop_last_days=2, num_eval_negatives=3))  # fmt: skip
    # days 5 and 6 go; day 4 is then the last (test), day 3 validation
    assert split_of(view, "rec") == {
        "train": [(1, 1), (1, 2), (2, 11), (2, 12)], "val": [(1, 3), (2, 13)], "test": [(1, 4), (2, 14)],
    }  # fmt: skip


def test_k_core_removes_until_every_user_and_item_has_k_clicks():
    # user 3 has 2 clicks -> goes; then item 2 falls to 2 clicks -> goes; then user 2 has 2
    rec = ([(1, 1, k) for k in range(3)] + [(2, 1, 10 + k) for k in range(2)] + [(2, 2, 20)]
           + [(3, 2, 30), (3, 1, 31)] + [(1, 2, 40)] + [(1, 3, 50 + k) for k in range(3)])  # fmt: skip
    kept = {1, 3, *range(5, 17)}
    rec += [(4 + item // 11, item, 100 + 3 * item + k) for item in range(5, 17) for k in range(3)]
    search = [(1, 3, 5, 1), (1, 1, 6, 1)]  # before the rec validation event
    search += [
        (4 + item // 11, item, 99, 2 + item // 11) for item in range(5, 17)
    ]  # users 4, 5 stay
    view = build_view(tables(rec, search, n_users=5), "sequential",
                      Protocol(k_core=3, num_eval_negatives=3))  # fmt: skip
    assert set(view["rec_click_user"].tolist()) == {1, 4, 5}
    assert set(view["rec_click_item"].tolist()) == kept
    assert set(view["search_click_item"].tolist()) == kept
    # the removed items are no one's negatives any more (uniform negatives included)
    assert set(view["rec_item_pool"].tolist()) == kept
    assert set(view["rec.test.negatives"].ravel().tolist()) <= kept


def test_only_users_with_both_behaviours():
    rec = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (2, 4, 1), (2, 5, 2), (2, 6, 3)]
    rec += [(3, 10 + k, 5 + k) for k in range(8)]
    search = [(1, 7, 0, 1), (3, 8, 0, 1)]
    view = build_view(tables(rec, search), "sequential",
                      Protocol(require_both_behaviours=True, num_eval_negatives=3))  # fmt: skip
    assert set(view["rec_click_user"].tolist()) == {1, 3}


def test_popularity_negatives_follow_training_clicks_and_avoid_the_users_clicks():
    from sar_exp.data.batches import BatchAssembler

    rng = np.random.default_rng(0)
    rec = []
    for user in range(1, 41):  # item 1 is bought by everyone, items 2-30 rarely
        items = [1, *rng.choice(np.arange(2, 31), 5, replace=False).tolist()]
        rec += [(user, int(i), k * DAY) for k, i in enumerate(items)]
    search = [(u, 31, 0, 1) for u in range(1, 41)]  # one each: nothing held out
    view = build_view(tables(rec, search, n_items=40, n_users=40), "sequential",
                      Protocol(negatives="popularity", num_eval_negatives=5))  # fmt: skip
    negatives = view["rec.test.negatives"]
    trained = set(view["rec.train.item"].tolist())
    assert set(negatives.ravel().tolist()) <= trained  # only items with training clicks
    clicked = set(zip(view["rec_click_user"].tolist(), view["rec_click_item"].tolist()))
    users = view["rec.test.user"].tolist()
    assert not any((u, i) in clicked for u, row in zip(users, negatives.tolist()) for i in row)
    # training negatives: by popularity, never an item the user clicked in training
    assembler = BatchAssembler(view, "rec", "train", num_train_negatives=20, seed=0)
    index = np.arange(view["rec.train.user"].size)
    import torch

    batch = assembler(torch.from_numpy(index), 0, 0)
    train_clicks = set(zip(view["rec.train.user"].tolist(), view["rec.train.item"].tolist()))
    drawn = batch["candidates"][:, 1:].tolist()
    assert not any(
        (u, i) in train_clicks for u, row in zip(batch["user"].tolist(), drawn) for i in row
    )
    counts = np.bincount(np.array(drawn).ravel(), minlength=41)
    popularity = view["rec_popularity"]
    assert np.corrcoef(counts[2:31], popularity[2:31])[0, 1] > 0.5


@pytest.mark.parametrize("view_name", ["sequential", "cf"])
def test_uniform_training_negatives_can_avoid_the_users_training_clicks(view_name):
    """ClardRec's I- (train_negatives_avoid=user): no training negative of either task is
    an item the user clicked in the training data of either task (rec items 1-100, search
    items 101-200 here, so a task's own clicks alone would not do); a held-out click is
    still drawn (avoiding it would point at the answer). The default avoids only the
    positive, so on the same data it does draw training clicks."""
    import torch

    from sar_exp.data.batches import BatchAssembler

    rng = np.random.default_rng(0)
    rec, search = [], []
    for user in range(1, 21):
        for k, item in enumerate(rng.choice(np.arange(1, 101), 15, replace=False).tolist()):
            rec.append((user, item, k * DAY))
        for k, item in enumerate(rng.choice(np.arange(101, 201), 15, replace=False).tolist()):
            search.append((user, item, k * DAY + HOUR, 1 + k % 3))
    for avoid in ("positive", "user"):
        protocol = Protocol(num_eval_negatives=3, train_negatives_avoid=avoid)
        view = build_view(tables(rec, search, n_items=200, n_users=20), view_name, protocol)
        pairs = {(task, split): set(zip(view[f"{task}.{split}.user"].tolist(),
                                        view[f"{task}.{split}.item"].tolist()))
                 for task in ("rec", "search") for split in ("train", "val", "test")}  # fmt: skip
        trained = pairs["rec", "train"] | pairs["search", "train"]
        for task in ("rec", "search"):
            size = view[f"{task}.train.user"].size
            batch = BatchAssembler(view, task, "train", num_train_negatives=40, seed=0)(
                torch.arange(size), 0, 0
            )
            drawn = {(u, i) for u, row in zip(batch["user"].tolist(),
                                              batch["candidates"][:, 1:].tolist()) for i in row}  # fmt: skip
            if avoid == "user":
                assert not drawn & trained, task
                heldout = (pairs[task, "val"] | pairs[task, "test"]) - trained
                assert heldout & drawn, task  # held-out items are still drawn
            else:  # about 1 in 14 draws is a training click
                assert len(drawn & trained) > 20, task
    assert "train_negatives_avoid" in str(_refused(train_negatives_avoid="query"))


def _refused(**protocol) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        Protocol(**protocol)
    return error.value


@pytest.mark.parametrize("stored, training", [("uniform", "popularity"), ("popularity", "uniform")])
def test_training_negatives_can_follow_another_sampler_than_the_stored_ones(stored, training):
    """SESRec: uniform evaluation candidates (5.1.2), popularity training negatives (its
    code); and the reverse. Users 1-20 click item 1 ten times each; users 21-40 never do,
    so by popularity nearly all their candidate rows hold item 1, uniformly few do."""
    import torch

    from sar_exp.data.batches import BatchAssembler

    fans = [(u, 1, k * DAY) for u in range(1, 21) for k in range(10)]
    fans += [(u, 40 + u, 10 * DAY) for u in range(1, 21)]
    others = [(u, 40 + 3 * u + k, k * DAY) for u in range(21, 41) for k in range(3)]
    search = [(u, 200, 0, 1) for u in range(1, 41)]
    view = build_view(tables(fans + others, search, n_items=200, n_users=40), "sequential",
                      Protocol(negatives=stored, train_negatives=training, num_eval_negatives=5))  # fmt: skip
    test_rows = view["rec.test.user"] > 20
    stored_share = (view["rec.test.negatives"][test_rows] == 1).any(1).mean()
    batch = BatchAssembler(view, "rec", "train", num_train_negatives=20, seed=0)(
        torch.arange(view["rec.train.user"].size), 0, 0
    )
    train_rows = batch["user"] > 20
    training_share = (batch["candidates"][train_rows, 1:] == 1).any(1).double().mean().item()
    shares = {stored: stored_share, training: training_share}
    assert shares["popularity"] > 0.9 and shares["uniform"] < 0.4, shares


def test_the_cf_view_refuses_a_time_split(tiny_folder, tmp_path):
    from sar_exp.data.canonical import load_canonical

    loaded = load_canonical(tiny_folder, tmp_path, [], ["author_id"])
    with pytest.raises(ConfigError, match="split=time is for the sequential and ctr views"):
        build_view(loaded, "cf", Protocol(split="time"))


@pytest.mark.parametrize(
    "dataset, protocol",
    [("synthetic", "unisar_kuaisar"), ("amazon", "unisar_amazon"), ("amazon", "sesrec_amazon")],
)
def test_presets_and_the_statistics_command(dataset, protocol, capsys):
    from pathlib import Path

    from sar_exp.data.stats import main

    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "amazon"
    extra = [f"dataset.path={fixture}", "dataset.category=Toy_Store"] if dataset == "amazon" else []
    main([f"dataset={dataset}", f"protocol={protocol}", "dataset.protocol.num_eval_negatives=9",
          *extra])  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith(f"{dataset}, protocol={protocol}, sequential view")
    rows = {line.split()[0]: [int(n.replace(",", "")) for n in line.split()[1:]]
            for line in out.splitlines() if line.startswith("    rec") or line.startswith("    search")}  # fmt: skip
    assert all(n > 0 for n in rows["rec"]) and all(n > 0 for n in rows["search"])


def test_evaluated_search_is_held_out_by_session():
    """Clicks of one session never sit in two splits; the last clicked session is test."""
    rec = [(1, i, i * DAY) for i in range(1, 4)] + [(2, 10 + i, i * DAY) for i in range(1, 4)]
    # user 1: session 1 (1 click), 2, 3 and 4 (2 clicks each), one hour apart
    search = [(1, 20, 1 * HOUR, 1, 1), (1, 21, 2 * HOUR, 1, 2), (1, 22, 2 * HOUR, 1, 2),
              (1, 23, 3 * HOUR, 2, 3), (1, 24, 3 * HOUR, 2, 3), (1, 25, 4 * HOUR, 3, 4),
              (1, 26, 4 * HOUR, 3, 4)]  # fmt: skip
    both = Protocol(evaluated_tasks=("rec", "search"), num_eval_negatives=3)
    view = build_view(tables(rec, search), "sequential", both)
    assert split_of(view, "search") == {
        "train": [(1, 20), (1, 21), (1, 22)], "val": [(1, 23), (1, 24)], "test": [(1, 25), (1, 26)],
    }  # fmt: skip


def test_stored_popularity_negatives_follow_training_clicks():
    # user 30 clicks item i (1..40) i times: their training popularity; users 1..29 click
    # three items of their own, so items 1..40 are candidates for all of them
    heavy = [(30, int(i), t) for t, i in enumerate(np.repeat(np.arange(1, 41), np.arange(1, 41)))]
    own = [(u, 41 + 3 * u + k, 1000 + k) for u in range(1, 30) for k in range(3)]
    search = [(u, 200, 0, 1) for u in range(1, 31)]
    view = build_view(tables(heavy + own, search, n_items=200, n_users=30), "sequential",
                      Protocol(negatives="popularity", num_eval_negatives=5))  # fmt: skip
    light = view["rec.test.user"] < 30
    counts = np.bincount(view["rec.test.negatives"][light].ravel(), minlength=201)[1:41]
    assert np.corrcoef(counts, np.arange(1, 41))[0, 1] > 0.8
    assert counts[-10:].sum() > 3 * counts[:10].sum()


def test_the_interleaved_history_merges_the_capped_rec_and_search_windows():
    """UniSAR's code: the last rec_cap rec clicks and search_cap sessions, merged by time,
    of which the newest max_interleaved_history stay."""
    import torch

    from sar_exp.data.batches import BatchAssembler

    rec = [(1, i, 10 * i) for i in range(1, 8)]  # times 10..70
    search = [(1, 20 + k, 10 * k + 5, 1) for k in range(1, 7)]  # times 15..65
    view = build_view(tables(rec, search), "sequential",
                      Protocol(max_rec_history=2, max_search_history=3, max_interleaved_history=4,
                               num_eval_negatives=3))  # fmt: skip
    assembler = BatchAssembler(view, "rec", "test", interleaved=True)
    batch = assembler(torch.tensor([0]), 0, 0)  # the test click at time 70
    times = batch["interleaved_time"][0][batch["interleaved_mask"][0]].tolist()
    # rec window: 50, 60; search window: 45, 55, 65; merged, newest 4: 50, 55, 60, 65
    assert times == [50, 55, 60, 65]
    assert batch["interleaved_type"][0][batch["interleaved_mask"][0]].tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize(
    "preset, values",
    [
        ("unisar_kuaisar", dict(split="time", drop_last_days=2, k_core=5, require_both_behaviours=True,
                                require_both_histories=True, both_histories_tasks=["rec", "search"],
                                max_rec_history=30,
                                max_search_history=30, max_interleaved_history=60,
                                negatives="uniform", train_negatives="popularity",
                                search_negatives_avoid="user", rec_negatives_avoid="user")),
        ("unisar_amazon", dict(split="leave_one_out", k_core=5, require_both_histories=True,
                               both_histories_tasks=["rec", "search"], max_rec_history=30, max_search_history=30, max_interleaved_history=60,
                               negatives="uniform", train_negatives="popularity",
                               search_negatives_avoid="user", rec_negatives_avoid="user")),
        ("sesrec_amazon", dict(split="leave_one_out", k_core=5, require_both_histories=True,
                               max_rec_history=15, max_search_history=15, negatives="uniform",
                               train_negatives="popularity")),
        ("clardrec_seq", dict(max_interactions_per_user=100, min_search_interactions=10,
                              negatives="uniform", train_negatives_avoid="user")),
        ("clardrec_cf", dict(views=["cf"], negatives="uniform", train_negatives_avoid="user")),
        ("sesrec", dict(split="leave_one_out", k_core=5, require_both_histories=True,
                        require_both_behaviours=True, drop_last_days=2, max_rec_history=150,
                        max_search_history=25, negatives="uniform", train_negatives="popularity")),
    ],
)  # fmt: skip
def test_presets_carry_the_papers_values(make_cfg, preset, values):
    protocol = make_cfg(f"protocol={preset}").dataset.protocol
    assert {k: protocol[k] for k in values} == values
