"""The optimizer's mean step (``enkal/nn/steps.py``): ``lr * step_size`` of the analysis
increment, held inside the schedule's ``trust_radius`` in units of the redraw's spread."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from enkal import EnsembleKalmanOptimizer
from enkal.nn import Carry, RelativeNoise
from enkal.nn.steps import Damped, drawn_std, fit_damping, scale_increment, step_radius

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _schedule(step_size: float, trust: float | None) -> RelativeNoise:
    return RelativeNoise(gamma=0.01, growth=1.0, final_gamma=None, step_size=step_size,
                         trust_radius=trust)


def _one_step(schedule, mask=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
    x, y = torch.randn(16, 5), torch.arange(16) % 4
    opt = EnsembleKalmanOptimizer(net, ensemble_size=9, seed=3, schedule=schedule)
    if mask is not None:
        opt.set_mask(mask)
    start = opt.mean
    opt.step(x, y)
    return opt, start


def test_the_step_radius_is_the_rms_of_the_increment_in_units_of_the_spread():
    d = torch.tensor([0.3, -0.4, 7.0, 0.0], dtype=torch.float64)
    std = torch.tensor([0.1, 0.2, 0.0, 1.0], dtype=torch.float64)
    # entries 0, 1, 3 are drawn: (3^2 + 2^2 + 0^2) / 3
    assert float(step_radius(d, std)) == pytest.approx((13 / 3) ** 0.5, rel=1e-15)
    assert float(step_radius(torch.zeros(3), torch.zeros(3))) == 0.0  # nothing drawn


@settings(max_examples=40, deadline=None)
@given(st.floats(1e-3, 10.0), st.floats(1e-3, 2.0), st.floats(1e-3, 1.0),
       st.integers(0, 2**31 - 1))
@example(0.001, 0.001, 1.0, 195826)  # failed the old bound (1 + 1e-9): a std of 0.0016
def test_a_capped_step_never_leaves_the_trust_radius(radius, lr, step_size, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(50, generator=g, dtype=torch.float64)
    std = torch.rand(50, generator=g, dtype=torch.float64)
    analysis = start + 3 * torch.randn(50, generator=g, dtype=torch.float64) * std
    mean = analysis.clone()
    scale_increment(torch.empty(0), mean, start, lr, step_size=step_size, redraw=True,
                    std=std, radius=radius)
    rho_a = float(step_radius(analysis - start, std))
    taken = lr * min(step_size, radius / rho_a)    # the closed form of the factor
    torch.testing.assert_close(mean, start + taken * (analysis - start), rtol=1e-12,
                               atol=1e-12)
    # lr scales what the trust region allows (an LR scheduler still acts). mean - start
    # carries a rounding of half an ulp of |start| + |step| per entry (up to 4.4e-16 for
    # |start| < 4), in units of its std (down to 1e-3 here): with steps of 1e-6 std that
    # is 1e-7 relative in one entry, so the bound adds the rounding's own radius.
    rounding = float(step_radius(torch.finfo(torch.float64).eps * (start.abs() + 1), std))
    assert float(step_radius(mean - start, std)) <= lr * radius * (1 + 1e-12) + rounding


def test_a_large_trust_radius_is_the_plain_step_bit_for_bit():
    plain, _ = _one_step(_schedule(0.1, None))
    wide, _ = _one_step(_schedule(0.1, 1e30))
    assert torch.equal(plain.mean, wide.mean)


def test_a_small_trust_radius_moves_the_mean_exactly_that_far():
    # The analysis step of this batch is far longer than 1e-3 member radii, so the cap
    # binds: the step's radius, measured in the spread the members were drawn with
    # (Redraw(scale="inputs") sets it at the step), is the trust radius (float32
    # parameters: 1e-4 relative). The direction is the plain step's: the increments are
    # parallel.
    opt, start = _one_step(_schedule(1.0, 1e-3))
    plain, _ = _one_step(_schedule(1.0, None))
    std = drawn_std(opt._redraw_std, opt.mask)
    d, full = opt.mean - start, plain.mean - start
    assert float(step_radius(d, std)) == pytest.approx(1e-3, rel=1e-4)
    cos = float(d @ full / (d.norm() * full.norm()))
    assert cos == pytest.approx(1.0, abs=1e-5)


def test_masked_parameters_neither_move_nor_count_in_the_radius():
    torch.manual_seed(0)
    n = sum(p.numel() for p in nn.Sequential(nn.Linear(5, 7), nn.ReLU(),
                                            nn.Linear(7, 4)).parameters())
    mask = torch.ones(n, dtype=torch.bool)
    mask[::3] = False
    opt, start = _one_step(_schedule(1.0, 1e-3), mask=mask)
    assert bool((opt.mean[~mask] == 0).all())
    std = drawn_std(opt._redraw_std, opt.mask)
    assert float(step_radius(opt.mean - start, std)) == pytest.approx(1e-3, rel=1e-4)


def test_a_trust_radius_with_carry_is_refused():
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="trust_radius"):
        EnsembleKalmanOptimizer(net, members=Carry(), schedule=_schedule(0.1, 1.0))
    with pytest.raises(ValueError, match="RelativeNoise.trust_radius"):
        RelativeNoise(trust_radius=0.0)
    with pytest.raises(TypeError, match="RelativeNoise.trust_radius"):
        RelativeNoise(trust_radius="1")


@pytest.mark.parametrize("trust", ["cut", "damp"])
def test_an_optimizer_step_reads_the_host_few_times(monkeypatch, trust):
    # The fixed cost of a step, counted (not timed): every scalar read (.item(), float(t),
    # bool(t): aten::_local_scalar_dense) and every .tolist() is a host synchronisation
    # on a GPU. MLP 64-64-32-10, E = 64, B = 64: 17 before issue #16's second round (the
    # label range, the noise check, the diagnostics read one by one), 12 since with a cut
    # step (the trust radius adds none; the default). The damped step (trust="damp")
    # runs the analysis again for each damping it tries (at most 15: 1, 1e4, 12
    # bisections, the fit again; 14 here) and reads each step's radius: at most 9 reads
    # per extra analysis.
    from torch.utils._python_dispatch import TorchDispatchMode

    import enkal.nn.optimizer as optimizer
    from enkal.models import mlp

    torch.manual_seed(0)
    opt = EnsembleKalmanOptimizer(mlp([64, 64, 32, 10]), ensemble_size=64, seed=0,
                                  schedule=RelativeNoise.newton(trust=trust))
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    opt.step(x, y)
    reads, analyses = [], []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append("scalar")
            return func(*args, **(kwargs or {}))

    tolist, analyse = torch.Tensor.tolist, optimizer.analyse

    def counted(self):
        reads.append("tolist")
        return tolist(self)

    def counted_analyse(*args, **kwargs):
        analyses.append(1)
        return analyse(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    monkeypatch.setattr(optimizer, "analyse", counted_analyse)
    with Count():
        opt.step(x, y)
    assert len(analyses) == 1 if trust == "cut" else 2 < len(analyses) <= 15
    assert len(reads) <= 12 + 9 * (len(analyses) - 1), reads


# -- a bfloat16 ensemble (issue #16): members stored in bfloat16, the mean and forward in float32
def test_a_bfloat16_ensemble_keeps_its_mean_in_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
    x, y = torch.randn(16, 5), torch.arange(16) % 4
    opt = EnsembleKalmanOptimizer(net, ensemble_size=9, seed=3, dtype=torch.bfloat16)
    start = opt.mean
    assert start.dtype == torch.float32
    assert torch.equal(start, torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    opt.step(x, y)
    assert opt.ensemble.dtype == torch.bfloat16 and opt.mean.dtype == torch.float32
    assert opt.last_predictions.dtype == torch.float32    # mapped in float32
    # the module holds the float32 mean, not a bfloat16 rounding of it
    assert torch.equal(opt.mean, torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    state = opt.state_dict()
    twin = EnsembleKalmanOptimizer(net, ensemble_size=9, seed=4, dtype=torch.bfloat16)
    twin.load_state_dict(state)
    assert twin.mean.dtype == torch.float32 and torch.equal(twin.mean, opt.mean)


def test_a_small_step_of_a_bfloat16_ensemble_is_not_rounded_away():
    # With lr = 1e-3 the mean moves by about 1e-3 of the trust-region step, far below
    # bfloat16's resolution of the weights (2^-8 relative: a mean kept in bfloat16 would
    # not move at all); in float32 it moves by exactly lr times the lr = 1 increment from
    # the same state and draw (a step's draw does not depend on lr), up to the float32
    # roundings of m + d and (m + d) - m: 2 eps max|m| (max|m| < 1 for this init).
    def stepped(lr):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
        opt = EnsembleKalmanOptimizer(net, ensemble_size=9, seed=3, dtype=torch.bfloat16,
                                      lr=lr)
        start = opt.mean
        opt.step(torch.randn(16, 5, generator=torch.Generator().manual_seed(1)),
                 torch.arange(16) % 4)
        return opt.mean - start

    small, full = stepped(1e-3), stepped(1.0)
    assert float(small.abs().max()) > 0
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(small, 1e-3 * full, rtol=0, atol=2 * eps)
    assert float((small - 1e-3 * full).norm() / (1e-3 * full).norm()) < 1e-2


def _float32_predictions(net, opt, x):
    """Softmax outputs of ``opt``'s members, run in float32 by the module itself."""
    members = opt.ensemble.float()
    outputs = torch.stack([torch.func.functional_call(net, {
        b.name: m[b.slice].reshape(b.shape) for b in opt.layout.blocks}, (x,)) for m in members])
    return torch.softmax(outputs, dim=-1).reshape(len(members), -1)


