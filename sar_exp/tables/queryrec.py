"""QueryRec's Table 4 (CTR on rec impressions) and Table 5 (ablations) over several
seeds, beside the published numbers.

    python -m sar_exp.tables.queryrec [--dataset synthetic|kuaisar --data DIR]
                                      [--release small|full] [--seeds 0 1 2] [--quick]
                                      [--variants ...]

Every run uses QueryRec's protocol (protocol=queryrec: leave-one-out by request, records
whose user has both histories) with task=ctr, and is selected on validation AUC. Rows
whose model the framework has are run: all of them (DIN, DCN, PLE, SESRec adapted to CTR
as its 5.3.3 says, IV4Rec+ over DIN, QueryRec and Table 5's variants). Table 4 shows both published columns, KuaiSAR-small and
KuaiSAR-large, as the paper lays it out (AUC and Imp % over DIN); Table 5 KuaiSAR-small's.
On KuaiSAR, `--release small` (the default, the paper's ablation data) reads the
release that ends on 2023-05-31, cutting a full one there; `--release full` all of it."""

from __future__ import annotations

import math

from sar_exp.tables import grid
from sar_exp.tables.report import Cell, rank_agreement, relative_improvement, render

METRICS = ("auc", "gauc", "logloss")
MONITOR = "val/auc"
FLAGS = "method.module."
RUNNABLE = {
    "DIN": ["method=base", "backbone=din"],
    "DCN": ["method=base", "backbone=dcn"],
    "PLE": ["method=base", "backbone=ple"],
    "SESRec": ["method=sesrec", "backbone=sasrec"],  # 5.3.3: trained on impressions with BCE
    "IV4Rec+": ["method=iv4rec", "backbone=din"],  # 5.3.3: over DIN, learned word embeddings
    "QueryRec": ["method=queryrec", "backbone=din"],
}
# Table 5: variant -> (label, overrides); QueryRec is its last row
ABLATIONS = {
    "din_query": ("DIN+query", ["method=base", "backbone=din", "backbone.encoder.use_query_history=true"]),
    "din_nip": ("DIN+NIP", [*RUNNABLE["QueryRec"], f"{FLAGS}use_contrastive=false", f"{FLAGS}use_diffusion=false"]),
    "din_con": ("DIN+con", [*RUNNABLE["QueryRec"], f"{FLAGS}use_nip=false", f"{FLAGS}use_diffusion=false"]),
    "din_con_diffusion": ("DIN+con w/diffusion", [*RUNNABLE["QueryRec"], f"{FLAGS}use_nip=false"]),
}  # fmt: skip
ALL_VARIANTS = [*RUNNABLE, *ABLATIONS]
NAN = math.nan

# Table 4: AUC on KuaiSAR-small and KuaiSAR-large (the paper's Imp % is over DIN)
PUBLISHED_TABLE4 = {
    "small": {"DIN": 0.6793, "DCN": 0.6729, "PLE": 0.6825, "SESRec": 0.6843, "IV4Rec+": 0.6640,
              "QueryRec": 0.6972},
    "large": {"DIN": 0.6892, "DCN": 0.6749, "PLE": 0.6879, "SESRec": 0.6859, "IV4Rec+": 0.6580,
              "QueryRec": 0.6996},
}  # fmt: skip
ROWS = list(PUBLISHED_TABLE4["small"])
# Table 5: KuaiSAR-small only
PUBLISHED_TABLE5 = {
    "DIN": 0.6793, "DIN+query": 0.6792, "DIN+NIP": 0.6894, "DIN+con": 0.6819,
    "DIN+con w/diffusion": 0.6890, "QueryRec": 0.6972,
}  # fmt: skip


def base_overrides(args) -> list[str]:
    out = ["task=ctr", "protocol=queryrec", "logger=csv", "trainer.enable_progress_bar=false",
           "~callbacks.progress_bar", f"optimized_metric={MONITOR}",
           "callbacks.early_stopping.patience=5", f"trainer.max_epochs={args.max_epochs}"]  # fmt: skip
    if args.dataset == "synthetic":
        return out
    return [f"dataset={args.dataset}", f"dataset.path={args.data}",
            f"dataset.release={args.release}", *out]  # fmt: skip


def cell_overrides(name: str, args) -> list[str]:
    flags = RUNNABLE[name] if name in RUNNABLE else ABLATIONS[name][1]
    return [*flags, *base_overrides(args)]


def collect(args) -> dict:
    return grid.collect_rows(args, cell_overrides, MONITOR, headline="test/auc")


def cells_of(results, name: str) -> list[Cell]:
    return grid.row_cells(results, name, METRICS)


def _published(auc: float | None) -> tuple | None:
    return None if auc is None else (auc, NAN, NAN)


