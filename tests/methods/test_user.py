"""USER (Yao et al., CIKM'21): one encoder over the integrated search and browsing
sequence, recommendation as search with an empty query, pre-training on both tasks then
fine-tuning on one; and a training epoch of each table half."""

from __future__ import annotations

import math

import pytest
import torch

from sar_exp.methods.user import EMPTY_QUERY, USER
from sar_exp.train import train


@pytest.fixture
def build(build_model):
    def _build(*overrides):
        model, _, batch = build_model("method=user", *overrides)
        return model.eval(), batch

    return _build


def model_schema() -> dict:
    return {
        "num_users": 3, "num_items": 5, "num_words": 4, "num_queries": 2,
        "user_attribute_sizes": [], "item_attribute_sizes": [], "max_rec_history": 2,
        "max_search_history": 2, "max_interleaved_history": 4,
    }  # fmt: skip


def _with(batch, **changes):
    out = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    out.update(changes)
    return out


@torch.no_grad()
def test_rec_reads_the_searches_of_one_time_ordered_sequence(build):
    model, batch = build()
    kind, mask = batch["interleaved_type"], batch["interleaved_mask"]
    searches, browses = ((kind == 0) & mask).sum(1), ((kind == 1) & mask).sum(1)
    row = int((searches * (browses > 0)).argmax())  # a user with searches and rec clicks
    slot = int(((kind[row] == 0) & mask[row]).nonzero()[-1])  # their newest search
    candidates = batch["candidates"]
    rec = model.score(batch, candidates)
    # only the newest search behaviour's query changes: the rec scores of that row change
    queries = batch["interleaved_query"].clone()
    queries[row, slot] = queries[row, slot] % 50 + 1
    changed = model.score(_with(batch, interleaved_query=queries), candidates)
    assert not torch.allclose(changed[row], rec[row], atol=1e-5)
    others = torch.arange(len(rec)) != row
    assert torch.allclose(changed[others], rec[others], atol=1e-6)
    # the same behaviours in another order are another sequence
    first_rec = int(((kind[row] == 1) & mask[row]).nonzero()[0])
    swapped = _with(batch)
    for key in ("interleaved_type", "interleaved_item", "interleaved_query", "interleaved_clicks"):
        swapped[key][row, [first_rec, slot]] = batch[key][row, [slot, first_rec]]
    assert not torch.allclose(model.score(swapped, candidates)[row], rec[row], atol=1e-5)
    # padding is read by nobody (a row that has padding)
    padded_rows = (~mask).any(1)
    assert padded_rows.any()
    pad_row = int(padded_rows.nonzero()[0])
    padded = ~mask[pad_row]
    noise = _with(batch)
    noise["interleaved_item"][pad_row, padded] = 7
    noise["interleaved_query"][pad_row, padded] = 3
    noise["interleaved_type"][pad_row, padded] = 1 - noise["interleaved_type"][pad_row, padded]
    assert torch.allclose(model.score(noise, candidates), rec, atol=1e-6)


@torch.no_grad()
def test_a_candidate_s_score_is_its_own_and_the_history_reads_no_appended_token(build):
    model, batch = build("method.module.layers=2")  # layer 2 reads layer 1's history
    candidates = batch["candidates"]
    outputs = []
    hook = model.encoder.register_forward_hook(lambda m, args, out: outputs.append(out))
    rec = model.score(batch, candidates)
    # one candidate changed: its score changes, every other candidate's does not
    other = candidates.clone()
    other[:, 3] = candidates[:, 3] % 300 + 1
    changed = model.score(batch, other)
    assert not torch.allclose(changed[:, 3], rec[:, 3], atol=1e-5)
    keep = torch.arange(candidates.shape[1]) != 3
    assert torch.allclose(changed[:, keep], rec[:, keep], atol=1e-6)
    # the history's outputs read neither the request nor the candidates
    model.search_scores(batch, candidates)
    hook.remove()
    length = batch["interleaved_mask"].shape[1]
    valid = batch["interleaved_mask"][..., None]
    first, with_candidate, with_query = (out[:, :length] * valid for out in outputs)
    assert torch.allclose(with_candidate, first, atol=1e-6)  # other candidates
    assert torch.allclose(with_query, first, atol=1e-6)  # the search request, not rec's
    assert not torch.allclose(outputs[2][:, length], outputs[0][:, length])  # the request


@torch.no_grad()
def test_recommendation_is_search_with_the_empty_query_token(build):
    model, batch = build()
    candidates = batch["candidates"]
    rec = model.score(batch, candidates)
    # the search path with its request token replaced by the empty query's gives rec
    empty = model.request_token(batch, "rec")
    expected = model.user_projection(model.users(batch["user"])) + model.types.weight[EMPTY_QUERY]
    assert torch.allclose(empty, expected)
    assert torch.allclose(model.task_scores(batch, candidates, "search", request=empty), rec)
    # rec reads no query; search reads its own, in the same parameters
    other = _with(batch, query=batch["query"] % 50 + 1)
    assert torch.allclose(model.score(other, candidates), rec)
    assert not torch.allclose(
        model.search_scores(other, candidates), model.search_scores(batch, candidates)
    )


