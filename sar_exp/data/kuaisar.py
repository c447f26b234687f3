"""Reader for the KuaiSAR release (Sun et al., CIKM'23), exactly as published.

Every file is read by column name with polars. Values are validated before they are
used, so a malformed file stops with a message naming the file, the line and the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from sar_exp.errors import ConfigError, DataError

REC_FILE = "rec_inter.csv"
SEARCH_FILE = "src_inter.csv"
USER_FILE = "user_features.csv"
ITEM_FILE = "item_features.csv"
SOCIAL_FILE = "social_network.csv"

REC_COLUMNS = ["user_id", "item_id", "timestamp", "click", "search"]
# Feedback labels beside the click (PLE's other tasks, QueryRec Table 4); read when the
# file has them, 0 otherwise
FEEDBACK_COLUMNS = ["like", "follow", "forward"]
SEARCH_COLUMNS = [
    "keyword",
    "item_id",
    "click_cnt",
    "search_session_id",
    "item_type",
    "user_id",
    "search_session_timestamp",
    "search_source",
]
# Published files and third-party code disagree on this header (DATASETS.md).
REC_ACTIVITY_SPELLINGS = ("rec_active_level", "reco_active_level")
# Caption values that mean "no caption" in the release.
EMPTY_LIST_VALUES = ("", "0", "空", "empty", "[]")
_ID_LIST_PATTERN = r"^\s*\[\s*(\d+\s*(,\s*\d+\s*)*)?\]\s*$"


@dataclass
class KuaiSARRaw:
    """The raw tables, with typed columns and original (sparse) ids."""

    rec: pl.DataFrame  # user_id, item_id, timestamp(ms int), click, search, row
    search: pl.DataFrame  # session_id, user_id, item_id, keyword(list[int]), timestamp, ...
    users: pl.DataFrame  # user_id + user attribute columns (raw values as strings)
    items: pl.DataFrame  # item_id, caption(list[int]) + item attribute columns
    social: pl.DataFrame | None  # user_id, user_follow_id


def source_files(folder: Path) -> list[Path]:
    """The files whose content defines the dataset (used for the cache key)."""
    names = [REC_FILE, SEARCH_FILE, USER_FILE, ITEM_FILE, SOCIAL_FILE]
    return [folder / n for n in names if (folder / n).exists()]


def _header(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(
            f"{path}: file not found (a KuaiSAR folder holds {REC_FILE}, {SEARCH_FILE}, {USER_FILE}, {ITEM_FILE})"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (expected a header row and data rows)")
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        first = handle.readline().strip()
    if not first:
        raise DataError(f"{path}: first line is empty (expected a header row)")
    return [c.strip().strip('"') for c in first.split(",")]


def _require(path: Path, header: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the header has {header}")


def _read(path: Path, columns: list[str]) -> pl.DataFrame:
    """Read the named columns as strings; typing happens in `_to_int`/`_to_float`."""
    try:
        frame = pl.read_csv(path, columns=columns, infer_schema=False, quote_char='"')
    except pl.exceptions.PolarsError as err:  # malformed CSV structure
        raise DataError(f"{path}: cannot be parsed as CSV ({str(err).splitlines()[0]})") from None
    if frame.height == 0:
        raise DataError(f"{path}: has a header but no data rows")
    return frame.with_row_index("row")


def _first_bad(frame: pl.DataFrame, bad: pl.Expr, column: str) -> tuple[int, str] | None:
    hit = frame.filter(bad).select("row", column).head(1)
    if hit.height == 0:
        return None
    # +2: one for the header row, one because lines count from 1.
    return int(hit["row"][0]) + 2, hit[column][0]


def _to_number(frame: pl.DataFrame, path: Path, column: str, dtype) -> pl.Expr:
    raw = pl.col(column).str.strip_chars()
    as_float = raw.cast(pl.Float64, strict=False)
    bad = raw.is_null() | (raw == "") | as_float.is_null()
    found = _first_bad(frame, bad, column)
    if found:
        line, value = found
        raise DataError(f"{path}, line {line}, column '{column}': expected a number, got {value!r}")
    return as_float.cast(dtype)


def parse_id_lists(
    frame: pl.DataFrame, path: Path, column: str, allow_empty_values: bool
) -> pl.Expr:
    """Parse list strings such as "[20, 34, 3]" into list[int] (word ids)."""
    raw = pl.col(column).fill_null("").str.strip_chars()
    is_empty = raw.is_in(list(EMPTY_LIST_VALUES)) if allow_empty_values else pl.lit(False)
    bad = ~(raw.str.contains(_ID_LIST_PATTERN) | is_empty)
    found = _first_bad(frame, bad, column)
    if found:
        line, value = found
        raise DataError(
            f"{path}, line {line}, column '{column}': expected a list of word ids like \"[20, 34, 3]\", got {value!r}"
        )
    inner = raw.str.strip_chars("[] ")
    return (
        pl.when(is_empty | (inner == ""))
        .then(pl.lit([], dtype=pl.List(pl.Int64)))
        .otherwise(
            inner.str.split(",").list.eval(
                pl.element().str.strip_chars().cast(pl.Int64, strict=False).drop_nulls()
            )
        )
    )


def read_rec(folder: Path) -> pl.DataFrame:
    path = folder / REC_FILE
    header = _header(path)
    _require(path, header, REC_COLUMNS)
    feedback = [c for c in FEEDBACK_COLUMNS if c in header]
    frame = _read(path, REC_COLUMNS + feedback)
    return frame.select(
        "row",
        _to_number(frame, path, "user_id", pl.Int64).alias("user_id"),
        _to_number(frame, path, "item_id", pl.Int64).alias("item_id"),
        # float milliseconds such as 1684742177668.0
        _to_number(frame, path, "timestamp", pl.Int64).alias("timestamp"),
        _to_number(frame, path, "click", pl.Int8).alias("click"),
        _to_number(frame, path, "search", pl.Int8).alias("search"),
        *(_to_number(frame, path, c, pl.Int8).clip(0, 1).alias(c) if c in feedback
          else pl.lit(0, pl.Int8).alias(c) for c in FEEDBACK_COLUMNS),
    )  # fmt: skip


def read_search(folder: Path) -> pl.DataFrame:
    path = folder / SEARCH_FILE
    _require(path, _header(path), SEARCH_COLUMNS)
    frame = _read(path, SEARCH_COLUMNS)
    return frame.select(
        "row",
        _to_number(frame, path, "search_session_id", pl.Int64).alias("session_id"),
        _to_number(frame, path, "user_id", pl.Int64).alias("user_id"),
        _to_number(frame, path, "item_id", pl.Int64).alias("item_id"),
        parse_id_lists(frame, path, "keyword", allow_empty_values=False).alias("keyword"),
        _to_number(frame, path, "search_session_timestamp", pl.Int64).alias("timestamp"),
        _to_number(frame, path, "click_cnt", pl.Int8).alias("clicked"),
        pl.col("item_type").fill_null("").alias("item_type"),
        pl.col("search_source").fill_null("").alias("search_source"),
    )


def read_users(folder: Path, attributes: list[str]) -> pl.DataFrame:
    path = folder / USER_FILE
    header = _header(path)
    renames = {}
    wanted = []
    for name in attributes:
        if name in REC_ACTIVITY_SPELLINGS:
            spelled = next((s for s in REC_ACTIVITY_SPELLINGS if s in header), name)
            renames[spelled] = name
            wanted.append(spelled)
        else:
            wanted.append(name)
    _require(path, header, ["user_id", *wanted])
    frame = _read(path, ["user_id", *wanted]).rename(renames)
    return frame.select(_to_number(frame, path, "user_id", pl.Int64).alias("user_id"), *attributes)


def read_items(folder: Path, attributes: list[str]) -> pl.DataFrame:
    path = folder / ITEM_FILE
    header = _header(path)
    _require(path, header, ["item_id", *attributes])
    use_caption = "caption" in header
    columns = ["item_id", *attributes] + (["caption"] if use_caption else [])
    frame = _read(path, list(dict.fromkeys(columns)))
    caption = (
        parse_id_lists(frame, path, "caption", allow_empty_values=True)
        if use_caption
        else pl.lit([], dtype=pl.List(pl.Int64))
    )
    return frame.select(
        _to_number(frame, path, "item_id", pl.Int64).alias("item_id"),
        *[pl.col(a) for a in attributes if a != "caption"],
        caption.alias("caption"),
    )


def read_social(folder: Path) -> pl.DataFrame | None:
    path = folder / SOCIAL_FILE
    if not path.exists():
        return None  # not used by any of the four papers; optional
    _require(path, _header(path), ["user_id", "user_follow_id"])
    frame = _read(path, ["user_id", "user_follow_id"])
    return frame.select(
        _to_number(frame, path, "user_id", pl.Int64).alias("user_id"),
        _to_number(frame, path, "user_follow_id", pl.Int64).alias("user_follow_id"),
    )


# KuaiSAR-small (QueryRec 5.1) is the release that ends on 2023-05-31 (Beijing time):
# the events before 2023-06-01 00:00 there, in ms since the epoch
SMALL_RELEASE_END_MS = 1_685_548_800_000
RELEASES = ("full", "small")


def read_kuaisar(
    folder: str | Path, user_attributes: list[str], item_attributes: list[str],
    release: str = "full",
) -> KuaiSARRaw:  # fmt: skip
    """Read and validate the five KuaiSAR CSVs from `folder`. Either release reads as it
    is; release="small" also cuts a full release's events at the small one's end (on
    the small release itself it removes nothing)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"dataset folder {folder} does not exist (set dataset.path to the unzipped KuaiSAR folder)"
        )
    if release not in RELEASES:
        raise ConfigError(
            f"dataset.reader.release must be one of {list(RELEASES)}, got {release!r}"
        )
    rec, search = read_rec(folder), read_search(folder)
    if release == "small":
        rec = rec.filter(pl.col("timestamp") < SMALL_RELEASE_END_MS)
        search = search.filter(pl.col("timestamp") < SMALL_RELEASE_END_MS)
    return KuaiSARRaw(
        rec=rec,
        search=search,
        users=read_users(folder, user_attributes),
        items=read_items(folder, item_attributes),
        social=read_social(folder),
    )
