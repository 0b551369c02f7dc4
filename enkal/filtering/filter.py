r"""Sequential data assimilation: an ensemble filter (and lag smoother) over time.

At each observation time ``t_k`` the filter runs one cycle, data flowing one way::

    X_a(k-1) --model.propagate(t_{k-1}, t_k)--> X_f(k) --observe--> Yh_f(k)
             --failure policy (non-finite forecasts, misfits)--> ok
             --adaptive inflation (reads Yh_f, optional)--> X_f anomalies * sqrt(lambda)
             --scheme: W (E x E, one per filter or per state variable)--> X_a = W X_f
             --fixed inflation, random rotation Q--> X_a(k)
             --the same W and Q applied to the last ``lag`` analyses (EnKS)--> smoothed
             --sinks--> HDF5, progress

``X`` is members first, ``(N_ens, N_x)`` (``(B, N_ens, N_x)`` for ``B`` independent
filters run as one batch, each with its own observations). For joint state-parameter
estimation the parameters (unconstrained, ``(N_ens, N_par)``) are appended to the state for
the analysis (state augmentation, [Evensen2009]) and kept constant by the forecast.

The fixed multiplicative inflation is applied to the analysis anomalies, as DAPPER and
[Sakov2008] do; :class:`~enkal.filtering.AdaptiveInflation` inflates the forecast. Random
draws (perturbed observations, redraws of failed members, rotations, a stochastic model's
noise) all come from one ``torch.Generator`` whose state is part of :class:`FilterState`,
so a run resumed from a saved state repeats itself bit for bit.

The lag smoother (``lag = L``) is the ensemble Kalman smoother of [Evensen2000] in its
ensemble-transform form: each analysis's ``W`` (and rotation) also updates the ensembles of
the previous ``L`` times, which is exact for linear models (the Rauch-Tung-Striebel
smoother's moments; tested).

>>> import torch
>>> class RandomWalk:
...     def propagate(self, states, t0, t1, *, parameters=None, generator=None):
...         return states.clone()
>>> f = EnsembleFilter(RandomWalk(), noise_std=0.5)
>>> state = f.init(torch.randn(20, 2, dtype=torch.float64,
...                            generator=torch.Generator().manual_seed(0)))
>>> state, info = f.step(state, 1.0, torch.tensor([1.0, -1.0], dtype=torch.float64))
>>> info.analysis_mean.shape, state.cycle
(torch.Size([2]), 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .._checks import check_positive_float, check_positive_int, check_seed
from .._types import FailurePolicy, check_component
from ..failures import IgnoreFailed, ResampleFailed
from ..observations import Observations
from .kernels import random_rotation
from .local import local_blocks, local_update
from .schemes import ETKF, AdaptiveInflation

__all__ = ["DynamicalModel", "EnsembleFilter", "FilterState", "CycleInfo"]


@runtime_checkable
class DynamicalModel(Protocol):
    """A model that advances an ensemble of states in time."""

    def propagate(self, states: torch.Tensor, t0: float, t1: float, *,
                  parameters: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class FilterState:
    """Everything needed to continue a filter.

    Attributes
    ----------
    cycle : int
        Observation times assimilated so far.
    time : float
        The time of ``states``.
    states : Tensor, shape (N_ens, N_x) or (B, N_ens, N_x)
        The analysis ensemble.
    parameters : Tensor, shape (N_ens, N_par) or (B, N_ens, N_par), or None
        Unconstrained parameters estimated jointly (state augmentation).
    rng_state : Tensor
        ``torch.Generator.get_state()`` of the filter's generator.
    inflation : tuple
        The adaptive inflation's state of each filter (empty without it).
    window : tuple of (float, Tensor)
        The lag smoother's ``lag - 1`` analyses before the current one, ``(time, states)``,
        oldest first (the initial ensemble counts as the analysis at the start time).
    """

    cycle: int
    time: float
    states: torch.Tensor
    parameters: torch.Tensor | None
    rng_state: torch.Tensor
    inflation: tuple = ()
    window: tuple = ()


@dataclass(frozen=True)
class CycleInfo:
    """Diagnostics of one cycle (never read back by the filter). Means and spreads are
    ``(N_x,)`` (``(B, N_x)`` for a batch); spreads are per-variable standard deviations."""

    cycle: int
    time: float
    forecast_mean: torch.Tensor
    forecast_spread: torch.Tensor
    analysis_mean: torch.Tensor
    analysis_spread: torch.Tensor
    n_failed: int
    inflation: float
    smoothed: tuple | None = None  # (time, mean, spread) of the analysis leaving the window
    parameters_mean: torch.Tensor | None = None
    parameters_spread: torch.Tensor | None = None


def _moments(x: torch.Tensor, ok: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (``E - 1``) over members, ``(B, E, n) -> (B, n)``; with
    ``ok`` ``(B, E)`` over the successful members only (a failed forecast is NaN)."""
    if ok is None or bool(ok.all()):
        return x.mean(dim=1), x.std(dim=1)
    w = ok.unsqueeze(-1).to(x.dtype)
    n = w.sum(dim=1)
    mean = (torch.where(ok.unsqueeze(-1), x, 0.0) * w).sum(dim=1) / n
    dev = torch.where(ok.unsqueeze(-1), x - mean.unsqueeze(1), 0.0)
    return mean, (dev.square().sum(dim=1) / (n - 1)).sqrt()


