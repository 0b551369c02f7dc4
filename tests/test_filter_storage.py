"""A filter's history in HDF5 (issue: sequential data assimilation, "Storage"): the schema
plain xarray reads, and a resume mid-series that ends bit for bit where the uninterrupted
run ends, whatever stopped it (a shorter series, an error, a kill between cycles or inside a
write, a torn row).

The model is Lorenz-96 (10 variables, RK4), the filter a stochastic EnKF with random
rotations and a lag-2 smoother, so the generator state, the rotation and the smoother
window all have to survive the checkpoint; one run uses adaptive inflation, whose state has
to survive too.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import xarray as xr

import enkal
from enkal import storage
from enkal.errors import StorageError
from enkal.filtering import AdaptiveInflation, EnKF, EnsembleFilter, FilterStart, run_filter

pytestmark = pytest.mark.usefixtures("one_thread")

N_X, N_ENS, N_CYCLES, DT = 10, 8, 20, 0.1
OBSERVED = [0, 2, 4, 6, 8]


class Lorenz96:
    """Lorenz-96, ``dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F``, RK4 steps of 0.05;
    with ``parameters`` ``(n, 1)`` each member has its own forcing ``F``."""

    def __init__(self, forcing: float = 8.0, step: float = 0.05) -> None:
        self.forcing, self.step = forcing, step

    def _tendency(self, x: torch.Tensor, f: torch.Tensor | float) -> torch.Tensor:
        return (x.roll(-1, -1) - x.roll(2, -1)) * x.roll(1, -1) - x + f

    def propagate(self, states, t0, t1, *, parameters=None, generator=None):
        f = self.forcing if parameters is None or parameters.ndim == 1 else parameters[:, :1]
        n = max(1, round((t1 - t0) / self.step))
        h, x = (t1 - t0) / n, states
        for _ in range(n):
            k1 = self._tendency(x, f)
            k2 = self._tendency(x + h / 2 * k1, f)
            k3 = self._tendency(x + h / 2 * k2, f)
            k4 = self._tendency(x + h * k3, f)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x


def _series() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Times ``(K,)``, observations ``(K, 5)`` of a truth after a spin-up, and the initial
    ensemble ``(N_ens, N_x)``."""
    g = torch.Generator().manual_seed(7)
    model = Lorenz96()
    truth = model.propagate(8.0 + torch.randn(1, N_X, generator=g, dtype=torch.float64),
                            0.0, 2.0)
    times = DT * torch.arange(1, N_CYCLES + 1, dtype=torch.float64)
    rows, x = [], truth
    for k in range(N_CYCLES):
        x = model.propagate(x, float(times[k]) - DT, float(times[k]))
        rows.append(x[0, OBSERVED] + torch.randn(len(OBSERVED), generator=g,
                                                 dtype=torch.float64))
    x0 = truth + 2.0 * torch.randn(N_ENS, N_X, generator=g, dtype=torch.float64)
    return times, torch.stack(rows), x0


