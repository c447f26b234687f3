"""How much of a search test case topic matching alone decides, on the embedded data.

    python -m sar_exp.tables.search_by_topic [Hydra overrides]

The generator draws a search session's query words and every item it shows from one
topic, and each topic owns its own words. A scorer that knows only which candidates
share the query's topic, with no user and nothing about an item beyond its topic, puts
the clicked item uniformly among those candidates; its expected metrics, computed
exactly, are what topic matching alone is worth. A second scorer orders the on-topic
candidates by their training search clicks: what topic matching and the items'
popularity are worth together, still without a user. (Both break ties in random order,
unlike the framework's positive_rank, which counts a tie against the positive: a
model's scores tie only by accident, these by design.) A search model's place against
them says what it has learned; they explain UniSAR's Table 4 on these data (README,
UniSAR).

An item's topic is its first-level category (the generator's truth, an item attribute
of the embedded data); a query's is that of its words, read off the captions (an
item's caption is words of its topic). A query none of whose words is in any caption
has no topic, and its cases score every candidate alike (reported).

Defaults: UniSAR's table protocol (`protocol=unisar_kuaisar`, both tasks held out)."""

from __future__ import annotations

import sys

import numpy as np
import torch

from sar_exp.data.synthetic import TOPIC_ATTRIBUTE
from sar_exp.errors import SarExpError
from sar_exp.metrics.ranking import metrics_from_ranks

DEFAULTS = ["protocol=unisar_kuaisar", "dataset.protocol.evaluated_tasks=[rec,search]"]
UNKNOWN = -1


def topics(view, topic_column: int) -> tuple[np.ndarray, np.ndarray]:
    """(item topic, query topic) arrays; a query topic is UNKNOWN where no word of the
    query is in a caption. Refuses captions that mix topics (not the embedded data's)."""
    item_topic = np.asarray(view["item_attributes"])[:, topic_column].astype(np.int64)
    captions = np.asarray(view["item_caption_words"])
    words = captions.ravel()
    word_item_topic = np.repeat(item_topic, captions.shape[1])
    known = words > 0
    word_topic = np.full(int(words.max(initial=0)) + 1, UNKNOWN, np.int64)
    word_topic[words[known]] = word_item_topic[known]
    if (word_topic[words[known]] != word_item_topic[known]).any():
        raise SarExpError("a caption word belongs to items of several topics: topics are "
                          "known on the embedded data only (dataset=synthetic)")  # fmt: skip
    query_words = np.asarray(view["query_words"])
    in_range = (query_words > 0) & (query_words < word_topic.size)
    of_word = np.where(in_range, word_topic[np.where(in_range, query_words, 0)], UNKNOWN)
    first_known = np.argmax(of_word != UNKNOWN, axis=1)
    query_topic = of_word[np.arange(len(of_word)), first_known]
    return item_topic, query_topic


def on_topic(known_topics, candidates: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """[cases, K] bool: candidate shares its case's query topic (never for a query of
    no known topic). `known_topics`: topics(view, topic_column)."""
    item_topic, query_topic = known_topics
    wanted = query_topic[queries][:, None]
    return (item_topic[candidates] == wanted) & (wanted != UNKNOWN)


def training_search_clicks(view, num_items: int) -> np.ndarray:
    """[num_items] each item's clicks in the search task's training split."""
    return np.bincount(view.split("search", "train")["item"], minlength=num_items)


def expected_metrics(positive: np.ndarray, negatives: np.ndarray) -> dict[str, float]:
    """Metrics of scores [cases] and [cases, negatives] when ties fall in random order:
    the positive lies uniformly among the candidates that score as it does."""
    above = (negatives > positive[:, None]).sum(1)
    ties = (negatives == positive[:, None]).sum(1)
    rank_counts = np.zeros(negatives.shape[1] + 1)
    for first, tied in zip(above, ties):
        rank_counts[first : first + tied + 1] += 1.0 / (tied + 1)
    return metrics_from_ranks(torch.from_numpy(rank_counts))


def scorers(view, known_topics, split: str = "test") -> dict[str, dict[str, float]]:
    """Expected metrics on the search task's `split` of two scorers without a user:
    `topic` (1 for a candidate on the query's topic, else 0) and `topic, then clicks`
    (on-topic candidates ordered by their search clicks in the training split, the
    popularity a model can learn from training), with the share of positives on the
    query's topic, the mean number of negatives on it, and the share of cases whose
    query has no known topic (every candidate scores alike for them). `known_topics`:
    topics(view, topic_column), which do not depend on the split."""
    item_topic, query_topic = known_topics
    cases = view.split("search", split)
    candidates = np.concatenate([cases["item"][:, None], cases["negatives"]], axis=1)
    on = on_topic(known_topics, candidates, cases["query"]).astype(np.float64)
    clicks = training_search_clicks(view, item_topic.size)
    # clicks / (1 + max) < 1: a click count orders candidates within the topic only
    by_clicks = on + on * clicks[candidates] / (1.0 + clicks.max(initial=0))
    facts = {"cases": candidates.shape[0], "negatives": candidates.shape[1] - 1,
             "positive_on_topic": float(on[:, 0].mean()),
             "negatives_on_topic": float(on[:, 1:].sum(1).mean()),
             "query_without_topic": float((query_topic[cases["query"]] == UNKNOWN).mean())}  # fmt: skip
    return {
        "facts": facts,
        "topic": expected_metrics(on[:, 0], on[:, 1:]),
        "topic, then clicks": expected_metrics(by_clicks[:, 0], by_clicks[:, 1:]),
    }


def report(view, known_topics, split: str = "test") -> str:
    out = scorers(view, known_topics, split)
    m = out.pop("facts")
    lines = [
        f"search {split}: {m['cases']} cases ({m['query_without_topic']:.1%} with a query of no "
        f"known topic); the clicked item on the query's topic in {m['positive_on_topic']:.1%}; "
        f"{m['negatives_on_topic']:.2f} of {m['negatives']} negatives on it on average"
    ]  # fmt: skip
    for name, metrics in out.items():  # metrics_from_ranks' order: HR@k, NDCG@k, MRR
        lines.append(
            f"  {name + ':':<20}" + ", ".join(f"{k.upper()} {v:.3f}" for k, v in metrics.items())
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    from sar_exp.data.stats import INPUT_ERRORS, compose_datamodule

    overrides = [*DEFAULTS, *(sys.argv[1:] if argv is None else argv)]
    try:
        cfg, datamodule = compose_datamodule(overrides)
        attributes = list(cfg.dataset.item_attributes)
        if cfg.dataset.source != "synthetic" or TOPIC_ATTRIBUTE not in attributes:
            raise SarExpError(
                f"dataset.source={cfg.dataset.source}, dataset.item_attributes={attributes}: "
                f"topics are known on the embedded data only (dataset=synthetic, with "
                f"{TOPIC_ATTRIBUTE} among the item attributes)"
            )
        datamodule.setup("test")
        view = datamodule.view
        known_topics = topics(view, attributes.index(TOPIC_ATTRIBUTE))
        for split in ("val", "test"):
            print(report(view, known_topics, split))
    except INPUT_ERRORS as err:
        print(f"sar_exp.tables.search_by_topic: error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
