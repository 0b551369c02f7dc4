"""Summary statistics of replicated stochastic simulations.

One path of a stochastic simulator is a noisy function of its parameters: two members with
almost the same parameters see different noise. An ensemble smoother fits far better to the
*expected* statistics, which are smooth in the parameters. :class:`Replicated` estimates them
from ``K`` replicate paths per member with *common random numbers*: replicate ``k`` uses the
stream ``seed + k`` for every member (the models' ``common_noise``), so the statistics differ
between members only through the parameters.

Two kinds of statistics (``statistics``, in this order in the output):

* per path, averaged over the ``K`` paths -- ``"mean"`` (the observed values themselves),
  ``"log1p"`` (``log(1 + x)`` of them: counts that grow exponentially become linear in the
  rates, with roughly constant noise),
  ``"time_mean"``, ``"time_var"``, ``"acf1"``, ``"acf2"`` (mean, variance and lag-1/lag-2
  autocorrelation over the observation times, one per observed component). These are the
  statistics of a data set of *one* realisation (one observed path): the model predicts
  their expectation ``G(theta) = E s(path)``.
* ``"std"``: the standard deviation *over* the ``K`` paths; it exists only for data made of
  several independent realisations.

The noise of the data for such statistics (the likelihood of a twin experiment) is the
covariance of the statistics of the data's realisations plus the Monte-Carlo error of the
model's ``K``-path mean: for ``K_d`` realisations ``Gamma = C (1 / K_d + 1 / K)`` with ``C``
the covariance of one path's statistics (:func:`path_statistics_cov`).

>>> import torch
>>> from enkal.models.sde import OrnsteinUhlenbeck
>>> ou = OrnsteinUhlenbeck(t_obs=[0.5, 1.0], dt=0.05, x0=1.0)
>>> m = Replicated(ou, n_replicates=50)
>>> m.output_size, m.output_names[:2]
(4, ['mean x(t=0.5)', 'mean x(t=1)'])
>>> y = m(torch.tensor([[1.0, 0.0, 0.3], [1.0, 0.0, 0.3]], dtype=torch.float64))
>>> torch.equal(y[0], y[1])  # common random numbers: same parameters, same statistics
True
>>> ou4 = OrnsteinUhlenbeck(t_obs=[0.5, 1.0, 1.5, 2.0], dt=0.05, x0=1.0)
>>> ts = Replicated(ou4, n_replicates=4, statistics=("time_mean", "acf1"))
>>> ts.output_names, ts(torch.tensor([[1.0, 0.0, 0.3]], dtype=torch.float64)).shape
(['time_mean x', 'acf1 x'], torch.Size([1, 2]))
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from enkal.forward import ForwardModel

__all__ = ["Replicated", "monte_carlo_std", "monte_carlo_cov", "path_statistics",
           "path_statistics_cov", "summarise", "PER_PATH", "STATISTICS"]

#: statistics of one path (averaged over replicates by :class:`Replicated`)
PER_PATH = ("mean", "log1p", "time_mean", "time_var", "acf1", "acf2")
#: every statistic :class:`Replicated` knows
STATISTICS = PER_PATH + ("std",)
_PER_TIME = ("mean", "log1p", "std")  # one value per observation (the others: one per component)


def _check_statistics(statistics: Any) -> tuple[str, ...]:
    stats = tuple(statistics) if not isinstance(statistics, str) else (statistics,)
    if not stats or any(not isinstance(s, str) or s not in STATISTICS for s in stats) or \
            len(set(stats)) != len(stats):
        raise ValueError(f"statistics: expected distinct names from {STATISTICS}, got "
                         f"{statistics!r}"[:300])
    return stats


class Replicated(ForwardModel):
    """Statistics of ``n_replicates`` paths of a stochastic model (see the module docstring).

    Parameters
    ----------
    model : ForwardModel
        A stochastic model with ``seed`` and ``common_noise`` attributes (the SDE and jump
        models of :mod:`enkal.models`).
    n_replicates : int
        ``K >= 2`` paths per member.
    statistics : sequence of names from :data:`STATISTICS`
        In this order; ``"mean"`` and ``"std"`` give one value per observation, the
        time-series statistics one per observed component.
    seed : int
        Replicate ``k`` uses the stream ``seed + k``.
    """

    def __init__(self, model: ForwardModel, *, n_replicates: int = 100,
                 statistics: Any = ("mean", "std"), seed: int = 0) -> None:
        if not isinstance(model, ForwardModel):
            raise TypeError(f"model: expected an enkal.ForwardModel, got {type(model).__name__}")
        if not (hasattr(model, "seed") and hasattr(model, "common_noise")):
            raise TypeError(
                f"model: {type(model).__name__} has no seed/common_noise: only stochastic "
                "models can be replicated"
            )
        if isinstance(n_replicates, bool) or not isinstance(n_replicates, int) or \
                n_replicates < 2:
            raise ValueError(f"n_replicates: expected an int >= 2, got {n_replicates!r}")
        stats = _check_statistics(statistics)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        self.model = model
        self.n_replicates = n_replicates
        self.statistics = stats
        self.seed = seed
        self.n_times = len(getattr(model, "t_obs", ())) or model.output_size
        if model.output_size % self.n_times:
            raise ValueError(f"model: output size {model.output_size} is not a multiple of "
                             f"its {self.n_times} observation times")
        if self.n_times < 3 and any(s not in _PER_TIME for s in stats):
            raise ValueError(f"statistics: time-series statistics need >= 3 observation "
                             f"times, the model has {self.n_times}")
        self.device, self.dtype = model.device, model.dtype
        self._replicas = []
        for k in range(n_replicates):
            replica = copy.copy(model)
            replica.seed = seed + k
            replica.common_noise = True
            replica.row_streams = False
            self._replicas.append(replica)

    @property
    def layout(self):
        return self.model.layout

    @property
    def output_size(self) -> int:
        m = self.model.output_size
        return sum(m if s in _PER_TIME else m // self.n_times for s in self.statistics)

    @property
    def output_names(self) -> list[str]:
        base = self.model.output_names or [f"y[{i}]" for i in range(self.model.output_size)]
        c = self.model.output_size // self.n_times
        comps = [n.split("(t=")[0] for n in base[:c]]
        return [f"{s} {n}" for s in self.statistics
                for n in (base if s in _PER_TIME else comps)]

    def paths(self, parameters: torch.Tensor) -> torch.Tensor:
        """All replicate predictions, shape ``(N_ens, K, N_obs of the model)``."""
        return torch.stack([r(parameters) for r in self._replicas], dim=1)

    def forward(self, parameters: torch.Tensor) -> torch.Tensor:
        return summarise(self.paths(parameters), self.statistics, n_times=self.n_times)


def _per_path(paths: torch.Tensor, stats: tuple[str, ...], n_times: int | None
              ) -> list[torch.Tensor]:
    """The per-path statistics ``stats`` (checked, no ``"std"``) of ``(..., M)`` paths, one
    ``(..., L_s)`` tensor each; the paths are centred over time once, when a statistic
    needs it."""
    m = paths.shape[-1]
    t = n_times or m
    x = paths.reshape(*paths.shape[:-1], t, m // t)  # (..., T, C)
    xc = ss = None
    parts = []
    for s in stats:
        if s == "mean":
            parts.append(paths)
        elif s == "log1p":
            parts.append(torch.log1p(paths))
        elif s == "time_mean":
            parts.append(x.mean(dim=-2))
        else:
            if xc is None:
                xc = x - x.mean(dim=-2, keepdim=True)
                ss = (xc * xc).sum(dim=-2)
            if s == "time_var":
                parts.append(ss / (t - 1))
            else:  # lag-l autocorrelation
                lag = int(s[-1])
                parts.append((xc[..., lag:, :] * xc[..., :-lag, :]).sum(dim=-2) / ss)
    return parts


def path_statistics(paths: torch.Tensor, statistics=("mean",), *,
                    n_times: int | None = None) -> torch.Tensor:
    """Per-path statistics of ``(..., M)`` paths (time-major, ``M = n_times * C``).

    Returns ``(..., L)``; ``"std"`` is not a statistic of one path and is refused.
    """
    stats = _check_statistics(statistics)
    if "std" in stats:
        raise ValueError("statistics: 'std' is over paths, not a statistic of one path")
    return torch.cat(_per_path(paths, stats, n_times), dim=-1)


def summarise(paths: torch.Tensor, statistics=("mean", "std"), *,
              n_times: int | None = None) -> torch.Tensor:
    """``(N_ens, K, M)`` paths -> ``(N_ens, L)``: per-path statistics averaged over ``K``,
    ``"std"`` the standard deviation over ``K``."""
    stats = _check_statistics(statistics)
    per_path = iter(_per_path(paths, tuple(s for s in stats if s != "std"), n_times))
    parts = [paths.std(dim=1) if s == "std" else next(per_path).mean(dim=1) for s in stats]
    return torch.cat(parts, dim=1)


def path_statistics_cov(paths: torch.Tensor, statistics=("mean",), *,
                        n_times: int | None = None, floor: float = 1e-6) -> torch.Tensor:
    """Covariance ``C`` of the statistics of *one* path, from ``(N_c, M)`` independent paths.

    The sample covariance ``(L, L)`` in float64, ``floor**2`` added to the diagonal (a
    deterministic quantity, e.g. a known initial state). Its inverse is biased up by
    ``(N_c - 1) / (N_c - L - 2)`` (Wishart): use ``N_c`` well above ``L`` (1000 paths for
    ``L = 12`` statistics: 1.3%).
    """
    s = path_statistics(paths, statistics, n_times=n_times).to(torch.float64)
    if s.shape[0] < s.shape[1] + 3:
        raise ValueError(f"paths: expected more than {s.shape[1] + 2} paths for {s.shape[1]} "
                         f"statistics, got {s.shape[0]}")
    cov = torch.cov(s.T).reshape(s.shape[1], s.shape[1])
    return cov + floor ** 2 * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)


def monte_carlo_std(paths: torch.Tensor, statistics=("mean", "std"),
                    floor: float = 1e-6) -> torch.Tensor:
    """Standard errors of :func:`summarise`'s statistics of ``(K, M)`` paths, ``(len * M,)``.

    ``s / sqrt(K)`` for the mean, ``s / sqrt(2 (K - 1))`` for the standard deviation (exact
    for Gaussian paths), never below ``floor`` (a deterministic quantity, e.g. at time 0).
    """
    k = paths.shape[0]
    s = paths.std(dim=0)
    parts = []
    for stat in statistics:
        if stat not in _PER_TIME:
            raise ValueError(f"statistics: monte_carlo_std knows 'mean' and 'std', got {stat!r}")
        parts.append(s / math.sqrt(k) if stat == "mean" else s / math.sqrt(2 * (k - 1)))
    return torch.cat(parts).clamp_min(floor)


def monte_carlo_cov(paths: torch.Tensor, statistics=("mean", "std"), *, n_boot: int = 1000,
                    generator: torch.Generator | None = None, shrinkage: float = 0.3,
                    floor: float = 1e-6, n_times: int | None = None) -> torch.Tensor:
    """Covariance of :func:`summarise`'s statistics of ``(K, M)`` paths, by the bootstrap.

    For statistics over several realisations (``"std"``): resampling the ``K`` paths
    ``n_boot`` times gives the joint covariance ``(L, L)`` of the statistics of the ``K``
    paths; ``floor**2`` is added to the diagonal. Statistics at neighbouring times are nearly
    collinear, so a covariance estimated from ``K ~ 100`` paths has badly underestimated small
    eigenvalues and its inverse overweights those directions (on the former OU configuration,
    24 statistics of 100 paths, the whitened misfit per observation at the truth averaged 1.64
    instead of 1); ``shrinkage`` pulls the estimate toward its diagonal,
    ``(1 - s) C + s diag(C)``. Per-path statistics are better served by
    :func:`path_statistics_cov` from many independent paths.
    """
    k = paths.shape[0]
    idx = torch.randint(0, k, (n_boot, k), generator=generator, device=paths.device)
    boot = summarise(paths[idx], statistics, n_times=n_times)  # (n_boot, L)
    cov = torch.cov(boot.T.to(torch.float64)).reshape(boot.shape[1], boot.shape[1])
    cov = (1.0 - shrinkage) * cov + shrinkage * torch.diag(torch.diagonal(cov))
    return cov + floor ** 2 * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
