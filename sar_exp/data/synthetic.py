"""Seeded generator of a KuaiSAR-format folder with planted search-to-rec effects.

The default run goes through the real KuaiSAR reader: this module only writes the five
CSVs (same columns, same value formats) and `read_kuaisar` loads them. Planted effects,
each with a knob (README, "The embedded dataset"):

* style: every item has a query-independent style; each user prefers one style, and a
  matching style raises the click probability in BOTH domains (`style_weight`).
* topics: rec interests and search interests are topic mixtures that only partly
  overlap (`interest_overlap`); a query names its session's topic.
* transitions: a search on a topic raises that topic's share in the rec exposures of the
  next `transition_window_hours` (`transition_boost`); a rec click triggers a related
  search with probability `trigger_prob`.
* skipped exposures: each rec request also shows about `skipped_per_request` items of
  any topic, which the user skips unless the click model above would click them (those
  are not written), so a rec impression's click depends on the user's interests and
  style as a CTR model can learn it (`task=ctr`; QueryRec's Table 4).
* search appeal: some items are clicked more than others whenever a search shows them
  (`search_appeal_weight`, an item's appeal times it on the search click's logit), so a
  query's shown-but-unclicked results point at its topic's appealing items (what
  QueryRec's diffusion step can find; on under `task=ctr` only, like skipped exposures).
* feedback beside the click: about 10% of clicks are liked, and a clicked item is
  followed more often when its style matches and forwarded more often when it is of
  the user's topics (the other tasks of PLE, a CTR baseline).
* shown-but-not-clicked search results, sessions without a click (`search_click_bias`),
  search-only items of types the recommender never shows (`search_only_share`), and
  rec items sent together sharing one timestamp (`max_exposure_size`).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl

from sar_exp.errors import ConfigError

# The planted truth, by the attribute that carries it: an item's query-independent style
# shows through its author (80% of an author's items share the author's style), and a
# query names its session's topic, the item's first-level category.
STYLE_ATTRIBUTE = "author_id"
TOPIC_ATTRIBUTE = "first_level_category_id"

START_MS = 1_684_737_000_000  # 2023-05-22 14:30 Beijing time, as in KuaiSAR_v2
DAY_MS = 86_400_000
REC_ITEM_TYPES = np.array(["VIDEO", "IMAGE_ATLAS"])
SEARCH_ONLY_TYPES = np.array(["LIVE", "USER", "COMMODITY", "MUSIC", "ADVERT"])
SOURCES = np.array(["USER_INPUT", "HISTORY", "SUGGESTION"])
TRIGGERED_SOURCE = "RECOMMEND_QUERY"


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 400
    n_items: int = 2_000  # items the recommender can show (VIDEO / IMAGE_ATLAS)
    n_topics: int = 20
    n_styles: int = 6
    words_per_topic: int = 12
    days: int = 19
    exposures_per_user: float = 25.0  # rec requests; each sends 1..max_exposure_size items
    max_exposure_size: int = 4
    sessions_per_user: float = 20.0
    shown_per_session: int = 8
    search_only_share: float = 0.3  # share of shown search results of search-only types
    style_weight: float = 2.0
    topic_weight: float = 1.5
    interest_overlap: float = 0.5
    transition_boost: float = 0.4
    transition_window_hours: float = 6.0
    trigger_prob: float = 0.3
    search_click_bias: float = -2.9
    rec_click_bias: float = -1.4
    # Poisson mean of the extra items a rec request shows that the user skips; drawn
    # from their own random stream, so every click and every other table is the same.
    # conf/dataset/synthetic.yaml sets 2.0 under task=ctr and keeps 0 for ranking: the
    # skipped items would join the rec item pools of the k-core protocols (sesrec,
    # unisar_kuaisar) and so move their stored negatives
    skipped_per_request: float = 0.0
    # weight of an item's appeal (standard normal, own random stream) on the search click
    # logit; 0 keeps every search click as it was (conf: 1.5 under task=ctr, else 0)
    search_appeal_weight: float = 0.0
    caption_words: int = 3  # words of an item's caption, from its topic's vocabulary
    seed: int = 0


PRESETS: dict[str, dict] = {
    "small": {},
    # the sizes of UniSAR's speed reference (its official code: about 140 rec rows/s on
    # 2 CPU cores at batch 1024): 800 users, 2,500 items, 50-word captions
    "unisar_bench": dict(n_users=800, n_items=2_500, caption_words=50),
    # about 25k users, 14.6M rec rows and 5M search rows, like KuaiSAR_v2
    "kuaisar_scale": dict(
        n_users=25_877,
        n_items=200_000,
        n_topics=60,
        words_per_topic=400,
        exposures_per_user=225.0,
        max_exposure_size=4,
        sessions_per_user=24.5,
        shown_per_session=8,
    ),
}


def check_settings(settings: dict) -> None:
    """dataset.synthetic: a preset and any SyntheticConfig field; anything else is named."""
    preset = settings.get("preset", "small")
    if preset not in PRESETS:
        raise ConfigError(
            f"dataset.synthetic.preset={preset} is not a preset; choose one of {sorted(PRESETS)}"
        )
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(settings) - known - {"preset"})
    if unknown:
        raise ConfigError(
            f"dataset.synthetic.{unknown[0]} is not a setting of the synthetic generator; "
            f"the settings are: {', '.join(sorted(known))}"
        )


def make_config(preset: str = "small", **overrides) -> SyntheticConfig:
    check_settings({"preset": preset, **overrides})
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return SyntheticConfig(**values)


def _poisson_counts(rng, n, mean, minimum=1):
    return np.maximum(rng.poisson(mean, n), minimum)


def _sorted_times(rng, owners, days):
    """Uniform times per event, sorted within each owner (owners ascending)."""
    times = rng.integers(0, days * DAY_MS, owners.size)
    order = np.lexsort((times, owners))
    return times[order]


def _latest_before(owner_a, time_a, owner_b, time_b):
    """For each event b, the index of the latest event a of the same owner with time_a < time_b (-1 if none)."""
    key_a = owner_a.astype(np.int64) * (1 << 40) + time_a
    key_b = owner_b.astype(np.int64) * (1 << 40) + time_b
    pos = np.searchsorted(key_a, key_b, side="left") - 1
    ok = pos >= 0
    ok[ok] = owner_a[pos[ok]] == owner_b[ok]
    return np.where(ok, pos, -1)


class _Catalogue:
    """Items grouped by topic, sampled by popularity within a topic."""

    def __init__(self, rng, topics, first_id):
        self.ids = np.arange(first_id, first_id + topics.size)
        order = np.argsort(topics, kind="stable")
        self.ids, self.topics = self.ids[order], topics[order]
        popularity = rng.pareto(1.2, topics.size) + 1.0
        self.cum = np.cumsum(popularity)
        n_topics = int(topics.max()) + 1 if topics.size else 0
        bounds = np.searchsorted(self.topics, np.arange(n_topics + 1))
        self.lo = np.concatenate([[0.0], self.cum])[bounds[:-1]]
        self.hi = np.concatenate([[0.0], self.cum])[bounds[1:]]

    def sample(self, rng, topics):
        u = self.lo[topics] + rng.random(topics.size) * (self.hi[topics] - self.lo[topics])
        pos = np.minimum(np.searchsorted(self.cum, u, side="right"), self.ids.size - 1)
        return self.ids[pos]


def generate(cfg: SyntheticConfig) -> dict[str, pl.DataFrame]:
    """All five KuaiSAR tables as polars frames (not yet written)."""
    rng = np.random.default_rng(cfg.seed)
    n_search_only = max(1, int(cfg.n_items * cfg.search_only_share))
    n_all = cfg.n_items + n_search_only

    # Items (dense ids 0..n_all-1; search-only ones last). Authors carry a style, so the
    # style is partly visible through the author attribute, as real creators have one.
    item_topic = rng.integers(0, cfg.n_topics, n_all)
    n_authors = max(cfg.n_styles, n_all // 8)
    author_style = rng.integers(0, cfg.n_styles, n_authors)
    item_author = rng.integers(0, n_authors, n_all)
    item_style = np.where(
        rng.random(n_all) < 0.8, author_style[item_author], rng.integers(0, cfg.n_styles, n_all)
    )
    rec_items = _Catalogue(rng, item_topic[: cfg.n_items], 0)
    search_only_items = _Catalogue(rng, item_topic[cfg.n_items :], cfg.n_items)
    topic_words = 1 + np.arange(cfg.n_topics * cfg.words_per_topic).reshape(cfg.n_topics, -1)

    # Users: rec interests, partly overlapping search interests, a preferred style.
    n_interests = 3
    user_rec_topics = rng.integers(0, cfg.n_topics, (cfg.n_users, n_interests))
    shared = rng.random((cfg.n_users, n_interests)) < cfg.interest_overlap
    user_search_topics = np.where(
        shared, user_rec_topics, rng.integers(0, cfg.n_topics, (cfg.n_users, n_interests))
    )
    user_style = rng.integers(0, cfg.n_styles, cfg.n_users)

    # Search sessions (times sorted per user).
    n_sessions = _poisson_counts(rng, cfg.n_users, cfg.sessions_per_user)
    s_user = np.repeat(np.arange(cfg.n_users), n_sessions)
    s_time = _sorted_times(rng, s_user, cfg.days)
    s_topic = user_search_topics[s_user, rng.integers(0, n_interests, s_user.size)]
    s_triggered = rng.random(s_user.size) < cfg.trigger_prob

    # Rec exposures: requests of 1..max_exposure_size items sharing one timestamp.
    n_requests = _poisson_counts(rng, cfg.n_users, cfg.exposures_per_user)
    q_user = np.repeat(np.arange(cfg.n_users), n_requests)
    q_time = _sorted_times(rng, q_user, cfg.days)
    q_size = rng.integers(1, cfg.max_exposure_size + 1, q_user.size)
    r_user = np.repeat(q_user, q_size)
    r_time = np.repeat(q_time, q_size)
    r_topic = user_rec_topics[r_user, rng.integers(0, n_interests, r_user.size)]
    explore = rng.random(r_user.size) < 0.15
    r_topic = np.where(explore, rng.integers(0, cfg.n_topics, r_user.size), r_topic)
    # Transition search -> rec: a recent spontaneous search pulls exposures to its topic.
    spontaneous = np.flatnonzero(~s_triggered)
    last = _latest_before(s_user[spontaneous], s_time[spontaneous], r_user, r_time)
    window = cfg.transition_window_hours * 3_600_000
    has_recent = last >= 0
    recent_time = np.where(has_recent, s_time[spontaneous[np.maximum(last, 0)]], -np.inf)
    boosted = (
        has_recent
        & (r_time - recent_time <= window)
        & (rng.random(r_user.size) < cfg.transition_boost)
    )
    r_topic = np.where(boosted, s_topic[spontaneous[np.maximum(last, 0)]], r_topic)
    r_item = rec_items.sample(rng, r_topic)
    in_interest = (user_rec_topics[r_user] == r_topic[:, None]).any(axis=1)
    in_search_interest = (user_search_topics[r_user] == r_topic[:, None]).any(axis=1)
    logit = (
        cfg.rec_click_bias
        + cfg.topic_weight * in_interest
        + 0.5 * cfg.topic_weight * (boosted & in_search_interest)
        + cfg.style_weight * (item_style[r_item] == user_style[r_user])
        + rng.normal(0, 0.5, r_user.size)
    )
    r_click = (rng.random(r_user.size) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    skipped = _skipped_exposures(
        cfg, rec_items, q_size, q_user, q_time, r_item, item_topic, item_style,
        user_rec_topics, user_style,
    )  # fmt: skip
    # Feedback beside the click (PLE's other tasks): a clicked item is followed more
    # often when its style matches, forwarded more often when it is of the user's topics.
    # Own stream; no ranking view reads these columns.
    feedback_rng = np.random.default_rng([cfg.seed, 3])
    style_match = item_style[r_item] == user_style[r_user]
    r_feedback = {
        "follow": r_click * (feedback_rng.random(r_user.size) < 0.03 + 0.12 * style_match),
        "forward": r_click * (feedback_rng.random(r_user.size) < 0.02 + 0.08 * in_interest),
    }

    # Transition rec -> search: a triggered session searches the last clicked rec topic.
    clicked = np.flatnonzero(r_click == 1)
    last_click = _latest_before(r_user[clicked], r_time[clicked], s_user, s_time)
    retopic = s_triggered & (last_click >= 0)
    s_topic = np.where(retopic, item_topic[r_item[clicked[np.maximum(last_click, 0)]]], s_topic)
    s_source = np.where(
        retopic, TRIGGERED_SOURCE, SOURCES[rng.choice(3, s_user.size, p=[0.8, 0.12, 0.08])]
    )

    # Queries: 1-3 words of the session topic's vocabulary.
    n_words = rng.integers(1, 4, s_user.size)
    word_slots = rng.integers(0, cfg.words_per_topic, (s_user.size, 3))
    words = topic_words[s_topic[:, None], word_slots]

    # Shown results: items of the session topic, some of search-only types.
    k = cfg.shown_per_session
    sh_session = np.repeat(np.arange(s_user.size), k)
    sh_topic = s_topic[sh_session]
    from_search_only = rng.random(sh_session.size) < cfg.search_only_share
    sh_item = np.where(
        from_search_only, search_only_items.sample(rng, sh_topic), rec_items.sample(rng, sh_topic)
    )
    sh_user = s_user[sh_session]
    # appeal from its own stream: at weight 0 every draw of `rng` stays as it was
    item_appeal = np.random.default_rng([cfg.seed, 2]).normal(0, 1, n_all)
    sh_logit = (
        cfg.search_click_bias
        + cfg.style_weight * (item_style[sh_item] == user_style[sh_user])
        + cfg.search_appeal_weight * item_appeal[sh_item]
        + rng.normal(0, 0.5, sh_session.size)
    )
    sh_click = (rng.random(sh_session.size) < 1 / (1 + np.exp(-sh_logit))).astype(np.int8)

    return _as_kuaisar_tables(
        cfg, rng, n_all, item_topic, item_author, topic_words,
        r_user, r_item, r_time, r_click,
        s_user, s_time, s_source, words, n_words,
        sh_session, sh_item, sh_click, skipped, r_feedback,
    )  # fmt: skip


def _skipped_exposures(cfg, rec_items, q_size, q_user, q_time, r_item, item_topic, item_style,
                       user_rec_topics, user_style) -> dict[str, np.ndarray]:  # fmt: skip
    """Items a request also showed and the user skipped: of a uniformly drawn topic (the
    recommender exploring), by popularity within it as every exposure is (so an item's
    popularity tells a skipped one from a shown one no more than its topic does), not
    already in the request, each kept when the rec click model (interest and style, no
    transition) draws no click. A click then depends on the user's preferences among
    everything shown, which a CTR model can learn; the ones the model would have clicked
    are not written, so every click stays as the ranking views know it. Its own random
    stream keeps every other draw unchanged."""
    rng = np.random.default_rng([cfg.seed, 1])
    count = rng.poisson(cfg.skipped_per_request, q_user.size)
    request = np.repeat(np.arange(q_user.size), count)
    user, time = q_user[request], q_time[request]
    item = rec_items.sample(rng, rng.integers(0, cfg.n_topics, user.size))
    in_interest = (user_rec_topics[user] == item_topic[item][:, None]).any(axis=1)
    logit = (
        cfg.rec_click_bias
        + cfg.topic_weight * in_interest
        + cfg.style_weight * (item_style[item] == user_style[user])
        + rng.normal(0, 0.5, user.size)
    )
    skip = rng.random(user.size) >= 1 / (1 + np.exp(-logit))
    # an item the request already holds is not shown twice
    shown_keys = np.repeat(np.arange(q_user.size), q_size).astype(np.int64) << 32 | r_item
    skip &= ~np.isin(request.astype(np.int64) << 32 | item, shown_keys)
    first = np.unique(request.astype(np.int64) << 32 | item, return_index=True)[1]
    once = np.zeros(user.size, bool)
    once[first] = True
    skip &= once
    return {
        "user": user[skip],
        "item": item[skip],
        "time": time[skip],
        "duration_ms": rng.integers(5_000, 60_000, user.size)[skip],
        "playing_time": rng.integers(0, 3_000, user.size)[skip],  # skipped: short views
    }


def _beijing_time(ms: pl.Expr) -> pl.Expr:
    return pl.from_epoch(ms, time_unit="ms").dt.offset_by("8h").dt.strftime("%Y-%m-%d %H:%M:%S")


def _list_string(column: str) -> pl.Expr:
    return pl.lit("[") + pl.col(column).cast(pl.List(pl.String)).list.join(", ") + pl.lit("]")


def _as_kuaisar_tables(
    cfg, rng, n_all, item_topic, item_author, topic_words,
    r_user, r_item, r_time, r_click,
    s_user, s_time, s_source, words, n_words,
    sh_session, sh_item, sh_click, skipped, r_feedback,
):  # fmt: skip
    raw_user = 10_000_000 + 13 * rng.permutation(cfg.n_users)
    raw_item = 103_656_000_000 + 1_009 * rng.permutation(n_all)
    raw_session = 5_000_000 + 7 * rng.permutation(s_user.size)

    rec = pl.DataFrame(
        {
            "user_id": raw_user[r_user],
            "item_id": raw_item[r_item],
            "duration_ms": rng.integers(5_000, 60_000, r_user.size),
            "playing_time": rng.integers(0, 60_000, r_user.size),
            "timestamp": (START_MS + r_time).astype(np.float64),  # float ms, like the release
            "forward": r_feedback["forward"].astype(np.int8),
            "like": (r_click * (rng.random(r_user.size) < 0.1)).astype(np.int8),
            "follow": r_feedback["follow"].astype(np.int8),
            "search_item_related": np.zeros(r_user.size, np.int8),
            "search": (rng.random(r_user.size) < 0.02).astype(np.int8),
            "click": r_click,
        }
    )
    n_skipped = skipped["user"].size
    no = np.zeros(n_skipped, np.int8)
    rec_skipped = pl.DataFrame(
        {
            "user_id": raw_user[skipped["user"]],
            "item_id": raw_item[skipped["item"]],
            "duration_ms": skipped["duration_ms"],
            "playing_time": skipped["playing_time"],
            "timestamp": (START_MS + skipped["time"]).astype(np.float64),
            **dict.fromkeys(["forward", "like", "follow", "search_item_related", "search"], no),
            "click": no,
        }
    )
    # after the drawn exposures, so their rows keep their order within a request
    rec = pl.concat([rec, rec_skipped]).with_columns(
        time=_beijing_time(pl.col("timestamp").cast(pl.Int64))
    )

    query_words = [w[:n].tolist() for w, n in zip(words, n_words)]
    sessions = pl.DataFrame(
        {
            "session": np.arange(s_user.size),
            "keyword": query_words,
            "search_session_id": raw_session,
            "user_id": raw_user[s_user],
            "search_session_timestamp": (START_MS + s_time).astype(np.float64),
            "search_source": s_source,
        }
    ).with_columns(keyword=_list_string("keyword"))
    item_type = np.where(
        np.arange(n_all) < cfg.n_items,
        REC_ITEM_TYPES[rng.integers(0, 2, n_all)],
        SEARCH_ONLY_TYPES[rng.integers(0, SEARCH_ONLY_TYPES.size, n_all)],
    )
    search = (
        pl.DataFrame({"session": sh_session, "item": sh_item, "click_cnt": sh_click})
        .join(sessions, on="session", how="left", maintain_order="left")
        .with_columns(
            item_id=pl.Series(raw_item[sh_item]),
            item_type=pl.Series(item_type[sh_item]),
            search_session_time=_beijing_time(pl.col("search_session_timestamp").cast(pl.Int64)),
        )
        .select(
            "keyword",
            "item_id",
            "click_cnt",
            "search_session_id",
            "item_type",
            "user_id",
            "search_session_timestamp",
            "search_source",
            "search_session_time",
        )  # fmt: skip
    )

    # activity levels count the drawn exposures, so they do not move with the skipped ones
    rec_counts = np.bincount(r_user, minlength=cfg.n_users)
    search_counts = np.bincount(s_user, minlength=cfg.n_users)
    users = pl.DataFrame(
        {
            "user_id": raw_user,
            "search_active_level": np.searchsorted(
                np.quantile(search_counts, [0.25, 0.5, 0.75]), search_counts
            )
            + 1,
            "rec_active_level": np.searchsorted(
                np.quantile(rec_counts, [0.25, 0.5, 0.75]), rec_counts
            )
            + 1,
            "onehot_feat1": rng.integers(0, 8, cfg.n_users),
            "onehot_feat2": rng.integers(0, 4, cfg.n_users),
        }
    )

    caption_words = topic_words[
        item_topic[:, None], rng.integers(0, cfg.words_per_topic, (n_all, cfg.caption_words))
    ]
    second = item_topic * 4 + rng.integers(0, 4, n_all)
    items = pl.DataFrame(
        {
            "item_id": raw_item,
            "caption": [c.tolist() for c in caption_words],
            "author_id": 700_000 + item_author,
            "item_type": item_type,
            "upload_time": np.full(n_all, "2023-05-01"),
            "upload_type": rng.choice(["ShortImport", "PictureSet", "LongImport"], n_all),
            "music_id": rng.integers(1, 500, n_all),
            "first_level_category_id": 1 + item_topic,
            "first_level_category_name": [f"类别{t}" for t in item_topic],
            "second_level_category_id": 1_000 + second,
            "second_level_category_name": [f"子类{s}" for s in second],
            "third_level_category_id": np.zeros(n_all, np.int64),
            "third_level_category_name": np.full(n_all, "空"),
            "fourth_level_category_id": np.zeros(n_all, np.int64),
            "fourth_level_category_name": np.full(n_all, "空"),
            "first_level_category_name_en": [f"topic{t}" for t in item_topic],
            "second_level_category_name_en": [f"subtopic{s}" for s in second],
            "third_level_category_name_en": np.full(n_all, "empty"),
            "fourth_level_category_name_en": np.full(n_all, "empty"),
        }
    ).with_columns(caption=_list_string("caption"))
    # about 1 caption in 10 is missing, written as the release writes it
    items = items.with_columns(
        caption=pl.when(pl.Series(rng.random(n_all) < 0.1)).then(pl.lit("0")).otherwise("caption")
    )

    follows = rng.integers(0, cfg.n_users, (cfg.n_users * 2, 2))
    social = pl.DataFrame(
        {"user_id": raw_user[follows[:, 0]], "user_follow_id": raw_user[follows[:, 1]]}
    )
    return {
        "rec_inter": rec,
        "src_inter": search,
        "user_features": users,
        "item_features": items,
        "social_network": social,
    }


def dataset_folder(cache_dir: str | Path, preset: str, cfg: SyntheticConfig) -> Path:
    """Where the generated folder for `cfg` lives: keyed by the config and this
    module's code, so a changed generator writes a new folder."""
    from sar_exp.data.cache import cache_key, code_fingerprint

    key = cache_key(repr(cfg), code_fingerprint(sys.modules[__name__]))
    return Path(cache_dir) / f"synthetic-{preset}-{key}"


def write_kuaisar_folder(cfg: SyntheticConfig, folder: str | Path) -> Path:
    """Write the five CSVs into `folder` once, atomically (see `cache.cached_folder`)."""
    from sar_exp.data.cache import cached_folder
    from sar_exp.data.progress import stage

    def build(tmp: Path) -> None:
        with stage(f"generating the synthetic KuaiSAR-format dataset ({cfg.n_users:,} users)"):
            tables = generate(cfg)
        for name, frame in tables.items():
            frame.write_csv(tmp / f"{name}.csv", float_precision=1)
        (tmp / "synthetic_config.txt").write_text(repr(asdict(cfg)) + "\n")

    folder = Path(folder)
    return cached_folder(folder.parent, folder.name, build)
