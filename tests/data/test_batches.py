"""Batch assembly: vectorised history windows and interleaving match a plain loop."""

from __future__ import annotations

import torch

from sar_exp.data.batches import BatchSampler, history_window, merge_by_time


def test_history_window_takes_the_last_events_oldest_first():
    start, end = torch.tensor([0, 10, 20, 5]), torch.tensor([3, 10, 30, 6])
    index, valid = history_window(start, end, cap=4)
    assert index.shape == (4, 4)  # width = longest history in the batch, at most cap
    assert index[0][valid[0]].tolist() == [0, 1, 2]
    assert valid[1].sum() == 0
    assert index[2][valid[2]].tolist() == [26, 27, 28, 29]
    assert index[3][valid[3]].tolist() == [5]


def test_merge_by_time_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        la, lb = torch.randint(0, 6, (2,), generator=g).tolist()
        ta = torch.sort(torch.randint(0, 20, (1, max(la, 1)), generator=g)).values
        tb = torch.sort(torch.randint(0, 20, (1, max(lb, 1)), generator=g)).values
        va = torch.arange(ta.shape[1])[None] < la
        vb = torch.arange(tb.shape[1])[None] < lb
        source, position, valid = merge_by_time(ta, va, tb, vb, cap=4)
        events = [(t, 0, "a", i) for i, t in enumerate(ta[0, :la].tolist())]
        events += [(t, 1, "b", i) for i, t in enumerate(tb[0, :lb].tolist())]
        expected = sorted(events)[-4:]
        got = [
            ("a" if s else "b", p)
            for s, p, v in zip(source[0].tolist(), position[0].tolist(), valid[0].tolist())
            if v
        ]
        assert got == [(name, i) for _, _, name, i in expected]


def test_evaluation_shards_partition_the_samples():
    seen = []
    for rank in range(3):
        sampler = BatchSampler(1000, 64, shuffle=False, rank=rank, world_size=3)
        batches = [index for index, _, _ in sampler]
        assert len(batches) == len(sampler)
        seen += torch.cat(batches).tolist()
    assert sorted(seen) == list(range(1000))


def test_training_shards_have_equal_length_and_reshuffle_each_epoch():
    lengths = {
        len(list(BatchSampler(1001, 64, shuffle=True, rank=r, world_size=2))) for r in range(2)
    }
    assert len(lengths) == 1
    sampler = BatchSampler(1000, 1000, shuffle=True, seed=0)
    first = next(iter(sampler))[0]
    sampler.set_epoch(1)
    assert not torch.equal(first, next(iter(sampler))[0])
    sampler.set_epoch(0)
    assert torch.equal(first, next(iter(sampler))[0])


def test_training_draws_depend_on_the_run_seed_and_the_rank(tiny_folder, tmp_path):
    """Companion samples and training negatives: the same for the same (seed, rank),
    different for another seed (so seeds vary them) or another DDP rank (no duplicates)."""
    from sar_exp.data.batches import AssembledDataset, BatchAssembler
    from sar_exp.data.datamodule import SARDataModule

    dm = SARDataModule("kuaisar", str(tiny_folder), str(tmp_path), "sequential",
                       ["rec_active_level"], ["author_id"])  # fmt: skip
    view = dm.load()

    def draw(seed: int, rank: int) -> dict:
        tasks = {t: BatchAssembler(view, t, "train", num_train_negatives=4, seed=seed, rank=rank)
                 for t in ("rec", "search")}  # fmt: skip
        dataset = AssembledDataset(tasks, {"search": 16}, seed=seed, rank=rank)
        return dataset[(torch.arange(16), 2, 5)]

    def same(a, b) -> bool:
        return torch.equal(a["candidates"], b["candidates"]) and torch.equal(
            a["search"]["sample_index"], b["search"]["sample_index"]
        )

    first = draw(seed=0, rank=0)
    assert same(first, draw(seed=0, rank=0))
    for other in (draw(seed=1, rank=0), draw(seed=0, rank=1)):
        assert not torch.equal(first["candidates"][:, 1:], other["candidates"][:, 1:])
        assert not torch.equal(first["search"]["sample_index"], other["search"]["sample_index"])
