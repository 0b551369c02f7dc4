"""Neural networks as ensembles (enkal.nn, enkal.models.nn) and the data loaders.

Equivalences are checked in float64 with atol 1e-12: vmap, the loop, chunking and device
threads evaluate the same arithmetic per member (only the batching of the GEMMs differs), so
they agree to rounding, ~1e-16 relative on O(1) outputs; 1e-12 leaves room for summation order
in layers of a few hundred inputs.
"""

from __future__ import annotations

import copy
import gzip
import io
import math
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import torch_threads
from torch import nn

from enkal import (
    ESMDA,
    CollapseGuard,
    EnsembleSmoother,
    FailedMembersError,
    FixedAnnealing,
    IgnoreFailed,
    Observations,
    PerturbedObservations,
    Raise,
    ResampleFailed,
    SmootherState,
    SquareRoot,
)
from enkal.executors import InProcess, MultiDevice, run_on_devices
from enkal.models.nn import LeNet5, mlp
from enkal.nn import (
    AUTO_VMAP_MIN_MEMBERS,
    Carry,
    Classification,
    EnsembleKalmanOptimizer,
    HybridOptimizer,
    NeuralModel,
    Redraw,
    Regression,
    RelativeNoise,
    RelativeNoiseState,
    Sections,
    kaiming_std,
)
from enkal.problems.datasets import FASHION_MNIST_PATH, load_digits, load_fashion_mnist, read_idx

ATOL = 1e-12


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for every test here: on the shared, loaded 2-core machine two
    threads made the small GEMMs and eigendecompositions of these tests 10-100x slower (an
    EnsembleSmoother.run of 8 updates: 9.3 s against 0.07 s; see bench/models.py)."""
    with torch_threads(1):
        yield


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4))


def _ensemble(model: NeuralModel, n: int, seed: int = 0, scale: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    theta = model.flatten()
    return theta + scale * torch.randn(n, theta.numel(), generator=g, dtype=theta.dtype)


def _digits_subset(n: int = 400):
    d = load_digits()
    return d.train_inputs[:n], d.train_labels[:n], d.test_inputs, d.test_labels


# -- NeuralModel: layout, flatten, load_into ---------------------------------------------------
def test_layout_names_are_the_modules_parameter_names():
    torch.manual_seed(0)
    net = mlp([5, 4, 3])
    model = NeuralModel(net)
    assert [b.name for b in model.layout.blocks] == [n for n, _ in net.named_parameters()]
    assert [b.shape for b in model.layout.blocks] == [tuple(p.shape) for p in net.parameters()]
    assert model.layout.size == sum(p.numel() for p in net.parameters())
    v = model.flatten()
    model.load_into(torch.zeros_like(v))
    assert all(bool((p == 0).all()) for p in net.parameters())
    model.load_into(v)
    assert torch.equal(model.flatten(), v)


def test_frozen_parameters_stay_out_of_the_layout():
    net = mlp([3, 4, 2]).double()
    net[0].weight.requires_grad_(False)
    model = NeuralModel(net)
    assert "0.weight" not in [b.name for b in model.layout.blocks]
    x = torch.randn(5, 3, dtype=torch.float64)
    theta = model.flatten()[None]
    assert torch.allclose(model.predict(theta, x)[0], net(x), atol=ATOL)


# -- backends, chunks, devices ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_vmap_equals_loop_float64(kind):
    torch.manual_seed(1)
    if kind == "mlp":
        net, x = mlp([6, 8, 5, 3]).double(), torch.randn(7, 6, dtype=torch.float64)
    else:
        net, x = _small_cnn().double(), torch.randn(5, 1, 8, 8, dtype=torch.float64)
    theta = _ensemble(NeuralModel(net), 6)
    a = NeuralModel(net, backend="vmap").predict(theta, x)
    b = NeuralModel(net, backend="loop").predict(theta, x)
    assert a.shape == (6, x.shape[0], net(x).shape[1]) and a.dtype == torch.float64
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # member 2 alone = member 2 in the batch, = the module loaded with it
    NeuralModel(net).load_into(theta[2])
    torch.testing.assert_close(a[2], net(x), atol=ATOL, rtol=0)


def test_chunked_equals_unchunked_and_devices_equal_single():
    torch.manual_seed(2)
    net = mlp([4, 6, 3]).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    theta = _ensemble(NeuralModel(net), 11)
    ref = NeuralModel(net, backend="vmap").predict(theta, x)
    for kw in (dict(members_per_call=3), dict(members_per_call=1),
               dict(devices=["cpu", "cpu"]), dict(devices=["cpu", "cpu", "cpu"],
                                                 members_per_call=2)):
        for backend in ("vmap", "loop"):
            out = NeuralModel(net, backend=backend, **kw).predict(theta, x)
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=f"{kw} {backend}")


def test_run_on_devices_hands_chunks_to_whichever_device_is_free():
    seen: dict[int, list] = {0: [], 1: []}
    lock = threading.Lock()

    def work(index, a, b):
        time.sleep(0.05 if index == 0 else 0.005)   # device 0 is 10x slower
        with lock:
            seen[index].append(a)
        return a

    out = run_on_devices(work, [(i, i + 1) for i in range(20)], ["cpu", "cpu"])
    assert sorted(out) == [(i, i + 1) for i in range(20)]
    assert all(out[s] == s[0] for s in out)
    assert len(seen[1]) > 2 * len(seen[0]) >= 2  # the fast device took most chunks


def test_run_on_devices_reraises_the_first_error():
    def work(index, a, b):
        if a == 3:
            raise RuntimeError("member 3 broke")
        return a

    with pytest.raises(RuntimeError, match="member 3 broke"):
        run_on_devices(work, [(i, i + 1) for i in range(6)], ["cpu", "cpu"])


def test_multidevice_executor_equals_inprocess():
    torch.manual_seed(3)
    net = mlp([4, 5, 2]).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    fwd = NeuralModel(net).with_inputs(x)
    theta = _ensemble(NeuralModel(net), 10)
    y1, ok1 = InProcess().evaluate(fwd, theta)
    y2, ok2 = MultiDevice(["cpu", "cpu"], members_per_call=3).evaluate(fwd, theta)
    torch.testing.assert_close(y2, y1, atol=ATOL, rtol=0)
    assert bool(ok1.all()) and bool(ok2.all())
    with pytest.raises(TypeError, match="replicate"):
        from enkal import CallableModel
        MultiDevice(["cpu"]).evaluate(CallableModel(lambda t: t, parameters=2, output_size=2),
                                      torch.zeros(3, 2, dtype=torch.float64))


def test_auto_backend_rule():
    mlp_model = NeuralModel(mlp([4, 3]))
    cnn_model = NeuralModel(_small_cnn())
    assert mlp_model.choose_backend(AUTO_VMAP_MIN_MEMBERS) == "vmap"
    assert mlp_model.choose_backend(AUTO_VMAP_MIN_MEMBERS - 1) == "loop"
    assert cnn_model.choose_backend(256) == "loop"          # convolutions on a CPU
    assert NeuralModel(mlp([4, 3]), backend="vmap").choose_backend(2) == "vmap"


class _NotVmappable(nn.Module):
    """``.item()`` inside forward: fine per member, impossible under vmap."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        y = self.lin(x)
        return y * float(y.abs().max().item() >= 0)


