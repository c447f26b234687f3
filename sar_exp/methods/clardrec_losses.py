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
    features, as the paper defines them: Delta_{ui/q} = s_{ui/q} - s_{ui} (after minus
    before), and so on (Sec. 4.2.2). For a positive item they are <= 0, for a negative >= 0."""
    return {
        "ui/q": s_ui_q - s_ui,
        "qi/q": s_qi_q - s_qi,
        "ui/u": s_ui_u - s_ui,
        "qi/u": s_qi_u - s_qi,
    }


# Which way Eq. 13-14 read the variations. The paper contradicts itself here: with
# Delta = after - before, a positive has Delta <= 0, so Eq. 10 (|Delta_qi/q| >
# |Delta_ui/q|) means Delta_qi/q < Delta_ui/q, yet Eq. 13 as printed, -log sigma(
# Delta_qi/q - Delta_ui/q), pushes Delta_qi/q *above* Delta_ui/q (and likewise for the
# negatives, Eq. 11 and Eq. 12/14). Eq. 13-14 agree with Eq. 10-12 only when Delta is
# the drop, before minus after, so that is the default ("drop"): it trains the
# disentanglement the paper argues for. "printed" keeps the literal form, which trains
# the reverse (i_/q keeps the query match and loses the user match); it is there to
# reproduce that reading, not to be used. Eq. 16 keeps after - before in both cases.
CD_DIRECTIONS = ("drop", "printed")


def _compared(d: dict[str, torch.Tensor], direction: str) -> dict[str, torch.Tensor]:
    """The variations Eq. 13-14 compare: drops (-Delta) by default, Delta if printed."""
    if direction not in CD_DIRECTIONS:
        raise ValueError(
            f"method.module.cd_direction must be one of {list(CD_DIRECTIONS)}, got {direction!r}"
        )
    return {k: -v for k, v in d.items()} if direction == "drop" else d


def matching_wise_loss(
    d: dict[str, torch.Tensor], direction: str = "drop"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 13: L_cd^{/q} (Eq. 10: removing query-related features moves the query match
    more than the user match) and L_cd^{/u} (Eq. 11: the converse), as log-sigmoid
    triplets over the positive and the M negatives."""
    g = _compared(d, direction)
    l_q = _triplet(g["qi/q"][:, 0] - g["ui/q"][:, 0], g["ui/q"][:, 1:] - g["qi/q"][:, 1:])
    l_u = _triplet(g["ui/u"][:, 0] - g["qi/u"][:, 0], g["qi/u"][:, 1:] - g["ui/u"][:, 1:])
    return l_q, l_u


def removal_wise_loss(
    d: dict[str, torch.Tensor], direction: str = "drop"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14: L_cd^{qi} (Eq. 12 left: the query match moves more when query-related
    features go than when query-independent ones go) and L_cd^{ui} (Eq. 12 right)."""
    g = _compared(d, direction)
    l_qi = _triplet(g["qi/q"][:, 0] - g["qi/u"][:, 0], g["qi/u"][:, 1:] - g["qi/q"][:, 1:])
    l_ui = _triplet(g["ui/u"][:, 0] - g["ui/q"][:, 0], g["ui/q"][:, 1:] - g["ui/u"][:, 1:])
    return l_qi, l_ui


def counterfactual_loss(d: dict[str, torch.Tensor], direction: str = "drop") -> torch.Tensor:
    """Eq. 15: L_cd = L_cd^{/q} + L_cd^{/u} + L_cd^{qi} + L_cd^{ui}."""
    return sum(matching_wise_loss(d, direction)) + sum(removal_wise_loss(d, direction))


def constraint_term(delta: torch.Tensor) -> torch.Tensor:
    """Eq. 16 with Delta = after - before: removing features must not raise a positive's
    score (max(Delta, 0)) nor lower a negative's (max(-Delta, 0))."""
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
