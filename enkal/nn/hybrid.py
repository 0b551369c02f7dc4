"""Alternate gradient steps and ensemble Kalman updates: :class:`HybridOptimizer`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._checks import check_positive_int
from .._types import StepInfo
from .optimizer import EnsembleKalmanOptimizer

__all__ = ["HybridOptimizer"]


class HybridOptimizer:
    """Alternate gradient steps and ensemble Kalman updates (the seed paper's Fig. 2).

    Each :meth:`step` takes one step of the torch optimizer ``gradient`` on the model (which
    holds the ensemble mean), i.e. the gradient of the loss *at the mean*, and moves every
    member by the same displacement (:meth:`EnsembleKalmanOptimizer.follow_model`): the
    ensemble's mean follows the gradient optimizer while its spread (the anomalies) is
    unchanged. Every ``kalman_every`` steps a Kalman update follows on the same minibatch.

    Parameters
    ----------
    kalman : EnsembleKalmanOptimizer
    gradient : torch.optim.Optimizer
        Over ``kalman.model.parameters()`` (e.g. ``AdamW``).
    loss_fn : callable
        ``loss_fn(model(inputs), targets) -> scalar`` (e.g. ``nn.functional.cross_entropy``).
    kalman_every : int
    """

    def __init__(self, kalman: EnsembleKalmanOptimizer, gradient: torch.optim.Optimizer, *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 kalman_every: int = 1) -> None:
        if not isinstance(kalman, EnsembleKalmanOptimizer):
            raise TypeError(f"kalman: expected an EnsembleKalmanOptimizer, got "
                            f"{type(kalman).__name__}")
        if not isinstance(gradient, torch.optim.Optimizer):
            raise TypeError(f"gradient: expected a torch.optim.Optimizer, got "
                            f"{type(gradient).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        check_positive_int(kalman_every, "kalman_every")
        self.kalman = kalman
        self.gradient = gradient
        self.loss_fn = loss_fn
        self.kalman_every = kalman_every
        self._count = 0

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, StepInfo | None]:
        """One gradient step (shifting the ensemble), then a Kalman update every
        ``kalman_every`` calls. Returns ``(loss before the gradient step, StepInfo or None)``."""
        model = self.kalman.model
        self.gradient.zero_grad(set_to_none=True)
        loss = self.loss_fn(model(inputs), targets)
        loss.backward()
        self.gradient.step()
        self.kalman.follow_model()
        self._count += 1
        info = None
        if self._count % self.kalman_every == 0:
            info = self.kalman.step(inputs, targets)
        return float(loss.detach()), info

    def state_dict(self) -> dict[str, Any]:
        return {"kalman": self.kalman.state_dict(), "gradient": self.gradient.state_dict(),
                "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kalman.load_state_dict(state["kalman"])
        self.gradient.load_state_dict(state["gradient"])
        self._count = int(state["count"])