def test_a_bfloat16_ensemble_runs_its_members_in_float32():
    # Rounding each member's forward to bfloat16 is noise the update reads as information
    # (docs/nn.md 3: 2.5 points on the digits GAP CNN); the stored members are exact in
    # float32, so their float32 forward is the same network evaluation bit for bit.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
    x, y = torch.randn(16, 5), torch.arange(16) % 4
    opt = EnsembleKalmanOptimizer(net, ensemble_size=9, seed=3, dtype=torch.bfloat16)
    opt.step(x, y)
    assert opt.ensemble.dtype == torch.bfloat16 and opt.net.dtype == torch.float32
    assert torch.equal(opt.last_predictions, _float32_predictions(net, opt, x))


def test_forward_dtype_runs_the_members_in_bfloat16():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
    x, y = torch.randn(16, 5), torch.arange(16) % 4
    fast = EnsembleKalmanOptimizer(net, ensemble_size=9, seed=3, dtype=torch.bfloat16,
                                   forward_dtype=torch.bfloat16)
    assert fast.net.dtype == torch.bfloat16
    fast.step(x, y)
    assert fast.ensemble.dtype == torch.bfloat16 and fast.mean.dtype == torch.float32
    # its own members run in bfloat16: within bfloat16's rounding (2^-8 relative per
    # operation, a few operations deep, on probabilities <= 1) of their float32 run, not equal
    diff = (fast.last_predictions - _float32_predictions(net, fast, x)).abs().max()
    assert 0 < float(diff) < 0.05
    # a float32 ensemble can run in bfloat16 too; its members stay float32
    half = EnsembleKalmanOptimizer(net, ensemble_size=9, seed=3, forward_dtype=torch.bfloat16)
    assert half.ensemble.dtype == torch.float32 and half.net.dtype == torch.bfloat16
    half.step(x, y)
    assert half.ensemble.dtype == torch.float32 and half.last_predictions.dtype == torch.float32


