"""Simple search-enhanced baselines from ClardRec's tables.

AUG: search clicks are added to the rec training data as extra positives.
JSR: joint search and recommendation (Zamani and Croft, DESIRES'18): shared bottom
embeddings, a rec tower and a search tower, trained on the summed loss; with DIN as its
rec model (backbone=din) as UniSAR (5.1.3) and IV4Rec configure it."""

from __future__ import annotations

import hydra
import torch

from sar_exp.methods.base import PlainBackbone, RecommenderModule, TwoDomainRecommender
from sar_exp.methods.losses import sampled_softmax_ce


class AugmentedBackbone(PlainBackbone):
    """AUG: the plain backbone, trained on rec clicks and search clicks alike.

    Each search click (u, q, i) becomes a rec positive (u, i) scored by the rec model
    with the user's rec history at that time; the query is dropped. The loss is the
    mean over the union of both batches, as if the two sets were one training set."""

    def training_loss(self, batch):
        rec = sampled_softmax_ce(self.score(batch, batch["candidates"]))
        search = batch["search"]
        aug = sampled_softmax_ce(self.score(search, search["candidates"]))
        n_rec, n_search = batch["user"].numel(), search["user"].numel()
        loss = (n_rec * rec + n_search * aug) / (n_rec + n_search)
        return loss, {"rec": rec.detach(), "aug": aug.detach()}


class JointSearchRec(TwoDomainRecommender):
    """JSR: the rec tower scores u_rec . i_rec; the search tower scores
    (u_src + q) . i_src with its own user encoder (search history of [item | query]
    steps for sequential backbones) and item MLP. Only the id/attribute embeddings are
    shared. L = L_rec + L_src (Zamani and Croft's summed objective)."""

    def __new__(cls, *args, **kwargs):
        """method=jsr backbone=din builds the DIN variant (TargetAwareJSR): one method
        name and one config for both, as the papers' tables have one JSR row."""
        backbone = kwargs.get("backbone", args[1] if len(args) > 1 else None)
        if cls is JointSearchRec and backbone is not None and backbone.get("name") == "din":
            return TargetAwareJSR(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, schema: dict, backbone: dict, search_weight: float = 1.0, **kwargs):
        super().__init__(schema, backbone, **kwargs)

    def search_scores(self, batch, candidates):
        user_and_query = self.search_user(batch) + self.queries(batch["query"])
        return (user_and_query.unsqueeze(1) * self.search_item_encoder(self.items(candidates))).sum(
            -1
        )

    def training_loss(self, batch):
        rec = sampled_softmax_ce(self.score(batch, batch["candidates"]))
        search = batch["search"]
        src = sampled_softmax_ce(self.search_scores(search, search["candidates"]))
        return rec + self.hparams.search_weight * src, {"rec": rec.detach(), "src": src.detach()}


class TargetAwareJSR(RecommenderModule):
    """JSR with DIN as its rec model (UniSAR 5.1.3, following IV4Rec, WWW'22): the rec
    model is DIN over the rec history; the search model is a second DIN over the user's
    search clicks whose user input is [user | query], so the query meets each candidate
    in DIN's MLP. Only the id/attribute embeddings are shared; L = L_rec + L_src."""

    def __init__(self, schema: dict, backbone: dict, search_weight: float = 1.0, **kwargs):
        super().__init__(schema, backbone, **kwargs)
        dims = self.backbone_dims(self.items.out_dim)
        self.rec_scorer = hydra.utils.instantiate(self.hparams.backbone["encoder"], **dims)
        self.search_scorer = hydra.utils.instantiate(
            self.hparams.backbone["encoder"],
            **{**dims, "user_dim": self.users.out_dim + self.queries.out_dim},
        )

    def score(self, batch, candidates):
        return self.rec_scorer(
            self.users(batch["user"]), self.items(candidates),
            self.items(batch["rec_history"]), batch["rec_history_mask"],
        )  # fmt: skip

    def search_scores(self, batch, candidates):
        user_and_query = torch.cat([self.users(batch["user"]), self.queries(batch["query"])], -1)
        return self.search_scorer(
            user_and_query, self.items(candidates),
            self.items(batch["search_click_history_item"]), batch["search_click_history_mask"],
        )  # fmt: skip

    # JSR's summed objective L = L_rec + L_src: one definition, the two-tower JSR's
    training_loss = JointSearchRec.training_loss
