"""Aggregating seeds into a paper-style table: mean +- std, improvement, Welch t-test."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats


@dataclass
class Cell:
    values: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    def text(self) -> str:
        if not self.values:
            return "-"
        return f"{self.mean:.4f}±{self.std:.4f}" if len(self.values) > 1 else f"{self.mean:.4f}"


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided Welch t-test p-value; nan with fewer than two seeds a side."""
    if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def relative_improvement(new: float, old: float) -> float:
    return (new - old) / old * 100 if old else math.nan


def render(
    rows: list[tuple[str, str, str, list[Cell], list[float] | None]],
    metrics: list[str],
    title: str,
    headers: tuple[str, str] = ("backbone", "method"),
    footnote: str = "each cell: ours (mean±std over seeds) and, in brackets, the paper's KuaiSAR value",
) -> str:
    """rows: (group, backbone, label, cells, published) -> a text table."""
    width = 15 if any(len(c.values) > 1 for r in rows for c in r[3]) else 8
    label_width = max(12, *(len(r[2]) + 1 for r in rows)) if rows else 12
    head = f"{'':<11}{headers[0]:<9}{headers[1]:<{label_width}}" + "".join(
        f"{m.upper():>{width + 9}}" for m in metrics
    )
    lines = [title, head, "-" * len(head)]
    last_group = None
    for group, backbone, label, cells, published in rows:
        shown = group if group != last_group else ""
        last_group = group
        body = ""
        for i, cell in enumerate(cells):
            paper = (
                f"({published[i]:.4f})"
                if published and not math.isnan(published[i])
                else "(  -   )"
            )
            body += f"{cell.text():>{width}} {paper}"
        lines.append(f"{shown:<11}{backbone:<9}{label:<{label_width}}{body}")
    lines.append(footnote)
    return "\n".join(lines)


def rank_agreement(rows, column: int, metric: str) -> str:
    """Do the rows we ran come in the paper's order? Each row with both a run and a
    published value in `column` gets its rank by our mean and by the paper's (1 = best;
    higher is better), listed best first by the paper's number, with Kendall's tau
    between the two orders."""
    both = [
        (label, cells[column].mean, published[column])
        for _, _, label, cells, published in rows
        if cells[column].values
        and not math.isnan(cells[column].mean)  # a diverged run has no rank
        and published is not None
        and not math.isnan(published[column])
    ]
    if len(both) < 2:
        return f"Ranks by {metric}: fewer than two rows both run and published"
    ours = stats.rankdata([-m for _, m, _ in both], method="min").astype(int)
    paper = stats.rankdata([-p for _, _, p in both], method="min").astype(int)
    listing = ", ".join(
        f"{both[i][0]} {ours[i]} (paper {paper[i]})"
        for i in sorted(range(len(both)), key=lambda i: paper[i])
    )
    tau = stats.kendalltau(ours, paper)
    agreement = (
        f"Kendall tau {tau.statistic:+.2f} (p={tau.pvalue:.3f})"
        if not math.isnan(tau.statistic)
        else "Kendall tau n/a"
    )
    return f"Ranks by {metric} ({len(both)} rows): {listing}; {agreement}"


def training_length(run_dir: Path, monitor: str = "val/ndcg@10") -> tuple[int, int] | None:
    """(epoch of the best validation score, epochs run) from the run's CSV log: with
    early stopping, a method that trains longer can win for that reason alone."""
    log = run_dir / "csv" / "metrics.csv"
    if not log.exists():
        return None
    with log.open() as f:
        scores = [(float(r[monitor]), int(r["epoch"])) for r in csv.DictReader(f) if r.get(monitor)]
    if not scores:
        return None
    best_epoch = max(scores, key=lambda s: (s[0], -s[1]))[1]  # the first best, as the checkpoint
    return best_epoch + 1, max(epoch for _, epoch in scores) + 1  # counted from 1
