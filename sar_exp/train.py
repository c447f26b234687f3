"""`python -m sar_exp`: compose the config, train, test the best checkpoint, report."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sar_exp import runs
from sar_exp.errors import ConfigError, SarExpError

# Resolvers used by conf/config.yaml.
OmegaConf.register_new_resolver(
    "sar_view", lambda task, scenario: "ctr" if task == "ctr" else scenario, replace=True
)
OmegaConf.register_new_resolver(
    "sar_monitor", lambda task: "val/auc" if task == "ctr" else "val/ndcg@10", replace=True
)
OmegaConf.register_new_resolver(
    "sar_if_ctr", lambda task, value: value if task == "ctr" else 0.0, replace=True
)
OmegaConf.register_new_resolver("sar_eq", lambda a, b: str(a) == str(b), replace=True)
OmegaConf.register_new_resolver("sar_run_name", runs.run_name, replace=True)
OmegaConf.register_new_resolver("sar_run_dir", runs.run_dir, replace=True, use_cache=True)

# The config tree lives at the top of the repository (conf/), beside this package.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
RANKING_KEYS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")
CTR_KEYS = ("auc", "gauc", "logloss")
# Loggers that print on their own (not through the root logger); a run's log file
# is added to them so train.log holds what they say.
RUN_LOGGERS = ("lightning.pytorch", "sar_exp.progress", "sar_exp.results")


def _quiet() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_MODE", "offline")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*is an instance of `nn.Module`.*")
    # Lightning prints through its own handler, and our progress and results lines are
    # printed too: without this Hydra's root handler would print each a second time.
    for name in RUN_LOGGERS:
        logging.getLogger(name).propagate = False


def write_json_atomic(path: Path, payload: dict) -> None:
    runs.write_atomic(Path(path), json.dumps(payload, indent=2, sort_keys=True) + "\n")


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

    from sar_exp.checkpointing import set_intra_op_threads

    set_intra_op_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set (a second run in this process)
        pass


def build_model(cfg: DictConfig, datamodule):
    """The method's Lightning module for cfg, sized by the (set-up) datamodule."""
    # _partial_: plain Python objects (dicts, tensors) go to the constructor untouched.
    build = hydra.utils.instantiate(cfg.method.module, _partial_=True, _convert_="all")
    return build(
        schema=datamodule.schema,
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        task=cfg.task,
        eval_mode=cfg.eval.mode,
        evaluated_tasks=list(datamodule.evaluation_tasks),
        lookup_tables=datamodule.lookup_tables(),
    )


def load_run(run_dir: str | Path):
    """(datamodule, model) of a finished run, for analysis: its config.yaml composed
    again, the data set up for testing, the model in eval mode with its best.ckpt."""
    import torch

    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    datamodule.setup("test")
    model = build_model(cfg, datamodule)
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu",
                            weights_only=False)  # fmt: skip
    model.load_state_dict(checkpoint["state_dict"])
    return datamodule, model.eval()


def _instantiate_all(group: DictConfig | None) -> list:
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node and "_target_" in node]


def _without_progress_bar_if_off(cfg: DictConfig) -> DictConfig | None:
    """`trainer.enable_progress_bar=false` alone switches the bar off: Lightning refuses
    a progress-bar callback with it, so the configured bar is left out."""
    group = cfg.get("callbacks")
    if not group or cfg.trainer.get("enable_progress_bar", True):
        return group
    return {key: node for key, node in group.items() if key != "progress_bar"}


def train(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, float]:
    """Seed, build data/model/trainer, fit, test the best checkpoint; return test metrics."""
    return run(cfg, overrides)[0]


