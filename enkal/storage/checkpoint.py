"""Checkpoint files: a :meth:`~enkal.EnsembleSmoother.state_dict` in HDF5, written atomically,
validated before it is trusted, and turned back into a state for a smoother.

The smoother is duck-typed: ``state_dict(state)``, ``load_state_dict(d)``, ``config()`` and
``observations``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .._checks import cpu_numpy
from ..errors import StorageError
from .h5 import (
    _as_path,
    _atomic_replace,
    _get_array,
    _put_array,
    _temp_path,
    read_enkal,
)
from .journal import check_space, full_error, is_full
from .schema import (
    _CPU_RNG_STATE_SIZE,
    _MAX_JSON_DEPTH,
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    _attr_str,
    _attr_value,
    _check_ensemble,
    _check_rng_state,
    _int_attr,
    _json_depth_ok,
    _loads,
    _now,
    _schedule_json,
    _schedule_problem,
    _storage_dtype,
    _to_json,
    _versions,
)


# -- checkpoints -------------------------------------------------------------------------
def _schedule_text(schedule: Any) -> str:
    """The JSON of a state dict's ``schedule`` entry, checked."""
    try:
        text = json.dumps(schedule)
    except TypeError as err:
        raise TypeError(f"state.schedule: expected JSON-able values ({err})") from None
    if not _json_depth_ok(text):
        raise ValueError(f"state.schedule: nests deeper than {_MAX_JSON_DEPTH} levels")
    return text


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
    sched_json = _schedule_text(d["schedule"])
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
    # the adaptation's and accelerator's states only when there are: other files are as
    # before
    for name in ("adapt", "accelerator"):
        if d.get(name) is not None:
            attrs[name] = _schedule_json(d[name], name)
    need = x.numel() * x.element_size() + rng.size + (0 if mask is None else x.shape[1])
    check_space(path, need, what=f"the checkpoint of iteration {int(d['iteration'])}",
                new=True)
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
    except BaseException as err:
        if tmp.exists():
            tmp.unlink()
        if is_full(err):  # the previous checkpoint at path is untouched
            raise full_error(path, f"the checkpoint of iteration {int(d['iteration'])}",
                             err) from err
        raise
    return path


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
        ``config``, ``adapt`` (the encoded adaptation state, or None), ``device_type`` and
        the file's ``attrs``.

    Raises
    ------
    FileNotFoundError, StorageError
    """
    path = _as_path(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with read_enkal(path, fmt=CHECKPOINT_FORMAT, missing="checkpoint",
                    what="an enkal checkpoint") as f:
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
        rng = _read_rng(f, a, device_type, path)
        mask = None
        if _int_attr(a, "has_mask", path):
            mask = _get_array(f, "mask", (p,), np.dtype(np.uint8), path)
            if np.any(mask > 1):
                raise StorageError(f"{path}: mask holds values other than 0/1")
        iteration = _int_attr(a, "iteration", path)
        if iteration < 0:
            raise StorageError(f"{path}: negative iteration {iteration}")
        schedule, adapt, accelerator = _read_components(a, path)
        config = _loads(_attr_str(a["config"]), "config", path)
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
        "adapt": adapt,
        "accelerator": accelerator,
        "device_type": device_type,
        "attrs": {k: (_attr_str(v) if isinstance(v, (bytes, str)) else v)
                  for k, v in a.items()},
    }


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


def _read_rng(f: h5py.File, a: dict, device_type: str, path: Path) -> np.ndarray:
    """The checkpoint's generator state, its declared size checked first."""
    rng_size = _int_attr(a, "rng_state_size", path)
    if device_type == "cpu" and rng_size != _CPU_RNG_STATE_SIZE:
        raise StorageError(f"{path}: rng_state_size {rng_size} is not the size of a "
                           f"CPU generator state ({_CPU_RNG_STATE_SIZE})")
    if not 0 < rng_size <= 1 << 20:
        raise StorageError(f"{path}: implausible rng_state_size {rng_size}")
    return _get_array(f, "rng_state", (rng_size,), np.dtype(np.uint8), path)


def _read_components(a: dict, path: Path) -> tuple[Any, Any, Any]:
    """The encoded schedule, adaptation and accelerator states of a checkpoint (None for
    those it has not)."""
    schedule = _loads(_attr_str(a["schedule"]), "schedule", path)
    problem = _schedule_problem(schedule)
    if problem is not None:
        raise StorageError(f"{path}: schedule attribute {problem}")
    out = []
    for name, kind in (("adapt", "adaptation"), ("accelerator", "accelerator")):
        value = None
        if name in a:
            value = _loads(_attr_str(a[name]), name, path)
            problem = _schedule_problem(value, kind)
            if problem is not None:
                raise StorageError(f"{path}: {name} attribute {problem}")
        out.append(value)
    return schedule, out[0], out[1]


def _load_state(d: dict[str, Any], path: Path, smoother: Any, device: Any, *,
                what: str, warn: bool = True) -> Any:
    """A validated state dict (from a checkpoint or a history row) -> SmootherState;
    ``warn``: a ``RuntimeWarning`` when the configuration differs (``enkal.run`` compares
    the whole run itself first, :func:`enkal.storage.check_resume`)."""
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
    if warn:
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