def _filter(kind: str = "enkf", **kw) -> EnsembleFilter:
    options = dict(noise_std=1.0, observe=OBSERVED, rotate=True, lag=2, seed=3,
                   inflation=1.05)
    if kind == "adaptive":
        options["inflation"] = AdaptiveInflation(initial=1.1, variance=0.5)
    options.update(kw)
    return EnsembleFilter(Lorenz96(), EnKF(), **options)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(kind) -> (path, result)``: the uninterrupted run of 20 cycles, recorded
    (once per module)."""
    cache: dict = {}

    def get(kind: str = "enkf"):
        if kind not in cache:
            times, values, x0 = _series()
            path = tmp_path_factory.mktemp(f"whole-{kind}") / "a.h5"
            cache[kind] = (path, enkal.run_filter(_filter(kind), x0, times, values, out=path))
        return cache[kind]

    return get


ROWS = ("time", "cycle", "observations", "forecast_mean", "forecast_spread", "analysis_mean",
        "analysis_spread", "smoothed_mean", "smoothed_spread", "n_failed", "inflation")


def _same_state(a, b) -> None:
    assert a.cycle == b.cycle and a.time == b.time
    assert torch.equal(a.states, b.states) and torch.equal(a.rng_state, b.rng_state)
    assert len(a.window) == len(b.window)
    for (ta, xa), (tb, xb) in zip(a.window, b.window, strict=True):
        assert ta == tb and torch.equal(xa, xb)
    assert a.inflation == b.inflation


def _same_rows(path_a: Path, path_b: Path, names=ROWS) -> None:
    with xr.open_dataset(path_a) as a, xr.open_dataset(path_b) as b:
        for name in names:
            assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name


class Crash(RuntimeError):
    pass


class CrashAt:
    """A sink that raises after ``cycle`` was recorded (the recorder is before it)."""

    def __init__(self, cycle: int) -> None:
        self.cycle = cycle

    def start(self, start) -> None:
        pass

    def record(self, state, info) -> None:
        if info.cycle == self.cycle:
            raise Crash(f"the machine went away at cycle {self.cycle}")

    def close(self, error) -> None:
        pass


# -- (a), (b): resume mid-series, bit for bit ------------------------------------------------
@pytest.mark.parametrize("kind, stop", [("enkf", "shorter_series"), ("adaptive", "error"),
                                        ("enkf", "killed_between_cycles"),
                                        ("adaptive", "killed_between_cycles")])
def test_a_resume_mid_series_ends_bit_for_bit_where_the_whole_run_ends(tmp_path, kind, stop,
                                                                       monkeypatch, reference):
    times, values, x0 = _series()
    whole_path, whole = reference(kind)
    path = tmp_path / "b.h5"
    if stop == "shorter_series":
        part = enkal.run_filter(_filter(kind), x0, times[:12], values[:12], out=path)
        assert part.state.cycle == 12
    elif stop == "error":
        with pytest.raises(Crash):
            enkal.run_filter(_filter(kind), x0, times, values, out=path, checkpoint_every=5,
                             sinks=[CrashAt(12)])
    else:  # checkpoints at 5 and 10, rows up to 12, then nothing: no close() ran
        monkeypatch.setattr(storage.FilterRecorder, "close",
                            lambda self, error: self._release())
        with pytest.raises(Crash):
            enkal.run_filter(_filter(kind), x0, times, values, out=path, checkpoint_every=5,
                             sinks=[CrashAt(12)])
        monkeypatch.undo()
    with xr.open_dataset(path) as ds:
        assert ds.cycle.values.tolist() == list(range(1, 13))
        assert ds.attrs["complete"] == (1 if stop == "shorter_series" else 0)
    resumed_at = 10 if stop == "killed_between_cycles" else 12
    assert storage.read_filter_state(path, _filter(kind)).cycle == resumed_at
    rest = enkal.run_filter(_filter(kind), None, times, values, out=path, resume=True)
    _same_state(rest.state, whole.state)
    assert torch.equal(rest.analysis_mean, whole.analysis_mean[resumed_at:])
    _same_rows(whole_path, path)
    _same_state(storage.read_filter_state(path, _filter(kind)), whole.state)
    with xr.open_dataset(path) as ds:
        assert ds.attrs["complete"] == 1 and ds.attrs["stopped_by"] == "end of series"
        # the filter's own record, row for row: the loop's result of the uninterrupted run
        assert np.array_equal(ds.analysis_mean.values, whole.analysis_mean.numpy())
        assert np.array_equal(ds.smoothed_mean.values, whole.smoothed_mean.numpy(),
                              equal_nan=True)
        assert np.array_equal(ds.inflation.values, whole.inflation.numpy())
    # resuming a finished file: nothing left to do, the file unchanged but for its attrs
    again = enkal.run_filter(_filter(kind), None, times, values, out=path, resume=True)
    assert again.state.cycle == N_CYCLES and again.analysis_mean.shape[0] == 0


def test_the_recorder_as_a_sink_of_the_loop_and_the_ensembles(tmp_path):
    times, values, x0 = _series()
    flt = _filter()
    path = tmp_path / "e.h5"
    result = run_filter(flt, flt.init(x0), times[:6], values[:6],
                        sinks=[storage.FilterRecorder(path, ensembles=True)])
    with storage.open_filter_history(path) as ds:
        ens = ds.analysis_ensemble.values
        assert ds.analysis_ensemble.dims == ("time", "member", "state")
        assert ens.shape == (6, N_ENS, N_X)
        assert np.array_equal(ens[-1], result.state.states.numpy())
        assert np.allclose(ens.mean(axis=1), ds.analysis_mean.values, rtol=0, atol=1e-12)
    # a resume must keep the file's choice
    with pytest.raises(ValueError, match=r"ensembles: file True, this run False.*"
                                         r"pass ensembles=True"):
        enkal.run_filter(flt, x0, times, values, out=path, resume=True)
    rest = enkal.run_filter(flt, x0, times, values, out=path, resume=True, ensembles=True)
    whole = run_filter(flt, flt.init(x0), times, values)
    _same_state(rest.state, whole.state)


# -- (c): plain xarray reads the schema ------------------------------------------------------
def test_plain_xarray_reads_the_documented_dims_and_attributes(tmp_path):
    times, values, x0 = _series()
    path = tmp_path / "f.h5"
    enkal.run_filter(_filter(), x0, times[:8], values[:8], out=path)
    with xr.open_dataset(path) as ds:  # no engine, no enkal: what a user's notebook does
        assert dict(ds.sizes) == {"time": 8, "state": N_X, "obs": len(OBSERVED)}
        for name in ("forecast_mean", "forecast_spread", "analysis_mean", "analysis_spread",
                     "smoothed_mean", "smoothed_spread"):
            assert ds[name].dims == ("time", "state"), name
            assert ds[name].attrs["cell_methods"].startswith("member: ")
            assert "long_name" in ds[name].attrs
        assert ds.observations.dims == ("time", "obs")
        assert ds.n_failed.dims == ds.inflation.dims == ds.cycle.dims == ("time",)
        assert ds.time.values.tolist() == times[:8].tolist()
        assert ds.observed_state.values.tolist() == OBSERVED
        assert np.array_equal(ds.observations.values, values[:8].numpy())
        assert ds.n_failed.dtype == np.int64 and ds.inflation.values.tolist() == [1.05] * 8
        a = ds.attrs
        assert a["enkal_format"] == "enkal-filter-history" and a["enkal_format_version"] == 1
        assert a["Conventions"] == "CF-1.10" and a["enkal_version"] == enkal.__version__
        assert a["lag"] == 2 and a["rotate"] == 1 and a["seed"] == 3
        assert a["scheme"] == "EnKF(centred=True)" and a["inflation"] == 1.05
        assert np.atleast_1d(a["noise_std"]).tolist() == [1.0]
    with xr.open_dataset(path, group="checkpoint") as ck:
        assert ck.attrs["cycle"] == 8 and ck.states.dims == ("member", "state")
        assert ck.window.dims == ("lag", "member", "state")
    with h5py.File(path, "r") as f:  # nothing pickled: numbers, strings, JSON
        assert f["checkpoint/rng_state"].dtype == np.uint8
    with pytest.raises(StorageError, match="it is a filter history"):
        enkal.open(path)


def test_the_lag_smoother_fills_its_window_and_the_smoothed_rows(tmp_path):
    times, values, x0 = _series()
    path = tmp_path / "f.h5"
    result = enkal.run_filter(_filter(), x0, times[:8], values[:8], out=path)
    assert len(storage.read_filter_state(path, _filter()).window) >= 1
    with xr.open_dataset(path) as ds:
        # the smoothed estimate of the last `lag` times is not final yet
        sm = ds.smoothed_mean.values
        assert np.isfinite(sm[:-2]).all() and np.isnan(sm[-2:]).all()
        assert np.array_equal(sm, result.smoothed_mean.numpy(), equal_nan=True)


def test_the_window_and_inflation_states_round_trip_through_the_checkpoint(tmp_path):
    """Whatever the filter keeps in its window (at most ``lag`` analyses), bit for bit."""
    times, values, x0 = _series()
    flt = _filter("adaptive")
    state, _ = flt.step(flt.init(x0), float(times[0]), values[0])
    g = torch.Generator().manual_seed(5)
    window = tuple((0.1 * i, torch.randn(N_ENS, N_X, generator=g, dtype=torch.float64))
                   for i in range(2))
    state = dataclasses.replace(state, window=window)
    path = tmp_path / "w.h5"
    rec = storage.FilterRecorder(path)
    rec.start(FilterStart(filter=flt, state=state, times=times, values=values))
    rec.close(None)
    back = storage.read_filter_state(path, flt)
    _same_state(back, state)
    assert len(back.window) == 2 and back.inflation[0].factor == state.inflation[0].factor
    three = dataclasses.replace(state, window=window + window[:1])
    with pytest.raises(ValueError, match="state.window: expected at most lag = 2"):
        run_filter(flt, three, times, values, sinks=[storage.FilterRecorder(path)])


def test_batches_of_filters_and_joint_parameters_have_their_dims(tmp_path):
    times, values, x0 = _series()
    g = torch.Generator().manual_seed(1)
    batch = torch.stack([x0, x0 + 0.1 * torch.randn(x0.shape, generator=g,
                                                    dtype=torch.float64)])
    flt = _filter()
    path = tmp_path / "batch.h5"
    enkal.run_filter(flt, batch, times[:5], torch.stack([values, values + 0.5], 1)[:5],
                     out=path, ensembles=True)
    with xr.open_dataset(path) as ds:
        assert ds.sizes["filter"] == 2
        assert ds.analysis_mean.dims == ("time", "filter", "state")
        assert ds.observations.dims == ("time", "filter", "obs")
        assert ds.analysis_ensemble.dims == ("time", "filter", "member", "state")
    joint = _filter(kind="enkf", lag=0)
    forcing = 8.0 + 0.5 * torch.randn(N_ENS, 1, generator=g, dtype=torch.float64)
    path = tmp_path / "joint.h5"
    whole = run_filter(joint, joint.init(x0, parameters=forcing), times, values)
    enkal.run_filter(joint, joint.init(x0, parameters=forcing), times[:7], values[:7],
                     out=path)
    with xr.open_dataset(path) as ds:
        assert ds.parameters_mean.dims == ("time", "parameter")
        assert ds.parameter.values.tolist() == ["p[0]"]
        assert "smoothed_mean" not in ds
    rest = enkal.run_filter(joint, None, times, values, out=path, resume=True)
    assert torch.equal(rest.state.parameters, whole.state.parameters)
    assert torch.equal(rest.state.states, whole.state.states)


# -- (d): another configuration is refused, naming what differs -------------------------------
@pytest.mark.parametrize("change, words", [
    ({"lag": 3}, r"lag: file 2, this filter 3"),
    ({"inflation": 1.1}, r"inflation: file 1.05, this filter 1.1"),
    ({"seed": 4, "rotate": False}, r"rotate: file true, this filter false; seed: file 3, "
                                   r"this filter 4"),
    ({"inflation": AdaptiveInflation()}, r"inflation: file 1.05, this filter "
                                         r"\"AdaptiveInflation\(initial=1.0"),
])
def test_a_resume_with_another_configuration_is_refused_naming_it(tmp_path, change, words):
    times, values, x0 = _series()
    path = tmp_path / "f.h5"
    enkal.run_filter(_filter(), x0, times[:5], values[:5], out=path)
    before = path.read_bytes()
    other = _filter(**change)
    with pytest.raises(ValueError, match=r"f.h5: written by a filter of another "
                                         r"configuration \(.*" + words):
        storage.read_filter_state(path, other)
    with pytest.raises(ValueError, match=words):
        enkal.run_filter(other, None, times, values, out=path, resume=True)
    with pytest.raises(ValueError, match=words):  # the recorder checks it too
        run_filter(other, other.init(x0), times, values,
                   sinks=[storage.FilterRecorder(path, resume=True)])
    assert path.read_bytes() == before  # nothing written


def test_another_series_or_start_is_refused(tmp_path):
    times, values, x0 = _series()
    path = tmp_path / "f.h5"
    flt = _filter()
    enkal.run_filter(flt, x0, times[:5], values[:5], out=path)
    with pytest.raises(ValueError, match="observations differ from this series"):
        enkal.run_filter(flt, None, times, values + 1.0, out=path, resume=True)
    with pytest.raises(ValueError, match="times differ"):
        enkal.run_filter(flt, None, times * 2, values, out=path, resume=True)
    with pytest.raises(ValueError, match=r"starts at cycle 0, not from the file's checkpoint "
                                         r"\(cycle 5\)"):
        run_filter(flt, flt.init(x0), times, values,
                   sinks=[storage.FilterRecorder(path, resume=True)])
    with pytest.raises(ValueError, match=r"initial_state: shape \(4, 10\)"):
        enkal.run_filter(flt, x0[:4], times, values, out=path, resume=True)


def test_out_and_resume_arguments(tmp_path):
    times, values, x0 = _series()
    path = tmp_path / "f.h5"
    flt = _filter()
    enkal.run_filter(flt, x0, times[:3], values[:3], out=path)
    with pytest.raises(FileExistsError, match="f.h5: exists; pass resume=True"):
        enkal.run_filter(flt, x0, times, values, out=path)
    with pytest.raises(ValueError, match="resume: True needs out="):
        enkal.run_filter(flt, x0, times, values, resume=True)
    fresh = tmp_path / "new.h5"  # resume=True without a file: a fresh run
    result = enkal.run_filter(flt, x0, times[:3], values[:3], out=fresh, resume=True)
    assert result.state.cycle == 3 and storage.read_filter_state(fresh, flt).cycle == 3
    with pytest.raises(TypeError, match="initial_state: expected a FilterState"):
        enkal.run_filter(flt, None, times, values, out=tmp_path / "none.h5")
    with pytest.raises(TypeError, match="flt: expected an enkal.filtering.EnsembleFilter"):
        enkal.run_filter(object(), x0, times, values)
    assert not (tmp_path / "none.h5").exists()


# -- (e): a write stopped half way --------------------------------------------------------------
_KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import enkal
    from enkal.storage import filter_h5, filtering
    from test_filter_storage import _filter, _series
    real = filter_h5.write_row

    def write_row(f, row, info, *args, **kwargs):
        real(f, row, info, *args, **kwargs)
        if info.cycle == 9:  # the row of cycle 9 is in the file, its change is not whole
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    filtering.write_row = write_row
    times, values, x0 = _series()
    enkal.run_filter(_filter(), x0, times, values, out=sys.argv[1])
""")


