"""Personalized product search models, the search baselines of UniSAR's Table 4. They
model search only: trained on search clicks, evaluated on the search task.

Every model scores an item i under query q for user u as M_uq . i (Ai et al., SIGIR'17 and
CIKM'19; Bi et al., SIGIR'20), with the query f(q) = tanh(W mean(words) + b) in the item
space. They differ in M_uq:

- QEM: M = f(q), no personalisation.
- HEM: M = lambda f(q) + (1 - lambda) u, u a latent user vector. (HEM also generates the
  users' and items' review words; the S&R datasets have no reviews, so that part is absent.)
- AEM: u = sum_i softmax_i(s(q, i)) i over the user's history, with the attention
  s(q, i) = (i . tanh(W_f f(q) + b_f)) W_h over `heads` hidden units; M as HEM's (the
  authors' code mixes 0.5 q + 0.5 u: `mix` 0.5; another value departs from AEM and ZAM).
- ZAM: AEM with a zero vector added to the attended items: s(q, 0) = 0, so the softmax's
  denominator gains exp(0) = 1 and a user whose history does not match the query keeps
  u near 0 (M near lambda f(q)).
- TEM: a Transformer encoder over [f(q), i_1, ..., i_n] (learned positions, no user-id
  token, as the authors' code); M is the output at f(q).

Training: the framework's sampled-softmax CE over the search candidates (1 + M sampled
items, ClardRec's Eq. 4), where the papers train a log-sigmoid negative-sampling loss
(with review-word generation beside it); every search model of the framework is trained
the same way. CoPPS (contrastive tasks built on a knowledge graph and on other users'
sequences) is not implemented: its row shows the published number only.

The history is the user's past search clicks (UniSAR: these baselines "only consider
search history"), up to the protocol's cap, oldest first."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.sequence import left_aligned
from sar_exp.errors import ConfigError
from sar_exp.methods.base import RecommenderModule
from sar_exp.methods.losses import sampled_softmax_ce

MODELS = ("qem", "hem", "aem", "zam", "tem")


class ProductSearch(RecommenderModule):
    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return True

    def __init__(self, schema: dict, backbone: dict, model: str = "hem", mix: float = 0.5,
                 heads: int = 5, layers: int = 1, dropout: float = 0.1, **kwargs):  # fmt: skip
        if model not in MODELS:
            raise ConfigError(f"method.module.model must be one of {list(MODELS)}, got {model!r}")
        super().__init__(schema, backbone, **kwargs)
        if "rec" in self.evaluated_tasks:
            raise ConfigError(f"method={model} is a search model: it cannot score rec")
        d = self.items.out_dim
        self.model = model
        self.query_map = nn.Linear(self.queries.out_dim, d)  # f(q) = tanh(W q + b)
        if model == "qem":
            self.users = None  # not personalised
        elif model == "hem":
            self.user_map = nn.Linear(self.users.out_dim, d, bias=False)  # u in the item space
        else:
            self.users = None  # the user is their history
        if model in ("aem", "zam"):
            self.attention_query = nn.Linear(d, d * heads)  # W_f, b_f
            self.attention_heads = nn.Linear(heads, 1, bias=False)  # W_h
        if model == "tem":
            if d % 2:
                raise ConfigError(f"TEM's two attention heads need an even item width, got {d}")
            layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=4 * d, dropout=dropout,
                                               batch_first=True)  # fmt: skip
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.positions = nn.Embedding(schema["max_search_history"] + 1, d)
            nn.init.normal_(self.positions.weight, std=0.05)  # the scale of the item tables

    # ------------------------------------------------------------ M_uq
    def query(self, batch) -> torch.Tensor:
        return torch.tanh(self.query_map(self.queries(batch["query"])))

    def history(self, batch):
        items, mask = left_aligned(
            batch["search_click_history_item"].unsqueeze(-1), batch["search_click_history_mask"]
        )
        return self.items(items.squeeze(-1)), mask

    def attended_user(self, query, history, mask) -> torch.Tensor:
        """AEM / ZAM: u = sum_i a_i i with a = softmax(s(q, i)) (ZAM: with s(q, 0) = 0)."""
        b, _, d = history.shape
        keys = torch.tanh(self.attention_query(query)).view(b, -1, d)  # [B, heads, d]
        scores = self.attention_heads(torch.einsum("bld,bhd->blh", history, keys)).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        if self.model == "zam":  # the zero vector: one more slot with score 0 and value 0
            scores = torch.cat([scores, scores.new_zeros(b, 1)], dim=1)
            history = torch.cat([history, history.new_zeros(b, 1, d)], dim=1)
        weights = torch.nan_to_num(torch.softmax(scores, dim=1), nan=0.0)  # AEM, no history: 0
        return torch.einsum("bl,bld->bd", weights, history)

    def transformer_user(self, query, history, mask) -> torch.Tensor:
        """TEM: the encoder's output at the query of [f(q), i_1, ..., i_n]."""
        x = torch.cat([query.unsqueeze(1), history], dim=1)
        x = x + self.positions.weight[: x.shape[1]]
        valid = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return self.encoder(x, src_key_padding_mask=~valid)[:, 0]

    def personalised_query(self, batch) -> torch.Tensor:
        query = self.query(batch)
        if self.model == "qem":
            return query
        if self.model == "hem":
            user = self.user_map(self.users(batch["user"]))
            return self.hparams.mix * query + (1 - self.hparams.mix) * user
        items, mask = self.history(batch)
        if self.model == "tem":
            return self.transformer_user(query, items, mask)
        user = self.attended_user(query, items, mask)
        return self.hparams.mix * query + (1 - self.hparams.mix) * user

    def search_scores(self, batch, candidates):
        return (self.personalised_query(batch).unsqueeze(1) * self.items(candidates)).sum(-1)

    # ------------------------------------------------------------ training
    def training_loss(self, batch):
        return sampled_softmax_ce(self.search_scores(batch, batch["candidates"])), {}
