"""Failure policies: what to do with members whose forward failed.

A member is *failed* when its forward raised, its prediction has NaN/inf, (with ``max_abs``)
an entry larger in magnitude than ``max_abs``, its noise-whitened misfit overflows float64, or
(with ``max_sigma``, default ``1e12``) its root-mean-square whitened residual
``sqrt(||L^-1 (Yh_j - y)||^2 / N_obs)`` exceeds ``max_sigma`` noise standard deviations: a
unit-free bound that catches exploded simulations (``1e30`` outputs) without knowing the
outputs' units. The policies:

* :class:`ResampleFailed` (default): failed members are left out of the update's statistics
  and redrawn from the Gaussian of the updated successful members;
* :class:`IgnoreFailed`: failed members are left out of the statistics and keep their
  parameters;
* :class:`Raise`: any failure stops the run with :class:`~enkal.errors.FailedMembersError`.

Whatever the policy, fewer than ``max(2, ceil(min_success * N_ens))`` successful members stops
the run with :class:`~enkal.errors.FailedMembersError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._checks import check_fraction, check_positive_float
from ._types import FailurePolicy, check_component
from .errors import FailedMembersError
from .observations import Observations
from .update import embed_transform

__all__ = ["ResampleFailed", "IgnoreFailed", "Raise", "FailurePolicy", "check_policy"]


@dataclass(frozen=True)
class _Policy:
    """Fields and member screening shared by the built-in failure policies.

    Parameters
    ----------
    max_abs : float, optional
        Predictions with an entry larger in magnitude fail (units of the outputs).
    min_success : float in (0, 1], optional
        Fewer successful members than this fraction of ``N_ens`` (and never fewer than 2)
        stops the run with :class:`~enkal.errors.FailedMembersError`.
    max_sigma : float, optional
        Members whose RMS whitened residual exceeds this many noise standard deviations
        fail (default ``1e12``; ``None`` turns the check off).
    """

    max_abs: float | None = None
    min_success: float | None = None
    max_sigma: float | None = 1e12

    #: stop at the first failed member (:class:`Raise`)
    _stop_on_failure: ClassVar[bool] = False
    #: redraw failed members from the successful members' Gaussian (else they keep theirs)
    _redraw: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive_float(self.max_abs, f"{name}.max_abs", allow_none=True)
        check_positive_float(self.max_sigma, f"{name}.max_sigma", allow_none=True)
        check_fraction(self.min_success, f"{name}.min_success")

    def classify(self, predictions: torch.Tensor, ok: torch.Tensor | None = None,
                 observations: Observations | None = None) -> torch.Tensor:
        """The ``(N_ens,)`` bool mask of successful members.

        ``ok`` is what the evaluation already knows (forwards that raised); rows with
        NaN/inf, (with ``max_abs``) too-large entries, or (given ``observations``) a whitened
        misfit that overflows float64 or a residual beyond ``max_sigma`` noise std's are
        failed too. Raises :class:`~enkal.errors.FailedMembersError` when too few succeed,
        or on any failure under :class:`Raise`.
        """
        n = predictions.shape[0]
        good = torch.isfinite(predictions).all(dim=1)
        if observations is not None:
            # unit-free garbage detection: a whitened misfit that overflows float64, or (with
            # max_sigma) a root-mean-square residual of more than max_sigma noise std's
            with torch.no_grad():
                phi = observations.misfit(torch.where(good.unsqueeze(1), predictions,
                                                      torch.zeros_like(predictions)))
                good &= torch.isfinite(phi)
                if self.max_sigma is not None:
                    good &= (2 * phi / observations.size).sqrt() <= self.max_sigma
        if self.max_abs is not None:
            good &= ~(predictions.abs() > self.max_abs).any(dim=1)
        if ok is not None:
            good &= ok.to(good.device)
        self._check_count(int(good.sum()), n)
        return good

    def _check_count(self, n_ok: int, n: int) -> None:
        """Stop on any failure under :class:`Raise`, or when too few members succeed."""
        if self._stop_on_failure and n_ok < n:
            raise FailedMembersError(
                f"{n - n_ok} of {n} members failed (NaN/inf, raised, or beyond max_abs) and "
                f"the failure policy is {type(self).__name__}(); use ResampleFailed() to "
                "redraw them"
            )
        need = max(2, math.ceil((self.min_success or 0.0) * n))
        if n_ok < need:
            raise FailedMembersError(
                f"only {n_ok} of {n} members succeeded; at least {need} are needed to update "
                "the ensemble. Check the model on the prior's range of parameters (evaluate() "
                "reports the errors per member)"
            )

    def classify_batch(self, predictions: torch.Tensor, ok: torch.Tensor,
                       values: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
        """:meth:`classify` for ``B`` independent ensembles at once (the filters' batch):
        ``predictions`` ``(B, E, N_obs)``, ``ok`` ``(B, E)``, ``values`` ``(B, N_obs)`` and a
        diagonal noise ``noise_std`` ``(N_obs,)``; the same screening, one sync per call."""
        n = predictions.shape[1]
        good = torch.isfinite(predictions).all(dim=-1) & ok.to(predictions.device)
        with torch.no_grad():
            z = torch.where(good.unsqueeze(-1), predictions - values.unsqueeze(1),
                            torch.zeros_like(predictions)) / noise_std.to(predictions)
            phi = 0.5 * z.square().sum(dim=-1)  # the misfit of classify, per member
            good &= torch.isfinite(phi)
            if self.max_sigma is not None:
                good &= (2 * phi / predictions.shape[-1]).sqrt() <= self.max_sigma
        if self.max_abs is not None:
            good &= ~(predictions.abs() > self.max_abs).any(dim=-1)
        self._check_count(int(good.sum(dim=1).min()), n)  # the worst filter decides
        return good

    def embed(self, transform: torch.Tensor, ok: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor:
        """The successful members' ``(E_ok, E_ok)`` transform embedded in ``(E, E)``
        (:func:`~enkal.update.embed_transform`): failed rows redrawn, or kept."""
        return embed_transform(transform, ok.to(transform.device), generator,
                               redraw=self._redraw)


@dataclass(frozen=True)
class ResampleFailed(_Policy):
    """Leave failed members out and redraw them from the successful members' Gaussian
    (fields: see ``_Policy``: ``max_abs``, ``min_success``, ``max_sigma``)."""


@dataclass(frozen=True)
class IgnoreFailed(_Policy):
    """Leave failed members out of the update; they keep their parameters."""

    _redraw: ClassVar[bool] = False


@dataclass(frozen=True)
class Raise(_Policy):
    """Stop at the first failed member."""

    _stop_on_failure: ClassVar[bool] = True


def check_policy(policy: object) -> None:
    check_component(policy, FailurePolicy, "failure",
                    "ResampleFailed(), IgnoreFailed() or Raise()")
