"""Train an ``nn.Module`` with ensemble Kalman updates, as a torch optimizer:
:class:`EnsembleKalmanOptimizer` (see :mod:`enkal.nn`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import torch
from torch import nn

from .._checks import check_positive_float, check_positive_int
from .._types import FailurePolicy, StepInfo, decode_state, encode_state
from ..analysis import analyse
from ..collapse import CollapseGuard
from ..ensemble import ParameterLayout
from ..failures import ResampleFailed, check_policy
from ..observations import Observations
from ..schedule import check_schedule
from ..update import SquareRoot, UpdateRule, _check_rule
from ._scoring import score_draws
from ._torch_optim import check_batch, check_lr, group_lr, loaded_group, saved_groups
from .members import Carry, Redraw, Sections, kaiming_std
from .model import NeuralModel, check_dtype
from .noise import RelativeNoise
from .steps import analyse_held, drawn_std, scale_increment
from .tasks import Classification, Regression, _check_output_map, _describe

__all__ = ["EnsembleKalmanOptimizer"]

_T = TypeVar("_T")


def _recipe(members: Any, schedule: Any, prior_std: Any) -> Any:
    """The schedule (``None``: the default for ``members``), checked with ``members``."""
    if schedule is None:
        schedule = RelativeNoise.newton() if isinstance(members, Redraw) else RelativeNoise()
    check_schedule(schedule)
    if not isinstance(members, (Redraw, Carry)):
        raise TypeError(f"members: expected Redraw(...) or Carry(...), got "
                        f"{type(members).__name__}")
    if isinstance(members, Carry) and getattr(schedule, "trust_radius", None) is not None:
        raise ValueError("schedule: a trust_radius needs members=Redraw(...) (it is in "
                         "units of the redraw's spread); pass trust_radius=None")
    if isinstance(members, Redraw) and prior_std is not None:
        raise ValueError("prior_std: only used with members=Carry(...); Redraw draws with "
                         "Redraw.std")
    return schedule


# -- the optimizer ----------------------------------------------------------------------------
class EnsembleKalmanOptimizer(torch.optim.Optimizer):
    r"""Train an ``nn.Module`` with ensemble Kalman updates, as a ``torch.optim.Optimizer``.

    Each :meth:`step` runs the ensemble on a minibatch, maps outputs and targets
    (:class:`Classification` / :class:`Regression`), takes one analysis step
    (:func:`enkal.analysis.analyse`, the update body the smoother uses: failure policy,
    schedule, transform, apply, guard, mask) and writes the new mean into ``model``: code
    that evaluates ``model`` needs no change (BatchNorm layers in training mode normalise
    each member by its own batch statistics; their running statistics follow the new mean,
    one forward per step, so ``model.eval()`` evaluates as after gradient training).
    Ensemble Kalman inversion as a training method [Kovachki2019]; the seed paper's
    learning [Trautner2020].

    The default is the researched recipe (``docs/nn.md``): ``members=Redraw()`` (a fresh
    ensemble around the mean every step, each weight's spread Kaiming-relative over its
    layer input's RMS; only the new mean is kept), ``rule=SquareRoot()``,
    ``schedule=RelativeNoise.newton()`` (noise 0.01 times the predictions' spread: the
    minibatch's Gauss-Newton step in the ensemble's subspace, 0.1 of it taken but at most
    ``trust_radius=1.25`` times the redraw's spread; no run length) and for labels
    ``Classification()`` (multinomial noise). Digits MLP 64-32-10, ``E=64``, 20 epochs:
    0.953 (AdamW 0.961); seven networks in ``docs/nn.md`` 1.6. ``Carry``'s default schedule is
    ``RelativeNoise()``; the seed paper's literal variant: ``members=Carry(CollapseGuard(1e-4,
    1e-3)), rule=PerturbedObservations(), schedule=FixedAnnealing(0.75, initial=1.0,
    floor=0.1)`` (0.91-0.93 there).

    As a torch optimizer: one parameter group, the model's trainable parameters (a second
    group is refused), so ``zero_grad``, LR schedulers, Lightning's manual optimization and
    :meth:`state_dict` (with torch's ``param_groups``) work as with any optimizer.

    * ``lr`` (``param_groups[0]["lr"]``, read at every step, so schedulers act on it)
      multiplies the step's *mean increment*: ``m+ = m + lr * s * (m_a - m)``, ``m_a`` the
      analysis mean, ``s`` the schedule's ``step_size`` (1 for schedules without one);
      with a ``trust_radius`` ``r`` (:class:`Redraw`; the default) ``s`` becomes ``min(s,
      r / rho)``, ``rho`` the increment's RMS in units of the redraw's spread
      (``enkal.nn.steps``; with the schedule's ``trust="damp"`` the analysis is first
      damped until ``s * rho <= r``), so ``lr`` scales the step the trust region allows. With
      :class:`Redraw` only the mean is kept: that is the whole effect; with :class:`Carry`
      every member is shifted by ``(lr s - 1) * (m_a - m)``, keeping the analysis
      anomalies. ``lr s = 1`` without a trust radius is the plain update, bit for bit (no
      arithmetic added); ``lr < 1`` damps it further;
      ``lr = 0`` keeps the mean (a warm-up's first step; with ``Carry`` the spread still
      contracts). It acts after the analysis: from one state, any ``lr`` draws alike.
    * ``step(inputs, targets, *, closure=None)``: the batch is required (positional, or the
      keywords ``inputs=``, ``targets=`` as ``LightningOptimizer.step(closure, **kwargs)``
      passes them). The update uses no loss, so a ``closure`` (torch's "re-evaluate the model
      and return the loss") is only reported: called once before the update (the model holds
      the current mean; under ``torch.enable_grad()``), its value is what ``step`` returns,
      as ``SGD`` and ``LBFGS`` return the loss before their step. Without a closure ``step``
      returns the :class:`~enkal.StepInfo`; either way it is :attr:`last_info`.

    Parameters
    ----------
    model : nn.Module
        The network; its trainable parameters are the unknowns (see :class:`NeuralModel`).
    ensemble_size : int
        ``N_ens`` (at least 2).
    noise : float
        Observation noise standard deviation in units of the mapped targets
        (probabilities for classification, times ``sqrt(pbar + floor)`` with the
        multinomial weighting), scaled by the schedule's ``rho`` (irrelevant for
        :class:`RelativeNoise`).
    rule : SquareRoot, PerturbedObservations or an UpdateRule
        Default :class:`~enkal.SquareRoot`.
    failure : ResampleFailed, IgnoreFailed, Raise or a FailurePolicy
        Members whose outputs are NaN/inf (or beyond the policy's ``max_abs`` /
        ``max_sigma``) are handled exactly as in :class:`~enkal.EnsembleSmoother`: left out
        of the update and redrawn (default), kept, or the step refused.
    schedule : RelativeNoise, FixedAnnealing, ESMDA, DataMisfitController or compatible
        Default (``None``): ``RelativeNoise.newton()`` with :class:`Redraw`,
        ``RelativeNoise()`` with :class:`Carry`. ``RelativeNoise(steps=n)``, told the run's
        updates, is better for short MLP runs (``docs/nn.md`` 1.6); ``FixedAnnealing(1.0,
        initial=r, floor=r)`` keeps ``rho = r``.
    members : Redraw or Carry
        What happens to the ensemble between steps. Default ``Redraw()`` (``spread=0.03``,
        ``scale="inputs"``);
        ``Carry(guard=CollapseGuard(1e-4, 1e-3))`` is classical EKI with collapse redraws.
    task : Classification, Regression or None
        How outputs and targets become predictions, observations and their noise; ``None``
        picks :class:`Classification` (multinomial weighting) for integer targets and
        :class:`Regression` for floating ones, at each step.
    prior_std : float, optional
        With :class:`Carry`: spread of the initial ensemble around the module's current
        parameters. Default: per tensor, the standard deviation of its current entries
        (its initialisation scale; ``0.1`` for a constant tensor such as a LayerNorm
        weight). With :class:`Redraw` the spread is ``Redraw.std`` and ``prior_std`` must
        be ``None``.
    sections : Sections, optional
        Update sections of parameters with their own transforms (default: one section).
    seed : int
        Seed of the optimizer's ``torch.Generator`` (prior, perturbations, redraws).
    device, dtype :
        Where and in what precision the ensemble lives (default the model's).
        ``torch.bfloat16`` (or ``float16``) with :class:`Redraw`: the members are stored in
        it; the mean, the forward, outputs and update in float32 (the transform in float64;
        docs/nn.md 3).
    forward_dtype : torch.dtype, optional
        Precision of the members' forward. Default: float32 when ``dtype`` asks for a
        bfloat16 or float16 :class:`Redraw` ensemble, else the ensemble's (a bfloat16 module
        runs in bfloat16). ``torch.bfloat16`` runs the networks in it (faster on GPUs; its
        rounding costs accuracy, docs/nn.md 3).
    backend, members_per_call, devices :
        As for :class:`NeuralModel`.
    chunk_size : int, optional
        Parameter columns per GEMM block of the update.
    lr : float
        Multiplier of the mean increment (finite, ``>= 0``; default 1.0), with the
        schedule's ``step_size``. Stored as ``param_groups[0]["lr"]`` (schedulers change it).

    Attributes
    ----------
    ensemble : Tensor, shape (N_ens, N_par)
        The members (read it; do not modify it in place). With :class:`Redraw` the members
        drawn at the last step, whose predictions are ``last_predictions`` (before the
        first step: a draw around the initial mean); their mean is not the model's
        parameters (those are :attr:`mean`).
    mean : Tensor, shape (N_par,)
        The current mean, written into ``model`` (with :class:`Carry`, the members' mean).
    last_predictions, last_observations, last_errors :
        Of the last step: predictions ``(N_ens, N_obs)`` of ``ensemble`` before the update,
        observations ``(N_obs,)``, and errors ``predictions - observations``; ``None``
        before the first step. With one-at-a-time sections they are those of the
        perturbed section's forward.
    last_info : StepInfo or None
        The last step's diagnostics (what :meth:`step` returns without a closure).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        ensemble_size: int = 64,
        noise: float = 1.0,
        rule: UpdateRule = SquareRoot(),
        failure: FailurePolicy = ResampleFailed(),
        schedule: Any = None,
        members: Redraw | Carry = Redraw(),
        task: Classification | Regression | None = None,
        prior_std: float | None = None,
        sections: Sections | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        forward_dtype: torch.dtype | None = None,
        backend: str = "auto",
        members_per_call: int | None = None,
        devices: Sequence[torch.device | str] | None = None,
        chunk_size: int | None = None,
        lr: float = 1.0,
    ) -> None:
        lr = check_lr(lr, "lr")
        check_positive_int(ensemble_size, "ensemble_size", minimum=2)
        check_positive_float(noise, "noise")
        _check_rule(rule)
        check_policy(failure)
        schedule = _recipe(members, schedule, prior_std)
        if task is not None:
            _check_output_map(task, "task")
        check_positive_float(prior_std, "prior_std", allow_none=True)
        if sections is not None and not isinstance(sections, Sections):
            raise TypeError(f"sections: expected Sections(...) or None, got "
                            f"{type(sections).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TypeError(f"seed: expected a non-negative int, got {seed!r}")
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        check_dtype(forward_dtype, "forward_dtype")
        self.model = model

        def network(precision: torch.dtype | None) -> NeuralModel:
            return NeuralModel(model, backend=backend, members_per_call=members_per_call,
                               device=device, dtype=precision, devices=devices)

        self.net = network(dtype)  # checks the module and dtype
        # a bfloat16/float16 Redraw ensemble keeps its mean (and outputs) in float32; asked
        # for with dtype=, it runs the members in float32 unless told otherwise (docs/nn.md 3)
        self._store = self.net.dtype
        low = self._store in (torch.bfloat16, torch.float16)
        self._master = torch.float32 if low and isinstance(members, Redraw) else self._store
        forward = forward_dtype or (self._store if dtype is None else self._master)
        if forward != self._store:
            self.net = network(forward)
        # torch's bookkeeping (param_groups, state, hooks): one group, the layout's tensors
        super().__init__(self.net._module_params(), {"lr": lr})
        self.ensemble_size = int(ensemble_size)
        self.noise = float(noise)
        self.rule = rule
        self.failure = failure
        self.schedule = schedule
        self.members = members
        self.task = task
        self.prior_std = prior_std
        self.sections = sections
        self.seed = seed
        self.chunk_size = chunk_size
        layout = self.net.layout
        self._sections = sections.resolve(layout) if sections is not None \
            else [[slice(0, layout.size)]]
        self._generator = torch.Generator(device=self.net.device).manual_seed(seed)
        self._schedule_states = [schedule.init() for _ in self._sections]
        self._iteration = 0
        self.mask: torch.Tensor | None = None
        self._redraw_std: torch.Tensor | None = None
        if isinstance(members, Redraw):  # Kaiming stds depend on the shapes only: once
            self._kaiming = kaiming_std(model, [b.name for b in self.net.layout.blocks])
            self._redraw_std = members.std(self.net, kaiming=self._kaiming)
            self._mean = self.net.flatten(self._master)
            self.ensemble = self._draw()
        else:
            self.ensemble = members.prior(self.net, self.ensemble_size, prior_std,
                                          self._generator, self._store)
            self._mean = self.ensemble.mean(dim=0)
        self.last_predictions: torch.Tensor | None = None
        self.last_observations: torch.Tensor | None = None
        self.last_info: StepInfo | None = None
        self._write_mean()

    # -- construction ------------------------------------------------------------------------
    def _draw(self, std: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """``m + std * Z`` (``Z`` from ``generator``, default the optimizer's); ``std``
        default :func:`drawn_std` over all columns (zero outside a drawn section)."""
        std = drawn_std(self._redraw_std, self.mask) if std is None else std
        z = torch.randn(self.ensemble_size, self.net.n_parameters,
                        generator=self._generator if generator is None else generator,
                        dtype=self._master, device=self.net.device)
        x = z.mul_(std).add_(self._mean)  # m + std * Z without (N_ens, N_par) temporaries
        return x if x.dtype == self._store else x.to(self._store)  # bfloat16 members

    @property
    def guard(self) -> CollapseGuard | None:
        """``members.guard`` with :class:`Carry`, else ``None``."""
        return self.members.guard if isinstance(self.members, Carry) else None

    @property
    def mean(self) -> torch.Tensor:
        """The current mean ``(N_par,)`` (a copy), the parameters written into ``model``."""
        return self._mean.clone()

    @property
    def layout(self) -> ParameterLayout:
        """The parameters' layout (one block per trainable tensor)."""
        return self.net.layout

    @property
    def iteration(self) -> int:
        """Updates done so far."""
        return self._iteration

    @property
    def last_errors(self) -> torch.Tensor | None:
        """``last_predictions - last_observations``, ``(N_ens, N_obs)``, or ``None``."""
        if self.last_predictions is None or self.last_observations is None:
            return None
        return self.last_predictions - self.last_observations.to(self.last_predictions.dtype)

    def _write_mean(self) -> None:
        if self._redraw_std is None:
            self._mean = self.ensemble.mean(dim=0)
        self.net.load_into(self._mean)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Prune: parameters where ``mask`` is ``False`` are set to zero in every member and
        stay zero (never updated, never redrawn). ``None`` makes every parameter live again:
        pruned ones restart from zero (with :class:`Redraw` they are drawn again from the
        next step; with :class:`Carry` they have no spread, so only a collapse-guard redraw
        revives them)."""
        p = self.net.n_parameters
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask: expected a bool tensor of shape ({p},), got "
                                f"{_describe(mask)}")
            if mask.shape != (p,):
                raise ValueError(f"mask: expected shape ({p},) = (N_par,), got "
                                 f"{tuple(mask.shape)}")
            mask = mask.to(self.ensemble.device)
            self.ensemble[:, ~mask] = 0
            self._mean[~mask] = 0
        self.mask = mask
        self._write_mean()

    # -- one update --------------------------------------------------------------------------
    def _task_for(self, targets: Any) -> Classification | Regression:
        if self.task is not None:
            return self.task
        if isinstance(targets, torch.Tensor) and not targets.is_floating_point() and \
                targets.dtype != torch.bool:
            return Classification()
        return Regression()

    @overload  # type: ignore[override]
    def step(self, inputs: torch.Tensor, targets: torch.Tensor, *,
             closure: None = None) -> StepInfo: ...

    @overload
    def step(self, inputs: torch.Tensor, targets: torch.Tensor, *,
             closure: Callable[[], _T]) -> _T: ...

    def step(self, inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None, *,
             closure: Callable[[], Any] | None = None) -> Any:
        """One ensemble Kalman update on a minibatch; the mean is written into the model.

        Parameters
        ----------
        inputs : Tensor, shape (B, ...)
        targets : Tensor
            Integer labels ``(B,)`` or class probabilities ``(B, C)`` (classification), or
            floats ``(B, n_out)`` (regression).
        closure : callable, optional
            ``closure() -> loss``, called once before the update (the model holds the
            current mean) under ``torch.enable_grad()``; its value is returned. The update
            does not use it (see the class docstring).

        Returns
        -------
        StepInfo, or the closure's return value when a closure is given
            ``misfit`` (mean over members of ``||(Yh_j - y) / noise||^2 / N_obs``),
            ``mean_misfit`` (the same for the mean prediction), ``alpha``, ``spread``
            (before the update), ``n_resampled`` (collapse-guard redraws); the schedule's
            entries (``gamma`` and ``rho`` for ``RelativeNoise``, ``rho`` for
            ``FixedAnnealing``) under ``schedule``. Also kept as :attr:`last_info`.
        """
        inputs, targets = check_batch(inputs, targets, closure)
        lr = group_lr(self.param_groups)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        info = self._update(inputs, targets, lr)
        self.last_info = info
        return info if closure is None else loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Torch's, for the group built at construction; a second group is refused."""
        if getattr(self, "param_groups", None):
            raise ValueError("add_param_group: EnsembleKalmanOptimizer has one parameter "
                             "group, the model's trainable parameters; build a new optimizer "
                             "for other parameters")
        super().add_param_group(param_group)

    def _update(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> StepInfo:
        self.net._check_inputs(inputs)
        task = self._task_for(targets)
        n_sec = len(self._sections)
        one = self.sections is not None and self.sections.one_at_a_time
        active = [self._iteration % n_sec] if one else list(range(n_sec))
        redraw = self._redraw_std is not None
        rng, std = self._generator.get_state(), self._redraw_std
        size = getattr(self.schedule, "step_size", 1.0)
        radius = getattr(self.schedule, "trust_radius", None) if redraw else None
        # lr * step_size = 1 without a trust radius: not one extra operation
        start = None if lr * size == 1 and radius is None else self._mean.clone()
        try:  # a refused step (bad targets, too many failed members) changes nothing
            if isinstance(self.members, Redraw) and self.members.scale == "inputs":
                self._redraw_std = self.members.std(self.net, inputs, self._mean,
                                                    kaiming=self._kaiming)
            # a fresh ensemble around the mean (only the active section if one)
            drawn = drawn_std(self._redraw_std, self.mask,
                              self._sections[active[0]] if one else None) if redraw else None
            x = self._draw(drawn) if redraw else self.ensemble
            fwd = x
            if one and not redraw:  # members differ only in the active section
                fwd = x.mean(dim=0, keepdim=True).expand_as(x).clone()
                for s in self._sections[active[0]]:
                    fwd[:, s] = x[:, s]
            outputs = self.net.predict(fwd, inputs).to(self._master)  # (E, B, n_out)
            y = task.targets(targets, outputs.shape[1], outputs.shape[2]).to(outputs.device)
            preds = task.predictions(outputs)                     # (E, N_obs)
            obs = Observations(y, noise_std=task.noise_std(preds, self.noise))
            a = analyse_held(lambda schedule: analyse(
                x, preds, obs, rule=self.rule, schedule=schedule,
                schedule_states=self._schedule_states, failure=self.failure,
                generator=self._generator, guard=None if redraw else self.guard,
                mask=self.mask, sections=self._sections, active=active,
                out=None if redraw else x, mean=self._mean if redraw else None,
                chunk_size=self.chunk_size), self.schedule, mean=self._mean, start=start,
                std=drawn, generator=self._generator, step_size=size, radius=radius)
        except Exception:
            self._generator.set_state(rng)
            self._redraw_std = std
            if start is not None:  # a damped trial may have written its step
                self._mean.copy_(start)
            raise
        if start is not None:  # the trust radius in the spread the members were drawn with
            scale_increment(x, self._mean, start, lr, step_size=size, redraw=redraw,
                            radius=radius, std=drawn)
        self.ensemble = x
        self._schedule_states = list(a.schedule)
        self._iteration += 1
        self.last_predictions = preds
        self.last_observations = y
        self._write_mean()
        self.net.track_statistics(self._mean, inputs)  # BatchNorm in training mode only
        return StepInfo(
            iteration=self._iteration, alpha=a.alpha, misfit=a.misfit,
            mean_misfit=a.mean_misfit, spread=a.spread, n_failed=a.n_failed,
            n_resampled=a.n_resampled, done=False, schedule=a.schedule_info, n_live=a.n_live)

    # -- the mean, prediction and gradient hybrids ------------------------------------------
    def predict(self, inputs: torch.Tensor, *, task: Classification | Regression | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation over members of the mapped outputs, each ``(B, n_out)``.

        For classification the mean of the members' probabilities (the ensemble's
        predictive distribution); ``task`` defaults to the optimizer's (or
        :class:`Classification` when it is ``None``: pass ``Regression()`` for raw outputs).
        """
        task = task or self.task or Classification()
        _check_output_map(task, "task")
        out = self.net.predict(self.members_at_mean(), inputs).to(self._master)
        mapped = task.predictions(out).reshape(out.shape)
        return mapped.mean(dim=0), mapped.std(dim=0)

    def information(self, inputs: torch.Tensor, targets: torch.Tensor, *, draws: int = 16,
                    score: Callable[..., torch.Tensor] | None = None,
                    seed: int | None = None) -> torch.Tensor:
        r"""Mutual information (eq. 12) of each parameter with the errors on a batch.

        With :class:`Redraw`, ``draws`` fresh ensembles are drawn around the mean (the
        masked parameters held at zero) and run on ``inputs``; their ``N = draws * N_ens``
        members and errors are scored together. More members are what the ranking needs:
        each correlation carries sampling noise of about ``1/sqrt(N)``, so the sum over
        ``N_obs`` error dimensions carries noise of about ``sqrt(2 N_obs) / N`` per
        parameter, while a parameter's share of the signal is about ``N_obs / N_par``
        (for the digits MLP, ``N_par = 6570`` and ``N_obs = 2560``: noise 1.1 at ``N = 64``,
        0.07 at ``N = 1024``, against a signal of 0.4). With :class:`Carry` the carried
        ensemble is the sample (``draws`` must be 1).

        Parameters
        ----------
        inputs, targets :
            A batch, as for :meth:`step`.
        draws : int
            Fresh ensembles (``Redraw`` only).
        score : callable, optional
            ``score(parameters, errors) -> (N_par,)``; default
            :func:`enkal.mutual_information` (or :func:`enkal.information.saliency`).
        seed : int, optional
            Seed of the draws (default: from the optimizer's seed and iteration). The
            optimizer's own generator is not touched, so training continues unchanged.

        Returns
        -------
        Tensor, shape (N_par,), float64
            Masked parameters score 0 (they do not vary).

        Memory: ``draws * N_ens * N_par`` parameters and ``draws * N_ens * N_obs`` errors.
        """
        carried = self._redraw_std is None
        return score_draws(
            self.net, lambda gen: self.ensemble if carried else self._draw(generator=gen),
            self._task_for(targets), inputs, targets, draws=draws, score=score,
            seed=self.seed * 1_000_003 + self._iteration if seed is None else seed,
            carried=carried)

    def members_at_mean(self) -> torch.Tensor:
        """The ensemble's anomalies around the current mean, ``(N_ens, N_par)``: with
        :class:`Carry` the ensemble itself; with :class:`Redraw` the last draw shifted so
        its mean is :attr:`mean` (what :meth:`predict` evaluates)."""
        if self._redraw_std is None:
            return self.ensemble
        return self.ensemble - self.ensemble.mean(dim=0) + self._mean

    def follow_model(self) -> None:
        """Shift every member by ``theta_model - mean``: the step a gradient optimizer just
        took on the model (which held the mean) moves the whole ensemble, spread unchanged.
        Masked parameters stay zero."""
        delta = self.net.flatten(self._mean.dtype).to(self.ensemble.device) - self._mean
        if self.mask is not None:
            delta = delta * self.mask
        self.ensemble += delta
        self._mean += delta
        self._write_mean()

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and strings only (``torch.load(weights_only=True)`` reads it);
        ``param_groups`` as torch writes it (the group's entries, e.g. ``lr`` and a
        scheduler's ``initial_lr``, with ``params`` as indices)."""
        states = [encode_state(st, "schedule") for st in self._schedule_states]
        return {
            "param_groups": saved_groups(self.param_groups),
            "ensemble": self.ensemble.detach().clone(),
            "mean": self._mean.detach().clone(),
            "rng_state": self._generator.get_state(),
            "iteration": self._iteration,
            "schedule": states,
            "mask": None if self.mask is None else self.mask.clone(),
            "layout": [b.name for b in self.layout.blocks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output: the next steps repeat, bit for bit, those
        of the uninterrupted run (same device, data and configuration). ``param_groups``
        (absent from dicts saved before it was added: ``lr`` is then left as it is) replaces
        the group's entries (``lr``, ``initial_lr``, ...), as torch's optimizers do."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict from state_dict(), got "
                            f"{type(state).__name__}")
        try:
            ens, rng, it, sched = (state["ensemble"], state["rng_state"], state["iteration"],
                                   state["schedule"])
        except KeyError as err:
            raise ValueError(f"state: missing entry {err}") from None
        names = [b.name for b in self.layout.blocks]
        if state.get("layout", names) != names:
            raise ValueError("state: the parameter layout differs from this model's")
        if not isinstance(ens, torch.Tensor) or tuple(ens.shape) != tuple(self.ensemble.shape):
            raise ValueError(f"state: expected an ensemble of shape "
                             f"{tuple(self.ensemble.shape)}, got {_describe(ens)}")
        if len(sched) != len(self._schedule_states):
            raise ValueError(f"state: expected {len(self._schedule_states)} schedule states "
                             f"(sections), got {len(sched)}")
        like = type(self.schedule.init())
        try:
            states = [decode_state(d, like, what="schedule") for d in sched]
        except ValueError as err:
            raise ValueError(f"state: {err}") from None
        mask = state.get("mask")
        mean = self._saved_mean(state.get("mean"))
        group = loaded_group(state.get("param_groups"), self.param_groups[0])
        self.ensemble = ens.to(self.ensemble.device, self.ensemble.dtype).clone()
        if mean is not None:
            self._mean = mean.to(self.ensemble.device, self._mean.dtype).clone()
        self._generator.set_state(torch.as_tensor(rng, dtype=torch.uint8).cpu())
        self._iteration = int(it)
        self._schedule_states = states
        self.mask = None if mask is None else mask.to(self.ensemble.device, torch.bool)
        if group is not None:
            self.param_groups[0] = group
        self._write_mean()

    def _saved_mean(self, mean: Any) -> torch.Tensor | None:
        """A state's ``mean`` entry, checked (``None`` only for a Carry optimizer)."""
        if mean is not None and (not isinstance(mean, torch.Tensor)
                                 or tuple(mean.shape) != (self.net.n_parameters,)):
            raise ValueError(f"state: expected a mean of shape ({self.net.n_parameters},), "
                             f"got {_describe(mean)}")
        if mean is None and self._redraw_std is not None:
            raise ValueError("state: no 'mean' entry (a state of a Carry optimizer?); "
                             "members=Redraw needs the mean")
        return mean

    def __getstate__(self) -> dict[str, Any]:  # torch's keeps too little for copy and pickle
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return (f"EnsembleKalmanOptimizer(N_ens={self.ensemble_size}, "
                f"N_par={self.net.n_parameters}, noise={self.noise}, rule={self.rule}, "
                f"schedule={self.schedule}, members={self.members}, seed={self.seed}, "
                f"lr={self.param_groups[0]['lr']})")
