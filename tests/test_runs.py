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
    din = OmegaConf.create({"name": "din", "encoder": {"use_query_history": True}})
    assert (
        run_name(base, din, "kuaisar", "queryrec", "ctr", "full", 0)
        == "base_din+query_history_kuaisar_queryrec_ctr_full-ranking_seed0"
    )


def test_ckpt_path_last_finds_the_newest_unfinished_run(tmp_path):
    from sar_exp.runs import hold_run_lock, release_run_lock

    base = tmp_path / "base_sasrec_synthetic_default_seed0"
    for name, finished in (("2026-01-01_10-00-00", False), ("2026-01-02_10-00-00", False),
                           ("2026-01-03_10-00-00", True), ("2026-01-04_10-00-00_FAILED", False),
                           ("2026-01-05_10-00-00", False)):  # fmt: skip
        (base / name / "checkpoints").mkdir(parents=True)
        (base / name / "checkpoints" / "last.ckpt").write_bytes(b"x")
        if finished:
            (base / name / "metrics.json").write_text("{}")
    hold_run_lock(base / "2026-01-05_10-00-00")  # still running: not to be joined
    try:
        # finished, failed and running runs are passed over
        assert latest_unfinished(base) == base / "2026-01-02_10-00-00"
        assert run_dir(str(base), "last", True) == str(base / "2026-01-02_10-00-00")
    finally:
        release_run_lock(base / "2026-01-05_10-00-00")
    assert latest_unfinished(base) == base / "2026-01-05_10-00-00"
    # testing (train=false) never lands in an unfinished run's directory
    existing = {p.name for p in base.iterdir()}
    assert Path(run_dir(str(base), "last", False)).name not in existing
    # two runs of one name in the same second get two directories
    first, second = run_dir(str(tmp_path / "x"), None, "a"), run_dir(str(tmp_path / "x"), None, "b")
    assert first != second and Path(first).is_dir() and Path(second).is_dir()


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
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import compose_cfg

    out = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg("method=clardrec", "backbone=mlp", "protocol=clardrec_cf",
                      output_dir=out, cache_dir=cache_dir)  # fmt: skip
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
        (["++dataset.synthetic.n_users=50"], "was trained with dataset.synthetic.n_users=120"),
        (["+dataset.synthetic.nmu_users=50"], "was trained without dataset.synthetic.nmu_users"),
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
    """The sampler, the negatives, the companion batches and the random states (dropout
    draws from them) resume where they stopped: 2 + 2 resumed epochs = 4 epochs."""
    common = ("method=clardrec", "backbone=sasrec", "callbacks.early_stopping.patience=10",
              "backbone.encoder.dropout=0.3")  # fmt: skip
    whole = train(make_cfg(*common, "trainer.max_epochs=4", output_dir=tmp_path / "whole"))
    train(make_cfg(*common, "trainer.max_epochs=2", output_dir=tmp_path / "part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = train(make_cfg(*common, "trainer.max_epochs=4", f"ckpt_path={last}",
                             output_dir=tmp_path / "part"))  # fmt: skip
    assert (
        "Restored all states from the checkpoint" in (tmp_path / "part" / "train.log").read_text()
    )
    assert resumed == whole
    assert (tmp_path / "part" / "csv" / "metrics.csv").read_text() == (
        tmp_path / "whole" / "csv" / "metrics.csv"
    ).read_text()


def test_resuming_with_another_config_is_refused(make_cfg, tmp_path):
    train(make_cfg("backbone=mlp", "trainer.max_epochs=1", output_dir=tmp_path))
    (tmp_path / "metrics.json").unlink()  # as if it had been killed
    last = tmp_path / "checkpoints" / "last.ckpt"
    cfg = make_cfg("backbone=mlp", "data.batch_size=64", f"ckpt_path={last}", output_dir=tmp_path)
    with pytest.raises(
        ConfigError, match=r"started with data.batch_size=256; this command has data.batch_size=64"
    ):
        train(cfg)


