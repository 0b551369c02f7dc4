"""``propagate(states, t0, t1, *, parameters, generator)`` of the simulator models: the
forecast step of a filter (``docs/filtering.md``)."""

from __future__ import annotations

import math

import pytest
import torch

from enkal.models import (
    RK4,
    BirthDeath,
    DormandPrince,
    Gillespie,
    Lorenz63,
    Lorenz96,
    OrnsteinUhlenbeck,
    TauLeaping,
)

F64 = torch.float64
THETA = torch.tensor([10.0, 28.0, 8.0 / 3.0], dtype=F64)


def test_rk4_propagate_is_the_forward_trajectory_bitwise():
    model = Lorenz63(t_obs=[0.5], solver=RK4(dt=0.01), x0=(1.0, 2.0, 3.0))
    forward = model(THETA.unsqueeze(0))  # x(0.5), all three components
    x = model.propagate(torch.tensor([[1.0, 2.0, 3.0]], dtype=F64), 0.0, 0.5,
                        parameters=THETA)
    assert torch.equal(x, forward)
    # an autonomous system: two legs give the same floating-point operations as one
    half = model.propagate(torch.tensor([[1.0, 2.0, 3.0]], dtype=F64), 0.0, 0.25,
                           parameters=THETA)
    assert torch.equal(model.propagate(half, 0.25, 0.5, parameters=THETA), x)
    assert torch.equal(model.propagate(x, 0.5, 0.5, parameters=THETA), x)


def test_lorenz96_one_rk4_step_by_hand():
    model = Lorenz96(t_obs=[0.05], n_sites=6, solver=RK4(dt=0.05))
    g = torch.Generator().manual_seed(0)
    x = 8.0 + torch.randn(3, 6, generator=g, dtype=F64)

    def f(v):
        return (torch.roll(v, -1, 1) - torch.roll(v, 2, 1)) * torch.roll(v, 1, 1) - v + 8.0

    k1 = f(x)
    k2 = f(x + 0.025 * k1)
    k3 = f(x + 0.025 * k2)
    k4 = f(x + 0.05 * k3)
    expected = x + 0.05 / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    got = model.propagate(x, 0.0, 0.05, parameters=[8.0])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)


def test_dormand_prince_propagate_matches_a_fine_rk4():
    # rtol 1e-9 for the adaptive solver; RK4 at dt = 1e-4 is accurate to ~1e-12 over 0.3
    # time units, so agreement to 1e-6 (relative) checks both without being flaky
    x0 = torch.tensor([[1.0, 2.0, 3.0], [-2.0, 0.5, 20.0]], dtype=F64)
    fine = Lorenz63(t_obs=[0.3], solver=RK4(dt=1e-4)).propagate(x0, 0.1, 0.3,
                                                                parameters=THETA)
    dp = Lorenz63(t_obs=[0.3], solver=DormandPrince(rtol=1e-9, atol=1e-12))
    torch.testing.assert_close(dp.propagate(x0, 0.1, 0.3, parameters=THETA), fine,
                               rtol=1e-6, atol=1e-8)


def test_per_member_parameters():
    model = Lorenz63(t_obs=[0.1], solver=RK4(dt=0.01))
    x0 = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64).expand(2, 3)
    theta = torch.stack([THETA, THETA * 1.1])
    both = model.propagate(x0, 0.0, 0.1, parameters=theta)
    one = model.propagate(x0[:1], 0.0, 0.1, parameters=theta[1])
    assert torch.equal(both[1:], one)
    assert not torch.equal(both[0], both[1])


