"""How much of a search test case the query's topic alone decides, on the embedded data.

    python -m sar_exp.tables.search_by_topic [Hydra overrides]

The generator draws a search session's query words and every item it shows from one
topic, and each topic owns its own words. A scorer that knows only which candidates
share the query's topic (ties in random order, expected metrics computed exactly) is
the ceiling of query-item matching without any user model; a search model's margin
over it is what it learns from the user or the items beyond their topic. It explains
the personalized-search rows of UniSAR's Table 4 on these data (README, UniSAR).

Topics are read off the data, not the generator: the connected components of caption
words (an item's caption is words of its topic), and for items without a caption (the
search-only types) the topic of a query they were clicked under. Candidates whose topic
stays unknown count as off the topic, which can only flatter the scorer.

Defaults: UniSAR's table protocol (`protocol=unisar_kuaisar`, both tasks held out)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from sar_exp.metrics.ranking import metrics_from_ranks

DEFAULTS = ["protocol=unisar_kuaisar", "dataset.protocol.evaluated_tasks=[rec,search]"]
UNKNOWN = -1


def _components(word_rows: np.ndarray) -> dict[int, int]:
    """word id -> a representative of the words that share a caption with it."""
    parent: dict[int, int] = {}

    def find(word: int) -> int:
        while parent.setdefault(word, word) != word:
            parent[word] = parent[parent[word]]
            word = parent[word]
        return word

    for row in word_rows:
        words = [int(w) for w in row if w > 0]
        for word in words[1:]:
            parent[find(word)] = find(words[0])
    return {word: find(word) for word in parent}


def _first_word_topic(word_rows: np.ndarray, topic_of_word: dict[int, int]) -> np.ndarray:
    out = np.full(len(word_rows), UNKNOWN, np.int64)
    for i, row in enumerate(word_rows):
        words = [int(w) for w in row if w > 0 and int(w) in topic_of_word]
        if words:
            out[i] = topic_of_word[words[0]]
    return out


def topics(view) -> tuple[np.ndarray, np.ndarray]:
    """(item topic, query topic) arrays, UNKNOWN where the data do not tell."""
    topic_of_word = _components(np.asarray(view["item_caption_words"]))
    item_topic = _first_word_topic(np.asarray(view["item_caption_words"]), topic_of_word)
    query_topic = _first_word_topic(np.asarray(view["query_words"]), topic_of_word)
    clicked, query = np.asarray(view["search_click_item"]), np.asarray(view["search_click_query"])
    unlabelled = (item_topic[clicked] == UNKNOWN) & (query_topic[query] != UNKNOWN)
    item_topic[clicked[unlabelled]] = query_topic[query[unlabelled]]
    return item_topic, query_topic


def topic_only(view, split: str = "test") -> dict[str, float]:
    """The topic-only scorer's expected metrics on the search task's `split`, with the
    share of positives on the query's topic and the mean number of negatives on it."""
    item_topic, query_topic = topics(view)
    cases = view.split("search", split)
    wanted = query_topic[cases["query"]][:, None]
    on_topic = (item_topic[cases["item"]] == wanted[:, 0]) & (wanted[:, 0] != UNKNOWN)
    negatives_on = ((item_topic[cases["negatives"]] == wanted) & (wanted != UNKNOWN)).sum(1)
    n_negatives = cases["negatives"].shape[1]
    # the positive lies uniformly among the candidates that score as it does
    rank_counts = np.zeros(n_negatives + 1)
    for on, k in zip(on_topic, negatives_on):
        first, ties = (0, k) if on else (k, n_negatives - k)
        rank_counts[first : first + ties + 1] += 1.0 / (ties + 1)
    out = metrics_from_ranks(torch.from_numpy(rank_counts))
    out.update(cases=len(on_topic), positive_on_topic=float(on_topic.mean()),
               negatives_on_topic=float(negatives_on.mean()), negatives=n_negatives)  # fmt: skip
    return out


def report(view, split: str = "test") -> str:
    m = topic_only(view, split)
    return (
        f"search {split}: {m['cases']} cases; the clicked item on the query's topic in "
        f"{m['positive_on_topic']:.1%}; {m['negatives_on_topic']:.2f} of {m['negatives']} "
        f"negatives on it on average\ntopic-only scorer: "
        + ", ".join(f"{k.upper()} {m[k]:.3f}" for k in ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"))
    )  # fmt: skip


def main(argv=None) -> None:
    import hydra
    from hydra import compose, initialize_config_dir

    from sar_exp.errors import SarExpError
    from sar_exp.train import CONFIG_DIR

    root = Path.cwd()
    paths = [f"paths.root_dir={root}", f"paths.cache_dir={root / '.cache' / 'sar_exp'}"]
    overrides = [*DEFAULTS, *paths, *(sys.argv[1:] if argv is None else argv)]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        if cfg.dataset.source != "synthetic":
            raise SarExpError(f"dataset.source={cfg.dataset.source}: topics are known on the "
                              "embedded data only (dataset=synthetic)")  # fmt: skip
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
        datamodule.setup("test")
        for split in ("val", "test"):
            print(report(datamodule.view, split))
    except SarExpError as err:
        print(f"sar_exp: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
