"""The topic-only search scorer (sar_exp.tables.search_by_topic): its exact expected
ranks, its topics, and its figures on the embedded data."""

from __future__ import annotations

import numpy as np
import pytest

from sar_exp.tables import search_by_topic
from tests.conftest import TINY


class _View(dict):
    def split(self, task, split):
        assert task == "search"
        return self[split]


def _view() -> _View:
    # words 1-2: topic A, 3-4: topic B; items 1-2 on A, 3-5 on B, item 6 without a caption
    captions = np.array([[0, 0], [1, 2], [2, 0], [3, 4], [4, 0], [3, 0], [0, 0]])
    queries = np.array([[0], [1], [4]])  # query 1 asks for A, query 2 for B
    return _View(
        item_caption_words=captions,
        query_words=queries,
        search_click_item=np.array([6]),  # item 6 was clicked under query 2: topic B
        search_click_query=np.array([2]),
        test={
            "query": np.array([1, 2]),
            "item": np.array([1, 6]),
            # case 1: one of three negatives on A; case 2: all three on B
            "negatives": np.array([[2, 3, 5], [3, 4, 5]]),
        },
    )


def test_topics_come_from_captions_and_the_queries_an_item_was_clicked_under():
    item_topic, query_topic = search_by_topic.topics(_view())
    assert item_topic[1] == item_topic[2] == query_topic[1]
    assert item_topic[3] == item_topic[4] == item_topic[5] == item_topic[6] == query_topic[2]
    assert item_topic[1] != item_topic[3] and item_topic[0] == search_by_topic.UNKNOWN


def test_the_positive_lies_uniformly_among_the_candidates_on_its_topic():
    m = search_by_topic.topic_only(_view())
    # case 1: rank 1 or 2 (each 1/2); case 2: rank 1-4 (each 1/4)
    assert m["hr@1"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["hr@5"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx(((1 + 1 / 2) / 2 + (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4) / 2)
    assert m["positive_on_topic"] == 1.0 and m["negatives_on_topic"] == 2.0


def test_on_the_embedded_data_the_query_topic_alone_puts_the_click_in_the_top_ten(
    capsys, cache_dir
):
    """The generator shows and clicks only items of the query's topic, and 99 uniform
    candidates hold about 5 of them with the default 20 topics: the scorer's HR@10 is
    near 1 before any user or item signal."""
    data = {**TINY, "n_topics": 20}
    search_by_topic.main([*(f"+dataset.synthetic.{k}={v}" for k, v in data.items()),
                          f"paths.cache_dir={cache_dir}"])  # fmt: skip
    test = capsys.readouterr().out.splitlines()[-2:]
    assert "the clicked item on the query's topic in 100.0%" in test[0]
    hr10 = float(test[1].split("HR@10 ")[1].split(",")[0])
    assert hr10 > 0.95


def test_it_refuses_a_dataset_whose_topics_are_unknown(capsys):
    with pytest.raises(SystemExit):
        search_by_topic.main(["dataset=kuaisar"])
    assert "topics are known on the embedded data only" in capsys.readouterr().err
