"""The machinery every paper table shares: a grid of runs (cells x seeds), each in its
own directory, reused when it finished with the same overrides, thread count and
result-deciding config (a default changed in conf/ since makes it stale),
resumed when it was interrupted, run one or --jobs at a time; the command-line options
every table takes; and the improvement line with its t-test."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

from sar_exp import runs
from sar_exp.tables.report import Cell, relative_improvement, training_length, welch_p
from sar_exp.train import CONFIG_DIR

DEFAULT_SEEDS = [0, 1, 2]
DEFAULT_THREADS = 1  # conf/config.yaml's `threads`


class Run(NamedTuple):
    key: tuple  # the table cell, e.g. (backbone, variant)
    seed: int
    overrides: list[str]
    run_dir: Path
    threads: int
    monitor: str = "val/ndcg@10"  # what the training length is read from


def finished_run(run: Run, same: bool | None = None) -> dict | None:
    """The metrics of a run that finished with the same settings (see _same_settings;
    `same`: already known) and this thread count (results depend on it; a run that did
    not record it does not count), else None."""
    done = run.run_dir / "metrics.json"
    if done.exists() and (_same_settings(run) if same is None else same):
        metrics = json.loads(done.read_text())
        if metrics.get("threads") == run.threads:
            return metrics
    return None


def _same_settings(run: Run) -> bool:
    """The cell's directory holds a run of exactly these overrides whose saved config is
    still what they compose to today (a default changed in conf/ since makes it stale;
    runs.config_changes says what counts)."""
    recorded = run.run_dir / "table_overrides.json"
    return (
        recorded.exists() and json.loads(recorded.read_text()) == run.overrides
        and not runs.config_changes(run.run_dir, _compose(run))
    )  # fmt: skip


def _compose(run: Run, extra: tuple = ()):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[f"seed={run.seed}", f"paths.output_dir={run.run_dir}",
                       f"paths.root_dir={Path.cwd()}",
                       f"paths.cache_dir={Path.cwd() / '.cache' / 'sar_exp'}",
                       *run.overrides, *extra],
        )  # fmt: skip


def run_one(run: Run) -> dict:
    """Run one cell, or reuse it when it finished before with the same overrides (and
    config); a cell that was interrupted with the same ones resumes from its last.ckpt."""
    same = _same_settings(run)
    if (metrics := finished_run(run, same)) is not None:
        return metrics
    recorded = run.run_dir / "table_overrides.json"
    last = run.run_dir / "checkpoints" / "last.ckpt"
    resume = [f"ckpt_path={last}"] if same and last.exists() else []
    if not resume:  # another run's checkpoints must never be resumed under these overrides
        for stale in run.run_dir.glob("checkpoints/*.ckpt"):
            stale.unlink()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    runs.write_atomic(recorded, json.dumps(run.overrides))  # what a resume must match
    from sar_exp.train import train

    return train(_compose(run, tuple(resume)), overrides=[])


def quiet_lightning() -> None:
    """A grid prints one line a run, not Lightning's banners and warnings."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; quiet them after)

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def cell_pool(jobs: int, initializer=quiet_lightning):
    """The processes a grid runs its cells in, `jobs` at a time: a fresh one per cell, so a
    cell runs the code as it is when the cell starts and inherits no state from the cell
    before (a long-lived worker mixed the modules it had imported before the code changed
    with the ones it imported after, and failed on the mismatch)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(jobs, context, initializer, max_tasks_per_child=1)


# cells of the last collect() that failed: (key, seed, run_dir, one-line reason)
FAILED: list[tuple] = []


def _run_task(run: Run) -> tuple:
    """(key, seed, metrics or None, why it failed or None): one cell's failure (a bad
    override, a crash) is reported and the grid goes on with the others."""
    try:
        metrics = run_one(run)
    except Exception as err:  # noqa: BLE001 (any failure of one cell)
        reason = (str(err).strip().splitlines() or [""])[0]
        return run.key, run.seed, None, f"{type(err).__name__}: {reason}"[:300]
    metrics = {**metrics, "length": training_length(run.run_dir, run.monitor)}
    return run.key, run.seed, metrics, None


def collect(grid: list[Run], seeds: list[int], jobs: int = 1, report_only: bool = False,
            headline: str = "test/ndcg@5") -> dict:  # fmt: skip
    """Run (or reuse) every cell; with jobs > 1, that many at a time. Every run gets its
    thread count whatever `jobs` is, so a table does not depend on how it was scheduled
    (on 2 cores, two single-thread runs do 1.4x the work of one two-thread run).
    Returns {key: [metrics of each seed, in the order asked for]}."""
    if report_only:  # the tables from what has finished, running nothing
        grid = [run for run in grid if finished_run(run) is not None]
    by_seed: dict = {}
    start = time.time()
    FAILED.clear()
    run_dirs = {(run.key, run.seed): run.run_dir for run in grid}

    def report(count: int, key, seed, metrics, failure) -> None:
        where = f"[{count}/{len(grid)}] {' '.join(map(str, key))} seed {seed}:"
        if failure is not None:
            FAILED.append((key, seed, run_dirs[(key, seed)], failure))
            print(f"{where} FAILED, {failure} ({run_dirs[(key, seed)]})", flush=True)
            return
        by_seed.setdefault(key, {})[seed] = metrics
        shown = headline
        if shown not in metrics:  # a search-only row has no rec metrics: its search one
            shown = headline.replace("test/", "test/search/", 1)
        value = metrics.get(shown, float("nan"))
        print(f"{where} {shown.removeprefix('test/')} {value:.4f} ({time.time() - start:.0f}s)",
              flush=True)  # fmt: skip

    if jobs <= 1:
        for count, run in enumerate(grid, 1):
            report(count, *_run_task(run))
    else:
        from concurrent.futures import as_completed

        with cell_pool(jobs) as pool:
            futures = [pool.submit(_run_task, run) for run in grid]
            for count, future in enumerate(as_completed(futures), 1):
                report(count, *future.result())
    return {key: [found[s] for s in seeds if s in found] for key, found in by_seed.items()}


def collect_rows(args, cell_overrides, monitor: str, headline: str) -> dict:
    """The cells of a table whose rows are single runs named by --variants (SESRec,
    QueryRec): one per row and seed, under <out>/<dataset>/<row>/seed<N>."""
    cells = [
        Run((name,), seed, [*cell_overrides(name, args), *common_overrides(args), *args.override],
            Path(args.out) / args.dataset / name / f"seed{seed}", args.threads, monitor)
        for name in args.variants for seed in args.seeds
    ]  # fmt: skip
    return collect(cells, args.seeds, args.jobs, args.report_only, headline=headline)


def row_cells(results, name: str, metrics) -> list[Cell]:
    """One Cell per metric: the row's test values over the seeds that finished."""
    found = results.get((name,), [])
    return [Cell([r[f"test/{m}"] for r in found if f"test/{m}" in r]) for m in metrics]


