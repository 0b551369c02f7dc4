"""Priors in physical units: :func:`constrained_gaussian` and :func:`prior_ensemble`.

The smoother works in the unconstrained space ``u`` (``docs/updates.md``), where the prior is
Gaussian; a parameter with a constraint is ``phi = exp(u)`` (:class:`~enkal.Positive`) or
``phi = low + (high - low) sigmoid(u)`` (:class:`~enkal.Bounded`). Scientists think of a
prior in physical units -- "K about 50, give or take 20" -- and ``N(50, 20^2)`` in ``u``
would mean ``K = exp(50 +- 20)``. :func:`constrained_gaussian` (after EKP's function of the
same name) finds the Gaussian in ``u`` whose image has the physical mean and standard
deviation asked for: exactly for :class:`~enkal.Real` and :class:`~enkal.Positive` (the
log-normal's moments in closed form), by quadrature and a two-parameter solve for
:class:`~enkal.Bounded` (the logit-normal has no closed-form moments).
:func:`prior_ensemble` draws the ensemble and returns the layout with it.

>>> import torch
>>> k = constrained_gaussian("K", 50.0, 20.0, lower=0)
>>> layout, x = prior_ensemble([k], 20000, generator=torch.Generator().manual_seed(0))
>>> phi = layout.to_physical(x)
>>> round(float(phi.mean()), -1), round(float(phi.std()), -1)
(50.0, 20.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .ensemble import Bounded, Constraint, ParameterLayout, Positive, Real, gaussian_ensemble

__all__ = ["PriorBlock", "constrained_gaussian", "prior_ensemble", "check_prior_scale"]

# E[f(z)], z ~ N(0, 1), by the trapezoid rule on [-12, 12]: spectrally accurate for the
# smooth logit-normal integrands, also for a large std (a steep sigmoid) where Gauss-Hermite
# nodes are too sparse
_NODES = np.linspace(-12.0, 12.0, 8001)
_WEIGHTS = np.exp(-_NODES ** 2 / 2)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


@dataclass(frozen=True)
class PriorBlock:
    """One block of a prior: a Gaussian ``N(u_mean, u_std^2)`` per entry in the
    unconstrained space and the constraint mapping it to physical units.

    ``mean`` and ``std`` are the physical moments it was made for (:func:`constrained_gaussian`).
    """

    name: str
    shape: tuple[int, ...]
    constraint: Constraint
    u_mean: float
    u_std: float
    mean: float
    std: float


def _finite(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a number, got {type(x).__name__}")
    x = float(x)
    if math.isnan(x):
        raise ValueError(f"{name}: expected a number, got nan")
    return x


def _constraint(lower: float, upper: float) -> Constraint:
    if lower == -math.inf and upper == math.inf:
        return Real()
    if lower == 0.0 and upper == math.inf:
        return Positive()
    if math.isfinite(lower) and math.isfinite(upper) and lower < upper:
        return Bounded(lower, upper)
    raise ValueError(
        f"lower, upper: expected (-inf, inf) (Real), (0, inf) (Positive) or finite lower < "
        f"upper (Bounded), got ({lower}, {upper}); shift the parameter so its bound is 0, "
        "or give both bounds")


def _logit_normal_moments(m: float, s: float) -> tuple[float, float]:
    """Mean and std of ``sigmoid(N(m, s^2))`` by Gauss-Hermite quadrature."""
    p = 1.0 / (1.0 + np.exp(-(m + s * _NODES)))
    mean = float(np.dot(_WEIGHTS, p))
    var = float(np.dot(_WEIGHTS, (p - mean) ** 2))
    return mean, math.sqrt(max(var, 0.0))


def _solve_bounded(mean01: float, std01: float) -> tuple[float, float]:
    """``(m, s)`` with ``sigmoid(N(m, s^2))`` of mean ``mean01`` and std ``std01`` on (0, 1)."""
    from scipy.optimize import least_squares

    def residual(v: np.ndarray) -> list[float]:
        mu, sd = _logit_normal_moments(float(v[0]), math.exp(float(v[1])))
        return [(mu - mean01) / std01, (sd - std01) / std01]

    start = [math.log(mean01 / (1 - mean01)), math.log(std01 / (mean01 * (1 - mean01)))]
    fit = least_squares(residual, start, xtol=1e-14, ftol=1e-14, gtol=1e-14)
    mu, sd = _logit_normal_moments(float(fit.x[0]), math.exp(float(fit.x[1])))
    if abs(mu - mean01) > 1e-6 * std01 or abs(sd - std01) > 1e-6 * std01:
        raise ValueError(f"mean, std: no logit-normal distribution has these moments (closest: "
                         f"mean {mu:.4g}, std {sd:.4g} on (0, 1)); a std this close to its "
                         "largest possible value needs a bimodal prior")
    return float(fit.x[0]), math.exp(float(fit.x[1]))


def constrained_gaussian(name: str, mean: float, std: float, lower: float = -math.inf,
                         upper: float = math.inf, *, shape: Sequence[int] = ()) -> PriorBlock:
    """A prior block whose physical values have mean ``mean`` and standard deviation ``std``.

    Parameters
    ----------
    name : str
        The block's name in the :class:`~enkal.ParameterLayout`.
    mean, std : float
        Physical mean and standard deviation of each entry (``std > 0``).
    lower, upper : float
        The support: ``(-inf, inf)`` gives :class:`~enkal.Real` (``u ~ N(mean, std^2)``),
        ``(0, inf)`` :class:`~enkal.Positive` (log-normal with these moments, exactly),
        finite bounds :class:`~enkal.Bounded` (logit-normal, moments matched to 1e-6 by
        quadrature). ``mean`` must lie strictly inside, and for bounds
        ``std < sqrt((mean - lower) (upper - mean))`` (the largest std of any distribution
        on the interval with that mean).
    shape : tuple of int
        Shape of the block (``()``: a scalar); every entry gets the same prior.

    Returns
    -------
    PriorBlock
        For :func:`prior_ensemble`.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    mean, std = _finite(mean, "mean"), _finite(std, "std")
    lower, upper = _finite(lower, "lower"), _finite(upper, "upper")
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"mean, std: expected a finite mean and a finite std > 0, got "
                         f"{mean}, {std}")
    if not lower < mean < upper:
        raise ValueError(f"mean: expected a value strictly between lower={lower} and "
                         f"upper={upper}, got {mean}")
    shape = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape: expected an int or a tuple of ints, got {shape!r}")
    shape = tuple(shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"shape: expected a tuple of positive ints, got {shape!r}")
    constraint = _constraint(lower, upper)
    if isinstance(constraint, Real):
        m, s = mean, std
    elif isinstance(constraint, Positive):
        s2 = math.log1p((std / mean) ** 2)  # log-normal: Var/Mean^2 = exp(s^2) - 1
        m, s = math.log(mean) - s2 / 2, math.sqrt(s2)
    else:
        width = upper - lower
        if std >= math.sqrt((mean - lower) * (upper - mean)):
            raise ValueError(
                f"std: expected less than sqrt((mean - lower) (upper - mean)) = "
                f"{math.sqrt((mean - lower) * (upper - mean)):.6g} for a distribution on "
                f"({lower}, {upper}) with mean {mean}, got {std}")
        m, s = _solve_bounded((mean - lower) / width, std / width)
    return PriorBlock(name, shape, constraint, m, s, mean, std)


