"""Backbones: output shapes, empty histories, and SASRec's causal masking."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from sar_exp.backbones.din import DINScorer
from sar_exp.backbones.embeddings import FeatureEmbedding, QueryEncoder
from sar_exp.backbones.gru4rec import GRU4RecEncoder
from sar_exp.backbones.mlp import MLPEncoder
from sar_exp.backbones.mmoe import MMoEEncoder
from sar_exp.backbones.sasrec import GROUP_BELOW_FILL, SASRecEncoder, newest_first_positions
from sar_exp.backbones.sequence import LengthGroups

B, L, DU, DS, H = 6, 7, 96, 160, 128


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    mask = torch.arange(L)[None] < torch.tensor([0, 1, 3, 7, 7, 2])[:, None]
    return torch.randn(B, DU), torch.randn(B, L, DS) * mask[..., None], mask


@pytest.mark.parametrize(
    "encoder",
    [
        MLPEncoder(DU, H, layers=3),
        MMoEEncoder(DU, H, layers=3, experts=2),
        GRU4RecEncoder(DU, DS, H, layers=2),
        SASRecEncoder(DU, DS, H, layers=2, heads=2),
    ],
    ids=["mlp", "mmoe", "gru4rec", "sasrec"],
)
def test_user_encoders_give_one_finite_vector_per_user(encoder, inputs):
    out = encoder(*inputs)
    assert out.shape == (B, H)
    assert torch.isfinite(out).all()  # the user with no history included


def test_sequence_encoders_ignore_padding(inputs):
    user, steps, mask = inputs
    for encoder in (GRU4RecEncoder(DU, DS, H), SASRecEncoder(DU, DS, H)):
        encoder.eval()
        noisy = steps + torch.randn_like(steps) * (~mask)[..., None]
        assert torch.allclose(encoder(user, steps, mask), encoder(user, noisy, mask), atol=1e-5)


def test_din_scores_each_candidate(inputs):
    user, steps, mask = inputs
    din = DINScorer(DU, DS, 32, use_query_history=True)
    items = torch.randn(B, 5, DS)
    scores = din(
        user, items, steps, mask, torch.randn(B, 4, 32), torch.ones(B, 4, dtype=torch.bool)
    )
    assert scores.shape == (B, 5) and torch.isfinite(scores).all()


def test_din_attention_is_the_mlp_on_the_concatenated_features(inputs):
    """DIN Eq. 1: a(e_j, e_i) = MLP([e_j, e_i, e_j - e_i, e_j * e_i]); the first layer is
    computed by column blocks (per slot, per candidate, per pair): outputs and gradients
    must be the concatenation's."""
    from sar_exp.backbones.din import TargetAttention

    _, steps, mask = inputs
    attention = TargetAttention(DS)
    items = torch.randn(B, 5, DS)

    def concatenated(history, mask, target):
        h = history.unsqueeze(1).expand(-1, target.shape[1], -1, -1)
        t = target.unsqueeze(2).expand_as(h)
        weights = attention.score(torch.cat([h, t, h - t, h * t], dim=-1)).squeeze(-1)
        return torch.einsum("bkl,bkld->bkd", weights * mask.unsqueeze(1), h)

    results = []
    for forward in (attention, concatenated):
        attention.zero_grad()
        out = forward(steps, mask, items)
        out.square().sum().backward()
        results.append([out, *(p.grad.clone() for p in attention.parameters())])
    for blocks, whole in zip(*results, strict=True):
        # float32 sums in another order: within 1e-5 of the tensor's largest entry
        assert (blocks - whole).abs().max() <= 1e-5 * whole.abs().max().clamp(min=1)


def test_feature_embedding_concatenates_id_and_attributes():
    table = torch.tensor([[0, 0], [1, 2], [2, 1]])
    emb = FeatureEmbedding(2, [2, 2], 4, table)
    out = emb(torch.tensor([1, 2]))
    assert out.shape == (2, 12)  # Eq. 1: [id | a1 | a2]
    assert torch.equal(out[0, 4:8], emb.attributes[0].weight[1])
    assert torch.equal(out[0, 8:12], emb.attributes[1].weight[2])


def test_query_is_the_mean_of_its_words():
    words = torch.tensor([[0, 0, 0], [1, 2, 0], [3, 0, 0]])
    enc = QueryEncoder(3, 4, words)
    out = enc(torch.tensor([1, 2, 0]))
    assert torch.allclose(out[0], (enc.words.weight[1] + enc.words.weight[2]) / 2)
    assert torch.allclose(out[1], enc.words.weight[3])
    assert torch.equal(out[2], torch.zeros(4))


