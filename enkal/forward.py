"""The forward-model interface: ``(N_ens, N_par)`` parameters -> ``(N_ens, N_obs)`` predictions.

A :class:`ForwardModel` declares its :class:`~enkal.ensemble.ParameterLayout` (names, shapes,
constraints of the parameters), its ``output_size`` ``N_obs``, and the ``device``/``dtype`` it
computes in, and implements ``forward`` on a whole (or a chunk of an) ensemble at once, members
first, with *physical* parameter values. :class:`CallableModel` wraps a plain function.

:func:`evaluate` runs a model over an ensemble in chunks of members and reports which members
failed (the forward raised, or the prediction has NaN/inf) instead of stopping: a failed chunk
is retried member by member so one bad member does not fail its neighbours.

The ensemble is defended from the model: every ``forward`` call gets members in memory of its
own (a copy, unless moving them to the model's device or dtype made one already), so a model
that writes into its input changes nothing outside the call; and the predictions are
detached, so a model whose output requires grad (a ``torch.nn.Module`` inside a
:class:`CallableModel`) hands no autograd graph to the update.

>>> import torch
>>> from enkal import CallableModel
>>> model = CallableModel(lambda x: x ** 2, parameters=["a", "b"], output_size=2)
>>> y, ok = evaluate(model, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
>>> y.tolist(), ok.tolist()
([[1.0, 4.0], [9.0, 16.0]], [True, True])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ._checks import (
    check_bool,
    check_device,
    check_ensemble,
    check_positive_float,
    check_positive_int,
)
from .ensemble import ParameterLayout

__all__ = ["ForwardModel", "CallableModel", "evaluate", "EvaluationReport"]


class ForwardModel(ABC):
    """Abstract base of all forward models.

    Subclasses set ``layout`` (a :class:`ParameterLayout`), ``output_size`` (``N_obs``) and
    implement :meth:`forward`. ``device`` and ``dtype`` say where and in what precision the
    model computes; :func:`evaluate` moves parameters there and the predictions back.
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float64
    #: :func:`evaluate` hands ``forward`` a copy of the members (so a model that writes into
    #: its input cannot change the ensemble); a model that never does may set this to
    #: ``False`` and save the copy (``N_ens x N_par`` per call: at ``N_par = 10^6`` about a
    #: GEMM's time and the memory of the ensemble again).
    copies_inputs: bool = True

    @property
    @abstractmethod
    def layout(self) -> ParameterLayout:
        """Names, shapes and constraints of the ``N_par`` parameters."""

    @property
    @abstractmethod
    def output_size(self) -> int:
        """``N_obs``: the length of one member's prediction."""

    @abstractmethod
    def forward(self, parameters: torch.Tensor) -> torch.Tensor:
        """Map physical parameters ``(n, N_par)`` to predictions ``(n, N_obs)``.

        Under :func:`evaluate` (and so every executor and ``run``) ``parameters`` is the
        call's own tensor, which the model may overwrite; its output is detached.
        """

    @property
    def output_names(self) -> list[str] | None:
        """Optional readable names of the outputs (for storage)."""
        return None

    def __call__(self, parameters: torch.Tensor) -> torch.Tensor:
        return self.forward(parameters)


def _layout_from(parameters: Any) -> ParameterLayout:
    if isinstance(parameters, ParameterLayout):
        return parameters
    if isinstance(parameters, int) and not isinstance(parameters, bool):
        check_positive_int(parameters, "parameters")
        return ParameterLayout.flat(parameters)
    if isinstance(parameters, (list, tuple)):
        return ParameterLayout(parameters)
    raise TypeError(
        "parameters: expected a ParameterLayout, a list of names or (name, shape[, "
        f"constraint]) tuples, or an int N_par; got {type(parameters).__name__}"
    )