def test_ornstein_uhlenbeck_transition_moments():
    # OU: x(t) | x(0) = x0 is N(mu + (x0 - mu) e^{-theta t}, sigma^2 (1 - e^{-2 theta t}) /
    # (2 theta)); Euler-Maruyama at dt = 0.001 biases both by O(dt) ~ 1e-3 relative. With
    # 20,000 members the mean's standard error is 0.005 and the variance's 1% of it: 5 of
    # them, plus the discretisation bias, bound the checks.
    model = OrnsteinUhlenbeck(t_obs=[1.0], dt=0.001)
    names = model.layout.names
    p = {"theta": 2.0, "mu": 1.0, "sigma": 0.5}
    theta = torch.tensor([p[n] for n in names], dtype=F64)
    g = torch.Generator().manual_seed(0)
    x = model.propagate(torch.full((20000, 1), 3.0, dtype=F64), 0.0, 0.5, parameters=theta,
                        generator=g)
    e = math.exp(-2.0 * 0.5)
    mean, var = 1.0 + 2.0 * e, 0.25 * (1 - e ** 2) / 4.0
    se = math.sqrt(var / 20000)
    assert abs(float(x.mean()) - mean) < 5 * se + 1e-3 * mean
    assert abs(float(x.var()) / var - 1) < 5 * math.sqrt(2 / 20000) + 1e-2
    g2 = torch.Generator().manual_seed(0)
    again = model.propagate(torch.full((20000, 1), 3.0, dtype=F64), 0.0, 0.5,
                            parameters=theta, generator=g2)
    assert torch.equal(x, again)


@pytest.mark.parametrize("solver", [Gillespie(), TauLeaping(tau=0.01)])
def test_birth_death_mean(solver):
    # immigration-death: E[x(t)] = b/d + (x0 - b/d) e^{-d t}; the variance at t = 1 is at most
    # b/d + x0 = 30, so the mean of 4000 members has a standard error below 0.09: 0.5 is
    # over 5 of them (tau-leaping at tau = 0.01 adds an O(tau) bias of ~0.1)
    model = BirthDeath(t_obs=[1.0], solver=solver)
    names = model.layout.names
    p = {"birth": 10.0, "death": 0.5}
    theta = torch.tensor([p[n] for n in names], dtype=F64)
    g = torch.Generator().manual_seed(1)
    x = model.propagate(torch.full((4000, 1), 10.0, dtype=F64), 0.0, 1.0, parameters=theta,
                        generator=g)
    expected = 20.0 + (10.0 - 20.0) * math.exp(-0.5)
    assert abs(float(x.mean()) - expected) < 0.5


def test_bad_input_is_refused():
    model = Lorenz63(t_obs=[0.1], solver=RK4(dt=0.01))
    x = torch.ones(2, 3, dtype=F64)
    with pytest.raises(TypeError, match="states"):
        model.propagate([[1.0, 2.0, 3.0]], 0.0, 0.1, parameters=THETA)
    with pytest.raises(ValueError, match=r"states: expected shape \(N_ens, d\) with d = 3"):
        model.propagate(torch.ones(2, 4, dtype=F64), 0.0, 0.1, parameters=THETA)
    with pytest.raises(ValueError, match="parameters"):
        model.propagate(x, 0.0, 0.1)
    with pytest.raises(ValueError, match="parameters"):
        model.propagate(x, 0.0, 0.1, parameters=torch.ones(3, 3, dtype=F64))
    with pytest.raises(ValueError, match="t1"):
        model.propagate(x, 0.1, 0.0, parameters=THETA)
    with pytest.raises(ValueError, match="t1: a fixed-step solver"):
        model.propagate(x, 0.0, 0.015, parameters=THETA)
    with pytest.raises(ValueError, match="'sigma' must be >= 0"):
        model.propagate(x, 0.0, 0.1, parameters=-THETA)
    ou = OrnsteinUhlenbeck(t_obs=[1.0], dt=0.01)
    with pytest.raises(ValueError, match="generator"):
        ou.propagate(torch.ones(2, 1, dtype=F64), 0.0, 0.1, parameters=torch.ones(3))


def test_a_list_of_parameters_is_read_in_float64():
    # torch.as_tensor([8 / 3]) is float32: 8/3 would be rounded before the float64 model ran
    model = Lorenz63(t_obs=[0.1], solver=RK4(dt=0.01))
    x0 = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    assert torch.equal(model.propagate(x0, 0.0, 0.1, parameters=[10.0, 28.0, 8.0 / 3.0]),
                       model.propagate(x0, 0.0, 0.1, parameters=THETA))
