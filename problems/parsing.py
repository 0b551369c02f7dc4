"""The parts of a TOML problem that any plugin needs, public: numbers, time grids, priors,
your own code named by ``"module:attribute"``, and data files.

The ``estimation`` plugin (:mod:`enkal.problems.estimation`) is built from these; a plugin
of your own (``docs/config.md``, "Plugins") can use them the same way. Every error is a
``ValueError`` (or ``TypeError``) whose message starts with the key it is about, e.g.
``[model] target``, which ``enkal run`` prints as one line with exit status 2.

Security: a configuration may name code (``[model] target`` / ``rhs``): importing it runs
it, as running a Python script does. Data files are only ever parsed as numbers (CSV text,
``.npy`` without pickle, NetCDF/HDF5 variables): nothing named in a data file is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import enkal
from enkal.config import check_keys

__all__ = ["number", "integer", "times", "block_values", "layout_from_parameters", "priors",
           "prior_moments",
           "import_target", "load_values", "MAX_TIMES", "MAX_DATA_VALUES"]

MAX_TIMES = 1_000_000
MAX_DATA_VALUES = 50_000_000


def number(v: Any, where: str) -> float:
    """``v`` as a finite float, else ``ValueError`` naming ``where``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: expected a finite number, got {v!r}"[:200])
    return float(v)


def integer(v: Any, where: str, *, minimum: int = 0, maximum: int = 2**62) -> int:
    """``v`` as an int in ``[minimum, maximum]``, else ``ValueError`` naming ``where``."""
    if isinstance(v, bool) or not isinstance(v, int) or not (minimum <= v <= maximum):
        raise ValueError(f"{where}: expected an int in [{minimum}, {maximum}], got {v!r}"[:200])
    return v


def times(spec: Any, where: str) -> list[float]:
    """Observation times: a list of numbers or ``{start, stop, step}`` (``stop`` included)."""
    if isinstance(spec, dict):
        check_keys(spec, where=where, required=("start", "stop", "step"))
        start, stop, step = (number(spec[k], f"{where}.{k}") for k in ("start", "stop", "step"))
        if not (step > 0 and stop >= start):
            raise ValueError(f"{where}: expected step > 0 and stop >= start, got {spec}")
        count = (stop - start) / step
        if not count < MAX_TIMES:
            raise ValueError(f"{where}: more than {MAX_TIMES} observation times")
        n = int(math.floor(count + 1e-9)) + 1
        return [round(start + i * step, 12) for i in range(n)]
    if isinstance(spec, list) and 0 < len(spec) <= MAX_TIMES:
        return [number(t, f"{where}[{i}]") for i, t in enumerate(spec)]
    raise ValueError(f"{where}: expected a list of times or {{start, stop, step}}, got "
                     f"{spec!r}"[:300])


def block_values(block: Any, value: Any, where: str) -> torch.Tensor:
    """A number (for every entry) or ``block.size`` numbers, float64."""
    values = value if isinstance(value, list) else [value]
    if len(values) not in (1, block.size):
        raise ValueError(f"{where}: expected a number or {block.size} numbers, got "
                         f"{value!r}"[:200])
    t = torch.tensor([number(v, f"{where}") for v in values], dtype=torch.float64)
    return t.expand(block.size).clone() if t.numel() == 1 else t


# -- priors ----------------------------------------------------------------------------------
_PRIOR_KEYS = ("prior_median", "prior_std", "mean", "std", "truth")
_LAYOUT_KEYS = ("constraint", "bounds", "shape")


