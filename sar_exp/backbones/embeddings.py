"""Shared bottom embeddings: users and items as [id | attributes], queries as mean words."""

from __future__ import annotations

import torch
from torch import nn

TABLE_STD = 0.05  # every id, attribute and word table starts N(0, TABLE_STD^2)


class FeatureEmbedding(nn.Module):
    """ClardRec Eq. 1: u_emb = [u_ID | u_a1 | u_a2 | ...], each part `dim` wide.

    The attribute table (id -> attribute codes) is data, kept as a non-persistent buffer
    so that it follows the module to the device but is not stored in checkpoints."""

    def __init__(
        self,
        num_ids: int,
        attribute_sizes: list[int],
        dim: int,
        attribute_table: torch.Tensor | None = None,
    ):
        super().__init__()
        self.ids = nn.Embedding(num_ids + 1, dim, padding_idx=0)
        self.attributes = nn.ModuleList(
            nn.Embedding(size + 1, dim, padding_idx=0) for size in attribute_sizes
        )
        if attribute_table is None:
            attribute_table = torch.zeros(num_ids + 1, len(attribute_sizes), dtype=torch.long)
        self.register_buffer("attribute_table", attribute_table.long(), persistent=False)
        self.part_dim = dim
        self.out_dim = dim * (1 + len(attribute_sizes))
        nn.init.normal_(self.ids.weight, std=TABLE_STD)
        for table in self.attributes:
            nn.init.normal_(table.weight, std=TABLE_STD)

    def parts(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """[id embedding, attribute 1 embedding, ...]; ClardRec gates them separately."""
        codes = self.attribute_table[ids]
        return [self.ids(ids)] + [table(codes[..., j]) for j, table in enumerate(self.attributes)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.parts(ids), dim=-1)


class QueryEncoder(nn.Module):
    """A query is the mean of its word embeddings (ClardRec Sec. 4.1, UniSAR 4.1.1); with
    `num_queries`, [query-id embedding | mean of words] (SESRec Sec. 4.2.1: repeated
    queries make the id informative), 2 x dim wide."""

    def __init__(
        self, num_words: int, dim: int, query_words: torch.Tensor | None = None, max_words: int = 1,
        num_queries: int | None = None,
    ):  # fmt: skip
        super().__init__()
        self.words = nn.Embedding(num_words + 1, dim, padding_idx=0)
        nn.init.normal_(self.words.weight, std=TABLE_STD)
        if query_words is None:
            query_words = torch.zeros(1, max_words, dtype=torch.long)
        self.register_buffer("query_words", query_words.long(), persistent=False)
        self.ids = None
        if num_queries is not None:  # drawn after the words: the other models' draws stay
            self.ids = nn.Embedding(num_queries + 1, dim, padding_idx=0)
            nn.init.normal_(self.ids.weight, std=TABLE_STD)
            with torch.no_grad():
                self.ids.weight[0].zero_()
        self.out_dim = dim if self.ids is None else 2 * dim

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        words = self.mean_of_words(self.query_words[queries])
        return words if self.ids is None else torch.cat([self.ids(queries), words], dim=-1)

    def mean_of_words(self, words: torch.Tensor, bag: bool = False) -> torch.Tensor:
        """[..., W] word ids (0 = padding) -> [..., dim] mean of their embeddings; also
        what an item's caption is (UniSAR's code: captions share the query encoder).
        `bag`: the same mean by embedding_bag, without the [..., W, dim] intermediate
        (UniSAR's 50-word captions); not the default, whose float summation order the
        existing runs' figures were made with."""
        if bag:
            flat = nn.functional.embedding_bag(
                words.reshape(-1, words.shape[-1]), self.words.weight, mode="mean", padding_idx=0
            )
            return flat.view(*words.shape[:-1], -1)
        mask = (words > 0).unsqueeze(-1).float()
        total = (self.words(words) * mask).sum(-2)
        return total / mask.sum(-2).clamp(min=1.0)  # no words -> zeros


def mlp(
    in_dim: int, hidden_dim: int, layers: int, out_dim: int | None = None, dropout: float = 0.0
) -> nn.Sequential:
    """L linear layers with ReLU between them and none after the last (ClardRec Eq. 24)."""
    out_dim = out_dim or hidden_dim
    dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            modules.append(nn.ReLU())
            if dropout:
                modules.append(nn.Dropout(dropout))
    return nn.Sequential(*modules)


def xavier_init(*roots: nn.Module) -> None:
    """The official codes' initialisation (UniSAR, SESRec): xavier-normal embedding tables
    and linear weights, zero biases, padding rows (id 0) zero; each module once, in the
    order given (an ablation's unused modules first keeps the other parts' draws)."""
    seen = set()
    for root in roots:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            if isinstance(module, nn.Embedding | nn.Linear):
                nn.init.xavier_normal_(module.weight)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
