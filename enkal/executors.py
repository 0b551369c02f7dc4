"""Executors: where the members' forwards run.

An executor has one method, ``evaluate(model, parameters) -> (predictions, ok)``, with the
contract of :func:`enkal.evaluate`: predictions ``(N_ens, N_obs)`` on the parameters' device
and dtype, NaN rows and ``ok = False`` for failed members, errors per failed member in the
result's ``errors`` attribute.

* :class:`InProcess` (default): in this process, in chunks of ``members_per_call`` members.
* :class:`MultiDevice`: on several devices of this process (GPUs, or CPU entries for
  tests), one thread per device taking the next chunk of ``members_per_call`` members from
  a shared queue as soon as it finished its previous one (:func:`run_on_devices`).
* :class:`Dask`: on a ``distributed`` cluster (a :class:`~distributed.LocalCluster` on one
  machine, dask-jobqueue on a batch system), in tasks of ``members_per_task`` members. Needs
  the optional dependency: ``pip install "enkal[dask]"``.

How :class:`Dask` runs one ``evaluate``
---------------------------------------
1. The model is serialised once with cloudpickle (what ``distributed`` itself falls back to
   for functions), so lambdas and closures travel; a model that cannot be pickled (an open
   file, a lock, a CUDA stream...) is refused up front with a ``TypeError``.
2. The ``(N_ens, N_par)`` parameters become one CPU numpy array (bfloat16 travels as
   float32) cut into row blocks of ``members_per_task`` members, by default
   ``ceil(N_ens / (2 * slots))`` with ``slots`` the worker threads of the cluster: two tasks
   per slot, so a slow task leaves a tail of at most half a slot's share, and a lost worker
   costs at most that much recomputation. Never one task per member unless asked.
3. Each task runs :func:`enkal.evaluate` on its block inside the worker, so a member whose
   forward raises (or returns NaN/inf, or exceeds ``max_abs``) becomes a failed member with
   its error message, exactly as in-process; the block is retried member by member.
4. A worker that dies (killed, out of memory) loses its tasks; the scheduler reschedules
   them, and the results it held, on the surviving or restarted workers. Tasks that raised
   are resubmitted ``retries`` times. A block that ``distributed`` gives up on with
   ``KilledWorker`` (its tasks were on ``allowed-failures + 1`` dying workers,
   ``distributed.scheduler.allowed-failures``, default 3: a simulator that segfaults) is
   rerun member by member; a member killed again is rerun alone, and only if it still
   kills its worker is it a failed member (error ``KilledWorker: ...``) rather than the
   end of the run. (Rerunning it alone matters: ``distributed`` charges every task on a
   dying worker, not only the one that killed it.)
5. Results are gathered in member order and returned on the parameters' device and dtype.
"""

from __future__ import annotations

import itertools
import logging
import math
import pickle
import threading
import time
import uuid
import warnings
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import numpy as np
import torch

from ._checks import check_instance, check_positive_float, check_positive_int, cpu_numpy
from .devices import _check_devices, run_on_devices
from .forward import EvaluationReport, ForwardModel, check_inputs, evaluate

__all__ = ["InProcess", "MultiDevice", "Dask", "check_executor", "run_on_devices"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InProcess:
    """Run forwards in this process, ``members_per_call`` members per ``forward`` call.

    ``max_abs`` (deprecated: give it to the failure policy, ``ResampleFailed(max_abs=...)``,
    the one place that decides which members failed) marks predictions with larger entries
    as failed.
    """

    members_per_call: int | None = None
    max_abs: float | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.members_per_call, "InProcess.members_per_call", allow_none=True)
        check_positive_float(self.max_abs, "InProcess.max_abs", allow_none=True)
        _deprecated_max_abs(self)

    def evaluate(self, model: ForwardModel, parameters: torch.Tensor):
        return evaluate(model, parameters, members_per_call=self.members_per_call,
                        max_abs=self.max_abs)


