"""Noise relative to the predictions' spread, growing over the run: :class:`RelativeNoise`,
the default schedule of :class:`~enkal.EnsembleKalmanOptimizer`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_positive_float, check_positive_int
from ..observations import Observations

__all__ = ["RelativeNoise", "RelativeNoiseState"]


@dataclass(frozen=True)
class RelativeNoiseState:
    iteration: int = 0


@dataclass(frozen=True)
class RelativeNoise:
    r"""Noise relative to the predictions' spread, growing over the run (a schedule).

    At step ``t`` (from 0) the noise variance is ``rho^2 = gamma_t * lambda``, with
    ``lambda = sum(D^2) / (N_ens - 1)^2`` the mean nonzero eigenvalue of the prediction
    sample covariance (``D`` the prediction anomalies). The whitened anomalies then satisfy
    ``sum Sig^2 = (N_ens - 1) / gamma_t`` whatever the scale of the outputs, so no floor is
    needed: a step moves each whitened direction by about ``1 / gamma_t``. ``gamma_t`` grows
    geometrically from ``gamma_0`` to ``gamma_end = max(final_gamma, growth * gamma_0)``
    over ``steps`` updates and then stays there (a learning-rate decay: smaller steps late):
    ``gamma_t = gamma_0 * (gamma_end / gamma_0) ** min(t / steps, 1)``; with
    ``gamma="auto"``, ``final_gamma`` is scaled down for runs of low coverage
    (``final_coverage``).

    ``gamma="auto"`` (the default) sets ``gamma_0`` from the run's *coverage*
    ``c = steps * (N_ens - 1) / N_par``, how many of the ensemble's random directions fall
    on each parameter direction over the run: ``gamma_0 = max(min_gamma, c / budget)``, so
    that ``c / gamma_0``, the run's movement per parameter direction, is ``budget``. Many
    passes of a large ensemble over a small network take small steps (averaging the
    minibatches); few passes over a large network take the largest safe steps
    (``min_gamma``). Measured on digits (``docs/nn.md``): the best ``gamma_0`` was 3-5 at
    ``c = 2``, 5 at ``c = 3``, 5-10 at ``c = 6``, 20 at ``c = 12``; Fashion-MNIST LeNet-5
    (``c = 0.7``) takes ``min_gamma``. ``N_par`` is the number of columns the schedule sees
    (the section's, pruned ones included). The rule is for minibatch training, where every
    step sees new data; with :class:`~enkal.EnsembleSmoother` on one fixed data set, give
    ``gamma`` as a number.

    The returned ``alpha`` is ``rho^2`` divided by the observations' mean noise variance
    (``noise^2``), so the optimizer's ``noise`` does not matter.

    Parameters
    ----------
    gamma : float or "auto"
        ``gamma_0``, the damping at the start (default ``"auto"``).
    growth : float
        Least factor by which ``gamma`` grows over the run (default 3; ``1`` with
        ``final_gamma=None`` keeps it constant).
    final_gamma : float or None
        Least damping at the end (default 30).
    steps : int
        Planned number of updates (default 500): set it to your run's length, as for a
        learning-rate schedule.
    min_gamma, budget : float
        Of ``gamma="auto"`` (defaults 3 and 0.6).
    final_coverage : float or None
        Of ``gamma="auto"``: ``final_gamma`` is scaled by ``min(1, c / final_coverage)``, so
        a run that explores each parameter direction fewer than ``final_coverage`` times
        decays its step less (default 2; ``None``: always ``final_gamma``). Measured on
        Fashion-MNIST's ReLU LeNet (``c = 0.5``): growing to 30 stalls after one epoch
        (``docs/nn.md``).
    step_size : float
        The fraction of the analysis mean increment that
        :class:`~enkal.EnsembleKalmanOptimizer` takes (it multiplies the optimizer's ``lr``;
        default 1: the plain update). Small ``gamma`` with a small ``step_size`` is a damped
        Newton step in the ensemble's subspace: the optimizer's default,
        :meth:`newton`. :class:`~enkal.EnsembleSmoother` refuses a value other than 1.
    trust_radius : float or None
        The longest step of the mean, in units of the redraw's spread (``Redraw`` only):
        :class:`~enkal.EnsembleKalmanOptimizer` takes ``lr * min(step_size, trust_radius /
        rho)`` of the analysis increment, ``rho`` its root mean square over the drawn
        parameters in units of their spread (a member sits at ``rho ~ 1``). Default
        ``None``: no limit. :class:`~enkal.EnsembleSmoother` and ``Carry`` refuse it.
    trust : {"cut", "damp"}
        How a step longer than the trust radius is held in it: ``"cut"`` (default) scales
        it down (``trust_radius / rho``), ``"damp"`` raises the damping instead, the noise
        inflated by the least factor (bisection, up to ``1e4``) for which ``step_size`` of
        the step fits: the trust region's Levenberg-Marquardt step, which gives up the
        directions the batch measures worst first, where the cut keeps the Newton step's
        proportions. Up to 14 more analyses on the same predictions (no more forwards)
        when it binds. ``info.schedule["damping"]`` reports the factor. Measured no better
        than the cut on seven networks (``docs/nn.md`` 1.7).
    """

    gamma: float | str = "auto"
    growth: float = 3.0
    final_gamma: float | None = 30.0
    steps: int = 500
    min_gamma: float = 3.0
    budget: float = 0.6
    final_coverage: float | None = 2.0
    step_size: float = 1.0
    trust_radius: float | None = None
    trust: str = "cut"

    def __post_init__(self) -> None:
        if self.gamma != "auto":
            if isinstance(self.gamma, str):
                raise ValueError(f"RelativeNoise.gamma: expected a float > 0 or 'auto', got "
                                 f"{self.gamma!r}")
            check_positive_float(self.gamma, "RelativeNoise.gamma")
        check_positive_float(self.growth, "RelativeNoise.growth")
        check_positive_float(self.final_gamma, "RelativeNoise.final_gamma", allow_none=True)
        check_positive_int(self.steps, "RelativeNoise.steps")
        check_positive_float(self.min_gamma, "RelativeNoise.min_gamma")
        check_positive_float(self.budget, "RelativeNoise.budget")
        check_positive_float(self.final_coverage, "RelativeNoise.final_coverage",
                             allow_none=True)
        check_positive_float(self.step_size, "RelativeNoise.step_size")
        check_positive_float(self.trust_radius, "RelativeNoise.trust_radius", allow_none=True)
        if self.trust not in ("cut", "damp"):
            raise ValueError(f"RelativeNoise.trust: expected 'cut' or 'damp', got "
                             f"{self.trust!r}")
        if self.trust == "damp" and self.trust_radius is None:
            raise ValueError("RelativeNoise.trust='damp' needs a trust_radius (the region "
                             "the damping fits the step into)")
        if self.growth < 1:
            raise ValueError(f"RelativeNoise.growth: expected a float >= 1 (gamma grows: "
                             f"smaller steps late), got {self.growth}")

    @classmethod
    def newton(cls, gamma: float = 0.01, step_size: float = 0.1,
               trust_radius: float = 1.25, trust: str = "cut") -> RelativeNoise:
        """The optimizer's default with :class:`~enkal.nn.Redraw` (issue #15): a constant
        small ``gamma`` (the step solves the minibatch's Gauss-Newton problem in the
        ensemble's subspace, every direction normalised by its own sensitivity), of which a
        constant ``step_size`` is taken, but never farther than ``trust_radius`` times the
        redraw's spread (a trust region: the ensemble measured the network only that far
        from the mean), a longer step cut to it. Nothing depends on the run's length.
        Measured on seven network x dataset pairs in ``docs/nn.md`` 1.6; a longer step
        damped until it fits instead (``newton(trust_radius=2, trust="damp")``) in 1.7.

        >>> RelativeNoise.newton()
        RelativeNoise(gamma=0.01, growth=1.0, final_gamma=None, steps=500, min_gamma=3.0, \
budget=0.6, final_coverage=2.0, step_size=0.1, trust_radius=1.25, trust='cut')
        """
        return cls(gamma=gamma, growth=1.0, final_gamma=None, step_size=step_size,
                   trust_radius=trust_radius, trust=trust)

    def initial_gamma(self, n_members: int | None = None,
                      n_parameters: int | None = None) -> float:
        """``gamma_0``: the given number, or for ``"auto"``
        ``max(min_gamma, steps * (n_members - 1) / n_parameters / budget)``.

        >>> RelativeNoise(steps=460).initial_gamma(64, 2410)   # digits MLP: c = 12
        20.04...
        >>> RelativeNoise(steps=705).initial_gamma(64, 61706)  # LeNet-5: c = 0.72
        3.0
        """
        if self.gamma != "auto":
            return float(self.gamma)
        if n_members is None or n_parameters is None:
            raise ValueError("RelativeNoise.gamma='auto' needs n_members and n_parameters "
                             "(the ensemble's shape)")
        return max(self.min_gamma, self.coverage(n_members, n_parameters) / self.budget)

    def coverage(self, n_members: int, n_parameters: int) -> float:
        """``c = steps * (n_members - 1) / n_parameters``: how often the run's random
        directions fall on each parameter direction."""
        return self.steps * (n_members - 1) / max(n_parameters, 1)

    def final(self, n_members: int | None = None, n_parameters: int | None = None) -> float:
        """Where the growth of ``gamma`` ends: ``max(growth * gamma_0, final_gamma *
        min(1, c / final_coverage))`` (``final_gamma`` unscaled for a given ``gamma`` or
        ``final_coverage=None``; ``growth * gamma_0`` for ``final_gamma=None``)."""
        g0 = self.initial_gamma(n_members, n_parameters)
        if self.final_gamma is None:
            return self.growth * g0
        end = self.final_gamma
        if self.gamma == "auto" and self.final_coverage is not None and \
                n_members is not None and n_parameters is not None:
            end *= min(1.0, self.coverage(n_members, n_parameters) / self.final_coverage)
        return max(end, self.growth * g0)

    def gamma_at(self, iteration: int, n_members: int | None = None,
                 n_parameters: int | None = None) -> float:
        """``gamma_t`` of step ``iteration`` (counted from 0); the ensemble's shape is needed
        for ``gamma="auto"``."""
        g0 = self.initial_gamma(n_members, n_parameters)
        end = self.final(n_members, n_parameters)
        return g0 * (end / g0) ** min(iteration / self.steps, 1.0)

    @staticmethod
    def eigenvalue(predictions: torch.Tensor, noise_std: torch.Tensor | None = None) -> float:
        """``sum(D^2) / (N_ens - 1)^2`` of predictions ``(N_ens, N_obs)``; with ``noise_std``
        (a scalar or ``(N_obs,)``) of the whitened anomalies ``D / noise_std``."""
        e = predictions.shape[0]
        d = predictions.to(torch.float64)
        d = d - d.mean(dim=0)
        if noise_std is not None:
            d = d / noise_std.to(d.device, torch.float64)
        return float(d.square().sum()) / (e - 1) ** 2

    def init(self) -> RelativeNoiseState:
        return RelativeNoiseState()

    def step(self, state: RelativeNoiseState, *, parameters: torch.Tensor,
             predictions: torch.Tensor, observations: Observations):
        gamma = self.gamma_at(state.iteration, *parameters.shape)
        std = observations.noise_std
        new = RelativeNoiseState(iteration=state.iteration + 1)
        if bool((std == std[0]).all()):  # one noise level: rho in units of the predictions
            rho2 = max(gamma * self.eigenvalue(predictions), 1e-30)
            var = float(std.to(torch.float64).square().mean())
            return rho2 / var, new, {"gamma": gamma, "rho": math.sqrt(rho2)}
        # per-observation noise (Classification's multinomial weighting): relative in units
        # of the noise, so the whitened anomalies satisfy sum Sig^2 = (N_ens - 1) / gamma
        alpha = max(gamma * self.eigenvalue(predictions, std), 1e-30)
        return alpha, new, {"gamma": gamma, "rho": math.sqrt(alpha)}

    def done(self, state: RelativeNoiseState) -> bool:
        return False