@pytest.mark.parametrize("bad", ["bfloat16", torch.int32, 3])
def test_forward_dtype_must_be_a_floating_torch_dtype(bad):
    net = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="forward_dtype: expected a floating torch.dtype"):
        EnsembleKalmanOptimizer(net, ensemble_size=4, forward_dtype=bad)


def test_a_bfloat16_module_runs_in_bfloat16_and_predict_maps_in_the_means_precision():
    # dtype=None keeps the module's precision for the forward (nothing asked otherwise);
    # the mean of a low-precision Redraw ensemble is float32 all the same
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)).to(torch.bfloat16)
    x, y = torch.randn(16, 5), torch.arange(16) % 4
    opt = EnsembleKalmanOptimizer(net, ensemble_size=9, seed=3)
    assert opt.net.dtype == torch.bfloat16 and opt.ensemble.dtype == torch.bfloat16
    opt.step(x, y)
    assert opt.mean.dtype == torch.float32 and opt.last_predictions.dtype == torch.float32
    mean, std = opt.predict(x)
    assert mean.dtype == std.dtype == torch.float32
    torch.testing.assert_close(mean.sum(dim=1), torch.ones(16), rtol=0, atol=1e-6)


# -- trust="damp": the trust region's Levenberg-Marquardt step ------------------------------

