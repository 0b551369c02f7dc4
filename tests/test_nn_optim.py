"""The network optimizer as a ``torch.optim.Optimizer`` (issue #14): param groups, ``lr`` as a
multiplier of the mean increment, LR schedulers, ``step(closure=)``, state dicts.

Tolerances: ``lr`` only rescales the mean increment after an analysis that does not depend on
it, so twins loaded from one state dict run the same analysis bit for bit and differ only in
the last few roundings (bounds derived at each assertion, in float64).
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings

import pytest
import torch
from conftest import blas_fingerprint, torch_threads
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, StepLR

from enkal import CollapseGuard, FixedAnnealing, PerturbedObservations, RelativeNoise
from enkal.nn import Carry, EnsembleKalmanOptimizer, HybridOptimizer, Sections

EPS = torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the BLAS path the reference hashes below were recorded with, and
    the fast one on the shared machine (see tests/test_nn.py)."""
    with torch_threads(1):
        yield


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """96 points in 6 dimensions, 3 classes from two half-planes (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return x, y


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(n: int = 4):
    x, y = _data()
    return [(x[24 * i:24 * (i + 1)], y[24 * i:24 * (i + 1)]) for i in range(n)]


PAPER = dict(members=Carry(CollapseGuard(threshold=1e-4, reset=1e-3)),
             rule=PerturbedObservations(),
             schedule=FixedAnnealing(factor=0.75, initial=1.0, floor=0.1))
CONFIGS = {  # "redraw": the schedule of its recording (the default before RelativeNoise.newton)
    "redraw": dict(schedule=RelativeNoise()),
    "sections": dict(sections=Sections(one_at_a_time=True), members=Carry()),
    "carry": PAPER,
}

# The mean's sum after 4 steps of _batches() (seed 5, N_ens 16) with the implementation BEFORE
# the optimizer became a torch optimizer (commit 8b6f35c; torch 2.13.0+cpu, one thread), and
# the sha256 of its float64 bytes per BLAS/LAPACK fingerprint (`conftest.blas_fingerprint`): MKL picks
# its kernels by CPU (AVX2, AVX-512...), which round differently, so a digest holds only where
# it was recorded. Recorded on an AVX-512/AMX Xeon by running 8b6f35c on this test's inputs
# (2026-12-05); the first recording (an earlier machine of unknown fingerprint) gave other
# digests with the same sums to 1e-14.
SUMS = {"redraw": -0.13211977317902623, "sections": 0.4457374141015467,
        "carry": 2.9002766087212257}
DIGESTS = {
    "4522420e8fb1": {
        "redraw": "2c9eb259ac1187bf7a6c18ee76fe9ea4d467baf2d1a0c43c482c5017098df7df",
        "sections": "c96bbfca0f4ce9459ae05cb385d7110851619cb4713613564724fb7d0fe0a7f2",
        "carry": "6a44a1aa9379088e3b6d76827431e8d708ee97e6987f20fe1cd1ec8e03a116c5",
    },
}


def _optimizer(config: str = "redraw", seed: int = 5, **kw) -> EnsembleKalmanOptimizer:
    return EnsembleKalmanOptimizer(_net(), ensemble_size=16, seed=seed,
                                   **{**CONFIGS[config], **kw})


# -- a torch optimizer -------------------------------------------------------------------------
def test_is_a_torch_optimizer_with_one_group_of_the_trainable_parameters():
    net = _net()
    net[0].bias.requires_grad_(False)                     # frozen: not in the layout
    opt = EnsembleKalmanOptimizer(net, ensemble_size=4)
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1.0
    params = opt.param_groups[0]["params"]
    assert [id(p) for p in params] == [id(net[0].weight), id(net[2].weight), id(net[2].bias)]
    assert sum(p.numel() for p in params) == opt.layout.size
    net(torch.randn(2, 6, dtype=torch.float64)).sum().backward()
    assert net[0].weight.grad is not None
    opt.zero_grad()                                       # torch's, over the group
    assert net[0].weight.grad is None
    with pytest.raises(ValueError, match="add_param_group: .* one parameter group"):
        opt.add_param_group({"params": [net[0].bias]})
    assert "lr=1.0" in repr(opt)
    assert EnsembleKalmanOptimizer(net, ensemble_size=4, lr=0.25).param_groups[0]["lr"] == 0.25


@pytest.mark.parametrize("config", sorted(SUMS))
def test_lr_one_is_bitwise_the_update_before_issue_14(config):
    """``lr = 1`` (the default, or given) adds no arithmetic: the mean after 4 seeded steps is
    the one recorded before the change, byte for byte where the BLAS fingerprint has a
    recording (elsewhere BLAS may round differently: the sum to 1e-9 relative, far below any
    algorithmic change and far above the 1e-14 the platforms differ by)."""
    digests = DIGESTS.get(blas_fingerprint())
    for kw in ({}, {"lr": 1.0}):
        opt = _optimizer(config, **kw)
        for xb, yb in _batches():
            opt.step(xb, yb)
        mean = opt.mean
        if digests is not None:
            assert hashlib.sha256(mean.numpy().tobytes()).hexdigest() == digests[config]
        assert float(mean.sum()) == pytest.approx(SUMS[config], rel=1e-9)


@pytest.mark.parametrize("config", ["redraw", "carry"])
def test_step_lr_halves_the_mean_increment(config):
    """After ``StepLR(opt, 1, gamma=0.5).step()`` the step's mean increment is exactly half
    of the one the same state takes with ``lr = 1``; everything else is unchanged."""
    opt = _optimizer(config)
    scheduler = StepLR(opt, 1, gamma=0.5)
    opt.step(*_batches()[0])                              # lr = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # the scheduler sees opt.step as the optimizer step
        scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.5
    state = copy.deepcopy(opt.state_dict())
    assert state["param_groups"][0]["lr"] == 0.5
    xb, yb = _batches()[1]
    m0 = state["mean"]
    info_half = opt.step(xb, yb)
    twin = _optimizer(config, seed=99)
    twin.load_state_dict(state)
    twin.param_groups[0]["lr"] = 1.0
    info_one = twin.step(xb, yb)
    full = twin.mean - m0
    assert float(full.norm()) > 1e-3                      # a real step, not a no-op
    scale = float(torch.cat([twin.ensemble.abs().max().reshape(1), m0.abs().max().reshape(1)])
                  .max())
    if config == "redraw":
        # m+ = fl(fl(d * 0.5) + m0) with d = fl(m_a - m0) as in the test: 0.5 * d is exact,
        # the add and the subtraction below round once each: <= eps * max|m| in all
        atol = 4 * EPS * scale
    else:
        # Carry: each member shifted (one rounding of |x|), then the mean of 16 members
        # (pairwise summation, ~log2(16) roundings of max|x|): well inside 64 eps max|x|
        atol = 64 * EPS * scale
        anomalies = opt.ensemble - opt.ensemble.mean(0)   # the shift keeps the anomalies
        assert torch.allclose(anomalies, twin.ensemble - twin.ensemble.mean(0), rtol=0,
                              atol=atol)
    assert torch.allclose(opt.mean - m0, 0.5 * full, rtol=0, atol=atol)
    assert float((opt.mean - m0 - 0.5 * full).abs().max()) < 1e-6 * float(full.abs().max())
    assert info_half == info_one                          # diagnostics do not depend on lr
    assert torch.equal(opt._generator.get_state(), twin._generator.get_state())


def test_lambda_lr_is_read_at_every_step():
    """A scheduler's value is the one each step uses: a LambdaLR that halves every step gives
    increments of 1, 1/2, 1/4 times those of lr = 1 from the same states."""
    opt = _optimizer("redraw")
    scheduler = LambdaLR(opt, lambda k: 0.5 ** k)
    for k, (xb, yb) in enumerate(_batches(3)):
        state = copy.deepcopy(opt.state_dict())
        twin = _optimizer("redraw", seed=1)
        twin.load_state_dict(state)
        twin.param_groups[0]["lr"] = 1.0
        twin.step(xb, yb)
        opt.step(xb, yb)
        scheduler.step()
        full, m0 = twin.mean - state["mean"], state["mean"]
        # as in test_step_lr_halves_the_mean_increment: 0.5^k * d exact, two roundings
        assert torch.allclose(opt.mean - m0, 0.5 ** k * full, rtol=0,
                              atol=4 * EPS * float(m0.abs().max() + full.abs().max()))


# -- step(inputs, targets, *, closure) ---------------------------------------------------------
def test_closure_is_called_once_before_the_update_and_its_value_returned():
    opt = _optimizer("redraw")
    twin = _optimizer("redraw")
    net = opt.model
    xb, yb = _batches()[0]
    seen = []

    def closure():
        seen.append(opt.net.flatten())                    # what the model holds when called
        assert torch.is_grad_enabled()                    # as torch optimizers call it
        loss = nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        return loss

    before = opt.mean
    with torch.no_grad():
        loss = opt.step(xb, yb, closure=closure)
    assert len(seen) == 1 and torch.equal(seen[0], before)  # evaluated at the old mean
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert net[0].weight.grad is not None                 # its backward ran
    info = twin.step(xb, yb)
    assert opt.last_info == info                          # the StepInfo is kept
    assert torch.equal(opt.mean, twin.mean)               # the closure changes nothing
    # Lightning's path: optimizer.step(closure=<callable>, **kwargs)
    xb, yb = _batches()[1]
    assert opt.step(closure=lambda: 1.5, **{"inputs": xb, "targets": yb}) == 1.5
    assert twin.step(xb, yb) == opt.last_info and opt.last_info.iteration == 2
    assert torch.equal(opt.mean, twin.mean)


def test_step_needs_the_batch_and_a_callable_closure():
    opt = _optimizer("redraw")
    xb, yb = _batches()[0]
    for call, match in [
        (lambda: opt.step(lambda: 0.0), "closure is a keyword"),      # torch's positional
        (lambda: opt.step(), "needs the minibatch"),
        (lambda: opt.step(closure=lambda: 0.0), "automatic_optimization = False"),
        (lambda: opt.step(xb), "targets=None"),
        (lambda: opt.step(xb, yb, closure=3), "closure: expected a callable"),
    ]:
        with pytest.raises(TypeError, match=match):
            call()
    assert opt.iteration == 0 and opt.last_info is None


# -- lr validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("lr, err", [(-1e-9, ValueError), (-0.5, ValueError),
                                     (float("nan"), ValueError), (float("inf"), ValueError),
                                     ("1", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_lr_is_rejected_at_construction(lr, err):
    with pytest.raises(err, match="^lr: expected"):
        _optimizer("redraw", lr=lr)


@pytest.mark.parametrize("config", ["redraw", "carry"])
def test_lr_zero_keeps_the_mean_as_a_warm_up_starts(config):
    """lr >= 0 as torch's optimizers: a linear warm-up's first step (lr = 0) leaves the mean
    exactly (Redraw: m + 0 * d == m; Carry: the members' mean moves back to m up to the
    rounding of a 16-member mean); the step still counts and the next one moves."""
    opt = _optimizer(config)
    scheduler = LambdaLR(opt, lambda k: min(1.0, k / 4))
    assert opt.param_groups[0]["lr"] == 0.0
    before = opt.mean
    spread = float(opt.ensemble.var(0).mean().sqrt())
    opt.step(*_batches()[0])
    scheduler.step()
    if config == "redraw":
        assert torch.equal(opt.mean, before)
    else:  # see test_step_lr_halves_the_mean_increment for the Carry bound
        atol = 64 * EPS * float(opt.ensemble.abs().max())
        assert torch.allclose(opt.mean, before, rtol=0, atol=atol)
        assert float(opt.ensemble.var(0).mean().sqrt()) < 0.95 * spread  # it contracted
    assert opt.iteration == 1 and opt.param_groups[0]["lr"] == 0.25
    opt.step(*_batches()[1])
    assert float((opt.mean - before).norm()) > 1e-4


def test_bad_lr_from_a_scheduler_refuses_the_step():
    opt = _optimizer("redraw")
    LambdaLR(opt, lambda k: -1.0)                         # sets lr = -1 at once
    before = opt.mean
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]: expected a finite"):
        opt.step(*_batches()[0])
    assert opt.iteration == 0 and torch.equal(opt.mean, before)
    opt.param_groups[0]["lr"] = 1.0
    opt.param_groups.append({"params": [], "lr": 1.0})     # behind add_param_group's back
    with pytest.raises(ValueError, match="param_groups: expected one group"):
        opt.step(*_batches()[0])


# -- state dicts -------------------------------------------------------------------------------
def test_state_dict_round_trip_with_a_scheduler():
    """Optimizer and scheduler saved together (weights_only) resume bit for bit, lr and the
    scheduler's initial_lr included."""
    batches = _batches(4)
    opt = _optimizer("redraw")
    scheduler = StepLR(opt, 1, gamma=0.5)
    for xb, yb in batches[:2]:
        opt.step(xb, yb)
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    for xb, yb in batches[2:]:
        opt.step(xb, yb)
        scheduler.step()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    groups = saved["optimizer"]["param_groups"]
    assert groups[0]["lr"] == 0.25 and groups[0]["initial_lr"] == 1.0
    assert groups[0]["params"] == [0, 1, 2, 3]
    opt2 = _optimizer("redraw", seed=99)
    scheduler2 = StepLR(opt2, 1, gamma=0.5)
    opt2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    assert opt2.param_groups[0]["params"][0] is opt2.model[0].weight
    for xb, yb in batches[2:]:
        opt2.step(xb, yb)
        scheduler2.step()
    assert torch.equal(opt2.mean, opt.mean) and torch.equal(opt2.ensemble, opt.ensemble)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.0625


