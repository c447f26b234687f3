"""`python -m sar_exp.data.stats dataset=... protocol=... [key=value ...]`: what the
papers' dataset tables print (users, items, queries, rec and search actions) after the
protocol's filters, and the samples of each task and split, so a user can compare with,
for example, UniSAR's Table 2 before training anything.

`--interest-shift [--png FILE]` prints QueryRec's Sec. 5.2 analysis instead: the users'
search-vs-rec interest shift (JS divergence, Eq. 17-19) and the cross-domain
correlation ratios R1, R2 (Eq. 20-24), and saves Fig. 2's histogram (default
outputs/interest_shift_<dataset>.png).

Same overrides as `python -m sar_exp`; the view is the one a run would use (`backbone`
picks cf or sequential, `task=ctr` the ctr view)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import numpy as np
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sar_exp.errors import SarExpError


def summary(view, title: str) -> str:
    users = np.union1d(view["rec_click_user"], view["session_user"]).size
    items = np.union1d(view["rec_click_item"], view["search_click_item"]).size
    queries = np.unique(view["session_query"]).size
    lines = [
        title,
        f"  users            {users:>12,}",
        f"  items            {items:>12,}  (clicked in rec or search)",
        f"  queries          {queries:>12,}",
        f"  rec clicks       {view['rec_click_user'].size:>12,}",
        f"  search sessions  {view['session_user'].size:>12,}",
        f"  search clicks    {view['search_click_user'].size:>12,}",
        "  samples per task and split:",
        f"    {'task':<8}{'train':>12}{'val':>12}{'test':>12}",
    ]
    for task in view.task_names():
        sizes = [view.split(task, s)["user"].size for s in ("train", "val", "test")]
        lines.append(f"    {task:<8}" + "".join(f"{n:>12,}" for n in sizes))
    return "\n".join(lines)


# what composing a config and building its data can raise on bad input: one line each
INPUT_ERRORS = (SarExpError, HydraException, OmegaConfBaseException, ValueError)


def compose_datamodule(overrides: list[str]):
    """(config, datamodule not yet set up) of a run with these overrides, checked as a
    run's config is, for the analyses that read a view without training."""
    from sar_exp.config_checks import check_required_values, check_synthetic
    from sar_exp.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"paths.root_dir={Path.cwd()}", "paths.output_dir=.", *overrides]
        )
    check_required_values(cfg)
    check_synthetic(cfg)
    return cfg, hydra.utils.instantiate(cfg.data, _convert_="all")


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    shift = "--interest-shift" in overrides
    png = None
    if "--png" in overrides:
        at = overrides.index("--png")
        if at + 1 >= len(overrides):
            print("sar_exp.data.stats: error: --png needs a file name", file=sys.stderr)
            sys.exit(2)
        png = Path(overrides[at + 1])
        del overrides[at : at + 2]
    overrides = [o for o in overrides if o != "--interest-shift"]
    try:
        cfg, datamodule = compose_datamodule(overrides)
        if shift:
            from sar_exp.data.interest_shift import report

            tables = datamodule.canonical_tables()
            search = tables.search.join(
                tables.sessions.select("session", "user", "time"), on="session"
            )
            png = png or Path("outputs") / f"interest_shift_{cfg.dataset.source}.png"
            print(report(tables, tables.rec, search, png))
            return
        view = datamodule.load()
    except INPUT_ERRORS as err:
        print(f"sar_exp.data.stats: error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    protocol = OmegaConf.select(cfg, "dataset.protocol.name")
    print(summary(view, f"{cfg.dataset.source}, protocol={protocol}, {datamodule.view_name} view"))


if __name__ == "__main__":
    main()
