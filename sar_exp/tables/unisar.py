"""UniSAR's Table 3 (recommendation), Table 4 (search) and Table 5 (ablations) over
several seeds, beside the paper's numbers.

    python -m sar_exp.tables.unisar [--dataset synthetic|kuaisar|amazon --data DIR]
                                    [--seeds 0 1 2] [--quick] [--variants ...]

Every run uses UniSAR's protocol (protocol=unisar_kuaisar; unisar_amazon on Amazon)
with both tasks held out, so all rows train on the same data. Rows whose model the
framework has are run: DIN, GRU4Rec, SASRec, BERT4Rec and FMLP-Rec (method=base), NRHUB,
Query-SeqRec, SESRec, the personalized search models QEM, HEM, AEM, ZAM, TEM and CoPPS
(search only), JSR with DIN as its rec model (5.1.3), USER and UnifiedSSR (each two runs,
pre-trained on both tasks and fine-tuned for one), and UniSAR: every row of the paper.
The extra row "JSR (SASRec towers, ours)" (variant JSR_SASRec) is the two-tower JSR over
SASRec. UniSAR and JSR are selected on the mean of rec and
search validation NDCG@5 (UniSAR's code), the rec-only baselines on rec NDCG@5, the
search-only ones on search NDCG@5.
"""

from __future__ import annotations

import math
from pathlib import Path

from sar_exp.tables import grid
from sar_exp.tables.report import Cell, rank_agreement, render

REC_METRICS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10")
# the rows we run: name -> (overrides, the tasks it scores)
RUNNABLE = {
    "DIN": (["method=base", "backbone=din"], ("rec",)),
    "GRU4Rec": (["method=base", "backbone=gru4rec"], ("rec",)),
    "SASRec": (["method=base", "backbone=sasrec"], ("rec",)),
    "BERT4Rec": (["method=base", "backbone=bert4rec"], ("rec",)),
    "FMLP-Rec": (["method=base", "backbone=fmlprec"], ("rec",)),
    "NRHUB": (["method=nrhub", "backbone=sasrec"], ("rec",)),
    "Query-SeqRec": (["method=queryseqrec", "backbone=sasrec"], ("rec",)),
    "SESRec": (["method=sesrec", "backbone=sasrec"], ("rec",)),
    **{name: ([f"method={name.lower()}"], ("search",))
       for name in ("QEM", "HEM", "AEM", "ZAM", "TEM", "CoPPS")},
    "JSR": (["method=jsr", "backbone=din"], ("rec", "search")),  # DIN as its rec model (5.1.3)
    "JSR_SASRec": (["method=jsr", "backbone=sasrec"], ("rec", "search")),
    "USER": (["method=user"], ("rec", "search")),  # two fine-tuned halves (HALVES)
    "UnifiedSSR": (["method=unifiedssr"], ("rec", "search")),
    "UniSAR": (["method=unisar", "backbone=sasrec"], ("rec", "search")),
}  # fmt: skip
MONITORS = {("rec",): "val/ndcg@5", ("search",): "val/search/ndcg@5",
            ("rec", "search"): "val/mean_ndcg@5"}  # fmt: skip
# Table 5: variant (as typed on the command line) -> (the paper's label, UniSAR overrides)
ABLATIONS = {
    "wo_r2r": ("w/o r2r", ["method.module.use_r2r=false"]),
    "wo_r2s": ("w/o r2s", ["method.module.use_r2s=false"]),
    "wo_s2r": ("w/o s2r", ["method.module.use_s2r=false"]),
    "wo_s2s": ("w/o s2s", ["method.module.use_s2s=false"]),
    "wo_mask": ("w/o mask M", ["method.module.use_mask=false"]),
    "wo_align": ("w/o L_Align", ["method.module.use_align=false"]),
    "wo_rel": ("w/o L_Rel", ["method.module.use_rel=false"]),
    "wo_mca_r": ("w/o MCA_r", ["method.module.use_mca_r=false"]),
    "wo_mca_s": ("w/o MCA_s", ["method.module.use_mca_s=false"]),
    "wo_mmoe": ("w/o MMoE", ["method.module.use_mmoe=false"]),
}
JOINT = "wo_joint"  # "w/o Joint Training": two runs, see JOINT_HALVES
# two separately trained single-task models: rec metrics from one, search from the other
JOINT_HALVES = {
    "rec": ["method.module.train_tasks=[rec]", "method.scores=[rec]",
            "~method.companion_batch_sizes.search", "optimized_metric=val/ndcg@5"],
    "search": ["method.module.train_tasks=[search]", "method.scores=[search]",
               "~method.companion_batch_sizes.search", "data.main_task=search",
               "optimized_metric=val/search/ndcg@5"],
}  # fmt: skip
# USER and UnifiedSSR "derive two parameter sets for S&R tasks via pre-training and
# fine-tuning" (UniSAR Sec. 4.4, Discussion): each is two runs, pre-trained on both tasks
# and fine-tuned for one, that task's metrics taken from it
# (each reads both tasks' batches: pre-training needs them); under --quick the runs
# pre-train for quick_epochs - 1 epochs, so at least one epoch fine-tunes
FINETUNED_HALVES = {
    "rec": ["method.module.finetune_task=rec", "method.scores=[rec]",
            "optimized_metric=val/ndcg@5"],
    "search": ["method.module.finetune_task=search", "method.scores=[search]",
               "optimized_metric=val/search/ndcg@5"],
}  # fmt: skip
# rows made of one run per task: the run a task's metrics are read from
HALVES = {JOINT: JOINT_HALVES, "USER": FINETUNED_HALVES, "UnifiedSSR": FINETUNED_HALVES}
ALL_VARIANTS = [*RUNNABLE, *ABLATIONS, JOINT]
# rows of ours that the paper does not have, shown after the paper's row they vary
EXTRA_ROWS = {"JSR": ("JSR_SASRec", "JSR (SASRec towers, ours)")}
LABELS = {**{k: label for k, (label, _) in ABLATIONS.items()}, JOINT: "w/o Joint Training"}
NAN = math.nan