def _deprecated_max_abs(executor: Any) -> None:
    if executor.max_abs is not None:
        warnings.warn(
            f"{type(executor).__name__}(max_abs=...) is deprecated: which members failed is "
            f"the failure policy's decision; use EnsembleSmoother(failure=ResampleFailed("
            f"max_abs={executor.max_abs!r}))", DeprecationWarning, stacklevel=4)


# -- several devices in this process ---------------------------------------------------------


@dataclass(frozen=True)
class MultiDevice:
    """Run forwards on several devices of this process, one thread per device.

    The members are cut into chunks of ``members_per_call`` (default
    ``ceil(N_ens / (2 * len(devices)))``: two chunks per device, so a slow device leaves a
    tail of at most half its share); each device's thread takes the next chunk from a shared
    queue as soon as it finished its previous one (:func:`run_on_devices`). Inside a chunk
    failures are isolated as in :func:`enkal.evaluate`.

    The model must provide ``replicate(device) -> ForwardModel``: an independent copy that
    computes on ``device`` (threads never share a model object). ``NeuralModel``'s
    batch forward (``NeuralModel.with_inputs``) does; for networks the simplest is
    ``NeuralModel(module, devices=[...])``, which dispatches the same way inside
    ``predict``.

    Parameters
    ----------
    devices : sequence of torch.device or str
        One thread per entry; ``["cpu", "cpu"]`` is allowed (tests).
    members_per_call : int, optional
    max_abs : float, optional
        Deprecated (use the failure policy's ``max_abs``): predictions with a larger
        entry in magnitude count as failed.
    """

    devices: tuple = ("cpu",)
    _: KW_ONLY
    members_per_call: int | None = None
    max_abs: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", _check_devices(self.devices, "MultiDevice.devices"))
        check_positive_int(self.members_per_call, "MultiDevice.members_per_call",
                           allow_none=True)
        check_positive_float(self.max_abs, "MultiDevice.max_abs", allow_none=True)
        _deprecated_max_abs(self)

    def evaluate(self, model: ForwardModel, parameters: torch.Tensor):
        """The contract of :func:`enkal.evaluate`, chunks of members spread over devices."""
        check_inputs(model, parameters)
        if not callable(getattr(model, "replicate", None)):
            raise TypeError(
                f"model: MultiDevice needs a model with replicate(device) (an independent "
                f"copy computing on that device); {type(model).__name__} has none. Use "
                "InProcess(), or add replicate() to the model"
            )
        n, m = parameters.shape[0], model.output_size
        step = self.members_per_call or max(1, math.ceil(n / (2 * len(self.devices))))
        spans = [(a, min(a + step, n)) for a in range(0, n, step)]
        replicate = getattr(model, "replicate")  # noqa: B009 - checked callable above
        replicas = [replicate(d) for d in self.devices]

        def work(index: int, a: int, b: int):
            # evaluate moves the members to the replica's device, and copies them there
            # when that move does not (the model must not write into the caller's ensemble)
            y, ok = res = evaluate(replicas[index], parameters[a:b], max_abs=self.max_abs)
            return y, ok, res.errors

        return _assemble(parameters, m, run_on_devices(work, spans, self.devices))


# -- Dask ------------------------------------------------------------------------------------

_INSTALL_HINT = 'pip install "enkal[dask]"'


def _require_distributed():
    """Import ``distributed`` (the optional ``dask`` extra) or say how to install it."""
    try:
        import distributed
    except ImportError as err:
        raise ImportError(
            "enkal.executors.Dask needs the optional dependency `distributed` (Dask's "
            f"cluster scheduler), which could not be imported ({err}). Install it with: "
            f"{_INSTALL_HINT}"
        ) from err
    return distributed


