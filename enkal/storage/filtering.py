r"""A filter's history in HDF5: :class:`FilterRecorder` (a sink of
:func:`enkal.filtering.run_filter`), :func:`read_filter_state` and
:func:`open_filter_history`.

The file (``docs/schema.md``, "Filter history") has a row per assimilation cycle along an
unlimited ``time`` dimension -- the observations, the forecast and analysis means and
spreads, the lag smoother's estimate, the inflation, optionally the analysis ensembles --
and a ``checkpoint`` group with the latest whole filter state
(``EnsembleFilter.state_dict``: ensemble, generator state, smoother window, inflation
states). Plain ``xarray.open_dataset(path)`` reads it.

Crash safety is the smoother history's (:mod:`enkal.storage`): the file is created
atomically (temporary file, ``os.replace``) with the starting state as its checkpoint, and
each cycle's row and, when due, its checkpoint are one journaled change
(:func:`~enkal.storage.journal.transaction`): a failure or a kill leaves the file as it was
before the cycle, and the next opener undoes a half-done change. So the file always holds
a checkpoint that resumes bit for bit; rows written after it (``checkpoint_every > 1``) are
cut when a run resumes and recomputed.

Storage never imports the loop: the filter and the run's start are duck-typed.

>>> import os, tempfile, torch
>>> from enkal.filtering import EnsembleFilter, run_filter
>>> class RandomWalk:
...     def propagate(self, states, t0, t1, *, parameters=None, generator=None):
...         return states.clone()
>>> flt = EnsembleFilter(RandomWalk(), noise_std=0.5, lag=1)
>>> state = flt.init(torch.randn(10, 2, dtype=torch.float64,
...                              generator=torch.Generator().manual_seed(0)))
>>> times, values = torch.arange(1.0, 4.0), torch.zeros(3, 2, dtype=torch.float64)
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = os.path.join(tmp, "filter.h5")
...     result = run_filter(flt, state, times, values, sinks=[FilterRecorder(path)])
...     with open_filter_history(path) as ds:
...         print(ds.analysis_mean.dims, ds.smoothed_mean.shape, ds.cycle.values.tolist())
...     print(torch.equal(read_filter_state(path, flt).states, result.state.states))
('time', 'state') (3, 2) [1, 2, 3]
True
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import h5netcdf
import h5py
import numpy as np
import torch

from .._checks import check_bool, check_positive_int
from ..errors import StorageError
from .filter_h5 import (
    FILTER_FORMAT,
    FILTER_FORMAT_VERSION,
    Layout,
    checkpoint_arrays,
    checkpoint_bytes,
    config_differences,
    create_structure,
    filter_config,
    layout_of,
    read_checkpoint_group,
    read_layout,
    row_bytes,
    truth_variable,
    write_checkpoint_group,
    write_row,
)
from .h5 import (
    _as_path,
    _atomic_replace,
    _read_errors,
    _repair_end_of_address,
    _temp_path,
    _unlimited,
    open_read,
)
from .journal import (
    check_space,
    deferred_interrupts,
    full_error,
    is_full,
    journal_path,
    transaction,
    writer_lock,
)
from .recorder import remove_stale_temporaries
from .schema import _attr_str, _attr_value, _loads, _now, _to_json, _versions

__all__ = ["FilterRecorder", "read_filter_state", "open_filter_history", "FILTER_FORMAT",
           "FILTER_FORMAT_VERSION", "filter_config"]


def _check_filter_format(attrs: Any, path: Path) -> None:
    fmt = attrs.get("enkal_format")
    fmt = _attr_str(fmt) if fmt is not None else None
    if fmt != FILTER_FORMAT:
        raise StorageError(f"{path}: not an {FILTER_FORMAT} file (enkal_format={fmt!r})")
    try:
        version = int(np.asarray(attrs.get("enkal_format_version")).item())
    except (TypeError, ValueError):
        raise StorageError(f"{path}: missing or malformed enkal_format_version") from None
    if version > FILTER_FORMAT_VERSION:
        raise StorageError(f"{path}: filter history version {version} is newer than this "
                           f"enkal understands ({FILTER_FORMAT_VERSION}); upgrade enkal")


def _file_config(f: h5py.File, path: Path) -> Any:
    if "config" not in f.attrs:
        raise StorageError(f"{path}: no config attribute")
    return _loads(_attr_str(f.attrs["config"]), "config", path)


def _check_config(config: Any, path: Path, flt: Any) -> None:
    """``ValueError`` naming every item of the filter's configuration that differs from the
    file's ``config``."""
    differ = config_differences(config, filter_config(flt))
    if differ:
        raise ValueError(f"{path}: written by a filter of another configuration ("
                         + "; ".join(differ) + "); resume it with the filter that wrote it, "
                         "or start a new file")