def test_auto_falls_back_to_the_loop_only_when_vmap_cannot_batch():
    net = _NotVmappable().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    theta = _ensemble(NeuralModel(net), AUTO_VMAP_MIN_MEMBERS + 2)
    with pytest.raises(RuntimeError):
        NeuralModel(net, backend="vmap").predict(theta, x)
    auto = NeuralModel(net)
    out = auto.predict(theta, x)
    torch.testing.assert_close(out, NeuralModel(net, backend="loop").predict(theta, x),
                               atol=ATOL, rtol=0)
    assert auto.choose_backend(len(theta)) == "loop"
    # a user error (inputs of the wrong width) is raised, and does not switch vmap off
    other = NeuralModel(mlp([3, 2]).double())
    with pytest.raises(RuntimeError) as err:
        other.predict(_ensemble(other, 10), torch.zeros(4, 5, dtype=torch.float64))
    assert other.choose_backend(10) == "vmap"
    notes = getattr(err.value, "__notes__", ["inputs of shape (4, 5)"])
    assert "inputs of shape (4, 5)" in notes[0]


def test_batchnorm_in_eval_mode_shares_its_statistics():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    net.train()
    net(torch.randn(32, 3, dtype=torch.float64))  # give the running statistics values
    x = torch.randn(5, 3, dtype=torch.float64)
    model = NeuralModel(net, backend="vmap")
    theta = _ensemble(model, 4)
    net.eval()
    stats = net[1].running_mean.clone()
    a = model.predict(theta, x)
    b = NeuralModel(net, backend="loop").predict(theta, x)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert torch.equal(net[1].running_mean, stats)  # never updated
    model.load_into(theta[2])
    torch.testing.assert_close(net(x), a[2], atol=ATOL, rtol=0)  # the running statistics


def _bn_cnn() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 3, 3, padding=1),
                         nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 4),
                         nn.BatchNorm1d(4)).double()


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_batchnorm_in_training_mode_normalises_each_member_by_its_own_batch(backend):
    # Was refused (a ValueError asking for eval()); now each member is what the network
    # with its weights computes in training mode, and no member writes the buffers.
    net = _bn_cnn()
    x = torch.randn(10, 36, dtype=torch.float64)
    model = NeuralModel(net, backend=backend)
    theta = _ensemble(model, 5, scale=0.3)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    out = model.predict(theta, x)
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for i in (0, 4):
        one = copy.deepcopy(net)
        NeuralModel(one).load_into(theta[i])
        torch.testing.assert_close(one(x), out[i], atol=ATOL, rtol=0)  # batch statistics
    # the batch statistics matter: the same member in evaluation mode differs
    one.eval()
    assert (one(x) - out[4]).abs().max() > 0.1


