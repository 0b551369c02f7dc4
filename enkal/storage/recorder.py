"""The recorder: a run's HDF5 history and checkpoint file, as a sink of the run.

:class:`Recorder` implements :class:`enkal._types.Sink` (``start``, ``record``, ``close``):
the loop hands it each state as it goes and never touches a file itself. It writes what
``run(store=path, ...)`` writes: a history row per update (:class:`HistoryWriter`) and the
checkpoint file, in that order, optionally in a background thread.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import check_positive_int
from .checkpoint import write_checkpoint
from .h5 import _as_path
from .history import HistoryWriter
from .journal import process_alive, writer_lock
from .resume import read_policy
from .schema import History

__all__ = ["Recorder", "default_checkpoint_path", "check_arguments", "check_attributes",
           "RESERVED_ATTRS"]


def default_checkpoint_path(store: str | os.PathLike) -> str:
    """``run.h5`` -> ``run.ckpt.h5``: where ``run(store=...)`` keeps its checkpoint."""
    root, ext = os.path.splitext(os.fspath(store))
    return f"{root}.ckpt{ext or '.h5'}"


def check_arguments(history: Any, checkpoint: Any, checkpoint_every: Any, background: Any,
                    attrs: Any, resume_from: Any = None, *, background_name: str = "background",
                    attrs_name: str = "attrs") -> None:
    """The checks of :class:`Recorder`'s arguments (``enkal.run`` calls them under its own
    names for ``background`` and ``attrs``: ``background_io``, ``store_attrs``)."""
    if history is not None and not isinstance(history, History):
        raise TypeError(f"history: expected enkal.storage.History or None, got "
                        f"{type(history).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, (bool, str, os.PathLike)):
        raise TypeError(f"checkpoint: expected a path, a bool or None, got "
                        f"{type(checkpoint).__name__}")
    check_positive_int(checkpoint_every, "checkpoint_every")
    if not isinstance(background, bool):
        raise TypeError(f"{background_name}: expected a bool, got {type(background).__name__} "
                        f"{background!r}"[:200])
    if attrs is not None:
        check_attributes(attrs, attrs_name)
    if resume_from is not None:
        check_positive_int(resume_from, "resume_from", minimum=0)


#: global attributes a history file writes itself: a user's ``attrs`` may not replace them
#: (the file could no longer be read, or would lie about its run)
RESERVED_ATTRS = frozenset({
    "enkal_format", "enkal_format_version", "enkal_version", "torch_version", "h5py_version",
    "hdf5_version", "created", "parameter_space", "layout", "history_policy", "noise",
    "complete", "parameters_dtype", "seed", "config", "truth", "stopped_by", "n_forwards",
})


def check_attributes(attrs: Any, name: str = "attrs") -> None:
    """Extra global attributes: a mapping of str keys (not :data:`RESERVED_ATTRS`) to
    numbers, strings, bools, numeric arrays or JSON-able values."""
    if not isinstance(attrs, Mapping):
        raise TypeError(f"{name}: expected a dict of attributes or None, got "
                        f"{type(attrs).__name__}")
    for key, value in attrs.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name}: expected non-empty str keys, got {key!r}"[:200])
        if key in RESERVED_ATTRS:
            raise ValueError(f"{name}: {key!r} is an attribute the history writes itself "
                             f"(reserved: {sorted(RESERVED_ATTRS)}); got {key}={value!r}, "
                             "choose another name"[:400])
        plain = isinstance(value, (str, int, float, np.generic)) or (
            isinstance(value, np.ndarray) and value.dtype.kind in "biuf")
        try:
            if not plain:
                json.dumps(value, allow_nan=False)  # JSON, never repr() of an object
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name}[{key!r}]: expected a number, a string, a numeric array "
                            f"or a JSON-able value, got {type(value).__name__} ({err})"
                            ) from None


def _truth(truth: Any) -> torch.Tensor | None:
    """A twin experiment's truth as a float64 CPU vector (checked against N_par at start)."""
    if truth is None:
        return None
    try:
        return torch.as_tensor(truth, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"truth: expected a tensor or sequence of N_par numbers, got "
                        f"{type(truth).__name__} ({err})") from None


