"""The plain backbone (method=base) and the machinery every method shares:
shared bottom embeddings, scoring, sampled/full ranking evaluation and CTR evaluation."""

from __future__ import annotations

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from sar_exp.backbones.bert4rec import cloze_loss, cloze_sequences
from sar_exp.backbones.embeddings import FeatureEmbedding, QueryEncoder, mlp
from sar_exp.backbones.sequence import left_aligned
from sar_exp.data.batches import stable_seed
from sar_exp.errors import ConfigError
from sar_exp.methods.losses import binary_ce, sampled_softmax_ce
from sar_exp.metrics.ctr import CTRMetrics
from sar_exp.metrics.ranking import RankingMetrics, positive_rank

FULL_RANKING_CHUNK = 4096


class RecommenderModule(pl.LightningModule):
    """Base class: subclasses implement `score(batch, candidates) -> [B, K]` and
    `training_loss(batch) -> (loss, parts)`."""

    # Methods whose queries meet d_h-wide user and item representations in dot
    # products (ClardRec Sec. 4.1, JSR) embed query words at d_h instead of d_e.
    queries_in_hidden_space = False
    # Methods that embed a query as [query id | mean of words] (SESRec Sec. 4.2.1).
    query_id_embeddings = False

    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        """Whether the model reads queries. Only what a model uses is built: a parameter
        that no loss reaches would stop multi-process (DDP) training, and hiding that
        with find_unused_parameters would hide real bugs too."""
        return True

    def __init__(
        self,
        schema: dict,
        backbone: dict,
        task: str = "ranking",
        embedding_dim: int = 32,
        hidden_dim: int = 128,
        item_layers: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        eval_mode: str = "sampled",
        evaluated_tasks: tuple[str, ...] | list[str] = ("rec",),
        lookup_tables: dict | None = None,
    ):
        super().__init__()
        if isinstance(backbone, DictConfig):
            backbone = OmegaConf.to_container(backbone, resolve=True)
        self.save_hyperparameters(ignore=["lookup_tables"])
        tables = lookup_tables or {}
        self.task, self.eval_mode, self.lr, self.weight_decay = task, eval_mode, lr, weight_decay
        self.schema = schema
        self.users = FeatureEmbedding(
            schema["num_users"],
            schema["user_attribute_sizes"],
            embedding_dim,
            tables.get("user_attributes"),
        )
        self.items = FeatureEmbedding(
            schema["num_items"],
            schema["item_attribute_sizes"],
            embedding_dim,
            tables.get("item_attributes"),
        )
        query_dim = hidden_dim if self.queries_in_hidden_space else embedding_dim
        # Drawn even when unused (then dropped), so every other part starts from the
        # same random weights whether or not the model reads queries.
        queries = QueryEncoder(
            schema["num_words"], query_dim, tables.get("query_words"),
            num_queries=schema["num_queries"] if self.query_id_embeddings else None,
        )  # fmt: skip
        self.queries = queries if self.uses_queries(backbone) else None
        pool = torch.zeros(schema["num_items"] + 1, dtype=torch.bool)
        if "rec_item_pool" in tables:
            pool[tables["rec_item_pool"]] = True
        self.register_buffer("rec_item_pool", pool, persistent=False)
        # the rank histogram spans every possible rank of the positive
        max_rank = (
            schema["num_items"] + 1 if eval_mode == "full" else schema.get("num_candidates", 100)
        )
        self.val_metrics = RankingMetrics(max_rank) if task == "ranking" else CTRMetrics()
        self.test_metrics = RankingMetrics(max_rank) if task == "ranking" else CTRMetrics()
        # Evaluating search too (UniSAR): the clicked item under its query among its
        # stored negatives, scored by the method's search model.
        self.evaluated_tasks = list(evaluated_tasks)
        if "search" in self.evaluated_tasks:
            if type(self).search_scores is RecommenderModule.search_scores:
                raise ConfigError(
                    f"{type(self).__name__} has no search model to evaluate; "
                    "dataset.protocol.evaluated_tasks=[rec] for it"
                )
            if task != "ranking" or eval_mode != "sampled":
                raise ConfigError(
                    "evaluating search needs task=ranking and eval.mode=sampled (its stored negatives)"
                )
            candidates = schema.get("num_candidates", 100)
            self.search_val_metrics = RankingMetrics(candidates)
            self.search_test_metrics = RankingMetrics(candidates)

    # ------------------------------------------------------------ to implement
    def score(self, batch: dict, candidates: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def search_scores(self, batch: dict, candidates: torch.Tensor) -> torch.Tensor:
        """[B, K] search scores of candidate items under each sample's query; methods
        that model search implement it, so the search task can be evaluated."""
        raise NotImplementedError

    # ------------------------------------------------------------ training
    def step_generator(self) -> torch.Generator:
        """A CPU generator for a model's own random draws in training (BERT4Rec's masks,
        DIEN's negatives), seeded by (run seed, process rank, step): a resumed run draws
        what the uninterrupted one would, other seeds and DDP ranks draw their own."""
        seed = stable_seed(torch.initial_seed(), self.global_rank, self.global_step)
        return torch.Generator().manual_seed(seed)

    def training_step(self, batch, batch_idx):
        loss, parts = self.training_loss(batch)
        size = batch["user"].numel()
        # per step for the curves, and the epoch mean for the CSV log's one row per epoch
        self.log("train/loss", loss, prog_bar=True, batch_size=size, on_step=True, on_epoch=True)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=size, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        # Adam for all methods, as in every one of the four papers.
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------ evaluation
    def _evaluate(self, batch, metrics):
        if self.task == "ctr":
            logits = self.score(batch, batch["item"][:, None])[:, 0]
            metrics.update(logits, batch["label"], batch["user"], batch["sample_index"])
        elif self.eval_mode == "full":
            metrics.update(self._full_ranks(batch))
        else:
            metrics.update(positive_rank(self.score(batch, batch["candidates"])))

    @torch.no_grad()
    def backbone_dims(self, step_dim: int) -> dict:
        """Input and output sizes that every backbone constructor accepts."""
        return dict(
            user_dim=self.users.out_dim,
            item_dim=self.items.out_dim,
            query_dim=self.queries.out_dim if self.queries is not None else 0,
            step_dim=step_dim,
            hidden_dim=self.hparams.hidden_dim,
            max_length=max(self.schema["max_rec_history"], self.schema["max_search_history"]),
        )

    def _full_ranks(self, batch) -> torch.Tensor:
        """Rank of the positive among every item the recommender can show, the user's
        other clicked items excluded (the usual "filtered" full-ranking protocol)."""
        positive = torch.nan_to_num(
            self.score(batch, batch["item"][:, None]).float(), nan=float("-inf")
        )
        above = torch.zeros_like(batch["item"])
        exclude = batch.get("exclude_items")
        n = self.schema["num_items"]
        for start in range(1, n + 1, FULL_RANKING_CHUNK):
            ids = torch.arange(start, min(start + FULL_RANKING_CHUNK, n + 1), device=self.device)
            scores = torch.nan_to_num(
                self.score(batch, ids.expand(batch["item"].numel(), -1)).float(), nan=float("-inf")
            )
            counted = self.rec_item_pool[ids].expand_as(scores) & (ids != batch["item"][:, None])
            if exclude is not None:
                counted &= ~(ids[None, :, None] == exclude[:, None, :]).any(-1)
            above += ((scores >= positive) & counted).sum(1)
        return above

    def _evaluate_task(self, batch, dataloader_idx: int, stage: str) -> None:
        """Evaluation loaders come in evaluated_tasks order (rec first)."""
        if self.evaluated_tasks[dataloader_idx] == "search":
            metrics = getattr(self, f"search_{stage}_metrics")
            metrics.update(positive_rank(self.search_scores(batch, batch["candidates"])))
        else:
            self._evaluate(batch, getattr(self, f"{stage}_metrics"))

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._evaluate_task(batch, dataloader_idx, "val")

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._evaluate_task(batch, dataloader_idx, "test")

    def _log_epoch(self, stage):
        """`stage/metric` for rec, `stage/search/metric` for search, and with both
        `stage/mean_metric`, their mean (UniSAR selects on the mean of the NDCG@5s)."""
        values = {}
        if "rec" in self.evaluated_tasks:
            rec = self._computed(f"{stage}_metrics")
            values.update({f"{stage}/{k}": float(v) for k, v in rec.items()})
        if "search" in self.evaluated_tasks:
            search = self._computed(f"search_{stage}_metrics")
            values.update({f"{stage}/search/{k}": float(v) for k, v in search.items()})
            if "rec" in self.evaluated_tasks:
                values.update({f"{stage}/mean_{k}": (values[f"{stage}/{k}"] + float(v)) / 2
                               for k, v in search.items()})  # fmt: skip
        # values are already reduced across processes by the metrics themselves
        self.log_dict(values, prog_bar=stage == "val")

    def _computed(self, name: str) -> dict:
        metrics = getattr(self, name)
        values = metrics.compute()
        metrics.reset()
        return values

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_end(self):
        self._log_epoch("test")


class PlainBackbone(RecommenderModule):
    """method=base: the backbone alone on rec clicks.

    Two-tower backbones (MLP, MMoE, GRU4Rec, SASRec) score u_rec . i_rec (ClardRec
    Eq. 2-3) with an MLP item encoder; DIN scores each candidate with target attention.
    Ranking trains with sampled-softmax CE (Eq. 4), CTR with binary CE."""

    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return bool(backbone["encoder"].get("use_query_history", False))  # DIN (QueryRec Eq. 2)

    def __init__(self, schema: dict, backbone: dict, **kwargs):
        super().__init__(schema, backbone, **kwargs)
        hp = self.hparams
        self.encoder = hydra.utils.instantiate(
            hp.backbone["encoder"], **self.backbone_dims(self.items.out_dim)
        )
        self.target_aware = getattr(self.encoder, "scores_items", False)
        # STAMP, FMLP-Rec and BERT4Rec score candidates with the embeddings their history
        # reads; the other two-tower backbones pass them through the item MLP (Eq. 3)
        self.item_encoder = None
        if not self.target_aware and not getattr(self.encoder, "shares_item_embedding", False):
            self.item_encoder = mlp(self.items.out_dim, hp.hidden_dim, hp.item_layers)
        self.item_bias = None
        if getattr(self.encoder, "item_bias", False):  # BERT4Rec's output bias b_O
            self.item_bias = torch.nn.Embedding(schema["num_items"] + 1, 1)
            torch.nn.init.zeros_(self.item_bias.weight)
        if self.eval_mode == "full" and not getattr(self.encoder, "full_ranking", True):
            raise ConfigError(
                f"backbone={backbone['name']} scores each candidate with its own pass over the "
                "history: eval.mode=full would run it for every item; use eval.mode=sampled"
            )
        if not getattr(self.encoder, "reads_user", True):
            self.users = None  # STAMP, FMLP-Rec, BERT4Rec: no user embedding in the model
        self.cloze = getattr(self.encoder, "objective", None) == "cloze"
        if self.cloze and self.task != "ranking":
            raise ConfigError(
                f"backbone={backbone['name']} trains with its Cloze objective: task=ranking only"
            )

    def user_representation(self, batch) -> torch.Tensor:
        user = self.users(batch["user"]) if self.users is not None else None
        if not self.encoder.needs_history:
            return self.encoder(user)
        return self.encoder(user, self.items(batch["rec_history"]), batch["rec_history_mask"])

    def score(self, batch, candidates):
        if self.target_aware:
            return self.encoder(
                self.users(batch["user"]),
                self.items(candidates),
                self.items(batch["rec_history"]),
                batch["rec_history_mask"],
                self.queries(batch["search_history_query"]) if self.queries is not None else None,
                batch["search_history_mask"],
            )
        return self.dot_scores(self.user_representation(batch), candidates)

    def dot_scores(self, user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[N, d] users against their [N, K] candidate items (Eq. 3)."""
        items = self.items(candidates)
        if self.item_encoder is not None:
            items = self.item_encoder(items)
        scores = (user.unsqueeze(1) * items).sum(-1)
        if self.item_bias is not None:
            scores = scores + self.item_bias(candidates).squeeze(-1)
        if getattr(self.encoder, "sigmoid_logits", False):  # STAMP's printed sigma(<h_s, h_t, x>)
            scores = torch.sigmoid(scores)
        return scores

    def training_loss(self, batch):
        if self.task == "ctr" and hasattr(self.encoder, "task_logits"):
            return self._multi_task_loss(batch)
        if self.cloze:
            return self._cloze_loss(batch), {}
        if self.task == "ctr":
            loss = binary_ce(self.score(batch, batch["item"][:, None])[:, 0], batch["label"])
        else:
            loss = sampled_softmax_ce(self.score(batch, batch["candidates"]))
        if not hasattr(self.encoder, "auxiliary_loss"):
            return loss, {}
        aux = self._auxiliary_loss(batch)  # DIEN: L = L_target + alpha L_aux
        return loss + self.encoder.aux_weight * aux, {"target": loss.detach(), "aux": aux.detach()}

    def _cloze_loss(self, batch) -> torch.Tensor:
        """BERT4Rec's Cloze objective: every masked event of [history..., clicked item]
        against the row's sampled negatives, with the framework's sampled-softmax CE
        (Eq. 4); a negative that is the masked event's own item is left out."""
        ids, valid, masked = cloze_sequences(
            batch["rec_history"], batch["rec_history_mask"], batch["item"],
            self.encoder.mask_prob, self.step_generator(), self.encoder.last_item_samples,
        )  # fmt: skip
        rows = masked.nonzero()[:, 0] % batch["item"].numel()  # each masked event's batch row
        outputs = self.encoder.encode(self.items(ids), valid, masked)[masked]  # [P, d]
        return cloze_loss(self.dot_scores, outputs, ids[masked], batch["candidates"][rows, 1:])

    def _auxiliary_loss(self, batch) -> torch.Tensor:
        """DIEN's L_aux, with one random item of the rec pool per history slot, redrawn
        where it is the item clicked there."""
        history, mask = left_aligned(batch["rec_history"].unsqueeze(-1), batch["rec_history_mask"])
        history = history.squeeze(-1)
        pool = self.rec_item_pool.nonzero().squeeze(-1)
        if pool.numel() == 0:  # no pool given: every item
            pool = torch.arange(1, self.schema["num_items"] + 1, device=history.device)
        generator = self.step_generator()

        def draw(size):
            return pool[torch.randint(0, pool.numel(), size, generator=generator).to(pool.device)]

        negatives = draw(history.shape)
        hit = negatives == history
        negatives[hit] = draw((int(hit.sum()),))
        return self.encoder.auxiliary_loss(self.items(history), mask, self.items(negatives))

    def _multi_task_loss(self, batch):
        """PLE Sec. 4.3: the sum of each task's binary CE over its own sample space (equal
        weights): the click over every impression, like, follow and forward (labels
        `label_<task>`) over the clicked ones, where they can happen."""
        logits = self.encoder.task_logits(
            self.users(batch["user"]), self.items(batch["item"][:, None]),
            self.items(batch["rec_history"]), batch["rec_history_mask"],
        )[:, 0]  # fmt: skip
        clicked = batch["label"] > 0.5
        parts = {"click": binary_ce(logits[:, 0], batch["label"])}
        for t, name in enumerate(self.encoder.tasks[1:], start=1):
            if clicked.any():
                parts[name] = binary_ce(logits[clicked, t], batch[f"label_{name}"][clicked])
            else:  # no clicked row: nothing to learn, but every parameter stays in the graph
                parts[name] = 0.0 * logits[:, t].sum()
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}


class TwoDomainRecommender(RecommenderModule):
    """Shared bottom embeddings with one user encoder and one item MLP per domain
    (ClardRec Eq. 2, 5; JSR's two towers). The sequential search encoder reads
    [clicked item | query] per past search click (ClardRec Eq. 29-31)."""

    queries_in_hidden_space = True

    def __init__(self, schema: dict, backbone: dict, **kwargs):
        super().__init__(schema, backbone, **kwargs)
        hp, item_dim = self.hparams, self.items.out_dim
        self.rec_user_encoder = hydra.utils.instantiate(
            hp.backbone["encoder"], **self.backbone_dims(item_dim)
        )
        self.search_user_encoder = hydra.utils.instantiate(
            hp.backbone["encoder"], **self.backbone_dims(item_dim + self.queries.out_dim)
        )
        if getattr(self.rec_user_encoder, "scores_items", False):
            raise ValueError(
                f"{type(self).__name__} needs a user encoder (mlp, mmoe, gru4rec, sasrec), not a target-aware scorer"
            )
        self.rec_item_encoder = mlp(item_dim, hp.hidden_dim, hp.item_layers)  # Enc^i_rec
        self.search_item_encoder = mlp(item_dim, hp.hidden_dim, hp.item_layers)  # Enc^i_src

    def rec_user(self, batch) -> torch.Tensor:
        user = self.users(batch["user"])
        if not self.rec_user_encoder.needs_history:
            return self.rec_user_encoder(user)  # Eq. 2, CF
        return self.rec_user_encoder(
            user, self.items(batch["rec_history"]), batch["rec_history_mask"]
        )

    def search_history_steps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """[clicked item | query] per past search click, oldest first, and its mask
        (Eq. 29, 31): H_src is the user's sequence of (query, clicked item) pairs."""
        items = self.items(batch["search_click_history_item"])
        queries = self.queries(batch["search_click_history_query"])
        return torch.cat([items, queries], dim=-1), batch["search_click_history_mask"]

    def search_user(self, batch) -> torch.Tensor:
        user = self.users(batch["user"])
        if not self.search_user_encoder.needs_history:
            return self.search_user_encoder(user)  # Eq. 5, CF
        steps, mask = self.search_history_steps(batch)
        return self.search_user_encoder(user, steps, mask)  # Eq. 29-31

    def score(self, batch, candidates):
        user = self.rec_user(batch)
        return (user.unsqueeze(1) * self.rec_item_encoder(self.items(candidates))).sum(-1)  # Eq. 3
