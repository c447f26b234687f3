"""Query-SeqRec (He et al., CIKM'22), a search-enhanced baseline of UniSAR's Table 3 and
SESRec's Table 2: SASRec over the user's behaviours with the issued queries as tokens
among the clicked items, in time order.

A rec click is its item's embedding, a search session its query's (the mean of its
words, projected to the item width); each token also gets a behaviour-type embedding
(item or query). The framework's SASRec encoder reads the merged sequence (the newest
`max_interleaved_history` behaviours) and the user is scored against candidates as the
SASRec row is (Eq. 3), so the row differs from SASRec's by the queries alone."""

from __future__ import annotations

from torch import nn

from sar_exp.methods.base import PlainBackbone


class QuerySeqRec(PlainBackbone):
    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return True

    def __init__(self, schema: dict, backbone: dict, **kwargs):
        super().__init__(schema, backbone, **kwargs)
        self.query_project = nn.Linear(self.queries.out_dim, self.items.out_dim)
        self.behaviour_types = nn.Embedding(2, self.items.out_dim)  # 0 query, 1 item
        nn.init.normal_(self.behaviour_types.weight, std=0.05)

    def backbone_dims(self, step_dim: int) -> dict:
        # the encoder's positions span the merged sequence
        return {
            **super().backbone_dims(step_dim),
            "max_length": self.schema["max_interleaved_history"],
        }

    def user_representation(self, batch):
        kind = batch["interleaved_type"]  # 1 rec click, 0 search session (UniSAR's b_t)
        items = self.items(batch["interleaved_item"])
        queries = self.query_project(self.queries(batch["interleaved_query"]))
        steps = items.where(kind.unsqueeze(-1) == 1, queries) + self.behaviour_types(kind)
        return self.encoder(self.users(batch["user"]), steps, batch["interleaved_mask"])
