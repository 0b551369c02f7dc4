"""Resuming: the smoother state held by a history's state rows, the file a run resumes from
(:func:`read_state`), and what a continued history keeps (:func:`read_policy`)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch

from .._types import encode_state
from ..errors import StorageError
from .checkpoint import _load_state, read_state_dict
from .h5 import _as_path, _dataset, _read_errors, _unlimited, open_read, read_enkal, repair
from .history import History
from .schema import (
    _CPU_RNG_STATE_SIZE,
    _STORED_MASK,
    _STORED_PARAMETERS,
    _STORED_STATE,
    HISTORY_FORMAT,
    _attr_str,
    _check_format,
    _loads,
    _schedule_problem,
    _state_checksum,
    _storage_dtype,
    _to_json,
)
from .views import _check_history_file

_MAX_STATE_ROWS_TRIED = 16  # a torn or corrupt row falls back to an earlier one, this far


def read_history_state(path: Any, *, device: torch.device | str | None = None,
                       iteration: int | None = None,
                       max_iteration: int | None = None) -> dict[str, Any]:
    """Read the smoother state held by a history file's last complete state row.

    A row holds the whole state (``stored`` bit 4) when the run's :class:`History` kept its
    ensemble: ``parameters``, ``rng_state``, ``schedule_state``, ``state_mask``,
    ``adapt_state`` and the ``state_checksum`` over all of them. Everything is validated before it is trusted (the
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
        ``schedule``, ``rng_state``, ``mask``, ``config``, ``adapt``, ``device_type``,
        ``attrs``.

    Raises
    ------
    FileNotFoundError
    StorageError
        Not an enkal history, no state variables (a file of an older enkal, or written
        without generator states), or no usable state row; the message names the file.
    """
    path = _as_path(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with read_enkal(path, fmt=HISTORY_FORMAT, missing="enkal history file",
                    what="an enkal history file") as f:
        _check_history_file(f, path)
        v = _state_variables(f, path)
        config = _loads(_attr_str(f.attrs["config"]), "config", path) \
            if "config" in f.attrs else None
        n = min(f[name].shape[0] for name in _unlimited(f))
        its = v.iteration[:n]
        flags = v.stored[:n]
        want = _STORED_PARAMETERS | _STORED_STATE
        rows = [r for r in range(n - 1, -1, -1) if int(flags[r]) & want == want and
                (iteration is None or int(its[r]) == iteration) and
                (max_iteration is None or int(its[r]) <= max_iteration)]
        found, skipped = _first_usable_row(v, rows, its, flags, path)
        if found is None:
            where = f"iteration {iteration}" if iteration is not None else "any row"
            reason = f" ({'; '.join(skipped)})" if skipped else ""
            raise StorageError(f"{path}: no complete smoother state at {where}{reason}")
        attrs = {k: (_attr_str(a) if isinstance(a, (bytes, str)) else a)
                 for k, a in f.attrs.items()}
    if skipped:
        warnings.warn(f"{path}: skipped unusable state rows ({'; '.join(skipped)}); resuming "
                      f"from iteration {found[0]}", RuntimeWarning, stacklevel=2)
    it, x, g, schedule, mask, adapt, accelerator = found
    return {
        "parameters": torch.from_numpy(x).to(dtype=v.torch_dtype, device=device),
        "iteration": it,
        "schedule": schedule,
        "rng_state": torch.from_numpy(g),
        "mask": None if mask is None else torch.from_numpy(mask.astype(bool)).to(device),
        "config": config,
        "adapt": adapt,
        "accelerator": accelerator,
        "device_type": v.device_type,
        "attrs": attrs,
    }


class _StateVariables(NamedTuple):
    """The variables of a history's state rows, checked, and what they declare."""

    parameters: h5py.Dataset
    iteration: h5py.Dataset
    stored: h5py.Dataset
    rng: h5py.Dataset
    schedule: h5py.Dataset
    checksum: h5py.Dataset
    mask: h5py.Dataset | None
    adapt: h5py.Dataset | None
    accelerator: h5py.Dataset | None
    device_type: str  # of the generator states
    torch_dtype: torch.dtype  # of the ensemble


def _rng_device_type(rng: h5py.Dataset, path: Path) -> str:
    """The device type the generator states were taken on, checked against their size."""
    device_type = _attr_str(rng.attrs.get("device_type", ""))
    if device_type not in ("cpu", "cuda", "mps", "xpu"):
        raise StorageError(f"{path}: rng_state has an unknown device_type "
                           f"{device_type!r}")
    if device_type == "cpu" and rng.shape[1] != _CPU_RNG_STATE_SIZE:
        raise StorageError(f"{path}: rng_state rows of {rng.shape[1]} bytes are not CPU "
                           f"generator states ({_CPU_RNG_STATE_SIZE})")
    return device_type


def _state_variables(f: h5py.File, path: Path) -> _StateVariables:
    """The state variables of ``f`` after checking their dims, dtypes and declared sizes."""
    if f.get("rng_state", getlink=True) is None:
        raise StorageError(f"{path}: holds no smoother state (no 'rng_state' variable: "
                           "written by HistoryWriter.append without generator states, "
                           "or by an older enkal); resume from its checkpoint file")
    par = _dataset(f, "parameters", path)
    its = _dataset(f, "iteration", path)
    stored = _dataset(f, "stored", path)
    rng = _dataset(f, "rng_state", path)
    sched = _dataset(f, "schedule_state", path)
    checks = _dataset(f, "state_checksum", path)
    masks = _dataset(f, "state_mask", path) if "state_mask" in f else None
    adapt = _dataset(f, "adapt_state", path) if "adapt_state" in f else None
    acc = _dataset(f, "accelerator_state", path) if "accelerator_state" in f else None
    if par.ndim != 3 or par.dtype.kind != "f":
        raise StorageError(f"{path}: variable 'parameters' has shape {par.shape} and "
                           f"dtype {par.dtype}, expected (iteration, member, parameter) "
                           "floats")
    p = int(par.shape[2])
    for name, ds, kind in (("iteration", its, "iu"), ("stored", stored, "iu"),
                           ("state_checksum", checks, "u")):
        if ds.ndim != 1 or ds.dtype.kind not in kind:
            raise StorageError(f"{path}: variable {name!r} has shape {ds.shape} and dtype "
                               f"{ds.dtype}, expected one integer per iteration")
    if rng.ndim != 2 or rng.dtype != np.uint8 or not 0 < rng.shape[1] <= 1 << 20:
        raise StorageError(f"{path}: variable 'rng_state' has shape {rng.shape} and dtype "
                           f"{rng.dtype}, expected (iteration, rng_byte) uint8")
    device_type = _rng_device_type(rng, path)
    for name, ds in (("schedule_state", sched), ("adapt_state", adapt),
                     ("accelerator_state", acc)):
        if ds is not None and (ds.ndim != 1 or h5py.check_string_dtype(ds.dtype) is None):
            raise StorageError(f"{path}: variable {name!r} has dtype {ds.dtype}, expected "
                               "one JSON string per iteration")
    if masks is not None and (masks.ndim != 2 or masks.shape[1] != p or
                              masks.dtype != np.int8):
        raise StorageError(f"{path}: variable 'state_mask' has shape {masks.shape} and "
                           f"dtype {masks.dtype}, expected (iteration, {p}) int8")
    return _StateVariables(par, its, stored, rng, sched, checks, masks, adapt, acc,
                           device_type, _parameters_dtype(f, par, path))


def _parameters_dtype(f: h5py.File, par: h5py.Dataset, path: Path) -> torch.dtype:
    """The torch dtype of the ensemble (``parameters_dtype``), checked against the stored
    dtype; a row must fit in what the file holds for ``parameters``."""
    name = _attr_str(f.attrs.get("parameters_dtype", str(par.dtype)))
    torch_dtype = getattr(torch, name, None) if name.isidentifier() and \
        not name.startswith("_") else None
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point or \
            _storage_dtype(torch_dtype) != par.dtype:
        raise StorageError(f"{path}: parameters_dtype {name!r} does not describe the "
                           f"stored {par.dtype} parameters")
    row_bytes = int(par.shape[1]) * int(par.shape[2]) * par.dtype.itemsize
    if par.compression is None and row_bytes > int(par.id.get_storage_size()) or \
            row_bytes > 1 << 36:
        raise StorageError(f"{path}: a parameters row declares {row_bytes} bytes, more "
                           "than the file holds for them")
    return torch_dtype


def _first_usable_row(v: _StateVariables, rows: list[int], its: np.ndarray,
                      flags: np.ndarray, path: Path) -> tuple[tuple | None, list[str]]:
    """The first of ``rows`` (newest first) whose state passes :func:`_state_row`, at most
    ``_MAX_STATE_ROWS_TRIED`` tried, and why the ones before it were skipped."""
    skipped: list[str] = []
    for r in rows[:_MAX_STATE_ROWS_TRIED]:
        try:
            return _state_row(v, r, its, flags, path), skipped
        except (StorageError, OSError, ValueError, UnicodeDecodeError) as err:
            skipped.append(f"row {r} (iteration {int(its[r])}): "
                           f"{str(err).removeprefix(f'{path}: ')}")
    return None, skipped


def _state_row(v: _StateVariables, r: int, its: np.ndarray, flags: np.ndarray,
               path: Path) -> tuple:
    """Read and check state row ``r``; raise (StorageError, OSError, ...) if unusable."""
    it = int(its[r])
    if it < 0 or (r > 0 and it <= int(its[r - 1])):
        raise StorageError("iteration out of order")
    x = v.parameters[r]
    g = v.rng[r]
    text = _text(v.schedule[r])
    adapt_text = _text(v.adapt[r]) if v.adapt is not None else ""
    acc_text = _text(v.accelerator[r]) if v.accelerator is not None else ""
    mask = None
    if int(flags[r]) & _STORED_MASK:
        if v.mask is None:
            raise StorageError("stored bit 8 set but the file has no state_mask")
        mask = v.mask[r]
        if np.any((mask != 0) & (mask != 1)):
            raise StorageError("state_mask holds values other than 0/1")
    checksum = _state_checksum(x, g, text, mask, it, adapt_text or None, acc_text or None)
    if checksum != int(v.checksum[r]):
        raise StorageError("checksum mismatch (a torn or corrupted row)")
    if not np.all(np.isfinite(x)):
        raise StorageError("parameters hold NaN/inf")
    states = [_component(raw, name, kind, path) for name, kind, raw in (
        ("schedule_state", "schedule", text), ("adapt_state", "adaptation", adapt_text),
        ("accelerator_state", "accelerator", acc_text))]
    if states[0] is None:
        raise StorageError("schedule_state is empty in a state row")
    return it, x, g, states[0], mask, states[1], states[2]


def _component(raw: str, name: str, kind: str, path: Path) -> Any:
    """The encoded component state in ``raw`` (``None`` if empty), checked."""
    if not raw:
        return None
    value = _loads(raw, name, path)
    problem = _schedule_problem(value, kind)
    if problem is not None:
        raise StorageError(f"{name} {problem}")
    return value


def _text(raw: Any) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)


