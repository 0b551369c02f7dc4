r"""The Ensemble Kalman Sampler: an ensemble that samples the posterior, not a Gaussian fit.

ES-MDA's final ensemble approximates the posterior only for a linear model. The Ensemble
Kalman Sampler (EKS) [GarbunoInigo2020] runs the members as interacting Langevin
diffusions whose stationary law is the posterior ``N(u; m0, S0) exp(-1/2 |G(u) - y|^2_R)``
in the unconstrained space, preconditioned by the ensemble covariance ``C``::

    du_j = -C^{uG} R^-1 (G(u_j) - y) dt - C S0^-1 (u_j - m0) dt
           + (N_par + 1) / E (u_j - u_mean) dt + sqrt(2 C) dW_j

The third term is ALDI's finite-size correction [GarbunoInigo2020b], which makes the
posterior exactly invariant for any ``E > N_par`` (with it, the noise uses the ensemble's
own square root ``C^(1/2) = A^T / sqrt(E)``). Discretised as EnsembleKalmanProcesses.jl does:
the prior term implicit, the rest explicit, the step ``dt = 1 / alpha`` from the schedule --
:class:`EKSStable` for EKP's adaptive ``dt = numerator / (||D||_F + nugget)``.

Everything stays in ensemble space: with ``A`` the centred members ``(E, N_par)``,
``D = Dw Ew^T / E`` (whitened prediction anomalies against whitened residuals), the Gram
matrices ``A S0^-1 A^T``, ``A S0^-1 X^T`` and ``A S0^-1 m0`` (all ``E x E`` or ``E``), the
implicit solve by Woodbury on an ``E x E`` system; the step is ``X+ = W X`` with
``W = I + T^T (I - 1 1^T / E)``, applied like every other update. ``docs/updates.md``
("The Ensemble Kalman Sampler") derives it; ``tests/test_sampler.py`` checks the stationary
ensemble against the closed-form posterior of a linear-Gaussian problem.

Use it with ``schedule=EKSStable()`` and ``max_iterations`` (or ``EKSStable(duration=T)``);
the ensemble after burn-in is a posterior sample, and so are the stored rows of its history,
each weighted by its step ``dt`` (the ``schedule_dt`` diagnostic) when averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._checks import check_positive_float
from .observations import Observations

__all__ = ["EnsembleKalmanSampler", "EKSStable", "EKSStableState"]


def vector(v: Any, name: str) -> tuple[float, ...]:
    """``v`` (a number or a sequence of numbers) as a tuple of finite floats, or a
    ``TypeError``/``ValueError`` naming ``name``."""
    values = (v,) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    try:
        out = tuple(float(x) for x in values)
    except TypeError:
        raise TypeError(f"{name}: expected a number or a sequence of numbers, got "
                        f"{type(v).__name__}") from None
    if not out or not all(math.isfinite(x) for x in out):
        raise ValueError(f"{name}: expected finite numbers, got {v!r}"[:200])
    return out


def prior_vectors(mean: tuple[float, ...], std: tuple[float, ...], n_par: int,
                  like: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's mean and std as float64 ``(N_par,)`` tensors on ``like``'s device (one
    value broadcast, or exactly ``N_par``: else a ``ValueError`` naming ``name``)."""
    out = []
    for what, v in (("prior_mean", mean), ("prior_std", std)):
        if len(v) not in (1, n_par):
            raise ValueError(f"{name}.{what}: expected 1 or {n_par} values (N_par), got "
                             f"{len(v)}")
        out.append(torch.tensor(v, dtype=torch.float64, device=like.device).expand(n_par))
    return out[0], out[1]


def block_moments(blocks: Any) -> tuple[list[float], list[float]]:
    """The unconstrained prior mean and std of every parameter of ``blocks`` (the
    :class:`~enkal.PriorBlock` list of :func:`enkal.constrained_gaussian`)."""
    mean: list[float] = []
    std: list[float] = []
    for b in blocks:
        n = math.prod(b.shape)
        mean += [b.u_mean] * n
        std += [b.u_std] * n
    return mean, std