def test_a_kill_inside_a_write_is_undone_and_the_run_resumes_bit_for_bit(tmp_path, reference):
    times, values, x0 = _series()
    path = tmp_path / "k.h5"
    code = _KILLED.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (tmp_path / ".k.h5.journal").exists()
    with storage.open_filter_history(path) as ds:  # the reader undoes the half-done change
        assert ds.cycle.values.tolist() == list(range(1, 9))
    assert not (tmp_path / ".k.h5.journal").exists()
    assert storage.read_filter_state(path, _filter()).cycle == 8
    rest = enkal.run_filter(_filter(), None, times, values, out=path, resume=True)
    whole_path, whole = reference()
    _same_state(rest.state, whole.state)
    _same_rows(whole_path, path)


def test_an_error_inside_a_write_is_rolled_back(tmp_path, monkeypatch, reference):
    times, values, x0 = _series()
    path = tmp_path / "f.h5"
    real = storage.filtering.write_checkpoint_group

    def fail(f, arrays):
        if int(arrays["attrs"]["cycle"]) == 6:
            real(f, arrays)  # written into the file, then the change fails
            raise OSError("the disk went away")
        real(f, arrays)

    monkeypatch.setattr(storage.filtering, "write_checkpoint_group", fail)
    with pytest.raises(OSError, match="the disk went away"):
        enkal.run_filter(_filter(), x0, times, values, out=path)
    monkeypatch.undo()
    # the row and checkpoint of cycle 6 are undone; the close then wrote the attributes
    with xr.open_dataset(path) as ds:
        assert ds.cycle.values.tolist() == [1, 2, 3, 4, 5]
        assert ds.attrs["stopped_by"] == "failed: OSError: the disk went away"
    assert storage.read_filter_state(path, _filter()).cycle == 5
    rest = enkal.run_filter(_filter(), None, times, values, out=path, resume=True)
    _same_state(rest.state, reference()[1].state)


