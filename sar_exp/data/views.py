"""Task views: the canonical tables turned into arrays that batches index into.

One builder serves all four papers. Every view holds the same context arrays (attribute
tables, per-user time-sorted rec clicks and search sessions) and, per task and split,
sample arrays. A sample's histories are *pointers* (start, end) into the per-user sorted
arrays, holding only events strictly earlier than the sample, so nothing from the
sample's own time or later can leak into what predicts it; batches gather the windows.

Views (`view=`):
  cf          ClardRec's collaborative filtering: unique rec (u, i) and search (u, q, i)
              clicks, random 8:1:1 split.
  sequential  next item: every rec click (task "rec") and every search click (task
              "search") with rec/search histories; leave-one-out per user and per task.
  ctr         rec impressions with click labels (QueryRec); the user's last request
              is test, the one before is validation; per-query clicked and shown-but-not-
              clicked items.
Validation and test positives get `num_eval_negatives` negatives drawn once from
`split_seed` and stored with the view.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from sar_exp.data import filters
from sar_exp.data.cache import cache_key, cached_folder, code_fingerprint
from sar_exp.data.canonical import CanonicalTables
from sar_exp.data.kuaisar import FEEDBACK_COLUMNS
from sar_exp.data.progress import stage
from sar_exp.errors import ConfigError, DataError

VIEWS = ("cf", "sequential", "ctr")
SPLITS = ("train", "val", "test")
TASKS = ("rec", "search")
SPLIT_RULES = ("leave_one_out", "time")
NEGATIVE_SAMPLERS = ("uniform", "popularity")
DROPPED = -1  # split code of a training sample removed to keep held-out events unseen


@dataclass(frozen=True)
class Protocol:
    """Filters, caps and split settings; each paper's values are in conf/protocol/."""

    name: str = "default"
    views: tuple[str, ...] = VIEWS  # the views this protocol is defined for
    max_rec_history: int = 20
    max_search_history: int = 10
    max_clicks_per_session: int = 5
    max_interleaved_history: int = 30
    max_interactions_per_user: int | None = None  # ClardRec sequential: 100
    min_search_interactions: int = 0  # ClardRec sequential: 10
    # only samples with a rec and a search history before them (SESRec, QueryRec,
    # UniSAR), of the tasks in both_histories_tasks: rec samples (the default), or search
    # samples too (UniSAR's official data never has either without both)
    require_both_histories: bool = False
    both_histories_tasks: tuple[str, ...] = ("rec",)
    no_click_session_positive: str = "none"  # "first_shown": KuaiSAR authors' suggestion
    cf_split: tuple[float, float, float] = field(default=(0.8, 0.1, 0.1))
    num_eval_negatives: int = 99
    split_seed: int = 0
    # The tasks whose validation and test events are held out from every task's
    # training data (a method that evaluates search too adds "search").
    evaluated_tasks: tuple[str, ...] = ("rec",)
    # leave_one_out (per user and task) or time (UniSAR on KuaiSAR: the last day is test,
    # the day before validation, in the dataset's local days)
    split: str = "leave_one_out"
    drop_last_days: int = 0  # UniSAR drops KuaiSAR's last two days before splitting
    local_time_offset_hours: float = 0.0  # where days begin: KuaiSAR's are Beijing's (+8)
    k_core: int = 0  # users and items with fewer clicks go, repeatedly (UniSAR, SESRec: 5)
    require_both_behaviours: bool = False  # only users with rec and search clicks (UniSAR)
    # negatives of training and of the stored evaluation candidates: uniform over the
    # task's items, or in proportion to their training clicks (the UniSAR family)
    negatives: str = "uniform"
    # the training negatives' sampler when it differs from the stored ones' (SESRec's code
    # draws training negatives by popularity, its paper evaluates against uniform ones);
    # None: the same as `negatives`
    train_negatives: str | None = None
    # what a stored search negative avoids: items clicked under that query by anyone
    # (ClardRec B.1) or items the user ever clicked, in rec or search (UniSAR, SESRec)
    search_negatives_avoid: str = "query"
    # what a stored rec negative avoids: items the user clicked in rec, or (user, the
    # papers' "never interacted with": ClardRec B.1, SESRec and UniSAR 5.1.2) in rec or
    # search; a search click ranked as a rec negative would penalise exactly the models
    # that read the searches. The field keeps the old rule (rec) as its default, so a run
    # recorded before the key existed reads as one made with it; conf/protocol/default.yaml
    # sets user for every protocol.
    rec_negatives_avoid: str = "rec"
    # what a uniform training negative avoids: the sample's positive only, or (user) every
    # item the user clicked in the training data of either task (ClardRec's I- before
    # Eq. 4: r_ui- = 0, an item the user never interacted with; the rec model scores
    # search candidates too, in AUG and L_da). Popularity negatives avoid the user's
    # training clicks of their own task (SESRec's code).
    train_negatives_avoid: str = "positive"
    # true: ClardRec B.1 read literally, two independent 8:1:1 splits, so a held-out rec
    # pair (u, i) can be a search training click; false drops such search clicks.
    cf_independent_splits: bool = False

    def __post_init__(self):
        for key in (
            "max_rec_history",
            "max_search_history",
            "max_clicks_per_session",
            "max_interleaved_history",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(
                    f"dataset.protocol.{key} must be a positive integer, got {getattr(self, key)}"
                )
        if self.no_click_session_positive not in ("none", "first_shown"):
            raise ConfigError(
                "dataset.protocol.no_click_session_positive must be 'none' or 'first_shown', "
                f"got {self.no_click_session_positive!r}"
            )
        if len(self.cf_split) != 3 or abs(sum(self.cf_split) - 1) > 1e-6 or min(self.cf_split) <= 0:
            raise ConfigError(
                f"dataset.protocol.cf_split must be three positive shares summing to 1, got {list(self.cf_split)}"
            )
        for key, allowed in (("split", SPLIT_RULES), ("negatives", NEGATIVE_SAMPLERS),
                             ("train_negatives", (None, *NEGATIVE_SAMPLERS)),
                             ("search_negatives_avoid", ("query", "user")),
                             ("rec_negatives_avoid", ("rec", "user")),
                             ("train_negatives_avoid", ("positive", "user"))):  # fmt: skip
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"dataset.protocol.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}"
                )
        for key in ("drop_last_days", "k_core"):
            if getattr(self, key) < 0:
                raise ConfigError(f"dataset.protocol.{key} must be >= 0, got {getattr(self, key)}")
        if not self.views or not set(self.views) <= set(VIEWS):
            raise ConfigError(
                f"dataset.protocol.views must be a non-empty subset of {list(VIEWS)}, "
                f"got {list(self.views)}"
            )
        if not self.both_histories_tasks or not set(self.both_histories_tasks) <= set(TASKS):
            raise ConfigError(
                "dataset.protocol.both_histories_tasks must be a non-empty subset of "
                f"{list(TASKS)}, got {list(self.both_histories_tasks)}"
            )
        if not self.evaluated_tasks or not set(self.evaluated_tasks) <= set(TASKS):
            raise ConfigError(
                f"dataset.protocol.evaluated_tasks must be a non-empty subset of {list(TASKS)}, "
                f"got {list(self.evaluated_tasks)}"
            )
        if self.num_eval_negatives < 1:
            raise ConfigError(
                f"dataset.protocol.num_eval_negatives must be >= 1, got {self.num_eval_negatives}"
            )