def read_policy(path: Any) -> History:
    """The :class:`History` policy a history file was written with (its
    ``history_policy`` attribute; the default policy when it has none), for a run that
    continues the file.

    Raises
    ------
    StorageError
        Not an enkal history, or a ``history_policy`` that is not a :class:`History`.
    """
    path = _as_path(path)
    with _read_errors(path, "an enkal history file"), \
            open_read(path) as f:
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


def format_of(path: Any) -> str | None:
    """The ``enkal_format`` of an existing file: ``HISTORY_FORMAT``, ``CHECKPOINT_FORMAT``,
    another string, or ``None`` when it has none.

    Raises
    ------
    FileNotFoundError
    StorageError
        Not an HDF5 file (or a damaged one).
    """
    path = _as_path(path)
    with read_enkal(path, fmt=None, missing="checkpoint or history file",
                    what="an enkal checkpoint or history file") as f:
        fmt = f.attrs.get("enkal_format")
        return _attr_str(fmt) if fmt is not None else None


def read_state(path: Any, smoother: Any, *, device: torch.device | str | None = None,
               store: Any = None, max_iteration: int | None = None,
               warn: bool = True) -> Any:
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

    ``warn``: a ``RuntimeWarning`` when the file's configuration is not
    ``smoother.config()`` (``enkal.run`` compares the whole run first, with
    :func:`enkal.storage.check_resume`, and passes ``False``).

    Raises
    ------
    FileNotFoundError, StorageError, ValueError
        As :func:`read_checkpoint`.
    """
    path = _as_path(path)
    if format_of(path) == HISTORY_FORMAT:
        if store is not None and _as_path(store).exists() and \
                _as_path(store).resolve() == path.resolve():
            repair(path)  # the run continues this file (its writer repairs it anyway)
        d = read_history_state(path, max_iteration=max_iteration)
        return _load_state(d, path, smoother, device, what="history state", warn=warn)
    d = read_state_dict(path)
    ckpt_config = d["config"]
    state = _load_state(d, path, smoother, device, what="checkpoint", warn=warn)
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
            and row["adapt"] == json.loads(_to_json(encode_state(here.get("adapt"))))
            and row.get("accelerator") == json.loads(
                _to_json(encode_state(here.get("accelerator"))))
            and (row["mask"] is None) == (here["mask"] is None)
            and (row["mask"] is None or torch.equal(row["mask"], here["mask"].cpu())))
    if not same:
        return state
    return _load_state(later, store, smoother, device, what="history state", warn=warn)
