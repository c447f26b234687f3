"""UnifiedSSR (Xie et al., WWW'24, arXiv 2310.13921): a unified framework of sequential
search and recommendation, a baseline row of UniSAR's Tables 3 and 4.

The paper is not on disk; what follows is read from its abstract and from the official
code (github.com/JennyXieJiayi/UnifiedSSR: model.py, modules.py, batch.py, pretrain.py,
train.py), cited below by file and class; no equation numbers are given because the
paper's text could not be read. Nothing is copied from that code.

Architecture (model.py `UnifiedSSR`, modules.py `SiameseEncoder`):
  * Three behaviour types: products clicked in the rec scenario, and the (product, query)
    pairs of the search scenario. Products share one embedding table, used for the
    history and for the candidates alike (tied, as the code's p_embed); a query is the
    mean of its word embeddings; the user's embedding is added to every slot, then
    sinusoidal positions (the code's PositionalEncoding) and dropout.
  * The dual-branch network: in the search scenario a product branch over the search
    clicks' products and a query branch over their queries run in parallel through one
    Siamese encoder (the branches share its parameters). Each layer: self-attention over
    its own branch, cross-attention from its branch to the other branch's input (the
    "cross-view" association), a feed-forward network; pre-LN residual blocks and a final
    LayerNorm. The slots are aligned as the code's batch.py aligns them: query slot t holds
    the query that led to product t, product slot t the product before it, so the last
    slot holds the current query on the query branch and the newest clicked product on
    the product branch ([begin, p_1..p_T] against [q_1..q_T, q_now]).
  * The rec scenario deactivates the query branch: the product branch over the rec
    history, whose cross-attention reads its own input; by default the same encoder as
    the search scenario's ("parameter sharing ... between product branches in two
    scenarios", abstract), so UniSAR's Table 1 reads it as r2r and s2s modelled
    separately (one history each) but not with separate parameters.
  * Intent-oriented Session Modeling (ISM; modules.py `SequencePartition`, model.py
    `intra_corr_loss` / `inter_corr_loss`): each branch's output is cut into
    `sub_seq_num` windows ("semantic sessions"), each slot gets its window's mean added,
    and a self-supervised loss pushes adjacent windows of a branch apart (|cos|, session
    discrimination) and the product and query branches' windows of the same index together
    (cos, session alignment), weighted by corr_factor.
  * Prediction reads the last slot: rec scores <h_p, e_i>; search scores
    w <h_p, e_i> + (1 - w) <h_q, e_i> with a learned w kept in [0.1, 0.9] (the code's
    next_product_search_w). Both are trained with binary cross-entropy of the positive and
    the sampled negatives (the code's 4; `data.num_train_negatives`), summed over a row's
    candidates and averaged over rows; search as w L(h_p) + (1 - w) L(h_q), as the code.
  * Pre-training then fine-tuning (pretrain.py, train.py; UniSAR Sec. 4.4, Discussion:
    "USER and UnifiedSSR derive two parameter sets for S&R tasks via pre-training and
    fine-tuning"): `finetune_task` rec|search trains both tasks' losses for the first
    `pretrain_epochs` epochs, then only that task's; null trains both throughout. The
    switch is shared with USER (sar_exp/methods/pretrain_finetune.py): the other task's
    loss still computed but weighted 0 (every parameter keeps a gradient, for DDP), Adam's
    state cleared once at the switch, as the code's train.py starts fine-tuning with a new
    optimizer, and model selection (early stopping, the best checkpoint) within the
    fine-tuning epochs, as the code's train.py selects.

Ours, where the code is unclear or does not fit the framework's protocol:
  * One target per row (the event's item, scored at the last slot, histories before its
    cut-off) instead of the code's next-product loss at every slot; the code's attention
    masks are padding masks only (its subsequent_mask is never used), so every slot there
    sees later products, which the framework's protocol does not allow.
  * Each step sums the rec batch's loss and the companion search batch's loss (JSR's
    arrangement); the code alternates whole batches of one scenario.
  * The product branch starts with a begin slot (the user's embedding and position 0 with
    no product) in both scenarios, so an empty history is still a sequence; the code pads
    that slot in the search scenario and masks it. ISM leaves slot 0 out in both
    scenarios, as the code drops slot 0 of both search branches before ISM (its rec
    sequences have no begin slot): the product branch's begin and the query branch's q_1
    are in no window (a row with no history has no window and no ISM loss).
  * The layers are stacked (layer l reads layer l-1's output); the code's SiameseEncoder
    loop feeds every layer the raw input and keeps only the last layer's output, which
    leaves the earlier layers untrained. Cross-attention keys are the other branch's input
    at every layer, as in the code.
  * ISM windows: the code predicts window offsets from the pooled output, but its windows
    become boolean masks, so the offset predictor never receives a gradient and its windows
    stay where the untrained predictor puts them at init: with sub_seq_num 2 about
    [0.125, 0.375] and [0.625, 0.875] of the PADDED length (a quarter of the sequence
    each, centred on its halves; slots outside both are in no window, and a short history
    can fall outside both). Ours: each row's VALID slots (after slot 0) split into
    sub_seq_num equal consecutive windows that cover them all.
  * Framework pieces: the shared [id | attributes] user and item tables and the word-mean
    query encoder, projected to d (Linear) and scaled by sqrt(d) as the code's Embeddings;
    the framework's Attention block (one dropout rate for attention weights and residuals;
    the code: 0.1 and `dropout`); torch's LayerNorm (the code divides by the unbiased std
    plus eps); Adam at a fixed rate with torch's defaults (the code: the Noam schedule,
    warmup 4000, Adam betas (0.9, 0.98) and eps 1e-9); the framework's initialisation,
    not the code's Xavier-uniform init of every matrix.
  * w is clamped into [0.1, 0.9] where it is used; the parameter itself is not changed
    (the code clamps its data in place inside the loss).
  * The search scenario's pairs are the framework's search-click history (one slot per
    clicked item with its query, the last max_search_history before the event); a search
    without a click has no product and is not in it, as in the code's (query, product)
    sequences.
Not reproduced: the learned ISM window offsets (see above), the Noam schedule, the
code's evaluation (full vocabulary or its own 99 negatives at every position; here the
framework's protocol). Ours, not the paper's: use_cross_view=false (each search branch
cross-attends to its own input) and use_shared_encoder=false (one encoder per scenario,
as UniSAR's Table 1 reads it), two ablations; use_ism=false is the code's corr_factor 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sar_exp.errors import ConfigError
from sar_exp.methods.base import RecommenderModule
from sar_exp.methods.pretrain_finetune import TASKS, PretrainFinetuneSwitch, check_finetune_settings
from sar_exp.methods.unisar_layers import Attention, dropped_linear, with_fallback

MIX_RANGE = (0.1, 0.9)  # the code clamps next_product_search_w to [0.1, 0.9]


def sinusoidal_positions(length: int, d: int) -> torch.Tensor:
    """[length, d] fixed sine/cosine positions (the code's PositionalEncoding)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(length, d)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)[:, : d // 2]
    return table


class SiameseLayer(nn.Module):
    """One layer of the dual-branch encoder (modules.py `SiameseEncoderLayer`): pre-LN
    residual blocks of self-attention over the branch, cross-attention from the branch to
    the other branch's input, and a feed-forward network d -> ffn -> d."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attention = Attention(d, heads, dropout)
        self.cross_attention = Attention(d, heads, dropout)
        self.ffn = nn.ModuleList([nn.Linear(d, ffn), nn.Linear(ffn, d)])
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.p = dropout

    def forward(self, x, other, self_allowed, cross_allowed):
        h = self.norms[0](x)
        x = x + self.self_attention(h, h, self_allowed, drop_output=True)
        x = x + self.cross_attention(self.norms[1](x), other, cross_allowed, drop_output=True)
        hidden = dropped_linear(self.norms[2](x), self.ffn[0], self.p, self.training, "relu")
        return x + dropped_linear(hidden, self.ffn[1], self.p, self.training)


class SiameseEncoder(nn.Module):
    """Stacked SiameseLayers and a final LayerNorm (modules.py `SiameseEncoder`). A branch
    is encoded with the other branch's input as the cross-attention keys; the rec
    scenario (query branch deactivated) passes the branch's own input."""

    def __init__(self, d: int, heads: int, ffn: int, layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(SiameseLayer(d, heads, ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x, valid, other, other_valid):
        self_allowed = with_fallback(valid[:, None, :].expand(-1, valid.shape[1], -1), "all")
        cross_allowed = with_fallback(other_valid[:, None, :].expand(-1, valid.shape[1], -1), "all")
        for layer in self.layers:
            x = layer(x, other, self_allowed, cross_allowed)
        return self.norm(x) * valid[..., None].to(x.dtype)


def sessions(h: torch.Tensor, valid: torch.Tensor, n: int):
    """ISM's semantic sessions of one branch: each row's valid slots (left-aligned) in n
    equal consecutive windows (the code's uniform SubsequenceCoder). Returns the output
    with each slot's window mean added (model.py intra_corr_loss), the [B, n, d] window
    means, and the rows whose n windows are all non-empty."""
    length = valid.sum(1, keepdim=True)
    slot = torch.arange(h.shape[1], device=h.device)[None, :]
    window = torch.div(slot * n, length.clamp(min=1), rounding_mode="floor").clamp(max=n - 1)
    member = F.one_hot(window, n).to(h.dtype) * valid[..., None].to(h.dtype)  # [B, L, n]
    counts = member.sum(1)  # [B, n]
    means = member.transpose(1, 2) @ h / counts.clamp(min=1.0)[..., None]
    return h + member @ means, means, (counts > 0).all(1)


def sessions_after_begin(h: torch.Tensor, valid: torch.Tensor, n: int):
    """sessions() over slots 1.. : slot 0 (the product branch's begin, the query branch's
    q_1) is in no window, as the code drops slot 0 before ISM."""
    rest, means, full = sessions(h[:, 1:], valid[:, 1:], n)
    return torch.cat([h[:, :1], rest], dim=1), means, full


def discrimination(means: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Session discrimination within a sequence: mean |cos| of adjacent windows over the
    rows with every window (model.py intra_corr_loss keeps the first off-diagonal)."""
    if means.shape[1] < 2:
        return means.sum() * 0.0
    cos = F.cosine_similarity(means[:, :-1], means[:, 1:], dim=-1).abs().mean(1)
    return _row_mean(cos, full)


def alignment(p_means: torch.Tensor, q_means: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Session alignment between the dual sequences: mean cos of the product and query
    branches' windows of the same index (model.py inter_corr_loss), to be maximised."""
    return _row_mean(F.cosine_similarity(p_means, q_means, dim=-1).mean(1), full)


def _row_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    weights = rows.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def candidate_bce(scores: torch.Tensor) -> torch.Tensor:
    """The code's loss: -log s(pos) - sum_neg log(1 - s(neg)) per row (the positive in
    column 0), averaged over rows."""
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(scores, labels, reduction="none").sum(1).mean()


class UnifiedSSR(PretrainFinetuneSwitch, RecommenderModule):
    def __init__(
        self,
        schema: dict,
        backbone: dict,
        heads: int = 4,
        layers: int = 2,
        ffn_dim: int | None = None,
        dropout: float = 0.5,
        sub_seq_num: int = 2,
        corr_factor: float = 0.1,
        use_ism: bool = True,
        use_cross_view: bool = True,
        use_shared_encoder: bool = True,
        finetune_task: str | None = None,
        pretrain_epochs: int = 5,
        **kwargs,
    ):
        super().__init__(schema, backbone, **kwargs)
        d = self.hparams.hidden_dim
        check_finetune_settings(finetune_task, pretrain_epochs)
        if d % heads:
            raise ConfigError(f"method.module.hidden_dim={d} is not divisible by heads={heads}")
        if use_ism and sub_seq_num < 1:
            raise ConfigError(f"method.module.sub_seq_num must be >= 1, got {sub_seq_num}")
        self.scale = math.sqrt(d)  # the code's Embeddings multiply by sqrt(emb_size)
        self.user_projection = nn.Linear(self.users.out_dim, d)
        self.item_projection = nn.Linear(self.items.out_dim, d)
        self.query_projection = nn.Linear(self.queries.out_dim, d)
        ffn = ffn_dim or 2 * d  # the code: hid_size = 2 * emb_size
        scenarios = ("shared",) if use_shared_encoder else TASKS
        self.encoders = nn.ModuleDict(
            {s: SiameseEncoder(d, heads, ffn, layers, dropout) for s in scenarios}
        )
        self.mix = nn.Parameter(torch.tensor(0.5))  # w, the code's next_product_search_w
        longest = 1 + max(schema["max_rec_history"], schema["max_search_history"])
        self.register_buffer("positions", sinusoidal_positions(longest, d), persistent=False)
        self.input_dropout = nn.Dropout(dropout)

    # ------------------------------------------------------------ embeddings
    def item_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The product embedding, read by the histories and the candidates alike."""
        return self.item_projection(self.items(ids)) * self.scale

    def _inputs(self, steps: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """Slot embeddings + the user's embedding + positions, then dropout (model.py)."""
        x = steps + user[:, None, :] + self.positions[: steps.shape[1]]
        return self.input_dropout(x)

    def _encoder(self, scenario: str) -> SiameseEncoder:
        return self.encoders["shared" if "shared" in self.encoders else scenario]

    # ------------------------------------------------------------ branches
    def rec_branch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The rec scenario's product branch over [begin, rec history] ([B, 1 + L, d])
        and its valid slots; the query branch is deactivated (cross-attention reads the
        branch's own input)."""
        user = self.user_projection(self.users(batch["user"])) * self.scale
        items = self.item_embedding(batch["rec_history"])
        steps = torch.cat([torch.zeros_like(items[:, :1]), items], dim=1)
        valid = F.pad(batch["rec_history_mask"], (1, 0), value=True)
        x = self._inputs(steps, user)
        return self._encoder("rec")(x, valid, x, valid), valid

    def search_branches(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The search scenario's dual branches ([B, 1 + L, d] each) and their valid slots:
        products [begin, p_1..p_T] and queries [q_1..q_T, q_now], in parallel through the
        shared encoder, each cross-attending to the other's input (use_cross_view) or to
        its own."""
        user = self.user_projection(self.users(batch["user"])) * self.scale
        clicks, mask = batch["search_click_history_item"], batch["search_click_history_mask"]
        count = mask.sum(1)
        items = self.item_embedding(clicks)
        products = torch.cat([torch.zeros_like(items[:, :1]), items], dim=1)
        query_ids = F.pad(batch["search_click_history_query"] * mask, (0, 1))
        query_ids = query_ids.scatter(1, count[:, None], batch["query"][:, None])
        queries = self.query_projection(self.queries(query_ids)) * self.scale
        valid = F.pad(mask, (1, 0), value=True)  # both: slots 0..T
        p_in, q_in = self._inputs(products, user), self._inputs(queries, user)
        encoder = self._encoder("search")
        if self.hparams.use_cross_view:
            return encoder(p_in, valid, q_in, valid), encoder(q_in, valid, p_in, valid), valid
        return encoder(p_in, valid, p_in, valid), encoder(q_in, valid, q_in, valid), valid

    # ------------------------------------------------------------ representations
    def _last(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        last = (valid.sum(1) - 1).clamp(min=0)
        return h[torch.arange(h.shape[0], device=h.device), last]

    def rec_user(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The rec representation (the last slot, with its ISM session) and the ISM loss."""
        h, valid = self.rec_branch(batch)
        if not self.hparams.use_ism:
            return self._last(h, valid), h.sum() * 0.0
        h, means, full = sessions_after_begin(h, valid, self.hparams.sub_seq_num)
        return self._last(h, valid), discrimination(means, full)

    def search_user(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The product and query branches' last slots and the ISM loss (discrimination
        within each branch minus alignment between them, model.py inter_corr_loss)."""
        h_p, h_q, valid = self.search_branches(batch)
        if not self.hparams.use_ism:
            return self._last(h_p, valid), self._last(h_q, valid), h_p.sum() * 0.0
        n = self.hparams.sub_seq_num
        h_p, p_means, full = sessions_after_begin(h_p, valid, n)
        h_q, q_means, _ = sessions_after_begin(h_q, valid, n)  # the same slots and windows
        corr = (discrimination(p_means, full) + discrimination(q_means, full)
                - alignment(p_means, q_means, full))  # fmt: skip
        return self._last(h_p, valid), self._last(h_q, valid), corr

    def _dot(self, user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return (user.unsqueeze(1) * self.item_embedding(candidates)).sum(-1)

    def _mix(self) -> torch.Tensor:
        """w in [0.1, 0.9] (the code's clamp); the value used is clamped, the parameter is
        left as it is."""
        return self.mix.clamp(*MIX_RANGE)

    # ------------------------------------------------------------ scoring
    def score(self, batch, candidates):
        return self._dot(self.rec_user(batch)[0], candidates)

    def search_scores(self, batch, candidates):
        p, q, _ = self.search_user(batch)
        w = self._mix()
        return w * self._dot(p, candidates) + (1 - w) * self._dot(q, candidates)

    # ------------------------------------------------------------ training
    def training_loss(self, batch):
        if "search" not in batch:
            raise ConfigError(
                "UnifiedSSR trains on rec and search clicks: it needs "
                "method.companion_batch_sizes.search (the default)"
            )
        hp, weights = self.hparams, self.task_weights()
        rec_user, rec_corr = self.rec_user(batch)
        rec = candidate_bce(self._dot(rec_user, batch["candidates"]))
        search = batch["search"]
        p, q, search_corr = self.search_user(search)
        w = self._mix()
        src = w * candidate_bce(self._dot(p, search["candidates"])) + (1 - w) * candidate_bce(
            self._dot(q, search["candidates"])
        )
        corr = hp.corr_factor if hp.use_ism else 0.0
        losses = {"rec": rec + corr * rec_corr, "search": src + corr * search_corr}
        # a task switched off still runs, weighted 0 (pretrain_finetune.py)
        loss = weights["rec"] * losses["rec"] + weights["search"] * losses["search"]
        parts = {"rec": rec, "src": src, "ism_rec": rec_corr, "ism_src": search_corr,
                 "mix": w, "rec_weight": rec.new_tensor(weights["rec"]),
                 "search_weight": rec.new_tensor(weights["search"])}  # fmt: skip
        return loss, {k: v.detach() for k, v in parts.items()}
