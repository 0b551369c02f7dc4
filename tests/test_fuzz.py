"""Fuzzing the public entry points: whatever arrives, only a clear error or a result.

Every entry point is fed generated garbage (wrong shapes and ranks, empty and one-member
ensembles, NaN/inf, huge values, integer/bool/complex dtypes, numpy arrays, lists, strings,
None). Allowed outcomes: a result, or ``TypeError``/``ValueError``/``enkal.EnkalError`` whose
message names an argument. Anything else (an ``IndexError``, a ``RuntimeError`` from deep in
torch's linear algebra, a hang) fails the test. Each entry point gets 1,000 cases in CI
(``CI`` set), fewer locally.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import enkal
from enkal import EnkalError

N_CASES = 1000 if os.environ.get("CI") else 150
ALLOWED = (TypeError, ValueError, EnkalError)

special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, 1e300, 1e38, float("nan"),
                           float("inf"), -float("inf")])
finite = st.floats(-1e6, 1e6, allow_nan=False)
numbers = st.one_of(finite, special)


@st.composite
def tensors(draw, max_dims=3, max_side=5):
    ndim = draw(st.integers(0, max_dims))
    shape = tuple(draw(st.integers(0, max_side)) for _ in range(ndim))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float64, torch.int64,
                                  torch.bool, torch.complex64]))
    n = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(numbers, min_size=n, max_size=n))
    t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype == torch.bool:
        return t > 0
    if dtype == torch.int64:
        return torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1e6, 1e6).long()
    return t.to(dtype)


@st.composite
def near_valid_ensembles(draw):
    """Mostly well-formed (E, P) and (E, M) pairs, with one thing at a time broken."""
    n = draw(st.integers(0, 6))
    p = draw(st.integers(0, 4))
    m = draw(st.integers(1, 4))
    x = torch.tensor(draw(st.lists(finite, min_size=n * p, max_size=n * p)),
                     dtype=torch.float64).reshape(n, p)
    y = torch.tensor(draw(st.lists(numbers, min_size=n * m, max_size=n * m)),
                     dtype=torch.float64).reshape(n, m)
    mutation = draw(st.sampled_from(["none", "transpose", "float32", "drop", "nan_x", "huge"]))
    if mutation == "transpose":
        y = y.T
    elif mutation == "float32":
        y = y.float()
    elif mutation == "drop" and y.shape[1] > 0:
        y = y[:, 1:]
    elif mutation == "nan_x" and x.numel():
        x = x.clone()
        x.view(-1)[0] = float("nan")
    elif mutation == "huge":
        y = y * 1e300
    return x, y, m


anything = st.one_of(tensors(), numbers, st.none(), st.text(max_size=3),
                     st.lists(numbers, max_size=4), st.booleans(),
                     tensors().map(lambda t: t.numpy() if t.dtype != torch.bool else t))


def _call(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ALLOWED as err:
        assert str(err), f"{type(err).__name__} without a message"


@settings(max_examples=N_CASES)
@given(anything, anything)
def test_observations_fuzz(values, noise):
    _call(enkal.Observations, values, noise_std=noise)
    _call(enkal.Observations, values, noise_cov=noise)
    _call(enkal.Observations, values, noise_chol=noise)


@settings(max_examples=N_CASES)
@given(near_valid_ensembles(), st.sampled_from([enkal.SquareRoot(), enkal.PerturbedObservations(),
                                                enkal.SquareRoot(truncation=0.5)]),
       st.one_of(st.just(1.0), numbers), st.one_of(st.none(), st.integers(-2, 5)))
def test_assimilate_fuzz(ens, rule, alpha, chunk):
    x, y, m = ens
    obs = enkal.Observations(torch.linspace(-1, 1, m, dtype=torch.float64), noise_std=0.5)
    try:
        out = enkal.assimilate(x, y, obs, rule=rule, alpha=alpha, chunk_size=chunk,
                               generator=torch.Generator().manual_seed(0))
    except ALLOWED as err:
        assert str(err)
        return
    assert out.shape == x.shape and out.dtype == x.dtype
    # finite inputs and finite predictions give a finite ensemble, unless the predictions
    # are so large that their squares overflow float64 (then NaN can only come from there)
    if float(y.abs().max()) < 1e100:
        assert torch.isfinite(out).all()


@settings(max_examples=N_CASES)
@given(anything, anything, anything)
def test_assimilate_garbage_fuzz(x, y, values):
    obs = enkal.Observations([0.0, 1.0], noise_std=1.0)
    _call(enkal.assimilate, x, y, obs)
    _call(enkal.assimilate, x, y, values)


@settings(max_examples=N_CASES)
@given(near_valid_ensembles(), st.sampled_from([enkal.ESMDA.constant(3), enkal.FixedAnnealing(),
                                                enkal.DataMisfitController()]))
def test_smoother_step_fuzz(ens, schedule):
    x, y, m = ens
    obs = enkal.Observations(torch.zeros(m, dtype=torch.float64), noise_std=1.0)
    smoother = enkal.EnsembleSmoother(obs, schedule=schedule,
                                      guard=enkal.CollapseGuard(1e-12, 1e-6))
    try:
        state = smoother.init(x)
        state, info = smoother.step(state, y)
    except ALLOWED as err:
        assert str(err)
        return
    assert torch.isfinite(state.parameters).all() or float(y.abs().max()) >= 1e100


@settings(max_examples=N_CASES)
@given(anything, anything)
def test_smoother_init_and_step_garbage_fuzz(prior, predictions):
    smoother = enkal.EnsembleSmoother(enkal.Observations([0.0, 1.0], noise_std=1.0))
    _call(smoother.init, prior)
    state = smoother.init(torch.zeros(3, 2, dtype=torch.float64) + torch.arange(3.0)[:, None])
    _call(smoother.step, state, predictions)


@settings(max_examples=N_CASES)
@given(anything, anything, st.integers(-1, 4))
def test_gaussian_ensemble_and_layout_fuzz(mean, std, n):
    _call(enkal.gaussian_ensemble, mean, std, n)
    _call(enkal.ParameterLayout, [("a", (n,)), mean] if n >= 0 else [])


@settings(max_examples=N_CASES)
@given(anything)
def test_layout_unflatten_fuzz(x):
    layout = enkal.ParameterLayout([("w", (2, 3)), "b"])
    _call(layout.unflatten, x)


def test_layout_unflatten_vector_is_a_row_of_the_ensemble():
    layout = enkal.ParameterLayout([("w", (2, 3)), "b", ("c", (4,))])
    ens = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    rows = layout.unflatten(ens)
    one = layout.unflatten(ens[3])
    assert {k: tuple(v.shape) for k, v in one.items()} == {"w": (2, 3), "b": (), "c": (4,)}
    assert {k: tuple(v.shape) for k, v in rows.items()} == {"w": (5, 2, 3), "b": (5,),
                                                            "c": (5, 4)}
    for k in one:
        assert torch.equal(one[k], rows[k][3])
    assert torch.equal(rows["w"][1].reshape(-1), ens[1, :6])


@settings(max_examples=N_CASES)
@given(tensors(max_dims=3))
def test_evaluate_fuzz(x):
    model = enkal.CallableModel(lambda t: t[:, :1] * 2, parameters=1, output_size=1)
    _call(enkal.evaluate, model, x)


@settings(max_examples=N_CASES // 5)
@given(st.dictionaries(st.sampled_from(["factor", "initial", "floor", "alphas", "terminate_at",
                                        "threshold", "reset", "truncation", "max_abs",
                                        "min_success"]), anything, max_size=3))
def test_strategy_constructors_fuzz(kwargs):
    for cls in (enkal.FixedAnnealing, enkal.ESMDA, enkal.DataMisfitController,
                enkal.CollapseGuard, enkal.SquareRoot, enkal.PerturbedObservations,
                enkal.ResampleFailed, enkal.IgnoreFailed, enkal.Raise):
        fields = getattr(cls, "__dataclass_fields__", {})
        _call(cls, **{k: v for k, v in kwargs.items() if k in fields})
