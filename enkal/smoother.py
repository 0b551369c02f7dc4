"""The iterated ensemble smoother: ``init``, ``step`` (ask/tell) and ``run``.

Ensemble Kalman inversion [Iglesias2013]: the ensemble smoother iterated with a noise
schedule ([Emerick2013], [Iglesias2021], [Trautner2020]); ``docs/references.md``.

One iteration, every decision taken from one forward evaluation (the update body is
:func:`enkal.analysis.analyse`, shared with the network optimizer)::

    X_k --forward (executor)--> Yh_k --failure policy--> ok --schedule(Yh_k)--> alpha_k
        --adapt(X_k, Yh_k), optional--> mask_{k+1} (structure adaptation, enkal.adapt)
        --rule.transform(Yh_k[ok], y, alpha_k)--> W (E x E)
        --apply W to X_k in chunks--> X_{k+1} --collapse guard, mask--> X_{k+1}
        --accelerator, optional--> state_{k+1} (momentum on the mean, enkal.acceleration)
        --callbacks, then sinks--> progress, HDF5 (enkal.storage.Recorder), logs

``step(state, predictions)`` takes the predictions as an argument, so any external simulator
can be driven ask/tell: read ``layout.to_physical(state.parameters)``, run the members
anywhere, hand the predictions back. ``run`` does the loop with a :class:`ForwardModel`;
it knows nothing of files: recording is a sink it is given (:class:`enkal.storage.Recorder`),
and :func:`enkal.run` is the one call that records to HDF5 and resumes from a file.

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
import difflib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ._checks import (
    check_bool,
    check_bool_vector,
    check_buffer,
    check_ensemble,
    check_finite,
    check_generator_state,
    check_iteration,
    check_members_first,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from ._types import (
    Accelerator,
    Guard,
    Sink,
    SmootherResult,
    SmootherState,
    StepInfo,
    check_component,
    check_sinks,
    decode_state,
    encode_state,
)
from .adapt import check_adapt
from .analysis import analyse
from .errors import ScheduleExhaustedError
from .executors import InProcess, check_executor
from .failures import FailurePolicy, ResampleFailed, check_policy
from .forward import ForwardModel
from .loop import Loop, callables
from .observations import Observations
from .priors import check_prior_scale
from .progress import Progress
from .schedule import DataMisfitController, check_schedule
from .series import ObservationSeries
from .update import SquareRoot, UpdateRule, _check_rule

__all__ = ["EnsembleSmoother", "SmootherState", "StepInfo", "SmootherResult"]

_log = logging.getLogger(__name__)

#: arguments of the one-call runner, :func:`enkal.run`, that ``EnsembleSmoother.run`` refuses
_RUNNER_ONLY = ("store", "history", "checkpoint", "checkpoint_every", "background_io",
                "resume", "store_attrs", "truth")
#: ``EnsembleSmoother.run``'s own keyword arguments (for "did you mean" hints)
_RUN_KEYWORDS = ("state", "max_iterations", "tolerance", "executor", "callbacks", "sinks",
                 "progress", "inplace")


def _check_whole_step(schedule: Any) -> None:
    """The smoother takes the whole update: a schedule's ``step_size`` and ``trust_radius``
    (:class:`~enkal.RelativeNoise`, read by the network optimizer) would be ignored."""
    size, radius = getattr(schedule, "step_size", 1.0), getattr(schedule, "trust_radius", None)
    if size != 1.0 or radius is not None:
        raise ValueError(
            f"schedule: step_size={size} and trust_radius={radius} shape "
            "EnsembleKalmanOptimizer's step of the mean; EnsembleSmoother takes the whole "
            "update and would ignore them. Use a schedule without them (RelativeNoise("
            "gamma=...) with step_size=1 and trust_radius=None), or tune the noise instead")


class EnsembleSmoother:
    """Iterated ensemble smoother (ensemble Kalman inversion).

    Parameters
    ----------
    observations : Observations or ObservationSeries
        Data ``y`` and noise ``R``; a series assimilates a minibatch of its samples at each
        update (``docs/updates.md``, section 14).
    rule : SquareRoot, PerturbedObservations or an UpdateRule
        The update (default :class:`SquareRoot`).
    schedule : FixedAnnealing, ESMDA, DataMisfitController or a Schedule
        Noise inflation per iteration (default :class:`DataMisfitController`).
    guard : CollapseGuard or a Guard, optional
        Redraw parameters whose variance collapses (off by default).
    failure : ResampleFailed, IgnoreFailed, Raise or a FailurePolicy
        What to do with failed members (default :class:`ResampleFailed`).
    seed : int
        Seed of the smoother's ``torch.Generator``.
    chunk_size : int, optional
        Parameter columns per GEMM block of the update.
    adapt : StructureAdaptation or an Adaptation, optional
        Prune the least-informative parameters as the run goes (``docs/adaptation.md``):
        decided from each iteration's fresh predictions, after the schedule and before the
        update; the newly pruned columns are zeroed in all members and masked.
    accelerator : NesterovAccelerator or an Accelerator, optional
        Momentum after each update (``docs/updates.md``, section 13): the next forward sees
        the accelerated ensemble; pruned columns are not moved.

    Any object with the methods of the protocols in :mod:`enkal._types` plugs in as a
    component, and its state (a frozen dataclass) is checkpointed like a built-in one.

    Every argument is checked here, naming it: ``TypeError`` for a wrong type (an object
    without the component's methods, a class where an instance is expected, a non-int or
    negative ``seed``), ``ValueError`` for a wrong value (``chunk_size < 1``, a seed of
    ``2**64`` or more).
    """

    def __init__(
        self,
        observations: Observations,
        *,
        rule: UpdateRule = SquareRoot(),
        schedule: Any = DataMisfitController(),
        guard: Guard | None = None,
        failure: FailurePolicy = ResampleFailed(),
        seed: int = 0,
        chunk_size: int | None = None,
        adapt: Any = None,
        accelerator: Any = None,
    ) -> None:
        self.series = observations if isinstance(observations, ObservationSeries) else None
        if self.series is not None:
            observations = self.series.all
        if not isinstance(observations, Observations):
            raise TypeError(
                "observations: expected enkal.Observations or enkal.ObservationSeries, got "
                f"{type(observations).__name__}"
            )
        _check_rule(rule)
        check_schedule(schedule)
        _check_whole_step(schedule)
        if guard is not None:
            check_component(guard, Guard, "guard", "CollapseGuard(...) or None")
        check_policy(failure)
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        check_adapt(adapt)
        if accelerator is not None:
            check_component(accelerator, Accelerator, "accelerator",
                            "NesterovAccelerator() or None")
        self.observations = observations
        self.rule = rule
        self.schedule = schedule
        self.guard = guard
        self.failure = failure
        self.seed = check_seed(seed)
        self.chunk_size = chunk_size
        self.adapt = adapt
        self.accelerator = accelerator

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
                "n_obs": self.observations.size, "adapt": describe(self.adapt),
                **({"accelerator": describe(self.accelerator)}
                   if self.accelerator is not None else {}),
                **({"series": self.series.describe()} if self.series is not None else {})}

    def __repr__(self) -> str:
        return (f"EnsembleSmoother(rule={self.rule}, schedule={self.schedule}, "
                f"guard={self.guard}, failure={self.failure}, seed={self.seed})")

    # -- ask/tell ------------------------------------------------------------------------
    def init(self, prior: torch.Tensor, *, mask: torch.Tensor | None = None) -> SmootherState:
        """Start from a prior ensemble ``(N_ens, N_par)`` (unconstrained space).

        ``prior`` must be a floating tensor (``TypeError``), 2-D with at least 2 members and
        finite (``ValueError``); it is never written to by ``step`` or ``run``, and is
        detached (the state never carries an autograd graph). ``mask``, the live
        parameters, must be a bool tensor (``TypeError``) of shape ``(N_par,)``
        (``ValueError``).
        """
        check_ensemble(prior, "prior")
        if prior.shape[0] < 2:
            raise ValueError(f"prior: expected at least 2 members (N_ens >= 2), got {prior.shape[0]}")
        check_finite(prior, "prior")
        if mask is not None:
            check_bool_vector(mask, "mask", prior.shape[1], "N_par")
            mask = mask.to(prior.device)
        if prior.requires_grad:
            prior = prior.detach()
        gen = torch.Generator(device=prior.device).manual_seed(self.seed)
        return SmootherState(parameters=prior, iteration=0, schedule=self.schedule.init(),
                             rng_state=gen.get_state(), mask=mask,
                             adapt=self.adapt.init() if self.adapt is not None else None,
                             accelerator=(self.accelerator.init(prior)
                                          if self.accelerator is not None else None))

    def done(self, state: SmootherState) -> bool:
        """True when the schedule plans no further update (``state``: a
        :class:`SmootherState`, else ``TypeError``)."""
        _check_state(state)
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
            must not be used again): the shape, dtype and device of ``state.parameters``.

        Checked, naming the argument: ``TypeError`` for a wrong type or dtype (``state``
        not a :class:`SmootherState`, integer predictions, a non-bool ``ok``, ``out`` not a
        tensor), ``ValueError`` for a wrong shape or device. The predictions are detached:
        the update is never differentiated, so predictions with an autograd graph (a
        module's output) leave none in the state.
        """
        _check_state(state)
        x = state.parameters
        if not isinstance(predictions, torch.Tensor):
            raise TypeError(
                f"predictions: expected a torch.Tensor, got {type(predictions).__name__}"
            )
        if not predictions.is_floating_point():
            raise TypeError(f"predictions: expected a floating dtype, got {predictions.dtype}")
        observations, predictions = self._batch(state, predictions, x.shape[0])
        if predictions.device != x.device:
            raise ValueError(
                f"predictions: expected device {x.device} (the ensemble's), got "
                f"{predictions.device}"
            )
        if ok is not None:
            check_bool_vector(ok, "ok", x.shape[0], "N_ens")
        if out is not None:
            check_buffer(out, x)
        if self.schedule.done(state.schedule):
            raise ScheduleExhaustedError(
                f"{type(self.schedule).__name__}: no update left after iteration "
                f"{state.iteration}; check smoother.done(state) before stepping"
            )
        gen = torch.Generator(device=x.device)
        gen.set_state(state.rng_state)
        a = analyse(x, predictions, observations, rule=self.rule, schedule=self.schedule,
                    schedule_states=[state.schedule], failure=self.failure, generator=gen,
                    ok=ok, guard=self.guard, mask=state.mask, adapt=self.adapt,
                    adapt_state=state.adapt, iteration=state.iteration, out=out,
                    chunk_size=self.chunk_size)
        parameters, accelerator = self._accelerate(state, a.parameters, a.mask, out)
        new_state = SmootherState(parameters=parameters, iteration=state.iteration + 1,
                                  schedule=a.schedule[0], rng_state=gen.get_state(),
                                  mask=a.mask, adapt=a.adapt, accelerator=accelerator)
        info = StepInfo(
            iteration=new_state.iteration, alpha=a.alpha, misfit=a.misfit,
            mean_misfit=a.mean_misfit, spread=a.spread, n_failed=a.n_failed,
            n_resampled=a.n_resampled, done=bool(self.schedule.done(new_state.schedule)),
            schedule=a.schedule_info, n_live=a.n_live, n_pruned=a.n_pruned,
        )
        return new_state, info

    def batch(self, state: SmootherState) -> tuple[int, ...] | None:
        """The samples of an :class:`~enkal.ObservationSeries` the next update assimilates
        (``None`` without a series)."""
        _check_state(state)
        return None if self.series is None else self.series.batch(state.iteration)

    def _batch(self, state: SmootherState, predictions: torch.Tensor, n_members: int
               ) -> tuple[Observations, torch.Tensor]:
        """The observations of this update and the predictions of them: all of them, or a
        series' minibatch (from predictions of every sample, or of the batch only)."""
        if self.series is None:
            check_members_first(predictions, "predictions", n_members=n_members,
                                n_columns=self.observations.size, columns="N_obs")
            return self.observations, predictions
        batch = self.series.batch(state.iteration)
        obs = self.series.observations(batch)
        if predictions.ndim == 2 and predictions.shape[1] == obs.size != \
                self.observations.size:
            check_members_first(predictions, "predictions", n_members=n_members,
                                n_columns=obs.size, columns="N_obs of the batch")
            return obs, predictions
        check_members_first(predictions, "predictions", n_members=n_members,
                            n_columns=self.observations.size,
                            columns=f"N_obs (every sample; or {obs.size}, the batch's)")
        return obs, predictions[:, self.series.columns(batch).to(predictions.device)]

    def _accelerate(self, state: SmootherState, x: torch.Tensor, mask: torch.Tensor | None,
                    out: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """The accelerator's ensemble (pruned columns as the update left them, written into
        ``out`` when given) and its new state."""
        if self.accelerator is None:
            return x, None
        moved, acc = self.accelerator.step(state.accelerator, parameters=x)
        if mask is not None and not bool(mask.all()):
            moved = torch.where(mask, moved, x)
        if out is not None:
            out.copy_(moved)
            moved = out
        return moved, acc

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
        sinks: Iterable[Sink] = (),
        progress: bool = False,
        inplace: bool = False,
        predictive: bool = False,
        **runner_only: Any,
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
            The run stops once ``state.iteration`` reaches this (updates counted from the
            start of the run, so a resumed run stops where the uninterrupted one would).
        tolerance : float, optional
            Stop when the ensemble-mean misfit changes by less than this fraction.
        executor : InProcess, MultiDevice, Dask or an Executor, optional
            Where the forwards run (default ``InProcess()``: this process, all members in
            one call; ``InProcess(members_per_call=k)`` bounds the model's memory). An
            executor with a ``connect()`` method (``Dask``: its cluster or scheduler) is
            connected before the sinks start, so its start is not timed as an update.
        callbacks : iterable of callables
            ``cb(state, info)`` after each update; a callback returning ``True`` stops.
            The smoother reuses parameter buffers: a callback that keeps
            ``state.parameters`` must ``.clone()`` it.
        sinks : iterable of Sink
            Receive the run after the callbacks of each update (``start``, ``record``,
            ``close``; see :class:`enkal._types.Sink`): :class:`enkal.storage.Recorder`
            streams it to an HDF5 history file. ``close`` is called however the run ends.
        progress : bool
            Show the run's progress on stderr (:class:`enkal.progress.Progress`, the
            ``enkal run`` display): a tqdm bar with the time left on a terminal, one line
            per update otherwise.
        inplace : bool
            Update the ensemble in place (after the first update, which never writes to the
            caller's prior), through an ``(N_ens, chunk_size)`` buffer: the memory-bounded
            path for huge ``N_par``. By default two ensemble buffers alternate (faster).
        predictive : bool
            Evaluate the final ensemble once more after the run: ``result.predictive``,
            the posterior predictive (its ``N_ens`` forwards are not in ``n_forwards``, so
            resumed runs add up), also to sinks with a ``predictive(state, predictions)``.

        Every argument is checked before the first forward, naming it: ``TypeError`` for a
        wrong type (``tolerance="x"``, ``progress=1``, ``callbacks=None``, a class for
        ``executor``, a keyword of :func:`enkal.run`), ``ValueError`` for a wrong value
        (``max_iterations < 1``, a negative or NaN ``tolerance``, a model whose
        ``output_size`` or ``N_par`` does not fit). The model never writes to the prior or
        the state: each forward gets its own copy of its members (:func:`enkal.evaluate`).

        Recording to a file and resuming from one is :func:`enkal.run` (``store=``,
        ``resume=``, ``history=``, ``checkpoint=``...), which calls this with a
        :class:`~enkal.storage.Recorder` sink.
        """
        _refuse_runner_only(runner_only)
        self._check_model(model)
        check_positive_int(max_iterations, "max_iterations")
        check_positive_float(tolerance, "tolerance", allow_zero=True, allow_none=True)
        check_bool(progress, "progress")
        check_bool(inplace, "inplace")
        check_bool(predictive, "predictive")
        executor = InProcess() if executor is None else executor
        check_executor(executor)
        callbacks, sinks = callables(callbacks), check_sinks(sinks)
        if state is None:
            if prior is None:
                raise ValueError("run: expected exactly one of prior= or state=, got neither")
            state = self.init(prior)
        elif prior is not None:
            raise ValueError("run: expected exactly one of prior= or state=, got both")
        else:
            _check_state(state)
        if state.parameters.shape[1] != model.layout.size:
            raise ValueError(
                f"prior: expected {model.layout.size} columns (the model's N_par), got shape "
                f"{tuple(state.parameters.shape)}"
            )
        if state.iteration == 0:
            check_prior_scale(model.layout, state.parameters)
        if progress:
            sinks.append(Progress(max_iterations=max_iterations))
        return Loop(self, model, executor, callbacks, sinks, max_iterations=max_iterations,
                     tolerance=tolerance, inplace=inplace, predictive=predictive).run(state)

    def _check_model(self, model: Any) -> None:
        if not isinstance(model, ForwardModel):
            raise TypeError(f"model: expected an enkal.ForwardModel, got {type(model).__name__}")
        if model.output_size != self.observations.size:
            raise ValueError(
                f"model: expected output_size {self.observations.size} (the number of "
                f"observations), got {model.output_size}"
            )

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self, state: SmootherState) -> dict[str, Any]:
        """Plain tensors and numbers describing ``state`` (no pickled objects; ``state``: a
        :class:`SmootherState`, else ``TypeError``)."""
        _check_state(state)
        return {
            "parameters": state.parameters,
            "iteration": state.iteration,
            "schedule": encode_state(state.schedule, "schedule"),
            "rng_state": state.rng_state,
            "mask": state.mask,
            "config": self.config(),
            # a stateful adapt= strategy's state; StructureAdaptation has none (it derives
            # from iteration and mask), so checkpoints need no extra field for it
            **({"adapt": encode_state(state.adapt, "adapt")} if state.adapt is not None
               else {}),
            **({"accelerator": encode_state(state.accelerator, "accelerator")}
               if state.accelerator is not None else {}),
        }

    def load_state_dict(self, d: dict[str, Any]) -> SmootherState:
        """Rebuild a :class:`SmootherState` from :meth:`state_dict` output.

        Each component's state is rebuilt as the type its ``init()`` returns (no registry
        of names: a user's schedule or adaptation resumes like a built-in one).

        Checked, each message starting "state dict": ``d`` a mapping (``TypeError``) with
        the entries ``parameters`` (a floating ``(N_ens, N_par)`` tensor), ``iteration`` (an
        int ``>= 0``), ``rng_state`` (a generator state for the parameters' device),
        ``schedule`` (this schedule's state) and optionally ``mask`` (a bool ``(N_par,)``
        tensor); a wrong type is a ``TypeError``, a missing entry or a wrong value a
        ``ValueError``.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"state dict: expected a mapping (what state_dict returns), got "
                            f"{type(d).__name__}")
        missing = [k for k in ("parameters", "iteration", "schedule", "rng_state")
                   if k not in d]
        if missing:
            raise ValueError(f"state dict: missing entries {missing}, got keys {sorted(d)}"
                             [:300])
        params, sched = d["parameters"], d["schedule"]
        check_ensemble(params, "state dict parameters")
        params = params.detach() if params.requires_grad else params
        iteration = check_iteration(d["iteration"], "state dict iteration")
        rng = check_generator_state(d["rng_state"], "state dict rng_state", params.device)
        mask = d.get("mask")
        if mask is not None:
            check_bool_vector(mask, "state dict mask", params.shape[1], "N_par")
        try:
            schedule = decode_state(sched, type(self.schedule.init()), what="schedule")
            adapt = None
            if self.adapt is not None:
                saved = d.get("adapt")
                adapt = self.adapt.init() if saved is None else \
                    decode_state(saved, type(self.adapt.init()), what="adapt")
            accelerator = self._load_accelerator(d.get("accelerator"), params)
        except ValueError as err:
            raise ValueError(f"state dict: {err}") from None
        return SmootherState(parameters=params, iteration=iteration, schedule=schedule,
                             rng_state=rng, mask=mask, adapt=adapt, accelerator=accelerator)

    def _load_accelerator(self, saved: Any, params: torch.Tensor) -> Any:
        """The accelerator's state from a state dict (``None`` without an accelerator; a
        missing one: a run saved without momentum starts it from this ensemble)."""
        if self.accelerator is None:
            if saved is not None:
                raise ValueError("accelerator state given, but this smoother has no "
                                 "accelerator")
            return None
        fresh = self.accelerator.init(params)
        return fresh if saved is None else decode_state(saved, type(fresh), what="accelerator")


def _check_state(state: Any, name: str = "state") -> None:
    """A :class:`SmootherState` whose parameters are a floating ``(N_ens, N_par)`` tensor
    (shape and type only: nothing that reads the ensemble)."""
    if not isinstance(state, SmootherState):
        hint = (": rebuild one with smoother.load_state_dict(d)" if isinstance(state, Mapping)
                else "")
        raise TypeError(f"{name}: expected an enkal.SmootherState (from smoother.init or "
                        f"step), got {type(state).__name__}{hint}")
    check_ensemble(state.parameters, f"{name}.parameters")


def _refuse_runner_only(kwargs: dict) -> None:
    """``run(store=...)`` and friends: say where they went (:func:`enkal.run`)."""
    if not kwargs:
        return
    names = sorted(kwargs)
    known = [n for n in names if n in _RUNNER_ONLY]
    if known:
        raise TypeError(
            f"run: got {', '.join(f'{n}=' for n in known)}, which belong to enkal.run("
            f"smoother, model, prior, {known[0]}=...), the one call that records to HDF5 and "
            "resumes; EnsembleSmoother.run takes sinks=[enkal.storage.Recorder(...)] instead")
    hints = [m for n in names for m in difflib.get_close_matches(n, _RUN_KEYWORDS, n=1)]
    hint = f"; did you mean {', '.join(hints)}?" if hints else ""
    raise TypeError(f"run: got unexpected keyword argument(s) {names}{hint}")
