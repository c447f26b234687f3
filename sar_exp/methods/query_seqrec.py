"""Query-SeqRec (He et al., CIKM'22), a search-enhanced baseline of UniSAR's Table 3 and
SESRec's Table 2: SASRec over one time-ordered sequence of the user's behaviours in which
the issued queries are tokens among the items.

A rec click is its item's token; a search session is its query's token (the mean of its
words, projected to the item width) followed by the items clicked under it, as items. Each
token also gets a behaviour-type embedding (item or query). The framework's SASRec encoder
reads the newest `dataset.protocol.max_interleaved_history` tokens and the user is scored
against candidates as the SASRec row is (Eq. 3), so the row differs from SASRec's by the
searches alone. Not reproduced from the authors' code: its query-aware input replacement
(an augmentation over the query-item graph) and its loss at every position of the
sequence (the framework trains every sequential row on the next item of each prefix)."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.embeddings import TABLE_STD
from sar_exp.backbones.sequence import right_aligned
from sar_exp.methods.base import PlainBackbone


class QuerySeqRec(PlainBackbone):
    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return True

    def __init__(self, schema: dict, backbone: dict, **kwargs):
        super().__init__(schema, backbone, **kwargs)
        self.query_project = nn.Linear(self.queries.out_dim, self.items.out_dim)
        self.behaviour_types = nn.Embedding(2, self.items.out_dim)  # 0 query, 1 item
        nn.init.normal_(self.behaviour_types.weight, std=TABLE_STD)

    def backbone_dims(self, step_dim: int) -> dict:
        # the encoder's positions span the token sequence
        return {
            **super().backbone_dims(step_dim),
            "max_length": self.schema["max_interleaved_history"],
        }

    def tokens(self, batch):
        """[B, T, d] tokens, oldest first, and their mask: each slot of the merged history
        gives its item (rec) or its query then its clicked items (search); the newest
        max_interleaved_history are kept."""
        kind, valid = batch["interleaved_type"], batch["interleaved_mask"]
        is_rec = (kind == 1) & valid
        clicks = batch["interleaved_clicks"]  # [B, L, C], zeros at rec slots
        ids = torch.cat([batch["interleaved_item"].unsqueeze(-1), clicks], dim=-1)  # [B, L, 1 + C]
        items = self.items(ids)
        query = self.query_project(self.queries(batch["interleaved_query"]))
        first = items[:, :, 0].where(is_rec.unsqueeze(-1), query)  # the item, or the query
        steps = torch.cat([first.unsqueeze(2), items[:, :, 1:]], dim=2)
        types = torch.ones_like(ids)
        types[:, :, 0] = is_rec.long()  # 0 query, 1 item
        steps = steps + self.behaviour_types(types)
        mask = torch.cat(
            [valid.unsqueeze(-1), (clicks > 0) & (valid & ~is_rec).unsqueeze(-1)], dim=-1
        )
        b, length, per_slot, d = steps.shape
        flat, flat_mask = steps.reshape(b, length * per_slot, d), mask.reshape(b, length * per_slot)
        return right_aligned(flat, flat_mask, self.schema["max_interleaved_history"])

    def user_representation(self, batch):
        steps, mask = self.tokens(batch)
        return self.encoder(self.users(batch["user"]), steps, mask)
