"""USER (Yao, Dou, Xie, Lu, Wang, Wen, CIKM'21): a Unified information Search and
Recommendation model over the user's integrated behaviour sequence, a baseline row of
UniSAR's Tables 3 and 4 ("USER [40] proposed to mix the S&R histories into one
sequence according to timestamp and leverage a single encoder", UniSAR Sec. 2; "USER
and UnifiedSSR derive two parameter sets for S&R tasks via pre-training and
fine-tuning", Sec. 5.2). Section numbers below are the USER paper's (Sec. 3 the
problem, Sec. 4.1 text encoder, 4.2 session encoder, 4.3 history encoder, 4.4 unified
task framework, 4.5 training); the paper is not on disk, and where it is unclear the
authors' released model code (read, not copied) settles it.

What follows the original:
  * the integrated behaviour sequence (Sec. 3): browsing (rec) and search behaviours
    of the user merged by time into ONE sequence, each behaviour a token, read by one
    transformer encoder (bidirectional, post-norm layers as the authors' encoder);
  * a search behaviour's token fuses its query with its clicked documents (the authors
    fuse them by co-attention then concatenation and a linear layer; here [query | mean
    of the clicked items] -> linear, as queries are word means and items are ids);
  * the unified task framework (Sec. 4.4): the current request is a token at the end
    of the sequence; for search it is the query, and recommendation is search with an
    empty query, whose token is the user embedding (the authors' code: "for
    recommendation, current query is initialized with user embedding") with the
    rec-request type embedding marking it empty; the same parameters score both tasks;
  * a candidate is matched with the request's encoded intent by cosine similarity,
    both as it is (its text-encoder output) and as read in the context of the history
    (the candidate appended to the history and encoded), the similarities combined by
    a linear layer; trained with cross-entropy over the clicked item and its sampled
    negatives (the framework's sampled-softmax CE), on both tasks' samples;
  * pre-training then fine-tuning (Sec. 4.5; UniSAR Sec. 4.4): L_rec + L_src for the
    first `pretrain_epochs` epochs, then only `finetune_task`'s loss: two runs give the
    two parameter sets. The switch is UnifiedSSR's too (sar_exp/methods/pretrain_finetune.py):
    the other task's loss weighted 0, model selection within fine-tuning, and the
    optimiser's state reset once at the switch (UnifiedSSR's code starts fine-tuning with
    a new optimizer; USER's schedule is not known to us, and we use the same rule).

Ours, or not reproduced:
  * the behaviour-type embedding (browse, search, the request, the empty query, a
    candidate) added to each token: the authors' released code computes a type embedding
    and never adds it;
  * no session encoder: the framework's merged history has no session boundaries, so
    the short-term (current session) and long-term (history) encoders are one encoder
    over the whole integrated sequence (UniSAR's description of USER: "a single
    encoder");
  * items are ids and attributes, not texts: the text encoder (a word transformer with
    word attention) is an item projection for documents and the shared word-mean
    query encoder, projected, for queries;
  * learned position embeddings by recency (the request and the candidates at 0, the
    newest behaviour at 1, ...); the request and candidate tokens read the history
    and themselves, and no history token reads them, so every candidate of a row is
    encoded in context in one pass (the authors encode each candidate with the history
    in its own pass, where the history also reads it);
  * the authors' 122 hand-crafted ranking features and the tanh on the combined score
    are dropped (tanh bounds a score to [-1, 1], which a softmax over 100 candidates
    barely separates); the combination starts at 5 x each cosine (a temperature).
"""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.embeddings import TABLE_STD
from sar_exp.errors import ConfigError
from sar_exp.methods.base import RecommenderModule
from sar_exp.methods.losses import sampled_softmax_ce
from sar_exp.methods.pretrain_finetune import PretrainFinetuneSwitch, check_finetune_settings
from sar_exp.methods.search_history import Lookup, mean_clicks

# behaviour types (Sec. 3-4): the history's browsing and search behaviours, the current
# request (a search query, or recommendation's empty query) and a candidate document
BROWSE, SEARCH, SEARCH_REQUEST, EMPTY_QUERY, CANDIDATE = range(5)