def add_common_arguments(parser: argparse.ArgumentParser, out: str, datasets: list[str]) -> None:
    """The options every table takes."""
    parser.add_argument("--dataset", choices=datasets, default="synthetic")
    parser.add_argument("--data", help="the dataset folder (with a --dataset other than synthetic)")
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, sharing the cores (default 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS,
        help="torch threads of every run, whatever --jobs is (default 1; jobs x threads "
        "should not exceed the cores)",
    )  # fmt: skip
    parser.add_argument(
        "--report-only", action="store_true",
        help="print the tables from the runs that have finished; run nothing",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="one seed, few epochs")
    parser.add_argument("--quick-epochs", type=int, default=2)
    parser.add_argument("--out", default=out)
    parser.add_argument(
        "--override", nargs="*", default=[], help="extra Hydra overrides for every run"
    )
    parser.add_argument(
        "--no-paper", dest="show_paper", action="store_false", help="hide the published numbers"
    )


def common_overrides(args) -> list[str]:
    """What --quick and --threads add to every run of a table (after its own overrides,
    before --override); --max-epochs is each table's to place."""
    out = []
    if args.quick:
        out.append(f"trainer.max_epochs={args.quick_epochs}")
    if args.threads != DEFAULT_THREADS:  # recorded like every other change from the defaults
        out.append(f"threads={args.threads}")
    return out


