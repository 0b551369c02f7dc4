"""Structure adaptation: prune the least-informative parameters during a run.

:class:`StructureAdaptation` is a strategy for :class:`~enkal.EnsembleSmoother`
(``adapt=``). At chosen iterations it scores every live parameter from the *fresh*
predictions (the same forward evaluation the update uses), switches off the lowest-scoring
ones in the mask, and the update body (:func:`enkal.analysis.analyse`) applies that
iteration's update and then zeroes the masked columns in all members; the following updates
re-fit the remaining parameters (fine-tuning), and the mask keeps pruned parameters at zero
in every later update::

    Yh_k --score(X_k, Yh_k - y)--> I (N_par,) --prune_mask--> mask_{k+1}
         --update(X_k, Yh_k)--> X_{k+1} --X_{k+1}[:, ~mask_{k+1}] = 0--> state_{k+1}

Scores are typed strategies:

* :class:`MutualInformation` -- IEKL's eq. 12 [Trautner2020], ``I_i = sum_j -1/2 log(1 - r_ij^2)`` between
  parameter ``i`` and the whitened errors (:func:`enkal.information.mutual_information`): how
  much the ensemble's spread in a parameter explains its spread in the errors. The default,
  for networks, where most weights barely move the outputs.
* :class:`Significance` -- ``mean_i^2 / (2 var_i)``, the log-ratio (nats) of the ensemble's
  Gaussian density for parameter ``i`` at its mean and at zero: the evidence the ensemble
  holds against ``x_i = 0``. For models linear in their coefficients (polynomial libraries,
  SINDy) use this one: there the ensemble covariance -- and so every correlation, and eq. 12
  -- does not depend on the data at all (the Kalman covariance update never reads ``y``), so
  eq. 12 cannot tell a zero coefficient from a needed one; ``docs/adaptation.md`` shows it.
* :class:`Saliency` -- ``1/2 m_i^2 ||G_i||^2``, the first-order misfit increase of zeroing
  parameter ``i`` estimated from the ensemble sensitivity ``G_i`` (significance times eq.
  12's squared correlations, weighted by the error variances).

The strategy is stateless: whether it prunes, and what, is a function of the iteration, the
mask and the fresh ensemble and predictions. A checkpoint (which stores ``iteration`` and
``mask``) therefore resumes it exactly; its ``init()`` returns ``None``.

>>> import torch
>>> from enkal import CallableModel, EnsembleSmoother, ESMDA, Observations
>>> h = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
>>> model = CallableModel(lambda x: x @ h.T, parameters=4, output_size=2)   # x3, x4 unused
>>> smoother = EnsembleSmoother(Observations([1.0, -1.0], noise_std=0.1),
...                             schedule=ESMDA.constant(6),
...                             adapt=StructureAdaptation(every=2, fraction=0.5,
...                                                       target_sparsity=0.5))
>>> prior = torch.randn(64, 4, generator=torch.Generator().manual_seed(0),
...                     dtype=torch.float64)
>>> result = smoother.run(model, prior)
>>> result.state.mask.tolist(), result.history["n_live"]
([True, True, False, False], [4, 4, 2, 2, 2, 2])
>>> bool((result.parameters[:, 2:] == 0).all())
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch

from ._checks import check_fraction, check_positive_float, check_positive_int
from ._types import Adaptation, check_component
from .information import mutual_information, prune_mask, saliency
from .observations import Observations

__all__ = ["StructureAdaptation", "MutualInformation", "Significance", "Saliency",
           "check_adapt"]


@dataclass(frozen=True)
class MutualInformation:
    """Score parameters by IEKL's eq. 12 with the whitened errors (nats, ``>= 0``).

    Parameters
    ----------
    chunk_size : int or None
        Parameters per block of the correlation product.
    """

    chunk_size: int | None = 4096

    def __post_init__(self) -> None:
        check_positive_int(self.chunk_size, "MutualInformation.chunk_size", allow_none=True)

    def __call__(self, parameters: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
        """``(N_ens, N_par)``, whitened errors ``(N_ens, N_obs)`` -> ``(N_par,)`` float64."""
        return mutual_information(parameters, errors, chunk_size=self.chunk_size)


@dataclass(frozen=True)
class Significance:
    """Score parameters by ``mean^2 / (2 var)`` over the ensemble (nats, ``>= 0``).

    ``log N(m; m, s^2) - log N(0; m, s^2)``: the evidence the ensemble holds against the
    parameter being zero. A column with no spread scores 0 if it is all zero (already
    pruned) and ``inf`` otherwise. The errors are not used.

    Parameters
    ----------
    chunk_size : int
        Parameter columns per block (bounds the float64 temporary).
    """

    chunk_size: int = 1 << 18

    def __post_init__(self) -> None:
        check_positive_int(self.chunk_size, "Significance.chunk_size")

    def __call__(self, parameters: torch.Tensor, errors: torch.Tensor | None = None
                 ) -> torch.Tensor:
        out = torch.empty(parameters.shape[1], dtype=torch.float64, device=parameters.device)
        for s in range(0, parameters.shape[1], self.chunk_size):
            x = parameters[:, s:s + self.chunk_size].to(torch.float64)
            m = x.mean(dim=0)
            v = x.var(dim=0)
            z = torch.where(v > 0, m * m / (2 * v.clamp(min=1e-300)),
                            torch.where(m == 0, torch.zeros_like(m), torch.full_like(m, math.inf)))
            out[s:s + self.chunk_size] = z
        return out


@dataclass(frozen=True)
class Saliency:
    """Score parameters by the predicted misfit increase of zeroing each one alone.

    ``1/2 m_i^2 ||G_i||^2`` with the ensemble sensitivity ``G_i`` of the whitened errors
    (:func:`enkal.information.saliency`): significance times eq. 12's squared correlations.

    Parameters
    ----------
    chunk_size : int or None
        Parameters per block.
    """

    chunk_size: int | None = 4096

    def __post_init__(self) -> None:
        check_positive_int(self.chunk_size, "Saliency.chunk_size", allow_none=True)

    def __call__(self, parameters: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
        return saliency(parameters, errors, chunk_size=self.chunk_size)


Score = MutualInformation | Significance | Saliency


@dataclass(frozen=True)
class StructureAdaptation:
    """Prune the least-informative live parameters every ``every`` updates.

    Parameters
    ----------
    every : int
        Prune at iterations ``start, start + every, start + 2 every, ...`` (the iteration
        counts updates done; the updates between prunings fine-tune the survivors).
    fraction : float in (0, 1]
        Share of the live parameters pruned each time (at least one).
    target_sparsity : float in [0, 1), optional
        Stop pruning once at most ``ceil((1 - target_sparsity) N_par)`` parameters live.
    error_budget : float, optional
        Prune only while the ensemble-mean misfit per observation
        (``StepInfo.mean_misfit``: about 1 at the noise level) is at most this; above it
        the run only fine-tunes.
    threshold : float, optional
        Prune only parameters scoring below this (then ``fraction`` caps how many go).
    min_live : int
        Never fewer live parameters than this.
    start : int, optional
        First pruning iteration (default ``every``: never the prior itself).
    score : MutualInformation, Significance, Saliency or a callable
        What ranks the parameters (lowest pruned first; see the module docstring): any
        ``score(parameters, errors) -> (N_par,)``.
    """

    every: int = 10
    fraction: float = 0.1
    target_sparsity: float | None = None
    error_budget: float | None = None
    threshold: float | None = None
    min_live: int = 1
    start: int | None = None
    score: Score = MutualInformation()

    def __post_init__(self) -> None:
        check_positive_int(self.every, "every")
        check_fraction(self.fraction, "fraction", allow_none=False)
        check_positive_float(self.target_sparsity, "target_sparsity", allow_zero=True,
                             allow_none=True)
        if self.target_sparsity is not None and self.target_sparsity >= 1.0:
            raise ValueError(f"target_sparsity: expected a value in [0, 1), got "
                             f"{self.target_sparsity!r} (1 would prune everything)")
        check_positive_float(self.error_budget, "error_budget", allow_none=True)
        if self.threshold is not None and (isinstance(self.threshold, bool) or
                                           not isinstance(self.threshold, Real)):
            raise TypeError(f"threshold: expected a number, got {self.threshold!r}")
        check_positive_int(self.min_live, "min_live", minimum=0)
        check_positive_int(self.start, "start", minimum=0, allow_none=True)
        if not callable(self.score):
            raise TypeError(f"score: expected MutualInformation(), Significance(), "
                            f"Saliency() or a callable score(parameters, errors) -> (N_par,), "
                            f"got {self.score!r}"[:200])

    def init(self) -> None:
        """The adaptation state: none (decisions derive from iteration, mask, ensemble)."""
        return None

    def due(self, iteration: int) -> bool:
        """Whether ``iteration`` (updates done) is a pruning iteration."""
        first = self.every if self.start is None else self.start
        return iteration >= first and (iteration - first) % self.every == 0

    def live_target(self, n_par: int) -> int:
        """The fewest live parameters this strategy prunes down to."""
        lo = self.min_live
        if self.target_sparsity is not None:
            lo = max(lo, math.ceil((1.0 - self.target_sparsity) * n_par - 1e-9))
        return min(lo, n_par)

    def step(
        self,
        state: None,
        *,
        iteration: int,
        mask: torch.Tensor | None,
        parameters: torch.Tensor,
        predictions: torch.Tensor,
        observations: Observations,
    ) -> tuple[torch.Tensor | None, None, dict[str, Any]]:
        """Decide a pruning from one forward evaluation (pure).

        Parameters
        ----------
        state : None
            From :meth:`init`.
        iteration : int
            Updates done so far (``SmootherState.iteration``).
        mask : bool Tensor, shape (N_par,), or None
            Live parameters now.
        parameters : Tensor, shape (N_ens, N_par)
            The members that succeeded (unconstrained space).
        predictions : Tensor, shape (N_ens, N_obs)
            Their predictions.
        observations : Observations

        Returns
        -------
        new_mask : bool Tensor (N_par,) or None
            ``None`` when nothing is pruned.
        state : None
        info : dict
            ``n_pruned`` (this step) and, when scored, ``score_min``/``score_max`` of the
            live parameters.
        """
        p = parameters.shape[1]
        info: dict[str, Any] = {"n_pruned": 0}
        if not self.due(iteration) or parameters.shape[0] < 3:
            return None, state, info   # (a correlation needs 3 successful members)
        n_live = p if mask is None else int(mask.sum())
        floor = self.live_target(p)
        if n_live <= floor:
            return None, state, info
        if self.error_budget is not None:
            mean_misfit = 2.0 * float(observations.misfit(
                predictions.mean(dim=0, keepdim=True))[0]) / observations.size
            if not mean_misfit <= self.error_budget:
                return None, state, info
        y = observations.values.to(predictions.device)
        errors = observations.whiten(predictions.to(torch.float64) - y)
        scores = self.score(parameters, errors)
        live = torch.ones(p, dtype=torch.bool, device=parameters.device) if mask is None \
            else mask.to(parameters.device)
        info["score_min"] = float(scores[live].min())
        info["score_max"] = float(scores[live].max())
        k = min(math.ceil(self.fraction * n_live - 1e-9), n_live - floor)
        if self.threshold is not None:
            k = min(k, int((scores[live] < self.threshold).sum()))
        if k <= 0:
            return None, state, info
        new = prune_mask(scores, live, n=k, min_live=floor)
        info["n_pruned"] = n_live - int(new.sum())
        return new, state, info


def check_adapt(adapt: Any) -> None:
    """``adapt=`` of the smoother: ``None`` or an :class:`~enkal._types.Adaptation`."""
    if adapt is not None:
        check_component(adapt, Adaptation, "adapt", "StructureAdaptation(...) or None")
