"""The filter history on disk: its layout, the filter's configuration, the checkpoint group
and one cycle's row (``docs/schema.md``, "Filter history").

A filter history is a netCDF-4 flavoured HDF5 file (written through h5netcdf) with an
unlimited ``time`` dimension, one row per assimilation cycle, and a ``checkpoint`` group
holding the latest :meth:`EnsembleFilter.state_dict <enkal.filtering.EnsembleFilter.state_dict>`
(the ensemble, the generator state, the smoother window, the inflation states). A row and
the checkpoint written with it are one journaled change (:mod:`enkal.storage.journal`): a
crash leaves the file before or after the cycle, never in between.

The filter is duck-typed (``scheme``, ``inflation``, ``rotate``, ``lag``, ``noise_std``,
``observe``, ``failure``, ``seed``, ``fixed``, ``model``, ``layout``, ``state_dict``,
``load_state_dict``): storage never imports the loop.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import h5netcdf
import h5py
import numpy as np
import torch

from .._checks import cpu_numpy
from ..errors import StorageError
from .h5 import _get_array, _member_block
from .schema import _CPU_RNG_STATE_SIZE, _ROW_CHUNK, _attr_str, _int_attr, _loads, _storage_dtype

FILTER_FORMAT = "enkal-filter-history"
#: the filter history's own version (independent of the smoother history's FORMAT_VERSION)
FILTER_FORMAT_VERSION = 1
CHECKPOINT_GROUP = "checkpoint"


# -- the filter's configuration -----------------------------------------------------------------
def _stable_repr(obj: Any) -> str:
    """``repr`` without memory addresses: dataclasses field by field, functions by their
    qualified name, objects whose repr is the default one by their type's (no module: a
    script's ``__main__`` and the same module imported are one configuration)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        inner = ", ".join(f"{f.name}={_stable_repr(getattr(obj, f.name))}"
                          for f in dataclasses.fields(obj) if f.repr)
        return f"{type(obj).__name__}({inner})"
    if isinstance(obj, (list, tuple)):
        items = ", ".join(_stable_repr(x) for x in obj)
        return f"[{items}]" if isinstance(obj, list) else \
            f"({items}{',' if len(obj) == 1 else ''})"
    if isinstance(obj, torch.Tensor):
        return repr(obj.tolist())
    if callable(obj) and hasattr(obj, "__qualname__") and not isinstance(obj, type):
        return str(obj.__qualname__)
    text = repr(obj)
    return type(obj).__qualname__ if " at 0x" in text else text


def filter_config(flt: Any) -> dict[str, Any]:
    """The configuration a filter history records (and a resume compares): JSON values.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Scheme:
    ...     centred: bool = True
    >>> class F:  # any object with the filter's attributes
    ...     scheme, inflation, rotate, lag, noise_std, observe = Scheme(), 1.05, True, 2, 0.5, [0, 2]
    ...     failure, seed, fixed, model, layout = None, 3, None, None, None
    >>> c = filter_config(F())
    >>> c["scheme"], c["inflation"], c["noise_std"], c["observe"]
    ('Scheme(centred=True)', 1.05, [0.5], [0, 2])
    """
    infl = getattr(flt, "inflation", 1.0)
    observe = getattr(flt, "observe", None)
    fixed = getattr(flt, "fixed", None)
    layout: Any = getattr(flt, "layout", None)
    model = getattr(flt, "model", None)
    return {
        "scheme": _stable_repr(flt.scheme),
        "inflation": float(infl) if isinstance(infl, (int, float)) else _stable_repr(infl),
        "rotate": bool(flt.rotate),
        "lag": int(flt.lag),
        "noise_std": [float(v) for v in torch.as_tensor(flt.noise_std).reshape(-1).tolist()],
        "observe": None if observe is None else
        ([int(i) for i in observe] if isinstance(observe, (list, tuple)) else
         _stable_repr(observe)),
        "failure": _stable_repr(getattr(flt, "failure", None)),
        "seed": int(getattr(flt, "seed", 0)),
        "parameters": None if fixed is None else
        [float(v) for v in torch.as_tensor(fixed).reshape(-1).tolist()],
        "model": _stable_repr(model) if dataclasses.is_dataclass(model)
        else type(model).__qualname__,
        "layout": layout.to_dict() if callable(getattr(layout, "to_dict", None)) else None,
    }


