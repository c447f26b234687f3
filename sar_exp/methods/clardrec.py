"""ClardRec (Cui et al.): counterfactual learning-driven representation disentanglement
for search-enhanced recommendation; collaborative filtering and sequential scenarios.

Equation numbers refer to the paper (../shared/papers/clardrec.txt)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from sar_exp.backbones.embeddings import mlp
from sar_exp.errors import ConfigError
from sar_exp.methods.base import TwoDomainRecommender
from sar_exp.methods.clardrec_losses import (
    CD_DIRECTIONS,
    constraint_loss,
    counterfactual_deltas,
    counterfactual_loss,
    data_augmentation_loss,
    search_loss,
)
from sar_exp.methods.losses import sampled_softmax_ce

log = logging.getLogger(__name__)


class GatedDisentangler(nn.Module):
    """Item attribute-aware gated disentangling (Eq. 6-8).

    z_ID (element-wise, d_e) gates the id part and one scalar z^{aj} gates each
    attribute; m = 1 - z. Both halves are scaled by 2 so (i_/q + i_/u) / 2 = i_emb."""

    def __init__(self, part_dim: int, num_attributes: int, hidden_dim: int):
        super().__init__()
        item_dim = part_dim * (1 + num_attributes)  # d_i = (|i^a| + 1) d_e
        self.id_gate = mlp(item_dim, hidden_dim, 2, out_dim=part_dim)  # Eq. 7
        self.attribute_gate = mlp(item_dim, hidden_dim, 2, out_dim=max(1, num_attributes))  # Eq. 8
        self.num_attributes = num_attributes

    def forward(
        self, parts: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """parts = [i_ID, i_a1, ...] -> (i_/q_emb, i_/u_emb, z_ID, z_a)."""
        item = torch.cat(parts, dim=-1)
        z_id = torch.sigmoid(self.id_gate(item))
        z_attr = torch.sigmoid(self.attribute_gate(item))[..., : self.num_attributes]
        keep = [z_id * parts[0]] + [z_attr[..., j : j + 1] * p for j, p in enumerate(parts[1:])]
        drop = [(1 - z_id) * parts[0]] + [
            (1 - z_attr[..., j : j + 1]) * p for j, p in enumerate(parts[1:])
        ]
        return 2 * torch.cat(keep, dim=-1), 2 * torch.cat(drop, dim=-1), z_id, z_attr  # Eq. 6


class ClardRec(TwoDomainRecommender):
    """ClardRec on any two-tower backbone (MLP, MMoE: CF; GRU4Rec, SASRec: sequential).

    Ablations (Table 2 and Table 5), all on by default:
      use_cd  counterfactual disentangling; off: i_src replaces i_/q^src, no L_cd, L_con
      use_fa  feature augmentation (Eq. 18-20); off: r_ui = u_rec . i_rec (Eq. 3)
      use_da  data augmentation (Eq. 21); off: L_da = 0
      use_cs  confidence scores in L_da; off: Eq. 32 instead of Eq. 21
    cd_direction: "drop" (default) reads Eq. 13-14's variations as score drops, as
      Eq. 10-12 require; "printed" is their literal form (see clardrec_losses).
    """

    def __init__(
        self,
        schema: dict,
        backbone: dict,
        lambda_: float = 0.02,
        alpha: float = 0.2,
        beta: float = 0.5,
        gamma: float = 0.1,
        use_cd: bool = True,
        use_fa: bool = True,
        use_da: bool = True,
        use_cs: bool = True,
        cd_direction: str = "drop",
        **kwargs,
    ):
        # Shared bottom embeddings, per-domain user encoders and item MLPs (Eq. 1-5);
        # queries live in d_h so they meet users and items in dot products (Sec. 4.1).
        super().__init__(schema, backbone, **kwargs)
        if cd_direction not in CD_DIRECTIONS:
            raise ConfigError(
                f"method.module.cd_direction must be one of {list(CD_DIRECTIONS)}, got {cd_direction!r}"
            )
        if use_cd and self.hparams.item_layers == 1:
            # An affine Enc^i_src maps i_/q^emb + i_/u^emb = 2 i^emb (Eq. 6) to
            # Enc(i_/q) + Enc(i_/u) = 2 Enc(i), so Delta_/u = -Delta_/q exactly. Then the
            # two matching-wise terms of Eq. 13 are one loss, Eq. 12/14 ask |Delta_/u| >
            # |Delta_/q| of equal magnitudes (met only by a positive's score *rising*),
            # and Eq. 16-17 become |Delta_/q|, pulling i_/q back to i.
            log.warning(
                "ClardRec with method.module.item_layers=1 (L_e = 1, Table 4's SASRec row): the "
                "item encoder is affine, so Delta_/u = -Delta_/q: L_cd^/q and L_cd^/u coincide, "
                "Eq. 14 rewards a positive's score rising and L_con pulls i_/q back to i; the "
                "counterfactual disentangling cannot separate the features (item_layers >= 2 can)"
            )
        # An ablated part is not kept (-CD: no gates, -FA: no fusion gate), so every
        # parameter a run has is trained (multi-process training requires it). Both are
        # drawn all the same, so an ablation starts from the full model's initial
        # weights in every other part and differs only in what it removes.
        d_h = self.hparams.hidden_dim
        disentangler = GatedDisentangler(
            self.items.part_dim, len(schema["item_attribute_sizes"]), d_h
        )  # Eq. 6-8
        fusion_gate = mlp(2 * d_h, d_h, 2, out_dim=1)  # Eq. 19
        if use_cd:
            self.disentangler = disentangler
        if use_fa:
            self.fusion_gate = fusion_gate

    # ------------------------------------------------------------ representations
    def query_independent_items(self, candidates: torch.Tensor) -> dict[str, torch.Tensor]:
        """i_src, i_/q^src and i_/u^src (Eq. 9) for a [B, K] tensor of items."""
        parts = self.items.parts(candidates)
        i_src = self.search_item_encoder(torch.cat(parts, dim=-1))
        if not self.hparams.use_cd:
            return {"i_src": i_src, "i_/q": i_src}
        i_q_emb, i_u_emb, _, _ = self.disentangler(parts)
        return {
            "i_src": i_src,
            "i_/q": self.search_item_encoder(i_q_emb),
            "i_/u": self.search_item_encoder(i_u_emb),
        }

    def score(self, batch, candidates):
        user = self.rec_user(batch)
        i_rec = self.rec_item_encoder(self.items(candidates))
        if self.hparams.use_fa:
            i_q = self.query_independent_items(candidates)["i_/q"]
            g = torch.sigmoid(self.fusion_gate(torch.cat([i_rec, i_q], dim=-1)))  # Eq. 19
            i_rec = g * i_rec + (1 - g) * i_q  # Eq. 18
        return (user.unsqueeze(1) * i_rec).sum(-1)  # Eq. 20 (Eq. 3 without FA)

    # ------------------------------------------------------------ training
    def training_loss(self, batch):
        hp = self.hparams
        rec_loss = sampled_softmax_ce(self.score(batch, batch["candidates"]))  # L_rec
        search = batch["search"]
        u_src = self.search_user(search)
        q_src = self.queries(search["query"])
        items = self.query_independent_items(search["candidates"])
        dot = lambda a, b: (a.unsqueeze(1) * b).sum(-1)  # noqa: E731
        s_ui, s_qi = dot(u_src, items["i_src"]), dot(q_src, items["i_src"])
        parts = {"rec": rec_loss, "src": search_loss(s_ui, s_qi)}  # Eq. 22
        aux = parts["src"]
        if hp.use_cd:
            d = counterfactual_deltas(
                s_ui, dot(u_src, items["i_/q"]), dot(u_src, items["i_/u"]),
                s_qi, dot(q_src, items["i_/q"]), dot(q_src, items["i_/u"]),
            )  # fmt: skip
            parts["cd"] = counterfactual_loss(d, hp.cd_direction)  # Eq. 13-15
            parts["con"] = constraint_loss(d)  # Eq. 16-17
            aux = aux + hp.alpha * parts["cd"] + hp.gamma * parts["con"]
        if hp.use_da:
            # r^aug_ui = u_rec . i_/q^src. Eq. 21 does not say which negatives its CE
            # uses; the search triplet's own M negatives (search items, where AUG's are
            # rec items: L_da's label is the search click s_uqi, and the same candidates
            # feed Eq. 13-17) keep one forward pass.
            r_aug = dot(self.rec_user(search), items["i_/q"])
            confidence = dot(u_src, items["i_/q"])[:, 0] if hp.use_cs else None  # s_{ui/q}
            parts["da"] = data_augmentation_loss(r_aug, confidence)
            aux = aux + hp.beta * parts["da"]
        loss = rec_loss + hp.lambda_ * aux  # Eq. 23
        return loss, {k: v.detach() for k, v in parts.items()}
