"""Markov jump processes (chemical reaction networks), vectorised over members.

A :class:`JumpModel` is a continuous-time Markov chain on counts ``X`` (``S`` species) with
``R`` reaction channels: channel ``r`` fires at rate (propensity) ``a_r(X; theta)`` and
changes the state by the row ``nu_r`` of the stoichiometry matrix ``nu`` (``R x S``). The
state is observed at fixed times ``t_obs``, right-continuously (an event at exactly ``t_i``
is seen at ``t_i``); the prediction is time-major, ``(N_ens, N_obs)`` with
``N_obs = T * len(observe)``.

Solvers are typed objects:

* :class:`Gillespie` -- the exact stochastic simulation algorithm (SSA, direct method,
  Gillespie 1977): waiting time ``tau = -log(u1) / a_0`` with ``a_0 = sum_r a_r``, channel
  ``r`` chosen with probability ``a_r / a_0`` by ``u2``. All members advance together, one
  event per member per sweep; a member whose next event falls after its next observation
  time records its current state there first, and members past the last observation time
  (or with ``a_0 = 0``) are masked out. The sweep count is the largest event count of any
  member, so the cost grows with the busiest member.
* :class:`TauLeaping` ``(tau)`` -- fixed-step tau-leaping (Gillespie 2001): each channel
  fires ``K_r ~ Poisson(a_r(X) tau)`` times per step. Approximate (bias ``O(tau)``); counts
  that would go negative are clipped at zero (a documented bias; choose ``tau`` small
  enough that this is rare). Observation times must lie on the grid ``t0 + k tau``.

Randomness follows the rules of :mod:`enkal.models.sde` (``seed``, ``common_noise``,
``row_streams``; default: streams keyed by the member's parameter values, so
``batched == one-by-one``). In the SSA a member's ``m``-th event uses the uniforms
``2m, 2m + 1`` of its stream, whatever the other members do; in tau-leaping step ``k`` and
channel ``r`` own one Poisson draw.

``propagate(states, t0, t1, *, parameters, generator)`` (a filter's forecast) starts each
member from its own counts and keys its stream for the call by a draw from the caller's
``torch.Generator``. The counts are used as given: a Kalman analysis makes them real-valued
(round or clip them first if the propensities need integers), and a member whose propensities
are negative or non-finite is a NaN row.

Named systems: :class:`BirthDeath`, :class:`StochasticSIR`, :class:`StochasticLotkaVolterra`.

>>> import torch
>>> bd = BirthDeath(t_obs=[1.0, 2.0], seed=0)
>>> y = bd(torch.tensor([[10.0, 1.0], [20.0, 1.0]], dtype=torch.float64))
>>> y.shape, torch.equal(y, bd(torch.tensor([[10.0, 1.0], [20.0, 1.0]], dtype=torch.float64)))
(torch.Size([2, 2]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from enkal import ParameterLayout, Positive

from ._common import SimulatorModel, _check_float, check_x0, grid_steps, march, steps_for
from ._random import check_seed, generator_keys, poisson, stream_keys, uniform

__all__ = [
    "Gillespie",
    "TauLeaping",
    "JumpModel",
    "BirthDeath",
    "StochasticSIR",
    "StochasticLotkaVolterra",
]

Propensity = Callable[[torch.Tensor, dict], torch.Tensor]


@dataclass(frozen=True)
class Gillespie:
    """Exact SSA (direct method) [Gillespie1977]. ``max_events``: per member; beyond it the
    member fails (NaN)."""

    max_events: int = 1_000_000

    def __post_init__(self) -> None:
        if isinstance(self.max_events, bool) or not isinstance(self.max_events, int) \
                or self.max_events < 1:
            raise ValueError(f"max_events: expected an int >= 1, got {self.max_events!r}")


@dataclass(frozen=True)
class TauLeaping:
    """Fixed-step tau-leaping with step ``tau`` (Poisson firings, counts clipped at zero)
    [Gillespie2001]."""

    tau: float

    def __post_init__(self) -> None:
        _check_float(self.tau, "tau", positive=True)


class JumpModel(SimulatorModel):
    """A forward model that simulates a reaction network for every member.

    Parameters
    ----------
    stoichiometry : array-like, shape (R, S)
        Integer state change ``nu_r`` of each channel.
    propensity : callable
        ``propensity(x, p) -> (n, R)``: the non-negative rates ``a_r`` for states ``x`` of
        shape ``(n, S)`` and parameters ``p = {name: (n, *shape)}`` (scalars ``(n,)``);
        row-wise.
    layout : ParameterLayout
    x0 : sequence of S non-negative integers
        The known initial counts.
    t_obs : sequence of floats
        Strictly increasing observation times ``>= t0``.
    solver : Gillespie or TauLeaping
    observe : sequence of int or str, optional
        Observed species; default all.
    t0 : float
    seed : int
    common_noise, row_streams : bool
        Random-stream choice, see :mod:`enkal.models.sde`.
    state_names : sequence of str, optional
    device, dtype :
        Default CPU, float64 (counts are held as floats: exact up to ``2**53``, or ``2**24``
        in float32).

    Examples
    --------
    Pure death ``X -> 0`` at rate ``k X`` from 50: ``X_t ~ Binomial(50, e^{-k t})``, mean
    18.4 and standard deviation 3.4 at ``k t = 1``, so the mean of 200 replicates is within
    4 standard errors (0.96) of it:

    >>> import torch
    >>> from enkal import ParameterLayout, Positive
    >>> death = JumpModel([[-1]], lambda x, p: p["k"][:, None] * x,
    ...                   ParameterLayout([("k", (), Positive())]), x0=[50], t_obs=[1.0],
    ...                   row_streams=True)
    >>> y = death(torch.full((200, 1), 1.0, dtype=torch.float64))
    >>> abs(float(y.mean()) - 50 * math.exp(-1.0)) < 0.96
    True
    """

    def __init__(
        self,
        stoichiometry: Any,
        propensity: Propensity,
        layout: ParameterLayout,
        x0: Any,
        t_obs: Any,
        *,
        solver: Gillespie | TauLeaping = Gillespie(),
        observe: Any = None,
        t0: float = 0.0,
        seed: int = 0,
        common_noise: bool = False,
        row_streams: bool = False,
        state_names: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if not callable(propensity):
            raise TypeError(f"propensity: expected a callable propensity(x, p), got "
                            f"{type(propensity).__name__}")
        if not isinstance(solver, (Gillespie, TauLeaping)):
            raise TypeError(f"solver: expected Gillespie() or TauLeaping(tau=...), got "
                            f"{solver!r}"[:200])
        try:
            nu = torch.as_tensor(stoichiometry, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"stoichiometry: expected an (R, S) integer array, got "
                            f"{stoichiometry!r} ({err})"[:300]) from None
        if nu.ndim != 2 or nu.numel() == 0 or bool((nu != torch.round(nu)).any()):
            raise ValueError(f"stoichiometry: expected a non-empty (R, S) array of integers, "
                             f"got shape {tuple(nu.shape)}")
        super()._setup(layout, d=nu.shape[1], t_obs=t_obs, t0=t0, observe=observe,
                       state_names=state_names, device=device, dtype=dtype)
        self.stoichiometry = nu.to(device=self.device, dtype=self.dtype)
        self.propensity = propensity
        self.solver = solver
        self.x0 = check_x0(x0, self.state_size, dtype=self.dtype, device=self.device,
                           nonnegative_int=True)
        self.seed = check_seed(seed)
        self.common_noise = bool(common_noise)
        self.row_streams = bool(row_streams)
        if isinstance(solver, TauLeaping):
            self._obs_steps = steps_for(self.t_obs, self.t0, solver.tau, what="tau")

    @property
    def n_reactions(self) -> int:
        return self.stoichiometry.shape[0]

    _needs_generator = True

    def _rates(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        a = self.propensity(x, p)
        if not isinstance(a, torch.Tensor) or a.shape != (x.shape[0], self.n_reactions):
            raise ValueError(
                f"propensity: expected a tensor of shape ({x.shape[0]}, {self.n_reactions}) = "
                f"(members, reactions), got {getattr(a, 'shape', type(a).__name__)}"
            )
        return a

    def _simulate(self, theta: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        keys = stream_keys(theta, seed=self.seed, common_noise=self.common_noise,
                           row_streams=self.row_streams)
        x = self.x0.expand(theta.shape[0], -1).clone()
        if isinstance(self.solver, Gillespie):
            return self._ssa(x, p, keys, self.t0, self.t_obs)
        return self._tau_leap(x, p, keys, self._obs_steps)

    def _advance(self, x: torch.Tensor, p: dict[str, torch.Tensor], t0: float, t1: float,
                 generator: torch.Generator | None) -> torch.Tensor:
        """The counts at ``t1`` from ``x`` at ``t0`` (:meth:`propagate`), by the code
        ``forward`` runs. Each member's stream for this call is keyed by one draw from
        ``generator`` (:func:`~enkal.models._random.generator_keys`). Gillespie returns the
        state after the last event at or before ``t1`` (right-continuous, as ``forward``); tau-leaping takes whole steps of ``tau``."""
        keys = generator_keys(x.shape[0], generator, self.device)
        if isinstance(self.solver, Gillespie):
            return self._ssa(x, p, keys, t0, [t1])[:, 0]
        return self._tau_leap(x, p, keys, grid_steps(t0, t1, self.solver.tau, "tau"))[:, 0]

    def _ssa(self, x: torch.Tensor, p: dict, keys: torch.Tensor, t0: float,
             times: list[float]) -> torch.Tensor:
        n, S = x.shape
        T = len(times)
        dev = self.device
        t_obs = torch.tensor(times, dtype=self.dtype, device=dev)
        t = x.new_full((n,), t0)
        out = x.new_full((n, T, S), math.nan)
        k_obs = torch.zeros(n, dtype=torch.long, device=dev)
        events = torch.zeros(n, dtype=torch.long, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        failed = torch.zeros(n, dtype=torch.bool, device=dev)
        grid = torch.arange(T, device=dev)
        nu = self.stoichiometry
        R = self.n_reactions
        while True:
            a = self._rates(x, p)
            a0 = a.sum(dim=1)
            bad = ~done & (~torch.isfinite(a0) | (a < 0).any(dim=1))
            u1 = uniform(keys, 2 * events, self.dtype)
            u2 = uniform(keys, 2 * events + 1, self.dtype)
            t_next = t - torch.log(u1) / a0  # a0 = 0: inf, nothing happens any more
            t_next = torch.where(bad, torch.full_like(t_next, math.inf), t_next)
            # record the current state at every observation time before the next event
            k_new = torch.searchsorted(t_obs, t_next.contiguous(), side="left")
            k_new = torch.where(done, k_obs, k_new)
            cross = k_new > k_obs
            if bool(cross.any()):
                rows = torch.nonzero(cross).squeeze(1)
                mask = (grid[None, :] >= k_obs[rows, None]) & (grid[None, :] < k_new[rows, None])
                out[rows] = torch.where(mask[:, :, None], x[rows, None, :], out[rows])
                k_obs = k_new
            failed |= bad
            done = done | bad | (k_obs >= T)
            if bool(done.all()):
                break
            fire = ~done
            r = (torch.cumsum(a, dim=1) < (u2 * a0)[:, None]).sum(dim=1).clamp(max=R - 1)
            x = torch.where(fire[:, None], x + nu[r], x)
            t = torch.where(fire, t_next, t)
            events = events + fire.long()
            over = fire & (events >= self.solver.max_events)
            if bool(over.any()):
                failed |= over
                done |= over
        if bool(failed.any()):
            out[failed] = math.nan
        return out

    def _tau_leap(self, x: torch.Tensor, p: dict, keys: torch.Tensor,
                  obs_steps: list[int]) -> torch.Tensor:
        n, S = x.shape
        R = self.n_reactions
        tau = self.solver.tau
        channel = torch.arange(R, dtype=torch.int64, device=self.device)[None, :]
        key = keys[:, None]

        def advance(k: int, x: torch.Tensor) -> torch.Tensor:
            a = self._rates(x, p)
            fired = poisson(key, k * R + channel, a.clamp(min=0.0) * tau)
            fired = torch.where(torch.isfinite(a) & (a >= 0), fired, math.nan)
            return (x + fired @ self.stoichiometry).clamp(min=0.0)

        return march(x, obs_steps, advance)


# -- named systems ----------------------------------------------------------------------

def _bd_propensity(x, p):
    return torch.stack([p["birth"].expand(x.shape[0]), p["death"] * x[:, 0]], dim=1)


class BirthDeath(JumpModel):
    """Immigration-death: ``0 -> X`` at rate ``birth``, ``X -> 0`` at rate ``death * X``.

    Parameters ``birth`` and ``death`` (``Positive``). From ``X_0 = 0`` the count at time
    ``t`` is exactly Poisson with mean ``birth / death (1 - e^{-death t})``; the stationary
    law is Poisson(``birth / death``).

    Parameters
    ----------
    t_obs : sequence of floats
    x0 : int
        Default 0.
    solver, t0, seed, common_noise, row_streams, device, dtype : as :class:`JumpModel`.

    Examples
    --------
    >>> import torch
    >>> m = BirthDeath(t_obs=[1.0, 2.0], solver=TauLeaping(tau=0.1))
    >>> m.layout.names, m(torch.tensor([[5.0, 0.5]], dtype=torch.float64)).shape
    (['birth', 'death'], torch.Size([1, 2]))
    """

    def __init__(
        self,
        t_obs: Any,
        *,
        x0: int = 0,
        solver: Gillespie | TauLeaping = Gillespie(),
        t0: float = 0.0,
        seed: int = 0,
        common_noise: bool = False,
        row_streams: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        layout = ParameterLayout([("birth", (), Positive()), ("death", (), Positive())])
        super().__init__([[1], [-1]], _bd_propensity, layout, [x0], t_obs, solver=solver,
                         t0=t0, seed=seed, common_noise=common_noise, row_streams=row_streams,
                         state_names=("X",), device=device, dtype=dtype)


class StochasticSIR(JumpModel):
    """Stochastic SIR in a closed population of ``N``.

    Channels: infection ``S + I -> 2 I`` at rate ``beta S I / N``; recovery ``I -> R`` at
    rate ``gamma I``. Parameters ``beta``, ``gamma`` (``Positive``); the mean-field limit is
    :class:`~enkal.models.ode.SIR`. By default the infected count ``I`` is observed.

    Parameters
    ----------
    t_obs : sequence of floats
    population : int
        ``N``.
    infected : int
        Initially infected ``I_0`` (``S_0 = N - I_0``, ``R_0 = 0``).
    observe : default ``("I",)``; the state is ``("S", "I", "R")``.
    solver, t0, seed, common_noise, row_streams, device, dtype : as :class:`JumpModel`.

    Examples
    --------
    >>> import torch
    >>> m = StochasticSIR(t_obs=[1.0, 2.0], population=200, infected=5)
    >>> m(torch.tensor([[1.5, 0.5]], dtype=torch.float64)).shape
    torch.Size([1, 2])
    """

    def __init__(
        self,
        t_obs: Any,
        *,
        population: int = 1000,
        infected: int = 10,
        observe: Any = ("I",),
        solver: Gillespie | TauLeaping = Gillespie(),
        t0: float = 0.0,
        seed: int = 0,
        common_noise: bool = False,
        row_streams: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        for name, v in (("population", population), ("infected", infected)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if not 0 < infected <= population:
            raise ValueError(f"infected: expected 0 < infected <= population={population}, "
                             f"got {infected}")
        self.population = population
        inv_n = 1.0 / population

        def propensity(x, p):
            return torch.stack([p["beta"] * x[:, 0] * x[:, 1] * inv_n, p["gamma"] * x[:, 1]],
                               dim=1)

        layout = ParameterLayout([("beta", (), Positive()), ("gamma", (), Positive())])
        super().__init__([[-1, 1, 0], [0, -1, 1]], propensity, layout,
                         [population - infected, infected, 0], t_obs, solver=solver,
                         observe=observe, t0=t0, seed=seed, common_noise=common_noise,
                         row_streams=row_streams, state_names=("S", "I", "R"), device=device,
                         dtype=dtype)


def _lv_propensity(x, p):
    u, v = x[:, 0], x[:, 1]
    return torch.stack([p["alpha"] * u, p["beta"] * u * v, p["delta"] * u * v, p["gamma"] * v],
                       dim=1)


class StochasticLotkaVolterra(JumpModel):
    """Stochastic Lotka-Volterra with the four rates of :class:`~enkal.models.ode.LotkaVolterra`.

    Channels: prey birth ``U -> U + 1`` at ``alpha U``; predation ``U -> U - 1`` at
    ``beta U V``; predator birth ``V -> V + 1`` at ``delta U V``; predator death
    ``V -> V - 1`` at ``gamma V``. Its mean-field limit is ``u' = alpha u - beta u v``,
    ``v' = delta u v - gamma v``.

    Parameters
    ----------
    t_obs : sequence of floats
    x0 : 2 ints
        Default ``(50, 100)`` (with ``alpha=1, beta=delta=0.005, gamma=0.6`` this is the
        classic example of Wilkinson's *Stochastic Modelling for Systems Biology*).
    observe : default both of ``("prey", "predator")``.
    solver, t0, seed, common_noise, row_streams, device, dtype : as :class:`JumpModel`.

    Examples
    --------
    >>> import torch
    >>> m = StochasticLotkaVolterra(t_obs=[0.5, 1.0])
    >>> m(torch.tensor([[1.0, 0.005, 0.6, 0.005]], dtype=torch.float64)).shape
    torch.Size([1, 4])
    """

    def __init__(
        self,
        t_obs: Any,
        *,
        x0: Any = (50, 100),
        observe: Any = None,
        solver: Gillespie | TauLeaping = Gillespie(),
        t0: float = 0.0,
        seed: int = 0,
        common_noise: bool = False,
        row_streams: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        layout = ParameterLayout([("alpha", (), Positive()), ("beta", (), Positive()),
                                  ("gamma", (), Positive()), ("delta", (), Positive())])
        super().__init__([[1, 0], [-1, 0], [0, 1], [0, -1]], _lv_propensity, layout, x0, t_obs,
                         solver=solver, observe=observe, t0=t0, seed=seed,
                         common_noise=common_noise, row_streams=row_streams,
                         state_names=("prey", "predator"), device=device, dtype=dtype)