def test_a_step_updates_batchnorm_statistics_from_the_new_mean_only():
    net = _bn_cnn()
    before = copy.deepcopy(net)
    x = torch.randn(12, 36, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    opt = EnsembleKalmanOptimizer(net, ensemble_size=8, seed=0)
    opt.step(x, y)
    # what one training-mode forward of the new mean does to the statistics, and no more
    NeuralModel(before).load_into(opt.mean)
    before(x)
    for (k, v), (k2, w) in zip(net.named_buffers(), before.named_buffers(), strict=True):
        assert k == k2 and torch.equal(v, w), k
    assert int(net[2].num_batches_tracked) == 1
    # evaluation mode: nothing is written
    net.eval()
    stats = net[2].running_var.clone()
    opt.step(x, y)
    assert torch.equal(net[2].running_var, stats)
    assert NeuralModel(net).track_statistics(opt.mean, x) is False


def test_track_statistics_checks_its_arguments():
    model = NeuralModel(_bn_cnn())
    with pytest.raises(ValueError, match=r"vector: expected a tensor of shape \(\d+,\)"):
        model.track_statistics(torch.zeros(3, dtype=torch.float64), torch.zeros(2, 36))
    with pytest.raises(TypeError, match="inputs: expected a torch.Tensor"):
        model.track_statistics(model.flatten(), [[0.0] * 36])


def test_dropout_in_training_mode_is_refused():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Dropout layer '1'"):
        NeuralModel(net).predict(NeuralModel(net).flatten()[None], torch.randn(2, 3))


@pytest.mark.parametrize("bad, err, match", [  # mlp([3, 4, 1]): N_par = 12 + 4 + 4 + 1 = 21
    (torch.zeros(3, 5), ValueError, r"expected shape \(N_ens, 21\)"),
    (torch.zeros(21), ValueError, r"parameters\[None\]"),
    (torch.zeros(21, 3), ValueError, "members first"),
    (torch.zeros(3, 21, dtype=torch.int64), TypeError, "floating"),
    ([[0.0] * 21], TypeError, "torch.Tensor"),
])
def test_predict_rejects_bad_parameters(bad, err, match):
    model = NeuralModel(mlp([3, 4, 1]))
    assert model.n_parameters == 21
    with pytest.raises(err, match=match):
        model.predict(bad, torch.zeros(2, 3))


def test_constructor_and_input_errors():
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module"):
        NeuralModel("net")
    with pytest.raises(ValueError, match="backend: expected one of"):
        NeuralModel(mlp([2, 2]), backend="fast")
    with pytest.raises(ValueError, match="trainable"):
        NeuralModel(nn.ReLU())
    model = NeuralModel(mlp([2, 2]))
    with pytest.raises(TypeError, match="inputs: expected a torch.Tensor"):
        model.predict(model.flatten()[None], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="vector: expected shape"):
        model.load_into(torch.zeros(2, model.n_parameters))


# -- the forward model of a fixed batch ----------------------------------------------------------
def test_with_inputs_fits_a_network_with_the_generic_smoother():
    torch.manual_seed(5)
    teacher = mlp([2, 3, 1]).double()
    x = torch.randn(30, 2, dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x)[:, 0]
    student = mlp([2, 3, 1]).double()
    fwd = NeuralModel(student).with_inputs(x)
    assert fwd.output_size == 30 and fwd.layout.size == 13
    obs = Observations(y, noise_std=0.01)
    prior = _ensemble(NeuralModel(student), 100, scale=0.5)
    smoother = EnsembleSmoother(obs, rule=SquareRoot(), schedule=ESMDA.constant(8), seed=0)
    result = smoother.run(fwd, prior)
    before = float((fwd(prior).mean(0) - y).square().mean())
    after = float((fwd(result.parameters).mean(0) - y).square().mean())
    assert after < 0.1 * before


def test_classification_targets_and_predictions():
    c = Classification()
    y = c.targets(torch.tensor([2, 0]), 2, 3)
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0] and y.dtype == torch.float64
    p = c.predictions(torch.zeros(4, 2, 3))
    assert p.shape == (4, 6) and torch.allclose(p, torch.full((4, 6), 1 / 3))
    with pytest.raises(ValueError, match=r"labels in \[0, 2\]"):
        c.targets(torch.tensor([3, 0]), 2, 3)
    with pytest.raises(ValueError, match=r"shape \(2,\) = \(B,\)"):
        c.targets(torch.tensor([1, 0, 1]), 2, 3)
    with pytest.raises(TypeError, match="Classification"):
        Regression().targets(torch.tensor([1, 0]), 2, 1)
    with pytest.raises(ValueError, match=r"\(2, 3\) = \(B, n_out\)"):
        Regression().targets(torch.zeros(2, 4), 2, 3)


# -- the optimizer -------------------------------------------------------------------------------
def _optimizer(seed=0, **kw):
    torch.manual_seed(seed)
    net = mlp([64, 16, 10])
    kw.setdefault("ensemble_size", 16)
    return net, EnsembleKalmanOptimizer(net, seed=seed, **kw)


