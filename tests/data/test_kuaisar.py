"""The KuaiSAR reader: published formats accepted, malformed files named precisely."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from sar_exp.data.canonical import load_canonical
from sar_exp.data.kuaisar import read_kuaisar
from sar_exp.errors import DataError

USER_ATTRS = ["search_active_level", "rec_active_level"]
ITEM_ATTRS = ["first_level_category_id", "author_id"]


@pytest.fixture
def folder(tiny_folder, tmp_path):
    copy = tmp_path / "kuaisar"
    shutil.copytree(tiny_folder, copy)
    return copy


def _rewrite(path, transform):
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(transform(lines)) + "\n", encoding="utf-8")


def test_reads_published_formats(folder):
    raw = read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS)
    assert raw.rec["timestamp"].dtype == pl.Int64
    assert raw.rec["timestamp"].min() > 1_684_000_000_000  # float ms parsed to int ms
    lengths = raw.search["keyword"].list.len()
    assert lengths.min() >= 1 and lengths.max() <= 3
    # a one-word query written "[5]" parses to one word
    one_word = raw.search.filter(pl.col("keyword").list.len() == 1)
    assert one_word.height > 0
    assert raw.items["caption"].list.len().min() == 0  # "0" captions mean no caption
    assert raw.social is not None and raw.social.height > 0


def test_accepts_reco_active_level_spelling(folder):
    path = folder / "user_features.csv"
    _rewrite(
        path, lambda lines: [lines[0].replace("rec_active_level", "reco_active_level"), *lines[1:]]
    )
    raw = read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS)
    assert "rec_active_level" in raw.users.columns
    assert raw.users["rec_active_level"].null_count() == 0


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=r"dataset folder .*nowhere does not exist"):
        read_kuaisar(tmp_path / "nowhere", USER_ATTRS, ITEM_ATTRS)


def test_missing_file_is_named(folder):
    (folder / "src_inter.csv").unlink()
    with pytest.raises(DataError, match=r"src_inter\.csv: file not found"):
        read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS)


def test_missing_column_is_named(folder):
    path = folder / "rec_inter.csv"
    _rewrite(path, lambda lines: [lines[0].replace(",click,", ",clicked,"), *lines[1:]])
    with pytest.raises(DataError, match=r"rec_inter\.csv: missing column\(s\) \['click'\]"):
        read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS)


def test_unparsable_keyword_names_file_line_and_value(folder):
    path = folder / "src_inter.csv"

    def corrupt(lines):
        lines[3] = lines[3].replace(lines[3].split('"')[1], "[12, x7]", 1)
        return lines

    _rewrite(path, corrupt)
    with pytest.raises(DataError, match=r"src_inter\.csv, line 4, column 'keyword'.*'\[12, x7\]'"):
        read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS)


def test_unparsable_timestamp_names_line(folder):
    path = folder / "rec_inter.csv"
    header = path.read_text().splitlines()[0].split(",")
    column = header.index("timestamp")

    def corrupt(lines):
        cells = lines[5].split(",")
        cells[column] = "yesterday"
        lines[5] = ",".join(cells)
        return lines

    _rewrite(path, corrupt)
    with pytest.raises(
        DataError,
        match=r"rec_inter\.csv, line 6, column 'timestamp': expected a number, got 'yesterday'",
    ):
        read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS)


def test_empty_and_header_only_files(folder):
    (folder / "user_features.csv").write_text("")
    with pytest.raises(DataError, match=r"user_features\.csv: file is empty"):
        read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS)
    (folder / "user_features.csv").write_text("user_id,search_active_level,rec_active_level\n")
    with pytest.raises(DataError, match=r"user_features\.csv: has a header but no data rows"):
        read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS)


def test_bad_file_leaves_existing_cache_intact(folder, tmp_path):
    cache = tmp_path / "cache"
    good = load_canonical(folder, cache, USER_ATTRS, ITEM_ATTRS)
    entries = sorted(p.name for p in cache.iterdir())
    (folder / "src_inter.csv").write_text("keyword,item_id\n")  # now broken
    with pytest.raises(DataError, match="missing column"):
        load_canonical(folder, cache, USER_ATTRS, ITEM_ATTRS)
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing added, nothing half-written
    assert (cache / entries[0] / "COMPLETE").exists()
    assert good.rec.height > 0


def test_canonical_tables_use_dense_ids_with_zero_free(folder, tmp_path):
    tables = load_canonical(folder, tmp_path / "cache", USER_ATTRS, ITEM_ATTRS)
    assert tables.users["user"].min() == 1
    assert tables.users["user"].max() == tables.meta["num_users"]
    assert tables.items["item"].to_list() == list(range(1, tables.meta["num_items"] + 1))
    # search-only items (types the recommender never shows) exist and are flagged
    assert tables.items.filter(pl.col("in_search") & ~pl.col("in_rec")).height > 0
    # sessions without a click are kept
    clicked = tables.search.group_by("session").agg(pl.col("clicked").max())
    assert 0 < clicked["clicked"].mean() < 1


def test_preprocessing_reports_its_stages(folder, tmp_path, capsys):
    load_canonical(folder, tmp_path / "cache", USER_ATTRS, ITEM_ATTRS)
    err = capsys.readouterr().err
    assert "[sar_exp] reading the KuaiSAR files in" in err
    assert "[sar_exp] building canonical tables (" in err and "rec rows" in err and "done in" in err
    load_canonical(folder, tmp_path / "cache", USER_ATTRS, ITEM_ATTRS)
    assert capsys.readouterr().err == ""  # from the cache: nothing to report


def test_small_release_cuts_a_full_release_at_its_end(folder, tmp_path):
    """KuaiSAR-small (QueryRec 5.1) ends on 2023-05-31: release=small keeps the events
    before 2023-06-01 00:00 Beijing time, through the reader option the config passes."""
    from sar_exp.data.kuaisar import SMALL_RELEASE_END_MS
    from sar_exp.errors import ConfigError

    full = read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS)
    small = read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS, release="small")
    assert full.rec["timestamp"].max() >= SMALL_RELEASE_END_MS  # the embedded data run to 06-10
    assert small.rec["timestamp"].max() < SMALL_RELEASE_END_MS
    assert small.search["timestamp"].max() < SMALL_RELEASE_END_MS
    assert 0 < small.rec.height < full.rec.height
    # 2023-06-01 00:00 in Beijing is 2023-05-31 16:00 UTC
    assert SMALL_RELEASE_END_MS == 1_685_548_800_000
    cut = load_canonical(
        folder, tmp_path, USER_ATTRS, ITEM_ATTRS, reader_options={"release": "small"}
    )
    assert cut.rec.height == small.rec.height
    with pytest.raises(ConfigError, match="dataset.reader.release must be one of"):
        read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS, release="medium")


def test_feedback_labels_are_read_when_present(folder, tmp_path):
    """like, follow and forward (PLE's other tasks) reach the ctr view; a file without
    them reads as zeros."""
    from sar_exp.data.views import Protocol, build_view

    raw = read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS)
    clicked = raw.rec.filter(pl.col("click") == 1)
    assert clicked["follow"].sum() > 0 and clicked["forward"].sum() > 0
    assert raw.rec.filter(pl.col("click") == 0)["follow"].sum() == 0
    view = build_view(
        load_canonical(folder, tmp_path / "a", USER_ATTRS, ITEM_ATTRS), "ctr", Protocol()
    )
    assert view["rec.train.label_follow"].sum() > 0
    path = folder / "rec_inter.csv"
    frame = pl.read_csv(path).drop("like", "follow", "forward")
    frame.write_csv(path)
    assert read_kuaisar(folder, USER_ATTRS, ITEM_ATTRS).rec["follow"].sum() == 0


def test_dataset_release_reaches_the_reader(make_cfg):
    cfg = make_cfg("dataset=kuaisar", "dataset.path=/data/kuaisar", "dataset.release=small")
    assert cfg.data.reader_options.release == "small"
    assert make_cfg("dataset=kuaisar", "dataset.path=/x").data.reader_options.release == "full"
