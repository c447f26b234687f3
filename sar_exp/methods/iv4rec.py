"""IV4Rec+ (Si et al., TOIS'23; IV4Rec, WWW'22), the causal baseline of ClardRec's
Table 1 and QueryRec's Table 4: search queries as instrumental variables for the item
embeddings a recommender reads, over any backbone (model-agnostic).

The papers' text is not in this project's references; this follows the authors'
IV4Rec+(I) implementation (the item-side variant, which fits every backbone here):
- IVs: each item's queries, the `iv_queries` ones most often clicked through to it in
  the search training data (the protocol's training split, so no held-out search);
  embedded by the framework's query encoder (learned word embeddings, as QueryRec 5.3.3
  does in place of BERT's) and averaged.
- First stage: t^ = MLP(IV) (128 hidden, ReLU, dropout), a learned regression of the
  item embedding t on its IVs, trained by MSE(t^, stop_grad(t)) weighted by
  `first_stage_weight` (0.01 in the authors' settings).
- Second stage: t' = w t^ + (1 - w) t, w = sigma(MLP([t^ | t])) (64-16-4-1, ReLU): the
  fitted (causal) part plus the share (1 - w) of the residual t - t^. Every item the
  backbone reads, history and candidates, is t'.
An item no query leads to has no instrument: it is read untreated (t' = t) and left out of
the first-stage MSE (the authors' data gave every item one). Differences from the
authors' code: the instruments are learned word-mean query embeddings (QueryRec 5.3.3's
substitute for frozen BERT vectors), so the rec loss trains them too; with DIN the
treated target also enters the attention (theirs keeps the untreated one there).
IV4Rec+(UI), which also treats the user representation, is not implemented."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sar_exp.errors import ConfigError
from sar_exp.methods.base import PlainBackbone


class InstrumentedItems(nn.Module):
    """Item embeddings through IV4Rec+'s two stages; `out_dim` as FeatureEmbedding's."""

    def __init__(self, items, queries, item_queries: torch.Tensor, dropout: float):
        super().__init__()
        d = items.out_dim
        self.raw, self.queries = items, queries
        self.register_buffer("item_queries", item_queries.long(), persistent=False)
        self.first_stage = nn.Sequential(
            nn.Linear(queries.out_dim, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, d)
        )  # fmt: skip
        self.gate = nn.Sequential(
            nn.Linear(2 * d, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(),
            nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 1),
        )  # fmt: skip
        self.out_dim = d

    def stages(self, ids: torch.Tensor):
        """(t^, t, has_iv) for item ids of any shape; each distinct id is encoded once
        (a full-ranking chunk holds thousands of candidates per row)."""
        unique, inverse = ids.unique(return_inverse=True)
        queries = self.item_queries[unique]  # [U, K], 0 = none
        valid = (queries > 0).unsqueeze(-1).to(torch.get_default_dtype())
        instrument = (self.queries(queries) * valid).sum(-2) / valid.sum(-2).clamp(min=1)
        fitted = self.first_stage(instrument)[inverse]
        return fitted, self.raw(ids), (queries > 0).any(-1)[inverse]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """t' = w t^ + (1 - w) t; an item no query leads to has no instrument: t' = t."""
        fitted, treatment, has_iv = self.stages(ids)
        w = torch.sigmoid(self.gate(torch.cat([fitted, treatment], dim=-1)))
        treated = w * fitted + (1 - w) * treatment
        return torch.where(has_iv.unsqueeze(-1), treated, treatment)

    def first_stage_loss(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """MSE(t^, stop_grad(t)) over the valid ids that have instruments."""
        fitted, treatment, has_iv = self.stages(ids)
        errors = F.mse_loss(fitted, treatment.detach(), reduction="none").mean(-1)
        counted = valid & has_iv
        # every parameter stays in the graph when no id in the batch has instruments
        return (errors * counted).sum() / counted.sum().clamp(min=1)


class IV4Rec(PlainBackbone):
    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return True

    def __init__(self, schema: dict, backbone: dict, first_stage_weight: float = 0.01,
                 dropout: float = 0.1, **kwargs):  # fmt: skip
        tables = kwargs.get("lookup_tables") or {}
        if "item_queries" not in tables:
            raise ConfigError("method=iv4rec needs data.iv_queries (its items' IV queries)")
        super().__init__(schema, backbone, **kwargs)
        self.items = InstrumentedItems(self.items, self.queries, tables["item_queries"], dropout)

    def training_loss(self, batch):
        """The backbone's loss plus lambda times the first-stage MSEs, one mean over the
        history items and one over the clicked items (the authors' two terms)."""
        loss, parts = super().training_loss(batch)
        items = self.items
        target = items.first_stage_loss(
            batch["item"], torch.ones_like(batch["item"], dtype=torch.bool)
        )
        first = target
        if "rec_history" in batch:  # IV4Rec+(I): the history items too
            first = first + items.first_stage_loss(batch["rec_history"], batch["rec_history_mask"])
        total = loss + self.hparams.first_stage_weight * first
        return total, {**parts, "recommend": loss.detach(), "first_stage": first.detach()}
