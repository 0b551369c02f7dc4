"""``propagate(states, t0, t1, *, parameters, generator)`` of the simulator models: the
forecast step of a filter (``docs/filtering.md``)."""

from __future__ import annotations

import math

import pytest
import torch

from enkal import ParameterLayout
from enkal.models import (
    RK4,
    BirthDeath,
    DormandPrince,
    Gillespie,
    Lorenz63,
    Lorenz96,
    ODEModel,
    OrnsteinUhlenbeck,
    PolynomialODE,
    SDEModel,
    TauLeaping,
)
from enkal.models.polynomial import lorenz63_coefficients

F64 = torch.float64
THETA = torch.tensor([10.0, 28.0, 8.0 / 3.0], dtype=F64)
X0 = torch.tensor([[1.0, 2.0, 3.0], [-2.0, 0.5, 20.0]], dtype=F64)


class _Forced:
    """A damped oscillator driven by ``sin(3 t)``, which notes the times it is evaluated at."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, t, x, p):
        self.times.append(float(t[0, 0]))
        return torch.stack([x[:, 1], -p["k"] * x[:, 0] - 0.1 * x[:, 1]
                            + torch.sin(3.0 * t[:, 0])], dim=1)


def _forced_model(t0=0.1, t_obs=(0.15, 0.4, 0.7)):
    return ODEModel(_Forced(), ParameterLayout(["k"]), [1.0, 0.0], list(t_obs), t0=t0,
                    solver=RK4(dt=0.01), state_names=("x", "v"))


# -- RK4: bitwise the forward's steps ---------------------------------------------------

def test_rk4_propagate_is_the_forward_trajectory_bitwise():
    model = Lorenz63(t_obs=[0.2, 0.5], solver=RK4(dt=0.01), x0=(1.0, 2.0, 3.0))
    forward = model(THETA.unsqueeze(0)).reshape(1, 2, 3)  # x(0.2), x(0.5): (x, y, z) each
    start = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    for i, t in enumerate(model.t_obs):
        assert torch.equal(model.propagate(start, 0.0, t, parameters=THETA), forward[:, i])
    # two legs give the same floating-point operations as one
    half = model.propagate(X0, 0.0, 0.2, parameters=THETA)
    whole = model.propagate(X0, 0.0, 0.5, parameters=THETA)
    assert torch.equal(model.propagate(half, 0.2, 0.5, parameters=THETA), whole)


def test_rk4_time_dependent_rhs_sees_the_forward_times():
    # The model's grid is 0.1 + k * 0.01. A leg starting at 0.15 must evaluate the rhs at
    # 0.1 + (5 + k) * 0.01, the forward's floats, not at 0.15 + k * 0.01: they differ by an
    # ulp now and then (checked first, so the comparison of times below can fail).
    assert any(0.15 + k * 0.01 != 0.1 + (5 + k) * 0.01 for k in range(55))
    model = _forced_model()
    k = torch.tensor([[2.0]], dtype=F64)
    forward = model(k).reshape(1, 3, 2)
    seen_by_forward, model.rhs.times = model.rhs.times, []
    x = torch.tensor([[1.0, 0.0]], dtype=F64)
    legs = []
    for t_from, t_to in [(0.1, 0.15), (0.15, 0.4), (0.4, 0.7)]:
        x = model.propagate(x, t_from, t_to, parameters=k[0])
        legs.append(x)
    assert model.rhs.times == seen_by_forward  # the same floats, in the same order
    assert torch.equal(torch.stack(legs, dim=1), forward)
    assert torch.equal(model.propagate(torch.tensor([[1.0, 0.0]], dtype=F64), 0.1, 0.7,
                                       parameters=k[0]), forward[:, 2])


def test_rk4_off_grid_start_takes_a_grid_of_its_own():
    # t0 = 0.105 is half a step off the model's grid: the steps are 0.105 + k * 0.01, exactly
    # those of a model that starts there
    x = torch.tensor([[1.0, 0.0], [0.5, -1.0]], dtype=F64)
    got = _forced_model().propagate(x, 0.105, 0.125, parameters=[2.0])
    ref = _forced_model(t0=0.105, t_obs=[0.125])
    assert torch.equal(got[:1], ref(torch.tensor([[2.0]], dtype=F64)))


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
    # the same expression (bitwise today); 1e-12 allows a reordering of the rhs (a few ulp
    # of |x| ~ 10, 2e-15 each) while a wrong stage, weight or neighbour moves x by O(dt |f|)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_per_member_parameters():
    model = Lorenz63(t_obs=[0.1], solver=RK4(dt=0.01))
    x0 = X0[:1].expand(2, 3)
    theta = torch.stack([THETA, THETA * 1.1])
    both = model.propagate(x0, 0.0, 0.1, parameters=theta)
    one = model.propagate(x0[:1], 0.0, 0.1, parameters=theta[1])
    assert torch.equal(both[1:], one)
    assert not torch.equal(both[0], both[1])


def test_polynomial_library_propagates_as_lorenz63():
    poly = PolynomialODE([[1.0, 1.0, 1.0]], [0.2], solver=RK4(dt=0.01))
    got = poly.propagate(X0, 0.0, 0.2, parameters=lorenz63_coefficients(poly))
    ref = Lorenz63(t_obs=[0.2], solver=RK4(dt=0.01)).propagate(X0, 0.0, 0.2,
                                                               parameters=THETA)
    # the same RK4 steps with the rhs summed in another order: rounding (~1e-15 of |x| ~ 20)
    # grown by the flow over 20 steps stays far below 1e-10
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


# -- Dormand-Prince -----------------------------------------------------------------------

def test_dormand_prince_propagate_matches_a_fine_rk4():
    # The reference: RK4 at dt = 5e-5 over 0.2 time units; halving its step changes it by
    # 3e-13, so its own error is ~3e-13 (O(dt^4)). Dormand-Prince at rtol 1e-9 controls the
    # local error per step; the global error, accumulated and stretched by the flow, comes
    # out at 4e-10 relative here. rtol 1e-8 leaves a 25x margin and still fails a solver
    # that is 100x less accurate (rtol 1e-6 gives 6e-7) or a wrong tableau entry.
    fine = Lorenz63(t_obs=[0.3], solver=RK4(dt=5e-5)).propagate(X0, 0.1, 0.3,
                                                                parameters=THETA)
    dp = Lorenz63(t_obs=[0.3], solver=DormandPrince(rtol=1e-9, atol=1e-12))
    torch.testing.assert_close(dp.propagate(X0, 0.1, 0.3, parameters=THETA), fine,
                               rtol=1e-8, atol=1e-12)


def test_dormand_prince_forward_and_propagate_share_one_solver():
    model = Lorenz63(t_obs=[0.4], solver=DormandPrince(rtol=1e-7, atol=1e-10),
                     x0=(1.0, 2.0, 3.0))
    x = model.propagate(X0[:1], 0.0, 0.4, parameters=THETA)
    assert torch.equal(x, model(THETA.unsqueeze(0)))


def test_failed_members_are_nan_rows():
    x = torch.tensor([[1e200, 1.0, 1.0], [1.0, 2.0, 3.0], [math.nan, 0.0, 0.0]], dtype=F64)
    for solver in (RK4(dt=0.01), DormandPrince()):
        model = Lorenz63(t_obs=[0.1], solver=solver)
        out = model.propagate(x, 0.0, 0.1, parameters=THETA)
        assert torch.isnan(out[[0, 2]]).all()  # an overflow (inf - inf) and a NaN start
        alone = model.propagate(x[1:2], 0.0, 0.1, parameters=THETA)
        torch.testing.assert_close(out[1:2], alone, rtol=1e-12, atol=0)
    capped = Lorenz63(t_obs=[1.0], solver=DormandPrince(rtol=1e-12, max_steps=5))
    assert torch.isnan(capped.propagate(X0, 0.0, 1.0, parameters=THETA)).all()


def test_dtype_device_kept_and_inputs_untouched():
    model = Lorenz63(t_obs=[0.1], solver=RK4(dt=0.01))
    x32 = X0.float()
    before = x32.clone()
    out = model.propagate(x32, 0.0, 0.1, parameters=THETA.tolist())
    assert out.dtype == torch.float32 and out.device == x32.device
    assert torch.equal(x32, before)
    # computed in the model's float64, then cast: the float64 result rounded
    ref = model.propagate(x32.double(), 0.0, 0.1, parameters=THETA)
    assert torch.equal(out, ref.float())
    same = model.propagate(x32, 0.1, torch.tensor(0.1, dtype=F64), parameters=THETA)
    assert torch.equal(same, x32) and same.data_ptr() != x32.data_ptr()


# -- SDE: Euler-Maruyama from the caller's generator ---------------------------------------

def test_ornstein_uhlenbeck_transition_moments():
    # OU: x(t) | x(0) = x0 ~ N(mu + (x0 - mu) e^{-theta t}, sigma^2 (1 - e^{-2 theta t}) /
    # (2 theta)). Euler-Maruyama at theta dt = 0.002 shifts the mean by 7e-4 and the variance
    # by 0.1 % (relative): within the 1e-3 and 1e-2 allowances. Monte-Carlo error with
    # N = 20,000 members: the mean's standard error is sqrt(var / N) = 2.5e-3, the variance's
    # sqrt(2 / N) = 1 % relative (Gaussian); 5 of them make a false alarm < 1e-6.
    model = OrnsteinUhlenbeck(t_obs=[1.0], dt=0.001)
    p = {"theta": 2.0, "mu": 1.0, "sigma": 0.5}
    theta = torch.tensor([p[n] for n in model.layout.names], dtype=F64)
    n = 20000
    x = model.propagate(torch.full((n, 1), 3.0, dtype=F64), 0.0, 0.5, parameters=theta,
                        generator=torch.Generator().manual_seed(0))
    e = math.exp(-2.0 * 0.5)
    mean, var = 1.0 + 2.0 * e, 0.25 * (1 - e ** 2) / 4.0
    assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n) + 1e-3 * mean
    assert abs(float(x.var()) / var - 1) < 5 * math.sqrt(2 / n) + 1e-2
    again = model.propagate(torch.full((n, 1), 3.0, dtype=F64), 0.0, 0.5, parameters=theta,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_sde_legs_with_one_generator_are_one_leg():
    # the normals are drawn (N_ens, d) per step in time order, and the drift sees the model's
    # grid times: 0 -> 0.13 -> 0.3 consumes the generator, and calls the drift, exactly as
    # 0 -> 0.3 (0.13 + k * 0.01 would differ from 0.01 * (13 + k) by an ulp now and then)
    assert any(0.13 + k * 0.01 != (13 + k) * 0.01 for k in range(17))
    seen: list[float] = []

    def drift(t, x, p):
        seen.append(float(t[0, 0]))
        return p["a"][:, None] * torch.sin(7.0 * t) - x

    model = SDEModel(drift, lambda t, x, p: 0.3 * torch.ones_like(x), ParameterLayout(["a"]),
                     x0=[0.0, 1.0], t_obs=[1.0], dt=0.01)
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]], dtype=F64)
    g = torch.Generator().manual_seed(5)
    one = model.propagate(x, 0.0, 0.3, parameters=[1.5], generator=g)
    state, seen_once = g.get_state(), seen.copy()
    seen.clear()
    g = torch.Generator().manual_seed(5)
    mid = model.propagate(x, 0.0, 0.13, parameters=[1.5], generator=g)
    two = model.propagate(mid, 0.13, 0.3, parameters=[1.5], generator=g)
    assert seen == seen_once
    assert torch.equal(one, two) and torch.equal(g.get_state(), state)
    # no time, no draws
    model.propagate(x, 0.3, 0.3, parameters=[1.5], generator=g)
    assert torch.equal(g.get_state(), state)


# -- jump processes -----------------------------------------------------------------------

@pytest.mark.parametrize("solver", [Gillespie(), TauLeaping(tau=0.01)])
def test_birth_death_mean(solver):
    # Immigration-death from x0 = 10 (b = 10, d = 0.5, t = 1): x(t) = Binomial(x0, q) +
    # Poisson(b/d (1 - q)), q = e^{-d t}, so the mean is b/d + (x0 - b/d) q = 13.93 and the
    # variance x0 q (1 - q) + b/d (1 - q) = 10.3. Tau-leaping's mean, linear propensities,
    # follows Euler's recursion exactly: q -> (1 - d tau)^{t / tau} (clipping at 0 never
    # happens this far from 0). With N = 4000 the mean's standard error is 0.051; 5 of them.
    model = BirthDeath(t_obs=[1.0], solver=solver)
    p = {"birth": 10.0, "death": 0.5}
    theta = torch.tensor([p[n] for n in model.layout.names], dtype=F64)
    n, x0 = 4000, 10.0
    q = math.exp(-0.5) if isinstance(solver, Gillespie) else (1 - 0.5 * 0.01) ** 100
    mean = 20.0 + (x0 - 20.0) * q
    var = x0 * math.exp(-0.5) * (1 - math.exp(-0.5)) + 20.0 * (1 - math.exp(-0.5))
    start = torch.full((n, 1), x0, dtype=F64)
    x = model.propagate(start, 0.0, 1.0, parameters=theta,
                        generator=torch.Generator().manual_seed(1))
    assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n)
    assert torch.equal(x, x.round()) and bool((x >= 0).all())
    again = model.propagate(start, 0.0, 1.0, parameters=theta,
                            generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, again)


def test_jump_negative_propensities_are_nan_rows():
    model = BirthDeath(t_obs=[1.0])
    x = torch.tensor([[-3.0], [4.0]], dtype=F64)  # a negative count: death rate < 0
    out = model.propagate(x, 0.0, 1.0, parameters=[1.0, 0.5],
                          generator=torch.Generator().manual_seed(0))
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


# -- errors at the boundary ----------------------------------------------------------------

@pytest.mark.parametrize("call, error, message", [
    (lambda m, x: m.propagate([[1.0, 2.0, 3.0]], 0.0, 0.1, parameters=THETA), TypeError,
     r"states: expected a floating torch.Tensor of shape \(N_ens, d\) with d = 3 \(x, y, z\)"),
    (lambda m, x: m.propagate(torch.ones(2, 3, dtype=torch.int64), 0.0, 0.1, parameters=THETA),
     TypeError, "states: expected a floating dtype, got torch.int64"),
    (lambda m, x: m.propagate(torch.ones(2, 4, dtype=F64), 0.0, 0.1, parameters=THETA),
     ValueError, r"states: expected shape \(N_ens, d\) with d = 3 .* got \(2, 4\)"),
    (lambda m, x: m.propagate(x[0], 0.0, 0.1, parameters=THETA), ValueError,
     r"one member: pass states\[None\]"),
    (lambda m, x: m.propagate(torch.ones(3, 5, dtype=F64), 0.0, 0.1, parameters=THETA),
     ValueError, r"members first: did you pass \(d, N_ens\)"),
    (lambda m, x: m.propagate(x, 0.0, 0.1), ValueError,
     r"parameters: the model's parameters are needed to propagate; .*\(sigma, rho, beta\)"),
    (lambda m, x: m.propagate(x, 0.0, 0.1, parameters=torch.ones(3, 3, dtype=F64)), ValueError,
     r"parameters: expected shape \(N_par,\) = \(3,\) or \(N_ens, N_par\) = \(2, 3\)"),
    (lambda m, x: m.propagate(x, 0.0, 0.1, parameters="10, 28, 8/3"), TypeError,
     "parameters: expected a tensor or a sequence of floats, got str"),
    (lambda m, x: m.propagate(x, 0.0, 0.1, parameters=-THETA), ValueError,
     "'sigma' must be >= 0"),
    (lambda m, x: m.propagate(x, 0.0, 0.1, parameters=THETA * math.nan), ValueError,
     "parameters: expected finite values"),
    (lambda m, x: m.propagate(x, 0.1, 0.0, parameters=THETA), ValueError,
     "t1: expected t1 >= t0 = 0.1"),
    (lambda m, x: m.propagate(x, 0.0, math.inf, parameters=THETA), ValueError,
     "t1: expected a finite float, got inf"),
    (lambda m, x: m.propagate(x, "0", 0.1, parameters=THETA), TypeError,
     "t0: expected a float, got str"),
    (lambda m, x: m.propagate(x, 0.0, 0.015, parameters=THETA), ValueError,
     r"t1: expected t1 - t0 to be a whole number of steps of dt=0.01 .* got t0=0, t1=0.015"),
    (lambda m, x: m.propagate(x, 0.0, 0.1, parameters=THETA, generator=0), TypeError,
     "generator: expected a torch.Generator or None, got int"),
])
def test_bad_input_is_refused(call, error, message):
    model = Lorenz63(t_obs=[0.1], solver=RK4(dt=0.01))
    with pytest.raises(error, match=message):
        call(model, torch.ones(2, 3, dtype=F64))


@pytest.mark.parametrize("model", [OrnsteinUhlenbeck(t_obs=[1.0], dt=0.01),
                                   BirthDeath(t_obs=[1.0])], ids=["sde", "jump"])
def test_stochastic_models_need_a_generator(model):
    x = torch.ones(2, 1, dtype=F64)
    theta = torch.ones(model.layout.size, dtype=F64)
    with pytest.raises(ValueError, match="generator: a stochastic model needs a "
                                         "torch.Generator to propagate"):
        model.propagate(x, 0.0, 0.1, parameters=theta)
    with pytest.raises(ValueError, match="generator"):  # even for no time at all
        model.propagate(x, 0.1, 0.1, parameters=theta)


def test_tau_leaping_needs_whole_steps():
    model = BirthDeath(t_obs=[1.0], solver=TauLeaping(tau=0.1))
    with pytest.raises(ValueError, match="whole number of steps of tau=0.1"):
        model.propagate(torch.ones(2, 1, dtype=F64), 0.0, 0.25, parameters=[1.0, 1.0],
                        generator=torch.Generator())


def test_a_list_of_parameters_is_read_in_float64():
    # torch.as_tensor([8 / 3]) is float32: 8/3 would be rounded before the float64 model ran
    model = Lorenz63(t_obs=[0.1], solver=RK4(dt=0.01))
    x0 = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    assert torch.equal(model.propagate(x0, 0.0, 0.1, parameters=[10.0, 28.0, 8.0 / 3.0]),
                       model.propagate(x0, 0.0, 0.1, parameters=THETA))
