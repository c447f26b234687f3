"""SESRec's claim (Sec. 4.3, Fig. 3) checked on planted truth: the co-attention splits each
history into the interests that search and recommendation share (P, "similar") and those
they do not (N, "dissimilar").

The embedded generator draws each user's rec and search interests as topic mixtures that
only partly overlap (`interest_overlap`), so a rec behaviour whose topic the user also
searches is a shared interest. After training, the rec behaviours the split calls similar
should lean on the user's searched topics more than the dissimilar ones do.

Why it may not: Eq. 11-12 split at a hard threshold, so L_rec gives the co-attention (W_l,
W_r, W_s) no gradient at all; only L_con trains it (Adam rescales its steps, so beta =
0.001 does not slow it), and L_con (Eq. 13-16) is a hinge that rewards whatever split
the scores already make and is silent once each anchor is a margin nearer its positive
than its negative. The first test pins the first fact."""

from __future__ import annotations

import pytest
import torch

from sar_exp.data.synthetic import TOPIC_ATTRIBUTE
from sar_exp.methods.losses import binary_ce

COATTENTION = ("affinity.weight", "coattention.rec.weight", "coattention.search.weight")


def test_only_the_interest_contrast_trains_the_coattention(tmp_path):
    from sar_exp.data.datamodule import SARDataModule
    from sar_exp.methods.sesrec import SESRec

    dm = SARDataModule(
        "synthetic", None, str(tmp_path), "sequential",
        ["search_active_level", "rec_active_level"], ["first_level_category_id"],
        protocol={"require_both_histories": True, "max_rec_history": 20, "max_search_history": 8},
        synthetic={"preset": "small"}, batch_size=64,
    )  # fmt: skip
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = SESRec(dm.schema, {"name": "sasrec"}, lookup_tables=dm.lookup_tables(),
                   embedding_dim=8, hidden_dim=16, align_negatives=16,
                   margin=10.0)  # every row inside the hinge, so L_con has a gradient  # fmt: skip
    grads = {}
    for part in ("rec", "con"):
        model.zero_grad()
        items, queries = model._lookups(batch, batch["candidates"])
        h = model.encode(batch, items, queries)
        if part == "rec":  # Eq. 22 through MIE's similar / dissimilar pools (Eq. 17-21)
            logits = model._predict(batch, batch["candidates"], items, h)
            labels = torch.zeros_like(logits)
            labels[:, 0] = 1.0
            binary_ce(logits, labels).backward()
        else:
            model._contrast(h).backward()
        params = dict(model.named_parameters())
        grads[part] = {n: params[n].grad for n in COATTENTION}
    assert all(g is None for g in grads["rec"].values()), "L_rec reached the co-attention"
    assert all(g is not None and g.abs().sum() > 0 for g in grads["con"].values()), grads["con"]


def split_topic_shares(model, loader, topic: torch.Tensor) -> dict[str, float]:
    """Mean, over the rec behaviours of each set, of the share of that behaviour's topic
    among the user's search-history clicks; rows where the split fell back to the whole
    history (one set empty) are skipped."""
    sums, counts = {"similar": 0.0, "dissimilar": 0.0}, {"similar": 0, "dissimilar": 0}
    n_topics = int(topic.max()) + 1
    with torch.no_grad():
        for batch in loader:
            items, queries = model._lookups(batch, batch["candidates"])
            h = model.encode(batch, items, queries)
            clicks = batch["search_history_clicks"].flatten(1)  # [B, Ts * clicks]
            searched = torch.zeros(len(clicks), n_topics).scatter_add_(
                1, topic[clicks], (clicks > 0).float()
            )
            share = searched / searched.sum(1, keepdim=True).clamp(min=1)
            rec_share = torch.gather(share, 1, topic[batch["rec_history"]])  # [B, Tr]
            # a real split's two sets are disjoint; a fallback row has both = the history
            split = ~(h["rec_similar"] & h["rec_dissimilar"]).any(1, keepdim=True)
            for kind in sums:
                mask = h[f"rec_{kind}"] & split & (clicks > 0).any(1, keepdim=True)
                sums[kind] += float(rec_share[mask].sum())
                counts[kind] += int(mask.sum())
    return {kind: sums[kind] / max(counts[kind], 1) for kind in sums}


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured: the trained split is not topic-aligned on the embedded data (README, "
    "SESRec); strict, so the day it is, this test says so",
)
def test_the_trained_split_calls_shared_topics_similar(make_cfg, tmp_path):
    """SESRec trained as its table trains it (protocol=sesrec, seed 0, selected on
    validation MRR); on the test rows, similar rec behaviours' topics are searched more
    often than dissimilar ones', by a tenth at least."""
    from sar_exp.train import load_run, train

    cfg = make_cfg("method=sesrec", "backbone=sasrec", "protocol=sesrec", "seed=0",
                   "trainer.max_epochs=20", "callbacks.early_stopping.patience=5",
                   "optimized_metric=val/mrr", output_dir=tmp_path, tiny=False)  # fmt: skip
    train(cfg)
    dm, model = load_run(tmp_path)
    topic = dm.lookup_tables()["item_attributes"][:, dm.item_attributes.index(TOPIC_ATTRIBUTE)]
    shares = split_topic_shares(model, dm.evaluation_loader("test", "rec"), topic)
    assert shares["similar"] > 1.1 * shares["dissimilar"], shares
