"""States, infos, results and the component protocols: what every part of enkal shares.

One iteration, data flowing one way (``docs/updates.md``)::

    state_k --forward (Executor)--> Yh_k --FailurePolicy--> ok
            --Schedule(Yh_k)--> alpha_k   --Adaptation(X_k, Yh_k)--> mask
            --UpdateRule: W (E x E) once--> apply to X_k in chunks --Guard--> state_{k+1}
            --Sink--> HDF5, progress, logs

Each component is a *protocol*: any object with the methods below plugs in, a user's class as
much as a built-in one. A component's state (what its ``init`` returns) is a plain frozen
dataclass of numbers, strings, tuples and tensors, or ``None``; :func:`encode_state` and
:func:`decode_state` checkpoint it generically from its fields and its component's type, so
no registry of names is involved.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class HalvingState:
...     scale: float = 1.0
...     iteration: int = 0
>>> d = encode_state(HalvingState(0.25, 2))
>>> d
{'type': 'HalvingState', 'scale': 0.25, 'iteration': 2}
>>> decode_state(d, HalvingState, what="schedule")
HalvingState(scale=0.25, iteration=2)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ._checks import check_instance
from .ensemble import ParameterLayout
from .observations import Observations

__all__ = [
    "SmootherState",
    "StepInfo",
    "SmootherResult",
    "RunStart",
    "RunEnd",
    "UpdateRule",
    "Schedule",
    "FailurePolicy",
    "Adaptation",
    "Accelerator",
    "Guard",
    "Executor",
    "Sink",
    "encode_state",
    "decode_state",
]


# -- states, infos, results ------------------------------------------------------------------
@dataclass(frozen=True)
class SmootherState:
    """Everything needed to continue a run.

    Attributes
    ----------
    parameters : Tensor, shape (N_ens, N_par)
        The ensemble in the unconstrained space.
    iteration : int
        Updates done so far.
    schedule : object
        The schedule's own (frozen) state.
    rng_state : Tensor
        ``torch.Generator.get_state()`` of the smoother's generator.
    mask : Tensor of bool, shape (N_par,), or None
        Live parameters (``False``: pruned, held at zero).
    adapt : object
        The structure-adaptation strategy's state (``None`` for the stateless
        :class:`~enkal.adapt.StructureAdaptation`, or without ``adapt=``).
    accelerator : object
        The accelerator's state (``None`` without ``accelerator=``).
    """

    parameters: torch.Tensor
    iteration: int
    schedule: Any
    rng_state: torch.Tensor
    mask: torch.Tensor | None = None
    adapt: Any = None
    accelerator: Any = None


@dataclass(frozen=True)
class StepInfo:
    """Diagnostics of one update (for logging and storage; never read back by enkal).

    ``misfit`` is the mean over successful members of ``||L^-1 (Yh_j - y)||^2 / N_obs`` and
    ``mean_misfit`` the same for the ensemble-mean prediction (about 1 when the fit matches
    the noise). ``spread`` is the root-mean parameter variance before the update.
    ``n_live`` counts the live parameters after this step's structure adaptation, and
    ``n_pruned`` those it switched off (``adapt=``).
    """

    iteration: int
    alpha: float
    misfit: float
    mean_misfit: float
    spread: float
    n_failed: int
    n_resampled: int
    done: bool
    schedule: dict = field(default_factory=dict)
    n_live: int = -1
    n_pruned: int = 0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        sched = d.pop("schedule")
        for k, v in sched.items():
            d[f"schedule_{k}"] = v
        return d


@dataclass
class SmootherResult:
    """What :meth:`EnsembleSmoother.run <enkal.EnsembleSmoother.run>` returns.

    Attributes
    ----------
    state : SmootherState
        The final state (``state.parameters`` is unconstrained).
    layout : ParameterLayout
        The model's parameter layout.
    history : dict of lists
        One entry per iteration for each :class:`StepInfo` field.
    n_forwards : int
        Member forward evaluations done.
    smoother : EnsembleSmoother
        The configuration that produced it.
    predictions : Tensor or None
        The predictions of the last forward of the loop (of the ensemble before the last
        update: what the last update assimilated).
    predictive : Tensor or None
        The predictions of the final ensemble, ``G(physical)`` ``(N_ens, N_obs)``: the
        posterior predictive (``run(..., predictive=True)``; NaN rows for failed members).
    stopped_by : str
        ``"schedule"``, ``"max_iterations"``, ``"tolerance"`` or ``"callback"``.
    """

    state: SmootherState
    layout: ParameterLayout
    history: dict[str, list]
    n_forwards: int
    smoother: Any
    predictions: torch.Tensor | None = None
    stopped_by: str = ""
    predictive: torch.Tensor | None = None

    @property
    def parameters(self) -> torch.Tensor:
        """The final ensemble in the unconstrained space, ``(N_ens, N_par)``."""
        return self.state.parameters

    @property
    def physical(self) -> torch.Tensor:
        """The final ensemble in physical units, ``(N_ens, N_par)``."""
        return self.layout.to_physical(self.state.parameters)

    def summary(self, quantiles: Sequence[float] = (0.05, 0.95)) -> dict[str, dict[str, float]]:
        """Posterior mean, std and quantiles per parameter (physical units)."""
        phys = self.physical.to(torch.float64)
        q = torch.quantile(phys, torch.tensor(list(quantiles), dtype=torch.float64,
                                              device=phys.device), dim=0)
        out = {}
        for j, name in enumerate(self.layout.names):
            row = {"mean": float(phys[:, j].mean()), "std": float(phys[:, j].std())}
            for k, qq in enumerate(quantiles):
                row[f"q{round(qq * 100):02d}"] = float(q[k, j])
            out[name] = row
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.smoother.state_dict(self.state)


@dataclass(frozen=True)
class RunStart:
    """What a :class:`Sink` learns when a run starts.

    Attributes
    ----------
    smoother : EnsembleSmoother
        The configuration (``config()``, ``observations``, ``seed``, ``state_dict``).
    layout : ParameterLayout
        The model's parameters.
    output_names : list of str or None
        The model's output names.
    state : SmootherState
        The state the run starts from (iteration 0, or a resumed one).
    """

    smoother: Any
    layout: ParameterLayout
    output_names: list[str] | None
    state: SmootherState


@dataclass(frozen=True)
class RunEnd:
    """What a :class:`Sink` learns when a run ends (normally or not).

    Attributes
    ----------
    stopped_by : str
        Why the run stopped (``"schedule"``, ``"max_iterations"``, ``"tolerance"``,
        ``"callback"``).
    n_forwards : int
        Member forward evaluations done in this call.
    error : BaseException or None
        What ended the run, when it did not end normally.
    """

    stopped_by: str
    n_forwards: int
    error: BaseException | None = None


# -- the component protocols -----------------------------------------------------------------
@runtime_checkable
class UpdateRule(Protocol):
    """Owns its ensemble transform: ``W`` with ``X+ = W X`` from the successful members'
    predictions (random draws, if any, from ``generator``)."""

    def transform(self, predictions: torch.Tensor, observations: Observations, *,
                  alpha: float, generator: torch.Generator | None) -> torch.Tensor:
        """``(E, N_obs)`` predictions -> ``(E, E)`` float64 transform."""
        ...


@runtime_checkable
class Schedule(Protocol):
    """The noise inflation ``alpha_k`` of each update, from that iteration's predictions."""

    def init(self) -> Any: ...

    def step(self, state: Any, *, parameters: torch.Tensor, predictions: torch.Tensor,
             observations: Observations) -> tuple[float, Any, dict]: ...

    def done(self, state: Any) -> bool: ...