def test_step_writes_the_mean_into_the_model_and_exposes_predictions():
    x, y, _, _ = _digits_subset(64)
    net, opt = _optimizer()
    assert torch.equal(NeuralModel(net).flatten(), opt.mean)
    before, mean = opt.ensemble.clone(), opt.mean
    info = opt.step(x[:32], y[:32])
    assert not torch.equal(opt.ensemble, before) and not torch.equal(opt.mean, mean)
    assert torch.equal(NeuralModel(net).flatten(), opt.mean)
    # the predictions are those of the members drawn at this step (for MI pruning)
    torch.testing.assert_close(opt.last_predictions, Classification().predictions(
        opt.net.predict(opt.ensemble, x[:32])), atol=1e-6, rtol=0)
    assert set(info.schedule) >= {"gamma", "rho"}
    assert opt.last_predictions.shape == (16, 320) == opt.last_errors.shape
    assert opt.last_observations.shape == (320,)
    assert info.iteration == 1 == opt.iteration and info.misfit > 0
    mean, std = opt.predict(x[:5])
    assert mean.shape == (5, 10) == std.shape
    torch.testing.assert_close(mean.sum(1), torch.ones(5), atol=1e-5, rtol=0)


def test_step_rejects_wrong_targets():
    x, y, _, _ = _digits_subset(64)
    _, opt = _optimizer()
    with pytest.raises(ValueError, match=r"shape \(8,\) = \(B,\)"):
        opt.step(x[:8], y[:9])
    with pytest.raises(ValueError, match=r"\(8, 10\)"):
        opt.step(x[:8], torch.zeros(8, 3))
    with pytest.raises(TypeError, match="inputs: expected a torch.Tensor"):
        opt.step(x[:8].tolist(), y[:8])
    with pytest.raises(RuntimeError):          # inputs of the wrong width: the module says so
        opt.step(x[:8, :10], y[:8])
    _, fresh = _optimizer()                    # refused steps left no trace (same draws)
    opt.step(x[:8], y[:8])
    fresh.step(x[:8], y[:8])
    assert torch.equal(opt.ensemble, fresh.ensemble) and torch.equal(opt.mean, fresh.mean)


PAPER = dict(members=Carry(CollapseGuard(threshold=1e-4, reset=1e-3)),
             rule=PerturbedObservations(),
             schedule=FixedAnnealing(factor=0.75, initial=1.0, floor=0.1))


@pytest.mark.parametrize("variant", ["default", "paper"])
def test_state_dict_round_trip_continues_bitwise(tmp_path, variant):
    x, y, _, _ = _digits_subset(128)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    kw = PAPER if variant == "paper" else {}
    net, opt = _optimizer(seed=3, **kw)
    for xb, yb in batches[:2]:
        opt.step(xb, yb)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    for xb, yb in batches[2:]:
        opt.step(xb, yb)
    net2, opt2 = _optimizer(seed=99, **kw)  # another seed: everything comes from the file
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert state["schedule"][0]["type"] == ("AnnealingState" if kw else "RelativeNoiseState")
    opt2.load_state_dict(state)
    for xb, yb in batches[2:]:
        opt2.step(xb, yb)
    assert torch.equal(opt2.ensemble, opt.ensemble)
    assert torch.equal(opt2.mean, opt.mean)
    assert torch.equal(NeuralModel(net2).flatten(), NeuralModel(net).flatten())
    if not kw:  # a state of another schedule or without a mean is refused
        _, carry = _optimizer(**PAPER)
        with pytest.raises(ValueError, match="does not match"):
            carry.load_state_dict(state)
        bad = dict(state)
        del bad["mean"]
        with pytest.raises(ValueError, match="needs the mean"):
            opt2.load_state_dict(bad)


def test_new_strategies_validate_their_arguments():
    for bad, err, match in [
        (lambda: Redraw(spread=0.0), ValueError, "Redraw.spread"),
        (lambda: Redraw(spread="0.1"), TypeError, "Redraw.spread"),
        (lambda: Carry(guard=1e-4), TypeError, "Carry.guard: expected CollapseGuard"),
        (lambda: RelativeNoise(gamma=0.0), ValueError, "RelativeNoise.gamma"),
        (lambda: RelativeNoise(growth=0.5), ValueError, r"RelativeNoise.growth: .* >= 1"),
        (lambda: RelativeNoise(steps=0), ValueError, "RelativeNoise.steps"),
        (lambda: RelativeNoise(steps=1.5), TypeError, "RelativeNoise.steps"),
        (lambda: RelativeNoise(gamma="Auto"), ValueError, "RelativeNoise.gamma: .* or 'auto'"),
        (lambda: RelativeNoise(final_gamma=0.0), ValueError, "RelativeNoise.final_gamma"),
        (lambda: RelativeNoise(budget=-1.0), ValueError, "RelativeNoise.budget"),
        (lambda: RelativeNoise(min_gamma=float("inf")), ValueError, "RelativeNoise.min_gamma"),
        (lambda: RelativeNoise().gamma_at(0), ValueError, "needs n_members and n_parameters"),
        (lambda: _optimizer(members="redraw"), TypeError, "members: expected Redraw"),
        (lambda: _optimizer(prior_std=0.1), ValueError, "prior_std: only used with"),
        (lambda: Redraw().std(nn.Linear(2, 2)), TypeError, "net: expected a NeuralModel"),
    ]:
        with pytest.raises(err, match=match):
            bad()
    _optimizer(prior_std=0.1, members=Carry())  # fine with Carry


