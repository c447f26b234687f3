"""The sequential recommenders of the papers' baseline rows (STAMP, DIEN, FMLP-Rec,
BERT4Rec): the piece that makes each that model, and a training epoch of each."""

from __future__ import annotations

import math

import pytest
import torch

from sar_exp.backbones.bert4rec import BERT4RecEncoder, cloze_loss, cloze_sequences
from sar_exp.backbones.dien import AUGRUCell, DIENScorer
from sar_exp.backbones.fmlp import FilterLayer, FMLPRecEncoder
from sar_exp.backbones.sequence import right_aligned
from sar_exp.backbones.stamp import STAMPEncoder
from sar_exp.errors import ConfigError
from sar_exp.train import train

B, L, D = 5, 6, 8


@pytest.fixture
def history():
    torch.manual_seed(0)
    mask = torch.arange(L)[None] < torch.tensor([0, 1, 3, 6, 4])[:, None]
    return torch.randn(B, L, D) * mask[..., None], mask


def test_stamp_scores_by_the_trilinear_product_of_h_s_h_t_and_the_item(history):
    steps, mask = history
    stamp = STAMPEncoder(D)
    user = stamp(None, steps, mask)
    row, x = 4, steps[4, :4]  # four events: m_s their mean, m_t the fourth
    m_s, m_t = x.mean(0), x[3]
    alpha = stamp.w0(torch.sigmoid(stamp.w1(x) + stamp.w2(m_t) + stamp.w3(m_s) + stamp.b_a))
    m_a = (alpha * x).sum(0)
    h_s, h_t = torch.tanh(stamp.cell_a(m_a)), torch.tanh(stamp.cell_b(m_t))
    item = torch.randn(D)
    assert torch.allclose(user[row] @ item, (h_s * h_t * item).sum(), atol=1e-6)
    # no history: m_s = m_t = m_a = 0, whatever the padding slots hold
    noisy = steps + torch.randn_like(steps) * (~mask)[..., None]
    assert torch.allclose(
        stamp(None, noisy, mask)[0], torch.tanh(stamp.cell_a.bias) * torch.tanh(stamp.cell_b.bias)
    )


def test_right_aligned_puts_the_newest_events_last_and_keeps_at_most_length(history):
    steps, mask = history
    out, valid = right_aligned(steps, mask, 4)
    assert valid.sum(1).tolist() == [0, 1, 3, 4, 4]
    assert torch.equal(out[1, 3], steps[1, 0]) and not out[1, :3].any()
    assert torch.equal(out[3], steps[3, 2:6])  # the newest four of six


def test_fmlp_filter_multiplies_the_spectrum_along_the_sequence():
    torch.manual_seed(0)
    n = 7  # odd: a filter built for another length, or without the ortho scaling, differs
    layer = FilterLayer(n, D, dropout=0.0)
    x = torch.randn(2, n, D)
    # ortho FFT, W, ortho inverse FFT = a circular convolution with irfft(W, n) along the
    # sequence, each channel with its own kernel
    kernel = torch.fft.irfft(torch.view_as_complex(layer.weight), n=n, dim=0)  # [n, D]
    conv = torch.stack([sum(x[:, (t - k) % n] * kernel[k] for k in range(n)) for t in range(n)], 1)
    assert torch.allclose(layer(x), layer.norm(x + conv), atol=1e-5)
    with torch.no_grad():  # W = 1 passes the signal through: LayerNorm(x + x)
        layer.weight.zero_()
        layer.weight[..., 0] = 1.0
    assert torch.allclose(layer(x), layer.norm(2 * x), atol=1e-5)


def test_fmlp_reads_the_newest_event_at_the_last_position(history):
    steps, mask = history
    fmlp = FMLPRecEncoder(D, max_length=L, dropout=0.0).eval()
    user = fmlp(None, steps, mask)
    assert user.shape == (B, D) and torch.isfinite(user).all()
    padded = steps + torch.randn_like(steps) * (~mask)[..., None]
    assert torch.allclose(fmlp(None, padded, mask), user, atol=1e-5)
    # a batch padded to a narrower width gives the same users (the filter's signal is
    # always the last max_length slots, the newest event last)
    narrow = fmlp(None, steps[[1, 2], :3], mask[[1, 2], :3])
    assert torch.allclose(narrow, user[[1, 2]], atol=1e-5)
    changed = steps.clone()
    changed[2, 2] += torch.randn(
        D
    )  # the newest of row 2's three events (not a constant: LayerNorm)
    assert not torch.allclose(fmlp(None, changed, mask)[2], user[2])