def _check_address(address: str) -> None:
    """Refuse a scheduler address that ``distributed`` cannot parse, before a ``Client`` is
    made: a client that fails to parse its address is left half-made, and its ``__del__``
    then waits twice the connect timeout and prints a traceback."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme in ("tcp", "tls"):
            parse_host_port(location)
    except (ValueError, TypeError) as err:
        raise ValueError(f"Dask.address: expected a scheduler address such as "
                         f"'tcp://host:8786', got {address!r} ({err})") from None


def _start_local_cluster(n_workers: int, timeout: float) -> tuple[Any, Any]:
    """A LocalCluster of ``n_workers`` one-thread worker processes and its client, once all
    its workers are up; ``TimeoutError`` (the cluster shut down) when they are not within
    ``timeout`` seconds. (The scheduler starts without workers and the client connects to
    its address: ``LocalCluster(n_workers=n)``, and a client made from the cluster object,
    wait for the workers with no limit.)"""
    distributed = _require_distributed()
    cluster = distributed.LocalCluster(n_workers=0, threads_per_worker=1, processes=True)
    client = None
    try:
        cluster.scale(n_workers)
        client = distributed.Client(cluster.scheduler_address, set_as_default=False)
        try:
            client.wait_for_workers(n_workers, timeout=timeout)
        except TimeoutError:
            up = len(client.nthreads())
            raise TimeoutError(
                f"Dask: {up} of {n_workers} local workers started within start_timeout="
                f"{timeout:g} s; a busy machine needs a larger Dask(start_timeout=...), "
                "else check that a worker process can start (python -c 'import enkal')"
            ) from None
    except BaseException:
        if client is not None:
            client.close()
        try:  # a worker still starting holds close() up: bounded, the rest at exit
            cluster.close(timeout=_CLOSE_TIMEOUT)
        except TimeoutError:
            pass
        raise
    return client, cluster


#: seconds a failed start waits for its LocalCluster to shut down
_CLOSE_TIMEOUT = 10.0


def _dashboard(client: Any) -> str:
    """``", dashboard http://..."`` for a scheduler that serves one (it needs bokeh), else
    ``", no dashboard (pip install bokeh)"``."""
    try:
        link = client.dashboard_link
    except (AttributeError, KeyError, OSError):  # a remote scheduler without a dashboard
        link = None
    return f", dashboard {link}" if link else ", no dashboard (pip install bokeh)"


class _Session:
    """The live, mutable side of a :class:`Dask` executor: the client (and the cluster)
    it opened itself. Kept out of the dataclass's fields, equality and ``repr``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: Any = None
        self.cluster: Any = None


