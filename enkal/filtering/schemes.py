r"""The filters' analysis schemes and inflation: typed, frozen strategy objects.

* :class:`EnKF` -- the stochastic EnKF with perturbed observations ([Evensen1994],
  [Burgers1998]); the perturbations are centred by default, as in [Sakov2008] and DAPPER's
  ``EnKF('PertObs')``.
* :class:`ETKF` -- the deterministic ensemble transform filter with the symmetric square root
  ([Bishop2001], [Hunt2007], [Sakov2008]); the same algebra as :class:`~enkal.SquareRoot`.
* :class:`LETKF` -- the local ETKF [Hunt2007]: one square-root analysis per state variable,
  with every observation's noise variance divided by a taper of its distance (Gaspari & Cohn
  [GaspariCohn1999] by default), the "R-localization" of [Hunt2007].
* :class:`AdaptiveInflation` -- a multiplicative prior inflation estimated each cycle from
  the innovation statistics (Desroziers et al. 2005; Li, Kalnay & Miyoshi 2009) and filtered
  in time as a Gaussian quantity ([Miyoshi2011]).

Each scheme's ``transforms(predictions, values, noise_std, generator=...)`` returns the
``(B, E, E)`` matrices of one analysis (:mod:`enkal.filtering.kernels`): one per filter for
the global schemes, one per state variable for the LETKF.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._checks import check_positive_float, check_positive_int
from .kernels import gaspari_cohn, perturbed_transforms, sqrt_transforms

__all__ = ["EnKF", "ETKF", "LETKF", "AdaptiveInflation", "AdaptiveInflationState",
           "step_taper"]


def step_taper(distance: torch.Tensor, radius: float) -> torch.Tensor:
    """A step taper: 1 within ``radius`` (inclusive), 0 beyond."""
    return (distance.abs() <= radius).to(torch.float64)


@dataclass(frozen=True)
class EnKF:
    """Stochastic EnKF: perturbed observations ``y + eps_j``, ``eps_j ~ N(0, R)``.

    Parameters
    ----------
    centred : bool
        Subtract the members' mean from the perturbations (default), so the analysis mean
        is the Kalman update of the forecast mean, and rescale them by ``sqrt(E / (E-1))``
        so that each member's perturbation keeps the variance ``R``, as DAPPER's
        ``EnKF('PertObs')`` does ([Sakov2008] centre them).
    """

    centred: bool = True
    local: ClassVar[bool] = False  # a global analysis

    def transforms(self, predictions: torch.Tensor, values: torch.Tensor,
                   noise_std: torch.Tensor, *, generator: torch.Generator,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, E, E)`` for ``predictions`` ``(B, E, N_obs)`` and ``values`` ``(B, N_obs)``."""
        b, n, m = predictions.shape
        eps = torch.randn(b, n, m, generator=generator, dtype=torch.float64,
                          device=generator.device)
        eps = eps.to(predictions.device) * noise_std.to(predictions.device, torch.float64)
        if self.centred:  # each member's perturbation keeps the variance R: sqrt(E/(E-1))
            eps = (eps - eps.mean(dim=1, keepdim=True)) * math.sqrt(n / (n - 1))
        return perturbed_transforms(predictions, values, noise_std, eps, weights)


