r"""Noise schedules: how much the observation noise is inflated at each iteration.

A schedule turns the fresh predictions of one iteration into the inflation ``alpha_k`` of the
noise covariance used by that iteration's update (``R -> alpha_k R``). Schedules are frozen
configuration objects with pure methods; their state is a small frozen dataclass:

* ``init() -> state``
* ``step(state, *, parameters, predictions, observations) -> (alpha, state, info)``
* ``done(state) -> bool``: no further update is planned.
* optionally ``planned_updates``: how many updates the schedule makes from ``init()`` before
  it is done, when that is known in advance (an ``int``; ``math.inf`` for a schedule that is
  never done on its own; ``None`` when the data decide). Progress displays read it through
  :func:`planned_updates`, which gives ``None`` for a schedule without the attribute, so a
  user's schedule needs nothing.

Three rules:

* :class:`FixedAnnealing` -- the seed paper's rule [Trautner2020]: the noise target ``rho``
  (the noise standard deviation is ``rho`` times the observations' ``noise_std``;
  ``alpha = rho^2``) is multiplied by ``factor`` (0.75) whenever the largest parameter
  variance in the ensemble drops below ``rho``. Read literally it drives ``rho`` to zero and
  training diverges, so ``rho`` never goes below ``floor``. It never finishes on its own.
* :class:`ESMDA` -- fixed inflations ``alpha_1..alpha_Na`` with ``sum 1/alpha_i = 1``
  (Emerick & Reynolds 2013 [Emerick2013]); done after ``Na`` updates.
* :class:`DataMisfitController` -- the adaptive rule of Iglesias & Yang (2021)
  [Iglesias2021], as documented for EnsembleKalmanProcesses.jl: with ``Phi_j = 1/2 ||L^-1 (Yh_j - y)||^2`` and ``N_obs`` data,
  the step is ``dt = min(max(N_obs / (2 mean Phi), sqrt(N_obs / (2 var Phi))), 1 - t)`` and
  ``alpha = 1 / dt``; done when the algorithm time ``t = sum dt`` reaches 1 (the same
  constraint as ES-MDA's ``sum 1/alpha = 1``).

>>> s = ESMDA.constant(4)
>>> s.alphas
(4.0, 4.0, 4.0, 4.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_positive_float, check_positive_int, column_variance
from ._types import Schedule, check_component
from .errors import ScheduleExhaustedError
from .observations import Observations

__all__ = [
    "FixedAnnealing",
    "ESMDA",
    "DataMisfitController",
    "Iterations",
    "Schedule",
    "max_parameter_variance",
    "planned_updates",
]


def max_parameter_variance(parameters: torch.Tensor, chunk_size: int = 1 << 18) -> float:
    """Largest per-parameter ensemble variance (``E-1`` denominator), in column blocks."""
    best = 0.0
    for start in range(0, parameters.shape[1], chunk_size):
        block = parameters[:, start:start + chunk_size]
        best = max(best, float(column_variance(block).max()))
    return best


# -- fixed annealing (the seed paper) ------------------------------------------------------
@dataclass(frozen=True)
class AnnealingState:
    rho: float
    iteration: int = 0


@dataclass(frozen=True)
class FixedAnnealing:
    """The seed paper's annealing of the noise target ``rho``, with a floor.

    Parameters
    ----------
    factor : float in (0, 1]
        Multiplier applied to ``rho`` when the largest parameter variance is below ``rho``.
    initial : float
        Starting ``rho`` (relative to the observations' ``noise_std``).
    floor : float
        ``rho`` never goes below this (the paper's rule without it collapses training).
    """

    factor: float = 0.75
    initial: float = 1.0
    floor: float = 0.1

    def __post_init__(self) -> None:
        check_positive_float(self.factor, "FixedAnnealing.factor")
        check_positive_float(self.initial, "FixedAnnealing.initial")
        check_positive_float(self.floor, "FixedAnnealing.floor")
        if self.factor > 1:
            raise ValueError(f"FixedAnnealing.factor: expected a float in (0, 1], got {self.factor}")
        if self.floor > self.initial:
            raise ValueError(
                f"FixedAnnealing.floor: expected floor <= initial ({self.initial}), "
                f"got {self.floor}"
            )

    @property
    def planned_updates(self) -> float:
        """``math.inf``: never done on its own (a run ends at its ``max_iterations``)."""
        return math.inf

    def init(self) -> AnnealingState:
        return AnnealingState(rho=float(self.initial))

    def step(self, state: AnnealingState, *, parameters: torch.Tensor,
             predictions: torch.Tensor, observations: Observations):
        var = max_parameter_variance(parameters)
        rho = state.rho
        annealed = var < rho and rho > self.floor
        if annealed:
            rho = max(rho * self.factor, self.floor)
        new = AnnealingState(rho=rho, iteration=state.iteration + 1)
        return rho * rho, new, {"rho": rho, "max_variance": var, "annealed": annealed}

    def done(self, state: AnnealingState) -> bool:
        return False


# -- ES-MDA ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ESMDAState:
    iteration: int = 0


@dataclass(frozen=True)
class ESMDA:
    """Ensemble smoother with multiple data assimilation: fixed inflations.

    Parameters
    ----------
    alphas : sequence of float
        Positive inflation factors with ``sum 1/alpha_i = 1`` (checked to 1e-8); each is
        then at least 1. Default: four steps of 4.
    """

    alphas: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0)

    def __post_init__(self) -> None:
        try:
            alphas = tuple(float(a) for a in self.alphas)
        except (TypeError, ValueError):
            raise TypeError(
                f"ESMDA.alphas: expected a sequence of floats, got {self.alphas!r}"[:200]
            ) from None
        if not alphas:
            raise ValueError("ESMDA.alphas: expected at least one inflation factor, got none")
        for a in alphas:
            check_positive_float(a, "ESMDA.alphas[i]")
        total = sum(1.0 / a for a in alphas)
        if abs(total - 1.0) > 1e-8:
            raise ValueError(
                f"ESMDA.alphas: expected sum(1/alpha) == 1, got {total:.10g}; use "
                "ESMDA.constant(n) or ESMDA.normalized(alphas)"
            )
        object.__setattr__(self, "alphas", alphas)

    @classmethod
    def constant(cls, n_steps: int) -> ESMDA:
        """``n_steps`` equal inflations ``alpha_i = n_steps``."""
        check_positive_int(n_steps, "n_steps")
        return cls(alphas=(float(n_steps),) * n_steps)

    @classmethod
    def normalized(cls, alphas) -> ESMDA:
        """Rescale ``alphas`` so that ``sum 1/alpha = 1`` (shape of the sequence kept)."""
        a = [float(x) for x in alphas]
        for x in a:
            check_positive_float(x, "alphas[i]")
        total = sum(1.0 / x for x in a)
        return cls(alphas=tuple(x * total for x in a))

    @property
    def planned_updates(self) -> int:
        """The number of assimilation steps, ``len(alphas)``: done after that many."""
        return len(self.alphas)

    def init(self) -> ESMDAState:
        return ESMDAState()

    def step(self, state: ESMDAState, *, parameters: torch.Tensor,
             predictions: torch.Tensor, observations: Observations):
        if self.done(state):
            raise ScheduleExhaustedError(
                f"ESMDA: all {len(self.alphas)} assimilation steps are done"
            )
        alpha = self.alphas[state.iteration]
        return alpha, ESMDAState(state.iteration + 1), {"step": state.iteration + 1}

    def done(self, state: ESMDAState) -> bool:
        return state.iteration >= len(self.alphas)


# -- a fixed number of iterations at one inflation ----------------------------------------
@dataclass(frozen=True)
class IterationsState:
    iteration: int = 0


@dataclass(frozen=True)
class Iterations:
    """``steps`` updates at the noise inflation ``alpha``, optionally after a continuation.

    For the iterative rules that are not tempering schemes: :class:`~enkal.GaussNewton`
    (``alpha = 1``, the data once per linearisation) and
    :class:`~enkal.UnscentedKalmanInversion` (``alpha = 2``, EKP's default step). Unlike
    :class:`ESMDA`, ``sum 1/alpha`` is not 1: each iteration sees the data in full.

    With ``start``, the first updates are tempered, ``alpha_k = max(start / 2^k, alpha)``
    (``start=16``: 16, 8, 4, 2, then 1): a continuation from a wide, flat target to the
    posterior, which keeps Gauss-Newton from diverging on strongly nonlinear models from a
    prior far from the data (``docs/updates.md`` section 12).

    Parameters
    ----------
    steps : int
        The number of updates; the schedule is done after them.
    alpha : float
        The noise inflation of the updates (``> 0``), of all of them without ``start``.
    start : float, optional
        The first update's inflation (``>= alpha``), halved at every update down to
        ``alpha``.
    """

    steps: int = 10
    alpha: float = 1.0
    start: float | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.steps, "Iterations.steps")
        check_positive_float(self.alpha, "Iterations.alpha")
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.start is not None:
            check_positive_float(self.start, "Iterations.start")
            if self.start < self.alpha:
                raise ValueError(f"Iterations.start: expected start >= alpha = {self.alpha}, "
                                 f"got {self.start}")
            object.__setattr__(self, "start", float(self.start))

    def inflation(self, iteration: int) -> float:
        """``alpha`` of update ``iteration`` (0 for the first)."""
        if self.start is None:
            return self.alpha
        return max(self.start / 2.0 ** iteration, self.alpha)

    @property
    def planned_updates(self) -> int:
        """``steps``: done after that many updates."""
        return self.steps

    def init(self) -> IterationsState:
        return IterationsState()

    def step(self, state: IterationsState, *, parameters: torch.Tensor,
             predictions: torch.Tensor, observations: Observations):
        if self.done(state):
            raise ScheduleExhaustedError(f"Iterations: all {self.steps} updates are done")
        return (self.inflation(state.iteration), IterationsState(state.iteration + 1),
                {"step": state.iteration + 1})

    def done(self, state: IterationsState) -> bool:
        return state.iteration >= self.steps


# -- data-misfit controller (Iglesias & Yang 2021) ---------------------------------------
@dataclass(frozen=True)
class MisfitControllerState:
    time: float = 0.0
    iteration: int = 0


@dataclass(frozen=True)
class DataMisfitController:
    """Adaptive inflation from the data misfit (Iglesias & Yang 2021).

    Parameters
    ----------
    terminate_at : float
        Algorithm time at which the schedule is done (1 for the Bayesian posterior).
    """

    terminate_at: float = 1.0

    def __post_init__(self) -> None:
        check_positive_float(self.terminate_at, "DataMisfitController.terminate_at")

    @property
    def planned_updates(self) -> None:
        """``None``: the data decide when the algorithm time reaches ``terminate_at``."""
        return None

    def init(self) -> MisfitControllerState:
        return MisfitControllerState()

    def step(self, state: MisfitControllerState, *, parameters: torch.Tensor,
             predictions: torch.Tensor, observations: Observations):
        if self.done(state):
            raise ScheduleExhaustedError(
                f"DataMisfitController: algorithm time reached {state.time:.6g} >= "
                f"{self.terminate_at}"
            )
        phi = observations.misfit(predictions)
        m = observations.size
        mean = float(phi.mean())
        var = float(phi.var()) if phi.numel() > 1 else 0.0
        cand = [m / (2 * mean) if mean > 0 else math.inf,
                math.sqrt(m / (2 * var)) if var > 0 else math.inf]
        dt = min(max(cand), self.terminate_at - state.time)
        new_time = state.time + dt
        if self.terminate_at - new_time < 1e-12 * self.terminate_at:
            new_time = self.terminate_at
        new = MisfitControllerState(time=new_time, iteration=state.iteration + 1)
        return 1.0 / dt, new, {"time": new_time, "dt": dt}

    def done(self, state: MisfitControllerState) -> bool:
        return state.time >= self.terminate_at


def planned_updates(schedule: object, max_iterations: int | None = None) -> int | None:
    """The updates a run with ``schedule`` is planned to make, when known in advance.

    Reads the schedule's optional ``planned_updates`` attribute (``None`` when it has none:
    any object with the :class:`Schedule` methods plugs in). With ``max_iterations``, the
    run's own bound caps it: ``min(max_iterations, planned)``, so a schedule that is never
    done on its own (``math.inf``, :class:`FixedAnnealing`) plans ``max_iterations``. An
    attribute that is neither ``None``, ``math.inf`` nor an int ``>= 0`` counts as unknown.

    >>> planned_updates(ESMDA.constant(4), max_iterations=20)
    4
    >>> planned_updates(FixedAnnealing(), max_iterations=20)
    20
    >>> planned_updates(DataMisfitController(), max_iterations=20) is None
    True
    """
    planned = getattr(schedule, "planned_updates", None)
    if planned == math.inf:
        return max_iterations
    if isinstance(planned, bool) or not isinstance(planned, int) or planned < 0:
        return None
    return planned if max_iterations is None else min(planned, max_iterations)


def check_schedule(schedule: object) -> None:
    check_component(schedule, Schedule, "schedule",
                    "FixedAnnealing(), ESMDA(...), DataMisfitController()")