def _newest_event_shift(model, datamodule, batch) -> float:
    """How far the user moves, relative to its norm, when its newest event changes (rows
    with a history; eval mode)."""
    model.eval()
    with torch.no_grad():
        user = model.user_representation(batch)
        history = batch["rec_history"].clone()
        rows = torch.arange(len(history))
        newest = (batch["rec_history_mask"].sum(1) - 1).clamp(min=0)  # left-aligned
        history[rows, newest] = history[rows, newest] % datamodule.schema["num_items"] + 1
        other = model.user_representation({**batch, "rec_history": history})
    model.train()
    has_history = batch["rec_history_mask"].any(1)
    return float(((other - user).norm(dim=-1) / user.norm(dim=-1))[has_history].mean())


@pytest.mark.parametrize("backbone, least", [("fmlprec", 0.3), ("bert4rec", 0.05), ("sasrec", 0.1)])
def test_the_newest_event_moves_the_user_from_the_start(build_model, backbone, least):
    """Item + position, then LayerNorm: with PyTorch's N(0, 1) positions (20-30x the
    item tables) the sum was nearly the position alone, the same for every user
    (newest-event shift 0.065 for FMLP-Rec, 0.009 for BERT4Rec, 0.036 for SASRec); the
    papers draw positions at their items' scale (now above 0.3; 0.11 for BERT4Rec: its
    [mask] output averages the whole history at initialisation; 0.17 for SASRec, whose
    user embedding also enters its user representation)."""
    torch.manual_seed(0)
    model, datamodule, batch = build_model(f"backbone={backbone}")
    assert _newest_event_shift(model, datamodule, batch) > least


