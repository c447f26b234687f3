"""Checkpoints that carry their run: the config a model was trained with and the random
states, written so that a kill while saving never leaves half a file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sar_exp.runs import CHECKPOINT_KEY


class RunState(pl.Callback):
    """Stores the run's config (see runs.identity) in every checkpoint, so `train=false`
    can rebuild the model, and the global random states, so a resumed run continues
    the same random stream as an uninterrupted one."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "config": self.config,
            # tensors, ints and tuples only: Lightning loads checkpoints weights_only
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": _numpy_state(),
                "python": random.getstate(),
            },
        }

    def on_load_checkpoint(self, trainer, module, checkpoint) -> None:
        rng = checkpoint.get(CHECKPOINT_KEY, {}).get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            name, keys, *rest = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
            random.setstate(rng["python"])


def _numpy_state() -> tuple:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return (
        name,
        torch.from_numpy(keys.astype(np.int64)),
        int(position),
        int(has_gauss),
        float(cached),
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes beside the target and renames into place: a run killed while saving
    keeps its previous checkpoint intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def set_intra_op_threads(threads: int) -> None:
    """torch's intra-op threads, and OMP_NUM_THREADS for the processes this one starts:
    spawned DDP ranks inherit it, and Lightning then leaves their thread count alone (it
    sets cpu_count / processes when OMP_NUM_THREADS is unset)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


class Threads(pl.Callback):
    """Sets the run's thread count in every process that trains (spawned DDP ranks
    start with torch's default, or with what Lightning chose for them)."""

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self, trainer, module, stage) -> None:
        set_intra_op_threads(self.threads)