# Published numbers (HR@1, HR@5, HR@10, NDCG@5, NDCG@10). Table 3: recommendation.
PUBLISHED_REC = {
    "kuaisar": {
        "DIN": (0.1629, 0.4509, 0.6179, 0.3104, 0.3643), "GRU4Rec": (0.1097, 0.3764, 0.5788, 0.2435, 0.3087),
        "SASRec": (0.1249, 0.4065, 0.6007, 0.2671, 0.3298), "BERT4Rec": (0.1061, 0.3699, 0.5885, 0.2381, 0.3083),
        "FMLP-Rec": (0.1370, 0.4292, 0.6159, 0.2851, 0.3453), "NRHUB": (0.1243, 0.3862, 0.5610, 0.2572, 0.3136),
        "Query-SeqRec": (0.1166, 0.3920, 0.5890, 0.2552, 0.3186), "SESRec": (0.1827, 0.4956, 0.6643, 0.3432, 0.3978),
        "JSR": (0.1754, 0.4791, 0.6453, 0.3315, 0.3853), "USER": (0.1489, 0.4086, 0.5627, 0.2820, 0.3318),
        "UnifiedSSR": (0.1225, 0.3981, 0.5939, 0.2617, 0.3249), "UniSAR": (0.1990, 0.5169, 0.6792, 0.3632, 0.4158),
    },
    "amazon": {
        "DIN": (0.2159, 0.5170, 0.6525, 0.3726, 0.4165), "GRU4Rec": (0.1725, 0.4949, 0.6548, 0.3388, 0.3907),
        "SASRec": (0.2059, 0.5295, 0.6772, 0.3747, 0.4225), "BERT4Rec": (0.2481, 0.5311, 0.6658, 0.3954, 0.4390),
        "FMLP-Rec": (0.1991, 0.5356, 0.6879, 0.3739, 0.4232), "NRHUB": (0.1889, 0.4988, 0.6503, 0.3487, 0.3977),
        "Query-SeqRec": (0.2186, 0.5401, 0.6860, 0.3859, 0.4333), "SESRec": (0.2726, 0.5623, 0.6864, 0.4245, 0.4648),
        "JSR": (0.2346, 0.5467, 0.6779, 0.3970, 0.4396), "USER": (0.2361, 0.5441, 0.6854, 0.3964, 0.4422),
        "UnifiedSSR": (0.2013, 0.5196, 0.6707, 0.3662, 0.4151), "UniSAR": (0.3010, 0.5874, 0.7020, 0.4513, 0.4885),
    },
}  # fmt: skip
# Table 4: search.
PUBLISHED_SEARCH = {
    "kuaisar": {
        "QEM": (0.2944, 0.6020, 0.7182, 0.4575, 0.4953), "HEM": (0.3337, 0.6505, 0.7653, 0.5029, 0.5400),
        "AEM": (0.2703, 0.5956, 0.7182, 0.4415, 0.4812), "ZAM": (0.2815, 0.6117, 0.7344, 0.4560, 0.4959),
        "TEM": (0.3045, 0.6502, 0.7632, 0.4887, 0.5254), "CoPPS": (0.3117, 0.6616, 0.7707, 0.4977, 0.5331),
        "JSR": (0.4543, 0.7162, 0.7961, 0.5962, 0.6221), "USER": (0.4628, 0.7304, 0.8149, 0.6069, 0.6342),
        "UnifiedSSR": (0.4389, 0.7377, 0.8320, 0.5991, 0.6297), "UniSAR": (0.5282, 0.7476, 0.8369, 0.6417, 0.6708),
    },
    "amazon": {
        "QEM": (0.2772, 0.7100, 0.8186, 0.5066, 0.5422), "HEM": (0.2497, 0.6778, 0.8267, 0.4736, 0.5221),
        "AEM": (0.2916, 0.7095, 0.8443, 0.5114, 0.5554), "ZAM": (0.2954, 0.7109, 0.8468, 0.5147, 0.5590),
        "TEM": (0.4090, 0.8185, 0.9051, 0.6303, 0.6587), "CoPPS": (0.4052, 0.8169, 0.9051, 0.6281, 0.6570),
        "JSR": (0.3176, 0.7038, 0.8225, 0.5173, 0.5563), "USER": (0.4123, 0.7631, 0.8697, 0.6000, 0.6348),
        "UnifiedSSR": (0.3663, 0.7744, 0.8812, 0.5847, 0.6196), "UniSAR": (0.5343, 0.8190, 0.8977, 0.6875, 0.7132),
    },
}  # fmt: skip
# Table 5 (KuaiSAR only): rec NDCG@5, NDCG@10, search NDCG@5, NDCG@10.
PUBLISHED_ABLATION = {
    "UniSAR": (0.3632, 0.4158, 0.6417, 0.6708), "w/o r2r": (0.3258, 0.3798, 0.6007, 0.6319),
    "w/o r2s": (0.3606, 0.4136, 0.6376, 0.6690), "w/o s2r": (0.3512, 0.4036, 0.6292, 0.6584),
    "w/o s2s": (0.3399, 0.3941, 0.6404, 0.6706), "w/o mask M": (0.3503, 0.4024, 0.6217, 0.6507),
    "w/o L_Align": (0.3458, 0.3956, 0.6069, 0.6381), "w/o L_Rel": (0.3472, 0.3988, 0.6177, 0.6465),
    "w/o MCA_r": (0.3384, 0.3924, 0.6094, 0.6397), "w/o MCA_s": (0.3561, 0.4091, 0.6257, 0.6545),
    "w/o MMoE": (0.3132, 0.3692, 0.6143, 0.6438), "w/o Joint Training": (0.3569, 0.4105, 0.5850, 0.6167),
}  # fmt: skip


