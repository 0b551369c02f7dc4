"""Every component kind through one generic test, built-ins and a user's own class alike.

A registry (in the spirit of torch's ``OptimizerInfo``) lists every built-in update rule,
schedule, failure policy, adaptation, guard and executor, plus one user-defined class of
each kind written here against the protocols of ``enkal._types`` only. Each goes through:
state-dict round trip (JSON, as files hold it), bitwise resume from a state dict, from a
history file and from a checkpoint, determinism under a seed, inputs never mutated, dtype
and device kept. The user classes prove a component needs no registration anywhere: before
the component protocols a user schedule ran but could not be checkpointed ("schedule state
'HalvingState' does not match this smoother's schedule").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

import enkal
from enkal import (
    ESMDA,
    CollapseGuard,
    DataMisfitController,
    EnsembleSmoother,
    FixedAnnealing,
    GaussNewton,
    IgnoreFailed,
    InProcess,
    Iterations,
    MultiDevice,
    MutualInformation,
    NesterovAccelerator,
    Observations,
    PerturbedObservations,
    Raise,
    RelativeNoise,
    ResampleFailed,
    Saliency,
    Significance,
    SquareRoot,
    StructureAdaptation,
    UnscentedKalmanInversion,
)
from enkal._types import RunEnd, encode_state
from enkal.localization import CorrelationLocalSquareRoot, LocalSquareRoot, SECLocalSquareRoot

pytestmark = pytest.mark.usefixtures("one_thread")

N_ENS, N_PAR, N_OBS = 12, 4, 5


# -- a user's own component of each kind (protocols only, no enkal base class) --------------
@dataclass(frozen=True)
class HalvingState:
    alpha: float = 16.0
    iteration: int = 0
    trace: tuple = ()


@dataclass(frozen=True)
class Halving:
    """A schedule: alpha halves every step down to 1; done after ``steps`` updates."""

    steps: int = 6

    def init(self) -> HalvingState:
        return HalvingState()

    def step(self, state, *, parameters, predictions, observations):
        alpha = max(state.alpha, 1.0)
        new = HalvingState(alpha=alpha / 2, iteration=state.iteration + 1,
                           trace=(*state.trace, alpha))
        return alpha, new, {"halving_alpha": alpha}

    def done(self, state) -> bool:
        return state.iteration >= self.steps


@dataclass(frozen=True)
class Damped:
    """An update rule: ``W = I + factor (W_sqrt - I)``, a damped square-root update."""

    factor: float = 0.5

    def transform(self, predictions, observations, *, alpha, generator):
        w = SquareRoot().transform(predictions, observations, alpha=alpha)
        eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        return eye + self.factor * (w - eye)


@dataclass(frozen=True)
class KeepFailed:
    """A failure policy: non-finite rows fail and keep their parameters (identity rows)."""

    def classify(self, predictions, ok, observations):
        good = torch.isfinite(predictions).all(dim=1)
        if ok is not None:
            good &= ok
        if int(good.sum()) < 2:
            raise enkal.FailedMembersError("fewer than 2 members left")
        return good

    def embed(self, transform, ok, generator):
        n = ok.numel()
        full = torch.eye(n, dtype=transform.dtype, device=transform.device)
        idx = torch.nonzero(ok).squeeze(1)
        full[idx.unsqueeze(1), idx.unsqueeze(0)] = transform
        return full


@dataclass(frozen=True)
class DecayState:
    scores: torch.Tensor | None = None
    calls: int = 0


@dataclass(frozen=True)
class DecayingPrune:
    """An adaptation with a tensor state: an exponential average of |mean| per parameter;
    the lowest-scoring live parameter is pruned every other step (at most ``prune`` of them)."""

    prune: int = 1

    def init(self) -> DecayState:
        return DecayState()

    def step(self, state, *, iteration, mask, parameters, predictions, observations):
        score = parameters.to(torch.float64).mean(dim=0).abs().cpu()
        avg = score if state.scores is None else 0.5 * state.scores + 0.5 * score
        new_state = DecayState(scores=avg, calls=state.calls + 1)
        live = torch.ones(parameters.shape[1], dtype=torch.bool) if mask is None else mask.cpu()
        if iteration % 2 or int((~live).sum()) >= self.prune:
            return None, new_state, {"n_pruned": 0}
        masked = torch.where(live, avg, torch.full_like(avg, math.inf))
        new = live.clone()
        new[int(masked.argmin())] = False
        return new, new_state, {"n_pruned": 1}


@dataclass(frozen=True)
class Shrink:
    """A guard: columns whose variance fell below ``threshold`` are spread by redrawing
    from N(mean, reset) -- written here without enkal's CollapseGuard."""

    threshold: float = 1e-3
    reset: float = 1e-2

    def apply(self, parameters, *, generator, mask=None, inplace=False):
        x = parameters if inplace else parameters.clone()
        bad = x.var(dim=0) < self.threshold
        if mask is not None:
            bad &= mask
        k = int(bad.sum())
        if k:
            z = torch.randn(x.shape[0], k, generator=generator, dtype=x.dtype, device=x.device)
            x[:, bad] = x[:, bad].mean(dim=0) + math.sqrt(self.reset) * z
        return x, k


