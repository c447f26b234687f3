"""How trained models order the search test candidates on the embedded data: the
candidates on the query's topic first, and then, within the topic, by what?

    python -m sar_exp.tables.search_order RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a finished run that evaluates the search task (its config.yaml and
checkpoints/best.ckpt, as every table cell has). For each, one line: its search test
NDCG@5 and HR@10; `topic first`, the share of (on-topic, off-topic) candidate pairs
it orders with the on-topic one above (ties count half); `within topic`, the NDCG@5 of
the clicked item among the candidates on its query's topic, beside what a random
order of them gives; and `rho(clicks)`, the Spearman correlation of its scores with
the candidates' training search clicks within the topic (mean over the cases with at
least three on-topic candidates). A model that learned the topics' popular items has
rho well above 0; the two scorers of `search_by_topic` bound the metrics.

Topics are the generator's truth (`search_by_topic.topics`), so only the embedded
data have them."""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from sar_exp.errors import SarExpError
from sar_exp.metrics.ranking import metrics_from_ranks, positive_rank
from sar_exp.tables.search_by_topic import (
    TOPIC_ATTRIBUTE,
    expected_metrics,
    on_topic,
    topics,
    training_search_clicks,
)

MIN_ON_TOPIC = 3  # candidates on the topic a case needs for a rank correlation
# what loading a checkpoint saved from another config (or a damaged one) raises
CHECKPOINT_ERRORS = (RuntimeError, KeyError, pickle.UnpicklingError)


def order_facts(
    candidates: np.ndarray,
    scores: np.ndarray,
    on_topic: np.ndarray,
    clicks: np.ndarray,
) -> dict[str, float]:
    """Candidates [N, K] (the clicked item first), scores [N, K], on_topic [N, K] bool
    and clicks [num_items + 1] training search clicks -> the facts the module prints.
    A NaN score ranks last, as in the test step's metrics."""
    scores = np.nan_to_num(scores.astype(np.float64), nan=-np.inf)
    overall = metrics_from_ranks(
        torch.bincount(positive_rank(torch.from_numpy(scores)), minlength=scores.shape[1])
    )
    # (on-topic, off-topic) pairs of every case pooled; a tie counts half
    right_pairs = all_pairs = 0.0
    within_ranks, rhos = [], []
    for case in range(len(candidates)):
        on, case_scores = on_topic[case], scores[case]
        diff = case_scores[on][:, None] - case_scores[~on][None, :]
        right_pairs += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        all_pairs += diff.size
        if on[0]:  # the clicked item among the on-topic candidates
            within_ranks.append(int((case_scores[on][1:] >= case_scores[0]).sum()))
        if on.sum() >= MIN_ON_TOPIC:
            popularity = clicks[candidates[case][on]]
            if np.ptp(popularity) > 0 and np.ptp(case_scores[on]) > 0:
                rhos.append(spearmanr(case_scores[on], popularity).statistic)
    clicked_on_topic = on_topic[:, 0]
    if clicked_on_topic.any():
        within = metrics_from_ranks(
            torch.bincount(torch.tensor(within_ranks), minlength=scores.shape[1])
        )["ndcg@5"]
        # a random order: the clicked item tied with every on-topic candidate
        random = expected_metrics(
            np.ones(int(clicked_on_topic.sum())), on_topic[clicked_on_topic, 1:].astype(float)
        )["ndcg@5"]
    else:
        within = random = float("nan")
    return {
        "cases": len(candidates), "clicked_on_topic": int(clicked_on_topic.sum()),
        "rho_cases": len(rhos), "ndcg@5": overall["ndcg@5"], "hr@10": overall["hr@10"],
        "topic_first": right_pairs / all_pairs if all_pairs else float("nan"),
        "within_ndcg@5": within, "random_within_ndcg@5": random,
        "rho_clicks": float(np.mean(rhos)) if rhos else float("nan"),
    }  # fmt: skip


@torch.no_grad()
def search_test_scores(datamodule, model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidates, scores, queries) of the search test cases, scored as the test step
    scores them (`search_scores`)."""
    candidates, scores, queries = [], [], []
    for batch in datamodule.evaluation_loader("test", "search"):
        scores.append(model.search_scores(batch, batch["candidates"]).float())
        candidates.append(batch["candidates"])
        queries.append(batch["query"])
    return tuple(torch.cat(x).numpy() for x in (candidates, scores, queries))


def run_facts(run_dir: str) -> dict[str, float]:
    """order_facts of a finished run; SarExpError (without the directory's name, which
    the caller adds) for a run it cannot read."""
    from sar_exp.train import load_run

    dataset = OmegaConf.load(Path(run_dir) / "config.yaml").dataset
    attributes = list(dataset.get("item_attributes") or [])
    if dataset.source != "synthetic" or TOPIC_ATTRIBUTE not in attributes:
        raise SarExpError(
            f"dataset.source={dataset.source}, dataset.item_attributes={attributes}: topics "
            f"are known on the embedded data only (dataset=synthetic, with {TOPIC_ATTRIBUTE} "
            "among the item attributes)"
        )
    try:
        datamodule, model = load_run(run_dir)
    except CHECKPOINT_ERRORS as err:
        raise SarExpError(f"checkpoints/best.ckpt does not load: {err}") from err
    if "search" not in model.evaluated_tasks:
        raise SarExpError(f"the method scores {list(model.evaluated_tasks)} only (no search model)")
    view = datamodule.view
    known_topics = topics(view, attributes.index(TOPIC_ATTRIBUTE))
    candidates, scores, queries = search_test_scores(datamodule, model)
    return order_facts(candidates, scores, on_topic(known_topics, candidates, queries),
                       training_search_clicks(view, known_topics[0].size))  # fmt: skip


def line(run_dir: str, facts: dict[str, float]) -> str:
    return (
        f"{run_dir}: NDCG@5 {facts['ndcg@5']:.3f}, HR@10 {facts['hr@10']:.3f}; topic first "
        f"{facts['topic_first']:.3f}; within topic NDCG@5 {facts['within_ndcg@5']:.3f} "
        f"(random {facts['random_within_ndcg@5']:.3f}); rho(clicks) {facts['rho_clicks']:+.2f} "
        f"({facts['cases']} cases, the clicked item on the query's topic in "
        f"{facts['clicked_on_topic']}, rho over {facts['rho_cases']})"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sar_exp.tables.search_order",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("runs", nargs="+", help="finished runs that evaluate search")
    args = parser.parse_args(argv)
    from sar_exp.data.stats import INPUT_ERRORS

    for run_dir in args.runs:
        try:
            print(line(run_dir, run_facts(run_dir)), flush=True)
        except (*INPUT_ERRORS, OSError) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"sar_exp.tables.search_order: error: {run_dir}: {message}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
