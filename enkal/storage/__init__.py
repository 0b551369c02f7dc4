r"""Ensembles as xarray in HDF5: the schema, full history, checkpoints and exact resume.

This is the only module where tensors become xarray. The file layout is written down in
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
* :class:`HistoryWriter` appends one iteration at a time during a run;
* :func:`write_checkpoint` / :func:`read_checkpoint` store a
  :meth:`~enkal.EnsembleSmoother.state_dict` (parameters, generator state, schedule state)
  so that a killed run resumes bit for bit;
* a history row that keeps the ensemble also holds the rest of that state (``rng_state``,
  ``schedule_state``, ``state_mask``, ``state_checksum``): :func:`read_history_state` reads
  the last complete one, so a history is its own checkpoint; :func:`read_state` reads
  either kind of file (what ``run(resume=path)`` does).

Crash safety
------------
A whole file (a checkpoint, a :func:`save`, the first row of a history) is written to a
temporary file in the same directory, flushed, ``fsync``-ed and moved over the target with
``os.replace``: readers see the old file or the new one, never half of one.

Appends cannot be atomic that way (copying the history every iteration costs ``O(k)``), so
the writer opens the file, appends one row and closes it (open-append-close), and keeps it
closed between iterations. HDF5 keeps the changed metadata in memory until the file is
closed and writes the new chunks to fresh space at the end of the file first, so a SIGKILL
while the big arrays are written leaves the previous, consistent file; only a kill inside
the final metadata flush (a few dozen small writes, tens of microseconds) can leave the last
row torn. Then :func:`repair` (run by a resuming writer) restores it or drops it: the usual
tear is a superblock whose end-of-file address was not yet raised. HDF5's
single-writer/multiple-reader (SWMR) mode orders that flush, but it needs the version-3
superblock, whose "open for writing" flag survives a crash: plain h5py and xarray then
refuse the file until ``h5clear -s`` is run, whichever moment the kill hit. So enkal writes
version-0 superblocks (no such flag), no SWMR, and appends with HDF5 file locking off so
that a reader holding the file open (a notebook watching a run) never blocks the run. A
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

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime
import io
import json
import os
import secrets
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5netcdf
import h5py
import numpy as np
import torch

from .._checks import cpu_numpy
from ..ensemble import ParameterLayout
from ..errors import StorageError
from ..observations import Observations
from ..schedule import schedule_state_dict

__all__ = [
    "History",
    "HistoryWriter",
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
    "HISTORY_FORMAT",
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
]

HISTORY_FORMAT = "enkal-history"
CHECKPOINT_FORMAT = "enkal-checkpoint"
FORMAT_VERSION = 1

#: variables of the schema; diagnostics may not take these names
_RESERVED = frozenset({
    "iteration", "member", "parameter", "output", "output2", "parameters", "predictions",
    "stored", "observations", "noise_std", "noise_chol", "mask",
    "rng_byte", "rng_state", "schedule_state", "state_mask", "state_checksum",
})
_ROW_CHUNK = 1024  # rows per chunk of the small per-iteration variables
_INT_MISSING = -1  # integer/flag diagnostics at rows without an update
_STORED_PARAMETERS = 1
_STORED_PREDICTIONS = 2
_STORED_STATE = 4  # the row is a whole smoother state: parameters, rng_state, schedule_state
_STORED_MASK = 8  # ... whose mask is state_mask (else the state has no mask)
_STATE_VARIABLES = ("rng_state", "schedule_state", "state_checksum")
_FLOAT_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


# -- small helpers -----------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from .. import __version__

    return {"enkal_version": __version__, "torch_version": torch.__version__,
            "h5py_version": h5py.version.version, "hdf5_version": h5py.version.hdf5_version}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, **dataclasses.asdict(obj)}
    return repr(obj)


def _to_json(obj: Any) -> str:
    return json.dumps(obj, default=_json_default)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open directories; nothing more to do there
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _atomic_replace(tmp: Path, path: Path, *, fsync: bool) -> None:
    """``fsync`` ``tmp``, move it over ``path`` and ``fsync`` the directory."""
    if fsync:
        _fsync_path(tmp)
    os.replace(tmp, path)
    if fsync:
        _fsync_path(path.parent, directory=True)


def _as_path(path: Any, name: str = "path") -> Path:
    if isinstance(path, (str, os.PathLike)):
        return Path(path)
    raise TypeError(f"{name}: expected a str or os.PathLike file path, got {type(path).__name__}")


def _storage_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(_FLOAT_DTYPES.get(dtype, np.float32))


def _check_ensemble(x: Any, name: str, *, columns: int | None = None,
                    rows: int | None = None, label: str = "N_par") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (N_ens, {label}), got "
                        f"{type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if x.ndim != 2 or (columns is not None and x.shape[1] != columns) or \
            (rows is not None and x.shape[0] != rows):
        want = f"({rows if rows is not None else 'N_ens'}, {columns if columns is not None else label})"
        hint = ""
        if x.ndim == 2 and columns is not None and x.shape[0] == columns:
            hint = f"; enkal expects members first: did you pass ({label}, N_ens)?"
        raise ValueError(f"{name}: expected shape {want} = (N_ens, {label}), got "
                         f"{tuple(x.shape)}{hint}")


@contextlib.contextmanager
def _read_errors(path: Any, what: str) -> Iterator[None]:
    """Turn what h5py/h5netcdf/xarray raise on a damaged file into a :class:`StorageError`
    naming ``path`` (a ``StorageError`` raised inside passes unchanged)."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        raise StorageError(f"{path}: cannot be read as {what} (truncated or corrupt?): "
                           f"{type(err).__name__}: {err}") from err


def _schedule_problem(schedule: Any) -> str | None:
    """Why ``schedule`` is not a schedule state dict (``None`` when it is one)."""
    if not isinstance(schedule, dict) or not isinstance(schedule.get("type"), str):
        return "is not a schedule state (a JSON object with a string 'type')"
    for k, v in schedule.items():
        if k != "type" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"field {k!r} is not a number ({type(v).__name__})"
    return None


def _check_rng_state(rng: Any, name: str = "rng_state") -> np.ndarray:
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.ndim != 1 or \
            rng.numel() == 0:
        raise ValueError(f"{name}: expected a 1-D uint8 tensor (Generator.get_state()), got "
                         f"{getattr(rng, 'dtype', type(rng).__name__)} "
                         f"{tuple(getattr(rng, 'shape', ()))}")
    return rng.detach().cpu().numpy()


def _state_checksum(params: np.ndarray, rng: np.ndarray, schedule: str,
                    mask: np.ndarray | None, iteration: int) -> int:
    """64-bit checksum of one state row: the sum of the ensemble's bytes read as 64-bit
    words (mod 2^64; any changed word changes it) plus CRC-32 of the small items shifted
    into the high half. A CRC of the whole ensemble would cost ~4 ms per 15 MB, a tenth of
    an update; the word sum costs ~0.5 ms."""
    raw = np.ascontiguousarray(params).reshape(-1).view(np.uint8)
    n8 = raw.size // 8 * 8
    total = int(raw[:n8].view("<u8").sum(dtype=np.uint64)) if n8 else 0
    small = b"".join([raw[n8:].tobytes(), np.ascontiguousarray(rng).tobytes(),
                      schedule.encode("utf-8"),
                      b"" if mask is None else np.ascontiguousarray(mask).tobytes(),
                      int(iteration).to_bytes(8, "little", signed=True)])
    return (total + (zlib.crc32(small) << 32)) & 0xFFFF_FFFF_FFFF_FFFF


# -- the history policy --------------------------------------------------------------------
@dataclass(frozen=True)
class History:
    """Which iterations keep the whole ensemble (the diagnostics are always kept).

    Parameters
    ----------
    every : int or None
        Keep the parameters of iterations ``0, every, 2 every, ...``; ``None`` keeps only the
        final ensemble (with ``final=True``).
    final : bool
        Always keep the final ensemble (the ``append`` marked ``final=True``).
    predictions : bool
        Also keep the predictions ``(N_ens, N_obs)`` of each kept ensemble; with ``final``,
        the last forward evaluation (of the ensemble before the final update) is kept too.
    compression : None, "gzip" or "lzf"
        HDF5 filter for the ensemble arrays (with byte shuffling). Off by default: ensembles
        are noise-like floats that compress poorly (see ``bench/storage.py``).
    compression_level : int
        gzip level 1-9.
    chunk_bytes : int
        Target size of one chunk of ``parameters``: a chunk is ``(1, n, N_par)``, a block of
        ``n`` whole members, which is contiguous in the members-first tensor, so an
        uncompressed iteration goes to disk as a few direct chunk writes, without copies.

    >>> History(every=10).keeps(20), History(every=10).keeps(25), History(every=None).keeps(5)
    (True, False, False)
    >>> History(every=None).keeps(5, final=True)
    True
    """

    every: int | None = 1
    final: bool = True
    predictions: bool = False
    compression: str | None = None
    compression_level: int = 1
    chunk_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if self.every is not None and (isinstance(self.every, bool) or
                                       not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"History.every: expected an int >= 1 or None, got {self.every!r}")
        for name in ("final", "predictions"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"History.{name}: expected a bool, got {getattr(self, name)!r}")
        if self.compression not in (None, "gzip", "lzf"):
            raise ValueError(
                f"History.compression: expected None, 'gzip' or 'lzf', got {self.compression!r}"
            )
        if not isinstance(self.compression_level, int) or not 1 <= self.compression_level <= 9:
            raise ValueError(f"History.compression_level: expected an int in 1..9, got "
                             f"{self.compression_level!r}")
        if not isinstance(self.chunk_bytes, int) or self.chunk_bytes < 1024:
            raise ValueError(f"History.chunk_bytes: expected an int >= 1024, got "
                             f"{self.chunk_bytes!r}")

    def keeps(self, iteration: int, *, final: bool = False) -> bool:
        """Whether the ensemble of ``iteration`` is stored."""
        return (self.every is not None and iteration % self.every == 0) or \
            (final and self.final)

    def _filters(self) -> dict[str, Any]:
        if self.compression is None:
            return {}
        kw: dict[str, Any] = {"compression": self.compression, "shuffle": True}
        if self.compression == "gzip":
            kw["compression_opts"] = self.compression_level
        return kw


