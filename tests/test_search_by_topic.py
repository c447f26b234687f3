"""The scorers without a user of sar_exp.tables.search_by_topic: exact expected ranks
under random tie order, the topics they read, and their figures on the embedded data."""

from __future__ import annotations

import numpy as np
import pytest

from sar_exp.errors import SarExpError
from sar_exp.tables import search_by_topic
from tests.conftest import TINY


class _View(dict):
    def split(self, task, split):
        assert task == "search"
        return self[split]


def _view() -> _View:
    # topic (attribute column 1): items 1-2 on 7, items 3-6 on 9; words 1-2 are topic 7's,
    # 3-4 topic 9's; item 6 has no caption; query 3's word is in no caption
    attributes = np.array([[0, 0], [5, 7], [5, 7], [5, 9], [5, 9], [5, 9], [5, 9]])
    captions = np.array([[0, 0], [1, 2], [2, 0], [3, 4], [4, 0], [3, 0], [0, 0]])
    return _View(
        item_attributes=attributes,
        item_caption_words=captions,
        query_words=np.array([[0, 0], [1, 0], [4, 3], [8, 0]]),
        train={"item": np.array([2, 2, 3, 6, 6, 6])},  # training search clicks
        test={
            "query": np.array([1, 2, 2, 3]),
            "item": np.array([1, 6, 1, 1]),
            "negatives": np.array([[2, 3, 5], [3, 4, 5], [3, 4, 5], [2, 3, 4]]),
        },
    )


def test_ties_fall_in_random_order():
    # positive 1 ties with two of three negatives: ranks 1-3, each 1/3
    m = search_by_topic.expected_metrics(np.array([1.0]), np.array([[1.0, 0.0, 1.0]]))
    assert m["hr@1"] == pytest.approx(1 / 3) and m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_topics_are_the_items_category_and_the_words_of_their_captions():
    item_topic, query_topic = search_by_topic.topics(_view(), topic_column=1)
    assert item_topic.tolist() == [0, 7, 7, 9, 9, 9, 9]
    assert query_topic.tolist() == [search_by_topic.UNKNOWN, 7, 9, search_by_topic.UNKNOWN]


def test_topic_scorer_ranks_the_positive_among_its_topic_and_clicks_order_within_it():
    out = search_by_topic.scorers(view := _view(), search_by_topic.topics(view, topic_column=1))
    facts = out["facts"]
    assert facts["positive_on_topic"] == 0.5 and facts["query_without_topic"] == 0.25
    topic = out["topic"]
    # case 1: rank 1-2; case 2: rank 1-4 (all three negatives on topic 9); case 3 (item 1
    # is off topic 9): rank 4; case 4 (no topic): rank 1-4
    assert topic["hr@1"] == pytest.approx((1 / 2 + 1 / 4 + 0 + 1 / 4) / 4)
    assert topic["mrr"] == pytest.approx(((1 + 1 / 2) / 2 + 25 / 48 + 1 / 4 + 25 / 48) / 4)
    # with clicks: item 6 (3 clicks) beats 3 (1) and 4, 5 (none) in case 2: rank 1;
    # item 1 (no clicks) falls below item 2 (2 clicks) in case 1: rank 2
    clicks = out["topic, then clicks"]
    assert clicks["hr@1"] == pytest.approx((0 + 1 + 0 + 1 / 4) / 4)


def test_clicks_order_candidates_within_the_querys_topic_only():
    view = _view()
    # query 4's first word is in no caption, its second is topic 7's
    view["query_words"] = np.vstack([view["query_words"], [[8, 1]]])
    # item 1 (topic 7, no clicks) against item 6 (topic 9, 3 clicks), 3 (1 click) and 4
    view["test"] = {
        "query": np.array([4]),
        "item": np.array([1]),
        "negatives": np.array([[6, 3, 4]]),
    }
    _, query_topic = search_by_topic.topics(view, topic_column=1)
    assert query_topic[4] == 7
    clicks = search_by_topic.scorers(view, search_by_topic.topics(view, topic_column=1))[
        "topic, then clicks"
    ]
    assert clicks["hr@1"] == 1.0 and clicks["mrr"] == 1.0


def test_it_refuses_captions_that_mix_topics():
    view = _view()
    view["item_caption_words"][3] = [1, 4]  # word 1 (topic 7) in a topic-9 item's caption
    with pytest.raises(SarExpError, match="several topics"):
        search_by_topic.topics(view, topic_column=1)


def test_on_the_embedded_data_topic_and_popularity_decide_search(capsys, cache_dir):
    """The generator shows and clicks only items of the query's topic, drawn by their
    popularity within it, and 99 uniform candidates hold about 5 of that topic (99/20)
    with the default 20 topics: the query's topic puts the click in the top ten, and ordering the
    topic's items by training clicks lifts NDCG@5 by far, with no user at all."""
    data = {**TINY, "n_topics": 20}
    search_by_topic.main([*(f"+dataset.synthetic.{k}={v}" for k, v in data.items()),
                          f"paths.cache_dir={cache_dir}"])  # fmt: skip
    facts, topic, clicks = capsys.readouterr().out.splitlines()[-3:]
    assert "the clicked item on the query's topic in 100.0%" in facts

    def figure(line, name):
        return float(line.split(f"{name} ")[1].split(",")[0])

    assert figure(topic, "HR@10") > 0.95
    assert figure(clicks, "NDCG@5") > figure(topic, "NDCG@5") + 0.1


@pytest.mark.parametrize(
    "overrides",
    [["dataset=kuaisar", "dataset.path=/nowhere"], ["dataset.item_attributes=[author_id]"]],
)
def test_it_refuses_data_whose_topics_are_unknown(capsys, overrides):
    with pytest.raises(SystemExit) as exit_info:
        search_by_topic.main(overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "topics are known on the embedded data only" in err
