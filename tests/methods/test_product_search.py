"""The personalized product search baselines (UniSAR's Table 4): what sets each model
apart, and a training epoch of each on the embedded data's search task."""

from __future__ import annotations

import pytest
import torch

from sar_exp.errors import ConfigError
from sar_exp.methods import copps
from sar_exp.methods.losses import info_nce
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


@pytest.mark.parametrize("model", ["qem", "hem", "aem", "zam", "tem", "copps"])
def test_one_step_reaches_every_parameter(build, model):
    module, batch = build(model)
    loss, _ = module.training_loss(batch)
    loss.backward()
    assert [name for name, p in module.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("model", ["qem", "zam", "tem", "copps"])
def test_one_epoch_reports_search_metrics_only(make_cfg, model, tmp_path):
    metrics = train(make_cfg(f"method={model}", *SEARCH_ONLY, output_dir=tmp_path))
    assert 0.0 < metrics["test/search/ndcg@5"] <= 1.0
    assert "test/ndcg@5" not in metrics  # no rec model


def test_a_search_model_refuses_to_score_rec(build):
    with pytest.raises(ConfigError, match="method=qem is a search model: it cannot score rec"):
        build("qem", "method.scores=[rec,search]")


# ------------------------------------------------------------ CoPPS
RATIOS = {"crop": 0.6, "mask": 0.3, "reorder": 0.6}


def _histories():
    """Three left-aligned histories of 10, 5 and 1 steps (ids 1.., 0 padding)."""
    valid = torch.arange(10)[None, :] < torch.tensor([10, 5, 1])[:, None]
    ids = torch.where(valid, torch.arange(1, 11) + torch.tensor([0, 100, 200])[:, None], 0)
    return ids, valid


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_copps_crop_keeps_one_contiguous_span_of_the_drawn_share():
    _, valid = _histories()
    starts = set()
    for seed in range(20):
        kept = copps.crop(valid, 0.6, _generator(seed))
        assert not (kept & ~valid).any()
        assert kept.sum(1).tolist() == [6, 3, 1]  # floor(0.6 n), at least one
        for row in kept:
            slots = row.nonzero().squeeze(1)
            assert torch.equal(slots, torch.arange(int(slots[0]), int(slots[0]) + len(slots)))
        starts.add(int(kept[0].nonzero()[0]))
    assert len(starts) > 1 and max(starts) <= 4  # the start is drawn, the span fits


def test_copps_mask_draws_exactly_its_share_of_the_steps():
    _, valid = _histories()
    draws = set()
    for seed in range(20):
        masked = copps.mask(valid, 0.3, _generator(seed))
        assert not (masked & ~valid).any()
        assert masked.sum(1).tolist() == [3, 1, 0]  # floor(0.3 n)
        draws.add(tuple(masked[0].nonzero().squeeze(1).tolist()))
    assert len(draws) > 1


def test_copps_reorder_shuffles_one_contiguous_window_only():
    _, valid = _histories()
    shuffled = False
    full_windows = set()  # starts of the draws that moved a whole floor(0.6 n) span
    for seed in range(20):
        order = copps.reorder(valid, 0.6, _generator(seed))
        for row, n in zip(order, (10, 5, 1)):
            assert sorted(row.tolist()) == list(range(10))  # a permutation
            moved = (row != torch.arange(10)).nonzero().squeeze(1)
            if len(moved):
                shuffled = True
                assert int(moved.max()) < n  # only valid steps move
                assert int(moved.max() - moved.min()) < int(0.6 * n)  # within one window
                window = torch.arange(int(moved.min()), int(moved.max()) + 1)
                assert sorted(row[window].tolist()) == window.tolist()
                if n == 10 and len(window) == 6:
                    full_windows.add(int(moved.min()))
    assert shuffled
    # the window is floor(0.6 n) long and its start is drawn, not always the first step
    assert full_windows and max(full_windows) > 0


def test_copps_reorder_keeps_the_slots_outside_its_window_when_keys_round_up(monkeypatch):
    """u = 1 - 2^-24 (the largest float32 below 1): in float32, start + u size rounds to
    start + size, the key of the slot after the window (here padding), and an unstable
    sort may move that slot into the window."""
    monkeypatch.setattr(copps, "_uniform", lambda shape, generator, device: torch.full(
        shape, 1 - 2**-24, device=device))  # fmt: skip
    n = torch.tensor([10, 5, 3])
    valid = torch.arange(20)[None, :] < n[:, None]
    order = copps.reorder(valid, 0.6, None)
    for row, count in zip(order, n.tolist()):
        size = int(0.6 * count)
        start = count - size  # floor(u (n - size + 1)) with u just below 1
        outside = torch.cat([torch.arange(start), torch.arange(count, 20)])
        assert torch.equal(row[outside], outside)
        assert sorted(row[start:count].tolist()) == list(range(start, count))


def test_copps_views_hold_only_the_rows_own_steps_and_follow_the_generator():
    ids, valid = _histories()
    view, view_valid, masked = copps.augment(ids, valid, RATIOS, _generator(0))
    for row in range(3):
        assert set(view[row][view_valid[row]].tolist()) <= set(ids[row][valid[row]].tolist())
        n = int(view_valid[row].sum())
        assert view_valid[row, :n].all() and not view_valid[row, n:].any()  # left-aligned
    assert not (masked & ~view_valid).any()
    again = copps.augment(ids, valid, RATIOS, _generator(0))
    assert all(torch.equal(x, y) for x, y in zip((view, view_valid, masked), again))
    others = [copps.augment(ids, valid, RATIOS, _generator(s)) for s in range(1, 6)]
    assert any(not torch.equal(o[0], view) or not torch.equal(o[1], view_valid) for o in others)
    # one operator per row, each of the three drawn: 60 rows of 10 steps
    many = ids[:1].expand(60, -1)
    view, view_valid, masked = copps.augment(many, valid[:1].expand(60, -1), RATIOS, _generator(0))
    cropped = view_valid.sum(1) == 6
    with_mask = masked.sum(1) == 3
    reordered = (view != many).any(1) & ~cropped
    assert cropped.any() and with_mask.any() and reordered.any()
    assert (cropped.int() + with_mask.int() + reordered.int()).max() == 1


def test_info_nce_is_the_cross_entropy_over_the_slots_not_ignored():
    torch.manual_seed(0)
    scores = torch.randn(5, 7)
    target = torch.tensor([0, 3, 6, 2, 2])
    one = torch.nn.functional.one_hot(target, 7).bool()
    ce = torch.nn.functional.cross_entropy(scores, target)
    assert torch.allclose(info_nce(scores, one), ce)
    # ignored slots leave the denominator: whatever their scores
    ignore = torch.zeros(5, 7, dtype=torch.bool)
    ignore[0, 1] = ignore[1, 0] = ignore[4, 5] = ignore[4, 6] = True
    ce = torch.nn.functional.cross_entropy(scores.masked_fill(ignore, float("-inf")), target)
    assert torch.allclose(info_nce(scores, one, ignore), ce)
    assert torch.allclose(info_nce(scores + 10.0 * ignore, one, ignore), ce)
    # several positives (an ignored one is not one): the mean of their -log p per anchor,
    # averaged over the anchors with a positive (anchor 3 has none)
    positive = torch.zeros(5, 7, dtype=torch.bool)
    positive[0, [0, 1, 4]] = positive[1, [2, 3]] = positive[2, 6] = positive[4, [0, 5]] = True
    losses = []
    for i in range(5):
        allowed = ~ignore[i]
        mine = positive[i] & allowed
        if mine.any():
            log_p = scores[i] - torch.logsumexp(scores[i][allowed], 0)
            losses.append(-log_p[mine].mean())
    assert torch.allclose(info_nce(scores, positive, ignore), torch.stack(losses).mean())
    # no positive at all: 0, still on the graph
    none = info_nce(scores.requires_grad_(), torch.zeros_like(positive))
    assert none == 0 and none.requires_grad


def test_copps_shared_pairs_pairs_rows_on_the_query_and_its_item_together():
    # row 0: (1, 3), (5, 8); row 1: query 1 with another item, row 0's pair in padding;
    # row 2: item 3 under another query; row 3: row 0's (1, 3)
    queries = torch.tensor([[1, 5], [1, 1], [2, 0], [1, 9]])
    items = torch.tensor([[3, 8], [4, 3], [3, 0], [3, 9]])
    valid = torch.tensor([[True, True], [True, False], [True, False], [True, True]])
    assert copps.shared_pairs(queries, items, valid).tolist() == [
        [True, False, False, True],
        [False, True, False, False],
        [False, False, True, False],
        [True, False, False, True],
    ]


def test_copps_cross_user_contrast_leaves_the_same_user_s_rows_out():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    users = torch.tensor([0, 0, 1, 2])
    similar = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]]).bool()
    cos = torch.nn.functional.cosine_similarity(a[:, None], b[None, :], dim=-1) / 0.1
    losses = []
    for i in range(4):
        others = [j for j in range(4) if users[j] != users[i]]
        positives = [j for j in others if similar[i, j]]
        lse = torch.logsumexp(cos[i, others], 0)
        losses.append(-sum(cos[i, p] - lse for p in positives) / len(positives))
    expected = torch.stack(losses).mean()
    got = copps.cross_user_contrast(a, b, users, similar, 0.1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_copps_sequence_contrast_is_the_cosine_s():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    user = torch.tensor([0, 1, 1, 2, 3, 4])
    scaled = copps.sequence_contrast(a * torch.rand(6, 1) * 5, b * 0.1, user, 0.1)
    assert torch.allclose(scaled, copps.sequence_contrast(a, b, user, 0.1), atol=1e-5)


def test_copps_contrast_is_lower_when_the_views_agree():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    user = torch.arange(8)
    agree = copps.sequence_contrast(a, a + 0.01 * torch.randn(8, 16), user, 0.1)
    shuffled = copps.sequence_contrast(a, a[torch.randperm(8)], user, 0.1)
    assert agree < shuffled
    # the same user's other rows are not negatives: with one user in every row, each
    # view's denominator holds its positive alone
    one_user = torch.zeros(8, dtype=torch.long)
    assert copps.sequence_contrast(a, a[torch.randperm(8)], one_user, 0.1).abs() < 1e-6
    # cross-user: rows sharing a (query, item) pair are positives
    queries = torch.tensor([[1, 2], [1, 5], [7, 0]])
    items = torch.tensor([[3, 4], [3, 6], [9, 0]])
    valid = torch.tensor([[True, True], [True, True], [True, False]])
    similar = copps.shared_pairs(queries, items, valid)
    assert similar.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    b = torch.randn(3, 16)
    close = torch.stack([b[0], b[0] + 0.01 * torch.randn(16), b[2]])
    users = torch.arange(3)
    assert copps.cross_user_contrast(close, close, users, similar, 0.1) < (
        copps.cross_user_contrast(b, b, users, similar, 0.1)
    )
    # no other user shares a pair: nothing to contrast
    alone = torch.eye(3, dtype=torch.bool)
    assert copps.cross_user_contrast(b, b, users, alone, 0.1) == 0


def test_copps_is_tem_with_the_contrastive_losses_added(build):
    tem, batch = build("tem")
    zero, _ = build("copps", "method.module.cl_weight=0", "method.module.cross_user_weight=0")
    full, _ = build("copps", "method.module.cl_weight=0.2",
                    "method.module.cross_user_weight=0.05")  # fmt: skip
    assert zero.mask_token is None and full.mask_token is not None
    zero.load_state_dict(tem.state_dict())
    full.load_state_dict(tem.state_dict(), strict=False)
    for module in (tem, zero, full):
        module.eval()  # no dropout: the same batch gives the same search loss
    tem_loss, _ = tem.training_loss(batch)
    assert torch.equal(zero.training_loss(batch)[0], tem_loss)
    loss, parts = full.training_loss(batch)
    assert parts["cl_seq"] > 0 and parts["cl_user"] > 0  # the embedded data have shared pairs
    expected = tem_loss + 0.2 * parts["cl_seq"] + 0.05 * parts["cl_user"]
    assert torch.allclose(loss, expected)
    # the views come from the (seed, rank, step) generator: the same step draws the same
    assert torch.equal(full.training_loss(batch)[0], loss)


def test_copps_draws_two_views_in_turn_and_never_reads_the_target(build, monkeypatch):
    module, batch = build("copps")
    module.eval()  # no dropout: the same views give the same losses
    drawn, augment = [], copps.augment

    def recording(*args, **kwargs):
        drawn.append(augment(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(copps, "augment", recording)
    parts = module.contrastive_losses(batch)
    assert len(drawn) == 2
    (ids_a, valid_a, masked_a), (ids_b, valid_b, masked_b) = drawn
    assert ((ids_a != ids_b) | (valid_a != valid_b) | (masked_a != masked_b)).any()
    # the two views are the step generator's first two draws, in that order
    hp = module.hparams
    rows = batch["search_click_history_mask"].any(1)
    ids, valid = batch["search_click_history_item"][rows], batch["search_click_history_mask"][rows]
    ratios = {"crop": hp.crop_ratio, "mask": hp.mask_ratio, "reorder": hp.reorder_ratio}
    generator = module.step_generator()
    views = [module.sequence_view(*augment(ids, valid, ratios, generator)) for _ in range(2)]
    expected = copps.sequence_contrast(*views, batch["user"][rows], hp.temperature)
    assert torch.allclose(parts["cl_seq"], expected)
    # another target (item and query) for every sample: the same contrastive losses
    target = {**batch, "item": batch["item"].roll(1, 0) % 3 + 1,
              "query": batch["query"].flip(0)}  # fmt: skip
    assert not torch.equal(target["item"], batch["item"])
    assert not torch.equal(target["query"], batch["query"])
    moved = module.contrastive_losses(target)
    assert torch.equal(moved["cl_seq"], parts["cl_seq"])
    assert torch.equal(moved["cl_user"], parts["cl_user"])
