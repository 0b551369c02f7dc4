"""Mutual information (IEKL eq. 12), pruning masks and dead-unit removal.

Tolerances. For a sample correlation ``r_hat`` from ``E`` jointly Gaussian pairs,
``sd(r_hat) ~ (1 - r^2) / sqrt(E)`` and ``dI/dr = r / (1 - r^2)``, so the Monte-Carlo standard
error of ``I_ij = -1/2 log(1 - r_hat^2)`` is about ``|r| / sqrt(E)`` (delta method; for
``r = 0`` the estimate is ``~ chi2_1 / (2E)``, mean ``1/(2E)``). A sum over ``M`` error
dimensions is off by at most the sum of the pairs' errors; the tests allow 5 standard errors
plus ``M / E`` for the ``O(1/E)`` bias. Exact identities (chunked == unchunked, invariances,
dead-unit removal) are checked in float64 at round-off tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from enkal import mutual_information, prune_mask, remove_dead_units
from enkal.information import R2_CAP, count_nonzero

DT = torch.float64


def _gaussian_pairs(seed: int, n_par: int, n_obs: int, n_members: int):
    """An ensemble of jointly Gaussian (parameters, errors) and their exact correlations."""
    g = torch.Generator().manual_seed(seed)
    d = n_par + n_obs
    a = torch.randn(d, d, generator=g, dtype=DT)
    cov = a @ a.T / d + 0.2 * torch.eye(d, dtype=DT)
    std = cov.diagonal().sqrt()
    corr = cov / std[:, None] / std[None, :]
    z = torch.randn(n_members, d, generator=g, dtype=DT) @ torch.linalg.cholesky(cov).T
    z = z + torch.randn(d, generator=g, dtype=DT) * 5.0   # a mean does not matter
    return z[:, :n_par], z[:, n_par:], corr[:n_par, n_par:]


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_gaussian_closed_form(seed):
    e_n, p, m = 20_000, 6, 4
    x, err, r = _gaussian_pairs(seed, p, m, e_n)
    exact = (-0.5 * torch.log1p(-r * r)).sum(dim=1)
    mi = mutual_information(x, err)
    tol = 5 * r.abs().sum(dim=1) / math.sqrt(e_n) + m / e_n   # see the module docstring
    assert mi.shape == (p,) and mi.dtype == DT
    assert bool(((mi - exact).abs() <= tol).all()), (mi - exact, tol)


def test_independent_parameter_scores_near_zero():
    # r = 0: E[I] = 1/(2E) per error dimension; 20 dims -> about 20/(2E), sd about the same
    g = torch.Generator().manual_seed(3)
    e_n, m = 5000, 20
    x = torch.randn(e_n, 1, generator=g, dtype=DT)
    err = torch.randn(e_n, m, generator=g, dtype=DT)
    mi = float(mutual_information(x, err)[0])
    assert 0 <= mi < 10 * m / (2 * e_n)


@given(p=st.integers(1, 40), m=st.integers(1, 12), e=st.integers(3, 30),
       chunk=st.integers(1, 50), seed=st.integers(0, 2**16))
@example(p=16, m=12, e=3, chunk=1, seed=3)
def test_chunked_equals_unchunked(p, m, e, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(e, p, generator=g, dtype=DT)
    err = torch.randn(e, m, generator=g, dtype=DT) + x[:, :1]
    whole = mutual_information(x, err, chunk_size=None)
    # I_ij = -1/2 log(1 - r^2): a rounding dr of r moves it by r dr / (1 - r^2). The chunked
    # and the whole products round r differently (|dr| ~ 1e-16 per unit of E), and near
    # |r| = 1 (frequent with E = 3 members) that is amplified by up to 1e12 (R2_CAP): so the
    # tolerance per parameter is 1e-14 sum_j 1 / (1 - r_ij^2), at least 1e-12.
    # (seed 3, p 16, m 12, e 3 differs by 2e-11 where 1 - r^2 ~ 1e-5: it failed at 1e-12.)
    r = torch.corrcoef(torch.cat([x, err], dim=1).T)[:p, p:]
    gain = (1.0 / (1.0 - r.square()).clamp_min(1e-12)).sum(dim=1)
    diff = (mutual_information(x, err, chunk_size=chunk) - whole).abs()
    assert bool((diff <= torch.clamp(1e-14 * gain, min=1e-12)).all()), float(diff.max())
    assert bool((whole >= 0).all()) and bool(torch.isfinite(whole).all())


def test_invariant_to_affine_maps_and_member_order():
    x, err, _ = _gaussian_pairs(7, 5, 3, 200)
    base = mutual_information(x, err)
    scale = torch.tensor([2.0, -0.5, 1e3, 1e-3, -7.0], dtype=DT)
    assert torch.allclose(mutual_information(x * scale + 11.0, -3.0 * err + 1.0), base,
                          rtol=1e-10, atol=1e-12)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mutual_information(x[perm], err[perm]), base, rtol=1e-12,
                          atol=1e-13)


def test_float32_input_is_accumulated_in_float64():
    x, err, _ = _gaussian_pairs(1, 4, 3, 500)
    mi32 = mutual_information(x.float(), err.float())
    assert mi32.dtype == DT
    # float32 inputs carry ~1e-7 relative error into each correlation
    assert torch.allclose(mi32, mutual_information(x, err), rtol=1e-4, atol=1e-5)


def test_safe_as_r_squared_goes_to_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g, dtype=DT)
    err = torch.cat([x[:, :1] * 2.0 + 1.0, -x[:, :1]], dim=1)   # |r| = 1 exactly
    mi = mutual_information(x, err)
    cap = -0.5 * math.log1p(-R2_CAP)
    assert bool(torch.isfinite(mi).all())
    assert math.isclose(float(mi[0]), 2 * cap, rel_tol=1e-3)
    # nearly dependent (r^2 = 1 - 1e-8): still finite, near -1/2 log(1e-8) per dimension
    near = x[:, :1] + 1e-4 * torch.randn(50, 1, generator=g, dtype=DT)
    assert 8.0 < float(mutual_information(near, x[:, :1])[0]) < 13.9


def test_zero_mi_parameters_rank_last():
    g = torch.Generator().manual_seed(2)
    e_n = 400
    x = torch.randn(e_n, 6, generator=g, dtype=DT)
    x[:, 1] = 0.0          # pruned
    x[:, 4] = 3.25         # collapsed: no spread
    err = x[:, [0, 2, 3, 5]] @ torch.randn(4, 8, generator=g, dtype=DT) \
        + 0.1 * torch.randn(e_n, 8, generator=g, dtype=DT)
    mi = mutual_information(x, err)
    assert float(mi[1]) == 0.0 and float(mi[4]) == 0.0
    assert float(mi[[0, 2, 3, 5]].min()) > 0.05
    assert prune_mask(mi, n=2).tolist() == [True, False, True, True, False, True]
    # ties between the zero scores go by column index
    assert prune_mask(mi, n=1).tolist() == [True, False, True, True, True, True]


def test_input_validation():
    x = torch.randn(10, 3, dtype=DT)
    err = torch.randn(10, 4, dtype=DT)
    with pytest.raises(ValueError, match="errors"):
        mutual_information(x, err.T)                 # (N_obs, N_ens): members first
    with pytest.raises(TypeError, match="parameters"):
        mutual_information(x.long(), err)
    with pytest.raises(TypeError, match="errors"):
        mutual_information(x, err.numpy())
    with pytest.raises(ValueError, match="3 members"):
        mutual_information(x[:2], err[:2])
    bad = err.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="errors"):
        mutual_information(x, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        mutual_information(x, err, chunk_size=0)


def test_inputs_are_not_modified():
    x, err, _ = _gaussian_pairs(0, 3, 2, 50)
    x0, e0 = x.clone(), err.clone()
    mutual_information(x, err, chunk_size=2)
    assert torch.equal(x, x0) and torch.equal(err, e0)


# -- prune_mask ------------------------------------------------------------------------------
def test_prune_mask_fraction_n_min_live_and_purity():
    scores = torch.tensor([0.3, 0.1, 0.9, 0.2, 0.5, 0.0], dtype=DT)
    mask = torch.tensor([True, True, True, True, True, False])
    new = prune_mask(scores, mask, fraction=0.4)      # ceil(0.4 * 5) = 2 of the live
    assert new.tolist() == [True, False, True, False, True, False]
    assert mask.tolist() == [True] * 5 + [False]       # not modified
    assert prune_mask(scores, mask, n=10, min_live=2).sum() == 2
    assert prune_mask(scores, mask, n=0).tolist() == mask.tolist()
    assert prune_mask(scores, fraction=1.0, min_live=0).sum() == 0
    with pytest.raises(ValueError, match="exactly one"):
        prune_mask(scores, fraction=0.1, n=1)
    with pytest.raises(ValueError, match="fraction"):
        prune_mask(scores, fraction=1.5)
    with pytest.raises(ValueError, match="n:"):
        prune_mask(scores, n=-1)
    with pytest.raises(ValueError, match="mask"):
        prune_mask(scores, torch.ones(4, dtype=torch.bool), n=1)
    with pytest.raises(TypeError, match="mask"):
        prune_mask(scores, torch.ones(6), n=1)
    with pytest.raises(TypeError, match="scores"):
        prune_mask(torch.ones(3, 2), n=1)


# -- dead units ------------------------------------------------------------------------------
def _mlp(seed: int, sizes=(5, 16, 12, 3), act=nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def _prune_random(net: nn.Module, keep: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                mod.weight.mul_((torch.rand(mod.weight.shape, generator=g) < keep).to(DT))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.Sigmoid, nn.GELU])
def test_dead_units_mlp_preserves_outputs(act):
    net = _mlp(0, act=act)
    with torch.no_grad():
        net[0].weight[[1, 4, 7]] = 0.0          # no incoming weights: constant act(b)
        net[2].weight[:, 9] = 0.0               # unit 9 of layer 1: no outgoing weights
        net[2].weight[[0, 5]] = 0.0
    x = torch.randn(64, 5, dtype=DT, generator=torch.Generator().manual_seed(1))
    before = net(x)
    small = remove_dead_units(net)
    assert small[0].out_features == 12 and small[2].in_features == 12
    assert small[2].out_features == 10 and small[4].in_features == 10
    assert _rel_err(small(x), before) < 1e-14          # float64 round-off
    assert torch.equal(net(x), before)                 # the input module is untouched
    assert count_nonzero(small) < count_nonzero(net)


@given(keep=st.floats(0.05, 0.6), seed=st.integers(0, 2**16))
def test_dead_units_random_sparse_mlp(keep, seed):
    net = _mlp(seed % 7, sizes=(4, 10, 10, 8, 2), act=nn.ReLU)
    _prune_random(net, keep, seed)
    x = torch.randn(32, 4, dtype=DT, generator=torch.Generator().manual_seed(seed))
    small = remove_dead_units(net)
    assert torch.allclose(small(x), net(x), rtol=1e-13, atol=1e-13)
    assert sum(p.numel() for p in small.parameters()) <= sum(p.numel() for p in net.parameters())
    assert small[0].in_features == 4 and small[-1].out_features == 2


def _lenet(seed: int, padding: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2 if padding == 0 else 8 * 2 * 2, 10), nn.ReLU(),
        nn.Linear(10, 3),
    ).double()


def test_dead_conv_channels_fold_into_the_next_layer():
    net = _lenet(0)
    with torch.no_grad():
        net[0].weight[[1, 4]] = 0.0            # dead channels feeding a conv (no padding)
        net[0].bias[1] = 0.7                   # ReLU(0.7) = 0.7: folded via the kernel sum
        net[3].weight[[2, 5]] = 0.0            # dead channels feeding Flatten + Linear
        net[7].weight[:, 0:4] = 0.0            # channel 0 of conv 2: no outgoing weights
    x = torch.randn(16, 1, 14, 14, dtype=DT, generator=torch.Generator().manual_seed(2))
    small = remove_dead_units(net)
    assert small[0].out_channels == 4 and small[3].in_channels == 4
    assert small[3].out_channels == 5 and small[7].in_features == 5 * 4
    assert _rel_err(small(x), net(x)) < 1e-14


def test_padded_conv_keeps_a_dead_channel_with_nonzero_output():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Sigmoid(), nn.Conv2d(3, 2, 3, padding=1),
                        nn.Flatten(), nn.Linear(2 * 8 * 8, 1)).double()
    with torch.no_grad():
        net[0].weight[0] = 0.0                 # sigmoid(b) != 0 meets zero padding
    x = torch.randn(4, 1, 10, 10, dtype=DT)
    small = remove_dead_units(net)
    assert small[0].out_channels == 3          # kept: folding would be wrong at the borders
    assert _rel_err(small(x), net(x)) < 1e-14


def test_all_units_dead_leaves_a_constant_network():
    net = _mlp(3, sizes=(3, 4, 2), act=nn.Tanh)
    with torch.no_grad():
        net[0].weight.zero_()
    x = torch.randn(5, 3, dtype=DT)
    small = remove_dead_units(net)
    assert small[0].out_features == 1
    assert _rel_err(small(x), net(x)) < 1e-14


def test_dead_units_rejects_unsupported_layers():
    with pytest.raises(TypeError, match="Sequential"):
        remove_dead_units(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Softmax"):
        remove_dead_units(nn.Sequential(nn.Linear(2, 3), nn.Softmax(dim=1), nn.Linear(3, 1)))
    with pytest.raises(TypeError, match="BatchNorm1d"):
        remove_dead_units(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)))


def test_layers_outside_the_weight_layers_are_kept():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 4, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.Softmax(dim=1)).double()
    with torch.no_grad():
        net[1].weight[2] = 0.0
    x = torch.randn(3, 36, dtype=DT)
    small = remove_dead_units(net)
    assert small[1].out_channels == 3 and isinstance(small[-1], nn.Softmax)
    assert _rel_err(small(x), net(x)) < 1e-14


def test_saliency_is_exact_for_uncorrelated_linear_columns():
    # columns made exactly uncorrelated over the ensemble: the marginal regression is exact,
    # so S_i = 1/2 m_i^2 ||H_i||^2 for whitened errors e = X H^T - y
    from enkal.information import saliency

    g = torch.Generator().manual_seed(0)
    e_n = 50
    q, _ = torch.linalg.qr(torch.randn(e_n, 4, generator=g, dtype=DT)
                           - torch.randn(e_n, 4, generator=g, dtype=DT).mean(0))
    a = q - q.mean(0)
    q2, _ = torch.linalg.qr(a)                    # orthonormal and centred columns
    mean = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=DT)
    x = q2 * torch.tensor([0.3, 1.0, 2.0, 0.1], dtype=DT) + mean
    h = torch.randn(6, 4, generator=g, dtype=DT)
    s = saliency(x, x @ h.T - 1.0, chunk_size=3)
    assert torch.allclose(s, 0.5 * mean**2 * (h**2).sum(0), rtol=1e-10, atol=1e-12)
    x[:, 3] = 0.0
    assert float(saliency(x, x @ h.T)[3]) == 0.0
