"""Mutual information between parameters and errors, pruning masks, dead-unit removal.

Mutual information (IEKL's eq. 12 [Trautner2020]; the Gaussian formula [Cover2006])
-----------------------------------------------------------------------------------
For parameter ``i`` and error dimension ``j`` (the error of a member is its prediction minus
the data, ``e = Yh - 1 y^T``), let ``r_ij`` be the ensemble correlation between column ``i``
of the parameters ``X`` and column ``j`` of the errors. If the pair were jointly Gaussian,
their mutual information would be

    I_ij = -1/2 log(1 - r_ij^2)                                            (nats)

and a parameter is ranked by the l1 sum over error dimensions, ``I_i = sum_j I_ij``. A
parameter whose value does not move the error (``r_ij = 0`` for every ``j``: a pruned one,
a collapsed one, or one the outputs ignore) has ``I_i = 0`` and ranks last.

Numerics. Columns are centred and scaled to unit norm in float64, so
``r = A_s^T D_s`` (``A_s``: ``E x P``, ``D_s``: ``E x M``). That product is formed in blocks of
``chunk_size`` parameters, so no ``P x M`` matrix is ever held (peak extra memory:
``E x chunk_size`` plus ``chunk_size x M`` float64). A column with no spread has
correlation 0 with everything. ``r^2`` is capped at ``R2_CAP = 1 - 1e-12`` before the
logarithm, so a (numerically) exact linear dependence scores a finite
``-1/2 log(1e-12) = 13.8`` nats per error dimension instead of ``inf``; ``log1p`` keeps the
small-``r`` end accurate. Since ``I_i`` only depends on correlations, it is invariant to
shifting or scaling any parameter or error column (and to the sign of either).

>>> import math, torch
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
>>> x[:, 2] = 0.0                                 # a pruned parameter: no spread
>>> e = (x[:, :1] + torch.randn(4000, 1, generator=g, dtype=torch.float64))  # r = 1/sqrt(2)
>>> mi = mutual_information(x, e)
>>> exact = 0.5 * math.log(2.0)                   # -1/2 log(1 - 1/2)
>>> abs(float(mi[0]) - exact) < 3 * 0.71 / math.sqrt(4000)   # 3 Monte-Carlo SE, r/sqrt(E)
True
>>> float(mi[2])
0.0

Pruning
-------
:func:`prune_mask` switches off the live parameters of lowest ``I_i`` (ties broken by
column index, so the result is deterministic). Dead units of pruned networks are removed by
:func:`remove_dead_units`, which folds their constant outputs into the next layer's bias and
returns a smaller dense module with the same outputs.
"""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real
from typing import Any, cast

import torch
from torch import nn

from ._checks import check_finite, check_members_first, check_positive_int

__all__ = [
    "R2_CAP",
    "mutual_information",
    "saliency",
    "prune_mask",
    "remove_dead_units",
    "count_nonzero",
]

#: ``r^2`` is clipped to this before ``-1/2 log(1 - r^2)`` (at most 13.8 nats per pair).
R2_CAP = 1.0 - 1e-12


def _standardize(z: torch.Tensor) -> torch.Tensor:
    """Centre the columns of ``z`` and scale them to unit Euclidean norm (float64).

    A column with zero (or round-off) spread becomes all zeros: correlation 0.
    """
    z = z.to(torch.float64)
    z = z - z.mean(dim=0, keepdim=True)
    norm = torch.linalg.vector_norm(z, dim=0, keepdim=True)
    scale = z.abs().amax(dim=0, keepdim=True)
    # relative round-off floor: a "spread" of a few ulps of the column's size is no spread
    tiny = norm <= 1e-13 * scale * math.sqrt(z.shape[0])
    norm = torch.where(tiny | (norm == 0), torch.ones_like(norm), norm)
    z = z / norm
    return torch.where(tiny, torch.zeros_like(z), z)


