r"""Ensemble-space update kernels: prepare once per iteration, apply in chunks.

Notation (members first, see ``docs/glossary.md``): parameters ``X`` are ``(N_ens, N_par)``,
predictions ``Yh`` are ``(N_ens, N_obs)``, observations ``y`` have ``N_obs`` entries and the
noise covariance is ``R = L L^T``. ``E = N_ens``.

Derivation in brief
-------------------
With anomalies ``A = X - 1 xb^T`` and ``D = Yh - 1 yb^T``, the whitened, scaled prediction
anomalies are ``S = D L^-T / sqrt(alpha (E-1))`` where ``alpha`` is the noise inflation of the
schedule (``R -> alpha R``). The thin SVD ``S = V Sig U^T`` has ``V`` of size ``E x r``.
Rather than decomposing the ``E x N_obs`` matrix directly we diagonalise its smaller Gram
matrix in float64: ``S S^T = V Sig^2 V^T`` (``E x E``, the usual case ``E <= N_obs``; cost
``O(N_obs E^2)``) or, for ensembles larger than the data, the thin SVD of ``S`` itself
(``O(E N_obs^2)``). Every product with ``U`` is rewritten through ``U Sig = S^T V``, and only
directions with ``Sig > 0`` are kept (the formulas act as the identity on the others).
Nothing of size ``N_par x N_obs`` is ever formed, nor ``N_obs x N_obs`` when ``E <= N_obs``.

References: [Evensen1994], [Evensen2003] (ensemble space), [Tippett2003], [Hunt2007],
[Sakov2008] (the symmetric square root), [Burgers1998] and IEKL's eq. 11 [Trautner2020]
(perturbed observations); ``docs/references.md``.

* square root (transform): mean increment ``A^T w`` with
  ``w = V (Sig^2 + I)^-1 V^T S d / sqrt(E-1)``, ``d = L^-1 (y - yb) / sqrt(alpha)``; anomalies
  ``A+ = T A`` with the symmetric ``T = (I + S S^T)^-1/2``. Together ``X+ = W X`` with
  ``W = 1 1^T / E + 1 (Pi w)^T + T Pi`` and ``Pi = I - 1 1^T / E``. For a linear model the
  posterior sample mean and covariance equal the Kalman posterior of the prior sample
  moments (Woodbury).
* perturbed observations (the seed paper's eq. 11; ES, ES-MDA): each member's innovation
  ``Psi_j = y + eps_j - Yh_j`` with ``eps_j ~ N(0, alpha R)``; ``X+ = (I + G Pi) X`` with
  ``G = Psi_w S^T V (Sig^2 + I)^-1 V^T / sqrt(E-1)``, ``Psi_w = Psi L^-T / sqrt(alpha)``. The
  paper writes ``V Sig (Sig^2 + rho^2 I)^-1 U^T`` with unscaled, unwhitened anomalies; it is
  the same update with ``R = rho^2 I``.

Truncation keeps the leading singular values carrying a fraction of ``sum Sig^2`` and is done
*after* whitening: truncating unwhitened anomalies weighs observations by their units.

Either way the whole update is one ``E x E`` matrix ``W`` (float64, tiny) and one GEMM over
the parameters, done in column chunks (``chunk_size``) so that in-place updates need only an
``E x chunk_size`` buffer.

>>> import torch
>>> from enkal import Observations, SquareRoot, assimilate
>>> g = torch.Generator().manual_seed(0)
>>> X = torch.randn(50, 3, generator=g, dtype=torch.float64)
>>> H = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
>>> obs = Observations(torch.tensor([0.5, -0.2]), noise_std=0.1)
>>> X_post = assimilate(X, X @ H.T, obs, rule=SquareRoot())
>>> X_post.shape, X_post.dtype
(torch.Size([50, 3]), torch.float64)
>>> bool(X_post.var(0)[0] < X.var(0)[0])
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import (
    check_bool_vector,
    check_buffer,
    check_ensemble,
    check_finite,
    check_fraction,
    check_generator,
    check_members_first,
    check_positive_float,
    check_positive_int,
)
from ._types import UpdateRule, check_component
from .errors import FailedMembersError
from .observations import Observations

__all__ = [
    "SquareRoot",
    "PerturbedObservations",
    "UpdateRule",
    "ensemble_transform",
    "square_root_transform",
    "perturbed_transform",
    "apply_transform",
    "assimilate",
    "embed_transform",
]


@dataclass(frozen=True)
class SquareRoot:
    """Deterministic square-root (ensemble transform) update [Tippett2003, Hunt2007].

    Parameters
    ----------
    truncation : float in (0, 1], optional
        Keep the leading singular values of the whitened anomalies that carry this fraction
        of their total energy ``sum Sig^2``. ``None`` (default) keeps all: the exact update.
    """

    truncation: float | None = None

    def __post_init__(self) -> None:
        check_fraction(self.truncation, "SquareRoot.truncation")

    def transform(self, predictions: torch.Tensor, observations: Observations, *,
                  alpha: float = 1.0, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        """``W = 1 1^T / E + 1 (Pi w)^T + T Pi`` (float64, ``(E, E)``); draws nothing."""
        return square_root_transform(predictions, observations, alpha=alpha,
                                     truncation=self.truncation)


@dataclass(frozen=True)
class PerturbedObservations:
    """Stochastic update with perturbed observations (the seed paper's eq. 11 [Trautner2020];
    [Burgers1998]; ES, ES-MDA).

    Parameters
    ----------
    truncation : float in (0, 1], optional
        Energy fraction of singular values kept, as for :class:`SquareRoot`.
    """

    truncation: float | None = None

    def __post_init__(self) -> None:
        check_fraction(self.truncation, "PerturbedObservations.truncation")

    def transform(self, predictions: torch.Tensor, observations: Observations, *,
                  alpha: float = 1.0, generator: torch.Generator | None = None,
                  perturbations: torch.Tensor | None = None) -> torch.Tensor:
        """``W = I + G Pi`` (float64, ``(E, E)``); the perturbations ``eps ~ N(0, alpha R)``
        (``E x N_obs`` normals) are drawn from ``generator`` unless given."""
        if perturbations is None:
            perturbations = observations.sample_noise(
                predictions.shape[0], generator=generator, device=predictions.device,
                scale=alpha)
        return perturbed_transform(predictions, observations, perturbations, alpha=alpha,
                                   truncation=self.truncation)


def _check_rule(rule: object) -> None:
    check_component(rule, UpdateRule, "rule", "SquareRoot() or PerturbedObservations()")


#: Up to this many members the ``(E, E)`` algebra of an update on an accelerator runs on the
#: host after one copy (a GPU float64 eigh of 64 x 64 took 0.56 ms; the crossover is a guess).
HOST_ALGEBRA_MAX_MEMBERS = 256


class _NonFinite(ArithmeticError):
    """The whitened anomalies' Gram matrix is not finite (explained by the caller)."""


