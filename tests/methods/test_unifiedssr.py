"""UnifiedSSR (Xie et al., WWW'24): a training epoch scoring both tasks, the dual-branch
encoder that makes it UnifiedSSR, and its pre-train / fine-tune switch."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from sar_exp.methods.unifiedssr import UnifiedSSR
from sar_exp.train import train

BOTH = ("method=unifiedssr", "dataset.protocol.evaluated_tasks=[rec,search]",
        "optimized_metric=val/mean_ndcg@5")  # fmt: skip


@pytest.fixture
def build(build_model):
    def _build(*overrides):
        model, _, batch = build_model(*BOTH, *overrides)
        return model, batch

    return _build


def test_one_epoch_scores_rec_and_search(make_cfg, tmp_path):
    metrics = train(make_cfg(*BOTH, output_dir=tmp_path))
    for key in ("test/ndcg@5", "test/hr@10", "test/search/ndcg@5", "test/search/hr@10"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["test/hr@10"] > 0.0 and metrics["test/search/hr@10"] > 0.0


def _changed(batch: dict, key: str, row: int, slot: int, value: int) -> dict:
    out = {**batch, key: batch[key].clone()}
    out[key][row, slot] = value
    return out


def _searcher(batch: dict) -> tuple[int, int]:
    """A search row with at least two past (query, click) pairs, and its newest slot."""
    mask = batch["search_click_history_mask"]
    row = int((mask.sum(1) >= 2).nonzero()[0])
    return row, int(mask[row].sum()) - 1


@pytest.mark.parametrize("cross_view", [True, False])
def test_the_two_branches_run_in_parallel_and_reach_the_search_score(build, cross_view):
    model, batch = build(f"method.module.use_cross_view={str(cross_view).lower()}")
    model.eval()
    search = batch["search"]
    row, newest = _searcher(search)
    with torch.no_grad():
        p, q, _ = model.search_user(search)
        scores = model.search_scores(search, search["candidates"])
        # an older query of the search history, nothing else
        old_query = int(search["search_click_history_query"][row, 0])
        other = _changed(search, "search_click_history_query", row, 0, old_query % 50 + 1)
        p2, q2, _ = model.search_user(other)
        assert not torch.allclose(q2[row], q[row])  # the query branch reads it
        # the product branch reads the queries only through the cross-view attention
        assert torch.allclose(p2[row], p[row], atol=1e-6) is not cross_view
        assert not torch.allclose(
            model.search_scores(other, search["candidates"])[row], scores[row]
        )
        # the newest clicked product, nothing else
        item = int(search["search_click_history_item"][row, newest])
        other = _changed(search, "search_click_history_item", row, newest, item % 300 + 1)
        p3, q3, _ = model.search_user(other)
        assert not torch.allclose(p3[row], p[row])  # the product branch reads it
        assert torch.allclose(q3[row], q[row], atol=1e-6) is not cross_view
        assert not torch.allclose(
            model.search_scores(other, search["candidates"])[row], scores[row]
        )
        # other rows, and the rec history, do not reach a row's search branches
        keep = torch.arange(p.shape[0]) != row
        assert torch.allclose(p3[keep], p[keep], atol=1e-6)
        rec_changed = {**search, "rec_history": search["rec_history"].roll(1, 0)}
        p4, q4, _ = model.search_user(rec_changed)
        assert torch.allclose(p4, p, atol=1e-6) and torch.allclose(q4, q, atol=1e-6)


def test_the_rec_scenario_is_the_product_branch_alone(build):
    model, batch = build()
    model.eval()
    rows = batch["rec_history_mask"].sum(1)
    row = int((rows >= 1).nonzero()[0])
    with torch.no_grad():
        user, _ = model.rec_user(batch)
        scores = model.score(batch, batch["candidates"])
        # the query branch is deactivated: no search history reaches the rec score
        searches = {k: batch[k].roll(1, 0) for k in batch if k.startswith("search_")}
        assert torch.allclose(model.score({**batch, **searches}, batch["candidates"]), scores)
        # the newest rec product does, through the product branch
        newest = int(rows[row]) - 1
        item = int(batch["rec_history"][row, newest])
        other = _changed(batch, "rec_history", row, newest, item % 300 + 1)
        changed, _ = model.rec_user(other)
        assert not torch.allclose(changed[row], user[row])
        assert not torch.allclose(model.score(other, batch["candidates"])[row], scores[row])
    # the product branches of the two scenarios are one encoder (parameter sharing)
    assert list(model.encoders) == ["shared"]
    assert model._encoder("rec") is model._encoder("search")
    separate, _ = build("method.module.use_shared_encoder=false")
    assert separate._encoder("rec") is not separate._encoder("search")


def _epoch(model, epoch: int):
    return mock.patch.object(
        type(model), "current_epoch", new_callable=mock.PropertyMock, return_value=epoch
    )


@pytest.mark.parametrize("task", ["rec", "search"])
def test_after_pretraining_only_the_finetuned_task_trains(build, task):
    model, batch = build(f"method.module.finetune_task={task}", "method.module.pretrain_epochs=2")
    model.train()
    corr = model.hparams.corr_factor
    # the query projection is reached only by the search loss, the user projection by both
    only_search = model.query_projection.weight
    for epoch, joint in ((0, True), (1, True), (2, False), (7, False)):
        model.zero_grad(set_to_none=True)
        with _epoch(model, epoch):
            loss, parts = model.training_loss(batch)
        rec = parts["rec"] + corr * parts["ism_rec"]
        src = parts["src"] + corr * parts["ism_src"]
        if joint:
            expected = rec + src
        else:
            expected = rec if task == "rec" else src
        assert torch.allclose(loss.detach(), expected, atol=1e-6), (epoch, task)
        assert float(parts["rec_weight"]) == float(joint or task == "rec")
        assert float(parts["search_weight"]) == float(joint or task == "search")
        loss.backward()
        # every parameter keeps a gradient (DDP), zero where only the other task reaches
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
        search_grad = float(only_search.grad.abs().sum())
        if joint or task == "search":
            assert search_grad > 0.0
        else:
            assert search_grad == 0.0
            assert float(model.mix.grad.abs()) == 0.0
        assert float(model.user_projection.weight.grad.abs().sum()) > 0.0


def test_fine_tuning_leaves_what_only_the_other_task_reaches_where_it_was(build_model):
    """Two real epochs (pre-training, then fine-tuning for rec): the query projection, which
    only the search loss reaches, moves in the first and not in the second (the other
    task's loss weighted 0 and Adam's momentum cleared at the switch)."""
    import lightning.pytorch as pl

    model, datamodule, _ = build_model(
        *BOTH, "method.module.finetune_task=rec", "method.module.pretrain_epochs=1"
    )
    seen = [model.query_projection.weight.detach().clone()]
    shared = [model.user_projection.weight.detach().clone()]

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            seen.append(module.query_projection.weight.detach().clone())
            shared.append(module.user_projection.weight.detach().clone())

    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Snapshot()],
    )  # fmt: skip
    trainer.fit(model, datamodule)
    assert float((seen[1] - seen[0]).abs().max()) > 0.0  # pre-training: both tasks
    assert float((seen[2] - seen[1]).abs().max()) == 0.0  # fine-tuning for rec
    assert float((shared[2] - shared[1]).abs().max()) > 0.0  # the rec side still trains


def test_joint_training_throughout_without_a_finetuned_task(build):
    model, batch = build()
    assert model.hparams.finetune_task is None
    with _epoch(model, 50):
        assert model.task_weights() == {"rec": 1.0, "search": 1.0}
    with pytest.raises(Exception, match="finetune_task"):
        build("method.module.finetune_task=both")


@pytest.mark.parametrize(
    "flags",
    [(), ("method.module.use_ism=false",), ("method.module.use_cross_view=false",),
     ("method.module.use_shared_encoder=false",)],
)  # fmt: skip
def test_one_step_reaches_every_parameter(build, flags):
    model, batch = build(*flags)
    model.train()
    loss, _ = model.training_loss(batch)
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert isinstance(model, UnifiedSSR)


def test_the_current_query_reaches_the_search_score(build):
    model, batch = build()
    model.eval()
    search = batch["search"]
    with torch.no_grad():
        scores = model.search_scores(search, search["candidates"])
        query = search["query"].clone()
        query[0] = query[0] % 50 + 1
        changed = model.search_scores({**search, "query": query}, search["candidates"])
    assert not torch.allclose(changed[0], scores[0], atol=1e-5)
    assert torch.allclose(changed[1:], scores[1:], atol=1e-6)


def test_ism_sessions_discrimination_and_alignment_on_a_hand_made_sequence():
    from sar_exp.methods.unifiedssr import (
        alignment,
        discrimination,
        sessions,
        sessions_after_begin,
    )  # fmt: skip

    h = torch.tensor([
        [[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]],   # 4 valid: windows {0,1} {2,3}
        [[1.0, 0.0], [2.0, 2.0], [9.0, 9.0], [9.0, 9.0]],   # 2 valid: windows {0} {1}
        [[5.0, 5.0], [7.0, 7.0], [7.0, 7.0], [7.0, 7.0]],   # 1 valid: the second window empty
    ])  # fmt: skip
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    out, means, full = sessions(h, valid, 2)
    assert torch.equal(
        means[:2], torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [2.0, 2.0]]])
    )
    assert full.tolist() == [True, True, False]
    assert torch.equal(out[0], torch.tensor([[3.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, 7.0]]))
    assert torch.equal(out[1], torch.tensor([[2.0, 0.0], [4.0, 4.0], [9.0, 9.0], [9.0, 9.0]]))
    # adjacent windows' |cos| over the rows with every window: (0 + 1/sqrt 2) / 2
    assert discrimination(means, full).item() == pytest.approx(0.5 / 2**0.5, abs=1e-6)
    q_means = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [-2.0, -2.0]],
                            [[1.0, 1.0], [1.0, 1.0]]])  # fmt: skip
    assert alignment(means, q_means, full).item() == pytest.approx(0.5, abs=1e-6)  # (1 + 0) / 2
    # slot 0 is in no window (the code drops it before ISM)
    begin = torch.cat([torch.full_like(h[:, :1], 100.0), h], dim=1)
    out0, means0, full0 = sessions_after_begin(begin, F.pad(valid, (1, 0), value=True), 2)
    assert torch.equal(means0, means) and torch.equal(full0, full)
    assert torch.equal(out0[:, 1:], out) and torch.equal(out0[:, 0], begin[:, 0])


def test_search_ism_is_discrimination_minus_alignment(build, monkeypatch):
    from sar_exp.methods import unifiedssr

    model, batch = build()
    model.eval()
    monkeypatch.setattr(unifiedssr, "discrimination", lambda means, full: torch.tensor(0.3))
    monkeypatch.setattr(unifiedssr, "alignment", lambda p, q, full: torch.tensor(0.1))
    with torch.no_grad():
        _, _, corr = model.search_user(batch["search"])
    assert corr.item() == pytest.approx(0.3 + 0.3 - 0.1)


def test_w_is_clamped_where_used_not_in_place(build):
    model, batch = build()
    model.eval()
    search = batch["search"]
    with torch.no_grad():
        model.mix.fill_(1.5)
        scores = model.search_scores(search, search["candidates"])
        p, q, _ = model.search_user(search)
        expected = 0.9 * model._dot(p, search["candidates"]) + 0.1 * model._dot(
            q, search["candidates"]
        )
    assert torch.allclose(scores, expected, atol=1e-5)
    assert model.mix.item() == 1.5  # the parameter is left as it is
    loss, parts = model.training_loss(batch)
    assert model.mix.item() == 1.5 and parts["mix"].item() == pytest.approx(0.9)


def test_defaults_follow_the_yaml():
    import inspect

    from omegaconf import OmegaConf

    from sar_exp.train import CONFIG_DIR

    yaml = OmegaConf.load(f"{CONFIG_DIR}/method/unifiedssr.yaml").module
    defaults = inspect.signature(UnifiedSSR.__init__).parameters
    assert defaults["pretrain_epochs"].default == yaml.pretrain_epochs == 5
    assert yaml.ffn_dim is None and yaml.hidden_dim == 64
