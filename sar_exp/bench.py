"""`make bench`: preprocessing and training-throughput figures on a large synthetic set.

    python -m sar_exp.bench [--preset kuaisar_scale] [--steps 40] [--backbones ...]
                            [--methods base clardrec ...]

Prints raw-to-views wall time and peak memory (measured in a child process, from a
cold cache), then for each method and backbone the training throughput, the share of
step time spent waiting for the next batch, and what one epoch over the whole training
set would take at that speed. Targets (issue #2): preprocessing under
2 minutes and 8 GB on 2 cores; data waiting under 10% of step time.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import queue
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from sar_exp.config_checks import method_supports
from sar_exp.errors import SarExpError

VIEWS = ("sequential", "cf", "ctr")


def _preprocess(folder: str, cache: str, user_attrs, item_attrs, protocol: dict) -> tuple:
    """Raw files -> canonical tables -> every view, as training builds them (same cache
    keys, so the views timed here are the ones a run on this folder would use)."""
    from sar_exp.data.canonical import load_canonical
    from sar_exp.data.views import load_view, protocol_from_config

    timings = {}
    start = time.perf_counter()
    tables = load_canonical(folder, cache, user_attrs, item_attrs)
    timings["canonical tables"] = time.perf_counter() - start
    for name in VIEWS:
        t = time.perf_counter()
        load_view(tables, name, protocol_from_config(protocol), Path(cache))
        timings[f"{name} view"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    rows = {
        "rec rows": tables.rec.height,
        "search rows": tables.search.height,
        "users": tables.meta["num_users"],
    }
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return timings, rows, peak_gb


def _child_main(target, args, queue) -> None:
    """Runs in the child: report the result, or the error, through the queue."""
    try:
        queue.put(("ok", target(*args)))
    except BaseException as err:  # the parent prints it; the child only reports
        queue.put(("error", f"{type(err).__name__}: {err}"))


def run_in_child(target, args: tuple, what: str, poll_seconds: float = 1.0):
    """`target(*args)` in a fresh (spawned) process, for a cold start and its own peak
    memory. A child that fails or dies (killed, out of memory) is reported in one line
    instead of leaving the parent waiting forever."""
    context = mp.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_child_main, args=(target, args, results))
    child.start()
    while True:
        try:
            status, payload = results.get(timeout=poll_seconds)
            break
        except queue.Empty:
            if not child.is_alive():
                try:  # it may have reported just before it exited
                    status, payload = results.get(timeout=poll_seconds)
                    break
                except queue.Empty:
                    raise SarExpError(
                        f"{what} died before reporting (exit code {child.exitcode})"
                    ) from None
    child.join()
    if status == "error":
        raise SarExpError(f"{what} failed: {payload}")
    return payload


class DataWaitTimer:
    """Lightning callback: time between the end of a step and the start of the next
    one is spent fetching and assembling the batch."""

    def __new__(cls, warmup: int):
        import lightning.pytorch as pl

        class _Timer(pl.Callback):
            def __init__(self):
                self.warmup, self.wait, self.step, self.samples = warmup, 0.0, 0.0, 0
                self.last_end = None
                self.seen = self.timed = 0  # steps run, and timed (batch_idx restarts each epoch)

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self.start = time.perf_counter()
                if self.last_end is not None and self.seen > self.warmup:
                    self.wait += self.start - self.last_end

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                self.last_end = time.perf_counter()
                if self.seen > self.warmup:
                    self.step += self.last_end - self.start
                    self.samples += int(batch["user"].numel())
                    self.timed += 1
                self.seen += 1

        return _Timer()


def _compose(folder: str, cache: str, method: str, backbone: str, batch_size: int,
             extra: list[str] = ()):  # fmt: skip
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sar_exp.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"method={method}", f"backbone={backbone}", "dataset=kuaisar", f"dataset.path={folder}",
                f"paths.cache_dir={cache}", "paths.root_dir=.", "paths.output_dir=.",
                f"data.batch_size={batch_size}", *extra,
            ],
        )  # fmt: skip


def _throughput(cfg, steps: int) -> dict:
    import hydra as hydra_lib
    import lightning.pytorch as pl

    datamodule = hydra_lib.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    from omegaconf import OmegaConf

    build = hydra_lib.utils.instantiate(cfg.method.module, _partial_=True, _convert_="all")
    model = build(
        schema=datamodule.schema,
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        lookup_tables=datamodule.lookup_tables(),
    )
    timer = DataWaitTimer(warmup=3)
    trainer = pl.Trainer(
        callbacks=[timer],
        accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=datamodule)
    total = timer.wait + timer.step
    ms_per_step = 1000 * total / max(1, timer.timed)
    steps_per_epoch = int(trainer.num_training_batches)  # batches in one full epoch
    return {
        "samples/s": timer.samples / total,
        "data wait share": timer.wait / total,
        "ms/step": ms_per_step,
        "steps/epoch": steps_per_epoch,
        "epoch minutes": steps_per_epoch * ms_per_step / 60_000,
    }


def _config_names(group: str) -> list[str]:
    from sar_exp.train import CONFIG_DIR

    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="kuaisar_scale")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["mlp", "mmoe", "gru4rec", "sasrec", "din"],
        choices=_config_names("backbone"),
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=["base", "clardrec"],
        choices=_config_names("method"),
        help="a backbone a method does not support is listed as n/a",
    )
    parser.add_argument(
        "--cache", default=".cache/sar_exp", help="where the generated dataset is kept"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--unisar-steps", type=int, default=15,
        help="UniSAR's own line at its speed reference's sizes (0: leave it out)",
    )  # fmt: skip
    parser.add_argument(
        "--unisar-preset", default="unisar_bench",
        help="the synthetic preset of UniSAR's line (the reference's 800 users, 2,500 items)",
    )  # fmt: skip
    parser.add_argument(
        "--sesrec-steps", type=int, default=30,
        help="SESRec against SASRec under SESRec's protocol and caps (0: leave it out)",
    )  # fmt: skip
    parser.add_argument(
        "--queryrec-steps", type=int, default=20,
        help="QueryRec's diffusion stage on the preset's task=ctr data: batches of queries "
        "timed, projected to all (0: leave it out)",
    )  # fmt: skip
    parser.add_argument(
        "--override", nargs="*", default=[],
        help="extra overrides for the training runs, e.g. protocol=unisar_kuaisar",
    )  # fmt: skip
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; quiet them after)

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    from sar_exp.data.synthetic import dataset_folder, make_config, write_kuaisar_folder

    config = make_config(args.preset)
    folder = dataset_folder(args.cache, args.preset, config)
    start = time.perf_counter()
    write_kuaisar_folder(config, folder)
    print(f"dataset: {folder} (ready in {time.perf_counter() - start:.1f}s)")

    scratch = tempfile.mkdtemp(prefix="sar_exp_bench_")
    try:
        results = _run(args, folder, scratch)
        if args.unisar_steps > 0:
            results["unisar"] = _run_unisar(args, scratch)
        if args.sesrec_steps > 0:
            results["sesrec"] = _run_sesrec(args, folder, scratch)
        if args.queryrec_steps > 0:
            results["queryrec_diffusion"] = _run_queryrec_diffusion(args, scratch)
        if args.json:
            from sar_exp.train import write_json_atomic

            write_json_atomic(Path(args.json), results)
    except SarExpError as err:
        print(f"sar_exp: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args, folder: Path, scratch: str) -> dict:
    from omegaconf import OmegaConf

    default = _compose(str(folder), scratch, "base", "sasrec", args.batch_size).dataset
    timings, rows, peak_gb = run_in_child(
        _preprocess,
        (str(folder), scratch, list(default.user_attributes), list(default.item_attributes),
         OmegaConf.to_container(default.protocol, resolve=True)),
        "the preprocessing process",
    )  # fmt: skip
    print(f"\npreprocessing raw CSV -> canonical tables -> views ({rows})")
    for name, seconds in timings.items():
        print(f"  {name:<18} {seconds:7.1f} s")
    print(f"  {'peak memory':<18} {peak_gb:7.2f} GB   (targets: < 120 s, < 8 GB)")

    print(
        f"\ntraining throughput, batch {args.batch_size}, {args.steps} steps (target: data wait < 10%)"
    )
    print(
        f"  {'method':<9} {'backbone':<9} {'samples/s':>10} {'ms/step':>8} {'data wait':>10}"
        f" {'epoch (steps)':>22}"
    )
    results = {"preprocessing": timings, "peak_gb": peak_gb, "rows": rows, "training": {}}
    for method in args.methods:
        for backbone in args.backbones:
            cfg = _compose(str(folder), scratch, method, backbone, args.batch_size, args.override)
            if not method_supports(cfg.method, backbone, cfg.task):
                print(f"  {method:<9} {backbone:<9} {'n/a':>10}")
                continue
            figures = _throughput(cfg, args.steps)
            results["training"][f"{method}/{backbone}"] = figures
            print(
                f"  {method:<9} {backbone:<9} {figures['samples/s']:>10.0f} "
                f"{figures['ms/step']:>8.1f} {100 * figures['data wait share']:>9.1f}% "
                f"{figures['epoch minutes']:>9.1f} min ({figures['steps/epoch']:>6})"
            )
    results["peak_gb_training"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  peak memory while training: {results['peak_gb_training']:.2f} GB")
    return results


UNISAR_REFERENCE_ROWS_PER_S = 140  # the official code on 2 CPU cores (issue 12)


def _run_unisar(args, scratch: str) -> dict:
    """UniSAR at the sizes of its speed reference: batch 1024 rec rows, each with a
    companion batch of 1024 search rows, both histories 30, 1024 relevance negatives."""
    from sar_exp.data.synthetic import dataset_folder, make_config, write_kuaisar_folder

    config = make_config(args.unisar_preset)
    folder = dataset_folder(args.cache, args.unisar_preset, config)
    write_kuaisar_folder(config, folder)
    overrides = ["protocol=unisar", "dataset.protocol.evaluated_tasks=[rec,search]", *args.override]
    cfg = _compose(str(folder), scratch, "unisar", "sasrec", 1024, overrides)
    figures = _throughput(cfg, args.unisar_steps)
    speedup = figures["samples/s"] / UNISAR_REFERENCE_ROWS_PER_S
    print(
        f"\nUniSAR, {args.unisar_preset} preset, batch 1024 (+ 1024 search rows), "
        f"{args.unisar_steps} steps: {figures['samples/s']:.0f} rec rows/s, "
        f"{figures['ms/step']:.0f} ms/step, data wait {100 * figures['data wait share']:.1f}%"
        f" ({speedup:.1f}x the official code's {UNISAR_REFERENCE_ROWS_PER_S} rows/s; target 5x)"
    )
    return {**figures, "preset": args.unisar_preset}


SESREC_TARGET_RATIO = 1 / 3  # of SASRec's rows/s under the same protocol and caps (issue 13)


def _run_sesrec(args, folder: Path, scratch: str) -> dict:
    """SESRec and the framework's SASRec on the main preset under protocol=sesrec (rec
    histories up to 150, search up to 25), batch 256: rows/s and their ratio."""
    overrides = ["protocol=sesrec", *args.override]
    figures = {}
    for method in ("base", "sesrec"):
        cfg = _compose(str(folder), scratch, method, "sasrec", args.batch_size, overrides)
        figures[method] = _throughput(cfg, args.sesrec_steps)
    ratio = figures["sesrec"]["samples/s"] / figures["base"]["samples/s"]
    print(f"\nSESRec against SASRec, protocol=sesrec (caps 150/25), batch {args.batch_size}, "
          f"{args.sesrec_steps} steps:")  # fmt: skip
    for method, name in (("base", "SASRec"), ("sesrec", "SESRec")):
        f = figures[method]
        print(f"  {name:<7} {f['samples/s']:>8.0f} rows/s {f['ms/step']:>8.1f} ms/step "
              f"data wait {100 * f['data wait share']:.1f}%")  # fmt: skip
    print(f"  SESRec / SASRec: {ratio:.2f} (target at least {SESREC_TARGET_RATIO:.2f})")
    return {**figures, "ratio": ratio}


def _diffusion_cost(folder: str, cache: str, user_attrs, item_attrs, protocol: dict,
                    settings: dict, steps: int) -> dict:  # fmt: skip
    """In a child process: the ctr view, then QueryRec's diffusion stage timed by part."""
    import dataclasses

    import numpy as np

    from sar_exp.data.canonical import load_canonical
    from sar_exp.data.views import load_view, protocol_from_config
    from sar_exp.methods import queryrec_diffusion as qd

    start = time.perf_counter()
    tables = load_canonical(folder, cache, user_attrs, item_attrs)
    view = load_view(tables, "ctr", protocol_from_config(protocol), Path(cache))
    figures = {"ctr data seconds": time.perf_counter() - start}
    full = qd.DiffusionSettings(**settings)
    t = time.perf_counter()
    vectors = qd.query_vectors(view, full)
    figures["x_q seconds"] = time.perf_counter() - t
    # timed on `steps` batches of queries, projected to all of them
    rows = np.random.default_rng(0).permutation(len(vectors))[: steps * full.batch_size]
    sample = vectors.subset(np.sort(rows))
    share = len(vectors) / len(sample)
    t = time.perf_counter()
    model, _ = qd.train_denoiser(sample, dataclasses.replace(full, epochs=1), 0)
    figures["seconds per epoch"] = (time.perf_counter() - t) * share
    t = time.perf_counter()
    qd.top_k_generated(model, sample, full, 1)
    figures["generation seconds"] = (time.perf_counter() - t) * share
    figures.update(queries=len(vectors), candidates=int(vectors.candidates.size),
                   dropped=vectors.dropped, epochs=full.epochs,
                   device=str(next(model.parameters()).device))  # fmt: skip
    figures["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return figures


def _run_queryrec_diffusion(args, scratch: str) -> dict:
    """QueryRec's diffusion stage on the preset's task=ctr data (skipped exposures and
    search appeal as `task=ctr` composes them): building x_q, the time of an epoch, the
    generation of every query's top-K (both timed on --queryrec-steps batches of queries
    and projected to all) and the peak memory; the configured epochs' total projected."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from sar_exp.data.synthetic import dataset_folder, make_config, write_kuaisar_folder
    from sar_exp.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(
        config_dir=CONFIG_DIR, version_base="1.3"
    ):  # the embedded data's task=ctr knobs
        embedded = compose(
            "config", overrides=["task=ctr", "paths.root_dir=.", "paths.output_dir=."]
        )
    knobs = OmegaConf.to_container(embedded.dataset.synthetic, resolve=True)
    knobs = {k: v for k, v in knobs.items() if k not in ("preset", "seed")}
    config = make_config(args.preset, **knobs)
    cfg = _compose("unused", scratch, "queryrec", "din", args.batch_size,
                   ["task=ctr", "protocol=queryrec"])  # fmt: skip
    folder = dataset_folder(args.cache, args.preset, config)
    write_kuaisar_folder(config, folder)
    settings = OmegaConf.to_container(cfg.method.queryrec_data.diffusion, resolve=True)
    f = run_in_child(
        _diffusion_cost,
        (str(folder), scratch, list(cfg.dataset.user_attributes), list(cfg.dataset.item_attributes),
         OmegaConf.to_container(cfg.dataset.protocol, resolve=True), settings, args.queryrec_steps),
        "the QueryRec diffusion process",
    )  # fmt: skip
    total = f["x_q seconds"] + f["epochs"] * f["seconds per epoch"] + f["generation seconds"]
    print(
        f"\nQueryRec diffusion, {args.preset} preset with task=ctr's knobs ({f['device']}): "
        f"{f['queries']:,} queries x {f['candidates']:,} candidate items "
        f"({f['dropped']:,} list entries beyond max_items)\n"
        f"  ctr data {f['ctr data seconds']:.0f} s, x_q {f['x_q seconds']:.1f} s, "
        f"{f['seconds per epoch']:.0f} s an epoch (from {args.queryrec_steps} batches), "
        f"generation {f['generation seconds']:.0f} s; {f['epochs']} epochs: about "
        f"{total / 60:.0f} min; peak memory {f['peak_gb']:.2f} GB"
    )
    return {**f, "projected seconds": total}


if __name__ == "__main__":
    main()