def base_overrides(args, unisar: bool) -> list[str]:
    """What every row gets: UniSAR's protocol with both tasks held out, so all rows train
    on the same data; on the real data UniSAR's rows take the official settings (its
    experiment file), the baselines the dataset, path and the paper's batch size."""
    protocol = "unisar_amazon" if args.dataset == "amazon" else "unisar_kuaisar"
    out = []
    if args.dataset != "synthetic":
        if unisar:
            out += [f"experiment=unisar_{args.dataset}"]
        out += [f"dataset={args.dataset}", f"dataset.path={args.data}", "data.batch_size=1024"]
    out += [f"protocol={protocol}", "dataset.protocol.evaluated_tasks=[rec,search]", "logger=csv",
            "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
            "callbacks.early_stopping.patience=5", f"trainer.max_epochs={args.max_epochs}"]  # fmt: skip
    return out


def cell_runs(name: str, args) -> list[tuple[str, list[str], str]]:
    """(part, overrides, monitor) of each run a row needs."""
    if name in RUNNABLE:
        overrides, tasks = RUNNABLE[name]
        common = base_overrides(args, unisar=name == "UniSAR")
        if name in HALVES:
            halves = HALVES[name]
            if halves is FINETUNED_HALVES and getattr(args, "quick", False):
                pretrain = f"method.module.pretrain_epochs={max(args.quick_epochs - 1, 0)}"
                # optimized_metric stays last: the monitor is read from it
                halves = {
                    task: [*extra[:-1], pretrain, extra[-1]] for task, extra in halves.items()
                }
            return [(task, [*overrides, *common, *extra], extra[-1].split("=", 1)[1])
                    for task, extra in halves.items()]  # fmt: skip
        monitor = MONITORS[tasks]
        return [("", [*overrides, *common, f"optimized_metric={monitor}"], monitor)]
    unisar = [*RUNNABLE["UniSAR"][0], *base_overrides(args, unisar=True)]
    if name == JOINT:
        return [(task, [*unisar, *extra], extra[-1].split("=", 1)[1])
                for task, extra in JOINT_HALVES.items()]  # fmt: skip
    return [
        ("", [*unisar, *ABLATIONS[name][1], "optimized_metric=val/mean_ndcg@5"], "val/mean_ndcg@5")
    ]


def collect(args) -> dict:
    cells = []
    for name in args.variants:
        for part, overrides, monitor in cell_runs(name, args):
            folder = name + (f"_{part}" if part else "")
            for seed in args.seeds:
                cells.append(grid.Run(
                    (name, part), seed, [*overrides, *grid.common_overrides(args), *args.override],
                    Path(args.out) / args.dataset / folder / f"seed{seed}", args.threads, monitor,
                ))  # fmt: skip
    return grid.collect(cells, args.seeds, args.jobs, args.report_only, headline="test/ndcg@5")


