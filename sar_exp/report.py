"""`python -m sar_exp.report DIR`: one row per configuration of the runs under DIR
(a multirun, a table directory, outputs/runs), with mean ± std over seeds of every
test metric and the best validation epoch; failed and unfinished runs are listed.

Writes DIR/summary.csv, DIR/summary.md and one PNG of validation curves per
configuration in DIR/curves/ (each run a line).

A run directory is one with config.yaml (written by every run) or, for table runs from
before it was written, table_overrides.json. A configuration is what its config says,
less the seed and the things that only say where a run wrote."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from sar_exp.runs import FAILED, FINISHED, flatten
from sar_exp.runs import INCIDENTAL as IGNORED  # seed, where a run wrote, how it reported
from sar_exp.tables.report import Cell, training_length

# What else a run directory holds: a config.yaml without any of these is someone else's.
RUN_MARKERS = ("train.log", FINISHED, FAILED, "csv", "checkpoints", ".hydra")


@dataclass
class Run:
    path: Path
    config: dict
    seed: int | None
    metrics: dict | None = None
    failure: str | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    length: tuple[int, int] | None = None
    asked: str = ""  # the overrides of a run that failed before writing its config

    @property
    def status(self) -> str:
        return "finished" if self.metrics else ("failed" if self.failure else "unfinished")


def _read_config(run_dir: Path) -> dict | None:
    if (run_dir / "config.yaml").exists():
        return flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
    if (run_dir / "table_overrides.json").exists():  # a table run of older code
        overrides = json.loads((run_dir / "table_overrides.json").read_text())
        values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
        seed = re.search(r"seed(\d+)", run_dir.name)
        return {**values, "seed": int(seed.group(1)) if seed else None}
    return None


def _curve(run_dir: Path, monitor: str) -> list[tuple[int, float]]:
    log = run_dir / "csv" / "metrics.csv"
    if not log.exists():
        return []
    with log.open() as handle:
        return [(int(r["epoch"]), float(r[monitor])) for r in csv.DictReader(handle)
                if r.get(monitor) and r["epoch"].isdigit()]  # fmt: skip


def _reason(path: Path) -> str:
    lines = path.read_text().strip().splitlines()
    return lines[-1] if lines else "(no reason recorded)"


def _is_run(run_dir: Path) -> bool:
    if "wandb" in run_dir.parts or run_dir.name == ".hydra":
        return False
    return (run_dir / "table_overrides.json").exists() or any(
        (run_dir / m).exists() for m in RUN_MARKERS
    )


def _read_run(run_dir: Path) -> Run | None:
    config = _read_config(run_dir)
    if config is None:
        return None
    run = Run(run_dir, config, config.get("seed"))
    if (run_dir / FINISHED).exists():
        run.metrics = json.loads((run_dir / FINISHED).read_text())
    elif (run_dir / FAILED).exists():
        run.failure = _reason(run_dir / FAILED)
    monitor = str(config.get("optimized_metric", "val/ndcg@10"))
    run.curve = _curve(run_dir, monitor)
    run.length = training_length(run_dir, monitor)
    return run


def find_runs(root: Path) -> list[Run]:
    runs: dict[Path, Run] = {}
    for marker in sorted({*root.rglob("config.yaml"), *root.rglob("table_overrides.json")}):
        run_dir = marker.parent
        if run_dir in runs or not _is_run(run_dir):
            continue
        try:
            run = _read_run(run_dir)
        except Exception as err:  # a half-written or foreign file: list it, go on
            run = Run(run_dir, {}, None, failure=f"unreadable: {type(err).__name__}: {err}")
        if run is not None:
            runs[run_dir] = run
    # a failed run refused before it wrote its config still says why (and what it was)
    for marker in sorted(root.rglob(FAILED)):
        if marker.parent not in runs and "wandb" not in marker.parts:
            given = marker.parent / ".hydra" / "overrides.yaml"
            try:
                asked = " ".join(map(str, OmegaConf.load(given))) if given.exists() else ""
            except Exception:
                asked = ""
            runs[marker.parent] = Run(marker.parent, {}, None, failure=_reason(marker), asked=asked)
    return list(runs.values())


def configurations(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by the config values that differ between them (seed aside)."""
    keys = sorted({k for r in runs for k in r.config if not IGNORED.match(k)})
    varying = [k for k in keys if len({repr(r.config.get(k)) for r in runs if r.config}) > 1]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.config:
            label = " ".join(f"{k}={run.config.get(k)}" for k in varying)
        else:
            label = f"refused: {run.asked or run.path.name}"
        groups.setdefault(label or "all runs", []).append(run)
    return groups


