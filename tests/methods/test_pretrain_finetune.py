"""The pre-train / fine-tune switch shared by USER and UnifiedSSR, on a toy module with
the framework's callbacks: selection within fine-tuning, one optimiser reset, resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from sar_exp.methods.pretrain_finetune import PretrainFinetuneSwitch


class Toy(PretrainFinetuneSwitch, pl.LightningModule):
    """A validation score that falls every epoch: the best epoch overall is the first
    pre-training one, the best fine-tuning epoch the first after the switch."""

    def __init__(self, finetune_task="rec", pretrain_epochs=3):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, 1)
        self.switched_at, self.loaded_epoch = [], None

    def start_finetuning(self):
        self.switched_at.append(self.current_epoch)
        super().start_finetuning()
        assert all(not optimizer.state for optimizer in self.trainer.optimizers)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/score", 1.0 / (1.0 + self.current_epoch))
        super().on_validation_epoch_end()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self.loaded_epoch = checkpoint["epoch"]


def _loader():
    return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)


def _trainer(tmp_path, max_epochs, patience=1):
    """The framework's callbacks (conf/callbacks/default.yaml): best.ckpt on the monitor,
    last.ckpt every epoch, early stopping on the monitor."""
    callbacks = [
        ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/score", mode="max",
                        save_top_k=1, enable_version_counter=False),
        ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None, save_top_k=1,
                        enable_version_counter=False),
        EarlyStopping(monitor="val/score", mode="max", patience=patience),
    ]  # fmt: skip
    return pl.Trainer(
        max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )  # fmt: skip


def _fit(trainer, model, ckpt_path=None):
    trainer.fit(model, _loader(), _loader(), ckpt_path=ckpt_path)


def test_selection_is_within_fine_tuning_and_the_test_loads_its_best(tmp_path):
    model = Toy(pretrain_epochs=3)
    trainer = _trainer(tmp_path, max_epochs=8, patience=1)
    _fit(trainer, model)
    # early stopping is held while pre-training (the score falls every epoch), then stops
    # one epoch after the first fine-tuning epoch, the best
    assert model.switched_at == [3]
    assert trainer.current_epoch == 5  # epochs 0..4 ran
    best = trainer.checkpoint_callback
    assert best.best_model_score.item() == pytest.approx(1.0 / 4.0)
    assert torch.load(best.best_model_path, weights_only=False)["epoch"] == 3
    trainer.test(model, _loader(), ckpt_path=best.best_model_path, verbose=False)
    assert model.loaded_epoch == 3


def test_without_a_finetuned_task_selection_spans_every_epoch(tmp_path):
    model = Toy(finetune_task=None)
    trainer = _trainer(tmp_path, max_epochs=8, patience=1)
    _fit(trainer, model)
    assert model.switched_at == [] and trainer.current_epoch == 2  # stopped at epoch 1
    assert torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)["epoch"] == 0


@pytest.mark.parametrize("stop_after, resets", [(1, [1]), (2, [])])
def test_a_resumed_run_resets_only_if_the_switch_is_still_ahead(tmp_path, stop_after, resets):
    """Checkpoints are end-of-epoch: last.ckpt after epoch 0 (pre-training) resumes into
    the switch at epoch 1; after epoch 1 (the switch done) it must not reset again."""
    first = Toy(pretrain_epochs=1)
    _fit(_trainer(tmp_path, max_epochs=stop_after, patience=10), first)
    assert first.switched_at == ([1] if stop_after > 1 else [])
    again = Toy(pretrain_epochs=1)
    trainer = _trainer(tmp_path, max_epochs=3, patience=10)
    _fit(trainer, again, ckpt_path=str(tmp_path / "last.ckpt"))
    assert again.switched_at == resets
    assert trainer.current_epoch == 3