def read_filter_state(path: Any, flt: Any, *, device: torch.device | str | None = None
                      ) -> Any:
    """The :class:`~enkal.filtering.FilterState` checkpointed in a filter history.

    ``enkal.filtering.run_filter(flt, state, times, values)`` continues the series from it
    (at ``state.cycle``) and repeats the uninterrupted run bit for bit (same device and
    software).

    Parameters
    ----------
    path : str or os.PathLike
        A filter history (:class:`FilterRecorder`, ``enkal.run_filter(..., out=path)``).
    flt : EnsembleFilter
        The filter that wrote it: its configuration (scheme, inflation, rotation, lag,
        noise, observation operator, failure policy, seed, fixed parameters, model type,
        layout) must be the file's.
    device : torch.device or str, optional
        Where the tensors go (default: a device of the kind the file was written on; a
        generator state restores only on its own kind of device).

    Raises
    ------
    FileNotFoundError
    StorageError
        Not a filter history, or a damaged one (shapes, dtypes, checksum).
    ValueError
        ``flt``'s configuration differs from the file's (the message names each item), or
        ``device`` is of another kind.
    """
    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such filter history")
    with _read_errors(path, "an enkal filter history"), open_read(path) as f:
        _check_filter_format(f.attrs, path)
        config = _file_config(f, path)
        lay = read_layout(f, path)
        d = read_checkpoint_group(f, path, lay)
    _check_config(config, path, flt)
    target = torch.device(device) if device is not None else torch.device(lay.device_type)
    if target.type != lay.device_type:
        raise ValueError(f"{path}: written from a {lay.device_type} run; its generator state "
                         f"restores on a {lay.device_type} device only, not {target.type}")
    d["states"] = d["states"].to(target)
    d["window"] = [w.to(target) for w in d["window"]]
    if d["parameters"] is not None:
        d["parameters"] = d["parameters"].to(target)
    try:
        return flt.load_state_dict(d)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: the checkpoint does not fit this filter: {err}") from None


def open_filter_history(path: Any, **kwargs: Any) -> Any:
    """Open a filter history as an ``xarray.Dataset`` (lazily), after checking it is one.

    A change a killed writer left half done is undone first; rows that a torn write of
    variables left of different lengths are left out (with a ``RuntimeWarning``).
    ``kwargs`` go to ``xarray.open_dataset`` (engine ``h5netcdf``).
    """
    import xarray as xr

    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such filter history")
    with _read_errors(path, "an enkal filter history"):
        with open_read(path) as f:
            _check_filter_format(f.attrs, path)
            lengths = [f[name].shape[0] for name in _unlimited(f)]
        ds = xr.open_dataset(path, engine="h5netcdf", **kwargs)
    if lengths and min(lengths) < max(lengths):
        busy = journal_path(path).exists()
        warnings.warn(f"{path}: " + ("a row is being written; it is left out here" if busy
                                     else "the last row is incomplete (a torn write); it is "
                                     "left out here"), RuntimeWarning, stacklevel=2)
        ds = ds.isel(time=slice(0, min(lengths)))
    return ds