@dataclass(frozen=True)
class Dask:
    """Run forwards on a ``distributed`` cluster, ``members_per_task`` members per task.

    The object is frozen configuration. The connection is a resource it opens lazily, on the
    first :meth:`evaluate` (or :meth:`connect`), in one of three ways:

    * ``client=`` a live :class:`distributed.Client`: used as is, never closed by enkal
      (yours to close);
    * ``address=`` a scheduler address (``"tcp://host:8786"``): enkal connects a client and
      closes it in :meth:`close`;
    * neither: enkal starts a :class:`distributed.LocalCluster` of ``n_workers`` (default 2)
      worker *processes* with one thread each, waits at most ``start_timeout`` seconds for
      them, and shuts it down in :meth:`close`.

    Opening the connection is logged (logger ``enkal.executors``, level INFO; ``enkal run``
    prints it) with the time it took and the dashboard's address, e.g. ``Dask: local
    cluster with 2 workers started in 5.8 s, dashboard http://127.0.0.1:8787/status``.
    :meth:`EnsembleSmoother.run <enkal.EnsembleSmoother.run>` connects before the run's
    first update, so the cluster's start is not timed as that update.

    Use it as a context manager (``with Dask(n_workers=4) as ex: ...``) or call
    :meth:`close`; after ``close`` a new cluster is opened on next use.
    ``dataclasses.replace`` gives a new executor with its own (unopened) connection.

    Parameters
    ----------
    client : distributed.Client, optional
    address : str, optional
        Scheduler address to connect to; not together with ``client``.
    n_workers : int, optional
        Worker processes of the LocalCluster started when neither ``client`` nor
        ``address`` is given (default 2). A cluster you bring has its own size.
    members_per_task : int, optional
        Members per task. Default ``ceil(N_ens / (2 * slots))``, ``slots`` being the worker
        threads of the cluster at the time of the call (``n_workers`` or 1 when the cluster
        has no worker yet, e.g. an adaptive one: set it explicitly there).
    members_per_call : int, optional
        Members per ``forward`` call inside a task (bounds the model's memory on a worker);
        default the whole task at once.
    max_abs : float, optional
        Deprecated (use the failure policy's ``max_abs``): predictions with a larger
        entry in magnitude count as failed.
    retries : int
        Times a task that raised is resubmitted (``Client.submit(retries=)``). Members
        failing inside ``forward`` are not task errors (they are failed members); this is
        for the rest: a worker that cannot import a module yet, a transient I/O error.
        Tasks lost with a dead worker are rescheduled by the scheduler regardless.
    connect_timeout : float
        Seconds to wait for the scheduler at ``address`` (default 5): an unreachable one
        fails :meth:`connect` with an ``OSError`` this soon. The address itself is checked
        when the executor is made (``ValueError``: ``"tcp://host:port"`` and the like).
    start_timeout : float
        Seconds to wait for the workers of the LocalCluster that enkal starts (default
        60): workers that are not all up by then fail :meth:`connect` with a
        ``TimeoutError`` saying how many started, and the cluster is shut down.

    Notes
    -----
    Workers must be able to import ``enkal`` and ``torch``, and whatever the model
    references *by module*: functions in an installed module travel by reference (the
    module must be importable on the workers); functions defined in ``__main__`` (a script
    or notebook), lambdas and closures travel by value. For a local module that the workers
    cannot import, call ``cloudpickle.register_pickle_by_value(module)``.

    With ``processes=True`` workers are spawned: a script that starts the cluster needs the
    usual ``if __name__ == "__main__":`` guard.

    Examples
    --------
    >>> import torch
    >>> from enkal import CallableModel
    >>> from enkal.executors import Dask
    >>> model = CallableModel(lambda x: x ** 2, parameters=2, output_size=2)
    >>> with Dask(n_workers=2) as ex:                       # doctest: +SKIP
    ...     y, ok = ex.evaluate(model, torch.ones(8, 2, dtype=torch.float64))
    >>> bool(ok.all())                                      # doctest: +SKIP
    True
    """

    client: Any = None
    _: KW_ONLY
    address: str | None = None
    n_workers: int | None = None
    members_per_task: int | None = None
    members_per_call: int | None = None
    max_abs: float | None = None
    retries: int = 1
    connect_timeout: float = 5.0
    start_timeout: float = 60.0
    _session: _Session = field(default_factory=_Session, init=False, repr=False,
                               compare=False)

    def __post_init__(self) -> None:
        distributed = _require_distributed()
        if self.client is not None and not isinstance(self.client, distributed.Client):
            raise TypeError(
                "Dask.client: expected a distributed.Client or None, got "
                f"{type(self.client).__name__}; to connect to a running scheduler pass "
                "address='tcp://host:port' instead"
            )
        if self.address is not None and not isinstance(self.address, str):
            raise TypeError(
                f"Dask.address: expected a scheduler address str, got "
                f"{type(self.address).__name__}"
            )
        if self.client is not None and self.address is not None:
            raise ValueError("Dask: expected at most one of client= and address=, got both")
        if self.address is not None:
            _check_address(self.address)
        check_positive_int(self.n_workers, "Dask.n_workers", allow_none=True)
        if self.n_workers is not None and (self.client is not None or self.address is not None):
            raise ValueError(
                "Dask.n_workers: only sizes the LocalCluster that Dask starts when given "
                "neither client= nor address=; a cluster you bring has its own size (use "
                "members_per_task= to set the task size)"
            )
        check_positive_int(self.members_per_task, "Dask.members_per_task", allow_none=True)
        check_positive_int(self.members_per_call, "Dask.members_per_call", allow_none=True)
        check_positive_float(self.max_abs, "Dask.max_abs", allow_none=True)
        _deprecated_max_abs(self)
        check_positive_int(self.retries, "Dask.retries", minimum=0)
        check_positive_float(self.connect_timeout, "Dask.connect_timeout")
        check_positive_float(self.start_timeout, "Dask.start_timeout")

    # -- the connection --------------------------------------------------------------------
    def connect(self):
        """The :class:`distributed.Client` in use, opening it (and the LocalCluster) on the
        first call. Useful for diagnostics: ``ex.connect().dashboard_link``."""
        if self.client is not None:
            return self.client
        s = self._session
        with s.lock:
            if s.client is None:
                t0 = time.perf_counter()
                if self.address is not None:
                    s.client = _require_distributed().Client(
                        self.address, set_as_default=False, timeout=self.connect_timeout)
                    _log.info("Dask: connected to %s (%d workers) in %.1f s%s", self.address,
                              len(s.client.nthreads()),
                              time.perf_counter() - t0, _dashboard(s.client))
                else:
                    n = self.n_workers or 2
                    s.client, s.cluster = _start_local_cluster(n, self.start_timeout)
                    _log.info("Dask: local cluster with %d worker%s started in %.1f s%s", n,
                              "s" if n > 1 else "", time.perf_counter() - t0,
                              _dashboard(s.client))
            return s.client

    def close(self) -> None:
        """Close the client and cluster this executor opened (a ``client=`` passed in is
        left open). Safe to call twice."""
        s = self._session
        with s.lock:
            client, cluster = s.client, s.cluster
            s.client = s.cluster = None
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

    def __enter__(self) -> Dask:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the contract ------------------------------------------------------------------------
    def evaluate(self, model: ForwardModel, parameters: torch.Tensor):
        """Run ``model`` on the members on the cluster; the contract of
        :func:`enkal.evaluate` (predictions, ok, and ``errors`` per failed member)."""
        check_inputs(model, parameters)
        blob = _serialise_model(model)
        n = parameters.shape[0]
        results: dict[tuple[int, int], Any] = {}
        if n:
            client = self.connect()
            x = cpu_numpy(parameters)
            step = self.members_per_task or _default_members_per_task(n, client,
                                                                      self.n_workers)
            spans = [(a, min(a + step, n)) for a in range(0, n, step)]
            results = self._map(client, blob, x, spans)
        return _assemble(parameters, model.output_size, results)

    def _map(self, client, blob: bytes, x: np.ndarray, spans: list[tuple[int, int]]
             ) -> dict[tuple[int, int], Any]:
        """Run one task per span of members; ``{span: result}`` covering every member.

        ``KilledWorker`` (the span's tasks died with ``allowed-failures + 1`` workers) does
        not say which task killed them: the tasks sharing a dying worker are all charged.
        So a killed span is rerun member by member (in parallel), and a member killed again
        is rerun once more *alone*, with none of our tasks beside it: only a death then is
        its own doing, and it maps to the error message (a str) instead of a result.
        """
        from distributed.scheduler import KilledWorker

        token = uuid.uuid4().hex[:12]
        rounds = itertools.count()

        def run(batch: list[tuple[int, int]]) -> dict[tuple[int, int], Any]:
            r = next(rounds)
            futures = [client.submit(
                _evaluate_block, blob, x[a:b], self.members_per_call, self.max_abs,
                key=f"enkal-forward-{token}-{r}-{a}-{b}", retries=self.retries, pure=False)
                for a, b in batch]
            done: dict[tuple[int, int], Any] = {}
            try:
                for span, fut in zip(batch, futures, strict=True):
                    try:
                        done[span] = fut.result()
                    except KilledWorker as err:
                        # keep the message only: the exception's traceback would keep
                        # these futures, and their results on the workers, alive
                        done[span] = _Killed(f"KilledWorker: {err}"[:500])
            except BaseException:
                client.cancel(futures)
                raise
            finally:
                del futures
            return done

        def killed(res: dict) -> list[tuple[int, int]]:
            return [span for span, r in res.items() if isinstance(r, _Killed)]

        results = run(spans)
        suspects = killed(results)
        singles = [(i, i + 1) for a, b in suspects if b - a > 1 for i in range(a, b)]
        alone = [span for span in suspects if span[1] - span[0] == 1]
        for span in suspects:
            if span[1] - span[0] > 1:
                del results[span]
        if singles:
            again = run(singles)
            results.update(again)
            alone += killed(again)
        for span in alone:  # one at a time: nothing else of ours shares its worker
            results.update(run([span]))
        return {span: str(r) if isinstance(r, _Killed) else r
                for span, r in results.items()}


