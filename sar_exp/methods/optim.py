"""The optimiser setup the papers' official codes share (UniSAR, SESRec): Adam with the
L2 term as weight decay, and optionally ReduceLROnPlateau on the selection metric."""

from __future__ import annotations

import torch
from torch import nn


def decayed_adam(module: nn.Module, lr: float, weight_decay: float,
                 plateau: tuple[int, float] | None = None, monitor: str = ""):  # fmt: skip
    """Adam; weight decay on every parameter whose name has no "bias" (the codes),
    embeddings and temperatures included, except a temperature learned as its log (decay
    would pull tau to 1). plateau=(patience, min_lr): the rate drops tenfold after
    `patience` epochs without a better `monitor`, down to min_lr."""
    plain = lambda name: "bias" in name or "log_temperature" in name  # noqa: E731
    decay = [p for n, p in module.named_parameters() if not plain(n)]
    rest = [p for n, p in module.named_parameters() if plain(n)]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": rest, "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.Adam(groups, lr=lr)
    if plateau is None:
        return optimizer
    patience, min_lr = plateau
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.1, patience=patience, min_lr=min_lr
    )
    return {"optimizer": optimizer,
            # not strict: a run without validation (the benchmark) has no monitor value
            "lr_scheduler": {"scheduler": scheduler, "monitor": monitor,
                             "interval": "epoch", "strict": False}}  # fmt: skip
