"""Statistics of the stochastic models and their random streams, against closed forms.

Tolerances. A sample mean of ``N`` independent draws with variance ``v`` has standard error
``sqrt(v / N)``; a sample variance has standard error ``sqrt((mu_4 - v^2) / N)`` (``mu_4``
the fourth central moment: ``3 v^2`` for a normal, ``lam (1 + 3 lam)`` for a Poisson).
Each check allows 4 standard errors (a false alarm about once in 16 000 checks for a fresh
seed; the seeds are fixed, so the tests are deterministic) plus the *known* discretisation
bias of the scheme where it has one, computed in closed form rather than guessed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import enkal
from enkal.models import (
    BirthDeath,
    GeometricBrownianMotion,
    Gillespie,
    JumpModel,
    OrnsteinUhlenbeck,
    SDEModel,
    StochasticLorenz63,
    StochasticSIR,
    TauLeaping,
)
from enkal.models._random import poisson, standard_normal, stream_keys, uniform
from enkal.models.ode import lorenz63_rhs

Z = 4.0  # standard errors allowed


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads


def _replicates(theta, n):
    return torch.tensor([theta], dtype=torch.float64).expand(n, -1)


def _check_mean_var(sample, mean, var, *, mean_bias=0.0, var_bias=0.0, kurtosis=3.0):
    n = sample.numel()
    se_mean = math.sqrt(var / n)
    se_var = math.sqrt((kurtosis - 1.0) * var * var / n)
    m, v = float(sample.mean()), float(sample.var())
    assert abs(m - mean) <= Z * se_mean + abs(mean_bias), (m, mean, se_mean, mean_bias)
    assert abs(v - var) <= Z * se_var + abs(var_bias), (v, var, se_var, var_bias)


# -- random streams ---------------------------------------------------------------------

def test_uniforms_normals_and_poisson_have_the_right_law():
    n = 20000
    keys = stream_keys(torch.zeros(n, 1, dtype=torch.float64), seed=11, row_streams=True)
    for dtype in (torch.float64, torch.float32):
        u = uniform(keys, 7, dtype)
        assert u.dtype == dtype and bool(((u > 0) & (u < 1)).all())
        # Kolmogorov-Smirnov at level 1e-3: critical value 1.95 / sqrt(n)
        assert stats.kstest(u.double().numpy(), "uniform").statistic < 1.95 / math.sqrt(n)
        z = standard_normal(keys, 3, 3, dtype)
        assert z.shape == (n, 3) and z.dtype == dtype
        for c in range(3):
            assert stats.kstest(z[:, c].double().numpy(), "norm").statistic < 1.95 / math.sqrt(n)
        # components and members are uncorrelated: |r| ~ N(0, 1/n)
        r = np.corrcoef(z.double().T.numpy())
        assert np.abs(r - np.eye(3)).max() < Z / math.sqrt(n)
    # float32 and float64 see the same numbers to float32 resolution: uniforms to 2^-23,
    # normals to ~1e-4 (relative 1e-3 in the far tails, where sqrt(-2 log u1) amplifies the
    # 2^-23 quantisation of a small u1)
    torch.testing.assert_close(uniform(keys, 3, torch.float32).double(),
                               uniform(keys, 3, torch.float64), rtol=0, atol=2.0 ** -23)
    torch.testing.assert_close(standard_normal(keys, 0, 2, torch.float32).double(),
                               standard_normal(keys, 0, 2, torch.float64), rtol=1e-3, atol=1e-4)
    counter = torch.arange(n)
    for lam in (0.0, 0.3, 4.0, 9.99, 10.0, 45.0, 1e4):
        k = poisson(keys, counter, torch.full((n,), lam, dtype=torch.float64))
        assert bool((k == torch.round(k)).all()) and bool((k >= 0).all())
        if lam == 0.0:
            assert bool((k == 0).all())
            continue
        _check_mean_var(k, lam, lam, kurtosis=3.0 + 1.0 / lam)


def test_stream_keys_follow_the_documented_rules():
    theta = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    by_par = stream_keys(theta, seed=5)
    assert by_par[0] == by_par[1] != by_par[2]
    assert torch.equal(stream_keys(theta[[2, 0]], seed=5), by_par[[2, 0]])
    assert torch.equal(stream_keys(theta.float(), seed=5), by_par)  # the values, not the dtype
    assert not torch.equal(stream_keys(theta, seed=6), by_par)
    rows = stream_keys(theta, seed=5, row_streams=True)
    assert len(set(rows.tolist())) == 3
    assert torch.equal(stream_keys(theta[:2], seed=5, row_streams=True), rows[:2])
    assert stream_keys(theta, seed=5, common_noise=True).shape == (1,)


# -- SDEs -------------------------------------------------------------------------------

def test_ornstein_uhlenbeck_transient_and_stationary_moments():
    theta_, mu, sigma, x0, dt = 1.0, 0.5, 0.7, 2.0, 0.01
    t_obs = [0.5, 1.0, 6.0]
    n = 8000
    model = OrnsteinUhlenbeck(t_obs, dt=dt, x0=x0, seed=2, row_streams=True)
    y = model(_replicates([theta_, mu, sigma], n))
    a = 1.0 - theta_ * dt  # Euler-Maruyama: X_{k+1} - mu = a (X_k - mu) + sigma sqrt(dt) Z
    for i, t in enumerate(t_obs):
        k = round(t / dt)
        mean = mu + (x0 - mu) * math.exp(-theta_ * t)
        var = sigma ** 2 / (2 * theta_) * (1 - math.exp(-2 * theta_ * t))
        em_mean = mu + (x0 - mu) * a ** k
        em_var = sigma ** 2 * dt * (1 - a ** (2 * k)) / (1 - a * a)
        _check_mean_var(y[:, i], mean, var, mean_bias=em_mean - mean, var_bias=em_var - var)
    # t = 6: stationary to e^-12, mean mu and variance sigma^2 / (2 theta)
    assert abs(float(y[:, 2].mean()) - mu) < Z * math.sqrt(sigma ** 2 / 2 / n)


def test_geometric_brownian_motion_mean():
    mu, sigma, dt, t = 0.1, 0.3, 0.01, 1.0
    n = 8000
    model = GeometricBrownianMotion([t], dt=dt, seed=4, row_streams=True)
    y = model(_replicates([mu, sigma], n))[:, 0]
    mean = math.exp(mu * t)
    var = math.exp(2 * mu * t) * (math.exp(sigma ** 2 * t) - 1)
    em_bias = (1 + mu * dt) ** round(t / dt) - mean  # E of Euler-Maruyama: s0 (1 + mu dt)^k
    se = math.sqrt(var / n)
    assert abs(float(y.mean()) - mean) <= Z * se + abs(em_bias)


def test_sde_with_zero_noise_is_euler_for_the_ode():
    theta = torch.tensor([[10.0, 28.0, 8 / 3], [9.0, 25.0, 2.0]], dtype=torch.float64)
    quiet = StochasticLorenz63([0.2], dt=0.001, noise_scale=0.0, row_streams=True)
    y = quiet(theta[[0, 0, 1]])
    assert torch.equal(y[0], y[1])
    # with s = 0 Euler-Maruyama is forward Euler, to the bit (the noise term adds +-0.0)
    x = torch.ones(2, 3, dtype=torch.float64)
    p = enkal.ParameterLayout(["sigma", "rho", "beta"]).unflatten(theta)
    for _ in range(200):
        x = x + lorenz63_rhs(None, x, p) * 0.001
    assert torch.equal(y[[0, 2]], x)


def test_common_noise_couples_members():
    # with common noise, two OU members differing only in mu differ by a deterministic amount
    model = OrnsteinUhlenbeck([1.0], dt=0.01, seed=1, common_noise=True)
    y = model(torch.tensor([[1.0, 0.0, 0.5], [1.0, 1.0, 0.5]], dtype=torch.float64))
    # X(mu) = mu (1 - a^k) + common noise term: the difference is 1 - (1 - theta dt)^100
    assert abs(float(y[1, 0] - y[0, 0]) - (1 - 0.99 ** 100)) < 1e-12


def test_brownian_motion_template_from_the_generic_class():
    layout = enkal.ParameterLayout(["a", ("s", (), enkal.Positive())])
    bm = SDEModel(lambda t, x, p: p["a"][:, None].expand_as(x),
                  lambda t, x, p: p["s"][:, None].expand_as(x), layout, [0.0, 0.0], [2.0],
                  dt=0.05, seed=0, row_streams=True)
    y = bm(_replicates([0.5, 2.0], 6000))
    # Euler-Maruyama is exact for Brownian motion: N(a t, s^2 t) in each component
    for c in range(2):
        _check_mean_var(y[:, c], 1.0, 8.0)
    assert abs(float(np.corrcoef(y.T.numpy())[0, 1])) < Z / math.sqrt(6000)


# -- jump processes ---------------------------------------------------------------------

@pytest.mark.parametrize("solver", [Gillespie(), TauLeaping(tau=0.05)], ids=["ssa", "tau"])
def test_birth_death_is_poisson(solver):
    birth, death = 10.0, 1.0
    t_obs = [0.5, 2.0, 10.0]
    n = 4000
    model = BirthDeath(t_obs, solver=solver, seed=7, row_streams=True)
    y = model(_replicates([birth, death], n))
    assert bool((y == torch.round(y)).all()) and bool((y >= 0).all())
    for i, t in enumerate(t_obs):
        # exact: X_t ~ Poisson(lam_t), lam_t = birth/death (1 - e^{-death t}) from X_0 = 0;
        # t = 10 is the stationary Poisson(birth/death) to e^-10
        lam = birth / death * (1 - math.exp(-death * t))
        mean_bias = var_bias = 0.0
        if isinstance(solver, TauLeaping):
            # tau-leaping is linear in the mean: m_{k+1} = m_k + (birth - death m_k) tau, and
            # v_{k+1} = (1 - death tau)^2 v_k + (birth + death m_k) tau (clipping at 0 has
            # probability ~e^-lam, negligible here); iterate the recursions exactly
            tau, m, v = solver.tau, 0.0, 0.0
            for _ in range(round(t / tau)):
                m, v = m + (birth - death * m) * tau, (1 - death * tau) ** 2 * v \
                    + (birth + death * m) * tau
            mean_bias, var_bias = m - lam, v - lam
        _check_mean_var(y[:, i], lam, lam, mean_bias=mean_bias, var_bias=var_bias,
                        kurtosis=3.0 + 1.0 / lam)


def test_ssa_from_equilibrium_stays_stationary_and_zero_rates_stop():
    model = BirthDeath([1.0, 5.0], x0=20, seed=1, row_streams=True)
    y = model(_replicates([20.0, 1.0], 3000))
    # from x0 = 20 the mean stays 20 (the variance relaxes from 0 to 20: check the mean only)
    assert abs(float(y[:, 1].mean()) - 20.0) < Z * math.sqrt(20.0 / 3000) + 20 * math.exp(-5)
    # no birth, no one left: all propensities zero, the member simply stops
    frozen = BirthDeath([1.0, 2.0], x0=0)(torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    assert frozen.tolist() == [[0.0, 0.0]]


def test_gillespie_max_events_fails_the_member():
    model = BirthDeath([5.0], solver=Gillespie(max_events=30), seed=0)
    y, ok = enkal.evaluate(model, torch.tensor([[100.0, 1.0], [1.0, 1.0]], dtype=torch.float64))
    assert ok.tolist() == [False, True]


def test_stochastic_sir_conserves_the_population_and_tracks_the_ode():
    n_pop = 500
    model = StochasticSIR([1.0, 3.0, 6.0], population=n_pop, infected=50, observe=None,
                          seed=0, row_streams=True)
    theta = [1.5, 0.5]
    y = model(_replicates(theta, 60)).reshape(60, 3, 3)
    assert bool((y.sum(-1) == n_pop).all()) and bool((y >= 0).all())
    ode = enkal.models.SIR([1.0, 3.0, 6.0], infected=0.1, solver=enkal.models.RK4(dt=0.01))
    i_ode = ode(torch.tensor([theta], dtype=torch.float64))[0]
    # the mean-field limit: the infected fraction's ensemble mean follows the ODE up to
    # O(1/sqrt(N)) fluctuations (sd of one member's fraction here ~0.033, so ~0.0043 for the
    # mean of 60: 4 SE = 0.017) plus an O(1/N) drift; 0.03 covers both
    i_mean = y[:, :, 1].mean(0) / n_pop
    assert (i_mean - i_ode).abs().max() < 0.03


def test_tau_leaping_clips_at_zero_and_counts_stay_integers():
    # pure death with a large leap: Poisson overshoots are clipped at 0
    death = JumpModel([[-1]], lambda x, p: p["k"][:, None] * x,
                      enkal.ParameterLayout([("k", (), enkal.Positive())]), [5], [1.0, 2.0],
                      solver=TauLeaping(tau=0.5), row_streams=True)
    y = death(torch.full((200, 1), 3.0, dtype=torch.float64))
    assert bool((y >= 0).all()) and bool((y == torch.round(y)).all())
