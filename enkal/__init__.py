"""enkal: black-box ensemble Kalman inference on PyTorch.

The public API (a contract: docs and external checks use these names):

* models: :class:`ForwardModel`, :class:`CallableModel`, :func:`evaluate`
* data: :class:`Observations`, :class:`ParameterLayout` and the constraints
  :class:`Real`, :class:`Positive`, :class:`Bounded`
* updates: :class:`SquareRoot`, :class:`PerturbedObservations`, :func:`assimilate`
* schedules: :class:`FixedAnnealing`, :class:`ESMDA`, :class:`DataMisfitController`
* guards and failures: :class:`CollapseGuard`, :class:`ResampleFailed`,
  :class:`IgnoreFailed`, :class:`Raise`
* the loop: :class:`EnsembleSmoother`
* storage: :func:`save`, :func:`open`, :func:`to_xarray`, :class:`History`
  (``docs/schema.md``)
"""

from .collapse import CollapseGuard
from .ensemble import Bounded, ParameterLayout, Positive, Real, gaussian_ensemble
from .errors import EnkalError, FailedMembersError, ScheduleExhaustedError, StorageError
from .executors import Dask, InProcess
from .failures import IgnoreFailed, Raise, ResampleFailed
from .forward import CallableModel, ForwardModel, evaluate
from .observations import Observations
from .schedule import ESMDA, DataMisfitController, FixedAnnealing
from .smoother import EnsembleSmoother, SmootherResult, SmootherState, StepInfo
from .storage import History, open_dataset, save, to_xarray
from .storage import open_dataset as open  # noqa: A001 - enkal.open(path), as documented
from .update import (
    PerturbedObservations,
    SquareRoot,
    apply_transform,
    assimilate,
    ensemble_transform,
)

__version__ = "0.1.0"

__all__ = [
    "Bounded",
    "CallableModel",
    "CollapseGuard",
    "DataMisfitController",
    "ESMDA",
    "EnkalError",
    "EnsembleSmoother",
    "FailedMembersError",
    "FixedAnnealing",
    "ForwardModel",
    "Dask",
    "IgnoreFailed",
    "InProcess",
    "Observations",
    "ParameterLayout",
    "PerturbedObservations",
    "Positive",
    "Raise",
    "Real",
    "ResampleFailed",
    "ScheduleExhaustedError",
    "SmootherResult",
    "SmootherState",
    "SquareRoot",
    "StepInfo",
    "StorageError",
    "apply_transform",
    "assimilate",
    "ensemble_transform",
    "evaluate",
    "gaussian_ensemble",
    "History",
    "open",
    "open_dataset",
    "save",
    "to_xarray",
]
