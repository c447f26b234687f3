"""The CSV log, the ground truth of every run: one row per epoch with its training
values (epoch means) and validation values side by side, and a last row with the test
values. Written whatever other loggers a run uses."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from sar_exp.runs import write_atomic

TEST_ROW = "test"


class EpochCSVLogger(Logger):
    """`<save_dir>/<name>/metrics.csv` (and hparams.yaml), rewritten atomically at
    each log, so a killed run leaves a readable file.

    The file on disk is the state: a process that logs first reads what is there, so
    spawned DDP processes (which get a copy of this object) and a resumed run add their
    rows to the earlier ones. A new run starts without the file (train.run removes a
    stale one)."""

    def __init__(self, save_dir: str, name: str = "csv", version: str = ""):
        super().__init__()
        self._save_dir, self._name, self._version = str(save_dir), name, version
        self.rows: dict = {}  # epoch (or "test") -> {column: value}
        self._read_pid: int | None = None  # the process that read the file into `rows`
        self.config: dict = {}
        self.model_hparams: dict = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return str(Path(self._save_dir) / self._name)

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / "metrics.csv"

    def _read(self) -> None:
        if self._read_pid == os.getpid():
            return
        self._read_pid, self.rows = os.getpid(), {}
        if not self.metrics_file.exists():
            return
        with self.metrics_file.open() as handle:
            for row in csv.DictReader(handle):
                key = int(row["epoch"]) if row["epoch"].isdigit() else row["epoch"]
                values = {k: v for k, v in row.items() if v not in ("", None)}
                self.rows[key] = {**values, "epoch": key}

    @rank_zero_only
    def resume_before(self, epoch: int) -> None:
        """Keep the rows a resumed run already wrote for the epochs before `epoch` (a
        killed run may have logged part of a later one; its test row is gone too)."""
        self._read()
        self.rows = {k: v for k, v in self.rows.items() if isinstance(k, int) and k < epoch}
        self._write()

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """hparams.yaml: `config` (the run's whole config) and `model` (the arguments
        Lightning logs for the module)."""
        params = _plain(dict(params) if not isinstance(params, dict) else params)
        if "run_name" in params:
            self.config = params
        else:
            self.model_hparams = params
        path = Path(self.log_dir) / "hparams.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = OmegaConf.to_yaml(
            OmegaConf.create({"config": self.config, "model": self.model_hparams})
        )
        write_atomic(path, text)

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        metrics = dict(metrics)
        epoch = int(metrics.pop("epoch", -1))
        values = {}
        for key, value in metrics.items():
            if key.endswith("_step"):
                continue  # per-step values belong to the other loggers' curves
            values[key.removesuffix("_epoch")] = float(value)
        if not values:
            return
        self._read()
        key = TEST_ROW if any(k.startswith("test/") for k in values) else epoch
        row = self.rows.setdefault(key, {"epoch": key})
        row.update(values)
        if step is not None:
            row["step"] = step
        self._write()

    def _write(self) -> None:
        columns = ["epoch", "step"] + sorted(
            {k for row in self.rows.values() for k in row} - {"epoch", "step"}
        )
        order = sorted(k for k in self.rows if k != TEST_ROW) + (
            [TEST_ROW] if TEST_ROW in self.rows else []
        )
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for key in order:
            writer.writerow(self.rows[key])
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.metrics_file, buffer.getvalue())

    @rank_zero_only
    def save(self) -> None:
        if self.rows:
            self._write()


def _plain(value):
    """Values OmegaConf accepts: containers, numbers, strings; anything else as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger without the `anonymous` argument it always passes, which
    makes wandb print a deprecation warning at every run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        init = getattr(self, "_wandb_init", {})
        if init.get("anonymous") is None:
            init.pop("anonymous", None)