# -- the streaming writer ------------------------------------------------------------------
def _diagnostic_kind(name: str, value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "i1"
    if isinstance(value, (int, np.integer)):
        return "i8"
    if isinstance(value, (float, np.floating)):
        return "f8"
    raise TypeError(f"info[{name!r}]: expected a bool, int or float diagnostic, got "
                    f"{type(value).__name__}")


def _info_dict(info: Any, iteration: int) -> dict[str, Any]:
    if info is None:
        return {}
    if hasattr(info, "as_dict"):
        info = info.as_dict()
    if not isinstance(info, Mapping):
        raise TypeError(f"info: expected a StepInfo, a mapping or None, got {type(info).__name__}")
    out = dict(info)
    it = out.pop("iteration", iteration)
    if int(it) != iteration:
        raise ValueError(f"info: its iteration {it} does not match iteration={iteration}")
    for name in out:
        if name in _RESERVED:
            raise ValueError(f"info: diagnostic name {name!r} is reserved by the schema")
    return out


class HistoryWriter:
    """Append a run to an HDF5 history file, one iteration at a time.

    The file is created (atomically) at the first :meth:`append` and opened, extended and
    closed again at each later one, so a killed run leaves a file that ``xarray`` opens with
    every completed iteration (see the module docstring). One writer per file.

    A row that keeps the ensemble and is given the generator and schedule state
    (:meth:`record` and :meth:`start` take them from a
    :class:`~enkal.smoother.SmootherState`) holds the whole smoother state, with a
    checksum: :func:`read_history_state` reads it back and ``run(resume=path)`` continues
    from it, so a history that keeps the latest ensemble is its own checkpoint (a few kB a
    row on top of the ensemble, instead of a second copy of it in a checkpoint file).

    Parameters
    ----------
    path : str or os.PathLike (or a binary file-like object, for in-memory files)
    layout : ParameterLayout
        Names, shapes and constraints of the ``N_par`` columns.
    observations : Observations
        ``y`` (``N_obs``) and its noise, stored for reference.
    config : dict, optional
        ``EnsembleSmoother.config()``, stored as JSON.
    history : History
        Which iterations keep the ensemble (and predictions).
    output_names : sequence of str, optional
        ``N_obs`` readable names for the ``output`` coordinate (default ``y[0]``, ...).
    seed : int, optional
        Stored as an attribute (default: ``config["seed"]``).
    resume_from : int, optional
        Continue an existing file at this iteration: rows after it are removed (they belong
        to the interrupted run and will be recomputed), later appends continue the file.
        Without it, the first append replaces any existing file.
    fsync : bool
        ``fsync`` after every append (survives power loss, not only a killed process; costs
        a disk flush per iteration).
    attrs : dict, optional
        Extra global attributes (JSON-able values).

    Examples
    --------
    >>> import io, torch
    >>> from enkal import Observations, ParameterLayout
    >>> w = HistoryWriter(io.BytesIO(), layout=ParameterLayout(["a", "b"]),
    ...                   observations=Observations([0.0], noise_std=1.0))
    >>> w.append(0, torch.zeros(4, 2))
    >>> w.append(1, torch.ones(4, 2), {"alpha": 2.0, "n_failed": 0}, final=True)
    >>> w.last_iteration, w.n_rows
    (1, 2)
    """

    def __init__(
        self,
        path: Any,
        *,
        layout: ParameterLayout,
        observations: Observations,
        config: Mapping[str, Any] | None = None,
        history: History = History(),
        output_names: Sequence[str] | None = None,
        seed: int | None = None,
        resume_from: int | None = None,
        fsync: bool = False,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(path, io.IOBase):
            self._target: Any = path
            self.path: Path | None = None
        else:
            self.path = _as_path(path)
            self._target = self.path
        if not isinstance(layout, ParameterLayout):
            raise TypeError(f"layout: expected a ParameterLayout, got {type(layout).__name__}")
        if not isinstance(observations, Observations):
            raise TypeError(
                f"observations: expected enkal.Observations, got {type(observations).__name__}"
            )
        if not isinstance(history, History):
            raise TypeError(f"history: expected enkal.storage.History, got "
                            f"{type(history).__name__}")
        m = observations.size
        if output_names is None:
            output_names = [f"y[{i}]" for i in range(m)]
        output_names = [str(n) for n in output_names]
        if len(output_names) != m:
            raise ValueError(f"output_names: expected {m} names (N_obs), got {len(output_names)}")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict, got {type(config).__name__}")
        if seed is None and config is not None and isinstance(config.get("seed"), int):
            seed = config["seed"]
        if resume_from is not None and (isinstance(resume_from, bool) or
                                        not isinstance(resume_from, int) or resume_from < 0):
            raise ValueError(f"resume_from: expected an int >= 0 or None, got {resume_from!r}")
        self.layout = layout
        self.observations = observations
        self.history = history
        self.output_names = output_names
        self.config = dict(config) if config is not None else None
        self.seed = seed
        self.fsync = bool(fsync)
        self.attrs = dict(attrs or {})
        self._created = False
        self._rows = 0
        self._last: int | None = None
        self._last_flags = 0
        self._n_members: int | None = None
        self._dtype: np.dtype | None = None
        self._diagnostics: dict[str, str] = {}
        self._mask: np.ndarray | None = None
        self._unlimited: list[str] = []
        self._predictions = history.predictions  # the file keeps predictions
        self._rng_size: int | None = None  # bytes of rng_state; None: no state variables yet
        self._state_mask = False  # the file has a state_mask variable
        self._closed = False
        if resume_from is not None:
            self._resume(resume_from)

    # -- public API ----------------------------------------------------------------------
    @property
    def last_iteration(self) -> int | None:
        """The iteration of the last row in the file (``None`` before the first)."""
        return self._last

    @property
    def n_rows(self) -> int:
        return self._rows

    @property
    def holds_state(self) -> bool:
        """Whether the last row holds the whole smoother state (so it can be resumed from
        without a checkpoint file)."""
        return bool(self._last_flags & _STORED_STATE)

    def start(self, iteration: Any, parameters: torch.Tensor | None = None, *,
              mask: torch.Tensor | None = None) -> None:
        """Record the starting ensemble (the prior, or a resumed state) unless the file
        already ends at its iteration (a resumed history).

        ``start(state)`` with a :class:`~enkal.smoother.SmootherState` also records the
        generator and schedule state (the row is then a resumable state);
        ``start(iteration, parameters, mask=...)`` records the ensemble only.
        """
        if parameters is None and hasattr(iteration, "rng_state"):
            state = iteration
            if self._last is not None and self._last == state.iteration:
                return
            self.record(state)
            return
        if self._last is not None and self._last == iteration:
            return
        self.append(iteration, parameters, mask=mask)

    def record(self, state: Any, info: Any = None, *, predictions: torch.Tensor | None = None,
               final: bool = False) -> None:
        """:meth:`append` for a :class:`~enkal.smoother.SmootherState` after ``step``: the
        row also holds the generator and schedule state when it keeps the ensemble."""
        self.append(state.iteration, state.parameters, info, predictions=predictions,
                    mask=state.mask, final=final, rng_state=state.rng_state,
                    schedule=state.schedule)

    def append(
        self,
        iteration: int,
        parameters: torch.Tensor | None,
        info: Any = None,
        *,
        predictions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        final: bool = False,
        rng_state: torch.Tensor | None = None,
        schedule: Any = None,
    ) -> None:
        """Add the row of ``iteration`` (the ensemble after ``iteration`` updates).

        Parameters
        ----------
        iteration : int
            Larger than the last row's (usually by one).
        parameters : Tensor, shape (N_ens, N_par), or None
            The ensemble (unconstrained space); stored if the :class:`History` keeps this
            iteration.
        info : StepInfo or dict, optional
            The diagnostics of the update that produced this ensemble (None for the prior).
        predictions : Tensor, shape (N_ens, N_obs), optional
            The predictions this update assimilated, i.e. those of the *previous* ensemble
            (what was passed to ``step``); stored at the previous row when the policy keeps
            predictions of that row.
        mask : bool Tensor, shape (N_par,), optional
            Live (unpruned) parameters; ``mask(parameter)`` holds the latest one.
        final : bool
            This is the last ensemble of the run (kept when ``History.final``).
        rng_state : uint8 Tensor, optional
            ``torch.Generator.get_state()`` of the smoother after this update; with
            ``schedule``, a row that keeps the ensemble holds the whole smoother state
            (``rng_state``, ``schedule_state``, ``state_mask``, ``state_checksum``).
        schedule : schedule state or its dict, optional
            The schedule's state after this update (``{"type": ..., field: number}``).
        """
        if self._closed:
            raise ValueError("HistoryWriter: append after close()")
        if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)) or \
                iteration < 0:
            raise ValueError(f"iteration: expected an int >= 0, got {iteration!r}")
        iteration = int(iteration)
        if self._last is not None and iteration <= self._last:
            raise ValueError(
                f"iteration: expected an iteration after the last row ({self._last}), got "
                f"{iteration}; to rewrite a run from an earlier point open the writer with "
                f"resume_from={iteration - 1}"
            )
        p = self.layout.size
        if parameters is not None:
            _check_ensemble(parameters, "parameters", columns=p, rows=self._n_members)
        elif not self._created:
            raise ValueError("parameters: the first row of a history must carry the ensemble")
        values = _info_dict(info, iteration)
        kinds = {k: _diagnostic_kind(k, v) for k, v in values.items()}
        keeps_parameters, keeps_predictions = self._keeps(iteration, final=final)
        keep = parameters is not None and keeps_parameters
        pred_np = None
        if predictions is not None:
            n_ens = self._n_members if parameters is None else parameters.shape[0]
            _check_ensemble(predictions, "predictions", columns=self.observations.size,
                            rows=n_ens, label="N_obs")
            if keeps_predictions:
                pred_np = cpu_numpy(predictions)
        mask_np = full_mask = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
                    tuple(mask.shape) != (p,):
                raise ValueError(f"mask: expected a bool tensor of shape ({p},), got "
                                 f"{getattr(mask, 'dtype', type(mask).__name__)} "
                                 f"{tuple(getattr(mask, 'shape', ()))}")
            mask_np = full_mask = mask.detach().cpu().numpy().astype(np.int8)
            if self._mask is not None and np.array_equal(mask_np, self._mask):
                mask_np = None
        if (rng_state is None) != (schedule is None):
            raise ValueError("rng_state, schedule: give both (a resumable state row) or neither")
        state = None
        if rng_state is not None:
            rng_np = _check_rng_state(rng_state)
            sched = schedule_state_dict(schedule)
            problem = _schedule_problem(sched)
            if problem is not None:
                raise ValueError(f"schedule: {problem}")
            try:
                sched_json = json.dumps(sched, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"schedule: expected finite JSON numbers ({err})") from None
            if self._rng_size is not None and rng_np.size != self._rng_size:
                raise ValueError(f"rng_state: expected {self._rng_size} bytes (the file's "
                                 f"generator states), got {rng_np.size}; a generator of "
                                 "another device type?")
            if keep:
                state = (rng_np, sched_json, parameters.device.type, full_mask)
        params_np = cpu_numpy(parameters) if keep else None
        flags = _STORED_PARAMETERS if keep else 0
        if state is not None:
            flags |= _STORED_STATE | (_STORED_MASK if state[3] is not None else 0)
            state = (*state, _state_checksum(params_np, state[0], state[1], state[3],
                                             iteration))

        if not self._created:
            self._create(parameters.shape[0], parameters.dtype, kinds, first=(
                iteration, flags, params_np, values, mask_np, state))
        else:
            new = {k: v for k, v in kinds.items() if k not in self._diagnostics}
            if new:
                self._add_diagnostics(new)
            with self._h5("r+") as f:
                if state is not None:
                    self._ensure_state_variables(f, state)
                _write_row(f, self._rows, iteration, flags, params_np, values,
                           self._diagnostics, pred_np, self._last_flags, mask_np,
                           self._unlimited, state)
            if self.fsync and self.path is not None:
                _fsync_path(self.path)
        if mask_np is not None:
            self._mask = mask_np
        self._rows += 1
        self._last = iteration
        self._last_flags = flags

    def close(self, attrs: Mapping[str, Any] | None = None) -> None:
        """Mark the file complete (attribute ``complete = 1``) and add final attributes."""
        if self._closed:
            return
        self._closed = True
        if not self._created:
            return
        with self._h5("r+") as f:
            for k, v in (attrs or {}).items():
                f.attrs[k] = _attr_value(v)
            f.attrs["complete"] = np.int8(1)
        if self.fsync and self.path is not None:
            _fsync_path(self.path)

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "<memory>"
        return f"HistoryWriter({where}, rows={self._rows}, last_iteration={self._last})"

    # -- internals -----------------------------------------------------------------------
    def _keeps(self, iteration: int, *, final: bool = False) -> tuple[bool, bool]:
        """What the next :meth:`append`, of ``iteration``, writes of the tensors it is
        given: ``(parameters, predictions)``, i.e. whether it keeps the ensemble (when one
        is given) and whether it stores the predictions (at the previous row)."""
        keeps_predictions = self._predictions and self._rows > 0 and \
            self._last == iteration - 1 and \
            bool(self._last_flags & _STORED_PARAMETERS or (final and self.history.final))
        return self.history.keeps(iteration, final=final), keeps_predictions

    def _h5(self, mode: str) -> h5py.File:
        if self.path is None:
            self._target.seek(0)
            return h5py.File(self._target, mode)
        return h5py.File(self.path, mode, locking=False)

    def _global_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "enkal_format": HISTORY_FORMAT,
            "enkal_format_version": FORMAT_VERSION,
            **_versions(),
            "created": _now(),
            "parameter_space": "unconstrained",
            "layout": _to_json(self.layout.to_dict()),
            "history_policy": _to_json(dataclasses.asdict(self.history)),
            "noise": "diagonal" if self.observations.is_diagonal else "full",
            "complete": 0,
            "parameters_dtype": self._torch_dtype,
        }
        if self.seed is not None:
            attrs["seed"] = int(self.seed)
        if self.config is not None:
            attrs["config"] = _to_json(self.config)
        for k, v in self.attrs.items():
            attrs[k] = v
        return {k: _attr_value(v) for k, v in attrs.items()}

    def _create(self, n_members: int, dtype: torch.dtype, kinds: dict[str, str],
                first: tuple | None = None) -> None:
        """Write the structure (and the first row) to a temporary file, then move it in."""
        self._n_members = int(n_members)
        self._dtype = _storage_dtype(dtype)
        self._torch_dtype = str(dtype).removeprefix("torch.")
        tmp = None if self.path is None else _temp_path(self.path)
        target = self._target if tmp is None else tmp
        try:
            if tmp is None:
                self._target.seek(0)
                self._target.truncate()
            with h5netcdf.File(target, "w") as nc:
                self._write_structure(nc, kinds)
            self._diagnostics = dict(kinds)
            self._unlimited = ["iteration", "parameters", "stored", *kinds]
            if self.history.predictions:
                self._unlimited.append("predictions")
            if first is not None:
                iteration, flags, params_np, values, mask_np, state = first
                with (h5py.File(tmp, "r+", locking=False) if tmp is not None
                      else self._h5("r+")) as f:
                    if state is not None:
                        self._ensure_state_variables(f, state)
                    _write_row(f, 0, iteration, flags, params_np, values, self._diagnostics,
                               None, 0, mask_np, self._unlimited, state)
            if tmp is not None:
                _atomic_replace(tmp, self.path, fsync=True)
        except BaseException:
            if tmp is not None and tmp.exists():
                tmp.unlink()
            raise
        self._created = True

    def _write_structure(self, nc: h5netcdf.File, kinds: dict[str, str]) -> None:
        e, p, m = self._n_members, self.layout.size, self.observations.size
        dims: dict[str, int | None] = {"iteration": None, "member": e, "parameter": p,
                                       "output": m}
        full = not self.observations.is_diagonal
        if full:
            dims["output2"] = m
        nc.dimensions = dims
        it = nc.create_variable("iteration", ("iteration",), "i8", chunks=(_ROW_CHUNK,))
        it.attrs["long_name"] = "updates done: 0 is the prior, k the ensemble after k updates"
        nc.create_variable("member", ("member",), "i8", data=np.arange(e, dtype=np.int64))
        nc.create_variable("parameter", ("parameter",), h5py.string_dtype(),
                           data=np.array(self.layout.names, dtype=object))
        nc.create_variable("output", ("output",), h5py.string_dtype(),
                           data=np.array(self.output_names, dtype=object))
        filters = self.history._filters()
        itemsize = self._dtype.itemsize
        v = nc.create_variable("parameters", ("iteration", "member", "parameter"), self._dtype,
                               chunks=(1, _member_block(e, p * itemsize,
                                                        self.history.chunk_bytes), p),
                               fillvalue=np.nan, **filters)
        v.attrs["long_name"] = "ensemble X in the unconstrained space"
        v.attrs["space"] = "unconstrained"
        v.attrs["comment"] = ("physical values: ParameterLayout.from_dict(json.loads("
                              "attrs['layout'])).to_physical(X); NaN where stored bit 1 is 0")
        if self.history.predictions:
            v = nc.create_variable("predictions", ("iteration", "member", "output"),
                                   self._dtype, chunks=(1, _member_block(
                                       e, m * itemsize, self.history.chunk_bytes), m),
                                   fillvalue=np.nan, **filters)
            v.attrs["long_name"] = "predictions G(phi) of the ensemble of the same iteration"
            v.attrs["comment"] = "NaN where stored bit 2 is 0"
        v = nc.create_variable("stored", ("iteration",), "i1", chunks=(_ROW_CHUNK,))
        v.attrs["long_name"] = "what the row holds"
        v.attrs["flag_masks"] = np.array([_STORED_PARAMETERS, _STORED_PREDICTIONS], np.int8)
        v.attrs["flag_meanings"] = "parameters predictions"
        for name, kind in kinds.items():
            _create_diagnostic(nc, name, kind, 0)
        nc.create_variable("observations", ("output",), "f8",
                           data=self.observations.values.detach().cpu().numpy())
        nc.create_variable("noise_std", ("output",), "f8",
                           data=self.observations.noise_std.detach().cpu().numpy())
        if full:
            v = nc.create_variable("noise_chol", ("output", "output2"), "f8",
                                   data=self.observations.noise_chol.detach().cpu().numpy())
            v.attrs["long_name"] = "lower Cholesky factor L of the noise covariance R = L L^T"
        v = nc.create_variable("mask", ("parameter",), "i1", data=np.ones(p, dtype=np.int8))
        v.attrs["long_name"] = "live parameters (0: pruned, held at zero)"
        for k, val in self._global_attrs().items():
            nc.attrs[k] = val

    def _ensure_state_variables(self, f: h5py.File, state: tuple) -> None:
        """Create the per-row state variables at the first state row (and ``state_mask``
        at the first state with a mask); earlier rows read as no state."""
        rng_np, _, device_type, mask_np, _ = state
        need_state = self._rng_size is None
        need_mask = mask_np is not None and not self._state_mask
        if not (need_state or need_mask):
            return
        p, rows = self.layout.size, self._rows
        with h5netcdf.File(f, "a") as nc:
            if need_state:
                nc.dimensions["rng_byte"] = rng_np.size
                v = nc.create_variable("rng_state", ("iteration", "rng_byte"), "u1",
                                       chunks=(1, rng_np.size))
                v.attrs["long_name"] = ("torch.Generator.get_state() of the smoother after "
                                        "this row's update")
                v.attrs["device_type"] = device_type
                v.attrs["comment"] = "meaningful where stored bit 4 is set"
                v = nc.create_variable("schedule_state", ("iteration",), h5py.string_dtype(),
                                       chunks=(_ROW_CHUNK,))
                v.attrs["long_name"] = "JSON of the schedule state after this row's update"
                v.attrs["comment"] = "empty where stored bit 4 is 0"
                v = nc.create_variable("state_checksum", ("iteration",), "u8",
                                       chunks=(_ROW_CHUNK,))
                v.attrs["long_name"] = ("checksum of the state row: sum of the parameters' "
                                        "64-bit words + CRC-32 of the rest << 32, mod 2^64")
            if need_mask:
                v = nc.create_variable("state_mask", ("iteration", "parameter"), "i1",
                                       chunks=(1, p), fillvalue=np.int8(1))
                v.attrs["long_name"] = ("live parameters of the state of this row (0: "
                                        "pruned); where stored bit 8 is set")
        for name in ([*_STATE_VARIABLES] if need_state else []) + \
                (["state_mask"] if need_mask else []):
            if f[name].shape[0] != rows:
                f[name].resize(rows, axis=0)
            self._unlimited.append(name)
        if need_mask:  # a plain int8 variable: no _FillValue, so xarray keeps int8 0/1
            del f["state_mask"].attrs["_FillValue"]
            self._state_mask = True
        if need_state:
            self._rng_size = int(rng_np.size)

    def _add_diagnostics(self, new: dict[str, str]) -> None:
        with self._h5("r+") as f, h5netcdf.File(f, "a") as nc:
            for name, kind in new.items():
                _create_diagnostic(nc, name, kind, self._rows)
        self._diagnostics.update(new)
        self._unlimited.extend(new)

    def _resume(self, resume_from: int) -> None:
        if self.path is None or not self.path.exists():
            return
        repair(self.path)
        try:
            with self._h5("r+") as f:
                _check_format(f.attrs, self.path, HISTORY_FORMAT)
                try:
                    rows = json.loads(_attr_str(f.attrs["layout"]))
                except (KeyError, ValueError) as err:
                    raise StorageError(f"{self.path}: unreadable layout attribute ({err})") \
                        from None
                if rows != json.loads(_to_json(self.layout.to_dict())):
                    raise ValueError(
                        f"{self.path}: the history's parameter layout does not match this "
                        "run's; resume the run that wrote it or start a new file"
                    )
                if f["output"].shape != (self.observations.size,):
                    raise ValueError(
                        f"{self.path}: the history has {f['output'].shape[0]} outputs, this "
                        f"run {self.observations.size}"
                    )
                its = f["iteration"][:]
                if its.size and np.any(np.diff(its) <= 0):
                    raise StorageError(f"{self.path}: iteration coordinate is not increasing")
                keep = int(np.searchsorted(its, resume_from, side="right"))
                self._unlimited = _unlimited(f)
                if keep < its.size:
                    for name in self._unlimited:
                        f[name].resize(keep, axis=0)
                par = f["parameters"]
                self._n_members = int(par.shape[1])
                self._dtype = np.dtype(par.dtype)
                self._diagnostics = {
                    name: ds.dtype.str[1:] for name, ds in f.items()
                    if isinstance(ds, h5py.Dataset) and ds.ndim == 1 and
                    ds.maxshape == (None,) and name not in _RESERVED
                }
                self._rows = keep
                self._last = int(its[keep - 1]) if keep else None
                self._last_flags = int(f["stored"][keep - 1]) if keep else 0
                self._mask = f["mask"][:].astype(np.int8)
                self._predictions = "predictions" in f  # the file's choice stands
                self._rng_size = int(f["rng_state"].shape[1]) if "rng_state" in f else None
                self._state_mask = "state_mask" in f
                f.attrs["complete"] = np.int8(0)
                if self.config is not None and "config" in f.attrs and \
                        _attr_str(f.attrs["config"]) != _to_json(self.config):
                    # the rows from here on come from this configuration: a later resume
                    # must not take them for the continuation of the original one
                    f.attrs["config"] = _to_json(self.config)
        except StorageError:
            raise
        except (OSError, KeyError, RuntimeError) as err:
            raise StorageError(
                f"{self.path}: cannot resume this history file ({type(err).__name__}: {err}); "
                "move it aside to start a new history"
            ) from err
        self._created = True


