"""QueryRec (Wang et al., CIKM'24): search-enhanced CTR prediction with a DIN backbone.
Equation numbers refer to the paper (../shared/papers/queryrec.txt); it has no public
code, so where it is silent the choices are ours, each in conf/method/queryrec.yaml
with a comment and listed in the README.

* DIN with adaptive pooling over the clicked-item history and the query history (Eq.
  1-4), binary cross-entropy (Eq. 5): L_1. Alone this is Table 5's DIN+query.
* Next-item prediction (Eq. 13-14): a self-attentive encoder (SASRec's, the paper's
  [4]) over the query list up to t gives e_{q_t}, pushed toward items the user clicks in
  rec after t and away from the ones shown after t and not clicked: L_2.
* Query-item contrast (Eq. 15) with s(q, i) = tanh(e_q^T W e_i) and temperature beta,
  over I_q+ of the user's last query q^t; the denominator's "all other items" are
  sampled (`contrast_negatives` a batch, uniform over the item set, the members of the
  row's I_q+ left out): L_3. With `use_diffusion`, I_q+ is extended by the
  diffusion model's top-K (queryrec_diffusion.py), queries without clicks included;
  without it a query with an empty I_q+ is masked (Sec. 5.6).
* Eq. 16: L = L_1 + lambda_2 L_2 + lambda_3 L_3.

Two printed forms contradict the paper's own argument and are implemented as it
requires (no flag: the printed forms are not computable losses):
* Eq. 13-14 read log<e_q, e_j> and log(1 - <e_q, e_k>) of raw dot products, which are
  undefined below 0 and above 1, and add the negatives' term where "drive e_q closer to
  r+ than r-" needs it subtracted. We use binary cross-entropy on sigma(<e_q, e_j>):
  -mean log sigma(pos) - mean log(1 - sigma(neg)).
* Eq. 15 is a log-likelihood (no minus sign) inside a loss that Eq. 16 minimises; the
  loss is its negative, an InfoNCE whose denominator leaves the positives out as
  printed.

Ablations (Table 5): method=base backbone=din is DIN; backbone.encoder.use_query_history
=true with method=base is DIN+query; here use_nip / use_contrastive / use_diffusion give
DIN+NIP, DIN+con, DIN+con w/ diffusion and QueryRec (all three).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sar_exp.backbones.sasrec import SASRecEncoder
from sar_exp.errors import ConfigError
from sar_exp.methods.base import PlainBackbone
from sar_exp.methods.losses import binary_ce


def _masked_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def next_item_loss(query_list: torch.Tensor, positives, positive_mask, negatives, negative_mask,
                   row_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Eq. 14 as its argument requires: query_list [B, d], positives/negatives [B, n, d]
    item embeddings; rows without a query history or without any future item count
    nothing."""
    pos = (query_list.unsqueeze(1) * positives).sum(-1)
    neg = (query_list.unsqueeze(1) * negatives).sum(-1)
    pos_term = _masked_row_mean(-nn.functional.logsigmoid(pos), positive_mask)
    neg_term = _masked_row_mean(-nn.functional.logsigmoid(-neg), negative_mask)
    rows = row_mask & (positive_mask.any(-1) | negative_mask.any(-1))
    per_row = pos_term + neg_term
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


def contrastive_loss(positive_sim, positive_mask, negative_sim, negative_mask, temperature):
    """-Eq. 15 per row: the mean over the row's positives of
    -(s(q, i+)/beta - log sum_j exp(s(q, j)/beta)), j over the sampled other items;
    rows without a positive are masked. positive_sim [B, P], negative_sim [B, N]."""
    scaled = negative_sim / temperature
    scaled = scaled.masked_fill(~negative_mask, float("-inf"))
    log_denominator = torch.logsumexp(scaled, dim=-1, keepdim=True)
    per_positive = -(positive_sim / temperature - log_denominator)
    rows = positive_mask.any(-1)
    per_row = _masked_row_mean(per_positive, positive_mask)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


class QueryRec(PlainBackbone):
    @staticmethod
    def uses_queries(backbone: dict) -> bool:
        return True

    def __init__(
        self, schema: dict, backbone: dict, use_nip: bool = True, use_contrastive: bool = True,
        use_diffusion: bool = True, lambda_nip: float = 0.1, lambda_contrast: float = 0.1,
        temperature: float = 0.07, nip_layers: int = 1, nip_heads: int = 2, **kwargs,
    ):  # fmt: skip
        if dict(backbone).get("name") != "din":
            raise ConfigError("method=queryrec runs on backbone=din (QueryRec Sec. 3.2)")
        if use_diffusion and not use_contrastive:
            raise ConfigError(
                "method.module.use_diffusion=true extends the contrastive loss's positives; "
                "it needs use_contrastive=true"
            )
        if temperature <= 0:
            raise ConfigError(f"method.module.temperature must be > 0, got {temperature}")
        backbone = copy.deepcopy(dict(backbone))
        backbone["encoder"] = {**backbone["encoder"], "use_query_history": True}  # Eq. 2
        super().__init__(schema, backbone, **kwargs)
        self.use_nip, self.use_contrastive = use_nip, use_contrastive
        self.lambda_nip, self.lambda_contrast = lambda_nip, lambda_contrast
        self.temperature = temperature
        item_dim, query_dim = self.items.out_dim, self.queries.out_dim
        if use_nip:  # e_{q_t} lives where item embeddings do: <e_q, e_j> in Eq. 13-14
            self.query_list_encoder = SASRecEncoder(
                user_dim=0, step_dim=query_dim, hidden_dim=item_dim, layers=nip_layers,
                heads=nip_heads, max_length=schema["max_search_history"],
            )  # fmt: skip
        if use_contrastive:  # W of s(e_q, e_i) = tanh(e_q^T W e_i)
            self.query_item_map = nn.Parameter(torch.empty(query_dim, item_dim))
            nn.init.xavier_normal_(self.query_item_map)

    def similarity(self, query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """s(q, i) = tanh(e_q^T W e_i): query [B, d_q], items [B, K, d_i] or [N, d_i]."""
        mapped = query @ self.query_item_map  # [B, d_i]
        if items.dim() == 2:
            return torch.tanh(mapped @ items.T)
        return torch.tanh((mapped.unsqueeze(1) * items).sum(-1))

    def training_loss(self, batch):
        ctr = binary_ce(self.score(batch, batch["item"][:, None])[:, 0], batch["label"])  # Eq. 5
        parts = {"ctr": ctr.detach()}
        loss = ctr
        if self.use_nip:
            history_mask = batch["search_history_mask"]
            empty_user = torch.zeros(history_mask.shape[0], 0, device=history_mask.device)
            query_list = self.query_list_encoder(
                empty_user, self.queries(batch["search_history_query"]), history_mask
            )
            nip = next_item_loss(
                query_list,
                self.items(batch["next_positive"]), batch["next_positive_mask"],
                self.items(batch["next_negative"]), batch["next_negative_mask"],
                history_mask.any(-1),
            )  # fmt: skip
            loss = loss + self.lambda_nip * nip
            parts["nip"] = nip.detach()
        if self.use_contrastive:
            query = self.queries(batch["last_query"])
            positives = batch["query_positive"]
            contrast = contrastive_loss(
                self.similarity(query, self.items(positives)), batch["query_positive_mask"],
                self.similarity(query, self.items(batch["contrast_negatives"])),
                batch["contrast_negative_mask"], self.temperature,
            )  # fmt: skip
            loss = loss + self.lambda_contrast * contrast
            parts["contrast"] = contrast.detach()
        return loss, parts