def layout_from_parameters(section: Any) -> enkal.ParameterLayout:
    """The layout ``[parameters]`` describes, in its order, for models that take one (an ODE
    right-hand side): per table an optional ``shape`` (default a scalar) and
    ``constraint = "real" | "positive"`` or ``bounds = [low, high]``."""
    if not isinstance(section, dict) or not section:
        raise ValueError("[parameters]: expected one table per parameter, e.g. [parameters.k]")
    blocks = []
    for name, spec in section.items():
        where = f"[parameters.{name}]"
        spec = check_keys(spec, where=where, optional=_PRIOR_KEYS + _LAYOUT_KEYS)
        shape = spec.get("shape", [])
        if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise ValueError(f"{where} shape: expected a list of positive ints, got {shape!r}")
        blocks.append((name, tuple(shape), _constraint(spec, where)))
    return enkal.ParameterLayout(blocks)


def _constraint(spec: dict, where: str) -> Any:
    if "bounds" in spec:
        if "constraint" in spec:
            raise ValueError(f"{where}: give 'constraint' or 'bounds', not both")
        b = spec["bounds"]
        if not isinstance(b, list) or len(b) != 2:
            raise ValueError(f"{where} bounds: expected [low, high], got {b!r}"[:200])
        low, high = (number(v, f"{where} bounds") for v in b)
        try:
            return enkal.Bounded(low, high)
        except ValueError as err:
            raise ValueError(f"{where} bounds: {err}") from None
    kind = spec.get("constraint", "real")
    if kind not in ("real", "positive"):
        raise ValueError(f"{where} constraint: expected \"real\" or \"positive\" (or bounds = "
                         f"[low, high]), got {kind!r}"[:200])
    return enkal.Positive() if kind == "positive" else enkal.Real()


def _bounds(constraint: Any) -> tuple[float, float]:
    if isinstance(constraint, enkal.Positive):
        return 0.0, math.inf
    if isinstance(constraint, enkal.Bounded):
        return constraint.low, constraint.high
    return -math.inf, math.inf


