r"""Neural networks as ensembles: evaluate ``N_ens`` weight vectors of one ``nn.Module``, and
train it with ensemble Kalman updates like a torch optimizer.

Two levels, one implementation:

* :class:`NeuralModel` -- the ensemble forward of a module. Its trainable parameters are
  flattened, in ``module.named_parameters()`` order, through a :class:`ParameterLayout`
  whose block names are the parameters' names (``"0.weight"``, ``"fc1.bias"``), so an
  ensemble ``(N_ens, N_par)`` is stored and named like any other. ``predict(parameters,
  inputs)`` maps ``(N_ens, N_par)`` weights and a batch ``(B, ...)`` to outputs
  ``(N_ens, B, n_out)``, by ``torch.func`` (``functional_call`` on stacked parameters under
  ``vmap``) or by a loop over members (the same ``functional_call`` per member); both give
  the same outputs. ``with_inputs(inputs)`` is the :class:`~enkal.ForwardModel` of one fixed
  batch, ``(N_ens, N_par) -> (N_ens, B * n_out)``, for :class:`~enkal.EnsembleSmoother`.
* :class:`EnsembleKalmanOptimizer` -- ``opt.step(inputs, targets)`` on minibatches, the
  ensemble mean written into the module after every step so evaluation code is unchanged.
  :class:`HybridOptimizer` alternates it with a gradient optimizer (AdamW).

What a member's prediction is (:class:`Classification`, :class:`Regression`)
---------------------------------------------------------------------------
The update needs predictions ``(N_ens, N_obs)`` and observations ``y`` ``(N_obs,)`` with
``N_obs = B * n_out``:

* :class:`Classification` (default for integer class labels): a member's prediction is its
  softmax probabilities ``(B, C)`` flattened row by row, and ``y`` is the one-hot encoding
  of the labels (or given class probabilities, ``(B, C)`` floats). Probabilities beat raw
  logits as predictions (logits are unbounded; an update that matches one-hot targets in
  logit space pushes them to infinity). With ``probabilities=False`` the raw outputs are
  compared with the one-hot targets instead.
* :class:`Regression` (default for floating targets): the raw outputs against targets of
  shape ``(B, n_out)`` (or ``(B,)`` when ``n_out = 1``).

The noise is diagonal, ``noise_std = noise`` for every entry (in units of the mapped
targets: probabilities for classification), scaled by the schedule's ``rho`` (``alpha =
rho^2``). The default schedule, :class:`RelativeNoise`, sets ``rho`` from the spread of the
predictions instead, and the default :class:`Redraw` draws a fresh ensemble around the mean
every step (the researched recipe; ``docs/nn.md``).

Backends
--------
``backend="vmap"`` runs all members of a chunk in one batched call; ``"loop"`` calls the
module once per member. ``"auto"`` (default) uses a fixed, documented rule (deterministic,
so a resumed run repeats itself): the loop when the module has a convolution and computes on
a CPU (``vmap`` turns the members' convolutions into one grouped convolution, 2-3x slower
than separate ones on CPU; ``bench/forward.py``), or when a call holds fewer than
``AUTO_VMAP_MIN_MEMBERS`` members (vmap's fixed overhead dominates); ``vmap`` otherwise.
If ``vmap`` cannot batch an operation of the module, ``"auto"`` falls back to the loop.

Buffers (BatchNorm running statistics) are not parameters: they are shared, read-only, by
all members. A BatchNorm layer in training mode would update them from every member, and a
Dropout layer in training mode would make predictions random: both are refused with a
message (call ``module.eval()``). Parameters with ``requires_grad=False`` are frozen: they
stay out of the layout and out of the ensemble, like buffers.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
>>> model = NeuralModel(net)
>>> model.layout.size, [b.name for b in model.layout.blocks]
(26, ['0.weight', '0.bias', '2.weight', '2.bias'])
>>> theta = model.flatten().expand(5, -1)              # 5 identical members
>>> x = torch.randn(7, 3, dtype=torch.float64)
>>> out = model.predict(theta, x)
>>> out.shape, bool(torch.allclose(out[0], net(x)))
(torch.Size([5, 7, 2]), True)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import check_ensemble, check_positive_float, check_positive_int, column_variance
from .._types import StepInfo
from ..collapse import CollapseGuard
from ..ensemble import ParameterLayout
from ..executors import _check_devices, run_on_devices
from ..forward import ForwardModel
from ..observations import Observations
from ..schedule import SCHEDULE_STATES, check_schedule
from ..update import (
    SquareRoot,
    UpdateRule,
    _check_rule,
    apply_transform,
    draw_transform,
)

__all__ = [
    "NeuralModel",
    "BatchForward",
    "Classification",
    "Regression",
    "Sections",
    "EnsembleKalmanOptimizer",
    "HybridOptimizer",
    "Redraw",
    "Carry",
    "RelativeNoise",
    "RelativeNoiseState",
    "kaiming_std",
    "AUTO_VMAP_MIN_MEMBERS",
]

BACKENDS = ("auto", "vmap", "loop")
#: ``backend="auto"`` uses the loop when a call holds fewer members than this.
AUTO_VMAP_MIN_MEMBERS = 8
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return f"{type(x).__name__}"


def _check_stateless(module: nn.Module) -> None:
    """Refuse layers whose training-mode forward mutates buffers or draws random numbers."""
    for name, sub in module.named_modules():
        label = name or type(module).__name__
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            raise ValueError(
                f"module: the BatchNorm layer {label!r} is in training mode, where every "
                "member would update its running statistics (shared buffers). Call "
                "module.eval() first: the statistics are then fixed and shared by all "
                "members (or use GroupNorm/LayerNorm, which have no running statistics)"
            )
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            raise ValueError(
                f"module: the Dropout layer {label!r} is in training mode, which makes each "
                "member's predictions random. Call module.eval() first (ensemble Kalman "
                "training needs deterministic predictions; the ensemble is its own "
                "regulariser)"
            )


# -- the ensemble forward ----------------------------------------------------------------------
class NeuralModel:
    """The ensemble forward of an ``nn.Module``: ``N_ens`` weight vectors at once.

    Parameters
    ----------
    module : nn.Module
        The network. Its trainable parameters (``requires_grad=True``) form the layout;
        buffers and frozen parameters are shared by all members.
    backend : {"auto", "vmap", "loop"}
        How members are evaluated (see the module docstring; both give the same outputs).
    members_per_call : int, optional
        Members per batched call (bounds memory: a call holds ``members_per_call x B``
        activations). Default all members in one call, or two calls per device when
        several ``devices`` are given.
    device : torch.device or str, optional
        Where predictions are gathered and where the first thread computes. Default the
        module's device. When it differs from the module's (or ``dtype`` does) a copy of
        the module computes there; the module itself is never moved.
    dtype : torch.dtype, optional
        Precision of the computation (default the module's parameter dtype).
    devices : sequence of torch.device or str, optional
        Several devices: one thread each, taking the next chunk of members as soon as they
        finished the previous one (:func:`enkal.executors.run_on_devices`). Default
        ``[device]``.

    Attributes
    ----------
    layout : ParameterLayout
        One block per trainable parameter tensor, named as in ``module.named_parameters()``.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        backend: str = "auto",
        members_per_call: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        devices: Sequence[torch.device | str] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        check_positive_int(members_per_call, "members_per_call", allow_none=True)
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("module: expected at least one trainable parameter, got none")
        empty = [n for n, p in params if p.numel() == 0]
        if empty:
            raise ValueError(f"module: parameters with no entries are not supported: {empty}")
        first = params[0][1]
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) != 1 or not first.is_floating_point():
            raise TypeError(
                f"module: expected floating parameters of one dtype, got {sorted(map(str, dtypes))}"
            )
        if dtype is not None and (not isinstance(dtype, torch.dtype)
                                  or not dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.module = module
        self.backend = backend
        self.members_per_call = members_per_call
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.devices = (self.device,) if devices is None else _check_devices(devices, "devices")
        self._names = [n for n, _ in params]
        self._layout = ParameterLayout([(n, tuple(p.shape)) for n, p in params])
        self._has_conv = any(isinstance(m, _CONV) for m in module.modules())
        self._replicas: dict[int, nn.Module] = {}
        self._vmap_failed = False

    # -- layout and the module's own parameters ---------------------------------------------
    @property
    def layout(self) -> ParameterLayout:
        """One block per trainable tensor (names from ``module.named_parameters()``)."""
        return self._layout

    @property
    def n_parameters(self) -> int:
        """``N_par``."""
        return self._layout.size

    def _module_params(self) -> list[torch.Tensor]:
        named = dict(self.module.named_parameters())
        try:
            return [named[n] for n in self._names]
        except KeyError as err:
            raise ValueError(
                f"module: parameter {err} is gone; was the module changed after the "
                "NeuralModel was built?"
            ) from None

    def flatten(self) -> torch.Tensor:
        """The module's current trainable parameters as one vector ``(N_par,)``
        (on ``device``, in ``dtype``)."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1).to(self.device, self.dtype)
                              for p in self._module_params()])

    def load_into(self, vector: torch.Tensor) -> None:
        """Write a vector ``(N_par,)`` into the module's trainable parameters (in place, in
        the module's own device and dtype)."""
        if not isinstance(vector, torch.Tensor):
            raise TypeError(f"vector: expected a torch.Tensor, got {type(vector).__name__}")
        if vector.shape != (self.n_parameters,):
            hint = ""
            if vector.ndim == 2:
                hint = "; for an ensemble (N_ens, N_par) pass one member or the mean(0)"
            raise ValueError(
                f"vector: expected shape ({self.n_parameters},) = (N_par,), got "
                f"{tuple(vector.shape)}{hint}"
            )
        with torch.no_grad():
            for p, block in zip(self._module_params(), self._layout.blocks, strict=True):
                p.copy_(vector[block.slice].reshape(block.shape))

    # -- evaluation ----------------------------------------------------------------------------
    def _replica(self, index: int) -> nn.Module:
        """The module that the thread of ``devices[index]`` calls (never shared by threads)."""
        device = self.devices[index]
        first = self._module_params()[0]
        if index == 0 and device == first.device and self.dtype == first.dtype:
            return self.module
        rep = self._replicas.get(index)
        if rep is None:
            rep = copy.deepcopy(self.module).to(device=device, dtype=self.dtype)
            self._replicas[index] = rep
        else:  # buffers, frozen parameters and the mode follow the module
            with torch.no_grad():
                src = dict(self.module.named_buffers())
                for name, buf in rep.named_buffers():
                    if name in src:
                        buf.copy_(src[name])
                srcp = dict(self.module.named_parameters())
                for name, p in rep.named_parameters():
                    if not p.requires_grad and name in srcp:
                        p.copy_(srcp[name])
        rep.train(self.module.training)
        return rep

    def choose_backend(self, n_members: int, device: torch.device | str | None = None) -> str:
        """The backend of a call of ``n_members`` members on ``device`` (default ``device``):
        ``backend`` itself, or for ``"auto"`` the rule of the module docstring."""
        if self.backend != "auto":
            return self.backend
        device = self.device if device is None else torch.device(device)
        if self._vmap_failed or n_members < AUTO_VMAP_MIN_MEMBERS:
            return "loop"
        if self._has_conv and device.type == "cpu":
            return "loop"
        return "vmap"

    def _check_inputs(self, inputs: Any) -> None:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(
                f"inputs: expected a torch.Tensor of shape (B, ...), got {type(inputs).__name__}"
            )
        if inputs.ndim < 1 or inputs.shape[0] == 0:
            raise ValueError(
                f"inputs: expected a non-empty batch of shape (B, ...), got "
                f"{tuple(inputs.shape)}"
            )

    def _call(self, module: nn.Module, params: torch.Tensor, x: torch.Tensor,
              backend: str) -> torch.Tensor:
        """``(n, N_par)`` on the module's device -> ``(n, B, n_out)``."""
        n, b = params.shape[0], x.shape[0]
        blocks = self._layout.blocks
        if backend == "vmap":
            stacked = {blk.name: params[:, blk.slice].reshape(n, *blk.shape) for blk in blocks}

            def one(p):
                return torch.func.functional_call(module, p, (x,))

            out = torch.func.vmap(one)(stacked)
            return out.reshape(n, b, -1)
        outs = []
        for i in range(n):
            row = params[i]
            p = {blk.name: row[blk.slice].reshape(blk.shape) for blk in blocks}
            outs.append(torch.func.functional_call(module, p, (x,)).reshape(b, -1))
        return torch.stack(outs)

    def predict(self, parameters: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Outputs of every member on one batch.

        Parameters
        ----------
        parameters : Tensor, shape (N_ens, N_par)
            One weight vector per member (the layout's order).
        inputs : Tensor, shape (B, ...)
            A batch, as the module takes it (floating inputs are cast to ``dtype``).

        Returns
        -------
        Tensor, shape (N_ens, B, n_out)
            On ``device``, in ``dtype``; a module's output ``(B, ...)`` is flattened per
            sample.
        """
        check_ensemble(parameters, "parameters", n_columns=self.n_parameters)
        self._check_inputs(inputs)
        _check_stateless(self.module)
        n = parameters.shape[0]
        if n == 0:
            raise ValueError("parameters: expected at least one member (row), got none")
        ndev = len(self.devices)
        step = self.members_per_call or (max(1, math.ceil(n / (2 * ndev))) if ndev > 1
                                         else max(n, 1))
        spans = [(a, min(a + step, n)) for a in range(0, n, step)]
        modules = {i: self._replica(i) for i in range(min(ndev, len(spans)) or 1)}
        xs: dict[int, torch.Tensor] = {}
        for i in modules:
            x = inputs.to(self.devices[i])
            xs[i] = x.to(self.dtype) if x.is_floating_point() else x

        def work(index: int, a: int, b: int) -> torch.Tensor:
            module, x = modules[index], xs[index]
            chunk = parameters[a:b].to(device=self.devices[index], dtype=self.dtype)
            backend = self.choose_backend(b - a, self.devices[index])
            try:
                with torch.no_grad():
                    if backend == "vmap" and self.backend == "auto":
                        try:
                            out = self._call(module, chunk, x, "vmap")
                        except RuntimeError:  # an op vmap cannot batch? the loop decides
                            out = self._call(module, chunk, x, "loop")  # re-raises a real error
                            self._vmap_failed = True
                    else:
                        out = self._call(module, chunk, x, backend)
            except Exception as err:
                if hasattr(err, "add_note"):  # Python >= 3.11: say where it happened
                    err.add_note(
                        f"enkal.NeuralModel: while running {type(self.module).__name__} on "
                        f"inputs of shape {tuple(inputs.shape)} ({inputs.dtype}) for members "
                        f"{a}:{b} on {self.devices[index]}; check the input shape and dtype")
                raise
            return out.to(self.device)

        results = run_on_devices(work, spans, [self.devices[i] for i in modules])
        if len(spans) == 1:
            return results[spans[0]]
        return torch.cat([results[s] for s in spans])

    def output_size(self, inputs: torch.Tensor) -> int:
        """``n_out``: the length of one sample's (flattened) output."""
        self._check_inputs(inputs)
        return int(self.predict(self.flatten()[None], inputs[:1]).shape[2])

    def with_inputs(self, inputs: torch.Tensor, *, output: Any = None) -> BatchForward:
        """The :class:`~enkal.ForwardModel` of one fixed batch:
        ``(N_ens, N_par) -> (N_ens, B * n_out)``.

        ``output`` maps the outputs to predictions: :class:`Regression` (default, the raw
        outputs) or :class:`Classification` (softmax probabilities).
        """
        return BatchForward(self, inputs, output=output)

    def replicate(self, device: torch.device | str) -> NeuralModel:
        """An independent :class:`NeuralModel` of a copy of the module on ``device``."""
        module = copy.deepcopy(self.module).to(device=torch.device(device), dtype=self.dtype)
        return NeuralModel(module, backend=self.backend, members_per_call=self.members_per_call)

    def __repr__(self) -> str:
        return (f"NeuralModel({type(self.module).__name__}, N_par={self.n_parameters}, "
                f"backend={self.backend!r}, device={self.device}, dtype={self.dtype})")


# -- output and target mappings ----------------------------------------------------------------
@dataclass(frozen=True)
class Regression:
    """Predictions are the raw outputs; targets are floats of shape ``(B, n_out)`` (or
    ``(B,)`` when ``n_out = 1``)."""

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(N_ens, B, n_out) -> (N_ens, B * n_out)``."""
        return outputs.reshape(outputs.shape[0], -1)

    def targets(self, targets: Any, batch: int, n_out: int) -> torch.Tensor:
        """Targets ``(B, n_out)`` -> observations ``(B * n_out,)`` (float64)."""
        if not isinstance(targets, torch.Tensor) or not targets.is_floating_point():
            raise TypeError(
                f"targets: expected a floating tensor of shape ({batch}, {n_out}) for "
                f"Regression, got {_describe(targets)}; class labels need Classification()"
            )
        if targets.shape not in ((batch, n_out),) and not (n_out == 1 and
                                                           targets.shape == (batch,)):
            raise ValueError(
                f"targets: expected shape ({batch}, {n_out}) = (B, n_out) to match the inputs "
                f"and the network's output, got {tuple(targets.shape)}"
            )
        return targets.detach().reshape(-1).to(torch.float64)


@dataclass(frozen=True)
class Classification:
    """Class probabilities against one-hot labels.

    Parameters
    ----------
    probabilities : bool
        Predictions are ``softmax(outputs)`` (default; measured better than logits), else
        the raw outputs.
    """

    probabilities: bool = True

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(N_ens, B, C) -> (N_ens, B * C)``: softmax over classes, flattened by sample."""
        if self.probabilities:
            outputs = torch.softmax(outputs, dim=-1)
        return outputs.reshape(outputs.shape[0], -1)

    def targets(self, targets: Any, batch: int, n_out: int) -> torch.Tensor:
        """Labels ``(B,)`` (int) or class probabilities ``(B, C)`` -> ``(B * C,)`` float64."""
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
        if targets.is_floating_point():
            if targets.shape != (batch, n_out):
                raise ValueError(
                    f"targets: expected class probabilities of shape ({batch}, {n_out}) = "
                    f"(B, C) or integer labels ({batch},), got {tuple(targets.shape)}"
                )
            return targets.detach().reshape(-1).to(torch.float64)
        if targets.dtype == torch.bool or targets.is_complex():
            raise TypeError(f"targets: expected integer class labels, got {targets.dtype}")
        if targets.shape != (batch,):
            raise ValueError(
                f"targets: expected integer class labels of shape ({batch},) = (B,) to match "
                f"the inputs, got {tuple(targets.shape)}"
            )
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= n_out:
            raise ValueError(
                f"targets: expected labels in [0, {n_out - 1}] (the network has {n_out} "
                f"outputs), got labels from {lo} to {hi}"
            )
        onehot = torch.zeros(batch, n_out, dtype=torch.float64, device=targets.device)
        onehot[torch.arange(batch, device=targets.device), targets.long()] = 1.0
        return onehot.reshape(-1)


def _check_output_map(output: Any, name: str = "output") -> None:
    if not isinstance(output, (Regression, Classification)):
        raise TypeError(
            f"{name}: expected Regression() or Classification(), got {type(output).__name__}"
        )


class BatchForward(ForwardModel):
    """:class:`~enkal.ForwardModel` of a network on one fixed batch (from
    :meth:`NeuralModel.with_inputs`): ``(n, N_par) -> (n, B * n_out)``, the outputs mapped by
    ``output`` (:class:`Regression` or :class:`Classification`) and flattened by sample."""

    def __init__(self, net: NeuralModel, inputs: torch.Tensor, *, output: Any = None) -> None:
        if not isinstance(net, NeuralModel):
            raise TypeError(f"net: expected a NeuralModel, got {type(net).__name__}")
        output = Regression() if output is None else output
        _check_output_map(output)
        net._check_inputs(inputs)
        self.net = net
        self.inputs = inputs
        self.output = output
        self.device = net.device
        self.dtype = net.dtype
        self._n_out = net.output_size(inputs)

    @property
    def layout(self) -> ParameterLayout:
        return self.net.layout

    @property
    def output_size(self) -> int:
        return self.inputs.shape[0] * self._n_out

    def forward(self, parameters: torch.Tensor) -> torch.Tensor:
        return self.output.predictions(self.net.predict(parameters, self.inputs))

    def replicate(self, device: torch.device | str) -> BatchForward:
        """An independent copy computing on ``device`` (for
        :class:`~enkal.executors.MultiDevice`)."""
        return BatchForward(self.net.replicate(device), self.inputs.to(device),
                            output=self.output)


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


def _columns(x: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    if len(slices) == 1:
        return x[:, slices[0]]
    return torch.cat([x[:, s] for s in slices], dim=1)


def _set_columns(x: torch.Tensor, slices: list[slice], values: torch.Tensor) -> None:
    start = 0
    for s in slices:
        k = s.stop - s.start
        x[:, s] = values[:, start:start + k]
        start += k


# -- what happens to the ensemble between steps, and the relative noise ----------------------
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

    Each step draws ``X = m + spread * sigma_l * Z`` (``Z`` standard normal, ``sigma_l`` the
    Kaiming std :func:`kaiming_std` of the parameter's layer, biases included), computes one
    transform ``W`` from the members' predictions, and keeps only the new mean
    ``m+ = (1^T W / N_ens) X``. The update is then a damped Gauss-Newton step in a fresh
    random ``(N_ens - 1)``-dimensional subspace every step (see ``docs/nn.md``).

    Parameters
    ----------
    spread : float
        Exploration scale in units of the Kaiming std (default 0.1; 0.3 and 1.0 measured
        worse on digits).
    """

    spread: float = 0.1

    def __post_init__(self) -> None:
        check_positive_float(self.spread, "Redraw.spread")

    def std(self, net: NeuralModel) -> torch.Tensor:
        """Per-parameter redraw std ``spread * sigma_l``, ``(N_par,)`` on the model's device."""
        if not isinstance(net, NeuralModel):
            raise TypeError(f"net: expected a NeuralModel, got {type(net).__name__}")
        sig = kaiming_std(net.module, [b.name for b in net.layout.blocks])
        std = torch.empty(net.n_parameters, dtype=net.dtype, device=net.device)
        for b in net.layout.blocks:
            std[b.slice] = self.spread * sig[b.name]
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


@dataclass(frozen=True)
class RelativeNoiseState:
    iteration: int = 0


@dataclass(frozen=True)
class RelativeNoise:
    r"""Noise relative to the predictions' spread, growing over the run (a schedule).

    At step ``t`` (from 0) the noise variance is ``rho^2 = gamma_t * lambda``, with
    ``lambda = sum(D^2) / (N_ens - 1)^2`` the mean nonzero eigenvalue of the prediction
    sample covariance (``D`` the prediction anomalies). The whitened anomalies then satisfy
    ``sum Sig^2 = (N_ens - 1) / gamma_t`` whatever the scale of the outputs, so no floor is
    needed: a step moves each whitened direction by about ``1 / gamma_t``. ``gamma_t`` grows
    geometrically from ``gamma_0`` to ``gamma_end = max(final_gamma, growth * gamma_0)``
    over ``steps`` updates and then stays there (a learning-rate decay: smaller steps late):
    ``gamma_t = gamma_0 * (gamma_end / gamma_0) ** min(t / steps, 1)``.

    ``gamma="auto"`` (the default) sets ``gamma_0`` from the run's *coverage*
    ``c = steps * (N_ens - 1) / N_par``, how many of the ensemble's random directions fall
    on each parameter direction over the run: ``gamma_0 = max(min_gamma, c / budget)``, so
    that ``c / gamma_0``, the run's movement per parameter direction, is ``budget``. Many
    passes of a large ensemble over a small network take small steps (averaging the
    minibatches); few passes over a large network take the largest safe steps
    (``min_gamma``). Measured on digits (``docs/nn.md``): the best ``gamma_0`` was 3-5 at
    ``c = 2``, 5 at ``c = 3``, 5-10 at ``c = 6``, 20 at ``c = 12``; Fashion-MNIST LeNet-5
    (``c = 0.7``) takes ``min_gamma``. ``N_par`` is the number of columns the schedule sees
    (the section's, pruned ones included). The rule is for minibatch training, where every
    step sees new data; with :class:`~enkal.EnsembleSmoother` on one fixed data set, give
    ``gamma`` as a number.

    The returned ``alpha`` is ``rho^2`` divided by the observations' mean noise variance
    (``noise^2``), so the optimizer's ``noise`` does not matter.

    Parameters
    ----------
    gamma : float or "auto"
        ``gamma_0``, the damping at the start (default ``"auto"``).
    growth : float
        Least factor by which ``gamma`` grows over the run (default 3; ``1`` with
        ``final_gamma=None`` keeps it constant).
    final_gamma : float or None
        Least damping at the end (default 30).
    steps : int
        Planned number of updates (default 500): set it to your run's length, as for a
        learning-rate schedule.
    min_gamma, budget : float
        Of ``gamma="auto"`` (defaults 3 and 0.6).
    """

    gamma: float | str = "auto"
    growth: float = 3.0
    final_gamma: float | None = 30.0
    steps: int = 500
    min_gamma: float = 3.0
    budget: float = 0.6

    def __post_init__(self) -> None:
        if self.gamma != "auto":
            if isinstance(self.gamma, str):
                raise ValueError(f"RelativeNoise.gamma: expected a float > 0 or 'auto', got "
                                 f"{self.gamma!r}")
            check_positive_float(self.gamma, "RelativeNoise.gamma")
        check_positive_float(self.growth, "RelativeNoise.growth")
        check_positive_float(self.final_gamma, "RelativeNoise.final_gamma", allow_none=True)
        check_positive_int(self.steps, "RelativeNoise.steps")
        check_positive_float(self.min_gamma, "RelativeNoise.min_gamma")
        check_positive_float(self.budget, "RelativeNoise.budget")
        if self.growth < 1:
            raise ValueError(f"RelativeNoise.growth: expected a float >= 1 (gamma grows: "
                             f"smaller steps late), got {self.growth}")

    def initial_gamma(self, n_members: int | None = None,
                      n_parameters: int | None = None) -> float:
        """``gamma_0``: the given number, or for ``"auto"``
        ``max(min_gamma, steps * (n_members - 1) / n_parameters / budget)``.

        >>> RelativeNoise(steps=460).initial_gamma(64, 2410)   # digits MLP: c = 12
        20.04...
        >>> RelativeNoise(steps=705).initial_gamma(64, 61706)  # LeNet-5: c = 0.72
        3.0
        """
        if self.gamma != "auto":
            return float(self.gamma)
        if n_members is None or n_parameters is None:
            raise ValueError("RelativeNoise.gamma='auto' needs n_members and n_parameters "
                             "(the ensemble's shape)")
        coverage = self.steps * (n_members - 1) / max(n_parameters, 1)
        return max(self.min_gamma, coverage / self.budget)

    def gamma_at(self, iteration: int, n_members: int | None = None,
                 n_parameters: int | None = None) -> float:
        """``gamma_t`` of step ``iteration`` (counted from 0); the ensemble's shape is needed
        for ``gamma="auto"``."""
        g0 = self.initial_gamma(n_members, n_parameters)
        end = self.growth * g0 if self.final_gamma is None else \
            max(self.final_gamma, self.growth * g0)
        return g0 * (end / g0) ** min(iteration / self.steps, 1.0)

    @staticmethod
    def eigenvalue(predictions: torch.Tensor) -> float:
        """``sum(D^2) / (N_ens - 1)^2`` of predictions ``(N_ens, N_obs)``."""
        e = predictions.shape[0]
        d = predictions.to(torch.float64)
        d = d - d.mean(dim=0)
        return float(d.square().sum()) / (e - 1) ** 2

    def init(self) -> RelativeNoiseState:
        return RelativeNoiseState()

    def step(self, state: RelativeNoiseState, *, parameters: torch.Tensor,
             predictions: torch.Tensor, observations: Observations):
        gamma = self.gamma_at(state.iteration, *parameters.shape)
        rho2 = max(gamma * self.eigenvalue(predictions), 1e-30)
        var = float(observations.noise_std.to(torch.float64).square().mean())
        new = RelativeNoiseState(iteration=state.iteration + 1)
        return rho2 / var, new, {"gamma": gamma, "rho": math.sqrt(rho2)}

    def done(self, state: RelativeNoiseState) -> bool:
        return False


_STATES = {**SCHEDULE_STATES, "RelativeNoise": RelativeNoiseState}


# -- the optimizer ----------------------------------------------------------------------------
class EnsembleKalmanOptimizer:
    r"""Train an ``nn.Module`` with ensemble Kalman updates, used like a torch optimizer.

    Each :meth:`step` runs the ensemble on a minibatch, maps outputs and targets
    (:class:`Classification` / :class:`Regression`), computes one
    :func:`~enkal.ensemble_transform` and writes the new mean into ``model``: code that
    evaluates ``model`` needs no change.

    The default is the researched recipe (``docs/nn.md``): ``members=Redraw(0.1)`` (every
    step a fresh ensemble around the mean, Kaiming-relative spread; only the new mean is
    kept), ``rule=SquareRoot()``, ``schedule=RelativeNoise()`` (noise relative to the
    predictions' spread, growing: a step-size decay; its size from the run's coverage, so
    tell it the run's length: ``RelativeNoise(steps=...)``). Digits MLP 64-32-10, ``E=64``,
    20 epochs (``steps=460``): 0.96. The seed paper's literal variant carries
    the ensemble: ``members=Carry(CollapseGuard(1e-4, 1e-3)), rule=PerturbedObservations(),
    schedule=FixedAnnealing(0.75, initial=1.0, floor=0.1)`` (0.91-0.93 there).

    Parameters
    ----------
    model : nn.Module
        The network; its trainable parameters are the unknowns (see :class:`NeuralModel`).
    ensemble_size : int
        ``N_ens`` (at least 2).
    noise : float
        Observation noise standard deviation in units of the mapped targets
        (probabilities for classification), scaled by the schedule's ``rho``. Irrelevant
        for :class:`RelativeNoise` (which sets the noise from the predictions).
    rule : SquareRoot or PerturbedObservations
        Default :class:`~enkal.SquareRoot`.
    schedule : RelativeNoise, FixedAnnealing, ESMDA, DataMisfitController or compatible
        Noise per step. Default ``RelativeNoise()`` (``gamma="auto"``, ``steps=500``): pass
        ``RelativeNoise(steps=n)`` with your run's number of updates. ``FixedAnnealing(factor=0.75,
        initial=1.0, floor=0.1)`` is the seed paper's absolute annealing (with a floor);
        ``FixedAnnealing(factor=1.0, initial=r, floor=r)`` keeps ``rho = r``.
    members : Redraw or Carry
        What happens to the ensemble between steps. Default ``Redraw(spread=0.1)``;
        ``Carry(guard=CollapseGuard(1e-4, 1e-3))`` is classical EKI with collapse redraws.
    task : Classification, Regression or None
        How outputs and targets become predictions and observations; ``None`` picks
        :class:`Classification` for integer targets and :class:`Regression` for floating
        ones, at each step.
    prior_std : float, optional
        With :class:`Carry`: spread of the initial ensemble around the module's current
        parameters. Default: per tensor, the standard deviation of its current entries
        (its initialisation scale; ``0.1`` for a constant tensor such as a LayerNorm
        weight). With :class:`Redraw` the spread is ``Redraw.std`` and ``prior_std`` must
        be ``None``.
    sections : Sections, optional
        Update sections of parameters with their own transforms (default: one section).
    seed : int
        Seed of the optimizer's ``torch.Generator`` (prior, perturbations, redraws).
    device, dtype :
        Where and in what precision the ensemble lives and computes (default the model's).
    backend, members_per_call, devices :
        As for :class:`NeuralModel`.
    chunk_size : int, optional
        Parameter columns per GEMM block of the update.

    Attributes
    ----------
    ensemble : Tensor, shape (N_ens, N_par)
        The members (read it; do not modify it in place). With :class:`Redraw` the members
        drawn at the last step, whose predictions are ``last_predictions`` (before the
        first step: a draw around the initial mean); their mean is not the model's
        parameters (those are :attr:`mean`).
    mean : Tensor, shape (N_par,)
        The current mean, written into ``model`` (with :class:`Carry`, the members' mean).
    last_predictions, last_observations, last_errors :
        Of the last step: predictions ``(N_ens, N_obs)`` of ``ensemble`` before the update,
        observations ``(N_obs,)``, and errors ``predictions - observations``; ``None``
        before the first step. With one-at-a-time sections they are those of the
        perturbed section's forward.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        ensemble_size: int = 64,
        noise: float = 1.0,
        rule: UpdateRule = SquareRoot(),
        schedule: Any = RelativeNoise(),
        members: Redraw | Carry = Redraw(),
        task: Classification | Regression | None = None,
        prior_std: float | None = None,
        sections: Sections | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        members_per_call: int | None = None,
        devices: Sequence[torch.device | str] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        check_positive_int(ensemble_size, "ensemble_size", minimum=2)
        check_positive_float(noise, "noise")
        _check_rule(rule)
        check_schedule(schedule)
        if not isinstance(members, (Redraw, Carry)):
            raise TypeError(f"members: expected Redraw(...) or Carry(...), got "
                            f"{type(members).__name__}")
        if isinstance(members, Redraw) and prior_std is not None:
            raise ValueError("prior_std: only used with members=Carry(...); Redraw draws "
                             "with spread * Kaiming std (Redraw.std)")
        if task is not None:
            _check_output_map(task, "task")
        check_positive_float(prior_std, "prior_std", allow_none=True)
        if sections is not None and not isinstance(sections, Sections):
            raise TypeError(f"sections: expected Sections(...) or None, got "
                            f"{type(sections).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TypeError(f"seed: expected a non-negative int, got {seed!r}")
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        self.model = model
        self.net = NeuralModel(model, backend=backend, members_per_call=members_per_call,
                               device=device, dtype=dtype, devices=devices)
        self.ensemble_size = int(ensemble_size)
        self.noise = float(noise)
        self.rule = rule
        self.schedule = schedule
        self.members = members
        self.task = task
        self.prior_std = prior_std
        self.sections = sections
        self.seed = seed
        self.chunk_size = chunk_size
        layout = self.net.layout
        self._sections = sections.resolve(layout) if sections is not None \
            else [[slice(0, layout.size)]]
        self._generator = torch.Generator(device=self.net.device).manual_seed(seed)
        self._schedule_states = [schedule.init() for _ in self._sections]
        self._iteration = 0
        self.mask: torch.Tensor | None = None
        self._redraw_std: torch.Tensor | None = None
        if isinstance(members, Redraw):
            self._redraw_std = members.std(self.net)
            self._mean = self.net.flatten()
            self.ensemble = self._draw()
        else:
            self.ensemble = self._prior()
            self._mean = self.ensemble.mean(dim=0)
        self.last_predictions: torch.Tensor | None = None
        self.last_observations: torch.Tensor | None = None
        self._write_mean()

    # -- construction ------------------------------------------------------------------------
    def _prior(self) -> torch.Tensor:
        theta = self.net.flatten()
        n, p = self.ensemble_size, theta.numel()
        std = torch.empty(p, dtype=self.net.dtype, device=self.net.device)
        for block in self.net.layout.blocks:
            if self.prior_std is not None:
                s = self.prior_std
            else:
                vals = theta[block.slice]
                s = float(vals.std()) if vals.numel() > 1 else 0.0
                s = s if s > 0 and math.isfinite(s) else 0.1
            std[block.slice] = s
        z = torch.randn(n, p, generator=self._generator, dtype=self.net.dtype,
                        device=self.net.device)
        return theta + std * z

    def _draw(self, section: list[slice] | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """``m + std * Z`` (``Z`` from ``generator``, default the optimizer's; all columns
        drawn); with ``section`` only those columns deviate from the mean."""
        std = self._redraw_std
        if self.mask is not None:
            std = std * self.mask
        if section is not None:
            keep = torch.zeros_like(std)
            for s in section:
                keep[s] = 1
            std = std * keep
        z = torch.randn(self.ensemble_size, self.net.n_parameters,
                        generator=self._generator if generator is None else generator,
                        dtype=self.net.dtype, device=self.net.device)
        return z.mul_(std).add_(self._mean)  # m + std * Z without (N_ens, N_par) temporaries

    @property
    def guard(self) -> CollapseGuard | None:
        """``members.guard`` with :class:`Carry`, else ``None``."""
        return self.members.guard if isinstance(self.members, Carry) else None

    @property
    def mean(self) -> torch.Tensor:
        """The current mean ``(N_par,)`` (a copy), the parameters written into ``model``."""
        return self._mean.clone()

    @property
    def layout(self) -> ParameterLayout:
        """The parameters' layout (one block per trainable tensor)."""
        return self.net.layout

    @property
    def iteration(self) -> int:
        """Updates done so far."""
        return self._iteration

    @property
    def last_errors(self) -> torch.Tensor | None:
        """``last_predictions - last_observations``, ``(N_ens, N_obs)``, or ``None``."""
        if self.last_predictions is None:
            return None
        return self.last_predictions - self.last_observations.to(self.last_predictions.dtype)

    def _write_mean(self) -> None:
        if self._redraw_std is None:
            self._mean = self.ensemble.mean(dim=0)
        self.net.load_into(self._mean)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Prune: parameters where ``mask`` is ``False`` are set to zero in every member and
        stay zero (never updated, never redrawn). ``None`` makes every parameter live again:
        pruned ones restart from zero (with :class:`Redraw` they are drawn again from the
        next step; with :class:`Carry` they have no spread, so only a collapse-guard redraw
        revives them)."""
        p = self.net.n_parameters
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask: expected a bool tensor of shape ({p},), got "
                                f"{_describe(mask)}")
            if mask.shape != (p,):
                raise ValueError(f"mask: expected shape ({p},) = (N_par,), got "
                                 f"{tuple(mask.shape)}")
            mask = mask.to(self.ensemble.device)
            self.ensemble[:, ~mask] = 0
            self._mean[~mask] = 0
        self.mask = mask
        self._write_mean()

    # -- one update --------------------------------------------------------------------------
    def _task_for(self, targets: Any) -> Classification | Regression:
        if self.task is not None:
            return self.task
        if isinstance(targets, torch.Tensor) and not targets.is_floating_point() and \
                targets.dtype != torch.bool:
            return Classification()
        return Regression()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepInfo:
        """One ensemble Kalman update on a minibatch; the mean is written into the model.

        Parameters
        ----------
        inputs : Tensor, shape (B, ...)
        targets : Tensor
            Integer labels ``(B,)`` or class probabilities ``(B, C)`` (classification), or
            floats ``(B, n_out)`` (regression).

        Returns
        -------
        StepInfo
            ``misfit`` (mean over members of ``||(Yh_j - y) / noise||^2 / N_obs``),
            ``mean_misfit`` (the same for the mean prediction), ``alpha``, ``spread``
            (before the update), ``n_resampled`` (collapse-guard redraws); the schedule's
            entries (``gamma`` and ``rho`` for ``RelativeNoise``, ``rho`` for
            ``FixedAnnealing``) under ``schedule``.
        """
        self.net._check_inputs(inputs)
        task = self._task_for(targets)
        n_sec = len(self._sections)
        one = self.sections is not None and self.sections.one_at_a_time
        active = [self._iteration % n_sec] if one else list(range(n_sec))
        redraw = self._redraw_std is not None
        rng = self._generator.get_state() if redraw else None
        # a fresh ensemble around the mean (only the active section if one)
        x = self._draw(self._sections[active[0]] if one else None) if redraw else self.ensemble
        if one and not redraw:  # members differ only in the active section; rest at the mean
            fwd = x.mean(dim=0, keepdim=True).expand_as(x).clone()
            for s in self._sections[active[0]]:
                fwd[:, s] = x[:, s]
        else:
            fwd = x
        try:
            outputs = self.net.predict(fwd, inputs)              # (E, B, n_out)
            batch, n_out = outputs.shape[1], outputs.shape[2]
            y = task.targets(targets, batch, n_out).to(outputs.device)
        except Exception:
            if rng is not None:  # a refused step leaves the optimizer as it was
                self._generator.set_state(rng)
            raise
        self.ensemble = x
        preds = task.predictions(outputs)                         # (E, N_obs)
        obs = Observations(y, noise_std=self.noise)
        ok = torch.isfinite(preds).all(dim=1)
        n_failed = int((~ok).sum())
        if n_failed > x.shape[0] - 2:
            from ..errors import FailedMembersError

            raise FailedMembersError(
                f"only {x.shape[0] - n_failed} of {x.shape[0]} members gave finite "
                "predictions; at least 2 are needed (a smaller noise or prior_std may help)"
            )
        used = preds if n_failed == 0 else preds[ok]
        spread = math.sqrt(float(column_variance(x).mean()))
        infos: list[dict] = []
        alphas: list[float] = []
        n_resampled = 0
        for k in active:
            slices = self._sections[k]
            cols = _columns(x, slices)
            alpha, state, info = self.schedule.step(
                self._schedule_states[k], parameters=cols, predictions=used,
                observations=obs)
            self._schedule_states[k] = state
            w = draw_transform(used, obs, rule=self.rule, alpha=alpha,
                               generator=self._generator, ok=ok if n_failed else None)
            w = w.to(x.device)
            if redraw:  # keep only the new mean m+ = (1^T W / E) X
                r = w.mean(dim=0).to(x.dtype)
                for s in slices:
                    self._mean[s] = r @ x[:, s]
            elif len(slices) == 1:  # in place, through an (N_ens, chunk_size) buffer
                view = x[:, slices[0]]
                apply_transform(w, view, out=view, chunk_size=self.chunk_size)
            else:
                _set_columns(x, slices, apply_transform(w, cols, chunk_size=self.chunk_size))
            if self.guard is not None and not redraw:
                for s in slices:
                    mask = None if self.mask is None else self.mask[s]
                    n_resampled += self.guard.apply(x[:, s], generator=self._generator,
                                                    mask=mask, inplace=True)[1]
            alphas.append(float(alpha))
            infos.append(info)
        if self.mask is not None and not bool(self.mask.all()):
            if redraw:
                self._mean[~self.mask] = 0
            else:
                x[:, ~self.mask] = 0
        self._iteration += 1
        self.last_predictions = preds
        self.last_observations = y
        self._write_mean()
        phi = obs.misfit(used)
        mean_phi = obs.misfit(used.mean(dim=0, keepdim=True))
        m = obs.size
        sched = {k: v for k, v in infos[0].items() if isinstance(v, (int, float, bool))} \
            if len(infos) == 1 else {"sections": len(infos)}
        return StepInfo(
            iteration=self._iteration, alpha=float(sum(alphas) / len(alphas)),
            misfit=float(2 * phi.mean() / m), mean_misfit=float(2 * mean_phi[0] / m),
            spread=spread, n_failed=n_failed, n_resampled=n_resampled, done=False,
            schedule=sched)

    # -- the mean, prediction and gradient hybrids ------------------------------------------
    def predict(self, inputs: torch.Tensor, *, task: Classification | Regression | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation over members of the mapped outputs, each ``(B, n_out)``.

        For classification the mean of the members' probabilities (the ensemble's
        predictive distribution); ``task`` defaults to the optimizer's (or
        :class:`Classification` when it is ``None``: pass ``Regression()`` for raw outputs).
        """
        task = task or self.task or Classification()
        _check_output_map(task, "task")
        out = self.net.predict(self.members_at_mean(), inputs)
        mapped = task.predictions(out).reshape(out.shape)
        return mapped.mean(dim=0), mapped.std(dim=0)

    def information(self, inputs: torch.Tensor, targets: torch.Tensor, *, draws: int = 16,
                    score: Callable[..., torch.Tensor] | None = None,
                    seed: int | None = None) -> torch.Tensor:
        r"""Mutual information (eq. 12) of each parameter with the errors on a batch.

        With :class:`Redraw`, ``draws`` fresh ensembles are drawn around the mean (the
        masked parameters held at zero) and run on ``inputs``; their ``N = draws * N_ens``
        members and errors are scored together. More members are what the ranking needs:
        each correlation carries sampling noise of about ``1/sqrt(N)``, so the sum over
        ``N_obs`` error dimensions carries noise of about ``sqrt(2 N_obs) / N`` per
        parameter, while a parameter's share of the signal is about ``N_obs / N_par``
        (for the digits MLP, ``N_par = 6570`` and ``N_obs = 2560``: noise 1.1 at ``N = 64``,
        0.07 at ``N = 1024``, against a signal of 0.4). With :class:`Carry` the carried
        ensemble is the sample (``draws`` must be 1).

        Parameters
        ----------
        inputs, targets :
            A batch, as for :meth:`step`.
        draws : int
            Fresh ensembles (``Redraw`` only).
        score : callable, optional
            ``score(parameters, errors) -> (N_par,)``; default
            :func:`enkal.mutual_information` (or :func:`enkal.information.saliency`).
        seed : int, optional
            Seed of the draws (default: from the optimizer's seed and iteration). The
            optimizer's own generator is not touched, so training continues unchanged.

        Returns
        -------
        Tensor, shape (N_par,), float64
            Masked parameters score 0 (they do not vary).

        Memory: ``draws * N_ens * N_par`` parameters and ``draws * N_ens * N_obs`` errors.
        """
        from ..information import mutual_information

        check_positive_int(draws, "draws")
        score = mutual_information if score is None else score
        if not callable(score):
            raise TypeError(f"score: expected a callable score(parameters, errors), got "
                            f"{type(score).__name__}")
        if self._redraw_std is None and draws != 1:
            raise ValueError(f"draws: with Carry the carried ensemble is the sample; expected "
                             f"draws=1, got {draws}")
        self.net._check_inputs(inputs)
        task = self._task_for(targets)
        seed = self.seed * 1_000_003 + self._iteration if seed is None else seed
        gen = torch.Generator(device=self.net.device).manual_seed(int(seed))
        xs, es = [], []
        for _ in range(draws):
            x = self.ensemble if self._redraw_std is None else self._draw(generator=gen)
            out = self.net.predict(x, inputs)
            y = task.targets(targets, out.shape[1], out.shape[2]).to(out.device)
            xs.append(x)
            es.append(task.predictions(out) - y.to(out.dtype))
        return score(torch.cat(xs), torch.cat(es))

    def members_at_mean(self) -> torch.Tensor:
        """The ensemble's anomalies around the current mean, ``(N_ens, N_par)``: with
        :class:`Carry` the ensemble itself; with :class:`Redraw` the last draw shifted so
        its mean is :attr:`mean` (what :meth:`predict` evaluates)."""
        if self._redraw_std is None:
            return self.ensemble
        return self.ensemble - self.ensemble.mean(dim=0) + self._mean

    def follow_model(self) -> None:
        """Shift every member by ``theta_model - mean``: the step a gradient optimizer just
        took on the model (which held the mean) moves the whole ensemble, spread unchanged.
        Masked parameters stay zero."""
        delta = self.net.flatten().to(self.ensemble.device) - self._mean
        if self.mask is not None:
            delta = delta * self.mask
        self.ensemble += delta
        self._mean += delta
        self._write_mean()

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and strings only (``torch.load(weights_only=True)`` reads it)."""
        states = []
        for st in self._schedule_states:
            d = dataclasses.asdict(st) if dataclasses.is_dataclass(st) else dict(st)
            states.append({"type": type(st).__name__, **d})
        return {
            "ensemble": self.ensemble.detach().clone(),
            "mean": self._mean.detach().clone(),
            "rng_state": self._generator.get_state(),
            "iteration": self._iteration,
            "schedule": states,
            "mask": None if self.mask is None else self.mask.clone(),
            "layout": [b.name for b in self.layout.blocks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output: the next steps repeat, bit for bit, those
        of the uninterrupted run (same device, data and configuration)."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict from state_dict(), got "
                            f"{type(state).__name__}")
        try:
            ens, rng, it, sched = (state["ensemble"], state["rng_state"], state["iteration"],
                                   state["schedule"])
        except KeyError as err:
            raise ValueError(f"state: missing entry {err}") from None
        names = [b.name for b in self.layout.blocks]
        if state.get("layout", names) != names:
            raise ValueError("state: the parameter layout differs from this model's")
        if not isinstance(ens, torch.Tensor) or tuple(ens.shape) != tuple(self.ensemble.shape):
            raise ValueError(f"state: expected an ensemble of shape "
                             f"{tuple(self.ensemble.shape)}, got {_describe(ens)}")
        if len(sched) != len(self._schedule_states):
            raise ValueError(f"state: expected {len(self._schedule_states)} schedule states "
                             f"(sections), got {len(sched)}")
        cls = _STATES.get(type(self.schedule).__name__)
        expected = type(self.schedule.init()).__name__
        states = []
        for d in sched:
            d = dict(d)
            kind = d.pop("type", None)
            if kind != expected or cls is None:
                raise ValueError(f"state: schedule state {kind!r} does not match this "
                                 f"optimizer's schedule ({expected})")
            states.append(cls(**d))
        mask = state.get("mask")
        mean = state.get("mean")
        if mean is not None and (not isinstance(mean, torch.Tensor)
                                 or tuple(mean.shape) != (self.net.n_parameters,)):
            raise ValueError(f"state: expected a mean of shape ({self.net.n_parameters},), "
                             f"got {_describe(mean)}")
        if mean is None and self._redraw_std is not None:
            raise ValueError("state: no 'mean' entry (a state of a Carry optimizer?); "
                             "members=Redraw needs the mean")
        self.ensemble = ens.to(self.ensemble.device, self.ensemble.dtype).clone()
        if mean is not None:
            self._mean = mean.to(self.ensemble.device, self.ensemble.dtype).clone()
        self._generator.set_state(torch.as_tensor(rng, dtype=torch.uint8).cpu())
        self._iteration = int(it)
        self._schedule_states = states
        self.mask = None if mask is None else mask.to(self.ensemble.device, torch.bool)
        self._write_mean()

    def __repr__(self) -> str:
        return (f"EnsembleKalmanOptimizer(N_ens={self.ensemble_size}, "
                f"N_par={self.net.n_parameters}, noise={self.noise}, rule={self.rule}, "
                f"schedule={self.schedule}, members={self.members}, seed={self.seed})")


class HybridOptimizer:
    """Alternate gradient steps and ensemble Kalman updates (the seed paper's Fig. 2).

    Each :meth:`step` takes one step of the torch optimizer ``gradient`` on the model (which
    holds the ensemble mean), i.e. the gradient of the loss *at the mean*, and moves every
    member by the same displacement (:meth:`EnsembleKalmanOptimizer.follow_model`): the
    ensemble's mean follows the gradient optimizer while its spread (the anomalies) is
    unchanged. Every ``kalman_every`` steps a Kalman update follows on the same minibatch.

    Parameters
    ----------
    kalman : EnsembleKalmanOptimizer
    gradient : torch.optim.Optimizer
        Over ``kalman.model.parameters()`` (e.g. ``AdamW``).
    loss_fn : callable
        ``loss_fn(model(inputs), targets) -> scalar`` (e.g. ``nn.functional.cross_entropy``).
    kalman_every : int
    """

    def __init__(self, kalman: EnsembleKalmanOptimizer, gradient: torch.optim.Optimizer, *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 kalman_every: int = 1) -> None:
        if not isinstance(kalman, EnsembleKalmanOptimizer):
            raise TypeError(f"kalman: expected an EnsembleKalmanOptimizer, got "
                            f"{type(kalman).__name__}")
        if not isinstance(gradient, torch.optim.Optimizer):
            raise TypeError(f"gradient: expected a torch.optim.Optimizer, got "
                            f"{type(gradient).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        check_positive_int(kalman_every, "kalman_every")
        self.kalman = kalman
        self.gradient = gradient
        self.loss_fn = loss_fn
        self.kalman_every = kalman_every
        self._count = 0

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, StepInfo | None]:
        """One gradient step (shifting the ensemble), then a Kalman update every
        ``kalman_every`` calls. Returns ``(loss before the gradient step, StepInfo or None)``."""
        model = self.kalman.model
        self.gradient.zero_grad(set_to_none=True)
        loss = self.loss_fn(model(inputs), targets)
        loss.backward()
        self.gradient.step()
        self.kalman.follow_model()
        self._count += 1
        info = None
        if self._count % self.kalman_every == 0:
            info = self.kalman.step(inputs, targets)
        return float(loss.detach()), info

    def state_dict(self) -> dict[str, Any]:
        return {"kalman": self.kalman.state_dict(), "gradient": self.gradient.state_dict(),
                "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kalman.load_state_dict(state["kalman"])
        self.gradient.load_state_dict(state["gradient"])
        self._count = int(state["count"])
