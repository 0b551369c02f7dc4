r"""Ensembles as xarray in HDF5: the schema, full history, checkpoints and exact resume.

This package is the only place where tensors become xarray. The file layout is written down in
``docs/schema.md``; in short, a history file is netCDF-4 flavoured HDF5 (written through
h5netcdf, readable by ``xarray.open_dataset(path, engine="h5netcdf")`` and by plain h5py) with
the dimensions ``iteration``, ``member``, ``parameter`` and ``output``:

* ``parameters(iteration, member, parameter)``: the ensemble ``X`` (``N_ens x N_par``) in the
  **unconstrained** space (what the smoother updates); map a row to physical units with
  ``ParameterLayout.to_physical`` (:func:`physical` does it for a Dataset).
* ``iteration = 0`` is the prior, ``k`` the ensemble after ``k`` updates. The diagnostics of
  update ``k`` (one variable per :class:`~enkal.smoother.StepInfo` field) live at ``k``;
  ``predictions(iteration=k)`` are ``G(parameters(iteration=k))``, i.e. the predictions that
  update ``k + 1`` assimilated.
* every iteration has a row (the diagnostics are small); the :class:`History` policy decides
  which rows also hold the ensemble. Rows without it read as NaN and take no disk space
  (HDF5 never allocates their chunks); ``stored`` (bit 1: parameters, bit 2: predictions)
  says which rows hold what.

Three levels, one implementation (the streaming writer):

* :func:`to_xarray`, :func:`save`, :func:`open_dataset` (exported as ``open``) for a finished
  :class:`~enkal.smoother.SmootherResult`;
* :class:`HistoryWriter` appends one iteration at a time during a run, and
  :class:`Recorder` drives it (and the checkpoint file) as a run's sink;
* :func:`write_checkpoint` / :func:`read_checkpoint` store a
  :meth:`~enkal.EnsembleSmoother.state_dict` (parameters, generator state, schedule state)
  so that a killed run resumes bit for bit;
* a history row that keeps the ensemble also holds the rest of that state (``rng_state``,
  ``schedule_state``, ``state_mask``, ``adapt_state``, ``state_checksum``):
  :func:`read_history_state` reads the last complete one, so a history is its own
  checkpoint; :func:`read_state` reads either kind of file (what ``enkal.run(..., resume=path)`` does).

Modules, lowest first: ``schema`` (format names, reserved names, the ``stored`` bits, the
JSON codec of attributes, small validators), ``h5`` (atomic writes, one-row appends,
declared-size checks, :func:`repair`), ``history`` (:class:`History`,
:class:`HistoryWriter`), ``views`` (:func:`save`, :func:`to_xarray`, :func:`open_dataset`,
:func:`physical`), ``checkpoint`` (:func:`write_checkpoint`, :func:`read_checkpoint`),
``resume`` (:func:`read_history_state`, :func:`read_state`, :func:`read_policy`,
:func:`format_of`), ``compare`` (what a resume compares: :func:`run_differences`,
:func:`check_resume`, :func:`check_dropped_rows`), ``recorder`` (:class:`Recorder`), and
``filter_h5`` / ``filtering``: an ensemble filter's history (:class:`FilterRecorder`,
:func:`read_filter_state`, :func:`open_filter_history`; ``docs/schema.md``).
None of them imports the smoother: a smoother is duck-typed (``config()``,
``observations``, ``seed``, ``state_dict``, ``load_state_dict``).

Crash safety
------------
A whole file (a checkpoint, a :func:`save`, the first row of a history) is written to a
temporary file in the same directory, flushed, ``fsync``-ed and moved over the target with
``os.replace``: readers see the old file or the new one, never half of one.

Appends cannot be atomic that way (copying the history every iteration costs ``O(k)``), so
the writer opens the file, appends one row and closes it (open-append-close), and keeps it
closed between iterations. Each such change goes through :mod:`~enkal.storage.journal`: the
bytes a write overwrites are kept (in memory and, first, in an undo log beside the file), so
a change that fails -- a full disk, a file-size limit, an interrupt -- is undone byte for
byte, and one a killed process left half done is undone by the next opener. A failure costs
at most the row being written (:class:`~enkal.errors.DiskFullError`). Ctrl-C waits for the
row; a second writer of the same file is refused (:class:`~enkal.errors.FileInUseError`).
:func:`repair` (run by a resuming writer) also mends files of earlier versions, whose kill
inside HDF5's final metadata flush could leave a stale end-of-file address. HDF5's
single-writer/multiple-reader (SWMR) mode orders that flush, but it needs the version-3
superblock, whose "open for writing" flag survives a crash: plain h5py and xarray then
refuse the file until ``h5clear -s`` is run, whichever moment the kill hit. So enkal writes
version-0 superblocks (no such flag), no SWMR, and writes through its journal (no HDF5
file lock) so that a reader holding the file open (a notebook watching a run) never blocks
the run. A
checkpoint is written after the history row, so the history always reaches at least the
checkpoint's iteration; a resumed writer (``resume_from=``) cuts the rows beyond it. A
state row is only trusted when its checksum matches (the ensemble's 64-bit words summed,
plus a CRC-32 of the small items), so a torn or rotten last row falls back to the previous
state row, never to a wrong state.

>>> import tempfile, os, torch
>>> from enkal import CallableModel, EnsembleSmoother, ESMDA, Observations
>>> model = CallableModel(lambda x: x[:, :1] + x[:, 1:], parameters=["a", "b"], output_size=1)
>>> smoother = EnsembleSmoother(Observations([1.0], noise_std=0.1), schedule=ESMDA.constant(2))
>>> prior = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> result = smoother.run(model, prior)
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = save(result, os.path.join(tmp, "run.h5"))
...     with open_dataset(path) as ds:
...         print(dict(ds.sizes), ds.parameter.values.tolist(), ds.iteration.values.tolist())
...         print(torch.equal(torch.from_numpy(ds.parameters.sel(iteration=2).values),
...                           result.parameters))
{'iteration': 2, 'member': 8, 'parameter': 2, 'output': 1, 'rng_byte': 5056} ['a', 'b'] [1, 2]
True
"""

