"""Shared plumbing of the simulator models: validation at the boundary, observation layout.

A simulator model integrates an ``(N_ens, d)`` state (``d`` components, members first) from
a known initial state at ``t0`` and records chosen components at observation times
``t_obs``. The prediction of a member is time-major::

    y[:, i * k + c] = x(t_obs[i])[observe[c]]        (k = len(observe))

so ``N_obs = len(t_obs) * len(observe)`` and ``output_names`` reads ``"I(t=1.5)"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral
from numbers import Real as RealNumber
from typing import Any

import numpy as np
import torch

from enkal import Bounded, ForwardModel, ParameterLayout, Positive
from enkal._checks import check_ensemble

__all__ = ["SimulatorModel", "check_dtype_device", "check_times", "steps_for", "grid_steps",
           "grid_origin"]


def check_dtype_device(dtype: Any, device: Any) -> tuple[torch.dtype, torch.device]:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as err:
        raise TypeError(f"device: expected a torch.device or a string, got {device!r}") from err
    return dtype, dev


def _check_float(x: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, RealNumber):
        raise TypeError(f"{name}: expected a float, got {type(x).__name__} {x!r}"[:200])
    x = float(x)
    if not math.isfinite(x) or (positive and x <= 0):
        raise ValueError(f"{name}: expected a finite float{' > 0' if positive else ''}, got {x}")
    return x


def check_times(t_obs: Any, t0: float) -> list[float]:
    """Observation times: a non-empty, finite, strictly increasing 1-D sequence >= ``t0``."""
    if isinstance(t_obs, torch.Tensor):
        arr = t_obs.detach().cpu().to(torch.float64).numpy()
    elif isinstance(t_obs, (np.ndarray, list, tuple, range)) or isinstance(t_obs, RealNumber):
        try:
            arr = np.asarray(t_obs, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"t_obs: expected a sequence of floats, got {t_obs!r} ({err})"[:300]) \
                from None
    else:
        raise TypeError(f"t_obs: expected a sequence of floats, got {type(t_obs).__name__}")
    arr = arr.reshape(-1) if arr.ndim == 0 else arr
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"t_obs: expected a non-empty 1-D sequence of times, got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ValueError("t_obs: expected finite times, got NaN/inf")
    if arr.size > 1 and not (np.diff(arr) > 0).all():
        i = int(np.nonzero(np.diff(arr) <= 0)[0][0])
        raise ValueError(
            f"t_obs: expected strictly increasing times, got t_obs[{i}]={arr[i]:g} followed by "
            f"t_obs[{i + 1}]={arr[i + 1]:g}; sort them (and drop repeats)"
        )
    if arr[0] < t0:
        raise ValueError(f"t_obs: expected times >= t0={t0:g}, got t_obs[0]={arr[0]:g}")
    return [float(v) for v in arr]


def steps_for(t_obs: Sequence[float], t0: float, dt: float, what: str = "dt") -> list[int]:
    """Step index of each observation time on the grid ``t0 + k dt``; refuse off-grid times."""
    out = []
    for i, t in enumerate(t_obs):
        q = (t - t0) / dt
        k = round(q)
        if abs(q - k) > 1e-9 * max(1.0, abs(q)):
            raise ValueError(
                f"t_obs: a fixed-step solver needs observation times on the grid t0 + k*{what}; "
                f"t_obs[{i}]={t:g} is {q:.6g} steps of {what}={dt:g} from t0={t0:g}. Choose a "
                f"{what} that divides the observation spacing, or an adaptive/exact solver"
            )
        out.append(int(k))
    return out


def grid_steps(t0: float, t1: float, dt: float, what: str = "dt") -> list[int]:
    """``[k]``: the number of fixed steps ``dt`` from ``t0`` to ``t1`` (a whole number)."""
    q = (t1 - t0) / dt
    k = round(q)
    if abs(q - k) > 1e-9 * max(1.0, abs(q)):
        raise ValueError(f"t1: expected t1 - t0 to be a whole number of steps of {what}={dt:g} "
                         f"(a fixed-step solver), got t0={t0:g}, t1={t1:g}: {q:.6g} steps. "
                         f"Propagate between times on the grid t0 + k*{what}, or choose a "
                         f"{what} that divides t1 - t0")
    return [int(k)]


def grid_origin(t0: float, origin: float, dt: float) -> tuple[float, int]:
    """``(origin, K)``: the fixed steps of a propagation from ``t0`` take the times
    ``origin + (K + k) dt``, ``k = 0, 1, ...``.

    When ``t0`` lies on the model's grid ``origin + K dt`` (to the tolerance of
    :func:`steps_for`) these are the very floating-point times ``forward`` computes, so a
    time-dependent right-hand side agrees bitwise with ``forward`` and across legs; an
    off-grid ``t0`` starts a grid of its own, ``(t0, 0)``.

    >>> grid_origin(0.3, 0.0, 0.1), grid_origin(0.35, 0.0, 0.1)
    ((0.0, 3), (0.35, 0))
    """
    q = (t0 - origin) / dt
    k = round(q)
    if abs(q - k) <= 1e-9 * max(1.0, abs(q)):
        return origin, int(k)
    return t0, 0


def _check_time(t: Any, name: str) -> float:
    """A finite time: a real number or a 0-d tensor."""
    if isinstance(t, torch.Tensor) and t.ndim == 0:
        t = t.item()
    return _check_float(t, name)


def state_size(x0: Any, state_names: Any) -> int:
    """``d``: the number of ``state_names`` when given, else of ``x0`` (1 for a scalar)."""
    if state_names is not None:
        return len(list(state_names))
    try:
        return len(x0)
    except TypeError:
        return 1


def _check_state_names(names: Any, d: int) -> list[str]:
    if names is None:
        return [f"x{i}" for i in range(d)]
    names = list(names)
    if len(names) != d or not all(isinstance(n, str) for n in names):
        raise ValueError(f"state_names: expected {d} strings, got {names!r}"[:200])
    return names


def _check_observe(observe: Any, names: list[str]) -> list[int]:
    d = len(names)
    if observe is None:
        return list(range(d))
    if isinstance(observe, (str, Integral)):
        observe = [observe]
    try:
        items = list(observe)
    except TypeError:
        raise TypeError(
            f"observe: expected state indices or names, got {type(observe).__name__}"
        ) from None
    if not items:
        raise ValueError("observe: expected at least one component, got none")
    out = [_component(c, names) for c in items]
    if len(set(out)) != len(out):
        raise ValueError(f"observe: repeated components {items}")
    return out


def _component(c: Any, names: list[str]) -> int:
    """One entry of ``observe``: a state name or index -> the index."""
    d = len(names)
    if isinstance(c, str):
        if c not in names:
            raise ValueError(f"observe: unknown component {c!r}; the state is {names}")
        return names.index(c)
    if isinstance(c, Integral) and not isinstance(c, bool):
        if not 0 <= c < d:
            raise ValueError(f"observe: component index {c} out of range for a state of {d}")
        return int(c)
    raise TypeError(f"observe: expected ints or names, got {c!r}"[:200])


class SimulatorModel(ForwardModel):
    """Base of the ODE/SDE/jump models: layout, observation layout, input validation.

    Subclasses call ``_setup`` in ``__init__`` and implement ``_simulate(X, p)`` returning
    the states at the observation times, shape ``(n, len(t_obs), d)``.
    """

    def _setup(
        self,
        layout: Any,
        *,
        d: int,
        t_obs: Any,
        t0: Any,
        observe: Any,
        state_names: Any,
        device: Any,
        dtype: Any,
    ) -> None:
        if not isinstance(layout, ParameterLayout):
            raise TypeError(
                f"layout: expected an enkal.ParameterLayout, got {type(layout).__name__}"
            )
        self.dtype, self.device = check_dtype_device(dtype, device)
        self._layout = layout
        self.t0 = _check_float(t0, "t0")
        self.t_obs = check_times(t_obs, self.t0)
        self.state_names = _check_state_names(state_names, d)
        self.observe = _check_observe(observe, self.state_names)
        self.state_size = d

    @property
    def layout(self) -> ParameterLayout:
        return self._layout

    @property
    def output_size(self) -> int:
        return len(self.t_obs) * len(self.observe)

    @property
    def output_names(self) -> list[str]:
        return [f"{self.state_names[c]}(t={t:g})" for t in self.t_obs for c in self.observe]

    def _prepare(self, parameters: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Validate ``(n, N_par)`` physical parameters; cast to the model's device/dtype."""
        check_ensemble(parameters, "parameters", n_columns=self._layout.size)
        x = parameters.detach().to(device=self.device, dtype=self.dtype)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("parameters: expected finite values, got NaN/inf")
        for b in self._layout.blocks:
            v = x[:, b.slice]
            c = b.constraint
            if isinstance(c, Positive) and bool((v < 0).any()):
                bad = int(torch.nonzero((v < 0).any(dim=1))[0])
                raise ValueError(
                    f"parameters: {b.name!r} must be >= 0 (a rate or scale), got "
                    f"{float(v[bad].min()):g} in member {bad}. Pass physical values, e.g. "
                    "layout.to_physical(u)"
                )
            if isinstance(c, Bounded) and bool(((v < c.low) | (v > c.high)).any()):
                bad = int(torch.nonzero(((v < c.low) | (v > c.high)).any(dim=1))[0])
                raise ValueError(
                    f"parameters: {b.name!r} must lie in [{c.low:g}, {c.high:g}], got member "
                    f"{bad} = {v[bad].tolist()}"
                )
        return x, self._layout.unflatten(x)

    def _observe(self, states: torch.Tensor) -> torch.Tensor:
        """``(n, T, d)`` states -> ``(n, T * k)`` predictions, time-major."""
        sel = states[:, :, self.observe] if self.observe != list(range(self.state_size)) \
            else states
        return sel.reshape(states.shape[0], -1)

    def _simulate(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, parameters: torch.Tensor) -> torch.Tensor:
        """Predictions ``(N_ens, N_obs)`` for physical ``parameters`` ``(N_ens, N_par)``."""
        x, p = self._prepare(parameters)
        if x.shape[0] == 0:
            return x.new_empty((0, self.output_size))
        return self._observe(self._simulate(x, p))

    #: stochastic models (SDE, jump) draw their noise from ``propagate``'s ``generator``
    _needs_generator = False

    def propagate(self, states: torch.Tensor, t0: float, t1: float, *,
                  parameters: Any = None, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        """Advance an ensemble of states from ``t0`` to ``t1``: the forecast of a filter.

        A filter calls it once per cycle, from the analysis time to the next observation
        time (``docs/filtering.md``). Unlike :meth:`forward`, which starts every member at
        the model's known ``x0`` and returns observations, ``propagate`` starts each member
        at its own state and returns whole states.

        Parameters
        ----------
        states : Tensor, shape (N_ens, d)
            The states at ``t0``, members first (``d = state_size``, in the order of
            ``state_names``); integrated in the model's dtype and on its device.
        t0, t1 : float
            Start and end times, ``t1 >= t0``. Fixed-step solvers (RK4, Euler-Maruyama,
            tau-leaping) need ``t1 - t0`` to be a whole number of steps.
        parameters : Tensor or sequence of floats, shape (N_par,) or (N_ens, N_par)
            Physical parameters (required): one vector shared by every member, or one row
            per member (joint state-parameter estimation); checked as :meth:`forward` checks
            them. A list is read in float64.
        generator : torch.Generator, optional
            The noise of stochastic models (required for SDE and jump models; ODEs ignore
            it). A filter that owns it repeats and resumes its runs bit for bit.

        Returns
        -------
        Tensor, shape (N_ens, d)
            The states at ``t1``, in the dtype and on the device of ``states``. A member
            whose forecast is not finite (an overflow, a Dormand-Prince step-size underflow
            or ``max_steps``, negative propensities, a non-finite state at ``t0``) is a row
            of NaN, for the filter's failure policy. ``t1 == t0`` returns a copy of
            ``states`` (and draws nothing).

        Notes
        -----
        Fixed steps lie on the model's own grid ``t_k = t0_model + k dt`` (``t0_model`` is
        the model's ``t0``) whenever ``t0`` does, so a time-dependent right-hand side sees
        exactly the times :meth:`forward` computes: with RK4, ``propagate(x0, t0_model, t)``
        is bitwise the state :meth:`forward` reaches at ``t``, and two legs
        ``t0 -> t1 -> t2`` are bitwise one leg ``t0 -> t2`` (so is Euler-Maruyama's, given
        the same generator: its increments, ``(N_ens, d)`` per step, are drawn in time
        order). An off-grid ``t0`` starts a grid of its own, ``t0 + k dt``.

        Examples
        --------
        >>> import torch
        >>> from enkal.models import RK4, Lorenz63, OrnsteinUhlenbeck
        >>> l63 = Lorenz63(t_obs=[0.5], solver=RK4(dt=0.01))
        >>> x0 = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
        >>> theta = torch.tensor([10.0, 28.0, 8 / 3], dtype=torch.float64)
        >>> x = l63.propagate(x0, 0.0, 0.5, parameters=theta)
        >>> torch.equal(x, l63(theta[None]))       # forward observes (x, y, z) at t = 0.5
        True
        >>> half = l63.propagate(x0, 0.0, 0.2, parameters=theta)
        >>> torch.equal(l63.propagate(half, 0.2, 0.5, parameters=theta), x)
        True
        >>> ou = OrnsteinUhlenbeck(t_obs=[1.0], dt=0.01)
        >>> g = torch.Generator().manual_seed(0)
        >>> ou.propagate(torch.zeros(4, 1), 0.0, 1.0, parameters=[1.0, 0.0, 0.5],
        ...              generator=g).shape
        torch.Size([4, 1])
        """
        x, p, t0, t1 = self._propagate_inputs(states, t0, t1, parameters, generator)
        if t1 == t0 or x.shape[0] == 0:
            return states.detach().clone()
        out = self._advance(x, p, t0, t1, generator)
        out = out.to(device=states.device, dtype=states.dtype)
        return torch.where(torch.isfinite(out).all(dim=1, keepdim=True), out, math.nan)

    def _advance(self, x: torch.Tensor, p: dict[str, torch.Tensor], t0: float, t1: float,
                 generator: torch.Generator | None) -> torch.Tensor:
        """The ``(n, d)`` states at ``t1 > t0`` from ``x`` at ``t0`` (validated inputs)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement propagate")

    def _propagate_inputs(self, states: Any, t0: Any, t1: Any, parameters: Any,
                          generator: Any) -> tuple[torch.Tensor, dict, float, float]:
        """Validated ``(x, p, t0, t1)`` for :meth:`propagate`."""
        self._check_states(states)
        t0, t1 = _check_time(t0, "t0"), _check_time(t1, "t1")
        if t1 < t0:
            raise ValueError(f"t1: expected t1 >= t0 = {t0:g} (forward in time), got {t1:g}")
        _, p = self._prepare(self._member_parameters(parameters, states.shape[0]))
        self._check_generator(generator)
        x = states.detach().to(device=self.device, dtype=self.dtype)
        return x, p, t0, t1

    def _check_states(self, states: Any) -> None:
        d = self.state_size
        names = self.state_names if d <= 6 else [*self.state_names[:3], "...",
                                                 self.state_names[-1]]
        want = f"(N_ens, d) with d = {d} ({', '.join(names)})"
        if not isinstance(states, torch.Tensor):
            raise TypeError(f"states: expected a floating torch.Tensor of shape {want}, got "
                            f"{type(states).__name__}")
        if not states.is_floating_point():
            raise TypeError(f"states: expected a floating dtype, got {states.dtype}; convert "
                            "them, e.g. states.double()")
        if states.ndim == 2 and states.shape[1] == d:
            return
        hint = ""
        if states.ndim == 1 and states.shape[0] == d:
            hint = "; one member: pass states[None]"
        elif states.ndim == 2 and states.shape[0] == d:
            hint = ". enkal expects members first: did you pass (d, N_ens)? Transpose it with .T"
        raise ValueError(f"states: expected shape {want}, got {tuple(states.shape)}{hint}")

    def _member_parameters(self, parameters: Any, n: int) -> torch.Tensor:
        """``(N_par,)`` or ``(n, N_par)`` parameters -> an ``(n, N_par)`` tensor."""
        n_par = self._layout.size
        names = self._layout.names
        listed = ", ".join(names) if n_par <= 6 else f"{', '.join(names[:3])}, ..."
        if parameters is None:
            raise ValueError(
                f"parameters: the model's parameters are needed to propagate; pass the known "
                f"physical values ({listed}), shape (N_par,) = ({n_par},), e.g. "
                "torch.tensor([10., 28., 8 / 3], dtype=torch.float64) for Lorenz-63, or one "
                "row per member, (N_ens, N_par)")
        try:
            theta = parameters if isinstance(parameters, torch.Tensor) else \
                torch.as_tensor(parameters, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"parameters: expected a tensor or a sequence of floats, got "
                            f"{type(parameters).__name__} ({err})"[:300]) from None
        if theta.dtype == torch.bool or theta.is_complex():
            raise TypeError(f"parameters: expected real values, got dtype {theta.dtype}")
        if theta.ndim == 1 and theta.shape[0] == n_par:
            theta = theta.unsqueeze(0).expand(n, -1)
        if theta.shape != (n, n_par):
            raise ValueError(f"parameters: expected shape (N_par,) = ({n_par},) or "
                             f"(N_ens, N_par) = ({n}, {n_par}) ({listed}), got "
                             f"{tuple(theta.shape)}")
        return theta.to(dtype=self.dtype)

    def _check_generator(self, generator: Any) -> None:
        if generator is None:
            if self._needs_generator:
                raise ValueError("generator: a stochastic model needs a torch.Generator to "
                                 "propagate (a filter passes its own), e.g. "
                                 "torch.Generator().manual_seed(0); got None")
            return
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got "
                            f"{type(generator).__name__}")

    def __repr__(self) -> str:
        names = ", ".join(b.name for b in self._layout.blocks)
        return (f"{type(self).__name__}({names}; N_obs={self.output_size}, "
                f"dtype={self.dtype}, device={self.device})")


def check_x0(x0: Any, d: int | None, name: str = "x0", *, dtype: torch.dtype,
             device: torch.device, nonnegative_int: bool = False) -> torch.Tensor:
    """A known initial state ``(d,)``."""
    if isinstance(x0, torch.Tensor):
        t = x0.detach().to(torch.float64).cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(x0, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name}: expected a sequence of floats, got {x0!r} ({err})"[:300]) \
                from None
    t = t.reshape(-1) if t.ndim == 0 else t
    if t.ndim != 1 or (d is not None and t.shape[0] != d):
        want = f"({d},)" if d is not None else "(d,)"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values")
    if nonnegative_int and bool(((t < 0) | (t != torch.round(t))).any()):
        raise ValueError(f"{name}: expected non-negative integer counts, got {t.tolist()}")
    return t.to(device=device, dtype=dtype)


def march(x: torch.Tensor, obs_steps: list[int], advance) -> torch.Tensor:
    """Fixed-step time loop shared by RK4, Euler-Maruyama and tau-leaping.

    ``x`` is the ``(n, d)`` state at step 0; ``advance(k, x)`` returns the state at step
    ``k + 1``. Returns the states at the step indices ``obs_steps`` (increasing), shape
    ``(n, len(obs_steps), d)``; no step is taken after the last observation.
    """
    out = x.new_empty((x.shape[0], len(obs_steps), x.shape[1]))
    j = 0
    last = obs_steps[-1]
    for k in range(last + 1):
        while j < len(obs_steps) and obs_steps[j] == k:
            out[:, j] = x
            j += 1
        if k == last:
            break
        x = advance(k, x)
    return out
