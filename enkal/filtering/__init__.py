"""Sequential data assimilation: ensemble filters and a lag smoother over time.

See ``docs/filtering.md``. :class:`EnsembleFilter` runs the cycle forecast -> analysis at
each observation time over any model with ``propagate(states, t0, t1, *, parameters,
generator)``; the schemes :class:`EnKF`, :class:`ETKF` and :class:`LETKF` make the analysis,
and :mod:`enkal.filtering.metrics` scores it as the literature does.
"""

from .filter import CycleInfo, DynamicalModel, EnsembleFilter, FilterState
from .kernels import gaspari_cohn, perturbed_transforms, random_rotation, sqrt_transforms
from .metrics import Score, rmse, spread, time_average
from .progress import FilterProgress
from .run import FilterResult, FilterSink, FilterStart, run_filter
from .schemes import ETKF, LETKF, AdaptiveInflation, AdaptiveInflationState, EnKF, step_taper

__all__ = [
    "EnsembleFilter", "FilterState", "CycleInfo", "DynamicalModel",
    "run_filter", "FilterResult", "FilterSink", "FilterStart", "FilterProgress",
    "EnKF", "ETKF", "LETKF", "AdaptiveInflation", "AdaptiveInflationState",
    "gaspari_cohn", "step_taper", "sqrt_transforms", "perturbed_transforms",
    "random_rotation", "rmse", "spread", "time_average", "Score",
]
