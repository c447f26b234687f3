"""`python -m sar_exp.tables.search_order`: how a model orders the search candidates
(topic first, then by popularity within the topic), on hand-made scores."""

import math

import numpy as np
import pytest

from sar_exp.tables import search_order

# two cases of 5 candidates (the clicked item first); items 1-9, clicks by item id
CANDIDATES = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 5]])
ON_TOPIC = np.array([[True, True, True, False, False], [True, True, True, True, False]])
CLICKS = np.array([0, 30, 20, 10, 50, 60, 5, 40, 30, 20])
RANDOM_WITHIN = (  # the clicked item uniform among 3 and among 4 on-topic candidates
    (1 + 1 / math.log2(3) + 0.5) / 3 + (1 + 1 / math.log2(3) + 0.5 + 1 / math.log2(5)) / 4
) / 2


def test_a_scorer_by_topic_then_popularity_is_recognised():
    scores = ON_TOPIC + CLICKS[CANDIDATES] / 100.0  # case 2's clicked item (5 clicks) is last
    facts = search_order.order_facts(CANDIDATES, scores, ON_TOPIC, CLICKS)
    assert facts["topic_first"] == 1.0
    assert facts["rho_clicks"] == pytest.approx(1.0)
    # case 1: first of its topic; case 2: 4th of 4 on the topic, rank 3 overall
    assert facts["within_ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 2)
    assert facts["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 2)
    assert facts["random_within_ndcg@5"] == pytest.approx(RANDOM_WITHIN)


def test_a_scorer_against_popularity_and_off_topic_has_negative_rho_and_low_topic_first():
    scores = -CLICKS[CANDIDATES] - 100.0 * ON_TOPIC  # off-topic first, unpopular first
    facts = search_order.order_facts(CANDIDATES, scores.astype(float), ON_TOPIC, CLICKS)
    assert facts["topic_first"] == 0.0
    assert facts["rho_clicks"] == pytest.approx(-1.0)
    assert facts["random_within_ndcg@5"] == pytest.approx(RANDOM_WITHIN)


def test_tied_scores_count_half_and_give_no_rank_correlation():
    scores = np.zeros(CANDIDATES.shape)
    facts = search_order.order_facts(CANDIDATES, scores, ON_TOPIC, CLICKS)
    assert facts["topic_first"] == 0.5
    assert math.isnan(facts["rho_clicks"])  # a constant scorer has no rank order
    assert facts["within_ndcg@5"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(5)) / 2)


def test_a_run_off_the_embedded_data_gets_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "dataset:\n  source: kuaisar\n  item_attributes: [first_level_category_id]\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        search_order.main([str(run)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.count("\n") == 0
    assert f"{run}: dataset.source=kuaisar" in err and "embedded data only" in err


def test_a_missing_run_directory_gets_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        search_order.main([str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("sar_exp.tables.search_order: error:") and "nowhere" in err
    assert err.count("\n") == 0


@pytest.mark.slow
def test_a_trained_product_search_model_learns_the_topics_clicked_items(tmp_path):
    """The generator shows a session's items by their popularity within its topic. QEM,
    trained as `make table-unisar` trains its row (seed 0, about a minute), puts the
    query's topic first and, within it, the items clicked more often in training."""
    from tests.methods.test_baselines_planted import train_like_the_table

    train_like_the_table("QEM", tmp_path, task="search")
    facts = search_order.run_facts(str(tmp_path))
    assert facts["topic_first"] > 0.95 and facts["rho_clicks"] > 0.3, facts
    assert facts["within_ndcg@5"] > facts["random_within_ndcg@5"] + 0.1, facts
