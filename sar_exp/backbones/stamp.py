"""STAMP (Liu et al., KDD'18), a baseline of SESRec's Table 2: the short-term
attention/memory priority model, over the rec history.

m_s = mean of the history (the general interest), m_t = the newest item x_t;
attention alpha_i = w_0 . sigma(W_1 x_i + W_2 x_t + W_3 m_s + b_a), m_a = sum_i alpha_i x_i;
h_s = tanh(W_s m_a + b_s), h_t = tanh(W_t m_t + b_t) (MLP cells A and B); an item x is
scored by the trilinear product <h_s, h_t, x> = (h_s * h_t) . x. STAMP scores candidates
with the same item embeddings its history reads (no item tower), and has no user
embedding. The paper puts sigma(.) around the trilinear product before its softmax; that
does not change the ranking, and bounds every logit to (0, 1), so the logit is the
product itself unless `sigmoid_logits` is set."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.sequence import left_aligned, masked_mean


class STAMPEncoder(nn.Module):
    needs_history = True
    reads_user = False  # the model has no user embedding
    shares_item_embedding = True  # candidates are scored with the history's embeddings

    def __init__(self, item_dim: int, sigmoid_logits: bool = False, **_):
        super().__init__()
        d = item_dim
        self.w1, self.w2, self.w3 = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.b_a = nn.Parameter(torch.zeros(d))
        self.w0 = nn.Linear(d, 1, bias=False)
        self.cell_a = nn.Linear(d, d)  # h_s, from the attended memory m_a
        self.cell_b = nn.Linear(d, d)  # h_t, from the newest item m_t
        self.sigmoid_logits = sigmoid_logits
        self.out_dim = d

    def attention(self, steps, mask):
        """alpha_i over the history (unnormalised, as in STAMP) and m_s, m_t."""
        steps, mask = left_aligned(steps, mask)
        lengths = mask.sum(1)
        general = masked_mean(steps, mask)  # m_s
        rows = torch.arange(steps.shape[0], device=steps.device)
        newest = steps[rows, (lengths - 1).clamp(min=0)] * (lengths > 0).unsqueeze(-1).to(
            steps.dtype
        )
        hidden = self.w1(steps) + self.w2(newest)[:, None] + self.w3(general)[:, None] + self.b_a
        alpha = self.w0(torch.sigmoid(hidden)).squeeze(-1) * mask.to(steps.dtype)
        return alpha, steps, newest

    def forward(self, user_emb, steps, mask):
        alpha, steps, newest = self.attention(steps, mask)
        memory = (alpha.unsqueeze(-1) * steps).sum(1)  # m_a
        return torch.tanh(self.cell_a(memory)) * torch.tanh(self.cell_b(newest))  # h_s * h_t
