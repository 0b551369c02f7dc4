"""Ordinary differential equation models, vectorised over members.

An :class:`ODEModel` integrates ``dx/dt = f(t, x; theta)`` for every member at once (the
state is ``(N_ens, d)``, members first; only the time loop is a Python loop) from a known
initial state ``x(t0) = x0`` and observes chosen components at times ``t_obs``:

    y_j = ( x_j(t_1)[observe], ..., x_j(t_T)[observe] ),   shape (N_ens, N_obs),
    N_obs = T * len(observe)                                (time-major).

Solvers are typed objects:

* :class:`RK4` ``(dt)`` -- the classical fixed-step fourth-order Runge-Kutta scheme,
  ``x_{k+1} = x_k + dt/6 (k1 + 2 k2 + 2 k3 + k4)``; global error ``O(dt^4)``. Observation
  times must lie on the grid ``t0 + k dt`` (anything else is refused with a ``ValueError``:
  no silent interpolation).
* :class:`DormandPrince` ``(rtol, atol)`` -- the adaptive embedded 5(4) pair of Dormand &
  Prince (1980), the scheme of scipy's ``RK45``, with a step size per member: each member
  keeps its own time, step and error estimate, all members advance together, and members
  that are done (or failed) take zero steps. Steps are shortened to land exactly on each
  observation time, so any ``t_obs`` works. A member whose step size underflows, whose state
  becomes non-finite, or that exceeds ``max_steps`` gets a NaN prediction (a failed member,
  see :func:`enkal.evaluate`).

Every operation is row-wise, so a member evaluated alone gives the same prediction as in a
batch (bitwise for RK4; to rounding for DormandPrince, whose step-size control uses ``pow``).

The named systems are thin subclasses: :class:`Lorenz63`, :class:`Lorenz96`, :class:`SIR`,
:class:`LotkaVolterra`. Every model also advances given states from ``t0`` to ``t1``,
``propagate(states, t0, t1, *, parameters)``: a filter's forecast, with the same solver code
(RK4 bitwise the forward's steps; see :meth:`SimulatorModel.propagate
<enkal.models._common.SimulatorModel.propagate>`).

>>> import torch
>>> model = Lorenz63(t_obs=[0.5, 1.0], observe=["x"], solver=RK4(dt=0.01))
>>> theta = torch.tensor([[10.0, 28.0, 8.0 / 3.0], [10.0, 28.0, 8.0 / 3.0]], dtype=torch.float64)
>>> y = model(theta)
>>> y.shape, model.output_names
(torch.Size([2, 2]), ['x(t=0.5)', 'x(t=1)'])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from enkal import ParameterLayout, Positive, Real

from ._common import (
    SimulatorModel,
    _check_float,
    check_x0,
    grid_origin,
    grid_steps,
    march,
    state_size,
    steps_for,
)

__all__ = [
    "RK4",
    "DormandPrince",
    "ODEModel",
    "Lorenz63",
    "Lorenz96",
    "SIR",
    "LotkaVolterra",
    "lorenz63_rhs",
    "lorenz96_rhs",
]

Rhs = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass(frozen=True)
class RK4:
    """Classical fixed-step Runge-Kutta of order 4 with step ``dt``."""

    dt: float

    def __post_init__(self) -> None:
        _check_float(self.dt, "dt", positive=True)


@dataclass(frozen=True)
class DormandPrince:
    """Adaptive Dormand-Prince 5(4) with per-member step-size control [Dormand1980].

    A step is accepted when the RMS over components of
    ``err_i / (atol + rtol * max(|x_i|, |x_new_i|))`` is at most 1; the next step is
    ``h * clip(0.9 * err^(-1/5), 0.2, 10)``.
    """

    rtol: float = 1e-6
    atol: float = 1e-9
    max_steps: int = 100_000
    first_step: float | None = None

    def __post_init__(self) -> None:
        _check_float(self.rtol, "rtol", positive=True)
        _check_float(self.atol, "atol", positive=True)
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) \
                or self.max_steps < 1:
            raise ValueError(f"max_steps: expected an int >= 1, got {self.max_steps!r}")
        if self.first_step is not None:
            _check_float(self.first_step, "first_step", positive=True)


# Dormand-Prince 5(4) tableau (FSAL: the last stage is the next step's first).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
# error weights: 5th-order minus embedded 4th-order weights
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


class ODEModel(SimulatorModel):
    """A forward model that integrates an ODE for every member and observes its state.

    Parameters
    ----------
    rhs : callable
        ``rhs(t, x, p) -> dx/dt`` with ``t`` of shape ``(n, 1)``, the state ``x`` of shape
        ``(n, d)`` and ``p`` the parameters as ``{name: (n, *shape)}`` (scalars ``(n,)``, as
        from :meth:`ParameterLayout.unflatten`); must be row-wise (member ``j``'s output only
        depends on row ``j``).
    layout : ParameterLayout
        The ``N_par`` parameters: names, shapes, constraints (``Positive`` parameters are
        checked to be ``>= 0``).
    x0 : sequence of d floats, or callable
        The known initial state, or ``x0(p) -> (n, d)`` for an initial state that depends on
        the parameters (then ``state_names`` must be given to fix ``d``).
    t_obs : sequence of floats
        Strictly increasing observation times ``>= t0`` (``T`` of them).
    solver : RK4 or DormandPrince
    observe : sequence of int or str, optional
        The observed components (indices or ``state_names``); default all.
    t0 : float
        Initial time.
    state_names : sequence of str, optional
        Names of the ``d`` components (``x0, x1, ...`` by default).
    device, dtype :
        Where and in what precision to integrate (default CPU, float64).

    Notes
    -----
    ``forward(parameters)`` takes physical parameters ``(N_ens, N_par)`` and returns
    ``(N_ens, N_obs)`` with ``N_obs = T * len(observe)``, time-major.

    Examples
    --------
    Exponential decay ``dx/dt = -k x``, observed at ``t = 1``:

    >>> import torch
    >>> from enkal import ParameterLayout, Positive
    >>> decay = ODEModel(lambda t, x, p: -p["k"][:, None] * x,
    ...                  ParameterLayout([("k", (), Positive())]), x0=[1.0], t_obs=[1.0],
    ...                  solver=RK4(dt=0.01))
    >>> y = decay(torch.tensor([[1.0], [2.0]], dtype=torch.float64))
    >>> torch.allclose(y[:, 0], torch.exp(-torch.tensor([1.0, 2.0], dtype=torch.float64)))
    True
    """

    def __init__(
        self,
        rhs: Rhs,
        layout: ParameterLayout,
        x0: Any,
        t_obs: Any,
        *,
        solver: RK4 | DormandPrince = RK4(dt=0.01),
        observe: Any = None,
        t0: float = 0.0,
        state_names: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if not callable(rhs):
            raise TypeError(f"rhs: expected a callable rhs(t, x, p), got {type(rhs).__name__}")
        if not isinstance(solver, (RK4, DormandPrince)):
            raise TypeError(
                f"solver: expected RK4(dt=...) or DormandPrince(rtol=..., atol=...), got "
                f"{solver!r}"[:200]
            )
        if callable(x0) and state_names is None:
            raise ValueError("state_names: required when x0 is a callable (it fixes d)")
        super()._setup(layout, d=state_size(x0, state_names), t_obs=t_obs, t0=t0,
                       observe=observe, state_names=state_names, device=device, dtype=dtype)
        self.rhs = rhs
        self.solver = solver
        self._x0_fn = x0 if callable(x0) else None
        self.x0 = None if callable(x0) else check_x0(x0, self.state_size, dtype=self.dtype,
                                                      device=self.device)
        if isinstance(solver, RK4):
            self._obs_steps = steps_for(self.t_obs, self.t0, solver.dt)

    def initial_state(self, p: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """``x(t0)`` for ``n`` members, shape ``(n, d)``."""
        if self._x0_fn is None:
            return self.x0.expand(n, -1).clone()
        x = self._x0_fn(p)
        if not isinstance(x, torch.Tensor) or x.shape != (n, self.state_size):
            raise ValueError(
                f"x0: the callable must return a tensor of shape ({n}, {self.state_size}), got "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def _simulate(self, theta: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.initial_state(p, theta.shape[0])
        if isinstance(self.solver, RK4):
            return self._rk4(x, p, self.t0, self._obs_steps)
        return self._dopri(x, p, self.t0, self.t_obs)

    def _advance(self, x: torch.Tensor, p: dict[str, torch.Tensor], t0: float, t1: float,
                 generator: torch.Generator | None) -> torch.Tensor:
        """The state at ``t1`` from ``x`` at ``t0`` (:meth:`propagate`): RK4 steps on the
        model's grid (see :func:`grid_origin`), or Dormand-Prince to ``t1`` by the very code
        ``forward`` runs (``_dopri``; failed members are NaN rows)."""
        if isinstance(self.solver, RK4):
            dt = self.solver.dt
            origin, first = grid_origin(t0, self.t0, dt)
            return self._rk4(x, p, origin, grid_steps(t0, t1, dt), first=first)[:, 0]
        return self._dopri(x, p, t0, [t1])[:, 0]

    # -- fixed step ---------------------------------------------------------------------
    def _rk4(self, x: torch.Tensor, p: dict, t0: float, obs_steps: list[int], *,
             first: int = 0) -> torch.Tensor:
        """RK4 from ``x`` at step ``first`` of the grid ``t0 + k dt``; the states ``obs_steps``
        steps later, ``(n, len(obs_steps), d)``."""
        n = x.shape[0]
        dt = self.solver.dt
        f = self.rhs

        def advance(k: int, x: torch.Tensor) -> torch.Tensor:
            t = t0 + (first + k) * dt
            tt = x.new_full((n, 1), t)
            th = x.new_full((n, 1), t + 0.5 * dt)
            k1 = f(tt, x, p)
            k2 = f(th, x + (0.5 * dt) * k1, p)
            k3 = f(th, x + (0.5 * dt) * k2, p)
            k4 = f(x.new_full((n, 1), t + dt), x + dt * k3, p)
            return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

        return march(x, obs_steps, advance)

    # -- adaptive -----------------------------------------------------------------------
    def _rms(self, v: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.mean(v * v, dim=1))

    def _dopri(self, x: torch.Tensor, p: dict, t0: float, times: list[float]) -> torch.Tensor:
        """Dormand-Prince from the states ``x`` ``(n, d)`` at ``t0`` through the increasing
        ``times >= t0``: ``(n, len(times), d)``, NaN for failed members. ``forward`` runs it
        from the model's ``x0, t0`` through ``t_obs``; ``propagate`` from the members' states
        to ``[t1]``."""
        s: DormandPrince = self.solver
        f = self.rhs
        n, d = x.shape
        T = len(times)
        t_obs = torch.tensor(times, dtype=self.dtype, device=self.device)
        out = x.new_full((n, T, d), math.nan)
        t = x.new_full((n,), t0)
        k_obs = torch.zeros(n, dtype=torch.long, device=self.device)
        # observations at t0 itself
        at_start = int(sum(1 for v in times if v <= t0))
        if at_start:
            out[:, :at_start] = x[:, None, :]
            k_obs += at_start
        done = k_obs >= T
        failed = torch.zeros(n, dtype=torch.bool, device=self.device)
        k1 = f(t[:, None], x, p)
        if s.first_step is None:
            h = self._first_step(t, x, k1, p, times[-1] - t0)
        else:
            h = x.new_full((n,), s.first_step)
        steps = torch.zeros(n, dtype=torch.long, device=self.device)
        eps = torch.finfo(self.dtype).eps
        while not bool(done.all()):
            target = t_obs[k_obs.clamp(max=T - 1)]
            gap = target - t
            clipped = gap <= h
            h_try = torch.where(done, torch.zeros_like(h), torch.where(clipped, gap, h))
            hc = h_try[:, None]
            ks = [k1]
            for i in range(1, 7):
                incr = sum(a * kk for a, kk in zip(_DP_A[i], ks, strict=True) if a != 0.0)
                ks.append(f((t + _DP_C[i] * h_try)[:, None], x + hc * incr, p))
            x_new = x + hc * sum(b * kk for b, kk in zip(_DP_A[6], ks[:6], strict=True) if b != 0.0)
            err_vec = hc * sum(e * kk for e, kk in zip(_DP_E, ks, strict=True) if e != 0.0)
            scale = s.atol + s.rtol * torch.maximum(x.abs(), x_new.abs())
            err = self._rms(err_vec / scale)
            finite = torch.isfinite(err) & torch.isfinite(x_new).all(dim=1)
            accept = (err <= 1.0) & finite & ~done
            # step-size update: grow after acceptance, shrink after rejection
            fac = 0.9 * torch.pow(err.clamp(min=1e-10), -0.2)
            fac = torch.where(accept, fac.clamp(0.2, 10.0), fac.clamp(0.2, 1.0))
            h_next = torch.where(finite, h_try * fac, h_try * 0.2)
            # a step shortened to hit an observation time does not limit the next one
            h_next = torch.where(accept & clipped, torch.maximum(h_next, h), h_next)
            h = torch.where(done, h, h_next)
            t = torch.where(accept, torch.where(clipped, target, t + h_try), t)
            x = torch.where(accept[:, None], x_new, x)
            k1 = torch.where(accept[:, None], ks[6], k1)
            hit = accept & clipped
            if bool(hit.any()):
                rows = torch.nonzero(hit).squeeze(1)
                out[rows, k_obs[rows]] = x[rows]
                k_obs = k_obs + hit.long()
            steps = steps + (~done).long()
            bad = ~done & ((h <= 10.0 * eps * t.abs().clamp(min=1.0)) | (steps > s.max_steps))
            failed |= bad
            done = done | bad | (k_obs >= T)
        if bool(failed.any()):
            out[failed] = math.nan
        return out

    def _first_step(self, t, x, f0, p, span: float) -> torch.Tensor:
        """Hairer, Norsett & Wanner's starting step (as scipy's ``select_initial_step``)."""
        s: DormandPrince = self.solver
        if span <= 0:
            return x.new_full((x.shape[0],), 1.0)
        scale = s.atol + s.rtol * x.abs()
        d0 = self._rms(x / scale)
        d1 = self._rms(f0 / scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        h0 = h0.clamp(max=span)
        x1 = x + h0[:, None] * f0
        f1 = self.rhs((t + h0)[:, None], x1, p)
        d2 = self._rms((f1 - f0) / scale) / h0
        big = torch.maximum(d1, d2)
        h1 = torch.where(big <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                         torch.pow(0.01 / big.clamp(min=1e-300), 0.2))
        h = torch.minimum(100.0 * h0, h1).clamp(max=span)
        return torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-6))


# -- named systems ----------------------------------------------------------------------

def lorenz63_rhs(t: torch.Tensor, x: torch.Tensor, p: dict) -> torch.Tensor:
    """``(sigma (y - x), x (rho - z) - y, x y - beta z)``."""
    X, Y, Z = x[:, 0], x[:, 1], x[:, 2]
    return torch.stack(
        [p["sigma"] * (Y - X), X * (p["rho"] - Z) - Y, X * Y - p["beta"] * Z], dim=1
    )


class Lorenz63(ODEModel):
    """Lorenz (1963) [Lorenz1963]: ``x' = sigma (y - x)``, ``y' = x (rho - z) - y``, ``z' = x y - beta z``.

    Parameters ``sigma``, ``rho``, ``beta`` (all ``Positive``; the classical chaotic values
    are 10, 28, 8/3); the state ``(x, y, z)`` starts at the known ``x0``.

    Parameters
    ----------
    t_obs : sequence of floats
    x0 : 3 floats
        Default ``(1, 1, 1)``.
    observe : components, default all of ``("x", "y", "z")``.
    solver, t0, device, dtype : as :class:`ODEModel`.

    Examples
    --------
    >>> import torch
    >>> m = Lorenz63(t_obs=[0.1, 0.2], solver=RK4(dt=0.01))
    >>> m.layout.names, m.output_size
    (['sigma', 'rho', 'beta'], 6)
    >>> m(torch.tensor([[10.0, 28.0, 8 / 3]], dtype=torch.float64)).shape
    torch.Size([1, 6])
    """

    def __init__(
        self,
        t_obs: Any,
        *,
        x0: Any = (1.0, 1.0, 1.0),
        observe: Any = None,
        solver: RK4 | DormandPrince = RK4(dt=0.01),
        t0: float = 0.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        layout = ParameterLayout(
            [("sigma", (), Positive()), ("rho", (), Positive()), ("beta", (), Positive())]
        )
        super().__init__(lorenz63_rhs, layout, x0, t_obs, solver=solver, observe=observe,
                         t0=t0, state_names=("x", "y", "z"), device=device, dtype=dtype)


def lorenz96_rhs(t: torch.Tensor, x: torch.Tensor, p: dict) -> torch.Tensor:
    """``dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F_i``, indices modulo ``N``."""
    F = p["F"]
    F = F[:, None] if F.ndim == 1 else F
    return (torch.roll(x, -1, dims=1) - torch.roll(x, 2, dims=1)) * torch.roll(x, 1, dims=1) \
        - x + F


class Lorenz96(ODEModel):
    """Lorenz (1996) [Lorenz1996]: ``x_i' = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F`` on a ring of ``N`` sites.

    The forcing ``F`` is the parameter (``Real``): one scalar (``per_site=False``, N_par = 1)
    or one per site (``per_site=True``, N_par = N, named ``F[0]...``).

    Parameters
    ----------
    t_obs : sequence of floats
    n_sites : int
        ``N >= 4``.
    per_site : bool
    x0 : N floats, optional
        Default ``8`` everywhere with ``x0[0] = 8.01`` (the classical perturbed rest state).
    observe, solver, t0, device, dtype : as :class:`ODEModel`.

    Examples
    --------
    >>> import torch
    >>> m = Lorenz96(t_obs=[0.05, 0.1], n_sites=8, observe=[0, 4], solver=RK4(dt=0.01))
    >>> m(torch.full((3, 1), 8.0, dtype=torch.float64)).shape
    torch.Size([3, 4])
    """

    def __init__(
        self,
        t_obs: Any,
        *,
        n_sites: int = 40,
        per_site: bool = False,
        x0: Any = None,
        observe: Any = None,
        solver: RK4 | DormandPrince = RK4(dt=0.01),
        t0: float = 0.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if isinstance(n_sites, bool) or not isinstance(n_sites, int):
            raise TypeError(f"n_sites: expected an int, got {type(n_sites).__name__}")
        if n_sites < 4:
            raise ValueError(f"n_sites: expected an int >= 4, got {n_sites}")
        if x0 is None:
            x0 = [8.0] * n_sites
            x0[0] += 0.01
        layout = ParameterLayout([("F", (n_sites,) if per_site else (), Real())])
        super().__init__(lorenz96_rhs, layout, x0, t_obs, solver=solver, observe=observe,
                         t0=t0, state_names=[f"x{i}" for i in range(n_sites)], device=device,
                         dtype=dtype)
        self.per_site = bool(per_site)


def _sir_rhs(t: torch.Tensor, x: torch.Tensor, p: dict) -> torch.Tensor:
    s, i = x[:, 0], x[:, 1]
    inf = p["beta"] * s * i
    rec = p["gamma"] * i
    return torch.stack([-inf, inf - rec, rec], dim=1)


class SIR(ODEModel):
    """Kermack-McKendrick SIR in population fractions.

    ``s' = -beta s i``, ``i' = beta s i - gamma i``, ``r' = gamma i``, with the
    infection rate ``beta`` and the recovery rate ``gamma`` (both ``Positive``); by default
    only the infected fraction ``i`` is observed.

    Parameters
    ----------
    t_obs : sequence of floats
    infected : float
        Initial infected fraction ``i(t0)`` in ``(0, 1)``; ``s(t0) = 1 - i(t0)``, ``r(t0) = 0``.
    observe : default ``("I",)``; the state is ``("S", "I", "R")``.
    solver, t0, device, dtype : as :class:`ODEModel`.

    Examples
    --------
    >>> import torch
    >>> m = SIR(t_obs=[1.0, 2.0, 3.0], solver=RK4(dt=0.1))
    >>> y = m(torch.tensor([[0.5, 0.1]], dtype=torch.float64))
    >>> y.shape, bool((y > 0.01).all())
    (torch.Size([1, 3]), True)
    """

    def __init__(
        self,
        t_obs: Any,
        *,
        infected: float = 0.01,
        observe: Any = ("I",),
        solver: RK4 | DormandPrince = RK4(dt=0.1),
        t0: float = 0.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        i0 = _check_float(infected, "infected")
        if not 0.0 < i0 < 1.0:
            raise ValueError(f"infected: expected a fraction in (0, 1), got {i0}")
        layout = ParameterLayout([("beta", (), Positive()), ("gamma", (), Positive())])
        super().__init__(_sir_rhs, layout, (1.0 - i0, i0, 0.0), t_obs, solver=solver,
                         observe=observe, t0=t0, state_names=("S", "I", "R"), device=device,
                         dtype=dtype)


def _lv_rhs(t: torch.Tensor, x: torch.Tensor, p: dict) -> torch.Tensor:
    u, v = x[:, 0], x[:, 1]
    return torch.stack(
        [p["alpha"] * u - p["beta"] * u * v, p["delta"] * u * v - p["gamma"] * v], dim=1
    )


class LotkaVolterra(ODEModel):
    """Lotka-Volterra predator-prey: ``u' = alpha u - beta u v``, ``v' = delta u v - gamma v``.

    ``u`` is the prey, ``v`` the predator; ``alpha`` (prey growth), ``beta`` (predation),
    ``gamma`` (predator death) and ``delta`` (predator growth per prey) are ``Positive``.

    Parameters
    ----------
    t_obs : sequence of floats
    x0 : 2 floats
        Default ``(10, 10)``.
    observe : default both of ``("prey", "predator")``.
    solver, t0, device, dtype : as :class:`ODEModel`.

    Examples
    --------
    >>> import torch
    >>> m = LotkaVolterra(t_obs=[1.0, 2.0], solver=RK4(dt=0.01))
    >>> m(torch.tensor([[1.1, 0.4, 0.4, 0.1]], dtype=torch.float64)).shape
    torch.Size([1, 4])
    """

    def __init__(
        self,
        t_obs: Any,
        *,
        x0: Any = (10.0, 10.0),
        observe: Any = None,
        solver: RK4 | DormandPrince = RK4(dt=0.01),
        t0: float = 0.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        layout = ParameterLayout([("alpha", (), Positive()), ("beta", (), Positive()),
                                  ("gamma", (), Positive()), ("delta", (), Positive())])
        super().__init__(_lv_rhs, layout, x0, t_obs, solver=solver, observe=observe, t0=t0,
                         state_names=("prey", "predator"), device=device, dtype=dtype)