def mutual_information(
    parameters: torch.Tensor,
    errors: torch.Tensor,
    *,
    chunk_size: int | None = 4096,
) -> torch.Tensor:
    """Gaussian mutual information of each parameter with the errors, summed over them.

    ``I_i = sum_j -1/2 log(1 - r_ij^2)`` with ``r_ij`` the ensemble correlation of
    parameter ``i`` and error dimension ``j`` (IEKL eq. 12; see the module docstring).

    Parameters
    ----------
    parameters : Tensor, shape (N_ens, N_par)
        The ensemble ``X`` (any space: the value is invariant to affine maps per column).
    errors : Tensor, shape (N_ens, N_obs)
        The members' errors ``Yh - y`` (or the predictions ``Yh``: subtracting ``y`` does
        not change a correlation). Same device as ``parameters``.
    chunk_size : int or None
        Parameters per block of the correlation product (``None``: one block).

    Returns
    -------
    Tensor, shape (N_par,), float64, on the parameters' device
        ``I_i >= 0`` in nats.
    """
    for name, t, cols in (("parameters", parameters, "N_par"), ("errors", errors, "N_obs")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape (N_ens, {cols}), got "
                            f"{type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    check_members_first(parameters, "parameters")
    check_members_first(errors, "errors", n_members=parameters.shape[0], columns="N_obs")
    if errors.device != parameters.device:
        raise ValueError(f"errors: expected device {parameters.device} (the parameters'), got "
                         f"{errors.device}")
    if parameters.shape[0] < 3:
        raise ValueError(f"parameters: expected at least 3 members for a correlation, got "
                         f"{parameters.shape[0]}")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_finite(parameters, "parameters")
    check_finite(errors, "errors")
    d_s = _standardize(errors)                       # (E, M), unit-norm columns
    p = parameters.shape[1]
    step = p if chunk_size is None else chunk_size
    out = torch.empty(p, dtype=torch.float64, device=parameters.device)
    for start in range(0, p, max(step, 1)):
        a_s = _standardize(parameters[:, start:start + step])   # (E, c)
        r = a_s.T @ d_s                                          # (c, M): paper's r_ij
        r2 = (r * r).clamp_(max=R2_CAP)
        out[start:start + step] = -0.5 * torch.log1p(-r2).sum(dim=1) + 0.0  # no -0.0
    return out


def saliency(
    parameters: torch.Tensor,
    errors: torch.Tensor,
    *,
    chunk_size: int | None = 4096,
) -> torch.Tensor:
    """Predicted misfit increase from zeroing each parameter, from ensemble sensitivities
    (optimal-brain-damage saliency with the Gauss-Newton curvature [LeCun1990]).

    The ensemble regression of the errors on parameter ``i`` gives its sensitivity
    ``G_i = D^T a_i / (a_i^T a_i)`` (``a_i``: the centred column, ``D``: the centred errors).
    Zeroing the parameter moves the mean errors by about ``-m_i G_i`` (``m_i``: its ensemble
    mean), so with whitened errors the misfit ``1/2 ||e||^2`` grows by about

        S_i = 1/2 m_i^2 ||G_i||^2 = (m_i^2 / var_i) * 1/2 sum_j r_ij^2 var(e_j)

    (first order, dropping the cross term ``-m_i G_i . e_mean``, which vanishes at a fitted
    optimum). It is the significance ``m_i^2 / var_i`` times the squared correlations that
    enter eq. 12 (``r^2 ~ 2 I_ij`` for small ``r``), weighted by the error variances: Optimal
    Brain Damage without gradients. Chunked over parameters like
    :func:`mutual_information`; a column with no spread scores 0.

    Parameters
    ----------
    parameters : Tensor, shape (N_ens, N_par)
    errors : Tensor, shape (N_ens, N_obs)
        Whitened errors (the misfit's units).
    chunk_size : int or None

    Returns
    -------
    Tensor, shape (N_par,), float64
    """
    check_members_first(parameters, "parameters")
    check_members_first(errors, "errors", n_members=parameters.shape[0], columns="N_obs")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    d = errors.to(torch.float64)
    d = d - d.mean(dim=0, keepdim=True)
    p = parameters.shape[1]
    step = p if chunk_size is None else chunk_size
    out = torch.empty(p, dtype=torch.float64, device=parameters.device)
    for start in range(0, p, max(step, 1)):
        x = parameters[:, start:start + step].to(torch.float64)
        m = x.mean(dim=0)
        a = x - m
        aa = (a * a).sum(dim=0)
        g2 = ((a.T @ d) ** 2).sum(dim=1)                  # ||D^T a_i||^2
        ok = aa > 0
        val = 0.5 * m * m * g2 / torch.where(ok, aa * aa, torch.ones_like(aa))
        out[start:start + step] = torch.where(ok, val, torch.zeros_like(val))
    return out


def _check_mask(mask: Any, p: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(p, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor of shape ({p},) or None, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (p,):
        raise ValueError(f"mask: expected shape ({p},) (one flag per parameter), got "
                         f"{tuple(mask.shape)}")
    return mask.to(device)


def prune_mask(
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    fraction: float | None = None,
    n: int | None = None,
    min_live: int = 1,
) -> torch.Tensor:
    """Switch off the lowest-scoring live parameters.

    Parameters
    ----------
    scores : Tensor, shape (N_par,)
        E.g. :func:`mutual_information`; lower is pruned first. Ties go by column index
        (the earlier column is pruned first), so the result is deterministic.
    mask : bool Tensor, shape (N_par,), optional
        Live parameters now (default: all).
    fraction : float in [0, 1], optional
        Prune ``ceil(fraction * n_live)`` of the live parameters...
    n : int >= 0, optional
        ... or exactly this many (give one of ``fraction``/``n``).
    min_live : int >= 0
        Never leave fewer live parameters than this.

    Returns
    -------
    bool Tensor, shape (N_par,)
        The new mask (a new tensor; ``mask`` is not modified).

    >>> import torch
    >>> prune_mask(torch.tensor([0.5, 0.1, 2.0, 0.0]), n=2).tolist()
    [True, False, True, False]
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or \
            scores.ndim != 1:
        raise TypeError(f"scores: expected a 1-D floating tensor of shape (N_par,), got "
                        f"{getattr(scores, 'shape', type(scores).__name__)}")
    if torch.isnan(scores).any():
        raise ValueError("scores: expected no NaN")
    p = scores.shape[0]
    live = _check_mask(mask, p, scores.device)
    if (fraction is None) == (n is None):
        raise ValueError("prune_mask: give exactly one of fraction= or n=")
    if isinstance(min_live, bool) or not isinstance(min_live, Integral) or min_live < 0:
        raise ValueError(f"min_live: expected an int >= 0, got {min_live!r}")
    n_live = int(live.sum())
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, Real) or \
                not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
        k = math.ceil(float(fraction) * n_live - 1e-9)
    else:
        if isinstance(n, bool) or not isinstance(n, Integral) or n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        k = int(n)
    k = max(0, min(k, n_live - min_live))
    new = live.clone()
    if k == 0:
        return new
    idx = torch.nonzero(live).squeeze(1)
    s = scores[idx].to(torch.float64)
    # stable sort: equal scores keep column order
    order = torch.sort(s, stable=True).indices
    new[idx[order[:k]]] = False
    return new


def count_nonzero(module: nn.Module) -> int:
    """Number of nonzero entries over all parameters of ``module`` (weights and biases)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    return int(sum(int((p != 0).sum()) for p in module.parameters()))


# -- dead units ------------------------------------------------------------------------------

_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU,
                nn.Softplus, nn.Identity, nn.Dropout, nn.Hardtanh, nn.ReLU6, nn.Mish,
                nn.CELU, nn.SELU, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
_POOL = (nn.MaxPool2d, nn.AvgPool2d)


def _check_between(layer: nn.Module, where: str) -> None:
    if isinstance(layer, _ELEMENTWISE) or isinstance(layer, nn.Flatten):
        return
    if isinstance(layer, nn.MaxPool2d):
        return  # max over a constant window (padding is -inf) is that constant
    if isinstance(layer, nn.AvgPool2d):
        if layer.padding not in (0, (0, 0)) and layer.count_include_pad:
            raise TypeError(f"{where}: AvgPool2d with padding and count_include_pad=True does "
                            "not map a constant channel to a constant; unsupported")
        return
    raise TypeError(
        f"{where}: expected only nn.Linear / nn.Conv2d with elementwise activations "
        f"(ReLU, Tanh, ...), MaxPool2d/AvgPool2d, Flatten or Dropout between them, got "
        f"{type(layer).__name__}"
    )


def _constant_outputs(bias: torch.Tensor, chain: list[nn.Module], conv: bool) -> torch.Tensor:
    """What the elementwise ops of ``chain`` make of constant pre-activations ``bias``."""
    z = bias.detach().reshape(1, -1, 1, 1) if conv else bias.detach().reshape(1, -1)
    with torch.no_grad():
        for layer in chain:
            if isinstance(layer, _ELEMENTWISE) and not isinstance(layer, nn.Dropout):
                z = layer(z)
    return z.reshape(-1)


def _as_layers(module: nn.Module) -> list[nn.Module]:
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"module: expected an nn.Sequential of Linear/Conv2d layers and "
                        f"elementwise activations, got {type(module).__name__}")
    layers = list(module)
    flat: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.Sequential):
            flat.extend(_as_layers(layer))
        else:
            flat.append(layer)
    return flat


def remove_dead_units(module: nn.Sequential) -> nn.Sequential:
    """A smaller dense copy of a pruned ``nn.Sequential`` with the same outputs.

    A hidden unit (a feature of a ``Linear``, a channel of a ``Conv2d``) is removed when

    * it has no incoming weights (its weight row is all zero): its output is the constant
      ``act(b)``, which is folded into the next layer's bias (``b' = b + W[:, k] act(b_k)``;
      for a channel feeding ``Flatten`` + ``Linear``, summed over its ``H x W`` columns; for
      a channel feeding a ``Conv2d``, ``act(b_k)`` times the kernel sum -- exact only without
      padding, so with padding such a channel is kept unless ``act(b_k) == 0``); or
    * no outgoing weights use it (its column of the next layer is all zero).

    Repeated until nothing changes. Inputs and outputs of the network are never removed.

    Parameters
    ----------
    module : nn.Sequential
        ``Linear`` / ``Conv2d`` layers with elementwise activations, ``MaxPool2d``,
        ``AvgPool2d``, ``Flatten`` or ``Dropout`` between them (nested ``Sequential`` is
        flattened; any layer before the first or after the last weight layer, such as an
        ``Unflatten`` or a ``Softmax``, is kept as it is). Not modified.

    Returns
    -------
    nn.Sequential
        New layers (same dtype and device); outputs equal the input module's to round-off.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    >>> with torch.no_grad():
    ...     net[0].weight[1] = 0.0                 # unit 1: no incoming weights
    >>> small = remove_dead_units(net)
    >>> small[0].out_features, small[2].in_features
    (2, 2)
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> torch.allclose(small(x), net(x), rtol=0, atol=1e-14)
    True
    """
    layers = [copy.deepcopy(layer) for layer in _as_layers(module)]
    weighted = [i for i, layer in enumerate(layers) if isinstance(layer, (nn.Linear, nn.Conv2d))]
    if not weighted:
        raise TypeError("module: expected at least one nn.Linear or nn.Conv2d layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            if weighted[0] < i < weighted[-1]:   # before the first / after the last: any
                _check_between(layer, f"module[{i}]")
        elif isinstance(layer, nn.Conv2d) and (layer.groups != 1 or
                                               layer.padding_mode != "zeros"):
            raise TypeError(f"module[{i}]: expected Conv2d with groups=1 and zero padding")
    changed = True
    while changed:
        changed = False
        for a, b in zip(weighted[:-1], weighted[1:], strict=True):
            if _shrink_pair(layers, a, b):
                changed = True
    return nn.Sequential(*layers)


def _shrink_pair(layers: list[nn.Module], a: int, b: int) -> bool:
    """Remove the dead units between weight layers ``a`` and ``b``; True if any went."""
    first = cast("nn.Linear | nn.Conv2d", layers[a])
    nxt = cast("nn.Linear | nn.Conv2d", layers[b])
    chain = layers[a + 1:b]
    conv = isinstance(first, nn.Conv2d)
    n_units = int(first.out_channels if isinstance(first, nn.Conv2d) else first.out_features)
    w1 = first.weight.detach()
    w2u = _outgoing(nxt, chain, b, n_units, conv)
    in_dead = (w1.reshape(n_units, -1) == 0).all(dim=1)
    out_dead = (w2u.transpose(0, 1).reshape(n_units, -1) == 0).all(dim=1)
    bias1 = first.bias.detach() if first.bias is not None else w1.new_zeros(n_units)
    const = _constant_outputs(bias1, chain, conv)          # (units,)
    foldable = in_dead.clone()
    if conv and isinstance(nxt, nn.Conv2d) and nxt.padding not in (0, (0, 0), "valid"):
        foldable &= const == 0   # borders see zero padding: only an exact zero folds
    remove = out_dead | foldable
    if bool(remove.all()):
        remove[0] = False   # keep one unit (unfolded) so every layer stays a valid module
    if not bool(remove.any()):
        return False
    keep = ~remove
    with torch.no_grad():
        # fold the constant outputs of removed in-dead units into the next bias
        fold = remove & in_dead & ~out_dead & (const != 0)
        delta = None
        if bool(fold.any()):
            contrib = w2u[:, fold].reshape(w2u.shape[0], int(fold.sum()), -1).sum(dim=2)
            delta = contrib @ const[fold].to(contrib.dtype)        # (out,)
        new_first = _sub_layer(first, out_keep=keep)
        new_next = _sub_layer(nxt, in_keep=keep, spatial=(w2u.shape[2]
                                                           if conv and isinstance(nxt, nn.Linear)
                                                           else None))
        if delta is not None:
            if new_next.bias is None:
                new_next.bias = nn.Parameter(delta.clone())
            else:
                new_next.bias += delta
    layers[a], layers[b] = new_first, new_next
    return True


def _outgoing(nxt: nn.Linear | nn.Conv2d, chain: list[nn.Module], b: int, n_units: int,
              conv: bool) -> torch.Tensor:
    """The next layer's weights grouped by the previous layer's units: ``(out, unit, ...)``."""
    w2 = nxt.weight.detach()
    if conv and isinstance(nxt, nn.Linear):
        if not any(isinstance(m, nn.Flatten) for m in chain):
            raise TypeError(f"module[{b}]: a Linear after a Conv2d needs an nn.Flatten between")
        if nxt.in_features % n_units:
            raise TypeError(f"module[{b}]: in_features {nxt.in_features} is not a multiple of "
                            f"the {n_units} channels before it")
        return w2.reshape(w2.shape[0], n_units, nxt.in_features // n_units)  # (out, unit, H*W)
    if conv:
        return w2                                            # (out, unit, kh, kw)
    if isinstance(nxt, nn.Conv2d):
        raise TypeError(f"module[{b}]: a Conv2d after a Linear is not supported")
    return w2.unsqueeze(-1)                                  # (out, unit, 1)


def _sub_layer(layer: nn.Linear | nn.Conv2d, *, out_keep: torch.Tensor | None = None,
               in_keep: torch.Tensor | None = None, spatial: int | None = None
               ) -> nn.Linear | nn.Conv2d:
    """A copy of a Linear/Conv2d restricted to the kept output (or input) units."""
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if out_keep is not None:
        w = w[out_keep]
        b = b[out_keep] if b is not None else None
    if in_keep is not None:
        if spatial is not None:     # Flatten + Linear: each unit owns `spatial` columns
            cols = in_keep.repeat_interleave(spatial)
            w = w[:, cols]
        else:
            w = w[:, in_keep]
    new: nn.Linear | nn.Conv2d
    if isinstance(layer, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype,
                        device=w.device)
    else:
        new = nn.Conv2d(w.shape[1], w.shape[0], layer.kernel_size,  # type: ignore[arg-type]
                        stride=layer.stride, padding=layer.padding,  # type: ignore[arg-type]
                        dilation=layer.dilation,  # type: ignore[arg-type]
                        bias=b is not None, dtype=w.dtype, device=w.device)
    new.weight = nn.Parameter(w.clone(), requires_grad=layer.weight.requires_grad)
    if b is not None and layer.bias is not None:
        new.bias = nn.Parameter(b.clone(), requires_grad=layer.bias.requires_grad)
    return new