class CallableModel(ForwardModel):
    """A :class:`ForwardModel` around a plain function.

    Parameters
    ----------
    fn : callable
        ``fn(parameters)`` with ``parameters`` of shape ``(n, N_par)`` returning ``(n, N_obs)``
        when ``batched`` (default), or ``fn(theta)`` on one ``(N_par,)`` member returning
        ``(N_obs,)`` when ``batched=False``. Torch tensors in; torch tensors or numpy arrays
        out. With ``numpy=True`` the function receives numpy arrays instead.
    parameters : ParameterLayout, list of names/(name, shape[, constraint]), or int
    output_size : int
        ``N_obs``.
    batched : bool
    numpy : bool
    device, dtype :
        Where the function computes (default CPU, float64).
    output_names : sequence of str, optional
        ``N_obs`` readable names of the outputs (for storage).

    Every argument is checked, naming it: ``TypeError`` for a wrong type (``fn`` not
    callable, ``batched``/``numpy`` not bools, a non-floating ``dtype``, ``output_names``
    not a sequence of str), ``ValueError`` for a wrong value (``output_size < 1``, a device
    torch does not know, the wrong number of output names).
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        parameters: Any,
        output_size: int,
        batched: bool = True,
        numpy: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
        output_names: Sequence[str] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        check_positive_int(output_size, "output_size")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        check_bool(batched, "batched")
        check_bool(numpy, "numpy")
        self._fn = fn
        self._layout = _layout_from(parameters)
        self._output_size = int(output_size)
        self.batched = bool(batched)
        self.numpy = bool(numpy)
        self.device = check_device(device)
        self.dtype = dtype
        self._output_names = _output_names(output_names, int(output_size))

    @property
    def layout(self) -> ParameterLayout:
        return self._layout

    @property
    def output_size(self) -> int:
        return self._output_size

    @property
    def output_names(self) -> list[str] | None:
        return self._output_names

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        arg = x.detach().cpu().numpy() if self.numpy else x
        out = self._fn(arg)
        if isinstance(out, torch.Tensor):
            return out.to(device=self.device, dtype=self.dtype)
        return torch.as_tensor(np.asarray(out, dtype=np.float64)).to(self.device, self.dtype)

    def forward(self, parameters: torch.Tensor) -> torch.Tensor:
        if self.batched:
            return self._call(parameters)
        rows = [self._call(parameters[i]).reshape(-1) for i in range(parameters.shape[0])]
        return torch.stack(rows) if rows else parameters.new_empty((0, self._output_size))


def _output_names(names: Any, n: int) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence) or \
            not all(isinstance(x, str) for x in names):
        raise TypeError(f"output_names: expected a sequence of {n} str, got "
                        f"{names!r}"[:200])
    if len(names) != n:
        raise ValueError(f"output_names: expected {n} names (output_size), got {len(names)}")
    return list(names)


class EvaluationReport(tuple):
    """``(predictions, ok)`` plus ``errors``: the first exception message per failed member."""

    errors: dict[int, str]


def _check_output(model: ForwardModel, y: Any, n: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(
            f"{type(model).__name__}.forward: expected a torch.Tensor, got {type(y).__name__}"
        )
    m = model.output_size
    if y.shape != (n, m):
        hint = ""
        if y.shape == (m, n):
            hint = "; enkal expects members first: return (N_ens, N_obs), not (N_obs, N_ens)"
        raise ValueError(
            f"{type(model).__name__}.forward: expected predictions of shape ({n}, {m}) = "
            f"(members, output_size), got {tuple(y.shape)}{hint}"
        )
    return y


def check_inputs(model: object, parameters: object) -> None:
    """The boundary checks of :func:`evaluate` (and of the executors, before anything is
    shipped): a :class:`ForwardModel` and a floating ``(N_ens, N_par)`` tensor."""
    if not isinstance(model, ForwardModel):
        raise TypeError(f"model: expected an enkal.ForwardModel, got {type(model).__name__}")
    check_ensemble(parameters, "parameters", n_columns=model.layout.size)


def evaluate(
    model: ForwardModel,
    parameters: torch.Tensor,
    *,
    members_per_call: int | None = None,
    max_abs: float | None = None,
) -> EvaluationReport:
    """Run ``model`` on an ensemble of physical parameters, in chunks of members.

    Parameters
    ----------
    model : ForwardModel
        Checked to be a :class:`ForwardModel` (``TypeError``).
    parameters : Tensor, shape (N_ens, N_par)
        Physical parameter values: a floating tensor (``TypeError`` otherwise) with the
        model's ``N_par`` columns (``ValueError``). Never written to: each ``forward`` call
        gets its members in memory of its own (a copy of its ``(members_per_call, N_par)``
        chunk when moving it to the model's device and dtype did not already copy it).
    members_per_call : int, optional
        Members per ``forward`` call (bounds memory, the copy's included); default all at
        once. An int ``>= 1``.
    max_abs : float, optional
        Predictions with an entry larger than this in magnitude count as failed. A finite
        float ``> 0``.

    Returns
    -------
    predictions : Tensor, shape (N_ens, N_obs)
        On the parameters' device and dtype; rows of failed members are NaN.
    ok : bool Tensor, shape (N_ens,)
        Which members succeeded.

    The returned pair is an :class:`EvaluationReport`; its ``errors`` attribute maps a failed
    member's index to the first line of what went wrong (for diagnostics).

    A forward that returns the wrong shape is a bug in the model, not a failed member: it
    raises ``ValueError`` at once. The predictions are detached from any autograd graph the
    model built.
    """
    check_inputs(model, parameters)
    check_positive_int(members_per_call, "members_per_call", allow_none=True)
    check_positive_float(max_abs, "max_abs", allow_none=True)
    n = parameters.shape[0]
    m = model.output_size
    step = members_per_call or max(n, 1)
    out = torch.full((n, m), float("nan"), dtype=parameters.dtype, device=parameters.device)
    ok = torch.zeros(n, dtype=torch.bool, device=parameters.device)
    errors: dict[int, str] = {}
    for start in range(0, n, step):
        stop = min(start + step, n)
        try:
            raw = model.forward(_model_input(model, parameters, start, stop))
        except Exception:  # noqa: BLE001 - a black-box simulator may raise anything
            _one_by_one(model, parameters, start, stop, out, ok, errors)
            continue
        y = _check_output(model, raw, stop - start)
        out[start:stop] = y.detach().to(device=out.device, dtype=out.dtype)
        ok[start:stop] = True
    finite = torch.isfinite(out).all(dim=1)
    if max_abs is not None:
        finite &= ~(out.abs() > float(max_abs)).any(dim=1)
    for i in torch.nonzero(ok & ~finite).squeeze(1).tolist():
        errors.setdefault(i, "non-finite or out-of-bound prediction")
    ok &= finite
    result = EvaluationReport((out, ok))
    result.errors = errors
    return result


def _model_input(model: ForwardModel, parameters: torch.Tensor, start: int,
                 stop: int) -> torch.Tensor:
    """Members ``start:stop`` on the model's device and dtype, in memory of their own.

    ``.to`` returns a view of ``parameters`` when nothing changes; a model writing into its
    input (``x.mul_(100)``) would then write into the caller's ensemble (the smoother's
    state, a ``run``'s prior), so that view is copied. When ``.to`` moved or cast the
    members it made a copy already, and none is added.
    """
    chunk = parameters[start:stop].detach().to(device=model.device, dtype=model.dtype)
    if getattr(model, "copies_inputs", True) and chunk.device == parameters.device and \
            chunk.untyped_storage().data_ptr() == parameters.untyped_storage().data_ptr():
        chunk = chunk.clone()
    return chunk


def _one_by_one(model: ForwardModel, parameters: torch.Tensor, start: int, stop: int,
                out: torch.Tensor, ok: torch.Tensor, errors: dict[int, str]) -> None:
    """Retry the members ``start:stop`` of a chunk whose forward raised, one per call, each
    from a fresh copy (the failed call may have written into its input)."""
    for i in range(start, stop):
        try:
            raw = model.forward(_model_input(model, parameters, i, i + 1))
        except Exception as err:  # noqa: BLE001
            errors[i] = f"{type(err).__name__}: {err}"[:500]
            continue
        y = _check_output(model, raw, 1)
        out[i:i + 1] = y.detach().to(device=out.device, dtype=out.dtype)
        ok[i] = True