def _user_overrides() -> list[str]:
    """The command line's overrides (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _checkpoint_to_test(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, str]:
    from sar_exp.runs import restore_from_checkpoint

    ckpt_path = str(Path(str(cfg.ckpt_path)).expanduser())
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
    return restore_from_checkpoint(cfg, ckpt_path, overrides), ckpt_path


def _checkpoint_to_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """ckpt_path with train=true resumes training: `last` is this run's last.ckpt (the
    run directory of an unfinished run of the same name, see runs.run_dir)."""
    if not cfg.ckpt_path:
        return None
    if str(cfg.ckpt_path) == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path=last: no unfinished run named {cfg.run_name} with a last.ckpt "
                f"under {output_dir.parent}"
            )
        return str(path)
    path = Path(str(cfg.ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
    return str(path)


@contextlib.contextmanager
def run_log(output_dir: Path, enabled: bool = True):
    """Everything the run logs (Lightning's messages, preprocessing stages, the
    results) also goes to <run dir>/train.log, beside the console."""
    if not enabled:
        yield
        return
    path = (output_dir / "train.log").resolve()
    root = logging.getLogger()
    handler = next(
        (h for h in root.handlers if isinstance(h, logging.FileHandler)
         and Path(h.baseFilename).resolve() == path),
        None,
    )  # fmt: skip
    own = handler is None  # outside Hydra (tables, tests): open it here
    if own:
        output_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a")
        handler.setFormatter(
            logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        )
        root.addHandler(handler)
    # INFO reaches the file; the console shows what it showed before (the table runner
    # keeps Lightning's banners off it)
    quiet = [logging.getLogger(name) for name in RUN_LOGGERS]
    saved = [(logger, logger.level, [(h, h.level) for h in logger.handlers]) for logger in quiet]
    for logger in quiet:
        shown = logger.getEffectiveLevel()
        for other in logger.handlers:
            other.setLevel(max(other.level, shown))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level, handlers in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            for other, other_level in handlers:
                other.setLevel(other_level)
        if own:
            root.removeHandler(handler)
            handler.close()


def is_rank_zero() -> bool:
    """Whether this process is the first of its run (torchrun sets RANK; Lightning's
    own launcher sets LOCAL_RANK and NODE_RANK in the ranks it starts)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _start_fresh(output_dir: Path) -> None:
    """A new (not resumed) run in a directory that held one: nothing of the old run
    may pass for this one's (a stale last.ckpt would be resumed, a stale CSV merged)."""
    for stale in [*output_dir.glob("checkpoints/*.ckpt"), output_dir / "csv" / "metrics.csv"]:
        stale.unlink(missing_ok=True)


def _best_score(callback) -> float:
    """The best validation score, also when the fit ran in spawned processes (which
    send back the best checkpoint's path but not its score)."""
    if callback is None:
        return float("nan")
    if callback.best_model_score is not None:
        return float(callback.best_model_score)
    if callback.best_model_path and Path(callback.best_model_path).is_file():
        import torch

        states = torch.load(callback.best_model_path, map_location="cpu", weights_only=False)
        for key, state in states.get("callbacks", {}).items():
            if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
                if state.get("monitor") == callback.monitor:
                    return float(state["best_model_score"])
    return float("nan")


