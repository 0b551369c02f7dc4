"""The mean's step after an analysis (:class:`~enkal.EnsembleKalmanOptimizer`): ``lr`` times
the schedule's ``step_size``, held inside its trust radius.

``m+ = m + c * (m_a - m)`` with ``m_a`` the analysis mean and ``c = lr * step_size``; with a
trust radius ``r`` (Redraw only) ``c = lr * min(step_size, r / rho)``, where

    rho = sqrt(mean_i ((m_a - m)_i / sigma_i)^2)      over the drawn parameters (sigma_i > 0)

is the analysis step measured in the redraw's own spread ``sigma``: a member sits at
``rho ~ 1`` from the mean (its ``z ~ N(0, 1)``), so ``r = 1`` keeps the mean within the
ensemble's reach, where the ensemble's linearisation was measured; ``lr`` (an LR scheduler)
scales what the trust region allows. The factor stays a tensor: no host synchronisation.
"""

from __future__ import annotations

import torch

__all__ = ["drawn_std", "scale_increment", "step_radius"]


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
                    trust: float | None = None) -> None:
    """In place: with ``redraw`` ``mean`` (holding ``m_a``) becomes ``start + c (m_a -
    start)``, ``c = lr * step_size``, or with ``trust`` (needs ``std``) ``c = lr * min(
    step_size, trust / rho)``; without ``redraw`` every member of ``x`` is shifted by
    ``(c - 1) (m_a - start)``, ``m_a`` the members' mean (anomalies kept)."""
    if not redraw:
        x += (x.mean(dim=0) - start).mul_(lr * step_size - 1)
        return
    d = mean.sub_(start)  # m_a - m, in place
    if trust is None or std is None:
        d.mul_(lr * step_size)
    else:  # rho = 0 gives inf, so step_size
        d.mul_((trust / step_radius(d, std)).clamp(max=step_size).mul(lr))
    d.add_(start)
