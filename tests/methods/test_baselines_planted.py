"""The search-enhanced baselines that read one time-ordered S&R sequence (Query-SeqRec:
queries reveal the user's intent; USER: the integrated sequence carries the transitions
between search and recommendation) checked on planted truth, as UniSAR's claim is in
test_unisar_planted.py.

The embedded generator plants a search-to-rec transition: a search on a topic raises the
topic's share of the user's rec exposures in the following hours. Probe: in each test
row, swap the newest search of the merged sequence (its query and clicks) for another
row's newest search of a different topic, and measure how much the scores of the donor
topic's candidates move relative to the other candidates'. A model that reads its
searches moves them toward the donor's topic. Each model is trained as `make
table-unisar` trains its row (seed 0), so the probe can also be run on a table cell:
`newest_search_swap_shift(*probe_inputs(run_dir))`."""

from __future__ import annotations

import argparse

import pytest
import torch

from sar_exp.data.synthetic import TOPIC_ATTRIBUTE
from tests.methods.test_unisar_planted import donor_topic_shift, majority_topic


def newest_search_swap_shift(model, loader, topic: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Per probed row, the mean score change of the donor topic's candidates minus that of
    the other candidates (neither donor nor own topic), after swapping the row's newest
    search in the merged history (interleaved_*) for a donor row's newest search whose
    majority click topic differs."""
    generator = torch.Generator().manual_seed(seed)
    shifts = []
    with torch.no_grad():
        for batch in loader:
            search = batch["interleaved_mask"] & (batch["interleaved_type"] == 0)
            slots = torch.arange(search.shape[1]).expand_as(search)
            newest = torch.where(search, slots, -1).max(1).values  # -1: no search
            rows = torch.arange(len(newest))
            own = majority_topic(batch["interleaved_clicks"][rows, newest.clamp(min=0)], topic)
            own = torch.where(newest >= 0, own, -1)
            donors = torch.nonzero(own >= 0).squeeze(1)
            if donors.numel() < 2:
                continue
            donor = donors[torch.randint(donors.numel(), (len(rows),), generator=generator)]
            keep = (own >= 0) & (own[donor] != own)
            swapped = dict(batch)
            for key in ("interleaved_query", "interleaved_clicks"):
                swapped[key] = batch[key].clone()
                swapped[key][rows[keep], newest[keep]] = batch[key][
                    donor[keep], newest[donor[keep]]
                ]
            shifts.append(donor_topic_shift(model, batch, swapped, own, own[donor], keep, topic))
    return torch.cat(shifts)


def probe_inputs(run_dir):
    """(model, test loader, item topics) of a finished run."""
    from sar_exp.train import load_run

    dm, model = load_run(run_dir)
    topic = dm.lookup_tables()["item_attributes"][:, dm.item_attributes.index(TOPIC_ATTRIBUTE)]
    loader = dm.test_dataloader()
    return model, loader[0] if isinstance(loader, list) else loader, topic


def train_like_the_table(row: str, out) -> None:
    """Row `row` of `make table-unisar` (its rec run), seed 0, on the embedded data."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sar_exp.tables import grid, unisar
    from sar_exp.train import CONFIG_DIR, train

    args = argparse.Namespace(dataset="synthetic", data=None, max_epochs=100, quick=False,
                              threads=grid.DEFAULT_THREADS)  # fmt: skip
    part, overrides, _ = unisar.cell_runs(row, args)[0]
    assert part in ("", "rec")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "seed=0", f"paths.output_dir={out}", f"paths.cache_dir={out / 'cache'}",
            *overrides, *grid.common_overrides(args),
        ])  # fmt: skip
    train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("row", ["Query-SeqRec", "USER"])
def test_the_newest_search_moves_the_rec_scores_toward_its_topic(row, tmp_path):
    train_like_the_table(row, tmp_path)
    shift = newest_search_swap_shift(*probe_inputs(tmp_path))
    t = shift.mean() / (shift.std() / len(shift) ** 0.5)
    assert len(shift) > 100 and shift.mean() > 0 and t > 3, (shift.mean(), t)
