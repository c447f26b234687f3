"""UniSAR's attention blocks (Shi et al., SIGIR'24, Sec. 4.2-4.3): masked transformer
encoders for transition extraction (Eq. 3-4), the fusion layer (Eq. 7), target attention
(Eq. 8) and the multi-task prediction layer (Eq. 9).

Attention masks are built here, not by PyTorch's key-padding path: a row that may attend
to nothing (an empty history, a padded slot, a slot whose user has no behaviour of the
other type) would give NaN, as the official code does. Such a row attends to itself (or
to everything) instead, and its output is then zeroed by the caller's validity mask."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.embeddings import mlp


def blocked(allowed: torch.Tensor, heads: int, fallback: str = "self") -> torch.Tensor:
    """[B, Lq, Lk] allowed -> the [B * heads, Lq, Lk] boolean mask MultiheadAttention
    takes (True = blocked). A row with nothing allowed gets its diagonal (self) or every
    key (all) back, so no softmax runs over an empty set."""
    empty = ~allowed.any(-1, keepdim=True)
    if fallback == "self":
        eye = torch.eye(allowed.shape[1], allowed.shape[2], dtype=torch.bool, device=allowed.device)
        allowed = allowed | (empty & eye)
    else:
        allowed = allowed | empty
    return (~allowed).repeat_interleave(heads, dim=0)


class MaskedEncoder(nn.Module):
    """Transformer encoder layers (post-LN, ReLU, feed-forward width d: UniSAR's code)
    over a left-aligned sequence with learned positions (0 = oldest), attending only
    where `allowed` says (Eq. 3: within the sequence; Eq. 4: between behaviour types)."""

    def __init__(self, d: int, heads: int, layers: int, dropout: float, max_length: int):
        super().__init__()
        self.positions = nn.Embedding(max_length, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, d, dropout, batch_first=True, norm_first=False)
            for _ in range(layers)
        )
        self.heads = heads

    def forward(
        self, steps: torch.Tensor, valid: torch.Tensor, allowed: torch.Tensor | None = None
    ):
        length = steps.shape[1]
        x = steps + self.positions(torch.arange(length, device=steps.device))
        pairs = valid[:, None, :] & valid[:, :, None]
        mask = blocked(pairs if allowed is None else pairs & allowed, self.heads)
        for layer in self.layers:
            x = layer(x, src_mask=mask)
        return torch.where(valid[..., None], x, 0.0)


class FusionLayer(nn.Module):
    """Eq. 7: F = MSA(H_same, H_same, H_same), V = FFN(MCA(H_cross, F, F)), with the
    residuals and post-LN of a transformer layer.

    `paper=True` is Eq. 7 as written (Q = H_cross, K = V = self-attended H_same); with
    `paper=False` it is the official code's decoder layer (Q = self-attended H_same,
    K = V = H_cross). Both sequences hold the same slots (one behaviour type)."""

    def __init__(self, d: int, heads: int, dropout: float, paper: bool = True):
        super().__init__()
        self.self_attention = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.heads, self.paper = heads, paper

    def _attend(self, attention, query, keys, allowed):
        out, _ = attention(query, keys, keys, attn_mask=blocked(allowed, self.heads, "all"),
                           need_weights=False)  # fmt: skip
        return self.dropout(out)

    def forward(self, same: torch.Tensor, cross: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        allowed = valid[:, None, :].expand(-1, valid.shape[1], -1)
        if self.paper:
            keys = self.norms[0](same + self._attend(self.self_attention, same, same, allowed))
            query = cross
        else:
            query = self.norms[0](same + self._attend(self.self_attention, same, same, allowed))
            keys = cross
        x = self.norms[1](query + self._attend(self.cross_attention, query, keys, allowed))
        x = self.norms[2](x + self.dropout(self.ffn(x)))
        return torch.where(valid[..., None], x, 0.0)


class TargetAttention(nn.Module):
    """Eq. 8: v = V^T softmax(V W e_i) over the valid history slots, per candidate."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Linear(d, d, bias=False)

    def forward(self, history: torch.Tensor, valid: torch.Tensor, candidates: torch.Tensor):
        """history [B, L, d], valid [B, L], candidates [B, K, d] -> [B, K, d]."""
        scores = torch.einsum("bld,bkd->bkl", self.weight(history), candidates)
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = torch.where(valid.any(-1)[:, None, None], weights, 0.0)  # no history: zeros
        return torch.einsum("bkl,bld->bkd", weights, history)


class MultiTaskHead(nn.Module):
    """Eq. 9: per task, a softmax gate over its own experts and the shared ones, from the
    shared bottom X_b; the two scores (logits) for rec and search.

    `paper=True`: each expert is an MLP from X_b to a score and the gate mixes the scores,
    as Eq. 9 writes it. `paper=False`: the official code's one CGC level (experts
    Linear + ReLU + dropout to d, the gate mixes them, then a tower d -> 2d -> d and a
    head d -> 200 -> 80 -> 1 per task). `mmoe=False` (Table 5, w/o MMoE): one MLP per
    task on X_b, nothing shared; also what a model trained on one task alone has
    (Table 5, w/o joint training: "MMoE is no longer necessary")."""

    def __init__(self, in_dim: int, d: int, experts: dict, dropout: float, paper: bool = True,
                 mmoe: bool = True, tasks: tuple[str, ...] = ("rec", "search")):  # fmt: skip
        super().__init__()
        self.TASKS = tuple(tasks)
        self.mmoe, self.paper = mmoe and len(self.TASKS) == 2, paper
        if not self.mmoe:
            self.heads = nn.ModuleDict({t: mlp(in_dim, d, 2, out_dim=1) for t in self.TASKS})
            return
        out = 1 if paper else d

        def expert():
            if paper:
                return mlp(in_dim, d, 2, out_dim=1)
            return nn.Sequential(nn.Linear(in_dim, d), nn.ReLU(), nn.Dropout(dropout))

        self.experts = nn.ModuleDict(
            {
                name: nn.ModuleList(expert() for _ in range(experts[name]))
                for name in ("shared", *self.TASKS)
            }  # fmt: skip
        )
        self.gates = nn.ModuleDict(
            {t: nn.Linear(in_dim, experts[t] + experts["shared"]) for t in self.TASKS}
        )
        if not paper:
            self.towers = nn.ModuleDict(
                {t: nn.Sequential(mlp(d, 2 * d, 2, out_dim=d), nn.ReLU(),
                                  nn.Linear(d, 200), nn.ReLU(), nn.Linear(200, 80), nn.ReLU(),
                                  nn.Linear(80, 1)) for t in self.TASKS}
            )  # fmt: skip
        self.out = out

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """x [..., in_dim] -> [...] logits of `task`."""
        if not self.mmoe:
            return self.heads[task](x).squeeze(-1)
        outputs = torch.stack(
            [e(x) for e in (*self.experts[task], *self.experts["shared"])], dim=-2
        )  # [..., E, out]
        gate = torch.softmax(self.gates[task](x), dim=-1).unsqueeze(-1)
        mixed = (gate * outputs).sum(-2)
        return (mixed if self.paper else self.towers[task](mixed)).squeeze(-1)