class _Killed(str):
    """The message of a ``KilledWorker`` for a span of members (see ``Dask._map``)."""


def _assemble(parameters: torch.Tensor, output_size: int,
              results: dict[tuple[int, int], Any]) -> EvaluationReport:
    """The report of :func:`enkal.evaluate` from the results of spans of members:
    ``{(a, b): (predictions, ok, errors)}`` (tensors or numpy arrays, errors keyed by the
    row in the span), or a str where the span's one member failed as a whole (its error).
    Rows of members without a result are NaN and failed."""
    n = parameters.shape[0]
    out = torch.full((n, output_size), float("nan"), dtype=parameters.dtype,
                     device=parameters.device)
    ok = torch.zeros(n, dtype=torch.bool, device=parameters.device)
    errors: dict[int, str] = {}
    for (a, b), res in sorted(results.items()):
        if isinstance(res, str):  # (Dask) the member killed its worker, even alone
            errors[a] = res
            continue
        y, ok_span, errs = res
        out[a:b] = torch.as_tensor(y).to(device=out.device, dtype=out.dtype)
        ok[a:b] = torch.as_tensor(ok_span).to(ok.device)
        errors.update({a + i: msg for i, msg in errs.items()})
    result = EvaluationReport((out, ok))
    result.errors = dict(sorted(errors.items()))
    return result