def prior_ensemble(blocks: Sequence[PriorBlock], n_members: int, *,
                   generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                   device: torch.device | str = "cpu") -> tuple[ParameterLayout, torch.Tensor]:
    """The layout of ``blocks`` and a prior ensemble ``(n_members, N_par)`` drawn from them
    (in the unconstrained space, as the smoother expects).

    >>> layout, x = prior_ensemble([constrained_gaussian("a", 0.0, 1.0),
    ...                             constrained_gaussian("w", 1.0, 0.5, 0, 2, shape=(2,))], 8)
    >>> layout.names, tuple(x.shape)
    (['a', 'w[0]', 'w[1]'], (8, 3))
    """
    if isinstance(blocks, PriorBlock) or not isinstance(blocks, Sequence) or not blocks or \
            not all(isinstance(b, PriorBlock) for b in blocks):
        raise TypeError("blocks: expected a non-empty list of PriorBlock (from "
                        f"enkal.constrained_gaussian), got {blocks!r}"[:200])
    layout = ParameterLayout([(b.name, b.shape, b.constraint) for b in blocks])
    mean = torch.cat([torch.full((math.prod(b.shape),), b.u_mean, dtype=torch.float64)
                      for b in blocks])
    std = torch.cat([torch.full((math.prod(b.shape),), b.u_std, dtype=torch.float64)
                     for b in blocks])
    return layout, gaussian_ensemble(mean, std, n_members, generator=generator, dtype=dtype,
                                     device=device)


# an unconstrained mean or std beyond these is almost surely a prior in physical units given
# to the unconstrained space: exp(100) ~ 3e43 (SI quantities such as 1e22 or 1e-20 stay far
# inside), a std of 10 spans 4.3 decades per sd; a logit-normal with a std of 20 or a mean
# beyond 40 puts all its mass within 1e-9 of its bounds (constrained_gaussian's logit-normals
# stay well below)
_POSITIVE_LIMITS = (100.0, 10.0)
_BOUNDED_LIMITS = (40.0, 20.0)


def check_prior_scale(layout: ParameterLayout, parameters: torch.Tensor) -> None:
    """Warn (``UserWarning``) when a constrained block's prior is implausible in physical
    units: a Positive block with an unconstrained mean beyond +-100 or std above 10, a
    Bounded one beyond +-40 or above 20 -- the signature of physical values given where
    the smoother expects unconstrained ones."""
    if layout.is_unconstrained or parameters.shape[0] < 2:
        return
    x = parameters.detach()
    for b in layout.blocks:
        if isinstance(b.constraint, Real):
            continue
        col = x[:, b.slice].to(torch.float64)
        mean, std = float(col.mean()), float(col.std(dim=0).max())
        limit_mean, limit_std = _POSITIVE_LIMITS if isinstance(b.constraint, Positive) \
            else _BOUNDED_LIMITS
        if abs(mean) > limit_mean or std > limit_std:
            kind = type(b.constraint).__name__
            warnings.warn(
                f"prior: block {b.name!r} ({kind}) has unconstrained mean {mean:.3g} and std "
                f"{std:.3g}: physical values {'exp(u)' if kind == 'Positive' else 'sigmoid(u)'}"
                " of that are implausible. The prior ensemble is in the unconstrained space; "
                "for a prior in physical units use enkal.constrained_gaussian(name, mean, "
                "std, lower, upper) and enkal.prior_ensemble", UserWarning, stacklevel=3)
