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

from ._checks import check_bool, check_ensemble, check_positive_int
from ._types import Sink, SmootherResult, SmootherState
from .smoother import EnsembleSmoother
from .storage import (
    HISTORY_FORMAT,
    Recorder,
    check_dropped_rows,
    check_resume,
    format_of,
    read_state,
    repair,
)
from .storage.recorder import check_arguments

__all__ = ["run", "PREDICTIVE_MAX_OUTPUTS"]

#: :func:`run` stores the posterior predictive by default up to this many observations
PREDICTIVE_MAX_OUTPUTS = 10_000


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
    allow_changes: bool = False,
    predictive: bool | None = None,
    **loop: Any,
) -> SmootherResult:
    """Run ``smoother`` on ``model``, streaming the run to an HDF5 file, or resuming one.

    Parameters
    ----------
    smoother : EnsembleSmoother
    model : ForwardModel
    prior : Tensor, shape (N_ens, N_par), optional
        Initial ensemble in the unconstrained space (exactly one of ``prior``, ``state``,
        ``resume``). With ``resume`` it may be given too, as the ensemble this run would
        start from: the run continues the file's ensemble, and ``N_ens`` is compared with
        the file's (a script can always pass its prior, and ``resume`` when its file
        exists).
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

        A resume continues only the run the file recorded: before anything is written,
        :func:`enkal.storage.check_resume` compares the file (and the history it
        continues) with this run: observations, noise, ensemble size (with ``prior``),
        parameter layout, the strategies and settings of ``smoother.config()`` and
        ``store_attrs``; any difference is a ``ValueError`` naming each item with both
        values (see ``allow_changes``). Rows of the continued history after the state
        resumed from are dropped: rows beyond ``max_iterations`` (lost for good) are
        refused unless ``allow_changes``; rows the run recomputes are announced with a
        ``RuntimeWarning``. The history's ``n_forwards`` attribute counts the whole run:
        ``N_ens`` forwards per update since iteration 0, as the uninterrupted run's.
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
    allow_changes : bool
        With ``resume``: continue although the file's run differs from this one (new data,
        another schedule...), or although ``max_iterations`` drops rows the history holds
        beyond it; a ``RuntimeWarning`` names what differs (or the rows dropped). Another
        parameter layout or number of observations is refused regardless.
    predictive : bool, optional
        Evaluate the final ensemble once more after the run (``N_ens`` forwards): the
        posterior predictive, ``result.predictive``, stored at the final row of ``store``
        (``predictions``, stored bit 2) unless ``History(predictive=False)``. Default: on
        when there are at most :data:`PREDICTIVE_MAX_OUTPUTS` (10,000) observations and
        ``history`` does not say ``predictive=False``. Its forwards are not counted in
        ``n_forwards`` (the updates' forwards; a resumed run adds up to the uninterrupted
        one), and a resumed run computes it again at its end.
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
    given = [name for name, x in (("prior", prior), ("state", state), ("resume", resume))
             if x is not None]
    if given not in (["prior"], ["state"], ["resume"], ["prior", "resume"]):
        raise ValueError("run: expected exactly one of prior=, state= or resume= (prior= "
                         f"may come with resume=), got {' and '.join(given) or 'none'}")
    _check_arguments(resume=resume, store=store, history=history, checkpoint=checkpoint,
                     checkpoint_every=checkpoint_every, background_io=background_io,
                     store_attrs=store_attrs, sinks=sinks, allow_changes=allow_changes)
    if resume is not None and store is None and format_of(resume) == HISTORY_FORMAT:
        store = resume  # resuming a history continues it
    if checkpoint is True and store is None:
        raise ValueError("checkpoint: True (STORE.ckpt.h5) needs store=; got store=None "
                         "(or give a checkpoint path)")
    if history is not None and store is None:
        raise ValueError(f"history: only with store= (a history file to keep); got "
                         f"history={history!r} and store=None")
    check_positive_int(max_iterations, "max_iterations")
    if predictive is None:  # (not when the history would not keep it)
        predictive = smoother.observations.size <= PREDICTIVE_MAX_OUTPUTS and \
            getattr(history, "predictive", True)
    check_bool(predictive, "predictive")
    forwards_before = 0
    if resume is not None:
        state = _resume(smoother, model, prior, resume, store=store, attrs=store_attrs,
                        max_iterations=max_iterations, allow_changes=allow_changes)
        forwards_before = state.parameters.shape[0] * state.iteration
    elif state is None and prior is not None:
        state = smoother.init(prior)
    assert state is not None  # exactly one of prior, state, resume (checked above)
    recorders: list[Sink] = []
    if store is not None or checkpoint not in (None, False):
        recorders.append(Recorder(
            store, history=history, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
            background=background_io, attrs=store_attrs, truth=truth,
            resume_from=state.iteration if resume is not None else None,
            forwards_before=forwards_before))
    return smoother.run(model, state=state, sinks=[*recorders, *sinks],
                        max_iterations=max_iterations, predictive=predictive, **loop)


def _resume(smoother: EnsembleSmoother, model: Any, prior: torch.Tensor | None,
            resume: str | os.PathLike, *, store: str | os.PathLike | None,
            attrs: dict | None, max_iterations: int, allow_changes: bool) -> SmootherState:
    """The state to resume from, after checking that the file records this run (nothing is
    written before: a continued history is only :func:`~enkal.storage.repair`-ed, which
    drops what a killed append left torn)."""
    layout = getattr(model, "layout", None)
    if prior is not None:
        check_ensemble(prior, "prior", n_columns=getattr(layout, "size", None))
    if store is not None and os.path.exists(store) and format_of(store) == HISTORY_FORMAT:
        repair(store)
    check_resume(resume, smoother, layout=layout,
                 ensemble_size=None if prior is None else prior.shape[0], attrs=attrs,
                 store=store, allow_changes=allow_changes)
    state = read_state(resume, smoother, device=getattr(model, "device", None), store=store,
                       max_iteration=max_iterations, warn=False)
    if store is not None:
        check_dropped_rows(resume, store, state.iteration, max_iteration=max_iterations,
                           allow_changes=allow_changes)
    return state


def _check_arguments(*, resume: Any, store: Any, history: Any, checkpoint: Any,
                     checkpoint_every: Any, background_io: Any, store_attrs: Any, sinks: Any,
                     allow_changes: Any) -> None:
    """``TypeError``/``ValueError`` naming ``enkal.run``'s own argument (not the recorder's
    name for it) before anything is read or written."""
    for name, value in (("resume", resume), ("store", store)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name}: expected a file path (str or os.PathLike) or None, got "
                            f"{type(value).__name__} {value!r}"[:200])
    check_arguments(history, checkpoint, checkpoint_every, background_io, store_attrs,
                    background_name="background_io", attrs_name="store_attrs")
    if not isinstance(allow_changes, bool):
        raise TypeError(f"allow_changes: expected a bool, got {type(allow_changes).__name__} "
                        f"{allow_changes!r}"[:200])
    if sinks is None or isinstance(sinks, (str, bytes)) or not hasattr(sinks, "__iter__"):
        raise TypeError(f"sinks: expected an iterable of sinks, got {type(sinks).__name__}")
