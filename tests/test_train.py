"""End to end: `train(cfg)` on the tiny embedded dataset, as `python -m sar_exp` runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sar_exp.errors import ConfigError
from sar_exp.train import train
from tests.conftest import REPO, TINY_OVERRIDES

RANKING = ["test/hr@1", "test/hr@10", "test/hr@5", "test/mrr", "test/ndcg@10", "test/ndcg@5"]


@pytest.mark.parametrize("backbone", ["mlp", "mmoe", "gru4rec", "sasrec", "din"])
def test_one_epoch_for_every_backbone(make_cfg, backbone, tmp_path):
    metrics = train(make_cfg(f"backbone={backbone}", output_dir=tmp_path))
    assert sorted(metrics) == RANKING
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["test/hr@1"] <= metrics["test/hr@5"] <= metrics["test/hr@10"]
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == {**metrics, "threads": 1}  # the thread count the results depend on
    csv_log = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "val/ndcg@10" in csv_log and "test/mrr" in csv_log


def test_trained_model_beats_random_ranking(make_cfg):
    metrics = train(make_cfg("backbone=gru4rec", "trainer.max_epochs=3"))
    assert metrics["test/hr@10"] > 0.2  # random ranking of 100 candidates gives 0.10


@pytest.mark.parametrize("backbone", ["din", "mlp"])
def test_ctr_task_reports_auc_gauc_logloss(make_cfg, backbone, tmp_path):
    metrics = train(make_cfg("task=ctr", f"backbone={backbone}", output_dir=tmp_path))
    assert sorted(metrics) == ["test/auc", "test/gauc", "test/logloss"]
    assert 0.0 <= metrics["test/auc"] <= 1.0 and metrics["test/logloss"] > 0


def test_full_ranking_mode(make_cfg):
    metrics = train(make_cfg("backbone=mlp", "eval.mode=full"))
    sampled = train(make_cfg("backbone=mlp"))
    # ranking against the whole catalogue is harder than against 99 negatives
    assert metrics["test/hr@10"] <= sampled["test/hr@10"]


def test_same_seed_same_metrics_file(make_cfg, tmp_path):
    train(make_cfg("seed=3", "trainer.max_epochs=2", output_dir=tmp_path / "a"))
    train(make_cfg("seed=3", "trainer.max_epochs=2", output_dir=tmp_path / "b"))
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (
        tmp_path / "b" / "metrics.json"
    ).read_bytes()


UNISAR = ("method=unisar", "backbone=sasrec", "protocol=unisar",
          "dataset.protocol.evaluated_tasks=[rec,search]", "optimized_metric=val/mean_ndcg@5",
          "method.module.rel_negatives=16")  # fmt: skip


@pytest.mark.parametrize(
    "model",
    [("backbone=gru4rec",), pytest.param(UNISAR, marks=pytest.mark.slow)],
    ids=["gru4rec", "unisar"],
)  # unisar: 20 s (make test-slow)
def test_testing_a_checkpoint_in_two_processes_gives_the_same_metrics(make_cfg, tmp_path, model):
    """Spawned processes (trainer=ddp_sim) score their shards of both tasks' test sets;
    the gathered metrics are the single process's."""
    train(make_cfg(*model, output_dir=tmp_path / "fit"))
    checkpoint = tmp_path / "fit" / "checkpoints" / "best.ckpt"
    assert checkpoint.exists()
    common = (*model, "train=false", f"ckpt_path={checkpoint}", "data.eval_batch_size=37")
    single = train(make_cfg(*common, output_dir=tmp_path / "one"))
    double = train(make_cfg(*common, "trainer=ddp_sim", output_dir=tmp_path / "two"))
    assert single == double
    assert ("test/search/ndcg@5" in single) == (model == UNISAR)  # both tasks, for UniSAR
    written = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert single == {k: v for k, v in written.items() if k.startswith("test/")}


