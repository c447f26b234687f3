"""QueryRec's diffusion augmentation of the query-item positive sets (Sec. 3.3, 4.2).

For each query q, x_q holds r_p at the items clicked under q (I_q+), r_n at the items
shown under q and never clicked (I_q-) and r_0 elsewhere. A DDPM (Eq. 6-12) learns to
denoise these vectors; the input x_0 of the forward process has some of its non-zero
entries masked at random while the reconstruction target stays x_q (Sec. 4.2). After
training, each query's x_q is noised to step T and denoised back (Eq. 9-10, posterior
means); the top-K items of the generated vector that are not already in I_q+ extend it,
queries with an empty I_q+ included. This runs once before the CTR model trains and is
cached like a view (keyed by the lists, the settings, the seed and this code).

The item dimension: x_q spans a candidate set, not the whole catalogue. The candidates
are the items shown in search before the cut-off (only they can hold r_p or r_n), the
`max_items` most often shown when there are more (KuaiSAR: about 2M search items). An
item outside every query's shown lists is r_0 in every training vector, so the model
could only learn to generate it from nothing; leaving it out changes no training
target, and the cap drops only the rarest shown items, which a top-K rarely picks.
On the embedded data every shown item is a candidate, which is the paper's x_q exactly.

Where the paper is silent (choices, also in conf/method/queryrec.yaml and the README):
the noise schedule and step count (linear beta from 1e-5 to 2e-3 over T = 20 steps,
DiffRec's [23] small scale: with Ho et al.'s 1e-4 to 0.02 the noise on thousands of
entries drowns a sparse x_q and the model learned only the zero vector), the denoiser
(DiffRec's MLP on [x_t | sinusoidal step embedding] predicting x_0, whose simplified
loss is the MSE to x_0), the masking rate (0.5: of 0.1, 0.3 and 0.5, the one whose
top-K most often fell on the query's topic) and K (2, about the mean size of a
non-empty I_q+ on the embedded data).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sar_exp.data.cache import cache_key, cached_folder, code_fingerprint
from sar_exp.errors import ConfigError


@dataclass(frozen=True)
class DiffusionSettings:
    steps: int = 20  # T
    beta_min: float = 1e-5
    beta_max: float = 2e-3
    r_p: float = 0.5  # Sec. 5.4's initialisation
    r_n: float = -0.5
    r_0: float = 0.0
    mask_rate: float = 0.5  # share of non-zero input entries dropped in the forward process
    top_k: int = 2  # generated positives added to each query's I_q+
    hidden_dim: int = 256
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    max_items: int = 20_000

    def __post_init__(self):
        if self.steps < 1 or self.top_k < 1 or self.max_items < 1 or self.epochs < 1:
            raise ConfigError(
                "method.queryrec_data.diffusion: steps, top_k, max_items and epochs must be >= 1"
            )
        if not 0 < self.beta_min <= self.beta_max < 1:
            raise ConfigError(
                "method.queryrec_data.diffusion: need 0 < beta_min <= beta_max < 1, "
                f"got {self.beta_min} and {self.beta_max}"
            )
        if not (0 <= self.r_p <= 1 and -1 <= self.r_n < 0):
            raise ConfigError(
                f"method.queryrec_data.diffusion: r_p must be in [0, 1] and r_n in [-1, 0) "
                f"(Sec. 4.2), got {self.r_p} and {self.r_n}"
            )


class Schedule:
    """beta_t, alpha_t = 1 - beta_t and alpha-bar_t (Eq. 6-8), and the posterior of Eq. 10.
    Two misprints are read as DDPM has them: Eq. 7's mean is sqrt(alpha-bar_t) x_0 (Eq. 8
    and the text's product define it), and Eq. 10's x_t coefficient is sqrt(alpha_t)
    (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t), not sqrt(alpha-bar_t)."""

    def __init__(self, settings: DiffusionSettings):
        self.steps = settings.steps
        self.beta = torch.linspace(settings.beta_min, settings.beta_max, settings.steps).double()
        self.alpha = 1 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, 0)
        self.alpha_bar_prev = torch.cat([torch.ones(1).double(), self.alpha_bar[:-1]])

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 8: x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (t 0-based)."""
        a = self.alpha_bar[t].float()[:, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def posterior_mean(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor):
        """Eq. 10's mu-tilde(x_t, x_0, t)."""
        a_bar, a_prev, alpha = self.alpha_bar[t], self.alpha_bar_prev[t], self.alpha[t]
        c_t = (alpha.sqrt() * (1 - a_prev) / (1 - a_bar)).float()[:, None].to(x_t.device)
        c_0 = (a_prev.sqrt() * (1 - alpha) / (1 - a_bar)).float()[:, None].to(x_t.device)
        return c_t * x_t + c_0 * x0


def step_embedding(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Denoiser(nn.Module):
    """DiffRec's MLP: [x_t | step embedding] -> hidden -> x_0 estimate."""

    def __init__(self, n_items: int, hidden_dim: int, step_dim: int = 16):
        super().__init__()
        self.step_dim = step_dim
        self.net = nn.Sequential(
            nn.Linear(n_items + step_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, n_items)
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, step_embedding(t, self.step_dim)], dim=-1))


