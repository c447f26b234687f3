"""UniSAR's attention blocks (Shi et al., SIGIR'24, Sec. 4.2-4.3): masked transformer
encoders for transition extraction (Eq. 3-4), the fusion layer (Eq. 7), target attention
(Eq. 8) and the multi-task prediction layer (Eq. 9).

Attention masks are built here, not by PyTorch's key-padding path: a row that may attend
to nothing (an empty history, a padded slot, a slot whose user has no behaviour of the
other type) would give NaN, as the official code does. Such a row attends to itself (or
to everything) instead, and its output is then zeroed by the caller's validity mask."""

from __future__ import annotations

import math

import torch
from torch import nn

from sar_exp.backbones.embeddings import mlp

DROPOUT_LEVELS = 1 << 16


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout from 16-bit random integers: a float draw per element (rand_like, or
    torch's bernoulli_) took a fifth of UniSAR's CPU step, int16 draws take half as
    long. The rate is p rounded to a multiple of 2^-16 (0.1 -> 0.100006), and the
    kept values are scaled by 1 / (1 - that rate), so the expectation is unchanged."""
    if not training or p == 0.0:
        return x
    cut = round(p * DROPOUT_LEVELS)
    draws = torch.empty(x.shape, dtype=torch.int16, device=x.device).random_(-32768, 32768)
    keep = draws >= cut - 32768
    return torch.where(keep, x * (DROPOUT_LEVELS / (DROPOUT_LEVELS - cut)), 0.0)


def with_fallback(allowed: torch.Tensor, fallback: str = "self") -> torch.Tensor:
    """A row with nothing allowed gets its diagonal (self) or every key (all) back, so no
    softmax runs over an empty set; the caller zeroes such rows' outputs."""
    empty = ~allowed.any(-1, keepdim=True)
    if fallback == "self":
        eye = torch.eye(
            allowed.shape[-2], allowed.shape[-1], dtype=torch.bool, device=allowed.device
        )
        return allowed | (empty & eye)
    return allowed | empty


class Attention(nn.Module):
    """Multi-head attention over [B, L, d] with a [B, Lq, Lk] allowed-mask shared by the
    heads (no per-head copies), dropout on the attention weights as nn.MultiheadAttention."""

    def __init__(self, d: int, heads: int, p: float):
        super().__init__()
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        self.heads, self.p = heads, p

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        b, lq, d = query.shape
        w_q, w_kv = self.in_proj.weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj.bias.split([d, 2 * d])
        q = nn.functional.linear(query, w_q, b_q)
        k, v = nn.functional.linear(keys, w_kv, b_kv).chunk(2, dim=-1)
        split = lambda x: x.view(b, x.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        weights = dropout(torch.softmax(scores, dim=-1), self.p, self.training)
        out = (weights @ v).transpose(1, 2).reshape(b, lq, d)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """A transformer encoder layer as UniSAR's code configures nn.TransformerEncoderLayer:
    post-LN, ReLU, feed-forward width d, dropout p."""

    def __init__(self, d: int, heads: int, p: float):
        super().__init__()
        self.attention = Attention(d, heads, p)
        self.ffn = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d)])
        self.norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
        self.p = p

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = self.norms[0](x + dropout(self.attention(x, x, allowed), self.p, self.training))
        hidden = dropout(torch.relu(self.ffn[0](x)), self.p, self.training)
        return self.norms[1](x + dropout(self.ffn[1](hidden), self.p, self.training))


class MaskedEncoder(nn.Module):
    """Transformer encoder layers over a left-aligned sequence with learned positions
    (0 = oldest), attending only where `allowed` says (Eq. 3: within the sequence;
    Eq. 4: between behaviour types); invalid slots come out as zeros."""

    def __init__(self, d: int, heads: int, layers: int, dropout: float, max_length: int):
        super().__init__()
        self.positions = nn.Embedding(max_length, d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, dropout) for _ in range(layers))

    def forward(
        self, steps: torch.Tensor, valid: torch.Tensor, allowed: torch.Tensor | None = None
    ):
        length = steps.shape[1]
        x = steps + self.positions(torch.arange(length, device=steps.device))
        pairs = valid[:, None, :] & valid[:, :, None]
        mask = with_fallback(pairs if allowed is None else pairs & allowed)
        for layer in self.layers:
            x = layer(x, mask)
        return torch.where(valid[..., None], x, 0.0)


class FusionLayer(nn.Module):
    """Eq. 7: F = MSA(H_same, H_same, H_same), V = FFN(MCA(H_cross, F, F)), with the
    residuals and post-LN of a transformer layer.

    `paper=True` is Eq. 7 as written (Q = H_cross, K = V = self-attended H_same); with
    `paper=False` it is the official code's decoder layer (Q = self-attended H_same,
    K = V = H_cross). Both sequences hold the same slots (one behaviour type)."""

    def __init__(self, d: int, heads: int, dropout: float, paper: bool = True):
        super().__init__()
        self.self_attention = Attention(d, heads, dropout)
        self.cross_attention = Attention(d, heads, dropout)
        self.ffn = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d)])
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.p, self.paper = dropout, paper

    def _drop(self, x):
        return dropout(x, self.p, self.training)

    def forward(self, same: torch.Tensor, cross: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        allowed = with_fallback(valid[:, None, :].expand(-1, valid.shape[1], -1), "all")
        attended = self.norms[0](same + self._drop(self.self_attention(same, same, allowed)))
        query, keys = (cross, attended) if self.paper else (attended, cross)
        x = self.norms[1](query + self._drop(self.cross_attention(query, keys, allowed)))
        hidden = self._drop(torch.relu(self.ffn[0](x)))
        x = self.norms[2](x + self._drop(self.ffn[1](hidden)))
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
