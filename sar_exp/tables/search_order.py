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
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from sar_exp.errors import SarExpError
from sar_exp.metrics.ranking import metrics_from_ranks, positive_rank
from sar_exp.tables.search_by_topic import TOPIC_ATTRIBUTE, expected_metrics, topics

MIN_ON_TOPIC = 3  # candidates on the topic a case needs for a rank correlation


def order_facts(
    candidates: np.ndarray,
    scores: np.ndarray,
    on_topic: np.ndarray,
    clicks: np.ndarray,
) -> dict[str, float]:
    """Candidates [N, K] (the clicked item first), scores [N, K], on_topic [N, K] bool
    and clicks [num_items + 1] training search clicks -> the facts the module prints."""
    ranks = positive_rank(torch.from_numpy(scores))
    model = metrics_from_ranks(torch.bincount(ranks, minlength=scores.shape[1]))
    pairs, within_ranks, random_within, rhos = [], [], [], []
    for case in range(len(candidates)):
        on, case_scores = on_topic[case], scores[case]
        if on.any() and (~on).any():
            diff = case_scores[on][:, None] - case_scores[~on][None, :]
            pairs.append(((diff > 0) + 0.5 * (diff == 0)).mean())
        if on[0]:  # the clicked item among the on-topic candidates
            others = case_scores[on][1:]
            within_ranks.append(int((others >= case_scores[0]).sum()))
            random_within.append(int(on.sum()) - 1)
        if on.sum() >= MIN_ON_TOPIC:
            popularity = clicks[candidates[case][on]]
            if np.ptp(popularity) > 0 and np.ptp(case_scores[on]) > 0:
                rhos.append(spearmanr(case_scores[on], popularity).statistic)
    k = scores.shape[1]
    within = metrics_from_ranks(torch.bincount(torch.tensor(within_ranks, dtype=torch.long),
                                               minlength=k))  # fmt: skip
    tied = np.array(random_within)  # every on-topic candidate tied with the clicked one
    random = expected_metrics(
        np.zeros(len(tied)), np.where(np.arange(k - 1) < tied[:, None], 0.0, -1.0)
    )
    return {
        "ndcg@5": model["ndcg@5"], "hr@10": model["hr@10"],
        "topic_first": float(np.mean(pairs)) if pairs else float("nan"),
        "within_ndcg@5": within["ndcg@5"], "random_within_ndcg@5": random["ndcg@5"],
        "rho_clicks": float(np.mean(rhos)) if rhos else float("nan"),
    }  # fmt: skip


@torch.no_grad()
def search_test_scores(datamodule, model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidates, scores, queries) of the search test cases, scored as the test step
    scores them (`search_scores`)."""
    loaders = datamodule.test_dataloader()
    loaders = loaders if isinstance(loaders, list) else [loaders]
    loader = loaders[list(model.evaluated_tasks).index("search")]
    candidates, scores, queries = [], [], []
    for batch in loader:
        scores.append(model.search_scores(batch, batch["candidates"]).float())
        candidates.append(batch["candidates"])
        queries.append(batch["query"])
    return tuple(torch.cat(x).numpy() for x in (candidates, scores, queries))


def run_facts(run_dir: str) -> dict[str, float]:
    from sar_exp.train import load_run

    dataset = OmegaConf.load(Path(run_dir) / "config.yaml").dataset
    attributes = list(dataset.get("item_attributes") or [])
    if dataset.source != "synthetic" or TOPIC_ATTRIBUTE not in attributes:
        raise SarExpError(
            f"{run_dir}: dataset.source={dataset.source}, dataset.item_attributes={attributes}: "
            f"topics are known on the embedded data only (dataset=synthetic, with "
            f"{TOPIC_ATTRIBUTE} among the item attributes)"
        )
    datamodule, model = load_run(run_dir)
    if "search" not in model.evaluated_tasks:
        raise SarExpError(f"{run_dir}: the run does not evaluate the search task "
                          f"(dataset.protocol.evaluated_tasks={list(model.evaluated_tasks)})")  # fmt: skip
    view = datamodule.view
    item_topic, query_topic = topics(view, attributes.index(TOPIC_ATTRIBUTE))
    candidates, scores, queries = search_test_scores(datamodule, model)
    on_topic = item_topic[candidates] == query_topic[queries][:, None]
    clicks = np.bincount(view.split("search", "train")["item"], minlength=item_topic.size)
    return order_facts(candidates, scores, on_topic, clicks)


def line(run_dir: str, facts: dict[str, float]) -> str:
    return (
        f"{run_dir}: NDCG@5 {facts['ndcg@5']:.3f}, HR@10 {facts['hr@10']:.3f}; topic first "
        f"{facts['topic_first']:.3f}; within topic NDCG@5 {facts['within_ndcg@5']:.3f} "
        f"(random {facts['random_within_ndcg@5']:.3f}); rho(clicks) {facts['rho_clicks']:+.2f}"
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
        except (*INPUT_ERRORS, FileNotFoundError) as err:
            print(
                f"sar_exp.tables.search_order: error: {str(err).splitlines()[0]}", file=sys.stderr
            )
            sys.exit(2)


if __name__ == "__main__":
    main()