def _small(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The small float64 tensors where the ``(E, E)`` algebra runs: as they are on the CPU
    or for large ensembles, else on the host, brought over in one copy."""
    first = tensors[0]
    if first.device.type == "cpu" or first.shape[0] > HOST_ALGEBRA_MAX_MEMBERS:
        return list(tensors)
    return _to_host(tensors)


def _to_host(tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """``tensors`` (one dtype and device) on the CPU after one copy, shapes kept."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()  # the one synchronisation
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]),
                                             tensors, strict=True)]


def _spectral_basis(s: torch.Tensor, truncation: float | None, *extra: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(lam, V, extra)``: squared singular values ``Sig^2`` (descending) and left singular
    vectors ``V`` of ``S`` (``E x N_obs``), for the non-negligible singular values only, and
    the small ``extra`` tensors on the same device as them (:func:`_small`).

    Diagonalises the ``E x E`` Gram matrix ``S S^T`` when ``E <= N_obs`` (the usual case),
    else takes the thin SVD of ``S`` (``O(E N_obs^2)``). Directions with ``Sig = 0`` need no
    vectors: every formula below acts as the identity on them. Raises :class:`_NonFinite`
    when ``S`` has a NaN/inf or ``S S^T`` overflows (its trace, ``sum S^2``, is not finite).
    """
    n, m = s.shape
    if n <= m:
        # E x E Gram: orthonormal V by construction, O(N_obs E^2) in one GEMM
        gram, *extra_ = _small(s @ s.T, *extra)
        if not math.isfinite(float(gram.trace())):
            raise _NonFinite
        lam, vec = torch.linalg.eigh(gram)
        lam = lam.flip(0).clamp_min(0.0)
        vec = vec.flip(1)
    else:
        # more members than data: the thin SVD of S (O(E N_obs^2)); V = S U / Sig from the
        # small Gram would lose orthogonality for the weakest directions
        if not math.isfinite(float(s.square().sum())):
            raise _NonFinite
        vec, sig, _ = torch.linalg.svd(s, full_matrices=False)
        lam, extra_ = sig.square(), list(extra)
    values = lam.tolist()  # on the host already (or E > N_obs / a large ensemble)
    top = values[0] if values else 0.0
    keep = sum(v > top * max(n, m) * 1e-14 for v in values) if top > 0 else 0
    if truncation is not None and truncation < 1.0 and keep > 0:
        cum = torch.cumsum(lam[:keep], 0) / float(lam[:keep].sum())
        r = int((cum < truncation).sum()) + 1
        keep = min(keep, r)
    return lam[:keep], vec[:, :keep], extra_


def _basis(predictions: torch.Tensor, s: torch.Tensor, alpha: float,
           truncation: float | None, *extra: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """:func:`_spectral_basis`, with a non-finite ``S`` explained: NaN/inf predictions
    (``ValueError`` naming them, as :func:`_check_ok` did before any work) or an overflow of
    the whitening (naming ``alpha``). The predictions are read only on this failure path."""
    try:
        return _spectral_basis(s, truncation, *extra)
    except _NonFinite:
        bad = ~torch.isfinite(predictions).all(dim=1)
        if bool(bad.any()):
            raise ValueError(
                f"predictions: {int(bad.sum())} members have NaN/inf predictions; pass "
                "ok= (a bool mask of the members to use) or let EnsembleSmoother's failure "
                "policy handle them") from None
        raise ValueError(
            "predictions: the noise-whitened prediction anomalies overflow float64 (largest "
            f"|S| = {float(s.abs().max()):.3g}); such members are garbage: leave them out "
            "with ok= or a failure policy with max_abs, or rescale the outputs (noise "
            f"inflation alpha = {alpha:g})") from None


def _whitened(predictions: torch.Tensor, observations: Observations, alpha: float):
    """``(yh, ybar, y, s)``: float64 predictions, their mean, the data and ``S``, shared by
    both rules."""
    n = predictions.shape[0]
    y = observations.values.to(predictions.device)
    yh = predictions.to(torch.float64)
    ybar = yh.mean(dim=0)
    scale = 1.0 / math.sqrt(alpha * (n - 1))
    s = observations.whiten(yh - ybar) * scale  # (E, N_obs), S = D L^-T / sqrt(alpha (E-1))
    return yh, ybar, y, s


def square_root_transform(predictions: torch.Tensor, observations: Observations, *,
                          alpha: float = 1.0, truncation: float | None = None
                          ) -> torch.Tensor:
    """The deterministic square-root transform ``W`` (``(E, E)``, float64; see the module
    docstring): ``X+ = W X`` moves the mean by ``A^T w`` and the anomalies by ``T``."""
    n = predictions.shape[0]
    _, ybar, y, s = _whitened(predictions, observations, alpha)
    d = observations.whiten((y - ybar).unsqueeze(0)).squeeze(0) / math.sqrt(alpha)
    lam, v, (sd,) = _basis(predictions, s, alpha, truncation, s @ d)  # S d: (E,)
    eye = torch.eye(n, dtype=torch.float64, device=lam.device)
    w = v @ ((v.T @ sd) / (lam + 1.0)) / math.sqrt(n - 1)
    t = eye + (v * ((lam + 1.0).rsqrt() - 1.0)) @ v.T
    # W = 1 1^T / E + 1 (Pi w)^T + T Pi, with M Pi = M - (M 1) 1^T / E in O(E^2)
    full = (t - t.sum(dim=1, keepdim=True) / n) + (1.0 / n) + (w - w.mean()).unsqueeze(0)
    return full.to(predictions.device, non_blocking=True)


def perturbed_transform(predictions: torch.Tensor, observations: Observations,
                        perturbations: torch.Tensor, *, alpha: float = 1.0,
                        truncation: float | None = None) -> torch.Tensor:
    """The perturbed-observation transform ``W = I + G Pi`` (``(E, E)``, float64) for given
    perturbations ``eps ~ N(0, alpha R)`` ``(E, N_obs)`` (the seed paper's eq. 11)."""
    n = predictions.shape[0]
    yh, _, y, s = _whitened(predictions, observations, alpha)
    psi = (y + perturbations.to(device=s.device, dtype=torch.float64)) - yh
    psi_w = observations.whiten(psi) / math.sqrt(alpha)  # (E, N_obs)
    lam, v, (ps,) = _basis(predictions, s, alpha, truncation, psi_w @ s.T)
    eye = torch.eye(n, dtype=torch.float64, device=lam.device)
    g = ((ps @ v) / (lam + 1.0)) @ v.T / math.sqrt(n - 1)
    return (eye + (g - g.sum(dim=1, keepdim=True) / n)).to(predictions.device,
                                                          non_blocking=True)


def ensemble_transform(
    predictions: torch.Tensor,
    observations: Observations,
    *,
    rule: UpdateRule,
    alpha: float = 1.0,
    perturbations: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The ``(E, E)`` float64 matrix ``W`` of one update, ``X+ = W X`` (pure kernel).

    Parameters
    ----------
    predictions : Tensor, shape (E, N_obs)
        Predictions ``Yh`` of the members, all finite (leave failed members out first).
    observations : Observations
    rule : SquareRoot, PerturbedObservations or another :class:`~enkal._types.UpdateRule`
    alpha : float
        Noise inflation: the update uses ``alpha R`` (``rho^2`` of the paper when ``R = I``;
        ES-MDA's ``alpha_i``).
    perturbations : Tensor, shape (E, N_obs), optional
        The draws ``eps ~ N(0, alpha R)`` for :class:`PerturbedObservations` (required for
        it, ignored otherwise). ``assimilate`` draws them from a generator.

    Returns
    -------
    Tensor, shape (E, E), float64, on the predictions' device.

    Checked: ``observations`` is an :class:`Observations` and ``rule`` an update rule
    (``TypeError``); ``predictions`` a floating ``(E, N_obs)`` tensor with ``E >= 2``
    (``TypeError`` for the type or dtype, ``ValueError`` for the shape; non-finite
    predictions are a ``ValueError`` from the whitening); ``alpha`` a finite float ``> 0``;
    ``perturbations``, when given, a floating ``(E, N_obs)`` finite tensor. The
    predictions are detached (the update is never differentiated).
    """
    _check_transform_inputs(predictions, observations, rule, alpha, perturbations)
    predictions = predictions.detach()
    if isinstance(rule, PerturbedObservations):
        if perturbations is None:
            raise ValueError("perturbations: required for PerturbedObservations, got None")
        return rule.transform(predictions, observations, alpha=alpha,
                              perturbations=perturbations)
    return rule.transform(predictions, observations, alpha=alpha, generator=None)


def _check_transform_inputs(predictions, observations, rule, alpha, perturbations) -> None:
    """The arguments of :func:`ensemble_transform` (see its docstring)."""
    if not isinstance(observations, Observations):
        raise TypeError(
            f"observations: expected enkal.Observations, got {type(observations).__name__}"
        )
    _check_rule(rule)
    check_positive_float(alpha, "alpha")
    check_ensemble(predictions, "predictions", n_columns=observations.size, columns="N_obs")
    n = predictions.shape[0]
    if n < 2:
        raise ValueError(f"predictions: expected at least 2 members (E >= 2), got {n}")
    if perturbations is not None:
        check_ensemble(perturbations, "perturbations", n_columns=observations.size,
                       columns="N_obs")
        check_members_first(perturbations, "perturbations", n_members=n,
                            n_columns=observations.size, columns="N_obs")
        check_finite(perturbations, "perturbations")


def apply_transform(
    transform: torch.Tensor,
    parameters: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``X+ = W X`` over parameter column blocks; ``out`` may be ``parameters`` (in place).

    ``W`` is cast to the parameters' dtype so no parameter-sized float64 copy is made. With
    ``out is parameters`` the update is done block by block through an
    ``(E, chunk_size)`` buffer (default chunk 65536 columns), the memory-bounded path.

    Checked (shapes and types only, nothing that reads ``X``): ``transform`` a floating
    ``(E, E)`` tensor and ``parameters`` a floating ``(E, N_par)`` one (``TypeError`` for a
    type or dtype, ``ValueError`` for a shape); ``out`` a tensor of the parameters' shape,
    dtype and device that does not require grad, ``parameters`` itself or not overlapping
    it (``ValueError``); ``chunk_size`` an int ``>= 1``. Inputs are detached: the update is
    never differentiated.
    """
    _check_apply_inputs(transform, parameters, out, chunk_size)
    transform, parameters = transform.detach(), parameters.detach()
    w = transform.to(dtype=parameters.dtype, device=parameters.device)
    p = parameters.shape[1]
    inplace = out is not None and out.data_ptr() == parameters.data_ptr()
    if out is not None and not inplace and _overlaps(out, parameters):
        raise ValueError("out: expected `parameters` itself or a separate buffer, got a "
                         "tensor that overlaps the parameters' memory")
    if chunk_size is None and not inplace:
        return torch.matmul(w, parameters, out=out) if out is not None else w @ parameters
    step = chunk_size or 65536
    target = out if out is not None else torch.empty_like(parameters)
    if inplace:
        buf = torch.empty((parameters.shape[0], min(step, p)), dtype=parameters.dtype,
                          device=parameters.device)
    for start in range(0, p, step):
        stop = min(start + step, p)
        if inplace:
            tmp = buf[:, : stop - start]
            torch.matmul(w, parameters[:, start:stop], out=tmp)
            target[:, start:stop].copy_(tmp)
        else:
            torch.matmul(w, parameters[:, start:stop], out=target[:, start:stop])
    return target


def _check_apply_inputs(transform, parameters, out, chunk_size) -> None:
    """The arguments of :func:`apply_transform` (see its docstring)."""
    check_ensemble(parameters, "parameters")
    n = parameters.shape[0]
    if not isinstance(transform, torch.Tensor):
        raise TypeError(f"transform: expected a torch.Tensor of shape ({n}, {n}) = (E, E), "
                        f"got {type(transform).__name__}")
    if not transform.is_floating_point():
        raise TypeError(f"transform: expected a floating dtype, got {transform.dtype}")
    if transform.shape != (n, n):
        raise ValueError(f"transform: expected shape ({n}, {n}) = (E, E) for the {n} members "
                         f"of the parameters, got {tuple(transform.shape)}")
    if out is not None:
        check_buffer(out, parameters)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device:
        return False
    a0, a1 = a.data_ptr(), a.data_ptr() + a.numel() * a.element_size()
    b0, b1 = b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def embed_transform(
    transform: torch.Tensor, ok: torch.Tensor, generator: torch.Generator | None,
    *, redraw: bool = True,
) -> torch.Tensor:
    """Embed the ``(E_s, E_s)`` transform of the successful members in ``(E, E)``.

    With ``redraw`` (the default) failed rows are drawn from the Gaussian of the updated
    successful members, ``m + A_s^T z / sqrt(E_s - 1)`` with ``z ~ N(0, I)``, written as a
    combination of the successful members so the whole step is still one GEMM; otherwise
    failed members keep their parameters (identity rows).
    """
    n = ok.numel()
    idx = torch.nonzero(ok).squeeze(1)
    bad = torch.nonzero(~ok).squeeze(1)
    n_ok = idx.numel()
    full = torch.zeros((n, n), dtype=torch.float64, device=transform.device)
    full[idx.unsqueeze(1), idx.unsqueeze(0)] = transform
    if bad.numel() and redraw:
        z = torch.randn(bad.numel(), n_ok, generator=generator, dtype=torch.float64,
                        device=transform.device)
        z = z - z.mean(dim=1, keepdim=True)  # Pi z: a combination of anomalies only
        coef = 1.0 / n_ok + z / math.sqrt(n_ok - 1)
        full[bad.unsqueeze(1), idx.unsqueeze(0)] = coef @ transform
    elif bad.numel():
        full[bad, bad] = 1.0
    return full


def _validate(parameters, predictions, observations, rule, alpha, ok):
    _check_pair(parameters, predictions, observations, rule, alpha)
    return _check_ok(ok, predictions, parameters.shape[0])


def _check_pair(parameters, predictions, observations, rule, alpha) -> None:
    """Types, shapes, dtypes and devices of ``assimilate``'s tensors and strategies."""
    if not isinstance(parameters, torch.Tensor):
        raise TypeError(f"parameters: expected a torch.Tensor, got {type(parameters).__name__}")
    if not isinstance(predictions, torch.Tensor):
        raise TypeError(
            f"predictions: expected a torch.Tensor, got {type(predictions).__name__}"
        )
    if not isinstance(observations, Observations):
        raise TypeError(
            f"observations: expected enkal.Observations, got {type(observations).__name__}"
        )
    _check_rule(rule)
    check_positive_float(alpha, "alpha")
    for name, t in (("parameters", parameters), ("predictions", predictions)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    check_members_first(parameters, "parameters")
    n = parameters.shape[0]
    if n < 2:
        raise ValueError(f"parameters: expected at least 2 members (N_ens >= 2), got {n}")
    check_members_first(predictions, "predictions", n_members=n, n_columns=observations.size,
                        columns="N_obs")
    if predictions.device != parameters.device:
        raise ValueError(
            f"predictions: expected device {parameters.device} (the parameters' device), "
            f"got {predictions.device}"
        )
    if predictions.dtype != parameters.dtype:
        raise TypeError(
            f"predictions: expected dtype {parameters.dtype} (the parameters' dtype), got "
            f"{predictions.dtype}; cast one of them with .to()"
        )


def _check_ok(ok, predictions: torch.Tensor, n: int) -> torch.Tensor | None:
    """The ``ok`` mask of ``assimilate`` (or its absence) against the predictions."""
    if ok is not None:
        check_bool_vector(ok, "ok", n, "N_ens")
        ok = ok.to(predictions.device)
        rows_finite = torch.isfinite(predictions).all(dim=1)
        if bool((ok & ~rows_finite).any()):
            raise ValueError(f"predictions: expected finite predictions for the members marked "
                             f"ok, got NaN/inf in {int((ok & ~rows_finite).sum())} of them")
        if int(ok.sum()) < 2:
            raise FailedMembersError(
                f"only {int(ok.sum())} of {n} members succeeded; at least 2 are needed"
            )
    # without ok, NaN/inf predictions are found on the whitened anomalies' Gram matrix, with
    # no extra pass and no host synchronisation of their own (_basis says which they are)
    return ok


def assimilate(
    parameters: torch.Tensor,
    predictions: torch.Tensor,
    observations: Observations,
    *,
    rule: UpdateRule = SquareRoot(),
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    ok: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """One ensemble-smoother update of ``parameters`` from ``predictions`` (pure).

    Parameters
    ----------
    parameters : Tensor, shape (N_ens, N_par)
        The ensemble ``X``, members first. Not modified (unless passed as ``out``).
    predictions : Tensor, shape (N_ens, N_obs)
        ``Yh = G(X)``, same dtype and device as ``parameters``.
    observations : Observations
        ``y`` and ``R``.
    rule : SquareRoot or PerturbedObservations
    alpha : float
        Noise inflation (``R -> alpha R``), from a schedule.
    generator : torch.Generator, optional
        Source of the observation perturbations and of redraws of failed members.
    ok : bool Tensor, shape (N_ens,), optional
        Members to use; the others are left out of the statistics and redrawn from the
        Gaussian of the updated successful members.
    out : Tensor, shape (N_ens, N_par), optional
        Where to write the result: a reusable buffer, or ``parameters`` itself for a
        memory-bounded in-place update.
    chunk_size : int, optional
        Parameter columns per GEMM block.

    Returns
    -------
    Tensor, shape (N_ens, N_par), dtype and device of ``parameters``.

    Every argument is checked, each error naming it: ``TypeError`` for a wrong type or
    dtype (a class given for ``rule``, an int for ``generator``), ``ValueError`` for a
    wrong shape, device or value (non-finite parameters, ``alpha <= 0``, NaN predictions of
    members not excluded by ``ok``). Types, shapes and devices are checked before anything
    is computed. The values are checked where it costs no extra pass and no extra host
    synchronisation: NaN/inf predictions on the whitened anomalies' Gram matrix (before
    ``X`` is read), non-finite parameters on the first row of the result (``W X`` spreads a
    NaN in ``X`` over its column), so a given ``out`` buffer may have been written when that
    error is raised; with ``out=parameters`` they are checked before the update instead. On
    an accelerator with ``N_ens <= HOST_ALGEBRA_MAX_MEMBERS`` the ``(E, E)`` algebra runs on
    the host after one copy: two host synchronisations per call in all. The update is never
    differentiated: ``parameters`` and ``predictions`` are detached.
    """
    ok = _validate(parameters, predictions, observations, rule, alpha, ok)
    check_generator(generator)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if out is not None:
        check_buffer(out, parameters)
    parameters, predictions = parameters.detach(), predictions.detach()
    used = predictions if ok is None or bool(ok.all()) else predictions[ok]
    w = draw_transform(used, observations, rule=rule, alpha=alpha, generator=generator, ok=ok)
    inplace = out is not None and out.data_ptr() == parameters.data_ptr()
    if inplace:  # the result overwrites X: check X first (a pass over it, a synchronisation)
        check_finite(parameters, "parameters")
    result = apply_transform(w, parameters, out=out, chunk_size=chunk_size)
    if not inplace:
        _check_result(result, parameters)
    return result


def _check_result(result: torch.Tensor, parameters: torch.Tensor) -> None:
    """Finite ``parameters``, checked on the first row of ``W X`` (``1/N_ens`` of a pass):
    a NaN or inf in column ``j`` of ``X`` makes ``(W X)[0, j] = sum_i W[0, i] X[i, j]``
    non-finite (IEEE: ``0 * NaN`` and ``0 * inf`` are NaN; ``W`` is finite), so a finite
    first row proves the parameters finite; only a non-finite one pays for the count."""
    if math.isfinite(float(result[0].sum())):
        return
    check_finite(parameters, "parameters")
    raise ValueError("parameters: the update overflowed (finite parameters, non-finite "
                     "result); rescale the parameters")


def draw_transform(
    used: torch.Tensor,
    observations: Observations,
    *,
    rule: UpdateRule,
    alpha: float,
    generator: torch.Generator | None,
    ok: torch.Tensor | None = None,
    redraw: bool = True,
) -> torch.Tensor:
    """The ``(N_ens, N_ens)`` transform of one update, random draws included:
    ``rule.transform`` of the successful members' predictions ``used`` (a
    :class:`PerturbedObservations` rule draws its perturbations from ``generator``), and,
    when ``ok`` marks failed members, embedded with :func:`embed_transform` (failed rows
    redrawn unless ``redraw=False``). The draws come in this order, the order of
    :func:`enkal.analysis.analyse` too.
    """
    w = rule.transform(used, observations, alpha=alpha, generator=generator)
    if ok is not None and not bool(ok.all()):
        w = embed_transform(w, ok.to(w.device), generator, redraw=redraw)
    return w