def test_after_pretraining_only_the_finetuned_task_s_loss_counts(build, monkeypatch):
    epoch = {"now": 0}
    monkeypatch.setattr(USER, "current_epoch", property(lambda self: epoch["now"]))
    model, batch = build("method.module.finetune_task=rec", "method.module.pretrain_epochs=2")
    loss, parts = model.training_loss(batch)  # (eval: no dropout, the passes agree)
    assert loss.item() == pytest.approx((parts["rec"] + parts["src"]).item(), rel=1e-6)
    assert (parts["rec_weight"].item(), parts["search_weight"].item()) == (1.0, 1.0)
    epoch["now"] = 2  # fine-tuning: the search loss is computed, weighted 0
    loss, parts = model.training_loss(batch)
    assert loss.item() == pytest.approx(parts["rec"].item(), rel=1e-6) and parts["src"] > 0
    assert (parts["rec_weight"].item(), parts["search_weight"].item()) == (1.0, 0.0)
    # fine-tuned for search: the rec loss weighted 0, its own paths still in the graph
    model, batch = build("method.module.finetune_task=search", "method.module.pretrain_epochs=2")
    loss, parts = model.training_loss(batch)
    assert loss.item() == pytest.approx(parts["src"].item(), rel=1e-6)
    loss.backward()
    assert model.user_projection.weight.grad.abs().sum().item() == 0.0
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.task_weights(1) == {"rec": 1.0, "search": 1.0}
    assert model.task_weights(2) == {"rec": 0.0, "search": 1.0}


@pytest.mark.parametrize(
    "flags", [(), ("method.module.finetune_task=search", "method.module.pretrain_epochs=0")]
)
def test_one_step_reaches_every_parameter(build, flags, monkeypatch):
    monkeypatch.setattr(USER, "current_epoch", property(lambda self: 0))
    model, batch = build(*flags)
    model.train()
    loss, _ = model.training_loss(batch)
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_a_bad_finetune_task_or_full_ranking_is_refused(build):
    from sar_exp.errors import ConfigError

    with pytest.raises(ConfigError, match="finetune_task must be rec, search or null"):
        build("method.module.finetune_task=both")
    with pytest.raises(ConfigError, match="use eval.mode=sampled"):
        USER(model_schema(), {"name": "sasrec"}, eval_mode="full")


# the two runs of the table (UniSAR Tables 3-4): fine-tuned for rec scored on rec, and
# fine-tuned for search scored on search; here after one pre-training epoch each half
HALVES = {
    "rec": ["method.module.finetune_task=rec", "method.scores=[rec]", "optimized_metric=val/ndcg@5"],
    "search": ["method.module.finetune_task=search", "method.scores=[search]",
               "optimized_metric=val/search/ndcg@5"],
}  # fmt: skip


def test_a_short_fit_through_the_switch_tests_the_fine_tuning_best(make_cfg, tmp_path, monkeypatch):
    """Two real epochs, fine-tuning for rec from the second: the optimiser's state is
    cleared once, at the switch, and the checkpoint tested is a fine-tuning epoch's."""
    from sar_exp.methods.pretrain_finetune import PretrainFinetuneSwitch

    switches = []
    start = PretrainFinetuneSwitch.start_finetuning

    def counted(self):
        switches.append((self.current_epoch, sum(len(o.state) for o in self.trainer.optimizers)))
        start(self)
        assert all(not o.state for o in self.trainer.optimizers)

    monkeypatch.setattr(PretrainFinetuneSwitch, "start_finetuning", counted)
    cfg = make_cfg("method=user", *HALVES["rec"][:-1], "method.module.pretrain_epochs=1",
                   "trainer.max_epochs=2", "callbacks.early_stopping.patience=1",
                   HALVES["rec"][-1], output_dir=tmp_path)  # fmt: skip
    metrics = train(cfg)
    assert [epoch for epoch, _ in switches] == [1] and switches[0][1] > 0  # Adam had state
    best = torch.load(
        tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False
    )
    assert best["epoch"] == 1 and best["finetuning_started"] is True
    assert 0.0 <= metrics["test/ndcg@5"] <= 1.0


def test_fine_tuning_needs_an_epoch(make_cfg, tmp_path):
    from sar_exp.errors import ConfigError

    cfg = make_cfg("method=user", "method.module.finetune_task=rec", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.max_epochs > method.module.pretrain_epochs"):
        train(cfg)  # max_epochs 1, pretrain_epochs 5


@pytest.mark.parametrize("half", [None, "search"])
def test_one_epoch_on_the_embedded_data(make_cfg, tmp_path, half):
    overrides = [*HALVES[half], "method.module.pretrain_epochs=0"] if half else []
    metrics = train(make_cfg("method=user", *overrides, output_dir=tmp_path))
    print({k: round(v, 4) for k, v in metrics.items() if k.startswith("test/")})
    keys = {None: ["test/ndcg@5", "test/search/ndcg@5"], "search": ["test/search/ndcg@5"]}[half]
    for key in keys:
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0
    if half == "search":
        assert "test/ndcg@5" not in metrics
