"""UniSAR (Shi et al., SIGIR'24): unified search and recommendation by modelling the
user's transitions between them (r2r, s2s, r2s, s2r) with extraction, alignment and
fusion, trained jointly on both tasks. Equation numbers refer to the paper
(../shared/papers/unisar.txt); where it is silent, the official code (the notes in
../shared/notes/unisar_official.md) fills in; where they conflict, a flag picks, the
paper by default.

Flags for the conflicts (all `true` = the paper):
  paper_losses      Eq. 2 and 5's negatives and terms (L_Align's negatives are other
                    users' rows) vs the code's cross-entropy / NT-Xent;
                    positive_in_denominator (true in conf/method/unisar.yaml) adds the
                    positive to their denominators, which the printed equations leave out
                    and a learnable tau needs (unisar_losses.py); false: as printed
  paper_fusion      Eq. 7 (Q = H_cross, K = V = MSA(H_same)) vs the code's decoder layer
  paper_prediction  Eq. 9 (experts score, gates mix the scores) vs the code's CGC level
                    with towers and heads
  embedding_style   "paper": tables of width d; "official": 32-wide tables projected to
                    d with Linear + tanh (items with attributes and captions are
                    projected in both: the paper has no attributes)
Ablations (Table 5), each a flag: use_r2r, use_s2s, use_r2s, use_s2r (a transition and
its alignment term removed, its counterpart standing in for it in Eq. 7, Sec. 5.3),
use_mask (Eq. 4's type mask), use_align (beta L_Align), use_rel (alpha L_Rel), use_mca_r
and use_mca_s (cross-attention replaced by addition), use_mmoe (two MLP heads), and
train_tasks (one task only: the two halves of "w/o joint training").
"""

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
from sar_exp.methods.unisar_layers import FusionLayer, MaskedEncoder, MultiTaskHead, TargetAttention
from sar_exp.methods.unisar_losses import (
    BilinearSimilarity,
    alignment_loss,
    loss_form,
    relevance_loss,
)

TASKS = ("rec", "search")
# what the history encoders read of a batch (the rows of both tasks are encoded together)
HISTORY_KEYS = (
    "rec_history", "rec_history_mask", "search_history_query", "search_history_clicks",
    "search_history_mask", "interleaved_type", "interleaved_mask", "interleaved_position",
)  # fmt: skip
TRANSITIONS = ("r2r", "s2s", "r2s", "s2r")
# Sec. 5.3: a removed transition's place in Eq. 7 is taken by the one of the same slots
STAND_IN = {"r2r": "s2r", "s2r": "r2r", "s2s": "r2s", "r2s": "s2s"}


def _stacked_histories(batches: list[dict]) -> dict:
    """The histories of several batches as one batch of all their rows, each padded to
    the widest (histories are left-aligned, so padding at the end changes no slot)."""
    if len(batches) == 1:
        return batches[0]
    out = {}
    for key in (k for k in HISTORY_KEYS if k in batches[0]):
        parts = [b[key] for b in batches]
        width = max(p.shape[1] for p in parts)
        out[key] = torch.cat(
            [nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1])) for p in parts]
        )
    return out


