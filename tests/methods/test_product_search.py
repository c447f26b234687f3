"""The personalized product search baselines (UniSAR's Table 4): what sets each model
apart, and a training epoch of each on the embedded data's search task."""

from __future__ import annotations

import pytest
import torch

from sar_exp.errors import ConfigError
from sar_exp.train import train

SEARCH_ONLY = ("protocol=unisar", "dataset.protocol.evaluated_tasks=[rec,search]",
               "optimized_metric=val/search/ndcg@5")  # fmt: skip


@pytest.fixture
def build(build_model):
    def _build(model: str, *overrides):
        module, _, batch = build_model(f"method={model}", *SEARCH_ONLY, *overrides)
        return module, batch

    return _build


def test_qem_ignores_the_user_and_hem_mixes_a_latent_user_in(build):
    qem, batch = build("qem")
    other_user = {**batch, "user": batch["user"].flip(0),
                  "search_click_history_item": batch["search_click_history_item"].flip(0)}  # fmt: skip
    candidates = batch["candidates"]
    assert torch.equal(
        qem.search_scores(batch, candidates), qem.search_scores(other_user, candidates)
    )
    hem, _ = build("hem")
    expected = 0.5 * hem.query(batch) + 0.5 * hem.user_map(hem.users(batch["user"]))
    assert torch.allclose(hem.personalised_query(batch), expected)


def test_zam_is_aem_with_a_zero_vector_among_the_attended_items(build):
    aem, batch = build("aem")
    zam, _ = build("zam")
    zam.load_state_dict(aem.state_dict())
    query = aem.query(batch)
    items, mask = aem.history(batch)
    scores = aem.attention_heads(
        torch.einsum("bld,bhd->blh", items,
                     torch.tanh(aem.attention_query(query)).view(len(query), -1, items.shape[-1]))
    ).squeeze(-1)  # fmt: skip
    exp = scores.exp() * mask
    aem_user = torch.einsum("bl,bld->bd", exp / exp.sum(1, keepdim=True).clamp(min=1e-30), items)
    zam_user = torch.einsum("bl,bld->bd", exp / (1 + exp.sum(1, keepdim=True)), items)  # + exp(0)
    assert torch.allclose(aem.attended_user(query, items, mask), aem_user, atol=1e-6)
    assert torch.allclose(zam.attended_user(query, items, mask), zam_user, atol=1e-6)
    # no history: AEM's user is 0, as ZAM's
    empty = torch.zeros_like(mask)
    assert not zam.attended_user(query, items, empty).any()
    assert not aem.attended_user(query, items, empty).any()


def test_tem_reads_the_query_with_the_history(build):
    tem, batch = build("tem")
    tem.eval()
    query = tem.query(batch)
    items, mask = tem.history(batch)
    row = int(mask.sum(1).argmax())
    user = tem.transformer_user(query, items, mask)
    changed = items.clone()
    changed[row, 0] += torch.randn(items.shape[-1])
    assert not torch.allclose(tem.transformer_user(query, changed, mask)[row], user[row])
    padded = items + torch.randn_like(items) * (~mask)[..., None]
    assert torch.allclose(tem.transformer_user(query, padded, mask), user, atol=1e-5)
    # M is the output at the query: another query, the same history, another M
    other = tem.transformer_user(query.roll(1, 0), items, mask)
    assert not torch.allclose(other[row], user[row])
    assert tem.positions.weight.std() < 0.1  # positions start at the item tables' scale


@pytest.mark.parametrize("model", ["qem", "hem", "aem", "zam", "tem"])
def test_one_step_reaches_every_parameter(build, model):
    module, batch = build(model)
    loss, _ = module.training_loss(batch)
    loss.backward()
    assert [name for name, p in module.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("model", ["qem", "zam", "tem"])
def test_one_epoch_reports_search_metrics_only(make_cfg, model, tmp_path):
    metrics = train(make_cfg(f"method={model}", *SEARCH_ONLY, output_dir=tmp_path))
    assert 0.0 < metrics["test/search/ndcg@5"] <= 1.0
    assert "test/ndcg@5" not in metrics  # no rec model


def test_a_search_model_refuses_to_score_rec(build):
    with pytest.raises(ConfigError, match="method=qem is a search model: it cannot score rec"):
        build("qem", "method.scores=[rec,search]")