def test_a_setting_added_later_counts_only_where_a_preset_moves_it_off_its_default(
    make_cfg, tmp_path
):
    """A run recorded before `dataset.protocol.train_negatives` and SESRec's `use_search`
    existed used their defaults (None: the stored sampler; true): protocol=sesrec sets
    the first to popularity, so that run no longer matches; the second it leaves alone."""
    from omegaconf import OmegaConf

    from sar_exp.runs import config_changes

    cfg = make_cfg("method=sesrec", "protocol=sesrec")
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["dataset"]["protocol"]["train_negatives"], old["method"]["module"]["use_search"]
    old["data"]["protocol"].pop("train_negatives", None)  # the datamodule's copy
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    changes = config_changes(tmp_path, cfg)
    assert [(key, now) for key, _, now in changes] == [
        ("data.protocol.train_negatives", "popularity"),  # the datamodule's copy
        ("dataset.protocol.train_negatives", "popularity"),
    ]
    uniform = make_cfg("method=sesrec", "protocol=sesrec", "dataset.protocol.train_negatives=null")
    assert config_changes(tmp_path, uniform) == []


@pytest.mark.parametrize("protocol", ["default", "clardrec_cf", "unisar_kuaisar"])
def test_a_run_whose_rec_negatives_avoided_only_rec_clicks_is_stale(make_cfg, tmp_path, protocol):
    """Runs recorded before `dataset.protocol.rec_negatives_avoid` existed ranked against
    rec negatives that could be the user's search clicks; every preset now sets `user`, so
    their table cells run again (the field's own default, rec, is the old rule)."""
    from omegaconf import OmegaConf

    from sar_exp.runs import config_changes

    cfg = make_cfg(f"protocol={protocol}")
    assert cfg.dataset.protocol.rec_negatives_avoid == "user"
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["dataset"]["protocol"]["rec_negatives_avoid"]
    old["data"]["protocol"].pop("rec_negatives_avoid", None)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    assert [(key, now) for key, _, now in config_changes(tmp_path, cfg)] == [
        ("data.protocol.rec_negatives_avoid", "user"),  # the datamodule's copy
        ("dataset.protocol.rec_negatives_avoid", "user"),
    ]


