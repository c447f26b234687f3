"""Config checks that run before any data is loaded, so a bad value costs no time."""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sar_exp.errors import ConfigError

TASKS = ("ranking", "ctr")
EVAL_MODES = ("sampled", "full")


def _positive(cfg: DictConfig, key: str, kind=float) -> None:
    node, *_ = [cfg]
    for part in key.split("."):
        node = node.get(part) if node is not None else None
    try:
        ok = node is not None and kind(node) > 0 and kind(node) == float(node)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        what = "a positive integer" if kind is int else "a positive number"
        raise ConfigError(f"{key} must be {what}, got {node!r}")


def method_supports(method: DictConfig, backbone: str, task: str) -> bool:
    """The method config lists the backbones and tasks it works with; a backbone config
    may restrict the tasks further (`tasks`: BERT4Rec trains for ranking only)."""
    tasks = backbone_configs()[backbone].get("tasks") if backbone in backbone_configs() else None
    return (
        backbone in method.backbones and task in method.tasks and (tasks is None or task in tasks)
    )


@functools.cache
def backbone_configs() -> dict[str, DictConfig]:
    """Backbone name -> its conf/backbone file."""
    from sar_exp.train import CONFIG_DIR

    files = sorted((Path(CONFIG_DIR) / "backbone").glob("*.yaml"))
    return {p.stem: OmegaConf.load(p) for p in files}


def backbone_scenarios() -> dict[str, str]:
    """Backbone name -> the view its scenario uses (cf or sequential), from conf/backbone."""
    return {name: node.scenario for name, node in backbone_configs().items()}


def check_protocol(cfg: DictConfig) -> None:
    """A protocol is defined for some views (ClardRec's B.1 has one for CF and one for
    sequential data); a backbone or task that reads another view is refused."""
    protocol = cfg.dataset.protocol
    views = list(protocol.get("views") or [])
    view = "ctr" if cfg.task == "ctr" else cfg.backbone.scenario
    if not views or view in views:
        return
    name = protocol.get("name", "?")
    scenarios = backbone_scenarios()
    # ranking reads a backbone's scenario view; task=ctr reads the ctr view
    valid = [
        f"task=ranking backbone={b}" if cfg.task != "ranking" else f"backbone={b}"
        for b, scenario in scenarios.items()
        if scenario in views and method_supports(cfg.method, b, "ranking")
    ]
    if "ctr" in views:
        valid += [
            f"task=ctr backbone={b}" if cfg.task != "ctr" else f"backbone={b}"
            for b in scenarios
            if method_supports(cfg.method, b, "ctr")
        ]
    raise ConfigError(
        f"protocol={name} is defined for the {'/'.join(views)} view, but backbone="
        f"{cfg.backbone.name} task={cfg.task} reads the {view} view. Valid with "
        f"protocol={name} method={cfg.method.name}: {', '.join(valid) or 'none'}"
    )


def _missing(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys left as ??? (interpolations are not resolved, so a key that only points at a
    missing one is not named twice)."""
    found = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            found.append(path)
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            found += _missing(node[key], path + ".")
    return found


def check_required_values(cfg: DictConfig) -> None:
    """A value left as ??? (a required key) is named, with what to give."""
    missing = sorted(_missing(cfg))
    if not missing:
        return
    if "dataset.path" in missing:
        from sar_exp.data.datamodule import SOURCES

        source = cfg.dataset.get("source")
        raise ConfigError(f"dataset={source} needs dataset.path=DIR ({SOURCES.get(source, '')})")
    raise ConfigError(f"{missing[0]} needs a value ({missing[0]}=...)")


def check_synthetic(cfg: DictConfig) -> None:
    """dataset.synthetic keys are the generator's settings: a misspelt one is named."""
    from sar_exp.data.synthetic import check_settings

    if cfg.dataset.get("source") == "synthetic":
        check_settings(OmegaConf.to_container(cfg.dataset.get("synthetic") or {}, resolve=True))


def check_finetuning_epochs(cfg: DictConfig) -> None:
    """A pre-trained then fine-tuned model (USER, UnifiedSSR) needs a fine-tuning epoch:
    its model selection considers fine-tuning epochs only."""
    module = cfg.method.get("module") or {}
    task, pretrain = module.get("finetune_task"), module.get("pretrain_epochs")
    if task is None or pretrain is None:
        return
    if int(cfg.trainer.max_epochs) <= int(pretrain):
        raise ConfigError(
            f"method.module.finetune_task={task} needs trainer.max_epochs > "
            f"method.module.pretrain_epochs, got trainer.max_epochs={cfg.trainer.max_epochs} "
            f"and method.module.pretrain_epochs={pretrain}: no epoch would fine-tune"
        )


def check_config(cfg: DictConfig) -> None:
    check_required_values(cfg)
    check_synthetic(cfg)
    if cfg.task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {cfg.task!r}")
    if cfg.eval.mode not in EVAL_MODES:
        raise ConfigError(f"eval.mode must be one of {list(EVAL_MODES)}, got {cfg.eval.mode!r}")
    method, backbone = cfg.method, cfg.backbone
    if backbone.get("tasks") is not None and cfg.task not in backbone.tasks:
        raise ConfigError(
            f"backbone={backbone.name} works with task={'/'.join(backbone.tasks)} only, got task={cfg.task}"
        )
    if not method_supports(method, backbone.name, cfg.task):
        pairs = ", ".join(f"method={method.name} backbone={b}" for b in method.backbones)
        raise ConfigError(
            f"method={method.name} does not work with backbone={backbone.name} task={cfg.task}. "
            f"Valid: {pairs} (task: {', '.join(method.tasks)})"
        )
    check_protocol(cfg)
    monitor = str(cfg.get("optimized_metric", ""))
    scored = set(cfg.method.get("scores") or ["rec"]) & set(
        cfg.dataset.protocol.get("evaluated_tasks") or ["rec"]
    )
    if "/mean_" in monitor:  # the mean of the rec and search values
        needs = {"rec", "search"}
    else:
        needs = {"search"} if "search/" in monitor else {"rec"}
    if monitor.startswith("val/") and not needs <= scored:
        raise ConfigError(
            f"optimized_metric={monitor} needs that task scored: method={cfg.method.name} "
            f"scores {list(cfg.method.get('scores') or ['rec'])} and "
            f"dataset.protocol.evaluated_tasks is {list(cfg.dataset.protocol.get('evaluated_tasks') or ['rec'])}"
        )
    if cfg.task == "ctr" and cfg.dataset.get("source") == "amazon":
        raise ConfigError(
            "dataset=amazon holds purchases only, no shown-but-not-clicked items: task=ctr "
            "needs them (KuaiSAR and the synthetic data have them)"
        )
    if cfg.task == "ctr" and cfg.eval.mode == "full":
        raise ConfigError(
            "eval.mode=full is a ranking protocol; task=ctr evaluates AUC on impressions"
        )
    _positive(cfg, "data.batch_size", int)
    _positive(cfg, "data.eval_batch_size", int)
    _positive(cfg, "method.module.lr")
    _positive(cfg, "trainer.max_epochs", int)
    _positive(cfg, "threads", int)
    check_finetuning_epochs(cfg)
    if int(cfg.data.num_train_negatives) < (1 if cfg.task == "ranking" else 0):
        raise ConfigError(
            f"data.num_train_negatives must be >= 1 for ranking, got {cfg.data.num_train_negatives}"
        )
    if not cfg.train and not cfg.ckpt_path:
        raise ConfigError("train=false needs ckpt_path=FILE (a checkpoint to test)")
