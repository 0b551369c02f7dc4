"""Failure policies: what to do with members whose forward failed.

A member is *failed* when its forward raised, its prediction has NaN/inf, (with ``max_abs``)
an entry larger in magnitude than ``max_abs``, or its noise-whitened misfit overflows float64.
The policies:

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

import torch

from ._checks import check_fraction, check_positive_float
from .errors import FailedMembersError

__all__ = ["ResampleFailed", "IgnoreFailed", "Raise", "FailurePolicy", "classify_members"]


@dataclass(frozen=True)
class ResampleFailed:
    """Leave failed members out and redraw them from the successful members' Gaussian."""

    max_abs: float | None = None
    min_success: float | None = None

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass(frozen=True)
class IgnoreFailed:
    """Leave failed members out of the update; they keep their parameters."""

    max_abs: float | None = None
    min_success: float | None = None

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass(frozen=True)
class Raise:
    """Stop at the first failed member."""

    max_abs: float | None = None
    min_success: float | None = None

    def __post_init__(self) -> None:
        _check_common(self)


FailurePolicy = ResampleFailed | IgnoreFailed | Raise


def _check_common(policy) -> None:
    name = type(policy).__name__
    check_positive_float(policy.max_abs, f"{name}.max_abs", allow_none=True)
    check_fraction(policy.min_success, f"{name}.min_success")


def check_policy(policy: object) -> None:
    if not isinstance(policy, (ResampleFailed, IgnoreFailed, Raise)):
        raise TypeError(
            "failure: expected ResampleFailed(), IgnoreFailed() or Raise(), got "
            f"{type(policy).__name__}"
        )


def classify_members(policy: FailurePolicy, predictions: torch.Tensor,
                     ok: torch.Tensor | None = None, observations=None) -> torch.Tensor:
    """The ``(N_ens,)`` bool mask of successful members under ``policy``.

    ``ok`` is what the evaluation already knows (forwards that raised); rows with NaN/inf,
    (with ``max_abs``) too-large entries, or (given ``observations``) a whitened misfit that
    overflows float64 are failed too. Raises
    :class:`~enkal.errors.FailedMembersError` when too few succeed, or on any failure under
    :class:`Raise`.
    """
    n = predictions.shape[0]
    good = torch.isfinite(predictions).all(dim=1)
    if observations is not None:
        # a finite prediction whose whitened misfit overflows float64 is garbage too
        with torch.no_grad():
            good &= torch.isfinite(observations.misfit(torch.where(
                good.unsqueeze(1), predictions, torch.zeros_like(predictions))))
    if policy.max_abs is not None:
        good &= ~(predictions.abs() > policy.max_abs).any(dim=1)
    if ok is not None:
        good &= ok.to(good.device)
    n_ok = int(good.sum())
    if isinstance(policy, Raise) and n_ok < n:
        raise FailedMembersError(
            f"{n - n_ok} of {n} members failed (NaN/inf, raised, or beyond max_abs) and the "
            "failure policy is Raise(); use ResampleFailed() to redraw them"
        )
    need = max(2, math.ceil((policy.min_success or 0.0) * n))
    if n_ok < need:
        raise FailedMembersError(
            f"only {n_ok} of {n} members succeeded; at least {need} are needed to update "
            "the ensemble. Check the model on the prior's range of parameters (evaluate() "
            "reports the errors per member)"
        )
    return good