def _serialise_model(model: ForwardModel) -> bytes:
    """cloudpickle the model (as ``distributed`` does when plain pickle fails), or say why
    it cannot travel to worker processes."""
    import cloudpickle

    try:
        return cloudpickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:  # noqa: BLE001 - pickling can fail in any way
        raise TypeError(
            f"model: Dask ships the model to worker processes by pickling it (cloudpickle), "
            f"and this {type(model).__name__} cannot be pickled: {type(err).__name__}: "
            f"{err}. Hold no open files, locks, threads, sockets or generators in the model "
            "or in what its function refers to (open them inside forward, or define the "
            "function at module level with its resources created on first use), or run it "
            "with InProcess()"[:1500]
        ) from err


def _default_members_per_task(n: int, client: Any, n_workers: int | None) -> int:
    slots = sum(client.nthreads().values()) or (n_workers or 1)
    return max(1, math.ceil(n / (2 * slots)))


def _evaluate_block(blob: bytes, x: np.ndarray, members_per_call: int | None,
                    max_abs: float | None):
    """On a worker: unpickle the model and run :func:`enkal.evaluate` on a block of members.

    Returns ``(predictions, ok, errors)`` as numpy arrays and a dict keyed by the member's
    row in the block.
    """
    try:
        model = pickle.loads(blob)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(
            f"enkal Dask worker: could not unpickle the model ({type(err).__name__}: {err}). "
            "A function referenced by module must be importable on the workers: install "
            "its module there, or ship it by value with "
            "cloudpickle.register_pickle_by_value(module)"
        ) from err
    if not x.flags.writeable:  # deserialised buffers may be read-only; torch wants writable
        x = x.copy()
    y, ok = res = evaluate(model, torch.from_numpy(x), members_per_call=members_per_call,
                           max_abs=max_abs)
    return y.cpu().numpy(), ok.cpu().numpy(), dict(res.errors)


def check_executor(executor: object) -> None:
    check_instance(executor, "executor")
    if not callable(getattr(executor, "evaluate", None)):
        raise TypeError(
            "executor: expected InProcess(), MultiDevice(...), Dask(...) or an object with "
            f"evaluate(model, parameters), got {type(executor).__name__}"
        )
