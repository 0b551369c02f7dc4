"""Module-level black-box models for the Dask executor tests (worker processes must be able
to unpickle them: the tests ship this module by value with cloudpickle).

All are numpy, batched, members first, ``(n, 3) -> (n, 4)``, and elementwise per member so a
member's prediction does not depend on which other members share its call (bitwise equal
in-process and on workers, whatever the chunking).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np


def smooth(x: np.ndarray) -> np.ndarray:
    a, b, c = x[:, 0], x[:, 1], x[:, 2]
    return np.stack([a + 0.5 * b * b, np.sin(b) * c, a * c, np.exp(-0.1 * a * a) + c], axis=1)


def slow_smooth(x: np.ndarray) -> np.ndarray:
    time.sleep(0.15)
    return smooth(x)


def raise_on_large(x: np.ndarray) -> np.ndarray:
    if np.any(x[:, 0] > 50.0):
        raise ValueError("simulator diverged: a > 50")
    return smooth(x)


def crash_on_large(x: np.ndarray) -> np.ndarray:
    """Kill the process running it (a segfaulting simulator) when a member has a > 50."""
    if np.any(x[:, 0] > 50.0):
        os.kill(os.getpid(), signal.SIGKILL)
    return smooth(x)


def count_lost_tasks(dask_scheduler, prefix: str = "enkal-forward") -> int:
    """On the scheduler: how many of our tasks were taken back from a worker while it
    processed them (``processing -> released``, what a worker's death does)."""
    return sum(1 for entry in dask_scheduler.transition_log
               if str(entry[0]).startswith(prefix) and entry[1] == "processing"
               and entry[2] == "released")


def set_allowed_failures(n: int, dask_scheduler=None) -> int:
    """On the scheduler: set ``allowed-failures`` (deaths before ``KilledWorker``) at run
    time; returns the previous value."""
    old = dask_scheduler.allowed_failures
    dask_scheduler.allowed_failures = n
    return old
