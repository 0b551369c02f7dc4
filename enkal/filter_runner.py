"""The one-call filter runner: a filter over an observation series, recorded to a filter
history and resumable from it.

:func:`enkal.filtering.run_filter` is the loop and knows nothing of files; :func:`run_filter`
joins it to :mod:`enkal.storage`: with ``out=`` it records the run
(:class:`~enkal.storage.FilterRecorder`), and with ``resume=True`` it reads the state the file
checkpointed (:func:`~enkal.storage.read_filter_state`) and continues the series from there,
bit for bit.

>>> import os, tempfile, torch, enkal
>>> from enkal.filtering import EnsembleFilter, EnKF
>>> class RandomWalk:
...     def propagate(self, states, t0, t1, *, parameters=None, generator=None):
...         return states + 0.1 * torch.randn(states.shape, generator=generator,
...                                           dtype=states.dtype)
>>> flt = EnsembleFilter(RandomWalk(), EnKF(), noise_std=0.5, rotate=True, seed=1)
>>> x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> times = torch.arange(1.0, 7.0)
>>> values = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = os.path.join(tmp, "f.h5")
...     part = enkal.run_filter(flt, x0, times[:4], values[:4], out=path)  # stopped at 4
...     rest = enkal.run_filter(flt, x0, times, values, out=path, resume=True)
...     whole = enkal.run_filter(flt, x0, times, values)
...     print(rest.state.cycle, torch.equal(rest.state.states, whole.state.states))
6 True
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ._checks import check_bool
from .filtering import EnsembleFilter, FilterResult, FilterState
from .filtering import run_filter as _loop
from .storage.filtering import FilterRecorder, read_filter_state

__all__ = ["run_filter"]


def run_filter(flt: EnsembleFilter, initial_state: FilterState | torch.Tensor | None,
               times: Any, values: Any, *, out: str | os.PathLike | None = None,
               resume: bool = False, ensembles: bool = False, checkpoint_every: int = 1,
               truth: Any = None, attrs: dict | None = None, sinks: Any = ()) -> FilterResult:
    """Run ``flt`` over the series ``values[k]`` at ``times[k]``, optionally recorded to a
    filter history ``out`` (``docs/schema.md``, "Filter history") and resumed from it.

    Parameters
    ----------
    flt : EnsembleFilter
    initial_state : FilterState or Tensor (N_ens, N_x) / (B, N_ens, N_x)
        The starting state (``flt.init(...)``), or the initial ensemble (then
        ``flt.init(initial_state)``, at time 0). Ignored (may be None) when a file is resumed.
    times : array-like (K,)
        The whole series' observation times, strictly increasing.
    values : array-like (K, N_obs) or (K, B, N_obs)
        The whole series' observations.
    out : str or os.PathLike, optional
        Record the run to this file: a row per cycle, the filter state checkpointed. An
        existing file is never replaced: pass ``resume=True`` to continue it.
    resume : bool
        With ``out`` an existing file: continue its run from its checkpoint (its later rows
        are recomputed) over the whole series; the file's filter configuration must be
        ``flt``'s. Without a file: a fresh run.
    ensembles : bool
        Also store the analysis ensemble of every cycle (a resumed file keeps its choice:
        pass the same value).
    checkpoint_every : int
        Cycles between checkpoints (and at the end of the run).
    truth : Tensor (K, [B,] N_x), optional
        A twin experiment's true states at ``times``, stored with ``out`` as ``truth``.
    attrs : dict, optional
        Extra global attributes of a new ``out`` file (provenance).
    sinks : iterable of FilterSink
        More sinks, after the recorder.

    Returns
    -------
    FilterResult
        The final state and the diagnostics of the cycles run in this call.

    Raises
    ------
    FileExistsError
        ``out`` exists and ``resume`` is False.
    ValueError
        ``resume`` without ``out``, or a file written by another filter configuration or
        series (the message names what differs).
    """
    if not isinstance(flt, EnsembleFilter):
        raise TypeError(f"flt: expected an enkal.filtering.EnsembleFilter, got "
                        f"{type(flt).__name__}")
    check_bool(resume, "resume")
    check_bool(ensembles, "ensembles")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out: expected a file path (str or os.PathLike) or None, got "
                        f"{type(out).__name__}")
    if sinks is None or isinstance(sinks, (str, bytes)) or not hasattr(sinks, "__iter__"):
        raise TypeError(f"sinks: expected an iterable of FilterSinks, got "
                        f"{type(sinks).__name__}")
    if out is None:
        if resume:
            raise ValueError("resume: True needs out= (the filter history to continue)")
        return _loop(flt, _initial(flt, initial_state), times, values, sinks=sinks)
    if os.path.exists(out):
        if not resume:
            raise FileExistsError(f"{os.fspath(out)}: exists; pass resume=True to continue "
                                  "the run it records, or remove it / choose another out=")
        state = read_filter_state(out, flt)
        _check_initial(initial_state, state)
    else:
        state = _initial(flt, initial_state)
    recorder = FilterRecorder(out, ensembles=ensembles, checkpoint_every=checkpoint_every,
                              resume=resume, truth=truth, attrs=attrs)
    return _loop(flt, state, times, values, sinks=[recorder, *sinks])


def _initial(flt: EnsembleFilter, initial_state: Any) -> FilterState:
    if isinstance(initial_state, FilterState):
        return initial_state
    if isinstance(initial_state, torch.Tensor):
        return flt.init(initial_state)
    raise TypeError(f"initial_state: expected a FilterState (flt.init(...)) or the initial "
                    f"ensemble, a tensor (N_ens, N_x), got {type(initial_state).__name__}")


def _check_initial(initial_state: Any, state: FilterState) -> None:
    """An initial state given with a resume must have the file's shape."""
    if initial_state is None:
        return
    x = initial_state.states if isinstance(initial_state, FilterState) else initial_state
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"initial_state: expected a FilterState, a tensor or None, got "
                        f"{type(initial_state).__name__}")
    if tuple(x.shape) != tuple(state.states.shape):
        raise ValueError(f"initial_state: shape {tuple(x.shape)}, but the file's run has "
                         f"states of shape {tuple(state.states.shape)}")
