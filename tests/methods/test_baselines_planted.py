"""The search-enhanced baselines' claims checked on planted truth, as UniSAR's claim is
in test_unisar_planted.py: a user's searches inform their recommendations (Query-SeqRec:
queries reveal the user's intent; USER: the integrated S&R sequence carries the
transitions between search and recommendation; NRHUB: the search queries and clicks are
among the heterogeneous behaviours that make the user).

The embedded generator plants a search-to-rec transition (a search on a topic raises the
topic's share of the user's rec exposures in the following hours) and search and rec
interests that partly overlap. Probe: in each test row, swap the newest search of the
history the model reads (its query and clicks; NRHUB: the whole search history) for
another row's of a different majority topic, and measure how much the scores of the
donor topic's candidates move relative to the other candidates'. A model that reads its
searches moves them toward the donor's topic. Each model is trained as `make
table-unisar` trains its row (seed 0), so the probe can also be run on a table cell:
`search_swap_shift(*probe_inputs(run_dir), row)`."""

from __future__ import annotations

import argparse

import pytest
import torch

from sar_exp.data.synthetic import TOPIC_ATTRIBUTE
from tests.methods.test_unisar_planted import slot_swap_shift

# each history a row reads: its search slots and the fields a probe swaps (clicks last)
SEARCH_SLOTS = {
    # Query-SeqRec, USER: the merged S&R sequence, searches are type 0
    "merged": (
        lambda batch: batch["interleaved_mask"] & (batch["interleaved_type"] == 0),
        ("interleaved_query", "interleaved_clicks"),
    ),
    # NRHUB: its two search views, the session queries and the search clicks, swapped
    # whole with their masks (the session clicks last: they name the history's topic)
    "sessions": (
        lambda batch: batch["search_history_mask"],
        (
            "search_history_mask",
            "search_history_query",
            "search_click_history_mask",
            "search_click_history_item",
            "search_click_history_query",
            "search_history_clicks",
        ),
    ),
}
# row -> (history, what is swapped). NRHUB pools its views by attention without their
# order, so what it claims is that the searches inform the user, not the newest one:
# its probe swaps the whole search history (the embedded users' search and rec
# interests partly overlap). UnifiedSSR is not here: its rec scenario reads the rec
# history only (the search scenario shares parameters, not inputs), so a search swap
# cannot move its rec scores.
ROWS = {
    "Query-SeqRec": ("merged", "newest"),
    "USER": ("merged", "newest"),
    "NRHUB": ("sessions", "all"),
}


def search_swap_shift(model, loader, topic: torch.Tensor, row: str) -> torch.Tensor:
    """slot_swap_shift over the search history `row` reads, as ROWS says."""
    history, which = ROWS[row]
    searches, keys = SEARCH_SLOTS[history]
    return slot_swap_shift(model, loader, topic, searches, keys, which)


def probe_inputs(run_dir, task: str = "rec"):
    """(model, `task`'s test loader, item topics) of a finished run."""
    from sar_exp.train import load_run

    dm, model = load_run(run_dir)
    topic = dm.lookup_tables()["item_attributes"][:, dm.item_attributes.index(TOPIC_ATTRIBUTE)]
    return model, dm.evaluation_loader("test", task), topic


def train_like_the_table(row: str, out, task: str = "rec") -> None:
    """Row `row` of `make table-unisar` (its run evaluated on `task`), seed 0, on the
    embedded data."""
    from sar_exp.tables import grid, unisar
    from sar_exp.train import train

    args = argparse.Namespace(dataset="synthetic", data=None, max_epochs=100, quick=False,
                              threads=grid.DEFAULT_THREADS)  # fmt: skip
    # a row of two halves names each run by its task; a row of one run is its first task's
    first_task = unisar.RUNNABLE[row][1][0]
    runs = {part or first_task: overrides for part, overrides, _ in unisar.cell_runs(row, args)}
    overrides = runs[task]
    run = grid.Run((row,), 0, [*overrides, *grid.common_overrides(args)], out, args.threads)
    cfg = grid._compose(run, (f"paths.cache_dir={out / 'cache'}",))  # as the grid composes it
    train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("row", list(ROWS))
def test_the_searches_move_the_rec_scores_toward_their_topic(row, tmp_path):
    train_like_the_table(row, tmp_path)
    shift = search_swap_shift(*probe_inputs(tmp_path), row)
    t = shift.mean() / (shift.std() / len(shift) ** 0.5)
    assert len(shift) > 100 and shift.mean() > 0 and t > 3, (shift.mean(), t)


# ------------------------------------------------------------ personalized search
# The personalized product search models (UniSAR's Table 4) and the joint models' search
# halves claim that the user's history personalises the ranking of a query's results.
# The embedded users prefer a style in both domains and search a mixture of their own
# topics; a query names only its topic. Probe: give each search test row another user's
# history (the user and every history field of a row of another user) and measure how
# much the log-probability of the clicked item among the candidates falls. QEM has no
# user at all: its figure must be exactly 0.
SEARCH_ROWS = ["QEM", "HEM", "AEM", "ZAM", "TEM", "CoPPS", "USER", "UnifiedSSR"]


def is_user_field(key: str) -> bool:
    """The user and every history the batch carries (USER's merged one included)."""
    return key == "user" or "history" in key or key.startswith("interleaved_")


def user_swap_drop(model, loader, seed: int = 0) -> torch.Tensor:
    """Per row whose donor is another user: log p(clicked item | own history) minus
    log p(clicked item | the donor's), p the softmax of the search scores over the row's
    candidates (the clicked item first)."""
    generator = torch.Generator().manual_seed(seed)
    drops = []
    with torch.no_grad():
        for batch in loader:
            donor = torch.randperm(len(batch["user"]), generator=generator)
            swapped = {
                key: value[donor] if is_user_field(key) else value for key, value in batch.items()
            }
            own, other = (
                torch.log_softmax(model.search_scores(b, batch["candidates"]), 1)[:, 0]
                for b in (batch, swapped)
            )
            drops.append((own - other)[batch["user"][donor] != batch["user"]])
    return torch.cat(drops)


@pytest.mark.slow
@pytest.mark.parametrize("row", SEARCH_ROWS)
def test_the_users_own_history_ranks_their_search_clicks_higher(row, tmp_path):
    train_like_the_table(row, tmp_path, task="search")
    model, loader, _ = probe_inputs(tmp_path, task="search")
    drop = user_swap_drop(model, loader)
    assert len(drop) > 200
    if row == "QEM":
        assert drop.abs().max() == 0
        return
    t = drop.mean() / (drop.std() / len(drop) ** 0.5)
    assert drop.mean() > 0 and t > 3, (drop.mean(), t)