def improvement(ours: Cell, baselines: dict[str, Cell], metric: str) -> str:
    """`metric +x%* vs best (p=...)`: our mean against the best baseline's, with a Welch
    t-test over seeds (* for p <= 0.05 when ours is higher)."""
    baselines = {name: cell for name, cell in baselines.items() if cell.values}  # those run
    if not baselines or not ours.values:
        return f"{metric} n/a"
    best = max(baselines, key=lambda name: baselines[name].mean)
    p = welch_p(ours.values, baselines[best].values)
    star = "*" if not math.isnan(p) and p <= 0.05 and ours.mean > baselines[best].mean else ""
    p_text = f"p={p:.3f}" if not math.isnan(p) else "p=n/a"
    if baselines[best].mean <= 0:  # no relative change from zero
        return f"{metric} {ours.mean:.4f} vs {best}'s 0 ({p_text})"
    change = relative_improvement(ours.mean, baselines[best].mean)
    return f"{metric} {change:+.2f}%{star} vs {best} ({p_text})"


def improvements(cells_of, ours: str, baselines, metrics) -> str:
    """`improvement` of row `ours` over the best of the other rows, metric by metric;
    cells_of(name) gives a row's cells in `metrics` order."""
    mine = cells_of(ours)
    others = {b: cells_of(b) for b in baselines if b != ours}
    return "; ".join(improvement(mine[i], {b: c[i] for b, c in others.items()}, m)
                     for i, m in enumerate(metrics))  # fmt: skip


def check_table_args(parser, args, all_variants: list[str]) -> None:
    """The checks every table's command line gets after parsing, each a one-line error:
    unknown variants, a real dataset without --data; --quick keeps one seed and writes
    under <out>/quick."""
    unknown = [v for v in args.variants if v not in all_variants]
    if unknown:  # one line, not argparse's usage block
        parser.exit(2, f"{parser.prog}: error: --variants: unknown {' '.join(unknown)}; "
                       f"choose from {' '.join(all_variants)}\n")  # fmt: skip
    if args.dataset != "synthetic" and not args.data:
        parser.exit(2, f"{parser.prog}: error: --dataset {args.dataset} needs --data DIR\n")
    if args.quick:
        args.seeds = args.seeds[:1]
        args.out = str(Path(args.out) / "quick")


def print_and_write(text: str, report: Path) -> None:
    """The rendered tables to the console and (atomically) to `report`; then, if cells
    failed, one line each and exit status 1 (their cells show what the other seeds gave)."""
    print("\n" + text)
    report.parent.mkdir(parents=True, exist_ok=True)
    runs.write_atomic(report, text + "\n")
    print(f"\nwritten to {report}")
    if FAILED:
        lines = [f"  {' '.join(map(str, key))} seed {seed}: {why} ({run_dir})"
                 for key, seed, run_dir, why in FAILED]  # fmt: skip
        raise SystemExit(f"{len(FAILED)} cell(s) failed:\n" + "\n".join(lines))


def variants_report(args, all_variants: list[str]) -> Path:
    """tables.txt for every variant on the default seeds; a selection gets its own file."""
    if args.variants == all_variants and args.seeds == DEFAULT_SEEDS:
        return Path(args.out) / args.dataset / "tables.txt"
    name = "tables_" + "_".join(args.variants)[:80] + f"_seeds{'-'.join(map(str, args.seeds))}.txt"
    return Path(args.out) / args.dataset / name


def variants_main(table: str, doc: str, all_variants: list[str], example: str, collect, tables,
                  argv=None, extra_arguments=None) -> None:  # fmt: skip
    """The command line of a table whose rows are chosen with --variants (UniSAR, SESRec,
    QueryRec): parse, check, run or reuse the cells, print and write the tables.
    `extra_arguments(parser)` adds a table's own options."""
    parser = argparse.ArgumentParser(
        prog=f"python -m sar_exp.tables.{table}", description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_common_arguments(parser, f"outputs/tables/{table}", ["synthetic", "kuaisar", "amazon"])
    parser.add_argument("--variants", nargs="+", default=all_variants,
                        help=f"rows to run, e.g. {example}")  # fmt: skip
    if extra_arguments is not None:
        extra_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    check_table_args(parser, args, all_variants)
    quiet_lightning()
    print_and_write(tables(collect(args), args), variants_report(args, all_variants))
