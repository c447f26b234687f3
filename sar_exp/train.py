"""`python -m sar_exp`: compose the config, train, test the best checkpoint, report."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sar_exp.errors import ConfigError, SarExpError

# Resolvers used by conf/config.yaml.
OmegaConf.register_new_resolver(
    "sar_view", lambda task, scenario: "ctr" if task == "ctr" else scenario, replace=True
)
OmegaConf.register_new_resolver(
    "sar_monitor", lambda task: "val/auc" if task == "ctr" else "val/ndcg@10", replace=True
)
OmegaConf.register_new_resolver("sar_eq", lambda a, b: str(a) == str(b), replace=True)

# The config tree lives at the top of the repository (conf/), beside this package.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
RANKING_KEYS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")
CTR_KEYS = ("auc", "gauc", "logloss")


def _quiet() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_MODE", "offline")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*is an instance of `nn.Module`.*")
    # Lightning prints through its own handler; without this Hydra's root handler
    # prints every line a second time.
    logging.getLogger("lightning.pytorch").propagate = False


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside `path` and rename into place: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def format_table(metrics: dict[str, float], title: str) -> str:
    keys = [k for k in metrics]
    width = max(10, *(len(k) for k in keys))
    lines = [title, "-" * (width + 12)]
    lines += [f"{k:<{width}}  {v:>8.4f}" for k, v in metrics.items()]
    return "\n".join(lines)


def set_threads(threads: int) -> None:
    """torch's intra-op threads for this process, from the config (not from the
    machine's core count or OMP_NUM_THREADS), so a result does not depend on how many
    cores a run happened to get. Inter-op threads can be set only once per process."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set (a second run in this process)
        pass


def _instantiate_all(group: DictConfig | None) -> list:
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    """Seed, build data/model/trainer, fit, test the best checkpoint; return test metrics."""
    return run(cfg)[0]


def run(cfg: DictConfig) -> tuple[dict[str, float], float]:
    """`train`, also returning the best validation value of `optimized_metric` (what a
    sweep may optimise: tuning on the test metric would leak the test set)."""
    import lightning.pytorch as pl  # imported here so `--help` stays fast

    from sar_exp.config_checks import check_config

    _quiet()
    check_config(cfg)
    set_threads(int(cfg.threads))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    # _partial_: plain Python objects (dicts, tensors) go to the constructor untouched.
    build_model = hydra.utils.instantiate(cfg.method.module, _partial_=True, _convert_="all")
    model = build_model(
        schema=datamodule.schema,
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        task=cfg.task,
        eval_mode=cfg.eval.mode,
        lookup_tables=datamodule.lookup_tables(),
    )
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    best_validation = float("nan")
    if cfg.train:
        trainer.fit(model, datamodule=datamodule)
        callback = trainer.checkpoint_callback
        ckpt_path = (callback.best_model_path or None) if callback else None
        if callback is not None and callback.best_model_score is not None:
            best_validation = float(callback.best_model_score)
    else:
        ckpt_path = str(Path(cfg.ckpt_path).expanduser())
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
    results = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    keys = CTR_KEYS if cfg.task == "ctr" else RANKING_KEYS
    metrics = {f"test/{k}": float(results[0][f"test/{k}"]) for k in keys}

    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "metrics.json", {**metrics, "threads": int(cfg.threads)})
        if ckpt_path:
            metrics_source = f"checkpoint {ckpt_path}"
        else:
            metrics_source = "last weights"
        title = f"{cfg.method.name} + {cfg.backbone.name} on {cfg.dataset.source} (test, {metrics_source})"
        print("\n" + format_table({k.removeprefix("test/"): v for k, v in metrics.items()}, title))
        print(f"\nmetrics.json and logs: {output_dir}")
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()  # lets several runs share one process (multiruns, tests)
    return metrics, best_validation


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        _, best_validation = run(cfg)
    except SarExpError as err:
        print(f"sar_exp: error: {err}", file=sys.stderr)
        sys.exit(2)
    return best_validation  # what Optuna sweeps maximise
