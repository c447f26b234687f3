"""DIEN (Zhou et al., AAAI'19), a baseline of SESRec's Table 2: DIN's target-aware
scoring with the history read as an evolving interest.

Interest extractor: a GRU over the rec history, h_t per event, supervised by the auxiliary
loss L_aux = -[log sigma(h_t . e_{t+1}) + log(1 - sigma(h_t . e^_{t+1}))] with e^ a random
other item of the rec pool (the paper sums over t and averages over users; here it is
averaged over the history's event pairs, so that alpha weighs it against the target loss
whatever the history length). Interest evolving: attention
a_t = softmax_t(h_t W e_target) and an AUGRU whose update gate is scaled by a_t,
u'_t = a_t * u_t, h'_t = (1 - u'_t) * h'_{t-1} + u'_t * h~'_t, run per candidate.
Prediction: MLP([user | target | h'_T]) (200-80-1 with PReLU, as DIN's) -> logit.
L = L_target + alpha * L_aux (alpha 1.0; `aux_weight`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sar_exp.backbones.sequence import left_aligned


class AUGRUCell(nn.Module):
    """A GRU cell whose update gate is scaled by an attention score a_t."""

    def __init__(self, dim: int):
        super().__init__()
        self.from_input = nn.Linear(dim, 3 * dim)
        self.from_state = nn.Linear(dim, 3 * dim)

    def forward(self, x, state, attention):
        return self.step(self.from_input(x), state, attention)

    def step(self, input_gates, state, attention):
        """The cell on from_input(x), computed beforehand: DIEN's input at step t, h_t, is
        the same for every candidate, so its part of the gates is computed once."""
        xu, xr, xn = input_gates.chunk(3, dim=-1)
        hu, hr, hn = self.from_state(state).chunk(3, dim=-1)
        update = torch.sigmoid(xu + hu) * attention.unsqueeze(-1)  # u'_t = a_t * u_t
        reset = torch.sigmoid(xr + hr)
        candidate = torch.tanh(xn + reset * hn)
        return (1 - update) * state + update * candidate


class DIENScorer(nn.Module):
    needs_history = True
    scores_items = True
    full_ranking = False  # an AUGRU pass per candidate: sampled evaluation only

    def __init__(self, user_dim: int, item_dim: int, mlp_dim: int = 200,
                 aux_weight: float = 1.0, **_):  # fmt: skip
        super().__init__()
        self.extractor = nn.GRU(item_dim, item_dim, batch_first=True)
        self.attention = nn.Linear(item_dim, item_dim, bias=False)  # W in h_t W e_target
        self.evolver = AUGRUCell(item_dim)
        self.aux_weight = aux_weight
        self.predict = nn.Sequential(
            nn.Linear(user_dim + 2 * item_dim, mlp_dim), nn.PReLU(),
            nn.Linear(mlp_dim, 80), nn.PReLU(), nn.Linear(80, 1),
        )  # fmt: skip

    def interests(self, history, mask):
        """h_t of the interest extractor, left-aligned (padding after the valid events)."""
        history, mask = left_aligned(history, mask)
        states, _ = self.extractor(history)
        return states, history, mask

    def forward(self, user_emb, items, rec_history, rec_mask, query_history=None, query_mask=None):
        states, _, mask = self.interests(rec_history, rec_mask)
        logits = torch.einsum("bld,bkd->bkl", self.attention(states), items)
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
        # a row without history attends to nothing; its evolved interest stays zero
        attention = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        parts = [user_emb.unsqueeze(1).expand(-1, items.shape[1], -1), items,
                 self.evolve(states, attention, mask)]  # fmt: skip
        return self.predict(torch.cat(parts, dim=-1)).squeeze(-1)

    def evolve(self, states, attention, mask):
        """h'_T of the AUGRU run over each user's valid (left-aligned) events, once per
        candidate: states [B, L, d], attention [B, K, L], mask [B, L] -> [B, K, d].

        Users are taken longest history first, so the rows still running at step t are a
        prefix and only those are computed (most slots are padding: 13 valid events of 40
        on average in a SESRec batch of the embedded data)."""
        b, k, _ = attention.shape
        counts = mask.sum(1)
        order = torch.argsort(counts, descending=True, stable=True)
        input_gates = self.evolver.from_input(states)[order]  # [B, L, 3d], one per event
        attention, lengths = attention[order], counts[order]
        evolved = states.new_zeros(b, k, states.shape[-1])
        # at least one step, on no rows when no user has history: every parameter stays in
        # the graph (DDP requires it); the users still running at each step, read at once
        steps = max(int(counts.max()), 1) if b else 0
        running = (lengths[:, None] > torch.arange(steps, device=lengths.device)).sum(0).tolist()
        for t, n in enumerate(running):
            step = self.evolver.step(input_gates[:n, t, None], evolved[:n], attention[:n, :, t])
            evolved = torch.cat([step, evolved[n:]])
        return evolved[torch.argsort(order)]

    def auxiliary_loss(self, rec_history, rec_mask, negatives):
        """L_aux over each (h_t, e_{t+1}) pair of the history; `negatives` [B, L, d]: the
        embedding of a random item, other than the one clicked there, for each slot."""
        states, history, mask = self.interests(rec_history, rec_mask)
        pairs = (mask[:, :-1] & mask[:, 1:]).to(states.dtype)
        if states.shape[1] < 2:  # no pair: keep every parameter in the graph
            return 0.0 * states.sum()
        positive = (states[:, :-1] * history[:, 1:]).sum(-1)
        negative = (states[:, :-1] * negatives[:, 1:]).sum(-1)
        loss = F.softplus(-positive) + F.softplus(negative)  # -log sigma(p) - log(1 - sigma(n))
        return (loss * pairs).sum() / pairs.sum().clamp(min=1)