def test_old_state_dicts_load_and_bad_groups_are_refused():
    opt = _optimizer("carry")
    opt.step(*_batches()[0])
    state = opt.state_dict()
    old = {k: v for k, v in state.items() if k != "param_groups"}   # saved before issue #14
    other = _optimizer("carry", seed=1, lr=0.5)
    other.load_state_dict(old)
    assert other.param_groups[0]["lr"] == 0.5 and torch.equal(other.mean, opt.mean)
    group = state["param_groups"][0]
    for groups, match in [
        ([group, group], "a list of one dict"),
        ({"lr": 1.0}, "a list of one dict"),
        ([{**group, "params": [0, 1]}], "holds 2 parameters, this optimizer 4"),
        ([{**group, "lr": -1.0}], r"state: param_groups\[0\]\['lr'\]: expected a finite"),
    ]:
        fresh = _optimizer("carry", seed=1)
        before = fresh.ensemble.clone()
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict({**state, "param_groups": groups})
        assert torch.equal(fresh.ensemble, before) and fresh.iteration == 0   # untouched


def test_copy_and_hybrid_keep_working():
    """torch's __getstate__ keeps only the groups; deepcopy needs the whole optimizer. The
    hybrid runs its Kalman steps with the optimizer's lr."""
    opt = _optimizer("redraw", lr=0.5)
    clone = copy.deepcopy(opt)
    xb, yb = _batches()[0]
    opt.step(xb, yb)
    clone.step(xb, yb)
    assert torch.equal(opt.mean, clone.mean)
    adamw = torch.optim.AdamW(opt.model.parameters(), lr=1e-2)
    hybrid = HybridOptimizer(opt, adamw, loss_fn=nn.functional.cross_entropy)
    loss, info = hybrid.step(xb, yb)
    assert info is not None and info.iteration == 2 and loss > 0
    assert hybrid.state_dict()["kalman"]["param_groups"][0]["lr"] == 0.5


