r"""Few-forward inversion: an ensemble Gauss-Newton smoother and Unscented Kalman Inversion.

ES-MDA spends its forwards on a fixed number of tempered steps; for a nonlinear model its
final ensemble is only an approximation of the posterior. Two rules here aim at the
posterior's Gaussian approximation with fewer forwards, both knowing the Gaussian prior
``N(m0, diag(s0^2))`` of the unconstrained space (as :class:`~enkal.EnsembleKalmanSampler`):

* :class:`GaussNewton` -- each iteration one Gauss-Newton step on the MAP cost
  ``1/2 |y - G(u)|^2_R + 1/2 |u - m0|^2_S0`` in the span of the ensemble's anomalies, the
  model linearised by regression of the prediction anomalies on the parameter anomalies
  (Evensen's average sensitivity [Evensen2019]; the IEnKS's transform variant
  [Bocquet2014]), and the new ensemble the Laplace (Gaussian) posterior at the new mean,
  as a deterministic square root. Linear model and ``E > N_par``: the exact posterior in
  one iteration. Later iterations linearise over the posterior's own spread (statistical
  linearisation), so the fixed point is the MAP of the ensemble-averaged model.
* :class:`UnscentedKalmanInversion` -- UKI [Huang2022]: the members are ``2 N_par + 1``
  sigma points of a Gaussian ``N(m, C)``, moved by the unscented Kalman filter of an
  artificial dynamics whose fixed point (linear model) is the posterior, prior included
  through an augmented observation of the parameters (``impose_prior``, [Chada2020]).

Both are ensemble rules of :class:`~enkal.EnsembleSmoother`: ``GaussNewton`` gives one
``E x E`` transform ``W`` (``X+ = W X``, no ``P x P`` matrix, so it scales like the other
rules); ``UnscentedKalmanInversion`` builds the next sigma points itself (``P x P`` algebra:
for small ``N_par``). Use them with :class:`~enkal.Iterations` (``alpha = 1`` for
Gauss-Newton, ``alpha = 2`` for UKI). ``docs/updates.md`` (section 12) derives both and
``tests/test_inversion.py`` checks them against closed forms.

>>> import torch
>>> from enkal import EnsembleSmoother, Iterations, Observations
>>> g = torch.Generator().manual_seed(0)
>>> H = torch.tensor([[1.0, 0.5], [0.0, 2.0], [1.0, -1.0]], dtype=torch.float64)
>>> obs = Observations(torch.tensor([1.0, 2.0, 0.5]), noise_std=0.5)
>>> rule = GaussNewton(prior_mean=0.0, prior_std=1.0)
>>> smoother = EnsembleSmoother(obs, rule=rule, schedule=Iterations(1), seed=0)
>>> x = torch.randn(8, 2, generator=g, dtype=torch.float64)
>>> state, _ = smoother.step(smoother.init(x), x @ H.T)
>>> prec = H.T @ H / 0.25 + torch.eye(2, dtype=torch.float64)        # the exact posterior
>>> exact = torch.linalg.solve(prec, H.T @ obs.values.double() / 0.25)
>>> bool(torch.allclose(state.parameters.mean(0), exact, atol=1e-12))
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._checks import check_positive_float
from .errors import FailedMembersError
from .observations import Observations
from .sampler import GaussianPriorRule

__all__ = ["GaussNewton", "UnscentedKalmanInversion"]

_F64 = torch.float64


@dataclass(frozen=True)
class GaussNewton(GaussianPriorRule):
    """Ensemble Gauss-Newton: the MAP in the ensemble's span, the Laplace posterior around it.

    Parameters
    ----------
    prior_mean, prior_std : float or sequence of float
        The Gaussian prior of the unconstrained parameters (one value for all, or one per
        parameter); :meth:`from_blocks` takes them from :func:`enkal.constrained_gaussian`.
    step : float in (0, 1]
        The fraction of the Gauss-Newton increment of the mean taken (a damped step for
        strongly nonlinear models); the spread is always the Laplace posterior's.
    rcond : float
        Directions of the anomalies with a singular value below ``rcond`` times the largest
        are dropped (the ensemble spans fewer than ``E - 1`` directions when
        ``N_par < E - 1``).

    Each update reads the ensemble (``needs_parameters``) and returns ``W`` with
    ``X+ = W X``: the mean moves by ``step`` times the Gauss-Newton increment; the anomalies
    become a square root of ``V (G G^T + V^T S0^-1 V)^-1 V^T``, ``V`` the ensemble's span and
    ``G`` the regressed sensitivities (``docs/updates.md``, section 12).
    """

    prior_mean: Any = 0.0
    prior_std: Any = 1.0
    step: float = 1.0
    rcond: float = 1e-6

    needs_parameters: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_prior()
        check_positive_float(self.step, "GaussNewton.step")
        if self.step > 1:
            raise ValueError(f"GaussNewton.step: expected a fraction in (0, 1], got {self.step}")
        check_positive_float(self.rcond, "GaussNewton.rcond")

    def transform(self, predictions: torch.Tensor, observations: Observations, *,
                  alpha: float, generator: torch.Generator | None,
                  parameters: torch.Tensor | None = None) -> torch.Tensor:
        """``W`` ``(E, E)`` with ``X+ = W X`` from the ensemble ``parameters`` ``(E, N_par)``
        and its ``predictions``; ``alpha`` inflates the noise (1: none). Draws nothing."""
        if parameters is None:
            raise ValueError("GaussNewton: needs the ensemble (parameters=); it is an update "
                             "rule of EnsembleSmoother, not of assimilate()")
        _check_alpha(alpha, 0.0, "GaussNewton")
        x = parameters.to(_F64)
        e, n_par = x.shape
        m0, s0 = self._prior(n_par, x)
        scale = math.sqrt(e - 1)
        mean = x.mean(dim=0)
        b = (x - mean) / scale  # B: the anomalies, B^T B the ensemble covariance
        y = predictions.to(_F64)
        dw = observations.whiten(y - y.mean(dim=0, keepdim=True)) / (scale * math.sqrt(alpha))
        rw = _residual(observations, y.mean(dim=0)) / math.sqrt(alpha)
        # the span of B from its E x E Gram: B = U S V^T
        s2, u = torch.linalg.eigh(b @ b.T)
        keep = s2 > (self.rcond ** 2) * s2.max().clamp_min(torch.finfo(_F64).tiny)
        u, s = u[:, keep], s2[keep].sqrt()
        bs = b / (s0 * s0)  # B S0^-1
        g = (u.T @ dw) / s.unsqueeze(1)  # G = S^-1 U^T Dw: sensitivities in the span
        prior_h = (u.T @ (bs @ b.T) @ u) / torch.outer(s, s)  # V^T S0^-1 V
        h = g @ g.T + prior_h
        grad = g @ rw - (u.T @ (bs @ (mean - m0))) / s
        evals, evecs = torch.linalg.eigh(h)
        z = evecs @ ((evecs.T @ grad) / evals)
        inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # Hz^-1/2
        t = u @ (inv_sqrt / s.unsqueeze(0)) @ u.T  # T = U Hz^-1/2 S^-1 U^T
        c = u @ (self.step * z / s) / scale  # the mean's increment, as weights of A
        ones = torch.ones(e, dtype=_F64, device=x.device)
        return torch.outer(ones, ones) / e + torch.outer(ones, c) + t


@dataclass(frozen=True)
class UnscentedKalmanInversion(GaussianPriorRule):
    """Unscented Kalman Inversion [Huang2022]: ``2 N_par + 1`` sigma points, few iterations.

    Parameters
    ----------
    prior_mean, prior_std : float or sequence of float
        The Gaussian prior of the unconstrained parameters (one value for all, or one per
        parameter): the first sigma points (:meth:`initial_ensemble`) and, with
        ``impose_prior``, a term of every update.
    impose_prior : bool
        Observe the parameters themselves, ``m0 = u + N(0, S0)``, next to the data
        (Tikhonov regularisation by an augmented system [Chada2020]): the fixed point of a
        linear model is then the posterior (mean and covariance). ``False``: the prior only
        starts the iteration and the fixed point is the flat-prior (least-squares) one.

    The schedule's ``alpha > 1`` is ``1 / dt`` of the artificial dynamics: the noise is
    ``alpha R`` (and ``alpha S0`` for the prior term) and the next sigma points spread the
    analysis covariance times ``alpha / (alpha - 1)`` (for ``alpha = 2``: EKP's
    ``Sigma_nu = 2 Gamma`` and ``Sigma_omega = C_n``, i.e. ``update_freq = 1``); every
    ``alpha > 1`` has the posterior as fixed point. Use ``Iterations(n, alpha=2.0)``.

    The members must be the sigma points this rule made (start from
    :meth:`initial_ensemble`), and every one must succeed (a failed one raises
    :class:`~enkal.FailedMembersError`). The estimate is the Gaussian ``N(m, C)`` that
    :meth:`posterior` reads from the members, not their sample statistics.
    """

    prior_mean: Any = 0.0
    prior_std: Any = 1.0
    impose_prior: bool = True

    direct: ClassVar[bool] = True  # builds X+ itself (update), not through one W

    def __post_init__(self) -> None:
        self._check_prior()
        if not isinstance(self.impose_prior, bool):
            raise TypeError("UnscentedKalmanInversion.impose_prior: expected a bool, got "
                            f"{type(self.impose_prior).__name__}")

    @staticmethod
    def spread(n_par: int) -> float:
        """The sigma points' distance ``c = a sqrt(N_par)``, ``a = min(sqrt(4 / N_par), 1)``
        (EKP's choice: ``c = 2`` from ``N_par = 4`` on)."""
        return min(math.sqrt(4.0 / n_par), 1.0) * math.sqrt(n_par)

    def initial_ensemble(self, n_par: int | None = None, *, dtype: torch.dtype = _F64,
                         device: Any = None) -> torch.Tensor:
        """The first sigma points ``(2 N_par + 1, N_par)``: of the prior ``N(m0, S0)``.

        ``n_par`` is needed when both prior moments were given as one number."""
        if n_par is None:
            n_par = max(len(self.prior_mean), len(self.prior_std))
        if not isinstance(n_par, int) or isinstance(n_par, bool) or n_par < 1:
            raise ValueError(f"n_par: expected a positive int, got {n_par!r}")
        like = torch.empty(0, dtype=_F64, device=device)
        m0, s0 = self._prior(n_par, like)
        return _sigma_points(m0, torch.diag(s0), self.spread(n_par)).to(dtype)

    def posterior(self, parameters: torch.Tensor, alpha: float = 2.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian estimate ``(m, C)`` (float64; ``(N_par,)`` and ``(N_par, N_par)``)
        that the sigma points ``parameters`` carry, after updates with this ``alpha``."""
        _check_alpha(alpha, 1.0, "UnscentedKalmanInversion")
        x = parameters.to(_F64)
        n_par = _check_sigma_points(x)
        a = (x[1:] - x[0]) / self.spread(n_par)
        cov = 0.5 * a.T @ a * (alpha - 1.0) / alpha
        return x[0].clone(), cov

    def transform(self, predictions: torch.Tensor, observations: Observations, *,
                  alpha: float = 1.0, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        """Not one matrix: UKI builds its next sigma points itself (:meth:`update`)."""
        raise TypeError("UnscentedKalmanInversion builds its next sigma points itself, not "
                        "through one W: use it as the rule of EnsembleSmoother (enkal.run)")

    def update(self, parameters: torch.Tensor, predictions: torch.Tensor,
               observations: Observations, *, ok: torch.Tensor, alpha: float,
               generator: torch.Generator, failure: Any) -> torch.Tensor:
        """The next sigma points ``(2 N_par + 1, N_par)`` from these and their
        ``predictions`` (one UKI analysis and prediction step)."""
        _check_alpha(alpha, 1.0, "UnscentedKalmanInversion")
        x = parameters.to(_F64)
        n_par = _check_sigma_points(x)
        if not bool(ok.all()):
            bad = torch.nonzero(~ok).squeeze(1).tolist()
            raise FailedMembersError(
                f"UnscentedKalmanInversion: sigma point(s) {bad[:10]} failed; UKI needs "
                "every sigma point (a narrower prior_std, or a model that runs there)")
        m0, s0 = self._prior(n_par, x)
        c = self.spread(n_par)
        root = 1.0 / (math.sqrt(2.0) * c * math.sqrt(alpha))  # sqrt(W_c / alpha)
        a = x[1:] - x[0]  # (2 N_par, N_par): the sigma anomalies
        y = predictions.to(_F64)
        d = observations.whiten(y[1:] - y[0]) * root  # mean: the central point's prediction
        r = _residual(observations, y[0]) / math.sqrt(alpha)
        if self.impose_prior:  # the parameters observed: m0 = u + N(0, S0)
            d = torch.cat([d, a / s0 * root], dim=1)
            r = torch.cat([r, (m0 - x[0]) / (s0 * math.sqrt(alpha))])
        at = a * (root * math.sqrt(alpha))  # sqrt(W_c) A: C_hat = At^T At
        k = torch.eye(2 * n_par, dtype=_F64, device=x.device) + d @ d.T
        mean = x[0] + at.T @ torch.linalg.solve(k, d @ r)
        cov = at.T @ torch.linalg.solve(k, at)
        cov = 0.5 * (cov + cov.T) * (alpha / (alpha - 1.0))  # the prediction step
        return _sigma_points(mean, _root(cov), c).to(parameters.dtype)


def _residual(observations: Observations, prediction: torch.Tensor) -> torch.Tensor:
    """The whitened residual ``R^-1/2 (y - prediction)`` ``(N_obs,)``."""
    y = observations.values.to(device=prediction.device, dtype=_F64)
    return observations.whiten((y - prediction).unsqueeze(0))[0]


def _check_alpha(alpha: float, above: float, name: str) -> None:
    if not (math.isfinite(alpha) and alpha > above):
        raise ValueError(f"{name}: expected the schedule's alpha > {above:g}, got {alpha} "
                         f"(use Iterations(n, alpha=...))")


def _check_sigma_points(x: torch.Tensor) -> int:
    e, n_par = x.shape
    if e != 2 * n_par + 1:
        raise ValueError(f"UnscentedKalmanInversion: expected 2 N_par + 1 = {2 * n_par + 1} "
                         f"sigma points, got {e} members; start from "
                         "rule.initial_ensemble()")
    return n_par


def _root(cov: torch.Tensor) -> torch.Tensor:
    """A lower square root ``L L^T = cov`` (Cholesky; eigenvalues clamped if it fails)."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return chol
    w, v = torch.linalg.eigh(cov)
    floor = w.max().clamp_min(torch.finfo(_F64).tiny) * 1e-12
    return v * w.clamp_min(floor).sqrt()


def _sigma_points(mean: torch.Tensor, root: torch.Tensor, c: float) -> torch.Tensor:
    """``[m; m + c L_j; m - c L_j]``, the columns ``L_j`` of ``root``."""
    return torch.cat([mean.unsqueeze(0), mean + c * root.T, mean - c * root.T])