def improvement_over_din(results, rows: list[tuple[str, str]], published: dict) -> str:
    """Each run row's AUC change over DIN (ours) beside the paper's Imp %."""
    din = cells_of(results, "DIN")[0]
    parts = []
    for name, label in rows:
        ours = cells_of(results, name)[0]
        if name == "DIN" or not ours.values or not din.values:
            continue
        paper = published.get(label)
        paper_text = (f" (paper {relative_improvement(paper, published['DIN']):+.2f}%)"
                      if paper is not None else "")  # fmt: skip
        parts.append(f"{label} {relative_improvement(ours.mean, din.mean):+.2f}%{paper_text}")
    return "AUC change over DIN: " + ("; ".join(parts) if parts else "n/a")


def table4(results, args) -> str:
    """The paper's layout: per model, AUC and Imp % over DIN, ours and both published
    columns, then our GAUC and log loss."""
    din = cells_of(results, "DIN")[0]
    small, large = PUBLISHED_TABLE4["small"], PUBLISHED_TABLE4["large"]
    seeds = f"{len(args.seeds)} seed(s): {' '.join(map(str, args.seeds))}"
    head = (f"{'':<6}{'model':<10}{'AUC (ours)':>16}{'Imp %':>8}{'GAUC (ours)':>16}{'LOGLOSS':>16}"
            f"{'small AUC':>11}{'Imp %':>8}{'large AUC':>11}{'Imp %':>8}")  # fmt: skip
    lines = [f"Table 4 (QueryRec): CTR on {args.dataset}, {seeds}", head, "-" * len(head)]
    # AUC ranked against the column of the release run: KuaiSAR-large for --release full
    full = args.dataset == "kuaisar" and args.release == "full"
    column, column_name = (large, "KuaiSAR-large") if full else (small, "KuaiSAR-small")
    ranked = []  # (group, backbone, label, cells, published)
    for name in ROWS:
        run = name in RUNNABLE and name in args.variants
        auc, gauc, logloss = cells_of(results, name) if run else [Cell([])] * 3
        imp = (f"{relative_improvement(auc.mean, din.mean):+.2f}"
               if auc.values and din.values else "-")  # fmt: skip
        paper = ""
        for numbers in (small, large):
            value = numbers.get(name) if args.show_paper else None
            paper += (f"{value:>11.4f}{relative_improvement(value, numbers['DIN']):>+8.2f}"
                      if value is not None else f"{'-':>11}{'-':>8}")  # fmt: skip
        lines.append(f"{'' if run else 'paper':<6}{name:<10}{auc.text():>16}{imp:>8}"
                     f"{gauc.text():>16}{logloss.text():>16}{paper}")  # fmt: skip
        published = column.get(name) if args.show_paper else None
        ranked.append(("", "", name, [auc], None if published is None else [published]))
    lines.append("ours: mean±std over seeds; 'paper' rows are published only; small/large: "
                 "the paper's KuaiSAR-small and -large columns")  # fmt: skip
    lines.append(rank_agreement(ranked, 0, f"AUC against the {column_name} column"))
    return "\n".join(lines)


def tables(results, args) -> str:
    show = args.show_paper
    ablation_rows, run_ablations = [], []
    labels = {"DIN": "DIN", **{k: v[0] for k, v in ABLATIONS.items()}, "QueryRec": "QueryRec"}
    for name in ["DIN", *ABLATIONS, "QueryRec"]:
        if name in args.variants:
            label = labels[name]
            paper = _published(PUBLISHED_TABLE5.get(label)) if show else None
            ablation_rows.append(("Table 5", "", label, cells_of(results, name), paper))
            run_ablations.append((name, label))
    seeds = f"{len(args.seeds)} seed(s): {' '.join(map(str, args.seeds))}"
    lines = [
        table4(results, args),
        significance_line(results),
        "",
        render(ablation_rows, list(METRICS), f"Table 5 (QueryRec): ablations on {args.dataset}, {seeds}",
               ("", ""), "each cell: ours (mean±std over seeds) and, in brackets, the paper's KuaiSAR-small AUC"),
        improvement_over_din(results, run_ablations, PUBLISHED_TABLE5),
    ]  # fmt: skip
    return "\n".join(lines)


def significance_line(results) -> str:
    parts = grid.improvements(
        lambda name: cells_of(results, name), "QueryRec", RUNNABLE, METRICS[:2]
    )
    return "QueryRec over the best baseline run (Welch t-test, * p <= 0.05): " + parts


def main(argv=None) -> None:
    grid.variants_main(
        "queryrec", __doc__, ALL_VARIANTS, "DIN QueryRec din_nip", collect, tables, argv,
        extra_arguments=lambda parser: parser.add_argument(
            "--release", choices=["small", "full"], default="small",
            help="on --dataset kuaisar: KuaiSAR-small (the events up to 2023-05-31, the "
            "paper's ablation data; default) or the full release",
        ),
    )  # fmt: skip


if __name__ == "__main__":
    main()
