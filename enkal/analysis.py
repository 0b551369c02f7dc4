r"""The update body: one analysis step, used by every loop in enkal.

:class:`~enkal.EnsembleSmoother` (``step``) and the network optimizer
(:class:`~enkal.EnsembleKalmanOptimizer`) both call :func:`analyse`; nothing else in enkal
updates an ensemble. In order, every decision taken from the one forward evaluation::

    Yh --failure.classify--> ok                         (which members count)
       --schedule.step(X, Yh[ok])--> alpha, per section  (noise inflation)
       --adapt.step(X[ok], Yh[ok]), optional--> mask    (structure adaptation)
       --rule.transform(Yh[ok], alpha)--> W_ok --failure.embed--> W (E x E), per section
       --apply W to the section's columns in chunks--> X+ (or only the new mean)
       --guard.apply, optional--> collapsed columns redrawn
       --X+[:, ~mask] = 0--> pruned parameters stay zero
       --diagnostics--> misfit, mean misfit, spread, counts

Random draws come from one ``torch.Generator`` in exactly this order (the rule's
perturbations, the failed members' redraws, the guard's redraws, section after section), so
a run resumed from a saved generator state repeats itself bit for bit.

Sections (the network optimizer's :class:`~enkal.nn.Sections`) are groups of parameter
columns with their own schedule state and transform; a smoother has one section, all
columns. With ``mean=`` only the ensemble mean is kept, ``m+ = (1^T W / E) X`` (the network
optimizer's default :class:`~enkal.nn.Redraw`): the ensemble is a fresh draw every step.

>>> import torch
>>> from enkal import Observations, SquareRoot, ESMDA, ResampleFailed
>>> g = torch.Generator().manual_seed(0)
>>> X = torch.randn(16, 2, generator=g, dtype=torch.float64)
>>> Y = X @ torch.tensor([[1.0], [2.0]], dtype=torch.float64)
>>> a = analyse(X, Y, Observations([1.0], noise_std=0.1), rule=SquareRoot(),
...             schedule=ESMDA.constant(2), schedule_states=[ESMDA.constant(2).init()],
...             failure=ResampleFailed(), generator=g)
>>> a.parameters.shape, a.alpha, a.n_failed
(torch.Size([16, 2]), 2.0, 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._checks import column_variance
from ._types import Adaptation, FailurePolicy, Guard, Schedule, UpdateRule
from .observations import Observations
from .update import apply_transform

__all__ = ["Analysis", "analyse", "columns", "set_columns", "mean_variance"]


@dataclass(frozen=True)
class Analysis:
    """What one :func:`analyse` step returns.

    Attributes
    ----------
    parameters : Tensor
        The updated ensemble ``(N_ens, N_par)``, or with ``mean=`` the new mean ``(N_par,)``.
    schedule : tuple
        The new schedule state of each section (the given one for sections not updated).
    adapt : object
        The adaptation's new state.
    mask : bool Tensor (N_par,) or None
        Live parameters after this step.
    alpha : float
        The noise inflation (the mean over the updated sections).
    schedule_info : dict
        The schedule's numeric entries (one section), or ``{"sections": n}``.
    misfit, mean_misfit, spread : float
        As in :class:`~enkal.StepInfo`.
    n_failed, n_resampled, n_pruned, n_live : int
        Failed members, guard redraws, parameters pruned now, live parameters.
    """

    parameters: torch.Tensor
    schedule: tuple
    adapt: Any
    mask: torch.Tensor | None
    alpha: float
    schedule_info: dict = field(default_factory=dict)
    misfit: float = math.nan
    mean_misfit: float = math.nan
    spread: float = math.nan
    n_failed: int = 0
    n_resampled: int = 0
    n_pruned: int = 0
    n_live: int = -1


def columns(x: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    """The columns of ``x`` in ``slices`` (a view for one slice, else a copy)."""
    if len(slices) == 1:
        return x[:, slices[0]]
    return torch.cat([x[:, s] for s in slices], dim=1)


def set_columns(x: torch.Tensor, slices: Sequence[slice], values: torch.Tensor) -> None:
    """Write ``values`` (the columns of ``slices``, in order) into ``x``."""
    start = 0
    for s in slices:
        k = s.stop - s.start
        x[:, s] = values[:, start:start + k]
        start += k


def mean_variance(x: torch.Tensor, chunk_size: int = 1 << 18) -> float:
    """Mean over columns of the ensemble variance of ``x`` ``(N_ens, N_par)``, in blocks."""
    return float(_variance_sum(x, chunk_size)) / max(x.shape[1], 1)


def _variance_sum(x: torch.Tensor, chunk_size: int = 1 << 18) -> torch.Tensor:
    """The sum over columns of the ensemble variance, a float64 0-d tensor (no host read):
    each block's sum in ``x``'s dtype, accumulated in float64 in block order."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], chunk_size):
        total = total + column_variance(x[:, start:start + chunk_size]).sum().double()
    return total


