"""The file schema in code: format names and version, reserved names, the ``stored`` bits,
the JSON codec of attributes and small validators (``docs/schema.md`` is the contract).

Everything here is a leaf of :mod:`enkal.storage`: plain functions of numbers, strings and
tensors, no file access.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .._types import encode_state
from ..errors import StorageError

HISTORY_FORMAT = "enkal-history"
CHECKPOINT_FORMAT = "enkal-checkpoint"
#: 2: histories may hold ``parameters_physical`` and a posterior-predictive final row (an
#: older enkal resuming such a file would extend them wrongly, so it must refuse); version-1
#: files are read and resumed, and stay version 1
FORMAT_VERSION = 2

#: variables of the schema; diagnostics may not take these names
_RESERVED = frozenset({
    "iteration", "member", "parameter", "output", "output2", "parameters", "predictions",
    "parameters_physical",
    "stored", "observations", "noise_std", "noise_chol", "mask",
    "rng_byte", "rng_state", "schedule_state", "state_mask", "state_checksum", "adapt_state",
    "accelerator_state",
})
_ROW_CHUNK = 1024  # rows per chunk of the small per-iteration variables
_INT_MISSING = -1  # integer/flag diagnostics at rows without an update
_STORED_PARAMETERS = 1
_STORED_PREDICTIONS = 2
_STORED_STATE = 4  # the row is a whole smoother state: parameters, rng_state, schedule_state
_STORED_MASK = 8  # ... whose mask is state_mask (else the state has no mask)
_STATE_VARIABLES = ("rng_state", "schedule_state", "state_checksum")
_FLOAT_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


# -- the JSON codec of attributes ------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from .._version import __version__

    return {"enkal_version": __version__, "torch_version": torch.__version__,
            "h5py_version": h5py.version.version, "hdf5_version": h5py.version.hdf5_version}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, **dataclasses.asdict(obj)}
    return repr(obj)


def _to_json(obj: Any) -> str:
    return json.dumps(obj, default=_json_default)


def _attr_value(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return np.int8(v)
    if isinstance(v, str):
        return str(v)  # plain str: h5py refuses str subclasses such as torch's version
    if isinstance(v, (int, float, np.integer, np.floating)):
        return v
    if isinstance(v, np.ndarray) and v.dtype.kind in "iuf":
        return v
    return _to_json(v)


def _attr_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.size == 1:
        return _attr_str(v.item())
    return str(v)


_MAX_JSON_DEPTH = 32


def _json_depth_ok(text: str, limit: int = _MAX_JSON_DEPTH) -> bool:
    """Whether the brackets of the JSON ``text`` nest at most ``limit`` deep (a quick scan
    before ``json.loads``, which recurses per level)."""
    depth = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _loads(text: str, what: str, path: Any) -> Any:
    """``json.loads`` of an attribute, refusing deeply nested or malformed JSON with a
    :class:`StorageError` naming ``path``."""
    if not _json_depth_ok(text):
        raise StorageError(f"{path}: {what} attribute nests deeper than {_MAX_JSON_DEPTH} "
                           "levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise StorageError(f"{path}: {what} attribute is not valid JSON ({err})") from None


def _int_attr(attrs: Any, name: str, path: Any) -> int:
    """An integer header attribute (a scalar of an integer dtype; no float, bool, string)."""
    a = np.asarray(attrs[name])
    if a.size != 1 or a.dtype.kind not in "iu":
        raise StorageError(f"{path}: attribute {name!r} is not an integer ({attrs[name]!r})")
    return int(a.item())


def _check_format(attrs: Any, path: Any, expected: str) -> None:
    fmt = attrs.get("enkal_format")
    fmt = _attr_str(fmt) if fmt is not None else None
    if fmt != expected:
        hint = ""
        if fmt == CHECKPOINT_FORMAT:
            hint = "; it is a checkpoint: read it with enkal.storage.read_checkpoint"
        elif fmt == HISTORY_FORMAT:
            hint = "; it is a history file: open it with enkal.storage.open"
        elif fmt == "enkal-filter-history":
            hint = ("; it is a filter history: open it with "
                    "enkal.storage.open_filter_history")
        raise StorageError(f"{path}: not an {expected} file (enkal_format={fmt!r}){hint}")
    version = attrs.get("enkal_format_version")
    try:
        version = int(np.asarray(version).item())
    except (TypeError, ValueError):
        raise StorageError(f"{path}: missing or malformed enkal_format_version") from None
    if version > FORMAT_VERSION:
        raise StorageError(f"{path}: format version {version} is newer than this enkal "
                           f"understands ({FORMAT_VERSION}); upgrade enkal")


# -- component states (schedule, adaptation): JSON objects with a string 'type' --------
def _schedule_problem(schedule: Any, what: str = "schedule") -> str | None:
    """Why ``schedule`` is not an encoded component state (``None`` when it is one): a JSON
    object with a string ``type``; its fields are any JSON values, which the component
    decodes and checks (``enkal._types.decode_state``)."""
    if not isinstance(schedule, dict) or not isinstance(schedule.get("type"), str):
        return f"is not a {what} state (a JSON object with a string 'type')"
    return None


def _schedule_json(schedule: Any, what: str = "schedule") -> str:
    """The JSON of a component state (a dataclass, or its :func:`~enkal._types.encode_state`
    dict), checked as :func:`_schedule_problem` does, with finite numbers only and nesting
    that a reader accepts."""
    if not isinstance(schedule, Mapping) and not (dataclasses.is_dataclass(schedule) and
                                                  not isinstance(schedule, type)):
        raise TypeError(f"{what}: expected a {what} state (dataclass) or its dict, got "
                        f"{type(schedule).__name__}")
    sched = encode_state(schedule, what)
    problem = _schedule_problem(sched, what)
    if problem is not None:
        raise ValueError(f"{what}: {problem}")
    try:
        text = json.dumps(sched, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: expected finite numbers and JSON values ({err})") from None
    if not _json_depth_ok(text):
        raise ValueError(f"{what}: nests deeper than {_MAX_JSON_DEPTH} levels")
    return text


# -- what a row holds ------------------------------------------------------------------
def _storage_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(_FLOAT_DTYPES.get(dtype, np.float32))


def _check_ensemble(x: Any, name: str, *, columns: int | None = None,
                    rows: int | None = None, label: str = "N_par") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (N_ens, {label}), got "
                        f"{type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if x.ndim != 2 or (columns is not None and x.shape[1] != columns) or \
            (rows is not None and x.shape[0] != rows):
        want = f"({rows if rows is not None else 'N_ens'}, {columns if columns is not None else label})"
        hint = ""
        if x.ndim == 2 and columns is not None and x.shape[0] == columns:
            hint = f"; enkal expects members first: did you pass ({label}, N_ens)?"
        raise ValueError(f"{name}: expected shape {want} = (N_ens, {label}), got "
                         f"{tuple(x.shape)}{hint}")


def _physical_values(layout: Any, parameters: torch.Tensor) -> np.ndarray:
    """The row of ``parameters_physical``: ``layout.to_physical`` of the ensemble as it is
    stored (a half-precision ensemble is stored as float32: map those values)."""
    exact = parameters if parameters.dtype in (torch.float32, torch.float64) \
        else parameters.float()
    return exact.detach().cpu().numpy() if layout.is_unconstrained else \
        layout.to_physical(exact).detach().cpu().numpy()


def _mask_row(mask: Any, n_parameters: int) -> np.ndarray:
    """A bool ``(N_par,)`` mask as int8 0/1."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
            tuple(mask.shape) != (n_parameters,):
        raise ValueError(f"mask: expected a bool tensor of shape ({n_parameters},), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    return mask.detach().cpu().numpy().astype(np.int8)


def _check_rng_state(rng: Any, name: str = "rng_state") -> np.ndarray:
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.ndim != 1 or \
            rng.numel() == 0:
        raise ValueError(f"{name}: expected a 1-D uint8 tensor (Generator.get_state()), got "
                         f"{getattr(rng, 'dtype', type(rng).__name__)} "
                         f"{tuple(getattr(rng, 'shape', ()))}")
    return rng.detach().cpu().numpy()


_CPU_RNG_STATE_SIZE = int(torch.Generator().get_state().numel())


def _state_checksum(params: np.ndarray, rng: np.ndarray, schedule: str,
                    mask: np.ndarray | None, iteration: int, adapt: str | None = None,
                    accelerator: str | None = None) -> int:
    """64-bit checksum of one state row: the sum of the ensemble's bytes read as 64-bit
    words (mod 2^64; any changed word changes it) plus CRC-32 of the small items shifted
    into the high half. A CRC of the whole ensemble would cost ~4 ms per 15 MB, a tenth of
    an update; the word sum costs ~0.5 ms."""
    raw = np.ascontiguousarray(params).reshape(-1).view(np.uint8)
    n8 = raw.size // 8 * 8
    total = int(raw[:n8].view("<u8").sum(dtype=np.uint64)) if n8 else 0
    small = b"".join([raw[n8:].tobytes(), np.ascontiguousarray(rng).tobytes(),
                      schedule.encode("utf-8"),
                      b"" if mask is None else np.ascontiguousarray(mask).tobytes(),
                      int(iteration).to_bytes(8, "little", signed=True),
                      # the adaptation state's JSON only when there is one, so that the
                      # checksums of rows (and files) without one stay what they were
                      adapt.encode("utf-8") if adapt else b"",
                      # likewise the accelerator's (after a 0 byte: never ambiguous with
                      # an adaptation state's JSON, which does not hold one)
                      b"\0" + accelerator.encode("utf-8") if accelerator else b""])
    return (total + (zlib.crc32(small) << 32)) & 0xFFFF_FFFF_FFFF_FFFF


def _diagnostic_kind(name: str, value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "i1"
    if isinstance(value, (int, np.integer)):
        return "i8"
    if isinstance(value, (float, np.floating)):
        return "f8"
    raise TypeError(f"info[{name!r}]: expected a bool, int or float diagnostic, got "
                    f"{type(value).__name__}")


def _info_dict(info: Any, iteration: int) -> dict[str, Any]:
    if info is None:
        return {}
    if hasattr(info, "as_dict"):
        info = info.as_dict()
    if not isinstance(info, Mapping):
        raise TypeError(f"info: expected a StepInfo, a mapping or None, got {type(info).__name__}")
    out = dict(info)
    it = out.pop("iteration", iteration)
    if int(it) != iteration:
        raise ValueError(f"info: its iteration {it} does not match iteration={iteration}")
    for name in out:
        if name in _RESERVED:
            raise ValueError(f"info: diagnostic name {name!r} is reserved by the schema")
    return out


# -- the history policy ----------------------------------------------------------------
@dataclass(frozen=True)
class History:
    """Which iterations keep the whole ensemble (the diagnostics are always kept).

    Parameters
    ----------
    every : int or None
        Keep the parameters of iterations ``0, every, 2 every, ...``; ``None`` keeps only the
        final ensemble (with ``final=True``).
    final : bool
        Always keep the final ensemble (the ``append`` marked ``final=True``).
    predictions : bool
        Also keep the predictions ``(N_ens, N_obs)`` of each kept ensemble; with ``final``,
        the last forward evaluation (of the ensemble before the final update) is kept too.
    predictive : bool
        Keep the posterior predictive, the predictions of the final ensemble, at the final
        row when the run computes it (:func:`enkal.run` does for up to 10,000 outputs);
        the file then has a ``predictions`` variable even when ``predictions`` is False.
    compression : None, "gzip" or "lzf"
        HDF5 filter for the ensemble arrays (with byte shuffling). Off by default: ensembles
        are noise-like floats that compress poorly (see ``bench/storage.py``).
    compression_level : int
        gzip level 1-9.
    chunk_bytes : int
        Target size of one chunk of ``parameters``: a chunk is ``(1, n, N_par)``, a block of
        ``n`` whole members, which is contiguous in the members-first tensor, so an
        uncompressed iteration goes to disk as a few direct chunk writes, without copies.

    >>> History(every=10).keeps(20), History(every=10).keeps(25), History(every=None).keeps(5)
    (True, False, False)
    >>> History(every=None).keeps(5, final=True)
    True
    """

    every: int | None = 1
    final: bool = True
    predictions: bool = False
    predictive: bool = True
    compression: str | None = None
    compression_level: int = 1
    chunk_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if self.every is not None and (isinstance(self.every, bool) or
                                       not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"History.every: expected an int >= 1 or None, got {self.every!r}")
        for name in ("final", "predictions", "predictive"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"History.{name}: expected a bool, got {getattr(self, name)!r}")
        if self.compression not in (None, "gzip", "lzf"):
            raise ValueError(
                f"History.compression: expected None, 'gzip' or 'lzf', got {self.compression!r}"
            )
        if not isinstance(self.compression_level, int) or not 1 <= self.compression_level <= 9:
            raise ValueError(f"History.compression_level: expected an int in 1..9, got "
                             f"{self.compression_level!r}")
        if not isinstance(self.chunk_bytes, int) or self.chunk_bytes < 1024:
            raise ValueError(f"History.chunk_bytes: expected an int >= 1024, got "
                             f"{self.chunk_bytes!r}")

    def keeps(self, iteration: int, *, final: bool = False) -> bool:
        """Whether the ensemble of ``iteration`` is stored."""
        return (self.every is not None and iteration % self.every == 0) or \
            (final and self.final)

    def _filters(self) -> dict[str, Any]:
        if self.compression is None:
            return {}
        kw: dict[str, Any] = {"compression": self.compression, "shuffle": True}
        if self.compression == "gzip":
            kw["compression_opts"] = self.compression_level
        return kw
