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

__all__ = ["SimulatorModel", "check_dtype_device", "check_times", "steps_for", "grid_steps"]


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
        raise ValueError(f"t1: a fixed-step solver advances by whole steps of {what}={dt:g}; "
                         f"t1 - t0 = {t1 - t0:g} is {q:.6g} steps. Propagate between times "
                         f"on the grid t0 + k*{what}")
    return [int(k)]


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

    def propagate(self, states: torch.Tensor, t0: float, t1: float, *,
                  parameters: Any = None, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        """Advance an ensemble of states from ``t0`` to ``t1`` (a filter's forecast).

        Parameters
        ----------
        states : Tensor, shape (N_ens, d)
            The states at ``t0``, members first.
        t0, t1 : float
            Start and end times, ``t1 >= t0`` (on the solver's grid for fixed steps).
        parameters : array-like, shape (N_par,) or (N_ens, N_par)
            Physical parameters: shared by every member, or one row per member (joint
            state-parameter estimation). Required.
        generator : torch.Generator, optional
            The noise of stochastic models (required for them; unused by ODEs).

        Returns
        -------
        Tensor, shape (N_ens, d), in the dtype and on the device of ``states``. A member
        whose integration fails (non-finite, step-size underflow) is a NaN row.
        """
        x, p, t0, t1 = self._propagate_inputs(states, t0, t1, parameters)
        if t1 == t0 or x.shape[0] == 0:
            return states.detach().clone()
        out = self._advance(x, p, t0, t1, generator)
        return out.to(device=states.device, dtype=states.dtype)

    def _advance(self, x: torch.Tensor, p: dict[str, torch.Tensor], t0: float, t1: float,
                 generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def _propagate_inputs(self, states: Any, t0: Any, t1: Any, parameters: Any):
        """Validated ``(x, p, t0, t1)`` for :meth:`propagate`."""
        if not isinstance(states, torch.Tensor) or not states.is_floating_point():
            raise TypeError(f"states: expected a floating tensor (N_ens, d), got "
                            f"{type(states).__name__}")
        if states.ndim != 2 or states.shape[1] != self.state_size:
            raise ValueError(f"states: expected shape (N_ens, d) with d = {self.state_size} "
                             f"({', '.join(self.state_names)}), got {tuple(states.shape)}")
        t0, t1 = _check_float(t0, "t0"), _check_float(t1, "t1")
        if t1 < t0:
            raise ValueError(f"t1: expected t1 >= t0 = {t0:g}, got {t1:g}")
        if parameters is None:
            raise ValueError("parameters: the model's parameters are needed to propagate; "
                             "pass the known physical values, e.g. torch.tensor([10., 28., "
                             "8 / 3]) for Lorenz-63, or one row per member")
        # a list of Python floats is float64 (torch.as_tensor would make it float32: 8/3 rounded)
        theta = (parameters if isinstance(parameters, torch.Tensor) else
                 torch.as_tensor(parameters, dtype=torch.float64)).to(dtype=self.dtype)
        if theta.ndim == 1:
            theta = theta.unsqueeze(0).expand(states.shape[0], -1)
        if theta.ndim != 2 or theta.shape[0] != states.shape[0]:
            raise ValueError(f"parameters: expected (N_par,) or (N_ens, N_par) with N_ens = "
                             f"{states.shape[0]}, got {tuple(theta.shape)}")
        _, p = self._prepare(theta)
        x = states.detach().to(device=self.device, dtype=self.dtype)
        return x, p, t0, t1

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
