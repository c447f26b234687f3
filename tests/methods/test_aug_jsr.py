"""AUG and JSR, ClardRec's simple search-enhanced baselines: what their search batches
are ranked against."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("method", ["aug", "jsr"])
def test_aug_ranks_its_search_clicks_against_rec_items(build_model, method):
    """AUG turns each search click into a rec positive, so its training negatives are rec
    items (the rec model never ranks a search-only item); JSR's search tower keeps the
    search items as its negatives."""
    _, datamodule, batch = build_model(f"method={method}", "backbone=mlp",
                                       "protocol=clardrec_cf")  # fmt: skip
    rec_pool = set(datamodule.load()["rec_item_pool"].tolist())
    drawn = set(batch["search"]["candidates"][:, 1:].reshape(-1).tolist())
    if method == "aug":
        assert drawn <= rec_pool
    else:
        assert drawn - rec_pool  # search-only items: the tiny data has them
