"""Stochastic differential equation models (Euler-Maruyama), vectorised over members.

An :class:`SDEModel` simulates the Ito SDE with diagonal noise

    dX_t = f(t, X_t; theta) dt + g(t, X_t; theta) * dW_t,        X_{t0} = x0,

for all members at once with the Euler-Maruyama scheme on the grid ``t_k = t0 + k dt``,

    X_{k+1} = X_k + f(t_k, X_k) dt + g(t_k, X_k) * sqrt(dt) Z_k,    Z_k ~ N(0, I_d),

(strong order 1/2, weak order 1) and observes chosen components at ``t_obs`` (on the grid),
time-major: ``(N_ens, N_obs)`` with ``N_obs = T * len(observe)``.

Random streams
--------------
The forward is reproducible: the same ``seed`` and parameters give the same prediction, call
after call. Noise comes from counter-based streams (see ``enkal.models._random``): ``Z_k``
of a member is a pure function of ``(seed, key, k)``, with no generator state carried
between calls. The ``key`` is chosen by two switches:

* default -- the key is a hash of the member's parameter values: the model is a
  deterministic function of each row, so a member gives the same prediction alone, in any
  batch, in any chunk and in any position (``batched == one-by-one``). Members with
  bit-identical parameters get identical noise; use ``row_streams`` for replicates.
* ``row_streams=True`` -- the key is the member's row index in the call: ``n`` identical
  rows give ``n`` independent replicates (Monte Carlo at fixed parameters). The noise
  depends on the row, so a member moved to another row, or evaluated in another chunk,
  sees other noise (the first ``m`` rows of a batch do match a batch of those ``m`` rows).
* ``common_noise=True`` -- common random numbers: every member sees the same Brownian path
  ``W``, so differences between members are due to their parameters only (smooth in the
  parameters; ``batched == one-by-one``).

``propagate(states, t0, t1, *, parameters, generator)`` (a filter's forecast) draws its
normals from the caller's ``torch.Generator`` instead, ``(N_ens, d)`` per step in time order:
a filter that owns the generator repeats and resumes its runs bit for bit.

The named systems: :class:`OrnsteinUhlenbeck`, :class:`GeometricBrownianMotion`,
:class:`StochasticLorenz63`.

>>> import torch
>>> ou = OrnsteinUhlenbeck(t_obs=[0.5, 1.0], dt=0.01, seed=1)
>>> theta = torch.tensor([[1.0, 0.0, 0.5], [2.0, 1.0, 0.5]], dtype=torch.float64)
>>> y = ou(theta)
>>> y.shape, torch.equal(y, ou(theta)), torch.equal(ou(theta[1:]), y[1:])
(torch.Size([2, 2]), True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
from ._random import check_seed, standard_normal, stream_keys
from .ode import lorenz63_rhs

__all__ = ["SDEModel", "OrnsteinUhlenbeck", "GeometricBrownianMotion", "StochasticLorenz63"]

Coefficient = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


class SDEModel(SimulatorModel):
    """A forward model that simulates an SDE with diagonal noise by Euler-Maruyama.

    Parameters
    ----------
    drift : callable
        ``drift(t, x, p) -> (n, d)``: ``f`` with ``t`` of shape ``(n, 1)``, the state ``x``
        ``(n, d)`` and ``p = {name: (n, *shape)}`` (scalars ``(n,)``); row-wise.
    diffusion : callable
        ``diffusion(t, x, p) -> (n, d)`` (or broadcastable to it): the diagonal ``g``.
    layout : ParameterLayout
    x0 : sequence of d floats
        The known initial state.
    t_obs : sequence of floats
        Strictly increasing observation times on the grid ``t0 + k dt``.
    dt : float
        Euler-Maruyama step.
    observe : sequence of int or str, optional
        Observed components; default all.
    t0 : float
    seed : int
        Seed of the noise streams.
    common_noise : bool
        All members share one noise path (common random numbers).
    row_streams : bool
        Key each member's noise by its row in the call instead of by its parameter values
        (independent replicates of identical rows). Ignored with ``common_noise``.
    state_names : sequence of str, optional
    device, dtype :
        Default CPU, float64.

    Notes
    -----
    ``forward`` maps physical ``(N_ens, N_par)`` to ``(N_ens, N_obs)``. The noise of step
    ``k`` uses the pairs ``k * ceil(d / 2) ...`` of the member's stream. Float32 and float64
    models draw the same normals to float32 resolution (about ``1e-4``).

    Examples
    --------
    Brownian motion with drift, ``dX = a dt + dW``, observed at ``t = 1``:

    >>> import torch
    >>> from enkal import ParameterLayout
    >>> bm = SDEModel(lambda t, x, p: p["a"][:, None].expand_as(x),
    ...               lambda t, x, p: torch.ones_like(x), ParameterLayout(["a"]), x0=[0.0],
    ...               t_obs=[1.0], dt=0.1, seed=0, row_streams=True)
    >>> y = bm(torch.full((4000, 1), 2.0, dtype=torch.float64))
    >>> abs(float(y.mean()) - 2.0) < 0.07, abs(float(y.var()) - 1.0) < 0.1
    (True, True)
    """

    def __init__(
        self,
        drift: Coefficient,
        diffusion: Coefficient,
        layout: ParameterLayout,
        x0: Any,
        t_obs: Any,
        *,
        dt: float,
        observe: Any = None,
        t0: float = 0.0,
        seed: int = 0,
        common_noise: bool = False,
        row_streams: bool = False,
        state_names: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        for name, fn in (("drift", drift), ("diffusion", diffusion)):
            if not callable(fn):
                raise TypeError(f"{name}: expected a callable {name}(t, x, p), got "
                                f"{type(fn).__name__}")
        super()._setup(layout, d=state_size(x0, state_names), t_obs=t_obs, t0=t0, observe=observe,
                       state_names=state_names, device=device, dtype=dtype)
        self.drift = drift
        self.diffusion = diffusion
        self.dt = _check_float(dt, "dt", positive=True)
        self.x0 = check_x0(x0, self.state_size, dtype=self.dtype, device=self.device)
        self._obs_steps = steps_for(self.t_obs, self.t0, self.dt)
        self.seed = check_seed(seed)
        self.common_noise = bool(common_noise)
        self.row_streams = bool(row_streams)

    _needs_generator = True

    def _simulate(self, theta: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        keys = stream_keys(theta, seed=self.seed, common_noise=self.common_noise,
                           row_streams=self.row_streams)
        pairs = (self.state_size + 1) // 2
        x = self.x0.expand(theta.shape[0], -1).clone()
        return self._euler_maruyama(
            x, p, self.t0, self._obs_steps,
            lambda k: standard_normal(keys, k * pairs, self.state_size, self.dtype))

    def _advance(self, x: torch.Tensor, p: dict[str, torch.Tensor], t0: float, t1: float,
                 generator: torch.Generator | None) -> torch.Tensor:
        """Euler-Maruyama from ``t0`` to ``t1`` (:meth:`propagate`) on the model's grid (see
        :func:`~enkal.models._common.grid_origin`). The normals come from ``generator``:
        ``torch.randn((N_ens, d))`` per step in time order, on the generator's device (pass
        one on the model's device to avoid a copy per step), in the model's dtype."""
        n, d = x.shape
        origin, first = grid_origin(t0, self.t0, self.dt)

        def normals(k: int) -> torch.Tensor:
            return torch.randn(n, d, generator=generator, dtype=self.dtype,
                               device=generator.device).to(self.device)

        return self._euler_maruyama(x, p, origin, grid_steps(t0, t1, self.dt), normals,
                                    first=first)[:, 0]

    def _euler_maruyama(self, x: torch.Tensor, p: dict, t0: float, obs_steps: list[int],
                        normals: Callable[[int], torch.Tensor], *, first: int = 0
                        ) -> torch.Tensor:
        """Euler-Maruyama from ``x`` at step ``first`` of the grid ``t0 + k dt``, with the
        ``(n, d)`` normals ``normals(k)`` of the ``k``-th step taken; the states
        ``obs_steps`` steps later, ``(n, len(obs_steps), d)``."""
        n = x.shape[0]
        dt = self.dt
        sq = math.sqrt(dt)

        def advance(k: int, x: torch.Tensor) -> torch.Tensor:
            t = x.new_full((n, 1), t0 + (first + k) * dt)
            z = normals(k)
            return x + self.drift(t, x, p) * dt + self.diffusion(t, x, p) * (sq * z)

        return march(x, obs_steps, advance)


def _ou_drift(t, x, p):
    return p["theta"][:, None] * (p["mu"][:, None] - x)


def _ou_diffusion(t, x, p):
    return p["sigma"][:, None].expand_as(x)


class OrnsteinUhlenbeck(SDEModel):
    """Ornstein-Uhlenbeck: ``dX = theta (mu - X) dt + sigma dW``.

    Parameters ``theta`` (mean-reversion rate, ``Positive``), ``mu`` (long-run mean,
    ``Real``), ``sigma`` (volatility, ``Positive``). In closed form,
    ``E X_t = mu + (x0 - mu) e^{-theta t}`` and
    ``Var X_t = sigma^2 / (2 theta) (1 - e^{-2 theta t})``; Euler-Maruyama matches them to
    ``O(theta dt)`` (stationary variance ``sigma^2 / (theta (2 - theta dt))``).

    Parameters
    ----------
    t_obs : sequence of floats
    dt : float
    x0 : float
        Default 0.
    t0, seed, common_noise, row_streams, device, dtype : as :class:`SDEModel`.

    Examples
    --------
    >>> import torch
    >>> m = OrnsteinUhlenbeck(t_obs=[1.0, 2.0], dt=0.1, common_noise=True)
    >>> m.layout.names, m(torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)).shape
    (['theta', 'mu', 'sigma'], torch.Size([1, 2]))
    """

    def __init__(
        self,
        t_obs: Any,
        *,
        dt: float = 0.01,
        x0: float = 0.0,
        t0: float = 0.0,
        seed: int = 0,
        common_noise: bool = False,
        row_streams: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        layout = ParameterLayout([("theta", (), Positive()), ("mu", (), Real()),
                                  ("sigma", (), Positive())])
        super().__init__(_ou_drift, _ou_diffusion, layout, [_check_float(x0, "x0")], t_obs,
                         dt=dt, t0=t0, seed=seed, common_noise=common_noise,
                         row_streams=row_streams, state_names=("x",), device=device,
                         dtype=dtype)


def _gbm_drift(t, x, p):
    return p["mu"][:, None] * x


def _gbm_diffusion(t, x, p):
    return p["sigma"][:, None] * x


class GeometricBrownianMotion(SDEModel):
    """Geometric Brownian motion: ``dS = mu S dt + sigma S dW``.

    Parameters ``mu`` (drift, ``Real``) and ``sigma`` (volatility, ``Positive``).
    ``E S_t = s0 e^{mu t}``; Euler-Maruyama gives ``s0 (1 + mu dt)^(t / dt)``, and can step
    below zero when ``sigma sqrt(dt)`` is not small.

    Parameters
    ----------
    t_obs : sequence of floats
    dt : float
    s0 : float
        Default 1.
    t0, seed, common_noise, row_streams, device, dtype : as :class:`SDEModel`.

    Examples
    --------
    >>> import torch
    >>> m = GeometricBrownianMotion(t_obs=[0.5, 1.0], dt=0.01)
    >>> m(torch.tensor([[0.1, 0.2], [0.05, 0.3]], dtype=torch.float64)).shape
    torch.Size([2, 2])
    """

    def __init__(
        self,
        t_obs: Any,
        *,
        dt: float = 0.01,
        s0: float = 1.0,
        t0: float = 0.0,
        seed: int = 0,
        common_noise: bool = False,
        row_streams: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        layout = ParameterLayout([("mu", (), Real()), ("sigma", (), Positive())])
        super().__init__(_gbm_drift, _gbm_diffusion, layout, [_check_float(s0, "s0")], t_obs,
                         dt=dt, t0=t0, seed=seed, common_noise=common_noise,
                         row_streams=row_streams, state_names=("S",), device=device,
                         dtype=dtype)


class StochasticLorenz63(SDEModel):
    """Lorenz-63 with additive noise: ``dX = f_L63(X; sigma, rho, beta) dt + s dW``.

    Parameters ``sigma``, ``rho``, ``beta`` (``Positive``) as in
    :class:`~enkal.models.ode.Lorenz63`; the noise level ``s`` is a known constant
    (``noise_scale``).

    Parameters
    ----------
    t_obs : sequence of floats
    dt : float
    noise_scale : float
        ``s >= 0``, the same for the three components.
    x0 : 3 floats
        Default ``(1, 1, 1)``.
    observe, t0, seed, common_noise, row_streams, device, dtype : as :class:`SDEModel`.

    Examples
    --------
    >>> import torch
    >>> m = StochasticLorenz63(t_obs=[0.1, 0.2], dt=0.01, observe=["x"])
    >>> m(torch.tensor([[10.0, 28.0, 8 / 3]], dtype=torch.float64)).shape
    torch.Size([1, 2])
    """

    def __init__(
        self,
        t_obs: Any,
        *,
        dt: float = 0.01,
        noise_scale: float = 1.0,
        x0: Any = (1.0, 1.0, 1.0),
        observe: Any = None,
        t0: float = 0.0,
        seed: int = 0,
        common_noise: bool = False,
        row_streams: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        s = _check_float(noise_scale, "noise_scale")
        if s < 0:
            raise ValueError(f"noise_scale: expected a float >= 0, got {s}")
        self.noise_scale = s
        layout = ParameterLayout(
            [("sigma", (), Positive()), ("rho", (), Positive()), ("beta", (), Positive())]
        )
        super().__init__(lorenz63_rhs, lambda t, x, p: s, layout, x0, t_obs, dt=dt,
                         observe=observe, t0=t0, seed=seed, common_noise=common_noise,
                         row_streams=row_streams, state_names=("x", "y", "z"), device=device,
                         dtype=dtype)