def test_an_aug_run_from_before_its_rec_negatives_is_stale(make_cfg, tmp_path):
    """method.companion_negatives (AUG's search clicks ranked against rec items) is a key
    without a declared default: an AUG run recorded before it existed drew search-pool
    negatives, so it no longer matches; a JSR run, whose value is null, still does."""
    from omegaconf import OmegaConf

    from sar_exp.runs import config_changes

    for method, stale in (("aug", True), ("jsr", False)):
        cfg = make_cfg(f"method={method}", "backbone=mlp")
        old = OmegaConf.to_container(cfg, resolve=True)
        old["method"].pop("companion_negatives", None)
        del old["data"]["companion_negatives"]
        (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
        changes = {key for key, _, _ in config_changes(tmp_path, cfg)}
        expected = {"method.companion_negatives.search", "data.companion_negatives.search"}
        assert changes == (expected if stale else set()), method


def test_a_release_that_adds_backbones_tasks_or_generator_knobs_keeps_old_runs(make_cfg, tmp_path):
    """A run recorded when the method accepted fewer backbones or tasks, before the
    generator had its CTR knobs, and before data.queryrec existed, computed the same
    thing: it is not stale (before, every base and SESRec cell of the tables was)."""
    from omegaconf import OmegaConf

    from sar_exp.runs import config_changes

    for method, backbone in (("base", "din"), ("sesrec", "sasrec")):
        cfg = make_cfg(f"method={method}", f"backbone={backbone}")
        old = OmegaConf.to_container(cfg, resolve=True)
        old["method"]["backbones"] = old["method"]["backbones"][:2]
        old["method"]["tasks"] = ["ranking"]
        for knob in ("skipped_per_request", "search_appeal_weight"):
            del old["dataset"]["synthetic"][knob], old["data"]["synthetic"][knob]
        del old["data"]["queryrec"]
        (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
        assert config_changes(tmp_path, cfg) == [], method
    # under task=ctr the knobs are on: an old CTR run without them is stale
    ctr = make_cfg("backbone=din", "task=ctr")
    old = OmegaConf.to_container(ctr, resolve=True)
    del old["dataset"]["synthetic"]["skipped_per_request"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    assert [key for key, _, _ in config_changes(tmp_path, ctr)] == [
        "dataset.synthetic.skipped_per_request"
    ]


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


def test_a_moved_dataset_is_not_a_contradiction(make_cfg, tmp_path, tiny_folder, cache_dir):
    import shutil

    train(make_cfg("dataset=kuaisar", f"dataset.path={tiny_folder}", "backbone=mlp", tiny=False,
                   output_dir=tmp_path / "fit"))  # fmt: skip
    moved = shutil.copytree(tiny_folder, tmp_path / "moved")
    checkpoint = tmp_path / "fit" / "checkpoints" / "best.ckpt"
    overrides = [
        "train=false",
        f"ckpt_path={checkpoint}",
        "dataset=kuaisar",
        f"dataset.path={moved}",
    ]
    train(make_cfg(*overrides, tiny=False, output_dir=tmp_path / "test"), overrides=overrides)
    assert OmegaConf.load(tmp_path / "test" / "config.yaml").dataset.path == str(moved)


def test_a_failed_attempt_to_resume_leaves_the_interrupted_run_as_it_was(tmp_path, cache_dir):
    common = ["backbone=mlp", "trainer.max_epochs=1", "logger=csv", f"paths.cache_dir={cache_dir}",
              *TINY_OVERRIDES]  # fmt: skip
    first = _cli(*common, cwd=tmp_path)
    assert first.wait(timeout=600) == 0, first.stdout.read()[-3000:]
    (run,) = (tmp_path / "outputs" / "runs" / "base_mlp_synthetic_default_seed0").iterdir()
    (run / "metrics.json").unlink()  # as if it had been killed
    again = _cli(*common, "ckpt_path=last", "threads=0", cwd=tmp_path)
    assert again.wait(timeout=600) == 2
    assert "threads must be a positive integer, got 0" in again.stdout.read()
    assert run.is_dir() and not (run / "FAILED").exists()  # still resumable


def test_report_keeps_tests_of_checkpoints_apart_and_lists_what_it_cannot_read(tmp_path):
    from sar_exp.report import configurations, find_runs

    def run(name, seed, train=True, metrics='{"test/mrr": 0.5}'):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(
            f"seed: {seed}\ntrain: {train}\nmethod:\n  name: base\n"
        )
        (folder / "metrics.json").write_text(metrics)
        return folder

    run("a", 0), run("b", 1), run("c", 0, train=False)
    run("broken", 2, metrics="{half")
    (tmp_path / "refused").mkdir()
    (tmp_path / "refused" / "FAILED").write_text("")
    (tmp_path / "a" / "wandb" / "files").mkdir(parents=True)
    (tmp_path / "a" / "wandb" / "files" / "config.yaml").write_text("seed: 9\n")
    runs = find_runs(tmp_path)
    assert sorted(r.path.name for r in runs) == ["a", "b", "broken", "c", "refused"]
    groups = configurations(runs)
    finished = {
        label: sorted(r.seed for r in group if r.metrics) for label, group in groups.items()
    }
    assert finished["train=True"] == [0, 1] and finished["train=False"] == [0]
    broken = next(r for r in runs if r.path.name == "broken")
    assert broken.failure.startswith("unreadable: JSONDecodeError")
    assert next(r for r in runs if r.path.name == "refused").failure == "(no reason recorded)"
