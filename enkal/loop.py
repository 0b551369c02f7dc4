"""The loop of :meth:`enkal.EnsembleSmoother.run`: forward (executor), step, callbacks,
sinks; the run's log and its stopping reason.

Each iteration: evaluate the members (``executor.evaluate``), hand the predictions to
``smoother.step`` (into a spare buffer when ``inplace``), log the step's info, ask the
callbacks whether to stop, then give the new state to every sink. Sinks are started before
the first forward and always closed, also when the run fails (``RunEnd.error``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ._types import RunEnd, RunStart, Sink, SmootherResult, SmootherState, close_sinks
from .forward import ForwardModel

__all__ = ["Loop", "callables"]

_log = logging.getLogger("enkal.smoother")


def callables(callbacks: Any) -> list:
    """``callbacks`` as a list of callables (``TypeError`` naming it otherwise)."""
    if isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise TypeError(f"callbacks: expected an iterable of callables, got "
                        f"{type(callbacks).__name__}")
    out = list(callbacks)
    for cb in out:
        if not callable(cb):
            raise TypeError(f"callbacks: expected callables, got {type(cb).__name__}")
    return out


class Loop:
    """One run of :meth:`EnsembleSmoother.run`: forward, step, callbacks, sinks."""

    def __init__(self, smoother: Any, model: ForwardModel, executor: Any,
                 callbacks: list, sinks: list, *, max_iterations: int,
                 tolerance: float | None, inplace: bool, predictive: bool = False) -> None:
        self.smoother = smoother
        self.model = model
        self.executor = executor
        self.callbacks = callbacks
        self.sinks = sinks
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.inplace = inplace
        self.predictive = predictive
        self.final_predictions: torch.Tensor | None = None
        self.log: dict[str, list] = {}
        self.n_forwards = 0
        self.predictions: torch.Tensor | None = None
        self.stopped_by = "max_iterations"

    def run(self, state: SmootherState) -> SmootherResult:
        started: list[Sink] = []
        error: BaseException | None = None
        try:
            # an executor with a connection (Dask) opens it now, before the sinks start:
            # a cluster's start is reported on its own, not timed as the first update's
            connect = getattr(self.executor, "connect", None)
            if callable(connect):
                connect()
            start = RunStart(smoother=self.smoother, layout=self.model.layout,
                             output_names=self.model.output_names, state=state)
            for sink in self.sinks:
                sink.start(start)
                started.append(sink)
            state = self._iterate(state)
            if self.predictive:
                self._predict(state, started)
        except BaseException as err:
            error = err
            raise
        finally:
            close_sinks(started, RunEnd(stopped_by=self.stopped_by,
                                       n_forwards=self.n_forwards, error=error))
        return SmootherResult(state=state, layout=self.model.layout, history=self.log,
                              n_forwards=self.n_forwards, smoother=self.smoother,
                              predictions=self.predictions, stopped_by=self.stopped_by,
                              predictive=self.final_predictions)

    def _predict(self, state: SmootherState, sinks: list) -> None:
        """The posterior predictive: one forward of the final ensemble, to the sinks."""
        preds, ok = self.executor.evaluate(self.model,
                                           self.model.layout.to_physical(state.parameters))
        # a failed member has no prediction
        self.final_predictions = preds = torch.where(ok[:, None], preds, float("nan"))
        for hook in [getattr(sink, "predictive", None) for sink in sinks]:
            if callable(hook):
                hook(state, preds)

    def _iterate(self, state: SmootherState) -> SmootherState:
        smoother, layout = self.smoother, self.model.layout
        initial = state.parameters  # the caller's tensor: never used as an output buffer
        spare: torch.Tensor | None = None
        last_mean = None
        while True:
            if smoother.done(state):
                self.stopped_by = "schedule"
                return state
            if state.iteration >= self.max_iterations:
                return state
            t0 = time.perf_counter()
            phys = layout.to_physical(state.parameters)
            self.predictions, ok = self.executor.evaluate(self.model, phys)
            t1 = time.perf_counter()
            self.n_forwards += phys.shape[0]
            previous = state.parameters
            if self.inplace and previous is not initial:
                spare = previous  # chunked in-place update: an E x chunk buffer only
            state, info = smoother.step(state, self.predictions, ok=ok, out=spare)
            _log.debug("update %d: %d forwards in %.3g s, update in %.3g s", info.iteration,
                       phys.shape[0], t1 - t0, time.perf_counter() - t1)
            # ping-pong between two buffers once the caller's tensor is not involved
            spare = previous if previous is not initial and not self.inplace else None
            for k, v in info.as_dict().items():
                self.log.setdefault(k, []).append(v)
            stop = None
            if any([bool(cb(state, info)) for cb in self.callbacks]):
                stop = "callback"
            elif self.tolerance is not None and last_mean is not None and \
                    abs(info.mean_misfit - last_mean) <= self.tolerance * abs(last_mean):
                stop = "tolerance"
            last_mean = info.mean_misfit
            final = stop is not None or info.done or state.iteration >= self.max_iterations
            for sink in self.sinks:
                sink.record(state, info, self.predictions, final=final)
            if stop is not None:
                self.stopped_by = stop
                return state

