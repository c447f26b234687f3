"""Batches assembled by vectorised indexing into a view's pre-built tensors.

No per-sample Python loop and no dataframe work happen here: a batch is a handful of
`tensor[index]` gathers. Histories are left-aligned (oldest first, padding 0 at the end)
with a boolean mask, which both GRU packing and attention masks read directly.
"""

from __future__ import annotations

import hashlib
import math

import torch

from sar_exp.data.views import View, training_negatives, training_negatives_avoid_clicks


def history_window(
    start: torch.Tensor, end: torch.Tensor, cap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the last `cap` events in [start, end), oldest first, and their mask.

    The width is the batch's longest history (at most `cap`): padding that no row
    uses would only cost compute."""
    count = (end - start).clamp(min=0, max=cap)
    width = max(1, int(count.max())) if count.numel() else 1
    offsets = torch.arange(width, device=start.device)
    valid = offsets < count[:, None]
    index = torch.where(valid, (end - count)[:, None] + offsets, torch.zeros_like(offsets))
    return index, valid


def merge_by_time(times_a, valid_a, times_b, valid_b, cap: int):
    """Interleave two left-aligned histories by time and keep the last `cap` events.

    Returns (source, position, valid): source 1 for stream a, 0 for stream b, and the
    position inside that stream, oldest first. Ties put stream a first."""
    big = torch.iinfo(torch.int64).max
    times = torch.cat(
        [torch.where(valid_a, times_a, big), torch.where(valid_b, times_b, big)], dim=1
    )
    # 2 * time + (0 for a, 1 for b) breaks ties deterministically
    tie = torch.cat([torch.zeros_like(times_a), torch.ones_like(times_b)], dim=1)
    order = torch.argsort(torch.where(times == big, big, times * 2 + tie), dim=1, stable=True)
    count = torch.cat([valid_a, valid_b], dim=1).sum(1)
    keep = count.clamp(max=cap)
    # the kept events are the last `keep` valid ones, sorted ascending
    offsets = torch.arange(cap, device=times.device)
    pick = (count - keep)[:, None] + offsets
    valid = offsets < keep[:, None]
    chosen = torch.gather(order, 1, torch.where(valid, pick, torch.zeros_like(pick)))
    width_a = times_a.shape[1]
    source = (chosen < width_a).long()
    position = torch.where(chosen < width_a, chosen, chosen - width_a)
    return torch.where(valid, source, 0), torch.where(valid, position, 0), valid


def stable_seed(*parts) -> int:
    """A seed from mixed parts that, unlike hash(), is the same in every process."""
    return (
        int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 2
    )


def _as_tensor(array):
    """Integer arrays become int64 (index) tensors; others keep their dtype."""
    tensor = torch.from_numpy(array)
    return tensor.long() if array.dtype.kind in "iu" else tensor


class BatchAssembler:
    """Turns a tensor of sample indices into a batch dict for one task and split."""

    def __init__(
        self,
        view: View,
        task: str,
        split: str,
        num_train_negatives: int = 0,
        interleaved: bool = False,
        full_ranking_exclusions: bool = False,
        seed: int = 0,
        rank: int = 0,
        extras=None,
        negatives_from: str | None = None,
    ):
        """`negatives_from`: the task whose items (pool, popularity, users' training
        clicks) the training negatives are drawn from, if not this one's (AUG's search
        clicks are rec positives, ranked against rec negatives)."""
        to_tensor = _as_tensor
        self.samples = {k: to_tensor(v) for k, v in view.split(task, split).items()}
        keep = (
            "rec_click_item", "rec_click_time", "session_time", "session_query",
            "session_source", "session_clicks", "search_click_item", "search_click_query",
            "user_click_offsets", "user_search_click_offsets",
        )  # fmt: skip
        self.context = {k: to_tensor(view[k]) for k in keep}
        source = negatives_from or task
        self.pool = to_tensor(view["rec_item_pool" if source == "rec" else "search_item_pool"])
        protocol = view.meta["protocol"]
        # popularity: draw in proportion to training clicks
        self.cumulative = self.user_clicks = None
        if training_negatives(protocol) == "popularity" and f"{source}_popularity" in view:
            weights = torch.from_numpy(view[f"{source}_popularity"]).double()[self.pool]
            self.pool = self.pool[weights > 0]
            self.cumulative = torch.cumsum(weights[weights > 0], 0)
        # the (user, item) keys of the task's training clicks, which negatives avoid
        if training_negatives_avoid_clicks(protocol) and f"{source}_train_clicks" in view:
            self.user_clicks = torch.from_numpy(view[f"{source}_train_clicks"])
        self.rec_cap = protocol["max_rec_history"]
        self.search_cap = protocol["max_search_history"]
        self.interleaved_cap = protocol["max_interleaved_history"]
        self.task, self.split = task, split
        self.num_train_negatives = num_train_negatives if split == "train" else 0
        self.interleaved = interleaved
        self.full_ranking_exclusions = full_ranking_exclusions and split != "train"
        # full ranking leaves out what the stored rec negatives avoid: the user's search
        # clicks too under rec_negatives_avoid=user
        self.exclude_search_clicks = task == "rec" and protocol.get("rec_negatives_avoid") == "user"
        self.seed, self.rank = seed, rank
        # a method's own per-batch draws (QueryRec's): extras(batch, index, epoch, number)
        self.extras = extras

    def __len__(self) -> int:
        return int(self.samples["user"].numel())

    def __call__(
        self, index: torch.Tensor, epoch: int = 0, batch_number: int = 0
    ) -> dict[str, torch.Tensor]:
        s, c = self.samples, self.context
        batch = {name: s[name][index] for name in ("user", "item", "query")}
        batch["sample_index"] = index
        for name in s:
            if name == "label" or name.startswith("label_"):
                batch[name] = s[name][index]
        if "negatives" in s:
            batch["candidates"] = torch.cat([batch["item"][:, None], s["negatives"][index]], dim=1)
        elif self.num_train_negatives:
            batch["candidates"] = torch.cat(
                [
                    batch["item"][:, None],
                    self._train_negatives(batch["user"], batch["item"], epoch, batch_number),
                ],
                dim=1,
            )

        rec_idx, rec_valid = history_window(
            s["rec_start"][index], s["rec_end"][index], self.rec_cap
        )
        batch["rec_history"] = torch.where(rec_valid, c["rec_click_item"][rec_idx], 0)
        batch["rec_history_mask"] = rec_valid
        ses_idx, ses_valid = history_window(
            s["search_start"][index], s["search_end"][index], self.search_cap
        )
        batch["search_history_query"] = torch.where(ses_valid, c["session_query"][ses_idx], 0)
        batch["search_history_source"] = torch.where(ses_valid, c["session_source"][ses_idx], 0)
        batch["search_history_clicks"] = torch.where(
            ses_valid[..., None], c["session_clicks"][ses_idx], 0
        )
        batch["search_history_mask"] = ses_valid
        # the same cap counts single search clicks for encoders that read them (ClardRec Eq. 29)
        click_idx, click_valid = history_window(
            s["search_click_start"][index], s["search_click_end"][index], self.search_cap
        )
        batch["search_click_history_item"] = torch.where(
            click_valid, c["search_click_item"][click_idx], 0
        )
        batch["search_click_history_query"] = torch.where(
            click_valid, c["search_click_query"][click_idx], 0
        )
        batch["search_click_history_mask"] = click_valid
        if self.interleaved:
            batch.update(self._interleaved(s, c, index))
        if self.full_ranking_exclusions:
            batch["exclude_items"] = self._user_clicks(batch["user"])
        if self.extras is not None:
            self.extras(batch, index, epoch, batch_number)
        return batch

    def _train_negatives(
        self, user: torch.Tensor, positive: torch.Tensor, epoch: int, batch_number: int
    ) -> torch.Tensor:
        """Uniform draws from the task's item pool, or in proportion to training clicks,
        redrawn where they hit the positive or, where the protocol says so, an item the
        user clicked in training (10 passes, then what is left stays).
        Seeded by (run seed, rank, task, epoch, batch): reruns and data-loader workers
        draw the same negatives, other seeds and other DDP ranks draw their own."""
        generator = torch.Generator().manual_seed(
            stable_seed(self.seed, self.rank, self.task, epoch, batch_number)
        )

        def draw(size):
            if self.cumulative is None:
                return self.pool[torch.randint(0, self.pool.numel(), size, generator=generator)]
            u = torch.rand(size, generator=generator, dtype=torch.float64)
            index = torch.searchsorted(self.cumulative, u * self.cumulative[-1], right=True)
            return self.pool[index.clamp(max=self.pool.numel() - 1)]

        draws = draw((positive.numel(), self.num_train_negatives))
        for _ in range(10):
            hit = (draws == positive[:, None]) | self._clicked_in_training(user, draws)
            if not hit.any():
                break
            draws[hit] = draw((int(hit.sum()),))
        return draws

    def _clicked_in_training(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Where items[r, k] is a training click of user[r] (all False when the protocol's
        negatives avoid the positive only)."""
        clicks = self.user_clicks
        if clicks is None or not clicks.numel():
            return torch.zeros_like(items, dtype=torch.bool)
        keys = (user[:, None].long() << 32) + items
        found = torch.searchsorted(clicks, keys).clamp(max=clicks.numel() - 1)
        return clicks[found] == keys

    def _interleaved(self, s, c, index):
        """The last rec_cap rec clicks and search_cap sessions merged by time, of which
        the newest interleaved_cap stay (UniSAR's code: 30 + 30 -> 60 slots)."""
        cap = self.interleaved_cap
        rec_idx, rec_valid = history_window(
            s["rec_start"][index], s["rec_end"][index], self.rec_cap
        )
        ses_idx, ses_valid = history_window(
            s["search_start"][index], s["search_end"][index], self.search_cap
        )
        source, position, valid = merge_by_time(
            c["rec_click_time"][rec_idx], rec_valid, c["session_time"][ses_idx], ses_valid, cap
        )
        is_rec = source == 1
        rec_pick = torch.gather(rec_idx, 1, torch.where(is_rec, position, 0))
        ses_pick = torch.gather(ses_idx, 1, torch.where(is_rec, 0, position))
        return {
            # behaviour type b_t (UniSAR): 1 recommendation, 0 search
            "interleaved_type": torch.where(valid, source, 0),
            "interleaved_item": torch.where(valid & is_rec, c["rec_click_item"][rec_pick], 0),
            "interleaved_query": torch.where(valid & ~is_rec, c["session_query"][ses_pick], 0),
            "interleaved_clicks": torch.where(
                (valid & ~is_rec)[..., None], c["session_clicks"][ses_pick], 0
            ),
            "interleaved_time": torch.where(
                valid,
                torch.where(is_rec, c["rec_click_time"][rec_pick], c["session_time"][ses_pick]),
                0,
            ),
            "interleaved_mask": valid,
            # where the slot's event sits in the rec (type 1) or search (type 0) history
            "interleaved_position": torch.where(valid, position, 0),
        }

    def _user_clicks(self, user: torch.Tensor) -> torch.Tensor:
        """All rec items each user clicked, and with exclude_search_clicks the items they
        clicked in search (padded with 0): masked out in full ranking."""
        sources = [("user_click_offsets", "rec_click_item")]
        if self.exclude_search_clicks:
            sources.append(("user_search_click_offsets", "search_click_item"))
        parts = []
        for offsets, items in sources:
            start, end = self.context[offsets][user], self.context[offsets][user + 1]
            width = max(1, int((end - start).max()))
            index, valid = history_window(start, end, width)
            parts.append(torch.where(valid, self.context[items][index], 0))
        return torch.cat(parts, dim=1)