def test_lightning_manual_optimization_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    """Lightning's own path (LightningOptimizer.step(closure, inputs=, targets=)) and its
    checkpoints: one epoch, save, resume for a second epoch == two epochs straight."""
    lightning = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = _net()

        def configure_optimizers(self):
            opt = EnsembleKalmanOptimizer(self.net, ensemble_size=8, seed=5)
            return {"optimizer": opt, "lr_scheduler": StepLR(opt, 3, gamma=0.5)}

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.optimizers().step(inputs=x, targets=y, closure=lambda: 2.0)
            assert loss == 2.0                           # the closure's value comes back
            self.lr_schedulers().step()

    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=24)      # 4 steps an epoch

    def fit(epochs, ckpt=None, save=None):
        trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                                    enable_progress_bar=False, enable_checkpointing=False,
                                    enable_model_summary=False)
        trainer.fit(Module(), loader, ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return trainer.optimizers[0]

    straight = fit(2)
    assert isinstance(straight, EnsembleKalmanOptimizer) and straight.iteration == 8
    assert straight.param_groups[0]["lr"] == 0.25                # StepLR at steps 3 and 6
    fit(1, save=tmp_path / "one.ckpt")
    resumed = fit(2, ckpt=tmp_path / "one.ckpt")
    assert resumed.iteration == 8 and resumed.param_groups[0]["lr"] == 0.25
    assert torch.equal(resumed.mean, straight.mean)
