"""Shared fixtures: a tiny synthetic KuaiSAR folder and in-process config composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sar_exp.data.synthetic import make_config, write_kuaisar_folder
from sar_exp.train import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
# Small enough that one epoch of any backbone takes a second or two.
TINY = dict(n_users=120, n_items=400, n_topics=8, exposures_per_user=14.0, sessions_per_user=10.0)
TINY_OVERRIDES = [f"+dataset.synthetic.{k}={v}" for k, v in TINY.items()]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A KuaiSAR-format folder written by the generator (read-only for tests)."""
    return write_kuaisar_folder(
        make_config("small", **TINY), tmp_path_factory.mktemp("kuaisar") / "tiny"
    )


def compose_cfg(*overrides: str, output_dir: Path, cache_dir: Path, tiny: bool = True):
    """Compose conf/config.yaml with overrides (later ones win), one epoch, CSV logging,
    writing to output_dir; on the tiny dataset unless tiny=False. For module-scoped
    fixtures; tests take make_cfg."""
    GlobalHydra.instance().clear()
    base = [
        f"paths.root_dir={REPO}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={output_dir}",
        "logger=csv",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "config", overrides=base + (TINY_OVERRIDES if tiny else []) + list(overrides)
        )


@pytest.fixture
def make_cfg(cache_dir, tmp_path):
    """Compose conf/config.yaml with overrides, on the tiny dataset, writing under tmp_path."""

    def _make(*overrides: str, output_dir: Path | None = None, tiny: bool = True):
        out = output_dir or tmp_path / "run"
        return compose_cfg(*overrides, output_dir=out, cache_dir=cache_dir, tiny=tiny)

    yield _make
    GlobalHydra.instance().clear()


@pytest.fixture
def build_model(make_cfg):
    """(model, datamodule, first training batch) for overrides, as train() builds them."""
    import hydra
    from omegaconf import OmegaConf

    def _build(*overrides: str):
        cfg = make_cfg(*overrides)
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
        datamodule.setup()
        model = hydra.utils.instantiate(cfg.method.module, _partial_=True, _convert_="all")(
            schema=datamodule.schema, backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
            task=cfg.task, lookup_tables=datamodule.lookup_tables(),
            evaluated_tasks=datamodule.evaluation_tasks,
        )  # fmt: skip
        return model, datamodule, next(iter(datamodule.train_dataloader()))

    return _build