class FilterRecorder:
    """Record a filter run to a filter history file, resumably (a ``FilterSink``).

    ``start`` creates the file (atomically, replacing one at ``path``) with the starting
    state as its checkpoint, or -- with ``resume=True`` and an existing file -- checks that
    the file records this filter and that the run starts at its checkpoint, and cuts the
    rows written after that checkpoint. ``record`` appends each cycle's row and, every
    ``checkpoint_every`` cycles, the checkpoint, in one journaled change. ``close`` writes
    the last state's checkpoint if it is not yet written and marks the file ``complete``
    (1 after a run that ended normally, 0 after an error).

    Parameters
    ----------
    path : str or os.PathLike
    ensembles : bool
        Also store the analysis ensemble of every cycle (``analysis_ensemble``,
        ``(time, member, state)``; ``N_ens`` times the bytes of the means).
    checkpoint_every : int
        Cycles between checkpoints (the state's bytes, times ``1 + lag``, rewritten each
        time; the journal keeps their old bytes until the change is whole). A resume
        recomputes the cycles since the last one.
    fsync : bool
        ``fsync`` after every change (survives power loss, not only a killed process).
    resume : bool
        Continue an existing file (else a new file replaces it).
    attrs : dict, optional
        Extra global attributes (numbers, strings, JSON-able values).
    truth : Tensor, shape (K, [B,] N_x), optional
        A twin experiment's true states at the series' times: stored as ``truth`` along
        ``time`` (what ``enkal info`` scores the means against).
    """

    def __init__(self, path: Any, *, ensembles: bool = False, checkpoint_every: int = 1,
                 fsync: bool = False, resume: bool = False,
                 attrs: dict[str, Any] | None = None, truth: Any = None) -> None:
        self.path = _as_path(path)
        check_bool(ensembles, "ensembles")
        check_positive_int(checkpoint_every, "checkpoint_every")
        check_bool(fsync, "fsync")
        check_bool(resume, "resume")
        if attrs is not None:
            from .recorder import check_attributes
            check_attributes(attrs)
        self.ensembles, self.checkpoint_every = ensembles, checkpoint_every
        self.fsync, self.resume, self.attrs = fsync, resume, dict(attrs or {})
        self.truth = None if truth is None else \
            torch.as_tensor(truth, dtype=torch.float64).detach().cpu().numpy()
        self._flt: Any = None
        self._layout: Layout | None = None
        self._values: np.ndarray | None = None
        self._rows: dict[float, int] = {}  # time -> row (where a smoothed estimate goes)
        self._n_rows = 0
        self._cycle = -1  # the cycle of the last row
        self._unlimited: list[str] = []
        self._pending: Any = None  # a recorded state not yet checkpointed
        self._lock: Any = None
        self._started = self._closed = False

    def __repr__(self) -> str:
        return f"FilterRecorder({str(self.path)!r}, rows={self._n_rows})"

    # -- the FilterSink protocol -----------------------------------------------------------
    def start(self, start: Any) -> None:
        """Create or continue the file for the run ``start`` (a
        :class:`~enkal.filtering.FilterStart`: ``filter``, ``state``, ``times``,
        ``values``)."""
        if self._started:
            raise ValueError("FilterRecorder: start() called twice; it records one run")
        self._lock = writer_lock(self.path)
        try:
            remove_stale_temporaries(self.path)
            flt, state = start.filter, start.state
            values = torch.as_tensor(start.values, dtype=torch.float64)
            self._values = values.detach().cpu().numpy()
            self._flt = flt
            lay = layout_of(flt, state, values, ensembles=self.ensembles)
            if self.resume and self.path.exists():
                self._continue(lay, state, start.times)
            else:
                self._create(lay, state)
            self._layout, self._cycle = lay, int(state.cycle)
        except BaseException:
            self._release()
            raise
        self._started = True

    def record(self, state: Any, info: Any) -> None:
        """Append the row of the cycle ``info`` (and the checkpoint of ``state`` when due)."""
        if not self._started or self._closed:
            raise ValueError("FilterRecorder: record() outside start() ... close()")
        assert self._layout is not None and self._values is not None
        cycle = int(info.cycle)
        if cycle != self._cycle + 1:
            raise ValueError(f"info.cycle: expected cycle {self._cycle + 1} (after the last "
                             f"row's), got {cycle}")
        lay = self._layout
        obs = self._values[cycle - 1].reshape(lay.shape(lay.n_obs))
        due = cycle % self.checkpoint_every == 0
        arrays = checkpoint_arrays(self._flt, state, lay) if due else None
        smoothed = None if info.smoothed is None else \
            self._rows.get(float(info.smoothed[0]))
        what = f"the row of cycle {cycle}"
        check_space(self.path, row_bytes(lay) + (checkpoint_bytes(lay) if due else 0),
                    what=what)
        try:
            with deferred_interrupts(), transaction(self.path, fsync=self.fsync) as f:
                write_row(f, self._n_rows, info, obs, self._unlimited, state, smoothed)
                if self.truth is not None and "truth" in f:
                    f["truth"][self._n_rows] = self.truth[cycle - 1]
                if arrays is not None:
                    write_checkpoint_group(f, arrays)
        except Exception as err:
            if is_full(err):
                raise full_error(self.path, what, err) from err
            raise
        self._rows[float(info.time)] = self._n_rows
        self._n_rows += 1
        self._cycle = cycle
        self._pending = None if due else state

    def close(self, error: BaseException | None) -> None:
        """Checkpoint the last recorded state (if not yet) and mark the file ``complete``
        (``error``: what ended the run, or None). A failure here after a failed run does
        not hide that run's error."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            self._release()
            return
        try:
            arrays = None if self._pending is None or self._layout is None else \
                checkpoint_arrays(self._flt, self._pending, self._layout)
            with deferred_interrupts(), transaction(self.path, fsync=self.fsync) as f:
                if arrays is not None:
                    write_checkpoint_group(f, arrays)
                f.attrs["complete"] = np.int8(error is None)
                f.attrs["stopped_by"] = _ending(error)
            self._pending = None
        except Exception as err:
            if error is None:
                if is_full(err):
                    raise full_error(self.path, "the last checkpoint", err) from err
                raise
        finally:
            self._release()

    # -- internals -------------------------------------------------------------------------
    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _global_attrs(self, flt: Any, lay: Layout) -> dict[str, Any]:
        from .._version import __version__

        config = filter_config(flt)
        attrs: dict[str, Any] = {
            "Conventions": "CF-1.10",
            "title": "enkal ensemble filter history",
            "source": f"enkal {__version__}",
            "references": "the enkal documentation, docs/schema.md (Filter history)",
            "enkal_format": FILTER_FORMAT,
            "enkal_format_version": FILTER_FORMAT_VERSION,
            **_versions(),
            "created": _now(),
            "seed": config["seed"],
            "config": _to_json(config),
            "scheme": config["scheme"],
            "inflation": config["inflation"],
            "rotate": bool(config["rotate"]),
            "lag": config["lag"],
            "noise_std": np.asarray(config["noise_std"], dtype=np.float64),
            "n_members": lay.n_members,
            "complete": 0,
            **self.attrs,
        }
        return {k: _attr_value(v) for k, v in attrs.items()}

    def _create(self, lay: Layout, state: Any) -> None:
        flt = self._flt
        arrays = checkpoint_arrays(flt, state, lay)
        layout: Any = getattr(flt, "layout", None)
        names = list(layout.names) if lay.n_parameters is not None and \
            getattr(layout, "size", None) == lay.n_parameters else None
        observe = getattr(flt, "observe", None)
        check_space(self.path, checkpoint_bytes(lay), what="a new filter history", new=True)
        tmp = _temp_path(self.path)
        try:
            with h5netcdf.File(tmp, "w") as nc:
                create_structure(nc, lay, noise_std=filter_config(flt)["noise_std"],
                                 observed=observe if isinstance(observe, list) else None,
                                 parameter_names=names, attrs=self._global_attrs(flt, lay))
                if self.truth is not None:
                    truth_variable(nc, lay)
            with h5py.File(tmp, "r+", locking=False) as f:
                write_checkpoint_group(f, arrays)
                self._unlimited = _unlimited(f)
            _atomic_replace(tmp, self.path, fsync=True)
        except BaseException as err:
            if tmp.exists():
                tmp.unlink()
            if is_full(err):
                raise full_error(self.path, "a new filter history", err) from err
            raise
        self._rows, self._n_rows = {}, 0

    def _continue(self, lay: Layout, state: Any, times: Any) -> None:
        """Check that the file records this run up to its checkpoint, at ``state``; cut the
        rows after the checkpoint and the smoothed estimates they wrote."""
        _repair_end_of_address(self.path)  # (a kill inside HDF5's final flush, older files)
        try:
            with deferred_interrupts(), transaction(self.path, fsync=self.fsync) as f:
                _check_filter_format(f.attrs, self.path)
                _check_config(_file_config(f, self.path), self.path, self._flt)
                found = read_layout(f, self.path)
                _check_layout(found, lay, self.path)
                d = read_checkpoint_group(f, self.path, found)
                _check_start(d, state, self.path)
                self._cut(f, d["cycle"], lay, np.asarray(times, dtype=np.float64))
                f.attrs["complete"] = np.int8(0)
        except StorageError:
            raise
        except (OSError, KeyError, RuntimeError) as err:
            raise StorageError(f"{self.path}: cannot resume this filter history "
                               f"({type(err).__name__}: {err}); move it aside to start a "
                               "new one") from err

    def _cut(self, f: h5py.File, cycle: int, lay: Layout, times: np.ndarray) -> None:
        names = _unlimited(f)
        n = min(f[name].shape[0] for name in names)
        cycles = f["cycle"][:n]
        if n > 1 and np.any(np.diff(cycles) <= 0):
            raise StorageError(f"{self.path}: the cycle variable is not increasing")
        keep = int(np.searchsorted(cycles, cycle, side="right"))
        if keep and int(cycles[keep - 1]) != cycle:
            warnings.warn(f"{self.path}: the rows of cycles {int(cycles[keep - 1]) + 1} to "
                          f"{cycle} are missing (a torn write); the history continues after "
                          "a gap", RuntimeWarning, stacklevel=4)
        for name in names:
            if f[name].shape[0] != keep:
                f[name].resize(keep, axis=0)
        kept_times = f["time"][:keep]
        kept_cycles = cycles[:keep]
        self._check_series(f, kept_cycles, kept_times, times)
        if lay.lag and keep:  # their smoothed estimates came from cycles now cut
            stale = kept_cycles > cycle - lay.lag
            for name in ("smoothed_mean", "smoothed_spread"):
                for r in np.flatnonzero(stale):
                    f[name][int(r)] = np.nan
        self._unlimited = names
        self._rows = {float(t): i for i, t in enumerate(kept_times)}
        self._n_rows = keep

    def _check_series(self, f: h5py.File, cycles: np.ndarray, stored: np.ndarray,
                      times: np.ndarray) -> None:
        """The kept rows' times and observations are the series' at those cycles."""
        assert self._values is not None
        if not cycles.size:
            return
        idx = cycles.astype(np.int64) - 1
        if int(idx[-1]) >= times.size:
            raise ValueError(f"{self.path}: the file holds cycles up to {int(cycles[-1])}, "
                             f"the series has {times.size} times")
        if not np.array_equal(stored, times[idx]):
            raise ValueError(f"{self.path}: the file's times differ from this series' times "
                             "at the cycles it holds; resume with the series it recorded")
        obs = f["observations"][: cycles.size]
        if not np.array_equal(obs.reshape(cycles.size, -1),
                              self._values[idx].reshape(cycles.size, -1)):
            raise ValueError(f"{self.path}: the file's observations differ from this series' "
                             "values at the cycles it holds; resume with the series it "
                             "recorded")


def _check_layout(found: Layout, lay: Layout, path: Path) -> None:
    differ = [f"{name}: file {a}, this run {b}" for name, a, b in zip(
        Layout._fields, found, lay, strict=True) if a != b and name != "rng_size"]
    if differ:
        hint = " (pass ensembles=" + str(found.ensembles) + ")" \
            if found.ensembles != lay.ensembles else ""
        raise ValueError(f"{path}: the file records another shape of run ("
                         + "; ".join(differ) + f"){hint}")


def _check_start(d: dict[str, Any], state: Any, path: Path) -> None:
    same = d["cycle"] == int(state.cycle) and d["time"] == float(state.time) and \
        torch.equal(d["states"], state.states.detach().cpu())
    if not same:
        raise ValueError(f"{path}: the run starts at cycle {int(state.cycle)}, not from the "
                         f"file's checkpoint (cycle {d['cycle']}); start from "
                         "enkal.storage.read_filter_state(path, filter)")


def _ending(error: BaseException | None) -> str:
    if error is None:
        return "end of series"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    message = " ".join(str(error).split())
    return f"failed: {type(error).__name__}: {message}"[:300]

