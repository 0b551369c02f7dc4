"""Parameter layouts: names, shapes, slices and constraints of a flat parameter vector.

An ensemble is a ``(N_ens, N_par)`` tensor; a :class:`ParameterLayout` says what its columns
are. Each block has a name, a shape (``()`` for a scalar, ``(out, in)`` for a weight matrix)
and a constraint. The smoother works in the *unconstrained* space ``u`` (where a Gaussian
prior and a linear update make sense); forward models receive the *physical* values
``phi``:

* :class:`Real` -- ``phi = u``;
* :class:`Positive` -- ``phi = exp(u)``;
* :class:`Bounded` ``(low, high)`` -- ``phi = low + (high - low) * sigmoid(u)``.

>>> layout = ParameterLayout([("sigma", (), Positive()), ("w", (2,))])
>>> layout.names
['sigma', 'w[0]', 'w[1]']
>>> import torch
>>> layout.to_physical(torch.zeros(1, 3, dtype=torch.float64))
tensor([[1., 0., 0.]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._checks import check_finite

__all__ = ["Real", "Positive", "Bounded", "Constraint", "ParameterBlock", "ParameterLayout"]


@dataclass(frozen=True)
class Real:
    """No constraint: ``phi = u``."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u

    def inverse(self, phi: torch.Tensor) -> torch.Tensor:
        return phi


@dataclass(frozen=True)
class Positive:
    """``phi = exp(u) > 0``."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.exp(u)

    def inverse(self, phi: torch.Tensor) -> torch.Tensor:
        if bool((phi <= 0).any()):
            raise ValueError("Positive: expected values > 0 to map to the unconstrained space")
        return torch.log(phi)


@dataclass(frozen=True)
class Bounded:
    """``phi = low + (high - low) * sigmoid(u)`` in ``(low, high)``."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(
                f"Bounded: expected finite low < high, got low={self.low}, high={self.high}"
            )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(u)

    def inverse(self, phi: torch.Tensor) -> torch.Tensor:
        if bool(((phi <= self.low) | (phi >= self.high)).any()):
            raise ValueError(
                f"Bounded: expected values strictly inside ({self.low}, {self.high})"
            )
        z = (phi - self.low) / (self.high - self.low)
        return torch.log(z) - torch.log1p(-z)


Constraint = Real | Positive | Bounded


