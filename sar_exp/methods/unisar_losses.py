"""UniSAR's contrastive losses (Shi et al., SIGIR'24): query-item relevance L_Rel (Eq. 2)
and transition alignment L_Align (Eq. 5-6), shared with SESRec's L_ali (its Eq. 6-8).
Both use sim(a, b) = tanh(a W b^T) / tau with a learnable temperature.

Three forms (`form`):
- "paper": the equations' negatives and terms (the two directions add up; L_Align's
  negatives are other users' rows) with the positive added to each denominator. The
  printed denominators sum over the negatives only, which makes the loss unbounded below
  once the positives beat the negatives: a learnable tau then falls to any floor it is
  given (L_Align reached -248 by epoch 25 with tau at the floor, the click loss 0.3). A
  contrastive loss with a learned temperature needs the InfoNCE denominator, so that is
  the paper's default here.
- "printed": the denominators as printed (negatives only), tau floored at MIN_TEMPERATURE.
- "official": the authors' code: cross-entropy with the positive in the denominator,
  0.5 x (both directions) for L_Rel, and NT-Xent over the 2B pooled rows (every other row
  a negative) for L_Align.

The paper's forms sum both directions without the code's 0.5, and L_Align's two terms
each average over rows where NT-Xent averages over 2B anchors: alpha and beta, tuned for
the code's forms, weigh about twice as much here.

L_Rel is computed from the distinct queries and items of a batch's pairs: every (query,
clicked item) pair of the batch's history sessions contributes, but the log-sum-exp over
the sampled negatives depends only on the query (item side) or only on the item (query
side), so it is computed once for each distinct one that occurs in a pair. The loss is the same as a
per-pair computation, at a fraction of the cost."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.methods.losses import info_nce

MIN_TEMPERATURE = 0.01


FORMS = ("paper", "printed", "official")


def _checked(form: str) -> str:
    if form not in FORMS:  # (a stray bool from the old `paper=` argument would pass)
        raise ValueError(f"contrastive loss form must be one of {list(FORMS)}, got {form!r}")
    return form


def loss_form(paper_losses: bool, positive_in_denominator: bool) -> str:
    """The form the methods' two flags pick: paper_losses=false is the official code's
    (which has the positive in its denominators anyway)."""
    if not paper_losses:
        return "official"
    return "paper" if positive_in_denominator else "printed"


class BilinearSimilarity(nn.Module):
    """sim(a, b) = tanh(a W b^T) / tau (Eq. 2), tau learnable from `temperature`.

    `paper=True` (the paper's forms): tau is kept positive (learned as log tau, at least
    MIN_TEMPERATURE): the printed Eq. 2 and 5 leave the positive out of the denominator,
    so once positives beat the negatives that loss falls without bound as tau -> 0 and an
    unconstrained tau goes through zero. `paper=False` (the official code): tau itself is
    the parameter, never clamped, and weight decay reaches it."""

    def __init__(self, d: int, temperature: float, paper: bool = True):
        super().__init__()
        self.weight = nn.Linear(d, d, bias=False)
        nn.init.xavier_normal_(self.weight.weight)
        self.paper = paper
        value = torch.tensor(float(temperature))
        self.log_temperature = nn.Parameter(value.log()) if paper else None
        self.raw_temperature = None if paper else nn.Parameter(value)

    @property
    def temperature(self) -> torch.Tensor:
        if self.paper:
            return self.log_temperature.exp().clamp(min=MIN_TEMPERATURE)
        return self.raw_temperature

    def matrix(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[Na, d], [Nb, d] -> [Na, Nb]."""
        return torch.tanh(self.weight(a) @ b.T) / self.temperature

    def pairs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[N, d], [N, d] -> [N]."""
        return torch.tanh((self.weight(a) * b).sum(-1)) / self.temperature

    def zero(self) -> torch.Tensor:
        """A zero loss that still reaches every parameter (a batch without pairs must not
        leave them without a gradient: multi-process training needs one for each)."""
        return 0.0 * (self.weight.weight.sum() + self.temperature)


def relevance_loss(
    sim: BilinearSimilarity,
    query_emb: torch.Tensor,
    item_emb: torch.Tensor,
    pair_query: torch.Tensor,
    pair_item: torch.Tensor,
    negative_items: torch.Tensor,
    negative_queries: torch.Tensor,
    form: str = "paper",
    in_batch: bool = False,
    segments: list[int] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Eq. 2 over the pairs (pair_query[k], pair_item[k]), indices into the distinct
    query_emb [Uq, d] and item_emb [Ui, d]; negatives [N, d] are shared by the batch.
    `in_batch`: the batch's other pairs' items (queries) are negatives too, except those
    paired with the same query (item) somewhere in the batch.
    `segments`: the pairs are consecutive runs of these sizes (one per batch sharing the
    negatives), each with its own loss, returned as a list; a query or item in several
    runs has its log-sum-exp computed once. Not with `in_batch`, whose negatives are a
    run's own pairs."""
    _checked(form)
    if segments is not None:
        if in_batch:
            raise ValueError("relevance_loss: segments cannot share in-batch negatives")
        terms = _relevance_terms(sim, query_emb, item_emb, pair_query, pair_item,
                                 negative_items, negative_queries, form, False)  # fmt: skip
        empty = sim.zero() + 0.0 * query_emb.sum()
        return [t.mean() if t.numel() else empty for t in terms.split(segments)]
    if pair_query.numel() == 0:
        return sim.zero() + 0.0 * query_emb.sum()
    return _relevance_terms(
        sim, query_emb, item_emb, pair_query, pair_item, negative_items, negative_queries,
        form, in_batch,
    ).mean()  # fmt: skip


