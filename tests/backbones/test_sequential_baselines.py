"""The sequential recommenders of the papers' baseline rows (STAMP, DIEN, FMLP-Rec,
BERT4Rec): the piece that makes each that model, and a training epoch of each."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from sar_exp.backbones.bert4rec import BERT4RecEncoder, cloze_sequences
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
    alpha, _, newest = stamp.attention(steps, mask)
    row = 3  # a full history: m_a over all six events, m_t the sixth
    memory = (alpha[row, :, None] * steps[row]).sum(0)
    h_s, h_t = torch.tanh(stamp.cell_a(memory)), torch.tanh(stamp.cell_b(steps[row, 5]))
    item = torch.randn(D)
    assert torch.allclose(newest[row], steps[row, 5])
    assert torch.allclose(user[row] @ item, (h_s * h_t * item).sum(), atol=1e-6)
    # the newest item enters through h_t: changing it changes the user
    changed = steps.clone()
    changed[row, 5] += 1.0
    assert not torch.allclose(stamp(None, changed, mask)[row], user[row])


def test_right_aligned_puts_the_newest_events_last_and_keeps_at_most_length(history):
    steps, mask = history
    out, valid = right_aligned(steps, mask, 4)
    assert valid.sum(1).tolist() == [0, 1, 3, 4, 4]
    assert torch.equal(out[1, 3], steps[1, 0]) and not out[1, :3].any()
    assert torch.equal(out[3], steps[3, 2:6])  # the newest four of six


def test_fmlp_filter_multiplies_the_spectrum_along_the_sequence():
    torch.manual_seed(0)
    layer = FilterLayer(6, D, dropout=0.0)
    x = torch.randn(2, 6, D)
    weight = torch.view_as_complex(layer.weight)
    # the filter alone, computed as a circular convolution in the time domain
    kernel = torch.fft.irfft(weight, n=6, dim=0)  # [6, D]
    conv = torch.stack([sum(x[:, (t - s) % 6] * kernel[s] for s in range(6)) for t in range(6)], 1)
    expected = layer.norm(x + conv / 6**0.5 * 6**0.5)  # ortho FFT, ortho inverse: same scale
    assert torch.allclose(layer(x), expected, atol=1e-5)
    # with an identity filter (W = 1) the layer is LayerNorm(2x)
    with torch.no_grad():
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


def test_cloze_masks_only_events_and_at_least_one_per_row():
    history = torch.tensor([[3, 4, 0], [5, 0, 0], [0, 0, 0]])
    mask = history > 0
    ids, valid, masked = cloze_sequences(history, mask, torch.tensor([7, 8, 9]), 0.5,
                                         torch.Generator().manual_seed(0))  # fmt: skip
    assert ids.tolist() == [[3, 4, 7, 0], [5, 8, 0, 0], [9, 0, 0, 0]]
    assert valid.sum(1).tolist() == [3, 2, 1]
    assert (masked <= valid).all() and masked.any(1).all()
    # rate: over many rows about mask_prob of the events are masked
    many = torch.randint(1, 50, (4000, 10))
    _, valid, masked = cloze_sequences(many, many > 0, torch.ones(4000, dtype=torch.long), 0.3)
    assert abs(masked.sum() / valid.sum() - 0.3) < 0.02


def test_bert4rec_reads_both_directions_but_predicts_at_an_appended_mask(history):
    steps, mask = history
    bert = BERT4RecEncoder(D, max_length=L, heads=2, dropout=0.0).eval()
    user = bert(None, steps, mask)
    assert user.shape == (B, D) and torch.isfinite(user).all()  # the empty history included
    # bidirectional: the output at the first event depends on the last one
    valid = mask.clone()
    first = bert.encode(steps, valid, torch.zeros_like(mask))[3, 0]
    changed = steps.clone()
    changed[3, 5] += 1.0
    assert not torch.allclose(bert.encode(changed, valid, torch.zeros_like(mask))[3, 0], first)
    # a masked event is not read: changing it leaves every output unchanged
    masked = torch.zeros_like(mask)
    masked[3, 2] = True
    out = bert.encode(steps, valid, masked)
    other = steps.clone()
    other[3, 2] += 5.0
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
    items = torch.randn(B, 3, D)
    scores = dien(torch.randn(B, 4), items, steps, mask)
    assert scores.shape == (B, 3) and torch.isfinite(scores).all()
    # the auxiliary loss: a history whose next events match h_t costs less than random ones
    states, _, valid = dien.interests(steps, mask)
    aligned = torch.cat([states[:, :1], states[:, :-1]], dim=1) * 3  # e_{t+1} = 3 h_t
    good = dien.auxiliary_loss(aligned, mask, -aligned)
    bad = dien.auxiliary_loss(aligned, mask, aligned)
    assert good < bad


@pytest.mark.parametrize("backbone", ["stamp", "dien", "fmlprec", "bert4rec"])
def test_one_epoch_on_the_embedded_data(make_cfg, backbone, tmp_path):
    metrics = train(make_cfg(f"backbone={backbone}", output_dir=tmp_path))
    assert 0.0 <= metrics["test/ndcg@5"] <= 1.0 and metrics["test/hr@10"] > 0.0


@pytest.mark.parametrize("backbone", ["stamp", "dien", "fmlprec", "bert4rec"])
def test_one_step_reaches_every_parameter(make_cfg, backbone):
    cfg = make_cfg(f"backbone={backbone}")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    build = hydra.utils.instantiate(cfg.method.module, _partial_=True, _convert_="all")
    model = build(schema=datamodule.schema, backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
                  task=cfg.task, lookup_tables=datamodule.lookup_tables())  # fmt: skip
    loss, _ = model.training_loss(next(iter(datamodule.train_dataloader())))
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_bert4rec_refuses_the_ctr_task(make_cfg):
    with pytest.raises(
        ConfigError, match="backbone=bert4rec works with task=ranking only, got task=ctr"
    ):
        train(make_cfg("backbone=bert4rec", "task=ctr"))
