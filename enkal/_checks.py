"""Boundary validation shared by the public entry points.

Every user-facing function checks its inputs here and raises ``TypeError`` for a wrong
type and ``ValueError`` for a wrong value, naming the argument, what was expected and what
arrived ("Expected ..., got ..."), with a hint for the common mistakes. Nothing past the
boundary re-validates.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

__all__ = [
    "as_float_tensor",
    "check_ensemble",
    "check_members_first",
    "check_finite",
    "check_positive_int",
    "check_fraction",
    "check_positive_float",
    "cpu_numpy",
]


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    if isinstance(x, np.ndarray):
        return f"numpy array of shape {x.shape}, dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:200]


def as_float_tensor(
    x: Any,
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Turn numbers, sequences, numpy arrays or tensors into a floating tensor.

    Tensors keep their dtype and device unless ``dtype``/``device`` are given; integer and
    boolean inputs are refused (a silent cast hides bugs such as passing labels).
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, (np.ndarray, list, tuple)) or isinstance(x, Real):
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name}: expected a floating array-like, got {_describe(x)} ({err})"
            ) from None
    else:
        raise TypeError(
            f"{name}: expected a torch.Tensor, numpy array or sequence of floats, "
            f"got {_describe(x)}"
        )
    if not (t.is_floating_point()):
        if isinstance(x, torch.Tensor) or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name}: expected a floating dtype, got {_describe(x)}")
        t = t.to(torch.float64)
    if dtype is not None or device is not None:
        t = t.to(dtype=dtype or t.dtype, device=device or t.device)
    return t


def check_members_first(
    x: torch.Tensor, name: str, *, n_members: int | None = None, n_columns: int | None = None,
    columns: str = "N_par",
) -> None:
    """Check ``x`` is a 2-D ``(N_ens, columns)`` tensor with the expected sizes."""
    if x.ndim != 2:
        hint = ""
        if x.ndim == 1 and n_columns is not None and x.shape[0] == n_columns:
            hint = f"; one member: pass {name}[None] (shape (1, {columns}))"
        raise ValueError(
            f"{name}: expected a 2-D (N_ens, {columns}) tensor, members first, "
            f"got {x.ndim}-D with shape {tuple(x.shape)}{hint}"
        )
    rows, cols = x.shape
    if n_members is not None and n_columns is not None and (rows, cols) == (n_columns, n_members) \
            and rows != cols:
        raise ValueError(
            f"{name}: expected shape ({n_members}, {n_columns}) = (N_ens, {columns}), got "
            f"{tuple(x.shape)}. enkal expects members first: did you pass "
            f"({columns}, N_ens)? Transpose it with .T"
        )
    if n_members is not None and rows != n_members:
        raise ValueError(
            f"{name}: expected {n_members} members (rows, N_ens) to match the parameters, "
            f"got shape {tuple(x.shape)}"
        )
    if n_columns is not None and cols != n_columns:
        hint = ""
        if rows == n_columns:
            hint = (f". enkal expects members first: did you pass ({columns}, N_ens)? "
                    "Transpose it with .T")
        raise ValueError(
            f"{name}: expected {n_columns} columns ({columns}), i.e. expected shape "
            f"(N_ens, {n_columns}), got {tuple(x.shape)}{hint}"
        )


def check_ensemble(x: Any, name: str, *, n_columns: int | None = None,
                   columns: str = "N_par") -> None:
    """Check ``x`` is a floating ``(N_ens, columns)`` torch tensor, members first (the type,
    the dtype, then :func:`check_members_first`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (N_ens, {columns}), got "
                        f"{type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    check_members_first(x, name, n_columns=n_columns, columns=columns)


def check_finite(x: torch.Tensor, name: str) -> None:
    # One streaming reduction: a NaN/inf anywhere makes the sum non-finite, so a finite sum
    # proves every entry finite without the bool copy isfinite(x) builds (2x an update's
    # GEMM at N_par = 1e6, bench/update.py); only a non-finite sum pays for the exact check.
    if x.numel() == 0 or math.isfinite(float(x.sum())):
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf entries")


def check_positive_int(x: Any, name: str, *, minimum: int = 1, allow_none: bool = False) -> None:
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, Integral):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {_describe(x)}")
    if x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {x}")


def check_positive_float(x: Any, name: str, *, allow_zero: bool = False,
                         allow_none: bool = False) -> None:
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name}: expected a float, got {_describe(x)}")
    v = float(x)
    ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        rel = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite float {rel}, got {x}")


def check_fraction(x: Any, name: str, *, allow_none: bool = True) -> None:
    """A number in (0, 1]."""
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name}: expected a float in (0, 1], got {_describe(x)}")
    if not (0 < float(x) <= 1):
        raise ValueError(f"{name}: expected a float in (0, 1], got {x}")


def cpu_numpy(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous CPU numpy view or copy of ``t`` (floating dtypes numpy lacks, such as
    bfloat16, go to float32, which holds them exactly)."""
    t = t.detach()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.to(torch.float32)
    return np.ascontiguousarray(t.cpu().numpy())


def column_variance(x: torch.Tensor) -> torch.Tensor:
    """Ensemble variance of each column of a members-first block ``(N_ens, n)``, ``N_ens - 1``
    denominator, two-pass (mean first).

    The same numbers as ``x.var(dim=0)``; written out because torch's CPU reduction over the
    leading dimension is 2-6x slower for the short, wide blocks of an ensemble.
    """
    d = x - x.mean(dim=0, keepdim=True)
    return d.square_().sum(dim=0).div_(max(x.shape[0] - 1, 1))
