"""The Dask executor: same results as in-process, failures isolated, lost workers survived.

One LocalCluster of two worker processes is shared by the module (starting one costs
seconds). The models live in ``tests/_dask_models.py`` and are shipped by value with
cloudpickle, so the workers need not import the test directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import time

import pytest
import torch

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

import _dask_models  # noqa: E402  (tests/ is on sys.path: pyproject pythonpath)

from enkal import ESMDA, CallableModel, EnsembleSmoother, Observations  # noqa: E402
from enkal.executors import Dask, InProcess, MultiDevice, check_executor  # noqa: E402

cloudpickle.register_pickle_by_value(_dask_models)


def _model(fn, **kw) -> CallableModel:
    return CallableModel(fn, parameters=3, output_size=4, numpy=True, **kw)


def _ensemble(n: int, *, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)


def _problem(n: int = 16):
    truth = torch.tensor([[0.7, -0.4, 1.2]], dtype=torch.float64)
    y = torch.as_tensor(_dask_models.smooth(truth.numpy())[0])
    obs = Observations(y, noise_std=0.1)
    return obs, _ensemble(n, seed=7)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    c = distributed.Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


# -- configuration (no cluster) -----------------------------------------------------------

def test_construction_is_lazy_and_validated():
    ex = Dask(n_workers=3, members_per_task=4)
    assert ex._session.client is None  # nothing started until first use
    assert ex == Dask(n_workers=3, members_per_task=4)
    assert "n_workers=3" in repr(ex) and "_session" not in repr(ex)
    fresh = dataclasses.replace(ex, members_per_task=2)
    assert fresh._session is not ex._session
    check_executor(ex)
    ex.close()  # nothing opened: a no-op
    with pytest.raises(ValueError, match="at most one of client= and address="):
        Dask(address="tcp://127.0.0.1:1", client=_FakeClient())
    with pytest.raises(TypeError, match="expected a distributed.Client"):
        Dask(client="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="n_workers: only sizes the LocalCluster"):
        Dask(address="tcp://127.0.0.1:8786", n_workers=2)
    with pytest.raises(ValueError, match="members_per_task"):
        Dask(members_per_task=0)
    with pytest.raises(TypeError, match="retries"):
        Dask(retries=1.5)
    with pytest.raises(TypeError, match="positional"):
        Dask(None, "tcp://127.0.0.1:8786")  # only client= may be positional


class _FakeClient(distributed.Client):
    def __init__(self):  # never connects
        pass

    def __del__(self):
        pass


def test_missing_distributed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r'pip install "enkal\[dask\]"'):
        Dask()


def test_unpicklable_model_is_refused_before_shipping():
    lock = threading.Lock()

    def fn(x):
        with lock:
            return x

    ex = Dask(members_per_task=2)
    with pytest.raises(TypeError, match="cannot be pickled.*lock"):
        ex.evaluate(_model(fn), _ensemble(4))
    assert ex._session.client is None  # refused before any cluster was started


def test_inputs_are_checked_before_shipping():
    ex = Dask()
    with pytest.raises(TypeError, match="ForwardModel"):
        ex.evaluate(_dask_models.smooth, _ensemble(4))
    with pytest.raises(ValueError, match="members first"):
        ex.evaluate(_model(_dask_models.smooth), _ensemble(4).T.contiguous())
    assert ex._session.client is None


# -- on the shared cluster ------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("members_per_task", [None, 3, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_evaluate_equals_in_process(client, members_per_task, dtype):
    model = _model(_dask_models.smooth)
    x = _ensemble(10, dtype=dtype)
    y, ok = Dask(client, members_per_task=members_per_task).evaluate(model, x)
    y_ref, ok_ref = InProcess().evaluate(model, x)
    assert y.dtype == dtype and y.device == x.device and y.shape == (10, 4)
    assert torch.equal(y, y_ref) and bool(ok.all()) and torch.equal(ok, ok_ref)


@pytest.mark.timeout(60)
def test_lambda_models_travel_by_value(client):
    model = CallableModel(lambda x: x * 2.0, parameters=3, output_size=3)
    x = _ensemble(5)
    y, ok = Dask(client).evaluate(model, x)
    assert torch.equal(y, x * 2.0) and bool(ok.all())
    empty, ok0 = Dask(client).evaluate(model, x[:0])
    assert empty.shape == (0, 3) and ok0.shape == (0,)


@pytest.mark.timeout(60)
def test_member_that_raises_is_a_failed_member(client):
    model = _model(_dask_models.raise_on_large)
    x = _ensemble(12)
    x[5, 0] = 100.0
    res = Dask(client, members_per_task=4).evaluate(model, x)
    y, ok = res
    ref = InProcess().evaluate(model, x)
    assert ok.tolist() == [i != 5 for i in range(12)]
    assert list(res.errors) == [5] and "ValueError: simulator diverged" in res.errors[5]
    assert res.errors == ref.errors
    assert torch.isnan(y[5]).all() and torch.equal(y[ok], ref[0][ok])


@pytest.mark.timeout(60)
def test_model_bug_raises_on_the_caller(client):
    bad = CallableModel(lambda x: x[:, :2], parameters=3, output_size=3)  # wrong shape
    with pytest.raises(ValueError, match="expected predictions of shape"):
        Dask(client, retries=0).evaluate(bad, _ensemble(6))


@pytest.mark.timeout(120)
def test_smoother_run_on_dask_is_bitwise_in_process(client):
    obs, prior = _problem()
    model = _model(_dask_models.smooth)
    smoother = EnsembleSmoother(obs, schedule=ESMDA(alphas=(3.0, 3.0, 3.0)), seed=11)
    ref = smoother.run(model, prior, executor=InProcess())
    got = smoother.run(model, prior, executor=Dask(client))
    assert got.stopped_by == ref.stopped_by == "schedule"
    assert torch.equal(got.state.parameters, ref.state.parameters)
    assert got.history == ref.history and got.n_forwards == ref.n_forwards == 48


@pytest.mark.timeout(240)
def test_worker_killed_mid_run_loses_nothing(client):
    obs, prior = _problem()
    model = _model(_dask_models.slow_smooth)
    smoother = EnsembleSmoother(obs, schedule=ESMDA(alphas=(3.0, 3.0, 3.0)), seed=5)
    ref = smoother.run(model, prior, executor=InProcess())
    client.wait_for_workers(2, timeout=150)  # after an earlier kill, its restart
    ex = Dask(client, members_per_task=2)  # 8 tasks of 0.15 s per iteration on 2 workers
    ex.evaluate(model, prior[:2])  # warm the workers (torch import) before timing the kill
    pids = client.run(os.getpid)
    lost_before = client.run_on_scheduler(_dask_models.count_lost_tasks)
    killed: list[str] = []
    stop = threading.Event()

    def killer():
        # kill the first worker seen running one of our tasks, in the second iteration
        time.sleep(0.5)
        while not stop.is_set():
            busy = [w for w, keys in client.processing().items()
                    if any("enkal-forward" in str(k) for k in keys)]
            if busy:
                time.sleep(0.05)  # let it get well into the task
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append(busy[0])
                return
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        got = smoother.run(model, prior, executor=ex)
    finally:
        stop.set()
        thread.join()
    assert killed, "the run finished before a worker could be killed"
    # tasks really were taken from the dead worker and run again elsewhere
    assert client.run_on_scheduler(_dask_models.count_lost_tasks) > lost_before
    assert got.history["n_failed"] == [0, 0, 0]
    assert torch.equal(got.state.parameters, ref.state.parameters)


@pytest.mark.timeout(120)
def test_member_that_kills_its_worker_is_a_failed_member(client):
    """A member whose simulator kills the worker process every time becomes a failed member
    (KilledWorker); the others succeed, including the neighbours that shared a dying worker
    (with allowed-failures 0 the scheduler charges them at the first death: the rerun
    alone must clear them)."""
    model = _model(_dask_models.crash_on_large)
    x = _ensemble(6)
    x[2, 0] = 100.0
    old = client.run_on_scheduler(_dask_models.set_allowed_failures, 0)
    try:
        res = Dask(client, members_per_task=3).evaluate(model, x)
    finally:
        client.run_on_scheduler(_dask_models.set_allowed_failures, old)
    y, ok = res
    assert ok.tolist() == [True, True, False, True, True, True]
    assert list(res.errors) == [2] and res.errors[2].startswith("KilledWorker")
    good = InProcess().evaluate(_model(_dask_models.smooth), x)[0]
    assert torch.equal(y[ok], good[ok]) and torch.isnan(y[2]).all()


# -- an owned cluster -------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")
def test_owned_cluster_is_started_and_closed():
    obs, prior = _problem(8)
    model = _model(_dask_models.smooth)
    smoother = EnsembleSmoother(obs, schedule=ESMDA(alphas=(2.0, 2.0)), seed=1)
    with Dask(n_workers=1) as ex:
        client = ex.connect()
        assert ex.connect() is client and len(client.nthreads()) == 1
        got = smoother.run(model, prior, executor=ex)
    assert ex._session.client is None and client.status in ("closed", "closing")
    ref = smoother.run(model, prior, executor=InProcess())
    assert torch.equal(got.state.parameters, ref.state.parameters)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")
def test_the_cluster_start_is_reported_before_the_first_update(caplog):
    """The start of the LocalCluster is logged on its own, with its time and dashboard, and
    done before the sinks start: a progress display does not time it as update 1."""
    obs, prior = _problem(8)
    smoother = EnsembleSmoother(obs, schedule=ESMDA(alphas=(2.0, 2.0)), seed=1)
    seen = []

    class Spy:
        def start(self, run):
            seen.append(("start", ex._session.client is not None))

        def record(self, state, info, predictions, *, final):
            seen.append(("record", info.iteration))

        def close(self, end):
            pass

    ex = Dask(n_workers=1)
    with caplog.at_level(logging.INFO, logger="enkal.executors"):
        try:
            smoother.run(_model(_dask_models.smooth), prior, executor=ex, sinks=[Spy()])
        finally:
            ex.close()
    assert seen == [("start", True), ("record", 1), ("record", 2)]
    lines = [r.getMessage() for r in caplog.records if r.name == "enkal.executors"]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"Dask: local cluster with 1 worker started in \d+\.\d s, "
                        r"(dashboard http://\S+|no dashboard \(pip install bokeh\))",
                        lines[0]), lines


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")
def test_a_local_cluster_that_does_not_start_in_time_fails_clearly():
    ex = Dask(n_workers=1, start_timeout=0.01)  # a worker process takes ~1 s to start
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"0 of 1 local workers started within "
                                           r"start_timeout=0.01 s.*Dask\(start_timeout"):
        ex.connect()
    assert time.monotonic() - t0 < 30  # the failed cluster is shut down within 10 s
    assert ex._session.client is None and ex._session.cluster is None
    with pytest.raises(ValueError, match="Dask.start_timeout"):
        Dask(start_timeout=0)


@pytest.mark.parametrize("make", [lambda: InProcess(max_abs=10.0),
                                  lambda: MultiDevice(["cpu"], max_abs=10.0)])
def test_executor_max_abs_is_deprecated_for_the_failure_policy_but_still_honoured(make):
    """Which members failed is the failure policy's decision (``ResampleFailed(max_abs=)``);
    the executors' copy of the bound warns, and keeps working for now."""
    with pytest.warns(DeprecationWarning, match="failure=ResampleFailed"):
        executor = make()

    class Big(CallableModel):
        def replicate(self, device):
            return self

    model = Big(lambda x: x * 100.0, parameters=1, output_size=1)
    y, ok = executor.evaluate(model, torch.tensor([[0.01], [1.0]], dtype=torch.float64))
    assert ok.tolist() == [True, False]