def analyse(
    parameters: torch.Tensor,
    predictions: torch.Tensor,
    observations: Observations,
    *,
    rule: UpdateRule,
    schedule: Schedule,
    schedule_states: Sequence[Any],
    failure: FailurePolicy,
    generator: torch.Generator,
    ok: torch.Tensor | None = None,
    guard: Guard | None = None,
    mask: torch.Tensor | None = None,
    adapt: Adaptation | None = None,
    adapt_state: Any = None,
    iteration: int = 0,
    sections: Sequence[Sequence[slice]] | None = None,
    active: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> Analysis:
    """One analysis step (pure but for ``out``/``mean``, the buffers it writes).

    Parameters
    ----------
    parameters : Tensor, shape (N_ens, N_par)
        The ensemble ``X`` whose predictions are given (unconstrained space).
    predictions : Tensor, shape (N_ens, N_obs)
        ``Yh``; rows of failed members may hold anything (NaN). Detached: no gradient
        flows through the update.
    observations : Observations
    rule, schedule, failure : components
        See :mod:`enkal._types`.
    schedule_states : sequence
        The schedule's state of each section (one for a smoother).
    generator : torch.Generator
        Every random draw of the step.
    ok : bool Tensor (N_ens,), optional
        Members known to have failed before (a forward that raised).
    guard : optional
        Collapse guard applied to each updated section's columns (not with ``mean=``).
    mask : bool Tensor (N_par,), optional
        Live parameters; the others are zeroed after the update.
    adapt, adapt_state : optional
        Structure adaptation and its state (``iteration`` is passed to it).
    sections : sequence of sequences of slices, optional
        Column groups with their own transforms (default: one section, all columns).
    active : sequence of int, optional
        The sections updated this step (default all).
    out : Tensor, optional
        Where ``X+`` goes: ``parameters`` itself (in place, through ``(N_ens, chunk_size)``
        buffers), another buffer, or ``None`` (a new tensor).
    mean : Tensor, shape (N_par,), optional
        Keep only the mean: ``mean[section] = (1^T W / E) X[:, section]`` for the updated
        sections (other entries untouched); ``Analysis.parameters`` is then ``mean``.
    chunk_size : int, optional
        Parameter columns per GEMM block.
    """
    # the update is never differentiated: predictions handed in with an autograd graph (a
    # module's output) would otherwise fail at the chunked GEMM's out= or leak into X+
    predictions = predictions.detach()
    n_par = parameters.shape[1]
    sections = [[slice(0, n_par)]] if sections is None else sections
    active = range(len(sections)) if active is None else active
    ok = failure.classify(predictions, ok, observations)
    n_failed = int((~ok).sum())
    used = predictions if n_failed == 0 else predictions[ok]
    variance = _variance_sum(parameters)  # read with the misfits, after the update

    states = list(schedule_states)
    alphas, infos = {}, {}
    for k in active:
        alphas[k], states[k], infos[k] = schedule.step(
            states[k], parameters=columns(parameters, sections[k]), predictions=used,
            observations=observations)

    n_pruned = 0
    if adapt is not None:
        # reads the same fresh predictions as the schedule; the newly pruned columns are
        # zeroed (with the old ones) after the update below
        new_mask, adapt_state, adapt_info = adapt.step(
            adapt_state, iteration=iteration, mask=mask,
            parameters=parameters if n_failed == 0 else parameters[ok], predictions=used,
            observations=observations)
        if new_mask is not None:
            mask = new_mask.to(device=parameters.device, dtype=torch.bool)
            n_pruned = int(adapt_info.get("n_pruned", 0))

    if _direct(rule):  # X+ built by the rule (enkal.localization, UKI), not one W
        result, n_resampled = _local(parameters, predictions, observations, ok, rule=rule,
                                     failure=failure, generator=generator, guard=guard,
                                     mask=mask, sections=sections, alpha=alphas[0],
                                     mean=mean, out=out)
    else:
        result, n_resampled = _update(parameters, used, observations, ok, rule=rule,
                                      failure=failure, generator=generator, guard=guard,
                                      mask=mask, sections=[sections[k] for k in active],
                                      alphas=[alphas[k] for k in active], out=out,
                                      mean=mean, chunk_size=chunk_size,
                                      all_ok=n_failed == 0)
    if mask is not None and not bool(mask.all()):
        if mean is not None:
            result[~mask] = 0
        else:
            result[:, ~mask] = 0

    phi = observations.misfit(used)
    mean_phi = observations.misfit(used.mean(dim=0, keepdim=True))
    m = observations.size
    # the diagnostics in one host read (each computed in its own dtype, then widened
    # exactly to float64)
    var, misfit, mean_misfit = torch.stack([
        variance, (2 * phi.mean() / m).double(), (2 * mean_phi[0] / m).double()]).tolist()
    info = {"sections": len(alphas)} if len(alphas) != 1 else \
        {k: v for k, v in next(iter(infos.values())).items()
         if isinstance(v, (int, float, bool))}
    return Analysis(
        parameters=result, schedule=tuple(states), adapt=adapt_state, mask=mask,
        alpha=float(sum(alphas.values()) / max(len(alphas), 1)), schedule_info=info,
        misfit=misfit, mean_misfit=mean_misfit, spread=math.sqrt(var / max(n_par, 1)),
        n_failed=n_failed, n_resampled=n_resampled, n_pruned=n_pruned,
        n_live=n_par if mask is None else int(mask.sum()),
    )


def _update(parameters: torch.Tensor, used: torch.Tensor, observations: Observations,
            ok: torch.Tensor, *, rule: UpdateRule, failure: FailurePolicy,
            generator: torch.Generator, guard: Guard | None, mask: torch.Tensor | None,
            sections: list, alphas: list, out: torch.Tensor | None,
            mean: torch.Tensor | None, chunk_size: int | None, all_ok: bool
            ) -> tuple[torch.Tensor, int]:
    """Transform, apply and guard each updated section, in order (the draws' order): the
    new ensemble (or ``mean``) and the guard's redraw count (``all_ok``: no member failed,
    as ``analyse`` counted them)."""
    target = out
    n_resampled = 0
    for slices, alpha in zip(sections, alphas, strict=True):
        w = _transform(rule, used, observations, alpha=alpha, generator=generator,
                       parameters=parameters if all_ok else parameters[ok], slices=slices)
        if not all_ok:
            w = failure.embed(w, ok, generator)
        if mean is not None:  # keep only the new mean m+ = (1^T W / E) X
            r = w.mean(dim=0).to(mean.dtype)  # in the mean's precision (float32 for a
            for s in slices:                  # bfloat16 ensemble: no-ops otherwise)
                mean[s] = r @ parameters[:, s].to(mean.dtype)
            continue
        target = _apply(w, parameters, slices, target, chunk_size)
        if guard is not None:
            for s in slices:
                n_resampled += guard.apply(target[:, s], generator=generator,
                                           mask=None if mask is None else mask[s],
                                           inplace=True)[1]
    if mean is not None:
        return mean, n_resampled
    if target is None:  # no section was updated: the ensemble carries over
        target = parameters if out is None else out
    return target, n_resampled


def _direct(rule: Any) -> bool:
    """A rule that builds ``X+`` itself (``rule.update``): a local rule (one transform per
    parameter) or one that rebuilds the ensemble (sigma points)."""
    return bool(getattr(rule, "local", False) or getattr(rule, "direct", False))


def _local(parameters: torch.Tensor, predictions: torch.Tensor, observations: Observations,
           ok: torch.Tensor, *, rule: Any, failure: FailurePolicy, generator: torch.Generator,
           guard: Guard | None, mask: torch.Tensor | None, sections: Sequence,
           alpha: float, mean: torch.Tensor | None, out: torch.Tensor | None
           ) -> tuple[torch.Tensor, int]:
    """A direct rule's update (``rule.update``: a local rule's one transform per parameter,
    or UKI's new sigma points), guarded; it takes all columns at once (no sections, no
    ``mean=``)."""
    if mean is not None or len(sections) != 1 or \
            list(sections[0]) != [slice(0, parameters.shape[1])]:
        raise ValueError(f"rule: {type(rule).__name__} builds the new ensemble itself, all "
                         "parameters at once; sections and mean-only updates are not "
                         "supported")
    result = rule.update(parameters, predictions, observations, ok=ok, alpha=alpha,
                         generator=generator, failure=failure)
    if out is not None:
        out.copy_(result)
        result = out
    n_resampled = 0
    if guard is not None:
        n_resampled = guard.apply(result, generator=generator, mask=mask, inplace=True)[1]
    return result, n_resampled


def _transform(rule: UpdateRule, used: torch.Tensor, observations: Observations, *,
               alpha: float, generator: torch.Generator, parameters: torch.Tensor,
               slices: Sequence[slice]) -> torch.Tensor:
    """The rule's ``W``; a rule with ``needs_parameters`` (the Ensemble Kalman Sampler) also
    gets the successful members' parameters, all columns (it refuses sections)."""
    if not getattr(rule, "needs_parameters", False):
        return rule.transform(used, observations, alpha=alpha, generator=generator)
    if len(slices) != 1 or slices[0] != slice(0, parameters.shape[1]):
        raise ValueError(f"rule: {type(rule).__name__} updates all parameters at once; "
                         "sections are not supported")
    sampler: Any = rule  # the protocol's transform, with the ensemble as well
    return sampler.transform(used, observations, alpha=alpha, generator=generator,
                             parameters=parameters)


def _apply(w: torch.Tensor, x: torch.Tensor, slices: Sequence[slice],
           target: torch.Tensor | None, chunk_size: int | None) -> torch.Tensor:
    """``X+ = W X`` on the columns of one section, into ``target`` (``None``: a new tensor;
    ``x`` itself: in place); returns the tensor holding ``X+``."""
    if len(slices) == 1 and slices[0] == slice(0, x.shape[1]):
        return apply_transform(w, x, out=target, chunk_size=chunk_size)
    if target is None:
        target = x.clone()
    if len(slices) == 1:
        view, dest = x[:, slices[0]], target[:, slices[0]]
        apply_transform(w, view, out=dest, chunk_size=chunk_size)
    else:
        set_columns(target, slices, apply_transform(w, columns(x, slices),
                                                    chunk_size=chunk_size))
    return target
