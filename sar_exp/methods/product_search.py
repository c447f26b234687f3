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
- CoPPS (Dai et al., KDD'23): TEM's model and ranking, plus contrastive tasks on the
  user's history (sar_exp/methods/copps.py): two augmented views of each history (crop,
  mask, reorder) agree (intra-user), and users whose histories share a (query, clicked
  item) pair agree (cross-user); a view is the encoder's mean output over the view's
  steps, read without the query (with it, both views of a row would share the query and
  agree through it alone: ours). L = L_search + cl_weight L_seq + cross_user_weight
  L_user. Its knowledge-graph task is not reproduced (no knowledge graph in the data).

Training: the framework's sampled-softmax CE over the search candidates (1 + M sampled
items, ClardRec's Eq. 4), where the papers train a log-sigmoid negative-sampling loss
(with review-word generation beside it); every search model of the framework is trained
the same way.

The history is the user's past search clicks (UniSAR: these baselines "only consider
search history"), up to the protocol's cap, oldest first."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.embeddings import TABLE_STD
from sar_exp.backbones.sequence import left_aligned, masked_mean
from sar_exp.errors import ConfigError
from sar_exp.methods import copps
from sar_exp.methods.base import RecommenderModule
from sar_exp.methods.losses import sampled_softmax_ce

MODELS = ("qem", "hem", "aem", "zam", "tem", "copps")
TRANSFORMERS = ("tem", "copps")  # TEM's encoder


class ProductSearch(RecommenderModule):
    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return True

    def __init__(self, schema: dict, backbone: dict, model: str = "hem", mix: float = 0.5,
                 heads: int = 5, layers: int = 1, dropout: float = 0.1, cl_weight: float = 0.1,
                 cross_user_weight: float = 0.1, temperature: float = 0.1,
                 crop_ratio: float = 0.6, mask_ratio: float = 0.3, reorder_ratio: float = 0.6,
                 **kwargs):  # fmt: skip
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
        if model in TRANSFORMERS:
            if d % 2:
                raise ConfigError(f"TEM's two attention heads need an even item width, got {d}")
            layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=4 * d, dropout=dropout,
                                               batch_first=True)  # fmt: skip
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.positions = nn.Embedding(schema["max_search_history"] + 1, d)
            nn.init.normal_(self.positions.weight, std=TABLE_STD)  # the scale of the item tables
        self.mask_token = None
        if model == "copps" and self.contrasts():  # CoPPS's [mask] step (the mask operator)
            self.mask_token = nn.Parameter(torch.randn(d) * TABLE_STD)

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
        if self.model in TRANSFORMERS:
            return self.transformer_user(query, items, mask)
        user = self.attended_user(query, items, mask)
        return self.hparams.mix * query + (1 - self.hparams.mix) * user

    def search_scores(self, batch, candidates):
        return (self.personalised_query(batch).unsqueeze(1) * self.items(candidates)).sum(-1)

    # ------------------------------------------------------------ training
    def training_loss(self, batch):
        loss = sampled_softmax_ce(self.search_scores(batch, batch["candidates"]))
        if self.model != "copps" or not self.contrasts():
            return loss, {}
        hp = self.hparams
        parts = self.contrastive_losses(batch)
        loss = loss + hp.cl_weight * parts["cl_seq"] + hp.cross_user_weight * parts["cl_user"]
        return loss, {k: v.detach() for k, v in parts.items()}

    # ------------------------------------------------------------ CoPPS
    def contrasts(self) -> bool:
        return self.hparams.cl_weight > 0 or self.hparams.cross_user_weight > 0

    def sequence_view(self, ids, valid, masked) -> torch.Tensor:
        """A view's user-sequence representation: TEM's encoder over its steps (the
        positions of the history's slots, masked steps read as the [mask] vector), mean
        over its valid outputs. Rows need a valid step."""
        x = torch.where(masked[..., None], self.mask_token, self.items(ids))
        x = x + self.positions.weight[1 : x.shape[1] + 1]
        return masked_mean(self.encoder(x, src_key_padding_mask=~valid), valid)

    def contrastive_losses(self, batch) -> dict[str, torch.Tensor]:
        """CoPPS's two tasks over the rows with a search history (copps.py), each with
        two views drawn from the step's (seed, rank, step) generator."""
        hp = self.hparams
        valid = batch["search_click_history_mask"]
        rows = valid.any(1)
        if not rows.any():  # no history in the batch: nothing to contrast
            zero = 0.0 * self.mask_token.sum()
            return {"cl_seq": zero, "cl_user": zero}
        ids, valid = batch["search_click_history_item"][rows], valid[rows]
        user = batch["user"][rows]
        ratios = {"crop": hp.crop_ratio, "mask": hp.mask_ratio, "reorder": hp.reorder_ratio}
        generator = self.step_generator()
        views = [self.sequence_view(*copps.augment(ids, valid, ratios, generator))
                 for _ in range(2)]  # fmt: skip
        similar = copps.shared_pairs(batch["search_click_history_query"][rows], ids, valid)
        return {
            "cl_seq": copps.sequence_contrast(*views, user, hp.temperature),
            "cl_user": copps.cross_user_contrast(*views, user, similar, hp.temperature),
        }
