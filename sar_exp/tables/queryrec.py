"""QueryRec's Table 4 (CTR on rec impressions) and Table 5 (ablations) over several
seeds, beside the published numbers.

    python -m sar_exp.tables.queryrec [--dataset synthetic|kuaisar --data DIR]
                                      [--release small|large] [--seeds 0 1 2] [--quick]
                                      [--variants ...]

Every run uses QueryRec's protocol (protocol=queryrec: leave-one-out by request, records
whose user has both histories) with task=ctr, and is selected on validation AUC. Rows
whose model the framework has are run (DIN, DCN, PLE, SESRec adapted to CTR as its 5.3.3
says, QueryRec and Table 5's variants); IV4Rec+ shows the published number only until it
exists (issue 15). The published numbers are KuaiSAR-small's by default (`--release large`
shows KuaiSAR-large's); the embedded data are beside KuaiSAR-small's."""

from __future__ import annotations

import math
from pathlib import Path

from sar_exp.tables import grid
from sar_exp.tables.report import Cell, relative_improvement, render

METRICS = ("auc", "gauc", "logloss")
MONITOR = "val/auc"
FLAGS = "method.module."
RUNNABLE = {
    "DIN": ["method=base", "backbone=din"],
    "DCN": ["method=base", "backbone=dcn"],
    "PLE": ["method=base", "backbone=ple"],
    "SESRec": ["method=sesrec", "backbone=sasrec"],  # 5.3.3: trained on impressions with BCE
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
            f"+dataset.reader.release={args.release}", *out]  # fmt: skip


def cell_overrides(name: str, args) -> list[str]:
    flags = RUNNABLE[name] if name in RUNNABLE else ABLATIONS[name][1]
    return [*flags, *base_overrides(args)]


def collect(args) -> dict:
    cells = [
        grid.Run((name,), seed, [*cell_overrides(name, args), *grid.common_overrides(args),
                              *args.override],
                 Path(args.out) / args.dataset / name / f"seed{seed}", args.threads, MONITOR)
        for name in args.variants for seed in args.seeds
    ]  # fmt: skip
    return grid.collect(cells, args.seeds, args.jobs, args.report_only, headline="test/auc")


def cells_of(results, name: str) -> list[Cell]:
    found = results.get((name,), [])
    return [Cell([r[f"test/{m}"] for r in found if f"test/{m}" in r]) for m in METRICS]


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


def tables(results, args) -> str:
    show = args.show_paper
    table4 = PUBLISHED_TABLE4[args.release]
    main_rows, run_rows = [], []
    for name in ROWS:
        runnable = name in RUNNABLE and name in args.variants
        cells = cells_of(results, name) if runnable else [Cell([])] * len(METRICS)
        paper = _published(table4.get(name)) if show else None
        main_rows.append(("Table 4", "" if runnable else "paper", name, cells, paper))
        if runnable:
            run_rows.append((name, name))
    ablation_rows, run_ablations = [], []
    labels = {"DIN": "DIN", **{k: v[0] for k, v in ABLATIONS.items()}, "QueryRec": "QueryRec"}
    for name in ["DIN", *ABLATIONS, "QueryRec"]:
        if name in args.variants:
            label = labels[name]
            paper = _published(PUBLISHED_TABLE5.get(label)) if show else None
            ablation_rows.append(("Table 5", "", label, cells_of(results, name), paper))
            run_ablations.append((name, label))
    seeds = f"{len(args.seeds)} seed(s): {' '.join(map(str, args.seeds))}"
    note = "each cell: ours (mean±std over seeds) and, in brackets, "
    release = f"KuaiSAR-{args.release}"
    lines = [
        render(main_rows, list(METRICS), f"Table 4 (QueryRec): CTR on {args.dataset}, {seeds}",
               ("", "run"), note + f"the paper's {release} AUC; 'paper' rows are published only"),
        improvement_over_din(results, run_rows, table4),
        "",
        render(ablation_rows, list(METRICS), f"Table 5 (QueryRec): ablations on {args.dataset}, {seeds}",
               ("", ""), note + "the paper's KuaiSAR-small AUC"),
        improvement_over_din(results, run_ablations, PUBLISHED_TABLE5),
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    grid.variants_main(
        "queryrec", __doc__, ALL_VARIANTS, "DIN QueryRec din_nip", collect, tables, argv,
        extra_arguments=lambda parser: parser.add_argument(
            "--release", choices=["small", "large"], default="small",
            help="KuaiSAR release: its published numbers, and on --dataset kuaisar the data "
            "(small: the events up to 2023-05-31)",
        ),
    )  # fmt: skip


if __name__ == "__main__":
    main()
