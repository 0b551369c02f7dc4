"""The ensemble forward of an ``nn.Module`` (:class:`NeuralModel`) and its
:class:`~enkal.ForwardModel` on one fixed batch (:class:`BatchForward`).

The backend rule of ``backend="auto"`` and the handling of buffers, BatchNorm and Dropout
are described in the :mod:`enkal.nn` docstring.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_ensemble, check_positive_int
from ..devices import _check_devices, run_on_devices
from ..ensemble import ParameterLayout
from ..forward import ForwardModel
from .tasks import Regression, _check_output_map

__all__ = ["NeuralModel", "BatchForward", "AUTO_VMAP_MIN_MEMBERS"]

BACKENDS = ("auto", "vmap", "loop")
#: ``backend="auto"`` uses the loop when a call holds fewer members than this.
AUTO_VMAP_MIN_MEMBERS = 8
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d)


def check_dtype(dtype: Any, name: str) -> None:
    """``None`` or a floating ``torch.dtype``, else a ``TypeError`` naming ``name``."""
    if dtype is not None and (not isinstance(dtype, torch.dtype)
                              or not dtype.is_floating_point):
        raise TypeError(f"{name}: expected a floating torch.dtype, got {dtype!r}")


def _check_stateless(module: nn.Module) -> None:
    """Refuse layers whose training-mode forward draws random numbers."""
    for name, sub in module.named_modules():
        label = name or type(module).__name__
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            raise ValueError(
                f"module: the Dropout layer {label!r} is in training mode, which makes each "
                "member's predictions random. Call module.eval() first (ensemble Kalman "
                "training needs deterministic predictions; the ensemble is its own "
                "regulariser)"
            )


def _tracking_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers in training mode that keep running statistics."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.training and m.track_running_stats]


@contextlib.contextmanager
def _batch_statistics(module: nn.Module) -> Iterator[None]:
    """For the duration, BatchNorm layers in training mode normalise by the statistics of
    each call's own batch and leave their running statistics (and batch count) alone, as
    with ``track_running_stats=False``: every member normalises by its own activations on
    the batch, and no member writes the shared buffers."""
    norms = _tracking_norms(module)
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


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
        finished the previous one (:func:`enkal.devices.run_on_devices`). Default
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
        check_dtype(dtype, "dtype")
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

    def flatten(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The module's current trainable parameters as one vector ``(N_par,)``
        (on ``device``, in ``dtype``: default the model's)."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1).to(self.device, dtype or self.dtype)
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
        with _batch_statistics(module):
            if backend == "vmap":
                stacked = {blk.name: params[:, blk.slice].reshape(n, *blk.shape)
                           for blk in blocks}

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

    def input_scales(self, vector: torch.Tensor, inputs: torch.Tensor) -> dict[str, float]:
        """Root mean square of the input each weight tensor multiplies, for one network.

        For every trainable parameter of at least two dimensions named ``<module>.weight``
        (linear and convolution layers), the RMS over all entries of the first input of
        ``<module>`` when the network with parameters ``vector`` ``(N_par,)`` runs on
        ``inputs`` (one forward on ``device``, nothing written to the module). A weight
        whose module is not called, or is not called with a floating tensor, is left out.
        """
        self._check_inputs(inputs)
        if not isinstance(vector, torch.Tensor) or vector.shape != (self.n_parameters,):
            raise ValueError(f"vector: expected a tensor of shape ({self.n_parameters},) = "
                             f"(N_par,), got {getattr(vector, 'shape', type(vector).__name__)}")
        module = self._replica(0)
        owners = {b.name[:-len(".weight")]: b.name for b in self._layout.blocks
                  if b.name.endswith(".weight") and len(b.shape) >= 2}
        found: dict[str, torch.Tensor] = {}

        def hook(key: str):
            def record(_mod: nn.Module, args: tuple) -> None:
                if key not in found and args and isinstance(args[0], torch.Tensor) and \
                        args[0].is_floating_point():
                    found[key] = args[0].detach().to(torch.float64).square().mean()
            return record

        named = dict(module.named_modules())
        handles = [named[o].register_forward_pre_hook(hook(w)) for o, w in owners.items()
                   if o in named]
        x = inputs.to(self.devices[0])
        x = x.to(self.dtype) if x.is_floating_point() else x
        try:
            with torch.no_grad():
                self._call(module, vector[None].to(self.devices[0], self.dtype), x, "loop")
        finally:
            for h in handles:
                h.remove()
        if not found:
            return {}
        keys = list(found)
        values = torch.stack([found[k] for k in keys]).sqrt().tolist()  # one sync
        return dict(zip(keys, values, strict=True))

    def track_statistics(self, vector: torch.Tensor, inputs: torch.Tensor) -> bool:
        """Update the running statistics of the module's BatchNorm layers in training mode
        from one forward of the network with parameters ``vector`` ``(N_par,)`` on
        ``inputs``, as a training-mode forward of that network would (the module's own
        device and dtype; its parameters are not written). Members never write them
        (:meth:`predict` normalises each member by its own batch statistics);
        :class:`~enkal.EnsembleKalmanOptimizer` calls this with the new mean after every
        step, so that ``module.eval()`` then normalises with the statistics of the networks
        the mean passed through, as after gradient training. Returns whether there was
        anything to update (``False``: no such layer, nothing run)."""
        self._check_inputs(inputs)
        if not isinstance(vector, torch.Tensor) or vector.shape != (self.n_parameters,):
            raise ValueError(f"vector: expected a tensor of shape ({self.n_parameters},) = "
                             f"(N_par,), got {getattr(vector, 'shape', type(vector).__name__)}")
        if not _tracking_norms(self.module):
            return False
        first = self._module_params()[0]
        x = inputs.to(first.device)
        x = x.to(first.dtype) if x.is_floating_point() else x
        v = vector.detach().to(first.device, first.dtype)
        params = {blk.name: v[blk.slice].reshape(blk.shape) for blk in self._layout.blocks}
        with torch.no_grad():
            torch.func.functional_call(self.module, params, (x,))
        return True

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


class BatchForward(ForwardModel):
    """:class:`~enkal.ForwardModel` of a network on one fixed batch (from
    :meth:`NeuralModel.with_inputs`): ``(n, N_par) -> (n, B * n_out)``, the outputs mapped by
    ``output`` (:class:`Regression` or :class:`Classification`) and flattened by sample."""

    #: the network reads its members through ``functional_call`` and never writes to them
    copies_inputs = False

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
