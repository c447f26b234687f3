"""Helpers that sequence encoders share."""

from __future__ import annotations

import torch

# rows of a batch are run in this many groups of similar history length, each cut to its
# longest history (padding is most of a batch: 55-70% of the slots on the embedded data)
LENGTH_GROUPS = 6


def left_aligned(steps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid steps to the front, in their order, padding after them.

    GRU packing reads the first mask.sum() steps and SASRec the step at length - 1, so a
    mask with holes (a masked step between valid ones) would make them read padding and
    miss the newest steps. Batches are left-aligned already; this makes every encoder
    correct for any mask it is given."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    steps = torch.gather(steps, 1, order.unsqueeze(-1).expand_as(steps))
    return steps, torch.gather(mask, 1, order)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L, d] over the [B, L] valid slots -> [B, d] (zeros for a row with none)."""
    return (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)


def right_aligned(
    steps: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, d] -> [B, length, d] with each row's newest `length` valid steps at the end
    and zero padding before them (FMLP-Rec's sequences are left-padded: its filters act
    on a fixed-length signal whose last position is the newest event)."""
    steps, mask = left_aligned(steps, mask)
    count = mask.sum(1)
    slots = torch.arange(length, device=steps.device)
    source = slots[None, :] + (count - length)[:, None]  # the slot's step in the row
    valid = source >= 0
    index = source.clamp(min=0, max=steps.shape[1] - 1)
    out = torch.gather(steps, 1, index.unsqueeze(-1).expand(-1, -1, steps.shape[-1]))
    return out * valid.unsqueeze(-1).to(out.dtype), valid


class AdditiveAttention(torch.nn.Module):
    """Attention pooling with a learned query vector: a_i = softmax_i(q . tanh(V h_i + v))
    over the valid slots, sum_i a_i h_i (NRHUB's view and record attention). A row with no
    valid slot pools to zeros."""

    def __init__(self, dim: int, attention_dim: int = 200):
        super().__init__()
        self.project = torch.nn.Linear(dim, attention_dim)  # V, v
        self.query = torch.nn.Linear(attention_dim, 1, bias=False)  # q

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        scores = self.query(torch.tanh(self.project(h))).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        return torch.einsum("bl,bld->bd", torch.nan_to_num(weights, nan=0.0), h)


def extent(valid: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B]: one past each row's last valid slot (0 for an empty row)."""
    slots = torch.arange(1, valid.shape[1] + 1, device=valid.device)
    return (valid * slots).amax(1)


class LengthGroups:
    """The rows of a batch in groups of similar extent, each cut to its longest row: the
    encoders run group by group (padding is most of a batch: 55-70% of the slots on the
    embedded data). A slot past a row's extent is masked out of every attention, so the
    valid slots come out as from one call on the whole batch: only the work on padding
    is saved. The groups' slots are taken out with one index_select (its gradient: an
    index_add) and put back with one index_copy (dense) or read out with one
    index_select (read)."""

    def __init__(self, valid: torch.Tensor, groups: int = LENGTH_GROUPS):
        b, length = valid.shape
        self.rows, self.length = b, length
        if b == 0 or length == 0:  # one group of everything (the layers still run on it:
            self.shapes = [(b, length)]  # every parameter is used)
            self.index = torch.arange(b * length, device=valid.device)
            self.sizes = [b * length]
            return
        ends = extent(valid)
        order = torch.argsort(ends)
        slots, self.shapes = [], []
        split = order.tensor_split(min(groups, b))
        for g, rows in enumerate(split):
            n = int(ends[rows].max())  # (no group is empty: at most b groups)
            if g == len(split) - 1:  # the longest group runs even when every row is empty,
                n = max(n, 1)  # so each parameter gets a gradient (DDP needs one on every rank)
            if n == 0:  # rows without history: nothing to encode (their output stays zero)
                continue
            slots.append(
                (rows[:, None] * length + torch.arange(n, device=valid.device)).reshape(-1)
            )
            self.shapes.append((len(rows), n))
        self.index = torch.cat(slots)  # the groups' slots, as flat b * length + slot
        self.sizes = [rows * n for rows, n in self.shapes]

    def take(self, x: torch.Tensor, source: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x [B, L, ...] as one [rows, n, ...] tensor per group; with `source` [B, L] of row
        numbers, x is a table [N, ...] and slot (b, l) holds its row source[b, l]."""
        if source is None:
            table, index = x.reshape(self.rows * self.length, *x.shape[2:]), self.index
        else:
            table, index = x, source.reshape(-1).index_select(0, self.index)
        parts = table.index_select(0, index).split(self.sizes)
        return [
            p.view(rows, n, *p.shape[1:]) for p, (rows, n) in zip(parts, self.shapes, strict=True)
        ]

    def dense(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The groups' [rows, n, d] outputs put back as [B, L, d], zero elsewhere."""
        d = pieces[0].shape[-1]
        flat = torch.cat([p.reshape(-1, d) for p in pieces])
        out = flat.new_zeros(self.rows * self.length, d).index_copy(0, self.index, flat)
        return out.view(self.rows, self.length, d)

    def read(self, pieces: list[torch.Tensor], *selections) -> list[torch.Tensor]:
        """For each (slots, keep) of [B, L'] slot numbers and flags, [B, L', d]: the groups'
        output at (b, slots[b, j]) where keep[b, j], else zero; the same as dense(pieces)
        gathered, without building it."""
        d = pieces[0].shape[-1]
        flat = torch.cat([*(p.reshape(-1, d) for p in pieces), pieces[0].new_zeros(1, d)])
        zero_row = flat.shape[0] - 1  # where every slot outside the groups reads from
        device = flat.device
        where = torch.full((self.rows * self.length,), zero_row, device=device)
        where[self.index] = torch.arange(zero_row, device=device)
        rows = torch.arange(self.rows, device=device)[:, None] * self.length
        out = []
        for slots, keep in selections:
            index = torch.where(keep, where[rows + slots], zero_row)
            out.append(flat.index_select(0, index.reshape(-1)).view(*slots.shape, d))
        return out


def by_length(fn, valid: torch.Tensor, sequences: tuple, slot_features: tuple = (),
              output_valid: torch.Tensor | None = None, groups: int = LENGTH_GROUPS):  # fmt: skip
    """fn(*sequences, *slot_features) on LengthGroups of the rows: [B, L, d] sequences and
    [B, L] slot features (a validity mask, the behaviour types: what fn builds its
    attention masks from, at the group's size) in, [B, L, d] out, zero at every invalid
    slot (or outside `output_valid` where given)."""
    grouped = LengthGroups(valid, groups)
    shown = valid if output_valid is None else output_valid
    return grouped.dense(grouped_outputs(fn, grouped, sequences, slot_features, shown))


def grouped_outputs(fn, grouped: LengthGroups, sequences: tuple, slot_features: tuple,
                    shown: torch.Tensor, sources: tuple = ()) -> list[torch.Tensor]:  # fmt: skip
    """fn's [rows, n, d] output per group, zero outside `shown` [B, L]; sources: per
    sequence, None ([B, L, d]) or the [B, L] row numbers of the table [N, d] it is
    (LengthGroups.take)."""
    sources = sources or (None,) * len(sequences)
    taken = [grouped.take(x, source) for x, source in zip(sequences, sources, strict=True)]
    features = [grouped.take(f) for f in slot_features]
    kept = grouped.take(shown)
    pieces = []
    for g in range(len(grouped.shapes)):
        y = fn(*(t[g] for t in taken), *(f[g] for f in features))
        pieces.append(y * kept[g][..., None].to(y.dtype))
    return pieces
