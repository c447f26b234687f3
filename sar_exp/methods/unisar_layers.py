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
from sar_exp.backbones.sequence import LengthGroups, by_length, grouped_outputs

DROPOUT_LEVELS = 1 << 16


def dropout_mask(shape, p: float, device, dtype=torch.float32) -> torch.Tensor:
    """1 (kept) with probability 1 - p rounded to a multiple of 2^-16, else 0, as `dtype`:
    16-bit draws cut from 64-bit ones (a float draw per element, or torch's bernoulli_,
    took a fifth of UniSAR's CPU step; one 64-bit draw per four elements takes a quarter
    of the time of an int16 draw per element). Written straight as floats: multiplying by
    a bool mask converts it on every use, which takes five times as long."""
    cut = round(p * DROPOUT_LEVELS)
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    draws = words.random_(-(2**63), None).view(torch.int16)[:count].view(shape)
    return torch.ge(draws, cut - 32768, out=torch.empty(shape, dtype=dtype, device=device))


def dropout_scale(p: float) -> float:
    """1 / (1 - rate) for dropout_mask's rate, so the expectation is unchanged."""
    cut = round(p * DROPOUT_LEVELS)
    return DROPOUT_LEVELS / (DROPOUT_LEVELS - cut)


ACTIVATIONS = {"relu": torch.relu, "leaky_relu": nn.functional.leaky_relu}


def dropped_linear(x: torch.Tensor, layer: nn.Linear, p: float, training: bool,
                   activation: str | None = None) -> torch.Tensor:  # fmt: skip
    """dropout(layer(x)) (or dropout(activation(layer(x))), a ReLU or leaky ReLU) in one
    pass over the output: the 1 / (1 - p) scale goes into the layer's weight and bias
    (f(s z) = s f(z) for both activations and s > 0)."""
    act = ACTIVATIONS[activation] if activation else None
    if not training or p == 0.0:
        out = layer(x)
        return act(out) if act else out
    scale = dropout_scale(p)
    out = nn.functional.linear(x, layer.weight * scale, layer.bias * scale)
    out = act(out) if act else out
    return out * dropout_mask(out.shape, p, out.device, out.dtype)


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
    heads (no per-head copies), dropout on the attention weights as nn.MultiheadAttention.

    Each head reads its slice of the projections in place (a strided view that bmm takes
    as it is) rather than a [B, heads, L, d / heads] transposed copy; 1 / sqrt(d / heads)
    and the weight dropout's 1 / (1 - p) are folded into the q and v projections."""

    def __init__(self, d: int, heads: int, p: float):
        super().__init__()
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        self.heads, self.p = heads, p

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor,
        drop_output: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """drop_output: dropout (the same p) on the output too, as a residual branch has."""
        b, lq, d = query.shape
        width = d // self.heads
        dropping = self.training and self.p > 0
        scale = torch.ones(3, d, dtype=query.dtype, device=query.device)
        scale[0] = 1 / math.sqrt(width)
        if dropping:  # the weights' dropout scale, on v (weights @ (s v) = (s weights) @ v)
            scale[2] = dropout_scale(self.p)
        weight = self.in_proj.weight * scale.view(-1, 1)
        bias = self.in_proj.bias * scale.view(-1)

        def heads(x: torch.Tensor, rows: slice) -> list[torch.Tensor]:
            out = nn.functional.linear(x, weight[rows], bias[rows])
            return list(out.split(width, dim=-1))

        if query is keys:  # self-attention: one projection
            projected = heads(query, slice(None))
        else:
            projected = heads(query, slice(0, d)) + heads(keys, slice(d, 3 * d))
        q, k, v = (projected[i * self.heads : (i + 1) * self.heads] for i in range(3))
        blocked = ~allowed
        outputs = []
        for q_h, k_h, v_h in zip(q, k, v, strict=True):
            scores = torch.bmm(q_h, k_h.transpose(1, 2)).masked_fill_(blocked, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            if dropping:
                weights = weights * dropout_mask(
                    weights.shape, self.p, weights.device, weights.dtype
                )
            outputs.append(torch.bmm(weights, v_h))
        out = torch.cat(outputs, dim=-1)
        return dropped_linear(out, self.out_proj, self.p if drop_output else 0.0, self.training)


class EncoderLayer(nn.Module):
    """A transformer encoder layer as UniSAR's code configures nn.TransformerEncoderLayer:
    post-LN, ReLU, feed-forward width d, dropout p (SESRec's code: a leaky ReLU,
    LayerNorm eps 1e-8 and no dropout between the two feed-forward layers)."""

    def __init__(self, d: int, heads: int, p: float, activation: str = "relu", eps: float = 1e-5,
                 hidden_dropout: bool = True):  # fmt: skip
        super().__init__()
        self.attention = Attention(d, heads, p)
        self.ffn = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d)])
        self.norms = nn.ModuleList([nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)])
        self.p, self.activation = p, activation
        self.hidden_p = p if hidden_dropout else 0.0  # SESRec's code: no dropout inside the FFN

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = self.norms[0](x + self.attention(x, x, allowed, drop_output=True))
        hidden = dropped_linear(x, self.ffn[0], self.hidden_p, self.training, self.activation)
        return self.norms[1](x + dropped_linear(hidden, self.ffn[1], self.p, self.training))


