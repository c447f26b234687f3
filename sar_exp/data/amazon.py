"""Reader for Amazon review data with generated queries (Ai et al., SIGIR'17), as SESRec
and UniSAR use it: every purchase is a recommendation click and a search click.

Files, exactly as published (plain or .gz), in `dataset.path`:
  reviews_<Category>_5.json   5-core reviews, one JSON object a line (reviewerID, asin,
                              unixReviewTime in seconds, day resolution, ...)
  meta_<Category>.json        metadata, one Python-literal dict a line (asin, categories:
                              a list of category paths, ...); parsed with ast.literal_eval
With `queries=ai_released`, also Ai et al.'s `<Category>__query_text.txt.gz` (one query a
line, the 0-based line number is its id) and `<Category>__{train,test}.qrels.gz` (lines
`<reviewerID>_<query id> 0 <asin> 1`).

Queries (`queries=generated`), following DATASETS.md: per category path of an item, the
level names joined, letters only, lowercased, stop words dropped, repeated words kept
at their deepest occurrence; an item's queries are its paths' queries, and each item's
purchases are searched with one of them, drawn once per item from `query_seed`
(SESRec/UniSAR). Like Ai et al.'s released texts, a possessive is dropped ("Children's
Books" -> "children books") and a hyphen joins ("Hip-Hop" -> "hiphop"). Their texts
also differ in ways this recipe does not copy: words are lemmatised, not always
consistently ("accessories" -> "accessory", "listening" -> "listen", but "parts"
stays), their stop list differs (it drops "new", keeps "can"), and no query is a
single word. Use `queries=ai_released` to match their text exactly.

Ties: review times have day resolution, so a user's purchases of one day share a
timestamp. They are ordered by (user, time, asin) in both tasks; a purchase's rec click
and search click are one event at one time, and histories hold only strictly earlier
days, so same-day purchases never see each other.

The reader returns the KuaiSAR reader's raw tables (users and items carry no attributes;
item type PRODUCT; search source GENERATED), so the rest of the pipeline is shared.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from pathlib import Path

import numpy as np
import polars as pl

from sar_exp.data.kuaisar import KuaiSARRaw
from sar_exp.errors import DataError

QUERY_MODES = ("generated", "ai_released")
DAY_MS = 86_400_000
# English function words (articles, pronouns, prepositions, conjunctions, auxiliaries):
# they carry no product meaning in a category name ("Camera & Photo", "Books for Kids").
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just me more most my myself no nor not now of off on
    once only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves""".split()
)
_ASIN_IN_LITERAL = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.json", f"{stem}.json.gz"):
        if (folder / name).exists():
            return folder / name
    raise DataError(f"{folder / (stem + '.json')}: file not found (nor {stem}.json.gz)")


def _lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                yield number, line
    except UnicodeDecodeError:
        raise DataError(f"{path}, line {number + 1}: not UTF-8 text") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot be read ({err})") from None


def read_reviews(path: Path) -> pl.DataFrame:
    """user_id, item_id, timestamp (ms) per review, in file order."""
    users, items, times = [], [], []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            review = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not a JSON object ({err.msg})") from None
        if not isinstance(review, dict):
            raise DataError(
                f"{path}, line {number}: expected a JSON object, got {type(review).__name__}"
            )
        for field in ("reviewerID", "asin", "unixReviewTime"):
            if field not in review:
                raise DataError(f"{path}, line {number}: no '{field}' field")
        if not isinstance(review["unixReviewTime"], int | float):
            raise DataError(
                f"{path}, line {number}, field 'unixReviewTime': expected seconds, "
                f"got {review['unixReviewTime']!r}"
            )
        users.append(str(review["reviewerID"]))
        items.append(str(review["asin"]))
        times.append(int(review["unixReviewTime"]) * 1000)
    if not users:
        raise DataError(f"{path}: no reviews (expected one JSON object a line)")
    return pl.DataFrame({"user_id": users, "item_id": items, "timestamp": times})