@dataclass(frozen=True)
class ETKF:
    """Deterministic ETKF with the symmetric square root ``T = (I + S S^T)^-1/2``."""

    local: ClassVar[bool] = False

    def transforms(self, predictions: torch.Tensor, values: torch.Tensor,
                   noise_std: torch.Tensor, *, generator: torch.Generator | None = None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, E, E)`` for ``predictions`` ``(B, E, N_obs)`` and ``values`` ``(B, N_obs)``."""
        return sqrt_transforms(predictions, values, noise_std, weights)


@dataclass(frozen=True)
class LETKF:
    """Local ETKF: one symmetric square-root analysis per state variable.

    Parameters
    ----------
    radius : float
        The taper's half-width in the units of ``coordinates`` (Gaspari-Cohn: weight 1 at 0,
        about 0.21 at ``radius``, 0 from ``2 radius`` on).
    coordinates : sequence of float, optional
        Position of every state variable on one axis (default ``0, 1, ..., N_x - 1``).
    period : float, optional
        Length of a periodic domain (Lorenz-96: ``N_x``); distances wrap around.
    obs_coordinates : sequence of float, optional
        Position of every observation; by default the coordinates of the observed state
        variables (when the observation operator selects state indices).
    taper : callable
        ``taper(distance, radius) -> weights`` in ``[0, 1]``: :func:`gaspari_cohn` (default)
        or :func:`step_taper`.
    chunk_size : int
        State variables analysed together (:mod:`enkal.filtering.local`): memory about
        ``B chunk_size N_ens (N_ens + N_loc)`` numbers, ``N_loc`` the observations in reach.
    """

    radius: float
    coordinates: tuple[float, ...] | None = None
    period: float | None = None
    obs_coordinates: tuple[float, ...] | None = None
    taper: Callable[[torch.Tensor, float], torch.Tensor] = gaspari_cohn
    chunk_size: int = 2048
    local: ClassVar[bool] = True  # one analysis per state variable

    def __post_init__(self) -> None:
        check_positive_float(self.radius, "LETKF.radius")
        check_positive_int(self.chunk_size, "LETKF.chunk_size")
        check_positive_float(self.period, "LETKF.period", allow_none=True)
        if not callable(self.taper):
            raise TypeError(f"LETKF.taper: expected a callable taper(distance, radius), got "
                            f"{type(self.taper).__name__}")
        for name in ("coordinates", "obs_coordinates"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(c) for c in v))

    def positions(self, n_state: int, observed: list[int] | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The coordinates of the ``N_x`` variables and of the ``N_obs`` observations."""
        coords = torch.arange(n_state, dtype=torch.float64) if self.coordinates is None \
            else torch.tensor(self.coordinates, dtype=torch.float64)
        if coords.numel() != n_state:
            raise ValueError(f"LETKF.coordinates: expected {n_state} positions (one per state "
                             f"variable), got {coords.numel()}")
        if self.obs_coordinates is not None:
            return coords, torch.tensor(self.obs_coordinates, dtype=torch.float64)
        if observed is not None:
            return coords, coords[observed]
        raise ValueError("LETKF.obs_coordinates: required when the observation operator is "
                         "a callable (the observations' positions are unknown)")

    @property
    def reach(self) -> float | None:
        """The distance beyond which the taper is 0 (``None``: unknown, a user's taper)."""
        known: dict[Any, float] = {gaspari_cohn: 2.0, step_taper: 1.0}
        factor = known.get(self.taper)
        return None if factor is None else factor * self.radius

    def taper_weights(self, here: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Weights ``(len(here), len(obs))`` of observations at ``obs`` for variables at
        ``here`` (distances wrapped with ``period``)."""
        dist = (here[:, None] - obs[None, :]).abs()
        if self.period is not None:
            dist = torch.minimum(dist % self.period, self.period - dist % self.period)
        return self.taper(dist, self.radius).to(torch.float64)

    def weights(self, n_state: int, observed: list[int] | None,
                rows: slice | None = None) -> torch.Tensor:
        """The ``(N_x, N_obs)`` taper weights of every observation for every variable (for
        the variables ``rows`` only, when given)."""
        coords, obs = self.positions(n_state, observed)
        return self.taper_weights(coords if rows is None else coords[rows], obs)

    def transforms(self, predictions: torch.Tensor, values: torch.Tensor,
                   noise_std: torch.Tensor, *, generator: torch.Generator | None = None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
        """``(D, E, E)`` transforms of ``D`` variables from ``predictions`` ``(D, E, N_obs)``
        and their taper ``weights`` ``(D, N_obs)``."""
        if weights is None:
            raise ValueError("LETKF: weights are required (the filter computes them)")
        return sqrt_transforms(predictions, values, noise_std, weights)


@dataclass(frozen=True)
class AdaptiveInflationState:
    """The inflation estimate ``lambda`` and its variance (see :class:`AdaptiveInflation`)."""

    factor: float
    variance: float


@dataclass(frozen=True)
class AdaptiveInflation:
    r"""Multiplicative prior inflation estimated from the innovations ([Miyoshi2011]).

    Each cycle, before the analysis, the innovation ``d = y - H xb_f`` gives the
    observation-space estimate (Desroziers et al. 2005; Li et al. 2009)

        lambda_o = (d^T R^-1 d - N_obs) / tr(R^-1 H P_f H^T),

    from the uninflated forecast ensemble, with the variance
    ``v_o = 2 (tr(R^-1 H P_f H^T) lambda + N_obs)^2 / (N_obs tr(R^-1 H P_f H^T)^2)``
    (the variance of a chi-square estimate, [Miyoshi2011] in whitened form). The running
    estimate is their Gaussian combination ``lambda <- (v_o lambda + v lambda_o) / (v + v_o)``,
    ``v <- max(v v_o / (v + v_o), min_variance)``: the floor keeps the estimate able to
    follow a changing error regime (a persistence forecast of ``lambda`` whose variance grows
    to the floor each cycle). The forecast anomalies are multiplied by ``sqrt(lambda)``
    before the analysis (``lambda`` inflates the variance).

    Parameters
    ----------
    initial : float
        Starting ``lambda`` (variance inflation, >= 1 typical).
    variance : float
        Its starting variance.
    min_variance : float
        Floor of the running variance (how fast the estimate may move).
    bounds : (float, float)
        ``lambda`` is clipped to this range.
    """

    initial: float = 1.0
    variance: float = 1.0
    min_variance: float = 0.01
    bounds: tuple[float, float] = (1.0, 10.0)

    def __post_init__(self) -> None:
        check_positive_float(self.initial, "AdaptiveInflation.initial")
        check_positive_float(self.variance, "AdaptiveInflation.variance")
        check_positive_float(self.min_variance, "AdaptiveInflation.min_variance")
        lo, hi = self.bounds
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"AdaptiveInflation.bounds: expected 0 < low <= high, got "
                             f"{self.bounds}")

    def init(self) -> AdaptiveInflationState:
        return AdaptiveInflationState(factor=float(self.initial),
                                      variance=float(self.variance))

    def step(self, state: AdaptiveInflationState, *, predictions: torch.Tensor,
             values: torch.Tensor, noise_std: torch.Tensor
             ) -> tuple[float, AdaptiveInflationState, dict[str, Any]]:
        """``(lambda, new state, info)`` from the forecast ``predictions`` ``(E, N_obs)``."""
        yh = predictions.to(torch.float64)
        n, m = yh.shape
        r = noise_std.to(yh).expand(m)
        ybar = yh.mean(dim=0)
        d = (values.to(yh) - ybar) / r
        spread = float((((yh - ybar) / r) ** 2).sum()) / (n - 1)  # tr(R^-1 H P_f H^T)
        if spread <= 0:
            return state.factor, state, {"inflation_obs": math.nan}
        lam_o = (float(d @ d) - m) / spread
        v_o = 2.0 * (spread * state.factor + m) ** 2 / (m * spread ** 2)
        v = state.variance
        lam = (v_o * state.factor + v * lam_o) / (v + v_o)
        lo, hi = self.bounds
        lam = min(max(lam, lo), hi)
        new = AdaptiveInflationState(factor=lam,
                                     variance=max(v * v_o / (v + v_o), self.min_variance))
        return lam, new, {"inflation_obs": lam_o}
