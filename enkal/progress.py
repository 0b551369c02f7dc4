"""Progress of a run: a :class:`~enkal._types.Sink` drawing a tqdm bar, or plain lines.

One implementation serves ``EnsembleSmoother.run(progress=True)`` and ``enkal run``.
On a terminal it draws a `tqdm <https://tqdm.github.io>`_ bar that redraws one line, with
the elapsed time and, when the number of updates is known, the time left (ETA). When the
stream is not a terminal (CI, a log file, a pipe) it writes one plain line per update
instead: a log reads as a table, not as carriage returns.

The bar's length is the run's planned number of updates,
:func:`enkal.schedule.planned_updates`: ``min(max_iterations, planned)`` for a schedule
that knows its length (ES-MDA: its number of steps; fixed annealing, never done on its
own: ``max_iterations``); without a plan (the data-misfit controller, which stops when
its algorithm time reaches 1, or a user's schedule) the bar counts updates with no total.

Each update shows (:class:`~enkal.StepInfo`; misfits per observation, about 1 when the
fit matches the noise):

``misfit of mean``
    the misfit of the ensemble-mean prediction, ``StepInfo.mean_misfit``;
``avg member``
    the members' own misfits averaged over the successful members, ``StepInfo.misfit``
    (the larger of the two: the mean prediction averages the members' errors out);
``alpha``, ``spread``, ``failed``
    the noise inflation, the root-mean parameter variance before the update, the members
    that failed.

>>> import io, torch, enkal
>>> from enkal.progress import Progress
>>> model = enkal.CallableModel(lambda x: x.sum(1, keepdim=True), parameters=2, output_size=1)
>>> smoother = enkal.EnsembleSmoother(enkal.Observations([1.0], noise_std=0.1),
...                                   schedule=enkal.ESMDA.constant(2), seed=0)
>>> prior = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> log = io.StringIO()                       # not a terminal: one line per update
>>> result = smoother.run(model, prior, sinks=[Progress(stream=log)])
>>> [line.split(" [")[0] for line in log.getvalue().splitlines()]
['update 1/2', 'update 2/2']
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from ._checks import check_positive_int
from ._types import RunEnd, RunStart, SmootherState, StepInfo
from .schedule import planned_updates

__all__ = ["Progress"]

#: tqdm's counters without the bar, for plain lines: "3/4 [00:02<00:00, 1.52s/update]"
_PLAIN_FORMAT = "{n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
_PLAIN_FORMAT_NO_TOTAL = "{n_fmt} [{elapsed}, {rate_fmt}]"


class Progress:
    """A :class:`~enkal._types.Sink` showing a run's progress on ``stream``.

    Parameters
    ----------
    max_iterations : int, optional
        The run's bound on ``state.iteration`` (``EnsembleSmoother.run(max_iterations=)``):
        it caps the bar's total. Without it only the schedule's plan sets the total.
    stream : text stream, optional
        Where to write (default ``sys.stderr``, looked up when the run starts).
    tty : bool, optional
        Draw a tqdm bar (``True``) or write one line per update (``False``); default
        ``stream.isatty()``.

    Attributes
    ----------
    total : int or None
        The planned updates of the run (counted from iteration 0), set by ``start``.
    """

    def __init__(self, *, max_iterations: int | None = None, stream: TextIO | None = None,
                 tty: bool | None = None) -> None:
        check_positive_int(max_iterations, "max_iterations", allow_none=True)
        if tty is not None and not isinstance(tty, bool):
            raise TypeError(f"tty: expected a bool or None, got {type(tty).__name__}")
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise TypeError(f"stream: expected a text stream (with write), got "
                            f"{type(stream).__name__}")
        self.max_iterations = max_iterations
        self.stream = stream
        self.tty = tty
        self.total: int | None = None
        self._bar: Any = None
        self._first = 0
        self._t0 = 0.0

    # -- the Sink protocol -------------------------------------------------------------------
    def start(self, run: RunStart) -> None:
        """Set the total from the schedule and ``max_iterations``; open the bar."""
        stream = self.stream if self.stream is not None else sys.stderr
        self._stream = stream
        tty = self.tty if self.tty is not None else \
            bool(getattr(stream, "isatty", lambda: False)())
        self._first = int(run.state.iteration)
        total = planned_updates(getattr(run.smoother, "schedule", None), self.max_iterations)
        # a resumed run past the plan (another schedule, allow_changes): count on
        self.total = None if total is None else max(total, self._first)
        self._t0 = time.perf_counter()
        if tty:
            self._bar = tqdm(total=self.total, initial=self._first, file=stream,
                             unit="update", dynamic_ncols=True, leave=True)

    def record(self, state: SmootherState, info: StepInfo, predictions: Any, *,
               final: bool) -> None:
        """Advance to ``info.iteration`` and show its diagnostics."""
        if self._bar is not None:
            self._bar.set_postfix_str(self.describe(info), refresh=False)
            self._bar.update(info.iteration - self._bar.n)
            return
        elapsed = time.perf_counter() - self._t0
        counters = tqdm.format_meter(
            info.iteration, self.total, elapsed, initial=self._first, unit="update",
            bar_format=_PLAIN_FORMAT if self.total is not None else _PLAIN_FORMAT_NO_TOTAL)
        self._stream.write(f"update {counters} {self.describe(info)}\n")
        self._stream.flush()

    def close(self, end: RunEnd) -> None:
        """Close the bar (it stays on screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- the text ------------------------------------------------------------------------------
    @staticmethod
    def describe(info: StepInfo) -> str:
        """One update's diagnostics, short enough for a bar on an 80-column terminal:
        ``misfit of mean 1.02, avg member 2.1, alpha 4, spread 0.049, failed 0``."""
        return (f"misfit of mean {info.mean_misfit:.3g}, avg member {info.misfit:.3g}, "
                f"alpha {info.alpha:.3g}, spread {info.spread:.2g}, failed {info.n_failed}")
