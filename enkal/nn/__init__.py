"""Neural networks as ensembles (the code lives in :mod:`enkal.nn.optimizer` for now)."""

from .optimizer import _STATES as _STATES
from .optimizer import (
    AUTO_VMAP_MIN_MEMBERS,
    BatchForward,
    Carry,
    Classification,
    EnsembleKalmanOptimizer,
    HybridOptimizer,
    NeuralModel,
    Redraw,
    Regression,
    RelativeNoise,
    RelativeNoiseState,
    Sections,
    kaiming_std,
)
from .optimizer import BACKENDS as BACKENDS

__all__ = [
    "NeuralModel",
    "BatchForward",
    "Classification",
    "Regression",
    "Sections",
    "EnsembleKalmanOptimizer",
    "HybridOptimizer",
    "Redraw",
    "Carry",
    "RelativeNoise",
    "RelativeNoiseState",
    "kaiming_std",
    "AUTO_VMAP_MIN_MEMBERS",
]