def config_differences(file_config: Any, config: Mapping[str, Any]) -> list[str]:
    """``"name: file VALUE, this filter VALUE"`` for each item that differs."""
    saved = file_config if isinstance(file_config, dict) else {}
    mine = json.loads(json.dumps(config))
    out = []
    for key in sorted(set(saved) | set(mine)):
        if saved.get(key) != mine.get(key):
            out.append(f"{key}: file {_short(saved.get(key))}, this filter "
                       f"{_short(mine.get(key))}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- the layout -------------------------------------------------------------------------------
class Layout(NamedTuple):
    """Sizes and kinds of a filter history (from the run's start, or read from a file)."""

    n_filters: int | None  # B for a batch of filters; None for one filter
    n_members: int
    n_state: int
    n_obs: int
    n_parameters: int | None  # joint estimation; None without
    lag: int
    rng_size: int
    dtype: str  # torch dtype name of the states
    parameters_dtype: str | None
    device_type: str
    ensembles: bool

    @property
    def lead(self) -> tuple[str, ...]:
        return () if self.n_filters is None else ("filter",)

    def shape(self, *tail: int) -> tuple[int, ...]:
        return (() if self.n_filters is None else (self.n_filters,)) + tail


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def layout_of(flt: Any, state: Any, values: torch.Tensor, *, ensembles: bool) -> Layout:
    """The layout of a run of ``flt`` from ``state`` over ``values`` ``(K, [B,] N_obs)``."""
    x = state.states
    batched = x.ndim == 3
    p = state.parameters
    return Layout(n_filters=int(x.shape[0]) if batched else None,
                  n_members=int(x.shape[-2]), n_state=int(x.shape[-1]),
                  n_obs=int(values.shape[-1]),
                  n_parameters=None if p is None else int(p.shape[-1]), lag=int(flt.lag),
                  rng_size=int(state.rng_state.numel()), dtype=_dtype_name(x),
                  parameters_dtype=None if p is None else _dtype_name(p),
                  device_type=x.device.type, ensembles=bool(ensembles))


def read_layout(f: h5py.File, path: Path) -> Layout:
    """The layout of an existing filter history (its dims and checkpoint attributes)."""
    try:
        g = f[CHECKPOINT_GROUP]
        a = g.attrs
        n_par = int(f["parameter"].shape[0]) if "parameter" in f else None
        return Layout(
            n_filters=int(f["filter"].shape[0]) if "filter" in f else None,
            n_members=int(g["states"].shape[-2]), n_state=int(f["state"].shape[0]),
            n_obs=int(f["obs"].shape[0]), n_parameters=n_par,
            lag=_int_attr(f.attrs, "lag", path), rng_size=int(g["rng_state"].shape[0]),
            dtype=_attr_str(a["states_dtype"]),
            parameters_dtype=_attr_str(a["parameters_dtype"]) if n_par is not None else None,
            device_type=_attr_str(a["device_type"]), ensembles="analysis_ensemble" in f)
    except (KeyError, IndexError) as err:
        raise StorageError(f"{path}: not a complete filter history ({err})") from None


def _torch_dtype(name: str, path: Any) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise StorageError(f"{path}: unknown floating dtype {name!r}")
    return dtype


# -- creating the file --------------------------------------------------------------------------
def _row_variable(nc: Any, name: str, dims: tuple[str, ...], dtype: Any, chunks: tuple,
                  long_name: str, **attrs: Any) -> Any:
    kind = np.dtype(dtype).kind
    v = nc.create_variable(name, dims, dtype, chunks=chunks,
                           **({"fillvalue": np.nan} if kind == "f" else {}))
    v.attrs["long_name"] = long_name
    for k, val in attrs.items():
        v.attrs[k] = val
    return v


def create_structure(nc: h5netcdf.File, lay: Layout, *, noise_std: list[float],
                     observed: list[int] | None, parameter_names: list[str] | None,
                     attrs: Mapping[str, Any]) -> None:
    """Dimensions, coordinates, row variables (no rows), the checkpoint group and the global
    attributes of a new filter history."""
    dims: dict[str, int | None] = {"time": None, "state": lay.n_state, "obs": lay.n_obs}
    if lay.n_filters is not None:
        dims["filter"] = lay.n_filters
    if lay.ensembles:
        dims["member"] = lay.n_members
    if lay.n_parameters is not None:
        dims["parameter"] = lay.n_parameters
    nc.dimensions = dims
    _coordinates(nc, lay, noise_std, observed, parameter_names)
    x_dtype = _storage_dtype(_torch_dtype(lay.dtype, "layout"))
    _row_variables(nc, lay, x_dtype)
    _create_checkpoint_group(nc, lay, x_dtype)
    for k, val in attrs.items():
        nc.attrs[k] = val


def _row_variables(nc: Any, lay: Layout, x_dtype: np.dtype) -> None:
    """The variables along ``time``: a row per cycle."""
    lead, sizes = lay.lead, lay.shape()
    ones = (1,) * len(lead)
    _row_variable(nc, "time", ("time",), "f8", (_ROW_CHUNK,),
                  "model time of the observations assimilated (and of the analysis)", axis="T")
    _row_variable(nc, "cycle", ("time",), "i8", (_ROW_CHUNK,),
                  "cycles assimilated: the row of cycle k holds its forecast and analysis",
                  units="1")
    _row_variable(nc, "observations", ("time", *lead, "obs"), "f8", (1, *sizes, lay.n_obs),
                  "observations y assimilated at this time")
    stats = [("forecast", "forecast (prior) ensemble at this time"),
             ("analysis", "analysis (posterior) ensemble at this time")]
    if lay.lag:
        stats.append(("smoothed", f"ensemble at this time after the {lay.lag} later "
                                  "analyses (lag smoother); NaN until they happened"))
    for what, text in stats:
        for stat, method in (("mean", "mean"), ("spread", "standard_deviation")):
            _row_variable(nc, f"{what}_{stat}", ("time", *lead, "state"), x_dtype,
                          (1, *sizes, lay.n_state), f"{stat} over members of the {text}",
                          cell_methods=f"member: {method}")
    _row_variable(nc, "n_failed", ("time",), "i8", (_ROW_CHUNK,),
                  "members whose forecast failed (redrawn), all filters", units="1")
    _row_variable(nc, "inflation", ("time",), "f8", (_ROW_CHUNK,),
                  "multiplicative inflation factor of the cycle (mean over filters)",
                  units="1")
    if lay.n_parameters is not None:
        p_dtype = _storage_dtype(_torch_dtype(str(lay.parameters_dtype), "layout"))
        for stat, method in (("mean", "mean"), ("spread", "standard_deviation")):
            _row_variable(nc, f"parameters_{stat}", ("time", *lead, "parameter"), p_dtype,
                          (1, *sizes, lay.n_parameters),
                          f"{stat} over members of the analysis parameters "
                          "(unconstrained space; estimated jointly)",
                          cell_methods=f"member: {method}", space="unconstrained")
    if lay.ensembles:
        block = _member_block(lay.n_members, lay.n_state * x_dtype.itemsize, 4 << 20)
        _row_variable(nc, "analysis_ensemble", ("time", *lead, "member", "state"), x_dtype,
                      (1, *ones, block, lay.n_state), "analysis ensemble X_a at this time")
        if lay.n_parameters is not None:
            _row_variable(nc, "parameters_ensemble", ("time", *lead, "member", "parameter"),
                          p_dtype, (1, *ones, lay.n_members, lay.n_parameters),
                          "analysis parameter ensemble (unconstrained space)",
                          space="unconstrained")


def truth_variable(nc: Any, lay: Layout) -> None:
    """``truth(time, [filter,] state)``: a twin experiment's true states, a row per cycle."""
    _row_variable(nc, "truth", ("time", *lay.lead, "state"), "f8",
                  (1, *lay.shape(), lay.n_state), "true state of the twin experiment")


def _coordinates(nc: Any, lay: Layout, noise_std: list[float], observed: list[int] | None,
                 parameter_names: list[str] | None) -> None:
    v = nc.create_variable("state", ("state",), "i8", data=np.arange(lay.n_state))
    v.attrs["long_name"] = "state variable index"
    v = nc.create_variable("obs", ("obs",), "i8", data=np.arange(lay.n_obs))
    v.attrs["long_name"] = "observation index"
    if lay.n_filters is not None:
        v = nc.create_variable("filter", ("filter",), "i8", data=np.arange(lay.n_filters))
        v.attrs["long_name"] = "filter of the batch (independent filters, own observations)"
    if lay.ensembles:
        nc.create_variable("member", ("member",), "i8", data=np.arange(lay.n_members))
    if lay.n_parameters is not None:
        names = parameter_names or [f"p[{i}]" for i in range(lay.n_parameters)]
        nc.create_variable("parameter", ("parameter",), h5py.string_dtype(),
                           data=np.array(names, dtype=object))
    std = np.broadcast_to(np.asarray(noise_std, dtype=np.float64), (lay.n_obs,))
    v = nc.create_variable("noise_std", ("obs",), "f8", data=np.ascontiguousarray(std))
    v.attrs["long_name"] = "standard deviation of the observation noise"
    if observed is not None and len(observed) == lay.n_obs:
        v = nc.create_variable("observed_state", ("obs",), "i8",
                               data=np.asarray(observed, dtype=np.int64))
        v.attrs["long_name"] = "state variable each observation observes (y = x[observed])"


def _create_checkpoint_group(nc: Any, lay: Layout, x_dtype: np.dtype) -> None:
    g = nc.create_group(CHECKPOINT_GROUP)
    gdims: dict[str, int] = {"rng_byte": lay.rng_size}
    if not lay.ensembles:
        gdims["member"] = lay.n_members
    if lay.lag:
        gdims["lag"] = lay.lag
    g.dimensions = gdims
    lead = lay.lead
    v = g.create_variable("states", (*lead, "member", "state"), x_dtype)
    v.attrs["long_name"] = "analysis ensemble of the checkpointed cycle"
    if lay.n_parameters is not None:
        p_dtype = _storage_dtype(_torch_dtype(str(lay.parameters_dtype), "layout"))
        v = g.create_variable("parameters", (*lead, "member", "parameter"), p_dtype)
        v.attrs["long_name"] = "unconstrained parameter ensemble (joint estimation)"
    if lay.lag:
        v = g.create_variable("window", ("lag", *lead, "member", "state"), x_dtype)
        v.attrs["long_name"] = "the lag smoother's last analyses, oldest first"
        v = g.create_variable("window_time", ("lag",), "f8", fillvalue=np.nan)
        v.attrs["long_name"] = "times of the window's analyses (NaN: empty slot)"
    v = g.create_variable("rng_state", ("rng_byte",), "u1")
    v.attrs["long_name"] = "torch.Generator.get_state() of the filter"
    g.attrs["comment"] = ("the whole filter state after cycle `cycle`: "
                          "EnsembleFilter.load_state_dict, via enkal.storage.read_filter_state")
    g.attrs["states_dtype"] = lay.dtype
    if lay.parameters_dtype is not None:
        g.attrs["parameters_dtype"] = lay.parameters_dtype
    g.attrs["device_type"] = lay.device_type


# -- the checkpoint ----------------------------------------------------------------------------
def _checksum(arrays: list[np.ndarray], meta: str) -> int:
    crc = zlib.crc32(meta.encode("utf-8"))
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).data, crc)
    return crc


