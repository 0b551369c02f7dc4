"""The simulator models of ``enkal.models``: one generic contract test per model, then the
numerics of the ODE solvers and the templates.

Statistical checks of the stochastic models (closed-form moments) are in
``tests/test_models_stochastic.py``.

Every model in :data:`CASES` must: return ``(N_ens, N_obs)`` in its own dtype and device;
give the same prediction twice (under its seed); give a member the same prediction alone as
in the batch, in any order (deterministic models, and stochastic ones with their default
parameter-keyed streams or common noise), bitwise for fixed-step solvers; leave its input
alone; refuse bad parameters with a ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import enkal
from enkal import ParameterLayout, Positive
from enkal.models import (
    RK4,
    SIR,
    BirthDeath,
    DormandPrince,
    ExternalProgramModel,
    GeometricBrownianMotion,
    Gillespie,
    Lorenz63,
    Lorenz96,
    LotkaVolterra,
    ODEModel,
    OrnsteinUhlenbeck,
    StochasticLorenz63,
    StochasticLotkaVolterra,
    StochasticSIR,
    TauLeaping,
    TemplateModel,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads


def _rows(*rows):
    return torch.tensor(rows, dtype=torch.float64)


L63 = _rows([10.0, 28.0, 8 / 3], [9.0, 27.0, 2.5], [11.0, 29.0, 3.0], [10.5, 26.0, 2.8])
T_SHORT = [0.1, 0.2, 0.3]

# name -> (factory(dtype, **kw) -> model, physical parameters (N_ens, N_par), stochastic,
#          exact: batched == one-by-one bitwise (else to 1e-10))
CASES = {
    "Lorenz63-RK4": (lambda **kw: Lorenz63(T_SHORT, solver=RK4(dt=0.01), **kw), L63, False, True),
    "Lorenz63-DP": (lambda **kw: Lorenz63([0.05, 0.17, 0.3], solver=DormandPrince(), **kw), L63,
                    False, False),
    "Lorenz96": (lambda **kw: Lorenz96(T_SHORT, n_sites=6, observe=[0, 3], **kw),
                 _rows([8.0], [7.5], [9.0]), False, True),
    "Lorenz96-per-site": (lambda **kw: Lorenz96(T_SHORT, n_sites=5, per_site=True, **kw),
                          _rows([8.0] * 5, [7.0, 8, 9, 8, 7], [8.5] * 5), False, True),
    "SIR": (lambda **kw: SIR([1.0, 2.0, 4.0], **kw), _rows([0.5, 0.1], [0.8, 0.2], [0.3, 0.05]),
            False, True),
    "LotkaVolterra": (lambda **kw: LotkaVolterra(T_SHORT, **kw),
                      _rows([1.1, 0.4, 0.4, 0.1], [1.0, 0.3, 0.5, 0.1]), False, True),
    "OU": (lambda **kw: OrnsteinUhlenbeck(T_SHORT, dt=0.01, x0=1.0, seed=3, **kw),
           _rows([1.0, 0.0, 0.5], [2.0, 1.0, 0.3], [0.5, -1.0, 1.0]), True, True),
    "GBM": (lambda **kw: GeometricBrownianMotion(T_SHORT, dt=0.01, seed=3, **kw),
            _rows([0.1, 0.2], [0.0, 0.3], [-0.1, 0.1]), True, True),
    "StochasticLorenz63": (lambda **kw: StochasticLorenz63(T_SHORT, dt=0.01, seed=3, **kw), L63,
                           True, True),
    "BirthDeath-SSA": (lambda **kw: BirthDeath([0.5, 1.0, 2.0], seed=3, **kw),
                       _rows([10.0, 1.0], [5.0, 0.5], [20.0, 2.0]), True, True),
    "BirthDeath-tau": (lambda **kw: BirthDeath([0.5, 1.0, 2.0], solver=TauLeaping(tau=0.05),
                                               seed=3, **kw),
                       _rows([10.0, 1.0], [5.0, 0.5], [20.0, 2.0]), True, True),
    "StochasticSIR": (lambda **kw: StochasticSIR([0.5, 1.0], population=100, infected=5, seed=3,
                                                 **kw),
                      _rows([1.5, 0.5], [2.0, 0.3], [1.0, 1.0]), True, True),
    "StochasticLV-SSA": (lambda **kw: StochasticLotkaVolterra([0.1, 0.2], seed=3, **kw),
                         _rows([1.0, 0.005, 0.6, 0.005], [1.2, 0.004, 0.5, 0.006]), True, True),
    "StochasticLV-tau": (lambda **kw: StochasticLotkaVolterra(
        [0.1, 0.2], solver=TauLeaping(tau=0.01), seed=3, **kw),
        _rows([1.0, 0.005, 0.6, 0.005], [1.2, 0.004, 0.5, 0.006]), True, True),
    "Template": (lambda **kw: TemplateModel([0.0, 0.5, 1.0], **kw),
                 _rows([1.0, 0.1, 3.0], [2.0, 0.5, 1.0]), False, True),
}
STOCHASTIC = [k for k, v in CASES.items() if v[2]]


def _check_equal(a, b, exact):
    if exact:
        assert torch.equal(a, b), (a - b).abs().max()
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_shape_names_determinism_and_no_mutation(name):
    factory, theta, _, _ = CASES[name]
    model = factory()
    x = theta.clone()
    y = model(x)
    assert y.shape == (theta.shape[0], model.output_size)
    assert model.layout.size == theta.shape[1]
    assert torch.isfinite(y).all()
    assert torch.equal(x, theta)  # input not mutated
    assert torch.equal(model(x), y)  # same parameters (and seed): same prediction
    if model.output_names is not None:
        assert len(model.output_names) == model.output_size
    y_eval, ok = enkal.evaluate(model, theta, members_per_call=2)
    assert ok.all()
    _check_equal(y_eval, y, CASES[name][3])


@pytest.mark.parametrize("name", CASES)
def test_batched_equals_one_by_one_and_permuted(name):
    factory, theta, _, exact = CASES[name]
    model = factory()
    y = model(theta)
    alone = torch.cat([model(theta[i:i + 1]) for i in range(theta.shape[0])])
    _check_equal(alone, y, exact)
    perm = torch.arange(theta.shape[0] - 1, -1, -1)
    _check_equal(model(theta[perm]), y[perm], exact)


_SUBSET_MODELS = {
    "OU": OrnsteinUhlenbeck([0.1, 0.3], dt=0.01, seed=1),
    "BirthDeath-SSA": BirthDeath([0.5, 1.0], seed=1),
    "BirthDeath-tau": BirthDeath([0.5, 1.0], solver=TauLeaping(tau=0.1), seed=1),
}
_POOL = {"OU": CASES["OU"][1], "BirthDeath-SSA": CASES["BirthDeath-SSA"][1],
         "BirthDeath-tau": CASES["BirthDeath-tau"][1]}


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(_SUBSET_MODELS)),
       rows=st.lists(st.integers(0, 2), min_size=1, max_size=7),
       chunk=st.integers(1, 4))
def test_any_subset_any_chunking_gives_each_member_its_own_prediction(name, rows, chunk):
    # default streams are keyed by the parameters: a member's prediction is the same in any
    # batch (with repeats, in any order) and under any chunking of the evaluation
    model, pool = _SUBSET_MODELS[name], _POOL[name]
    reference = model(pool)
    y, ok = enkal.evaluate(model, pool[rows], members_per_call=chunk)
    assert ok.all() and torch.equal(y, reference[rows])


@pytest.mark.parametrize("name", STOCHASTIC)
def test_common_noise_is_batch_invariant_and_shared(name):
    factory, theta, _, _ = CASES[name]
    model = factory(common_noise=True)
    y = model(theta)
    alone = torch.cat([model(theta[i:i + 1]) for i in range(theta.shape[0])])
    assert torch.equal(alone, y)
    # identical parameters, common noise: identical predictions
    twin = theta[:1].expand(3, -1)
    assert torch.equal(model(twin), model(theta[:1]).expand(3, -1))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_streams_row_keyed_replicates_and_seed(name):
    factory, theta, _, _ = CASES[name]
    rows = factory(row_streams=True)
    twin = theta[:1].expand(4, -1)
    y = rows(twin)
    # identical rows are independent replicates (distinct with overwhelming probability)
    assert len({tuple(r) for r in y.tolist()}) > 1
    # the first m rows of a batch equal a batch of those m rows
    assert torch.equal(rows(twin[:2]), y[:2])
    # default streams (keyed by the parameters): identical rows, identical noise
    keyed = factory()
    assert torch.equal(keyed(twin), keyed(theta[:1]).expand(4, -1))
    # another seed, another prediction
    other = factory()
    other.seed = other.seed + 1
    assert not torch.equal(other(theta), keyed(theta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CASES)
def test_dtype_and_device_kept(name, dtype):
    factory, theta, _, _ = CASES[name]
    model = factory(dtype=dtype, device="cpu")
    assert model.dtype == dtype and model.device == torch.device("cpu")
    y = model(theta.to(torch.float32))  # any floating input is cast to the model's dtype
    assert y.dtype == dtype and y.device == torch.device("cpu")
    assert torch.isfinite(y).all()
    if not CASES[name][2] or name in ("OU", "GBM", "StochasticLorenz63"):
        # deterministic models, and SDEs (the normals agree to float32 rounding), match their
        # float64 selves to float32 accuracy over these short horizons
        ref = factory(dtype=torch.float64)(theta.to(torch.float32).to(torch.float64))
        torch.testing.assert_close(y.to(torch.float64), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", CASES)
def test_cuda_matches_cpu(name):
    factory, theta, _, _ = CASES[name]
    cpu = factory()(theta)
    gpu = factory(device="cuda")(theta)
    assert gpu.device.type == "cuda"
    # the same streams on every device: discrete models agree exactly unless a uniform sits
    # within rounding of a decision boundary, continuous ones to rounding
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)


# -- bad inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_bad_parameters_are_refused(name):
    factory, theta, _, _ = CASES[name]
    model = factory()
    n_par = model.layout.size
    with pytest.raises(ValueError, match="parameters"):
        model(torch.zeros(2, n_par + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="parameters"):
        model(theta[0])  # one member as a 1-D vector
    with pytest.raises(TypeError, match="parameters"):
        model(theta.tolist())
    with pytest.raises(TypeError, match="parameters"):
        model(theta.to(torch.int64))
    bad = theta.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="parameters"):
        model(bad)


def test_transposed_parameters_get_a_members_first_hint():
    model = Lorenz63(T_SHORT)
    with pytest.raises(ValueError, match="members first"):
        model(L63.T)


@pytest.mark.parametrize("name", [k for k in CASES if k != "Template" and "96" not in k])
def test_negative_rates_are_refused_naming_the_parameter(name):
    factory, theta, _, _ = CASES[name]
    model = factory()
    block = next(b for b in model.layout.blocks if isinstance(b.constraint, Positive))
    bad = theta.clone()
    bad[-1, block.slice] = -0.5
    with pytest.raises(ValueError, match=f"'{block.name}'"):
        model(bad)


@pytest.mark.parametrize("t_obs", [[0.2, 0.1], [0.1, 0.1], [], [0.1, float("nan")], [-1.0, 0.5]])
@pytest.mark.parametrize("make", [
    lambda t: Lorenz63(t), lambda t: Lorenz63(t, solver=DormandPrince()),
    lambda t: OrnsteinUhlenbeck(t), lambda t: BirthDeath(t),
    lambda t: BirthDeath(t, solver=TauLeaping(tau=0.1)),
])
def test_bad_observation_times_are_refused(make, t_obs):
    with pytest.raises(ValueError, match="t_obs"):
        make(t_obs)


@pytest.mark.parametrize("make", [
    lambda: Lorenz63([0.1, 0.15], solver=RK4(dt=0.1)),
    lambda: OrnsteinUhlenbeck([0.105], dt=0.01),
    lambda: BirthDeath([0.25], solver=TauLeaping(tau=0.1)),
])
def test_off_grid_times_are_refused_by_fixed_step_solvers(make):
    with pytest.raises(ValueError, match=r"t_obs.*grid"):
        make()


def test_constructor_arguments_are_validated():
    with pytest.raises(ValueError, match="dt"):
        RK4(dt=0.0)
    with pytest.raises(ValueError, match="rtol"):
        DormandPrince(rtol=-1.0)
    with pytest.raises(ValueError, match="tau"):
        TauLeaping(tau=float("inf"))
    with pytest.raises(ValueError, match="max_events"):
        Gillespie(max_events=0)
    with pytest.raises(TypeError, match="solver"):
        Lorenz63(T_SHORT, solver="rk4")
    with pytest.raises(TypeError, match="solver"):
        BirthDeath(T_SHORT, solver=RK4(dt=0.1))
    with pytest.raises(TypeError, match="dtype"):
        Lorenz63(T_SHORT, dtype=torch.int64)
    with pytest.raises(TypeError, match="seed"):
        OrnsteinUhlenbeck(T_SHORT, seed=1.5)
    with pytest.raises(ValueError, match="observe"):
        Lorenz63(T_SHORT, observe=["w"])
    with pytest.raises(ValueError, match="observe"):
        Lorenz63(T_SHORT, observe=[3])
    with pytest.raises(ValueError, match="x0"):
        Lorenz63(T_SHORT, x0=[1.0, 2.0])
    with pytest.raises(ValueError, match="x0"):
        BirthDeath(T_SHORT, x0=-1)
    with pytest.raises(ValueError, match="n_sites"):
        Lorenz96(T_SHORT, n_sites=3)
    with pytest.raises(ValueError, match="infected"):
        StochasticSIR(T_SHORT, population=10, infected=20)
    with pytest.raises(ValueError, match="noise_scale"):
        StochasticLorenz63(T_SHORT, noise_scale=-1.0)
    with pytest.raises(ValueError, match="stoichiometry"):
        from enkal.models import JumpModel
        JumpModel([[0.5]], lambda x, p: x, ParameterLayout(["k"]), [0], T_SHORT)


# -- ODE numerics -----------------------------------------------------------------------

def _damped_rotation(t, x, p):
    # dx/dt = A x with A = [[-k, 1], [-1, -k]]: x(t) = e^{-kt} R(-t) x0
    k = p["k"][:, None]
    return torch.stack([x[:, 1], -x[:, 0]], dim=1) - k * x


def _rotation_exact(k, t, x0=(1.0, 0.0)):
    c, s = math.cos(t), math.sin(t)
    return [math.exp(-k * t) * (c * x0[0] + s * x0[1]), math.exp(-k * t) * (-s * x0[0] + c * x0[1])]


def test_rk4_converges_with_order_four():
    layout = ParameterLayout([("k", (), Positive())])
    theta = _rows([0.1], [0.5])
    exact = torch.tensor([_rotation_exact(k, 2.0) for k in (0.1, 0.5)], dtype=torch.float64)
    errors = []
    for dt in (0.2, 0.1, 0.05):
        model = ODEModel(_damped_rotation, layout, [1.0, 0.0], [2.0], solver=RK4(dt=dt))
        errors.append(float((model(theta) - exact).abs().max()))
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    # the global error of RK4 is C dt^4 (1 + O(dt)): halving dt divides it by 2^4 up to a
    # few per cent at these step sizes
    assert all(3.8 < q < 4.2 for q in orders), (errors, orders)


def test_dormand_prince_meets_its_tolerance_at_any_time():
    layout = ParameterLayout([("k", (), Positive())])
    t_obs = [0.0, 0.123, 1.0, math.pi, 7.77]  # off any grid, including t0 itself
    model = ODEModel(_damped_rotation, layout, [1.0, 0.0], t_obs,
                     solver=DormandPrince(rtol=1e-9, atol=1e-12))
    theta = _rows([0.1], [0.5], [1e-3])
    y = model(theta).reshape(3, len(t_obs), 2)
    exact = torch.tensor([[_rotation_exact(k, t) for t in t_obs] for k in (0.1, 0.5, 1e-3)],
                         dtype=torch.float64)
    # local tolerance 1e-9 relative; the global error over ~8 time units stays well below 1e-7
    torch.testing.assert_close(y, exact, rtol=0, atol=1e-7)
    coarse = ODEModel(_damped_rotation, layout, [1.0, 0.0], t_obs,
                      solver=DormandPrince(rtol=1e-4, atol=1e-7))
    err = float((coarse(theta).reshape(3, -1, 2) - exact).abs().max())
    assert 1e-9 < err < 1e-2  # looser tolerance, larger (but controlled) error


def test_lorenz63_rk4_and_dormand_prince_agree_on_a_short_horizon():
    t_obs = [0.1 * i for i in range(1, 11)]
    rk4 = Lorenz63(t_obs, solver=RK4(dt=0.001))(L63)
    dp = Lorenz63(t_obs, solver=DormandPrince(rtol=1e-10, atol=1e-10))(L63)
    # RK4 at dt = 1e-3 is accurate to ~1e-8 here (error C dt^4, the Lyapunov growth over one
    # time unit is ~e^0.9); DP to ~1e-8 as well: they must agree far below the attractor's
    # scale (~10)
    torch.testing.assert_close(rk4, dp, rtol=0, atol=1e-6)


def test_blow_up_fails_only_that_member():
    # dx/dt = k x^2, x(0) = 1: x = 1 / (1 - k t) blows up at t = 1/k
    layout = ParameterLayout([("k", (), Positive())])
    theta = _rows([0.5], [2.0], [0.25])
    for solver in (DormandPrince(max_steps=2000), RK4(dt=0.01)):
        model = ODEModel(lambda t, x, p: p["k"][:, None] * x * x, layout, [1.0], [1.0, 4.0],
                         solver=solver)
        y, ok = enkal.evaluate(model, theta)
        assert ok.tolist() == [False, False, True]
        assert abs(float(y[2, 0]) - 1 / 0.75) < 1e-6


def test_ode_variants():
    # Lorenz-96 with the same forcing at every site == scalar forcing
    a = Lorenz96(T_SHORT, n_sites=6)(_rows([8.0], [6.0]))
    b = Lorenz96(T_SHORT, n_sites=6, per_site=True)(_rows([8.0] * 6, [6.0] * 6))
    assert torch.equal(a, b)
    assert Lorenz96(T_SHORT, n_sites=6, per_site=True).layout.names[:2] == ["F[0]", "F[1]"]
    # SIR conserves s + i + r = 1
    sir = SIR([1.0, 5.0, 10.0], observe=None, solver=RK4(dt=0.05))
    y = sir(_rows([0.5, 0.1], [0.9, 0.3])).reshape(2, 3, 3)
    torch.testing.assert_close(y.sum(-1), torch.ones(2, 3, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    # Lotka-Volterra conserves V = delta u - gamma log u + beta v - alpha log v (RK4, small dt)
    lv = LotkaVolterra([2.0, 5.0], solver=RK4(dt=0.005))
    p = [1.1, 0.4, 0.4, 0.1]
    y = lv(_rows(p)).reshape(2, 2)

    def invariant(u, v):
        return p[3] * u - p[2] * math.log(u) + p[1] * v - p[0] * math.log(v)

    v0 = invariant(10.0, 10.0)
    assert all(abs(invariant(float(u), float(v)) - v0) < 1e-8 for u, v in y.tolist())
    # parameter-dependent initial state: x0(p) -> (n, d)
    layout = ParameterLayout([("k", (), Positive()), ("x_init", ())])
    m = ODEModel(lambda t, x, p: -p["k"][:, None] * x, layout,
                 lambda p: p["x_init"][:, None], [1.0], state_names=["x"], solver=RK4(dt=0.01))
    y = m(_rows([1.0, 2.0], [0.5, -3.0]))
    torch.testing.assert_close(y[:, 0], torch.tensor([2 * math.exp(-1.0), -3 * math.exp(-0.5)],
                                                     dtype=torch.float64), rtol=1e-9, atol=0)
    # observations at t0 return the initial state; names are readable
    m = Lorenz63([0.0, 0.1], x0=[1.0, 2.0, 3.0], observe=["z", "x"])
    assert m.output_names == ["z(t=0)", "x(t=0)", "z(t=0.1)", "x(t=0.1)"]
    assert m(L63)[:, :2].tolist() == [[3.0, 1.0]] * 4


def test_models_drive_the_smoother():
    # a 40-member smoother on Lorenz-63 observed for 0.5 time units moves the prior mean of
    # (sigma, rho, beta) towards the truth
    model = Lorenz63([0.1 * i for i in range(1, 6)], solver=RK4(dt=0.01))
    truth = _rows([10.0, 28.0, 8 / 3])
    y = model(truth)[0]
    obs = enkal.Observations(y, noise_std=torch.full_like(y, 0.5))
    gen = torch.Generator().manual_seed(0)
    u_prior = enkal.gaussian_ensemble(torch.log(torch.tensor([8.0, 24.0, 2.2])), 0.2, 40,
                                      generator=gen)
    smoother = enkal.EnsembleSmoother(obs, schedule=enkal.ESMDA([4.0, 4.0, 4.0, 4.0]), seed=0)
    result = smoother.run(model, u_prior)
    est = model.layout.to_physical(result.parameters).mean(0)
    prior = model.layout.to_physical(u_prior).mean(0)
    assert ((est - truth[0]).abs() < (prior - truth[0]).abs()).all()


# -- templates --------------------------------------------------------------------------

_PROG = ("import sys; a, b = map(float, sys.argv[1:]); "
         "sys.exit(3) if a < 0 else print(a + b, a * b)")


def _external(**kw):
    return ExternalProgramModel(
        lambda th: [sys.executable, "-c", _PROG, repr(th["a"]), repr(th["b"])],
        parameters=["a", "b"], output_size=2, **kw)


def test_external_program_model_runs_each_member_and_fails_alone():
    model = _external(max_workers=2, timeout=60)
    theta = _rows([1.0, 2.0], [-1.0, 5.0], [0.1, 0.2])
    with pytest.warns(RuntimeWarning, match="member 1 failed: exit status 3"):
        y, ok = enkal.evaluate(model, theta)
    assert ok.tolist() == [True, False, True]
    torch.testing.assert_close(y[[0, 2]], _rows([3.0, 2.0], [0.1 + 0.2, 0.1 * 0.2]), rtol=0,
                               atol=0)
    with pytest.raises(ValueError, match="parameters"):
        model(torch.zeros(1, 3, dtype=torch.float64))
    bad_parse = ExternalProgramModel(lambda th: [sys.executable, "-c", "print('hello')"],
                                     parameters=["a"], output_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.isnan(bad_parse(_rows([1.0]))).all()
    assert "could not parse" in str(caught[0].message)
    with pytest.raises(TypeError, match="command"):
        ExternalProgramModel("prog", parameters=["a"], output_size=1)