def _epochs(values: list[int]) -> str:
    if not values:
        return "-"
    cell = Cell([float(v) for v in values])
    return f"{cell.mean:.1f}±{cell.std:.1f}" if len(values) > 1 else f"{cell.mean:.0f}"


def summary_rows(groups: dict[str, list[Run]]) -> tuple[list[str], list[dict]]:
    metrics = sorted({k for runs in groups.values() for r in runs if r.metrics
                      for k in r.metrics if k.startswith("test/")})  # fmt: skip
    rows = []
    for label, runs in groups.items():
        done = [r for r in runs if r.metrics]
        row = {
            "configuration": label,
            "runs": len(done),
            "failed": sum(r.status == "failed" for r in runs),
            "unfinished": sum(r.status == "unfinished" for r in runs),
            "seeds": " ".join(str(r.seed) for r in done),
        }
        for metric in metrics:
            row[metric] = Cell([r.metrics[metric] for r in done if metric in r.metrics]).text()
        lengths = [r.length for r in done if r.length]
        row["best epoch"] = _epochs([b for b, _ in lengths])
        row["epochs run"] = _epochs([e for _, e in lengths])
        rows.append(row)
    columns = ["configuration", "runs", "failed", "unfinished", "seeds", *metrics, "best epoch",
               "epochs run"]  # fmt: skip
    return columns, rows


def as_text(columns, rows) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(f"{c:<{widths[c]}}" for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(f"{str(r[c]):<{widths[c]}}" for c in columns) for r in rows]
    return "\n".join(lines)


def as_markdown(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def as_csv(columns, rows) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_curves(groups: dict[str, list[Run]], folder: Path) -> list[Path]:
    """One PNG per configuration: each run's validation curve of the monitored metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number, (label, runs) in enumerate(groups.items()):
        curves = [r for r in runs if r.curve]
        if not curves:
            continue
        figure, axis = plt.subplots(figsize=(6, 4))
        for run in curves:
            epochs, values = zip(*run.curve)
            name = f"seed {run.seed}" if run.seed is not None else run.path.name
            axis.plot([e + 1 for e in epochs], values, marker=".", label=f"{name} ({run.status})")
        axis.set_xlabel("epoch")
        axis.set_ylabel(str(curves[0].config.get("optimized_metric", "val/ndcg@10")))
        axis.set_title(label[:90], fontsize=8)
        axis.legend(fontsize=7)
        figure.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", label)[:120] or "all_runs"
        path = folder / f"{number:02d}_{slug}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sar_exp.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", type=Path, help="a multirun, table or runs directory")
    parser.add_argument("--no-plots", action="store_true", help="skip the validation curves")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        parser.exit(2, f"{parser.prog}: error: {args.dir} is not a directory\n")
    runs = find_runs(args.dir)
    if not runs:
        parser.exit(2, f"{parser.prog}: error: no runs under {args.dir} (no config.yaml)\n")
    groups = configurations(runs)
    columns, rows = summary_rows(groups)
    print(as_text(columns, rows))
    problems = [r for r in runs if r.status != "finished"]
    for run in problems:
        print(f"{run.status.upper()}: {run.path}" + (f": {run.failure}" if run.failure else ""))
    from sar_exp.runs import write_atomic

    write_atomic(args.dir / "summary.csv", as_csv(columns, rows))
    problem_lines = [f"- {r.status}: `{r.path}`" + (f": {r.failure}" if r.failure else "")
                     for r in problems]  # fmt: skip
    write_atomic(args.dir / "summary.md", as_markdown(columns, rows) + "\n\n"
                      + "\n".join(problem_lines) + "\n")  # fmt: skip
    plots = [] if args.no_plots else plot_curves(groups, args.dir / "curves")
    print(f"\nwritten: {args.dir / 'summary.csv'}, {args.dir / 'summary.md'}"
          + (f", {len(plots)} plot(s) in {args.dir / 'curves'}" if plots else ""))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
