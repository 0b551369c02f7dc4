"""The state defended from the model (issue #19, "Misbehaving models").

* A model that writes into its input (``x.mul_(100)``) must change nothing outside its own
  call: ``evaluate`` gives every ``forward`` (and every member-by-member retry) members in
  memory of their own, so the caller's prior, the state and the result are those of a model
  that computes the same predictions without writing (bit for bit).
* Predictions with an autograd graph (a ``torch.nn.Module`` inside a ``CallableModel``) are
  detached, in ``evaluate`` and in ``step``/``assimilate`` (ask/tell), and the state's
  parameters never require grad, even from a prior that does: the update is never
  differentiated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import enkal
from enkal import CallableModel, EnsembleSmoother, InProcess, MultiDevice, Observations

F64 = torch.float64
E, P, M = 16, 4, 3

pytestmark = pytest.mark.usefixtures("one_thread")


def _h(x: torch.Tensor) -> torch.Tensor:
    """The predictions of both models: a smooth nonlinear map of ``100 x``."""
    return torch.tanh(x[:, :M] * 0.01) + 0.1 * x[:, 1:M + 1] * 0.01


def writes_into_its_input(x: torch.Tensor) -> torch.Tensor:
    x.mul_(100)
    return _h(x)


def well_behaved(x: torch.Tensor) -> torch.Tensor:
    return _h(x * 100)


def writes_then_raises_in_batches(x: torch.Tensor) -> torch.Tensor:
    """Writes into its input, then fails every call of more than one member: every member
    is computed by the member-by-member retry, which must not see the first call's writes."""
    x.mul_(100)
    if x.shape[0] > 1:
        raise RuntimeError("batch refused")
    return _h(x)


