"""PLE (Tang et al., RecSys'20), a CTR baseline of QueryRec's Table 4: progressive layered
extraction over shared and task-specific experts. Each extraction layer (a CGC) has
experts per task and shared ones; a task's gate mixes its own and the shared experts,
and a shared gate mixes all of them for the next layer (PLE Eq. 2-5); a tower per task
gives its logit. The tasks are the rec log's labels: the click, then like, follow and
forward (KuaiSAR's, QueryRec 5.3.2); the click is what is scored and evaluated. The
input per candidate is DCN's: [user | item | mean of the clicked-item history]."""

from __future__ import annotations

import torch
from torch import nn

from sar_exp.backbones.dcn import candidate_features, deep_network
from sar_exp.errors import ConfigError

TASKS = ("click", "like", "follow", "forward")


class ExtractionLayer(nn.Module):
    def __init__(self, in_dim: int, expert_dims: tuple[int, ...], tasks: int,
                 task_experts: int, shared_experts: int, last: bool):  # fmt: skip
        super().__init__()
        self.tasks, self.task_experts, self.last = tasks, task_experts, last

        def expert():  # an MLP (PLE's experts are small feed-forward networks)
            return deep_network(in_dim, expert_dims, dropout=0.0)

        self.experts = nn.ModuleList(expert() for _ in range(tasks * task_experts + shared_experts))
        self.task_gates = nn.ModuleList(
            nn.Linear(in_dim, task_experts + shared_experts) for _ in range(tasks)
        )
        self.shared_gate = None if last else nn.Linear(in_dim, len(self.experts))

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """inputs: one tensor per task, then the shared one; the same layout out (the
        last layer returns the task outputs only). A task's experts read its input, the
        shared experts the shared input."""
        t, e = self.tasks, self.task_experts
        expert_out = [expert(inputs[i // e] if i < t * e else inputs[-1])
                      for i, expert in enumerate(self.experts)]  # fmt: skip
        shared_out = expert_out[t * e :]

        def gated(gate, x, outputs):
            weights = torch.softmax(gate(x), dim=-1).unsqueeze(-1)
            return (weights * torch.stack(outputs, dim=-2)).sum(-2)

        mixed = [gated(self.task_gates[k], inputs[k], expert_out[k * e : (k + 1) * e] + shared_out)
                 for k in range(t)]  # fmt: skip
        if self.last:
            return mixed
        return [*mixed, gated(self.shared_gate, inputs[-1], expert_out)]


class PLEScorer(nn.Module):
    """[B, K] click logits; `task_logits` gives [B, K, T] for every task (training)."""

    needs_history = True
    scores_items = True
    tasks = TASKS

    def __init__(self, user_dim: int, item_dim: int, levels: int = 2,
                 expert_dims: tuple[int, ...] = (128, 64), task_experts: int = 1,
                 shared_experts: int = 1,
                 tower_dims: tuple[int, ...] = (32,), dropout: float = 0.0, **_):  # fmt: skip
        super().__init__()
        if not expert_dims or not tower_dims or levels < 1:
            raise ConfigError(
                "backbone.encoder: PLE needs levels >= 1 and non-empty expert_dims and tower_dims"
            )
        width, t = user_dim + 2 * item_dim, len(TASKS)
        self.levels = nn.ModuleList(
            ExtractionLayer(width if i == 0 else expert_dims[-1], tuple(expert_dims), t,
                            task_experts, shared_experts, last=i == levels - 1)
            for i in range(levels)
        )  # fmt: skip
        self.towers = nn.ModuleList(
            nn.Sequential(deep_network(expert_dims[-1], tower_dims, dropout), nn.Linear(tower_dims[-1], 1))
            for _ in range(t)
        )  # fmt: skip

    def task_logits(self, user_emb, items, rec_history, rec_mask) -> torch.Tensor:
        x = candidate_features(user_emb, items, rec_history, rec_mask)
        inputs = [x] * (len(TASKS) + 1)
        for level in self.levels:
            inputs = level(inputs)
        return torch.cat([tower(h) for tower, h in zip(self.towers, inputs)], dim=-1)

    def forward(self, user_emb, items, rec_history, rec_mask, query_history=None, query_mask=None):
        return self.task_logits(user_emb, items, rec_history, rec_mask)[..., 0]