@dataclass(frozen=True)
class HeavyState:
    velocity: torch.Tensor | None = None
    previous: torch.Tensor | None = None


@dataclass(frozen=True)
class HeavyBall:
    """An accelerator: every member moves on by ``momentum`` times the mean's last step."""

    momentum: float = 0.3

    def init(self, parameters):
        return HeavyState(previous=parameters.to(torch.float64).mean(dim=0))

    def step(self, state, *, parameters):
        mean = parameters.to(torch.float64).mean(dim=0)
        step = mean - state.previous.to(mean.device)
        return (parameters + (self.momentum * step).to(parameters.dtype),
                HeavyState(velocity=step, previous=mean))


class Reversed:
    """An executor: evaluates the members in reverse order, hands them back in order."""

    def evaluate(self, model, parameters):
        flip = torch.arange(parameters.shape[0] - 1, -1, -1)
        y, ok = enkal.evaluate(model, parameters[flip])
        return y[flip], ok[flip]


class Collect:
    """A sink that keeps what it is told."""

    def __init__(self):
        self.events = []

    def start(self, run):
        self.events.append(("start", run.state.iteration))

    def record(self, state, info, predictions, *, final):
        self.events.append(("record", info.iteration, final))

    def close(self, end):
        self.events.append(("close", end.stopped_by, type(end.error).__name__))


# -- the registry --------------------------------------------------------------------------------
SCHEDULE = ESMDA.constant(6)
LOCAL = LocalSquareRoot(radius=2.0, obs_coordinates=tuple(float(i) for i in range(N_OBS)))
CORRELATION = CorrelationLocalSquareRoot(threshold=0.3)
RULES = [SquareRoot(), SquareRoot(truncation=0.95), PerturbedObservations(), Damped(), LOCAL,
         CORRELATION, SECLocalSquareRoot(), SECLocalSquareRoot(exponent=1.0, cutoff=0.05),
         GaussNewton(0.0, 1.0, step=0.5), UnscentedKalmanInversion(0.0, 1.0)]
SCHEDULES = [ESMDA.constant(6), FixedAnnealing(factor=0.7, initial=2.0, floor=0.5),
             DataMisfitController(), RelativeNoise(gamma=2.0, steps=4), Halving(),
             Iterations(6, alpha=2.0)]
FAILURES = [ResampleFailed(), IgnoreFailed(), Raise(), KeepFailed()]
ADAPTS = [StructureAdaptation(every=2, fraction=0.25, score=MutualInformation()),
          StructureAdaptation(every=2, fraction=0.25, score=Significance()),
          StructureAdaptation(every=2, fraction=0.25, score=Saliency()),
          StructureAdaptation(every=2, fraction=0.25,
                              score=lambda x, e: x.to(torch.float64).var(dim=0)),
          DecayingPrune()]