class BatchSampler:
    """Yields index tensors: shuffled per epoch for training, in order for evaluation.

    Each process takes every world_size-th sample. Training shards are padded to equal
    length (DDP needs the same number of steps everywhere); evaluation shards are not,
    so every sample is scored exactly once and metrics equal those of one process."""

    def __init__(self, size, batch_size, shuffle, seed=0, rank=0, world_size=1):
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.rank, self.size, self.world_size)
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        )
        per_rank = math.ceil(self.size / self.world_size)
        order = torch.cat([order, order[: per_rank * self.world_size - self.size]])
        return order[self.rank :: self.world_size]

    def __iter__(self):
        indices = self._indices()
        for number, start in enumerate(range(0, indices.numel(), self.batch_size)):
            yield indices[start : start + self.batch_size], self.epoch, number

    def __len__(self) -> int:
        n = (
            math.ceil(self.size / self.world_size)
            if self.shuffle
            else len(range(self.rank, self.size, self.world_size))
        )
        return math.ceil(n / self.batch_size)


class AssembledDataset(torch.utils.data.Dataset):
    """Map-style dataset whose 'items' are whole batches: (indices, epoch, number) -> dict."""

    def __init__(
        self,
        tasks: dict[str, BatchAssembler],
        companion_sizes: dict[str, int] | None = None,
        seed: int = 0,
        rank: int = 0,
    ):
        self.tasks = tasks  # the first task drives the epoch; others ride along
        self.companion_sizes = companion_sizes or {}
        self.main = next(iter(tasks))
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return len(self.tasks[self.main])

    def __getitem__(self, key):
        index, epoch, number = key
        batch = self.tasks[self.main](index, epoch, number)
        for name, size in self.companion_sizes.items():
            companion = self.tasks[name]
            # each seed and each DDP rank draws its own companion samples
            generator = torch.Generator().manual_seed(
                stable_seed("companion", self.seed, self.rank, name, epoch, number)
            )
            picks = torch.randint(0, len(companion), (size,), generator=generator)
            batch[name] = companion(picks, epoch, number)
        return batch