def read_categories(path: Path, wanted: set[str]) -> dict[str, list[list[str]]]:
    """asin -> category paths for the asins in `wanted` (other lines are not parsed)."""
    found = {}
    for number, line in _lines(path):
        match = _ASIN_IN_LITERAL.search(line)
        if match is None and line.strip():
            raise DataError(f"{path}, line {number}: no 'asin' in this metadata line")
        if match is None or match.group(1) not in wanted:
            continue
        try:
            meta = ast.literal_eval(line.strip())  # a Python literal, never code
        except (ValueError, SyntaxError) as err:
            raise DataError(
                f"{path}, line {number}: not a Python dict literal ({type(err).__name__}: {err})"
            ) from None
        if not isinstance(meta, dict):
            raise DataError(f"{path}, line {number}: expected a dict, got {type(meta).__name__}")
        categories = meta.get("categories") or []
        if not categories:
            raise DataError(
                f"{path}, line {number}: item {meta.get('asin')} has no categories "
                "(its queries are made from them)"
            )
        found[str(meta["asin"])] = [list(map(str, p)) for p in categories]
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(
            f"{path}: no metadata line for {len(missing)} reviewed item(s), e.g. {missing[0]} "
            "(their queries are made from their categories)"
        )
    return found


def path_query(levels: list[str]) -> str:
    """One category path -> its query: letters only, lowercase, no stop words, each word
    once, at its deepest occurrence ("Camera, Photo > Digital Camera Lenses" ->
    "photo digital camera lenses")."""
    text = " ".join(levels).lower()
    # as in Ai et al.'s released queries: a possessive goes ("children's" -> "children"),
    # a hyphenated word stays one word ("hip-hop" -> "hiphop")
    text = re.sub(r"'s\b", "", text).replace("-", "").replace("'", "")
    words = [w for w in re.sub(r"[^a-z]+", " ", text).split() if w not in STOP_WORDS]
    last = {w: i for i, w in enumerate(words)}
    return " ".join(w for i, w in enumerate(words) if last[w] == i)