def test_torn_rows_are_left_out_and_cut_and_a_corrupt_checkpoint_is_named(tmp_path,
                                                                          reference):
    times, values, x0 = _series()
    path = tmp_path / "t.h5"
    part = enkal.run_filter(_filter(), x0, times[:7], values[:7], out=path)
    with h5py.File(path, "r+") as f:  # only some variables of a last row reached the file
        for name in ("analysis_mean", "cycle", "time"):
            f[name].resize(8, axis=0)
    with pytest.warns(RuntimeWarning, match="t.h5: the last row is incomplete"):
        ds = storage.open_filter_history(path)
    assert ds.sizes["time"] == 7
    ds.close()
    rest = enkal.run_filter(_filter(), None, times, values, out=path, resume=True)
    whole_path, whole = reference()
    _same_state(rest.state, whole.state)
    _same_rows(whole_path, path)
    assert part.state.cycle == 7
    with h5py.File(path, "r+") as f:  # bit rot in the checkpoint
        states = f["checkpoint/states"]
        states[0, 0] = states[0, 0] + 1e-9
    with pytest.raises(StorageError, match="t.h5: the checkpoint's checksum does not match"):
        storage.read_filter_state(path, _filter())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with storage.open_filter_history(path) as ds:  # the rows stay readable
            assert ds.sizes["time"] == N_CYCLES
