"""The embedded dataset: KuaiSAR's format, seeded, with the planted effects visible."""

from __future__ import annotations

import numpy as np
import polars as pl

from sar_exp.data.kuaisar import REC_COLUMNS, SEARCH_COLUMNS
from sar_exp.data.synthetic import generate, make_config, write_kuaisar_folder
from tests.conftest import TINY


def test_writes_the_five_kuaisar_files(tiny_folder):
    names = sorted(p.name for p in tiny_folder.glob("*.csv"))
    assert names == [
        "item_features.csv",
        "rec_inter.csv",
        "social_network.csv",
        "src_inter.csv",
        "user_features.csv",
    ]
    rec_header = (tiny_folder / "rec_inter.csv").read_text().splitlines()[0].split(",")
    assert rec_header == [
        "user_id", "item_id", "duration_ms", "playing_time", "timestamp", "forward",
        "like", "follow", "search_item_related", "search", "click", "time",
    ]  # fmt: skip
    assert set(REC_COLUMNS) <= set(rec_header)
    src_header = (tiny_folder / "src_inter.csv").read_text().splitlines()[0].split(",")
    assert set(SEARCH_COLUMNS) <= set(src_header)
    first_row = (tiny_folder / "rec_inter.csv").read_text().splitlines()[1]
    assert ".0," in first_row  # float-millisecond timestamps, as released


