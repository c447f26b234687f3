"""`python -m sar_exp.tables.search_order`: how a model orders the search candidates
(topic first, then by popularity within the topic), on hand-made scores."""

import json
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
    # half a point for the topic, a hundredth a click: case 2's clicked item (5 clicks)
    # falls below its three on-topic rivals and the off-topic item 5 (60 clicks)
    scores = 0.5 * ON_TOPIC + CLICKS[CANDIDATES] / 100.0
    facts = search_order.order_facts(CANDIDATES, scores, ON_TOPIC, CLICKS)
    assert facts["rho_clicks"] == pytest.approx(1.0) and facts["rho_cases"] == 2
    assert facts["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 2)  # ranks 0 and 4
    assert facts["within_ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 2)  # 0 and 3
    assert facts["random_within_ndcg@5"] == pytest.approx(RANDOM_WITHIN)
    # pairs pooled over the cases: 5.5 of 6 (a tie at 0.6) and 3 of 4
    assert facts["topic_first"] == pytest.approx(8.5 / 10)


def test_a_scorer_against_topic_and_popularity_has_negative_rho_and_no_topic_first():
    scores = -CLICKS[CANDIDATES] - 100.0 * ON_TOPIC  # off-topic first, unpopular first
    facts = search_order.order_facts(CANDIDATES, scores.astype(float), ON_TOPIC, CLICKS)
    assert facts["topic_first"] == 0.0
    assert facts["rho_clicks"] == pytest.approx(-1.0)
    assert facts["random_within_ndcg@5"] == pytest.approx(RANDOM_WITHIN)


def test_tied_scores_count_half_and_give_no_rank_correlation():
    scores = np.zeros(CANDIDATES.shape)
    facts = search_order.order_facts(CANDIDATES, scores, ON_TOPIC, CLICKS)
    assert facts["topic_first"] == 0.5
    assert math.isnan(facts["rho_clicks"]) and facts["rho_cases"] == 0  # no rank order
    assert facts["within_ndcg@5"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(5)) / 2)


def test_cases_off_the_topic_or_with_few_on_it_are_left_out_where_they_say_nothing():
    on_topic = ON_TOPIC.copy()
    on_topic[1] = [False, True, True, False, False]  # case 2: clicked off-topic, 2 on it
    scores = 0.5 * on_topic + CLICKS[CANDIDATES] / 100.0
    facts = search_order.order_facts(CANDIDATES, scores, on_topic, CLICKS)
    assert facts["clicked_on_topic"] == 1 and facts["rho_cases"] == 1
    assert facts["within_ndcg@5"] == 1.0  # case 1 alone
    assert facts["random_within_ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 0.5) / 3)
    none_on_topic = search_order.order_facts(CANDIDATES, scores, on_topic & False, CLICKS)
    assert math.isnan(none_on_topic["within_ndcg@5"]) and math.isnan(none_on_topic["topic_first"])


def test_a_nan_score_ranks_last_as_in_the_test_metrics():
    scores = 0.5 * ON_TOPIC + CLICKS[CANDIDATES] / 100.0
    scores[0, 0] = np.nan  # case 1's clicked item: last of 5 (rank 4), last of its topic
    facts = search_order.order_facts(CANDIDATES, scores, ON_TOPIC, CLICKS)
    assert facts["ndcg@5"] == pytest.approx((1 / math.log2(6) + 1 / math.log2(6)) / 2)
    assert facts["within_ndcg@5"] == pytest.approx((0.5 + 1 / math.log2(5)) / 2)


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
    assert f"error: {run}: dataset.source=kuaisar" in err and "embedded data only" in err


@pytest.mark.parametrize("name", ["nowhere", "a_file"])
def test_a_missing_run_directory_or_a_file_gets_a_one_line_error(tmp_path, capsys, name):
    (tmp_path / "a_file").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        search_order.main([str(tmp_path / name)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith(f"sar_exp.tables.search_order: error: {tmp_path / name}: ")
    assert err.count("\n") == 0


@pytest.mark.slow
def test_a_trained_product_search_model_learns_the_topics_clicked_items(tmp_path):
    """The generator shows a session's items by their popularity within its topic. QEM,
    trained as `make table-unisar` trains its row (seed 0, about a minute), puts the
    query's topic first and, within it, the items clicked more often in training."""
    from tests.methods.test_baselines_planted import train_like_the_table

    train_like_the_table("QEM", tmp_path, task="search")
    facts = search_order.run_facts(str(tmp_path))
    logged = json.loads((tmp_path / "metrics.json").read_text())  # the test step's figures
    assert facts["ndcg@5"] == pytest.approx(logged["test/search/ndcg@5"], abs=1e-6)
    assert facts["topic_first"] > 0.95 and facts["rho_clicks"] > 0.3, facts
    assert facts["within_ndcg@5"] > facts["random_within_ndcg@5"] + 0.1, facts


def test_a_checkpoint_of_another_config_gets_a_one_line_error(tmp_path, capsys, monkeypatch):
    import sar_exp.train

    def foreign_checkpoint(run_dir):
        raise RuntimeError("Error(s) in loading state_dict for UniSAR:\n\tsize mismatch ...")

    monkeypatch.setattr(sar_exp.train, "load_run", foreign_checkpoint)
    (tmp_path / "config.yaml").write_text(
        "dataset:\n  source: synthetic\n  item_attributes: [first_level_category_id]\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        search_order.main([str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0
    assert f"{tmp_path}: checkpoints/best.ckpt does not load: Error(s) in loading" in err