class GaussianPriorRule:
    """What the rules that know the Gaussian prior ``N(m0, diag(s0^2))`` of the unconstrained
    space share (:class:`EnsembleKalmanSampler`, :class:`~enkal.GaussNewton`,
    :class:`~enkal.UnscentedKalmanInversion`): the checked ``prior_mean`` and ``prior_std``
    fields, their tensors, and :meth:`from_blocks`."""

    prior_mean: Any
    prior_std: Any

    def _check_prior(self) -> None:
        """``prior_mean`` and ``prior_std`` (of a frozen dataclass) as tuples of finite
        floats, the sds positive; errors name the class."""
        name = type(self).__name__
        object.__setattr__(self, "prior_mean", vector(self.prior_mean, f"{name}.prior_mean"))
        std = vector(self.prior_std, f"{name}.prior_std")
        if min(std) <= 0:
            raise ValueError(f"{name}.prior_std: expected values > 0, got {min(std)}")
        object.__setattr__(self, "prior_std", std)

    def _prior(self, n_par: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return prior_vectors(self.prior_mean, self.prior_std, n_par, like,
                             type(self).__name__)

    @classmethod
    def from_blocks(cls, blocks: Any, **kwargs: Any) -> Any:
        """The rule for the prior :func:`enkal.prior_ensemble` draws from ``blocks`` (the
        :class:`~enkal.PriorBlock` list of :func:`enkal.constrained_gaussian`); ``kwargs``:
        the rule's other fields."""
        mean, std = block_moments(blocks)
        return cls(mean, std, **kwargs)  # type: ignore[call-arg]


def _interaction(predictions: torch.Tensor, observations: Observations) -> torch.Tensor:
    """``D = Dw Ew^T / E`` ``(E, E)``: whitened prediction anomalies (rows) against whitened
    residuals ``G(u_j) - y`` (columns)."""
    y = predictions.to(torch.float64)
    dw = observations.whiten(y - y.mean(dim=0, keepdim=True))
    ew = observations.whiten(y - observations.values.to(y.device, torch.float64))
    return dw @ ew.T / y.shape[0]


@dataclass(frozen=True)
class EnsembleKalmanSampler(GaussianPriorRule):
    r"""The EKS update rule, with ALDI's finite-size correction by default.

    Parameters
    ----------
    prior_mean, prior_std : float or sequence of float
        The Gaussian prior ``N(m0, diag(prior_std^2))`` in the unconstrained space (one value
        for every parameter, or ``N_par``): the posterior the ensemble samples is this prior
        times the likelihood. Usually the prior the ensemble was drawn from
        (:func:`enkal.prior_ensemble` blocks' ``u_mean`` and ``u_std``).
    correction : bool
        ALDI's ``(N_par + 1) / E (u_j - u_mean)`` drift (default): the posterior is then
        invariant for any ``E > N_par``; without it (the original EKS) only as ``E -> inf``.

    The step is ``dt = 1 / alpha`` of the schedule (:class:`EKSStable`). Works on all
    parameters at once (no :class:`~enkal.nn.Sections`), with the smoother's failure policy,
    masks and ask/tell like any rule.
    """

    prior_mean: Any = 0.0
    prior_std: Any = 1.0
    correction: bool = True
    needs_parameters: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_prior()
        if not isinstance(self.correction, bool):
            raise TypeError(f"EnsembleKalmanSampler.correction: expected a bool, got "
                            f"{self.correction!r}")

    def transform(self, predictions: torch.Tensor, observations: Observations, *,
                  alpha: float, generator: torch.Generator | None,
                  parameters: torch.Tensor | None = None) -> torch.Tensor:
        """``W`` ``(E, E)`` with ``X+ = W X``: one EKS step of ``dt = 1 / alpha`` from the
        ensemble ``parameters`` ``(E, N_par)`` and its ``predictions``."""
        if parameters is None:
            raise ValueError("EnsembleKalmanSampler: needs the ensemble (parameters=); it is "
                             "an update rule of EnsembleSmoother, not of assimilate()")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"EnsembleKalmanSampler: expected a step dt = 1 / alpha > 0, got "
                             f"alpha = {alpha}")
        x = parameters.to(torch.float64)
        e, n_par = x.shape
        m0, s0 = self._prior(n_par, x)
        dt = 1.0 / alpha
        a = x - x.mean(dim=0, keepdim=True)
        a_s = a / (s0 * s0)  # A S0^-1
        gram = a_s @ a.T  # <A_k, S0^-1 A_l>
        # the explicit drifts, as coefficients of the rows of A: data, prior mean, ALDI
        c = -dt * _interaction(predictions, observations)
        c += (dt / e) * (a_s @ m0).unsqueeze(1)
        if self.correction:
            c += (dt * (n_par + 1) / e) * torch.eye(e, dtype=torch.float64, device=x.device)
        # the implicit prior term, (I + dt C S0^-1)^-1, by Woodbury in ensemble space
        q = a_s @ x.T + gram @ c
        m = torch.linalg.solve(torch.eye(e, dtype=torch.float64, device=x.device)
                               + (dt / e) * gram, q)
        z = torch.randn(e, e, generator=generator, dtype=torch.float64, device=x.device)
        t = c - (dt / e) * m + math.sqrt(2.0 * dt / e) * z
        centre = torch.eye(e, dtype=torch.float64, device=x.device) - 1.0 / e
        return torch.eye(e, dtype=torch.float64, device=x.device) + t.T @ centre


