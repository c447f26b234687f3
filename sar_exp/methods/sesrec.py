"""SESRec (Si et al., SIGIR'23): sequential recommendation that disentangles the interests
a user's search and recommendation histories share from those they do not, with
self-supervision. Equation numbers refer to the paper (../shared/papers/sesrec.txt);
where it is silent the official code fills in (the notes in
../shared/notes/sesrec_official.md); where they conflict, a flag picks, the paper by
default.

Flags for the conflicts (`true` = the paper):
  paper_losses  Eq. 6-7's terms vs the code's cross-entropy over [positive, negatives];
                positive_in_denominator (true in conf/method/sesrec.yaml) adds the
                positive to Eq. 6-7's denominators, which as printed hold the negatives
                only: with the learnable tau that loss has no lower bound (the same as
                UniSAR's Eq. 2, unisar_losses.py); false: as printed. Both average L_ali over
                the batch's (query, click) pairs, as the code does; Eq. 6-7 sum a row's
                pairs and Eq. 23 sums the rows, which would weigh L_ali by the pairs per
                row (alpha = 0.1 is tuned for the mean).
  paper_split   Eq. 11-12's strict a > gamma for "similar" vs the code's a >= gamma
                (they differ only on ties, e.g. a one-slot history)
Where the paper is silent the code fills in: xavier-normal initialisation of every
table and layer (`init: official`; `framework` keeps the framework's N(0, 0.05^2)
tables and PyTorch's defaults), the code's ReduceLROnPlateau on validation MRR when
`lr_scheduler` (off by default: the paper names plain Adam), a session without a click
adding zeros where the code puts its "relevant item" (the data has no such item).
Ablations (Table 3, cumulative): `use_align=false, use_contrast=false, use_mie=false` is
"base" (the two encoders and target attention over the whole histories), then +L_ali
(use_align), +L_con (use_contrast), +MIE (use_mie: the full model). `threshold` is Table
4's split: "mean" (1/T, the paper's), "median", or a number (1/8, 1/16). Fig. 5 sweeps
`alpha` and `beta`. Not in the paper: `use_search=false` (with base's flags) drops the
search history altogether, to tell what base gains from the searches from what it gains
from its candidate-aware attention and MLP over the rec history alone.

Encoders (Eq. 4-5): backbone=sasrec gives the paper's transformers (bidirectional,
post-LN, one per history, as the code has them); backbone=gru4rec GRUs that return every
step's state. Everything else is the same method."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.embeddings import xavier_init
from sar_exp.backbones.sequence import masked_mean
from sar_exp.errors import ConfigError
from sar_exp.methods.base import RecommenderModule
from sar_exp.methods.losses import binary_ce
from sar_exp.methods.optim import decayed_adam
from sar_exp.methods.search_history import (
    Lookup,
    history_pairs,
    mean_clicks,
    sampled_negatives,
)
from sar_exp.methods.unisar_layers import MaskedEncoder, TargetAttention
from sar_exp.methods.unisar_losses import BilinearSimilarity, loss_form, relevance_loss

THRESHOLDS = ("mean", "median")
ENCODERS = ("sasrec", "gru4rec")


class GRUStates(nn.Module):
    """backbone=gru4rec for SESRec: a GRU over a left-aligned history, every valid step's
    state out, zeros elsewhere (no positions: the recurrence has the order; dropout
    between layers only, as nn.GRU has it)."""

    def __init__(self, d: int, layers: int, dropout: float):
        super().__init__()
        self.gru = nn.GRU(d, d, num_layers=layers, batch_first=True,
                          dropout=dropout if layers > 1 else 0.0)  # fmt: skip

    def forward(self, steps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, length, d = steps.shape
        lengths = valid.sum(1)
        if not torch.equal(valid, torch.arange(length, device=valid.device) < lengths[:, None]):
            raise ValueError("GRUStates: histories must be left-aligned without holes")
        # an empty history packs as one step whose state is then zeroed
        packed = nn.utils.rnn.pack_padded_sequence(
            steps, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=length)
        return out * valid[..., None].to(out.dtype)


class SESRec(RecommenderModule):
    query_id_embeddings = True  # Sec. 4.2.1: a query is [query-id embedding | mean of words]

    def __init__(
        self,
        schema: dict,
        backbone: dict,
        heads: int = 2,
        layers: int = 1,
        dropout: float = 0.1,
        alpha: float = 0.1,
        beta: float = 1e-3,
        temperature: float = 0.1,
        align_negatives: int = 1024,
        margin: float = 0.1,
        threshold: str | float = "mean",
        use_align: bool = True,
        use_contrast: bool = True,
        use_mie: bool = True,
        use_search: bool = True,
        paper_losses: bool = True,
        positive_in_denominator: bool = False,  # as printed: runs recorded before the flag
        # existed used it (conf/method/sesrec.yaml sets true)
        paper_split: bool = True,
        mlp_dims: list[int] | tuple[int, ...] = (200, 80),
        init: str = "official",
        lr_scheduler: bool = False,
        plateau_patience: int = 1,
        min_lr: float = 1e-5,
        monitor: str = "val/mrr",
        **kwargs,
    ):
        super().__init__(schema, backbone, **kwargs)
        d = self.hparams.hidden_dim
        if not (
            threshold in THRESHOLDS or isinstance(threshold, int | float) and 0 < threshold < 1
        ):
            raise ConfigError(
                f"method.module.threshold must be mean, median or a number in (0, 1), got {threshold!r}"
            )
        if use_mie and not use_contrast:
            raise ConfigError(
                "method.module.use_mie needs use_contrast: the split into similar and "
                "dissimilar behaviours that MIE reads is learned only by L_con (Eq. 15-16)"
            )
        if not use_search and (use_align or use_contrast):
            raise ConfigError(
                "method.module.use_search=false needs use_align=false, use_contrast=false and "
                "use_mie=false: L_ali, L_con and MIE all read the search history"
            )
        if init not in ("official", "framework"):
            raise ConfigError(f"method.module.init must be official or framework, got {init!r}")
        if lr_scheduler and self.task == "ctr" and monitor not in ("val/auc", "val/gauc"):
            raise ConfigError(
                f"method.module.monitor={monitor} is not logged under task=ctr; the learning-rate "
                "schedule needs method.module.monitor=val/auc"
            )
        kind = backbone.get("name")
        if kind not in ENCODERS:
            raise ConfigError(f"SESRec's encoders are sasrec or gru4rec, got backbone={kind}")
        # Eq. 1: W_i and W_q project items ([id | attributes]) and queries ([id | words])
        # to d; the projected item is also the candidate's e_v (the code)
        self.item_projection = nn.Linear(self.items.out_dim, d)
        self.query_projection = nn.Linear(self.queries.out_dim, d)
        self.sources = nn.Embedding(schema["num_sources"] + 1, d, padding_idx=0)  # M_s, Eq. 3
        caps = {"rec": schema["max_rec_history"], "search": schema["max_search_history"]}
        if kind == "sasrec":  # the code's block: post-LN, leaky ReLU, LayerNorm eps 1e-8
            encoders = {k: MaskedEncoder(d, heads, layers, dropout, n, "leaky_relu", 1e-8,
                                         hidden_dropout=False) for k, n in caps.items()}  # fmt: skip
        else:
            encoders = {k: GRUStates(d, layers, dropout) for k in caps}
        self.encoders = nn.ModuleDict(encoders)  # Eq. 4-5
        # co-attention and the split (Eq. 9-12) serve L_con and MIE; drawn in any case, so
        # every ablation starts from the same weights in the other parts
        affinity = nn.Linear(d, d, bias=False)  # W_l, Eq. 9
        coattention = nn.ModuleDict(  # W_r, W_s, Eq. 10
            {"rec": nn.Linear(d, 1, bias=False), "search": nn.Linear(d, 1, bias=False)}
        )
        self.split = use_contrast
        self.affinity = affinity if self.split else None
        self.coattention = coattention if self.split else None
        self.target_attention = nn.ModuleDict(  # W_d per history, Eq. 17-19
            {"rec": TargetAttention(d), "search": TargetAttention(d)}
        )
        self.loss_form = loss_form(paper_losses, positive_in_denominator)
        align = BilinearSimilarity(d, temperature, paper_losses)
        self.align_sim = align if use_align else None
        if init == "official":  # the drawn-but-unused first: the other parts' draws stay
            xavier_init(affinity, coattention, align, self)
        self.sides = ("rec", "search") if use_search else ("rec",)
        if not use_search:  # dropped after the draws, so the rec side's weights stay
            del self.encoders["search"], self.target_attention["search"]
            # what only queries reach is frozen: nothing trains it (and DDP would refuse it)
            for part in (self.queries, self.query_projection, self.sources):
                part.requires_grad_(False)
        # the prediction MLP last: its width depends on use_mie, so drawing it earlier
        # would shift every later draw between Table 3's rows
        interests = 3 if use_mie else 1  # Eq. 20: [all | similar | dissimilar]
        width = len(self.sides) * interests * d + d + self.users.out_dim  # Eq. 21's input
        layers_ = []
        for n in mlp_dims:  # the code's 200 -> 80 -> 1 with ReLU and dropout
            layers_ += [nn.Linear(width, n), nn.ReLU(), nn.Dropout(dropout)]
            width = n
        self.predictor = nn.Sequential(*layers_, nn.Linear(width, 1))
        if init == "official":
            xavier_init(self.predictor)

    # ------------------------------------------------------------ embeddings
    def _item_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.item_projection(self.items(ids))

    def _query_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.query_projection(self.queries(ids))

    def _lookups(self, batch: dict, candidates: torch.Tensor, negatives=(None, None)):
        """Every item and query the step touches, encoded once."""
        items = [candidates, batch["rec_history"]]
        queries = []
        if "search" in self.sides:
            items.append(batch["search_history_clicks"])
            queries.append(batch["search_history_query"])
        if negatives[0] is not None:
            items.append(negatives[0])
            queries.append(negatives[1])
        query_lookup = Lookup(queries, self._query_embedding) if queries else None
        return Lookup(items, self._item_embedding), query_lookup

    # ------------------------------------------------------------ encoding
    def encode(self, batch: dict, items: Lookup, queries: Lookup) -> dict:
        """H_r, H_s (Eq. 2-5) and, with the split, the co-attention scores and the similar /
        dissimilar slot masks (Eq. 9-12)."""
        rec_valid, ses_valid = batch["rec_history_mask"], batch["search_history_mask"]
        e_r = items(batch["rec_history"])  # Eq. 2 (positions: in the encoder)
        h = {"rec": self.encoders["rec"](e_r, rec_valid), "rec_valid": rec_valid}
        if "search" in self.sides:
            e_s = (  # Eq. 3: query + mean clicked item + source type (positions: in the encoder)
                queries(batch["search_history_query"])
                + mean_clicks(items, batch["search_history_clicks"])
                + self.sources(batch["search_history_source"])
            )
            h.update(search=self.encoders["search"](e_s, ses_valid), search_valid=ses_valid)
        if self.split:
            h.update(self._coattention(h))
        return h

    def _coattention(self, h: dict) -> dict:
        """Eq. 9-12: A = tanh(H_s W_l H_r^T); a^s = softmax(W_r H_r^T A^T) over the search
        slots, a^r = softmax(W_s H_s^T A) over the rec slots; each history split at its
        threshold into similar (a > gamma) and dissimilar (a <= gamma) slots."""
        h_r, h_s = h["rec"], h["search"]
        affinity = torch.tanh(self.affinity(h_s) @ h_r.transpose(1, 2))  # [B, Ts, Tr]
        logits = {
            "search": (self.coattention["rec"](h_r).transpose(1, 2) @ affinity.transpose(1, 2)),
            "rec": (self.coattention["search"](h_s).transpose(1, 2) @ affinity),
        }  # [B, 1, T] each
        out = {}
        for side, logit in logits.items():
            valid = h[f"{side}_valid"]
            scores = torch.softmax(logit.squeeze(1).masked_fill(~valid, float("-inf")), dim=-1)
            scores = torch.where(valid.any(1, keepdim=True), scores, 0.0)  # empty: zeros
            gamma = self._threshold(scores.detach(), valid)
            above = scores > gamma if self.hparams.paper_split else scores >= gamma
            similar = valid & above
            dissimilar = valid & ~similar
            # either set empty (every score equal, one slot): both are the whole history
            # (the code; the paper does not say)
            whole = ~(similar.any(1, keepdim=True) & dissimilar.any(1, keepdim=True))
            out[f"{side}_scores"] = scores
            out[f"{side}_similar"] = torch.where(whole, valid, similar)
            out[f"{side}_dissimilar"] = torch.where(whole, valid, dissimilar)
        return out

    def _threshold(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """gamma of Eq. 11-12 per row, [B, 1]: 1/T (mean), the median score, or a constant."""
        choice = self.hparams.threshold
        if choice == "mean":
            return 1.0 / valid.sum(1, keepdim=True).clamp(min=1)
        if choice == "median":  # the lower median of the valid scores
            ranked = torch.where(valid, scores, float("inf")).sort(dim=1).values
            middle = ((valid.sum(1, keepdim=True) - 1).clamp(min=0)) // 2
            return torch.gather(ranked, 1, middle)
        return torch.full_like(scores[:, :1], float(choice))

    # ------------------------------------------------------------ prediction
    def _predict(self, batch, candidates, items, h) -> torch.Tensor:
        """[B, K] logits (Eq. 17-21)."""
        e_v = items(candidates)  # [B, K, d]
        interests = []
        for side in self.sides:
            masks = [h[f"{side}_valid"]]
            if self.hparams.use_mie:
                masks += [h[f"{side}_similar"], h[f"{side}_dissimilar"]]
            interests += self.target_attention[side].pooled(h[side], e_v, masks)
        e_u = self.users(batch["user"])[:, None, :].expand(-1, e_v.shape[1], -1)
        return self.predictor(torch.cat([*interests, e_v, e_u], dim=-1)).squeeze(-1)

    def score(self, batch, candidates):
        items, queries = self._lookups(batch, candidates)
        return self._predict(batch, candidates, items, self.encode(batch, items, queries))

    # ------------------------------------------------------------ training
    def training_loss(self, batch):
        """Eq. 23: L_rec + alpha L_ali + beta L_con (the L2 term is Adam's weight decay)."""
        hp = self.hparams
        negatives = (None, None)
        if self.align_sim is not None:
            negatives = sampled_negatives(hp.align_negatives, self.schema, "sesrec-ali",
                                          self.global_rank, self.global_step, self.device)  # fmt: skip
        # task=ctr (QueryRec 5.3.3's adaptation): each impression with its click label
        ctr = self.task == "ctr"
        candidates = batch["item"][:, None] if ctr else batch["candidates"]
        items, queries = self._lookups(batch, candidates, negatives)
        h = self.encode(batch, items, queries)
        logits = self._predict(batch, candidates, items, h)
        if ctr:
            labels = batch["label"][:, None].float()
        else:
            labels = torch.zeros_like(logits)
            labels[:, 0] = 1.0
        parts = {"rec": binary_ce(logits, labels)}  # Eq. 22: 1 positive + N-1 negatives
        loss = parts["rec"]
        if self.align_sim is not None:
            parts["ali"] = self._alignment(batch, items, queries, negatives)
            loss = loss + hp.alpha * parts["ali"]
        if hp.use_contrast:
            parts["con"] = self._contrast(h)
            loss = loss + hp.beta * parts["con"]
        return loss, {k: v.detach() for k, v in parts.items()}

    def _alignment(self, batch, items: Lookup, queries: Lookup, negatives) -> torch.Tensor:
        """Eq. 6-8 over the (query, clicked item) pairs of the history sessions, against the
        step's sampled items and queries. The paper's Eq. 8 halves the sum of the two
        directions; relevance_loss's paper form is that sum (UniSAR Eq. 2 adds them
        unhalved) and its code form is already halved."""
        pair_query, pair_item = history_pairs(batch)
        loss = relevance_loss(
            self.align_sim, queries.table, items.table, queries.index(pair_query),
            items.index(pair_item), items(negatives[0]), queries(negatives[1]),
            form=self.loss_form,
        )  # fmt: skip
        return 0.5 * loss if self.hparams.paper_losses else loss

    def _contrast(self, h: dict) -> torch.Tensor:
        """Eq. 13-16: per history, anchor sum_j a_j h_j, positive and negative the means of
        the similar and dissimilar slots; triplet loss with Euclidean distance and margin
        m, the two histories' losses summed, averaged over the rows that have both."""
        both = h["rec_valid"].any(1) & h["search_valid"].any(1)
        total = 0.0
        for side in ("rec", "search"):
            x = h[side]
            anchor = (h[f"{side}_scores"][..., None] * x).sum(1)
            positive = masked_mean(x, h[f"{side}_similar"])
            negative = masked_mean(x, h[f"{side}_dissimilar"])
            total = total + nn.functional.triplet_margin_loss(  # Eq. 15 (eps 1e-6: the code)
                anchor, positive, negative, margin=self.hparams.margin, reduction="none"
            )
        weights = both.to(total.dtype)
        return (total * weights).sum() / weights.sum().clamp(min=1.0)

    def configure_optimizers(self):
        """Adam with lambda ||Theta||_2 (Eq. 23) as weight decay; with `lr_scheduler` the
        code's ReduceLROnPlateau (tenfold after `plateau_patience` epochs without a better
        validation MRR, down to `min_lr`)."""
        hp = self.hparams
        plateau = (hp.plateau_patience, hp.min_lr) if hp.lr_scheduler else None
        return decayed_adam(self, self.lr, self.weight_decay, plateau, hp.monitor)