def _meta(cycle: int, time: float, window_times: list[float], inflation: str) -> str:
    return json.dumps([cycle, time, window_times, inflation])


def checkpoint_arrays(flt: Any, state: Any, lay: Layout) -> dict[str, Any]:
    """``flt.state_dict(state)`` as the arrays and attributes of the checkpoint group,
    checked against the file's layout."""
    d = flt.state_dict(state)
    x = d["states"]
    if tuple(x.shape) != lay.shape(lay.n_members, lay.n_state):
        raise ValueError(f"state.states: expected shape "
                         f"{lay.shape(lay.n_members, lay.n_state)} (the file's), got "
                         f"{tuple(x.shape)}")
    window = list(d.get("window", ()))
    times = [float(t) for t in d.get("window_times", ())]
    if len(window) > lay.lag or len(window) != len(times):
        raise ValueError(f"state.window: expected at most lag = {lay.lag} analyses, got "
                         f"{len(window)}")
    out: dict[str, Any] = {"states": cpu_numpy(x)}
    if lay.lag:
        w = np.zeros((lay.lag, *out["states"].shape), dtype=out["states"].dtype)
        for i, xi in enumerate(window):
            w[i] = cpu_numpy(xi)
        out["window"] = w
        out["window_time"] = np.array(times + [np.nan] * (lay.lag - len(times)))
    p = d.get("parameters")
    if (p is None) != (lay.n_parameters is None):
        raise ValueError("state.parameters: the file was created with"
                         f"{'out' if lay.n_parameters is None else ''} jointly estimated "
                         "parameters")
    if p is not None:
        out["parameters"] = cpu_numpy(p)
    rng = d["rng_state"]
    if rng.dtype != torch.uint8 or rng.numel() != lay.rng_size:
        raise ValueError(f"state.rng_state: expected {lay.rng_size} uint8 bytes, got "
                         f"{rng.numel()} {rng.dtype}")
    out["rng_state"] = rng.detach().cpu().numpy()
    infl = json.dumps(list(d.get("inflation", ())), allow_nan=False)
    cycle, time = int(d["cycle"]), float(d["time"])
    arrays = [out[k] for k in ("states", "parameters", "window", "rng_state") if k in out]
    out["attrs"] = {"cycle": np.int64(cycle), "time": np.float64(time),
                    "window_length": np.int64(len(window)), "inflation": infl,
                    "checksum": np.int64(_checksum(arrays, _meta(cycle, time, times, infl)))}
    return out


