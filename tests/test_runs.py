"""Runs that describe themselves: names, failure marks, the run log, the CSV log, W&B's
config, checkpoints that carry their config, and resuming an interrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sar_exp.errors import ConfigError
from sar_exp.runs import latest_unfinished, mark_failed, run_dir, run_name
from sar_exp.train import train
from tests.conftest import REPO, TINY_OVERRIDES


def test_run_names_say_what_differs():
    clardrec = OmegaConf.create({"name": "clardrec", "module": {"use_cd": False, "use_fa": True}})
    assert (
        run_name(clardrec, "sasrec", "synthetic", "clardrec_seq", "ranking", "sampled", 3)
        == "clardrec-no_cd_sasrec_synthetic_clardrec_seq_seed3"
    )
    base = OmegaConf.create({"name": "base", "module": {}})
    assert (
        run_name(base, "din", "kuaisar", "queryrec", "ctr", "full", 0)
        == "base_din_kuaisar_queryrec_ctr_full-ranking_seed0"
    )


def test_ckpt_path_last_finds_the_newest_unfinished_run(tmp_path):
    base = tmp_path / "base_sasrec_synthetic_default_seed0"
    for name, finished in (("2026-01-01_10-00-00", False), ("2026-01-02_10-00-00", False),
                           ("2026-01-03_10-00-00", True)):  # fmt: skip
        (base / name / "checkpoints").mkdir(parents=True)
        (base / name / "checkpoints" / "last.ckpt").write_bytes(b"x")
        if finished:
            (base / name / "metrics.json").write_text("{}")
    assert latest_unfinished(base) == base / "2026-01-02_10-00-00"
    assert run_dir(str(base), "last") == str(base / "2026-01-02_10-00-00")
    fresh = run_dir(str(base), None)
    assert Path(fresh).parent == base and Path(fresh).name.startswith("20")


def test_a_failed_run_is_renamed_and_says_why(tmp_path):
    run = tmp_path / "2026-01-01_10-00-00"
    run.mkdir()
    marked = mark_failed(run, "data.batch_size must be a positive integer, got 0")
    assert marked == tmp_path / "2026-01-01_10-00-00_FAILED" and not run.exists()
    assert (marked / "FAILED").read_text() == "data.batch_size must be a positive integer, got 0\n"


def test_the_csv_log_is_one_row_per_epoch_whatever_the_loggers(make_cfg, tmp_path):
    train(make_cfg("logger=none", "trainer.max_epochs=3", "callbacks.early_stopping.patience=5",
                   output_dir=tmp_path))  # fmt: skip
    with (tmp_path / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "test"]
    for row in rows[:3]:  # training and validation values side by side
        assert row["train/loss"] and row["val/ndcg@10"] and not row["test/mrr"]
    assert rows[3]["test/mrr"] and not rows[3]["train/loss"]


def test_the_run_log_and_config_are_in_the_run_directory(make_cfg, tmp_path):
    metrics = train(make_cfg(output_dir=tmp_path))
    log = (tmp_path / "train.log").read_text()
    assert "Restoring states from the checkpoint path" in log  # Lightning's own messages
    assert f"mrr           {metrics['test/mrr']:.4f}" in log  # and the results table
    config = OmegaConf.load(tmp_path / "config.yaml")
    assert config.seed == 0 and config.run_name == "base_sasrec_synthetic_default_seed0"


def test_wandb_gets_the_whole_config_and_a_name_that_says_what_ran(make_cfg, tmp_path, monkeypatch):
    from sar_exp.loggers import WandbLogger

    seen = []
    original = WandbLogger.log_hyperparams
    monkeypatch.setattr(
        WandbLogger, "log_hyperparams", lambda self, params, *a, **k: (seen.append(params), original(self, params, *a, **k))
    )  # fmt: skip
    cfg = make_cfg("logger=wandb", "method=clardrec", "backbone=mlp", output_dir=tmp_path)
    train(cfg)
    full = next(p for p in seen if "dataset" in p)
    assert full["seed"] == 0 and full["data"]["batch_size"] == 256
    assert full["dataset"]["protocol"]["name"] == "default"
    assert cfg.logger.wandb.name == "clardrec_mlp_synthetic_default_seed0"
    assert "protocol:default" in cfg.logger.wandb.tags
    assert (tmp_path / "csv" / "metrics.csv").exists()  # the CSV log beside it


@pytest.fixture(scope="module")
def clardrec_checkpoint(tmp_path_factory, cache_dir):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sar_exp.train import CONFIG_DIR

    out = tmp_path_factory.mktemp("trained")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            f"paths.root_dir={REPO}", f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}",
            "logger=csv", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "~callbacks.progress_bar", "method=clardrec", "backbone=mlp", "protocol=clardrec_cf",
            *TINY_OVERRIDES,
        ])  # fmt: skip
    metrics = train(cfg)
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "best.ckpt", metrics


def test_testing_a_checkpoint_restores_its_own_config(make_cfg, tmp_path, clardrec_checkpoint):
    checkpoint, trained = clardrec_checkpoint
    cfg = make_cfg("train=false", f"ckpt_path={checkpoint}", output_dir=tmp_path)
    assert cfg.method.name == "base"  # the defaults; the checkpoint says otherwise
    metrics = train(cfg, overrides=["train=false", f"ckpt_path={checkpoint}"])
    assert metrics == trained
    config = OmegaConf.load(tmp_path / "config.yaml")
    assert (config.method.name, config.backbone.name, config.dataset.protocol.name) == (
        "clardrec", "mlp", "clardrec_cf"
    )  # fmt: skip


@pytest.mark.parametrize(
    "given, message",
    [
        (["method=jsr"], "was trained with method=clardrec; the override method=jsr contradicts it"),
        (["backbone=sasrec"], "was trained with backbone=mlp; the override backbone=sasrec"),
        (["method=clardrec", "method.module.use_fa=false"],
         "was trained with method.module.use_fa=True; the override method.module.use_fa=false"),
        (["protocol=default"], "was trained with protocol=clardrec_cf"),
    ],
)  # fmt: skip
def test_an_override_that_contradicts_the_checkpoint_is_refused(
    make_cfg, tmp_path, clardrec_checkpoint, given, message
):
    checkpoint, _ = clardrec_checkpoint
    overrides = ["train=false", f"ckpt_path={checkpoint}", *given]
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        train(make_cfg(*overrides, output_dir=tmp_path), overrides=overrides)


def test_a_checkpoint_of_another_shape_is_one_line_not_a_traceback(
    make_cfg, tmp_path, clardrec_checkpoint
):
    import torch

    checkpoint, _ = clardrec_checkpoint
    old = torch.load(checkpoint, weights_only=False)
    del old["sar_exp"]  # a checkpoint from before configs were stored
    torch.save(old, tmp_path / "old.ckpt")
    cfg = make_cfg("train=false", f"ckpt_path={tmp_path / 'old.ckpt'}", output_dir=tmp_path / "t")
    with pytest.raises(
        ConfigError, match=r"does not fit this model: Error\(s\) in loading state_dict"
    ):
        train(cfg, overrides=[])


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(make_cfg, tmp_path):
    """The sampler, the negatives, the companion batches and the random states resume
    where they stopped: 2 epochs + 2 resumed epochs = 4 epochs, metric for metric."""
    common = ("method=clardrec", "backbone=sasrec", "callbacks.early_stopping.patience=10")
    whole = train(make_cfg(*common, "trainer.max_epochs=4", output_dir=tmp_path / "whole"))
    train(make_cfg(*common, "trainer.max_epochs=2", output_dir=tmp_path / "part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = train(make_cfg(*common, "trainer.max_epochs=4", f"ckpt_path={last}",
                             output_dir=tmp_path / "part"))  # fmt: skip
    assert resumed == whole
    assert (tmp_path / "part" / "csv" / "metrics.csv").read_text() == (
        tmp_path / "whole" / "csv" / "metrics.csv"
    ).read_text()


def test_a_preprocessing_kill_leaves_no_cache_a_later_run_trusts(tmp_path):
    from sar_exp.data.cache import cached_folder

    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from sar_exp.data.cache import cached_folder\n"
        "def build(tmp):\n"
        "    (tmp / 'arrays.npz').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "cached_folder(Path(sys.argv[1]), 'view-x', build)\n"
    )
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO)
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "view-x").exists()  # nothing under the entry's name
    assert len(list(tmp_path.glob(".view-x.tmp-*"))) == 1  # the dead build's leftovers
    built = cached_folder(tmp_path, "view-x", lambda tmp: (tmp / "arrays.npz").write_bytes(b"ok"))
    assert (built / "arrays.npz").read_bytes() == b"ok" and (built / "COMPLETE").exists()
    assert not list(tmp_path.glob(".view-x.tmp-*"))  # cleaned up


def _cli(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "sar_exp", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


@pytest.mark.slow
def test_kill_9_then_ckpt_path_last_finishes_like_an_uninterrupted_run(tmp_path, cache_dir):
    common = ["method=clardrec", "backbone=sasrec", "trainer.max_epochs=6", "logger=csv",
              "callbacks.early_stopping.patience=10", f"paths.cache_dir={cache_dir}",
              f"paths.root_dir={tmp_path}", *TINY_OVERRIDES]  # fmt: skip
    whole = _cli(*common, "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.wait(timeout=600) == 0, whole.stdout.read()[-3000:]
    victim = _cli(*common, cwd=tmp_path)
    runs = tmp_path / "outputs" / "runs" / "clardrec_sasrec_synthetic_default_seed0"
    deadline = time.time() + 600
    while not list(runs.glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # mid-run, right after the first epoch's checkpoint
    victim.wait()
    (interrupted,) = runs.iterdir()
    assert not (interrupted / "metrics.json").exists()
    again = _cli(*common, "ckpt_path=last", cwd=tmp_path)
    assert again.wait(timeout=600) == 0, again.stdout.read()[-3000:]
    assert [p.name for p in runs.iterdir()] == [interrupted.name]  # went on in its own directory
    assert json.loads((interrupted / "metrics.json").read_text()) == json.loads(
        (tmp_path / "whole" / "metrics.json").read_text()
    )
