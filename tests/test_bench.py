"""`make bench` on the small preset: the figures it prints and writes."""

from __future__ import annotations

import json

import pytest
import torch

from sar_exp.bench import main


def test_bench_prints_throughput_and_epoch_time_per_method(tmp_path, capsys):
    figures = tmp_path / "bench.json"
    main(["--preset", "small", "--steps", "6", "--backbones", "mlp", "din",
          "--methods", "base", "clardrec", "--cache", str(tmp_path), "--json", str(figures),
          "--unisar-steps", "0", "--sesrec-steps", "0", "--queryrec-steps", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert "clardrec  din              n/a" in out  # ClardRec has no DIN variant
    results = json.loads(figures.read_text())
    assert sorted(results["training"]) == ["base/din", "base/mlp", "clardrec/mlp"]
    mlp = results["training"]["clardrec/mlp"]
    assert mlp["samples/s"] > 0 and 0.0 <= mlp["data wait share"] < 1.0
    # one epoch = the training set's steps at the measured speed
    assert abs(mlp["epoch minutes"] - mlp["steps/epoch"] * mlp["ms/step"] / 60_000) < 1e-9
    assert results["rows"]["users"] > 0 and results["preprocessing"]["total"] > 0


def _one_section(tmp_path, capsys, unisar=0, sesrec=0, queryrec=0):
    """`make bench` on the small preset with no training table and only the given
    method section: (printed lines, the figures it wrote)."""
    figures = tmp_path / "bench.json"
    main(["--preset", "small", "--methods", "--unisar-preset", "small",
          "--unisar-steps", str(unisar), "--sesrec-steps", str(sesrec),
          "--queryrec-steps", str(queryrec), "--cache", str(tmp_path), "--json", str(figures)])  # fmt: skip
    return capsys.readouterr().out.strip().splitlines(), json.loads(figures.read_text())


@pytest.mark.slow  # 16 s (make test-slow); make bench prints the same figures
def test_bench_reports_unisar_against_the_official_speed(tmp_path, capsys):
    lines, results = _one_section(tmp_path, capsys, unisar=6)
    line, unisar = lines[-1], results["unisar"]
    assert line.startswith("UniSAR, small preset, batch 1024 (+ 1024 search rows), 6 steps: ")
    assert f"{unisar['samples/s']:.0f} rec rows/s" in line
    assert f"({unisar['samples/s'] / 140:.1f}x the official code's 140 rows/s; target 5x)" in line
    assert 0.0 <= unisar["data wait share"] < 1.0


def test_bench_reports_sesrec_against_sasrec_under_its_protocol(tmp_path, capsys):
    lines, results = _one_section(tmp_path, capsys, sesrec=6)
    sesrec = results["sesrec"]
    assert lines[-4].startswith("SESRec against SASRec, protocol=sesrec (caps 150/25), batch 256")
    assert f"{sesrec['sesrec']['samples/s']:>8.0f} rows/s" in lines[-2]
    ratio = sesrec["sesrec"]["samples/s"] / sesrec["base"]["samples/s"]
    assert lines[-1] == f"  SESRec / SASRec: {ratio:.2f} (target at least 0.33)"


def test_bench_reports_the_cost_of_queryrec_s_diffusion(tmp_path, capsys):
    lines, results = _one_section(tmp_path, capsys, queryrec=3)
    cost = results["queryrec_diffusion"]
    assert lines[-2].startswith("QueryRec diffusion, small preset with task=ctr's knobs (cpu): ")
    assert f"{cost['queries']:,} queries x {cost['candidates']:,} candidate items" in lines[-2]
    assert cost["epochs"] == 60 and cost["peak_gb"] > 0
    expected = cost["x_q seconds"] + 60 * cost["seconds per epoch"] + cost["generation seconds"]
    assert abs(cost["projected seconds"] - expected) < 1e-9
    assert f"60 epochs: about {expected / 60:.0f} min" in lines[-1]


def test_bench_times_the_views_that_training_uses(make_cfg, tiny_folder, tmp_path):
    """Same cache keys: after bench's preprocessing, a run builds no view of its own."""
    import hydra
    from omegaconf import OmegaConf

    from sar_exp.bench import _preprocess

    cfg = make_cfg("dataset=kuaisar", f"dataset.path={tiny_folder}", f"paths.cache_dir={tmp_path}")
    _preprocess(str(tiny_folder), str(tmp_path), list(cfg.dataset.user_attributes),
                list(cfg.dataset.item_attributes),
                OmegaConf.to_container(cfg.dataset.protocol, resolve=True))  # fmt: skip
    built = sorted(p.name for p in tmp_path.glob("view-*"))
    assert len(built) == 3
    hydra.utils.instantiate(cfg.data, _convert_="all").load()
    assert sorted(p.name for p in tmp_path.glob("view-*")) == built


def _fails():
    raise ValueError("the raw files are unreadable")


def test_a_failing_or_dying_preprocessing_child_is_reported_not_waited_for():
    import os

    import pytest

    from sar_exp.bench import run_in_child
    from sar_exp.errors import SarExpError

    with pytest.raises(SarExpError, match=r"preprocessing died before reporting \(exit code 3\)"):
        run_in_child(os._exit, (3,), "preprocessing", poll_seconds=0.2)
    with pytest.raises(SarExpError, match="preprocessing failed: ValueError: the raw files"):
        run_in_child(_fails, (), "preprocessing", poll_seconds=0.2)
    assert run_in_child(abs, (-2,), "preprocessing", poll_seconds=0.2) == 2


def test_the_step_timer_counts_every_step_after_the_warmup_across_epochs():
    """batch_idx restarts at each epoch: a run of 2 epochs x 6 batches with 3 warm-up
    steps times 8 steps (not the 4 whose batch_idx is past the warm-up)."""
    from sar_exp.bench import DataWaitTimer

    timer = DataWaitTimer(warmup=3)
    batch = {"user": torch.zeros(10)}
    for _epoch in range(2):
        for batch_idx in range(6):
            timer.on_train_batch_start(None, None, batch, batch_idx)
            timer.on_train_batch_end(None, None, None, batch, batch_idx)
    assert timer.samples == 80
    assert timer.timed == 8
