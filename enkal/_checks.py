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
    "check_bool",
    "check_bool_vector",
    "check_buffer",
    "check_device",
    "check_ensemble",
    "check_generator",
    "check_generator_state",
    "check_instance",
    "check_iteration",
    "check_members_first",
    "check_finite",
    "check_positive_int",
    "check_fraction",
    "check_positive_float",
    "check_seed",
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
    x = x.detach()
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
    try:
        v = float(x)
    except OverflowError:  # an int beyond float64
        v = math.inf
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
    try:
        v = float(x)
    except OverflowError:  # an int beyond float64
        v = math.inf
    if not (0 < v <= 1):
        raise ValueError(f"{name}: expected a float in (0, 1], got {x}")


def check_bool(x: Any, name: str) -> None:
    """``True`` or ``False`` (a numpy bool too); ``TypeError`` for anything else, ints
    included (``progress=1`` is more likely a slip than a choice)."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool (True or False), got {_describe(x)}")


def check_device(device: Any, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``: ``TypeError`` for what is not a str, int (a CUDA
    index) or ``torch.device``, ``ValueError`` for a name torch does not know."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{name}: expected a torch.device or a str such as 'cpu' or 'cuda:0', "
                        f"got {_describe(device)}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{name}: expected a device such as 'cpu' or 'cuda:0', got "
                         f"{device!r} ({err})"[:300]) from None


def check_instance(obj: Any, name: str) -> None:
    """``TypeError`` when a class arrives where a configured object is expected
    (``rule=SquareRoot`` for ``rule=SquareRoot()``): its methods would be unbound."""
    if isinstance(obj, type):
        raise TypeError(f"{name}: expected an instance, got the class {obj.__name__}; did you "
                        f"mean {obj.__name__}()?")


def check_generator(g: Any, name: str = "generator") -> None:
    """``None`` or a ``torch.Generator`` (a seed is not one: ``torch.Generator().manual_seed(
    seed)`` makes one)."""
    if g is not None and not isinstance(g, torch.Generator):
        hint = ("; make one with torch.Generator().manual_seed(seed)"
                if isinstance(g, Integral) and not isinstance(g, bool) else "")
        raise TypeError(f"{name}: expected a torch.Generator or None, got {_describe(g)}{hint}")


def check_bool_vector(x: Any, name: str, n: int, size: str) -> None:
    """A bool tensor of shape ``(n,)`` (``size`` names ``n``: ``N_ens`` for a mask of members,
    ``N_par`` for one of parameters); ``TypeError`` for another type or dtype,
    ``ValueError`` for another shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a bool tensor of shape ({n},) = ({size},), got "
                        f"{_describe(x)}")
    if x.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor of shape ({n},) = ({size},), got "
                        f"dtype {x.dtype}; make it with a comparison or .bool()")
    if x.shape != (n,):
        raise ValueError(f"{name}: expected a bool tensor of shape ({n},) = ({size},), got "
                         f"shape {tuple(x.shape)}")


def check_buffer(out: Any, like: torch.Tensor, name: str = "out") -> None:
    """An output buffer for a tensor like ``like``: a tensor of its shape, dtype and device
    that does not require grad (``TypeError`` for another type, ``ValueError`` otherwise)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor buffer, got {_describe(out)}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{name}: expected shape {tuple(like.shape)}, dtype {like.dtype}, device "
            f"{like.device}; got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    if out.requires_grad:
        raise ValueError(f"{name}: expected a buffer that does not require grad, got one that "
                         "does (the update is not differentiated: pass a detached tensor)")


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2**64)``, what a ``torch.Generator`` takes (numpy ints
    too). A negative seed is a ``TypeError``, as it has always been for the smoother's seed
    (tests/test_smoother.py asserts it); ``2**64`` or more a ``ValueError``."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or int(seed) < 0:
        raise TypeError(f"{name}: expected a non-negative int, got {seed!r}"[:200])
    if int(seed) >= 2 ** 64:
        raise ValueError(f"{name}: expected an int below 2**64 (what a torch.Generator "
                         f"takes), got {seed}"[:200])
    return int(seed)


def check_iteration(value: Any, name: str) -> int:
    """An iteration count read back (a state dict's): an int ``>= 0``, or what ``int()``
    makes of a numpy or 0-d tensor integer or a digit string; ``ValueError`` otherwise."""
    try:
        it = int(value)
    except (TypeError, ValueError, RuntimeError):
        it = -1
    if isinstance(value, bool) or it < 0 or (isinstance(value, float) and value != it):
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}"[:200])
    return it


def check_generator_state(value: Any, name: str, device: torch.device) -> torch.Tensor:
    """A ``torch.Generator`` state read back: the CPU byte tensor that a generator on
    ``device`` accepts (``ValueError`` naming ``name`` otherwise)."""
    try:
        state = torch.as_tensor(value, dtype=torch.uint8).cpu()
        torch.Generator(device=device).set_state(state)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name}: expected the state of a {device.type} torch.Generator, got "
                         f"{_describe(value)} that does not restore one ({err})"[:300]
                         ) from None
    return state


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
