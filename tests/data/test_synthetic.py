"""The embedded dataset: KuaiSAR's format, seeded, with the planted effects visible."""

from __future__ import annotations

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
