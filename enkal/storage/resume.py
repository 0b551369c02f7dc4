"""Resuming: the smoother state held by a history's state rows, the file a run resumes from
(:func:`read_state`), and what a continued history keeps (:func:`read_policy`)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch

from .._checks import cpu_numpy
from .._types import encode_state
from ..errors import StorageError
from .checkpoint import _load_state, read_state_dict
from .h5 import _as_path, _check_declared_size, _dataset, _read_errors, _unlimited, repair
from .history import History
from .schema import (
    _CPU_RNG_STATE_SIZE,
    _STORED_MASK,
    _STORED_PARAMETERS,
    _STORED_STATE,
    CHECKPOINT_FORMAT,
    HISTORY_FORMAT,
    _attr_str,
    _attr_value,
    _check_format,
    _int_attr,
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
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such enkal history file")
    device = torch.device(device) if device is not None else torch.device("cpu")
    with _read_errors(path, "an enkal history file"), \
            h5py.File(path, "r", locking=False) as f:
        _check_format(f.attrs, path, HISTORY_FORMAT)
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
    it, x, g, schedule, mask, adapt = found
    return {
        "parameters": torch.from_numpy(x).to(dtype=v.torch_dtype, device=device),
        "iteration": it,
        "schedule": schedule,
        "rng_state": torch.from_numpy(g),
        "mask": None if mask is None else torch.from_numpy(mask.astype(bool)).to(device),
        "config": config,
        "adapt": adapt,
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
    for name, ds in (("schedule_state", sched), ("adapt_state", adapt)):
        if ds is not None and (ds.ndim != 1 or h5py.check_string_dtype(ds.dtype) is None):
            raise StorageError(f"{path}: variable {name!r} has dtype {ds.dtype}, expected "
                               "one JSON string per iteration")
    if masks is not None and (masks.ndim != 2 or masks.shape[1] != p or
                              masks.dtype != np.int8):
        raise StorageError(f"{path}: variable 'state_mask' has shape {masks.shape} and "
                           f"dtype {masks.dtype}, expected (iteration, {p}) int8")
    return _StateVariables(par, its, stored, rng, sched, checks, masks, adapt, device_type,
                           _parameters_dtype(f, par, path))


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
    mask = None
    if int(flags[r]) & _STORED_MASK:
        if v.mask is None:
            raise StorageError("stored bit 8 set but the file has no state_mask")
        mask = v.mask[r]
        if np.any((mask != 0) & (mask != 1)):
            raise StorageError("state_mask holds values other than 0/1")
    checksum = _state_checksum(x, g, text, mask, it, adapt_text or None)
    if checksum != int(v.checksum[r]):
        raise StorageError("checksum mismatch (a torn or corrupted row)")
    if not np.all(np.isfinite(x)):
        raise StorageError("parameters hold NaN/inf")
    schedule = _loads(text, "schedule_state", path)
    problem = _schedule_problem(schedule)
    if problem is not None:
        raise StorageError(f"schedule_state {problem}")
    adapt = None
    if adapt_text:
        adapt = _loads(adapt_text, "adapt_state", path)
        problem = _schedule_problem(adapt, "adaptation")
        if problem is not None:
            raise StorageError(f"adapt_state {problem}")
    return it, x, g, schedule, mask, adapt


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
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or history file")
    with _read_errors(path, "an enkal checkpoint or history file"), \
            h5py.File(path, "r", locking=False) as f:
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
    :func:`check_resume`, and passes ``False``).

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
            and (row["mask"] is None) == (here["mask"] is None)
            and (row["mask"] is None or torch.equal(row["mask"], here["mask"].cpu())))
    if not same:
        return state
    return _load_state(later, store, smoother, device, what="history state", warn=warn)


# -- what a resume compares ------------------------------------------------------------------
#: the items of ``EnsembleSmoother.config()`` a resume compares, in the order they are named
#: (``n_obs`` is compared as the observations themselves)
_CONFIG_ITEMS = ("rule", "schedule", "guard", "failure", "adapt", "seed", "chunk_size")
_SHORT = 48  # characters of a value in a message


@dataclass(frozen=True)
class Difference:
    """One item in which the run a file recorded and the run resuming it differ.

    ``recorded`` and ``current`` are short texts for a message. A ``fatal`` difference
    (another parameter layout, another number of observations) cannot be continued even
    when changes are allowed.
    """

    name: str
    recorded: str
    current: str
    fatal: bool = False


def run_differences(path: Any, smoother: Any, *, layout: Any = None,
                    ensemble_size: int | None = None,
                    attrs: Mapping[str, Any] | None = None) -> list[Difference]:
    """What differs between the run recorded in ``path`` and the run described by
    ``smoother`` (``config()``, ``observations``), ``layout``, ``ensemble_size`` and
    ``attrs`` (the extra global attributes the run would store).

    A history records everything compared: the observations (values), the noise
    (``noise_std``, and ``noise_chol`` when the noise is a full covariance), the ensemble
    size, the parameter layout (its ``layout`` attribute: names, shapes, constraints), the
    strategies and settings of ``config()`` (rule, schedule, guard, failure, adapt, seed,
    chunk_size) and the extra attributes (the CLI's ``problem_config``: the problem's own
    tables). A checkpoint records ``config()`` (with the number of observations), the
    ensemble size and the number of parameters. Items this run does not describe
    (``layout``, ``ensemble_size``, ``attrs`` left out) or the file does not record (a
    ``HistoryWriter`` given no ``config``) are not compared.

    Returns
    -------
    list of Difference
        Empty when the file's run is this one.

    Raises
    ------
    FileNotFoundError
    StorageError
        Not an enkal history or checkpoint, or an unreadable one.

    Examples
    --------
    >>> import os, tempfile, torch, enkal
    >>> from enkal.storage import HistoryWriter
    >>> obs = enkal.Observations([1.0, 2.0], noise_std=1.0)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "run.h5")
    ...     w = HistoryWriter(path, layout=enkal.ParameterLayout(["a"]), observations=obs)
    ...     w.append(0, torch.zeros(4, 1, dtype=torch.float64))
    ...     other = enkal.EnsembleSmoother(enkal.Observations([1.0, 2.0], noise_std=0.5))
    ...     run_differences(path, other, ensemble_size=8)
    [Difference(name='noise_std', recorded='[1 1]', current='[0.5 0.5]', fatal=False), \
Difference(name='ensemble_size', recorded='4', current='8', fatal=False)]
    """
    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or history file")
    with _read_errors(path, "an enkal checkpoint or history file"), \
            h5py.File(path, "r", locking=False) as f:
        fmt = _attr_str(f.attrs["enkal_format"]) if "enkal_format" in f.attrs else None
        if fmt == HISTORY_FORMAT:
            recorded = _recorded_history(f, path)
        elif fmt == CHECKPOINT_FORMAT:
            recorded = _recorded_checkpoint(f, path)
        else:
            raise StorageError(f"{path}: not an enkal history or checkpoint file "
                               f"(enkal_format={fmt!r})")
    diffs = _data_differences(recorded, smoother.observations)
    if ensemble_size is not None and recorded.ensemble_size != ensemble_size:
        diffs.append(Difference("ensemble_size", str(recorded.ensemble_size),
                                str(ensemble_size)))
    if layout is not None:
        diffs.extend(_layout_differences(recorded, layout))
    if recorded.config is not None:  # (a HistoryWriter given no config= records none)
        diffs.extend(_config_differences(recorded.config, smoother.config()))
    if recorded.attrs is not None:
        for key, value in (attrs or {}).items():
            diffs.extend(_attr_differences(key, recorded.attrs.get(key), value))
    return diffs


class _Recorded(NamedTuple):
    """What a file says of the run that wrote it (None: not recorded)."""

    config: dict | None
    ensemble_size: int
    n_parameters: int
    n_obs: int | None
    observations: np.ndarray | None
    noise_std: np.ndarray | None
    noise_chol: np.ndarray | None
    layout: Any
    attrs: dict | None


def _small_variable(f: h5py.File, name: str, path: Path, ndim: int) -> np.ndarray:
    ds = _dataset(f, name, path)
    if ds.ndim != ndim or ds.dtype.kind != "f":
        raise StorageError(f"{path}: variable {name!r} has shape {ds.shape} and dtype "
                           f"{ds.dtype}, expected {ndim}-d floats")
    _check_declared_size(ds, name, path)
    return np.asarray(ds[...], dtype=np.float64)


def _recorded_history(f: h5py.File, path: Path) -> _Recorded:
    _check_format(f.attrs, path, HISTORY_FORMAT)
    config = _loads(_attr_str(f.attrs["config"]), "config", path) \
        if "config" in f.attrs else None
    layout = _loads(_attr_str(f.attrs["layout"]), "layout", path) \
        if "layout" in f.attrs else None
    par = _dataset(f, "parameters", path)
    if par.ndim != 3:
        raise StorageError(f"{path}: variable 'parameters' has shape {par.shape}, expected "
                           "(iteration, member, parameter)")
    obs = _small_variable(f, "observations", path, 1)
    chol = _small_variable(f, "noise_chol", path, 2) if "noise_chol" in f else None
    attrs = {k: f.attrs[k] for k in f.attrs}
    return _Recorded(config if isinstance(config, dict) else None, int(par.shape[1]),
                     int(par.shape[2]), int(obs.size), obs,
                     _small_variable(f, "noise_std", path, 1), chol, layout, attrs)


def _recorded_checkpoint(f: h5py.File, path: Path) -> _Recorded:
    _check_format(f.attrs, path, CHECKPOINT_FORMAT)
    config = _loads(_attr_str(f.attrs["config"]), "config", path) \
        if "config" in f.attrs else None
    config = config if isinstance(config, dict) else None
    n_obs = None if config is None else config.get("n_obs")
    return _Recorded(config, _int_attr(f.attrs, "n_members", path),
                     _int_attr(f.attrs, "n_parameters", path),
                     n_obs if isinstance(n_obs, int) else None, None, None, None, None, None)


def _data_differences(recorded: _Recorded, observations: Any) -> list[Difference]:
    """The observations and their noise, recorded and current."""
    n_obs = observations.size
    if recorded.n_obs is not None and recorded.n_obs != n_obs:
        return [Difference("observations", f"{recorded.n_obs} values", f"{n_obs} values",
                           fatal=True)]
    if recorded.observations is None:
        return []
    diffs = []
    values = cpu_numpy(observations.values).astype(np.float64)
    if not np.array_equal(recorded.observations, values):
        diffs.append(_array_difference("observations", recorded.observations, values))
    std = cpu_numpy(observations.noise_std).astype(np.float64)
    if recorded.noise_std is not None and not np.array_equal(recorded.noise_std, std):
        diffs.append(_array_difference("noise_std", recorded.noise_std, std))
    chol = None if observations.is_diagonal else \
        cpu_numpy(observations.noise_chol).astype(np.float64)
    if (recorded.noise_chol is None) != (chol is None):
        diffs.append(Difference("noise", "diagonal" if recorded.noise_chol is None else
                                "a full covariance",
                                "diagonal" if chol is None else "a full covariance"))
    elif recorded.noise_chol is not None and chol is not None and \
            not np.array_equal(recorded.noise_chol, chol):
        diffs.append(_array_difference("noise_chol", recorded.noise_chol, chol))
    return diffs


def _layout_differences(recorded: _Recorded, layout: Any) -> list[Difference]:
    if recorded.layout is None:  # a checkpoint: the number of parameters only
        if recorded.n_parameters != layout.size:
            return [Difference("layout", f"{recorded.n_parameters} parameters",
                               f"{layout.size} parameters", fatal=True)]
        return []
    mine = json.loads(_to_json(layout.to_dict()))
    if recorded.layout == mine:
        return []
    theirs = recorded.layout if isinstance(recorded.layout, list) else []
    if len(theirs) != len(mine) or not all(isinstance(b, dict) for b in theirs):
        return [Difference("layout", _blocks(theirs), _blocks(mine), fatal=True)]
    k = next(i for i, (a, b) in enumerate(zip(theirs, mine, strict=True)) if a != b)
    return [Difference("layout", _block(theirs[k]), _block(mine[k]), fatal=True)]


def _block(b: Any) -> str:
    if not isinstance(b, dict):
        return _short(b)
    c = b.get("constraint", {})
    cname = c.get("type", "?") if isinstance(c, dict) else "?"
    bounds = f"({c.get('low')}, {c.get('high')})" if cname == "Bounded" else ""
    shape = tuple(b.get("shape", ()))
    return _short(f"{b.get('name')}{f' {shape}' if shape else ''} {cname}{bounds}")


def _blocks(blocks: list) -> str:
    names = [str(b.get("name")) if isinstance(b, dict) else "?" for b in blocks]
    return _short(f"{len(names)} blocks [{', '.join(names)}]")


def _config_differences(recorded: dict, config: dict) -> list[Difference]:
    mine = json.loads(_to_json(config))
    names = [*_CONFIG_ITEMS, *sorted((set(recorded) | set(mine)) - {*_CONFIG_ITEMS, "n_obs"})]
    return [Difference(k, *_strategy_pair(recorded.get(k), mine.get(k)))
            for k in names if recorded.get(k) != mine.get(k)]


def _strategy_pair(old: Any, new: Any) -> tuple[str, str]:
    """Short texts of two values; two strategies of one type show only the fields that
    differ (``FixedAnnealing(factor=0.9)`` and ``FixedAnnealing(factor=0.5)``)."""
    if isinstance(old, dict) and isinstance(new, dict) and "type" in old and \
            old.get("type") == new.get("type"):
        keys = [k for k in [*old, *(k for k in new if k not in old)]
                if k != "type" and old.get(k, _MISSING) != new.get(k, _MISSING)]
        old = {"type": old["type"], **{k: old.get(k) for k in keys}}
        new = {"type": new["type"], **{k: new.get(k) for k in keys}}
    return _short_value(old), _short_value(new)


def _attr_differences(key: str, recorded: Any, value: Any) -> list[Difference]:
    """An extra attribute as the file holds it and as this run would write it; a dict
    (a configuration) is compared key by key and its differing leaves named."""
    mine = _attr_value(value)
    if recorded is None:
        return [Difference(key, "none", _short_value(value))]
    if isinstance(mine, str):
        theirs = _attr_str(recorded)
        if theirs == mine:
            return []
        if isinstance(value, Mapping):
            try:
                old = json.loads(theirs)
            except ValueError:
                old = None
            if isinstance(old, dict):
                new = json.loads(mine)
                leaves = _leaf_differences(old, new, key)
                if leaves:
                    return leaves
        return [Difference(key, _short(theirs), _short(mine))]
    if np.array_equal(np.asarray(recorded), np.asarray(mine)):
        return []
    return [Difference(key, _short_value(recorded), _short_value(mine))]


_MISSING = object()


def _leaf_differences(old: Any, new: Any, where: str) -> list[Difference]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            out.extend(_leaf_differences(old.get(k, _MISSING), new.get(k, _MISSING),
                                         f"{where}.{k}"))
        return out
    if old == new:
        return []
    return [Difference(where, "none" if old is _MISSING else _short_value(old),
                       "none" if new is _MISSING else _short_value(new))]


def _array_difference(name: str, recorded: np.ndarray, current: np.ndarray) -> Difference:
    """Short texts of two arrays of one shape: their first entries, or around the first
    entry that differs when that is not among them."""
    a, b = recorded.reshape(-1), current.reshape(-1)
    k = int(np.flatnonzero(a != b)[0]) if a.shape == b.shape and np.any(a != b) else 0
    return Difference(name, _entries(a, k), _entries(b, k))


def _entries(a: np.ndarray, k: int) -> str:
    if a.size <= 3:
        return "[" + " ".join(f"{x:.6g}" for x in a) + "]"
    if k < 2:
        return "[" + " ".join(f"{x:.6g}" for x in a[:2]) + " ...]"
    return f"[... [{k}] {a[k]:.6g} ...]"


def _short_value(v: Any) -> str:
    """A strategy ``{"type": "ESMDA", "alphas": [...]}`` as ``ESMDA(alphas=[...])``, other
    values as Python writes them; at most ``_SHORT`` characters."""
    if isinstance(v, dict) and isinstance(v.get("type"), str):
        fields = ", ".join(f"{k}={x!r}" for k, x in v.items() if k != "type")
        return _short(f"{v['type']}({fields})")
    if isinstance(v, np.ndarray):
        return _entries(v.reshape(-1).astype(np.float64), 0) if v.dtype.kind in "iuf" \
            else _short(str(v))
    return _short(repr(v))


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _SHORT else text[:_SHORT - 3] + "..."


def _differences_message(label: str, diffs: list[Difference]) -> str:
    def joined(items: list[str]) -> str:
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

    return (f"{label} written with {joined([f'{d.name} {d.recorded}' for d in diffs])}; "
            f"this run has {joined([f'{d.name} {d.current}' for d in diffs])}")


def check_resume(path: Any, smoother: Any, *, layout: Any = None,
                 ensemble_size: int | None = None, attrs: Mapping[str, Any] | None = None,
                 store: Any = None, allow_changes: bool = False) -> list[Difference]:
    """Refuse to resume ``path`` for a run that is not the one it recorded, before anything
    is written (what ``enkal.run(..., resume=path)`` calls first).

    The run is compared with ``path`` and, when it continues another history (``store``,
    an existing file), with that one too (:func:`run_differences`); each item that differs
    is named once, with the file's value and this run's.

    Parameters
    ----------
    path : path
        The checkpoint or history resumed from.
    smoother, layout, ensemble_size, attrs
        This run, as :func:`run_differences` takes it.
    store : path, optional
        The history file the resumed run continues (``path`` itself for a history).
    allow_changes : bool
        Continue anyway: a ``RuntimeWarning`` names what differs. Another layout or
        number of observations is refused regardless.

    Returns
    -------
    list of Difference
        What differs (empty for a true resume).

    Raises
    ------
    ValueError
        One line naming each item that differs, with both values.
    """
    path = _as_path(path)
    files = [path]
    if store is not None and _as_path(store).exists() and \
            _as_path(store).resolve() != path.resolve():
        files.insert(0, _as_path(store))  # first: a history records more than a checkpoint
    return _refuse_differences(path, files, smoother, allow_changes=allow_changes,
                               layout=layout, ensemble_size=ensemble_size, attrs=attrs)


def _refuse_differences(path: Path, files: list[Path], smoother: Any, *,
                        allow_changes: bool, **run: Any) -> list[Difference]:
    """The differences of ``files`` from this run, each named once; a ``ValueError`` (or,
    with ``allow_changes`` and none of them fatal, a ``RuntimeWarning``) naming them."""
    diffs: list[Difference] = []
    where: list[Path] = []
    for file in files:
        for d in run_differences(file, smoother, **run):
            if all(d.name != seen.name for seen in diffs):
                diffs.append(d)
                if file not in where:
                    where.append(file)
    if not diffs:
        return diffs
    label = f"resume {path}: " + ("the file was" if where == [path] else
                                  " and ".join(str(p) for p in where) +
                                  (" was" if len(where) == 1 else " were"))
    message = _differences_message(label, diffs)
    if any(d.fatal for d in diffs):
        raise ValueError(f"{message}; a run of another parameter layout or number of "
                         "observations cannot continue it")
    if not allow_changes:
        raise ValueError(f"{message} (pass allow_changes=True / --allow-changes to "
                         "continue anyway)")
    warnings.warn(f"{message}; continuing as allowed, from the file's state and ensemble",
                  RuntimeWarning, stacklevel=3)
    return diffs


def _rows(its: np.ndarray) -> str:
    """``rows 6-12`` (consecutive iterations), ``row 6`` or ``rows 3, 5, 9``."""
    rows = [int(i) for i in its]
    if len(rows) == 1:
        return f"row {rows[0]}"
    if rows == list(range(rows[0], rows[-1] + 1)):
        return f"rows {rows[0]}-{rows[-1]}"
    return "rows " + ", ".join(str(i) for i in rows[:6]) + (" ..." if len(rows) > 6 else "")


def _iterations(path: Any) -> np.ndarray:
    """The ``iteration`` of each row of a history file (its complete rows)."""
    path = _as_path(path)
    with _read_errors(path, "an enkal history file"), \
            h5py.File(path, "r", locking=False) as f:
        _check_format(f.attrs, path, HISTORY_FORMAT)
        n = min(f[name].shape[0] for name in _unlimited(f))
        return np.asarray(_dataset(f, "iteration", path)[:n], dtype=np.int64)


def dropped_rows(store: Any, iteration: int) -> np.ndarray:
    """The iterations of the rows a history continued from ``iteration`` drops (those
    after it), e.g. to announce them before the writer cuts them."""
    its = _iterations(store)
    return its[its > iteration]


def check_dropped_rows(path: Any, store: Any, iteration: int, *,
                       max_iteration: int | None = None,
                       allow_changes: bool = False) -> np.ndarray:
    """Say which rows of the history ``store`` a run resumed from ``path`` at ``iteration``
    drops (those after it), before they are dropped; return their iterations.

    Rows up to ``max_iteration`` are recomputed by the run (bit for bit): a
    ``RuntimeWarning`` names them. Rows beyond it would be lost for good: a ``ValueError``,
    or with ``allow_changes`` a ``RuntimeWarning``, names them.
    """
    path, store = _as_path(path), _as_path(store)
    if not store.exists():
        return np.zeros(0, dtype=np.int64)
    dropped = dropped_rows(store, iteration)
    lost = dropped[dropped > max_iteration] if max_iteration is not None else dropped[:0]
    again = dropped[: dropped.size - lost.size]
    if lost.size:
        message = (f"resume {path}: {store} holds {_rows(lost)}, beyond max_iterations "
                   f"{max_iteration}; continuing from iteration {iteration} drops them for "
                   "good")
        if not allow_changes:
            raise ValueError(f"{message} (raise max_iterations, or pass allow_changes=True "
                             "/ --allow-changes to drop them)")
        warnings.warn(f"{message}, as allowed", RuntimeWarning, stacklevel=2)
    if again.size:
        which = "" if store.resolve() == path.resolve() else f" {store}"
        warnings.warn(f"resume {path}: continues{which} from iteration {iteration}, dropping "
                      f"and recomputing {_rows(again)}", RuntimeWarning, stacklevel=2)
    return dropped