def metric_cells(results, name: str, task: str, metrics) -> list[Cell]:
    """Cells of one row for one task ("" prefix rec, "search/" search)."""
    part = task if name in HALVES else ""
    runs = results.get((name, part), [])
    prefix = "test/" if task == "rec" else "test/search/"
    return [Cell([r[prefix + m] for r in runs if prefix + m in r]) for m in metrics]


SEQREC = ("DIN", "GRU4Rec", "SASRec", "BERT4Rec", "FMLP-Rec")
PERSEARCH = ("QEM", "HEM", "AEM", "ZAM", "TEM", "CoPPS")


def main_rows(results, args, task: str, published: dict) -> list[tuple]:
    """Table 3 (task rec) or 4 (search) in the paper's order, each row run where the
    framework has its model (else the published number only), our extra rows after the
    paper's row they vary."""
    show = args.show_paper
    rows = []
    for name, paper in published.items():
        family = "SeqRec" if name in SEQREC else "PerSearch" if name in PERSEARCH else "Joint"
        entries = [(name, name, paper if show else None)]
        if name in EXTRA_ROWS and EXTRA_ROWS[name][0] in args.variants:
            entries.append((EXTRA_ROWS[name][0], EXTRA_ROWS[name][1], None))
        for variant, label, number in entries:
            runnable = variant in args.variants and task in RUNNABLE.get(variant, ((), ()))[1]
            cells = (
                metric_cells(results, variant, task, REC_METRICS) if runnable else [Cell([])] * 5
            )
            rows.append((family, "" if runnable else "paper", label, cells, number))
    return rows


def tables(results, args) -> str:
    dataset = "amazon" if args.dataset == "amazon" else "kuaisar"
    show = args.show_paper
    rec_rows = main_rows(results, args, "rec", PUBLISHED_REC[dataset])
    search_rows = main_rows(results, args, "search", PUBLISHED_SEARCH[dataset])
    ablation_rows = []
    for name in ("UniSAR", *ABLATIONS, JOINT):
        if name not in args.variants:
            continue
        cells = metric_cells(results, name, "rec", ("ndcg@5", "ndcg@10")) + metric_cells(
            results, name, "search", ("ndcg@5", "ndcg@10")
        )
        label = LABELS.get(name, name)
        published = PUBLISHED_ABLATION.get(label) if show and dataset == "kuaisar" else None
        ablation_rows.append(("Table 5", "", label, cells, published))
    seeds = f"{len(args.seeds)} seed(s): {' '.join(map(str, args.seeds))}"
    footnote = f"each cell: ours (mean±std over seeds) and, in brackets, the paper's {dataset} value; 'paper' rows are published only"
    lines = [
        render(rec_rows, list(REC_METRICS), f"Table 3 (UniSAR): recommendation on {args.dataset}, {seeds}",
               ("", "run"), footnote),
        improvement_line(results, "rec", baselines_of("rec")),
        rank_agreement(rec_rows, REC_METRICS.index("ndcg@5"), "NDCG@5"),
        "",
        render(search_rows, list(REC_METRICS), f"Table 4 (UniSAR): search on {args.dataset}, {seeds}",
               ("", "run"), footnote),
        improvement_line(results, "search", baselines_of("search")),
        rank_agreement(search_rows, REC_METRICS.index("ndcg@5"), "NDCG@5"),
        "",
        render(ablation_rows, ["rec ndcg@5", "rec ndcg@10", "src ndcg@5", "src ndcg@10"],
               f"Table 5 (UniSAR): ablations on {args.dataset} (published: KuaiSAR)", ("", ""),
               footnote),
    ]  # fmt: skip
    return "\n".join(lines)


def baselines_of(task: str) -> list[str]:
    return [name for name, (_, tasks) in RUNNABLE.items() if task in tasks and name != "UniSAR"]


def improvement_line(results, task: str, baselines: list[str]) -> str:
    parts = [
        grid.improvement(
            metric_cells(results, "UniSAR", task, [m])[0],
            {b: metric_cells(results, b, task, [m])[0] for b in baselines}, m,
        )
        for m in REC_METRICS
    ]  # fmt: skip
    return (
        f"Improv. of UniSAR over the best baseline run ({task}; Welch t-test, * p <= 0.05): "
        + "; ".join(parts)
    )


def main(argv=None) -> None:
    grid.variants_main(
        "unisar", __doc__, ALL_VARIANTS, "SASRec JSR UniSAR wo_mmoe wo_joint", collect, tables, argv
    )


if __name__ == "__main__":
    main()