@runtime_checkable
class FailurePolicy(Protocol):
    """Which members failed, and what becomes of them in the update."""

    def classify(self, predictions: torch.Tensor, ok: torch.Tensor | None,
                 observations: Observations | None) -> torch.Tensor:
        """The ``(N_ens,)`` bool mask of successful members; raises
        :class:`~enkal.errors.FailedMembersError` when the run cannot go on."""
        ...

    def embed(self, transform: torch.Tensor, ok: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor:
        """The ``(E_ok, E_ok)`` transform of the successful members -> ``(E, E)``."""
        ...


@runtime_checkable
class Adaptation(Protocol):
    """Structure adaptation: a new mask of live parameters from the fresh predictions."""

    def init(self) -> Any: ...

    def step(self, state: Any, *, iteration: int, mask: torch.Tensor | None,
             parameters: torch.Tensor, predictions: torch.Tensor,
             observations: Observations) -> tuple[torch.Tensor | None, Any, dict]: ...


@runtime_checkable
class Accelerator(Protocol):
    """Momentum after each update: the ensemble the next forward sees, from the one the
    update produced (:class:`~enkal.NesterovAccelerator`)."""

    def init(self, parameters: torch.Tensor) -> Any: ...

    def step(self, state: Any, *, parameters: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


@runtime_checkable
class Guard(Protocol):
    """Redraws collapsed parameters after an update (returns the count)."""

    def apply(self, parameters: torch.Tensor, *, generator: torch.Generator | None,
              mask: torch.Tensor | None = None, inplace: bool = False
              ) -> tuple[torch.Tensor, int]: ...


@runtime_checkable
class Executor(Protocol):
    """Where the members' forwards run (the contract of :func:`enkal.evaluate`)."""

    def evaluate(self, model: Any, parameters: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class Sink(Protocol):
    """Receives a run as it goes: HDF5 history, progress, logs. Called after the callbacks
    of each update; ``close`` is always called, also when the run fails. Optionally
    ``predictive(state, predictions)``: the final ensemble's predictions, after the last
    ``record`` of a run with ``predictive=True`` (the Recorder stores them)."""

    def start(self, run: RunStart) -> None: ...

    def record(self, state: SmootherState, info: StepInfo,
               predictions: torch.Tensor | None, *, final: bool) -> None: ...

    def close(self, end: RunEnd) -> None: ...


def check_component(obj: object, protocol: type, name: str, expected: str) -> None:
    """``TypeError`` naming ``name`` unless ``obj`` has the methods of ``protocol`` (a class
    where an instance belongs, ``schedule=ESMDA``, is refused with a hint)."""
    check_instance(obj, name)
    methods = [m for m in ("init", "step", "done", "transform", "classify", "embed", "apply",
                           "evaluate", "start", "record", "close")
               if m in protocol.__dict__]
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(f"{name}: expected {expected} or an object with "
                        f"{', '.join(methods)}; {type(obj).__name__} has no "
                        f"{', '.join(missing)}")


# -- component state, checkpointed generically -------------------------------------------------
_TENSOR = "__tensor__"


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return {_TENSOR: str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "data": t.reshape(-1).tolist()}
    if isinstance(value, (tuple, list)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _encode(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: a component state holds numbers, strings, tuples, dicts and "
                    f"tensors; got {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        if _TENSOR in value:
            dtype = getattr(torch, str(value[_TENSOR]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown tensor dtype {value[_TENSOR]!r}")
            return torch.tensor(list(value["data"]), dtype=dtype).reshape(value["shape"])
        return {k: _decode(v) for k, v in value.items()}
    return value


def encode_state(state: Any, what: str = "state") -> dict[str, Any] | None:
    """A component state as ``{"type": class name, field: value, ...}`` (JSON-able; tensors
    as ``{"__tensor__": dtype, "shape": ..., "data": ...}``); ``None`` stays ``None`` and a
    mapping is taken as encoded already."""
    if state is None:
        return None
    if isinstance(state, Mapping):
        return dict(state)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        out: dict[str, Any] = {"type": type(state).__name__}
        for f in dataclasses.fields(state):
            out[f.name] = _encode(getattr(state, f.name), f"{what}.{f.name}")
        return out
    raise TypeError(f"{what}: expected a {what} state (a dataclass) or None, got "
                    f"{type(state).__name__}")


def decode_state(d: Any, like: type | None, *, what: str = "state") -> Any:
    """Rebuild a state encoded by :func:`encode_state` as an instance of ``like`` (the type
    of the component's ``init()``; ``None`` for a stateless component).

    Raises ``ValueError`` naming ``what`` when the encoded type or fields do not match.
    """
    if like is None or like is type(None):
        if d is not None:
            raise ValueError(f"{what} state {d!r} given, but this {what} keeps no state"[:300])
        return None
    if not isinstance(d, Mapping):
        raise ValueError(f"{what} state: expected a mapping with a 'type', got "
                         f"{type(d).__name__}")
    kind = d.get("type")
    if kind != like.__name__:
        raise ValueError(f"{what} state {kind!r} does not match this {what} "
                         f"({like.__name__})")
    names = [f.name for f in dataclasses.fields(like)] if dataclasses.is_dataclass(like) \
        else []
    values = {k: v for k, v in d.items() if k != "type"}
    unknown = sorted(set(values) - set(names))
    if unknown or not dataclasses.is_dataclass(like):
        raise ValueError(f"{what} state {kind!r} has fields {unknown} that {like.__name__} "
                         f"does not have")
    try:
        state = like(**{k: _decode(v) for k, v in values.items()})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} state {kind!r}: {err}") from None
    problem = _field_type_problem(state)
    if problem is not None:
        raise ValueError(f"{what} state {problem}")
    return state


def _field_type_problem(state: Any) -> str | None:
    """Why a component state decoded from a file does not fit the types its dataclass
    declares for its fields (``None`` when it does). Only plain annotations are checked
    (``int``, ``float``, ``bool``, ``str``, tensors, tuples, optionals); anything else, and
    the values' ranges, are the component's to check."""
    if not dataclasses.is_dataclass(state) or isinstance(state, type):
        return None
    try:
        hints = typing.get_type_hints(type(state))
    except Exception:  # annotations that do not resolve: nothing to check them against
        return None
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if f.name in hints and not _fits(value, hints[f.name]):
            hint = hints[f.name]
            name = hint.__name__ if type(hint) is type else str(hint).replace("typing.", "")
            return (f"field {f.name!r} of {type(state).__name__}: expected {name}, got "
                    f"{type(value).__name__}")
    return None


def _fits(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    hint = typing.get_origin(hint) or hint  # tuple[float, ...] -> tuple
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (tuple, list):  # JSON has lists only
        return isinstance(value, (tuple, list))
    if hint is typing.Any or not isinstance(hint, type):
        return True
    try:
        return isinstance(value, hint)
    except TypeError:  # a class that refuses isinstance (a non-runtime Protocol, ...)
        return True


def check_sinks(sinks: Any) -> list:
    """``sinks`` as a list, each checked to be a :class:`Sink` (``TypeError`` naming it)."""
    if isinstance(sinks, (str, bytes)) or not hasattr(sinks, "__iter__"):
        raise TypeError(f"sinks: expected an iterable of sinks, got {type(sinks).__name__}")
    out = list(sinks)
    for sink in out:
        check_component(sink, Sink, "sinks", "enkal.storage.Recorder(...)")
    return out


def close_sinks(sinks: list, end: RunEnd) -> None:
    """Close every sink, in order, even when one fails; re-raise the first failure."""
    first: BaseException | None = None
    for sink in sinks:
        try:
            sink.close(end)
        except BaseException as err:  # noqa: BLE001 - closed the others first
            first = first or err
    if first is not None and end.error is None:
        raise first

