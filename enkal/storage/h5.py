"""Low-level HDF5: atomic whole-file writes, one-row appends, declared-size checks, repair.

The crash-safety rules these functions implement are in the package docstring
(:mod:`enkal.storage`) and ``docs/schema.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import h5netcdf
import h5py
import numpy as np

from ..errors import StorageError
from .journal import recover, transaction
from .schema import (
    _INT_MISSING,
    _ROW_CHUNK,
    _STATE_VARIABLES,
    _STORED_MASK,
    _STORED_PARAMETERS,
    _STORED_PREDICTIONS,
    _STORED_STATE,
    HISTORY_FORMAT,
    _attr_str,
    _check_format,
    _check_rng_state,
    _schedule_json,
    _to_json,
)


class _StateRow(NamedTuple):
    """The whole smoother state of one history row, as written beside its ``parameters``."""

    rng: np.ndarray  # the generator state, uint8
    schedule: str  # JSON of the schedule state
    device_type: str  # where the generator lives ("cpu", "cuda")
    mask: np.ndarray | None  # int8 0/1 (None: the state has no mask)
    checksum: int  # _state_checksum of the row
    adapt: str | None = None  # JSON of the adaptation state (None: it has none)
    accelerator: str | None = None  # JSON of the accelerator state (None: it has none)


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


def open_read(path: Path) -> h5py.File:
    """``h5py.File(path, "r")`` as xarray opens files: with HDF5's default file locking, so
    that a file a notebook holds open in this process (``xr.open_dataset``) can be read here
    too (HDF5 refuses a second handle of one file whose locking flags differ). Where the
    file system has no locks, without them."""
    with contextlib.suppress(OSError):  # (a read-only copy stays as it is)
        recover(path, reader=True)  # a change its killed writer left half done comes undone
    try:
        return h5py.File(path, "r")
    except OSError as err:
        if "lock" not in str(err).lower() or "flag values" in str(err):
            raise
        return h5py.File(path, "r", locking=False)


@contextlib.contextmanager
def read_enkal(path: Path, *, fmt: str | None, missing: str, what: str) -> Iterator[h5py.File]:
    """An existing enkal file opened for reading (:func:`open_read`), its ``enkal_format``
    checked to be ``fmt`` (``None``: unchecked): ``FileNotFoundError`` ("no such
    ``missing``") or a :class:`StorageError` ("cannot be read as ``what``") naming it."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {missing}")
    with _read_errors(path, what), open_read(path) as f:
        if fmt is not None:
            _check_format(f.attrs, path, fmt)
        yield f


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


def _create_structure(nc: h5netcdf.File, *, layout: Any, observations: Any,
                      output_names: Sequence[str], n_members: int, dtype: np.dtype,
                      filters: Mapping[str, Any], chunk_bytes: int, predictions: bool,
                      kinds: Mapping[str, str], attrs: Mapping[str, Any]) -> None:
    """Dimensions, coordinates, variables and global attributes of a history without rows
    (``docs/schema.md``); ``kinds`` are the diagnostics' dtypes."""
    e, p, m = n_members, layout.size, observations.size
    dims: dict[str, int | None] = {"iteration": None, "member": e, "parameter": p,
                                   "output": m}
    full = not observations.is_diagonal
    if full:
        dims["output2"] = m
    nc.dimensions = dims
    it = nc.create_variable("iteration", ("iteration",), "i8", chunks=(_ROW_CHUNK,))
    it.attrs["long_name"] = "updates done: 0 is the prior, k the ensemble after k updates"
    nc.create_variable("member", ("member",), "i8", data=np.arange(e, dtype=np.int64))
    nc.create_variable("parameter", ("parameter",), h5py.string_dtype(),
                       data=np.array(layout.names, dtype=object))
    nc.create_variable("output", ("output",), h5py.string_dtype(),
                       data=np.array(output_names, dtype=object))
    itemsize = dtype.itemsize
    v = nc.create_variable("parameters", ("iteration", "member", "parameter"), dtype,
                           chunks=(1, _member_block(e, p * itemsize, chunk_bytes), p),
                           fillvalue=np.nan, **filters)
    physical = not layout.is_unconstrained
    v.attrs["long_name"] = "ensemble X in the unconstrained space (what the smoother updates)"
    v.attrs["space"] = "unconstrained"
    v.attrs["comment"] = (
        "physical values (the model's parameters): variable parameters_physical; NaN where "
        "stored bit 1 is 0" if physical else
        "every constraint is the identity: these are also the physical values; NaN where "
        "stored bit 1 is 0")
    if physical:
        v = nc.create_variable("parameters_physical", ("iteration", "member", "parameter"),
                               dtype, chunks=(1, _member_block(e, p * itemsize, chunk_bytes), p),
                               fillvalue=np.nan, **filters)
        v.attrs["long_name"] = "ensemble in physical units (the model's parameter values)"
        v.attrs["space"] = "physical"
        v.attrs["comment"] = ("the layout's constraints applied to parameters (exp for "
                              "Positive, low + (high - low) sigmoid for Bounded); NaN where "
                              "stored bit 1 is 0")
    if predictions:
        v = nc.create_variable("predictions", ("iteration", "member", "output"), dtype,
                               chunks=(1, _member_block(e, m * itemsize, chunk_bytes), m),
                               fillvalue=np.nan, **filters)
        v.attrs["long_name"] = "predictions G(phi) of the ensemble of the same iteration"
        v.attrs["comment"] = "NaN where stored bit 2 is 0"
    v = nc.create_variable("stored", ("iteration",), "i1", chunks=(_ROW_CHUNK,))
    v.attrs["long_name"] = "what the row holds (a sum of flags)"
    v.attrs["flag_masks"] = np.array([_STORED_PARAMETERS, _STORED_PREDICTIONS, _STORED_STATE,
                                      _STORED_MASK], np.int8)
    v.attrs["flag_meanings"] = "parameters predictions state state_mask"
    for name, kind in kinds.items():
        _create_diagnostic(nc, name, kind, 0)
    nc.create_variable("observations", ("output",), "f8",
                       data=observations.values.detach().cpu().numpy())
    nc.create_variable("noise_std", ("output",), "f8",
                       data=observations.noise_std.detach().cpu().numpy())
    if full:
        v = nc.create_variable("noise_chol", ("output", "output2"), "f8",
                               data=observations.noise_chol.detach().cpu().numpy())
        v.attrs["long_name"] = "lower Cholesky factor L of the noise covariance R = L L^T"
    v = nc.create_variable("mask", ("parameter",), "i1", data=np.ones(p, dtype=np.int8))
    v.attrs["long_name"] = "live parameters (0: pruned, held at zero)"
    for k, val in attrs.items():
        nc.attrs[k] = val


def _create_state_variables(f: h5py.File, *, rows: int, n_parameters: int, rng_size: int,
                            device_type: str, state: bool, mask: bool,
                            adapt: bool = False, accelerator: bool = False) -> list[str]:
    """Create the per-row state variables (``state``: ``rng_state``, ``schedule_state``,
    ``state_checksum``; ``mask``: ``state_mask``; ``adapt``: ``adapt_state``;
    ``accelerator``: ``accelerator_state``), ``rows`` long; return their names."""
    with h5netcdf.File(f, "a") as nc:
        if state:
            nc.dimensions["rng_byte"] = rng_size
            v = nc.create_variable("rng_state", ("iteration", "rng_byte"), "u1",
                                   chunks=(1, rng_size))
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
        if mask:
            v = nc.create_variable("state_mask", ("iteration", "parameter"), "i1",
                                   chunks=(1, n_parameters), fillvalue=np.int8(1))
            v.attrs["long_name"] = ("live parameters of the state of this row (0: "
                                    "pruned); where stored bit 8 is set")
        if adapt:
            v = nc.create_variable("adapt_state", ("iteration",), h5py.string_dtype(),
                                   chunks=(_ROW_CHUNK,))
            v.attrs["long_name"] = ("JSON of the structure-adaptation state after this row's "
                                    "update")
            v.attrs["comment"] = "empty where stored bit 4 is 0 or the state has none"
        if accelerator:
            v = nc.create_variable("accelerator_state", ("iteration",), h5py.string_dtype(),
                                   chunks=(_ROW_CHUNK,))
            v.attrs["long_name"] = "JSON of the accelerator's state after this row's update"
            v.attrs["comment"] = "empty where stored bit 4 is 0 or the state has none"
    names = ([*_STATE_VARIABLES] if state else []) + (["state_mask"] if mask else []) + \
        (["adapt_state"] if adapt else []) + (["accelerator_state"] if accelerator else [])
    for name in names:
        if f[name].shape[0] != rows:
            f[name].resize(rows, axis=0)
    if mask:  # a plain int8 variable: no _FillValue, so xarray keeps int8 0/1
        del f["state_mask"].attrs["_FillValue"]
    return names


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
               state: _StateRow | None = None, physical: np.ndarray | None = None) -> None:
    """Extend every ``iteration`` variable by one row and fill it (one open file);
    ``state`` for a row that holds the whole smoother state, ``physical`` the row's
    ``parameters_physical`` (files that have that variable)."""
    ds = {name: h5py.h5d.open(f.id, name.encode()) for name in unlimited}
    for did in ds.values():
        did.set_extent((row + 1,) + did.shape[1:])
    # the big arrays first: they go to fresh space; metadata is written when f closes
    if params is not None:
        _put_ensemble(ds["parameters"], row, params)
    if physical is not None:
        _put_ensemble(ds["parameters_physical"], row, physical)
    if prev_predictions is not None and row > 0:
        _put_ensemble(ds["predictions"], row - 1, prev_predictions)
        _put(ds["stored"], row - 1, prev_flags | _STORED_PREDICTIONS)
    if state is not None:
        _put_state(ds, row, state)
    _put(ds["iteration"], row, iteration)
    _put(ds["stored"], row, flags)
    for name, kind in kinds.items():
        v = values.get(name)
        if v is None:
            v = np.nan if kind == "f8" else _INT_MISSING
        _put(ds[name], row, v)
    if mask is not None:
        f["mask"][...] = mask


