"""Progress of a filter run: a :class:`~enkal.filtering.FilterSink` with a tqdm bar.

On a terminal a bar over the series' cycles with the elapsed time and the time left; when
the stream is not a terminal (CI, a log file), about ``lines`` plain lines over the whole
series instead of one per cycle. Each shows the cycle's analysis spread (root-mean
variance over the state), the inflation and the failed members.

>>> import io, torch
>>> from enkal.filtering import EnsembleFilter, run_filter
>>> class Still:
...     def propagate(self, states, t0, t1, *, parameters=None, generator=None):
...         return states.clone()
>>> flt = EnsembleFilter(Still(), noise_std=1.0)
>>> x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> log = io.StringIO()
>>> _ = run_filter(flt, flt.init(x0), torch.arange(1.0, 11.0), torch.zeros(10, 2),
...                sinks=[FilterProgress(stream=log, lines=2)])
>>> [line.split(" [")[0] for line in log.getvalue().splitlines()]
['cycle 5/10', 'cycle 10/10']
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from .._checks import check_positive_int

__all__ = ["FilterProgress"]

_PLAIN = "{n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


class FilterProgress:
    """Show a filter run's progress on ``stream`` (default ``sys.stderr``).

    Parameters
    ----------
    stream : text stream, optional
    tty : bool, optional
        Draw a bar (``True``) or write plain lines (``False``); default ``stream.isatty()``.
    lines : int
        Plain lines over the whole series (not a terminal).
    """

    def __init__(self, *, stream: TextIO | None = None, tty: bool | None = None,
                 lines: int = 20) -> None:
        check_positive_int(lines, "lines")
        if tty is not None and not isinstance(tty, bool):
            raise TypeError(f"tty: expected a bool or None, got {type(tty).__name__}")
        self.stream, self.tty, self.lines = stream, tty, lines
        self._bar: Any = None

    def start(self, start: Any) -> None:
        self._stream = self.stream if self.stream is not None else sys.stderr
        tty = self.tty if self.tty is not None else \
            bool(getattr(self._stream, "isatty", lambda: False)())
        self.total = int(start.times.numel())
        self._first = int(start.state.cycle)
        self._every = max(1, math.ceil((self.total - self._first) / self.lines))
        self._t0 = time.perf_counter()
        if tty:
            self._bar = tqdm(total=self.total, initial=self._first, file=self._stream,
                             unit="cycle", dynamic_ncols=True, leave=True)

    def record(self, state: Any, info: Any) -> None:
        text = self.describe(info)
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(info.cycle - self._bar.n)
            return
        if (info.cycle - self._first) % self._every and info.cycle != self.total:
            return
        counters = tqdm.format_meter(info.cycle, self.total, time.perf_counter() - self._t0,
                                     initial=self._first, unit="cycle", bar_format=_PLAIN)
        self._stream.write(f"cycle {counters} {text}\n")
        self._stream.flush()

    def close(self, error: BaseException | None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @staticmethod
    def describe(info: Any) -> str:
        """``t 12.5, spread 0.21, inflation 1.02, failed 0``."""
        spread = float(info.analysis_spread.square().mean().sqrt())
        return (f"t {info.time:.4g}, spread {spread:.3g}, inflation {info.inflation:.3g}, "
                f"failed {info.n_failed}")
