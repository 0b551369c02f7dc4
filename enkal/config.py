"""TOML configuration: strict key checking and typed strategy objects from tables.

Strategies are typed objects; in a TOML file they are tables with a ``type`` naming the class
and its fields, e.g. ``schedule = { type = "ESMDA", alphas = [4, 4, 4, 4] }``. The class is
looked up in an explicit registry (never by substring), every field is checked against the
dataclass, and unknown or missing keys raise a ``ValueError`` that names them and the place in
the file. TOML is parsed with the standard library (``tomllib``); nothing is evaluated.

>>> build_strategy("schedule", {"type": "ESMDA", "alphas": [2, 2]}, where="[smoother]")
ESMDA(alphas=(2.0, 2.0))
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
from typing import Any

from .acceleration import NesterovAccelerator
from .collapse import CollapseGuard
from .executors import Dask, InProcess
from .failures import IgnoreFailed, Raise, ResampleFailed
from .inversion import GaussNewton, UnscentedKalmanInversion
from .localization import CorrelationLocalSquareRoot, LocalSquareRoot, SECLocalSquareRoot
from .sampler import EKSStable, EnsembleKalmanSampler
from .schedule import ESMDA, DataMisfitController, FixedAnnealing, Iterations
from .update import PerturbedObservations, SquareRoot

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["STRATEGIES", "build_strategy", "check_keys", "load_toml", "describe"]

STRATEGIES: dict[str, dict[str, type]] = {
    "rule": {"SquareRoot": SquareRoot, "PerturbedObservations": PerturbedObservations,
             "EnsembleKalmanSampler": EnsembleKalmanSampler,
             "LocalSquareRoot": LocalSquareRoot,
             "CorrelationLocalSquareRoot": CorrelationLocalSquareRoot,
             "SECLocalSquareRoot": SECLocalSquareRoot,
             "GaussNewton": GaussNewton, "UnscentedKalmanInversion": UnscentedKalmanInversion},
    "schedule": {"FixedAnnealing": FixedAnnealing, "ESMDA": ESMDA,
                 "DataMisfitController": DataMisfitController, "EKSStable": EKSStable,
                 "Iterations": Iterations},
    "guard": {"CollapseGuard": CollapseGuard},
    "accelerator": {"NesterovAccelerator": NesterovAccelerator},
    "failure": {"ResampleFailed": ResampleFailed, "IgnoreFailed": IgnoreFailed, "Raise": Raise},
    "executor": {"InProcess": InProcess, "Dask": Dask},
}

MAX_CONFIG_BYTES = 1 << 20


def register_strategy(kind: str, cls: type) -> None:
    """Make ``cls`` available as ``{type = "<cls name>"}`` for ``kind`` (plugins use this)."""
    STRATEGIES.setdefault(kind, {})[cls.__name__] = cls


MAX_NESTING = 64


#: TOML's strings, each from its opening quote (a single-line one stops at a newline, where
#: the parser reports it unterminated; a multi-line one closes with up to two extra quotes)
_STRINGS = {
    '"""': re.compile(r'"""(?:[^"\\]|\\.|"(?!""))*"{3,5}', re.S),
    "'''": re.compile(r"'''(?:[^']|'(?!''))*'{3,5}"),
    '"': re.compile(r'"(?:[^"\\\n]|\\.)*"?'),
    "'": re.compile(r"'[^'\n]*'?"),
}
_STRING_OR_COMMENT = re.compile("[\"'#]")


def _toml_structure(text: str) -> str:
    """``text`` without its comments and with every string emptied to ``""`` (newlines
    kept): the brackets, keys and dots left are TOML's structure.

    >>> _toml_structure('a = ["[", "it\\'s"]  # it\\'s [\\nb = 1')
    'a = ["", ""]  \\nb = 1'
    """
    parts = []
    i, n = 0, len(text)
    while (m := _STRING_OR_COMMENT.search(text, i)) is not None:
        j = m.start()
        parts.append(text[i:j])
        if text[j] == "#":
            end = text.find("\n", j)
            i = n if end < 0 else end
            continue
        quote = text[j:j + 3] if text[j:j + 3] in _STRINGS else text[j]
        string = _STRINGS[quote].match(text, j)
        i = n if string is None else string.end()  # an unterminated multi-line string
        parts.append('""' + "\n" * text.count("\n", j, i))
    parts.append(text[i:])
    return "".join(parts)


def _screen_toml(text: str, path: str) -> None:
    """Refuse inputs that make the standard parser recurse deeply or go quadratic (counted
    outside strings and comments)."""
    structure = _toml_structure(text)
    depth = 0
    for ch in structure:
        if ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise ValueError(f"{path}: arrays/tables nested deeper than {MAX_NESTING} levels")
        elif ch in "]}":
            depth = max(depth - 1, 0)
    for lineno, line in enumerate(structure.splitlines(), 1):
        stripped = line.strip()
        key = stripped.split("]", 1)[0] if stripped.startswith("[") else \
            stripped.split("=", 1)[0] if "=" in stripped else ""
        if key.count(".") > MAX_NESTING:
            raise ValueError(f"{path}: line {lineno}: a key of more than {MAX_NESTING} "
                             "dotted parts")


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML file; errors name the file (and line, when the parser gives one).

    Only regular files of at most ``MAX_CONFIG_BYTES`` are read, and nesting deeper than
    ``MAX_NESTING`` is refused before parsing.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as err:
        raise ValueError(f"{path}: cannot read the configuration ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ValueError(f"{path}: cannot read the configuration ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: a configuration file larger than {MAX_CONFIG_BYTES} bytes "
                         "is refused")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 TOML: {err}") from None
    _screen_toml(text, path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to parse") from None


def check_keys(table: Any, *, where: str, required: tuple[str, ...] = (),
               optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check a TOML table has all ``required`` keys and nothing outside ``required + optional``."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table, got {type(table).__name__} {table!r}"[:200])
    missing = [k for k in required if k not in table]
    unknown = [k for k in table if k not in required and k not in optional]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing}")
        if unknown:
            parts.append(f"unknown key(s) {unknown}")
        allowed = sorted(required + optional)
        raise ValueError(f"{where}: {'; '.join(parts)} (allowed: {allowed})")
    return table


def build_strategy(kind: str, spec: Any, *, where: str) -> Any:
    """Build a typed strategy (``rule``, ``schedule``, ...) from ``{type = "...", ...}``."""
    registry = STRATEGIES.get(kind)
    if registry is None:
        raise ValueError(f"{where}: unknown strategy kind {kind!r}")
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(
            f"{where}: {kind} expected a table with a 'type' key, e.g. "
            f"{{ type = \"{next(iter(registry))}\" }}, got {spec!r}"[:300]
        )
    name = spec["type"]
    cls = registry.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"{where}: {kind} type {name!r} is not one of {sorted(registry)}")
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"{where}: {kind} {name} has no field(s) {unknown} (fields: {sorted(fields)})"
        )
    if "alphas" in kwargs and isinstance(kwargs["alphas"], list):
        kwargs["alphas"] = tuple(kwargs["alphas"])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {kind} {name}: {err}") from None


def describe(obj: Any) -> Any:
    """The inverse of :func:`build_strategy`: a plain table for a typed object."""
    if obj is None:
        return None
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out
    return {"type": type(obj).__name__}