def generated_queries(categories: dict[str, list[list[str]]], seed: int) -> dict[str, str]:
    """asin -> the query its purchases are searched with: one of the item's path
    queries, drawn once per item (in asin order) from `seed`."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for asin in sorted(categories):
        options = list(dict.fromkeys(q for q in map(path_query, categories[asin]) if q))
        if not options:
            raise DataError(
                f"metadata of item {asin}: its categories {categories[asin]} give no query "
                "words (all stop words or no letters)"
            )
        chosen[asin] = options[int(rng.integers(len(options)))]
    return chosen


def read_released_queries(
    folder: Path, category: str, seed: int = 0
) -> tuple[list[str], dict[tuple[str, str], int]]:
    """Ai et al.'s files: the query texts (index = id) and (reviewerID, asin) -> query
    id. A pair the qrels list under several queries (one per category path) gets one of
    them, drawn from `seed` as generated queries are."""
    text_path = folder / f"{category}__query_text.txt.gz"
    if not text_path.exists():
        raise DataError(f"{text_path}: file not found (dataset.queries=ai_released reads it)")
    queries = [line.strip() for _, line in _lines(text_path)]
    listed: dict[tuple[str, str], list[int]] = {}
    qrels = [folder / f"{category}__{part}.qrels.gz" for part in ("train", "test")]
    if not any(p.exists() for p in qrels):
        raise DataError(f"{qrels[0]}: file not found (nor {qrels[1].name})")
    for path in (p for p in qrels if p.exists()):
        for number, line in _lines(path):
            fields = line.split()
            if not fields:
                continue
            user, _, query = fields[0].rpartition("_")
            if len(fields) != 4 or not user or not query.isdigit():
                raise DataError(
                    f"{path}, line {number}: expected '<reviewerID>_<query id> 0 <asin> 1', "
                    f"got {line.strip()!r}"
                )
            if int(query) >= len(queries):
                raise DataError(
                    f"{path}, line {number}: query id {query} is not a line of {text_path.name} "
                    f"({len(queries)} lines)"
                )
            options = listed.setdefault((user, fields[2]), [])
            if int(query) not in options:
                options.append(int(query))
    rng = np.random.default_rng(seed)
    assigned = {pair: options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
                for pair, options in sorted(listed.items())}  # fmt: skip
    return queries, assigned


def read_amazon(folder: str | Path, category: str, queries: str = "generated",
                query_seed: int = 0) -> KuaiSARRaw:  # fmt: skip
    """The raw tables for one Amazon category (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"dataset folder {folder} does not exist (set dataset.path to the Amazon folder)"
        )
    if queries not in QUERY_MODES:
        raise DataError(f"dataset.queries must be one of {list(QUERY_MODES)}, got {queries!r}")
    reviews = read_reviews(_find(folder, f"reviews_{category}_5"))
    # (user, time, asin): the documented order of same-day purchases, in both tasks
    reviews = reviews.unique(["user_id", "item_id", "timestamp"], maintain_order=True)
    reviews = reviews.sort("user_id", "timestamp", "item_id").with_row_index("row")
    if queries == "generated":
        categories = read_categories(_find(folder, f"meta_{category}"), set(reviews["item_id"]))
        per_item = generated_queries(categories, query_seed)
        text = reviews["item_id"].replace_strict(per_item, return_dtype=pl.String)
    else:
        released, assigned = read_released_queries(folder, category, query_seed)
        pairs = zip(reviews["user_id"].to_list(), reviews["item_id"].to_list())
        text = pl.Series([released[assigned[p]] if p in assigned else None for p in pairs])
    vocabulary = sorted({w for q in text.drop_nulls().to_list() for w in q.split()})
    word_id = {w: i + 1 for i, w in enumerate(vocabulary)}
    keyword = pl.Series([None if q is None else [word_id[w] for w in q.split()] for q in text.to_list()],
                        dtype=pl.List(pl.Int64))  # fmt: skip
    rec = reviews.select(
        "row",
        "user_id",
        "item_id",
        "timestamp",
        click=pl.lit(1, pl.Int8),
        search=pl.lit(0, pl.Int8),
        like=pl.lit(0, pl.Int8),  # Amazon has no feedback beside the purchase
        follow=pl.lit(0, pl.Int8),
        forward=pl.lit(0, pl.Int8),
    )
    # one search session per purchase (purchases without a released query have none)
    search = (
        reviews.with_columns(keyword=keyword)
        .filter(pl.col("keyword").is_not_null())
        .select(
            "row",
            session_id=pl.col("row").cast(pl.Int64),
            user_id="user_id",
            item_id="item_id",
            keyword="keyword",
            timestamp="timestamp",
            clicked=pl.lit(1, pl.Int8),
            item_type=pl.lit("PRODUCT"),
            search_source=pl.lit("GENERATED"),
        )
    )
    if search.height == 0:
        raise DataError(
            f"{folder}: no purchase has a query (check dataset.queries and the qrels files)"
        )
    users = reviews.select("user_id").unique(maintain_order=True)
    items = (
        reviews.select("item_id")
        .unique(maintain_order=True)
        .with_columns(caption=pl.lit([], dtype=pl.List(pl.Int64)))
    )
    return KuaiSARRaw(rec=rec, search=search, users=users, items=items, social=None)


def source_files(folder: Path, category: str, queries: str) -> list[Path]:
    """The files whose content defines the dataset (the cache key)."""
    names = [f"reviews_{category}_5.json", f"reviews_{category}_5.json.gz"]
    if queries == "generated":
        names += [f"meta_{category}.json", f"meta_{category}.json.gz"]
    else:
        names += [f"{category}__query_text.txt.gz", f"{category}__train.qrels.gz",
                  f"{category}__test.qrels.gz"]  # fmt: skip
    return [folder / n for n in names if (folder / n).exists()]