class USER(PretrainFinetuneSwitch, RecommenderModule):
    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return True

    def __init__(
        self,
        schema: dict,
        backbone: dict,
        heads: int = 2,
        layers: int = 1,
        ffn_dim: int = 256,
        dropout: float = 0.1,
        search_weight: float = 1.0,
        finetune_task: str | None = None,
        pretrain_epochs: int = 5,
        score_scale: float = 5.0,
        **kwargs,
    ):
        super().__init__(schema, backbone, **kwargs)
        check_finetune_settings(finetune_task, pretrain_epochs)
        if self.eval_mode == "full":
            raise ConfigError(
                "method=user encodes every candidate in the context of the history: "
                "eval.mode=full would put every item in each row's sequence; use eval.mode=sampled"
            )
        d = self.hparams.hidden_dim
        # the text encoder's place (Sec. 4.1): documents (items) and queries to d
        self.item_projection = nn.Linear(self.items.out_dim, d)
        self.query_projection = nn.Linear(self.queries.out_dim, d)
        self.user_projection = nn.Linear(self.users.out_dim, d)  # the empty query's user
        # a search behaviour: [query | its clicked documents] -> d (the authors'
        # co-attention output is such a concatenation through a linear layer)
        self.search_fusion = nn.Linear(2 * d, d)
        self.types = nn.Embedding(5, d)  # ours: the authors' code never adds its type embedding
        # recency 0 (now: the request, the candidates) to max_interleaved_history
        self.positions = nn.Embedding(schema["max_interleaved_history"] + 1, d)
        layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=ffn_dim, dropout=dropout, batch_first=True,
            norm_first=False,  # post-norm, as the authors' transformer layers
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # [cos(intent, doc), cos(intent, doc in context)] -> score (Sec. 4.4); no bias (a
        # constant shift of every candidate: softmax CE ignores it)
        self.combine = nn.Linear(2, 1, bias=False)
        nn.init.constant_(self.combine.weight, score_scale)
        # type and position tables at the framework's N(0, 0.05^2), the scale of the item
        # and word tables (ours: torch's N(0, 1) drowned the items' projected ids, and on
        # the embedded data 4 epochs gave rec / search NDCG@5 0.378 / 0.352 against
        # 0.411 / 0.405 with 0.05, one seed)
        for table in (self.types, self.positions):
            nn.init.normal_(table.weight, std=TABLE_STD)

    # ------------------------------------------------------------ tokens
    def _item(self, ids: torch.Tensor) -> torch.Tensor:
        return self.item_projection(self.items(ids))

    def _query(self, ids: torch.Tensor) -> torch.Tensor:
        return self.query_projection(self.queries(ids))

    def history_tokens(self, batch: dict, items: Lookup, queries: Lookup) -> torch.Tensor:
        """[B, L, d]: the integrated behaviour sequence (oldest first, left-aligned), a
        browsing behaviour its item, a search behaviour its query fused with the mean of
        its clicked items, each plus its type and recency embeddings."""
        kind, valid = batch["interleaved_type"], batch["interleaved_mask"]
        is_rec = (kind == 1) & valid
        browse = items(batch["interleaved_item"])
        search = self.search_fusion(
            torch.cat(
                [
                    queries(batch["interleaved_query"]),
                    mean_clicks(items, batch["interleaved_clicks"]),
                ],
                dim=-1,
            )
        )
        steps = torch.where(is_rec.unsqueeze(-1), browse, search)
        types = torch.where(is_rec, BROWSE, SEARCH)
        slots = torch.arange(valid.shape[1], device=valid.device)
        recency = (valid.sum(1, keepdim=True) - slots).clamp(min=0)  # newest 1, padding <= 0
        return steps + self.types(types) + self.positions(recency)

    def request_token(self, batch: dict, task: str, queries: Lookup | None = None):
        """[B, d]: the current request (Sec. 4.4): the search query, or for
        recommendation the empty query (the user embedding, typed as an empty query)."""
        if task == "search":
            query = queries(batch["query"]) if queries is not None else self._query(batch["query"])
            return query + self.types.weight[SEARCH_REQUEST]
        user = self.user_projection(self.users(batch["user"]))
        return user + self.types.weight[EMPTY_QUERY]

    # ------------------------------------------------------------ encoding and scores
    def encode(self, history, valid, request, candidates):
        """One pass of the encoder over [history | request | candidates]: every token
        reads the valid history and itself; returns the request's and the candidates'
        outputs ([B, d], [B, K, d])."""
        b, length, d = history.shape
        now = self.positions.weight[0]
        readers = (
            torch.cat([request.unsqueeze(1), candidates + self.types.weight[CANDIDATE]], dim=1)
            + now
        )
        x = torch.cat([history, readers], dim=1)
        total = x.shape[1]
        keys = torch.cat([valid, valid.new_zeros(b, total - length)], dim=1)
        allowed = keys.unsqueeze(1) | torch.eye(total, dtype=torch.bool, device=x.device)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~allowed, float("-inf"))
        heads = self.hparams.heads
        out = self.encoder(x, mask=mask.repeat_interleave(heads, dim=0))
        return out[:, length], out[:, length + 1 :]

    def task_scores(self, batch, candidates, task, request=None):
        """[B, K] scores of `task` (Sec. 4.4); `request` replaces the request token."""
        items = Lookup(
            [batch["interleaved_item"], batch["interleaved_clicks"], candidates], self._item
        )
        query_ids = [batch["interleaved_query"]] + ([batch["query"]] if task == "search" else [])
        queries = Lookup(query_ids, self._query)
        if request is None:
            request = self.request_token(batch, task, queries)
        docs = items(candidates)
        history = self.history_tokens(batch, items, queries)
        intent, in_context = self.encode(history, batch["interleaved_mask"], request, docs)
        intent = intent.unsqueeze(1)
        similarities = torch.stack(
            [
                nn.functional.cosine_similarity(intent, docs, dim=-1),
                nn.functional.cosine_similarity(intent, in_context, dim=-1),
            ],
            dim=-1,
        )
        return self.combine(similarities).squeeze(-1)

    def score(self, batch, candidates):
        return self.task_scores(batch, candidates, "rec")

    def search_scores(self, batch, candidates):
        return self.task_scores(batch, candidates, "search")

    # ------------------------------------------------------------ training
    def training_loss(self, batch):
        """w_rec L_rec + search_weight w_src L_src, the weights 1 and 1 while pre-training,
        then 1 for the fine-tuned task and 0 for the other (still computed: every
        parameter keeps a gradient, for DDP)."""
        if "search" not in batch:
            raise ConfigError(
                "USER trains on search samples: method.companion_batch_sizes.search must be set"
            )
        weights = self.task_weights()
        search = batch["search"]
        rec = sampled_softmax_ce(self.score(batch, batch["candidates"]))
        src = sampled_softmax_ce(self.search_scores(search, search["candidates"]))
        loss = weights["rec"] * rec + self.hparams.search_weight * weights["search"] * src
        parts = {"rec": rec, "src": src, "rec_weight": rec.new_tensor(weights["rec"]),
                 "search_weight": rec.new_tensor(weights["search"])}  # fmt: skip
        return loss, {k: v.detach() for k, v in parts.items()}