GUARDS = [CollapseGuard(threshold=1e-2, reset=1e-1), Shrink(threshold=1e-2, reset=1e-1)]
EXECUTORS = [InProcess(), InProcess(members_per_call=5), MultiDevice(["cpu", "cpu"]),
             Reversed()]

ACCELERATORS = [NesterovAccelerator(), NesterovAccelerator(r=3.0),
                NesterovAccelerator(momentum=0.5), HeavyBall()]
REGISTRY = ([("rule", c) for c in RULES] + [("schedule", c) for c in SCHEDULES]
            + [("failure", c) for c in FAILURES] + [("adapt", c) for c in ADAPTS]
            + [("guard", c) for c in GUARDS] + [("accelerator", c) for c in ACCELERATORS])


def _id(entry) -> str:
    kind, comp = entry
    name = type(comp).__name__
    if isinstance(comp, StructureAdaptation):
        name += f"-{type(comp.score).__name__}"
    if getattr(comp, "truncation", None):
        name += "-truncated"
    return f"{kind}-{name}"


def _forward(x: torch.Tensor) -> torch.Tensor:
    """A nonlinear model; members with x3 > 2.5 fail (NaN), as a crashed simulator would."""
    h = torch.linspace(0.5, 1.5, N_PAR * N_OBS, dtype=torch.float64).reshape(N_PAR, N_OBS)
    y = torch.tanh(x) @ h.to(x.dtype) + 0.1 * x[:, :1] ** 2
    return torch.where((x[:, 3:4] > 2.5), torch.full_like(y, math.nan), y)


class _Model(enkal.CallableModel):
    def __init__(self, dtype=torch.float64):
        super().__init__(_forward, parameters=N_PAR, output_size=N_OBS)
        self.dtype = dtype

    def replicate(self, device):  # for MultiDevice: an independent copy
        return _Model(self.dtype)


MODEL = _Model()


def _model(dtype):
    return _Model(dtype)


def _smoother(kind: str | None = None, comp=None, **extra) -> EnsembleSmoother:
    kwargs = {"rule": PerturbedObservations(), "schedule": SCHEDULE, "seed": 3, **extra}
    if kind is not None:
        kwargs[kind] = comp
    obs = Observations(torch.linspace(-1.0, 1.0, N_OBS, dtype=torch.float64), noise_std=0.3)
    return EnsembleSmoother(obs, **kwargs)


def _prior(dtype=torch.float64, *, failing: bool = True) -> torch.Tensor:
    x = torch.randn(N_ENS, N_PAR, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64)
    if failing:
        x[0, 3] = 3.0  # member 0 fails at the prior
    return x.to(dtype)


def _failing(kind, comp) -> bool:
    return not isinstance(comp, (Raise, UnscentedKalmanInversion))


def _start(kind, comp, dtype=torch.float64) -> torch.Tensor:
    """The first ensemble: UKI's sigma points (none may fail), else the prior draw with a
    failing member 0 (unless the component stops on failures)."""
    if isinstance(comp, UnscentedKalmanInversion):
        return comp.initial_ensemble(N_PAR, dtype=dtype)
    return _prior(dtype, failing=_failing(kind, comp))


def _steps(smoother, state, n, model=MODEL):
    for _ in range(n):
        if smoother.done(state):
            break
        y, ok = enkal.evaluate(model, model.layout.to_physical(state.parameters))
        state, _ = smoother.step(state, y, ok=ok)
    return state


def _json_round_trip(d: dict) -> dict:
    """What a file keeps of a state dict: component states through JSON, tensors as is."""
    out = dict(d)
    for key in ("schedule", "adapt", "accelerator"):
        if out.get(key) is not None:
            out[key] = json.loads(json.dumps(out[key]))
    return out


def _same_state(a, b) -> None:
    assert torch.equal(a.parameters, b.parameters)
    assert torch.equal(a.rng_state, b.rng_state)
    assert a.iteration == b.iteration
    assert encode_state(a.schedule) == encode_state(b.schedule)
    assert json.dumps(encode_state(a.adapt)) == json.dumps(encode_state(b.adapt))
    assert json.dumps(encode_state(a.accelerator)) == json.dumps(encode_state(b.accelerator))
    assert (a.mask is None) == (b.mask is None)
    if a.mask is not None:
        assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("entry", REGISTRY, ids=_id)
