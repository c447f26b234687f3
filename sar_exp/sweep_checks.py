"""A Hydra callback around multiruns: a launcher this machine cannot run is refused in
one line before any job starts (instead of the launcher's traceback), and a sweep whose
jobs failed says so at the end and exits with status 1 (the other jobs still ran)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback


class SweepChecks(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        target = str(config.hydra.launcher.get("_target_", ""))
        if "submitit" in target and "Slurm" in target and not shutil.which("srun"):
            print(
                "sar_exp: error: hydra/launcher=submitit_slurm needs a SLURM cluster (no srun "
                "on this machine); hydra/launcher=joblib runs jobs in parallel here",
                file=sys.stderr,
            )
            sys.exit(2)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        failed = sorted(p.name for p in sweep.glob("*_FAILED") if p.is_dir())
        if failed:
            print(
                f"sar_exp: {len(failed)} job(s) of the sweep failed ({', '.join(failed)}); "
                f"python -m sar_exp.report {sweep} lists why",
                file=sys.stderr,
            )
            sys.exit(1)
