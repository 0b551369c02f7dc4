"""Collapse guard: the seed paper's dynamic weight resampling [Trautner2020].

An ensemble smoother shrinks parameter variances every iteration; once a parameter's
variance is (numerically) zero no later update can move it, since every update is a
combination of the members' anomalies. The guard redraws each live parameter whose ensemble
variance fell below ``threshold`` from ``N(mean, reset)``: the same mean, a larger variance.
Pruned (masked) parameters are never redrawn. The count goes to the step's info.

>>> import torch
>>> X = torch.zeros(8, 3, dtype=torch.float64); X[:, 0] = torch.arange(8.0)
>>> g = torch.Generator().manual_seed(0)
>>> X2, n = CollapseGuard(threshold=1e-6, reset=1e-2).apply(X, generator=g)
>>> n, bool(X2[:, 1].var() > 1e-6), torch.equal(X2[:, 0], X[:, 0])
(2, True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_positive_float, column_variance

__all__ = ["CollapseGuard"]


@dataclass(frozen=True)
class CollapseGuard:
    """Redraw collapsed parameters.

    Parameters
    ----------
    threshold : float
        Parameters with ensemble variance (``E-1`` denominator) below this are redrawn.
    reset : float
        Variance of the redraw, ``> threshold``.
    chunk_size : int
        Parameter columns scanned per block.
    """

    threshold: float = 1e-4
    reset: float = 1e-3
    chunk_size: int = 1 << 18

    def __post_init__(self) -> None:
        check_positive_float(self.threshold, "CollapseGuard.threshold")
        check_positive_float(self.reset, "CollapseGuard.reset")
        if self.reset <= self.threshold:
            raise ValueError(
                f"CollapseGuard.reset: expected a variance larger than threshold "
                f"({self.threshold}), got {self.reset}"
            )

    def apply(self, parameters: torch.Tensor, *, generator: torch.Generator | None,
              mask: torch.Tensor | None = None, inplace: bool = False
              ) -> tuple[torch.Tensor, int]:
        """Return ``(parameters, n_redrawn)``; ``mask`` marks live parameters (True)."""
        x = parameters if inplace else parameters.clone()
        n = x.shape[0]
        std = math.sqrt(self.reset)
        total = 0
        for start in range(0, x.shape[1], self.chunk_size):
            block = x[:, start:start + self.chunk_size]
            bad = column_variance(block) < self.threshold
            if mask is not None:
                bad &= mask[start:start + self.chunk_size]
            k = int(bad.sum())
            if k == 0:
                continue
            cols = torch.nonzero(bad).squeeze(1)
            mean = block[:, cols].mean(dim=0)
            z = torch.randn(n, k, generator=generator, dtype=x.dtype, device=x.device)
            block[:, cols] = mean + std * z
            total += k
        return x, total