class EnsembleFilter:
    """An ensemble Kalman filter over a :class:`DynamicalModel`.

    Parameters
    ----------
    model : DynamicalModel
        Anything with ``propagate(states, t0, t1, *, parameters, generator)``; the ODE, SDE
        and jump models of ``enkal.models`` have it.
    scheme : EnKF, ETKF or LETKF
        The analysis (default :class:`ETKF`).
    noise_std : float or array-like (N_obs,)
        Standard deviations of the (independent) observation noise.
    observe : sequence of int or callable, optional
        The observation operator: state indices (``y = x[observe]``), a callable
        ``(n, N_x) -> (n, N_obs)``, or ``None`` for the whole state.
    inflation : float or AdaptiveInflation
        A fixed multiplicative factor on the analysis anomalies (1 = none), or an adaptive
        prior inflation.
    rotate : bool
        Apply a mean-preserving random rotation to the analysis anomalies each cycle.
    lag : int
        Length of the smoother window (0: a filter only).
    parameters : Tensor (N_par,), optional
        Known physical parameters handed to ``model.propagate`` (when not estimated).
    layout : ParameterLayout, optional
        For joint estimation: maps the unconstrained parameters given to :meth:`init` to
        physical values (default: the model's ``layout``).
    failure : ResampleFailed or Raise
        What to do with members whose forecast fails (non-finite, or a failed misfit).
    seed : int
    """

    def __init__(self, model: Any, scheme: Any = None, *, noise_std: Any = 1.0,
                 observe: Sequence[int] | Callable | None = None,
                 inflation: float | AdaptiveInflation = 1.0, rotate: bool = False,
                 lag: int = 0, parameters: Any = None, layout: Any = None,
                 failure: FailurePolicy | None = None, seed: int = 0) -> None:
        if not callable(getattr(model, "propagate", None)):
            raise TypeError(f"model: expected an object with propagate(states, t0, t1, *, "
                            f"parameters, generator), got {type(model).__name__}")
        self.model = model
        self.scheme = ETKF() if scheme is None else scheme
        if not callable(getattr(self.scheme, "transforms", None)):
            raise TypeError(f"scheme: expected EnKF(), ETKF() or LETKF(radius=...), got "
                            f"{type(self.scheme).__name__}")
        std = torch.as_tensor(noise_std, dtype=torch.float64)
        if std.ndim > 1 or not bool(torch.isfinite(std).all()) or not bool((std > 0).all()):
            raise ValueError(f"noise_std: expected a positive float or (N_obs,) vector, got "
                             f"{noise_std!r}"[:200])
        self.noise_std = std
        self.observe = self._check_observe(observe)
        if isinstance(inflation, AdaptiveInflation):
            self.inflation: float | AdaptiveInflation = inflation
        else:
            check_positive_float(inflation, "inflation")
            self.inflation = float(inflation)
        self.rotate = bool(rotate)
        check_positive_int(lag, "lag", minimum=0)
        self.lag = int(lag)
        self.fixed = None if parameters is None else \
            torch.as_tensor(parameters, dtype=torch.float64).reshape(-1)
        self.layout = layout if layout is not None else getattr(model, "layout", None)
        self.failure = ResampleFailed() if failure is None else failure
        check_component(self.failure, FailurePolicy, "failure", "ResampleFailed() or Raise()")
        if isinstance(self.failure, IgnoreFailed):
            raise ValueError("failure: IgnoreFailed() keeps a failed member's state, but a "
                             "failed forecast has none; use ResampleFailed() or Raise()")
        self.seed = check_seed(seed)

    @staticmethod
    def _check_observe(observe: Any) -> list[int] | Callable | None:
        if observe is None or callable(observe):
            return observe
        idx = [int(i) for i in observe]
        if not idx or min(idx) < 0:
            raise ValueError(f"observe: expected non-negative state indices, got {observe!r}")
        return idx

    # -- state -----------------------------------------------------------------------------
    def init(self, states: torch.Tensor, *, time: float = 0.0,
             parameters: torch.Tensor | None = None) -> FilterState:
        """The state before the first cycle: the initial ensemble at ``time``.

        ``states`` is ``(N_ens, N_x)`` (or ``(B, N_ens, N_x)``); ``parameters``, when
        given, an unconstrained ``(N_ens, N_par)`` ensemble estimated jointly.
        """
        if not isinstance(states, torch.Tensor) or not states.is_floating_point() \
                or states.ndim not in (2, 3):
            raise TypeError(f"states: expected a floating (N_ens, N_x) or (B, N_ens, N_x) "
                            f"tensor, got {getattr(states, 'shape', type(states).__name__)}")
        if states.shape[-2] < 2:
            raise ValueError(f"states: expected at least 2 members, got {states.shape[-2]}")
        if not bool(torch.isfinite(states).all()):
            raise ValueError("states: expected finite initial states, got NaN/inf")
        if parameters is not None:
            if self.fixed is not None:
                raise ValueError("parameters: given to init() for joint estimation, but the "
                                 "filter also has fixed parameters=; choose one")
            if getattr(self.scheme, "local", False):
                raise ValueError("parameters: the LETKF updates each state variable locally; "
                                 "estimate parameters with ETKF() or EnKF()")
            if parameters.shape[:-1] != states.shape[:-1]:
                raise ValueError(f"parameters: expected {tuple(states.shape[:-1])} + (N_par,) "
                                 f"(members first, like states), got {tuple(parameters.shape)}")
        g = torch.Generator(device=states.device).manual_seed(self.seed)
        n_filters = 1 if states.ndim == 2 else states.shape[0]
        infl = tuple(self.inflation.init() for _ in range(n_filters)) \
            if isinstance(self.inflation, AdaptiveInflation) else ()
        return FilterState(cycle=0, time=float(time), states=states.clone(),
                           parameters=None if parameters is None else parameters.clone(),
                           rng_state=g.get_state(), inflation=infl)

    def _generator(self, state: FilterState) -> torch.Generator:
        g = torch.Generator(device=state.states.device)
        g.set_state(state.rng_state)
        return g

    # -- one cycle -------------------------------------------------------------------------
    def step(self, state: FilterState, time: float, values: torch.Tensor
             ) -> tuple[FilterState, CycleInfo]:
        """Forecast to ``time`` and assimilate ``values`` (``(N_obs,)`` or ``(B, N_obs)``)."""
        if not time >= state.time:
            raise ValueError(f"time: expected a time >= the state's {state.time:g}, got {time}")
        g = self._generator(state)
        forecast = self._forecast(state, time, g)
        return self._analyse(state, forecast, float(time), values, g)

    def analyse(self, state: FilterState, forecast: torch.Tensor, time: float,
                values: torch.Tensor) -> tuple[FilterState, CycleInfo]:
        """Assimilate ``values`` into a ``forecast`` made elsewhere (ask/tell): the states
        propagated from ``state.states`` to ``time``, same shape."""
        if forecast.shape != state.states.shape:
            raise ValueError(f"forecast: expected shape {tuple(state.states.shape)} (the "
                             f"state's), got {tuple(forecast.shape)}")
        return self._analyse(state, forecast, float(time), values, self._generator(state))

    def _physical(self, state: FilterState) -> torch.Tensor | None:
        if state.parameters is None:
            return self.fixed
        u = state.parameters.reshape(-1, state.parameters.shape[-1])
        return u if self.layout is None else self.layout.to_physical(u)

    def _forecast(self, state: FilterState, time: float, g: torch.Generator) -> torch.Tensor:
        x = state.states
        flat = x.reshape(-1, x.shape[-1])
        out = self.model.propagate(flat, state.time, float(time),
                                   parameters=self._physical(state), generator=g)
        if not isinstance(out, torch.Tensor) or out.shape != flat.shape:
            raise ValueError(f"model.propagate: expected a tensor of shape "
                             f"{tuple(flat.shape)}, got {getattr(out, 'shape', type(out))}")
        return out.to(x.dtype).reshape(x.shape)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """``H(x)`` for ``(B, E, N_x)`` states: ``(B, E, N_obs)``."""
        if self.observe is None:
            return x
        if isinstance(self.observe, list):
            return x[..., self.observe]
        flat = self.observe(x.reshape(-1, x.shape[-1]))
        return flat.reshape(x.shape[0], x.shape[1], -1)

    def _analyse(self, state: FilterState, forecast: torch.Tensor, time: float,
                 values: torch.Tensor, g: torch.Generator) -> tuple[FilterState, CycleInfo]:
        single = forecast.ndim == 2
        xf = forecast.unsqueeze(0) if single else forecast
        pf = None if state.parameters is None else \
            (state.parameters.unsqueeze(0) if single else state.parameters)
        y = self._values(values, xf)
        ok, yh = self._classify(xf, y)  # yh: the predictions of the successful members
        f_mean, f_std = _moments(xf, ok)
        n_failed = int((~ok).sum())
        if n_failed:  # failed rows hold NaN: zero them (their weight in W is zero)
            xf = torch.where(ok.unsqueeze(-1), xf, torch.zeros_like(xf))
        xf, pf, infl_states, lam = self._inflate_prior(state, xf, pf, ok, y, yh)
        if infl_states:  # the forecast was inflated: predict it again
            yh = self._predict(xf).to(torch.float64)
        # the lag smoother: the earlier analyses (and the previous one) get the same W and Q
        lagged = [*state.window, (state.time, state.states)] if self.lag else []
        xa, pa, lag_x = self._update(xf, pf, yh, y, ok, g,
                                     [x.unsqueeze(0) if single else x for _, x in lagged])
        window = [(t, x) for (t, _), x in zip(lagged, lag_x, strict=True)]
        xa, pa, window = self._post(xa, pa, window, g)
        smoothed = None
        if len(window) == self.lag > 0:  # the oldest has seen `lag` later analyses: final
            t_s, x_s = window.pop(0)
            m, s = _moments(x_s)
            smoothed = (t_s, m[0] if single else m, s[0] if single else s)
        a_mean, a_std = _moments(xa)
        squeeze = (lambda t: t[0]) if single else (lambda t: t)
        new = FilterState(
            cycle=state.cycle + 1, time=time, states=squeeze(xa),
            parameters=None if pa is None else squeeze(pa), rng_state=g.get_state(),
            inflation=infl_states,
            window=tuple((t, squeeze(x)) for t, x in window))
        p_mean = p_std = None
        if pa is not None:
            pm, ps = _moments(pa)
            p_mean, p_std = squeeze(pm), squeeze(ps)
        info = CycleInfo(cycle=new.cycle, time=time, forecast_mean=squeeze(f_mean),
                         forecast_spread=squeeze(f_std), analysis_mean=squeeze(a_mean),
                         analysis_spread=squeeze(a_std), n_failed=n_failed,
                         inflation=lam, smoothed=smoothed, parameters_mean=p_mean,
                         parameters_spread=p_std)
        return new, info

    def _values(self, values: Any, xf: torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(values, dtype=torch.float64, device=xf.device)
        y = y.reshape(1, -1) if y.ndim == 1 else y
        if y.ndim != 2 or y.shape[0] != xf.shape[0]:
            raise ValueError(f"values: expected (N_obs,) or (B, N_obs) with B = {xf.shape[0]}, "
                             f"got shape {tuple(torch.as_tensor(values).shape)}")
        if self.noise_std.numel() not in (1, y.shape[1]):
            raise ValueError(f"values: {y.shape[1]} observations but noise_std has "
                             f"{self.noise_std.numel()} entries")
        if not bool(torch.isfinite(y).all()):
            raise ValueError("values: expected finite observations, got NaN/inf")
        return y

    def _noise(self, m: int, device: torch.device) -> torch.Tensor:
        return self.noise_std.to(device).expand(m)

    def _classify(self, xf: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, E)`` successful members (finite forecasts whose predictions pass the
        policy), and the predictions ``(B, E, N_obs)`` (float64; rows of failed members are
        not to be used)."""
        finite = torch.isfinite(xf).all(dim=-1)
        safe = torch.where(finite.unsqueeze(-1), xf, torch.zeros_like(xf))
        yh = self._predict(safe).to(torch.float64)
        if yh.shape[-1] != y.shape[1]:
            raise ValueError(f"values: expected {yh.shape[-1]} observations (the observation "
                             f"operator's outputs), got {y.shape[1]}")
        std = self._noise(y.shape[1], y.device)
        batch = getattr(self.failure, "classify_batch", None)
        if callable(batch):  # the built-in policies screen all filters at once
            return batch(yh, finite, y, std), yh
        return torch.stack([
            self.failure.classify(yh[b], finite[b], Observations(y[b], noise_std=std))
            for b in range(xf.shape[0])]), yh

    def _inflate_prior(self, state: FilterState, xf: torch.Tensor, pf: torch.Tensor | None,
                       ok: torch.Tensor, y: torch.Tensor, yh: torch.Tensor):
        """Adaptive prior inflation from the forecast's predictions ``yh``: ``(xf, pf,
        inflation states, mean lambda)``."""
        if not isinstance(self.inflation, AdaptiveInflation):
            return xf, pf, (), float(self.inflation)
        std = self._noise(yh.shape[-1], yh.device)
        lams, states = [], []
        for b, st in enumerate(state.inflation):
            lam, new, _ = self.inflation.step(st, predictions=yh[b][ok[b]],
                                              values=y[b], noise_std=std)
            lams.append(lam)
            states.append(new)
        scale = torch.tensor(lams, dtype=xf.dtype, device=xf.device).sqrt()[:, None, None]
        xf = _scale_anomalies(xf, ok, scale)
        pf = None if pf is None else _scale_anomalies(pf, ok, scale)
        return xf, pf, tuple(states), float(sum(lams) / len(lams))

    def _update(self, xf: torch.Tensor, pf: torch.Tensor | None, yh: torch.Tensor,
                y: torch.Tensor, ok: torch.Tensor, g: torch.Generator, lagged: list):
        """``(X_a, P_a, lagged_a)``: the analysis of every filter, and the same transforms
        applied to the smoother's window."""
        std = self._noise(y.shape[1], y.device)
        if getattr(self.scheme, "local", False):
            xa, lag = local_update(self.scheme, self.failure, self._blocks(xf), xf, yh, y, std,
                                   ok, g, lagged)
            return xa, None, lag
        w = self._transforms(yh, y, std, ok, g).to(xf.dtype)
        return (w @ xf, None if pf is None else w.to(pf.dtype) @ pf,
                [w @ x for x in lagged])

    def _blocks(self, xf: torch.Tensor) -> list:
        """The local scheme's blocks (taper weights), computed once for a state size."""
        observed = self.observe if isinstance(self.observe, list) else \
            (list(range(xf.shape[-1])) if self.observe is None else None)
        key = (xf.shape[-1], xf.device)
        if getattr(self, "_block_key", None) != key:
            self._block_cache = local_blocks(self.scheme, xf.shape[-1], observed, xf.device)
            self._block_key = key
        return self._block_cache

    def _transforms(self, yh: torch.Tensor, y: torch.Tensor, std: torch.Tensor,
                    ok: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``(B, E, E)`` global transforms, failed members embedded by the failure policy."""
        if bool(ok.all()):  # no failures: every filter in one batched call
            return self.scheme.transforms(yh, y, std, generator=g)
        out = []
        for b in range(yh.shape[0]):
            rows = ok[b]
            w = self.scheme.transforms(yh[b][rows].unsqueeze(0), y[b:b + 1], std,
                                       generator=g)[0]
            out.append(w if bool(rows.all()) else self.failure.embed(w, rows, g))
        return torch.stack(out)

    def _post(self, xa: torch.Tensor, pa: torch.Tensor | None, window: list,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        """Fixed inflation of the analysis anomalies, then the random rotation (applied to
        the smoother window too, which keeps the members' correspondence over time)."""
        if not isinstance(self.inflation, AdaptiveInflation) and self.inflation != 1.0:
            xa = _scale_anomalies(xa, None, self.inflation)
            pa = None if pa is None else _scale_anomalies(pa, None, self.inflation)
        if self.rotate:
            q = torch.stack([random_rotation(xa.shape[1], g, device=xa.device)
                             for _ in range(xa.shape[0])]).to(xa.dtype)
            xa = q @ xa
            pa = None if pa is None else q.to(pa.dtype) @ pa
            window = [(t, q @ x) for t, x in window]
        return xa, pa, window

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self, state: FilterState) -> dict[str, Any]:
        """The state as plain tensors and numbers (for checkpoints)."""
        from .._types import encode_state
        return {"cycle": state.cycle, "time": state.time, "states": state.states,
                "parameters": state.parameters, "rng_state": state.rng_state,
                "inflation": [encode_state(s, "inflation") for s in state.inflation],
                "window_times": [t for t, _ in state.window],
                "window": [x for _, x in state.window]}

    def load_state_dict(self, d: dict[str, Any]) -> FilterState:
        """Rebuild a :class:`FilterState` from :meth:`state_dict`'s output."""
        from .._types import decode_state
        from .schemes import AdaptiveInflationState
        infl = tuple(decode_state(s, AdaptiveInflationState, what="inflation")
                     for s in d.get("inflation", ()))
        window = tuple(zip([float(t) for t in d.get("window_times", ())],
                           d.get("window", ()), strict=True))
        return FilterState(cycle=int(d["cycle"]), time=float(d["time"]), states=d["states"],
                           parameters=d.get("parameters"), rng_state=d["rng_state"],
                           inflation=infl, window=window)


def _scale_anomalies(x: torch.Tensor, ok: torch.Tensor | None, factor: Any) -> torch.Tensor:
    """``mean + factor (x - mean)`` per filter, the mean over ``ok`` members."""
    if ok is None:
        mean = x.mean(dim=1, keepdim=True)
    else:
        okf = ok.unsqueeze(-1).to(x.dtype)
        mean = (x * okf).sum(dim=1, keepdim=True) / okf.sum(dim=1, keepdim=True)
    return mean + factor * (x - mean)

