"""The ClardRec table command in quick mode, on the tiny dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from sar_exp.tables.clardrec import PUBLISHED, main, table4, training_length
from sar_exp.tables.report import Cell, relative_improvement, welch_p
from tests.conftest import TINY_OVERRIDES


def test_quick_table_runs_the_grid_and_prints_the_papers_layout(tmp_path, capsys, cache_dir):
    # the grid less the baselines with their own table tests (IV4REC+, SESRec), for time
    main(["--quick", "--quick-epochs", "1", "--backbones", "mlp", "gru4rec", "--out", str(tmp_path),
          "--variants", "base", "aug", "jsr", "clardrec", "-CD", "-FA", "-DA", "-CS",
          "--override", *TINY_OVERRIDES, f"paths.cache_dir={cache_dir}"])  # fmt: skip
    out = capsys.readouterr().out
    assert "Table 1 (ClardRec): main results on synthetic, 1 seed(s): 0" in out
    assert "Table 2 (ClardRec): ablations" in out
    for label in ("+AUG", "+JSR", "+ClardRec", "-CD", "-FA", "-DA", "-CS"):
        assert label in out
    assert "(0.1153)" in out and "(0.3389)" in out  # MLP and GRU4Rec ClardRec rows of the paper
    assert "Improv. of ClardRec over the best baseline" in out
    assert "  mlp      Ranks by NDCG@5 (4 rows): " in out  # base, AUG, JSR, ClardRec
    assert (
        "  mlp      base 1/1  +AUG 1/1  +JSR 1/1  +ClardRec 1/1  -CD 1/1" in out
    )  # one epoch each
    runs = list((tmp_path / "quick" / "synthetic").glob("*/*/seed0/metrics.json"))
    assert len(runs) == 2 * 8  # 2 backbones x (4 methods + 4 ablations)
    report = (
        tmp_path
        / "quick"
        / "synthetic"
        / "tables_mlp-gru4rec_base_aug_jsr_clardrec_-CD_-FA_-DA_-CS.txt"
    )  # named after the selection
    assert report.read_text().startswith("Table 1")


def test_rerun_reuses_finished_runs(tmp_path, capsys, cache_dir):
    args = ["--quick", "--quick-epochs", "1", "--backbones", "mlp", "--out", str(tmp_path),
            "--override", *TINY_OVERRIDES, f"paths.cache_dir={cache_dir}"]  # fmt: skip
    main(args)
    first = capsys.readouterr().out.split("Table 1")[1]
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.json")}
    main(args)
    assert capsys.readouterr().out.split("Table 1")[1] == first
    assert stamp == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.json")}


def test_report_statistics():
    assert Cell([0.1, 0.3]).text() == "0.2000±0.1414"
    assert relative_improvement(0.11, 0.10) == pytest.approx(10.0)
    assert welch_p([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]) < 0.01
    assert welch_p([1.0], [2.0]) != welch_p([1.0], [2.0])  # nan with one seed
    from sar_exp.tables.grid import improvement

    assert improvement(Cell([0.2]), {"a": Cell([0.1]), "b": Cell([])}, "mrr") == (
        "mrr +100.00% vs a (p=n/a)"
    )
    # a zero baseline (e.g. HR@1 on a tiny test set) has no relative change: no "+nan%"
    assert improvement(Cell([0.07]), {"a": Cell([0.0])}, "hr@1") == "hr@1 0.0700 vs a's 0 (p=n/a)"


def test_rank_agreement_lists_both_ranks_in_the_papers_order_with_kendalls_tau():
    from sar_exp.tables.report import rank_agreement

    nan = float("nan")
    rows = [  # (group, backbone, label, cells, published); column 0 ranked
        ("", "", "A", [Cell([0.30, 0.32])], [0.20]),
        ("", "", "B", [Cell([0.40])], [0.30]),
        ("", "", "C", [Cell([0.10])], [0.25]),
        ("", "paper", "D", [Cell([])], [0.50]),  # published only: not ranked
        ("", "", "E", [Cell([0.90])], None),  # ours only (an extra row): not ranked
        ("", "", "F", [Cell([0.50])], [nan]),
        ("", "", "G", [Cell([nan])], [0.60]),  # a diverged run: not ranked
    ]
    line = rank_agreement(rows, 0, "NDCG@5")
    # paper: B 1, C 2, A 3; ours: B 1, A 2, C 3 -> one discordant pair of three: tau 1/3
    assert line.startswith(
        "Ranks by NDCG@5 (3 rows): B 1 (paper 1), C 3 (paper 2), A 2 (paper 3); "
    )
    assert "Kendall tau +0.33" in line
    assert "fewer than two" in rank_agreement(rows[2:], 0, "NDCG@5")


def test_queryrec_table4_ranks_the_rows_run_against_the_small_column():
    import argparse

    from sar_exp.tables import queryrec

    runs = {"DIN": [0.76, 0.75], "DCN": [0.69], "QueryRec": [0.74]}  # test AUC per seed
    results = {(name,): [{"test/auc": auc, "test/gauc": auc, "test/logloss": 0.5} for auc in aucs]
               for name, aucs in runs.items()}  # fmt: skip
    args = argparse.Namespace(dataset="synthetic", seeds=[0, 1], show_paper=True,
                              variants=queryrec.ALL_VARIANTS, release="small")  # fmt: skip
    out = queryrec.table4(results, args)
    # the paper (KuaiSAR-small): QueryRec 0.6972 > DIN 0.6793 > DCN 0.6729; ours: DIN first
    assert out.splitlines()[-1] == (
        "Ranks by AUC against the KuaiSAR-small column (3 rows): QueryRec 2 (paper 1), "
        "DIN 1 (paper 2), DCN 3 (paper 3); Kendall tau +0.33 (p=1.000)"
    )
    args.dataset, args.release = "kuaisar", "full"  # the full release: the large column
    assert (
        queryrec.table4(results, args)
        .splitlines()[-1]
        .startswith(
            "Ranks by AUC against the KuaiSAR-large column (3 rows): QueryRec 2 (paper 1), "
            "DIN 1 (paper 2), DCN 3 (paper 3)"  # large: QueryRec 0.6996 > DIN 0.6892 > DCN 0.6749
        )
    )


def test_table4_is_read_from_the_experiment_files():
    assert table4("sasrec") == {"lr": 0.002, "batch_size": 64, "layers": 1, "item_layers": 1,
                                "lambda_": 0.02, "alpha": 0.2, "beta": 0.5}  # fmt: skip
    assert PUBLISHED[("gru4rec", "clardrec")] == (0.3389, 0.5126, 0.4326, 0.4263)


def test_changed_settings_rerun_instead_of_reusing(tmp_path, capsys, cache_dir):
    args = ["--quick", "--backbones", "mlp", "--variants", "base", "--out", str(tmp_path),
            "--override", *TINY_OVERRIDES, f"paths.cache_dir={cache_dir}"]  # fmt: skip
    main([*args, "--quick-epochs", "1"])
    metrics = next(tmp_path.rglob("metrics.json"))
    first = metrics.stat().st_mtime_ns
    main([*args, "--quick-epochs", "2"])
    assert metrics.stat().st_mtime_ns != first  # not silently reused under new settings
    assert len(list(tmp_path.rglob("metrics.json"))) == 1  # --variants ran only base


def test_a_cell_whose_config_default_changed_since_is_rerun(tmp_path, capsys, cache_dir):
    """Same overrides, but conf/ now composes another value (as when a method's default
    changes): the cell is stale. A setting the old config did not have at all (added
    since, with a default that keeps the old behaviour) does not make it stale."""
    from omegaconf import OmegaConf

    args = ["--quick", "--quick-epochs", "1", "--backbones", "mlp", "--variants", "base",
            "--out", str(tmp_path), "--override", *TINY_OVERRIDES,
            f"paths.cache_dir={cache_dir}"]  # fmt: skip
    main(args)
    metrics = next(tmp_path.rglob("metrics.json"))
    saved = metrics.parent / "config.yaml"
    config = OmegaConf.load(saved)
    del config.method.module["lr"]  # a setting the cell's config did not have yet
    OmegaConf.save(config, saved)
    first = metrics.stat().st_mtime_ns
    main(args)
    assert metrics.stat().st_mtime_ns == first  # reused
    config = OmegaConf.load(saved)
    config.method.module.weight_decay = 0.123  # the default it ran with differs from today's
    OmegaConf.save(config, saved)
    main(args)
    assert metrics.stat().st_mtime_ns != first  # rerun
    saved.unlink()  # a cell from before runs saved their config: judged on its overrides
    second = metrics.stat().st_mtime_ns
    main(args)
    assert metrics.stat().st_mtime_ns == second


def test_the_grid_gives_the_same_tables_whatever_jobs_is(tmp_path, capsys, cache_dir):
    """Every run gets --threads threads (default 1) whether the grid runs them one or
    two at a time, and whatever threads this process had before."""
    import json

    import torch

    args = ["--backbones", "mlp", "--variants", "base", "clardrec", "--seeds", "0", "1",
            "--max-epochs", "1", "--override", *TINY_OVERRIDES, f"paths.cache_dir={cache_dir}"]  # fmt: skip
    main([*args, "--jobs", "2", "--out", str(tmp_path / "parallel")])
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("[") and "/4] mlp" in line for line in out) == 4
    torch.set_num_threads(2)  # what JOBS=1 gave a run before: all the cores
    main([*args, "--jobs", "1", "--out", str(tmp_path / "sequential")])
    assert torch.get_num_threads() == 1  # the runs set the configured count
    report = Path("synthetic") / "tables_mlp_base_clardrec_seeds0-1.txt"
    assert (tmp_path / "sequential" / report).read_text() == (
        tmp_path / "parallel" / report
    ).read_text()
    runs = sorted((tmp_path / "sequential").rglob("metrics.json"))
    assert len(runs) == 4
    for run in runs:
        twin = tmp_path / "parallel" / run.relative_to(tmp_path / "sequential")
        assert json.loads(twin.read_text()) == json.loads(run.read_text())
        assert json.loads(run.read_text())["threads"] == 1


def test_training_length_reads_the_first_best_epoch_from_the_csv_log(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/ndcg@10\n0,9,0.5,\n0,9,,0.20\n1,19,,0.31\n2,29,,0.25\n"
        "3,39,,0.31\n4,49,,0.30\n4,49,0.1,\n"
    )
    assert training_length(tmp_path) == (2, 5)  # best first reached in epoch 2 of 5
    assert training_length(tmp_path / "missing") is None


def test_report_only_prints_finished_runs_and_runs_nothing(tmp_path, capsys, cache_dir):
    args = ["--backbones", "mlp", "--variants", "base", "aug", "--max-epochs", "1", "--out",
            str(tmp_path), "--override", *TINY_OVERRIDES, f"paths.cache_dir={cache_dir}"]  # fmt: skip
    main([*args, "--seeds", "0", "--variants", "base"])
    capsys.readouterr()
    main([*args, "--seeds", "0", "1", "--report-only"])
    out = capsys.readouterr().out
    assert "  mlp      base 1/1 (n=1)" in out  # one of the two seeds asked for has finished
    assert len(list(tmp_path.rglob("metrics.json"))) == 1  # nothing new was run


def test_a_partial_report_does_not_overwrite_the_full_one(tmp_path, capsys):
    full = tmp_path / "synthetic" / "tables.txt"
    full.parent.mkdir(parents=True)
    full.write_text("the whole grid\n")
    main(["--report-only", "--backbones", "mlp", "--seeds", "0", "1", "2", "3", "4",
          "--out", str(tmp_path)])  # fmt: skip
    assert full.read_text() == "the whole grid\n"
    partial = tmp_path / "synthetic" / "tables_mlp_seeds0-1-2-3-4.txt"
    assert partial.read_text().startswith(
        "Table 1 (ClardRec): main results on synthetic, 5 seed(s)"
    )
    assert f"written to {partial}" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.tmp"))


def test_real_dataset_path_reads_a_kuaisar_folder_and_takes_ablation_names(
    tmp_path, capsys, cache_dir, tiny_folder
):
    # what `make table-clardrec DATASET=kuaisar DATA=DIR QUICK=1` runs, on a KuaiSAR-format folder
    main(["--dataset", "kuaisar", "--data", str(tiny_folder), "--quick", "--quick-epochs", "1",
          "--backbones", "mlp", "--variants", "base", "clardrec", "-CS", "--out", str(tmp_path),
          "--override", f"paths.cache_dir={cache_dir}"])  # fmt: skip
    out = capsys.readouterr().out
    assert "Table 1 (ClardRec): main results on kuaisar, 1 seed(s): 0" in out
    assert "  mlp      base 1/1  +ClardRec 1/1  -CS 1/1" in out
    runs = sorted(p.parent.parent.name for p in tmp_path.rglob("kuaisar/mlp/*/seed0/metrics.json"))
    assert runs == ["-CS", "base", "clardrec"]


@pytest.mark.parametrize("given", [["base", "clardrec-CD"], ["-XX"]])
def test_unknown_variant_is_one_line_naming_the_choices(capsys, given):
    with pytest.raises(SystemExit) as exit_code:
        main(["--variants", *given])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"python -m sar_exp.tables.clardrec: error: --variants: unknown {given[-1]}; "
        "choose from base aug iv4rec jsr clardrec sesrec -CD -FA -DA -CS"
    ]


def test_an_interrupted_cell_resumes_from_its_last_checkpoint(tmp_path, capsys, cache_dir):
    """A cell killed mid-run (its last.ckpt and overrides are there, no metrics.json) goes
    on from where it stopped and ends as an uninterrupted run does."""
    import json
    import shutil

    args = ["--backbones", "mlp", "--variants", "base", "--seeds", "0", "--max-epochs", "3",
            "--override", *TINY_OVERRIDES, f"paths.cache_dir={cache_dir}",
            "callbacks.early_stopping.patience=10"]  # fmt: skip
    main([*args, "--out", str(tmp_path / "whole")])
    cell = Path("synthetic") / "mlp" / "base" / "seed0"
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    killed = tmp_path / "killed" / cell
    (killed / "metrics.json").unlink()  # as if killed after the last epoch's checkpoint
    main([*args, "--out", str(tmp_path / "killed")])
    assert "Restored all states" in (killed / "train.log").read_text()  # resumed, not rerun
    assert json.loads((killed / "metrics.json").read_text()) == json.loads(
        (tmp_path / "whole" / cell / "metrics.json").read_text()
    )


def test_a_cell_run_with_another_thread_count_is_run_again(tmp_path, capsys, cache_dir):
    import json

    args = ["--backbones", "mlp", "--variants", "base", "--seeds", "0", "--max-epochs", "1",
            "--out", str(tmp_path), "--override", *TINY_OVERRIDES, f"paths.cache_dir={cache_dir}"]  # fmt: skip
    main(args)
    metrics = next(tmp_path.rglob("metrics.json"))
    recorded = json.loads(metrics.read_text())
    del recorded["threads"]  # a cell from before the count was recorded: unknown
    metrics.write_text(json.dumps(recorded))
    capsys.readouterr()
    main([*args, "--report-only"])
    assert "  mlp      base" not in capsys.readouterr().out.split("Training length")[1]
    main(args)
    assert json.loads(metrics.read_text())["threads"] == 1  # run again, with the count


def test_quick_sesrec_table_prints_tables_2_to_4_with_whose_numbers_they_are(
    tmp_path, capsys, cache_dir
):
    from sar_exp.tables import sesrec

    sesrec.main(["--quick", "--quick-epochs", "1", "--variants", "SASRec", "SESRec", "base_no_search",
                 "gamma_median", "--out", str(tmp_path), "--override", *TINY_OVERRIDES,
                 f"paths.cache_dir={cache_dir}"])  # fmt: skip
    out = capsys.readouterr().out
    assert "Table 2 (SESRec): main results on synthetic, 1 seed(s): 0" in out
    assert "KuaiSAR as UniSAR's paper reports it" in out
    assert "(0.3432)" in out  # SESRec's KuaiSAR NDCG@5 in UniSAR's Table 3
    assert "Table 3 (SESRec): ablations" in out and "Table 4 (SESRec): split thresholds" in out
    assert "(0.3510)" in out  # Median on the private data
    assert "Base, no search (ours)" in out  # the attribution row, ours only
    assert "private Kuaishou" in out
    assert "Improv. of SESRec over the best baseline run" in out and "vs SASRec" in out
    assert (
        "Ranks by NDCG@5 (paper: UniSAR's Table 3) (2 rows): SESRec " in out
    )  # the paper has SESRec first
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(" ") is False
             and len(line.split()) > 2 and line.split()[1] in ("paper", "DIN")}  # fmt: skip
    assert "paper" in lines  # rows the framework does not run show the paper's numbers
    runs = sorted(p.parent.parent.name for p in (tmp_path / "quick").rglob("metrics.json"))
    assert runs == ["SASRec", "SESRec", "base_no_search", "gamma_median"]
    config = (
        tmp_path / "quick" / "synthetic" / "base_no_search" / "seed0" / "config.yaml"
    ).read_text()
    assert "use_search: false" in config and "use_align: false" in config
    assert "name: sesrec" in config and "train_negatives: popularity" in config


@pytest.mark.parametrize("table", ["sesrec", "unisar", "queryrec"])
def test_every_variant_of_a_table_composes(table):
    """Each row's overrides compose (a flag missing from the method's config would only
    fail when the grid reaches that row) and the rows with their own flags set them."""
    import argparse

    from omegaconf import OmegaConf

    from sar_exp.tables import grid, queryrec, sesrec, unisar

    module = {"sesrec": sesrec, "unisar": unisar, "queryrec": queryrec}[table]
    args = argparse.Namespace(dataset="synthetic", data=None, max_epochs=3, quick=False,
                              threads=grid.DEFAULT_THREADS, release="small")  # fmt: skip
    for name in module.ALL_VARIANTS:
        if table in ("sesrec", "queryrec"):
            runs = [module.cell_overrides(name, args)]
        else:
            runs = [overrides for _, overrides, _ in module.cell_runs(name, args)]
        for overrides in runs:
            cfg = grid._compose(grid.Run((name,), 0, overrides, Path("/tmp/x"), 1, "val/mrr"))
            flags = [o for o in overrides if o.startswith("method.module.")]
            for flag in flags:
                key, value = flag.split("=", 1)
                got = str(OmegaConf.select(cfg, key)).replace("'", "").replace(" ", "").lower()
                assert got == value.lower(), (name, flag)


def test_sesrec_table_on_amazon_shows_the_papers_amazon_column(tmp_path, capsys, cache_dir):
    from pathlib import Path

    from sar_exp.tables import sesrec

    fixture = Path(__file__).resolve().parent / "fixtures" / "amazon"
    sesrec.main(["--dataset", "amazon", "--data", str(fixture), "--quick", "--quick-epochs", "1",
                 "--variants", "SASRec", "--out", str(tmp_path), "--override",
                 "dataset.category=Toy_Store", "dataset.protocol.num_eval_negatives=20",
                 f"paths.cache_dir={cache_dir}"])  # fmt: skip
    out = capsys.readouterr().out
    assert "main results on amazon" in out and "the paper's Amazon Kindle column" in out
    sasrec_row = next(line for line in out.splitlines() if line.split()[:1] == ["SASRec"])
    assert "(0.3822)" in sasrec_row and "paper" not in sasrec_row  # run, beside Table 2's value
    config = (tmp_path / "quick" / "amazon" / "SASRec" / "seed0" / "config.yaml").read_text()
    assert "name: sesrec_amazon" in config and "max_rec_history: 15" in config


def test_quick_unisar_table_runs_its_rows_and_both_halves_of_joint_training(
    tmp_path, capsys, cache_dir
):
    from sar_exp.tables import unisar

    unisar.main(["--quick", "--quick-epochs", "1", "--variants", "SASRec", "SESRec", "UniSAR", "wo_joint",
                 "--out", str(tmp_path), "--override", *TINY_OVERRIDES,
                 "dataset.protocol.num_eval_negatives=20",  # the tiny data after 5-core
                 f"paths.cache_dir={cache_dir}"])  # fmt: skip
    out = capsys.readouterr().out
    for title in ("Table 3 (UniSAR): recommendation", "Table 4 (UniSAR): search",
                  "Table 5 (UniSAR): ablations"):  # fmt: skip
        assert title in out
    assert "w/o Joint Training" in out and "(0.3569)" in out  # its published rec NDCG@5
    runs = sorted(p.parent.parent.name for p in (tmp_path / "quick").rglob("metrics.json"))
    assert runs == ["SASRec", "SESRec", "UniSAR", "wo_joint_rec", "wo_joint_search"]
    sesrec_row = next(line for line in out.splitlines() if line.split()[:1] == ["SESRec"])
    assert "paper" not in sesrec_row and "(0.3432)" in sesrec_row  # run, beside UniSAR's number


def test_a_failing_cell_is_reported_and_the_grid_goes_on(tmp_path, capsys, cache_dir):
    """One bad cell (here a refused batch size) is one line and an exit status at the
    end, after the tables; it does not take the other cells down with it."""
    from sar_exp.tables import grid

    common = ["backbone=mlp", "logger=csv", "trainer.max_epochs=1", *TINY_OVERRIDES,
              f"paths.cache_dir={cache_dir}"]  # fmt: skip
    cells = [grid.Run(("bad",), 0, [*common, "data.batch_size=0"], tmp_path / "bad", 1),
             grid.Run(("good",), 0, common, tmp_path / "good", 1)]  # fmt: skip
    results = grid.collect(cells, [0])
    out = capsys.readouterr().out
    assert "[1/2] bad seed 0: FAILED, ConfigError: data.batch_size must be a positive" in out
    assert "[2/2] good seed 0: ndcg@5" in out
    assert list(results) == [("good",)]
    with pytest.raises(SystemExit, match=r"1 cell\(s\) failed:\n  bad seed 0: ConfigError"):
        grid.print_and_write("the tables", tmp_path / "tables.txt")
    assert (tmp_path / "tables.txt").read_text() == "the tables\n"  # written before the exit


def _model_config(row: str) -> str | None:
    """The conf/backbone or conf/method file a paper's row name would have, if any."""
    from sar_exp.train import CONFIG_DIR

    name = row.lower().replace("-", "").replace("+", "")
    for group in ("backbone", "method"):
        if (Path(CONFIG_DIR) / group / f"{name}.yaml").exists():
            return f"{group}={name}"
    return None


