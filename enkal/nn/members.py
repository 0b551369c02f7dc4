"""Which parameters a step updates together (:class:`Sections`) and what happens to a
network's ensemble between steps (:class:`Redraw`, :class:`Carry`, :func:`kaiming_std`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_positive_float
from ..collapse import CollapseGuard
from ..ensemble import ParameterLayout
from .model import NeuralModel

__all__ = ["Sections", "Redraw", "Carry", "kaiming_std"]


# -- sections ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sections:
    """Split the parameters into sections, each updated with its own transform.

    Every section gets its own schedule state (so ``FixedAnnealing`` anneals each by its
    own largest variance), its own perturbation draws and its own collapse guard; the
    transform of a section is applied to its columns only (an ``(N_ens, section)`` GEMM).
    With :class:`~enkal.SquareRoot` and :class:`RelativeNoise` (the defaults) every section
    gets the same transform from the same predictions: sections then only cost time.

    Parameters
    ----------
    groups : sequence of sequences of str, optional
        Parameter tensor names per section (every trainable tensor in exactly one).
        Default: one section per named tensor.
    one_at_a_time : bool
        Section-wise perturbation: each step perturbs one section only (round robin): the
        forward sees the ensemble mean everywhere except that section's members, and only
        that section is updated. The prediction anomalies then come from that section
        alone (no spurious correlations with the others), for the same ``N_ens`` forwards
        per step; each section is updated every ``n_sections`` steps.
    """

    groups: tuple | None = None
    one_at_a_time: bool = False

    def __post_init__(self) -> None:
        if self.groups is not None:
            try:
                groups = tuple(tuple(str(n) for n in g) for g in self.groups)
            except TypeError:
                raise TypeError(
                    f"Sections.groups: expected a sequence of sequences of parameter names, "
                    f"got {self.groups!r}"[:200]
                ) from None
            if not groups or any(not g for g in groups):
                raise ValueError("Sections.groups: expected non-empty groups of names")
            if any(isinstance(g, str) for g in self.groups):
                raise TypeError(
                    "Sections.groups: expected sequences of names, got a bare string; "
                    "write groups=[['0.weight', '0.bias'], ...]"
                )
            object.__setattr__(self, "groups", groups)

    def resolve(self, layout: ParameterLayout) -> list[list[slice]]:
        """Column slices of each section."""
        blocks = {b.name: b for b in layout.blocks}
        if self.groups is None:
            return [[b.slice] for b in layout.blocks]
        seen: set[str] = set()
        out = []
        for g in self.groups:
            unknown = [n for n in g if n not in blocks]
            if unknown:
                raise ValueError(
                    f"Sections.groups: unknown parameter names {unknown}; the layout has "
                    f"{list(blocks)}"
                )
            dup = seen.intersection(g)
            if dup:
                raise ValueError(f"Sections.groups: {sorted(dup)} appear in two sections")
            seen.update(g)
            out.append([blocks[n].slice for n in g])
        missing = [n for n in blocks if n not in seen]
        if missing:
            raise ValueError(f"Sections.groups: parameters in no section: {missing}")
        return out


# -- what happens to the ensemble between steps ----------------------------------------------
def kaiming_std(module: nn.Module, names: Sequence[str]) -> dict[str, float]:
    """Kaiming standard deviation ``sqrt(2 / fan_in)`` of each named parameter of ``module``.

    ``fan_in`` of a tensor with at least two dimensions is ``shape[1] * prod(shape[2:])``
    (a linear layer's inputs; a convolution's input channels times its kernel size), as in
    ``torch.nn.init``. A one-dimensional parameter (a bias) takes the ``fan_in`` of its
    layer's ``weight`` when that has at least two dimensions; otherwise (a LayerNorm scale,
    a free vector) its own length.

    >>> from torch import nn
    >>> kaiming_std(nn.Linear(8, 3), ["weight", "bias"])
    {'weight': 0.5, 'bias': 0.5}
    """
    params = dict(module.named_parameters())
    out = {}
    for name in names:
        if name not in params:
            raise ValueError(f"names: {name!r} is not a parameter of the module; it has "
                             f"{list(params)[:20]}")
        p = params[name]
        if p.ndim >= 2:
            fan = p.shape[1] * math.prod(p.shape[2:])
        else:
            owner, _, _ = name.rpartition(".")
            w = params.get(f"{owner}.weight" if owner else "weight")
            fan = (w.shape[1] * math.prod(w.shape[2:])) if w is not None and w.ndim >= 2 \
                else p.numel()
        out[name] = math.sqrt(2.0 / max(int(fan), 1))
    return out


@dataclass(frozen=True)
class Redraw:
    """Redraw the ensemble around the current mean before every step (the default).

    Each step draws ``X = m + std * Z`` (``Z`` standard normal), computes one transform ``W``
    from the members' predictions, and keeps only the new mean ``m+ = (1^T W / N_ens) X``.
    The update is then a damped Gauss-Newton step in a fresh random ``(N_ens - 1)``-
    dimensional subspace every step (see ``docs/nn.md``). In the linear regime the step does
    not depend on the size of ``std`` (the relative noise rescales with it), only on its
    shape across parameters; its size sets how far from linear the members are.

    ``std`` per parameter:

    * ``scale="inputs"`` (the default): a weight matrix of a linear or convolution layer
      (``<module>.weight``, at least two dimensions) gets ``spread * sigma_l / r_l``, with
      ``sigma_l = sqrt(2 / fan_in)`` (:func:`kaiming_std`) and ``r_l`` the RMS of the
      layer's input on the step's batch, the mean network running it (one extra forward
      of the mean; ``NeuralModel.input_scales``; ``r_l`` floored at ``min_scale``): every
      layer's pre-activations are perturbed by about ``spread * sqrt(2)``, in the
      activations' own units, whatever the scale of its inputs (a head after global average
      pooling, whose small inputs would leave its weights unexplored). Other parameters
      (biases, LayerNorm scales) get ``spread * sigma_l``.
    * ``scale="kaiming"``: ``spread * sigma_l`` for every parameter (the default before
      issue #15, with ``spread=0.1``).

    Parameters
    ----------
    spread : float
        Exploration scale in units of the Kaiming std (default 0.03: smaller spreads keep
        ReLU switches and max-pool selections of the members closer to the mean's; 0.1
        changed 7-18% of them on a ReLU CNN, ``docs/nn.md`` 1.4).
    scale : {"inputs", "kaiming"}
        How the spread is shaped across layers.
    min_scale : float
        Floor of ``r_l`` (default ``1e-3``).
    """

    spread: float = 0.03
    scale: str = "inputs"
    min_scale: float = 1e-3

    def __post_init__(self) -> None:
        check_positive_float(self.spread, "Redraw.spread")
        if self.scale not in ("inputs", "kaiming"):
            raise ValueError(f"Redraw.scale: expected 'inputs' or 'kaiming', got "
                             f"{self.scale!r}")
        check_positive_float(self.min_scale, "Redraw.min_scale")

    def std(self, net: NeuralModel, inputs: torch.Tensor | None = None,
            mean: torch.Tensor | None = None, *,
            kaiming: dict[str, float] | None = None) -> torch.Tensor:
        """Per-parameter redraw std, ``(N_par,)`` on the model's device. With
        ``scale="inputs"``, ``inputs`` (a batch) and ``mean`` (``(N_par,)``) give the layers'
        input scales; without them the Kaiming shape is used (before the first step).
        ``kaiming``: :func:`kaiming_std` of the network's blocks, if already computed (it
        depends on the shapes only; the optimizer computes it once)."""
        if not isinstance(net, NeuralModel):
            raise TypeError(f"net: expected a NeuralModel, got {type(net).__name__}")
        sig = kaiming_std(net.module, [b.name for b in net.layout.blocks]) \
            if kaiming is None else kaiming
        scales: dict[str, float] = {}
        if self.scale == "inputs" and inputs is not None and mean is not None:
            scales = net.input_scales(mean, inputs)
        std = torch.empty(net.n_parameters, dtype=net.dtype, device=net.device)
        for b in net.layout.blocks:
            r = scales.get(b.name)
            s = self.spread * sig[b.name]
            std[b.slice] = s if r is None or not math.isfinite(r) else \
                s / max(r, self.min_scale)
        return std


@dataclass(frozen=True)
class Carry:
    """Carry the ensemble from step to step (classical EKI; the seed paper's literal
    variant), updating every member with ``X+ = W X``.

    Without additive noise the members stay in the span of the initial ensemble and the
    spread shrinks every step; ``guard`` redraws collapsed parameters
    (:class:`~enkal.CollapseGuard`, default ``CollapseGuard(threshold=1e-4, reset=1e-3)``).
    """

    guard: CollapseGuard | None = CollapseGuard(threshold=1e-4, reset=1e-3)

    def __post_init__(self) -> None:
        if self.guard is not None and not isinstance(self.guard, CollapseGuard):
            raise TypeError(f"Carry.guard: expected CollapseGuard or None, got "
                            f"{type(self.guard).__name__}")

    def prior(self, net: NeuralModel, n: int, prior_std: float | None,
              generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """The initial ensemble ``(n, N_par)`` in ``dtype``: the module's parameters plus
        ``prior_std`` (default per tensor the std of its entries, ``0.1`` for a constant
        one) times a standard normal draw from ``generator``."""
        theta = net.flatten(dtype)
        std = torch.empty(theta.numel(), dtype=dtype, device=net.device)
        for block in net.layout.blocks:
            if prior_std is not None:
                s = prior_std
            else:
                vals = theta[block.slice]
                s = float(vals.std()) if vals.numel() > 1 else 0.0
                s = s if s > 0 and math.isfinite(s) else 0.1
            std[block.slice] = s
        z = torch.randn(n, theta.numel(), generator=generator, dtype=dtype, device=net.device)
        return theta + std * z