from .checkpoint import read_checkpoint, read_state_dict, write_checkpoint
from .compare import Difference, check_dropped_rows, check_resume, run_differences
from .filtering import (
    FILTER_FORMAT,
    FILTER_FORMAT_VERSION,
    FilterRecorder,
    open_filter_history,
    read_filter_state,
)
from .h5 import _unlimited as _unlimited  # noqa: F401 - used by tests
from .h5 import repair
from .history import History, HistoryWriter
from .recorder import RESERVED_ATTRS, Recorder, check_attributes, default_checkpoint_path
from .resume import format_of, read_history_state, read_policy, read_state
from .schema import CHECKPOINT_FORMAT, FORMAT_VERSION, HISTORY_FORMAT
from .schema import _state_checksum as _state_checksum  # noqa: F401 - used by tests
from .views import open_dataset, physical, read_layout, save, to_xarray

open = open_dataset  # noqa: A001 - the public name is enkal.storage.open / enkal.open

__all__ = [
    "History",
    "HistoryWriter",
    "Recorder",
    "to_xarray",
    "save",
    "open",
    "open_dataset",
    "read_layout",
    "physical",
    "repair",
    "write_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "read_history_state",
    "read_state",
    "read_policy",
    "format_of",
    "run_differences",
    "check_resume",
    "check_dropped_rows",
    "Difference",
    "default_checkpoint_path",
    "check_attributes",
    "RESERVED_ATTRS",
    "HISTORY_FORMAT",
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "FilterRecorder",
    "read_filter_state",
    "open_filter_history",
    "FILTER_FORMAT",
    "FILTER_FORMAT_VERSION",
]
