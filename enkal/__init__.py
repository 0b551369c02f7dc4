"""enkal: black-box ensemble Kalman inference on PyTorch.

The public API (a contract: docs and external checks use these names):

* models: :class:`ForwardModel`, :class:`CallableModel`, :func:`evaluate`
* data: :class:`Observations` (:class:`ObservationSeries`: minibatches of samples), :class:`ParameterLayout` and the constraints
  :class:`Real`, :class:`Positive`, :class:`Bounded`
* updates: :class:`SquareRoot`, :class:`PerturbedObservations`, :func:`assimilate`;
  :class:`LocalSquareRoot` localizes the square-root update by distance (gridded parameters),
  :class:`CorrelationLocalSquareRoot` by the ensemble's own correlations,
  :class:`SECLocalSquareRoot` by sampling-error correction of them (tuning-free)
* schedules: :class:`FixedAnnealing`, :class:`ESMDA`, :class:`DataMisfitController`
* sampling the posterior: :class:`EnsembleKalmanSampler` with :class:`EKSStable`
* few-forward inversion: :class:`GaussNewton` and :class:`UnscentedKalmanInversion` with
  :class:`Iterations`; momentum: :class:`NesterovAccelerator` (``accelerator=``)
* guards and failures: :class:`CollapseGuard`, :class:`ResampleFailed`,
  :class:`IgnoreFailed`, :class:`Raise`
* the loop: :class:`EnsembleSmoother`; :func:`run`, the one call that records a run to HDF5
  and resumes one; :func:`run_filter`, the same for an ensemble filter over a time series
  (:mod:`enkal.filtering`)
* structure adaptation: :class:`StructureAdaptation` with :class:`MutualInformation` or
  :class:`Significance` or :class:`Saliency`; :func:`mutual_information`, :func:`prune_mask`,
  :func:`remove_dead_units`
* priors in physical units: :func:`constrained_gaussian`, :func:`prior_ensemble`
* storage: :func:`save`, :func:`open`, :func:`to_xarray`, :class:`History`
  (``docs/schema.md``); :func:`to_inference_data` (ArviZ)
"""

import logging as _logging

from ._version import __version__  # noqa: F401 - enkal.__version__
from .acceleration import NesterovAccelerator
from .adapt import MutualInformation, Saliency, Significance, StructureAdaptation
from .collapse import CollapseGuard
from .ensemble import Bounded, ParameterLayout, Positive, Real, gaussian_ensemble
from .errors import (
    DiskFullError,
    EnkalError,
    FailedMembersError,
    FileInUseError,
    ScheduleExhaustedError,
    StorageError,
)
from .executors import Dask, InProcess, MultiDevice
from .failures import IgnoreFailed, Raise, ResampleFailed
from .filter_runner import run_filter
from .forward import CallableModel, ForwardModel, evaluate
from .inference import to_inference_data
from .information import mutual_information, prune_mask, remove_dead_units
from .inversion import GaussNewton, UnscentedKalmanInversion
from .localization import CorrelationLocalSquareRoot, LocalSquareRoot, SECLocalSquareRoot
from .nn import (
    Carry,
    Classification,
    EnsembleKalmanOptimizer,
    HybridOptimizer,
    NeuralModel,
    Redraw,
    Regression,
    RelativeNoise,
    Sections,
)
from .observations import Observations
from .priors import PriorBlock, constrained_gaussian, prior_ensemble
from .runner import run
from .sampler import EKSStable, EnsembleKalmanSampler
from .schedule import ESMDA, DataMisfitController, FixedAnnealing, Iterations
from .series import ObservationSeries
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

# the library's loggers (enkal.cli, enkal.executors, ...) only get a NullHandler: where their
# lines go is the application's choice (``enkal run`` prints them on stderr)
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "Bounded",
    "CallableModel",
    "CollapseGuard",
    "DataMisfitController",
    "ESMDA",
    "DiskFullError",
    "EnkalError",
    "FileInUseError",
    "EnsembleSmoother",
    "FailedMembersError",
    "FixedAnnealing",
    "ForwardModel",
    "Dask",
    "IgnoreFailed",
    "InProcess",
    "Observations",
    "ObservationSeries",
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
    "run",
    "run_filter",
    "save",
    "to_xarray",
    "to_inference_data",
    "EnsembleKalmanSampler",
    "EKSStable",
    "GaussNewton",
    "UnscentedKalmanInversion",
    "Iterations",
    "NesterovAccelerator",
    "LocalSquareRoot",
    "CorrelationLocalSquareRoot",
    "SECLocalSquareRoot",
    "constrained_gaussian",
    "prior_ensemble",
    "PriorBlock",
    # neural networks (docs/nn.md)
    "Classification",
    "EnsembleKalmanOptimizer",
    "HybridOptimizer",
    "MultiDevice",
    "NeuralModel",
    "Regression",
    "Sections",
    "Redraw",
    "Carry",
    "RelativeNoise",
    # structure adaptation (docs/adaptation.md)
    "MutualInformation",
    "Saliency",
    "Significance",
    "StructureAdaptation",
    "mutual_information",
    "prune_mask",
    "remove_dead_units",
]
