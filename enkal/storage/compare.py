"""What a resume compares: the run a history or checkpoint file recorded against the run
that resumes it (:func:`run_differences`, :func:`check_resume`), and the rows a resumed
history drops (:func:`check_dropped_rows`). ``enkal.run(..., resume=)`` calls both before
anything is written."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from .._checks import cpu_numpy
from ..errors import StorageError
from .h5 import (
    _as_path,
    _check_declared_size,
    _dataset,
    _read_errors,
    _unlimited,
    open_read,
    read_enkal,
)
from .schema import (
    CHECKPOINT_FORMAT,
    HISTORY_FORMAT,
    _attr_str,
    _attr_value,
    _check_format,
    _int_attr,
    _loads,
    _to_json,
)

__all__ = ["Difference", "run_differences", "check_resume", "check_dropped_rows",
           "dropped_rows"]

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
    with read_enkal(path, fmt=None, missing="checkpoint or history file",
                    what="an enkal checkpoint or history file") as f:
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
    # (what a file lacks is not compared: the resume then fails on what it needs, if at all)
    obs = _small_variable(f, "observations", path, 1) if "observations" in f else None
    std = _small_variable(f, "noise_std", path, 1) if "noise_std" in f else None
    chol = _small_variable(f, "noise_chol", path, 2) if "noise_chol" in f else None
    attrs = {k: f.attrs[k] for k in f.attrs}
    return _Recorded(config if isinstance(config, dict) else None, int(par.shape[1]),
                     int(par.shape[2]), None if obs is None else int(obs.size), obs, std,
                     chol, layout, attrs)


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
    if recorded.noise_std is None:
        return diffs
    if not np.array_equal(recorded.noise_std, std):
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
            open_read(path) as f:
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
