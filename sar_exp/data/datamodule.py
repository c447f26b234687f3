"""LightningDataModule: dataset folder -> canonical tables -> task view -> batch loaders."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from sar_exp.data.batches import AssembledDataset, BatchAssembler, BatchSampler
from sar_exp.data.canonical import load_canonical
from sar_exp.data.synthetic import dataset_folder, make_config, write_kuaisar_folder
from sar_exp.data.views import View, load_view, protocol_from_config
from sar_exp.errors import ConfigError

# dataset.source -> what dataset.path must hold
SOURCES = {
    "kuaisar": "the unzipped KuaiSAR folder",
    "synthetic": "generated; no path",
    "amazon": "the folder with reviews_<Category>_5.json(.gz) and meta_<Category>.json(.gz)",
}


class SARDataModule(pl.LightningDataModule):
    """Serves one task view.

    `main_task` ("rec" or "search") drives the epochs; `companion_batch_sizes` adds
    batches of other tasks to every training batch (a method that trains on search
    clicks alongside rec clicks asks for {"search": n})."""

    def __init__(
        self,
        source: str,
        path: str | None,
        cache_dir: str,
        view: str,
        user_attributes: list[str],
        item_attributes: list[str],
        protocol: dict | None = None,
        synthetic: dict | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_train_negatives: int = 4,
        num_workers: int = 0,
        main_task: str = "rec",
        companion_batch_sizes: dict | None = None,
        companion_negatives: dict | None = None,
        interleaved: bool = False,
        full_ranking: bool = False,
        seed: int = 0,
        reader_options: dict | None = None,
        scores: list[str] | tuple[str, ...] = ("rec",),
        queryrec: dict | None = None,
        iv_queries: int | None = None,
    ):
        super().__init__()
        if batch_size is None or int(batch_size) <= 0:
            raise ConfigError(f"data.batch_size must be a positive integer, got {batch_size}")
        if eval_batch_size is None or int(eval_batch_size) <= 0:
            raise ConfigError(
                f"data.eval_batch_size must be a positive integer, got {eval_batch_size}"
            )
        if num_train_negatives is None or int(num_train_negatives) < 0:
            raise ConfigError(f"data.num_train_negatives must be >= 0, got {num_train_negatives}")
        if source not in SOURCES:
            raise ConfigError(f"dataset.source must be one of {list(SOURCES)}, got {source!r}")
        if source != "synthetic" and not path:
            raise ConfigError(f"dataset={source} needs dataset.path=DIR ({SOURCES[source]})")
        self.source, self.path, self.cache_dir = source, path, Path(cache_dir)
        self.view_name = view
        self.user_attributes, self.item_attributes = list(user_attributes), list(item_attributes)
        self.protocol = protocol_from_config(protocol)
        if main_task not in self.protocol.evaluated_tasks:
            raise ConfigError(
                f"data.main_task={main_task} is not in dataset.protocol.evaluated_tasks "
                f"{list(self.protocol.evaluated_tasks)}"
            )
        self.synthetic = dict(synthetic or {})
        self.reader_options = dict(reader_options or {})
        # held out (protocol) is not scored (method): a method without a search model is
        # evaluated on rec alone, on the same data as one that also scores search
        self.evaluation_tasks = [t for t in self.protocol.evaluated_tasks if t in scores]
        if not self.evaluation_tasks:
            raise ConfigError(
                f"nothing to evaluate: the method scores {list(scores)}, and "
                f"dataset.protocol.evaluated_tasks is {list(self.protocol.evaluated_tasks)}"
            )
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_train_negatives, self.num_workers = int(num_train_negatives), int(num_workers)
        self.main_task = main_task
        self.companion_batch_sizes = dict(companion_batch_sizes or {})
        # a companion task whose training negatives come from another task's items
        self.companion_negatives = dict(companion_negatives or {})
        for name, source in self.companion_negatives.items():
            if name not in self.companion_batch_sizes or source not in ("rec", "search"):
                raise ConfigError(
                    f"method.companion_negatives.{name}: expected 'rec' or 'search' for a "
                    f"task of method.companion_batch_sizes, got {source!r}"
                )
        self.interleaved, self.full_ranking, self.seed = interleaved, full_ranking, seed
        self.view: View | None = None
        # QueryRec's per-batch training extras (method.queryrec_data), and the query
        # positive sets they draw from (the view's clicked lists, or extended by diffusion)
        self.queryrec = dict(queryrec) if queryrec else None
        if self.queryrec is not None and view != "ctr":
            raise ConfigError("method=queryrec needs task=ctr (QueryRec is a CTR model)")
        self.query_positives = None
        self.iv_queries = int(iv_queries) if iv_queries else None

    # ------------------------------------------------------------ building
    def dataset_folder(self) -> Path:
        if self.source != "synthetic":
            return Path(self.path).expanduser()
        options = dict(self.synthetic)
        preset = options.pop("preset", "small")
        config = make_config(preset, **options)
        folder = dataset_folder(self.cache_dir, preset, config)
        return write_kuaisar_folder(config, folder)

    def canonical_tables(self):
        """The dataset's canonical tables (cached), before any protocol filter."""
        return load_canonical(
            self.dataset_folder(), self.cache_dir, self.user_attributes, self.item_attributes,
            source="amazon" if self.source == "amazon" else "kuaisar",
            reader_options=self.reader_options,
        )  # fmt: skip

    def load(self) -> View:
        if self.view is None:
            tables = self.canonical_tables()
            self.view = load_view(tables, self.view_name, self.protocol, self.cache_dir)
            if self.main_task not in self.view.task_names():
                raise ConfigError(
                    f"the {self.view_name} view has no {self.main_task!r} task; it has {self.view.task_names()}"
                )
            if self.queryrec is not None:
                self.query_positives = self._query_positives(self.view)
        return self.view

    def _query_positives(self, view: View) -> tuple[torch.Tensor, torch.Tensor]:
        """I_q+ per query as CSR tensors: clicked before the cut-off, plus the
        diffusion model's top-K when `diffusion` is on (trained once, cached)."""
        arrays = {"offsets": view["query_clicked_offsets"], "items": view["query_clicked_items"]}
        if self.queryrec.get("use_diffusion"):
            from sar_exp.methods.queryrec_diffusion import DiffusionSettings, cached_augmentation

            settings = DiffusionSettings(**self.queryrec["diffusion"])
            arrays = cached_augmentation(view, settings, self.seed, self.cache_dir)
        return torch.from_numpy(arrays["offsets"]).long(), torch.from_numpy(arrays["items"]).long()

    def prepare_data(self) -> None:
        self.load()  # builds and caches on the first process; the others read the cache

    def setup(self, stage: str | None = None) -> None:
        self.load()

    @property
    def schema(self) -> dict:
        """Sizes a model needs to build its embeddings."""
        meta = self.load().meta
        return {
            "num_users": meta["num_users"],
            "num_items": meta["num_items"],
            "num_words": meta["num_words"],
            "num_queries": meta["num_queries"],
            "num_sources": meta["num_sources"],
            "user_attribute_sizes": meta["user_attribute_sizes"],
            "item_attribute_sizes": meta["item_attribute_sizes"],
            "max_rec_history": meta["protocol"]["max_rec_history"],
            "max_search_history": meta["protocol"]["max_search_history"],
            "max_interleaved_history": meta["protocol"]["max_interleaved_history"],
            "num_candidates": meta["protocol"]["num_eval_negatives"] + 1,
        }

    def lookup_tables(self) -> dict[str, torch.Tensor]:
        """Attribute and query-word tables that models keep as buffers."""
        view = self.load()
        tables = {
            "user_attributes": torch.from_numpy(view["user_attributes"]).long(),
            "item_attributes": torch.from_numpy(view["item_attributes"]).long(),
            "query_words": torch.from_numpy(view["query_words"]).long(),
            "item_caption_words": torch.from_numpy(view["item_caption_words"]).long(),
            "rec_item_pool": torch.from_numpy(view["rec_item_pool"]).long(),
        }
        if self.iv_queries:
            tables["item_queries"] = torch.from_numpy(item_queries(view, self.iv_queries)).long()
        return tables

    # ------------------------------------------------------------ loaders
    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _assembler(
        self, task: str, split: str, rank: int = 0, negatives_from: str | None = None
    ) -> BatchAssembler:
        assembler = BatchAssembler(
            self.load(),
            task,
            split,
            num_train_negatives=self.num_train_negatives,
            interleaved=self.interleaved,
            full_ranking_exclusions=self.full_ranking,
            seed=self.seed,
            rank=rank,
            negatives_from=negatives_from,
        )
        if self.queryrec is not None and split == "train":
            from sar_exp.data.queryrec_batches import QueryRecExtras

            q = self.queryrec
            assembler.extras = QueryRecExtras(
                assembler.samples, assembler.context, q["next_positives"], q["next_negatives"],
                self.query_positives, q["query_positives"], q["contrast_negatives"],
                int(self.load().meta["num_items"]), seed=self.seed, rank=rank,
            )  # fmt: skip
        return assembler

    def _loader(self, split: str, shuffle: bool, batch_size: int, task: str | None = None):
        task = task or self.main_task
        rank, world = self._rank()
        tasks = {task: self._assembler(task, split, rank)}
        companions = self.companion_batch_sizes if split == "train" else {}
        for name in companions:
            tasks[name] = self._assembler(name, split, rank, self.companion_negatives.get(name))
        companions = {
            name: self._companion_size(name, size, tasks) for name, size in companions.items()
        }
        dataset = AssembledDataset(tasks, companions, seed=self.seed, rank=rank)
        sampler = BatchSampler(
            len(dataset), batch_size, shuffle, seed=self.seed, rank=rank, world_size=world
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _companion_size(self, name: str, size, tasks) -> int:
        """An int, or "proportional": the companion task's share of one union training
        set (e.g. AUG's search clicks beside rec clicks)."""
        if size == "proportional":
            main = len(tasks[self.main_task])
            return max(1, round(self.batch_size * len(tasks[name]) / max(1, main)))
        if not isinstance(size, int) or size <= 0:
            raise ConfigError(
                f"method.companion_batch_sizes.{name} must be a positive integer or 'proportional', got {size!r}"
            )
        return size

    def train_dataloader(self):
        return self._loader("train", True, self.batch_size)

    def _evaluation_loaders(self, split: str):
        """One loader per evaluated task, in evaluated_tasks order (what the model's
        dataloader_idx refers to); a single loader when only one task is evaluated."""
        loaders = [self.evaluation_loader(split, task) for task in self.evaluation_tasks]
        return loaders[0] if len(loaders) == 1 else loaders

    def evaluation_loader(self, split: str, task: str):
        """The `split` ("val" or "test") loader of one evaluated task, for analyses."""
        return self._loader(split, False, self.eval_batch_size, task)

    def val_dataloader(self):
        return self._evaluation_loaders("val")

    def test_dataloader(self):
        return self._evaluation_loaders("test")


def item_queries(view: View, k: int) -> np.ndarray:
    """[num_items + 1, k] per item, the queries most often clicked through to it (ties:
    the lower query id), 0-padded: IV4Rec+'s instruments. Only training search clicks
    count: the search task's training split, or in the CTR view (no search task) the
    (query, clicked item) lists and click counts QueryRec's training uses, cut before
    held-out time."""
    if "search" in view.task_names():
        train = view.split("search", "train")
        item, query = train["item"].astype(np.int64), train["query"].astype(np.int64)
        clicks = np.ones_like(item)
    else:
        offsets = view["query_clicked_offsets"]
        query = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        item = view["query_clicked_items"].astype(np.int64)
        clicks = view["query_clicked_counts"].astype(np.int64)
    n_items = int(view["item_attributes"].shape[0])  # ids 0..num_items
    out = np.zeros((n_items, k), dtype=np.int64)
    if item.size == 0:
        return out
    pairs, inverse = np.unique(np.stack([item, query], 1), axis=0, return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=clicks, minlength=len(pairs))
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # by item, most clicks first
    pairs = pairs[order]
    starts = np.searchsorted(pairs[:, 0], pairs[:, 0], side="left")
    rank = np.arange(len(pairs)) - starts
    keep = rank < k
    out[pairs[keep, 0], rank[keep]] = pairs[keep, 1]
    return out
