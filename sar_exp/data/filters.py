"""Dataset-level filters of the papers' protocols (UniSAR 5.1, SESRec 5.1), applied to
the canonical frames before any split: rec (exposures with a click label), sessions and
search (shown results with a clicked flag, joined with their session's user and time).

Times are milliseconds since the dataset's first event; `origin_ms` (the Unix time of
that event) and the dataset's UTC offset give calendar days where the data has them:
KuaiSAR's days begin at midnight in Beijing (UTC+8)."""

from __future__ import annotations

import numpy as np
import polars as pl

DAY_MS = 86_400_000


def day_of(time: pl.Expr | np.ndarray, origin_ms: int, offset_hours: float):
    """The local calendar day (days since 1970-01-01 in local time) of each time."""
    shift = origin_ms + int(round(offset_hours * 3_600_000))
    if isinstance(time, np.ndarray):
        return (time.astype(np.int64) + shift) // DAY_MS
    return (time + shift) // DAY_MS


def _drop_sessions_that_lost_their_clicks(before: pl.DataFrame, search: pl.DataFrame, sessions):
    """A session whose clicks were all filtered out goes, with its shown items: kept
    without a click it would misstate what the user did."""
    had = before.filter(pl.col("clicked") == 1)["session"].unique()
    kept = search.filter(pl.col("clicked") == 1)["session"].unique()
    lost = had.filter(~had.is_in(kept.implode())).implode()
    search = search.filter(~pl.col("session").is_in(lost))
    # and a session none of whose shown items is left
    sessions = sessions.filter(pl.col("session").is_in(search["session"].unique().implode()))
    return search, sessions


def keep_users_with_both_behaviours(rec, sessions, search):
    """Users with at least one rec click and one search click (UniSAR)."""
    rec_users = rec.filter(pl.col("click") == 1)["user"].unique()
    search_users = search.filter(pl.col("clicked") == 1)["user"].unique()
    both = rec_users.filter(rec_users.is_in(search_users.implode())).implode()
    return (
        rec.filter(pl.col("user").is_in(both)),
        sessions.filter(pl.col("user").is_in(both)),
        search.filter(pl.col("user").is_in(both)),
    )


def last_click_day(rec, search, origin_ms: int, offset_hours: float) -> int:
    """The dataset's last local day with a click (rec or search): its "last day" for
    both dropping days and the time split."""
    times = pl.concat(
        [
            rec.filter(pl.col("click") == 1).select("time"),
            search.filter(pl.col("clicked") == 1).select("time"),
        ]
    )
    return int(times.select(day_of(pl.col("time"), origin_ms, offset_hours).max()).item())


def drop_last_days(rec, sessions, search, days: int, origin_ms: int, offset_hours: float):
    """Everything on the dataset's last `days` local days goes (UniSAR drops KuaiSAR's
    last two, whose search is sparse)."""
    last = last_click_day(rec, search, origin_ms, offset_hours)
    before = day_of(pl.col("time"), origin_ms, offset_hours) <= last - days
    return rec.filter(before), sessions.filter(before), search.filter(before)


def both_and_k_core(rec, sessions, search, both: bool, k: int):
    """Users with both behaviours and the k-core, re-applied until neither removes
    anything: a k-core can leave a user without one behaviour, and the reverse."""
    while True:
        size = (rec.height, search.height)
        if both:
            rec, sessions, search = keep_users_with_both_behaviours(rec, sessions, search)
        if k:
            rec, sessions, search = k_core(rec, sessions, search, k)
        if (rec.height, search.height) == size:
            return rec, sessions, search


def k_core(rec, sessions, search, k: int):
    """Repeatedly drop users and items with fewer than k clicks and their events, until
    every one left has k (UniSAR, SESRec: 5). A click is a distinct (user, item, time):
    an Amazon purchase, which is a rec click and a search click at one time, counts once."""
    while True:
        clicks = pl.concat(
            [
                rec.filter(pl.col("click") == 1).select("user", "item", "time"),
                search.filter(pl.col("clicked") == 1).select("user", "item", "time"),
            ]
        ).unique()
        users = clicks.group_by("user").len().filter(pl.col("len") < k)["user"].implode()
        items = clicks.group_by("item").len().filter(pl.col("len") < k)["item"].implode()
        if users.list.len().item() == 0 and items.list.len().item() == 0:
            return rec, sessions, search
        keep = ~pl.col("user").is_in(users) & ~pl.col("item").is_in(items)
        filtered = search.filter(keep)
        rec = rec.filter(keep)
        sessions = sessions.filter(~pl.col("user").is_in(users))
        search, sessions = _drop_sessions_that_lost_their_clicks(search, filtered, sessions)
