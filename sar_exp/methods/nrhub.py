"""NRHUB (Wu et al., EMNLP'19), a search-enhanced baseline of UniSAR's Table 3 and SESRec's
Table 2: a user representation from heterogeneous behaviours, one view per behaviour type.

NRHUB's views are the user's search queries, browsed webpages and clicked news; here they
are the user's search queries, search clicks and rec clicks. Each record is encoded
(an item: its embedding through a dense ReLU layer, NRHUB's news encoder, shared with the
candidates; a query: the mean of its words through a dense ReLU layer, in place of NRHUB's
word CNN), each view pools its records by attention (a learned query vector), and the
views are pooled by attention again into the user u (attentive multi-view learning).
A candidate r scores u . r, trained with the framework's sampled-softmax CE, which is
NRHUB's objective (the clicked item against K sampled ones, -log softmax)."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.sequence import AdditiveAttention
from sar_exp.methods.base import RecommenderModule
from sar_exp.methods.losses import sampled_softmax_ce

VIEWS = ("rec_clicks", "search_queries", "search_clicks")


class NRHUB(RecommenderModule):
    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return True

    def __init__(self, schema: dict, backbone: dict, attention_dim: int = 200, **kwargs):
        super().__init__(schema, backbone, **kwargs)
        d = self.hparams.hidden_dim
        self.users = None  # NRHUB has no user-id embedding: the user is their behaviours
        self.item_encoder = nn.Sequential(nn.Linear(self.items.out_dim, d), nn.ReLU())
        self.query_encoder = nn.Sequential(nn.Linear(self.queries.out_dim, d), nn.ReLU())
        self.record_attention = nn.ModuleDict(
            {v: AdditiveAttention(d, attention_dim) for v in VIEWS}
        )
        self.view_attention = AdditiveAttention(d, attention_dim)

    def views(self, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each view's encoded records [B, L, d] and their mask."""
        return {
            "rec_clicks": (self.item_encoder(self.items(batch["rec_history"])), batch["rec_history_mask"]),
            "search_queries": (self.query_encoder(self.queries(batch["search_history_query"])),
                               batch["search_history_mask"]),
            "search_clicks": (self.item_encoder(self.items(batch["search_click_history_item"])),
                              batch["search_click_history_mask"]),
        }  # fmt: skip

    def user_representation(self, batch) -> torch.Tensor:
        pooled, present = [], []
        for name, (records, valid) in self.views(batch).items():
            pooled.append(self.record_attention[name](records, valid))
            present.append(valid.any(1))
        return self.view_attention(torch.stack(pooled, 1), torch.stack(present, 1))

    def score(self, batch, candidates):
        user = self.user_representation(batch)
        return (user.unsqueeze(1) * self.item_encoder(self.items(candidates))).sum(-1)

    def training_loss(self, batch):
        return sampled_softmax_ce(self.score(batch, batch["candidates"])), {}
