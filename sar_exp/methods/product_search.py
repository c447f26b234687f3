"""Personalized product search models, the search baselines of UniSAR's Table 4. They
model search only: trained on search clicks, evaluated on the search task.

Every model scores an item i under query q for user u as M_uq . i (Ai et al., SIGIR'17 and
CIKM'19; Bi et al., TOIS'20), with the query f(q) = tanh(W mean(words) + b) in the item
space and a softmax over items approximated by the framework's sampled-softmax CE over
the search candidates (the papers use negative sampling too). They differ in M_uq:

- QEM: M = f(q), no personalisation.
- HEM: M = lambda f(q) + (1 - lambda) u, u a latent user vector. (HEM also generates the
  users' and items' review words; the S&R datasets have no reviews, so that part is absent.)
- AEM: u = sum_i softmax_i(s(q, i)) i over the user's history, with the attention
  s(q, i) = (i . tanh(W_f f(q) + b_f)) W_h over `heads` hidden units; M as HEM's.
- ZAM: AEM with a zero vector added to the attended items: s(q, 0) = 0, so the softmax's
  denominator gains exp(0) = 1 and a user whose history does not match the query keeps
  u near 0 (M near lambda f(q)).
- TEM: a Transformer encoder over [f(q), i_1, ..., i_n]; M is the output at f(q).
- CoPPS: TEM with a contrastive loss between two augmentations of the user's history
  (item mask, crop, reorder), InfoNCE over the batch, weighted by `contrast_weight`.

The history is the user's past search clicks (UniSAR: these baselines "only consider
search history"), up to the protocol's cap, newest last."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sar_exp.backbones.sequence import left_aligned
from sar_exp.errors import ConfigError
from sar_exp.methods.base import RecommenderModule
from sar_exp.methods.losses import sampled_softmax_ce

MODELS = ("qem", "hem", "aem", "zam", "tem", "copps")


class ProductSearch(RecommenderModule):
    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return True

    def __init__(self, schema: dict, backbone: dict, model: str = "hem", mix: float = 0.5,
                 heads: int = 5, layers: int = 1, dropout: float = 0.1,
                 contrast_weight: float = 0.1, contrast_temperature: float = 0.1,
                 augment_ratio: float = 0.2, **kwargs):  # fmt: skip
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
        if model in ("tem", "copps"):
            if d % 2:
                raise ConfigError(f"TEM's two attention heads need an even item width, got {d}")
            layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=4 * d, dropout=dropout,
                                               batch_first=True)  # fmt: skip
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.positions = nn.Embedding(schema["max_search_history"] + 1, d)

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

    def personalised_query(self, batch, history=None) -> torch.Tensor:
        query = self.query(batch)
        if self.model == "qem":
            return query
        if self.model == "hem":
            user = self.user_map(self.users(batch["user"]))
            return self.hparams.mix * query + (1 - self.hparams.mix) * user
        items, mask = history if history is not None else self.history(batch)
        if self.model in ("tem", "copps"):
            return self.transformer_user(query, items, mask)
        user = self.attended_user(query, items, mask)
        return self.hparams.mix * query + (1 - self.hparams.mix) * user

    def search_scores(self, batch, candidates):
        return (self.personalised_query(batch).unsqueeze(1) * self.items(candidates)).sum(-1)

    # ------------------------------------------------------------ training
    def training_loss(self, batch):
        history = self.history(batch) if self.model not in ("qem", "hem") else None
        scores = (self.personalised_query(batch, history).unsqueeze(1)
                  * self.items(batch["candidates"])).sum(-1)  # fmt: skip
        loss = sampled_softmax_ce(scores)
        if self.model != "copps":
            return loss, {}
        contrast = self.sequence_contrast(batch, *history)
        return loss + self.hparams.contrast_weight * contrast, {
            "search": loss.detach(), "contrast": contrast.detach()
        }  # fmt: skip

    def augment(self, items, mask):
        """One random augmentation per row: mask (items replaced by zeros), crop (a
        contiguous part kept) or reorder (a contiguous part shuffled)."""
        b, length, _ = items.shape
        ratio = self.hparams.augment_ratio
        kind = torch.randint(0, 3, (b,), device=items.device)
        count = mask.sum(1)
        positions = torch.arange(length, device=items.device).expand(b, -1)
        span = (count.float() * (1 - ratio)).ceil().long().clamp(min=1)  # crop keeps this many
        start = (torch.rand(b, device=items.device) * (count - span + 1).clamp(min=1)).long()
        inside = (positions >= start[:, None]) & (positions < (start + span)[:, None]) & mask
        dropped = (torch.rand(b, length, device=items.device) < ratio) & mask
        out_mask = torch.where((kind == 1)[:, None], inside, mask)
        out = torch.where(((kind == 0)[:, None] & dropped).unsqueeze(-1), 0.0, items)
        # reorder: shuffle the items of a span of ratio * count among themselves
        short = (count.float() * ratio).ceil().long().clamp(min=1)
        window = (positions >= start[:, None]) & (positions < (start + short)[:, None]) & mask
        draws = start[:, None] + torch.rand(b, length, device=items.device) * short[:, None]
        keys = torch.where(window, draws, positions.float())  # the window's items stay in it
        order = torch.argsort(keys, dim=1)
        shuffled = torch.gather(out, 1, order.unsqueeze(-1).expand_as(out))
        out = torch.where((kind == 2)[:, None, None], shuffled, out)
        return left_aligned(out, out_mask)

    def sequence_contrast(self, batch, items, mask) -> torch.Tensor:
        """InfoNCE between two augmentations of each user's history (the same query):
        the other rows of the batch are the negatives."""
        query = self.query(batch)
        first = F.normalize(self.transformer_user(query, *self.augment(items, mask)), dim=-1)
        second = F.normalize(self.transformer_user(query, *self.augment(items, mask)), dim=-1)
        logits = first @ second.T / self.hparams.contrast_temperature
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