def test_relative_noise_formula_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    e, m = 12, 30
    preds = 5.0 * torch.randn(e, m, generator=g, dtype=torch.float64)
    noise = RelativeNoise(gamma=3.0, growth=10.0, steps=100)
    d = preds - preds.mean(0)
    eig = torch.linalg.eigvalsh(d @ d.T / (e - 1))   # the nonzero spectrum of C (E-1 values)
    lam = float(eig[1:].mean())
    assert float(eig[0]) < 1e-10 * float(eig[-1])
    assert noise.eigenvalue(preds) == pytest.approx(lam, rel=1e-12)
    for it, gamma in [(0, 3.0), (50, 3.0 * 10 ** 0.5), (100, 30.0), (400, 30.0)]:
        assert noise.gamma_at(it) == pytest.approx(gamma, rel=1e-12)
        for std in (1.0, 0.5):  # the optimizer's noise does not change rho
            obs = Observations(torch.zeros(m, dtype=torch.float64), noise_std=std)
            alpha, state, info = noise.step(RelativeNoiseState(it), parameters=preds,
                                            predictions=preds, observations=obs)
            rho2 = alpha * std ** 2
            assert rho2 == pytest.approx(gamma * lam, rel=1e-12)
            assert info["rho"] ** 2 == pytest.approx(rho2) and state.iteration == it + 1
            # whitened anomalies: sum Sig^2 = (E-1)/gamma whatever the output scale
            s = d / (rho2 * (e - 1)) ** 0.5
            assert float(s.square().sum()) == pytest.approx((e - 1) / gamma, rel=1e-10)


def test_relative_noise_auto_gamma_follows_the_coverage():
    # gamma_0 = max(min_gamma, steps (E - 1) / N_par / budget); gamma_end = max(final_gamma,
    # growth gamma_0); geometric in between, constant after `steps`
    noise = RelativeNoise(steps=460)
    g0 = 460 * 63 / 2410 / 0.6                     # the digits MLP at E = 64: 20.04
    assert noise.initial_gamma(64, 2410) == pytest.approx(g0, rel=1e-12)
    assert noise.gamma_at(460, 64, 2410) == pytest.approx(3 * g0, rel=1e-12)
    assert noise.gamma_at(230, 64, 2410) == pytest.approx(3 ** 0.5 * g0, rel=1e-12)
    assert noise.gamma_at(10_000, 64, 2410) == pytest.approx(3 * g0, rel=1e-12)
    # low coverage (LeNet-5, c = 705 * 63 / 61706 = 0.72): the floor, growing to
    # final_gamma * c / final_coverage = 10.8 (not to 30: that stalled, issue #15)
    lenet = RelativeNoise(steps=705)
    c = 705 * 63 / 61706
    assert lenet.initial_gamma(64, 61706) == 3.0
    assert lenet.gamma_at(705, 64, 61706) == pytest.approx(30.0 * c / 2.0, rel=1e-12)
    assert RelativeNoise(steps=705, final_coverage=None).gamma_at(705, 64, 61706) == \
        pytest.approx(30.0, rel=1e-12)
    # the default (steps=500): 3 growing to max(3 * 3, 30 * 0.51 / 2) = 9
    assert RelativeNoise().final(64, 61706) == pytest.approx(9.0, rel=1e-12)
    # an explicit gamma ignores the shape; final_gamma=None leaves only `growth`
    fixed = RelativeNoise(gamma=2.0, growth=1.0, final_gamma=None, steps=10)
    assert fixed.gamma_at(0) == fixed.gamma_at(50) == 2.0
    assert RelativeNoise(gamma=2.0, growth=2.0, final_gamma=None, steps=10).gamma_at(10) == 4.0
    # the schedule reads the shape from the parameters it is given: (N_ens, N_par)
    preds = torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    obs = Observations(torch.zeros(5, dtype=torch.float64), noise_std=1.0)
    auto = RelativeNoise(steps=1000)
    for n_par in (100, 10_000):
        _, _, info = auto.step(auto.init(), parameters=torch.zeros(8, n_par),
                               predictions=preds, observations=obs)
        assert info["gamma"] == pytest.approx(auto.initial_gamma(8, n_par), rel=1e-12)
    assert auto.initial_gamma(8, 100) > auto.initial_gamma(8, 10_000) == 3.0


