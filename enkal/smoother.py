"""The iterated ensemble smoother: ``init``, ``step`` (ask/tell) and ``run``.

One iteration, every decision taken from one forward evaluation::

    X_k --forward--> Yh_k --failure policy--> ok --schedule(Yh_k)--> alpha_k
        --adapt(X_k, Yh_k), optional--> mask_{k+1} (structure adaptation, enkal.adapt)
        --ensemble_transform(Yh_k[ok], y, alpha_k)--> W (E x E)
        --apply W to X_k in chunks--> X_{k+1} --collapse guard, mask--> state_{k+1}

``step(state, predictions)`` takes the predictions as an argument, so any external simulator
can be driven ask/tell: read ``layout.to_physical(state.parameters)``, run the members
anywhere, hand the predictions back. ``run`` does the loop with a :class:`ForwardModel`.

State is explicit and immutable (:class:`SmootherState`): the ensemble in the unconstrained
space, the schedule's state, the random generator's state, the iteration and the mask of
live (unpruned) parameters. Randomness comes only from a ``torch.Generator`` whose state is
in the smoother state, so a run resumed from a state dict repeats the uninterrupted run.

>>> import torch
>>> from enkal import EnsembleSmoother, Observations, ESMDA, CallableModel
>>> model = CallableModel(lambda x: x @ torch.tensor([[1.0], [2.0]], dtype=torch.float64),
...                       parameters=["a", "b"], output_size=1)
>>> smoother = EnsembleSmoother(Observations([3.0], noise_std=0.1), schedule=ESMDA.constant(2),
...                             seed=0)
>>> prior = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
>>> result = smoother.run(model, prior)
>>> result.history["iteration"], round(float(model(result.parameters.mean(0, keepdim=True))), 1)
([1, 2], 3.0)
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._checks import (
    check_ensemble,
    check_finite,
    check_members_first,
    check_positive_int,
    column_variance,
)
from ._types import SmootherResult, SmootherState, StepInfo
from .collapse import CollapseGuard
from .errors import ScheduleExhaustedError
from .executors import InProcess, check_executor
from .failures import FailurePolicy, IgnoreFailed, ResampleFailed, check_policy, classify_members
from .forward import ForwardModel
from .observations import Observations
from .schedule import DataMisfitController, check_schedule, schedule_state_dict
from .update import (
    SquareRoot,
    UpdateRule,
    _check_rule,
    apply_transform,
    draw_transform,
)

__all__ = ["EnsembleSmoother", "SmootherState", "StepInfo", "SmootherResult"]


class EnsembleSmoother:
    """Iterated ensemble smoother (ensemble Kalman inversion).

    Parameters
    ----------
    observations : Observations
        Data ``y`` and noise ``R``.
    rule : SquareRoot or PerturbedObservations
        The update (default :class:`SquareRoot`).
    schedule : FixedAnnealing, ESMDA or DataMisfitController
        Noise inflation per iteration (default :class:`DataMisfitController`).
    guard : CollapseGuard, optional
        Redraw parameters whose variance collapses (off by default).
    failure : ResampleFailed, IgnoreFailed or Raise
        What to do with failed members (default :class:`ResampleFailed`).
    seed : int
        Seed of the smoother's ``torch.Generator``.
    chunk_size : int, optional
        Parameter columns per GEMM block of the update.
    adapt : StructureAdaptation, optional
        Prune the least-informative parameters as the run goes (``docs/adaptation.md``):
        decided from each iteration's fresh predictions, after the schedule and before the
        update; the newly pruned columns are zeroed in all members and masked.
    """

    def __init__(
        self,
        observations: Observations,
        *,
        rule: UpdateRule = SquareRoot(),
        schedule: Any = DataMisfitController(),
        guard: CollapseGuard | None = None,
        failure: FailurePolicy = ResampleFailed(),
        seed: int = 0,
        chunk_size: int | None = None,
        adapt: Any = None,
    ) -> None:
        if not isinstance(observations, Observations):
            raise TypeError(
                f"observations: expected enkal.Observations, got {type(observations).__name__}"
            )
        _check_rule(rule)
        check_schedule(schedule)
        if guard is not None and not isinstance(guard, CollapseGuard):
            raise TypeError(f"guard: expected CollapseGuard or None, got {type(guard).__name__}")
        check_policy(failure)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TypeError(f"seed: expected a non-negative int, got {seed!r}")
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        self.observations = observations
        self.rule = rule
        self.schedule = schedule
        self.guard = guard
        self.failure = failure
        self.seed = seed
        self.chunk_size = chunk_size
        from .adapt import check_adapt

        check_adapt(adapt)
        self.adapt = adapt

    # -- configuration -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """A plain description of the configuration (for provenance in files)."""
        def describe(obj):
            if obj is None:
                return None
            d = {"type": type(obj).__name__}
            if dataclasses.is_dataclass(obj):
                for f in dataclasses.fields(obj):
                    v = getattr(obj, f.name)
                    d[f.name] = describe(v) if dataclasses.is_dataclass(v) else v
            return d
        return {"rule": describe(self.rule), "schedule": describe(self.schedule),
                "guard": describe(self.guard), "failure": describe(self.failure),
                "seed": self.seed, "chunk_size": self.chunk_size,
                "n_obs": self.observations.size, "adapt": describe(self.adapt)}

    def __repr__(self) -> str:
        return (f"EnsembleSmoother(rule={self.rule}, schedule={self.schedule}, "
                f"guard={self.guard}, failure={self.failure}, seed={self.seed})")

    # -- ask/tell ------------------------------------------------------------------------
    def init(self, prior: torch.Tensor, *, mask: torch.Tensor | None = None) -> SmootherState:
        """Start from a prior ensemble ``(N_ens, N_par)`` (unconstrained space)."""
        check_ensemble(prior, "prior")
        if prior.shape[0] < 2:
            raise ValueError(f"prior: expected at least 2 members (N_ens >= 2), got {prior.shape[0]}")
        check_finite(prior, "prior")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
                    mask.shape != (prior.shape[1],):
                raise ValueError(f"mask: expected a bool tensor of shape ({prior.shape[1]},)")
            mask = mask.to(prior.device)
        gen = torch.Generator(device=prior.device).manual_seed(self.seed)
        return SmootherState(parameters=prior, iteration=0, schedule=self.schedule.init(),
                             rng_state=gen.get_state(), mask=mask,
                             adapt=self.adapt.init() if self.adapt is not None else None)

    def done(self, state: SmootherState) -> bool:
        """True when the schedule plans no further update."""
        return self.schedule.done(state.schedule)

    def step(
        self,
        state: SmootherState,
        predictions: torch.Tensor,
        *,
        ok: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> tuple[SmootherState, StepInfo]:
        """One update from the predictions of ``state.parameters`` (pure).

        Parameters
        ----------
        state : SmootherState
        predictions : Tensor, shape (N_ens, N_obs)
            Predictions of the physical parameters ``layout.to_physical(state.parameters)``.
            Rows with NaN/inf count as failed members.
        ok : bool Tensor, shape (N_ens,), optional
            Members known to have failed (``False``), e.g. because their forward raised.
        out : Tensor, optional
            Buffer for the new parameters (may be ``state.parameters``: then the old state
            must not be used again).
        """
        if not isinstance(state, SmootherState):
            raise TypeError(f"state: expected SmootherState, got {type(state).__name__}")
        x = state.parameters
        if not isinstance(predictions, torch.Tensor):
            raise TypeError(
                f"predictions: expected a torch.Tensor, got {type(predictions).__name__}"
            )
        if not predictions.is_floating_point():
            raise TypeError(f"predictions: expected a floating dtype, got {predictions.dtype}")
        check_members_first(predictions, "predictions", n_members=x.shape[0],
                            n_columns=self.observations.size, columns="N_obs")
        if predictions.device != x.device:
            raise ValueError(
                f"predictions: expected device {x.device} (the ensemble's), got "
                f"{predictions.device}"
            )
        if self.schedule.done(state.schedule):
            raise ScheduleExhaustedError(
                f"{type(self.schedule).__name__}: no update left after iteration "
                f"{state.iteration}; check smoother.done(state) before stepping"
            )
        ok = classify_members(self.failure, predictions, ok, self.observations)
        n_failed = int((~ok).sum())
        all_ok = n_failed == 0
        used = predictions if all_ok else predictions[ok]

        alpha, sched_state, sched_info = self.schedule.step(
            state.schedule, parameters=x, predictions=used, observations=self.observations)

        mask, adapt_state, n_pruned = state.mask, state.adapt, 0
        if self.adapt is not None:
            # structure adaptation reads the same fresh predictions as the schedule; the
            # newly pruned columns are zeroed (with the old ones) after the update below
            new_mask, adapt_state, adapt_info = self.adapt.step(
                state.adapt, iteration=state.iteration, mask=state.mask,
                parameters=x if all_ok else x[ok], predictions=used,
                observations=self.observations)
            if new_mask is not None:
                mask = new_mask.to(device=x.device, dtype=torch.bool)
                n_pruned = int(adapt_info.get("n_pruned", 0))

        gen = torch.Generator(device=x.device)
        gen.set_state(state.rng_state)
        w = draw_transform(used, self.observations, rule=self.rule, alpha=alpha, generator=gen,
                           ok=None if all_ok else ok,
                           redraw=not isinstance(self.failure, IgnoreFailed))
        new_x = apply_transform(w, x, out=out, chunk_size=self.chunk_size)
        n_resampled = 0
        if self.guard is not None:
            new_x, n_resampled = self.guard.apply(new_x, generator=gen, mask=mask,
                                                  inplace=True)
        if mask is not None and not bool(mask.all()):
            new_x[:, ~mask] = 0

        phi = self.observations.misfit(used)
        mean_phi = self.observations.misfit(used.mean(dim=0, keepdim=True))
        m = self.observations.size
        spread = math.sqrt(_mean_variance(x))
        new_state = SmootherState(parameters=new_x, iteration=state.iteration + 1,
                                  schedule=sched_state, rng_state=gen.get_state(),
                                  mask=mask, adapt=adapt_state)
        info = StepInfo(
            iteration=new_state.iteration, alpha=float(alpha),
            misfit=float(2 * phi.mean() / m), mean_misfit=float(2 * mean_phi[0] / m),
            spread=spread, n_failed=n_failed, n_resampled=n_resampled,
            done=bool(self.schedule.done(sched_state)),
            schedule={k: v for k, v in sched_info.items() if isinstance(v, (int, float, bool))},
            n_live=x.shape[1] if mask is None else int(mask.sum()), n_pruned=n_pruned,
        )
        return new_state, info

    # -- the loop ------------------------------------------------------------------------
    def run(
        self,
        model: ForwardModel,
        prior: torch.Tensor | None = None,
        *,
        state: SmootherState | None = None,
        max_iterations: int = 100,
        tolerance: float | None = None,
        executor: Any = None,
        callbacks: Iterable[Callable[[SmootherState, StepInfo], Any]] = (),
        progress: bool = False,
        store: str | os.PathLike | None = None,
        history: Any = None,
        checkpoint: str | os.PathLike | bool | None = None,
        checkpoint_every: int = 1,
        inplace: bool = False,
        background_io: bool = False,
        resume: str | os.PathLike | None = None,
        store_attrs: dict | None = None,
        truth: torch.Tensor | None = None,
    ) -> SmootherResult:
        """Iterate forward and update until the schedule is done or a limit is reached.

        Parameters
        ----------
        model : ForwardModel
        prior : Tensor, shape (N_ens, N_par)
            Initial ensemble in the unconstrained space (or give ``state`` to continue).
        state : SmootherState, optional
            Continue from this state (see :meth:`load_state_dict`).
        max_iterations : int
            Upper bound on updates in this call.
        tolerance : float, optional
            Stop when the ensemble-mean misfit changes by less than this fraction.
        executor : InProcess, Dask or similar, optional
            Where the forwards run (default ``InProcess()``: this process, all members in
            one call; ``InProcess(members_per_call=k)`` bounds the model's memory).
        callbacks : iterable of callables
            ``cb(state, info)`` after each update; a callback returning ``True`` stops.
            The smoother reuses parameter buffers: a callback that keeps
            ``state.parameters`` must ``.clone()`` it.
        progress : bool
            Print one line per iteration to stderr.
        store : path, optional
            Stream the run to this HDF5 history file (``docs/schema.md``), one iteration at
            a time: a crash keeps every completed iteration. Every row that keeps the
            ensemble also holds the generator and schedule state (a few kB, with a
            checksum), so the history is its own checkpoint: ``resume=STORE`` continues
            from its last complete row.
        history : enkal.storage.History, optional
            Which iterations keep the ensemble (and predictions); default all, no
            predictions.
        checkpoint : path or bool, optional
            A separate checkpoint file (the whole state, written atomically).
            Default (``None``) with ``store``: ``STORE.ckpt.h5`` beside it, written at the
            start, at the end, and after the updates whose history row does not hold the
            state (``History(every=N)`` rows between kept ones): with the default
            ``History()`` no second copy of the ensemble is written per iteration. A path
            or ``True`` (``STORE.ckpt.h5``): written after every ``checkpoint_every``
            updates, whatever the history keeps. ``False``: no checkpoint file.
        checkpoint_every : int
            Checkpoint every this many updates (and at the end). A resume from an older
            checkpoint recomputes the iterations since, bit for bit, and the history file
            drops its rows beyond the checkpoint.
        inplace : bool
            Update the ensemble in place (after the first update, which never writes to the
            caller's prior), through an ``(N_ens, chunk_size)`` buffer: the memory-bounded
            path for huge ``N_par``. By default two ensemble buffers alternate (faster).
        background_io : bool
            Write history rows and checkpoints in a background thread, overlapping the
            next iteration's forward and update (one write in flight at most, in order:
            history row, then checkpoint). A crash loses at most the iteration in flight;
            the history file always reaches the checkpoint's iteration. Off by default: on a
            2-core CPU the writer thread competes with torch's threads and measured no gain
            (``bench/storage.py``); on GPU runs it hides the I/O.
        resume : path, optional
            Continue from this history file or checkpoint (instead of ``prior``/``state``),
            see :func:`enkal.storage.read_state`. From a history file: its last complete
            state row (at most ``max_iterations``; a torn or corrupt last row falls back to
            the previous one), and the history is continued in that file unless ``store``
            names another (with ``history=None``, a continued file keeps the policy it
            was written with). From a checkpoint with ``store``: the history file is continued
            where the checkpoint left it, or, when that history holds later states of the
            same run (the default checkpoint is written only at the start and the end), from
            the latest of them: that is what recomputing gives, bit for bit (callbacks are
            not called for the iterations taken from the history). A run resumed after
            being killed ends bit for bit where the uninterrupted run would (same device).
        store_attrs : dict, optional
            Extra attributes for the history file (JSON-able).
        truth : Tensor, shape (N_par,), optional
            Physical values of a twin experiment's truth, stored with the history.

        ``max_iterations`` counts updates from the start of the run (a resumed run stops at
        the same iteration as the uninterrupted one).
        """
        if not isinstance(model, ForwardModel):
            raise TypeError(f"model: expected an enkal.ForwardModel, got {type(model).__name__}")
        if model.output_size != self.observations.size:
            raise ValueError(
                f"model: output_size {model.output_size} does not match the "
                f"{self.observations.size} observations"
            )
        check_positive_int(max_iterations, "max_iterations")
        check_positive_int(checkpoint_every, "checkpoint_every")
        executor = InProcess() if executor is None else executor
        check_executor(executor)
        callbacks = list(callbacks)
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"callbacks: expected callables, got {type(cb).__name__}")
        if sum(x is not None for x in (prior, state, resume)) != 1:
            raise ValueError("run: expected exactly one of prior=, state= or resume=")
        if resume is not None:
            from .storage import HISTORY_FORMAT, _format_of, read_state

            if store is None and _format_of(resume) == HISTORY_FORMAT:
                store = resume  # resuming a history continues it
            state = read_state(resume, self, device=getattr(model, "device", None),
                               store=store, max_iteration=max_iterations)
        elif state is None:
            state = self.init(prior)
        if state.parameters.shape[1] != model.layout.size:
            raise ValueError(
                f"prior: expected {model.layout.size} columns (the model's N_par), got shape "
                f"{tuple(state.parameters.shape)}"
            )
        writer, ckpt_path, ckpt_always = self._open_store(
            model, state, store=store, history=history, checkpoint=checkpoint, resume=resume,
            attrs=store_attrs, truth=truth)
        if ckpt_path is not None and resume is None:
            from .storage import write_checkpoint

            # the starting state, so that even a run failing in its first iteration resumes
            write_checkpoint(ckpt_path, self, state)
        sink = None
        if writer is not None or ckpt_path is not None:
            sink = _StoreSink(self, writer, ckpt_path, always=ckpt_always,
                              background=background_io)
        initial = state.parameters  # the caller's tensor: never used as an output buffer
        log: dict[str, list] = {}
        n_forwards = 0
        spare: torch.Tensor | None = None
        last_mean = None
        stopped_by = "max_iterations"
        predictions = None
        t0 = time.perf_counter()
        try:
            while True:
                if self.done(state):
                    stopped_by = "schedule"
                    break
                if state.iteration >= max_iterations:
                    break
                phys = model.layout.to_physical(state.parameters)
                predictions, ok = executor.evaluate(model, phys)
                n_forwards += phys.shape[0]
                previous = state.parameters
                if inplace and previous is not initial:
                    spare = previous  # chunked in-place update: an E x chunk buffer only
                state, info = self.step(state, predictions, ok=ok, out=spare)
                # ping-pong between two buffers once the caller's tensor is not involved
                spare = previous if previous is not initial and not inplace else None
                for k, v in info.as_dict().items():
                    log.setdefault(k, []).append(v)
                if progress:
                    print(f"iteration {info.iteration:4d}  alpha {info.alpha:10.4g}  "
                          f"misfit {info.mean_misfit:10.4g}  spread {info.spread:9.3g}  "
                          f"failed {info.n_failed}  {time.perf_counter() - t0:7.1f}s",
                          file=sys.stderr, flush=True)
                stop = None
                if any([bool(cb(state, info)) for cb in callbacks]):
                    stop = "callback"
                elif tolerance is not None and last_mean is not None and \
                        abs(info.mean_misfit - last_mean) <= tolerance * abs(last_mean):
                    stop = "tolerance"
                last_mean = info.mean_misfit
                final = stop is not None or info.done or state.iteration >= max_iterations
                if sink is not None:
                    sink.submit(state, info, predictions, final=final, checkpoint=(
                        final or state.iteration % checkpoint_every == 0))
                if stop is not None:
                    stopped_by = stop
                    break
        finally:
            if sink is not None:
                sink.close(attrs={"stopped_by": stopped_by, "n_forwards": n_forwards})
        return SmootherResult(state=state, layout=model.layout, history=log,
                              n_forwards=n_forwards, smoother=self, predictions=predictions,
                              stopped_by=stopped_by)

    def _open_store(self, model, state, *, store, history, checkpoint, resume, attrs, truth):
        """The history writer (or None), the checkpoint path (or None) of a run, and
        whether the checkpoint is written at every ``checkpoint_every`` (``False``: only
        where the history row does not hold the state, and at the start and the end)."""
        if checkpoint is True and store is None:
            raise ValueError("checkpoint=True: needs store= (or give a checkpoint path)")
        if checkpoint is not None and not isinstance(checkpoint, (bool, str, os.PathLike)):
            raise TypeError(f"checkpoint: expected a path, a bool or None, got "
                            f"{type(checkpoint).__name__}")
        ckpt, always = None, True
        if checkpoint not in (None, False, True):
            ckpt = os.fspath(checkpoint)
        elif store is not None and checkpoint is not False:
            ckpt = default_checkpoint_path(store)
            always = checkpoint is True
        if store is None:
            if history is not None:
                raise ValueError("history=: only with store=")
            return None, ckpt, always
        from .storage import History, HistoryWriter, _read_policy

        if history is None and resume is not None and os.path.exists(store):
            history = _read_policy(store)  # a continued history keeps its own policy
        extra = dict(attrs or {})
        if truth is not None:
            t = torch.as_tensor(truth, dtype=torch.float64).reshape(-1)
            if t.numel() != model.layout.size:
                raise ValueError(f"truth: expected {model.layout.size} values (N_par), got "
                                 f"{t.numel()}")
            extra["truth"] = t.numpy()  # a numeric attribute, in physical units
        writer = HistoryWriter(
            store, layout=model.layout, observations=self.observations, config=self.config(),
            history=history if history is not None else History(),
            output_names=model.output_names, seed=self.seed,
            resume_from=state.iteration if resume is not None else None, attrs=extra)
        writer.start(state)
        return writer, ckpt, always

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self, state: SmootherState) -> dict[str, Any]:
        """Plain tensors and numbers describing ``state`` (no pickled objects)."""
        return {
            "parameters": state.parameters,
            "iteration": state.iteration,
            "schedule": schedule_state_dict(state.schedule),
            "rng_state": state.rng_state,
            "mask": state.mask,
            "config": self.config(),
            # a stateful adapt= strategy's state; StructureAdaptation has none (it derives
            # from iteration and mask), so checkpoints need no extra field for it
            **({"adapt": state.adapt} if state.adapt is not None else {}),
        }

    def load_state_dict(self, d: dict[str, Any]) -> SmootherState:
        """Rebuild a :class:`SmootherState` from :meth:`state_dict` output."""
        from .schedule import SCHEDULE_STATES

        try:
            params = d["parameters"]
            sched = dict(d["schedule"])
            rng = d["rng_state"]
            iteration = int(d["iteration"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"state dict: missing or malformed entry ({err})") from None
        kind = sched.pop("type", None)
        expected = type(self.schedule.init()).__name__
        cls = SCHEDULE_STATES.get(type(self.schedule).__name__)
        if kind != expected or cls is None:
            raise ValueError(
                f"state dict: schedule state {kind!r} does not match this smoother's "
                f"schedule ({expected})"
            )
        mask = d.get("mask")
        state = SmootherState(
            parameters=params, iteration=iteration, schedule=cls(**sched),
            rng_state=torch.as_tensor(rng, dtype=torch.uint8).cpu(), mask=mask,
            adapt=d.get("adapt", self.adapt.init() if self.adapt is not None else None))
        check_members_first(state.parameters, "state dict parameters")
        return state


class _StoreSink:
    """Writes history rows and checkpoints of a run, in order, possibly in a thread.

    The snapshot (a copy of the tensors the row and the checkpoint will write; ``None`` for
    the others) is taken on the caller's thread, so the smoother may reuse its buffers at
    once; at most one write is in flight, and its error surfaces at the next ``submit`` or
    at ``close``. With ``always=False`` a requested checkpoint is written only when the
    history row just written does not hold the whole state, or at the end of the run.
    """

    def __init__(self, smoother, writer, ckpt_path, *, always: bool = True,
                 background: bool) -> None:
        self.smoother = smoother
        self.writer = writer
        self.ckpt_path = ckpt_path
        self.always = always
        self.pool = None
        if background:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enkal-store")
        self.pending = None

    def _write(self, state, info, predictions, final, checkpoint) -> None:
        if self.writer is not None:
            self.writer.record(state, info, predictions=predictions, final=final)
        if checkpoint and self.ckpt_path is not None and (
                self.always or final or self.writer is None or not self.writer.holds_state):
            from .storage import write_checkpoint

            # after the history row; no fsync: the rename is atomic for a killed process
            # (the page cache survives it); only power loss would need fsync
            write_checkpoint(self.ckpt_path, self.smoother, state, fsync=False)

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def submit(self, state, info, predictions, *, final: bool, checkpoint: bool) -> None:
        self._wait()
        if self.pool is None:
            self._write(state, info, predictions, final, checkpoint)
            return
        # copy only what the row and the checkpoint will write: the writer then never sees
        # a tensor the smoother reuses; what it would not keep it is not given at all
        keep_x = keep_y = False
        if self.writer is not None:
            keep_x, keep_y = self.writer._keeps(state.iteration, final=final)
        # a row without the ensemble does not hold the state: the checkpoint is written
        keep_x = keep_x or (checkpoint and self.ckpt_path is not None)
        snap = dataclasses.replace(
            state, parameters=state.parameters.detach().clone() if keep_x else None)
        preds = predictions.detach().clone() if keep_y and predictions is not None else None
        self.pending = self.pool.submit(self._write, snap, info, preds, final, checkpoint)

    def close(self, attrs: dict) -> None:
        try:
            self._wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            if self.writer is not None:
                self.writer.close(attrs=attrs)


def default_checkpoint_path(store: str | os.PathLike) -> str:
    """``run.h5`` -> ``run.ckpt.h5``: where ``run(store=...)`` keeps its checkpoint."""
    root, ext = os.path.splitext(os.fspath(store))
    return f"{root}.ckpt{ext or '.h5'}"


def _mean_variance(x: torch.Tensor, chunk_size: int = 1 << 18) -> float:
    total = 0.0
    for start in range(0, x.shape[1], chunk_size):
        total += float(column_variance(x[:, start:start + chunk_size]).sum())
    return total / max(x.shape[1], 1)