def write_checkpoint_group(f: h5py.File, arrays: Mapping[str, Any]) -> None:
    """Overwrite the checkpoint group with :func:`checkpoint_arrays`' output (inside the
    caller's transaction)."""
    g = f[CHECKPOINT_GROUP]
    for name in ("states", "parameters", "window", "window_time", "rng_state"):
        if name in arrays:
            g[name][...] = arrays[name]
    for k, v in arrays["attrs"].items():
        g.attrs[k] = v


def read_checkpoint_group(f: h5py.File, path: Path, lay: Layout) -> dict[str, Any]:
    """The checkpoint as a ``state_dict`` (tensors on the CPU), every declared shape, dtype
    and the checksum checked first (:class:`StorageError` naming ``path``)."""
    if CHECKPOINT_GROUP not in f or not isinstance(f[CHECKPOINT_GROUP], h5py.Group):
        raise StorageError(f"{path}: no checkpoint group; not a filter history")
    g = f[CHECKPOINT_GROUP]
    a = g.attrs
    try:
        cycle, length = _int_attr(a, "cycle", path), _int_attr(a, "window_length", path)
        time = float(np.asarray(a["time"]).item())
        infl_text = _attr_str(a["inflation"])
        checksum = _int_attr(a, "checksum", path)
    except KeyError as err:
        raise StorageError(f"{path}: the checkpoint has no {err} attribute (a file whose "
                           "creation never finished?)") from None
    if cycle < 0 or not 0 <= length <= lay.lag:
        raise StorageError(f"{path}: checkpoint cycle {cycle} / window length {length} "
                           f"out of range (lag {lay.lag})")
    x_torch = _torch_dtype(lay.dtype, path)
    x_np = _storage_dtype(x_torch)
    arrays = {"states": _get_array(g, "states", lay.shape(lay.n_members, lay.n_state), x_np,
                                   path)}
    p_torch = None
    if lay.n_parameters is not None:
        p_torch = _torch_dtype(str(lay.parameters_dtype), path)
        arrays["parameters"] = _get_array(g, "parameters", lay.shape(lay.n_members,
                                                                     lay.n_parameters),
                                          _storage_dtype(p_torch), path)
    times: list[float] = []
    if lay.lag:
        arrays["window"] = _get_array(g, "window", (lay.lag, *arrays["states"].shape), x_np,
                                      path)
        times = [float(t) for t in _get_array(g, "window_time", (lay.lag,),
                                              np.dtype(np.float64), path)[:length]]
    if lay.device_type == "cpu" and lay.rng_size != _CPU_RNG_STATE_SIZE:
        raise StorageError(f"{path}: rng_state has {lay.rng_size} bytes, not a CPU "
                           f"generator state ({_CPU_RNG_STATE_SIZE})")
    arrays["rng_state"] = _get_array(g, "rng_state", (lay.rng_size,), np.dtype(np.uint8), path)
    order = [arrays[k] for k in ("states", "parameters", "window", "rng_state") if k in arrays]
    if _checksum(order, _meta(cycle, time, times, infl_text)) != checksum:
        raise StorageError(f"{path}: the checkpoint's checksum does not match its contents "
                           "(corrupt file); it cannot be resumed")
    inflation = _loads(infl_text, "checkpoint inflation", path)
    if not isinstance(inflation, list):
        raise StorageError(f"{path}: checkpoint inflation attribute is not a list")

    def tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.array(a)).to(dtype)

    return {"cycle": cycle, "time": time, "states": tensor(arrays["states"], x_torch),
            "parameters": None if p_torch is None else tensor(arrays["parameters"], p_torch),
            "rng_state": torch.from_numpy(np.array(arrays["rng_state"])),
            "inflation": inflation, "window_times": times,
            "window": [tensor(arrays["window"][i], x_torch) for i in range(length)]}