class UniSAR(RecommenderModule):
    def __init__(
        self,
        schema: dict,
        backbone: dict,
        heads: int = 2,
        layers: int = 1,
        dropout: float = 0.1,
        alpha: float = 1e-3,
        beta: float = 0.1,
        gamma: float = 0.1,
        tau_rel: float = 0.5,
        tau_align: float = 0.1,
        rel_negatives: int = 1024,
        rel_in_batch: bool = False,
        experts: dict | None = None,
        use_r2r: bool = True,
        use_s2s: bool = True,
        use_r2s: bool = True,
        use_s2r: bool = True,
        use_mask: bool = True,
        use_align: bool = True,
        use_rel: bool = True,
        use_mca_r: bool = True,
        use_mca_s: bool = True,
        use_mmoe: bool = True,
        train_tasks: list[str] | tuple[str, ...] = TASKS,
        paper_losses: bool = True,
        positive_in_denominator: bool = False,  # the printed form: runs recorded before
        # the flag existed used it (conf/method/unisar.yaml sets true)
        paper_fusion: bool = True,
        paper_prediction: bool = True,
        embedding_style: str = "paper",
        use_captions: bool = False,
        lr_scheduler: bool = False,
        embedding_init_std: float | None = 0.5,
        monitor: str = "val/mean_ndcg@5",
        **kwargs,
    ):
        super().__init__(schema, backbone, **kwargs)
        hp = self.hparams
        d, table = hp.hidden_dim, hp.embedding_dim
        if embedding_style not in ("paper", "official"):
            raise ConfigError(
                f"method.module.embedding_style must be paper or official, got {embedding_style!r}"
            )
        if not set(train_tasks) <= set(TASKS) or not train_tasks:
            raise ConfigError(
                f"method.module.train_tasks must be a non-empty subset of {list(TASKS)}"
            )
        untrained = [t for t in kwargs.get("evaluated_tasks", ("rec",)) if t not in train_tasks]
        if untrained:  # a single-task half has no head (and for search-only no q_phi) for it
            raise ConfigError(
                f"method.module.train_tasks={list(train_tasks)} cannot score the evaluated "
                f"task {untrained[0]}: set method.scores (and dataset.protocol.evaluated_tasks) "
                "to the trained tasks"
            )
        if (
            schema["max_interleaved_history"]
            < schema["max_rec_history"] + schema["max_search_history"]
        ):
            raise ConfigError(
                "UniSAR merges the last max_rec_history rec clicks and max_search_history "
                "sessions: dataset.protocol.max_interleaved_history must hold both "
                f"({schema['max_rec_history']} + {schema['max_search_history']})"
            )
        if not ((use_r2r or use_s2r) and (use_s2s or use_r2s)):
            raise ConfigError("UniSAR needs at least one transition of each history")
        self.uses = {"r2r": use_r2r, "s2s": use_s2s, "r2s": use_r2s, "s2r": use_s2r}
        # Embeddings (Sec. 4.1.1, Eq. 1): the shared id/attribute tables (the attributes
        # as for every row of the tables) and the word table. The paper's item is its id
        # embedding; use_captions adds the official code's caption (the mean of its words,
        # where the data has them).
        captions = (kwargs.get("lookup_tables") or {}).get("item_caption_words")
        self.use_captions = bool(use_captions and captions is not None and (captions > 0).any())
        self.register_buffer(  # int32: the KuaiSAR table is large (673k items x 50 words)
            "caption_words",
            captions.int() if self.use_captions else torch.zeros(1, 1, dtype=torch.int),
            persistent=False,
        )
        self.official_embeddings = embedding_style == "official"
        # the code encodes a caption like a query (projected to d) before the item's
        # projection; the paper has no captions, and its tables are d wide
        caption_width = (d if self.official_embeddings else table) if self.use_captions else 0
        item_in = self.items.out_dim + caption_width
        self.item_projection = self._projection(item_in, d, embedding_style)
        self.user_projection = self._projection(self.users.out_dim, d, embedding_style)
        self.query_projection = self._projection(self.queries.out_dim, d, embedding_style)
        q_phi = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, d)))  # Sec. 4.3.2
        self.q_phi = q_phi if "rec" in train_tasks else None  # a search-only model has none
        # Transition extraction (Eq. 3-4): drawn for every transition, kept for the used
        # ones, so an ablation starts from the same weights in every other part
        extractors = {
            "r2r": MaskedEncoder(d, heads, layers, dropout, schema["max_rec_history"]),
            "s2s": MaskedEncoder(d, heads, layers, dropout, schema["max_search_history"]),
            "merged": MaskedEncoder(d, heads, layers, dropout, schema["max_interleaved_history"]),
        }
        fusion = {
            "r": FusionLayer(d, heads, dropout, paper_fusion),
            "s": FusionLayer(d, heads, dropout, paper_fusion),
        }
        self.encoders = nn.ModuleDict(
            {name: m for name, m in extractors.items()
             if name == "merged" and (use_r2s or use_s2r) or self.uses.get(name)}
        )  # fmt: skip
        self.fusion = nn.ModuleDict(
            {k: m for k, m in fusion.items() if (use_mca_r if k == "r" else use_mca_s)}
        )
        self.target_attention = nn.ModuleDict({"r": TargetAttention(d), "s": TargetAttention(d)})
        self.head = MultiTaskHead(  # X_b = [e_u, e_i, e_q, agg_s, agg_r]; e_u, e_q per row
            5 * d, d,
            {"shared": 4, "rec": 4, "search": 4, **(experts or {})},
            dropout, paper=paper_prediction, mmoe=use_mmoe, tasks=tuple(train_tasks),
            per_row_columns=[*range(d), *range(2 * d, 3 * d)],
        )  # fmt: skip
        self.loss_form = loss_form(paper_losses, positive_in_denominator)
        align = {s: BilinearSimilarity(d, tau_align, paper_losses) for s in ("R", "S")}
        rel = BilinearSimilarity(d, tau_rel, paper_losses)
        self.align_sim = nn.ModuleDict(
            {s: m for s, m in align.items() if use_align and self._aligned(s)}
        )
        self.rel_sim = rel if use_rel else None
        if embedding_init_std is not None and embedding_init_std <= 0:
            raise ConfigError(
                "method.module.embedding_init_std must be a positive std (or null: the "
                f"framework's 0.05), got {embedding_init_std}"
            )
        if embedding_style == "official":  # xavier for every table, whatever the std says
            # drawn ones first, kept or not, so an ablation starts from the same weights
            xavier_init(*extractors.values(), *fusion.values(), *align.values(), rel, self)
        elif embedding_init_std is not None:  # the paper is silent
            self._embedding_init(embedding_init_std)

    def _embedding_init(self, std: float) -> None:
        """The user, item, attribute and word tables drawn from N(0, std^2) instead of the
        framework's N(0, 0.05^2); padding rows stay zero. With 0.05 an embedding's norm is
        about 0.4 against about 8 for the layer-normed transition outputs (and the
        positions' N(0, 1)), and UniSAR sat at a constant predictor for 6-30 epochs; with
        0.5 (the default) three seeds of the embedded data started sooner and ended at rec
        NDCG@5 0.349 +- 0.010 against 0.310 +- 0.071 (README)."""
        tables = [self.users.ids, *self.users.attributes, self.items.ids, *self.items.attributes]
        tables.append(self.queries.words)
        for table in tables:
            nn.init.normal_(table.weight, std=std)
            with torch.no_grad():
                table.weight[table.padding_idx].zero_()

    @staticmethod
    def _projection(width: int, d: int, style: str) -> nn.Module:
        """Linear + tanh to d (the official code) where the table is not d wide already."""
        if width == d and style == "paper":
            return nn.Identity()
        layer = nn.Linear(width, d)
        nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(layer.bias)
        return nn.Sequential(layer, nn.Tanh())

    def _aligned(self, scenario: str) -> bool:
        """L_Align^R needs r2r and s2r, L_Align^S needs s2s and r2s (Sec. 5.3)."""
        pair = ("r2r", "s2r") if scenario == "R" else ("s2s", "r2s")
        return all(self.uses[t] for t in pair)

    # ------------------------------------------------------------ embeddings
    def _item_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        parts = [self.items(ids)]
        if self.use_captions:
            caption = self.queries.mean_of_words(self.caption_words[ids], bag=True)
            parts.append(self.query_projection(caption) if self.official_embeddings else caption)
        return self.item_projection(torch.cat(parts, dim=-1))

    def _query_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.query_projection(self.queries(ids))

    def _lookups(self, batches: list[dict], extra_items=(), extra_queries=()):
        """Every item and query the step touches, encoded once."""
        # (the merged history's events are those of the two histories)
        item_keys = ("candidates", "rec_history", "search_history_clicks")
        query_keys = ("query", "search_history_query")
        items = [b[k] for b in batches for k in item_keys if k in b] + list(extra_items)
        queries = [b[k] for b in batches for k in query_keys if k in b] + list(extra_queries)
        return Lookup(items, self._item_embedding), Lookup(queries, self._query_embedding)

    # ------------------------------------------------------------ transitions
    def transitions(self, batch: dict, items: Lookup, queries: Lookup) -> dict:
        """H_r2r, H_s2s (Eq. 3), H_s2r, H_r2s (Eq. 4) and the slot masks of a batch."""
        rec_valid, ses_valid = batch["rec_history_mask"], batch["search_history_mask"]
        rec_steps = items(batch["rec_history"])
        # a search event is its query plus the mean of its clicked items (Eq. 1)
        ses_steps = queries(batch["search_history_query"]) + mean_clicks(
            items, batch["search_history_clicks"]
        )
        out = {"rec_valid": rec_valid, "ses_valid": ses_valid}
        if "r2r" in self.encoders:
            out["r2r"] = self.encoders["r2r"](rec_steps, rec_valid)
        if "s2s" in self.encoders:
            out["s2s"] = self.encoders["s2s"](ses_steps, ses_valid)
        if "merged" in self.encoders:
            out.update(self._cross_transitions(batch, rec_steps, ses_steps))
        for name in TRANSITIONS:  # Sec. 5.3: the same slots' other transition stands in
            if not self.uses[name]:
                out[name] = out[STAND_IN[name]]
        # A row without search history has no s2r (nothing to cross to), one without rec
        # history no r2s: their same-type transition stands in, as for an ablation, so
        # Eq. 7's cross-attention is not queried with zeros (which would give every slot
        # the same value and lose the sequence). The official data never has such rows.
        # Only with the type mask (without it the merged history still holds the row's own
        # behaviour), and only where the stand-in is a real transition (not itself a
        # stand-in for an ablated one, which would be the empty cross transition).
        if self.hparams.use_mask:
            has_rec, has_ses = rec_valid.any(1)[:, None, None], ses_valid.any(1)[:, None, None]
            if self.uses["r2r"] and self.uses["s2r"]:
                out["s2r"] = torch.where(has_ses, out["s2r"], out["r2r"])
            if self.uses["s2s"] and self.uses["r2s"]:
                out["r2s"] = torch.where(has_rec, out["r2s"], out["s2s"])
        return out

    def _cross_transitions(self, batch, rec_steps, ses_steps) -> dict:
        types, valid = batch["interleaved_type"], batch["interleaved_mask"]
        # the merged history holds the same events as the two histories (the same
        # windows, merged by time): its steps are read from theirs, not re-encoded, and
        # only at the slots the encoder runs on (LengthGroups)
        b, rec_width, d = rec_steps.shape
        table = torch.cat([rec_steps, ses_steps], dim=1)  # one table of both histories
        position = batch["interleaved_position"]
        source = torch.where(types == 1, position, rec_width + position)
        source = source + table.shape[1] * torch.arange(b, device=source.device)[:, None]
        table = table.reshape(-1, d)
        # Eq. 4: a slot attends only to slots of the other behaviour type (w/o mask: all).
        # Eq. 4 as printed multiplies the scores by M (a 0 score, not a blocked one); the
        # text ("attention is computed exclusively among different behaviors") and the
        # code block them, and so does this.
        encoder = self.encoders["merged"]
        if self.hparams.use_mask:  # a slot with no other-type slot to attend to: nothing
            has = {kind: (valid & (types == kind)).any(1, keepdim=True) for kind in (0, 1)}
            shown = valid & torch.where(types == 1, has[0], has[1])
            grouped, pieces = encoder.grouped(table, valid, types, shown, source=source)
        else:
            grouped, pieces = encoder.grouped(table, valid, source=source)
        # each type's slots in time order, left-aligned to its history's width: they line
        # up with the rec (search) history, which holds the same events
        s2r, r2s = grouped.read(
            pieces, self._slots_of(valid & (types == 1), rec_width),  # rec slots
            self._slots_of(valid & (types == 0), ses_steps.shape[1]),  # search slots
        )  # fmt: skip
        return {"s2r": s2r, "r2s": r2s}

    @staticmethod
    def _slots_of(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged history's kept slots in time order, left-aligned to `width`, and
        whether each is one (slot numbers, flags [B, width])."""
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        return order, torch.gather(keep, 1, order)

    def encode(self, batch: dict, items: Lookup, queries: Lookup) -> dict:
        """The transitions (Eq. 3-4) and their fusion V_r, V_s (Eq. 7) of a batch's rows."""
        h = self.transitions(batch, items, queries)
        h["v_r"], h["v_s"] = self.fused(h)
        return h

    def fused(self, h: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """V_r and V_s (Eq. 7); w/o MCA: H_same + H_cross. Sec. 5.3 describes w/o MCA_r as
        adding H_s2s and H_r2s, the search side, while Eq. 7 names MCA_r the rec side's
        cross-attention; this follows Eq. 7 (use_mca_r: rec, use_mca_s: search)."""
        if "r" in self.fusion:
            v_r = self.fusion["r"](h["r2r"], h["s2r"], h["rec_valid"])
        else:
            v_r = h["r2r"] + h["s2r"]
        if "s" in self.fusion:
            v_s = self.fusion["s"](h["s2s"], h["r2s"], h["ses_valid"])
        else:
            v_s = h["s2s"] + h["r2s"]
        return v_r, v_s

    # ------------------------------------------------------------ prediction
    def _predict(self, batch, candidates, task: str, items=None, queries=None, h=None):
        """[B, K] logits of `task` (Eq. 8-9)."""
        if items is None:
            items, queries = self._lookups([{**batch, "candidates": candidates}])
        h = h if h is not None else self.encode(batch, items, queries)
        v_r, v_s = h["v_r"], h["v_s"]
        e_i = items(candidates)
        b, k, d = e_i.shape
        agg_s = self.target_attention["s"](v_s, h["ses_valid"], e_i)  # Eq. 8
        agg_r = self.target_attention["r"](v_r, h["rec_valid"], e_i)
        e_u = self.user_projection(self.users(batch["user"]))
        if task == "rec":
            e_q = self.q_phi.expand(b, d)  # the learnable rec query q_phi
        else:
            e_q = queries(batch["query"])
        # X_b = [e_u, e_i, e_q, agg_s, agg_r] (Sec. 4.3.2): e_u and e_q are the same for
        # every candidate, so the head takes them once per row
        rows = torch.cat([e_u, e_q], dim=-1)
        return self.head(torch.cat([e_i, agg_s, agg_r], dim=-1), task, rows=rows)

    def score(self, batch, candidates):
        return self._predict(batch, candidates, "rec")

    def search_scores(self, batch, candidates):
        return self._predict(batch, candidates, "search")

    # ------------------------------------------------------------ training
    def _negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """L_Rel's sampled negative items and queries, shared by the step (Eq. 2)."""
        return sampled_negatives(self.hparams.rel_negatives, self.schema, "unisar-rel",
                                 self.global_rank, self.global_step, self.device)  # fmt: skip

    def _task_loss(self, batch, task, items, queries, h, relevance) -> dict:
        """L_R or L_S (Eq. 11) of one batch, h its encoded histories, relevance its L_Rel:
        click BCE (Eq. 10) + alpha L_Rel + beta L_Align."""
        hp = self.hparams
        logits = self._predict(batch, batch["candidates"], task, items, queries, h)
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        parts = {"click": binary_ce(logits, labels)}
        total = parts["click"]
        if relevance is not None:
            parts["rel"] = relevance
            total = total + hp.alpha * parts["rel"]
        if self.align_sim:
            parts["align"] = self._alignment(batch, h)  # Eq. 6
            total = total + hp.beta * parts["align"]
        parts["total"] = total
        return parts

    def _relevance(self, batches, items, queries, negatives) -> list[torch.Tensor]:
        """Eq. 2 over the (query, clicked item) pairs of each batch's history sessions, one
        loss per batch; the batches share the step's negatives, so a query or item paired
        in several is scored against them once (with in-batch negatives: batch by batch)."""
        pair_queries, pair_items = zip(*(history_pairs(batch) for batch in batches), strict=True)
        neg_items, neg_queries = items(negatives[0]), queries(negatives[1])

        def loss(pair_query, pair_item, segments=None):
            return relevance_loss(
                self.rel_sim, queries.table, items.table, queries.index(pair_query),
                items.index(pair_item), neg_items, neg_queries, form=self.loss_form,
                in_batch=self.hparams.rel_in_batch, segments=segments,
            )  # fmt: skip

        if self.hparams.rel_in_batch:
            return [loss(q, i) for q, i in zip(pair_queries, pair_items, strict=True)]
        sizes = [len(q) for q in pair_queries]
        return loss(torch.cat(pair_queries), torch.cat(pair_items), sizes)

    def _alignment(self, batch, h) -> torch.Tensor:
        """Eq. 5-6: mean-pooled transitions of each history aligned across scenarios, on
        rows that have both histories (the official code gives NaN without them)."""
        both = h["rec_valid"].any(1) & h["ses_valid"].any(1)
        loss = 0.0
        for scenario, (same, cross, valid) in {
            "R": ("r2r", "s2r", h["rec_valid"]), "S": ("s2s", "r2s", h["ses_valid"]),
        }.items():  # fmt: skip
            if scenario not in self.align_sim:
                continue
            loss = loss + alignment_loss(
                self.align_sim[scenario], masked_mean(h[same], valid), masked_mean(h[cross], valid), both,
                batch["user"],
                form=self.loss_form,
            )  # fmt: skip
        return loss

    def training_loss(self, batch):
        """Eq. 12: L_R + gamma L_S, both batches of the step encoded together (the L2
        term is Adam's weight decay, see configure_optimizers)."""
        tasks = self.hparams.train_tasks
        if len(tasks) == 2 and "search" not in batch:
            raise ConfigError(
                "UniSAR trains both tasks every step: method.companion_batch_sizes.search "
                "must be set (or method.module.train_tasks=[rec])"
            )
        named = {"rec": batch, "search": batch["search"]} if len(tasks) == 2 else {tasks[0]: batch}
        negatives = self._negatives() if self.rel_sim is not None else (None, None)
        extra = () if negatives[0] is None else negatives
        items, queries = self._lookups(list(named.values()), extra[:1], extra[1:])
        # the rows of both tasks go through the history encoders together: each row's
        # output is its own (rows never attend to each other), in half the calls
        sizes = [b["user"].shape[0] for b in named.values()]
        encoded = self.encode(_stacked_histories(list(named.values())), items, queries)
        split = {k: v.split(sizes) for k, v in encoded.items()}
        relevance = [None] * len(named)
        if self.rel_sim is not None:
            relevance = self._relevance(list(named.values()), items, queries, negatives)
        parts, loss = {}, 0.0
        for i, (task, task_batch) in enumerate(named.items()):
            h = {k: v[i] for k, v in split.items()}
            task_parts = self._task_loss(task_batch, task, items, queries, h, relevance[i])
            weight = self.hparams.gamma if task == "search" and len(tasks) == 2 else 1.0
            loss = loss + weight * task_parts.pop("total")
            parts.update({f"{task}_{k}": v.detach() for k, v in task_parts.items()})
        return loss, parts

    def configure_optimizers(self):
        """Adam; lambda ||Theta||_2 (Eq. 12) as weight decay on every parameter whose name
        has no "bias" (the official code), embeddings and temperatures included; with the
        paper's losses tau is learned as log tau and not decayed (decay would pull tau to
        1). The paper trains with Adam at a tuned rate, which is the default. With
        `lr_scheduler` (the code, and the unisar_kuaisar/unisar_amazon presets) the rate
        drops tenfold after 3 epochs without a better selection metric, down to 1e-6;
        on the embedded data that cut can come during the first epochs' plateau and
        stall the run (README, UniSAR)."""
        plateau = (3, 1e-6) if self.hparams.lr_scheduler else None
        return decayed_adam(self, self.lr, self.weight_decay, plateau, self.hparams.monitor)
