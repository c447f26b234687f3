"""NRHUB (Wu et al., EMNLP'19), a search-enhanced baseline of UniSAR's Table 3 and SESRec's
Table 2: a user representation from heterogeneous behaviours, one view per behaviour type.

NRHUB's views are the user's search queries, browsed webpages and clicked news; here they
are the user's search queries, search clicks and rec clicks (as IV4Rec's KuaiSAR version
has them). Each record is encoded: a query as NRHUB encodes text, its word embeddings
through a CNN (window 3, ReLU) pooled by word attention; an item, which has ids and
attributes rather than a title, as its embedding through a dense ReLU layer (the news
encoder's place), shared with the candidates. Each view pools its records by attention (a
learned query vector), and the views are pooled by attention again into the user u
(attentive multi-view learning).
A candidate r scores u . r, trained with the framework's sampled-softmax CE, which is
NRHUB's objective (the clicked item against K sampled ones, -log softmax)."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.sequence import AdditiveAttention
from sar_exp.methods.base import RecommenderModule
from sar_exp.methods.losses import sampled_softmax_ce

VIEWS = ("rec_clicks", "search_queries", "search_clicks")


class TextEncoder(nn.Module):
    """NRHUB's text encoder: word embeddings, a CNN over the words (ReLU), word attention."""

    def __init__(self, word_dim: int, dim: int, attention_dim: int, window: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(word_dim, dim, window, padding=window // 2)
        self.attention = AdditiveAttention(dim, attention_dim)

    def forward(self, words: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[N, W, e] word embeddings with their [N, W] mask -> [N, dim]."""
        hidden = torch.relu(self.conv((words * valid.unsqueeze(-1)).transpose(1, 2))).transpose(
            1, 2
        )
        return self.attention(hidden, valid)


class NRHUB(RecommenderModule):
    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return True

    def __init__(self, schema: dict, backbone: dict, attention_dim: int = 200, **kwargs):
        super().__init__(schema, backbone, **kwargs)
        d = self.hparams.hidden_dim
        self.users = None  # NRHUB has no user-id embedding: the user is their behaviours
        self.item_encoder = nn.Sequential(nn.Linear(self.items.out_dim, d), nn.ReLU())
        self.query_encoder = TextEncoder(self.queries.words.embedding_dim, d, attention_dim)
        self.record_attention = nn.ModuleDict(
            {v: AdditiveAttention(d, attention_dim) for v in VIEWS}
        )
        self.view_attention = AdditiveAttention(d, attention_dim)

    def encode_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, L] query ids -> [B, L, d] by the text encoder over their words."""
        words = self.queries.query_words[queries]  # [B, L, W], 0 = padding
        encoded = self.query_encoder(
            self.queries.words(words.flatten(0, 1)), words.flatten(0, 1) > 0
        )
        return encoded.view(*queries.shape, -1)

    def views(self, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each view's encoded records [B, L, d] and their mask."""
        return {
            "rec_clicks": (self.item_encoder(self.items(batch["rec_history"])), batch["rec_history_mask"]),
            "search_queries": (self.encode_queries(batch["search_history_query"]),
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