# -- one cycle's row ----------------------------------------------------------------------------
def _np(t: Any) -> np.ndarray:
    return cpu_numpy(t) if isinstance(t, torch.Tensor) else np.asarray(t)


def write_row(f: h5py.File, row: int, info: Any, observations: np.ndarray,
              unlimited: list[str], state: Any, smoothed_row: int | None) -> None:
    """Extend every ``time`` variable to ``row + 1`` rows and fill row ``row`` from the
    cycle's ``info`` (a :class:`~enkal.filtering.CycleInfo`); ``smoothed_row``: where
    ``info.smoothed`` goes (None: nowhere)."""
    for name in unlimited:
        f[name].resize(row + 1, axis=0)
    f["time"][row] = float(info.time)
    f["cycle"][row] = int(info.cycle)
    f["observations"][row] = observations
    for name in ("forecast_mean", "forecast_spread", "analysis_mean", "analysis_spread"):
        f[name][row] = _np(getattr(info, name))
    f["n_failed"][row] = int(info.n_failed)
    f["inflation"][row] = float(info.inflation)
    if "parameters_mean" in f:
        f["parameters_mean"][row] = _np(info.parameters_mean)
        f["parameters_spread"][row] = _np(info.parameters_spread)
    if "analysis_ensemble" in f:
        f["analysis_ensemble"][row] = _np(state.states)
    if "parameters_ensemble" in f:
        f["parameters_ensemble"][row] = _np(state.parameters)
    if smoothed_row is not None and info.smoothed is not None:
        f["smoothed_mean"][smoothed_row] = _np(info.smoothed[1])
        f["smoothed_spread"][smoothed_row] = _np(info.smoothed[2])


def row_bytes(lay: Layout) -> int:
    """Bytes one row adds, about (its arrays; metadata is the space check's margin)."""
    per = np.dtype(_storage_dtype(_torch_dtype(lay.dtype, "layout"))).itemsize
    b = lay.n_filters or 1
    n = b * (6 * lay.n_state * per + 8 * lay.n_obs) + 24
    if lay.ensembles:
        n += b * lay.n_members * lay.n_state * per
    if lay.n_parameters is not None:
        n += b * (2 + lay.ensembles * lay.n_members) * lay.n_parameters * 8
    return n


def checkpoint_bytes(lay: Layout) -> int:
    per = np.dtype(_storage_dtype(_torch_dtype(lay.dtype, "layout"))).itemsize
    b = lay.n_filters or 1
    return b * lay.n_members * (lay.n_state * per * (1 + lay.lag) +
                                8 * (lay.n_parameters or 0)) + lay.rng_size
