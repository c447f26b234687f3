"""The sequential search encoders (ClardRec Eq. 29-31, JSR) read H_src as one step per
(query, clicked item) pair, newest last and contiguous, capped at max_search_history."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sar_exp.data.datamodule import SARDataModule
from sar_exp.methods.baselines import JointSearchRec
from sar_exp.methods.clardrec import ClardRec

CAP = 6
ENCODERS = {
    "gru4rec": {"_target_": "sar_exp.backbones.gru4rec.GRU4RecEncoder", "layers": 1},
    "sasrec": {"_target_": "sar_exp.backbones.sasrec.SASRecEncoder", "layers": 1, "heads": 2},
}


@pytest.fixture(scope="module")
def datamodule(tiny_folder, tmp_path_factory):
    dm = SARDataModule(
        "kuaisar", str(tiny_folder), str(tmp_path_factory.mktemp("c")), "sequential",
        ["search_active_level", "rec_active_level"], ["first_level_category_id", "author_id"],
        protocol={"max_search_history": CAP}, batch_size=64, companion_batch_sizes={"search": 32},
    )  # fmt: skip
    dm.setup()
    return dm


def test_the_batch_holds_the_newest_search_clicks_in_order(datamodule):
    view = datamodule.load()
    batch = next(iter(datamodule.train_dataloader()))
    items, queries = batch["search_click_history_item"], batch["search_click_history_query"]
    mask = batch["search_click_history_mask"]
    assert mask.shape[1] <= CAP
    clicks = view["search_click_user"], view["search_click_time"]
    checked = 0
    for row in range(batch["user"].numel()):
        user, time = (
            int(batch["user"][row]),
            int(view["rec.train.time"][batch["sample_index"][row]]),
        )
        before = np.flatnonzero((clicks[0] == user) & (clicks[1] < time))[-CAP:]
        n = before.size
        assert mask[row, :n].all() and not mask[row, n:].any()  # contiguous, oldest first
        assert items[row, :n].tolist() == view["search_click_item"][before].tolist()
        assert queries[row, :n].tolist() == view["search_click_query"][before].tolist()
        checked += n == CAP
    assert checked > 0  # some rows are capped, so the cap counts single clicks


@pytest.mark.parametrize("backbone", ["gru4rec", "sasrec"])
@pytest.mark.parametrize("method", [ClardRec, JointSearchRec], ids=["clardrec", "jsr"])
def test_the_newest_search_click_changes_the_search_user(datamodule, backbone, method):
    torch.manual_seed(0)
    model = method(
        datamodule.schema, {"encoder": ENCODERS[backbone]},
        lookup_tables=datamodule.lookup_tables(), hidden_dim=16, embedding_dim=8,
    ).eval()  # fmt: skip
    batch = next(iter(datamodule.train_dataloader()))
    mask = batch["search_click_history_mask"]
    rows = torch.nonzero(mask.sum(1) >= 2).squeeze(1)
    assert rows.numel() > 0
    newest = mask.sum(1)[rows] - 1
    changed = dict(batch)
    changed["search_click_history_item"] = batch["search_click_history_item"].clone()
    changed["search_click_history_item"][rows, newest] = (
        batch["search_click_history_item"][rows, newest] % datamodule.schema["num_items"]
    ) + 1
    with torch.no_grad():
        before, after = model.search_user(batch)[rows], model.search_user(changed)[rows]
    assert ((before - after).abs().amax(1) > 1e-6).all()