@pytest.mark.parametrize("table", ["sesrec", "unisar", "queryrec"])
def test_no_published_only_row_for_a_model_the_framework_has(table):
    from sar_exp.tables import queryrec, sesrec, unisar

    module = {"sesrec": sesrec, "unisar": unisar, "queryrec": queryrec}[table]
    rows = {
        "sesrec": sesrec.ROWS,
        "unisar": [*unisar.PUBLISHED_REC["kuaisar"], *unisar.PUBLISHED_SEARCH["kuaisar"]],
        "queryrec": queryrec.ROWS,
    }[table]
    published_only = [row for row in rows if row not in module.RUNNABLE]
    assert [(row, _model_config(row)) for row in published_only if _model_config(row)] == []
    assert {"sesrec": "FMLP-Rec", "unisar": "ZAM", "queryrec": "DCN"}[table] in module.RUNNABLE


def test_clardrec_table_runs_sesrec_in_the_sequential_block_on_the_same_protocol(
    tmp_path, capsys, monkeypatch
):
    """Table 1's SESRec row: run once, in SASRec's block, under ClardRec's sequential
    protocol; the report lists it beside the paper's number and counts it as a baseline."""
    from sar_exp.tables import clardrec, grid

    captured = []

    def record(cells, *args, **kwargs):  # what collect() would run; no cell ran or failed
        grid.FAILED.clear()
        captured.extend(cells)
        return {}

    monkeypatch.setattr(grid, "collect", record)
    clardrec.main(["--report-only", "--seeds", "0", "--out", str(tmp_path)])
    sesrec = [c for c in captured if c.key[1] == "sesrec"]
    assert [c.key[0] for c in sesrec] == ["sasrec"]
    cfg = grid._compose(sesrec[0])
    assert cfg.method.name == "sesrec" and cfg.dataset.protocol.name == "clardrec_seq"
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "SESRec" in line)
    assert "(0.3978)" in row  # the paper's NDCG@5 for SESRec on KuaiSAR