@dataclass(frozen=True)
class ParameterBlock:
    """One named block of parameters: a tensor of ``shape`` at ``offset`` in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    constraint: Constraint = Real()

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)


def _as_block_spec(spec: Any) -> tuple[str, tuple[int, ...], Constraint]:
    if isinstance(spec, str):
        return spec, (), Real()
    if isinstance(spec, tuple) and 1 <= len(spec) <= 3 and isinstance(spec[0], str):
        name = spec[0]
        shape = tuple(spec[1]) if len(spec) > 1 else ()
        constraint = spec[2] if len(spec) > 2 else Real()
        if not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"layout: block {name!r} expected a shape of positive ints, got {shape}")
        if not isinstance(constraint, (Real, Positive, Bounded)):
            raise TypeError(
                f"layout: block {name!r} expected a constraint Real(), Positive() or "
                f"Bounded(low, high), got {constraint!r}"
            )
        return name, shape, constraint
    raise TypeError(
        "layout: expected a name or a (name, shape[, constraint]) tuple for each block, got "
        f"{spec!r}"[:200]
    )


class ParameterLayout:
    """The named blocks that make up the ``N_par`` columns of an ensemble.

    Parameters
    ----------
    blocks : iterable
        Each a name (scalar parameter) or a ``(name, shape[, constraint])`` tuple.
    """

    def __init__(self, blocks: Iterable[Any]) -> None:
        parsed = [_as_block_spec(b) for b in blocks]
        if not parsed:
            raise ValueError("layout: expected at least one parameter block, got none")
        names = [p[0] for p in parsed]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"layout: block names must be unique, repeated: {sorted(dup)}")
        offset = 0
        out = []
        for name, shape, constraint in parsed:
            block = ParameterBlock(name, shape, offset, constraint)
            out.append(block)
            offset += block.size
        self._blocks = tuple(out)
        self._size = offset

    @classmethod
    def flat(cls, n_parameters: int, name: str = "theta") -> ParameterLayout:
        """``n_parameters`` unconstrained parameters named ``theta[0]...``."""
        return cls([(name, (n_parameters,))])

    @classmethod
    def scalars(cls, names: Sequence[str]) -> ParameterLayout:
        return cls(list(names))

    @property
    def blocks(self) -> tuple[ParameterBlock, ...]:
        return self._blocks

    @property
    def size(self) -> int:
        """``N_par``."""
        return self._size

    @property
    def names(self) -> list[str]:
        """A readable name per column: ``sigma`` or ``w[0,1]``."""
        out: list[str] = []
        for b in self._blocks:
            if b.shape == ():
                out.append(b.name)
                continue
            for idx in torch.cartesian_prod(*[torch.arange(s) for s in b.shape]).reshape(
                    b.size, len(b.shape)).tolist():
                out.append(f"{b.name}[{','.join(str(i) for i in idx)}]")
        return out

    @property
    def is_unconstrained(self) -> bool:
        return all(isinstance(b.constraint, Real) for b in self._blocks)

    def to_physical(self, u: torch.Tensor) -> torch.Tensor:
        """Map unconstrained ``(N_ens, N_par)`` values to physical ones."""
        if self.is_unconstrained:
            return u
        out = torch.empty_like(u)
        for b in self._blocks:
            out[:, b.slice] = b.constraint.forward(u[:, b.slice])
        return out

    def to_unconstrained(self, phi: torch.Tensor) -> torch.Tensor:
        """Map physical ``(N_ens, N_par)`` values to the unconstrained space."""
        if self.is_unconstrained:
            return phi
        out = torch.empty_like(phi)
        for b in self._blocks:
            out[:, b.slice] = b.constraint.inverse(phi[:, b.slice])
        return out

    def unflatten(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split an ensemble ``(N_ens, N_par)`` into ``{name: (N_ens, *shape)}``, or one
        parameter vector ``(N_par,)`` into ``{name: shape}`` (views where possible).

        >>> layout = ParameterLayout([("w", (2, 3)), "b"])
        >>> layout.unflatten(torch.arange(7.0))["w"].shape
        torch.Size([2, 3])
        >>> layout.unflatten(torch.zeros(5, 7))["b"].shape
        torch.Size([5])
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor of shape (N_ens, {self.size}) or "
                            f"({self.size},), got {type(x).__name__}")
        if x.ndim not in (1, 2) or x.shape[-1] != self.size:
            raise ValueError(f"x: expected shape (N_ens, {self.size}) or ({self.size},) "
                             f"(N_par = {self.size}), got {tuple(x.shape)}")
        lead = tuple(x.shape[:-1])
        return {b.name: x[..., b.slice].reshape((*lead, *b.shape)) for b in self._blocks}

    def to_dict(self) -> list[dict]:
        """Plain, JSON-able description (for storage)."""
        rows = []
        for b in self._blocks:
            c = b.constraint
            cdesc: dict = {"type": type(c).__name__}
            if isinstance(c, Bounded):
                cdesc.update(low=c.low, high=c.high)
            rows.append({"name": b.name, "shape": list(b.shape), "offset": b.offset,
                         "constraint": cdesc})
        return rows

    @classmethod
    def from_dict(cls, rows: list[dict]) -> ParameterLayout:
        blocks = []
        kinds = {"Real": Real, "Positive": Positive, "Bounded": Bounded}
        for r in rows:
            c = r.get("constraint", {"type": "Real"})
            if c.get("type") not in kinds:
                raise ValueError(f"layout: unknown constraint {c.get('type')!r}")
            kw = {k: float(v) for k, v in c.items() if k in ("low", "high")}
            blocks.append((str(r["name"]), tuple(int(s) for s in r["shape"]),
                           kinds[c["type"]](**kw)))
        return cls(blocks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParameterLayout) and self._blocks == other._blocks

    def __repr__(self) -> str:
        inner = ", ".join(f"{b.name}{list(b.shape) if b.shape else ''}" for b in self._blocks)
        return f"ParameterLayout({inner}; N_par={self._size})"


def gaussian_ensemble(
    mean: Any,
    std: Any,
    n_members: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw an ``(n_members, N_par)`` ensemble from ``N(mean, diag(std^2))``.

    ``mean`` and ``std`` are scalars or ``(N_par,)`` vectors in the unconstrained space.
    """
    from ._checks import as_float_tensor, check_device, check_positive_int

    check_positive_int(n_members, "n_members", minimum=2)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype such as torch.float64, got "
                        f"{dtype!r}")
    device = check_device(device, "device")
    m = as_float_tensor(mean, "mean", dtype=dtype, device=device).reshape(-1)
    s = as_float_tensor(std, "std", dtype=dtype, device=device).reshape(-1)
    check_finite(m, "mean")
    check_finite(s, "std")
    if bool((s < 0).any()):
        raise ValueError("std: expected non-negative standard deviations")
    p = max(m.numel(), s.numel())
    if m.numel() not in (1, p) or s.numel() not in (1, p):
        raise ValueError(f"mean, std: expected matching lengths, got {m.numel()} and {s.numel()}")
    z = torch.randn(n_members, p, generator=generator, dtype=dtype, device=device)
    return m + s * z