def _block_prior(b: Any, spec: dict, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unconstrained mean and std of one block: from ``prior_median``/``prior_std`` (the
    std of ``u``) or, in physical units, ``mean``/``std`` (:func:`enkal.constrained_gaussian`)."""
    physical = "mean" in spec or "std" in spec
    if physical == ("prior_median" in spec or "prior_std" in spec):
        raise ValueError(f"{where}: expected either mean and std (physical units) or "
                         "prior_median and prior_std (std of the unconstrained value)")
    if physical:
        check_keys(spec, where=where, required=("mean", "std"), optional=tuple(spec))
        mean, std = (block_values(b, spec[k], f"{where} {k}") for k in ("mean", "std"))
        lower, upper = _bounds(b.constraint)
        u = []
        for m, s in zip(mean.tolist(), std.tolist(), strict=True):
            try:
                g = enkal.constrained_gaussian(b.name, m, s, lower, upper)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            u.append((g.u_mean, g.u_std))
        return (torch.tensor([v[0] for v in u], dtype=torch.float64),
                torch.tensor([v[1] for v in u], dtype=torch.float64))
    check_keys(spec, where=where, required=("prior_median", "prior_std"), optional=tuple(spec))
    median = block_values(b, spec["prior_median"], f"{where} prior_median")
    try:
        mean = b.constraint.inverse(median)
    except ValueError as err:
        raise ValueError(f"{where} prior_median: {err}") from None
    s = block_values(b, spec["prior_std"], f"{where} prior_std")
    if not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"{where} prior_std: expected finite values > 0, got "
                         f"{spec['prior_std']}")
    return mean, s


def priors(section: Any, layout: enkal.ParameterLayout, n_members: int,
           generator: torch.Generator, *, layout_keys: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prior ensemble ``(n_members, N_par)`` (unconstrained space) and the truth
    (physical, or ``None``) that ``[parameters]`` describes for ``layout``.

    Each ``[parameters.NAME]`` table gives ``mean`` and ``std`` in physical units, or
    ``prior_median`` and ``prior_std`` (the standard deviation of the unconstrained value,
    e.g. of ``log phi`` for a positive parameter), and optionally ``truth`` (a twin
    experiment; for every parameter or none). ``layout_keys``: the tables may also hold the
    keys :func:`layout_from_parameters` reads.
    """
    mean, std, truth = prior_moments(section, layout, layout_keys=layout_keys)
    return enkal.gaussian_ensemble(mean, std, n_members, generator=generator), truth


def prior_moments(section: Any, layout: enkal.ParameterLayout, *, layout_keys: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The unconstrained prior mean and std ``(N_par,)`` and the truth of ``[parameters]``
    (see :func:`priors`, which draws the ensemble from them)."""
    names = [b.name for b in layout.blocks]
    if not isinstance(section, dict):
        raise ValueError("[parameters]: expected one table per parameter, e.g. "
                         f"[parameters.{names[0]}]")
    check_keys(section, where="[parameters]", required=tuple(names))
    mean = torch.empty(layout.size, dtype=torch.float64)
    std = torch.empty(layout.size, dtype=torch.float64)
    truth = torch.empty(layout.size, dtype=torch.float64)
    has_truth = []
    allowed = _PRIOR_KEYS + (_LAYOUT_KEYS if layout_keys else ())
    for b in layout.blocks:
        where = f"[parameters.{b.name}]"
        spec = check_keys(section[b.name], where=where, optional=allowed)
        mean[b.slice], std[b.slice] = _block_prior(b, spec, where)
        if "truth" in spec:
            truth[b.slice] = block_values(b, spec["truth"], f"{where} truth")
        has_truth.append("truth" in spec)
    if any(has_truth) and not all(has_truth):
        raise ValueError("[parameters]: give 'truth' for every parameter or for none")
    return mean, std, (truth if all(has_truth) else None)


# -- your own code ---------------------------------------------------------------------------
@contextlib.contextmanager
def _search_first(directory: Path | None) -> Iterator[None]:
    if directory is None:
        yield
        return
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _check_cached(top: str, base: Path | None, where: str) -> None:
    """Refuse a module beside the configuration whose name is already imported from
    elsewhere: Python would silently reuse the other one."""
    cached = sys.modules.get(top)
    if base is None or cached is None:
        return
    beside = base / f"{top}.py" if (base / f"{top}.py").is_file() else base / top
    if not beside.exists():
        return
    file = getattr(cached, "__file__", None)
    here = file is not None and (Path(file).resolve() == beside.resolve() or
                                 Path(file).resolve().parent == beside.resolve())
    if not here:
        raise ValueError(f"{where}: a module named {top!r} is already imported in this process "
                         f"from {file}, not {beside}; rename your module")


def import_target(target: Any, where: str, *, base_dir: str | os.PathLike | None = None) -> Any:
    """The object ``"package.module:attribute"`` names (``attribute`` may be dotted).

    The module is imported with the configuration's directory ``base_dir`` first on
    ``sys.path`` (so a ``mymodel.py`` beside the configuration is found), then the usual
    path (installed packages). Importing runs the module's code: only configurations name
    code, never data files. A missing module or attribute, or an import that fails, is a
    ``ValueError`` naming ``where``.
    """
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"{where}: expected \"package.module:attribute\", got {target!r}"[:200])
    module_name, attr = target.split(":")
    if not module_name or not attr or not all(
            part.isidentifier() for part in module_name.split(".") + attr.split(".")):
        raise ValueError(f"{where}: expected \"package.module:attribute\" of Python names, got "
                         f"{target!r}"[:200])
    base = None if base_dir is None else Path(base_dir).resolve()
    _check_cached(module_name.split(".")[0], base, where)
    try:
        with _search_first(base):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or
                                     module_name.startswith(err.name + ".")):
            looked = f" (looked in {base} and the installed packages)" if base else ""
            raise ValueError(f"{where}: no module named {err.name!r}{looked}") from None
        raise ValueError(f"{where}: importing {module_name!r} failed: {err}") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed: one line
        raise ValueError(f"{where}: importing {module_name!r} failed: "
                         f"{type(err).__name__}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


# -- data files ------------------------------------------------------------------------------
def _csv(path: Path, column: Any, where: str) -> np.ndarray:
    if column is None:
        try:
            return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=1, comments="#")
        except ValueError as err:
            raise ValueError(f"{where}: {path.name}: expected numbers only (give 'column' for "
                             f"a CSV with a header): {err}") from None
    if not isinstance(column, str):
        raise ValueError(f"{where} column: expected a column name, got {column!r}"[:200])
    table = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64, comments="#",
                          deletechars="", autostrip=True)
    names = table.dtype.names or ()
    if column not in names:
        raise ValueError(f"{where} column: {path.name} has no column {column!r} (its header: "
                         f"{', '.join(names)})"[:300])
    return np.atleast_1d(table[column])


def _netcdf(path: Path, variable: Any, where: str) -> np.ndarray:
    import xarray as xr

    if not isinstance(variable, str):
        raise ValueError(f"{where}: a NetCDF/HDF5 file needs 'variable', the name of the data "
                         f"variable, got {variable!r}"[:200])
    with xr.open_dataset(path) as ds:
        if variable not in ds.variables:
            raise ValueError(f"{where} variable: {path.name} has no variable {variable!r} "
                             f"(it has: {', '.join(map(str, ds.variables))})"[:300])
        values = np.asarray(ds[variable].values)
    if values.dtype.kind not in "fiu":  # dates, strings: not observations
        raise ValueError(f"{where} variable: {variable!r} of {path.name} holds {values.dtype} "
                         "values, expected numbers")
    return values.astype(np.float64)


_READERS = {".csv": "csv", ".txt": "csv", ".npy": "npy", ".nc": "netcdf", ".h5": "netcdf",
            ".nc4": "netcdf", ".hdf5": "netcdf"}


def load_values(spec: Any, where: str, *, base_dir: str | os.PathLike | None = None
                ) -> torch.Tensor:
    """Observed values from a file: ``{ file = "obs.csv", column = "N" }`` (a CSV of
    numbers, or with a header and ``column``), ``{ file = "obs.npy" }`` (read without pickle)
    or ``{ file = "obs.nc", variable = "y" }`` (NetCDF/HDF5 through xarray). A relative
    ``file`` is relative to ``base_dir`` (the configuration's directory). Returns the values
    flattened (row-major), float64; they must be finite."""
    spec = check_keys(spec, where=where, required=("file",), optional=("column", "variable"))
    path, kind = _data_path(spec, where, base_dir)
    try:
        if kind == "csv":
            values = _csv(path, spec.get("column"), where)
        elif kind == "npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = _netcdf(path, spec.get("variable"), where)
    except (OSError, ValueError) as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where} file: {path.name}: cannot be read: {err}") from None
    return _finite_values(np.asarray(values), path, where)


def _data_path(spec: dict, where: str, base_dir: Any) -> tuple[Path, str]:
    name = spec["file"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} file: expected a path, got {name!r}"[:200])
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise ValueError(f"{where} file: {path}: no such file")
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{where} file: {path.name}: expected .csv, .txt, .npy, .nc or .h5")
    if kind != "csv" and "column" in spec:
        raise ValueError(f"{where} column: only for CSV files")
    if kind != "netcdf" and "variable" in spec:
        raise ValueError(f"{where} variable: only for NetCDF/HDF5 files")
    return path, kind


def _finite_values(values: np.ndarray, path: Path, where: str) -> torch.Tensor:
    if values.dtype.kind not in "fiu" or values.size == 0 or values.size > MAX_DATA_VALUES:
        raise ValueError(f"{where} file: {path.name}: expected 1 to {MAX_DATA_VALUES} numbers, "
                         f"got {values.size} of dtype {values.dtype}")
    out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64).reshape(-1))
    bad = (~torch.isfinite(out)).nonzero()
    if bad.numel():
        raise ValueError(f"{where} file: {path.name}: value {int(bad[0])} is not finite "
                         f"({float(out[bad[0]])}); {bad.numel()} such values")
    return out