class Recorder:
    """Record a run to an HDF5 history file and a checkpoint file as it goes (a sink).

    ``start(run)`` creates the history (or continues it, with ``resume_from``) and writes
    the starting state's checkpoint; ``record(state, info, predictions, final=...)`` after
    each update appends the history row, then the checkpoint when one is due; ``close(end)``
    waits for the last write and marks the file complete with ``stopped_by`` and
    ``n_forwards``. The files are those of ``run(store=path, ...)``, bit for bit.

    Parameters
    ----------
    path : str or os.PathLike or None
        The history file (``docs/schema.md``): replaced at the start, or continued with
        ``resume_from``. ``None``: no history, only the checkpoint file ``checkpoint``
        (then a path).
    history : History, optional
        Which iterations keep the ensemble (default :class:`History`: all of them); a file
        continued with ``resume_from`` keeps the policy it was written with unless given.
    checkpoint : path, bool or None
        ``None`` (default): :func:`default_checkpoint_path` of ``path``, written at the
        start, at the end and after updates whose history row does not hold the state.
        A path, or ``True`` for the default path: written after every ``checkpoint_every``
        updates (and at the start and the end) whatever the history holds. ``False``: none.
    checkpoint_every : int
        Updates between checkpoints (with ``checkpoint`` a path or ``True``).
    background : bool
        Write in a background thread, one write in flight at most, in order (history row,
        then checkpoint). The tensors a write needs are copied first, so the loop may
        reuse its buffers; an error surfaces at the next ``record`` or at ``close``.
    attrs : dict, optional
        Extra global attributes of the history (JSON-able values).
    truth : Tensor, shape (N_par,), optional
        Physical values of a twin experiment's truth, stored as the ``truth`` attribute.
    resume_from : int, optional
        The iteration the run resumes from: the history is continued there (its later rows
        are dropped) and no starting checkpoint is written.
    forwards_before : int
        Member forwards behind the starting state (a resumed run: ``N_ens`` per update
        since iteration 0, as the loop counts them), added to the run's own in the file's
        ``n_forwards``, which then counts the whole run as an uninterrupted one would.

    Examples
    --------
    The loop of ``run``, by hand (ask/tell):

    >>> import os, tempfile, torch, enkal
    >>> from enkal._types import RunEnd, RunStart
    >>> model = enkal.CallableModel(lambda x: x[:, :1] + x[:, 1:], parameters=["a", "b"],
    ...                             output_size=1)
    >>> smoother = enkal.EnsembleSmoother(enkal.Observations([1.0], noise_std=0.1),
    ...                                   schedule=enkal.ESMDA.constant(2))
    >>> state = smoother.init(torch.randn(8, 2, dtype=torch.float64))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     rec = Recorder(os.path.join(tmp, "run.h5"))
    ...     rec.start(RunStart(smoother, model.layout, model.output_names, state))
    ...     while not smoother.done(state):
    ...         y = model(model.layout.to_physical(state.parameters))
    ...         state, info = smoother.step(state, y)
    ...         rec.record(state, info, y, final=smoother.done(state))
    ...     rec.close(RunEnd(stopped_by="schedule", n_forwards=16))
    ...     with enkal.open(os.path.join(tmp, "run.h5")) as ds:
    ...         print(ds.iteration.values.tolist(), ds.attrs["stopped_by"])
    ...     print(sorted(os.listdir(tmp)))
    [0, 1, 2] schedule
    ['run.ckpt.h5', 'run.h5']
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        history: History | None = None,
        checkpoint: str | os.PathLike | bool | None = None,
        checkpoint_every: int = 1,
        background: bool = False,
        attrs: Mapping[str, Any] | None = None,
        truth: Any = None,
        resume_from: int | None = None,
        forwards_before: int = 0,
    ) -> None:
        self.path: Path | None = None if path is None else _as_path(path)
        if path is None and (checkpoint is None or isinstance(checkpoint, bool)):
            raise ValueError("checkpoint: without a history path, expected a checkpoint "
                             f"path, got {checkpoint!r}")
        if path is None and history is not None:
            raise ValueError("history: only with a history path")
        check_arguments(history, checkpoint, checkpoint_every, background, attrs, resume_from)
        self.truth = _truth(truth)
        self.history = history
        #: where the checkpoint goes (None: no checkpoint file)
        self.checkpoint_path: str | None = None
        self._always = True  # checkpoint at every checkpoint_every (else: where needed)
        if isinstance(checkpoint, (str, os.PathLike)):
            self.checkpoint_path = os.fspath(checkpoint)
        elif checkpoint is not False and self.path is not None:
            self.checkpoint_path = default_checkpoint_path(self.path)
            self._always = checkpoint is True
        self.checkpoint_every = checkpoint_every
        self.background = background
        self.attrs = dict(attrs or {})
        self.resume_from = resume_from
        self._writer: HistoryWriter | None = None
        self._lock: Any = None
        check_positive_int(forwards_before, "forwards_before", minimum=0)
        self._forwards_before = int(forwards_before)  # forwards behind the start
        self._started = False
        self._smoother: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    @property
    def writer(self) -> HistoryWriter | None:
        """The history writer (``None`` before :meth:`start`)."""
        return self._writer

    def __repr__(self) -> str:
        return (f"Recorder({None if self.path is None else str(self.path)!r}, checkpoint={self.checkpoint_path!r}, "
                f"background={self.background})")

    # -- the Sink protocol ------------------------------------------------------------------
    def start(self, run: Any) -> None:
        """Create (or continue) the history with the run's starting state, and write the
        starting checkpoint (so that even a run failing in its first update resumes).

        ``run`` is an :class:`enkal._types.RunStart`: ``smoother`` (``config()``,
        ``observations``, ``seed``, ``state_dict``), ``layout``, ``output_names``, ``state``.
        """
        if self._started:
            raise ValueError("Recorder: start() called twice; a Recorder records one run")
        if self.path is not None:
            self._lock = writer_lock(self.path)  # one writer per history file
        try:
            self._start(run)
        except BaseException:
            self._release()
            raise

    def _start(self, run: Any) -> None:
        for target in (self.path, self.checkpoint_path):
            if target is not None:
                remove_stale_temporaries(Path(target))
        smoother = run.smoother
        extra = dict(self.attrs)
        if self.truth is not None:
            if self.truth.numel() != run.layout.size:
                raise ValueError(f"truth: expected {run.layout.size} values (N_par), got "
                                 f"{self.truth.numel()}")
            extra["truth"] = self.truth.numpy()  # a numeric attribute, in physical units
        writer = None
        if self.path is not None:
            history = self.history
            if history is None and self.resume_from is not None and self.path.exists():
                history = read_policy(self.path)  # a continued history keeps its policy
            writer = HistoryWriter(
                self.path, layout=run.layout, observations=smoother.observations,
                config=smoother.config(),
                history=history if history is not None else History(),
                output_names=run.output_names, seed=smoother.seed,
                resume_from=self.resume_from, attrs=extra)
            writer.start(run.state)
        if self.checkpoint_path is not None and self.resume_from is None:
            write_checkpoint(self.checkpoint_path, smoother, run.state)
        # only now: a start that failed leaves the history incomplete, as run() does
        self._writer, self._smoother, self._started = writer, smoother, True
        if self.background:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enkal-store")

    def record(self, state: Any, info: Any, predictions: torch.Tensor | None, *,
               final: bool) -> None:
        """The history row of ``state`` (after an update; ``predictions`` are those the
        update assimilated), then its checkpoint when one is due (``final``, or every
        ``checkpoint_every`` updates)."""
        if not self._started:
            raise ValueError("Recorder: record() before start()")
        checkpoint = final or state.iteration % self.checkpoint_every == 0
        self._wait()
        if self._pool is None:
            self._write(state, info, predictions, final, checkpoint)
            return
        # copy only what the row and the checkpoint will write: the writer then never sees
        # a tensor the loop reuses; what it would not keep it is not given at all
        keep_x, keep_y = (False, False) if self._writer is None else \
            self._writer.keeps_row(state.iteration, final=final)
        # a row without the ensemble does not hold the state: the checkpoint is written
        keep_x = keep_x or (checkpoint and self.checkpoint_path is not None)
        snap = dataclasses.replace(
            state, parameters=state.parameters.detach().clone() if keep_x else None)
        preds = predictions.detach().clone() if keep_y and predictions is not None else None
        self._pending = self._pool.submit(self._write, snap, info, preds, final, checkpoint)

    def predictive(self, state: Any, predictions: torch.Tensor) -> None:
        """The posterior predictive (predictions of the final ensemble ``state``), stored at
        its row when the history keeps predictions (``History.predictive``)."""
        self._wait()
        if self._writer is not None and self._writer.last_iteration == state.iteration:
            self._writer.append_predictive(state.iteration, predictions)

    def close(self, end: Any) -> None:
        """Wait for the write in flight and close the history (an
        :class:`enkal._types.RunEnd`): ``stopped_by`` says how the run ended
        (``end.stopped_by``, or ``"interrupted"`` after Ctrl-C, or ``"failed: ..."``),
        ``complete`` is 1 only when it ended as planned, and ``n_forwards`` counts the member
        forwards of the whole run, resumed parts included."""
        try:
            self._wait()
        finally:
            try:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                    self._pool = None
                if self._writer is not None:
                    self._writer.close(
                        attrs={"stopped_by": _ending(end),
                               "n_forwards": self._forwards_before + end.n_forwards},
                        complete=end.error is None)
            finally:
                self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- internals ---------------------------------------------------------------------------
    def _write(self, state: Any, info: Any, predictions: torch.Tensor | None, final: bool,
               checkpoint: bool) -> None:
        if self._writer is not None:
            self._writer.record(state, info, predictions=predictions, final=final)
        if checkpoint and self.checkpoint_path is not None and (
                self._always or final or self._writer is None
                or not self._writer.holds_state):
            # after the history row; no fsync: the rename is atomic for a killed process
            # (the page cache survives it); only power loss would need fsync
            write_checkpoint(self.checkpoint_path, self._smoother, state, fsync=False)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


def _ending(end: Any) -> str:
    """``stopped_by`` of a run that ended with ``end`` (a :class:`~enkal._types.RunEnd`)."""
    err = getattr(end, "error", None)
    if err is None:
        return str(end.stopped_by)
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    message = " ".join(str(err).split())
    return f"failed: {type(err).__name__}: {message}"[:300]


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files (``.NAME.PID-xxxx.tmp``) that writers of ``path`` killed
    before their rename left beside it; only those of processes no longer running."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*-*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split("-", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed
