"""ClardRec's loss terms (Cui et al., "Counterfactual Learning-Driven Representation
Disentanglement for Search-Enhanced Recommendation"), one function per term.

Score tensors are [B, 1 + M]: column 0 is the clicked item i, columns 1..M the sampled
negatives i^-. Every term is averaged over the batch (the paper omits that average)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sar_exp.methods.losses import sampled_softmax_ce


def _triplet(positive_gap: torch.Tensor, negative_gap: torch.Tensor) -> torch.Tensor:
    """-log sigma(positive gap) - 1/M sum_{i^-} log sigma(negative gap), batch mean."""
    return (-F.logsigmoid(positive_gap) - F.logsigmoid(negative_gap).mean(dim=1)).mean()


def counterfactual_deltas(s_ui, s_ui_q, s_ui_u, s_qi, s_qi_q, s_qi_u) -> dict[str, torch.Tensor]:
    """Score variations after removing query-related (/q) or query-independent (/u)
    features: Delta_{ui/q} = s_{ui/q} - s_{ui}, and so on (Sec. 4.2.2)."""
    return {
        "ui/q": s_ui_q - s_ui,
        "qi/q": s_qi_q - s_qi,
        "ui/u": s_ui_u - s_ui,
        "qi/u": s_qi_u - s_qi,
    }


def matching_wise_loss(d: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 13: L_cd^{/q} and L_cd^{/u} (Eq. 10-11 as log-sigmoid triplets)."""
    l_q = _triplet(d["qi/q"][:, 0] - d["ui/q"][:, 0], d["ui/q"][:, 1:] - d["qi/q"][:, 1:])
    l_u = _triplet(d["ui/u"][:, 0] - d["qi/u"][:, 0], d["qi/u"][:, 1:] - d["ui/u"][:, 1:])
    return l_q, l_u


def removal_wise_loss(d: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14: L_cd^{qi} and L_cd^{ui} (Eq. 12 as log-sigmoid triplets)."""
    l_qi = _triplet(d["qi/q"][:, 0] - d["qi/u"][:, 0], d["qi/u"][:, 1:] - d["qi/q"][:, 1:])
    l_ui = _triplet(d["ui/u"][:, 0] - d["ui/q"][:, 0], d["ui/q"][:, 1:] - d["ui/u"][:, 1:])
    return l_qi, l_ui


def counterfactual_loss(d: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 15: L_cd = L_cd^{/q} + L_cd^{/u} + L_cd^{qi} + L_cd^{ui}."""
    return sum(matching_wise_loss(d)) + sum(removal_wise_loss(d))


def constraint_term(delta: torch.Tensor) -> torch.Tensor:
    """Eq. 16: removing features must not raise a positive's score nor lower a negative's."""
    return (delta[:, 0].clamp(min=0) + (-delta[:, 1:]).clamp(min=0).mean(dim=1)).mean()


def constraint_loss(d: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 17: the Eq. 16 term summed over the four variations."""
    return sum(constraint_term(d[key]) for key in ("ui/q", "ui/u", "qi/q", "qi/u"))


def search_loss(s_ui: torch.Tensor, s_qi: torch.Tensor) -> torch.Tensor:
    """Eq. 22: L_src = CE(s_ui, s_uqi) + CE(s_qi, s_uqi), each in the Eq. 4 form."""
    return sampled_softmax_ce(s_ui) + sampled_softmax_ce(s_qi)


def data_augmentation_loss(
    r_aug: torch.Tensor, s_ui_q_positive: torch.Tensor | None
) -> torch.Tensor:
    """Eq. 21: L_da = omega(s_{ui/q}) CE(r^aug_ui, s_uqi) with omega the in-batch softmax
    of the query-independent preference of each search click. With `None` (use_cs=false)
    it is Eq. 32, the plain mean CE.

    omega is a confidence weight, so it is detached: letting the loss move it would
    reward the model for shifting weight onto the clicks it already fits best."""
    log_prob = torch.log_softmax(r_aug, dim=-1)[:, 0] / r_aug.shape[1]  # Eq. 4 per sample
    if s_ui_q_positive is None:
        return -log_prob.mean()  # Eq. 32
    weights = torch.softmax(s_ui_q_positive.detach(), dim=0)
    return -(weights * log_prob).sum()
