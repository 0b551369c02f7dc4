"""Running a filter over an observation series: the loop, its sinks and its result.

:func:`run_filter` assimilates ``values[k]`` at ``times[k]`` for every ``k`` from the
state's ``cycle`` on, so a state saved after cycle ``k`` (``EnsembleFilter.state_dict``)
and loaded again continues the series where it stopped, bit for bit. Sinks see every cycle:
``start(start: FilterStart)``, ``record(state, info)`` and ``close(error)``; the HDF5
recorder of :mod:`enkal.storage` is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .filter import CycleInfo, EnsembleFilter, FilterState
from .metrics import Score, rmse, spread, time_average

__all__ = ["run_filter", "FilterResult", "FilterSink", "FilterStart"]


@dataclass(frozen=True)
class FilterStart:
    """What a sink learns when a run starts: the filter, the state it starts from, and the
    whole series (times ``(K,)``, values ``(K, N_obs)`` or ``(K, B, N_obs)``)."""

    filter: EnsembleFilter
    state: FilterState
    times: torch.Tensor
    values: torch.Tensor


@runtime_checkable
class FilterSink(Protocol):
    """Receives every cycle of a filter run."""

    def start(self, start: FilterStart) -> None: ...

    def record(self, state: FilterState, info: CycleInfo) -> None: ...

    def close(self, error: BaseException | None) -> None: ...


@dataclass
class FilterResult:
    """What :func:`run_filter` returns: the final state and the per-cycle diagnostics of the
    cycles run in this call, stacked along time (first axis ``K``).

    ``smoothed_mean``/``smoothed_spread`` (with ``lag > 0``) hold, at each time, the
    estimate after the ``lag`` later analyses (NaN for the last ``lag`` times, still in the
    window; ``state.window`` has them).
    """

    state: FilterState
    times: torch.Tensor
    forecast_mean: torch.Tensor
    forecast_spread: torch.Tensor
    analysis_mean: torch.Tensor
    analysis_spread: torch.Tensor
    n_failed: torch.Tensor
    inflation: torch.Tensor
    smoothed_mean: torch.Tensor | None = None
    smoothed_spread: torch.Tensor | None = None
    parameters_mean: torch.Tensor | None = None
    parameters_spread: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def scores(self, truth: torch.Tensor, *, burn_in: int = 0) -> dict[str, Score]:
        """Time-averaged RMSE of the forecast, analysis (and smoothed) means against
        ``truth`` ``(K, N_x)`` at ``times``, and the analysis spread, after ``burn_in``
        cycles (:mod:`enkal.filtering.metrics`)."""
        if truth.shape != self.analysis_mean.shape:
            raise ValueError(f"truth: expected shape {tuple(self.analysis_mean.shape)} (the "
                             f"states at the result's times), got {tuple(truth.shape)}")
        out = {"forecast": time_average(_flat(rmse(self.forecast_mean, truth)), burn_in),
               "analysis": time_average(_flat(rmse(self.analysis_mean, truth)), burn_in),
               "spread": time_average(_flat(spread(self.analysis_spread)), burn_in)}
        if self.smoothed_mean is not None:
            out["smoothed"] = time_average(_flat(rmse(self.smoothed_mean, truth)), burn_in)
        return out


def _flat(series: torch.Tensor) -> torch.Tensor:
    """A per-time series, averaged over a batch of filters when there is one."""
    return series if series.ndim == 1 else series.mean(dim=tuple(range(1, series.ndim)))


def _check_series(times: Any, values: Any) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.ndim not in (2, 3) or v.shape[0] != t.numel():
        raise ValueError(f"values: expected (K, N_obs) or (K, B, N_obs) with K = {t.numel()} "
                         f"(one row per time), got shape {tuple(v.shape)}")
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        raise ValueError("times: expected strictly increasing observation times")
    return t, v


def run_filter(flt: EnsembleFilter, state: FilterState, times: Any, values: Any, *,
               sinks: Any = ()) -> FilterResult:
    """Assimilate ``values[k]`` at ``times[k]`` for ``k = state.cycle, ..., K - 1``.

    Parameters
    ----------
    flt : EnsembleFilter
    state : FilterState
        From :meth:`EnsembleFilter.init` (cycle 0) or a loaded checkpoint.
    times : array-like (K,)
        Strictly increasing observation times, after ``state.time``.
    values : array-like (K, N_obs) or (K, B, N_obs)
    sinks : iterable of FilterSink
    """
    t, v = _check_series(times, values)
    if state.cycle > t.numel():
        raise ValueError(f"state: at cycle {state.cycle}, beyond the series' {t.numel()} times")
    if state.cycle < t.numel() and not float(t[state.cycle]) >= state.time:
        raise ValueError(f"times: times[{state.cycle}] = {float(t[state.cycle]):g} is before "
                         f"the state's time {state.time:g}")
    sinks = list(sinks)
    for s in sinks:
        if not isinstance(s, FilterSink):
            raise TypeError(f"sinks: expected objects with start, record and close, got "
                            f"{type(s).__name__}")
    for s in sinks:
        s.start(FilterStart(filter=flt, state=state, times=t, values=v))
    infos: list[CycleInfo] = []
    error: BaseException | None = None
    try:
        for k in range(state.cycle, t.numel()):
            state, info = flt.step(state, float(t[k]), v[k])
            infos.append(info)
            for s in sinks:
                s.record(state, info)
    except BaseException as err:
        error = err
        raise
    finally:
        for s in sinks:
            s.close(error)
    return _result(flt, state, t[t.numel() - len(infos):], infos)


def _stack(infos: list[CycleInfo], name: str, like: torch.Tensor) -> torch.Tensor:
    if not infos:
        return like.new_empty((0, *like.shape[1:]))
    return torch.stack([getattr(i, name) for i in infos])


def _result(flt: EnsembleFilter, state: FilterState, times: torch.Tensor,
            infos: list[CycleInfo]) -> FilterResult:
    like = state.states.mean(dim=-2).unsqueeze(0)
    out = FilterResult(
        state=state, times=times,
        forecast_mean=_stack(infos, "forecast_mean", like),
        forecast_spread=_stack(infos, "forecast_spread", like),
        analysis_mean=_stack(infos, "analysis_mean", like),
        analysis_spread=_stack(infos, "analysis_spread", like),
        n_failed=torch.tensor([i.n_failed for i in infos], dtype=torch.int64),
        inflation=torch.tensor([i.inflation for i in infos], dtype=torch.float64))
    if infos and infos[0].parameters_mean is not None:
        out.parameters_mean = _stack(infos, "parameters_mean", like)
        out.parameters_spread = _stack(infos, "parameters_spread", like)
    if flt.lag:
        index = {float(x): i for i, x in enumerate(times.tolist())}
        sm = torch.full_like(out.analysis_mean, float("nan"))
        ss = torch.full_like(out.analysis_spread, float("nan"))
        for info in infos:
            if info.smoothed is not None and info.smoothed[0] in index:
                sm[index[info.smoothed[0]]] = info.smoothed[1]
                ss[index[info.smoothed[0]]] = info.smoothed[2]
        out.smoothed_mean, out.smoothed_spread = sm, ss
    return out
