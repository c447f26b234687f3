"""A Hydra callback that refuses a launcher this machine cannot run, in one line,
before any job starts (instead of the launcher's traceback)."""

from __future__ import annotations

import shutil
import sys

from hydra.experimental.callback import Callback


class LauncherCheck(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        target = str(config.hydra.launcher.get("_target_", ""))
        if "submitit" in target and "Slurm" in target and not shutil.which("srun"):
            print(
                "sar_exp: error: hydra/launcher=submitit_slurm needs a SLURM cluster (no srun "
                "on this machine); hydra/launcher=joblib runs jobs in parallel here",
                file=sys.stderr,
            )
            sys.exit(2)
