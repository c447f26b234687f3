"""Canonical tables: dense ids (0 = padding), typed events, one schema for every source.

users(user, <user attributes>), items(item, <item attributes>, in_rec, in_search),
queries(query, words), rec(user, item, time, click), sessions(session, user, query,
time, source) and search(session, item, clicked, position). Times are milliseconds
since the first event. Raw sparse ids are remapped in sorted order, so the mapping
does not depend on file order.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from sar_exp.data import amazon, kuaisar
from sar_exp.data.cache import cache_key, cached_folder, code_fingerprint, file_fingerprint
from sar_exp.data.kuaisar import FEEDBACK_COLUMNS, KuaiSARRaw, read_kuaisar, source_files
from sar_exp.data.progress import stage
from sar_exp.errors import ConfigError

MISSING_ATTRIBUTE_VALUES = ["", "0", "空", "empty", "null", "None"]
TABLES = ("users", "items", "queries", "rec", "sessions", "search")


@dataclass
class CanonicalTables:
    users: pl.DataFrame
    items: pl.DataFrame
    queries: pl.DataFrame
    rec: pl.DataFrame
    sessions: pl.DataFrame
    search: pl.DataFrame
    meta: dict
    key: str = ""  # the cache key these tables were stored under; views build on it

    @property
    def user_attributes(self) -> list[str]:
        return self.meta["user_attributes"]

    @property
    def item_attributes(self) -> list[str]:
        return self.meta["item_attributes"]


def _dense_map(values: pl.Series, raw: str, code: str) -> pl.DataFrame:
    """Raw value -> dense code 1..n (sorted raw order; 0 stays free for padding)."""
    unique = values.drop_nulls().unique().sort()
    return pl.DataFrame(
        {raw: unique, code: pl.int_range(1, unique.len() + 1, dtype=pl.Int32, eager=True)}
    )


def _remap_word_lists(
    frame: pl.DataFrame, key: str, column: str, words_map: pl.DataFrame
) -> pl.DataFrame:
    """(key, list of raw word ids) -> (key, list of dense word ids), order kept."""
    return (
        frame.select(key, word_id=column)
        .explode("word_id")
        .with_row_index("pos")
        .join(words_map, on="word_id", how="left")
        .sort("pos")
        .group_by(key, maintain_order=True)
        .agg(pl.col("word").drop_nulls().alias(column))
    )


def _attribute_codes(frame: pl.DataFrame, column: str) -> pl.Expr:
    """Categorical attribute -> dense code, 0 for the release's "no value" markers."""
    values = frame[column].cast(pl.String).str.strip_chars()
    present = values.filter(~values.is_in(MISSING_ATTRIBUTE_VALUES) & values.is_not_null())
    mapping = dict(zip(present.unique().sort().to_list(), range(1, present.n_unique() + 1)))
    return (
        pl.col(column)
        .cast(pl.String)
        .str.strip_chars()
        .replace_strict(mapping, default=0, return_dtype=pl.Int32)
    )


