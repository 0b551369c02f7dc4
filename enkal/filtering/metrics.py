r"""Skill scores as the data-assimilation literature reports them.

Per observation time, the error of an ensemble mean ``xb`` against the truth ``x`` and the
ensemble's own spread are

    RMSE_k = sqrt(mean_i (xb_i - x_i)^2),        spread_k = sqrt(mean_i var_i)

(``var_i`` with ``E - 1`` in the denominator). The reported score is the *time average* of
``RMSE_k`` over the cycles after a spin-up (DAPPER's ``rmse.a``, [Sakov2008]'s tables), and a
well-tuned filter has ``spread ~ RMSE``. Consecutive ``RMSE_k`` are correlated, so the
confidence interval of the average uses an effective sample size from a first-order
autoregressive fit, ``n_eff = n (1 - r1) / (1 + r1)`` with ``r1`` the lag-1
autocorrelation (the standard AR(1) correction, e.g. Wilks, *Statistical Methods in the
Atmospheric Sciences*, eq. 5.12).

>>> import torch
>>> truth = torch.zeros(4, 3, dtype=torch.float64)
>>> mean = torch.ones(4, 3, dtype=torch.float64)
>>> rmse(mean, truth)
tensor([1., 1., 1., 1.], dtype=torch.float64)
>>> score = time_average(torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0, 2.0]))
>>> round(score.mean, 3), score.n
(1.833, 6)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["rmse", "spread", "time_average", "Score"]


def rmse(mean: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean over the last axis of (mean - truth)^2)``: one RMSE per time."""
    return (mean.to(torch.float64) - truth.to(mean.device, torch.float64)).square() \
        .mean(dim=-1).sqrt()


def spread(std: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean over the last axis of std^2)`` from per-variable standard deviations."""
    return std.to(torch.float64).square().mean(dim=-1).sqrt()


@dataclass(frozen=True)
class Score:
    """A time average with its 95% confidence half-width and the samples it used."""

    mean: float
    half_width: float
    n: int
    n_eff: float

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.half_width:.4f}"


def time_average(series: torch.Tensor, burn_in: int = 0) -> Score:
    """The mean of ``series[burn_in:]`` (1-D, NaN entries dropped) with a 95% confidence
    half-width ``1.96 sd / sqrt(n_eff)``, ``n_eff`` from the lag-1 autocorrelation
    (module docstring); ``r1`` is clipped to ``[0, 0.99]``."""
    x = series.detach().to(torch.float64).reshape(-1)[burn_in:].cpu()
    x = x[torch.isfinite(x)]
    n = x.numel()
    if n == 0:
        return Score(math.nan, math.nan, 0, 0.0)
    mean = float(x.mean())
    if n < 3:
        return Score(mean, math.nan, n, float(n))
    dx = x - mean
    var = float(dx.square().mean())
    r1 = float((dx[1:] * dx[:-1]).mean()) / var if var > 0 else 0.0
    r1 = min(max(r1, 0.0), 0.99)
    n_eff = n * (1.0 - r1) / (1.0 + r1)
    sd = math.sqrt(var * n / (n - 1))
    return Score(mean, 1.96 * sd / math.sqrt(n_eff), n, n_eff)