def test_same_seed_same_files(tmp_path):
    a = write_kuaisar_folder(make_config("small", **TINY), tmp_path / "a")
    b = write_kuaisar_folder(make_config("small", **TINY), tmp_path / "b")
    for name in ("rec_inter.csv", "src_inter.csv", "item_features.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    c = write_kuaisar_folder(make_config("small", **{**TINY, "seed": 1}), tmp_path / "c")
    assert (a / "rec_inter.csv").read_bytes() != (c / "rec_inter.csv").read_bytes()


def test_realistic_shape_of_the_data():
    tables = generate(make_config("small"))
    rec, search = tables["rec_inter"], tables["src_inter"]
    assert 0.35 < rec["click"].mean() < 0.65  # about half the exposures are clicked
    sessions = search.group_by("search_session_id").agg(pl.col("click_cnt").max())
    assert 0.45 < sessions["click_cnt"].mean() < 0.8  # about 60% of sessions have a click
    ties = rec.group_by("user_id", "timestamp").len()
    assert (ties["len"] > 1).mean() > 0.3  # items sent together share a timestamp
    rec_items = set(rec["item_id"].to_list())
    search_only = search.filter(~pl.col("item_id").is_in(list(rec_items)))
    assert search_only["item_type"].is_in(["VIDEO", "IMAGE_ATLAS"]).mean() < 0.2


def test_style_knob_drives_clicks_in_both_domains():
    """With the style effect switched off, clicks no longer depend on the author
    (who carries the style), so the spread of per-author click rates shrinks."""

    def author_spread(style_weight):
        tables = generate(make_config("small", style_weight=style_weight))
        items = tables["item_features"].select("item_id", "author_id")
        rates = (
            tables["src_inter"].join(items, on="item_id")
            .group_by("author_id").agg(pl.col("click_cnt").mean(), pl.len())
            .filter(pl.col("len") >= 20)
        )  # fmt: skip
        return rates["click_cnt"].std()

    assert author_spread(3.0) > 1.5 * author_spread(0.0)


def test_search_transitions_raise_topic_share():
    """A search on a topic raises that topic's share in the next rec exposures."""

    def share_following_search(boost):
        cfg = make_config("small", transition_boost=boost, trigger_prob=0.0)
        tables = generate(cfg)
        items = tables["item_features"].select("item_id", topic="first_level_category_id")
        rec = tables["rec_inter"].join(items, on="item_id").select("user_id", "timestamp", "topic")
        words = (
            tables["src_inter"]
            .unique("search_session_id")
            .select("user_id", ts="search_session_timestamp", keyword="keyword")
        )
        # the first query word identifies the topic in the generator's vocabulary
        first_word = words["keyword"].str.extract(r"\[(\d+)").cast(pl.Int64)
        words = words.with_columns(search_topic=(first_word - 1) // cfg.words_per_topic + 1)
        joined = (
            rec.sort("user_id", "timestamp")
            .join_asof(
                words.sort("user_id", "ts"),
                left_on="timestamp",
                right_on="ts",
                by="user_id",
                strategy="backward",
            )
            .filter((pl.col("timestamp") - pl.col("ts")) < 3_600_000)
        )
        return (joined["topic"] == joined["search_topic"]).mean()

    assert share_following_search(0.6) > share_following_search(0.0) + 0.1


def _rank_auc(score: np.ndarray, label: np.ndarray) -> float:
    """AUC of `score` for binary `label` (ties count half), by the rank-sum formula."""
    ranks = pl.Series(score).rank("average").to_numpy()
    positives = label == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _topic_familiarity_auc(skipped_per_request: float) -> float:
    """How well "the share of the user's rec clicks on this impression's topic"
    separates clicked from unclicked rec impressions: what a CTR model can learn."""
    tables = generate(make_config("small", skipped_per_request=skipped_per_request))
    items = tables["item_features"].select("item_id", topic="first_level_category_id")
    rec = tables["rec_inter"].join(items, on="item_id", maintain_order="left")
    clicks = rec.filter(pl.col("click") == 1)
    share = (
        clicks.group_by("user_id", "topic")
        .len()
        .with_columns(share=pl.col("len") / pl.col("len").sum().over("user_id"))
    )
    scored = rec.join(share, on=["user_id", "topic"], how="left").with_columns(
        pl.col("share").fill_null(0.0)
    )
    return _rank_auc(scored["share"].to_numpy(), scored["click"].to_numpy())


def test_skipped_exposures_make_rec_clicks_predictable():
    """The CTR signal: without skipped exposures nearly every rec impression is of
    the user's own topics, so whether it is clicked hardly depends on the topic; with
    them (task=ctr's default, 2 a request) the topic separates clicks clearly."""
    without, with_skips = _topic_familiarity_auc(0.0), _topic_familiarity_auc(2.0)
    assert without < 0.65  # 0.62: the share counts the impression's own click
    assert with_skips > 0.78  # 0.80


def test_skipped_exposures_leave_the_click_data_unchanged():
    """They are drawn from their own stream and written after the drawn exposures, so
    the ranking views, which read clicks, see the same data at any value."""
    plain = generate(make_config("small", **TINY))
    skips = generate(make_config("small", **{**TINY, "skipped_per_request": 3.0}))
    n = plain["rec_inter"].height
    assert skips["rec_inter"].height > n
    assert skips["rec_inter"].head(n).equals(plain["rec_inter"])
    assert skips["rec_inter"].tail(-n)["click"].sum() == 0
    # a skipped item is not one the request already showed (it would be clicked and skipped)
    key = ["user_id", "item_id", "timestamp"]
    skipped = skips["rec_inter"].tail(-n).select(key)
    assert skipped.join(plain["rec_inter"].select(key), on=key).height == 0
    assert skipped.unique().height == skipped.height
    for name in ("src_inter", "user_features", "item_features", "social_network"):
        assert skips[name].equals(plain[name]), name


def test_skipped_exposures_only_under_the_ctr_task(make_cfg):
    assert make_cfg("task=ctr").dataset.synthetic.skipped_per_request == 2.0
    assert make_cfg().dataset.synthetic.skipped_per_request == 0.0
    cfg = make_cfg("task=ctr", "dataset.synthetic.skipped_per_request=1")
    assert cfg.dataset.synthetic.skipped_per_request == 1


def test_searches_predict_the_topic_of_the_next_rec_click():
    """QueryRec's next-item signal: the first rec click after a spontaneous search is
    on the query's topic more often when the search->rec transition is planted."""

    def share(boost):
        cfg = make_config("small", transition_boost=boost)
        tables = generate(cfg)
        items = tables["item_features"].select("item_id", topic="first_level_category_id")
        clicks = (
            tables["rec_inter"].filter(pl.col("click") == 1)
            .join(items, on="item_id").select("user_id", "timestamp", "topic")
            .sort("user_id", "timestamp")
        )  # fmt: skip
        searches = (
            tables["src_inter"].unique("search_session_id")
            .filter(pl.col("search_source") != "RECOMMEND_QUERY")
            .with_columns(word=pl.col("keyword").str.extract(r"\[(\d+)").cast(pl.Int64))
            .select("user_id", ts="search_session_timestamp",
                    query_topic=(pl.col("word") - 1) // cfg.words_per_topic + 1)
            .sort("user_id", "ts")
        )  # fmt: skip
        nxt = searches.join_asof(
            clicks, left_on="ts", right_on="timestamp", by="user_id", strategy="forward"
        ).drop_nulls("topic")
        return (nxt["topic"] == nxt["query_topic"]).mean()

    assert share(0.4) > share(0.0) + 0.05


def test_unclicked_search_results_name_the_query_topic():
    """What QueryRec's diffusion exploits: a query without clicks still has shown
    items, and they are of the query's topic (chance: 1 in n_topics)."""
    cfg = make_config("small")
    tables = generate(cfg)
    items = tables["item_features"].select("item_id", topic="first_level_category_id")
    shown = (
        tables["src_inter"].join(items, on="item_id")
        .with_columns(word=pl.col("keyword").str.extract(r"\[(\d+)").cast(pl.Int64))
        .with_columns(clicked=pl.col("click_cnt").max().over("search_session_id"))
    )  # fmt: skip
    unclicked_sessions = shown.filter(pl.col("clicked") == 0)
    assert unclicked_sessions["search_session_id"].n_unique() > 1000
    query_topic = (unclicked_sessions["word"] - 1) // cfg.words_per_topic + 1
    assert (unclicked_sessions["topic"] == query_topic).mean() > 0.95


def test_search_appeal_makes_some_items_clicked_whenever_shown():
    """search_appeal_weight (on under task=ctr): an item's search click rate in one half
    of the sessions predicts it in the other half; without it, items do not differ
    beyond style and noise. At 0 the search table is exactly the default one."""

    def half_agreement(weight):
        tables = generate(make_config("small", search_appeal_weight=weight))
        search = tables["src_inter"].with_columns(half=pl.col("search_session_id") % 2)
        rates = (
            search.group_by("item_id", "half")
            .agg(pl.col("click_cnt").mean())
            .pivot(on="half", index="item_id", values="click_cnt")
            .drop_nulls()
        )
        return np.corrcoef(rates["0"].to_numpy(), rates["1"].to_numpy())[0, 1]

    assert half_agreement(1.5) > 0.4 > 0.15 > half_agreement(0.0)
    default = generate(make_config("small"))["src_inter"]
    assert generate(make_config("small", search_appeal_weight=0.0))["src_inter"].equals(default)


def test_skipped_exposures_are_not_told_apart_by_item_popularity():
    """They are drawn by popularity within a topic, as every exposure is: how often an
    item is shown elsewhere does not separate skipped rows from drawn ones (a CTR model
    could otherwise learn "rare item, no click" instead of the user's preferences)."""
    tables = generate(make_config("small", skipped_per_request=2.0))
    rec = tables["rec_inter"].with_row_index("row")
    n_drawn = generate(make_config("small"))["rec_inter"].height
    shows = rec.group_by("item_id").len()
    scored = rec.join(shows, on="item_id").sort("row")
    skipped = (scored["row"] >= n_drawn).to_numpy().astype(int)
    assert abs(_rank_auc(scored["len"].to_numpy().astype(float), skipped) - 0.5) < 0.08