def _relevance_terms(sim, query_emb, item_emb, pair_query, pair_item, negative_items,
                     negative_queries, form: str, in_batch: bool) -> torch.Tensor:  # fmt: skip
    """Eq. 2's term of each pair, [P]."""
    if pair_query.numel() == 0:
        return query_emb.new_zeros(0)
    positive = sim.pairs(query_emb[pair_query], item_emb[pair_item])  # [P]
    # the log-sum-exps only for the queries and items that occur in pairs
    queries, pair_q = torch.unique(pair_query, return_inverse=True)
    items, pair_i = torch.unique(pair_item, return_inverse=True)
    q_emb, i_emb = query_emb[queries], item_emb[items]
    item_scores = sim.matrix(q_emb, negative_items)  # [Uq', N]
    query_scores = sim.matrix(negative_queries, i_emb).T  # [Ui', N]
    if in_batch:
        paired = torch.zeros(len(queries), len(items), dtype=torch.bool, device=q_emb.device)
        paired[pair_q, pair_i] = True
        batch_scores = sim.matrix(q_emb, i_emb).masked_fill(paired, float("-inf"))
        item_scores = torch.cat([item_scores, batch_scores], dim=1)
        query_scores = torch.cat([query_scores, batch_scores.T], dim=1)
    items_lse = torch.logsumexp(item_scores, dim=1)[pair_q]
    queries_lse = torch.logsumexp(query_scores, dim=1)[pair_i]
    if form == "printed":  # -[log e^s / sum_neg e^s- (q -> i) + log e^s / sum_neg e^s- (i -> q)]
        return items_lse + queries_lse - 2 * positive
    # each direction's denominator with the positive in it
    both = torch.logaddexp(positive, items_lse) + torch.logaddexp(positive, queries_lse)
    return both - 2 * positive if form == "paper" else 0.5 * (both - 2 * positive)


def alignment_loss(
    sim: BilinearSimilarity,
    same: torch.Tensor,
    cross: torch.Tensor,
    valid: torch.Tensor,
    user: torch.Tensor,
    form: str = "paper",
) -> torch.Tensor:
    """Eq. 5 for one scenario: the pooled same-scenario transition (h_s2s or h_r2r) and
    the cross-scenario one (h_r2s or h_s2r) of a row are positives; rows without both
    histories (valid=False) take no part."""
    _checked(form)
    same, cross, user = same[valid], cross[valid], user[valid]
    n = same.shape[0]
    if n < 2:
        return sim.zero() + 0.0 * same.sum()
    if form != "official":
        scores = sim.matrix(same, cross)  # [n, n]: row b's same vs row b''s cross
        positive = scores.diagonal()
        negative = user[:, None] != user[None, :]  # other users' rows (Eq. 5)
        has = negative.any(1)
        masked = scores.masked_fill(~negative, float("-inf"))
        lse_cross = torch.logsumexp(masked, dim=1)  # sum over h_cross^- for this h_same
        lse_same = torch.logsumexp(masked.T, dim=1)  # sum over h_same^- for this h_cross
        if form == "paper":  # the positive in each denominator
            lse_cross = torch.logaddexp(lse_cross, positive)
            lse_same = torch.logaddexp(lse_same, positive)
        terms = (lse_cross + lse_same - 2 * positive)[has]
        return terms.mean() if terms.numel() else sim.zero() + 0.0 * same.sum()
    rows = torch.cat([same, cross])  # NT-Xent (SimCLR) over 2n rows
    own = torch.arange(2 * n, device=rows.device)
    positive = torch.zeros(2 * n, 2 * n, dtype=torch.bool, device=rows.device)
    positive[own, (own + n) % (2 * n)] = True  # the row's other view
    return info_nce(sim.matrix(rows, rows), positive, own[:, None] == own[None, :])
