"""The one-call runner: a smoother's run, recorded to HDF5 and resumable from the file.

:meth:`EnsembleSmoother.run <enkal.EnsembleSmoother.run>` is the loop and knows nothing of
files; :func:`run` joins it to :mod:`enkal.storage`: it reads the state to resume from, builds
the :class:`~enkal.storage.Recorder` sink for ``store=`` and hands both to the loop. This is
the only place besides the command line where the loop meets storage.

>>> import os, tempfile, torch, enkal
>>> model = enkal.CallableModel(lambda x: x[:, :1] + x[:, 1:], parameters=["a", "b"],
...                             output_size=1)
>>> smoother = enkal.EnsembleSmoother(enkal.Observations([1.0], noise_std=0.1),
...                                   schedule=enkal.ESMDA.constant(2))
>>> prior = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = os.path.join(tmp, "run.h5")
...     result = enkal.run(smoother, model, prior, store=path)
...     again = enkal.run(smoother, model, resume=path)   # finished: nothing left to do
...     print(result.state.iteration, again.state.iteration,
...           torch.equal(again.parameters, result.parameters))
2 2 True
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from ._checks import check_positive_int
from ._types import Sink, SmootherResult, SmootherState
from .smoother import EnsembleSmoother
from .storage import HISTORY_FORMAT, Recorder, format_of, read_state

__all__ = ["run"]


def run(
    smoother: EnsembleSmoother,
    model: Any,
    prior: torch.Tensor | None = None,
    *,
    state: SmootherState | None = None,
    resume: str | os.PathLike | None = None,
    store: str | os.PathLike | None = None,
    history: Any = None,
    checkpoint: str | os.PathLike | bool | None = None,
    checkpoint_every: int = 1,
    background_io: bool = False,
    store_attrs: dict | None = None,
    truth: torch.Tensor | None = None,
    sinks: Iterable[Sink] = (),
    max_iterations: int = 100,
    **loop: Any,
) -> SmootherResult:
    """Run ``smoother`` on ``model``, streaming the run to an HDF5 file, or resuming one.

    Parameters
    ----------
    smoother : EnsembleSmoother
    model : ForwardModel
    prior : Tensor, shape (N_ens, N_par), optional
        Initial ensemble in the unconstrained space (exactly one of ``prior``, ``state``,
        ``resume``).
    state : SmootherState, optional
        Continue from this state.
    resume : path, optional
        Continue from this history file or checkpoint (see
        :func:`enkal.storage.read_state`). From a history file: its last complete state row
        (at most ``max_iterations``; a torn or corrupt last row falls back to the previous
        one), and the history is continued in that file unless ``store`` names another
        (with ``history=None``, a continued file keeps the policy it was written with).
        From a checkpoint with ``store``: the history file is continued where the
        checkpoint left it, or, when that history holds later states of the same run (the
        default checkpoint is written only at the start and the end), from the latest of
        them: that is what recomputing gives, bit for bit (callbacks are not called for
        the iterations taken from the history). A run resumed after being killed ends bit
        for bit where the uninterrupted run would (same device).
    store : path, optional
        Stream the run to this HDF5 history file (``docs/schema.md``), one iteration at a
        time: a crash keeps every completed iteration. Every row that keeps the ensemble
        also holds the generator and schedule state (a few kB, with a checksum), so the
        history is its own checkpoint: ``resume=STORE`` continues from its last complete
        row.
    history : enkal.storage.History, optional
        Which iterations keep the ensemble (and predictions); default all, no predictions.
    checkpoint : path or bool, optional
        A separate checkpoint file (the whole state, written atomically). Default
        (``None``) with ``store``: ``STORE.ckpt.h5`` beside it, written at the start, at
        the end, and after the updates whose history row does not hold the state
        (``History(every=N)`` rows between kept ones). A path or ``True``
        (``STORE.ckpt.h5``): written after every ``checkpoint_every`` updates, whatever the
        history keeps. ``False``: no checkpoint file.
    checkpoint_every : int
        Checkpoint every this many updates (and at the end). A resume from an older
        checkpoint recomputes the iterations since, bit for bit, and the history file drops
        its rows beyond the checkpoint.
    background_io : bool
        Write history rows and checkpoints in a background thread, overlapping the next
        iteration's forward and update (one write in flight at most, in order). Off by
        default: on a 2-core CPU the writer thread competes with torch's threads and
        measured no gain (``bench/storage.py``); on GPU runs it hides the I/O.
    store_attrs : dict, optional
        Extra attributes for the history file (JSON-able).
    truth : Tensor, shape (N_par,), optional
        Physical values of a twin experiment's truth, stored with the history.
    sinks : iterable of Sink
        More sinks, after the recorder.
    max_iterations : int
        Updates counted from the start of the run: a resumed run stops at the same
        iteration as the uninterrupted one.
    **loop
        The rest of :meth:`EnsembleSmoother.run`'s arguments (``tolerance``, ``executor``,
        ``callbacks``, ``progress``, ``inplace``).

    Returns
    -------
    SmootherResult
    """
    if not isinstance(smoother, EnsembleSmoother):
        raise TypeError(f"smoother: expected an enkal.EnsembleSmoother, got "
                        f"{type(smoother).__name__}")
    if sum(x is not None for x in (prior, state, resume)) != 1:
        raise ValueError("run: expected exactly one of prior=, state= or resume=")
    if resume is not None and store is None and format_of(resume) == HISTORY_FORMAT:
        store = resume  # resuming a history continues it
    if checkpoint is True and store is None:
        raise ValueError("checkpoint=True: needs store= (or give a checkpoint path)")
    if history is not None and store is None:
        raise ValueError("history=: only with store=")
    check_positive_int(checkpoint_every, "checkpoint_every")
    if resume is not None:
        state = read_state(resume, smoother, device=getattr(model, "device", None),
                           store=store, max_iteration=max_iterations)
    elif state is None and prior is not None:
        state = smoother.init(prior)
    assert state is not None  # exactly one of prior, state, resume (checked above)
    recorders: list[Sink] = []
    if store is not None or checkpoint not in (None, False):
        recorders.append(Recorder(
            store, history=history, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
            background=background_io, attrs=store_attrs, truth=truth,
            resume_from=state.iteration if resume is not None else None))
    return smoother.run(model, state=state, sinks=[*recorders, *sinks],
                        max_iterations=max_iterations, **loop)
