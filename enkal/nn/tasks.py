"""What a member's prediction is: the output and target maps of a network
(:class:`Regression`, :class:`Classification`; see :mod:`enkal.nn`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_positive_float

__all__ = ["Regression", "Classification"]


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return f"{type(x).__name__}"


# -- output and target mappings ----------------------------------------------------------------
@dataclass(frozen=True)
class Regression:
    """Predictions are the raw outputs; targets are floats of shape ``(B, n_out)`` (or
    ``(B,)`` when ``n_out = 1``)."""

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(N_ens, B, n_out) -> (N_ens, B * n_out)``."""
        return outputs.reshape(outputs.shape[0], -1)

    def targets(self, targets: Any, batch: int, n_out: int) -> torch.Tensor:
        """Targets ``(B, n_out)`` -> observations ``(B * n_out,)`` (float64)."""
        if not isinstance(targets, torch.Tensor) or not targets.is_floating_point():
            raise TypeError(
                f"targets: expected a floating tensor of shape ({batch}, {n_out}) for "
                f"Regression, got {_describe(targets)}; class labels need Classification()"
            )
        if targets.shape not in ((batch, n_out),) and not (n_out == 1 and
                                                           targets.shape == (batch,)):
            raise ValueError(
                f"targets: expected shape ({batch}, {n_out}) = (B, n_out) to match the inputs "
                f"and the network's output, got {tuple(targets.shape)}"
            )
        return targets.detach().reshape(-1).to(torch.float64)

    def noise_std(self, predictions: torch.Tensor, noise: float) -> float:
        """The observations' noise standard deviation: ``noise`` for every output."""
        return noise


@dataclass(frozen=True)
class Classification:
    r"""Class probabilities against one-hot labels.

    With ``weighting="multinomial"`` (the default) the observation noise of class ``k`` of a
    sample is ``noise * sqrt(pbar_k + floor)``, ``pbar`` the members' mean probabilities:
    the variance of a one-hot draw from ``pbar`` (``diag(pbar) - pbar pbar^T``, whose
    pseudo-inverse acts as ``diag(1 / pbar)`` on the zero-sum anomalies and innovations of
    probabilities). The update is then a Gauss-Newton step on the cross-entropy in the
    ensemble's subspace (see ``docs/nn.md``): a confidently wrong class (small ``pbar``, label
    1) weighs much more than with ``weighting="uniform"`` (every output the same noise: least
    squares on probabilities, whose pull vanishes where the softmax saturates).

    Parameters
    ----------
    probabilities : bool
        Predictions are ``softmax(outputs)`` (default; measured better than logits), else
        the raw outputs (``weighting`` must then be ``"uniform"``).
    weighting : {"multinomial", "uniform"}
        Per-output noise from the mean probabilities (default) or one noise level.
    floor : float
        Added to ``pbar`` in the multinomial noise (default ``1e-3``): bounds the weight of
        a class the ensemble gives no probability.
    """

    probabilities: bool = True
    weighting: str = "multinomial"
    floor: float = 1e-3

    def __post_init__(self) -> None:
        if self.weighting not in ("multinomial", "uniform"):
            raise ValueError(f"Classification.weighting: expected 'multinomial' or "
                             f"'uniform', got {self.weighting!r}")
        if self.weighting == "multinomial" and not self.probabilities:
            raise ValueError("Classification.weighting: 'multinomial' needs probabilities="
                             "True (the noise is that of class probabilities); use "
                             "weighting='uniform' with raw outputs")
        check_positive_float(self.floor, "Classification.floor")

    def noise_std(self, predictions: torch.Tensor, noise: float) -> torch.Tensor | float:
        """The observations' noise standard deviation for predictions ``(N_ens, N_obs)``:
        ``noise * sqrt(pbar + floor)`` per output (``(N_obs,)``, float64) with the
        multinomial weighting, else ``noise``."""
        if self.weighting == "uniform":
            return noise
        p = predictions.detach().to(torch.float64)
        ok = torch.isfinite(p).all(dim=1)  # failed members are the failure policy's business
        if not bool(ok.any()):
            return noise
        pbar = p[ok].mean(dim=0)
        return noise * torch.sqrt(pbar.clamp_min(0) + self.floor)

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(N_ens, B, C) -> (N_ens, B * C)``: softmax over classes, flattened by sample."""
        if self.probabilities:
            outputs = torch.softmax(outputs, dim=-1)
        return outputs.reshape(outputs.shape[0], -1)

    def targets(self, targets: Any, batch: int, n_out: int) -> torch.Tensor:
        """Labels ``(B,)`` (int) or class probabilities ``(B, C)`` -> ``(B * C,)`` float64."""
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
        if targets.is_floating_point():
            if targets.shape != (batch, n_out):
                raise ValueError(
                    f"targets: expected class probabilities of shape ({batch}, {n_out}) = "
                    f"(B, C) or integer labels ({batch},), got {tuple(targets.shape)}"
                )
            return targets.detach().reshape(-1).to(torch.float64)
        if targets.dtype == torch.bool or targets.is_complex():
            raise TypeError(f"targets: expected integer class labels, got {targets.dtype}")
        if targets.shape != (batch,):
            raise ValueError(
                f"targets: expected integer class labels of shape ({batch},) = (B,) to match "
                f"the inputs, got {tuple(targets.shape)}"
            )
        lo, hi = torch.stack(torch.aminmax(targets)).tolist()  # one host read, not two
        if lo < 0 or hi >= n_out:
            raise ValueError(
                f"targets: expected labels in [0, {n_out - 1}] (the network has {n_out} "
                f"outputs), got labels from {lo} to {hi}"
            )
        onehot = torch.zeros(batch, n_out, dtype=torch.float64, device=targets.device)
        onehot[torch.arange(batch, device=targets.device), targets.long()] = 1.0
        return onehot.reshape(-1)


def _check_output_map(output: Any, name: str = "output") -> None:
    if not isinstance(output, (Regression, Classification)):
        raise TypeError(
            f"{name}: expected Regression() or Classification(), got {type(output).__name__}"
        )