def test_redraw_spread_is_kaiming_per_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 5),
                        nn.LayerNorm(5))
    model = NeuralModel(net)
    fans = {"0.weight": 18, "0.bias": 18, "2.weight": 12, "2.bias": 12, "3.weight": 5,
            "3.bias": 5}
    assert kaiming_std(net, list(fans)) == pytest.approx(
        {k: (2 / f) ** 0.5 for k, f in fans.items()})
    std = Redraw(spread=0.1).std(model)
    for b in model.layout.blocks:
        assert bool((std[b.slice] == 0.1 * (2 / fans[b.name]) ** 0.5).all())
    # the drawn ensemble: centred on the model's parameters with that spread per layer
    opt = EnsembleKalmanOptimizer(net, ensemble_size=4000, seed=0, members=Redraw(0.1))
    theta = model.flatten()
    for b in model.layout.blocks:
        cols = opt.ensemble[:, b.slice]
        target = 0.1 * (2 / fans[b.name]) ** 0.5
        assert float(cols.std(0).mean()) == pytest.approx(target, rel=0.03)
        assert float((cols.mean(0) - theta[b.slice]).abs().max()) < 5 * target / 4000 ** 0.5


def test_paper_variant_carries_the_ensemble_with_the_guard():
    x, y, _, _ = _digits_subset(64)
    net, opt = _optimizer(**PAPER)
    assert opt.guard == CollapseGuard(threshold=1e-4, reset=1e-3)
    before = opt.ensemble.clone()
    info = opt.step(x[:32], y[:32])
    assert "rho" in info.schedule and info.n_resampled >= 0
    assert not torch.equal(opt.ensemble, before)
    assert torch.equal(opt.mean, opt.ensemble.mean(0))
    assert torch.equal(NeuralModel(net).flatten(), opt.ensemble.mean(0))


@pytest.mark.parametrize("members", [Redraw(), Carry(CollapseGuard(threshold=1e-2,
                                                                   reset=5e-2))])
def test_mask_keeps_pruned_parameters_at_zero(members):
    x, y, _, _ = _digits_subset(64)
    net, opt = _optimizer(members=members)
    mask = torch.ones(opt.layout.size, dtype=torch.bool)
    mask[::3] = False
    opt.set_mask(mask)
    for i in range(3):
        opt.step(x[16 * i:16 * i + 16], y[16 * i:16 * i + 16])
    assert bool((opt.ensemble[:, ~mask] == 0).all())
    assert bool((opt.ensemble[:, mask].var(0) > 0).all())
    assert bool((opt.mean[~mask] == 0).all())
    assert bool((NeuralModel(net).flatten()[~mask] == 0).all())
    with pytest.raises(ValueError, match=r"mask: expected shape"):
        opt.set_mask(torch.ones(3, dtype=torch.bool))


def test_information_ranks_ignored_inputs_last_and_leaves_training_unchanged():
    x, y, _, _ = _digits_subset(256)
    x = x.clone()
    x[:, :8] = 0.0          # the first 8 pixels never vary: their first-layer weights do nothing
    net, opt = _optimizer()
    _, twin = _optimizer()
    mask = torch.ones(opt.layout.size, dtype=torch.bool)
    mask[-5:] = False       # five pruned output biases
    opt.set_mask(mask)
    twin.set_mask(mask)
    mi = opt.information(x, y, draws=32, seed=1)           # N = 32 x 16 = 512 members
    assert mi.shape == (opt.layout.size,) and mi.dtype == torch.float64
    assert bool((mi[~mask] == 0).all())
    w1 = opt.layout.unflatten(torch.arange(opt.layout.size)[None])["0.weight"][0]  # (16, 64)
    ignored, used = w1[:, :8].reshape(-1), w1[:, 8:].reshape(-1)
    # an ignored weight scores sampling noise only: r^2 ~ chi2_1 / N per error dimension, so
    # its mean is N_obs / (2 N) = 2560 / 1024 = 2.5 nats (measured 2.63); used weights add
    # their signal (measured +0.38), far beyond the standard errors of the two means
    n_obs, n = 256 * 10, 32 * 16
    assert abs(float(mi[ignored].mean()) / (n_obs / (2 * n)) - 1) < 0.2
    se = math.hypot(float(mi[ignored].std()) / math.sqrt(ignored.numel()),
                    float(mi[used].std()) / math.sqrt(used.numel()))
    assert float(mi[used].mean() - mi[ignored].mean()) > 4 * se
    # the optimizer's own generator is untouched: the next step equals the twin's
    opt.step(x[:32], y[:32])
    twin.step(x[:32], y[:32])
    assert torch.equal(opt.mean, twin.mean)
    # more draws, less noise: the spread of the ignored weights' scores shrinks ~ 1/N
    assert float(opt.information(x, y, draws=8, seed=1)[ignored].std()) > \
        2 * float(mi[ignored].std())
    with pytest.raises(ValueError, match="draws"):
        opt.information(x, y, draws=0)
    with pytest.raises(TypeError, match="score"):
        opt.information(x, y, score="mi")
    _, carry = _optimizer(members=Carry())
    with pytest.raises(ValueError, match="draws=1"):
        carry.information(x, y, draws=4)
    assert carry.information(x, y, draws=1).shape == (opt.layout.size,)