def _put_predictions(f: h5py.File, row: int, predictions: np.ndarray, flags: int) -> None:
    """The predictions of an existing row, and its ``stored`` flags."""
    _put_ensemble(h5py.h5d.open(f.id, b"predictions"), row, predictions)
    _put(h5py.h5d.open(f.id, b"stored"), row, flags)


def _put_state(ds: Mapping[str, Any], row: int, state: _StateRow) -> None:
    """The state variables of a row that holds the whole smoother state."""
    _put(ds["rng_state"], row, state.rng)
    _put(ds["schedule_state"], row, state.schedule)
    if state.mask is not None:
        _put(ds["state_mask"], row, state.mask)
    if state.adapt is not None:
        _put(ds["adapt_state"], row, state.adapt)
    if state.accelerator is not None:
        _put(ds["accelerator_state"], row, state.accelerator)
    _put(ds["state_checksum"], row, np.uint64(state.checksum))


def _cut_history(f: h5py.File, path: Path, *, layout: Any, n_obs: int,
                 resume_from: int) -> tuple[int, np.ndarray]:
    """Check that the history ``f`` holds a run of this ``layout`` (its ``to_dict()``) and
    ``n_obs`` outputs, and drop its rows after iteration ``resume_from``; return the rows
    kept and the iterations of the file before the cut."""
    _check_format(f.attrs, path, HISTORY_FORMAT)
    try:
        rows = json.loads(_attr_str(f.attrs["layout"]))
    except (KeyError, ValueError) as err:
        raise StorageError(f"{path}: unreadable layout attribute ({err})") from None
    if rows != json.loads(_to_json(layout)):
        raise ValueError(
            f"{path}: the history's parameter layout does not match this run's; resume "
            "the run that wrote it or start a new file"
        )
    if f["output"].shape != (n_obs,):
        raise ValueError(f"{path}: the history has {f['output'].shape[0]} outputs, this run "
                         f"{n_obs}")
    its = f["iteration"][:]
    if its.size and np.any(np.diff(its) <= 0):
        raise StorageError(f"{path}: iteration coordinate is not increasing")
    keep = int(np.searchsorted(its, resume_from, side="right"))
    if keep < its.size:
        for name in _unlimited(f):
            f[name].resize(keep, axis=0)
    return keep, its


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
    with open(path, "r+b") as fh:
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
        with transaction(path) as f:
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