class MaskedEncoder(nn.Module):
    """Transformer encoder layers over a left-aligned sequence with learned positions
    (0 = oldest), attending only where `allowed` says (Eq. 3: within the sequence;
    Eq. 4: between behaviour types); invalid slots come out as zeros."""

    def __init__(self, d: int, heads: int, layers: int, dropout: float, max_length: int,
                 activation: str = "relu", eps: float = 1e-5, hidden_dropout: bool = True):  # fmt: skip
        super().__init__()
        self.positions = nn.Embedding(max_length, d)
        self.layers = nn.ModuleList(
            EncoderLayer(d, heads, dropout, activation, eps, hidden_dropout) for _ in range(layers)
        )

    def forward(
        self, steps: torch.Tensor, valid: torch.Tensor, types: torch.Tensor | None = None,
        output_valid: torch.Tensor | None = None,
    ):  # fmt: skip
        """types [B, L]: with them, a slot attends only to slots of another type (Eq. 4's
        mask M); output_valid: the slots whose output is kept (default: the valid ones)."""
        grouped, pieces = self.grouped(steps, valid, types, output_valid)
        return grouped.dense(pieces)

    def grouped(
        self, steps: torch.Tensor, valid: torch.Tensor, types: torch.Tensor | None = None,
        output_valid: torch.Tensor | None = None, source: torch.Tensor | None = None,
    ) -> tuple[LengthGroups, list[torch.Tensor]]:  # fmt: skip
        """forward's output left in its length groups (LengthGroups.read takes out the
        slots wanted); with `source` [B, L], steps is a table [N, d] whose row source[b, l]
        is slot (b, l) (the merged history's events, read from the two histories)."""
        grouped = LengthGroups(valid)
        features = (valid,) if types is None else (valid, types)
        shown = valid if output_valid is None else output_valid
        pieces = grouped_outputs(self.group, grouped, (steps,), features, shown, (source,))
        return grouped, pieces

    def group(self, x: torch.Tensor, valid: torch.Tensor, types: torch.Tensor | None = None):
        """The layers on rows cut to a common length n (slots 0..n-1, so positions 0..n-1),
        with their masks built at that size."""
        if x.shape[1] > self.positions.num_embeddings:  # (the weight slice would broadcast)
            raise ValueError(
                f"MaskedEncoder: {x.shape[1]} slots, positions for {self.positions.num_embeddings}"
            )
        x = x + self.positions.weight[: x.shape[1]]
        allowed = valid[:, None, :] & valid[:, :, None]
        if types is not None:
            allowed = allowed & (types[:, :, None] != types[:, None, :])
        return self._layers(x, with_fallback(allowed))

    def _layers(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


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

    def forward(self, same: torch.Tensor, cross: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return by_length(self.group, valid, (same, cross), (valid,))

    def group(self, same: torch.Tensor, cross: torch.Tensor, valid: torch.Tensor):
        """Eq. 7 on rows cut to a common length: every slot attends to the valid ones."""
        allowed = with_fallback(valid[:, None, :].expand(-1, valid.shape[1], -1), "all")
        return self._fuse(same, cross, allowed)

    def _fuse(self, same: torch.Tensor, cross: torch.Tensor, allowed: torch.Tensor):
        attended = self.norms[0](same + self.self_attention(same, same, allowed, drop_output=True))
        query, keys = (cross, attended) if self.paper else (attended, cross)
        x = self.norms[1](query + self.cross_attention(query, keys, allowed, drop_output=True))
        hidden = dropped_linear(x, self.ffn[0], self.p, self.training, "relu")
        return self.norms[2](x + dropped_linear(hidden, self.ffn[1], self.p, self.training))


class TargetAttention(nn.Module):
    """Eq. 8: v = V^T softmax(V W e_i) over the valid history slots, per candidate."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Linear(d, d, bias=False)

    def forward(self, history: torch.Tensor, valid: torch.Tensor, candidates: torch.Tensor):
        """history [B, L, d], valid [B, L], candidates [B, K, d] -> [B, K, d]."""
        return self.pooled(history, candidates, [valid])[0]

    def pooled(self, history: torch.Tensor, candidates: torch.Tensor, masks: list) -> list:
        """forward over each [B, L] mask of slots, the scores computed once (SESRec Eq.
        17-19: all, similar and dissimilar behaviours with one W)."""
        scores = torch.einsum("bld,bkd->bkl", self.weight(history), candidates)
        out = []
        for valid in masks:
            masked = scores.masked_fill(~valid[:, None, :], float("-inf"))
            weights = torch.softmax(masked, dim=-1)
            weights = torch.where(valid.any(-1)[:, None, None], weights, 0.0)  # none: zeros
            out.append(torch.einsum("bkl,bld->bkd", weights, history))
        return out


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
                 mmoe: bool = True, tasks: tuple[str, ...] = ("rec", "search"),
                 per_row_columns: list[int] | None = None):  # fmt: skip
        """per_row_columns: the input columns that forward's `rows` fill (the same for every
        candidate of a row); the others, in order, are x's."""
        super().__init__()
        columns = torch.zeros(in_dim, dtype=torch.bool)
        columns[per_row_columns or []] = True
        self.register_buffer("per_row", columns, persistent=False)
        self.TASKS = tuple(tasks)
        self.mmoe, self.paper = mmoe and len(self.TASKS) == 2, paper
        if not self.mmoe:
            self.heads = nn.ModuleDict({t: mlp(in_dim, d, 2, out_dim=1) for t in self.TASKS})
            return

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

    def forward(self, x: torch.Tensor, task: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in_dim] -> [...] logits of `task`. With `rows` [B, r], the input is x
        [B, K, in_dim - r] with rows (repeated over the K candidates) at per_row_columns:
        the part that is the same for every candidate (user, query) goes through the first
        layers once per row. The first layers of the task's experts and its gate run as
        one product."""
        per_row = self.per_row if rows is not None else None
        if not self.mmoe:
            head = self.heads[task]
            return head[1:](_first_layer([head[0]], x, rows, per_row)[0]).squeeze(-1)
        experts = [*self.experts[task], *self.experts["shared"]]
        layers = [e[0] for e in experts] + [self.gates[task]]
        *hidden, gate = _first_layer(layers, x, rows, per_row)
        outputs = torch.stack([e[1:](h) for e, h in zip(experts, hidden, strict=True)], dim=-2)
        mixed = (torch.softmax(gate, dim=-1).unsqueeze(-1) * outputs).sum(-2)  # [..., out]
        return (mixed if self.paper else self.towers[task](mixed)).squeeze(-1)


def _first_layer(layers: list[nn.Linear], x: torch.Tensor, rows: torch.Tensor | None,
                 per_row: torch.Tensor | None):  # fmt: skip
    """[layer(input) for layer in layers] as one product, the input being x or, with rows,
    x with rows at the columns `per_row` marks (their part: one more product, per row)."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers])
    if rows is None:
        out = nn.functional.linear(x, weight, bias)
    else:
        out = nn.functional.linear(x, weight[:, ~per_row], bias)
        out = out + nn.functional.linear(rows, weight[:, per_row]).unsqueeze(-2)
    return out.split([layer.out_features for layer in layers], dim=-1)