def test_sections_one_at_a_time_updates_one_tensor_per_step():
    x, y, _, _ = _digits_subset(64)
    _, opt = _optimizer(sections=Sections(one_at_a_time=True), members=Carry(guard=None))
    blocks = opt.layout.blocks
    before = opt.ensemble.clone()
    opt.step(x[:16], y[:16])
    changed = [b.name for b in blocks if not torch.equal(opt.ensemble[:, b.slice],
                                                         before[:, b.slice])]
    assert changed == [blocks[0].name]
    _, fresh = _optimizer(sections=Sections(one_at_a_time=True))  # Redraw: the mean
    mean = fresh.mean
    fresh.step(x[:16], y[:16])
    assert [b.name for b in blocks if not torch.equal(fresh.mean[b.slice],
                                                      mean[b.slice])] == [blocks[0].name]
    assert bool((fresh.ensemble[:, blocks[1].slice] == mean[blocks[1].slice]).all())
    _, per_tensor = _optimizer(sections=Sections())
    per_tensor.step(x[:16], y[:16])
    with pytest.raises(ValueError, match="in no section"):
        Sections(groups=[["0.weight"]]).resolve(opt.layout)


@pytest.mark.parametrize("members", [Redraw(), Carry(guard=None)])
def test_hybrid_shift_keeps_the_spread(members):
    x, y, _, _ = _digits_subset(64)
    net, opt = _optimizer(members=members)
    adam = torch.optim.AdamW(net.parameters(), lr=1e-2)
    hybrid = HybridOptimizer(opt, adam, loss_fn=nn.functional.cross_entropy, kalman_every=2)
    anomalies = opt.ensemble - opt.ensemble.mean(0)
    loss, info = hybrid.step(x[:16], y[:16])
    assert info is None and loss > 0
    torch.testing.assert_close(opt.ensemble - opt.ensemble.mean(0), anomalies, atol=1e-5,
                               rtol=0)  # float32 ensemble: a shift keeps the anomalies
    assert torch.allclose(NeuralModel(net).flatten(), opt.mean, atol=1e-6)
    _, info = hybrid.step(x[16:32], y[16:32])
    assert info is not None and info.iteration == 1
    assert torch.equal(NeuralModel(net).flatten(), opt.mean)


def test_hybrid_state_dict_round_trip(tmp_path):
    x, y, _, _ = _digits_subset(96)

    def build():
        net, opt = _optimizer(seed=4)
        adam = torch.optim.AdamW(net.parameters(), lr=1e-2)
        return HybridOptimizer(opt, adam, loss_fn=nn.functional.cross_entropy,
                               kalman_every=2)

    a = build()
    a.step(x[:32], y[:32])
    torch.save(a.state_dict(), tmp_path / "hybrid.pt")
    a.step(x[32:64], y[32:64])
    a.step(x[64:96], y[64:96])
    b = build()
    b.load_state_dict(torch.load(tmp_path / "hybrid.pt", weights_only=True))
    b.step(x[32:64], y[32:64])
    b.step(x[64:96], y[64:96])
    assert torch.equal(a.kalman.ensemble, b.kalman.ensemble)


def test_training_on_digits_reaches_accuracy():
    # 20 epochs of 400 images, batch 50, E = 32, the default recipe told the run's 160 steps
    # (coverage 2.1: gamma 3.4 growing to 30): about 2 s on one core. The threshold is below
    # what seeds 0-4 reach (0.87-0.90) and far above chance (0.1).
    x, y, xt, yt = _digits_subset(400)
    torch.manual_seed(0)
    net = mlp([64, 32, 10])
    opt = EnsembleKalmanOptimizer(net, ensemble_size=32, seed=0,
                                  schedule=RelativeNoise(steps=160))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        perm = torch.randperm(400, generator=g)
        for i in range(0, 400, 50):
            opt.step(x[perm[i:i + 50]], y[perm[i:i + 50]])
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).float().mean())
    assert acc > 0.82, acc


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu_and_keeps_the_device():
    torch.manual_seed(6)
    net = mlp([4, 8, 3]).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    theta = _ensemble(NeuralModel(net), 40)
    cpu = NeuralModel(net).predict(theta, x)
    gpu = NeuralModel(net, device="cuda").predict(theta.to("cuda"), x)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-10, rtol=0)
    both = NeuralModel(net, devices=["cpu", "cuda"], members_per_call=8).predict(theta, x)
    torch.testing.assert_close(both, cpu, atol=1e-10, rtol=0)


# -- models and data ---------------------------------------------------------------------------
def test_lenet5_shapes():
    net = LeNet5()
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert NeuralModel(net).layout.size == sum(p.numel() for p in net.parameters())


def test_load_digits_is_fixed_and_standardised():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.train_inputs, b.train_inputs) and a.train_inputs.dtype == torch.float32
    assert a.train_labels.dtype == torch.int64 and set(a.test_labels.tolist()) == set(range(10))
    assert abs(float(a.train_inputs.mean())) < 1e-5