def build_canonical(
    raw: KuaiSARRaw, user_attributes: list[str], item_attributes: list[str]
) -> CanonicalTables:
    users_map = _dense_map(
        pl.concat([raw.rec["user_id"], raw.search["user_id"], raw.users["user_id"]]),
        "user_id",
        "user",
    )
    items_map = _dense_map(
        pl.concat([raw.rec["item_id"], raw.search["item_id"], raw.items["item_id"]]),
        "item_id",
        "item",
    )
    t0 = min(int(raw.rec["timestamp"].min()), int(raw.search["timestamp"].min()))

    # Queries: a query is its word list; words are remapped densely (captions share them).
    keyword_key = pl.col("keyword").cast(pl.List(pl.String)).list.join(",")
    search = raw.search.with_columns(query_key=keyword_key)
    words_map = _dense_map(
        pl.concat([search["keyword"].explode(), raw.items["caption"].explode()]), "word_id", "word"
    )
    queries = (
        search.select("query_key", "keyword")
        .unique("query_key")
        .sort("query_key")
        .with_columns(query=pl.int_range(1, pl.len() + 1, dtype=pl.Int32))
    )
    query_words = _remap_word_lists(queries, "query", "keyword", words_map).rename(
        {"keyword": "words"}
    )

    rec = (
        raw.rec.join(users_map, on="user_id", how="left")
        .join(items_map, on="item_id", how="left")
        .select(
            "user",
            "item",
            *FEEDBACK_COLUMNS,
            time=pl.col("timestamp") - t0,
            click="click",
            order="row",
        )  # fmt: skip
        .sort("user", "time", "order")
    )

    search = (
        search.join(users_map, on="user_id")
        .join(items_map, on="item_id")
        .join(queries.select("query_key", "query"), on="query_key")
    )
    sessions_map = _dense_map(search["session_id"], "session_id", "session")
    search = search.join(sessions_map, on="session_id")
    sessions = (
        search.sort("row")
        .group_by("session", maintain_order=True)
        .agg(
            user=pl.col("user").first(),
            query=pl.col("query").first(),
            time=pl.col("timestamp").first() - t0,
            source=pl.col("search_source").first(),
        )
        .sort("user", "time", "session")
    )
    source_codes = _dense_map(sessions["source"], "source", "source_code")
    sessions = sessions.join(source_codes, on="source", how="left").select(
        "session", "user", "query", "time", source=pl.col("source_code")
    )
    shown = (
        search.sort("row")
        .select("session", "item", clicked=pl.col("clicked").clip(0, 1), item_type="item_type")
        .with_columns(position=pl.int_range(pl.len()).over("session").cast(pl.Int32))
    )

    user_table = (
        users_map.join(raw.users.unique("user_id"), on="user_id", how="left")
        .with_columns([_attribute_codes(raw.users, a).alias(a) for a in user_attributes])
        .with_columns([pl.col(a).fill_null(0) for a in user_attributes])
        .select("user", "user_id", *user_attributes)
        .sort("user")
    )
    caption_words = _remap_word_lists(raw.items, "item_id", "caption", words_map)
    rec_items = rec["item"].unique()
    search_items = shown["item"].unique()
    item_table = (
        items_map.join(raw.items.unique("item_id").drop("caption"), on="item_id", how="left")
        .with_columns([_attribute_codes(raw.items, a).alias(a) for a in item_attributes])
        .with_columns([pl.col(a).fill_null(0) for a in item_attributes])
        .join(caption_words, on="item_id", how="left")
        .with_columns(caption=pl.col("caption").fill_null(pl.lit([], dtype=pl.List(pl.Int32))))
        .with_columns(
            in_rec=pl.col("item").is_in(rec_items), in_search=pl.col("item").is_in(search_items)
        )
        .select("item", "item_id", *item_attributes, "caption", "in_rec", "in_search")
        .sort("item")
    )

    meta = {
        "num_users": users_map.height,
        "num_items": items_map.height,
        "num_words": words_map.height,
        "num_queries": queries.height,
        "num_sources": source_codes.height,
        "user_attributes": list(user_attributes),
        "item_attributes": list(item_attributes),
        "user_attribute_sizes": [int(user_table[a].max() or 0) for a in user_attributes],
        "item_attribute_sizes": [int(item_table[a].max() or 0) for a in item_attributes],
        "max_query_words": int(query_words["words"].list.len().max()),
        "time_origin_ms": t0,
    }
    return CanonicalTables(
        users=user_table,
        items=item_table,
        queries=query_words.sort("query"),
        rec=rec,
        sessions=sessions,
        search=shown.drop("item_type"),
        meta=meta,
    )


def _reader(source: str, options: dict):
    """(read(folder, user_attributes, item_attributes), source files, reader module) of
    a dataset source; every source yields the same raw tables."""
    if source == "amazon":
        category = options.get("category")
        if not category:
            raise ConfigError("dataset=amazon needs dataset.category (e.g. Kindle_Store)")
        queries, seed = options.get("queries", "generated"), int(options.get("query_seed", 0))

        def read(folder, user_attributes, item_attributes):
            return amazon.read_amazon(folder, category, queries, seed)

        return read, lambda folder: amazon.source_files(folder, category, queries), amazon
    release = options.get("release", "full")

    def read_kuaisar_release(folder, user_attributes, item_attributes):
        return read_kuaisar(folder, user_attributes, item_attributes, release=release)

    return read_kuaisar_release, source_files, kuaisar


def load_canonical(
    folder: str | Path,
    cache_dir: str | Path,
    user_attributes: list[str],
    item_attributes: list[str],
    source: str = "kuaisar",
    reader_options: dict | None = None,
) -> CanonicalTables:
    """Canonical tables for a dataset folder, from the cache when its sources are unchanged."""
    folder = Path(folder)
    options = dict(reader_options or {})
    if options.get("release") == "full":  # the default: the same tables, so the same key
        del options["release"]
    read, files, module = _reader(source, options)
    key = cache_key(
        code_fingerprint(module, sys.modules[__name__]),
        str(folder.resolve()),
        [file_fingerprint(p) for p in files(folder)],
        user_attributes,
        item_attributes,
        source,
        options,
    )
    label = "Amazon" if source == "amazon" else "KuaiSAR"

    def build(tmp: Path) -> None:
        with stage(f"reading the {label} files in {folder}"):
            raw = read(folder, user_attributes, item_attributes)
        rows = f"{raw.rec.height:,} rec rows, {raw.search.height:,} search rows"
        with stage(f"building canonical tables ({rows})"):
            tables = build_canonical(raw, user_attributes, item_attributes)
        for name in TABLES:
            getattr(tables, name).write_parquet(tmp / f"{name}.parquet")
        (tmp / "meta.json").write_text(json.dumps(tables.meta, indent=1))

    if not folder.is_dir():  # checked here so the message is not about the cache
        read(folder, user_attributes, item_attributes)
    path = cached_folder(Path(cache_dir), f"canonical-{key}", build)
    return CanonicalTables(
        **{name: pl.read_parquet(path / f"{name}.parquet") for name in TABLES},
        meta=json.loads((path / "meta.json").read_text()),
        key=key,
    )
