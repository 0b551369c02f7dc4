"""Whole results and xarray views: :func:`save`, :func:`to_xarray`, :func:`open_dataset`,
:func:`physical`, :func:`read_layout`, and the checks a history file passes before xarray
reads it."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .._types import SmootherResult
from ..ensemble import ParameterLayout
from ..errors import StorageError
from .h5 import (
    _as_path,
    _atomic_replace,
    _check_declared_size,
    _read_errors,
    _temp_path,
    _unlimited,
    open_read,
)
from .history import History, HistoryWriter
from .journal import journal_path
from .schema import HISTORY_FORMAT, _attr_str, _check_format, _loads


# -- whole results ---------------------------------------------------------------------------
def _check_result(result: Any) -> None:
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
                          rng_state=state.rng_state, schedule=state.schedule,
                          adapt=state.adapt, accelerator=state.accelerator)
        else:
            writer.append(it, None, info)
    if k not in its:
        writer.append(k, x, None, predictions=pred, mask=state.mask, final=True,
                      rng_state=state.rng_state, schedule=state.schedule, adapt=state.adapt,
                      accelerator=state.accelerator)
    if getattr(result, "predictive", None) is not None:
        writer.append_predictive(k, result.predictive)


def _result_writer(target: Any, result: Any, compression: str | None) -> HistoryWriter:
    smoother = result.smoother
    return HistoryWriter(
        target, layout=result.layout, observations=smoother.observations,
        config=smoother.config(), seed=smoother.seed,
        history=History(every=None, final=True, predictions=result.predictions is not None,
                        predictive=getattr(result, "predictive", None) is not None,
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
        with open_read(path) as f:
            _check_format(f.attrs, path, HISTORY_FORMAT)
            _check_history_file(f, path)
            lengths = [f[name].shape[0] for name in _unlimited(f)]
        ds = xr.open_dataset(path, engine="h5netcdf", **kwargs)
    if lengths and min(lengths) < max(lengths):
        # an append was killed half-way through its metadata: h5netcdf pads the shorter
        # variables; the complete rows are the common ones
        if journal_path(path).exists():  # a writer is in the middle of a row right now
            warnings.warn(f"{path}: a row is being written (another process is appending); "
                          "it is left out here", RuntimeWarning, stacklevel=2)
        else:
            warnings.warn(f"{path}: the last row is incomplete (a killed append); it is left "
                          "out here, and enkal.storage.repair(path) removes it from the file",
                          RuntimeWarning, stacklevel=2)
        ds = ds.isel(iteration=slice(0, min(lengths)))
    try:
        with _read_errors(path, "an enkal history file"):  # an error names the file
            _validate_dataset(ds, path)
    except BaseException:
        ds.close()
        raise
    return ds


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


def _validate_dataset(ds: Any, path: Path) -> None:
    dims = {"parameters": ("iteration", "member", "parameter"),
            "predictions": ("iteration", "member", "output"),
            "parameters_physical": ("iteration", "member", "parameter"),
            "observations": ("output",), "noise_std": ("output",), "mask": ("parameter",),
            "stored": ("iteration",)}
    for name, want in dims.items():
        if name not in ds.variables:
            if name in ("predictions", "parameters_physical"):  # (optional)
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


@contextlib.contextmanager
def history_of(source: Any) -> Iterator[tuple[Any, str]]:
    """The history Dataset of ``source`` -- a :class:`~enkal.SmootherResult`
    (:func:`to_xarray`), the path of a history file (:func:`open_dataset`) or such a Dataset
    -- and a label for messages and titles; a Dataset opened here is closed after."""
    if isinstance(source, SmootherResult):
        ds, label, close = to_xarray(source), "SmootherResult", True
    elif isinstance(source, (str, os.PathLike)):
        ds, label, close = open_dataset(source), os.path.basename(os.fspath(source)), True
    elif type(source).__name__ == "Dataset" and hasattr(source, "data_vars"):
        ds, label, close = source, str(source.attrs.get("name", "enkal run")), False
    else:
        raise TypeError("source: expected an enkal.SmootherResult, the path of an enkal "
                        "history file or its xarray.Dataset (enkal.open(path)), got "
                        f"{type(source).__name__}")
    try:
        yield ds, label
    finally:
        if close:
            ds.close()


def stored_rows(ds: Any, bit: int) -> np.ndarray:
    """Row positions whose ``stored`` flags have ``bit`` (1: parameters, 2: predictions)."""
    if "stored" not in ds.variables:
        raise ValueError("source: the Dataset has no 'stored' variable; expected an enkal "
                         "history (enkal.open(path))")
    return np.flatnonzero(np.asarray(ds["stored"].values).astype(np.int64) & bit)


def physical(ds: Any) -> Any:
    """``ds.parameters`` in physical units: the stored ``parameters_physical`` when the file
    has it (history files whose layout has a constraint, written since the file
    gained the variable), else
    ``ParameterLayout.to_physical`` of ``parameters``.

    Loads the selected rows: select first (``physical(ds.isel(iteration=[-1]))``).

    Returns
    -------
    xarray.DataArray
        Same dims and coordinates as ``ds.parameters``, named ``physical``.
    """
    if "parameters_physical" in ds.variables:
        return ds["parameters_physical"].load().copy().rename("physical")
    layout = read_layout(ds)
    da = ds["parameters"]
    x = torch.from_numpy(np.ascontiguousarray(da.values))
    flat = x.reshape(-1, x.shape[-1])
    phys = layout.to_physical(flat).reshape(x.shape)
    out = da.copy(data=phys.numpy())
    out.attrs = {**da.attrs, "space": "physical"}
    return out.rename("physical")