def test_fit_damping_finds_the_least_factor_that_fits():
    # radius(f) = 10 / f is monotone: the least f in [1, 1e4] with radius <= 2 is 5; the
    # bisection's bracket after 12 halvings of log(1e4) = 9.2 is 0.0022 wide in log f, and
    # the factor returned is its upper end (it fits).
    calls = []

    def analyse(f):
        calls.append(f)
        return f

    f = fit_damping(analyse, lambda: 10 / calls[-1], 2.0)
    assert 5.0 <= f <= 5.0 * 1.0023
    assert 10 / calls[-1] <= 2.0        # the step left written is the one returned
    assert len(calls) <= 15             # 1 + 1 + 12 (+ 1 to rewrite the fit)


def test_fit_damping_leaves_a_step_that_fits_undamped_and_one_that_never_fits():
    calls = []
    assert fit_damping(lambda f: calls.append(f) or f, lambda: 0.5, 1.0) == 1.0
    assert calls == [1.0]                                   # one analysis, no damping
    assert fit_damping(lambda f: f, lambda: 3.0, 1.0, span=100.0) == 100.0  # the cut holds it


def test_a_damped_schedule_inflates_the_noise_and_says_so():
    from enkal.observations import Observations

    base = _schedule(0.1, 1.0)
    preds = torch.randn(8, 12, dtype=torch.float64)
    obs = Observations(torch.zeros(12, dtype=torch.float64), noise_std=1.0)
    kw = dict(parameters=torch.zeros(8, 3), predictions=preds, observations=obs)
    a0, _, i0 = base.step(base.init(), **kw)
    a1, _, i1 = Damped(base, 4.0).step(base.init(), **kw)
    assert a1 == pytest.approx(4 * a0, rel=1e-15)
    assert i1 == {"gamma": 4 * i0["gamma"], "rho": 2 * i0["rho"], "damping": 4.0}


def _damped(radius: float) -> RelativeNoise:
    return RelativeNoise(gamma=0.01, growth=1.0, final_gamma=None, step_size=1.0,
                         trust_radius=radius, trust="damp")


def test_a_damped_step_fits_the_trust_radius_in_a_different_direction():
    # The undamped analysis step of this batch is 13.5 member radii, so the damping rises
    # (to about 1700) until the step fits a radius of 1: its radius is 1 to the
    # bisection's precision (the factor to 0.23%, the radius of a ridge step with it
    # less), and it points elsewhere than the cut's (which keeps the Newton step's
    # direction).
    opt, start = _one_step(_damped(1.0))
    cut, _ = _one_step(_schedule(1.0, 1.0))
    std = drawn_std(opt._redraw_std, opt.mask)
    d, c = opt.mean - start, cut.mean - start
    assert float(step_radius(d, std)) == pytest.approx(1.0, rel=3e-3)
    assert float(step_radius(d, std)) <= 1.0 + 1e-4  # float32 parameters
    assert 1.0 < opt.last_info.schedule["damping"] < 1e4  # fitted, not held by the cut
    assert float(d @ c / (d.norm() * c.norm())) < 0.99


def test_a_damped_step_inside_the_radius_is_the_cut_step_bit_for_bit():
    # Where the step fits, nothing is damped: the same mean as trust="cut", bitwise.
    damped, _ = _one_step(_damped(1e30))
    cut, _ = _one_step(_schedule(1.0, 1e30))
    assert torch.equal(damped.mean, cut.mean)
    assert damped.last_info.schedule["damping"] == 1.0


def test_a_step_refused_during_the_damping_changes_nothing(monkeypatch):
    # The damping's trials write their steps into the mean; an analysis that raises on
    # the third trial (a stand-in for any refusal) must leave the mean and the generator
    # as they were before the step.
    import enkal.nn.optimizer as optimizer

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("refused")
        return real(*args, **kwargs)

    real = optimizer.analyse
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
    x, y = torch.randn(16, 5), torch.arange(16) % 4  # _one_step's batch: the damping fits
    opt = EnsembleKalmanOptimizer(net, ensemble_size=9, seed=3, schedule=_damped(1.0))
    before, rng = opt.mean, opt._generator.get_state()
    monkeypatch.setattr(optimizer, "analyse", failing)
    with pytest.raises(ValueError, match="refused"):
        opt.step(x, y)
    assert torch.equal(opt.mean, before)
    assert torch.equal(opt._generator.get_state(), rng)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in net.parameters()]), before)


def test_a_bad_trust_rule_is_refused():
    with pytest.raises(ValueError, match="RelativeNoise.trust: expected 'cut' or 'damp'"):
        RelativeNoise(trust="clip")
    with pytest.raises(ValueError, match="trust='damp' needs a trust_radius"):
        RelativeNoise(trust="damp")
