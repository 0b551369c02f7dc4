r"""Distance localization for the smoother: one square-root analysis per parameter.

With few members and many parameters, the sample covariances between a parameter and far-away
observations are mostly noise ("spurious correlations") and the global update moves every
parameter by them. For parameters with a position (a gridded field: permeability, a forcing
per site) :class:`LocalSquareRoot` gives parameter ``i`` its own ensemble transform ``W_i``,
computed as the square-root update with every observation's noise variance divided by a
taper of its distance to the parameter (the LETKF's R-localization [Hunt2007], here in
parameter space; Gaspari & Cohn's taper [GaspariCohn1999] by default), and updates column
``i`` only: ``X+[:, i] = W_i X[:, i]``. Parameters far from every observation keep their
prior; a taper of 1 everywhere gives back :class:`~enkal.SquareRoot` exactly.

The parameters are taken ``chunk_size`` at a time (:mod:`enkal.filtering.local`): each
block's taper weights are computed once and cached, the observations out of its reach are
dropped, and its transforms are one batched ``eigh``; memory is about ``chunk_size E (E +
N_loc)`` numbers, so 10^6 parameters fit. The schedule's noise inflation ``alpha`` scales the
noise as in the global update. Diagonal noise only (a taper of a full ``R`` is not defined
here).

>>> import torch
>>> from enkal import EnsembleSmoother, ESMDA, Observations
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(20, 50, generator=g, dtype=torch.float64)    # a 1-D field of 50 values
>>> obs = Observations(torch.zeros(5), noise_std=0.1)             # at sites 0, 10, ..., 40
>>> rule = LocalSquareRoot(radius=2.0, obs_coordinates=(0, 10, 20, 30, 40))
>>> smoother = EnsembleSmoother(obs, rule=rule, schedule=ESMDA.constant(1), seed=0)
>>> state, info = smoother.step(smoother.init(x), x[:, ::10])
>>> moved = (state.parameters - x).abs().amax(0) > 0
>>> moved[[0, 3, 5, 10]].tolist()       # the taper reaches 2 radius = 4 sites: 5 keeps its prior
[True, True, False, True]
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._checks import check_fraction, check_positive_float, check_positive_int
from .filtering.kernels import sqrt_transforms
from .filtering.local import Block, compact_block, local_blocks, local_update
from .filtering.schemes import LETKF
from .observations import Observations

__all__ = ["LocalSquareRoot", "CorrelationLocalSquareRoot", "SECLocalSquareRoot"]


@dataclass(frozen=True)
class LocalSquareRoot(LETKF):
    """A smoother update rule: the square-root update localized by distance, per parameter.

    Parameters
    ----------
    radius : float
        The taper's half-width in the units of the coordinates (Gaspari-Cohn: weight 1 at 0,
        5/24 at ``radius``, 0 from ``2 radius`` on).
    obs_coordinates : sequence of float
        The position of every observation (``N_obs`` of them). Required.
    coordinates : sequence of float, optional
        The position of every parameter (default ``0, 1, ..., N_par - 1``: a 1-D grid).
    period, taper, chunk_size :
        As :class:`~enkal.filtering.LETKF`.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.obs_coordinates is None:
            raise ValueError("LocalSquareRoot.obs_coordinates: required (one position per "
                             "observation)")

    def transform(self, predictions: torch.Tensor, observations: Observations, *,
                  alpha: float = 1.0, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        """Not one matrix: a local rule updates each parameter with its own transform."""
        return _no_single_transform(self)

    def update(self, parameters: torch.Tensor, predictions: torch.Tensor,
               observations: Observations, *, ok: torch.Tensor, alpha: float,
               generator: torch.Generator, failure: Any) -> torch.Tensor:
        """``X+`` ``(N_ens, N_par)`` from ``X`` and its ``predictions`` (rows of failed
        members, ``~ok``, are ignored and redrawn by ``failure.embed``)."""
        n_obs = observations.size
        if self.obs_coordinates is not None and len(self.obs_coordinates) != n_obs:
            raise ValueError(f"LocalSquareRoot.obs_coordinates: expected {n_obs} positions "
                             f"(one per observation), got {len(self.obs_coordinates)}")
        yh = _inputs(self, predictions, observations, ok)
        return _apply(self, _blocks(self, parameters.shape[1], parameters.device),
                      parameters, yh, observations, ok, alpha, generator, failure)


def _no_single_transform(rule: Any) -> torch.Tensor:
    raise TypeError(f"{type(rule).__name__} has one transform per parameter, not one W: use "
                    "it as the rule of EnsembleSmoother (enkal.run), which calls update()")


def _inputs(rule: Any, predictions: torch.Tensor, observations: Observations,
            ok: torch.Tensor) -> torch.Tensor:
    """The predictions in float64 with failed members' rows zeroed (checked: diagonal
    noise)."""
    if not observations.is_diagonal:
        raise ValueError(f"observations: {type(rule).__name__} needs a diagonal noise "
                         "(noise_std=...); a taper of a full covariance is not defined")
    return torch.where(ok.unsqueeze(1), predictions.detach().to(torch.float64),
                       torch.zeros((), dtype=torch.float64, device=predictions.device))


def _apply(rule: Any, blocks: list, parameters: torch.Tensor, yh: torch.Tensor,
           observations: Observations, ok: torch.Tensor, alpha: float,
           generator: torch.Generator, failure: Any) -> torch.Tensor:
    """The local analyses of ``blocks``, the noise scaled by the schedule's ``alpha``."""
    device = parameters.device
    std = observations.noise_std.to(device=device, dtype=torch.float64) * alpha ** 0.5
    y = observations.values.to(device=device, dtype=torch.float64)
    xa, _ = local_update(rule, failure, blocks, parameters.unsqueeze(0), yh.unsqueeze(0),
                         y.unsqueeze(0), std.expand(observations.size), ok.unsqueeze(0),
                         generator)
    return xa[0]


@functools.lru_cache(maxsize=8)
def _blocks(rule: LocalSquareRoot, n_par: int, device: torch.device) -> list:
    """The rule's blocks for ``n_par`` parameters (the taper weights: computed once)."""
    return local_blocks(rule, n_par, None, device)


class _PerParameter:
    """What the correlation-localized rules share: no single ``W``, and each block's
    square-root transforms (``local``: ``enkal.analysis`` calls their ``update``)."""

    local: ClassVar[bool] = True

    def transform(self, predictions: torch.Tensor, observations: Observations, *,
                  alpha: float = 1.0, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        """Not one matrix: each parameter has its own transform."""
        return _no_single_transform(self)

    def transforms(self, predictions: torch.Tensor, values: torch.Tensor,
                   noise_std: torch.Tensor, *, generator: torch.Generator | None = None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
        return sqrt_transforms(predictions, values, noise_std, weights)


@dataclass(frozen=True)
class CorrelationLocalSquareRoot(_PerParameter):
    r"""A smoother update rule localized by the ensemble's own correlations, per parameter.

    Parameter ``i`` is updated by the square-root analysis with only the observations whose
    predictions its members correlate with, ``|corr(X[:, i], Yh[:, j])| >= threshold`` (a
    0/1 taper), as iterative_ensemble_smoother's ``AdaptiveESMDA`` thresholds its gain
    (Vossepoel, Evensen & van Leeuwen 2025); with ``E`` members a correlation of zero has a
    sampling sd of about ``1/sqrt(E)``, so the default threshold ``3/sqrt(E)`` keeps what is
    three of them from zero. No positions needed: it works for any parameters. The
    correlations are recomputed every update, in blocks of ``chunk_size`` parameters.

    Parameters
    ----------
    threshold : float in (0, 1], optional
        Default ``min(1, 3 / sqrt(E))``.
    chunk_size : int
    """

    threshold: float | None = None
    chunk_size: int = 2048

    def __post_init__(self) -> None:
        check_fraction(self.threshold, "CorrelationLocalSquareRoot.threshold")
        check_positive_int(self.chunk_size, "CorrelationLocalSquareRoot.chunk_size")

    def update(self, parameters: torch.Tensor, predictions: torch.Tensor,
               observations: Observations, *, ok: torch.Tensor, alpha: float,
               generator: torch.Generator, failure: Any) -> torch.Tensor:
        """``X+`` from ``X`` and its ``predictions`` (failed members' rows ignored)."""
        yh = _inputs(self, predictions, observations, ok)
        threshold = self.threshold if self.threshold is not None else \
            min(1.0, 3.0 / math.sqrt(int(ok.sum())))
        blocks = _correlation_blocks(parameters[ok].to(torch.float64), yh[ok], threshold,
                                     self.chunk_size)
        return _apply(self, blocks, parameters, yh, observations, ok, alpha, generator,
                      failure)


def _correlations(x: torch.Tensor, yh: torch.Tensor, chunk: int):
    """``(rows, corr(X[:, rows], Yh))`` for blocks of ``chunk`` parameters (members ``x``
    ``(E, N_par)``, ``yh`` ``(E, N_obs)``, float64)."""
    dy = yh - yh.mean(0)
    dy = dy / dy.norm(dim=0).clamp_min(1e-300)
    for start in range(0, x.shape[1], chunk):
        rows = slice(start, min(start + chunk, x.shape[1]))
        dx = x[:, rows] - x[:, rows].mean(0)
        dx = dx / dx.norm(dim=0).clamp_min(1e-300)
        yield rows, dx.T @ dy  # (chunk, N_obs)


def _correlation_blocks(x: torch.Tensor, yh: torch.Tensor, threshold: float,
                        chunk: int) -> list[Block]:
    """Blocks whose 0/1 weights keep ``|corr| >= threshold``."""
    return [compact_block(rows, (r.abs() >= threshold).to(torch.float64), x.device)
            for rows, r in _correlations(x, yh, chunk)]


@dataclass(frozen=True)
class SECLocalSquareRoot(_PerParameter):
    r"""A smoother update rule localized by sampling-error correction of the correlations.

    Parameter ``i`` is updated by the square-root analysis with observation ``j``'s noise
    variance divided by a taper ``rho_ij`` of their sample correlation ``r_ij`` (as
    :class:`CorrelationLocalSquareRoot`, but a smooth taper instead of a 0/1 one):

    * ``exponent=a`` (Lee 2021 [Lee2021]): ``rho = |r|^a``, i.e. the correlation shrunk to
      ``r |r|^a``; entries with ``|r|^(1 + a) <= cutoff`` are dropped;
    * ``exponent=None`` (default; SECNice, Vishny, Morzfeld et al. 2024 [Vishny2024]):
      tuning-free. ``rho = (1 - b) r^(g - 2) + b r^g`` with the even ``g`` in 2..10 and the
      ``b`` in 1, 8/9, ..., 0 chosen by a discrepancy principle: the first (``g``, ``b``)
      whose change to the correlations, ``||rho r - r||_F`` over all parameter-observation
      pairs, stays within ``delta`` times the norm of their sampling sds, taken as
      ``(1 - r^2) / sqrt(E)``.

    No positions needed; the correlations are recomputed every update, in blocks of
    ``chunk_size`` parameters (two passes for SECNice: the norms, then the tapers), so 10^6
    parameters fit. EKP localizes ``C^{ug}`` and ``C^{gg}`` by a Schur product and uses
    ``(1 - r)`` for the sds; here the taper is an R-localization of each parameter's own
    analysis (``docs/updates.md`` section 11), so only the parameter-observation
    correlations are corrected.

    Parameters
    ----------
    exponent : float >= 0, optional
        Lee's exponent ``a``; ``None``: chosen per update (SECNice).
    cutoff : float in [0, 1)
        Lee's sparsity cutoff ``r_0`` (with ``exponent``).
    delta : float > 0
        SECNice's discrepancy factor (with ``exponent=None``).
    chunk_size : int
    """

    exponent: float | None = None
    cutoff: float = 0.0
    delta: float = 1.0
    chunk_size: int = 2048

    def __post_init__(self) -> None:
        if self.exponent is not None:
            if isinstance(self.exponent, bool) or not isinstance(self.exponent, (int, float)) \
                    or not (math.isfinite(self.exponent) and self.exponent >= 0):
                raise ValueError("SECLocalSquareRoot.exponent: expected a number >= 0 or "
                                 f"None, got {self.exponent!r}")
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, (int, float)) or \
                not 0 <= self.cutoff < 1:
            raise ValueError(f"SECLocalSquareRoot.cutoff: expected a number in [0, 1), got "
                             f"{self.cutoff!r}")
        check_positive_float(self.delta, "SECLocalSquareRoot.delta")
        check_positive_int(self.chunk_size, "SECLocalSquareRoot.chunk_size")

    def taper(self, x: torch.Tensor, yh: torch.Tensor) -> tuple[float, float]:
        """The taper's ``(g, b)`` for members ``x`` and predictions ``yh`` (``rho = (1 - b)
        |r|^(g - 2) + b |r|^g``; Lee's exponent ``a`` is ``(a, 1)``)."""
        if self.exponent is not None:
            return float(self.exponent), 1.0
        return _sec_nice(_correlations(x, yh, self.chunk_size), x.shape[0], self.delta)

    def update(self, parameters: torch.Tensor, predictions: torch.Tensor,
               observations: Observations, *, ok: torch.Tensor, alpha: float,
               generator: torch.Generator, failure: Any) -> torch.Tensor:
        """``X+`` from ``X`` and its ``predictions`` (failed members' rows ignored)."""
        yh = _inputs(self, predictions, observations, ok)
        x = parameters[ok].to(torch.float64)
        g, b = self.taper(x, yh[ok])
        blocks = []
        for rows, r in _correlations(x, yh[ok], self.chunk_size):
            rho = _sec_taper(r.abs(), g, b)
            if self.exponent is not None and self.cutoff > 0:
                rho = rho * (r.abs() * rho > self.cutoff)
            blocks.append(compact_block(rows, rho, x.device))
        return _apply(self, blocks, parameters, yh, observations, ok, alpha, generator,
                      failure)


#: SECNice's candidates: even exponents g (a PSD correction) and the interpolation b
_SEC_EXPONENTS = (2, 4, 6, 8, 10)
_SEC_STEPS = 10


def _sec_taper(r_abs: torch.Tensor, g: float, b: float) -> torch.Tensor:
    """``(1 - b) |r|^(g - 2) + b |r|^g`` (``b = 1``: ``|r|^g`` for any ``g >= 0``)."""
    if b == 1.0:
        return r_abs ** g
    return (1.0 - b) * r_abs ** (g - 2.0) + b * r_abs ** g


def _sec_nice(blocks, n_ens: int, delta: float) -> tuple[float, float]:
    """SECNice's discrepancy principle over all correlations of ``blocks``: the first even
    ``g`` whose full correction ``r^(g+1)`` moves the correlations by more than ``delta``
    times the norm of their sampling sds, then the largest interpolation ``b`` towards
    ``g - 2`` that stays within it (one pass, every candidate's norm accumulated)."""
    steps = torch.linspace(1.0, 0.0, _SEC_STEPS, dtype=torch.float64).tolist()
    full = torch.zeros(len(_SEC_EXPONENTS), dtype=torch.float64)
    mixed = torch.zeros(len(_SEC_EXPONENTS), _SEC_STEPS, dtype=torch.float64)
    sd2 = 0.0
    for _, r in blocks:
        r = r.clamp(-1.0 + 1e-12, 1.0 - 1e-12).cpu()
        sd2 += float(((1.0 - r * r) ** 2).sum()) / n_ens
        a = r.abs()
        for k, g in enumerate(_SEC_EXPONENTS):
            full[k] += float(((a ** g - 1.0) * r).square().sum())
            for m, b in enumerate(steps):
                mixed[k, m] += float(((_sec_taper(a, g, b) - 1.0) * r).square().sum())
    tol = delta * delta * sd2
    over = [k for k in range(len(_SEC_EXPONENTS)) if float(full[k]) > tol]
    k = over[0] if over else len(_SEC_EXPONENTS) - 1
    for m, b in enumerate(steps):
        if float(mixed[k, m]) < tol:
            return float(_SEC_EXPONENTS[k]), b
    return float(_SEC_EXPONENTS[k]), 0.0
