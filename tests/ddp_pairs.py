"""Every method/backbone pair trained for a few steps in two CPU processes.

Run by tests/test_ddp.py under torchrun (`python -m torch.distributed.run
--nproc_per_node=2 tests/ddp_pairs.py OUT CACHE`): one launch serves every pair, which
keeps the suite fast. Each rank records what its first training batch held (rec
samples, companion search samples, training negatives); rank 0 writes OUT/results.json.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import lightning.pytorch as pl

PAIRS = [
    ("base", "mlp"), ("base", "mmoe"), ("base", "gru4rec"), ("base", "sasrec"), ("base", "din"),
    ("aug", "mlp"), ("aug", "mmoe"), ("aug", "gru4rec"), ("aug", "sasrec"), ("aug", "din"),
    ("jsr", "mlp"), ("jsr", "mmoe"), ("jsr", "gru4rec"), ("jsr", "sasrec"),
    ("clardrec", "mlp"), ("clardrec", "mmoe"), ("clardrec", "gru4rec"), ("clardrec", "sasrec"),
    ("unisar", "sasrec"), ("sesrec", "sasrec"), ("sesrec", "gru4rec"),
    # the papers' baseline rows (issue 15)
    ("base", "stamp"), ("base", "dien"), ("base", "fmlprec"), ("base", "bert4rec"),
    ("jsr", "din"), ("queryseqrec", "sasrec"), ("nrhub", "sasrec"), ("zam", "sasrec"),
    ("tem", "sasrec"), ("copps", "sasrec"), ("user", "sasrec"), ("unifiedssr", "sasrec"),
]  # fmt: skip
# what a method needs beyond the defaults (UniSAR: its merged history, both tasks scored)
EXTRA = {
    "unisar": ["protocol=unisar", "dataset.protocol.evaluated_tasks=[rec,search]",
               "optimized_metric=val/mean_ndcg@5", "method.module.rel_negatives=16"],
    "sesrec": ["protocol=sesrec", "method.module.align_negatives=16"],
    **{m: ["protocol=unisar", "dataset.protocol.evaluated_tasks=[rec,search]",
           "optimized_metric=val/mean_ndcg@5"] for m in ("user", "unifiedssr")},
    **{m: ["protocol=unisar", "dataset.protocol.evaluated_tasks=[rec,search]",
           "optimized_metric=val/search/ndcg@5"] for m in ("zam", "tem", "copps")},  # search only
}  # fmt: skip


class FirstBatchProbe(pl.Callback):
    """Writes what this rank's first training batch held to probe_rank<R>.json."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx != 0 or trainer.current_epoch != 0:
            return
        import torch

        record = {
            "rec": batch["sample_index"].tolist(),
            "negatives": batch["candidates"][:, 1:].tolist(),
            "threads": torch.get_num_threads(),
        }
        if "search" in batch:
            record["search"] = batch["search"]["sample_index"].tolist()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main(out: str, cache: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sar_exp.train import CONFIG_DIR, train
    from tests.conftest import REPO, TINY_OVERRIDES

    rank = int(os.environ.get("RANK", "0"))
    results = {}
    for method, backbone in PAIRS:
        folder = Path(out) / f"{method}_{backbone}"
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    f"paths.root_dir={REPO}", f"paths.cache_dir={cache}",
                    f"paths.output_dir={folder}", "logger=csv", f"method={method}",
                    f"backbone={backbone}", "trainer=ddp_sim",
                    "trainer.strategy.start_method=popen",  # torchrun started the ranks: no spawning
                    "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
                    "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
                    "+callbacks.probe._target_=tests.ddp_pairs.FirstBatchProbe",
                    f"+callbacks.probe.folder={folder}", "data.batch_size=32",
                    *TINY_OVERRIDES, *EXTRA.get(method, []),
                ],
            )  # fmt: skip
        try:
            results[f"{method}/{backbone}"] = {"metrics": train(cfg), "error": None}
        except Exception as err:  # recorded per pair, so one failure names its pair
            traceback.print_exc()
            results[f"{method}/{backbone}"] = {
                "metrics": None,
                "error": f"{type(err).__name__}: {err}",
            }
    if rank == 0:
        (Path(out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