def _idx(magic_type=0x08, dims=(2, 3), payload=None, compress=True) -> bytes:
    head = bytes([0, 0, magic_type, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    n = 1
    for d in dims:
        n *= d
    body = bytes(range(n)) if payload is None else payload
    raw = head + body
    if not compress:
        return raw
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as fh:
        fh.write(raw)
    return buf.getvalue()


def test_read_idx_validates_headers(tmp_path):
    good = tmp_path / "good.gz"
    good.write_bytes(_idx())
    assert read_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    plain = tmp_path / "plain"
    plain.write_bytes(_idx(compress=False))
    assert read_idx(plain, expected_dims=2).shape == (2, 3)
    cases = {
        "type.gz": (_idx(magic_type=0x0D), "type 0x08"),
        "short.gz": (_idx(payload=b"\x00" * 5), "declares"),
        "long.gz": (_idx(payload=b"\x00" * 7), "declares"),
        "magic.gz": (b"\x01\x02" + _idx(compress=False)[2:], "not an IDX"),
    }
    for name, (data, match) in cases.items():
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(ValueError, match=match) as err:
            read_idx(f)
        assert name in str(err.value)
    with pytest.raises(ValueError, match="expected 3 dimensions"):
        read_idx(good, expected_dims=3)


def test_fashion_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_fashion_mnist(tmp_path / "missing")
    for stem, dims in (("train-images-idx3-ubyte", (2, 28, 28)),
                       ("train-labels-idx1-ubyte", (3,)),
                       ("t10k-images-idx3-ubyte", (1, 28, 28)),
                       ("t10k-labels-idx1-ubyte", (1,))):
        n = 1
        for d in dims:
            n *= d
        (tmp_path / (stem + ".gz")).write_bytes(_idx(dims=dims, payload=bytes(n)))
    with pytest.raises(ValueError, match="has 2 images but .*train-labels.* has 3 labels"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not Path(FASHION_MNIST_PATH).is_dir(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_loads():
    data = load_fashion_mnist()
    assert data.train_inputs.shape == (60000, 1, 28, 28)
    assert data.test_inputs.shape == (10000, 1, 28, 28)
    assert data.train_labels.dtype == torch.int64 and int(data.train_labels.max()) == 9
    assert abs(float(data.train_inputs.mean())) < 1e-3


class _Gated(nn.Module):
    """A linear layer whose outputs are NaN when its first weight exceeds 50, and 1e8 when
    it is below -50: members drawn there fail (NaN) or explode (finite garbage), as a
    diverging network would."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4).double()

    def forward(self, x):
        out = self.lin(x)
        w = self.lin.weight[0, 0]
        out = torch.where(w < -50, torch.full_like(out, 1e8), out)
        return torch.where(w > 50, torch.full_like(out, math.nan), out)


@pytest.mark.parametrize("failure, n_failed", [
    (ResampleFailed(), 1), (IgnoreFailed(), 1), (ResampleFailed(max_sigma=1e3), 2)],
    ids=["resample", "ignore", "max_sigma"])
def test_failed_members_are_handled_exactly_as_in_the_smoother(failure, n_failed):
    """The optimizer's step is the smoother's update body (enkal.analysis): the same failure
    policy, the same transform, the same draws -- so one Carry step on a batch equals one
    smoother step on that batch's predictions, bit for bit, failed member included."""
    torch.manual_seed(0)
    guard = CollapseGuard(threshold=1e-6, reset=1e-4)
    opt = EnsembleKalmanOptimizer(_Gated(), ensemble_size=8, seed=4, members=Carry(guard),
                                  rule=PerturbedObservations(), failure=failure,
                                  schedule=FixedAnnealing(factor=0.9, initial=1.0, floor=0.5),
                                  task=Regression(), backend="loop")
    opt.ensemble[0, 0] = 100.0  # member 0 fails (NaN)
    opt.ensemble[1, 0] = -100.0  # member 1 explodes: 1e8 outputs, ~1e8 noise std's off
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.randn(5, 4, dtype=torch.float64)
    before, rng = opt.ensemble.clone(), opt._generator.get_state()
    info = opt.step(x, t)
    assert info.n_failed == n_failed  # max_sigma catches the exploded member, as in the smoother
    smoother = EnsembleSmoother(Observations(t.reshape(-1), noise_std=opt.noise),
                                rule=opt.rule, schedule=opt.schedule, guard=guard,
                                failure=failure)
    state = SmootherState(parameters=before, iteration=0, schedule=opt.schedule.init(),
                          rng_state=rng)
    new, sinfo = smoother.step(state, opt.last_predictions)
    assert torch.equal(new.parameters, opt.ensemble)
    assert (sinfo.n_failed, sinfo.misfit, sinfo.alpha) == (info.n_failed, info.misfit,
                                                           info.alpha)


def test_a_step_refused_by_the_failure_policy_changes_nothing():
    torch.manual_seed(0)
    opt = EnsembleKalmanOptimizer(_Gated(), ensemble_size=8, seed=4, members=Carry(),
                                  failure=Raise(), task=Regression(), backend="loop")
    opt.ensemble[0, 0] = 100.0
    before, rng = opt.ensemble.clone(), opt._generator.get_state()
    with pytest.raises(FailedMembersError, match="Raise"):
        opt.step(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64))
    assert torch.equal(opt.ensemble, before) and torch.equal(opt._generator.get_state(), rng)
    assert opt.iteration == 0