def raises_in_batches(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > 1:
        raise RuntimeError("batch refused")
    return _h(x * 100)


class _Replicable(CallableModel):
    """A CallableModel that MultiDevice can run (one copy per device thread)."""

    def replicate(self, device):
        return _Replicable(self._fn, parameters=self.layout, output_size=self.output_size,
                           device=device)


def _model(fn, cls=CallableModel) -> CallableModel:
    return cls(fn, parameters=P, output_size=M)


def _prior() -> torch.Tensor:
    return torch.randn(E, P, dtype=F64, generator=torch.Generator().manual_seed(0))


def _smoother(**kwargs) -> EnsembleSmoother:
    obs = Observations(torch.tensor([0.3, -0.2, 0.1], dtype=F64), noise_std=0.05)
    return EnsembleSmoother(obs, schedule=enkal.ESMDA.constant(3), seed=0, **kwargs)


EXECUTORS = {
    "default": None,
    "chunks-of-5": InProcess(members_per_call=5),
    "multidevice": MultiDevice(["cpu", "cpu"], members_per_call=5),
}


@pytest.mark.parametrize("executor", EXECUTORS.values(), ids=EXECUTORS.keys())
@pytest.mark.parametrize("inplace", [False, True], ids=["buffers", "inplace"])
def test_model_writing_into_its_input_changes_nothing(executor, inplace):
    cls = _Replicable if executor is not None and isinstance(executor, MultiDevice) \
        else CallableModel
    prior = _prior()
    before = prior.clone()
    bad = _smoother().run(_model(writes_into_its_input, cls), prior, executor=executor,
                          inplace=inplace)
    assert torch.equal(prior, before), "the model wrote into the caller's prior"
    good = _smoother().run(_model(well_behaved, cls), before.clone(), executor=executor,
                           inplace=inplace)
    assert torch.equal(bad.parameters, good.parameters)
    assert torch.equal(bad.predictions, good.predictions)
    assert bad.history == good.history
    assert torch.equal(bad.state.rng_state, good.state.rng_state)


def test_member_by_member_retry_starts_from_the_members_not_the_failed_calls_writes():
    prior = _prior()
    before = prior.clone()
    bad = _smoother().run(_model(writes_then_raises_in_batches), prior)
    good = _smoother().run(_model(raises_in_batches), before.clone())
    assert torch.equal(prior, before)
    assert bad.history["n_failed"] == [0, 0, 0]
    assert torch.equal(bad.parameters, good.parameters)


def test_evaluate_never_writes_to_its_parameters():
    for fn in (writes_into_its_input, writes_then_raises_in_batches):
        x = _prior()
        before = x.clone()
        y, ok = enkal.evaluate(_model(fn), x, members_per_call=4)
        assert torch.equal(x, before)
        assert bool(ok.all())
        torch.testing.assert_close(y, _h(before * 100), rtol=0, atol=0)


def test_evaluate_copies_only_when_moving_did_not():
    seen = []

    def keep(x):
        seen.append(x)
        return x[:, :M] * 1.0

    x = _prior()
    enkal.evaluate(_model(keep), x)                      # float64 -> float64: a copy
    assert seen[-1].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert torch.equal(seen[-1], x)
    f32 = CallableModel(keep, parameters=P, output_size=M, dtype=torch.float32)
    enkal.evaluate(f32, x)                               # the cast is the copy
    assert seen[-1].dtype == torch.float32
    assert torch.equal(seen[-1], x.float())


def test_numpy_model_writing_into_its_array_changes_nothing():
    def h(a: np.ndarray) -> np.ndarray:
        return np.tanh(a[:, :M] * 0.01) + 0.1 * a[:, 1:M + 1] * 0.01

    def numpy_writer(a: np.ndarray) -> np.ndarray:
        a *= 100
        return h(a)

    prior = _prior()
    before = prior.clone()
    bad = _smoother().run(CallableModel(numpy_writer, parameters=P, output_size=M, numpy=True),
                          prior)
    good = _smoother().run(CallableModel(lambda a: h(a * 100), parameters=P, output_size=M,
                                         numpy=True), before.clone())
    assert torch.equal(prior, before)
    assert torch.equal(bad.parameters, good.parameters)


def test_ask_tell_with_evaluate_keeps_the_state_from_the_model():
    """ask/tell users hand their own predictions to step; the ones evaluate makes for them
    leave the state alone."""
    sm = _smoother()
    bad_model, good_model = _model(writes_into_its_input), _model(well_behaved)
    prior = _prior()
    before = prior.clone()
    bad, good = sm.init(prior), sm.init(before.clone())
    while not sm.done(bad):
        parameters = bad.parameters.clone()
        y_bad, ok_bad = enkal.evaluate(bad_model, bad.parameters)
        assert torch.equal(bad.parameters, parameters)
        y_good, ok_good = enkal.evaluate(good_model, good.parameters)
        bad, _ = sm.step(bad, y_bad, ok=ok_bad)
        good, _ = sm.step(good, y_good, ok=ok_good)
    assert torch.equal(prior, before)
    assert torch.equal(bad.parameters, good.parameters)


# -- outputs with autograd -------------------------------------------------------------------
def _linear() -> torch.nn.Linear:
    torch.manual_seed(0)  # the module's initial weights only
    return torch.nn.Linear(P, M).double()


def test_module_output_with_grad_runs_like_a_detached_one():
    """The issue's reproduction: a torch.nn.Linear in a CallableModel, E=16, 3 updates
    (failed at update 2 with "matmul(): functions with out=... arguments don't support
    automatic differentiation")."""
    lin = _linear()
    graph = _smoother().run(CallableModel(lin, parameters=P, output_size=M), _prior())
    plain = _smoother().run(
        CallableModel(lambda x: lin(x).detach(), parameters=P, output_size=M), _prior())
    assert graph.state.iteration == 3
    assert not graph.parameters.requires_grad and graph.parameters.grad_fn is None
    assert not graph.predictions.requires_grad
    assert torch.equal(graph.parameters, plain.parameters)
    assert lin.weight.grad is None


@pytest.mark.parametrize("executor", [InProcess(members_per_call=5),
                                      MultiDevice(["cpu", "cpu"], members_per_call=5)],
                         ids=["chunks", "multidevice"])
def test_evaluate_detaches_predictions(executor):
    lin = _linear()
    y, ok = executor.evaluate(_Replicable(lin, parameters=P, output_size=M), _prior())
    assert not y.requires_grad and bool(ok.all())
    # the same values as one call on all members, up to the GEMM's summation order: BLAS may
    # pick another kernel for 5 rows than for 16 (AVX-512 MKL does), a few ulps of the sums
    torch.testing.assert_close(y, lin(_prior()).detach(), rtol=8 * torch.finfo(F64).eps,
                               atol=8 * torch.finfo(F64).eps)


def test_ask_tell_with_predictions_that_require_grad_leaves_no_graph():
    lin = _linear()
    sm = _smoother()
    state, plain = sm.init(_prior()), sm.init(_prior())
    for _ in range(3):
        state, info = sm.step(state, lin(state.parameters))
        plain, _ = sm.step(plain, lin(plain.parameters).detach())
        assert not state.parameters.requires_grad and state.parameters.grad_fn is None
    assert torch.equal(state.parameters, plain.parameters)
    # the in-place path (the out= GEMM that autograd refuses) too
    state = sm.init(_prior().clone())
    for _ in range(3):
        state, _ = sm.step(state, lin(state.parameters), out=state.parameters)
    assert torch.equal(state.parameters, plain.parameters)


def test_a_prior_that_requires_grad_gives_a_state_that_does_not():
    prior = _prior().requires_grad_()
    sm = _smoother()
    state = sm.init(prior)
    assert not state.parameters.requires_grad
    assert prior.requires_grad  # the caller's tensor is left as it was
    result = sm.run(CallableModel(well_behaved, parameters=P, output_size=M), prior)
    assert not result.parameters.requires_grad
    expected = sm.run(CallableModel(well_behaved, parameters=P, output_size=M),
                      prior.detach().clone())
    assert torch.equal(result.parameters, expected.parameters)
    restored = sm.load_state_dict({**sm.state_dict(state), "parameters": prior})
    assert not restored.parameters.requires_grad


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_assimilate_and_the_kernels_never_differentiate(chunk_size):
    lin = _linear()
    obs = _smoother().observations
    x = _prior().requires_grad_()
    y = lin(x)
    out = enkal.assimilate(x, y, obs, chunk_size=chunk_size)
    assert not out.requires_grad
    expected = enkal.assimilate(x.detach(), y.detach(), obs, chunk_size=chunk_size)
    assert torch.equal(out, expected)
    w = enkal.ensemble_transform(y, obs, rule=enkal.SquareRoot())
    assert not w.requires_grad
    assert not enkal.apply_transform(w.requires_grad_(), x, chunk_size=chunk_size).requires_grad
    with pytest.raises(ValueError, match="out: expected a buffer that does not require grad"):
        enkal.assimilate(x.detach(), y, obs, out=torch.empty(E, P, dtype=F64,
                                                             requires_grad=True))


def test_a_model_that_promises_not_to_write_skips_the_copy():
    """``copies_inputs = False`` (the network's batch forward sets it): ``forward`` then
    sees the ensemble's own memory -- no copy, and no protection."""
    seen = []

    class Trusted(enkal.CallableModel):
        copies_inputs = False

    model = Trusted(lambda x: seen.append(x) or x[:, :1], parameters=2, output_size=1)
    x = torch.randn(4, 2, dtype=torch.float64)
    enkal.evaluate(model, x)
    assert seen[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    model.copies_inputs = True
    enkal.evaluate(model, x)
    assert seen[1].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