@pytest.mark.parametrize("dataset, merged", [("synthetic", 175), ("amazon", 30)])
def test_sesrec_table_gives_query_seqrec_both_histories(dataset, merged):
    """SASRec reads 150 rec clicks under protocol=sesrec (15 on Amazon), and SESRec 25
    searches: Query-SeqRec's merged sequence gets room for both."""
    import argparse

    from sar_exp.tables import grid, sesrec

    args = argparse.Namespace(dataset=dataset, data="/nowhere", max_epochs=3, quick=False,
                              threads=grid.DEFAULT_THREADS)  # fmt: skip
    overrides = sesrec.cell_overrides("Query-SeqRec", args)
    assert f"dataset.protocol.max_interleaved_history={merged}" in overrides
    assert not any("max_interleaved" in o for o in sesrec.cell_overrides("SASRec", args))


@pytest.mark.parametrize("row, method", [("USER", "user"), ("UnifiedSSR", "unifiedssr")])
def test_unisar_table_runs_user_and_unifiedssr_as_two_fine_tuned_halves(row, method):
    """UniSAR Sec. 4.4: USER and UnifiedSSR "derive two parameter sets for S&R tasks via
    pre-training and fine-tuning": one run fine-tuned for each task, selected on that
    task, and each task's cells read from its own run."""
    import argparse

    from sar_exp.tables import grid, unisar

    args = argparse.Namespace(dataset="synthetic", data=None, max_epochs=3, quick=False,
                              threads=grid.DEFAULT_THREADS)  # fmt: skip
    halves = unisar.cell_runs(row, args)
    assert [(part, monitor) for part, _, monitor in halves] == [
        ("rec", "val/ndcg@5"),
        ("search", "val/search/ndcg@5"),
    ]
    for part, overrides, monitor in halves:
        cfg = grid._compose(grid.Run((row, part), 0, overrides, Path("/nowhere"), 1))
        assert cfg.method.name == method and cfg.method.module.finetune_task == part
        assert list(cfg.method.scores) == [part] and cfg.optimized_metric == monitor
        assert list(cfg.dataset.protocol.evaluated_tasks) == ["rec", "search"]
    results = {(row, "rec"): [{"test/ndcg@5": 0.3}], (row, "search"): [{"test/search/ndcg@5": 0.6}]}
    assert unisar.metric_cells(results, row, "rec", ["ndcg@5"])[0].values == [0.3]
    assert unisar.metric_cells(results, row, "search", ["ndcg@5"])[0].values == [0.6]
    # --quick: pre-training leaves the last quick epoch to fine-tuning (at least 0 epochs)
    for epochs, pretrain in ((1, 0), (3, 2)):
        quick = argparse.Namespace(**{**vars(args), "quick": True, "quick_epochs": epochs})
        for part, overrides, monitor in unisar.cell_runs(row, quick):
            assert overrides[-2:] == [f"method.module.pretrain_epochs={pretrain}",
                                      f"optimized_metric={monitor}"]  # fmt: skip
            run = grid.Run((row, part), 0, [*overrides, *grid.common_overrides(quick)],
                           Path("/nowhere"), 1)  # fmt: skip
            cfg = grid._compose(run)
            assert cfg.method.module.pretrain_epochs == pretrain < cfg.trainer.max_epochs


