"""The streaming :class:`HistoryWriter` (one row per append) and its :class:`History` policy
(defined with the schema, :mod:`enkal.storage.schema`)."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
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
from .h5 import (
    _as_path,
    _atomic_replace,
    _create_diagnostic,
    _create_state_variables,
    _create_structure,
    _cut_history,
    _put_predictions,
    _row_bytes,
    _state_json,
    _StateRow,
    _temp_path,
    _unlimited,
    _write_row,
    repair,
)
from .journal import check_space, deferred_interrupts, full_error, is_full, transaction
from .schema import (
    _RESERVED,
    _STORED_MASK,
    _STORED_PARAMETERS,
    _STORED_PREDICTIONS,
    _STORED_STATE,
    FORMAT_VERSION,
    HISTORY_FORMAT,
    History,
    _attr_str,
    _attr_value,
    _check_ensemble,
    _diagnostic_kind,
    _info_dict,
    _mask_row,
    _now,
    _physical_values,
    _state_checksum,
    _storage_dtype,
    _to_json,
    _versions,
)


def _output_names(names: Sequence[str] | None, m: int) -> list[str]:
    """``N_obs`` output names (``y[i]`` when not given)."""
    out = [f"y[{i}]" for i in range(m)] if names is None else [str(n) for n in names]
    if len(out) != m:
        raise ValueError(f"output_names: expected {m} names (N_obs), got {len(out)}")
    return out


class HistoryWriter:
    """Append a run to an HDF5 history file, one iteration at a time.

    The file is created (atomically) at the first :meth:`append` and opened, extended and
    closed again at each later one, so a killed run leaves a file that ``xarray`` opens with
    every completed iteration (see :mod:`enkal.storage`). One writer per file.

    A row that keeps the ensemble and is given the generator and schedule state
    (:meth:`record` and :meth:`start` take them from a
    :class:`~enkal.smoother.SmootherState`) holds the whole smoother state, with a
    checksum: :func:`read_history_state` reads it back and ``enkal.run(..., resume=path)`` continues
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
        output_names = _output_names(output_names, observations.size)
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
        # the file keeps parameters_physical (a constraint is not the identity)
        self._physical = not layout.is_unconstrained
        self._rng_size: int | None = None  # bytes of rng_state; None: no state variables yet
        self._state_mask = False  # the file has a state_mask variable
        self._adapt_state = False  # the file has an adapt_state variable
        self._accelerator_state = False  # ... and an accelerator_state variable
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
                    schedule=state.schedule, adapt=getattr(state, "adapt", None),
                    accelerator=getattr(state, "accelerator", None))

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
        adapt: Any = None,
        accelerator: Any = None,
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
            (``rng_state``, ``schedule_state``, ``state_mask``, ``adapt_state``,
            ``state_checksum``).
        schedule : schedule state or its dict, optional
            The schedule's state after this update (``{"type": ..., field: value}``, see
            :func:`enkal._types.encode_state`).
        adapt : adaptation state or its dict, optional
            The structure adaptation's state after this update (with ``rng_state`` and
            ``schedule``; ``adapt_state`` in a row that holds the state).
        accelerator : accelerator state or its dict, optional
            The accelerator's state after this update (as ``adapt``; ``accelerator_state``).
        """
        if self._closed:
            raise ValueError("HistoryWriter: append after close()")
        iteration = self._check_iteration(iteration)
        p = self.layout.size
        if parameters is not None:
            _check_ensemble(parameters, "parameters", columns=p, rows=self._n_members)
        elif not self._created:
            raise ValueError("parameters: the first row of a history must carry the ensemble")
        values = _info_dict(info, iteration)
        kinds = {k: _diagnostic_kind(k, v) for k, v in values.items()}
        keeps_parameters, keeps_predictions = self.keeps_row(iteration, final=final)
        keep = parameters is not None and keeps_parameters
        pred_np = self._predictions_row(predictions, parameters, keeps_predictions)
        full_mask = None if mask is None else _mask_row(mask, p)
        # the file's mask variable is rewritten only when the mask changes
        changed = full_mask is not None and not (
            self._mask is not None and np.array_equal(full_mask, self._mask))
        mask_np = full_mask if changed else None
        small = _state_json(rng_state, schedule, adapt, accelerator, rng_size=self._rng_size)
        params_np = cpu_numpy(parameters) if keep and parameters is not None else None
        phys_np = _physical_values(self.layout, parameters) \
            if params_np is not None and parameters is not None and self._physical else None
        state = None
        if params_np is not None and parameters is not None and small is not None:
            rng_np, sched_json, adapt_json, acc_json = small
            state = _StateRow(rng_np, sched_json, parameters.device.type, full_mask,
                              _state_checksum(params_np, rng_np, sched_json, full_mask,
                                              iteration, adapt_json, acc_json),
                              adapt_json, acc_json)
        flags = _STORED_PARAMETERS if keep else 0
        if state is not None:
            flags |= _STORED_STATE | (_STORED_MASK if state.mask is not None else 0)
        if not self._created:
            assert parameters is not None  # the first row carries the ensemble (checked)
            self._create(parameters.shape[0], parameters.dtype, kinds, first=(
                iteration, flags, params_np, values, mask_np, state, phys_np))
        else:
            self._append_row(iteration, flags, params_np, values, kinds, pred_np, mask_np,
                             state, phys_np)
        if mask_np is not None:
            self._mask = mask_np
        self._rows += 1
        self._last = iteration
        self._last_flags = flags

    def append_predictive(self, iteration: int, predictions: torch.Tensor) -> None:
        """Store the predictions of the ensemble of the last row (``iteration``), i.e.
        ``G(parameters(iteration))``: the posterior predictive of a final row. Nothing is
        written when the file keeps no predictions (an older file, ``History(predictive=
        False)``) or the row holds no ensemble."""
        if self._closed:
            raise ValueError("HistoryWriter: append_predictive after close()")
        if not self._created or iteration != self._last:
            raise ValueError(f"iteration: expected the last row's iteration {self._last}, "
                             f"got {iteration!r}")
        _check_ensemble(predictions, "predictions", columns=self.observations.size,
                        rows=self._n_members)
        if "predictions" not in self._unlimited or not self._last_flags & _STORED_PARAMETERS:
            return
        pred_np = cpu_numpy(predictions)
        what = f"the predictive of iteration {iteration}"
        if self.path is not None:
            check_space(self.path, pred_np.nbytes, what=what)
        flags = self._last_flags | _STORED_PREDICTIONS
        try:
            with deferred_interrupts(), self._h5("r+") as f:
                _put_predictions(f, self._rows - 1, pred_np, flags)
        except Exception as err:
            if self.path is not None and is_full(err):
                raise full_error(self.path, what, err) from err
            raise
        self._last_flags = flags

    def keeps_row(self, iteration: int, *, final: bool = False) -> tuple[bool, bool]:
        """What the next :meth:`append`, of ``iteration``, writes of the tensors it is
        given: ``(parameters, predictions)``, i.e. whether it keeps the ensemble (when one
        is given) and whether it stores the predictions (at the previous row). A caller
        that hands the row to another thread copies only these."""
        keeps_predictions = self._predictions and self._rows > 0 and \
            self._last == iteration - 1 and \
            bool(self._last_flags & _STORED_PARAMETERS or (final and self.history.final))
        return self.history.keeps(iteration, final=final), keeps_predictions

    def close(self, attrs: Mapping[str, Any] | None = None, *, complete: bool = True) -> None:
        """Add the final attributes and mark the file ``complete = 1`` (the run ended as
        planned) or, with ``complete=False``, leave it ``0`` (interrupted, failed)."""
        if self._closed:
            return
        self._closed = True
        if not self._created:
            return
        with deferred_interrupts(), self._h5("r+") as f:
            for k, v in (attrs or {}).items():
                f.attrs[k] = _attr_value(v)
            f.attrs["complete"] = np.int8(1 if complete else 0)

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "<memory>"
        return f"HistoryWriter({where}, rows={self._rows}, last_iteration={self._last})"

    # -- internals -----------------------------------------------------------------------
    def _check_iteration(self, iteration: Any) -> int:
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
        return iteration

    def _predictions_row(self, predictions: torch.Tensor | None,
                         parameters: torch.Tensor | None, keep: bool) -> np.ndarray | None:
        """The checked predictions as an array when the row stores them (else None)."""
        if predictions is None:
            return None
        n_ens = self._n_members if parameters is None else parameters.shape[0]
        _check_ensemble(predictions, "predictions", columns=self.observations.size,
                        rows=n_ens, label="N_obs")
        return cpu_numpy(predictions) if keep else None

    def _append_row(self, iteration: int, flags: int, params_np: np.ndarray | None,
                    values: dict[str, Any], kinds: dict[str, str],
                    pred_np: np.ndarray | None, mask_np: np.ndarray | None,
                    state: _StateRow | None, phys_np: np.ndarray | None = None) -> None:
        """Extend an existing file by one row (new diagnostics and state variables first).

        A row is written whole or not at all: a failing write (a full disk, an interrupt)
        is undone (:mod:`enkal.storage.journal`), and Ctrl-C waits for the row."""
        what = f"the row of iteration {iteration}"
        if self.path is not None:
            check_space(self.path, _row_bytes(params_np, pred_np, state, phys_np), what=what)
        try:
            with deferred_interrupts():
                new = {k: v for k, v in kinds.items() if k not in self._diagnostics}
                if new:
                    self._add_diagnostics(new)
                with self._h5("r+") as f:
                    if state is not None:
                        self._ensure_state_variables(f, state)
                    _write_row(f, self._rows, iteration, flags, params_np, values,
                               self._diagnostics, pred_np, self._last_flags, mask_np,
                               self._unlimited, state, phys_np)
        except Exception as err:
            if self.path is not None and is_full(err):
                raise full_error(self.path, what, err) from err
            raise

    def _h5(self, mode: str) -> Any:
        """The file for one change: in memory as is; on disk a :func:`transaction`, undone
        whole if it fails (so a failed change never leaves a file nothing can read)."""
        if self.path is None:
            self._target.seek(0)
            return h5py.File(self._target, mode)
        return transaction(self.path, fsync=self.fsync)

    def _global_attrs(self) -> dict[str, Any]:
        from .._version import __version__

        attrs: dict[str, Any] = {
            # CF-style discovery attributes (CF-1.10 section 2.6), read by generic tools
            "Conventions": "CF-1.10",
            "title": "enkal ensemble Kalman inversion history",
            "source": f"enkal {__version__}",
            "references": "the enkal documentation, docs/schema.md (this file's layout)",
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
        if self.path is not None and first is not None:
            check_space(self.path, _row_bytes(first[2], None, first[5], first[6]),
                        what="the first row of a new history", new=True)
        try:
            if tmp is None:
                self._target.seek(0)
                self._target.truncate()
            with h5netcdf.File(target, "w") as nc:
                _create_structure(nc, layout=self.layout, observations=self.observations,
                                  output_names=self.output_names, n_members=self._n_members,
                                  dtype=self._dtype, filters=self.history._filters(),
                                  chunk_bytes=self.history.chunk_bytes,
                                  predictions=self.history.predictions or
                                  self.history.predictive, kinds=kinds,
                                  attrs=self._global_attrs())
            self._diagnostics = dict(kinds)
            self._unlimited = ["iteration", "parameters", "stored", *kinds] + \
                ["predictions"] * (self.history.predictions or self.history.predictive) + \
                ["parameters_physical"] * self._physical
            if first is not None:
                iteration, flags, params_np, values, mask_np, state, phys_np = first
                with (h5py.File(tmp, "r+", locking=False) if tmp is not None
                      else self._h5("r+")) as f:
                    if state is not None:
                        self._ensure_state_variables(f, state)
                    _write_row(f, 0, iteration, flags, params_np, values, self._diagnostics,
                               None, 0, mask_np, self._unlimited, state, phys_np)
            if tmp is not None and self.path is not None:
                _atomic_replace(tmp, self.path, fsync=True)
        except BaseException as err:
            if tmp is not None and tmp.exists():
                tmp.unlink()
            if self.path is not None and is_full(err):
                raise full_error(self.path, "a new history", err) from err
            raise
        self._created = True

    def _ensure_state_variables(self, f: h5py.File, state: _StateRow) -> None:
        """Create the per-row state variables at the first state row (``state_mask`` at
        the first state with a mask, ``adapt_state`` at the first with an adaptation
        state); earlier rows read as no state."""
        need_state = self._rng_size is None
        need_mask = state.mask is not None and not self._state_mask
        need_adapt = state.adapt is not None and not self._adapt_state
        need_acc = state.accelerator is not None and not self._accelerator_state
        if not (need_state or need_mask or need_adapt or need_acc):
            return
        self._unlimited.extend(_create_state_variables(
            f, rows=self._rows, n_parameters=self.layout.size, rng_size=int(state.rng.size),
            device_type=state.device_type, state=need_state, mask=need_mask,
            adapt=need_adapt, accelerator=need_acc))
        if need_acc:
            self._accelerator_state = True
        if need_mask:
            self._state_mask = True
        if need_adapt:
            self._adapt_state = True
        if need_state:
            self._rng_size = int(state.rng.size)

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
                keep, its = _cut_history(f, self.path, layout=self.layout.to_dict(),
                                         n_obs=self.observations.size,
                                         resume_from=resume_from)
                self._unlimited = _unlimited(f)
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
                # the file's choice stands (a file with the posterior predictive only has
                # the variable too)
                self._predictions = "predictions" in f and self.history.predictions
                self._physical = "parameters_physical" in f  # (older files have none)
                self._rng_size = int(f["rng_state"].shape[1]) if "rng_state" in f else None
                self._state_mask = "state_mask" in f
                self._adapt_state = "adapt_state" in f
                self._accelerator_state = "accelerator_state" in f
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

