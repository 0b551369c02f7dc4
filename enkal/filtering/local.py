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

__all__ = ["Block", "local_blocks", "local_update"]


class Block(NamedTuple):
    """State variables ``rows``, the observations ``cols`` they can see, and their taper
    weights ``(rows, len(cols))``."""

    rows: slice
    cols: torch.Tensor
    weights: torch.Tensor


def local_blocks(scheme: Any, n_state: int, observed: list[int] | None,
                 device: torch.device) -> list[Block]:
    """The blocks of a local scheme (``scheme.weights(n_state, observed, rows=)``)."""
    chunk = int(getattr(scheme, "chunk_size", n_state) or n_state)
    blocks = []
    for start in range(0, n_state, chunk):
        rows = slice(start, min(start + chunk, n_state))
        w = scheme.weights(n_state, observed, rows=rows)
        cols = torch.nonzero((w > 0).any(dim=0)).squeeze(1)
        blocks.append(Block(rows, cols.to(device), w[:, cols].to(device)))
    return blocks


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
    n_d = block.rows.stop - block.rows.start
    sub_y = yh[:, :, block.cols]
    values = y[:, block.cols]
    std = noise_std[block.cols]
    if all(s is None for s in seeds):  # no failures: all filters and variables at once
        yh_d = sub_y.unsqueeze(1).expand(-1, n_d, -1, -1).reshape(n_b * n_d, n, -1)
        w = scheme.transforms(yh_d, values.repeat_interleave(n_d, dim=0), std,
                              weights=block.weights.repeat(n_b, 1))
        return w.reshape(n_b, n_d, n, n)
    full = []
    for b in range(n_b):
        rows = ok[b]
        members = sub_y[b][rows]
        w = scheme.transforms(members.unsqueeze(0).expand(n_d, -1, -1),
                              values[b:b + 1].expand(n_d, -1), std, weights=block.weights)
        if seeds[b] is not None:
            w = torch.stack([failure.embed(w[d], rows, _seeded(seeds[b], w.device))
                             for d in range(n_d)])
        full.append(w)
    return torch.stack(full)


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