def test_a_search_only_cell_shows_its_search_ndcg_in_the_progress_line(
    tmp_path, capsys, monkeypatch
):
    from sar_exp.tables import grid

    monkeypatch.setattr(
        grid, "_run_task", lambda run: (run.key, run.seed, {"test/search/ndcg@5": 0.6606}, None)
    )
    grid.collect([grid.Run(("QEM",), 0, [], tmp_path, 1)], [0])
    assert "[1/1] QEM seed 0: search/ndcg@5 0.6606" in capsys.readouterr().out


def test_each_cell_of_a_parallel_grid_runs_in_a_fresh_process():
    """A long-lived worker kept the modules it had imported before the code changed and
    imported the rest after: cells started after an edit failed on the mismatch."""
    import os

    from sar_exp.tables.grid import cell_pool

    with cell_pool(1, initializer=None) as pool:  # (no Lightning to import: quicker)
        first, second = (pool.submit(os.getpid).result() for _ in range(2))
    assert first != second


def test_clardrec_lines_under_the_tables_call_the_papers_dash_row_base():
    """Table 1 prints the backbone alone as "-", as the paper does; the rank and
    training-length lines under it name that row "base", where a dash would be lost."""
    import argparse

    from sar_exp.tables import clardrec

    def run(ndcg5, length):
        return {**{f"test/{m}": ndcg5 for m in clardrec.METRICS}, "length": length}

    results = {("mlp", "base"): [run(0.30, (2, 4)), run(0.32, (2, 4))],
               ("mlp", "clardrec"): [run(0.20, (3, 5)), run(0.22, (3, 5))]}  # fmt: skip
    args = argparse.Namespace(show_paper=True, backbones=["mlp"], seeds=[0, 1], dataset="synthetic")
    out = clardrec.tables(results, args)
    assert "  mlp      Ranks by NDCG@5 (2 rows): +ClardRec 2 (paper 1), base 1 (paper 2)" in out
    assert "  mlp      base 2/4  +ClardRec 3/5" in out
