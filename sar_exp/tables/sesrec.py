"""SESRec's Table 2 (main results), Table 3 (ablations) and Table 4 (split thresholds)
over several seeds, beside the published numbers.

    python -m sar_exp.tables.sesrec [--dataset synthetic|kuaisar|amazon --data DIR]
                                    [--seeds 0 1 2] [--quick] [--variants ...]

Every run uses SESRec's protocol (protocol=sesrec, caps 150/25; sesrec_amazon, 15/15, on
Amazon) and is selected on validation MRR (SESRec's code). Rows whose model the
framework has are run: STAMP, DIN, GRU4Rec, SASRec, DIEN and FMLP-Rec (method=base),
NRHUB, IV4Rec+ over DIN, Query-SeqRec, JSR (two towers over SASRec) and SESRec; the others show the published
numbers only.

Which published numbers: the paper's own are on a private Kuaishou log and on Amazon
Kindle. Beside an Amazon run, Table 2 shows its Amazon column; beside a KuaiSAR (or the
embedded) run, the KuaiSAR numbers UniSAR's paper reports (its Table 3, under UniSAR's
protocol, without MRR) for the rows it has. Tables 3 and 4 exist only on the private
Kuaishou data, and are shown as such."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from sar_exp.tables import grid
from sar_exp.tables.report import Cell, rank_agreement, render
from sar_exp.train import CONFIG_DIR

METRICS = ("ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "mrr")  # Table 2's order
MONITOR = "val/mrr"
# the rows we run: name -> overrides
RUNNABLE = {
    "STAMP": ["method=base", "backbone=stamp"],
    "DIN": ["method=base", "backbone=din"],
    "GRU4Rec": ["method=base", "backbone=gru4rec"],
    "SASRec": ["method=base", "backbone=sasrec"],
    "DIEN": ["method=base", "backbone=dien"],
    "FMLP-Rec": ["method=base", "backbone=fmlprec"],
    "NRHUB": ["method=nrhub", "backbone=sasrec"],
    # 5.1.3: "we apply this framework over DIN"; the paper ran IV4Rec (WWW22), ours is IV4Rec+(I)
    "IV4REC": ["method=iv4rec", "backbone=din"],
    "Query-SeqRec": ["method=queryseqrec", "backbone=sasrec"],
    "JSR": ["method=jsr", "backbone=sasrec"],
    "SESRec": ["method=sesrec", "backbone=sasrec"],
}
# Table 3 (cumulative: base, +L_ali, +L_con; +MIE is SESRec) and Table 4 (gamma; the mean,
# 1/T, is SESRec): variant -> (label, SESRec overrides)
FLAGS = "method.module."
ABLATIONS = {
    # not the paper's: base without the search history, which tells what base's gain over
    # SASRec owes to the searches (against base) and to its attention and MLP (against SASRec)
    "base_no_search": ("Base, no search (ours)", [f"{FLAGS}use_align=false", f"{FLAGS}use_contrast=false",
                                                  f"{FLAGS}use_mie=false", f"{FLAGS}use_search=false"]),
    "base": ("Base", [f"{FLAGS}use_align=false", f"{FLAGS}use_contrast=false", f"{FLAGS}use_mie=false"]),
    "plus_ali": ("+ L_ali", [f"{FLAGS}use_contrast=false", f"{FLAGS}use_mie=false"]),
    "plus_con": ("+ L_con", [f"{FLAGS}use_mie=false"]),
}  # fmt: skip
THRESHOLDS = {
    "gamma_16": ("1/16", [f"{FLAGS}threshold=0.0625"]),
    "gamma_8": ("1/8", [f"{FLAGS}threshold=0.125"]),
    "gamma_median": ("Median", [f"{FLAGS}threshold=median"]),
}
ALL_VARIANTS = [*RUNNABLE, *ABLATIONS, *THRESHOLDS]
NAN = math.nan

# Published (NDCG@5, NDCG@10, HR@1, HR@5, HR@10, MRR). Table 2, Amazon Kindle column.
PUBLISHED_AMAZON = {
    "STAMP": (0.2612, 0.3103, 0.1336, 0.3833, 0.5352, 0.2608),
    "DIN": (0.2999, 0.3495, 0.1591, 0.4340, 0.5871, 0.2942),
    "GRU4Rec": (0.3099, 0.3662, 0.1479, 0.4648, 0.6388, 0.2993),
    "SASRec": (0.3822, 0.4312, 0.2187, 0.5324, 0.6838, 0.3675),
    "DIEN": (0.3336, 0.3803, 0.1871, 0.4706, 0.6150, 0.3246),
    "FMLP-Rec": (0.4073, 0.4550, 0.2349, 0.5651, 0.7121, 0.3883),
    "NRHUB": (0.2744, 0.3265, 0.1329, 0.4099, 0.5708, 0.2704),
    "JSR": (0.3221, 0.3722, 0.2057, 0.4386, 0.5937, 0.3224),
    "IV4REC": (0.3473, 0.3960, 0.1853, 0.4985, 0.6258, 0.3331),
    "Query-SeqRec": (0.3692, 0.4142, 0.2187, 0.5083, 0.6470, 0.3572),
    "SRJGraph": (0.3670, 0.4043, 0.2760, 0.4898, 0.6242, 0.3708),
    "SESRec": (0.4224, 0.4663, 0.2580, 0.5723, 0.7074, 0.4046),
}
# KuaiSAR: UniSAR's Table 3 (HR@1, HR@5, HR@10, NDCG@5, NDCG@10 there; no MRR), for the
# rows it has, under UniSAR's protocol
_UNISAR_KUAISAR = {  # (HR@1, HR@5, HR@10, NDCG@5, NDCG@10)
    "DIN": (0.1629, 0.4509, 0.6179, 0.3104, 0.3643), "GRU4Rec": (0.1097, 0.3764, 0.5788, 0.2435, 0.3087),
    "SASRec": (0.1249, 0.4065, 0.6007, 0.2671, 0.3298), "FMLP-Rec": (0.1370, 0.4292, 0.6159, 0.2851, 0.3453),
    "NRHUB": (0.1243, 0.3862, 0.5610, 0.2572, 0.3136), "JSR": (0.1754, 0.4791, 0.6453, 0.3315, 0.3853),
    "Query-SeqRec": (0.1166, 0.3920, 0.5890, 0.2552, 0.3186), "SESRec": (0.1827, 0.4956, 0.6643, 0.3432, 0.3978),
}  # fmt: skip
PUBLISHED_KUAISAR = {
    name: (n5, n10, h1, h5, h10, NAN) for name, (h1, h5, h10, n5, n10) in _UNISAR_KUAISAR.items()
}
ROWS = list(PUBLISHED_AMAZON)  # Table 2's rows, in its order
SEQUENTIAL = ("STAMP", "DIN", "GRU4Rec", "SASRec", "DIEN", "FMLP-Rec")
# Tables 3 and 4: the private Kuaishou data only
PUBLISHED_ABLATION = {
    "Base": (0.3394, 0.3770, 0.2027, 0.4618, 0.6094, 0.3294),
    "+ L_ali": (0.3464, 0.3982, 0.2106, 0.4762, 0.6308, 0.3421),
    "+ L_con": (0.3507, 0.4021, 0.2139, 0.4812, 0.6406, 0.3459),
    "+ MIE": (0.3541, 0.4054, 0.2173, 0.4848, 0.6436, 0.3490),
}
PUBLISHED_THRESHOLD = {
    "1/16": (0.3429, 0.3927, 0.2125, 0.4681, 0.6224, 0.3429),
    "1/8": (0.3449, 0.3940, 0.2148, 0.4691, 0.6211, 0.3415),
    "Median": (0.3510, 0.4035, 0.2135, 0.4828, 0.6453, 0.3462),
    "Mean": (0.3541, 0.4054, 0.2173, 0.4848, 0.6436, 0.3490),
}


def _protocol(args) -> str:
    return "sesrec_amazon" if args.dataset == "amazon" else "sesrec"


def base_overrides(args, sesrec: bool) -> list[str]:
    """What every row gets: SESRec's protocol and selection on validation MRR; on the real
    data SESRec's rows take the official settings (its experiment file), the baselines
    the dataset, path, the paper's batch size and the preset's item embeddings."""
    out = [f"protocol={_protocol(args)}", "logger=csv", "trainer.enable_progress_bar=false",
           "~callbacks.progress_bar", f"optimized_metric={MONITOR}"]  # fmt: skip
    if args.dataset == "synthetic":
        return [
            *out,
            "callbacks.early_stopping.patience=5",
            f"trainer.max_epochs={args.max_epochs}",
        ]
    if sesrec:  # the official settings, its schedule and stopping included
        return [f"experiment=sesrec_{args.dataset}", f"dataset.path={args.data}", *out]
    # 5.1.4: "the same setting of item embeddings on all models" (the preset's)
    same_items = (["dataset.item_attributes=[first_level_category_id,second_level_category_id]",
                   "method.module.embedding_dim=16"] if args.dataset == "kuaisar"
                  else ["method.module.embedding_dim=32"])  # fmt: skip
    return [f"dataset={args.dataset}", f"dataset.path={args.data}", "data.batch_size=256",
            *same_items, *out, "callbacks.early_stopping.patience=5",
            f"trainer.max_epochs={args.max_epochs}"]  # fmt: skip


def cell_overrides(name: str, args) -> list[str]:
    if name == "Query-SeqRec":  # its merged sequence holds both histories, as the others read
        protocol = OmegaConf.load(Path(CONFIG_DIR) / "protocol" / f"{_protocol(args)}.yaml")
        merged = protocol.max_rec_history + protocol.max_search_history
        return [*RUNNABLE[name], *base_overrides(args, sesrec=False),
                f"dataset.protocol.max_interleaved_history={merged}"]  # fmt: skip
    if name in RUNNABLE:
        return [*RUNNABLE[name], *base_overrides(args, sesrec=name == "SESRec")]
    flags = {**ABLATIONS, **THRESHOLDS}[name][1]
    return [*RUNNABLE["SESRec"], *base_overrides(args, sesrec=True), *flags]


def collect(args) -> dict:
    return grid.collect_rows(args, cell_overrides, MONITOR, headline="test/mrr")


def cells_of(results, name: str) -> list[Cell]:
    return grid.row_cells(results, name, METRICS)


def tables(results, args) -> str:
    amazon = args.dataset == "amazon"
    show = args.show_paper
    published = PUBLISHED_AMAZON if amazon else PUBLISHED_KUAISAR
    source = "the paper's Amazon Kindle column" if amazon else (
        "KuaiSAR as UniSAR's paper reports it (its Table 3 and protocol; no MRR there)"
    )  # fmt: skip
    main_rows = []
    for name in ROWS:
        runnable = name in RUNNABLE and name in args.variants
        family = "Sequential" if name in SEQUENTIAL else "Search"
        cells = cells_of(results, name) if runnable else [Cell([])] * len(METRICS)
        paper = published.get(name) if show else None
        main_rows.append((family, "" if runnable else "paper", name, cells, paper))
    side_rows = {"Table 3": [], "Table 4": []}
    for table, variants, labels in (
        ("Table 3", [*ABLATIONS, "SESRec"], {**{k: v[0] for k, v in ABLATIONS.items()}, "SESRec": "+ MIE"}),
        ("Table 4", [*THRESHOLDS, "SESRec"], {**{k: v[0] for k, v in THRESHOLDS.items()}, "SESRec": "Mean"}),
    ):  # fmt: skip
        numbers = PUBLISHED_ABLATION if table == "Table 3" else PUBLISHED_THRESHOLD
        for name in variants:
            if name in args.variants:
                label = labels[name]
                paper = numbers.get(label) if show else None
                side_rows[table].append((table, "", label, cells_of(results, name), paper))
    seeds = f"{len(args.seeds)} seed(s): {' '.join(map(str, args.seeds))}"
    note = "each cell: ours (mean±std over seeds) and, in brackets, "
    lines = [
        render(main_rows, list(METRICS), f"Table 2 (SESRec): main results on {args.dataset}, {seeds}",
               ("", "run"), note + f"{source}; 'paper' rows are published only"),
        improvement_line(results),
        rank_agreement(main_rows, METRICS.index("ndcg@5"),
                       "NDCG@5" if amazon else "NDCG@5 (paper: UniSAR's Table 3)"),
        "",
        render(side_rows["Table 3"], list(METRICS),
               f"Table 3 (SESRec): ablations on {args.dataset}, {seeds}", ("", ""),
               note + "the paper's value on its private Kuaishou data"),
        "",
        render(side_rows["Table 4"], list(METRICS),
               f"Table 4 (SESRec): split thresholds on {args.dataset}, {seeds}", ("", ""),
               note + "the paper's value on its private Kuaishou data"),
    ]  # fmt: skip
    return "\n".join(lines)


def improvement_line(results) -> str:
    parts = grid.improvements(lambda name: cells_of(results, name), "SESRec", RUNNABLE, METRICS)
    return "Improv. of SESRec over the best baseline run (Welch t-test, * p <= 0.05): " + parts


def main(argv=None) -> None:
    grid.variants_main(
        "sesrec",
        __doc__,
        ALL_VARIANTS,
        "SASRec SESRec base plus_ali gamma_median",
        collect,
        tables,
        argv,
    )


if __name__ == "__main__":
    main()
