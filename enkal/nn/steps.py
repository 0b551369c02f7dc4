"""The mean's step after an analysis (:class:`~enkal.EnsembleKalmanOptimizer`): ``lr`` times
the schedule's ``step_size``, held inside its trust radius.

``m+ = m + c * (m_a - m)`` with ``m_a`` the analysis mean and ``c = lr * step_size``; with a
trust radius ``r`` (Redraw only) ``c = lr * min(step_size, r / rho)``, where

    rho = sqrt(mean_i ((m_a - m)_i / sigma_i)^2)      over the drawn parameters (sigma_i > 0)

is the analysis step measured in the redraw's own spread ``sigma``: a member sits at
``rho ~ 1`` from the mean (its ``z ~ N(0, 1)``), so ``r = 1`` keeps the mean within the
ensemble's reach, where the ensemble's linearisation was measured; ``lr`` (an LR scheduler)
scales what the trust region allows. The factor stays a tensor: no host synchronisation.

With the schedule's ``trust="damp"`` a step longer than the radius is not cut but damped
first (:func:`analyse_held`, :func:`fit_damping`): the analysis is run again with the noise
inflated (:class:`Damped`) until ``step_size * rho <= r``, each try reading ``rho`` on the
host (``docs/nn.md`` 1.7).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["Damped", "analyse_held", "drawn_std", "fit_damping", "scale_increment",
           "step_radius"]

_A = TypeVar("_A")


def drawn_std(std: torch.Tensor | None, mask: torch.Tensor | None,
              section: list[slice] | None = None) -> torch.Tensor:
    """The redraw's spread per parameter ``(N_par,)``: zero where ``mask`` is ``False`` and
    outside ``section`` (one-at-a-time sections draw only the active one)."""
    if std is None:  # pragma: no cover - only Redraw optimizers draw
        raise RuntimeError("drawn_std: members=Carry(...) has no redraw spread")
    if mask is not None:
        std = std * mask
    if section is not None:
        keep = torch.zeros_like(std)
        for s in section:
            keep[s] = 1
        std = std * keep
    return std


def step_radius(increment: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``rho`` of an increment ``(N_par,)`` in units of the per-parameter ``std``: the root
    mean square of ``increment / std`` over the entries with ``std > 0`` (a 0-d tensor).

    >>> step_radius(torch.tensor([0.2, 0.0, 3.0]), torch.tensor([0.1, 0.5, 0.0]))
    tensor(1.4142)
    """
    live = std > 0
    z = torch.where(live, increment / torch.where(live, std, 1), 0)
    return z.square().sum().div(live.sum().clamp(min=1)).sqrt()


def scale_increment(x: torch.Tensor, mean: torch.Tensor, start: torch.Tensor, lr: float, *,
                    redraw: bool, step_size: float = 1.0, std: torch.Tensor | None = None,
                    radius: float | None = None) -> None:
    """In place: with ``redraw`` ``mean`` (holding ``m_a``) becomes ``start + c (m_a -
    start)``, ``c = lr * step_size``, or with a trust ``radius`` (needs ``std``) ``c = lr *
    min(step_size, radius / rho)``; without ``redraw`` every member of ``x`` is shifted by
    ``(c - 1) (m_a - start)``, ``m_a`` the members' mean (anomalies kept)."""
    if not redraw:
        x += (x.mean(dim=0) - start).mul_(lr * step_size - 1)
        return
    d = mean.sub_(start)  # m_a - m, in place
    if radius is None or std is None:
        d.mul_(lr * step_size)
    else:  # rho = 0 gives inf, so step_size
        d.mul_((radius / step_radius(d, std)).clamp(max=step_size).mul(lr))
    d.add_(start)


@dataclass(frozen=True)
class Damped:
    """``schedule`` with its noise inflation ``alpha`` multiplied by ``factor`` (a schedule):
    the same analysis, ``factor`` times more damped. Its entries report the damped ``gamma``
    and ``rho`` (where ``schedule`` has them) and ``damping = factor``."""

    schedule: Any
    factor: float

    def init(self) -> Any:
        return self.schedule.init()

    def step(self, state: Any, **kwargs: Any) -> tuple[float, Any, dict]:
        alpha, new, info = self.schedule.step(state, **kwargs)
        info = dict(info, damping=self.factor)
        if "gamma" in info:
            info["gamma"] = info["gamma"] * self.factor
        if "rho" in info:
            info["rho"] = info["rho"] * math.sqrt(self.factor)
        return alpha * self.factor, new, info

    def done(self, state: Any) -> bool:
        return bool(self.schedule.done(state))


def fit_damping(analyse: Callable[[float], _A], radius: Callable[[], float], limit: float, *,
                span: float = 1e4, iterations: int = 12) -> _A:
    """The least damping whose analysis step fits the trust region (Levenberg-Marquardt).

    ``analyse(factor)`` runs the analysis with the noise inflated ``factor`` times (writing
    its step), ``radius()`` measures the step last written. Bisection in ``log factor`` over
    ``[1, span]`` for the smallest factor with ``radius() <= limit`` (to ``span ** (1 /
    2 ** iterations)``); the step of that factor is the one left written, and its analysis
    is returned. A step longer than ``limit`` even at ``span`` is left at ``span`` (the
    caller's cut then holds it). The step's length falls as the damping grows (a ridge
    regression's coefficients shrink), so the bisection brackets the fit.

    >>> fit_damping(lambda f: f, lambda: 0.0, 1.0)   # fits undamped: one call, factor 1
    1.0
    """
    out = analyse(1.0)
    if radius() <= limit:
        return out
    out = analyse(span)
    if radius() > limit:
        return out
    lo, hi, at_hi = 0.0, math.log(span), True
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        trial = analyse(math.exp(mid))
        if radius() > limit:
            lo, at_hi = mid, False
        else:
            hi, out, at_hi = mid, trial, True
    return out if at_hi else analyse(math.exp(hi))


def analyse_held(analyse: Callable[[Any], _A], schedule: Any, *, mean: torch.Tensor,
                 start: torch.Tensor | None, std: torch.Tensor | None,
                 generator: torch.Generator, step_size: float, radius: float | None) -> _A:
    """``analyse(schedule)``, which writes its step into ``mean``; with the schedule's
    ``trust="damp"`` and a trust ``radius`` (``start`` the mean before the step, ``std`` the
    redraw's spread), the analysis of the least damping for which ``step_size`` of the
    step fits (:func:`fit_damping`), each try from ``start`` and from ``generator``'s state
    at the call (a failure policy draws alike)."""
    if radius is None or start is None or std is None or \
            getattr(schedule, "trust", "cut") != "damp":
        return analyse(schedule)
    state = generator.get_state()

    def run(factor: float) -> _A:
        generator.set_state(state)
        mean.copy_(start)
        return analyse(Damped(schedule, factor))

    return fit_damping(run, lambda: step_size * float(step_radius(mean - start, std)), radius)
