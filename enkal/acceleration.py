r"""Momentum for iterative ensemble updates: Nesterov acceleration of the ensemble mean.

An iterative rule (EKI-style repeated updates, :class:`~enkal.GaussNewton` with a damped
step, UKI) moves the ensemble mean along a path that momentum can shorten, as Nesterov's
method shortens gradient descent. After each update, with ``u_k`` the new (un-accelerated)
ensemble mean and ``u_(k-1)`` the previous one, every member is shifted by

    beta_k (u_k - u_(k-1))

so the ensemble the next forward sees is centred at ``u_k + beta_k (u_k - u_(k-1))``; its
spread is the update's. The momentum coefficient follows Vernon, Bach & Dunbar (2025)
[Vernon2025] as EnsembleKalmanProcesses.jl implements it:

* default: ``theta_k = (-theta_(k-1)^2 + sqrt(theta_(k-1)^4 + 4 theta_(k-1)^2)) / 2`` from
  ``theta_0 = 1`` and ``beta_k = theta_k (1 / theta_(k-1) - 1)`` (EKP's
  ``NesterovAccelerator``, its recommended variant; ``beta_1 = 0``);
* ``r=``: ``beta_k = 1 - r / (k + 2)`` (``FirstOrderNesterovAccelerator``, default ``r = 3``);
* ``momentum=``: a constant ``beta`` (``ConstantNesterovAccelerator``).

EKP shifts every member by its own momentum; enkal moves the mean only (the issue's "momentum
on the ensemble mean"), so the spread stays the one the update gave and the state is one
``N_par`` vector. Pruned parameters (``adapt=``) are not moved.

>>> import torch
>>> acc = NesterovAccelerator(momentum=0.5)
>>> x0 = torch.zeros(4, 2, dtype=torch.float64)
>>> state = acc.init(x0)
>>> x1 = x0 + torch.tensor([1.0, -2.0], dtype=torch.float64)     # the update moved the mean
>>> v, state = acc.step(state, parameters=x1)
>>> v.mean(0).tolist()                                           # u + 0.5 (u - u_prev)
[1.5, -3.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_positive_float

__all__ = ["NesterovAccelerator", "NesterovState"]


@dataclass(frozen=True)
class NesterovState:
    """The previous un-accelerated mean (float64 ``(N_par,)``), ``theta`` and the updates
    accelerated so far."""

    previous: torch.Tensor
    theta: float = 1.0
    iteration: int = 0


@dataclass(frozen=True)
class NesterovAccelerator:
    """Nesterov momentum on the ensemble mean (``EnsembleSmoother(..., accelerator=)``).

    Parameters
    ----------
    momentum : float in [0, 1), optional
        A constant momentum coefficient.
    r : float > 0, optional
        The first-order schedule ``beta_k = 1 - r / (k + 2)`` (EKP's default ``r = 3``).

    Neither: the ``theta`` recurrence (EKP's ``NesterovAccelerator``). Not both.
    """

    momentum: float | None = None
    r: float | None = None

    def __post_init__(self) -> None:
        if self.momentum is not None and self.r is not None:
            raise ValueError("NesterovAccelerator: give momentum= or r=, not both")
        if self.momentum is not None:
            m = self.momentum
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
                raise ValueError(f"NesterovAccelerator.momentum: expected a number in [0, 1), "
                                 f"got {m!r}")
        if self.r is not None:
            check_positive_float(self.r, "NesterovAccelerator.r")

    def init(self, parameters: torch.Tensor) -> NesterovState:
        """The state before the first update: the first ensemble's mean."""
        return NesterovState(previous=parameters.detach().to(torch.float64).mean(dim=0))

    def coefficient(self, state: NesterovState) -> tuple[float, float]:
        """``(beta, theta)`` of the next update from ``state``."""
        k = state.iteration + 1
        if self.momentum is not None:
            return float(self.momentum), state.theta
        if self.r is not None:
            return 1.0 - float(self.r) / (k + 2), state.theta
        b = state.theta ** 2
        theta = (-b + math.sqrt(b * b + 4.0 * b)) / 2.0
        return theta * (1.0 / state.theta - 1.0), theta

    def step(self, state: NesterovState, *, parameters: torch.Tensor
             ) -> tuple[torch.Tensor, NesterovState]:
        """The accelerated ensemble (a new tensor) and the next state, from the ensemble
        ``parameters`` ``(N_ens, N_par)`` an update just produced."""
        mean = parameters.detach().to(torch.float64).mean(dim=0)
        previous = state.previous.to(mean.device)
        if previous.shape != mean.shape:
            raise ValueError(f"NesterovAccelerator: the state holds {previous.numel()} "
                             f"parameters, the ensemble {mean.numel()}")
        beta, theta = self.coefficient(state)
        shift = (beta * (mean - previous)).to(parameters.dtype)
        new = NesterovState(previous=mean, theta=theta, iteration=state.iteration + 1)
        return parameters + shift, new
