"""Every parameter of every method/backbone pair (and every ablation) gets a gradient
from one training step. Multi-process (DDP) training requires it; a parameter that no
loss reaches is either a bug or an ablated part that should not have been built."""

from __future__ import annotations

import hydra
import pytest
from omegaconf import OmegaConf

PAIRS = [
    (method, backbone, flags)
    for method, backbones in {
        "base": ["mlp", "mmoe", "gru4rec", "sasrec", "din"],
        "aug": ["mlp", "mmoe", "gru4rec", "sasrec", "din"],
        "jsr": ["mlp", "mmoe", "gru4rec", "sasrec"],
        "clardrec": ["mlp", "mmoe", "gru4rec", "sasrec"],
    }.items()
    for backbone in backbones
    for flags in [()]
] + [
    ("base", "din", ("backbone.encoder.use_query_history=true",)),
    *[("clardrec", "sasrec", (f"method.module.{flag}=false",)) for flag in
      ("use_cd", "use_fa", "use_da", "use_cs")],
    ("base", "din", ("task=ctr",)),
    *[("sesrec", b, ("protocol=sesrec",)) for b in ("sasrec", "gru4rec")],
    ("sesrec", "sasrec", ("protocol=sesrec", "method.module.use_mie=false",
                          "method.module.use_contrast=false", "method.module.use_align=false")),
    ("user", "sasrec", ()),
    ("user", "sasrec", ("method.module.finetune_task=search", "method.module.pretrain_epochs=0")),
    ("unifiedssr", "sasrec", ()),
    ("unifiedssr", "sasrec", ("method.module.use_ism=false",)),
]  # fmt: skip


@pytest.mark.parametrize(
    "method,backbone,flags", PAIRS, ids=[f"{m}-{b}{''.join(f)}" for m, b, f in PAIRS]
)
def test_one_step_reaches_every_parameter(make_cfg, method, backbone, flags):
    cfg = make_cfg(f"method={method}", f"backbone={backbone}", *flags)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    build = hydra.utils.instantiate(cfg.method.module, _partial_=True, _convert_="all")
    model = build(
        schema=datamodule.schema,
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        task=cfg.task,
        lookup_tables=datamodule.lookup_tables(),
    )
    loss, _ = model.training_loss(next(iter(datamodule.train_dataloader())))
    loss.backward()
    untrained = [name for name, p in model.named_parameters() if p.grad is None]
    assert untrained == []
