r"""The local analysis (LETKF) in blocks of state variables, with bounded memory.

A local scheme gives each state variable ``i`` its own transform ``W_i`` (``E x E``) and
updates column ``i`` only, ``X+[:, i] = W_i X[:, i]``. Holding every ``W_i`` at once costs
``N_x E^2`` numbers (2 GB for ``N_x = 10^5``, ``E = 50``), and the taper weights ``N_x
N_obs``. So the state variables are taken ``chunk_size`` at a time: for each block the
weights are computed once per filter (they depend only on the positions; cached), the
observations no variable of the block can see (weight 0 for all of them) are dropped, the
block's transforms are one batched ``eigh``, and they are applied at once to the forecast and
to the lag smoother's ensembles. Peak memory is about ``B chunk_size E (E + N_loc)`` numbers,
``N_loc`` the observations within reach of a block.

Failed members (``ok`` false) are left out of each local analysis and redrawn by the failure
policy's ``embed``, with the same draws for every variable of a filter (one generator
seeded from the filter's, per filter): a redrawn member is one coherent state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["Block", "compact_block", "local_blocks", "local_update"]


class Block(NamedTuple):
    """State variables ``rows`` (``D`` of them), for each the observations it can see,
    ``cols`` ``(D, k)`` (padded with weight 0), and their taper ``weights`` ``(D, k)``."""

    rows: slice
    cols: torch.Tensor
    weights: torch.Tensor


def compact_block(rows: slice, weights: torch.Tensor, device: torch.device,
                  col_ids: torch.Tensor | None = None) -> Block:
    """A block from dense weights ``(D, n)`` of the observations ``col_ids`` (default
    ``0 .. n-1``): each variable keeps only its observations with a positive weight, ``k`` =
    the most any of them has (the rest padded with weight 0)."""
    if weights.shape[1] == 0:  # nothing in reach: one observation of weight 0
        weights = torch.zeros(weights.shape[0], 1, dtype=torch.float64)
        col_ids = torch.zeros(1, dtype=torch.long)
    positive = weights > 0
    k = max(int(positive.sum(dim=1).max()), 1)
    # the positive columns first, in their order: a stable sort of the 0/1 flags
    order = torch.sort((~positive).to(torch.int8), dim=1, stable=True).indices[:, :k]
    w = torch.gather(weights, 1, order) * torch.gather(positive, 1, order)
    cols = order if col_ids is None else col_ids[order]
    return Block(rows, cols.to(device), w.to(device=device, dtype=torch.float64))


def local_blocks(scheme: Any, n_state: int, observed: list[int] | None,
                 device: torch.device) -> list[Block]:
    """The blocks of a local scheme: ``scheme.positions(n_state, observed)``, its
    ``taper_weights(here, obs)`` and, when it has one, its ``reach`` (the distance beyond
    which the weight is 0): then each block looks only at the observations within reach of
    its variables (a sorted search), so the weights cost ``O(N_x N_loc)``, not
    ``O(N_x N_obs)``."""
    chunk = int(getattr(scheme, "chunk_size", n_state) or n_state)
    coords, obs = scheme.positions(n_state, observed)
    order = torch.argsort(obs)
    sorted_obs = obs[order]
    reach = getattr(scheme, "reach", None)
    period = getattr(scheme, "period", None)
    blocks = []
    for a in range(0, n_state, chunk):
        rows = slice(a, min(a + chunk, n_state))
        here = coords[rows]
        cand = None if reach is None else \
            _within(sorted_obs, order, float(here.min()) - reach, float(here.max()) + reach,
                    period)
        w = scheme.taper_weights(here, obs if cand is None else obs[cand])
        blocks.append(compact_block(rows, w, device, cand))
    return blocks


def _within(sorted_obs: torch.Tensor, order: torch.Tensor, lo: float, hi: float,
            period: float | None) -> torch.Tensor:
    """Indices of the observations with a coordinate in ``[lo, hi]`` (on a ring of length
    ``period``: in that interval shifted by a whole number of periods)."""
    shifts = [0.0] if period is None else [-period, 0.0, period]
    if period is not None and hi - lo >= period:
        return order
    parts = []
    for shift in shifts:
        i0 = int(torch.searchsorted(sorted_obs, torch.tensor(lo + shift, dtype=torch.float64)))
        i1 = int(torch.searchsorted(sorted_obs, torch.tensor(hi + shift, dtype=torch.float64),
                                    right=True))
        parts.append(order[i0:i1])
    return torch.unique(torch.cat(parts))


def local_update(scheme: Any, failure: Any, blocks: Sequence[Block], xf: torch.Tensor,
                 yh: torch.Tensor, y: torch.Tensor, noise_std: torch.Tensor,
                 ok: torch.Tensor, generator: torch.Generator,
                 lagged: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, list]:
    """``(X_a, lagged_a)``: the local analysis of ``xf`` ``(B, E, N_x)`` with predictions
    ``yh`` ``(B, E, N_obs)`` and data ``y`` ``(B, N_obs)``; the same transforms applied to
    each ensemble of ``lagged`` (the smoother's window)."""
    n_b = xf.shape[0]
    seeds = [None if bool(ok[b].all()) else
             int(torch.randint(0, 2 ** 62, (1,), generator=generator,
                               device=generator.device)) for b in range(n_b)]
    xa = torch.empty_like(xf)
    out = [torch.empty_like(x) for x in lagged]
    for block in blocks:
        w = _block_transforms(scheme, failure, block, yh, y, noise_std, ok, seeds)
        for src, dst in ((xf, xa), *zip(lagged, out, strict=True)):
            # X+[b, :, i] = W[b, i] X[b, :, i] for the block's variables i
            dst[:, :, block.rows] = torch.einsum("bdij,bjd->bid", w.to(src.dtype),
                                                 src[:, :, block.rows])
    return xa, out


def _block_transforms(scheme: Any, failure: Any, block: Block, yh: torch.Tensor,
                      y: torch.Tensor, noise_std: torch.Tensor, ok: torch.Tensor,
                      seeds: list) -> torch.Tensor:
    """``(B, D, E, E)`` transforms of one block's ``D`` variables."""
    n_b, n = yh.shape[:2]
    n_d, k = block.cols.shape
    # each variable's own observations: (B, E, D, k) -> (B, D, E, k)
    sub_y = yh[:, :, block.cols].permute(0, 2, 1, 3)
    values = y[:, block.cols]  # (B, D, k)
    std = noise_std[block.cols]  # (D, k)
    if all(s is None for s in seeds):  # no failures: all filters and variables at once
        w = scheme.transforms(sub_y.reshape(n_b * n_d, n, k), values.reshape(n_b * n_d, k),
                              std.repeat(n_b, 1), weights=block.weights.repeat(n_b, 1))
        return w.reshape(n_b, n_d, n, n)
    full = []
    for b in range(n_b):
        rows = ok[b]
        w = scheme.transforms(sub_y[b][:, rows], values[b], std, weights=block.weights)
        if seeds[b] is not None:
            w = torch.stack([failure.embed(w[d], rows, _seeded(seeds[b], w.device))
                             for d in range(n_d)])
        full.append(w)
    return torch.stack(full)


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