class View(dict):
    """name -> numpy array, plus `meta` (sizes the model needs)."""

    meta: dict

    def task_names(self) -> list[str]:
        return sorted({k.split(".")[0] for k in self if k.count(".") == 2})

    def split(self, task: str, split: str) -> dict[str, np.ndarray]:
        prefix = f"{task}.{split}."
        return {k[len(prefix) :]: v for k, v in self.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- helpers


def _pack(user: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Sortable (user, time) key; times are ms since the first event (< 2**40)."""
    return user.astype(np.int64) << 40 | time.astype(np.int64)


def _history_pointers(event_user, event_time, sample_user, sample_time):
    """[start, end) of the events of the sample's user strictly before the sample's time."""
    keys = _pack(event_user, event_time)
    end = np.searchsorted(keys, _pack(sample_user, sample_time), side="left")
    start = np.searchsorted(keys, _pack(sample_user, np.zeros_like(sample_time)), side="left")
    return start.astype(np.int64), end.astype(np.int64)


def _rank_from_end(owner: np.ndarray) -> np.ndarray:
    """0 for each owner's last row, 1 for the one before... (rows sorted by owner, time)."""
    n = owner.size
    last_of_owner = np.r_[owner[1:] != owner[:-1], True]
    group_end = np.flatnonzero(last_of_owner)
    end_per_row = group_end[np.searchsorted(group_end, np.arange(n))]
    return end_per_row - np.arange(n)


def _leave_one_out(owner: np.ndarray) -> np.ndarray:
    """Split code per row: 2 test (last), 1 validation (second last), 0 train.

    Owners with fewer than 3 rows keep them all in training: there is nothing to hold
    out without leaving no training signal (the papers' 5-core filters imply this)."""
    rank = _rank_from_end(owner)
    count = np.bincount(owner)[owner]
    split = np.where(rank == 0, 2, np.where(rank == 1, 1, 0))
    return np.where(count >= 3, split, 0).astype(np.int8)


def _drawer(rng, pool: np.ndarray, weights: np.ndarray | None):
    """size -> items of `pool`: uniform, or in proportion to `weights` (one per item id)."""
    if weights is None:
        return lambda size: pool[rng.integers(0, pool.size, size)]
    cumulative = np.cumsum(weights[pool].astype(np.float64))
    return lambda size: pool[
        np.searchsorted(cumulative, rng.random(size) * cumulative[-1], side="right")
    ]


def sample_negatives(rng, pool, owner, positive, exclude_keys, count, what, weights=None):
    """`count` distinct items per row from `pool`, none of them in `exclude_keys`
    (sorted owner * 2**32 + item keys) nor equal to the positive; uniform, or in
    proportion to `weights` (popularity: an item without weight is never drawn).

    All rows are drawn at once; later passes redraw only the rows that still hold a
    forbidden or repeated item, so the cost stays close to one vectorised draw."""
    n = owner.size
    if n == 0:
        return np.zeros((0, count), np.int32)
    pool = np.asarray(pool)
    if weights is not None:
        pool = pool[weights[pool] > 0]
    if pool.size < count + 1:
        raise DataError(
            f"only {pool.size} candidate items for {what} negatives; {count} are needed per positive"
        )
    draw = _drawer(rng, pool, weights)
    draws = draw((n, count))
    todo = np.arange(n)
    for _ in range(200):
        rows = draws[todo]
        keys = (owner[todo].astype(np.int64)[:, None] << 32) + rows
        if exclude_keys.size:
            pos = np.searchsorted(exclude_keys, keys).clip(max=exclude_keys.size - 1)
            bad = exclude_keys[pos] == keys
        else:
            bad = np.zeros(rows.shape, bool)
        bad |= rows == positive[todo][:, None]
        order = np.argsort(rows, axis=1, kind="stable")
        ordered = np.take_along_axis(rows, order, axis=1)
        dup = np.zeros_like(bad)
        np.put_along_axis(dup, order[:, 1:], ordered[:, 1:] == ordered[:, :-1], axis=1)
        bad |= dup
        if not bad.any():
            return draws.astype(np.int32)
        rows[bad] = draw(int(bad.sum()))
        draws[todo] = rows
        todo = todo[bad.any(axis=1)]
    raise DataError(
        f"could not draw {count} {what} negatives for {todo.size} positive(s) (owner {owner[todo[0]]}): "
        "too few items that this owner never clicked; lower dataset.protocol.num_eval_negatives"
    )


def _keys(owner, item) -> np.ndarray:
    return np.unique(owner.astype(np.int64) << 32 | item.astype(np.int64))


# ---------------------------------------------------------------- context


def _keep_recent_interactions(rec, sessions, search, limit: int):
    """Each user's `limit` most recent clicks, rec and search together (ClardRec B.1).

    Exactly `limit` clicks stay even when timestamps tie at the cut-off (the later rows
    win). Unclicked exposures, shown items and sessions older than the oldest kept
    click leave too, so histories start inside the window."""
    rec = rec.with_row_index("rec_row")
    search = search.with_row_index("search_row")
    clicks = pl.concat(
        [
            rec.filter(pl.col("click") == 1).select(
                "user", "time", kind=pl.lit(0), row=pl.col("rec_row")
            ),
            search.filter(pl.col("clicked") == 1).select(
                "user", "time", kind=pl.lit(1), row=pl.col("search_row")
            ),
        ]
    )
    kept = (
        clicks.sort("user", "time", "kind", "row", descending=[False, True, True, True])
        .with_columns(rank=pl.int_range(pl.len()).over("user"))
        .filter(pl.col("rank") < limit)
    )
    cutoff = kept.group_by("user").agg(cutoff=pl.col("time").min())
    kept_rec = kept.filter(pl.col("kind") == 0)["row"]
    kept_search = kept.filter(pl.col("kind") == 1)["row"]

    def window(frame, clicked, row, kept_rows):
        frame = frame.join(cutoff, on="user")
        inside = pl.col(clicked).eq(1) & pl.col(row).is_in(kept_rows) | pl.col(clicked).eq(0) & (
            pl.col("time") >= pl.col("cutoff")
        )
        return frame.filter(inside).drop("cutoff", row)

    # Sessions inside the window. A session at the cut-off whose clicks were all cut
    # goes too, with its shown items: kept without a click it would misstate what the
    # user did (and, with first_shown, gain a pseudo-click beyond the limit).
    clicked_sessions = search.filter(pl.col("clicked") == 1)["session"]
    kept_sessions = search.filter(pl.col("search_row").is_in(kept_search))["session"]
    cut = clicked_sessions.filter(~clicked_sessions.is_in(kept_sessions.implode())).unique()
    sessions = (
        sessions.join(cutoff, on="user")
        .filter((pl.col("time") >= pl.col("cutoff")) & ~pl.col("session").is_in(cut.implode()))
        .drop("cutoff")
    )
    search = window(search, "clicked", "search_row", kept_search)
    search = search.filter(~pl.col("session").is_in(cut.implode()))
    return window(rec, "click", "rec_row", kept_rec), sessions, search


def _pool(tables: CanonicalTables, domain: str, events: pl.DataFrame | None) -> np.ndarray:
    """The items a domain's negatives come from: every item of the domain, or only those
    still in its (filtered) events."""
    items = tables.items.filter(domain)["item"]
    if events is not None:
        items = items.filter(items.is_in(events["item"].unique().implode()))
    return items.to_numpy().astype(np.int32)


MAX_CAPTION_WORDS = 50  # UniSAR's code reads up to 50 caption words an item


def _caption_words(tables: CanonicalTables) -> np.ndarray:
    """[items + 1, words] caption word ids of each item (0-padded; row 0 is padding)."""
    if "caption" not in tables.items.columns:  # a dataset without captions (hand-built tables)
        return np.zeros((tables.meta["num_items"] + 1, 1), np.int32)
    captions = tables.items["caption"].to_list()
    width = max(1, min(MAX_CAPTION_WORDS, max((len(c) for c in captions), default=0)))
    words = np.zeros((tables.meta["num_items"] + 1, width), np.int32)
    for item, caption in zip(tables.items["item"].to_list(), captions):
        caption = caption[:width]
        words[item, : len(caption)] = caption
    return words


def _attribute_array(frame: pl.DataFrame, attributes: list[str]) -> np.ndarray:
    """[rows, attributes] codes; a dataset without attributes (Amazon) has 0 columns."""
    if not attributes:
        return np.zeros((frame.height, 0), np.int32)
    return frame.select(attributes).to_numpy().astype(np.int32)


def _context(tables: CanonicalTables, protocol: Protocol) -> tuple[View, dict]:
    """Arrays every view shares, after the user-level filters of the protocol."""
    rec = tables.rec
    sessions = tables.sessions
    # An item shown twice in one session is one search result, clicked if either copy
    # was, so "search interactions" count the same in every filter and view.
    search = (
        tables.search.group_by("session", "item")
        .agg(clicked=pl.col("clicked").max(), position=pl.col("position").min())
        .sort("session", "position")
        .join(sessions.select("session", "user", "query", "time"), on="session")
    )

    # ClardRec B.1 in its order: first each user's most recent interactions, then the
    # users with enough search clicks *inside* that window (the other order keeps users
    # whose window holds no search at all).
    if protocol.max_interactions_per_user:
        rec, sessions, search = _keep_recent_interactions(
            rec, sessions, search, protocol.max_interactions_per_user
        )
    if protocol.min_search_interactions > 0:
        per_user = search.filter(pl.col("clicked") == 1).group_by("user").len()
        keep = per_user.filter(pl.col("len") >= protocol.min_search_interactions)["user"]
        rec, sessions = (
            rec.filter(pl.col("user").is_in(keep)),
            sessions.filter(pl.col("user").is_in(keep)),
        )
        search = search.filter(pl.col("user").is_in(keep))
    # UniSAR 5.1 in its order: users with both behaviours, the last days dropped,
    # k-core (both again after it, until neither removes anything)
    if protocol.drop_last_days:
        rec, sessions, search = filters.drop_last_days(
            rec, sessions, search, protocol.drop_last_days,
            tables.meta["time_origin_ms"], protocol.local_time_offset_hours,
        )  # fmt: skip
    rec, sessions, search = filters.both_and_k_core(
        rec, sessions, search, protocol.require_both_behaviours, protocol.k_core
    )
    # items these filters remove leave the negative pools too (ClardRec's user-level
    # filters keep the whole catalogue, as before)
    item_filters = bool(
        protocol.require_both_behaviours or protocol.drop_last_days or protocol.k_core
    )
    if search.height == 0 or rec.height == 0:
        raise DataError("no rec or no search events are left after dataset.protocol filters")

    # An identical event twice (same user, item and time) is one event: otherwise its
    # twin could sit in training while it is the test target.
    rec_clicks = (
        rec.filter(pl.col("click") == 1)
        .sort("user", "time", "order")
        .unique(["user", "item", "time"], keep="first", maintain_order=True)
    )
    sessions = sessions.sort("user", "time", "session").with_row_index("session_pos")
    positives = search.filter(pl.col("clicked") == 1)
    if protocol.no_click_session_positive == "first_shown":
        clicked_sessions = positives["session"].unique()
        first_shown = search.filter(
            ~pl.col("session").is_in(clicked_sessions) & (pl.col("position") == 0)
        )
        positives = pl.concat([positives, first_shown.with_columns(clicked=pl.lit(1, pl.Int8))])
    # One click per (session, item), and, as for rec clicks, an identical event twice
    # (same user, item and time, e.g. two sessions in one millisecond) is one event.
    positives = (
        positives.join(sessions.select("session", "session_pos"), on="session")
        .sort("session_pos", "position")
        .unique(["session", "item"], keep="first", maintain_order=True)
        .unique(["user", "item", "time"], keep="first", maintain_order=True)
    )

    c = protocol.max_clicks_per_session
    session_clicks = np.zeros((sessions.height, c), np.int32)
    ranked = positives.with_columns(k=pl.int_range(pl.len()).over("session_pos")).filter(
        pl.col("k") < c
    )
    session_clicks[ranked["session_pos"].to_numpy(), ranked["k"].to_numpy()] = ranked[
        "item"
    ].to_numpy()

    meta = dict(tables.meta)
    u_attr = _attribute_array(tables.users, tables.user_attributes)
    i_attr = _attribute_array(tables.items, tables.item_attributes)
    words = tables.queries["words"].to_list()
    query_words = np.zeros((meta["num_queries"] + 1, max(1, meta["max_query_words"])), np.int32)
    for q, w in zip(tables.queries["query"].to_list(), words):
        query_words[q, : len(w)] = w
    view = View(
        {
            "user_attributes": np.vstack([np.zeros((1, u_attr.shape[1]), np.int32), u_attr]),
            "item_attributes": np.vstack([np.zeros((1, i_attr.shape[1]), np.int32), i_attr]),
            "query_words": query_words,
            "item_caption_words": _caption_words(tables),
            "rec_item_pool": _pool(tables, "in_rec", rec if item_filters else None),
            "search_item_pool": _pool(tables, "in_search", search if item_filters else None),
            "rec_click_user": rec_clicks["user"].to_numpy().astype(np.int32),
            "rec_click_item": rec_clicks["item"].to_numpy().astype(np.int32),
            "rec_click_time": rec_clicks["time"].to_numpy().astype(np.int64),
            "session_user": sessions["user"].to_numpy().astype(np.int32),
            "session_time": sessions["time"].to_numpy().astype(np.int64),
            "session_query": sessions["query"].to_numpy().astype(np.int32),
            "session_source": sessions["source"].to_numpy().astype(np.int32),
            "session_clicks": session_clicks,
        }
    )
    # Search clicks as single (query, clicked item) events, oldest first: ClardRec's
    # H_src (Eq. 29-31) is this sequence, not one averaged step per session.
    view["search_click_user"] = positives["user"].to_numpy().astype(np.int32)
    view["search_click_time"] = positives["time"].to_numpy().astype(np.int64)
    view["search_click_item"] = positives["item"].to_numpy().astype(np.int32)
    view["search_click_query"] = positives["query"].to_numpy().astype(np.int32)
    view["user_click_offsets"] = np.searchsorted(
        view["rec_click_user"], np.arange(meta["num_users"] + 2)
    ).astype(np.int64)
    view["user_search_click_offsets"] = np.searchsorted(  # full ranking's exclusions
        view["search_click_user"], np.arange(meta["num_users"] + 2)
    ).astype(np.int64)
    frames = {
        "origin_ms": int(tables.meta["time_origin_ms"]),
        "rec": rec,
        "rec_clicks": rec_clicks,
        "sessions": sessions,
        "search_positives": positives,
        "search": search,
    }
    return view, frames


def _setting(protocol, key: str):
    """A protocol setting from the Protocol or its dict (a view's meta; None if absent)."""
    return protocol.get(key) if isinstance(protocol, dict) else getattr(protocol, key)


def training_negatives(protocol) -> str:
    """The training negatives' sampler: `train_negatives`, or `negatives` when unset.
    Takes the Protocol or its dict (a view's meta)."""
    return _setting(protocol, "train_negatives") or _setting(protocol, "negatives")


def training_negatives_avoid_clicks(protocol) -> bool:
    """Whether training negatives avoid items the user clicked in training: popularity
    ones always do (their task's clicks), uniform ones with train_negatives_avoid=user
    (both tasks' clicks). Takes the Protocol or its dict (a view's meta)."""
    return (training_negatives(protocol) == "popularity"
            or _setting(protocol, "train_negatives_avoid") == "user")  # fmt: skip


def _add_histories(view: View, prefix: str, user: np.ndarray, time: np.ndarray) -> None:
    view[prefix + "rec_start"], view[prefix + "rec_end"] = _history_pointers(
        view["rec_click_user"], view["rec_click_time"], user, time
    )
    view[prefix + "search_start"], view[prefix + "search_end"] = _history_pointers(
        view["session_user"], view["session_time"], user, time
    )
    view[prefix + "search_click_start"], view[prefix + "search_click_end"] = _history_pointers(
        view["search_click_user"], view["search_click_time"], user, time
    )


def _no_histories(view: View, prefix: str, n: int) -> None:
    for name in ("rec", "search", "search_click"):
        view[f"{prefix}{name}_start"] = view[f"{prefix}{name}_end"] = np.zeros(n, np.int64)


def _store_split(
    view, task, split_code, arrays, rng, pool, exclude, protocol, what, owner_key="user",
    histories=True,
):  # fmt: skip
    stored_popular = protocol.negatives == "popularity"
    train = split_code == 0
    if "popularity" in (protocol.negatives, training_negatives(protocol)) and "item" in arrays:
        # training clicks per item: what popularity negatives (stored or training) follow
        size = view["item_attributes"].shape[0]
        view[f"{task}_popularity"] = np.bincount(arrays["item"][train], minlength=size)
    if training_negatives_avoid_clicks(protocol) and "item" in arrays:
        # each user's training clicks, which training negatives avoid (held-out clicks
        # are not among them: avoiding those would point at the answer)
        view[f"{task}_train_clicks"] = _keys(arrays["user"][train], arrays["item"][train])
    for code, split in enumerate(SPLITS):
        rows = np.flatnonzero(split_code == code)
        prefix = f"{task}.{split}."
        for name, values in arrays.items():
            view[prefix + name] = values[rows]
        if histories:
            _add_histories(view, prefix, arrays["user"][rows], arrays["time"][rows])
        else:
            _no_histories(view, prefix, rows.size)
        if split != "train" and "item" in arrays:
            owner = arrays[owner_key][rows]
            view[prefix + "negatives"] = sample_negatives(
                rng, pool, owner, arrays["item"][rows], exclude, protocol.num_eval_negatives, what,
                weights=view.get(f"{task}_popularity") if stored_popular else None,
            )  # fmt: skip


def _avoid_both_tasks_training_clicks(view, protocol) -> None:
    """train_negatives_avoid=user: each task's training negatives avoid the user's
    training clicks of both tasks (r_ui- = 0 means no interaction at all)."""
    if protocol.train_negatives_avoid == "user":
        both = np.union1d(view["rec_train_clicks"], view["search_train_clicks"])
        view["rec_train_clicks"] = view["search_train_clicks"] = both


def _filter_both_histories(view, user, time, protocol, task: str = "rec") -> np.ndarray:
    """The task's samples to keep: all, unless require_both_histories covers the task
    (both_histories_tasks), then those with a rec and a search history before them."""
    if not (protocol.require_both_histories and task in protocol.both_histories_tasks):
        return np.ones(user.size, bool)
    rs, re = _history_pointers(view["rec_click_user"], view["rec_click_time"], user, time)
    ss, se = _history_pointers(view["session_user"], view["session_time"], user, time)
    return (re > rs) & (se > ss)


def _sample_arrays(frame: pl.DataFrame, with_query: bool = False, with_label: bool = False) -> dict:
    """The per-sample columns every view stores: user, item, time (+ query, label)."""
    arrays = {
        "user": frame["user"].to_numpy().astype(np.int32),
        "item": frame["item"].to_numpy().astype(np.int32),
        "time": frame["time"].to_numpy().astype(np.int64),
    }
    if with_query:
        arrays["query"] = frame["query"].to_numpy().astype(np.int32)
    if with_label:
        arrays["label"] = frame["click"].to_numpy().astype(np.float32)
        for name in FEEDBACK_COLUMNS:  # the other feedback labels (PLE's tasks), 0 if absent
            values = frame[name].to_numpy() if name in frame.columns else np.zeros(frame.height)
            arrays[f"label_{name}"] = values.astype(np.float32)
    return arrays


def _rec_exclusions(frames) -> np.ndarray:
    rc = frames["rec_clicks"]
    return _keys(rc["user"].to_numpy(), rc["item"].to_numpy())


def _user_exclusions(frames) -> np.ndarray:
    """Every item each user clicked, in rec or in search."""
    rc, pos = frames["rec_clicks"], frames["search_positives"]
    users = np.concatenate([rc["user"].to_numpy(), pos["user"].to_numpy()])
    items = np.concatenate([rc["item"].to_numpy(), pos["item"].to_numpy()])
    return _keys(users, items)


def _rec_negative_rule(frames, protocol) -> np.ndarray:
    """The exclusion keys (user, item) of the stored rec negatives."""
    if protocol.rec_negatives_avoid == "user":
        return _user_exclusions(frames)
    return _rec_exclusions(frames)


def _search_negative_rule(frames, protocol) -> tuple[np.ndarray, str]:
    """(exclusion keys, their owner column) for the stored search negatives."""
    if protocol.search_negatives_avoid == "user":
        return _user_exclusions(frames), "user"
    return _search_exclusions(frames), "query"


def _search_exclusions(frames) -> np.ndarray:
    """Items clicked under each query (by anyone) are never that query's negatives."""
    pos = frames["search_positives"]
    return _keys(pos["query"].to_numpy(), pos["item"].to_numpy())


# ---------------------------------------------------------------- views


def _num_users(view: View) -> int:
    return int(view["user_attributes"].shape[0]) - 1  # row 0 is padding


def _first_heldout_time(user: np.ndarray, time: np.ndarray, split: np.ndarray, n_users: int):
    """Per user, the time of their earliest validation or test event (int64 max if none)."""
    first = np.full(n_users + 1, np.iinfo(np.int64).max, np.int64)
    heldout = split > 0
    np.minimum.at(first, user[heldout], time[heldout])
    return first


def _strictly_before(frame: pl.DataFrame, cutoff: np.ndarray) -> pl.DataFrame:
    """The rows of `frame` (user, time, ...) strictly before their user's cut-off."""
    return frame.filter(frame["time"].to_numpy() < cutoff[frame["user"].to_numpy()])


def _drop_training_after_heldout(tasks: dict, evaluated: tuple[str, ...], n_users: int) -> None:
    """No leakage across tasks: a training sample of one task must end strictly before
    its user's first held-out event of every *other* evaluated task. Its histories hold
    only earlier events, so they end before it too. (A task's own leave-one-out already
    puts its training samples no later than its held-out ones.) Without this, a search
    click after the rec test click trains AUG and ClardRec's L_da with a rec history
    that contains the test item."""
    cutoffs = {
        name: _first_heldout_time(arrays["user"], arrays["time"], split, n_users)
        for name, (arrays, split) in tasks.items()
        if name in evaluated
    }
    for name, (arrays, split) in tasks.items():
        for other, cutoff in cutoffs.items():
            if other != name:
                late = (split == 0) & (arrays["time"] >= cutoff[arrays["user"]])
                split[late] = DROPPED


def _last_day(frames, protocol) -> int:
    """The dataset's last local day with a click (after the protocol's filters)."""
    return filters.last_click_day(
        frames["rec"], frames["search"], frames["origin_ms"], protocol.local_time_offset_hours
    )


def _leave_one_session_out(user: np.ndarray, session: np.ndarray) -> np.ndarray:
    """Leave-one-out over clicked sessions (rows sorted by user, time, session): all
    clicks of a user's last session are test, of the one before validation; users with
    fewer than 3 clicked sessions keep everything in training."""
    first_of_session = np.r_[True, (session[1:] != session[:-1]) | (user[1:] != user[:-1])]
    session_id = np.cumsum(first_of_session) - 1
    session_user = user[first_of_session]
    return _leave_one_out(session_user)[session_id]


def _split(arrays: dict, frames: dict, protocol: Protocol) -> np.ndarray:
    """Split code per sample (0 train, 1 validation, 2 test): the user's last and second
    last (leave_one_out), or the dataset's last and second last local day (time)."""
    if protocol.split == "leave_one_out":
        return _leave_one_out(arrays["user"])
    day = filters.day_of(arrays["time"], frames["origin_ms"], protocol.local_time_offset_hours)
    last = _last_day(frames, protocol)
    return np.where(day == last, 2, np.where(day == last - 1, 1, 0)).astype(np.int8)


def _sequential(view, frames, protocol, rng):
    rc = frames["rec_clicks"]
    rec = _sample_arrays(rc)
    keep = _filter_both_histories(view, rec["user"], rec["time"], protocol)
    rec = {k: v[keep] for k, v in rec.items()}
    rec["query"] = np.zeros_like(rec["user"])
    pos = frames["search_positives"].sort("user", "time", "session_pos", "position")
    pos = pos.filter(  # UniSAR's data: no search sample without both histories either
        _filter_both_histories(
            view, pos["user"].to_numpy(), pos["time"].to_numpy(), protocol, "search"
        )
    )
    search = _sample_arrays(pos, with_query=True)
    if "search" in protocol.evaluated_tasks and protocol.split == "leave_one_out":
        # evaluated search is held out by session: the last clicked session is test, the
        # one before validation, so two clicks of one session never sit in two splits
        search_split = _leave_one_session_out(search["user"], pos["session_pos"].to_numpy())
    else:
        search_split = _split(search, frames, protocol)
    tasks = {
        "rec": (rec, _split(rec, frames, protocol)),
        "search": (search, search_split),
    }
    _drop_training_after_heldout(tasks, protocol.evaluated_tasks, _num_users(view))
    _store_split(view, "rec", tasks["rec"][1], rec, rng, view["rec_item_pool"],
                 _rec_negative_rule(frames, protocol), protocol, "rec")  # fmt: skip
    exclude, owner = _search_negative_rule(frames, protocol)
    _store_split(view, "search", tasks["search"][1], search, rng, view["search_item_pool"],
                 exclude, protocol, "search", owner_key=owner)  # fmt: skip
    _avoid_both_tasks_training_clicks(view, protocol)


def _random_split(rng, n, shares) -> np.ndarray:
    order = rng.permutation(n)
    bounds = np.floor(np.cumsum(shares)[:2] * n).astype(int)
    split = np.zeros(n, np.int8)
    split[order[bounds[0] : bounds[1]]] = 1
    split[order[bounds[1] :]] = 2
    return split


def _drop_training_of_heldout_pairs(tasks: dict, evaluated: tuple[str, ...]) -> None:
    """CF has no time order: a training click of one task whose (user, item) pair is a
    held-out click of another evaluated task would train on the answer, so it goes."""
    for name, (arrays, split) in tasks.items():
        for other in evaluated:
            if other == name:
                continue
            theirs, their_split = tasks[other]
            heldout = _keys(theirs["user"][their_split > 0], theirs["item"][their_split > 0])
            mine = arrays["user"].astype(np.int64) << 32 | arrays["item"].astype(np.int64)
            split[(split == 0) & np.isin(mine, heldout)] = DROPPED


def _cf(view, frames, protocol, rng):
    if protocol.split != "leave_one_out":
        raise ConfigError(
            f"dataset.protocol.split={protocol.split} is for the sequential and ctr views; "
            "the cf view splits clicks at random (cf_split)"
        )
    # The paper's D_rec and D_src are sets of clicks, so repeated clicks count once.
    rc = frames["rec_clicks"].unique(["user", "item"], keep="first", maintain_order=True)
    rec = _sample_arrays(rc)
    rec["query"] = np.zeros_like(rec["user"])
    rec_split = _random_split(rng, rec["user"].size, protocol.cf_split)
    pos = frames["search_positives"].unique(
        ["user", "query", "item"], keep="first", maintain_order=True
    )
    search = _sample_arrays(pos, with_query=True)
    tasks = {
        "rec": (rec, rec_split),
        "search": (search, _random_split(rng, search["user"].size, protocol.cf_split)),
    }
    if not protocol.cf_independent_splits:
        _drop_training_of_heldout_pairs(tasks, protocol.evaluated_tasks)
    # The CF scenario has no histories (ClardRec Eq. 2, 5): they stay empty, so a random
    # split cannot put a held-out click into something a model reads.
    _store_split(view, "rec", rec_split, rec, rng, view["rec_item_pool"],
                 _rec_negative_rule(frames, protocol), protocol, "rec", histories=False)  # fmt: skip
    exclude, owner = _search_negative_rule(frames, protocol)
    _store_split(view, "search", tasks["search"][1], search, rng, view["search_item_pool"],
                 exclude, protocol, "search", owner_key=owner, histories=False)  # fmt: skip
    _avoid_both_tasks_training_clicks(view, protocol)


def _csr(owner: np.ndarray, values: np.ndarray, n_owners: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(owner, kind="stable")
    offsets = np.searchsorted(owner[order], np.arange(n_owners + 2)).astype(np.int64)
    return offsets, values[order].astype(np.int32)


def _ctr(view, frames, protocol, rng):
    rec = frames["rec"].sort("user", "time", "order")
    arrays = _sample_arrays(rec, with_label=True)
    keep = _filter_both_histories(view, arrays["user"], arrays["time"], protocol)
    arrays = {k: v[keep] for k, v in arrays.items()}
    arrays["query"] = np.zeros_like(arrays["user"])
    # Items sent in one request share a timestamp: the user's last request is the test
    # "action" and the one before the validation action, so per-user AUC is defined.
    request = np.r_[
        True,
        (arrays["user"][1:] != arrays["user"][:-1]) | (arrays["time"][1:] != arrays["time"][:-1]),
    ]
    request_id = np.cumsum(request) - 1
    request_user = arrays["user"][request]
    if protocol.split == "time":  # by day, like the other views; a request is on one day
        split = _split(arrays, frames, protocol)
    else:
        split = _leave_one_out(request_user)[request_id]
    for code, name in enumerate(SPLITS):
        rows = np.flatnonzero(split == code)
        prefix = f"rec.{name}."
        for key, values in arrays.items():
            view[prefix + key] = values[rows]
        _add_histories(view, prefix, arrays["user"][rows], arrays["time"][rows])
    # QueryRec: per query, the clicked items and the shown-but-not-clicked items, from
    # search events before their user's first held-out rec request only: the lists
    # train the model, so a later search must not reveal what the user is tested on.
    cutoff = _first_heldout_time(arrays["user"], arrays["time"], split, _num_users(view))
    if protocol.split == "time":  # held out by day: no one's searches from those days count,
        cutoff = np.minimum(cutoff, cutoff.min())  # users without a held-out request too
    search = _strictly_before(frames["search"], cutoff)
    n_queries = int(view["query_words"].shape[0])
    # each (query, item) pair once, in first-click order, with its number of clicks
    pos = (
        search.filter(pl.col("clicked") == 1).group_by(["query", "item"], maintain_order=True).len()
    )
    # I_q- (QueryRec 4.2): shown under q and clicked under q by no one, so disjoint from I_q+
    neg = (
        search.filter(pl.col("clicked") == 0)
        .unique(["query", "item"], maintain_order=True)
        .join(pos.select("query", "item"), on=["query", "item"], how="anti", maintain_order="left")
    )
    view["query_clicked_offsets"], view["query_clicked_items"] = _csr(
        pos["query"].to_numpy(), pos["item"].to_numpy(), n_queries
    )
    _, view["query_clicked_counts"] = _csr(
        pos["query"].to_numpy(), pos["len"].to_numpy(), n_queries
    )
    view["query_unclicked_offsets"], view["query_unclicked_items"] = _csr(
        neg["query"].to_numpy(), neg["item"].to_numpy(), n_queries
    )


BUILDERS = {"cf": _cf, "sequential": _sequential, "ctr": _ctr}


def build_view(tables: CanonicalTables, name: str, protocol: Protocol) -> View:
    if name not in BUILDERS:
        raise ConfigError(f"unknown view {name!r}; expected one of {list(VIEWS)}")
    if name not in protocol.views:
        raise ConfigError(
            f"protocol={protocol.name} is defined for the {'/'.join(protocol.views)} view, "
            f"not the {name} view"
        )
    view, frames = _context(tables, protocol)
    rng = np.random.default_rng(protocol.split_seed)
    BUILDERS[name](view, frames, protocol, rng)
    view.meta = {**tables.meta, "view": name, "protocol": asdict(protocol)}
    for task in view.task_names():
        if view.get(f"{task}.train.user", np.zeros(0)).size == 0:
            raise DataError(
                f"the {name} view has no training samples for the {task} task after filtering"
            )
    return view


def protocol_from_config(values: dict | None) -> Protocol:
    """`dataset.protocol` (lists from YAML) as a Protocol."""
    return Protocol(
        **{
            k: (
                tuple(v)
                if k in ("cf_split", "evaluated_tasks", "views", "both_histories_tasks")
                else v
            )
            for k, v in (values or {}).items()
        }
    )


def load_view(tables: CanonicalTables, name: str, protocol: Protocol, cache_dir: Path) -> View:
    """The view from the cache, or built and cached (atomically) on first use. Keyed on
    the tables' own cache key (source files, reader code, attributes), so any change to
    what built the tables, even one that keeps every row count, builds a new view."""
    if not tables.key:
        raise ValueError("load_view needs tables from load_canonical (they carry a cache key)")
    key = cache_key(
        code_fingerprint(sys.modules[__name__], filters), tables.key, name, asdict(protocol)
    )

    def build(tmp: Path) -> None:
        with stage(f"building the {name} view (splits, histories, negatives)"):
            view = build_view(tables, name, protocol)
        with open(tmp / "arrays.npz", "wb") as handle:
            np.savez(handle, **view)
        (tmp / "meta.json").write_text(json.dumps(view.meta, indent=1, default=list))

    path = cached_folder(Path(cache_dir), f"view-{name}-{key}", build)
    with np.load(path / "arrays.npz") as data:
        view = View({k: data[k] for k in data.files})
    view.meta = json.loads((path / "meta.json").read_text())
    return view