def _put_array(f: h5py.File, name: str, a: np.ndarray) -> None:
    # chunked (required by the checksum filter); chunks of at most ~4 MiB
    if a.ndim == 2 and a.size:
        cols = max(1, min(a.shape[1], (4 << 20) // max(1, a.shape[0] * a.itemsize)))
        chunks: Any = (a.shape[0], cols)
    else:
        chunks = (max(1, a.shape[0]),) if a.ndim == 1 else True
    f.create_dataset(name, data=a, chunks=chunks, fletcher32=True)


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


def _dataset(f: h5py.File, name: str, path: Path, *, what: str = "variable") -> h5py.Dataset:
    """``f[name]``, which must be the file's own dataset (no soft or external link)."""
    link = f.get(name, getlink=True)
    if link is None:
        raise StorageError(f"{path}: {what} {name!r} missing")
    if not isinstance(link, h5py.HardLink) or not isinstance(f[name], h5py.Dataset):
        raise StorageError(f"{path}: {name!r} is not a dataset of the file itself")
    return f[name]


def _row_bytes(params: np.ndarray | None, predictions: np.ndarray | None,
               state: _StateRow | None, physical: np.ndarray | None = None) -> int:
    """Bytes one row adds to the file, about (its arrays and state; metadata is the margin
    of :func:`~enkal.storage.journal.check_space`)."""
    n = 0 if params is None else params.nbytes
    n += 0 if predictions is None else predictions.nbytes
    n += 0 if physical is None else physical.nbytes
    if state is not None:
        n += state.rng.nbytes + len(state.schedule) + len(state.adapt or "") + \
            len(state.accelerator or "")
        n += 0 if state.mask is None else state.mask.nbytes
    return n


def _state_json(rng_state: Any, schedule: Any, adapt: Any, accelerator: Any, *,
                rng_size: int | None) -> tuple[np.ndarray, str, str | None, str | None] | None:
    """The checked generator state and the JSON of the schedule's, the adaptation's and the
    accelerator's states of a row (None: no state given); ``rng_size``: the file's
    generator state size, if it has one."""
    if (rng_state is None) != (schedule is None):
        raise ValueError("rng_state, schedule: give both (a resumable state row) or neither")
    if rng_state is None:
        for name, value in (("adapt", adapt), ("accelerator", accelerator)):
            if value is not None:
                raise ValueError(f"{name}: only with rng_state and schedule (a state row)")
        return None
    rng_np = _check_rng_state(rng_state)
    sched_json = _schedule_json(schedule)
    adapt_json = None if adapt is None else _schedule_json(adapt, "adapt")
    acc_json = None if accelerator is None else _schedule_json(accelerator, "accelerator")
    if rng_size is not None and rng_np.size != rng_size:
        raise ValueError(f"rng_state: expected {rng_size} bytes (the file's generator "
                         f"states), got {rng_np.size}; a generator of another device type?")
    return rng_np, sched_json, adapt_json, acc_json