def test_state_dict_round_trips_through_json(entry):
    kind, comp = entry
    smoother = _smoother(kind, comp)
    state = _steps(smoother, smoother.init(_start(kind, comp)), 3)
    d = smoother.state_dict(state)
    json.dumps(d["schedule"]), json.dumps(d.get("adapt"))  # JSON-able, as files keep it
    back = smoother.load_state_dict(_json_round_trip(d))
    _same_state(back, state)


@pytest.mark.parametrize("entry", REGISTRY, ids=_id)
def test_resume_from_a_state_dict_is_bitwise(entry):
    kind, comp = entry
    smoother = _smoother(kind, comp)
    prior = _start(kind, comp)
    straight = _steps(smoother, smoother.init(prior), 5)
    half = _steps(smoother, smoother.init(prior), 2)
    resumed = smoother.load_state_dict(_json_round_trip(smoother.state_dict(half)))
    _same_state(_steps(smoother, resumed, 3), straight)


@pytest.mark.parametrize("entry", REGISTRY, ids=_id)
def test_seeded_runs_repeat_and_inputs_are_not_mutated(entry):
    kind, comp = entry
    smoother = _smoother(kind, comp)
    prior = _start(kind, comp)
    keep = prior.clone()
    a = smoother.run(MODEL, prior, max_iterations=4)
    b = smoother.run(MODEL, prior, max_iterations=4)
    assert torch.equal(prior, keep)
    _same_state(a.state, b.state)
    state = smoother.init(prior)
    y, ok = enkal.evaluate(MODEL, state.parameters)
    y_keep, ok_keep = y.clone(), ok.clone()
    smoother.step(state, y, ok=ok)
    assert torch.equal(state.parameters, keep)
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(y_keep))
    assert torch.equal(ok, ok_keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entry", REGISTRY, ids=_id)
def test_dtype_and_device_are_kept(entry, dtype):
    kind, comp = entry
    smoother = _smoother(kind, comp)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        prior = _start(kind, comp, dtype).to(device)
        state = smoother.init(prior)
        y, ok = enkal.evaluate(_model(dtype), state.parameters.cpu())
        new, info = smoother.step(state, y.to(device), ok=ok.to(device))
        assert new.parameters.dtype == dtype and new.parameters.device == prior.device
        assert math.isfinite(info.misfit)


def test_raise_stops_at_the_first_failed_member_and_the_others_carry_on():
    prior = _prior()  # member 0 fails
    for comp in FAILURES:
        smoother = _smoother("failure", comp)
        if isinstance(comp, Raise):
            with pytest.raises(enkal.FailedMembersError, match="Raise"):
                smoother.run(MODEL, prior, max_iterations=2)
        else:
            result = smoother.run(MODEL, prior, max_iterations=2)
            assert result.history["n_failed"][0] == 1


@pytest.mark.parametrize("executor", EXECUTORS, ids=lambda e: type(e).__name__)
def test_every_executor_gives_the_in_process_run_bit_for_bit(executor):
    smoother = _smoother()
    prior = _prior()
    reference = smoother.run(MODEL, prior, max_iterations=3)
    result = smoother.run(MODEL, prior, max_iterations=3, executor=executor)
    _same_state(result.state, reference.state)


def test_a_sink_hears_start_every_update_and_close_also_when_the_run_fails():
    sink = Collect()
    _smoother().run(MODEL, _prior(), max_iterations=2, sinks=[sink])
    assert sink.events == [("start", 0), ("record", 1, False), ("record", 2, True),
                           ("close", "max_iterations", "NoneType")]

    def boom(state, info):
        raise RuntimeError("stop")

    sink = Collect()
    with pytest.raises(RuntimeError, match="stop"):
        _smoother().run(MODEL, _prior(), max_iterations=3, sinks=[sink], callbacks=[boom])
    assert sink.events == [("start", 0), ("close", "max_iterations", "RuntimeError")]
    assert isinstance(RunEnd("x", 0).error, type(None))


USER = [("schedule", Halving()), ("adapt", DecayingPrune()), ("rule", Damped()),
        ("failure", KeepFailed()), ("guard", Shrink(1e-2, 1e-1)),
        ("accelerator", HeavyBall()), ("accelerator", NesterovAccelerator())]


@pytest.mark.parametrize("entry", USER, ids=_id)
@pytest.mark.parametrize("source", ["history", "checkpoint"])
def test_user_components_resume_from_files_bit_for_bit(tmp_path, entry, source):
    kind, comp = entry
    smoother = _smoother(kind, comp)
    prior = _prior()
    straight = enkal.run(smoother, MODEL, prior, max_iterations=5)
    store = tmp_path / "run.h5"
    enkal.run(smoother, MODEL, prior, store=store, max_iterations=2,
              checkpoint=True if source == "checkpoint" else None)
    path = store if source == "history" else tmp_path / "run.ckpt.h5"
    resumed = enkal.run(smoother, MODEL, resume=path, store=store, max_iterations=5)
    _same_state(resumed.state, straight.state)
    with enkal.open(store) as ds:
        assert ds.sizes["iteration"] == 6
        assert torch.equal(torch.from_numpy(ds.parameters.isel(iteration=-1).values),
                           straight.parameters)


# -- the network optimizer takes the same components ------------------------------------------
# (the data-misfit controller finishes in a few steps: stepping it on raises, as it should)
NN_ENTRIES = ([("rule", c) for c in RULES  # rules that take sections
               if not any(getattr(c, a, False) for a in ("local", "direct", "needs_parameters"))]
              + [("schedule", c) for c in SCHEDULES if not isinstance(c, DataMisfitController)]
              + [("failure", c) for c in FAILURES if not isinstance(c, Raise)])


@pytest.mark.parametrize("members", ["redraw", "carry"])
@pytest.mark.parametrize("entry", NN_ENTRIES, ids=_id)
def test_the_network_optimizer_resumes_every_component_bit_for_bit(entry, members, tmp_path):
    """state_dict -> torch.save -> torch.load(weights_only=True) -> load_state_dict, then the
    next steps repeat the uninterrupted ones (a user schedule included)."""
    kind, comp = entry
    from torch import nn

    from enkal.nn import Carry, EnsembleKalmanOptimizer, Redraw

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        kw = {kind: comp, "members": Redraw() if members == "redraw" else Carry()}
        return EnsembleKalmanOptimizer(net, ensemble_size=8, seed=2, noise=0.5, **kw)

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, generator=g, dtype=torch.float64),
                torch.randn(6, 2, generator=g, dtype=torch.float64)) for _ in range(4)]
    straight = make()
    for xb, yb in batches:
        straight.step(xb, yb)
    first = make()
    for xb, yb in batches[:2]:
        first.step(xb, yb)
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for xb, yb in batches[2:]:
        resumed.step(xb, yb)
    a, b = straight.state_dict(), resumed.state_dict()
    for key in ("ensemble", "mean", "rng_state"):
        assert torch.equal(a[key], b[key]), key
    assert a["schedule"] == b["schedule"]


@pytest.mark.parametrize("kind, cls", [("rule", SquareRoot), ("schedule", ESMDA),
                                       ("failure", Raise), ("guard", CollapseGuard)])
def test_a_class_where_a_component_belongs_is_refused_by_every_consumer(kind, cls):
    """``schedule=ESMDA`` (the class) is refused with a hint by the smoother and the network
    optimizer alike: the check lives in ``check_component``, which both use."""
    from torch import nn

    with pytest.raises(TypeError, match=rf"{kind}: expected an instance, got the class "
                                        rf"{cls.__name__}; did you mean {cls.__name__}\(\)"):
        _smoother(kind, cls)
    if kind != "guard":  # the optimizer's guard comes with Carry(guard=...)
        with pytest.raises(TypeError, match=f"did you mean {cls.__name__}"):
            enkal.EnsembleKalmanOptimizer(nn.Linear(2, 2).double(), **{kind: cls})