@dataclass(frozen=True)
class EKSStableState:
    time: float = 0.0
    iteration: int = 0


@dataclass(frozen=True)
class EKSStable:
    """The sampler's time step (as EKP's ``EKSStableScheduler``): ``dt = numerator /
    (||D||_F + nugget)`` with ``D`` the ensemble's data interaction, so a far-off ensemble
    takes small steps; or a fixed ``dt``. Returns ``alpha = 1 / dt``.

    The explicit Euler step biases the stationary ensemble by ``O(dt)``: measured on a
    two-parameter linear-Gaussian problem (``tests/test_sampler.py``, E = 50, time averages
    after burn-in), the posterior variances came out 56-59% too large with EKP's
    ``numerator = 1``, 4% with 0.1, 1-2% with 0.05 (the default) and 0.5-2.6% (the
    Monte-Carlo error) with 0.02; the means within 0.04 posterior sd in every case. A fixed
    ``dt`` must be small enough for the prior's stiffness too: ``dt = 0.05`` diverged there
    in the first steps, where the adaptive step is tiny.

    Averages over iterations must weigh each ensemble by its step (``StepInfo.schedule
    ["dt"]``): the adaptive step is smaller when the ensemble is wider, so a plain average
    over iterations over-weights wide ensembles (with 4 members, variances 50-70% too large;
    weighted, within the Monte-Carlo error).

    Parameters
    ----------
    numerator, nugget : float
        Of the adaptive step (EKP's defaults are 1 and machine epsilon).
    dt : float, optional
        A fixed step instead.
    duration : float, optional
        Done once the sampler's time reaches it (default: never; stop by ``max_iterations``).
    """

    numerator: float = 0.05
    nugget: float = 1e-8
    dt: float | None = None
    duration: float | None = None

    def __post_init__(self) -> None:
        check_positive_float(self.numerator, "EKSStable.numerator")
        check_positive_float(self.nugget, "EKSStable.nugget")
        check_positive_float(self.dt, "EKSStable.dt", allow_none=True)
        check_positive_float(self.duration, "EKSStable.duration", allow_none=True)

    @property
    def planned_updates(self) -> float | None:
        """``inf`` without a ``duration`` (never done on its own), else unknown."""
        return math.inf if self.duration is None else None

    def init(self) -> EKSStableState:
        return EKSStableState()

    def step(self, state: EKSStableState, *, parameters: torch.Tensor,
             predictions: torch.Tensor, observations: Observations
             ) -> tuple[float, EKSStableState, dict]:
        dt = self.dt
        if dt is None:
            norm = float(torch.linalg.matrix_norm(_interaction(predictions, observations)))
            dt = self.numerator / (norm + self.nugget)
        new = EKSStableState(time=state.time + dt, iteration=state.iteration + 1)
        return 1.0 / dt, new, {"time": new.time, "dt": dt}

    def done(self, state: EKSStableState) -> bool:
        return self.duration is not None and state.time >= self.duration