@pytest.mark.parametrize(
    "encoder_class", [GRU4RecEncoder, SASRecEncoder], ids=["gru4rec", "sasrec"]
)
def test_a_mask_with_holes_reads_like_its_compacted_form(encoder_class):
    """Valid steps after a masked one must still be read, the newest included."""
    torch.manual_seed(0)
    encoder = encoder_class(DU, DS, H).eval()
    user, steps = torch.randn(3, DU), torch.randn(3, 5, DS)
    holes = torch.tensor([[1, 0, 1, 0, 1], [0, 0, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    compact = torch.zeros_like(steps)
    compact_mask = torch.zeros_like(holes)
    for row in range(3):
        valid = steps[row][holes[row]]
        compact[row, : len(valid)] = valid
        compact_mask[row, : len(valid)] = True
    assert torch.allclose(
        encoder(user, steps, holes), encoder(user, compact, compact_mask), atol=1e-5
    )
    # and the newest valid step of a row with holes counts
    changed = steps.clone()
    changed[0, 4] += 1.0
    assert not torch.allclose(encoder(user, steps, holes)[0], encoder(user, changed, holes)[0])


def sasrec_on_the_whole_batch(encoder: SASRecEncoder, user, steps, mask) -> torch.Tensor:
    """SASRec as one call on the padded batch (left-aligned histories): the reference."""
    length = steps.shape[1]
    x = encoder.project(steps) + encoder.positions(newest_first_positions(mask))
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    lengths = mask.sum(1)
    padding = ~mask
    padding[:, 0] &= lengths > 0
    out = encoder.norm(encoder.encoder(x, mask=causal, src_key_padding_mask=padding))
    newest = out[torch.arange(len(out)), (lengths - 1).clamp(min=0)] * (lengths > 0)[:, None]
    return encoder.combine(torch.cat([user, newest], dim=-1))


class ItemPlusPositionOnly(torch.nn.Module):
    """In place of SASRec's transformer: its input, untouched."""

    def forward(self, x, mask=None, src_key_padding_mask=None):
        return x


def test_sasrec_gives_the_newest_step_one_position_whatever_the_history_length():
    """SASRec pads on the left, so the newest step has the last position in every row:
    with the attention taken out, histories [a, b] and [z, a, b] read the same newest
    input (counting positions from the oldest step, they did not)."""
    torch.manual_seed(0)
    encoder = SASRecEncoder(DU, DS, H).eval()
    encoder.encoder = ItemPlusPositionOnly()
    a, b, z = torch.randn(3, DS)
    steps = torch.stack([torch.stack([a, b, torch.zeros(DS)]), torch.stack([z, a, b])])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = encoder(torch.zeros(1, DU).expand(2, DU), steps, mask)
    assert torch.allclose(out[0], out[1], atol=1e-6)
    assert newest_first_positions(mask).tolist() == [[1, 0, 0], [2, 1, 0]]


@pytest.mark.parametrize("groups", [1, 3])
def test_sasrec_in_length_groups_matches_one_call_on_the_whole_batch(inputs, groups):
    """Where padding is most of the batch, SASRec runs rows in groups of similar length,
    each cut to its longest history; a row's output (empty ones and one with holes in its
    mask included) and every gradient must be what one call on the whole padded batch of
    compacted histories gives."""
    user, steps, mask = inputs
    holes = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)  # row 3 (7 steps): 2 holes
    mask = mask.clone()
    mask[3] = holes
    compact, compact_mask = steps.clone(), mask.clone()
    compact[3] = 0.0
    compact[3, :5] = steps[3][holes]
    compact_mask[3] = torch.arange(L) < 5
    assert mask.float().mean() < GROUP_BELOW_FILL and len(LengthGroups(mask, 3).shapes) == 3
    encoder = SASRecEncoder(DU, DS, H, layers=2, length_groups=groups)
    results = []
    for forward, history in (
        (encoder, (steps, mask)),
        (partial(sasrec_on_the_whole_batch, encoder), (compact, compact_mask)),
    ):
        encoder.zero_grad()
        out = forward(user, *history)
        out.square().sum().backward()
        results.append([out, *(p.grad.clone() for p in encoder.parameters())])
    for grouped, whole in zip(*results, strict=True):
        assert torch.allclose(grouped, whole, atol=1e-5)


def test_dcn_cross_layer_adds_one_degree_of_interaction():
    """DCN Eq. 3: x_{l+1} = x_0 (x_l . w_l) + b_l + x_l, checked against the formula."""
    from sar_exp.backbones.dcn import CrossNetwork

    cross = CrossNetwork(4, 2)
    x0 = torch.randn(3, 4)
    x1 = x0 * (x0 @ cross.weights[0]).unsqueeze(-1) + cross.biases[0] + x0
    x2 = x0 * (x1 @ cross.weights[1]).unsqueeze(-1) + cross.biases[1] + x1
    assert torch.allclose(cross(x0), x2)


@pytest.mark.parametrize("name", ["dcn", "ple"])
def test_ctr_baselines_score_each_candidate_and_ignore_padding(inputs, name):
    from sar_exp.backbones.dcn import DCNScorer
    from sar_exp.backbones.ple import PLEScorer

    user, steps, mask = inputs
    scorer = (DCNScorer if name == "dcn" else PLEScorer)(DU, DS).eval()
    items = torch.randn(B, 5, DS)
    scores = scorer(user, items, steps, mask)
    assert scores.shape == (B, 5) and torch.isfinite(scores).all()
    noisy = steps + torch.randn_like(steps) * (~mask)[..., None]
    assert torch.allclose(scorer(user, items, noisy, mask), scores, atol=1e-5)


def test_ple_task_gates_mix_own_and_shared_experts_only():
    """PLE's CGC: task k's gate weighs its own experts and the shared ones (not other
    tasks'); the shared gate of a middle layer weighs every expert."""
    from sar_exp.backbones.ple import TASKS, ExtractionLayer, PLEScorer

    layer = ExtractionLayer(8, (4,), tasks=2, task_experts=2, shared_experts=1, last=False)
    assert [g.out_features for g in layer.task_gates] == [3, 3]
    assert layer.shared_gate.out_features == 5
    inputs = [torch.randn(3, 8) for _ in range(3)]
    changed = [inputs[0], inputs[1] + 1.0, inputs[2]]  # only task 1's input moves
    before, after = layer(inputs), layer(changed)
    assert torch.equal(before[0], after[0])  # task 0 reads its experts and the shared ones
    assert not torch.equal(before[1], after[1]) and not torch.equal(before[2], after[2])
    logits = PLEScorer(DU, DS).task_logits(torch.randn(B, DU), torch.randn(B, 2, DS),
                                           torch.randn(B, L, DS), torch.ones(B, L, dtype=torch.bool))  # fmt: skip
    assert logits.shape == (B, 2, len(TASKS)) and TASKS[0] == "click"