def _attr_value(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return np.int8(v)
    if isinstance(v, str):
        return str(v)  # plain str: h5py refuses str subclasses such as torch's version
    if isinstance(v, (int, float, np.integer, np.floating)):
        return v
    if isinstance(v, np.ndarray) and v.dtype.kind in "iuf":
        return v
    return _to_json(v)


def _attr_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.size == 1:
        return _attr_str(v.item())
    return str(v)


_MAX_JSON_DEPTH = 32
_CPU_RNG_STATE_SIZE = int(torch.Generator().get_state().numel())


def _json_depth_ok(text: str, limit: int = _MAX_JSON_DEPTH) -> bool:
    """Whether the brackets of the JSON ``text`` nest at most ``limit`` deep (a quick scan
    before ``json.loads``, which recurses per level)."""
    depth = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _loads(text: str, what: str, path: Any) -> Any:
    """``json.loads`` of an attribute, refusing deeply nested or malformed JSON with a
    :class:`StorageError` naming ``path``."""
    if not _json_depth_ok(text):
        raise StorageError(f"{path}: {what} attribute nests deeper than {_MAX_JSON_DEPTH} "
                           "levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise StorageError(f"{path}: {what} attribute is not valid JSON ({err})") from None


def _int_attr(attrs: Any, name: str, path: Any) -> int:
    """An integer header attribute (a scalar of an integer dtype; no float, bool, string)."""
    a = np.asarray(attrs[name])
    if a.size != 1 or a.dtype.kind not in "iu":
        raise StorageError(f"{path}: attribute {name!r} is not an integer ({attrs[name]!r})")
    return int(a.item())


def _check_declared_size(ds: h5py.Dataset, name: str, path: Any, *, slack: int = 0,
                         cap: int | None = None) -> None:
    """Refuse a dataset whose declared size (shape x itemsize) exceeds what the file
    allocated for it (plus ``slack`` bytes) or ``cap``, before anything reads it."""
    declared = int(np.prod([int(n) for n in ds.shape], dtype=object)) * int(ds.dtype.itemsize)
    if cap is not None and declared > cap:
        raise StorageError(f"{path}: dataset {name!r} declares {declared} bytes (shape "
                           f"{ds.shape}), more than the {cap} allowed")
    if ds.compression is None and declared > int(ds.id.get_storage_size()) + slack:
        raise StorageError(f"{path}: dataset {name!r} declares {declared} bytes (shape "
                           f"{ds.shape}) but the file holds {ds.id.get_storage_size()} for it")


def _create_diagnostic(nc: h5netcdf.File, name: str, kind: str, n_rows: int) -> None:
    if kind == "f8":
        data = np.full(n_rows, np.nan)
        v = nc.create_variable(name, ("iteration",), "f8", data=data, chunks=(_ROW_CHUNK,),
                               fillvalue=np.nan)
        v.attrs["comment"] = "NaN at rows without an update (the starting ensemble)"
    else:
        data = np.full(n_rows, _INT_MISSING, dtype=kind)
        v = nc.create_variable(name, ("iteration",), kind, data=data, chunks=(_ROW_CHUNK,))
        v.attrs["comment"] = f"{_INT_MISSING} at rows without an update (the starting ensemble)"
        if kind == "i1":
            v.attrs["flag_values"] = np.array([0, 1], np.int8)
            v.attrs["flag_meanings"] = "false true"
    v.attrs["long_name"] = f"diagnostic {name} of the update that produced this ensemble"


def _unlimited(f: h5py.File) -> list[str]:
    """Names of the variables along the unlimited ``iteration`` dimension."""
    return [name for name, ds in f.items() if isinstance(ds, h5py.Dataset) and ds.maxshape
            and ds.maxshape[0] is None]


def _put(did: Any, row: int, value: Any) -> None:
    """``ds[row] = value`` through the low-level API (the high-level one costs ~10x more
    Python time, which adds up over a dozen small variables per append)."""
    fspace = did.get_space()
    shape = fspace.shape
    a = np.ascontiguousarray(value, dtype=did.dtype).reshape((1,) + shape[1:])
    fspace.select_hyperslab((row,) + (0,) * (len(shape) - 1), (1,) + shape[1:])
    did.write(h5py.h5s.create_simple(a.shape), fspace, a)


def _member_block(n_members: int, member_bytes: int, target: int) -> int:
    """Members per chunk: at most ``target`` bytes (at least one member), spread evenly."""
    most = max(1, min(n_members, target // max(1, member_bytes)))
    n_chunks = -(-n_members // most)
    return -(-n_members // n_chunks)


def _put_ensemble(did: Any, row: int, a: np.ndarray) -> None:
    """Write one ``(N_ens, n)`` row of a ``(iteration, member, n)`` variable.

    Without filters every full chunk (a block of whole members, contiguous in ``a``) goes
    to disk with ``H5Dwrite_chunk``: no selection, no conversion, no copy. That is about 3x
    faster than the ordinary write path for a large ensemble.
    """
    dcpl = did.get_create_plist()
    if dcpl.get_nfilters() or a.dtype != did.dtype:
        _put(did, row, a)
        return
    block = dcpl.get_chunk()[1]
    a = np.ascontiguousarray(a)
    for start in range(0, a.shape[0], block):
        part = a[start:start + block]
        if part.shape[0] == block:
            did.write_direct_chunk((row, start, 0), part)
        else:  # the short last block of members: through the normal path
            fspace = did.get_space()
            fspace.select_hyperslab((row, start, 0), (1,) + part.shape)
            did.write(h5py.h5s.create_simple((1,) + part.shape), fspace,
                      part.reshape((1,) + part.shape))


def _write_row(f: h5py.File, row: int, iteration: int, flags: int, params: np.ndarray | None,
               values: Mapping[str, Any], kinds: Mapping[str, str],
               prev_predictions: np.ndarray | None, prev_flags: int,
               mask: np.ndarray | None, unlimited: Sequence[str],
               state: tuple | None = None) -> None:
    """Extend every ``iteration`` variable by one row and fill it (one open file).

    ``state`` is ``(rng_state, schedule JSON, device type, mask or None, checksum)`` for a
    row that holds the whole smoother state."""
    ds = {name: h5py.h5d.open(f.id, name.encode()) for name in unlimited}
    for did in ds.values():
        did.set_extent((row + 1,) + did.shape[1:])
    # the big arrays first: they go to fresh space; metadata is written when f closes
    if params is not None:
        _put_ensemble(ds["parameters"], row, params)
    if prev_predictions is not None and row > 0:
        _put_ensemble(ds["predictions"], row - 1, prev_predictions)
        _put(ds["stored"], row - 1, prev_flags | _STORED_PREDICTIONS)
    if state is not None:
        rng, schedule, _, state_mask, checksum = state
        _put(ds["rng_state"], row, rng)
        _put(ds["schedule_state"], row, schedule)
        if state_mask is not None:
            _put(ds["state_mask"], row, state_mask)
        _put(ds["state_checksum"], row, np.uint64(checksum))
    _put(ds["iteration"], row, iteration)
    _put(ds["stored"], row, flags)
    for name, kind in kinds.items():
        v = values.get(name)
        if v is None:
            v = np.nan if kind == "f8" else _INT_MISSING
        _put(ds[name], row, v)
    if mask is not None:
        f["mask"][...] = mask


# -- repair after a killed append ----------------------------------------------------------
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _repair_end_of_address(path: Path) -> bool:
    """Raise the superblock's end-of-allocation address to the file size when a killed
    append left it short.

    HDF5 writes the superblock last when it closes a file; a writer killed inside that final
    flush can leave object headers that point at chunks written past the old end address
    ("addr overflow" on read). The bytes are there; only the address is stale. Version-0
    superblocks (what enkal writes) keep it, without a checksum, at bytes 40-47.
    """
    with builtins.open(path, "r+b") as fh:
        head = fh.read(48)
        if len(head) < 48 or head[:8] != _HDF5_SIGNATURE or head[8] != 0 or head[13] != 8:
            return False
        base = int.from_bytes(head[24:32], "little")
        eoa = int.from_bytes(head[40:48], "little")
        size = os.fstat(fh.fileno()).st_size
        if base != 0 or eoa >= size:
            return False
        fh.seek(40)
        fh.write(size.to_bytes(8, "little"))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _row_complete(f: h5py.File, r: int, names: Sequence[str], its: np.ndarray) -> bool:
    if r > 0 and its[r] <= its[r - 1]:
        return False
    try:
        flags = int(f["stored"][r])
        for name in names:
            row = f[name][r]
            if name == "parameters" and flags & _STORED_PARAMETERS and np.isnan(row).all():
                return False
            # (the predictions of row r come with the append of row r + 1: if that append
            # was torn, row r is complete without them; repair clears their bit)
            if name == "schedule_state" and flags & _STORED_STATE and not row:
                return False  # the string never reached the file
    except (OSError, ValueError, KeyError):
        return False
    return True


def repair(path: Any) -> int:
    """Make a history file left by a killed writer consistent; return the rows kept.

    Fixes a stale end-of-allocation address in the superblock (see
    :func:`_repair_end_of_address`) and drops trailing rows that an interrupted append left
    incomplete (variables of different lengths, a non-increasing iteration, an ensemble
    that reads as fill values). Complete rows are never touched. ``HistoryWriter`` calls
    this when it resumes a file.

    Raises
    ------
    StorageError
        The file is damaged beyond that (not an HDF5 file, a broken header).
    """
    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such enkal history file")
    try:
        _repair_end_of_address(path)
        with h5py.File(path, "r+", locking=False) as f:
            _check_format(f.attrs, path, HISTORY_FORMAT)
            names = _unlimited(f)
            n = min(f[name].shape[0] for name in names)
            its = f["iteration"][:n]
            good = n
            while good > 0 and not _row_complete(f, good - 1, names, its):
                good -= 1
            for name in names:
                if f[name].shape[0] != good:
                    f[name].resize(good, axis=0)
            if good and "predictions" in f:
                flags = int(f["stored"][good - 1])
                if flags & _STORED_PREDICTIONS and np.isnan(f["predictions"][good - 1]).all():
                    f["stored"][good - 1] = np.int8(flags & ~_STORED_PREDICTIONS)
    except StorageError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise StorageError(
            f"{path}: cannot repair this history file ({type(err).__name__}: {err})"
        ) from err
    return good


# -- whole results ---------------------------------------------------------------------------
def _check_result(result: Any) -> None:
    from ..smoother import SmootherResult

    if not isinstance(result, SmootherResult):
        raise TypeError(f"result: expected an enkal.SmootherResult, got {type(result).__name__}")


def _write_result(writer: HistoryWriter, result: Any) -> None:
    """Rows for every update of ``result`` (diagnostics), the final ensemble at the last."""
    state = result.state
    x = state.parameters
    k = int(state.iteration)
    hist = result.history or {}
    its = [int(i) for i in hist.get("iteration", [])]
    rows = [{key: vals[j] for key, vals in hist.items() if len(vals) == len(its)}
            for j in range(len(its))]
    pred = result.predictions
    writer._create(x.shape[0], x.dtype, {})
    if pred is not None and k >= 1 and (not its or its[0] > k - 1):
        writer.append(k - 1, None)  # the row that holds the last predictions
    for it, info in zip(its, rows, strict=True):
        if it == k:
            writer.append(it, x, info, predictions=pred, mask=state.mask, final=True,
                          rng_state=state.rng_state, schedule=state.schedule)
        else:
            writer.append(it, None, info)
    if k not in its:
        writer.append(k, x, None, predictions=pred, mask=state.mask, final=True,
                      rng_state=state.rng_state, schedule=state.schedule)


def _result_writer(target: Any, result: Any, compression: str | None) -> HistoryWriter:
    smoother = result.smoother
    return HistoryWriter(
        target, layout=result.layout, observations=smoother.observations,
        config=smoother.config(), seed=smoother.seed,
        history=History(every=None, final=True, predictions=result.predictions is not None,
                        compression=compression),
        attrs={"stopped_by": result.stopped_by, "n_forwards": int(result.n_forwards)},
    )


def save(result: Any, path: Any, *, compression: str | None = None) -> Path:
    """Write a :class:`~enkal.smoother.SmootherResult` to an HDF5 history file, atomically.

    The file has a row per update of the run (its diagnostics) and the final ensemble at the
    last row; ``result.predictions`` (of the ensemble before the last update) go to the row
    before it. Read it back with :func:`open_dataset`.

    Parameters
    ----------
    result : SmootherResult
    path : str or os.PathLike
        Replaced atomically (temporary file, ``fsync``, ``os.replace``).
    compression : None, "gzip" or "lzf"

    Returns
    -------
    Path
    """
    _check_result(result)
    path = _as_path(path)
    tmp = _temp_path(path)
    try:
        writer = _result_writer(tmp, result, compression)
        _write_result(writer, result)
        writer.close()
        _atomic_replace(tmp, path, fsync=True)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def to_xarray(result: Any) -> Any:
    """The :class:`~enkal.smoother.SmootherResult` as an ``xarray.Dataset`` (the schema of
    ``docs/schema.md``; the same Dataset :func:`open_dataset` returns for :func:`save`).

    The Dataset is backed by an in-memory HDF5 image and loads lazily: rows without an
    ensemble take no memory until read (``.load()`` gives plain numpy arrays).

    Returns
    -------
    xarray.Dataset
        ``parameters (iteration, member, parameter)`` in the unconstrained space, the
        diagnostics over ``iteration``, ``observations``, ``noise_std``, ``mask``...
    """
    import xarray as xr

    _check_result(result)
    buffer = io.BytesIO()
    writer = _result_writer(buffer, result, None)
    _write_result(writer, result)
    writer.close()
    buffer.seek(0)
    return xr.open_dataset(buffer, engine="h5netcdf")


def open_dataset(path: Any, **kwargs: Any) -> Any:
    """Open an enkal history file as an ``xarray.Dataset`` (lazily), after checking it is one.

    Parameters
    ----------
    path : str or os.PathLike
    **kwargs
        Passed to ``xarray.open_dataset`` (the engine is ``h5netcdf``).

    Raises
    ------
    FileNotFoundError
        No such file.
    StorageError
        The file is truncated, corrupt, or not an enkal history file (the message names it).
    """
    import xarray as xr

    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such enkal history file")
    with _read_errors(path, "an enkal history file"):
        with h5py.File(path, "r", locking=False) as f:
            _check_format(f.attrs, path, HISTORY_FORMAT)
            _check_history_file(f, path)
            lengths = [f[name].shape[0] for name in _unlimited(f)]
        ds = xr.open_dataset(path, engine="h5netcdf", **kwargs)
    if lengths and min(lengths) < max(lengths):
        # an append was killed half-way through its metadata: h5netcdf pads the shorter
        # variables; the complete rows are the common ones
        warnings.warn(f"{path}: the last row is incomplete (a killed append); it is left "
                      "out here, and enkal.storage.repair(path) removes it from the file",
                      RuntimeWarning, stacklevel=2)
        ds = ds.isel(iteration=slice(0, min(lengths)))
    try:
        _validate_dataset(ds, path)
    except BaseException:
        ds.close()
        raise
    return ds


open = open_dataset  # noqa: A001 - the public name is enkal.storage.open / enkal.open


def _check_history_file(f: h5py.File, path: Path) -> None:
    """Checks on the raw HDF5 file before xarray reads it: no links into other files, a
    floating ``parameters``, an ``iteration`` index that the file really holds."""
    for name in f:
        if isinstance(f.get(name, getlink=True), h5py.ExternalLink):
            raise StorageError(f"{path}: {name!r} is a link into another file; enkal history "
                               "files hold their own data only")
    if isinstance(f.get("parameters", getlink=True), h5py.HardLink):
        par = f["parameters"]
        if isinstance(par, h5py.Dataset) and par.dtype.kind != "f":
            raise StorageError(f"{path}: variable 'parameters' has dtype {par.dtype}, "
                               "expected a floating dtype")
    if isinstance(f.get("iteration", getlink=True), h5py.HardLink):
        it = f["iteration"]
        if isinstance(it, h5py.Dataset):
            chunk = int(np.prod(it.chunks)) * it.dtype.itemsize if it.chunks else 0
            # one chunk of slack: a killed append may have declared a row it never wrote
            _check_declared_size(it, "iteration", path, slack=chunk, cap=1 << 34)


def _check_format(attrs: Any, path: Any, expected: str) -> None:
    fmt = attrs.get("enkal_format")
    fmt = _attr_str(fmt) if fmt is not None else None
    if fmt != expected:
        hint = ""
        if fmt == CHECKPOINT_FORMAT:
            hint = "; it is a checkpoint: read it with enkal.storage.read_checkpoint"
        elif fmt == HISTORY_FORMAT:
            hint = "; it is a history file: open it with enkal.storage.open"
        raise StorageError(f"{path}: not an {expected} file (enkal_format={fmt!r}){hint}")
    version = attrs.get("enkal_format_version")
    try:
        version = int(np.asarray(version).item())
    except (TypeError, ValueError):
        raise StorageError(f"{path}: missing or malformed enkal_format_version") from None
    if version > FORMAT_VERSION:
        raise StorageError(f"{path}: format version {version} is newer than this enkal "
                           f"understands ({FORMAT_VERSION}); upgrade enkal")


def _validate_dataset(ds: Any, path: Path) -> None:
    dims = {"parameters": ("iteration", "member", "parameter"),
            "predictions": ("iteration", "member", "output"),
            "observations": ("output",), "noise_std": ("output",), "mask": ("parameter",),
            "stored": ("iteration",)}
    for name, want in dims.items():
        if name not in ds.variables:
            if name == "predictions":
                continue
            raise StorageError(f"{path}: variable {name!r} missing")
        if ds[name].dims != want:
            raise StorageError(f"{path}: variable {name!r} has dims {ds[name].dims}, "
                               f"expected {want}")
    try:
        layout = _read_layout(ds, path)
    except StorageError:
        raise
    except (AttributeError, RecursionError, KeyError, ValueError, TypeError) as err:
        raise StorageError(f"{path}: unreadable layout attribute ({type(err).__name__}: "
                           f"{err})") from None
    if layout.size != ds.sizes["parameter"]:
        raise StorageError(f"{path}: layout declares {layout.size} parameters, the file has "
                           f"{ds.sizes['parameter']}")
    its = ds["iteration"].values
    if its.size > 1 and np.any(np.diff(its) <= 0):
        raise StorageError(f"{path}: iteration coordinate is not increasing")


def read_layout(ds: Any) -> ParameterLayout:
    """The :class:`ParameterLayout` stored in a history Dataset's ``layout`` attribute."""
    return _read_layout(ds, "dataset")


def _read_layout(ds: Any, path: Any) -> ParameterLayout:
    rows = _loads(_attr_str(ds.attrs["layout"]), "layout", path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise StorageError(f"{path}: layout attribute is not a list of parameter blocks")
    for r in rows:
        c = r.get("constraint", {"type": "Real"})
        if not isinstance(c, dict):
            raise StorageError(f"{path}: layout block {r.get('name')!r} has a malformed "
                               "constraint")
    return ParameterLayout.from_dict(rows)


def physical(ds: Any) -> Any:
    """``ds.parameters`` mapped to physical units (``ParameterLayout.to_physical``).

    Loads the selected rows: select first (``physical(ds.isel(iteration=[-1]))``).

    Returns
    -------
    xarray.DataArray
        Same dims and coordinates as ``ds.parameters``.
    """
    layout = read_layout(ds)
    da = ds["parameters"]
    x = torch.from_numpy(np.ascontiguousarray(da.values))
    flat = x.reshape(-1, x.shape[-1])
    phys = layout.to_physical(flat).reshape(x.shape)
    out = da.copy(data=phys.numpy())
    out.attrs = {**da.attrs, "space": "physical"}
    return out.rename("physical")


# -- checkpoints -------------------------------------------------------------------------
def write_checkpoint(path: Any, smoother: Any, state: Any, *, fsync: bool = True) -> Path:
    """Write ``smoother.state_dict(state)`` to an HDF5 checkpoint, atomically.

    The state goes to a temporary file in the same directory, which is flushed, ``fsync``-ed
    and moved over ``path`` with ``os.replace``: if writing fails or the process dies, the
    previous checkpoint at ``path`` is untouched. Arrays are datasets with Fletcher-32
    checksums (so corruption is detected on read), everything else is JSON in attributes;
    nothing is pickled. Tensors are stored on the CPU in their own dtype.

    Parameters
    ----------
    path : str or os.PathLike
    smoother : EnsembleSmoother
    state : SmootherState
    fsync : bool
        Flush to disk before the rename (survives power loss as well as a killed process).

    Returns
    -------
    Path
    """
    path = _as_path(path)
    d = smoother.state_dict(state)
    x = d["parameters"]
    _check_ensemble(x, "state.parameters")
    rng = _check_rng_state(d["rng_state"], "state.rng_state")
    mask = d.get("mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or tuple(mask.shape) != (x.shape[1],)):
        raise ValueError(f"state.mask: expected a bool tensor of shape ({x.shape[1]},) or None")
    schedule = d["schedule"]
    try:
        sched_json = json.dumps(schedule)
    except TypeError as err:
        raise TypeError(f"state.schedule: expected JSON-able numbers ({err})") from None
    torch_dtype = str(x.dtype).removeprefix("torch.")
    attrs = {
        "enkal_format": CHECKPOINT_FORMAT,
        "enkal_format_version": FORMAT_VERSION,
        **_versions(),
        "created": _now(),
        "iteration": int(d["iteration"]),
        "schedule": sched_json,
        "config": _to_json(d.get("config")),
        "parameters_dtype": torch_dtype,
        "n_members": int(x.shape[0]),
        "n_parameters": int(x.shape[1]),
        "rng_state_size": int(rng.size),
        "device_type": x.device.type,
        "has_mask": int(mask is not None),
    }
    tmp = _temp_path(path)
    try:
        with h5py.File(tmp, "w", libver="latest", locking=False) as f:
            for k, v in attrs.items():
                f.attrs[k] = _attr_value(v)
            _put_array(f, "parameters", cpu_numpy(x))
            _put_array(f, "rng_state", rng)
            if mask is not None:
                _put_array(f, "mask", mask.detach().cpu().numpy().astype(np.uint8))
        _atomic_replace(tmp, path, fsync=fsync)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def _put_array(f: h5py.File, name: str, a: np.ndarray) -> None:
    # chunked (required by the checksum filter); chunks of at most ~4 MiB
    if a.ndim == 2 and a.size:
        cols = max(1, min(a.shape[1], (4 << 20) // max(1, a.shape[0] * a.itemsize)))
        chunks: Any = (a.shape[0], cols)
    else:
        chunks = (max(1, a.shape[0]),) if a.ndim == 1 else True
    f.create_dataset(name, data=a, chunks=chunks, fletcher32=True)


def read_state_dict(path: Any, *, device: torch.device | str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`write_checkpoint` back into a state dict.

    Everything read is validated (format marker, declared shapes and dtypes, JSON, the
    Fletcher-32 checksums of the arrays) before it is trusted.

    Parameters
    ----------
    path : str or os.PathLike
    device : torch.device or str, optional
        Where to put ``parameters`` and ``mask`` (default CPU). The generator state stays on
        the CPU, as ``torch.Generator.set_state`` wants it.

    Returns
    -------
    dict
        ``parameters (N_ens, N_par)``, ``iteration``, ``schedule``, ``rng_state``, ``mask``,
        ``config`` and the file's ``attrs``.

    Raises
    ------
    FileNotFoundError, StorageError
    """
    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    device = torch.device(device) if device is not None else torch.device("cpu")
    with _read_errors(path, "an enkal checkpoint"), \
            h5py.File(path, "r", locking=False) as f:
        _check_format(f.attrs, path, CHECKPOINT_FORMAT)
        a = {k: f.attrs[k] for k in f.attrs}
        e, p = _int_attr(a, "n_members", path), _int_attr(a, "n_parameters", path)
        if e < 0 or p < 0:
            raise StorageError(f"{path}: negative n_members/n_parameters ({e}, {p})")
        torch_dtype = getattr(torch, _attr_str(a["parameters_dtype"]), None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise StorageError(f"{path}: unknown parameters dtype {a['parameters_dtype']!r}")
        want = _storage_dtype(torch_dtype)
        par = _get_array(f, "parameters", (e, p), want, path)
        device_type = _attr_str(a["device_type"])
        rng_size = _int_attr(a, "rng_state_size", path)
        if device_type == "cpu" and rng_size != _CPU_RNG_STATE_SIZE:
            raise StorageError(f"{path}: rng_state_size {rng_size} is not the size of a "
                               f"CPU generator state ({_CPU_RNG_STATE_SIZE})")
        if not 0 < rng_size <= 1 << 20:
            raise StorageError(f"{path}: implausible rng_state_size {rng_size}")
        rng = _get_array(f, "rng_state", (rng_size,), np.dtype(np.uint8), path)
        mask = None
        if _int_attr(a, "has_mask", path):
            mask = _get_array(f, "mask", (p,), np.dtype(np.uint8), path)
            if np.any(mask > 1):
                raise StorageError(f"{path}: mask holds values other than 0/1")
        iteration = _int_attr(a, "iteration", path)
        if iteration < 0:
            raise StorageError(f"{path}: negative iteration {iteration}")
        schedule = _loads(_attr_str(a["schedule"]), "schedule", path)
        config = _loads(_attr_str(a["config"]), "config", path)
        problem = _schedule_problem(schedule)
        if problem is not None:
            raise StorageError(f"{path}: schedule attribute {problem}")
    if not np.all(np.isfinite(par)):
        raise StorageError(f"{path}: parameters hold NaN/inf (a checkpoint never does)")
    params = torch.from_numpy(par).to(dtype=torch_dtype, device=device)
    return {
        "parameters": params,
        "iteration": iteration,
        "schedule": schedule,
        "rng_state": torch.from_numpy(rng),
        "mask": None if mask is None else torch.from_numpy(mask.astype(bool)).to(device),
        "config": config,
        "device_type": device_type,
        "attrs": {k: (_attr_str(v) if isinstance(v, (bytes, str)) else v)
                  for k, v in a.items()},
    }


def _get_array(f: h5py.File, name: str, shape: tuple[int, ...], dtype: np.dtype,
               path: Path) -> np.ndarray:
    link = f.get(name, getlink=True)
    if link is None:
        raise StorageError(f"{path}: dataset {name!r} missing")
    if not isinstance(link, h5py.HardLink):
        raise StorageError(f"{path}: {name!r} is a {type(link).__name__}; a checkpoint holds "
                           "its own datasets only")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise StorageError(f"{path}: dataset {name!r} missing")
    if ds.shape != shape:
        raise StorageError(f"{path}: dataset {name!r} has shape {ds.shape}, its header "
                           f"declares {shape}")
    if ds.dtype != dtype:
        raise StorageError(f"{path}: dataset {name!r} has dtype {ds.dtype}, expected {dtype}")
    _check_declared_size(ds, name, path)
    return ds[...]


_MAX_STATE_ROWS_TRIED = 16  # a torn or corrupt row falls back to an earlier one, this far


def _dataset(f: h5py.File, name: str, path: Path, *, what: str = "variable") -> h5py.Dataset:
    """``f[name]``, which must be the file's own dataset (no soft or external link)."""
    link = f.get(name, getlink=True)
    if link is None:
        raise StorageError(f"{path}: {what} {name!r} missing")
    if not isinstance(link, h5py.HardLink) or not isinstance(f[name], h5py.Dataset):
        raise StorageError(f"{path}: {name!r} is not a dataset of the file itself")
    return f[name]


def read_history_state(path: Any, *, device: torch.device | str | None = None,
                       iteration: int | None = None,
                       max_iteration: int | None = None) -> dict[str, Any]:
    """Read the smoother state held by a history file's last complete state row.

    A row holds the whole state (``stored`` bit 4) when the run's :class:`History` kept its
    ensemble: ``parameters``, ``rng_state``, ``schedule_state``, ``state_mask`` and the
    ``state_checksum`` over all of them. Everything is validated before it is trusted (the
    variables' dims and dtypes, the declared sizes, the JSON, the checksum). A row that
    fails (the torn last row of a killed append, a checksum mismatch) is skipped with a
    ``RuntimeWarning`` and the previous state row is used: resuming from it recomputes the
    lost iterations bit for bit.

    Parameters
    ----------
    path : str or os.PathLike
    device : torch.device or str, optional
        Where to put ``parameters`` and ``mask`` (default CPU).
    iteration : int, optional
        Read the state of exactly this iteration (default: the last one).
    max_iteration : int, optional
        The last state row at or before this iteration.

    Returns
    -------
    dict
        As :func:`read_state_dict`: ``parameters (N_ens, N_par)``, ``iteration``,
        ``schedule``, ``rng_state``, ``mask``, ``config``, ``device_type``, ``attrs``.

    Raises
    ------
    FileNotFoundError
    StorageError
        Not an enkal history, no state variables (a file of an older enkal, or written
        without generator states), or no usable state row; the message names the file.
    """
    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such enkal history file")
    device = torch.device(device) if device is not None else torch.device("cpu")
    skipped: list[str] = []
    with _read_errors(path, "an enkal history file"), \
            h5py.File(path, "r", locking=False) as f:
        _check_format(f.attrs, path, HISTORY_FORMAT)
        _check_history_file(f, path)
        if f.get("rng_state", getlink=True) is None:
            raise StorageError(f"{path}: holds no smoother state (no 'rng_state' variable: "
                               "written by HistoryWriter.append without generator states, "
                               "or by an older enkal); resume from its checkpoint file")
        par = _dataset(f, "parameters", path)
        its_ds = _dataset(f, "iteration", path)
        stored = _dataset(f, "stored", path)
        rng = _dataset(f, "rng_state", path)
        sched = _dataset(f, "schedule_state", path)
        checks = _dataset(f, "state_checksum", path)
        masks = _dataset(f, "state_mask", path) if "state_mask" in f else None
        if par.ndim != 3 or par.dtype.kind != "f":
            raise StorageError(f"{path}: variable 'parameters' has shape {par.shape} and "
                               f"dtype {par.dtype}, expected (iteration, member, parameter) "
                               "floats")
        e, p = int(par.shape[1]), int(par.shape[2])
        for name, ds, kind in (("iteration", its_ds, "iu"), ("stored", stored, "iu"),
                               ("state_checksum", checks, "u")):
            if ds.ndim != 1 or ds.dtype.kind not in kind:
                raise StorageError(f"{path}: variable {name!r} has shape {ds.shape} and dtype "
                                   f"{ds.dtype}, expected one integer per iteration")
        if rng.ndim != 2 or rng.dtype != np.uint8 or not 0 < rng.shape[1] <= 1 << 20:
            raise StorageError(f"{path}: variable 'rng_state' has shape {rng.shape} and dtype "
                               f"{rng.dtype}, expected (iteration, rng_byte) uint8")
        device_type = _attr_str(rng.attrs.get("device_type", ""))
        if device_type not in ("cpu", "cuda", "mps", "xpu"):
            raise StorageError(f"{path}: rng_state has an unknown device_type "
                               f"{device_type!r}")
        if device_type == "cpu" and rng.shape[1] != _CPU_RNG_STATE_SIZE:
            raise StorageError(f"{path}: rng_state rows of {rng.shape[1]} bytes are not CPU "
                               f"generator states ({_CPU_RNG_STATE_SIZE})")
        if sched.ndim != 1 or h5py.check_string_dtype(sched.dtype) is None:
            raise StorageError(f"{path}: variable 'schedule_state' has dtype {sched.dtype}, "
                               "expected one JSON string per iteration")
        if masks is not None and (masks.ndim != 2 or masks.shape[1] != p or
                                  masks.dtype != np.int8):
            raise StorageError(f"{path}: variable 'state_mask' has shape {masks.shape} and "
                               f"dtype {masks.dtype}, expected (iteration, {p}) int8")
        name = _attr_str(f.attrs.get("parameters_dtype", str(par.dtype)))
        torch_dtype = getattr(torch, name, None) if name.isidentifier() and \
            not name.startswith("_") else None
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point or \
                _storage_dtype(torch_dtype) != par.dtype:
            raise StorageError(f"{path}: parameters_dtype {name!r} does not describe the "
                               f"stored {par.dtype} parameters")
        row_bytes = e * p * par.dtype.itemsize
        if par.compression is None and row_bytes > int(par.id.get_storage_size()) or \
                row_bytes > 1 << 36:
            raise StorageError(f"{path}: a parameters row declares {row_bytes} bytes, more "
                               "than the file holds for them")
        config = _loads(_attr_str(f.attrs["config"]), "config", path) \
            if "config" in f.attrs else None
        n = min(f[name].shape[0] for name in _unlimited(f))
        its = its_ds[:n]
        flags = stored[:n]
        want = _STORED_PARAMETERS | _STORED_STATE
        rows = [r for r in range(n - 1, -1, -1) if int(flags[r]) & want == want and
                (iteration is None or int(its[r]) == iteration) and
                (max_iteration is None or int(its[r]) <= max_iteration)]
        found = None
        for r in rows[:_MAX_STATE_ROWS_TRIED]:
            try:
                found = _state_row(f, r, its, flags, par, rng, sched, checks, masks, path)
                break
            except (StorageError, OSError, ValueError, UnicodeDecodeError) as err:
                skipped.append(f"row {r} (iteration {int(its[r])}): "
                               f"{str(err).removeprefix(f'{path}: ')}")
        if found is None:
            where = f"iteration {iteration}" if iteration is not None else "any row"
            reason = f" ({'; '.join(skipped)})" if skipped else ""
            raise StorageError(f"{path}: no complete smoother state at {where}{reason}")
        attrs = {k: (_attr_str(v) if isinstance(v, (bytes, str)) else v)
                 for k, v in f.attrs.items()}
    if skipped:
        warnings.warn(f"{path}: skipped unusable state rows ({'; '.join(skipped)}); resuming "
                      f"from iteration {found[0]}", RuntimeWarning, stacklevel=2)
    it, x, g, schedule, mask = found
    return {
        "parameters": torch.from_numpy(x).to(dtype=torch_dtype, device=device),
        "iteration": it,
        "schedule": schedule,
        "rng_state": torch.from_numpy(g),
        "mask": None if mask is None else torch.from_numpy(mask.astype(bool)).to(device),
        "config": config,
        "device_type": device_type,
        "attrs": attrs,
    }


def _state_row(f, r, its, flags, par, rng, sched, checks, masks, path) -> tuple:
    """Read and check state row ``r``; raise (StorageError, OSError, ...) if unusable."""
    it = int(its[r])
    if it < 0 or (r > 0 and it <= int(its[r - 1])):
        raise StorageError("iteration out of order")
    x = par[r]
    g = rng[r]
    raw = sched[r]
    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    mask = None
    if int(flags[r]) & _STORED_MASK:
        if masks is None:
            raise StorageError("stored bit 8 set but the file has no state_mask")
        mask = masks[r]
        if np.any((mask != 0) & (mask != 1)):
            raise StorageError("state_mask holds values other than 0/1")
    checksum = _state_checksum(x, g, text, mask, it)
    if checksum != int(checks[r]):
        raise StorageError("checksum mismatch (a torn or corrupted row)")
    if not np.all(np.isfinite(x)):
        raise StorageError("parameters hold NaN/inf")
    schedule = _loads(text, "schedule_state", path)
    problem = _schedule_problem(schedule)
    if problem is not None:
        raise StorageError(f"schedule_state {problem}")
    return it, x, g, schedule, mask


def _read_policy(path: Any) -> History:
    """The :class:`History` policy a history file was written with (its
    ``history_policy`` attribute), for a run that continues the file."""
    path = _as_path(path)
    with _read_errors(path, "an enkal history file"), \
            h5py.File(path, "r", locking=False) as f:
        _check_format(f.attrs, path, HISTORY_FORMAT)
        if "history_policy" not in f.attrs:
            return History()
        d = _loads(_attr_str(f.attrs["history_policy"]), "history_policy", path)
    names = {fld.name for fld in dataclasses.fields(History)}
    if not isinstance(d, dict) or not set(d) <= names:
        raise StorageError(f"{path}: history_policy attribute is not a History policy")
    try:
        return History(**d)
    except (TypeError, ValueError) as err:
        raise StorageError(f"{path}: history_policy attribute: {err}") from None


def _format_of(path: Any) -> str | None:
    """The ``enkal_format`` of an existing file (``None`` when it has none)."""
    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or history file")
    with _read_errors(path, "an enkal checkpoint or history file"), \
            h5py.File(path, "r", locking=False) as f:
        fmt = f.attrs.get("enkal_format")
        return _attr_str(fmt) if fmt is not None else None


def read_state(path: Any, smoother: Any, *, device: torch.device | str | None = None,
               store: Any = None, max_iteration: int | None = None) -> Any:
    """The :class:`~enkal.smoother.SmootherState` to resume a run from: ``path`` is a
    checkpoint (:func:`read_checkpoint`) or a history file (:func:`read_history_state`:
    its last complete state row, at most ``max_iteration``; when ``store`` is that same
    file, which the run continues, it is :func:`repair`-ed first).

    With a checkpoint and ``store`` (the run's history file), the history may hold later
    states of the same run: run's default writes a checkpoint file at the start and the
    end only, while every history row that keeps the ensemble holds the state. The later
    state is used when the history's row at the checkpoint's iteration is the checkpoint's
    state bit for bit and the history, the checkpoint and ``smoother`` have one
    configuration: it is then what recomputing from the checkpoint gives (up to
    ``max_iteration``, where the recomputation would stop), without the recomputation.

    Raises
    ------
    FileNotFoundError, StorageError, ValueError
        As :func:`read_checkpoint`.
    """
    path = _as_path(path)
    if _format_of(path) == HISTORY_FORMAT:
        if store is not None and _as_path(store).exists() and \
                _as_path(store).resolve() == path.resolve():
            repair(path)  # the run continues this file (its writer repairs it anyway)
        d = read_history_state(path, max_iteration=max_iteration)
        return _load_state(d, path, smoother, device, what="history state")
    d = read_state_dict(path)
    ckpt_config = d["config"]
    state = _load_state(d, path, smoother, device, what="checkpoint")
    if store is None:
        return state
    store = _as_path(store)
    if not store.exists() or (store.resolve() == path.resolve()):
        return state
    try:
        later = read_history_state(store, max_iteration=max_iteration)
        if later["iteration"] <= state.iteration:
            return state
        mine = json.loads(_to_json(smoother.config()))
        if later["config"] != mine or ckpt_config != mine:
            return state
        here = smoother.state_dict(state)
        row = read_history_state(store, iteration=state.iteration)
    except StorageError:
        return state  # no usable later state: recompute from the checkpoint
    same = (torch.equal(row["parameters"], here["parameters"].cpu())
            and torch.equal(row["rng_state"], here["rng_state"].cpu())
            and row["schedule"] == json.loads(json.dumps(here["schedule"]))
            and (row["mask"] is None) == (here["mask"] is None)
            and (row["mask"] is None or torch.equal(row["mask"], here["mask"].cpu())))
    if not same:
        return state
    return _load_state(later, store, smoother, device, what="history state")


def read_checkpoint(path: Any, smoother: Any, *, device: torch.device | str | None = None) -> Any:
    """Read a checkpoint into a :class:`~enkal.smoother.SmootherState` for ``smoother``.

    Continuing from it with the same smoother repeats the uninterrupted run bit for bit
    (on the same device and software). :func:`read_state` reads a history file's state too.

    Parameters
    ----------
    path : str or os.PathLike
    smoother : EnsembleSmoother
        Must have the schedule type the checkpoint was written with.
    device : torch.device or str, optional
        Where the ensemble goes (default CPU); its type must be the one the checkpoint was
        written from, since a generator state only restores on its own kind of device.

    Raises
    ------
    StorageError
        The file is truncated, corrupt or not an enkal checkpoint.
    ValueError
        The checkpoint does not fit ``smoother`` (another schedule type, another number of
        observations) or ``device``.
    """
    return _load_state(read_state_dict(path), _as_path(path), smoother, device,
                       what="checkpoint")


def _load_state(d: dict[str, Any], path: Path, smoother: Any, device: Any, *,
                what: str) -> Any:
    """A validated state dict (from a checkpoint or a history row) -> SmootherState."""
    target = torch.device(device) if device is not None else torch.device("cpu")
    if d["device_type"] != target.type:
        raise ValueError(
            f"{path}: written from a {d['device_type']} run; its random generator state only "
            f"restores on a {d['device_type']} device, not {target.type}: pass "
            f"device={d['device_type']!r}"
        )
    d["parameters"] = d["parameters"].to(target)
    if d["mask"] is not None:
        d["mask"] = d["mask"].to(target)
    config = d["config"] if isinstance(d["config"], dict) else {}
    n_obs = config.get("n_obs")
    if n_obs is not None and n_obs != smoother.observations.size:
        raise ValueError(
            f"{path}: {what} of a run with {n_obs} observations, this smoother has "
            f"{smoother.observations.size}"
        )
    try:
        state = smoother.load_state_dict(d)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {what} does not fit this smoother: {err}") from None
    _config_differs(smoother, config, path, what)
    return state


def _config_differs(smoother: Any, config: Any, path: Path, what: str) -> bool:
    """Warn (and say so) when ``config`` is not ``smoother.config()``."""
    config = config if isinstance(config, dict) else {}
    mine = json.loads(_to_json(smoother.config()))
    differ = sorted(k for k in set(mine) | set(config) if mine.get(k) != config.get(k))
    if differ:
        warnings.warn(
            f"{path}: {what} written with another configuration ({', '.join(differ)} "
            "differ); the resumed run will not repeat the original one",
            RuntimeWarning, stacklevel=4,
        )
    return bool(differ)
