"""The Amazon reader: the published formats (plain and .gz), generated and released
queries, the documented tie order, and one-line errors that leave no cache behind."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sar_exp.data.amazon import path_query, read_amazon, read_released_queries, read_reviews
from sar_exp.data.canonical import load_canonical
from sar_exp.data.views import Protocol, build_view
from sar_exp.errors import DataError

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "amazon"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.parametrize(
    "levels, query",
    [
        (["Camera, Photo", "Digital Camera Lenses"], "photo digital camera lenses"),  # DATASETS.md
        (["Toys & Games", "Games", "Board Games"], "toys board games"),
        (["Books", "Books for Kids", "Science Fiction & Fantasy"], "books kids science fiction fantasy"),
        (["Kindle Store", "Kindle eBooks"], "store kindle ebooks"),
    ],
)  # fmt: skip
def test_queries_follow_the_recipe(levels, query):
    # letters only, lowercase, no stop words, a repeated word at its deepest occurrence
    assert path_query(levels) == query


def test_every_purchase_is_a_rec_click_and_a_search_click_under_its_items_query():
    raw = read_amazon(FIXTURE, "Toy_Store")
    assert raw.rec.height == raw.search.height == 660  # the fixture's reviews
    assert (raw.rec["click"] == 1).all() and (raw.search["clicked"] == 1).all()
    # one query per item, however often it is bought
    per_item = raw.search.group_by("item_id").agg(pl.col("keyword").n_unique())
    assert (per_item["keyword"] == 1).all()
    assert set(raw.search["search_source"]) == {"GENERATED"}
    # rec click and search click of a purchase are one event: same user, item, time
    pairs = raw.rec.select("user_id", "item_id", "timestamp").sort(pl.all())
    assert pairs.equals(raw.search.select("user_id", "item_id", "timestamp").sort(pl.all()))


def test_the_query_of_an_item_with_two_paths_is_drawn_from_the_seed():
    chosen = {
        seed: dict(zip(*read_amazon(FIXTURE, "Toy_Store", query_seed=seed).search.select(
            "item_id", pl.col("keyword").cast(pl.List(pl.String)).list.join(" ")).to_dict().values()))
        for seed in (0, 1, 2)
    }  # fmt: skip
    assert chosen[0] == read_amazon(FIXTURE, "Toy_Store", query_seed=0).search.select(
        "item_id", pl.col("keyword").cast(pl.List(pl.String)).list.join(" ")
    ).pipe(lambda f: dict(zip(*f.to_dict().values())))  # same seed, same queries
    assert chosen[0] != chosen[1] or chosen[0] != chosen[2]  # B00TOY0000 has two paths


def test_gzipped_files_read_the_same(tmp_path):
    for name in ("reviews_Toy_Store_5.json", "meta_Toy_Store.json"):
        with open(FIXTURE / name, "rb") as src, gzip.open(tmp_path / (name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    plain, packed = read_amazon(FIXTURE, "Toy_Store"), read_amazon(tmp_path, "Toy_Store")
    assert plain.rec.equals(packed.rec) and plain.search.equals(packed.search)


def test_same_day_purchases_are_ordered_by_asin_in_both_tasks(tmp_path):
    tables = load_canonical(FIXTURE, tmp_path, [], [], source="amazon",
                            reader_options={"category": "Toy_Store"})  # fmt: skip
    view = build_view(tables, "sequential", Protocol(num_eval_negatives=9))
    items = tables.items.select("item", "item_id")
    asin = dict(zip(items["item"].to_list(), items["item_id"].to_list()))
    # within a user and a day the events run in asin order, in rec and in search alike
    for prefix in ("rec_click", "search_click"):
        user, time = view[f"{prefix}_user"], view[f"{prefix}_time"]
        names = [asin[i] for i in view[f"{prefix}_item"].tolist()]
        for k in range(1, user.size):
            if user[k] == user[k - 1] and time[k] == time[k - 1]:
                assert names[k - 1] < names[k]
    # so both tasks hold out the same purchase of each user
    rec, search = view.split("rec", "test"), view.split("search", "test")
    assert np.array_equal(rec["item"], search["item"]) and np.array_equal(
        rec["time"], search["time"]
    )


def test_released_queries_assign_each_purchase_its_qrels_query(tmp_path):
    raw = read_reviews(FIXTURE / "reviews_Toy_Store_5.json")
    first = raw.row(0, named=True)
    with gzip.open(tmp_path / "Toy_Store__query_text.txt.gz", "wt") as f:
        f.write("toys board games\nwooden puzzle\n")
    with gzip.open(tmp_path / "Toy_Store__train.qrels.gz", "wt") as f:
        f.write(f"{first['user_id']}_1 0 {first['item_id']} 1 \n")
    shutil.copy(FIXTURE / "reviews_Toy_Store_5.json", tmp_path)
    loaded = read_amazon(tmp_path, "Toy_Store", queries="ai_released")
    assert loaded.rec.height == 660 and loaded.search.height == 1  # only that purchase has one
    assert loaded.search["user_id"][0] == first["user_id"]
    assert len(loaded.search["keyword"][0]) == 2  # "wooden puzzle"


@pytest.mark.skipif(not (SHARED / "amazon_product_search").exists(), reason="../shared absent")
@pytest.mark.parametrize(
    "category", ["Kindle_Store", "Cell_Phones_and_Accessories", "CDs_and_Vinyl", "Electronics"]
)
def test_ai_et_al_released_files_parse(category):
    queries, assigned = read_released_queries(SHARED / "amazon_product_search", category)
    assert queries and assigned
    assert max(assigned.values()) < len(queries)
    user, asin = next(iter(assigned))
    assert user and len(asin) == 10


@pytest.mark.skipif(not (SHARED / "amazon_5core_sample").exists(), reason="../shared absent")
def test_real_review_lines_parse():
    (path,) = (SHARED / "amazon_5core_sample").glob("*.json")
    reviews = read_reviews(path)
    assert reviews.height == 6 and reviews["timestamp"][0] == 1_400_630_400_000
    assert reviews["item_id"][0] == "120401325X"


@pytest.mark.parametrize(
    "damage, message",
    [
        (("reviews", 3, "{not json"), r"reviews_Toy_Store_5.json, line 3: not a JSON object"),
        (("reviews", 2, '{"asin": "B00TOY0001", "unixReviewTime": 1}'), r"line 2: no 'reviewerID' field"),
        (("meta", 1, "{'asin': 'B00TOY0000', 'categories': [['Toys'"),
         r"meta_Toy_Store.json, line 1: not a Python dict literal"),
        (("meta", 1, "{'asin': 'B00TOY0000', 'categories': []}"),
         r"meta_Toy_Store.json, line 1: item B00TOY0000 has no categories"),
        (("missing", 0, ""), r"reviews_Toy_Store_5.json: file not found"),
    ],
)  # fmt: skip
def test_bad_files_are_one_line_and_leave_no_cache(tmp_path, damage, message):
    folder = tmp_path / "data"
    shutil.copytree(FIXTURE, folder)
    kind, line, text = damage
    if kind == "missing":
        (folder / "reviews_Toy_Store_5.json").unlink()
    else:
        path = folder / ("reviews_Toy_Store_5.json" if kind == "reviews" else "meta_Toy_Store.json")
        lines = path.read_text().splitlines()
        lines[line - 1] = text
        path.write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=message) as error:
        load_canonical(
            folder, cache, [], [], source="amazon", reader_options={"category": "Toy_Store"}
        )
    assert "\n" not in str(error.value)
    assert not list(cache.glob("canonical-*")) and not list(cache.glob(".canonical-*"))


def test_amazon_runs_end_to_end_and_refuses_ctr(make_cfg, tmp_path):
    from sar_exp.errors import ConfigError
    from sar_exp.train import train

    common = ("dataset=amazon", f"dataset.path={FIXTURE}", "dataset.category=Toy_Store",
              "dataset.protocol.num_eval_negatives=9")  # fmt: skip
    metrics = train(make_cfg(*common, "method=clardrec", "backbone=sasrec", tiny=False,
                             output_dir=tmp_path))  # fmt: skip
    assert 0.0 <= metrics["test/ndcg@5"] <= 1.0
    with pytest.raises(ConfigError, match="dataset=amazon holds purchases only"):
        train(make_cfg(*common, "task=ctr", "backbone=din", tiny=False))


def test_under_unisar_negatives_avoid_the_users_items_and_k_core_counts_purchases(tmp_path):
    """A purchase is a rec click and a search click but one interaction for the 5-core;
    UniSAR's stored negatives (search ones too) are items the user never bought."""
    tables = load_canonical(FIXTURE, tmp_path, [], [], source="amazon",
                            reader_options={"category": "Toy_Store"})  # fmt: skip
    protocol = Protocol(k_core=5, search_negatives_avoid="user", num_eval_negatives=9)
    view = build_view(tables, "sequential", protocol)
    purchases = pl.DataFrame({"user": view["rec_click_user"], "item": view["rec_click_item"]})
    assert purchases.group_by("user").len()["len"].min() >= 5
    assert purchases.group_by("item").len()["len"].min() >= 5
    bought = set(zip(view["rec_click_user"].tolist(), view["rec_click_item"].tolist()))
    for task in ("rec", "search"):
        test = view.split(task, "test")
        rows = zip(test["user"].tolist(), test["negatives"].tolist())
        assert not any((u, i) in bought for u, row in rows for i in row), task
    # the query rule (ClardRec's) lets a user's own purchases through on this data
    by_query = build_view(tables, "sequential", Protocol(k_core=5, num_eval_negatives=9))
    test = by_query.split("search", "test")
    rows = zip(test["user"].tolist(), test["negatives"].tolist())
    assert any((u, i) in bought for u, row in rows for i in row)