def run(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[dict[str, float], float]:
    """`train`, also returning the best validation value of `optimized_metric` (what a
    sweep may optimise: tuning on the test metric would leak the test set)."""
    import lightning.pytorch as pl  # imported here so `--help` stays fast
    import torch

    from sar_exp.checkpointing import AtomicCheckpointIO, RunState, Threads
    from sar_exp.config_checks import check_config
    from sar_exp.loggers import EpochCSVLogger
    from sar_exp.runs import FINISHED, identity

    _quiet()
    overrides = _user_overrides() if overrides is None else overrides
    ckpt_to_test = None
    if not cfg.train:
        if not cfg.ckpt_path:
            raise ConfigError("train=false needs ckpt_path=FILE (a checkpoint to test)")
        cfg, ckpt_to_test = _checkpoint_to_test(cfg, overrides)
    check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    rank_zero = is_rank_zero()  # the ranks of a run share its directory
    with run_log(output_dir, enabled=rank_zero):
        resume_from = _checkpoint_to_resume(cfg, output_dir) if cfg.train else None
        if rank_zero:
            output_dir.mkdir(parents=True, exist_ok=True)
            runs.hold_run_lock(output_dir)
            if resume_from and Path(resume_from).parent.parent == output_dir:
                runs.check_same_run(output_dir, cfg)
            elif cfg.train:
                _start_fresh(output_dir)
            (output_dir / FINISHED).unlink(missing_ok=True)
            runs.write_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        set_threads(int(cfg.threads))
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
        datamodule.prepare_data()
        datamodule.setup("fit")
        model = build_model(cfg, datamodule)
        callbacks = [
            *_instantiate_all(_without_progress_bar_if_off(cfg)),
            RunState(identity(cfg)),
            Threads(int(cfg.threads)),
        ]
        loggers = _instantiate_all(cfg.get("logger"))
        if not any(isinstance(logger, EpochCSVLogger) for logger in loggers):
            loggers.append(EpochCSVLogger(str(output_dir)))  # the ground truth, always
        config = OmegaConf.to_container(cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(config)  # the whole run, not only the model's arguments
        trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
        )

        best_validation = float("nan")
        if cfg.train:
            if resume_from:
                epoch = int(
                    torch.load(resume_from, map_location="cpu", weights_only=False)["epoch"]
                )
                for logger in loggers:
                    if isinstance(logger, EpochCSVLogger):
                        logger.resume_before(epoch + 1)
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
            callback = trainer.checkpoint_callback
            ckpt_path = (callback.best_model_path or None) if callback else None
            best_validation = _best_score(callback)
        else:
            ckpt_path = ckpt_to_test
        try:
            results = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise
            raise ConfigError(
                f"ckpt_path={ckpt_path} does not fit this model: {str(err).splitlines()[0]}"
            ) from None
        keys = []
        if "rec" in datamodule.evaluation_tasks:
            keys += [f"test/{k}" for k in (CTR_KEYS if cfg.task == "ctr" else RANKING_KEYS)]
        if "search" in datamodule.evaluation_tasks:
            keys += [f"test/search/{k}" for k in RANKING_KEYS]
        logged = {k: v for result in results for k, v in result.items()}
        metrics = {key: float(logged[key]) for key in keys}

        if trainer.is_global_zero:
            source = f"checkpoint {ckpt_path}" if ckpt_path else "last weights"
            title = (
                f"{cfg.method.name} + {cfg.backbone.name} on {cfg.dataset.source} (test, {source})"
            )
            table = format_table({k.removeprefix("test/"): v for k, v in metrics.items()}, title)
            print("\n" + table)
            print(f"\nmetrics.json and logs: {output_dir}")
            logging.getLogger("sar_exp.results").info("\n" + table)
            # written last: a run directory with metrics.json is a finished run
            write_json_atomic(output_dir / FINISHED, {**metrics, "threads": int(cfg.threads)})
        if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
            import wandb

            wandb.finish()  # lets several runs share one process (multiruns, tests)
    runs.release_run_lock(output_dir)
    return metrics, best_validation


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """One run. A run that fails is marked FAILED (see runs.mark_failed); in a multirun
    the other jobs go on, and a sweep sees NaN for it."""
    from sar_exp.runs import mark_failed

    try:
        _, best_validation = run(cfg)
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        output_dir = Path(cfg.paths.output_dir)
        runs.release_run_lock(output_dir)
        reason = str(err) if isinstance(err, SarExpError) else traceback.format_exc()
        # an attempt to resume that fails leaves the interrupted run as it was
        continuing = (
            str(cfg.ckpt_path) == "last" and (output_dir / "checkpoints" / "last.ckpt").exists()
        )
        marked = output_dir if continuing else mark_failed(output_dir, reason)
        if isinstance(err, SarExpError):
            message = f"sar_exp: error: {err}"
        else:
            message = f"sar_exp: {type(err).__name__}: {err} (traceback in {marked / 'FAILED'})"
        print(message, file=sys.stderr)
        if _multirun():
            return float("nan")  # the sweep goes on; the summary marks this job
        if isinstance(err, SarExpError):
            sys.exit(2)
        raise
    return best_validation  # what Optuna sweeps maximise