def test_kuaisar_dataset_reads_a_folder(make_cfg, tiny_folder):
    metrics = train(
        make_cfg("dataset=kuaisar", f"dataset.path={tiny_folder}", "backbone=mlp", tiny=False)
    )
    assert sorted(metrics) == RANKING


def test_incompatible_pair_is_refused_before_loading_data(make_cfg):
    cfg = make_cfg(
        "method.backbones=[mlp,mmoe]",
        "backbone=sasrec",
        "dataset.path=/nonexistent",
        "dataset.source=kuaisar",
    )
    with pytest.raises(
        ConfigError,
        match=r"method=base does not work with backbone=sasrec.*Valid: method=base backbone=mlp",
    ):
        train(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["protocol=clardrec_seq", "backbone=mlp"],
         "protocol=clardrec_seq is defined for the sequential view, but backbone=mlp task=ranking "
         "reads the cf view. Valid with protocol=clardrec_seq method=base: backbone=bert4rec, "
         "backbone=dcn, backbone=dien, backbone=din, backbone=fmlprec, backbone=gru4rec, "
         "backbone=ple, backbone=sasrec, backbone=stamp"),
        (["protocol=clardrec_cf", "backbone=sasrec", "method=clardrec"],
         "protocol=clardrec_cf is defined for the cf view, but backbone=sasrec task=ranking reads "
         "the sequential view. Valid with protocol=clardrec_cf method=clardrec: backbone=mlp, "
         "backbone=mmoe"),
        (["protocol=queryrec", "backbone=din"],
         "protocol=queryrec is defined for the ctr view, but backbone=din task=ranking reads the "
         "sequential view. Valid with protocol=queryrec method=base: task=ctr backbone=dcn, "
         "task=ctr backbone=dien, task=ctr backbone=din, task=ctr backbone=fmlprec, "
         "task=ctr backbone=gru4rec, task=ctr backbone=mlp, task=ctr backbone=mmoe, "
         "task=ctr backbone=ple, task=ctr backbone=sasrec, task=ctr backbone=stamp"),
        (["protocol=queryrec", "method=clardrec"],
         "protocol=queryrec is defined for the ctr view, but backbone=sasrec task=ranking reads "
         "the sequential view. Valid with protocol=queryrec method=clardrec: none"),
        (["protocol=clardrec_seq", "task=ctr", "backbone=din"],
         "protocol=clardrec_seq is defined for the sequential view, but backbone=din task=ctr "
         "reads the ctr view. Valid with protocol=clardrec_seq method=base: task=ranking "
         "backbone=bert4rec, task=ranking backbone=dcn, task=ranking backbone=dien, "
         "task=ranking backbone=din, task=ranking backbone=fmlprec, task=ranking "
         "backbone=gru4rec, task=ranking backbone=ple, task=ranking backbone=sasrec, "
         "task=ranking backbone=stamp"),
    ],
)  # fmt: skip
def test_a_protocol_for_another_view_is_refused_with_the_valid_pairs(make_cfg, overrides, message):
    cfg = make_cfg(*overrides, "dataset.source=kuaisar", "dataset.path=/nonexistent")
    with pytest.raises(ConfigError) as error:
        train(cfg)  # refused before any data is read
    assert str(error.value) == message


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
        ("data.batch_size=-5", "data.batch_size must be a positive integer, got -5"),
        ("method.module.lr=0", "method.module.lr must be a positive number, got 0"),
        ("method.module.lr=-0.1", "method.module.lr must be a positive number, got -0.1"),
        ("task=clicks", "task must be one of"),
        ("train=false", "train=false needs ckpt_path"),
        ("threads=0", "threads must be a positive integer, got 0"),
    ],
)
def test_bad_config_values_are_named(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train(make_cfg(override))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset=kuaisar"], "dataset=kuaisar needs dataset.path=DIR (the unzipped KuaiSAR folder)"),
        (["+dataset.synthetic.n_user=100"],
         "dataset.synthetic.n_user is not a setting of the synthetic generator; the settings are: caption_words, days,"),
        (["dataset.synthetic.preset=huge"],
         "dataset.synthetic.preset=huge is not a preset; choose one of ['kuaisar_scale', 'small', 'unisar_bench']"),
    ],
)  # fmt: skip
def test_config_mistakes_are_named_in_one_line(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as error:
        train(make_cfg(*overrides))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "sar_exp", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_cli_prints_one_clear_error_without_traceback(tmp_path):
    result = _cli(
        "dataset=kuaisar",
        f"dataset.path={tmp_path}/missing",
        f"hydra.run.dir={tmp_path}/run",
        "logger=csv",
    )
    assert result.returncode == 2
    assert f"sar_exp: error: dataset folder {tmp_path}/missing does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    # the refused run is marked as such: renamed, with the reason, and no metrics.json
    assert not (tmp_path / "run").exists()
    failed = tmp_path / "run_FAILED"
    assert (failed / "FAILED").read_text().startswith(f"dataset folder {tmp_path}/missing")
    assert not (failed / "metrics.json").exists()


def test_slurm_launcher_off_a_cluster_is_one_line(tmp_path):
    result = _cli("-m", "seed=0,1", "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sar_exp: error: hydra/launcher=submitit_slurm needs a SLURM cluster (no srun on this "
        "machine); hydra/launcher=joblib runs jobs in parallel here"
    ]


def test_a_failing_multirun_job_does_not_stop_the_others_and_the_summary_marks_it(tmp_path):
    from sar_exp.report import main as report

    result = _cli("-m", "data.batch_size=0,64", "backbone=mlp", "trainer.max_epochs=2",
                  "logger=csv", f"hydra.sweep.dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache",
                  *TINY_OVERRIDES)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]  # the sweep ran, one job failed
    assert "sar_exp: error: data.batch_size must be a positive integer, got 0" in result.stderr
    assert "sar_exp: 1 job(s) of the sweep failed (0_base_mlp_synthetic_default_seed0_FAILED)" in (
        result.stderr
    )
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit())
    assert jobs == [
        "0_base_mlp_synthetic_default_seed0_FAILED",
        "1_base_mlp_synthetic_default_seed0",
    ]
    assert (tmp_path / jobs[1] / "metrics.json").exists()
    report([str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    assert "| all runs | 1 | 0 | 0 | 0 |" in summary
    assert "refused: data.batch_size=0" in summary
    assert (
        f"- failed: `{tmp_path / jobs[0]}`: data.batch_size must be a positive integer" in summary
    )
    assert (tmp_path / "summary.csv").read_text().startswith("configuration,runs,failed")
    assert len(list((tmp_path / "curves").glob("*.png"))) == 1


def _printed(stdout: str) -> dict[str, float]:
    """{test/<metric>: value} from the metrics table a run prints ("hr@1    0.2850")."""
    metrics = {}
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and (fields[0] == "mrr" or "@" in fields[0]):
            metrics[f"test/{fields[0]}"] = float(fields[1])
    return metrics


@pytest.mark.slow
def test_cli_default_run_prints_the_metrics_table(tmp_path):
    result = _cli(f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = _printed(result.stdout)
    assert sorted(printed) == RANKING
    # metrics.json also records the thread count the run had (the table runner reuses by it)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        **{name: pytest.approx(value, abs=5e-5) for name, value in printed.items()},
        "threads": 1,
    }
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("backbone", ["mlp", "mmoe", "gru4rec", "sasrec"])
@pytest.mark.parametrize("method", ["clardrec", "aug", "jsr"])
def test_search_enhanced_methods_one_epoch(make_cfg, method, backbone):
    metrics = train(make_cfg(f"method={method}", f"backbone={backbone}"))
    assert sorted(metrics) == RANKING
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_clardrec_refuses_din_before_loading_data(make_cfg):
    with pytest.raises(ConfigError, match=r"method=clardrec does not work with backbone=din"):
        train(
            make_cfg(
                "method=clardrec", "backbone=din", "dataset=kuaisar", "dataset.path=/nonexistent"
            )
        )


@pytest.mark.parametrize(
    "backbone, lr, batch, layers, item_layers, lam, alpha, beta",
    [
        ("mlp", 0.005, 4096, 3, 3, 0.1, 0.1, 0.2),
        ("mmoe", 0.005, 4096, 3, 3, 0.2, 1.0, 0.1),
        ("gru4rec", 0.001, 64, 1, 3, 0.02, 0.1, 0.1),
        ("sasrec", 0.002, 64, 1, 1, 0.02, 0.2, 0.5),
    ],
)
def test_clardrec_experiments_carry_table4(
    make_cfg, tiny_folder, backbone, lr, batch, layers, item_layers, lam, alpha, beta
):
    cfg = make_cfg(
        f"experiment=clardrec_kuaisar_{backbone}", f"dataset.path={tiny_folder}", tiny=False
    )
    m = cfg.method.module
    assert (cfg.method.name, cfg.backbone.name) == ("clardrec", backbone)
    assert (m.lr, cfg.data.batch_size, cfg.backbone.encoder.layers, m.item_layers) == (
        lr,
        batch,
        layers,
        item_layers,
    )
    assert (m.lambda_, m.alpha, m.beta) == (lam, alpha, beta)
    assert cfg.callbacks.early_stopping.patience == 10
    assert cfg.dataset.protocol.min_search_interactions == (
        10 if backbone in ("gru4rec", "sasrec") else 0
    )


def test_sweeps_optimise_the_validation_metric_not_the_test_metric(make_cfg, tmp_path):
    import csv

    from sar_exp.train import run

    metrics, best_validation = run(
        make_cfg("backbone=mlp", "trainer.max_epochs=2", output_dir=tmp_path)
    )
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    validation = [float(r["val/ndcg@10"]) for r in rows if r.get("val/ndcg@10")]
    assert best_validation == pytest.approx(max(validation))
    assert best_validation != metrics["test/ndcg@10"]


def test_tensorboard_logger_writes_event_files(make_cfg, tmp_path):
    train(make_cfg("backbone=mlp", "logger=tensorboard", output_dir=tmp_path))
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


def test_more_eval_negatives_widen_the_rank_histogram(make_cfg, tiny_folder, cache_dir):
    """With 199 negatives a positive can rank 200th; MRR must not clamp it to 100th."""
    from sar_exp.data.datamodule import SARDataModule
    from sar_exp.methods.base import PlainBackbone

    dm = SARDataModule(
        "kuaisar", str(tiny_folder), str(cache_dir), "cf", ["search_active_level"], ["author_id"],
        protocol={"num_eval_negatives": 199},
    )  # fmt: skip
    encoder = {"encoder": {"_target_": "sar_exp.backbones.mlp.MLPEncoder", "layers": 1}}
    model = PlainBackbone(dm.schema, encoder, lookup_tables=dm.lookup_tables())
    assert dm.schema["num_candidates"] == 200
    assert model.test_metrics.max_rank == 200
    assert next(iter(dm.test_dataloader()))["candidates"].shape[1] == 200


def test_the_thread_count_comes_from_the_config(make_cfg, tmp_path):
    """Not from the machine or whatever the process had: results depend on it."""
    import torch

    torch.set_num_threads(2)
    train(make_cfg("threads=1", output_dir=tmp_path / "one"))
    assert torch.get_num_threads() == 1
    train(make_cfg("threads=2", output_dir=tmp_path / "two"))
    assert torch.get_num_threads() == 2
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["threads"] == 2
    torch.set_num_threads(1)


def test_switching_the_progress_bar_off_needs_no_callback_removal(make_cfg):
    """`trainer.enable_progress_bar=false` with the configured bar still in the callbacks
    (as a user types it) trains instead of failing in Lightning."""
    metrics = train(
        make_cfg("+callbacks.progress_bar._target_=lightning.pytorch.callbacks.TQDMProgressBar")
    )
    assert 0.0 <= metrics["test/ndcg@10"] <= 1.0