def test_fmlp_learns_from_the_history_on_the_embedded_data(build_model):
    """The position embeddings are drawn at the item tables' scale, N(0, 0.05^2) (the
    authors draw both from one N(0, 0.02^2)). With PyTorch's N(0, 1) positions, 20x the
    items, LayerNorm(item + position) was nearly LayerNorm(position) for every user: a
    new newest event moved the user by ~6% of its norm, the training loss stayed at
    chance and the model learned to ignore the history. Popularity-drawn negatives, so
    that popularity alone cannot lower the loss."""
    torch.manual_seed(0)
    model, datamodule, batch = build_model(
        "backbone=fmlprec", "dataset.protocol.negatives=popularity"
    )

    def newest_event_shift() -> float:
        return _newest_event_shift(model, datamodule, batch)

    assert newest_event_shift() > 0.3
    optimizer = torch.optim.Adam(model.parameters(), lr=model.lr)
    losses, batches = [], list(datamodule.train_dataloader())
    for step in range(60):
        loss, _ = model.training_loss(batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    k = batch["candidates"].shape[1]
    chance = math.log(k) / k  # the sampled-softmax CE of equal scores (with its 1 / K)
    assert sum(losses[-10:]) / 10 < 0.85 * chance
    assert newest_event_shift() > 0.3


def test_cloze_masks_only_events_and_at_least_one_per_row():
    history = torch.tensor([[3, 4, 0], [5, 0, 0], [0, 0, 0]])
    mask = history > 0
    ids, valid, masked = cloze_sequences(history, mask, torch.tensor([7, 8, 9]), 0.5,
                                         torch.Generator().manual_seed(0))  # fmt: skip
    assert ids.tolist() == [[3, 4, 7, 0], [5, 8, 0, 0], [9, 0, 0, 0]]
    assert valid.sum(1).tolist() == [3, 2, 1]
    assert (masked <= valid).all() and masked.any(1).all()
    # last-item samples: the same sequences again, the clicked item alone masked
    ids2, _, masked2 = cloze_sequences(history, mask, torch.tensor([7, 8, 9]), 0.5,
                                       torch.Generator().manual_seed(0), last_item_samples=True)  # fmt: skip
    assert torch.equal(ids2[:3], ids) and torch.equal(ids2[3:], ids)
    assert ids2[3:][masked2[3:]].tolist() == [7, 8, 9]
    # rate: over many rows about mask_prob of the events are masked
    many = torch.randint(1, 50, (4000, 10))
    _, valid, masked = cloze_sequences(many, many > 0, torch.ones(4000, dtype=torch.long), 0.3)
    assert abs(masked.sum() / valid.sum() - 0.3) < 0.02


def test_cloze_loss_leaves_out_a_negative_that_is_the_masked_item():
    def dot(users, candidates):
        return users.expand(-1, candidates.shape[1]) * 0 + candidates.float()  # score = item id

    positives = torch.tensor([5, 2])
    clean = cloze_loss(dot, torch.zeros(2, 1), positives, torch.tensor([[1, 3], [1, 3]]))
    # the second row's negative 2 is its own item: left out, not a competitor
    hit = cloze_loss(dot, torch.zeros(2, 1), positives, torch.tensor([[1, 3], [2, 3]]))
    expected_second = -torch.log_softmax(torch.tensor([2.0, 3.0]), 0)[0] / 3
    expected_first = -torch.log_softmax(torch.tensor([5.0, 1.0, 3.0]), 0)[0] / 3
    assert torch.allclose(hit, (expected_first + expected_second) / 2)
    assert hit < clean


def test_bert4rec_reads_both_directions_but_predicts_at_an_appended_mask(history):
    steps, mask = history
    bert = BERT4RecEncoder(D, max_length=L, heads=2, dropout=0.0).eval()
    user = bert(None, steps, mask)
    assert user.shape == (B, D) and torch.isfinite(user).all()  # the empty history included
    # bidirectional: the output at the first event depends on the last one
    valid = mask.clone()
    first = bert.encode(steps, valid, torch.zeros_like(mask))[3, 0]
    changed = steps.clone()
    changed[3, 5] += torch.randn(D)
    assert not torch.allclose(bert.encode(changed, valid, torch.zeros_like(mask))[3, 0], first)
    # a masked event is not read: changing it leaves every output unchanged
    masked = torch.zeros_like(mask)
    masked[3, 2] = True
    out = bert.encode(steps, valid, masked)
    other = steps.clone()
    other[3, 2] += torch.randn(D) * 5  # not a constant shift, which LayerNorm would hide
    assert torch.allclose(bert.encode(other, valid, masked), out, atol=1e-6)


def test_augru_attention_scales_the_update_gate():
    torch.manual_seed(0)
    cell = AUGRUCell(D)
    x, h = torch.randn(3, D), torch.randn(3, D)
    assert torch.allclose(cell(x, h, torch.zeros(3)), h)  # a = 0: the state is kept
    # a = 1: a plain GRU. torch orders the gates (r, z, n) and keeps z of the old state,
    # so its z is DIEN's 1 - u: the same cell with the update gate's weights negated.
    gru = torch.nn.GRUCell(D, D)
    sign = torch.cat([-torch.ones(D), torch.ones(2 * D)])
    order = [*range(D, 2 * D), *range(D), *range(2 * D, 3 * D)]
    with torch.no_grad():
        for mine, theirs in ((cell.from_input, "ih"), (cell.from_state, "hh")):
            getattr(gru, f"weight_{theirs}").copy_((mine.weight * sign[:, None])[order])
            getattr(gru, f"bias_{theirs}").copy_((mine.bias * sign)[order])
    assert torch.allclose(cell(x, h, torch.ones(3)), gru(x, h), atol=1e-6)


def test_dien_scores_each_candidate_with_its_own_evolved_interest(history):
    steps, mask = history
    dien = DIENScorer(4, D)
    user, items = torch.randn(B, 4), torch.randn(B, 3, D)
    scores = dien(user, items, steps, mask)
    assert scores.shape == (B, 3) and torch.isfinite(scores).all()
    one_by_one = torch.cat([dien(user, items[:, k : k + 1], steps, mask) for k in range(3)], 1)
    assert torch.allclose(scores, one_by_one, atol=1e-6)


def test_dien_evolves_each_user_over_its_own_events_only(history):
    # users of every length (0 to L) in one batch, run longest first and stopped at their
    # last event: each row must equal the AUGRU stepped over that user's events alone
    steps, mask = history
    dien = DIENScorer(4, D)
    attention = torch.softmax(torch.randn(B, 3, L), dim=-1)
    evolved = dien.evolve(steps, attention, mask)
    for b, n in enumerate(mask.sum(1).tolist()):
        for k in range(3):
            h = torch.zeros(1, D)
            for t in range(n):
                h = dien.evolver(steps[b, t][None], h, attention[b, k, t][None])
            assert torch.allclose(evolved[b, k], h[0], atol=1e-6), (b, k)


def test_dien_keeps_every_parameter_in_the_graph_when_no_user_has_history():
    # DDP fails on a rank whose batch leaves a parameter without a gradient
    dien = DIENScorer(4, D)
    steps, mask = torch.zeros(3, 1, D), torch.zeros(3, 1, dtype=torch.bool)
    scores = dien(torch.randn(3, 4), torch.randn(3, 2, D), steps, mask)
    (scores.sum() + dien.auxiliary_loss(steps, mask, torch.randn(3, 1, D))).backward()
    assert [n for n, p in dien.named_parameters() if p.grad is None] == []


def test_dien_auxiliary_loss_pairs_h_t_with_the_next_event(history):
    steps, mask = history
    dien = DIENScorer(4, D)
    negatives = torch.randn(B, L, D)
    states, _, _ = dien.interests(steps, mask)
    terms = []
    for b, n in enumerate(mask.sum(1).tolist()):
        for t in range(n - 1):  # h_t against e_{t+1} and the negative drawn for t + 1
            terms.append(torch.nn.functional.softplus(-states[b, t] @ steps[b, t + 1])
                         + torch.nn.functional.softplus(states[b, t] @ negatives[b, t + 1]))  # fmt: skip
    assert torch.allclose(dien.auxiliary_loss(steps, mask, negatives), torch.stack(terms).mean())


# DIEN's AUGRU pass per candidate and BERT4Rec's Cloze epoch take ~10 s each: `make test-slow`
@pytest.mark.parametrize("backbone", ["stamp", pytest.param("dien", marks=pytest.mark.slow), "fmlprec",
                                      pytest.param("bert4rec", marks=pytest.mark.slow)])  # fmt: skip
def test_one_epoch_on_the_embedded_data(make_cfg, backbone, tmp_path):
    metrics = train(make_cfg(f"backbone={backbone}", output_dir=tmp_path))
    assert 0.0 <= metrics["test/ndcg@5"] <= 1.0 and metrics["test/hr@10"] > 0.0


@pytest.mark.parametrize("backbone", ["stamp", "dien", "fmlprec", "bert4rec"])
def test_one_step_reaches_every_parameter(build_model, backbone):
    model, _, batch = build_model(f"backbone={backbone}")
    loss, _ = model.training_loss(batch)
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_bert4rec_refuses_the_ctr_task(make_cfg):
    with pytest.raises(
        ConfigError, match="backbone=bert4rec works with task=ranking only, got task=ctr"
    ):
        train(make_cfg("backbone=bert4rec", "task=ctr"))


@pytest.mark.parametrize("backbone", ["stamp", "fmlprec", "bert4rec"])
def test_candidates_are_scored_with_the_embeddings_the_history_reads(build_model, backbone):
    model, datamodule, _ = build_model(f"backbone={backbone}")
    model.eval()
    assert model.item_encoder is None and model.users is None
    batch = next(iter(datamodule.val_dataloader()[0] if isinstance(datamodule.val_dataloader(), list)
                      else datamodule.val_dataloader()))  # fmt: skip
    with torch.no_grad():
        user = model.user_representation(batch)
        expected = (user.unsqueeze(1) * model.items(batch["candidates"])).sum(-1)
        if backbone == "bert4rec":
            expected = expected + model.item_bias(batch["candidates"]).squeeze(-1)
        assert torch.allclose(model.score(batch, batch["candidates"]), expected, atol=1e-5)


def test_dien_refuses_full_ranking(make_cfg):
    with pytest.raises(ConfigError, match="backbone=dien scores each candidate with its own pass"):
        train(make_cfg("backbone=dien", "eval.mode=full"))