def _csr_rows(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray):
    """(row position, value) of every entry of the given CSR rows."""
    counts = offsets[rows + 1] - offsets[rows]
    starts = np.repeat(offsets[rows], counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(np.arange(rows.size), counts), values[starts + within]


class QueryVectors:
    """x_q of every query with a shown item before the cut-off, kept sparse as (row,
    column, value) entries sorted by row; `dense(rows)` builds a batch of rows, so
    memory grows with the batch, not with queries x candidates (KuaiSAR: 175k x 20k)."""

    def __init__(self, queries, candidates, row, column, value, r_0: float, dropped: int):
        self.queries, self.candidates, self.r_0, self.dropped = queries, candidates, r_0, dropped
        order = np.argsort(row, kind="stable")
        self.column, self.value = column[order], value[order]
        self.offsets = np.searchsorted(row[order], np.arange(queries.size + 1))

    def __len__(self) -> int:
        return int(self.queries.size)

    def subset(self, rows: np.ndarray) -> QueryVectors:
        """The vectors of some rows only (for timing a part of an epoch)."""
        position, index = _csr_rows(self.offsets, np.arange(self.column.size), rows)
        return QueryVectors(self.queries[rows], self.candidates, position, self.column[index],
                            self.value[index], self.r_0, self.dropped)  # fmt: skip

    def dense(self, rows: np.ndarray) -> torch.Tensor:
        x = torch.full((rows.size, self.candidates.size), self.r_0)
        position, index = _csr_rows(self.offsets, np.arange(self.column.size), rows)
        x[position, self.column[index]] = torch.from_numpy(self.value[index]).float()
        return x


def query_vectors(view, settings: DiffusionSettings) -> QueryVectors:
    """r_p on I_q+, r_n on I_q-, r_0 elsewhere, over the candidate items."""
    cl_off, cl_items = view["query_clicked_offsets"], view["query_clicked_items"]
    un_off, un_items = view["query_unclicked_offsets"], view["query_unclicked_items"]
    shown_items = np.concatenate([cl_items, un_items])
    counts = np.bincount(shown_items, minlength=int(view["item_attributes"].shape[0]))
    candidates = np.flatnonzero(counts)
    if candidates.size > settings.max_items:  # the most often shown; ties by item id
        order = np.lexsort((candidates, -counts[candidates]))
        candidates = np.sort(candidates[order[: settings.max_items]])
    column = np.full(counts.size, -1, np.int64)
    column[candidates] = np.arange(candidates.size)
    n_rows = cl_off.size - 1  # query ids 0..n (0: padding, never shown)
    queries = np.flatnonzero((np.diff(cl_off) + np.diff(un_off))[:n_rows] > 0)
    parts, dropped = [], 0
    for offsets, items, value in (
        (cl_off, cl_items, settings.r_p),
        (un_off, un_items, settings.r_n),
    ):
        row, item = _csr_rows(offsets, items, queries)
        keep = column[item] >= 0
        dropped += int((~keep).sum())
        parts.append((row[keep], column[item[keep]], np.full(int(keep.sum()), value)))
    row, col, value = (np.concatenate(p) for p in zip(*parts))  # I_q+ and I_q- are disjoint
    return QueryVectors(queries, candidates, row, col, value, settings.r_0, dropped)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_denoiser(vectors: QueryVectors, settings: DiffusionSettings, seed: int):
    """Eq. 12's simplified loss, the MSE of the predicted x_0, t uniform; returns the
    model and the mean loss of each epoch. On a GPU when there is one."""
    device = _device()
    schedule = Schedule(settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Denoiser(vectors.candidates.size, settings.hidden_dim).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    losses = []
    for _ in range(settings.epochs):
        order = torch.randperm(len(vectors), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(vectors), settings.batch_size):
            x0 = vectors.dense(order[start : start + settings.batch_size])
            keep = torch.rand(x0.shape, generator=generator) >= settings.mask_rate
            masked = torch.where((x0 != settings.r_0) & ~keep, settings.r_0, x0)
            t = torch.randint(0, schedule.steps, (x0.shape[0],), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = schedule.noised(masked, t, noise).to(device)
            predicted = model(x_t, t.to(device))
            loss = ((predicted - x0.to(device)) ** 2).sum(-1).mean()  # target: the unmasked x_q
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * x0.shape[0]
        losses.append(total / len(vectors))
    return model.eval(), losses


@torch.no_grad()
def generate(model: Denoiser, x: torch.Tensor, settings: DiffusionSettings,
             generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """x-tilde_q: x_q noised to step T, then the reverse chain of posterior means (Eq. 9-10)."""
    schedule = Schedule(settings)
    device = next(model.parameters()).device
    last = torch.full((x.shape[0],), schedule.steps - 1, dtype=torch.long)
    x_t = schedule.noised(x, last, torch.randn(x.shape, generator=generator)).to(device)
    for step in reversed(range(schedule.steps)):
        t = torch.full((x.shape[0],), step, dtype=torch.long)
        x0 = model(x_t, t.to(device))
        x_t = schedule.posterior_mean(x_t, x0, t) if step > 0 else x0
    return x_t.cpu()


def top_k_generated(model: Denoiser, vectors: QueryVectors, settings: DiffusionSettings,
                    seed: int) -> np.ndarray:  # fmt: skip
    """[queries, K] item ids: each query's K highest generated items outside its I_q+,
    generated a batch of rows at a time."""
    k = min(settings.top_k, vectors.candidates.size)
    generator = torch.Generator().manual_seed(seed)
    top = np.zeros((len(vectors), k), np.int64)
    for start in range(0, len(vectors), settings.batch_size):
        rows = np.arange(start, min(start + settings.batch_size, len(vectors)))
        x = vectors.dense(rows)
        generated = generate(model, x, settings, generator)
        generated[x == settings.r_p] = -math.inf  # new items only: I_q+ is kept as it is
        top[rows] = vectors.candidates[generated.topk(k, dim=1).indices.numpy()]
    return top


def augment(view, settings: DiffusionSettings, seed: int) -> tuple[dict, dict]:
    """({"offsets", "items"}: each query's I_q+ plus its top-K generated items, as CSR
    over query ids; meta with the training curve and sizes)."""
    started = time.perf_counter()
    vectors = query_vectors(view, settings)
    model, losses = train_denoiser(vectors, settings, seed)
    top = top_k_generated(model, vectors, settings, seed + 1)
    k = top.shape[1]
    queries = vectors.queries
    cl_off, cl_items = view["query_clicked_offsets"], view["query_clicked_items"]
    n_rows = cl_off.size - 1
    clicked = np.diff(cl_off)
    added = np.zeros(n_rows, np.int64)
    added[queries] = k
    offsets = np.concatenate([[0], np.cumsum(clicked + added)]).astype(np.int64)
    items = np.zeros(offsets[-1], np.int32)
    row, item = _csr_rows(cl_off, cl_items, np.arange(n_rows))
    within = np.arange(row.size) - np.repeat(cl_off[:-1], clicked)
    items[offsets[row] + within] = item
    first_added = offsets[queries] + clicked[queries]
    items[first_added[:, None] + np.arange(k)] = top
    meta = {
        "queries": len(vectors),
        "candidates": int(vectors.candidates.size),
        "entries_beyond_max_items": vectors.dropped,
        "share_of_queries_without_clicks": float((clicked[queries] == 0).mean())
        if len(vectors)
        else 0.0,
        "epoch_losses": [round(v, 6) for v in losses],
        "seconds": round(time.perf_counter() - started, 2),
    }
    return {"offsets": offsets, "items": items}, meta


def _digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def cached_augmentation(view, settings: DiffusionSettings, seed: int, cache_dir: Path) -> dict:
    """The augmented positive sets, trained once per (lists, settings, seed, code)."""
    lists = [view[k] for k in ("query_clicked_offsets", "query_clicked_items",
                               "query_unclicked_offsets", "query_unclicked_items")]  # fmt: skip
    key = cache_key(
        code_fingerprint(sys.modules[__name__]), _digest(*lists), asdict(settings), seed
    )

    def build(tmp: Path) -> None:
        from sar_exp.data.progress import stage

        with stage("training QueryRec's diffusion model on the query-item vectors"):
            arrays, meta = augment(view, settings, seed)
        np.savez(tmp / "positives.npz", **arrays)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    folder = cached_folder(Path(cache_dir), f"queryrec-diffusion-{key}", build)
    with np.load(folder / "positives.npz") as data:
        return {k: data[k] for k in data.files}
