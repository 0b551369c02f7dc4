"""A polynomial-library ODE: sparse identification of dynamics as ensemble inversion.

The right-hand side is a linear combination of all monomials of the state up to a degree
(SINDy's library ``Theta``)::

    dx/dt = Theta(x) Xi,     Theta(x) = (1, x_1, ..., x_d, x_1^2, x_1 x_2, ..., x_d^2, ...)

with one coefficient per (equation, monomial): for ``d = 3`` and degree 2, 10 monomials x 3
equations = 30 parameters, named ``"dx/dt:x*z"`` and ordered equation-major (all terms of
``dx/dt``, then of ``dy/dt``, ...). Lorenz-63 is the sparse member with seven nonzero
coefficients: ``dx/dt: -sigma x + sigma y``, ``dy/dt: rho x - y - x z``,
``dz/dt: x y - beta z`` (:func:`lorenz63_coefficients`).

The model integrates every member from each of ``K`` known initial states (short
trajectories from several starting points identify the coefficients far better than one long
chaotic one) with :class:`~enkal.models.ode.RK4`, all members and trajectories at once; the
prediction of a member is trajectory-major, then time-major::

    y[:, (k * T + i) * d' + c] = x^(k)(t_obs[i])[observe[c]]

so ``N_obs = K * T * len(observe)``. Coefficients are ``Real`` (zero is a value like any
other, so a masked coefficient -- held at 0 in the unconstrained space -- is a removed term).

>>> import torch
>>> m = PolynomialODE(x0=[[1.0, 1.0, 1.0]], t_obs=[0.1], solver=RK4(dt=0.01))
>>> m.layout.size, m.terms[:5]
(30, ['1', 'x', 'y', 'z', 'x^2'])
>>> xi = lorenz63_coefficients(m)[None, :]
>>> from enkal.models import ode
>>> torch.allclose(m(xi), ode.Lorenz63(t_obs=[0.1], solver=ode.RK4(dt=0.01))(
...     torch.tensor([[10.0, 28.0, 8 / 3]], dtype=torch.float64)), atol=1e-12)
True
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from enkal import ParameterLayout

from ._common import SimulatorModel, check_x0, grid_steps, march, steps_for
from .ode import RK4

__all__ = ["PolynomialODE", "monomial_exponents", "lorenz63_coefficients"]


def monomial_exponents(d: int, degree: int) -> list[tuple[int, ...]]:
    """Exponent tuples of all monomials of ``d`` variables up to ``degree``, graded order.

    >>> monomial_exponents(2, 2)
    [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    """
    out: list[tuple[int, ...]] = []
    for total in range(degree + 1):
        for combo in itertools.combinations_with_replacement(range(d), total):
            e = [0] * d
            for c in combo:
                e[c] += 1
            out.append(tuple(e))
    return out


def _term_name(exps: tuple[int, ...], names: list[str]) -> str:
    parts = []
    for n, e in zip(names, exps, strict=True):
        if e == 1:
            parts.append(n)
        elif e > 1:
            parts.append(f"{n}^{e}")
    return "*".join(parts) if parts else "1"


class PolynomialODE(SimulatorModel):
    """``dx/dt = Theta(x) Xi`` with all monomials up to ``degree``, from ``K`` initial states
    (a SINDy library [Brunton2016]).

    Parameters
    ----------
    x0 : (K, d) floats
        The known initial states of the ``K`` trajectories (one row each).
    t_obs : sequence of floats
        Observation times (on the RK4 grid), the same for every trajectory.
    degree : int
        Highest total degree of the monomials (default 2).
    solver : RK4
    observe : components to observe (indices or ``state_names``), default all.
    state_names : d names, default ``("x", "y", "z")`` when ``d = 3``, else ``x0, x1, ...``.
    t0, device, dtype : as :class:`~enkal.models.ode.ODEModel`.

    Attributes
    ----------
    terms : list of str
        The monomials, e.g. ``['1', 'x', 'y', 'z', 'x^2', 'x*y', ...]``.
    """

    def __init__(
        self,
        x0: Any,
        t_obs: Any,
        *,
        degree: int = 2,
        solver: RK4 = RK4(dt=0.01),
        observe: Any = None,
        state_names: Any = None,
        t0: float = 0.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if not isinstance(solver, RK4):
            raise TypeError(f"solver: expected RK4(dt=...), got {solver!r}"[:200])
        if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= 6:
            raise ValueError(f"degree: expected an int in [1, 6], got {degree!r}")
        x0_t = torch.as_tensor(x0, dtype=torch.float64) if not isinstance(x0, torch.Tensor) \
            else x0.detach().to(torch.float64).cpu()
        if x0_t.ndim == 1:
            x0_t = x0_t[None, :]
        if x0_t.ndim != 2 or x0_t.shape[0] < 1 or x0_t.shape[1] < 1:
            raise ValueError(f"x0: expected a (K, d) array of initial states, got shape "
                             f"{tuple(x0_t.shape)}")
        k, d = x0_t.shape
        if state_names is None:
            state_names = ("x", "y", "z") if d == 3 else None
        names = list(state_names) if state_names is not None else [f"x{i}" for i in range(d)]
        self.exponents = monomial_exponents(d, degree)
        self.terms = [_term_name(e, names) for e in self.exponents]
        layout = ParameterLayout([f"d{n}/dt:{t}" for n in names for t in self.terms])
        super()._setup(layout, d=d, t_obs=t_obs, t0=t0, observe=observe,
                       state_names=names, device=device, dtype=dtype)
        self.x0 = torch.stack([check_x0(row, d, f"x0[{i}]", dtype=self.dtype,
                                        device=self.device) for i, row in enumerate(x0_t)])
        self.n_trajectories = k
        self.degree = degree
        self.solver = solver
        self._obs_steps = steps_for(self.t_obs, self.t0, solver.dt)

    @property
    def output_size(self) -> int:
        return self.n_trajectories * len(self.t_obs) * len(self.observe)

    @property
    def output_names(self) -> list[str]:
        per = super().output_names
        return [f"{name}[{k}]" for k in range(self.n_trajectories) for name in per]

    def library(self, x: torch.Tensor) -> torch.Tensor:
        """``Theta(x)``: the monomials of states ``(n, d)``, shape ``(n, n_terms)``."""
        cols = [torch.ones_like(x[:, 0])]
        for e in self.exponents[1:]:
            v = None
            for c, p in enumerate(e):
                for _ in range(p):
                    v = x[:, c] if v is None else v * x[:, c]
            cols.append(v)
        return torch.stack(cols, dim=1)

    def coefficients(self, parameters: torch.Tensor) -> torch.Tensor:
        """``Xi`` per member: ``(n, N_par)`` -> ``(n, n_terms, d)``."""
        n = parameters.shape[0]
        return parameters.reshape(n, self.state_size, len(self.terms)).transpose(1, 2)

    def _simulate(self, theta: torch.Tensor, p: dict) -> torch.Tensor:
        n, k, d = theta.shape[0], self.n_trajectories, self.state_size
        xi = self.coefficients(theta).repeat_interleave(k, dim=0)     # (n K, terms, d)
        x = self.x0.repeat(n, 1)                                       # (n K, d), member-major
        states = self._rk4(x, xi, self._obs_steps)                     # (n K, T, d)
        t = states.shape[1]
        # members first, then trajectories: (n, K * T, d) -- _observe flattens time-major
        return states.reshape(n, k * t, d)

    def _advance(self, x: torch.Tensor, p: dict, t0: float, t1: float,
                 generator: torch.Generator | None) -> torch.Tensor:
        """One state per member from ``t0`` to ``t1`` (:meth:`propagate`; autonomous)."""
        theta = torch.cat([p[b.name].reshape(x.shape[0], -1) for b in self.layout.blocks], 1)
        return self._rk4(x, self.coefficients(theta), grid_steps(t0, t1, self.solver.dt))[:, 0]

    def _rk4(self, x: torch.Tensor, xi: torch.Tensor, obs_steps: list[int]) -> torch.Tensor:
        """RK4 of ``dz/dt = Theta(z) Xi`` for ``(m, d)`` states with ``(m, terms, d)``
        coefficients; the states at ``obs_steps``, ``(m, len(obs_steps), d)``."""
        dt = self.solver.dt

        def f(z: torch.Tensor) -> torch.Tensor:
            return torch.bmm(self.library(z)[:, None, :], xi)[:, 0, :]

        def advance(_: int, z: torch.Tensor) -> torch.Tensor:
            k1 = f(z)
            k2 = f(z + (0.5 * dt) * k1)
            k3 = f(z + (0.5 * dt) * k2)
            k4 = f(z + dt * k3)
            return z + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

        return march(x, obs_steps, advance)


def lorenz63_coefficients(model: PolynomialODE, sigma: float = 10.0, rho: float = 28.0,
                          beta: float = 8.0 / 3.0) -> torch.Tensor:
    """The seven nonzero Lorenz-63 coefficients in ``model``'s layout, shape ``(N_par,)``.

    ``dx/dt = -sigma x + sigma y``, ``dy/dt = rho x - y - x z``, ``dz/dt = x y - beta z``.
    """
    if not isinstance(model, PolynomialODE) or model.state_size != 3:
        raise TypeError("model: expected a PolynomialODE of a 3-component state")
    names = model.layout.names
    s = model.state_names
    truth = {
        f"d{s[0]}/dt:{s[0]}": -sigma, f"d{s[0]}/dt:{s[1]}": sigma,
        f"d{s[1]}/dt:{s[0]}": rho, f"d{s[1]}/dt:{s[1]}": -1.0,
        f"d{s[1]}/dt:{s[0]}*{s[2]}": -1.0,
        f"d{s[2]}/dt:{s[0]}*{s[1]}": 1.0, f"d{s[2]}/dt:{s[2]}": -beta,
    }
    out = torch.zeros(len(names), dtype=model.dtype, device=model.device)
    for key, v in truth.items():
        out[names.index(key)] = v
    return out
