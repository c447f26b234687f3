"""Pre-training on both tasks, then fine-tuning on one: the switch shared by USER and
UnifiedSSR ("USER and UnifiedSSR derive two parameter sets for S&R tasks via
pre-training and fine-tuning", UniSAR Sec. 4.4, Discussion).

`finetune_task` rec|search: both tasks' losses count for the first `pretrain_epochs`
epochs, then only that task's; null: both throughout (one parameter set, ours). One rule
for both models:
  * after the switch the other task's loss is still computed, weighted 0, so every
    parameter keeps a gradient (multi-process (DDP) training refuses parameters that no
    loss reaches);
  * the optimiser's state is cleared once, at the start of the first fine-tuning epoch
    (UnifiedSSR's train.py starts fine-tuning with a new optimizer; USER's schedule is
    not known to us, and we use the same rule);
  * model selection is within fine-tuning, as the original's: early stopping is held
    while pre-training (its wait count and best score are reset after each pre-training
    validation, before its check), and at the switch its wait count and best score and
    the monitoring ModelCheckpoint's best are reset, so best.ckpt (what the test loads)
    is the best fine-tuning epoch;
  * the switch is recorded in the checkpoint: a run resumed after it (checkpoints are
    end-of-epoch) does not reset again; one resumed before it resets at the switch.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from sar_exp.errors import ConfigError

TASKS = ("rec", "search")
CHECKPOINT_KEY = "finetuning_started"


def check_finetune_settings(finetune_task, pretrain_epochs) -> None:
    if finetune_task not in (None, *TASKS):
        raise ConfigError(
            f"method.module.finetune_task must be rec, search or null, got {finetune_task!r}"
        )
    if pretrain_epochs is None or int(pretrain_epochs) < 0:
        raise ConfigError(f"method.module.pretrain_epochs must be >= 0, got {pretrain_epochs}")


def reset_early_stopping(callback: EarlyStopping) -> None:
    """As EarlyStopping starts: no wait, no best score."""
    inf = torch.tensor(torch.inf)
    callback.wait_count = 0
    callback.best_score = inf if callback.monitor_op == torch.lt else -inf


def reset_best_checkpoint(callback: ModelCheckpoint) -> None:
    """As a monitoring ModelCheckpoint starts: no best model, so the next validation
    writes its file (best.ckpt, overwritten in place)."""
    inf = torch.tensor(torch.inf)
    callback.best_k_models = {}
    callback.kth_best_model_path = ""
    callback.kth_value = inf if callback.mode == "min" else -inf
    callback.best_model_score = None
    callback.best_model_path = ""


class PretrainFinetuneSwitch:
    """Mixin (before the LightningModule base) for a module whose hparams hold
    finetune_task and pretrain_epochs; training_loss weights its tasks' losses by
    task_weights()."""

    _finetuning_started = False

    def finetuning(self, epoch: int | None = None) -> bool:
        """Whether `epoch` (default: the current one) fine-tunes."""
        hp = self.hparams
        epoch = self.current_epoch if epoch is None else epoch
        return hp.finetune_task is not None and epoch >= hp.pretrain_epochs

    def task_weights(self, epoch: int | None = None) -> dict[str, float]:
        """Each task's loss weight: 1 for both while pre-training (or throughout with
        finetune_task=null), then 1 for the fine-tuned task and 0 for the other."""
        if not self.finetuning(epoch):
            return {task: 1.0 for task in TASKS}
        return {task: float(task == self.hparams.finetune_task) for task in TASKS}

    def start_finetuning(self) -> None:
        """Once, at the switch: a fresh optimiser state and fresh model selection."""
        self._finetuning_started = True
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        for callback in self.trainer.callbacks:
            if isinstance(callback, EarlyStopping):
                reset_early_stopping(callback)
            elif isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
                reset_best_checkpoint(callback)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.finetuning() and not self._finetuning_started:
            self.start_finetuning()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        # runs before EarlyStopping's check (at the end of validation or of the training
        # epoch): while pre-training it never sees a wait, so it cannot stop the run
        if self.hparams.finetune_task is None or self.finetuning():
            return
        if self.trainer.sanity_checking:
            return
        for callback in self.trainer.callbacks:
            if isinstance(callback, EarlyStopping):
                reset_early_stopping(callback)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = self._finetuning_started

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if CHECKPOINT_KEY in checkpoint:
            self._finetuning_started = bool(checkpoint[CHECKPOINT_KEY])
        else:  # saved at the end of epoch `epoch`: the switch came at its start or before
            self._finetuning_started = self.finetuning(int(checkpoint.get("epoch", -1)))
