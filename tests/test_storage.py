"""enkal.storage: the HDF5/xarray schema, streaming history, checkpoints and exact resume.

Equalities here are exact (``torch.equal``, ``np.array_equal``): storage must not change a
single bit of what the smoother computed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import xarray as xr
from conftest import torch_threads

import enkal
from enkal import storage
from enkal._types import decode_state, encode_state
from enkal.errors import StorageError

WORKER = Path(__file__).with_name("_storage_worker.py")
_spec = importlib.util.spec_from_file_location("_storage_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _model():
    return enkal.CallableModel(
        lambda x: torch.stack([x[:, 0] ** 2 + x[:, 1], torch.sin(x[:, 1])], 1),
        parameters=["a", ("b", (), enkal.Positive())], output_size=2)


def _smoother(*, full_noise=False, schedule=None, seed=3):
    y = [1.0, 0.5]
    obs = (enkal.Observations(y, noise_cov=[[0.01, 0.002], [0.002, 0.02]]) if full_noise
           else enkal.Observations(y, noise_std=[0.1, 0.2]))
    return enkal.EnsembleSmoother(obs, rule=enkal.PerturbedObservations(),
                                  schedule=schedule or enkal.FixedAnnealing(factor=0.8),
                                  seed=seed)


def _prior(dtype=torch.float64, n=32):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _result(dtype=torch.float64, full_noise=False, iterations=4):
    return _smoother(full_noise=full_noise).run(_model(), _prior(dtype),
                                                max_iterations=iterations)


def _writer(path, smoother, model, history=storage.History(), **kw):
    return storage.HistoryWriter(path, layout=model.layout, observations=smoother.observations,
                                 config=smoother.config(), history=history, **kw)


def _loop(writer, smoother, model, state, n, ckpt=None):
    """The loop of ``run``: evaluate, step, append (with the state), checkpoint."""
    writer.start(state)
    target = state.iteration + n
    while state.iteration < target:
        y, ok = enkal.evaluate(model, model.layout.to_physical(state.parameters))
        state, info = smoother.step(state, y, ok=ok)
        writer.record(state, info, predictions=y, final=state.iteration == target)
        if ckpt is not None:
            storage.write_checkpoint(ckpt, smoother, state)
    return state


# -- whole results ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("full_noise", [False, True])
def test_save_open_round_trip(tmp_path, dtype, full_noise):
    result = _result(dtype, full_noise)
    path = storage.save(result, tmp_path / "run.h5")
    assert sorted(os.listdir(tmp_path)) == ["run.h5"]  # no temporary file left behind
    with storage.open(path) as ds:
        k = result.state.iteration
        assert list(ds.iteration.values) == result.history["iteration"] == [1, 2, 3, 4]
        assert dict(ds.sizes) == {"iteration": 4, "member": 32, "parameter": 2, "output": 2,
                                  "rng_byte": 5056, **({"output2": 2} if full_noise else {})}
        assert ds.parameters.dtype == np.dtype(str(dtype).removeprefix("torch."))
        last = torch.from_numpy(ds.parameters.sel(iteration=k).values)
        assert last.dtype == dtype and torch.equal(last, result.parameters)
        assert np.isnan(ds.parameters.sel(iteration=1).values).all()  # only the final kept
        assert list(ds.stored.values) == [0, 0, 2, 1 | 4]  # the final row: the whole state
        pred = torch.from_numpy(ds.predictions.sel(iteration=k - 1).values)
        assert torch.equal(pred, result.predictions)  # G of the ensemble of that row
        for name in ("alpha", "misfit", "mean_misfit", "spread", "n_failed",
                     "schedule_rho"):
            assert ds[name].values.tolist() == result.history[name], name
        assert ds.n_failed.dtype == np.int64 and ds.done.dtype == np.int8
        assert list(ds.parameter.values) == ["a", "b"]
        assert list(ds.output.values) == ["y[0]", "y[1]"]
        assert list(ds.member.values) == list(range(32))
        assert np.array_equal(ds.observations.values, [1.0, 0.5])
        obs = result.smoother.observations
        assert np.array_equal(ds.noise_std.values, obs.noise_std.numpy())
        assert ("noise_chol" in ds) == full_noise
        if full_noise:
            assert np.array_equal(ds.noise_chol.values, obs.noise_chol.numpy())
        assert ds.mask.values.tolist() == [1, 1]
        a = ds.attrs
        assert a["enkal_format"] == "enkal-history" and a["enkal_format_version"] == 2
        assert a["enkal_version"] == enkal.__version__
        assert a["torch_version"] == torch.__version__
        assert a["seed"] == 3 and a["parameter_space"] == "unconstrained"
        assert json.loads(a["config"]) == json.loads(json.dumps(result.smoother.config()))
        assert storage.read_layout(ds) == result.layout
        assert a["stopped_by"] == "max_iterations" and a["n_forwards"] == 128
        assert a["complete"] == 1
        assert a["noise"] == ("full" if full_noise else "diagonal")
        phys = storage.physical(ds.sel(iteration=[k])).values[0]
        assert torch.equal(torch.from_numpy(phys), result.physical)
    # plain h5py reads the same numbers
    with h5py.File(path, "r") as f:
        assert torch.equal(torch.from_numpy(f["parameters"][-1]), result.parameters)
        assert f.attrs["enkal_format"] == "enkal-history"
        assert [s.decode() for s in f["parameter"][:]] == ["a", "b"]
        # version-0 superblock: no "open for writing" flag that a crash would leave set
        assert f.id.get_create_plist().get_version()[0] == 0


def test_to_xarray_is_the_saved_file(tmp_path):
    result = _result(torch.float32)
    ds = storage.to_xarray(result).load()
    saved = storage.open(storage.save(result, tmp_path / "r.h5")).load()
    ds.attrs.pop("created")
    saved.attrs.pop("created")
    xr.testing.assert_identical(ds, saved)
    # plain xarray reads the file too
    with xr.open_dataset(tmp_path / "r.h5", engine="h5netcdf") as plain:
        xr.testing.assert_identical(plain.drop_attrs(), saved.drop_attrs())


def test_result_without_updates(tmp_path):
    smoother = enkal.EnsembleSmoother(enkal.Observations([1.0], noise_std=1.0),
                                      schedule=enkal.ESMDA.constant(1))
    model = enkal.CallableModel(lambda x: x[:, :1], parameters=["a"], output_size=1)
    state = smoother.init(torch.randn(4, 1, dtype=torch.float64))
    result = enkal.SmootherResult(state=state, layout=model.layout, history={}, n_forwards=0,
                                  smoother=smoother)
    with storage.open(storage.save(result, tmp_path / "r.h5")) as ds:
        assert ds.iteration.values.tolist() == [0]
        assert torch.equal(torch.from_numpy(ds.parameters.values[0]), state.parameters)


def test_save_refuses_other_objects(tmp_path):
    with pytest.raises(TypeError, match="SmootherResult"):
        storage.save({"parameters": 1}, tmp_path / "x.h5")


# -- streaming ---------------------------------------------------------------------------
def test_history_every_n_with_predictions(tmp_path):
    smoother, model = _smoother(), _model()
    path = tmp_path / "h.h5"
    writer = _writer(path, smoother, model, storage.History(every=3, predictions=True))
    state = _loop(writer, smoother, model, smoother.init(_prior()), 7)
    writer.close()
    with storage.open(path) as ds:
        assert ds.iteration.values.tolist() == list(range(8))
        # kept: 0, 3, 6 (every 3) and 7 (final); predictions of 0, 3, 6 and of 6 (last forward)
        # bit 4: the kept rows hold the whole state (rng_state, schedule_state, checksum)
        assert ds.stored.values.tolist() == [7, 0, 0, 7, 0, 0, 7, 5]
        assert torch.equal(torch.from_numpy(ds.parameters.values[7]), state.parameters)
        for k in (0, 3, 6):  # predictions(k) = G(parameters(k)): the same row, exactly
            x = torch.from_numpy(ds.parameters.values[k])
            assert torch.equal(torch.from_numpy(ds.predictions.values[k]),
                               model(model.layout.to_physical(x)))
        assert np.isnan(ds.parameters.values[[1, 2, 4, 5]]).all()
        assert np.isnan(ds.predictions.values[7]).all()
        assert np.isnan(ds.alpha.values[0]) and ds.n_failed.values[0] == -1
        assert (ds.alpha.values[1:] > 0).all() and (ds.n_failed.values[1:] == 0).all()
        assert ds.attrs["complete"] == 1
    with h5py.File(path, "r") as f:  # rows without an ensemble take no space
        assert f["parameters"].id.get_num_chunks() == 4


def test_history_final_only(tmp_path):
    smoother, model = _smoother(), _model()
    path = tmp_path / "h.h5"
    writer = _writer(path, smoother, model, storage.History(every=None, predictive=False))
    state = _loop(writer, smoother, model, smoother.init(_prior()), 5)
    with storage.open(path) as ds:
        assert ds.stored.values.tolist() == [0, 0, 0, 0, 0, 4 | 1]
        assert "predictions" not in ds  # neither the rows' nor the posterior predictive
        assert torch.equal(torch.from_numpy(ds.parameters.values[-1]), state.parameters)
        assert ds.attrs["complete"] == 0  # not closed: an interrupted or running run


def test_mask_and_float32_in_memory_writer():
    import io

    layout = enkal.ParameterLayout([("w", (2, 2)), ("s", (), enkal.Positive())])
    w = storage.HistoryWriter(io.BytesIO(), layout=layout,
                              observations=enkal.Observations([0.0], noise_std=1.0))
    w.append(0, torch.zeros(3, 5, dtype=torch.float32))
    mask = torch.tensor([True, False, True, True, True])
    w.append(1, torch.ones(3, 5, dtype=torch.float32), {"alpha": 1.5}, mask=mask, final=True)
    w._target.seek(0)
    with xr.open_dataset(w._target, engine="h5netcdf") as ds:
        assert ds.parameter.values.tolist() == ["w[0,0]", "w[0,1]", "w[1,0]", "w[1,1]", "s"]
        assert ds.mask.values.tolist() == [1, 0, 1, 1, 1]
        assert ds.parameters.dtype == np.float32
        assert ds.alpha.values[1] == 1.5


def test_writer_resume_truncates_and_continues(tmp_path):
    smoother, model = _smoother(), _model()
    path = tmp_path / "h.h5"
    reference = tmp_path / "ref.h5"
    w_ref = _writer(reference, smoother, model)
    final = _loop(w_ref, smoother, model, smoother.init(_prior()), 6)

    w = _writer(path, smoother, model)
    state = _loop(w, smoother, model, smoother.init(_prior()), 3)
    mid = state
    state = _loop(w, smoother, model, state, 2)  # rows 4, 5: "lost" by the crash below
    # resume at iteration 3: rows 4 and 5 go, 4..6 are recomputed, no duplicates
    w2 = _writer(path, smoother, model, resume_from=3)
    assert w2.last_iteration == 3 and w2.n_rows == 4
    state = _loop(w2, smoother, model, mid, 3)
    assert torch.equal(state.parameters, final.parameters)
    with storage.open(path) as ds, storage.open(reference) as ref:
        assert ds.iteration.values.tolist() == list(range(7))
        assert np.array_equal(ds.parameters.values, ref.parameters.values)
        assert np.array_equal(ds.alpha.values, ref.alpha.values, equal_nan=True)
    with pytest.raises(ValueError, match="layout"):
        storage.HistoryWriter(path, layout=enkal.ParameterLayout(["x", "y", "z"]),
                              observations=smoother.observations, resume_from=2)


def test_resume_without_a_file_starts_one(tmp_path):
    smoother, model = _smoother(), _model()
    state = smoother.init(_prior())
    w = _writer(tmp_path / "new.h5", smoother, model, resume_from=0)
    assert w.last_iteration is None
    _loop(w, smoother, model, state, 1)
    with storage.open(tmp_path / "new.h5") as ds:
        assert ds.iteration.values.tolist() == [0, 1]


def test_append_validation(tmp_path):
    smoother, model = _smoother(), _model()
    w = _writer(tmp_path / "h.h5", smoother, model)
    with pytest.raises(ValueError, match="first row"):
        w.append(0, None)
    with pytest.raises(ValueError, match="members first"):
        w.append(0, torch.zeros(2, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        w.append(0, torch.zeros(32, 2, dtype=torch.int64))
    w.append(0, torch.zeros(32, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="after the last row"):
        w.append(0, torch.zeros(32, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(32, 2\)"):
        w.append(1, torch.zeros(16, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not match"):
        w.append(1, torch.zeros(32, 2, dtype=torch.float64), {"iteration": 2})
    with pytest.raises(ValueError, match="reserved"):
        w.append(1, torch.zeros(32, 2, dtype=torch.float64), {"parameters": 1.0})
    with pytest.raises(TypeError, match="bool, int or float"):
        w.append(1, torch.zeros(32, 2, dtype=torch.float64), {"note": "x"})
    with pytest.raises(ValueError, match="mask"):
        w.append(1, torch.zeros(32, 2, dtype=torch.float64), mask=torch.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="output_names"):
        _writer(tmp_path / "x.h5", smoother, model, output_names=["a"])
    for bad in (dict(every=0), dict(compression="zstd"), dict(compression_level=12)):
        with pytest.raises(ValueError, match="History"):
            storage.History(**bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_member_blocks_round_trip(tmp_path, dtype):
    """Chunks of whole members (the direct-write path) plus a short last block (the normal
    path) give back exactly what went in, for parameters and predictions."""
    layout = enkal.ParameterLayout.flat(100)
    obs = enkal.Observations(np.zeros(60), noise_std=1.0)
    history = storage.History(predictions=True, chunk_bytes=1700)
    w = storage.HistoryWriter(tmp_path / "h.h5", layout=layout, observations=obs,
                              history=history)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 100, generator=g, dtype=dtype) for _ in range(3)]
    ys = [torch.randn(5, 60, generator=g, dtype=dtype) for _ in range(2)]
    w.append(0, xs[0])
    w.append(1, xs[1], predictions=ys[0])
    w.append(2, xs[2], predictions=ys[1], final=True)
    with h5py.File(tmp_path / "h.h5", "r") as f:  # blocks of 3+2 and 2+2+1 members
        assert f["parameters"].chunks == (1, 3 if dtype == torch.float32 else 2, 100)
    with storage.open(tmp_path / "h.h5") as ds:
        for k in range(3):
            assert torch.equal(torch.from_numpy(ds.parameters.values[k]), xs[k])
        for k in range(2):
            assert torch.equal(torch.from_numpy(ds.predictions.values[k]), ys[k])


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compressed_history_reads_back(tmp_path, compression):
    smoother, model = _smoother(), _model()
    path = tmp_path / "h.h5"
    w = _writer(path, smoother, model, storage.History(compression=compression))
    state = _loop(w, smoother, model, smoother.init(_prior(torch.float32)), 2)
    with storage.open(path) as ds:
        assert torch.equal(torch.from_numpy(ds.parameters.values[-1]), state.parameters)
    with h5py.File(path, "r") as f:
        assert f["parameters"].compression == compression


# -- torn appends ------------------------------------------------------------------------
def _end_of_address(path):
    with open(path, "rb") as fh:
        return int.from_bytes(fh.read(48)[40:48], "little")


def test_repair_stale_end_of_address(tmp_path):
    """A writer killed inside HDF5's final flush can leave headers pointing past the
    superblock's stale end address ("addr overflow"); repair restores the row."""
    smoother, model = _smoother(), _model()
    path = tmp_path / "h.h5"
    w = _writer(path, smoother, model, storage.History(predictions=True))
    state = _loop(w, smoother, model, smoother.init(_prior()), 2)
    before = _end_of_address(path)
    state = _loop(w, smoother, model, state, 1)
    with open(path, "r+b") as fh:  # the superblock as it was before the last append
        fh.seek(40)
        fh.write(before.to_bytes(8, "little"))
    # the schedule_state strings are read at open, the arrays lazily: either fails
    with pytest.raises((OSError, StorageError), match="addr overflow|past end of alloc"):
        storage.open(path).load()
    # the state of the last row cannot be read: resuming falls back to the row before
    with pytest.warns(RuntimeWarning, match="h.h5: skipped unusable state rows.*row 3"):
        assert storage.read_history_state(path)["iteration"] == 2
    assert storage.repair(path) == 4
    with storage.open(path) as ds:
        assert torch.equal(torch.from_numpy(ds.parameters.values[3]), state.parameters)
    back = storage.read_history_state(path)
    assert back["iteration"] == 3 and torch.equal(back["parameters"], state.parameters)


def test_torn_row_of_different_lengths(tmp_path):
    smoother, model = _smoother(), _model()
    path = tmp_path / "h.h5"
    _loop(_writer(path, smoother, model), smoother, model, smoother.init(_prior()), 3)
    with h5py.File(path, "r+") as f:  # only some headers of the last append reached disk
        for name in ("alpha", "misfit", "iteration"):
            f[name].resize(3, axis=0)
    with pytest.warns(RuntimeWarning, match="incomplete"):
        ds = storage.open(path)
    assert ds.sizes["iteration"] == 3
    ds.close()
    assert storage.repair(path) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with storage.open(path) as ds:
            assert ds.iteration.values.tolist() == [0, 1, 2]


# -- checkpoints ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [False, True])
def test_checkpoint_round_trip(tmp_path, dtype, with_mask):
    smoother, model = _smoother(), _model()
    mask = torch.tensor([True, False]) if with_mask else None
    state = smoother.init(_prior(dtype), mask=mask)
    y, ok = enkal.evaluate(model, model.layout.to_physical(state.parameters))
    state, _ = smoother.step(state, y, ok=ok)
    path = storage.write_checkpoint(tmp_path / "c.h5", smoother, state)
    assert sorted(os.listdir(tmp_path)) == ["c.h5"]
    back = storage.read_checkpoint(path, smoother, device="cpu")
    assert back.parameters.dtype == dtype and torch.equal(back.parameters, state.parameters)
    assert torch.equal(back.rng_state, state.rng_state) and back.rng_state.dtype == torch.uint8
    assert back.schedule == state.schedule and back.iteration == state.iteration == 1
    if with_mask:
        assert back.mask.dtype == torch.bool and torch.equal(back.mask, mask)
    else:
        assert back.mask is None
    # continuing from either gives the same next ensemble, bit for bit
    y, ok = enkal.evaluate(model, model.layout.to_physical(state.parameters))
    a, _ = smoother.step(state, y, ok=ok)
    b, _ = smoother.step(back, y, ok=ok)
    assert torch.equal(a.parameters, b.parameters)
    d = storage.read_state_dict(path)
    assert d["config"] == json.loads(json.dumps(smoother.config()))
    assert d["attrs"]["enkal_format"] == "enkal-checkpoint"
    with h5py.File(path, "r") as f:  # plain h5py reads it; no pickled objects
        assert f["parameters"].dtype == np.dtype(str(dtype).removeprefix("torch."))
        assert f["rng_state"].dtype == np.uint8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_checkpoint_keeps_half_precision_dtypes(tmp_path, dtype):
    smoother = _smoother()
    state = smoother.init(_prior().to(dtype))
    path = storage.write_checkpoint(tmp_path / "c.h5", smoother, state)
    back = storage.read_checkpoint(path, smoother)
    assert back.parameters.dtype == dtype and torch.equal(back.parameters, state.parameters)


def test_checkpoint_failure_keeps_the_previous_one(tmp_path, monkeypatch):
    smoother = _smoother()
    first = smoother.init(_prior())
    path = storage.write_checkpoint(tmp_path / "c.h5", smoother, first)
    second = enkal.SmootherState(parameters=first.parameters + 1, iteration=1,
                                 schedule=first.schedule, rng_state=first.rng_state)
    calls = []

    def failing(f, name, a):
        calls.append(name)
        if name == "rng_state":
            raise OSError("disk full")
        f.create_dataset(name, data=a)

    monkeypatch.setattr(storage.checkpoint, "_put_array", failing)  # where it is looked up
    with pytest.raises(OSError, match="disk full"):
        storage.write_checkpoint(path, smoother, second)
    monkeypatch.undo()
    assert calls == ["parameters", "rng_state"]
    assert sorted(os.listdir(tmp_path)) == ["c.h5"]  # the temporary file is gone
    back = storage.read_checkpoint(path, smoother)
    assert back.iteration == 0 and torch.equal(back.parameters, first.parameters)


def _checkpoint(tmp_path):
    smoother = _smoother()
    state = smoother.init(_prior())
    return smoother, state, storage.write_checkpoint(tmp_path / "c.h5", smoother, state)


def test_truncated_and_foreign_files_raise_storage_error(tmp_path):
    smoother, state, path = _checkpoint(tmp_path)
    data = path.read_bytes()
    cases = {
        "half.h5": data[: len(data) // 2],
        "head.h5": data[:100],
        "empty.h5": b"",
        "text.h5": b"iteration,parameters\n1,2\n",
    }
    for name, content in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(StorageError, match=name):
            storage.read_checkpoint(bad, smoother)
        with pytest.raises(StorageError, match=name):
            storage.open(bad)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["parameters"] = np.zeros((32, 2))
    with pytest.raises(StorageError, match="foreign.h5.*not an enkal-checkpoint"):
        storage.read_checkpoint(foreign, smoother)
    with pytest.raises(StorageError, match="it is a checkpoint"):
        storage.open(path)
    hist = storage.save(_result(), tmp_path / "hist.h5")
    with pytest.raises(StorageError, match="hist.h5.*it is a history file"):
        storage.read_checkpoint(hist, smoother)
    with pytest.raises(StorageError, match="half"):
        half = tmp_path / "hist_half.h5"
        half.write_bytes(hist.read_bytes()[: hist.stat().st_size // 2])
        storage.open(half).load()
    with pytest.raises(FileNotFoundError):
        storage.read_checkpoint(tmp_path / "missing.h5", smoother)


def test_corrupted_checkpoint_never_reads_wrong_values(tmp_path):
    """Random bytes overwritten anywhere: either StorageError naming the file, or the exact
    state (bytes that land in unused space change nothing). Never a silently different
    ensemble: metadata and arrays carry checksums."""
    smoother, state, path = _checkpoint(tmp_path)
    data = path.read_bytes()
    with h5py.File(path, "r") as f:  # hit the ensemble's bytes at least once
        offset = f["parameters"].id.get_chunk_info(0).byte_offset
    rng = random.Random(1234)
    spots = [offset + 100] + [rng.randrange(len(data) - 8) for _ in range(40)]
    errors = 0
    for i, spot in enumerate(spots):
        bad = tmp_path / f"bad{i}.h5"
        corrupt = bytearray(data)
        corrupt[spot:spot + 8] = rng.randbytes(8)
        bad.write_bytes(bytes(corrupt))
        try:
            back = storage.read_checkpoint(bad, smoother)
        except StorageError as err:
            assert bad.name in str(err)
            errors += 1
            continue
        assert torch.equal(back.parameters, state.parameters), spot
        assert torch.equal(back.rng_state, state.rng_state), spot
        assert back.schedule == state.schedule and back.iteration == state.iteration, spot
    assert errors >= 1  # the ensemble's own bytes were hit


def test_corrupted_checkpoint_metadata(tmp_path):
    smoother, state, path = _checkpoint(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["n_members"] = 31
    with pytest.raises(StorageError, match="c.h5.*shape"):
        storage.read_checkpoint(path, smoother)
    with h5py.File(path, "r+") as f:
        f.attrs["n_members"] = 32
        f.attrs["schedule"] = "{not json"
    with pytest.raises(StorageError, match="c.h5"):
        storage.read_checkpoint(path, smoother)


def test_schedule_mismatch_is_a_clear_error(tmp_path):
    smoother, state, path = _checkpoint(tmp_path)
    other = _smoother(schedule=enkal.ESMDA.constant(4))
    with pytest.raises(ValueError, match=r"c.h5.*schedule.*AnnealingState.*ESMDAState"):
        storage.read_checkpoint(path, other)
    with pytest.warns(RuntimeWarning, match="schedule differ"):
        storage.read_checkpoint(path, _smoother(schedule=enkal.FixedAnnealing(factor=0.5)))
    wrong_obs = enkal.EnsembleSmoother(enkal.Observations([1.0, 2.0, 3.0], noise_std=1.0),
                                       schedule=enkal.FixedAnnealing())
    with pytest.raises(ValueError, match="3"):
        storage.read_checkpoint(path, wrong_obs)
    with pytest.raises(ValueError, match="cuda"):
        storage.read_checkpoint(path, smoother, device="cuda")


# -- kill and resume -------------------------------------------------------------------------
def _run_worker(directory, iterations, *extra):
    return subprocess.run([sys.executable, str(WORKER), str(directory), "--iterations",
                           str(iterations), *extra], check=True, capture_output=True,
                          text=True, timeout=60)


def test_sigkill_mid_run_keeps_completed_iterations_and_resume_is_bitwise(tmp_path):
    n = 25
    killed = tmp_path / "killed"
    seed = int.from_bytes(os.urandom(4), "little")
    delay = random.Random(seed).uniform(0.0, 0.25)
    proc = subprocess.Popen([sys.executable, str(WORKER), str(killed), "--iterations", str(n),
                             "--sleep", "0.05"], stdout=subprocess.PIPE, text=True)
    # the uninterrupted reference, here while the worker starts (one thread, as the worker)
    with torch_threads(1):
        worker.run(tmp_path / "ref", n)
    printed = 0
    for line in proc.stdout:  # wait until the file has >= 2 updates (3 rows)
        printed = int(line)
        if printed >= 2:
            break
    time.sleep(delay)  # then kill at a random point: inside or between appends/checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before the kill (seed {seed})"
    history = killed / "history.h5"
    ckpt = storage.read_state_dict(killed / "checkpoint.h5")
    try:
        ds = xr.open_dataset(history, engine="h5netcdf").load()
    except OSError:
        # the kill landed inside HDF5's final metadata flush of an append (a window of
        # microseconds per append; see the module docstring): repair restores the file
        assert storage.repair(history) >= ckpt["iteration"] + 1, f"seed {seed}"
        ds = xr.open_dataset(history, engine="h5netcdf").load()
    with ds, xr.open_dataset(tmp_path / "ref" / "history.h5", engine="h5netcdf") as ref:
        rows = ds.sizes["iteration"]
        # every completed iteration is there: the history is appended before the checkpoint
        assert ckpt["iteration"] <= rows - 1 <= ckpt["iteration"] + 1, f"seed {seed}"
        assert rows - 1 >= printed >= 2
        assert ds.iteration.values.tolist() == list(range(rows))
        part = ref.isel(iteration=slice(0, rows))
        assert np.array_equal(ds.parameters.values, part.parameters.values)
        for name in ("alpha", "misfit", "spread", "schedule_rho"):
            assert np.array_equal(ds[name].values, part[name].values, equal_nan=True), name
        # predictions of the last row come with the next update
        assert np.array_equal(ds.predictions.values[:-1], part.predictions.values[:-1])
        assert np.array_equal(ds.parameters.values[ckpt["iteration"]],
                              ckpt["parameters"].numpy())
    # resume in a fresh process: the file is continued, and ends bit for bit as the
    # uninterrupted run's
    _run_worker(killed, n, "--resume")
    _, smoother, _ = worker.build()
    final = storage.read_checkpoint(killed / "checkpoint.h5", smoother)
    reference = storage.read_checkpoint(tmp_path / "ref" / "checkpoint.h5", smoother)
    assert final.iteration == reference.iteration == n
    assert torch.equal(final.parameters, reference.parameters), f"seed {seed}"
    assert torch.equal(final.rng_state, reference.rng_state)
    assert final.schedule == reference.schedule
    with storage.open(history) as ds, storage.open(tmp_path / "ref" / "history.h5") as ref:
        assert ds.iteration.values.tolist() == list(range(n + 1))  # no duplicates
        for name in ("parameters", "predictions", "stored", "alpha", "misfit", "n_failed"):
            assert np.array_equal(ds[name].values, ref[name].values, equal_nan=True), name
        assert ds.attrs["complete"] == 1


# -- the history as its own checkpoint ---------------------------------------------------------
def test_sigkill_mid_run_then_resume_from_the_history_file_is_bitwise(tmp_path):
    """``run(store=...)`` with the default policy writes no per-iteration checkpoint file:
    the history rows hold the state. Kill it at a random point, ``run(resume=history)``:
    the result and the file are the uninterrupted run's, bit for bit."""
    n = 25
    killed = tmp_path / "killed"
    seed = int.from_bytes(os.urandom(4), "little")
    delay = random.Random(seed).uniform(0.0, 0.1)
    proc = subprocess.Popen([sys.executable, str(WORKER), str(killed), "--iterations", str(n),
                             "--sleep", "0.02", "--run"], stdout=subprocess.PIPE, text=True)
    with torch_threads(1):
        reference = worker.run_smoother(tmp_path / "ref", n)
    printed = 0
    for line in proc.stdout:  # a line is printed before its row is written
        printed = int(line)
        if printed >= 3:
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before the kill (seed {seed})"
    history = killed / "history.h5"
    # the checkpoint file holds the start only: no second copy of the ensemble per iteration
    assert storage.read_state_dict(killed / "history.ckpt.h5")["iteration"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a torn last row is skipped
        d = storage.read_history_state(history)
    # row k - 1 was complete before iteration k was printed; later ones may be there too
    assert d["iteration"] >= printed - 1, f"seed {seed}"
    _run_worker(killed, n, "--run", "--resume")
    _, smoother, _ = worker.build()
    final = storage.read_state(history, smoother)
    assert final.iteration == n
    assert torch.equal(final.parameters, reference.parameters), f"seed {seed}"
    assert torch.equal(final.rng_state, reference.state.rng_state)
    assert final.schedule == reference.state.schedule
    end = storage.read_checkpoint(killed / "history.ckpt.h5", smoother)  # written at the end
    assert end.iteration == n and torch.equal(end.parameters, reference.parameters)
    with storage.open(history) as ds, storage.open(tmp_path / "ref" / "history.h5") as ref:
        assert ds.iteration.values.tolist() == list(range(n + 1))  # no duplicates
        for name in ("parameters", "predictions", "stored", "alpha", "misfit", "n_failed",
                     "rng_state", "schedule_state", "state_checksum"):
            assert np.array_equal(ds[name].values, ref[name].values,
                                  equal_nan=name != "schedule_state"), name
        assert ds.attrs["complete"] == 1


def _straight(n, store=None, **kw):
    return enkal.run(_smoother(), _model(), _prior(), max_iterations=n, store=store, **kw)


def _corrupt_row(path, row, name="parameters"):
    """Overwrite 8 bytes in the middle of ``name``'s chunk of ``row`` (bit rot)."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((row,) + (0,) * (f[name].ndim - 1))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        old = fh.read(8)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0xFF for b in old))


@pytest.mark.parametrize("damage", ["bit_rot", "rows_of_different_lengths",
                                    "predictions_of_the_previous_row_missing"])
def test_torn_or_corrupt_last_row_falls_back_to_the_previous_state(tmp_path, damage):
    path = tmp_path / "h.h5"
    policy = storage.History(predictions=True)
    _straight(5, path, history=policy)
    _straight(7, tmp_path / "ref.h5", history=policy)
    if damage == "bit_rot":
        _corrupt_row(path, 5)
    elif damage == "rows_of_different_lengths":  # only some headers of the last append
        with h5py.File(path, "r+") as f:
            for name in ("rng_state", "schedule_state", "iteration"):
                f[name].resize(5, axis=0)
    else:  # append 5 torn after row 4's "has predictions" flag, before their chunk
        with h5py.File(path, "r+") as f:
            for name in storage._unlimited(f):
                f[name].resize(5, axis=0)
            f["predictions"][4] = np.nan
            assert f["stored"][4] == 1 | 2 | 4
    with pytest.warns(RuntimeWarning, match="h.h5: skipped unusable state rows") \
            if damage == "bit_rot" else warnings.catch_warnings():
        d = storage.read_history_state(path)
    assert d["iteration"] == 4
    # resuming recomputes iteration 5 (and on), bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        resumed = enkal.run(_smoother(), _model(), resume=path, max_iterations=7, history=policy)
    assert torch.equal(resumed.parameters, _straight(7).parameters)
    with storage.open(path) as ds, storage.open(tmp_path / "ref.h5") as ref:
        assert ds.iteration.values.tolist() == list(range(8))
        for name in ("parameters", "predictions", "stored", "alpha", "misfit",
                     "rng_state", "state_checksum"):  # every row, diagnostics included
            assert np.array_equal(ds[name].values, ref[name].values, equal_nan=True), name


def test_no_usable_state_row_is_a_clear_error(tmp_path):
    path = tmp_path / "h.h5"
    _straight(1, path, history=storage.History(every=None))  # one state row: the last
    _corrupt_row(path, 1)
    with pytest.raises(StorageError, match=r"h.h5: no complete smoother state.*checksum"):
        storage.read_history_state(path)
    old = tmp_path / "old.h5"  # rows without generator states (an older enkal's file)
    w = _writer(old, _smoother(), _model())
    w.append(0, _prior())
    with pytest.raises(StorageError, match="old.h5: holds no smoother state"):
        storage.read_state(old, _smoother())
    with pytest.raises(StorageError, match="old.h5: holds no smoother state"):
        enkal.run(_smoother(), _model(), resume=old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [False, True])
def test_state_variables_round_trip(tmp_path, dtype, with_mask):
    smoother, model = _smoother(), _model()
    mask = torch.tensor([True, False]) if with_mask else None
    state = smoother.init(_prior().to(dtype), mask=mask)
    path = tmp_path / "h.h5"
    w = _writer(path, smoother, model)
    state = _loop(w, smoother, model, state, 2)
    with storage.open(path) as ds:
        assert ds.stored.values.tolist() == [1 | 4 | (8 if with_mask else 0)] * 3
        assert ds.rng_state.dtype == np.uint8 and ds.sizes["rng_byte"] == 5056
        assert np.array_equal(ds.rng_state.values[-1], state.rng_state.numpy())
        assert ds.rng_state.attrs["device_type"] == "cpu"
        sched = json.loads(ds.schedule_state.values[-1])
        assert sched == {"type": "AnnealingState", **dataclasses_asdict(state.schedule)}
        assert ds.attrs["parameters_dtype"] == str(dtype).removeprefix("torch.")
        assert ("state_mask" in ds) == with_mask
        if with_mask:
            assert ds.state_mask.dtype == np.int8
            assert ds.state_mask.values.tolist() == [[1, 0]] * 3
        assert ds.state_checksum.dtype == np.uint64
    for k in range(3):
        d = storage.read_history_state(path, iteration=k)
        assert d["iteration"] == k and d["parameters"].dtype == dtype
    back = storage.read_state(path, smoother)
    assert back.iteration == 2 and back.parameters.dtype == dtype
    assert torch.equal(back.parameters, state.parameters)
    assert torch.equal(back.rng_state, state.rng_state) and back.schedule == state.schedule
    assert (back.mask is None) == (mask is None)
    if with_mask:
        assert torch.equal(back.mask, mask)
    # the same as a checkpoint of that state
    ckpt = storage.read_checkpoint(storage.write_checkpoint(tmp_path / "c.h5", smoother, state),
                                   smoother)
    assert torch.equal(ckpt.parameters, back.parameters) and ckpt.schedule == back.schedule


def dataclasses_asdict(obj):
    import dataclasses

    return dataclasses.asdict(obj)


def test_state_rows_validation(tmp_path):
    smoother, model = _smoother(), _model()
    w = _writer(tmp_path / "h.h5", smoother, model)
    state = smoother.init(_prior())
    x = state.parameters
    with pytest.raises(ValueError, match="give both"):
        w.append(0, x, rng_state=state.rng_state)
    with pytest.raises(ValueError, match="rng_state: expected a 1-D uint8"):
        w.append(0, x, rng_state=state.rng_state.long(), schedule=state.schedule)
    # any JSON values in the fields (the component checks them); a "type" is required
    with pytest.raises(ValueError, match="schedule: is not a schedule state"):
        w.append(0, x, rng_state=state.rng_state, schedule={"rho": 1.0})
    with pytest.raises(ValueError, match="schedule: nests deeper than 32"):
        w.append(0, x, rng_state=state.rng_state, schedule={"type": "AnnealingState",
                                                            "rho": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})
    with pytest.raises(ValueError, match="adapt: only with rng_state and schedule"):
        w.append(0, x, adapt={"type": "S"})
    with pytest.raises(ValueError, match="schedule: expected finite"):
        w.append(0, x, rng_state=state.rng_state, schedule={"type": "AnnealingState",
                                                            "rho": float("nan")})
    with pytest.raises(TypeError, match="schedule: expected a schedule state"):
        w.append(0, x, rng_state=state.rng_state, schedule=3)
    w.append(0, x, rng_state=state.rng_state, schedule=state.schedule)
    with pytest.raises(ValueError, match="expected 5056 bytes"):
        w.append(1, x, rng_state=torch.zeros(16, dtype=torch.uint8), schedule=state.schedule)


@dataclasses.dataclass(frozen=True)
class _CountingState:
    """An adaptation state of the kind a user's strategy keeps: numbers and a tensor."""

    n: int
    scores: torch.Tensor
    label: str = "mi"


def _adapt_state():
    return _CountingState(3, torch.tensor([0.25, -1.5], dtype=torch.float64))


def test_adapt_state_round_trips_in_a_checkpoint(tmp_path):
    smoother = _smoother()
    plain = smoother.init(_prior())
    state = dataclasses.replace(plain, adapt=_adapt_state())
    d = storage.read_state_dict(storage.write_checkpoint(tmp_path / "c.h5", smoother, state))
    assert d["adapt"] == encode_state(_adapt_state())
    back = decode_state(d["adapt"], _CountingState, what="adapt")
    assert back.n == 3 and back.label == "mi" and torch.equal(back.scores, _adapt_state().scores)
    # without one: no attribute, and the dict says None
    path = storage.write_checkpoint(tmp_path / "p.h5", smoother, plain)
    with h5py.File(path) as f:
        assert "adapt" not in f.attrs
    assert storage.read_state_dict(path)["adapt"] is None


def test_adapt_state_round_trips_in_history_rows(tmp_path):
    """``adapt_state`` appears with the first row that has an adaptation state; rows
    without one (before and after it) read ``adapt`` None and keep their checksums."""
    smoother, model = _smoother(), _model()
    path = tmp_path / "h.h5"
    w = _writer(path, smoother, model)
    state = smoother.init(_prior())
    w.start(state)
    assert not _has_variable(path, "adapt_state")
    checksum_0 = _variable(path, "state_checksum")[0]
    y, ok = enkal.evaluate(model, model.layout.to_physical(state.parameters))
    state, info = smoother.step(state, y, ok=ok)
    w.record(dataclasses.replace(state, adapt=_adapt_state()), info, predictions=y)
    y, ok = enkal.evaluate(model, model.layout.to_physical(state.parameters))
    state, info = smoother.step(state, y, ok=ok)
    w.record(state, info, predictions=y, final=True)
    w.close()
    assert _variable(path, "state_checksum")[0] == checksum_0
    assert [v.decode() for v in _variable(path, "adapt_state")] == [
        "", json.dumps(encode_state(_adapt_state())), ""]
    rows = [storage.read_history_state(path, iteration=k) for k in range(3)]
    assert [r["adapt"] for r in rows] == [None, encode_state(_adapt_state()), None]
    # the checksum covers the adaptation state: a changed one is not trusted
    with h5py.File(path, "r+") as f:
        f["adapt_state"][1] = json.dumps({"type": "_CountingState", "n": 4})
    with pytest.warns(RuntimeWarning, match="row 1 .*checksum mismatch"):
        assert storage.read_history_state(path, max_iteration=1)["iteration"] == 0


def test_schedule_states_hold_any_json_values(tmp_path):
    """A schedule state's fields may be strings, null, lists, objects (a tensor's
    encoding): the writer stores them, the readers return them as written."""
    smoother, model = _smoother(), _model()
    state = smoother.init(_prior())
    sched = {"type": "MyState", "name": "warm", "none": None, "steps": [1, 2.5],
             "scale": encode_state(_CountingState(1, torch.ones(2)))["scores"]}
    path = tmp_path / "h.h5"
    w = _writer(path, smoother, model)
    w.append(0, state.parameters, rng_state=state.rng_state, schedule=sched)
    assert storage.read_history_state(path)["schedule"] == sched
    smoother.state_dict = lambda s: {**enkal.EnsembleSmoother.state_dict(smoother, s),
                                     "schedule": sched}
    d = storage.read_state_dict(storage.write_checkpoint(tmp_path / "c.h5", smoother, state))
    assert d["schedule"] == sched
    # a state read from a file must fit the types its class declares
    bad = tmp_path / "bad.h5"
    w = _writer(bad, smoother, model)
    w.append(0, state.parameters, rng_state=state.rng_state,
             schedule={"type": "AnnealingState", "rho": "high", "iteration": 0})
    with pytest.raises(ValueError, match="bad.h5: history state does not fit this smoother: "
                       "state dict: schedule state field 'rho' of AnnealingState: expected float, got str"):
        storage.read_state(bad, _smoother())


def _has_variable(path, name):
    with h5py.File(path) as f:
        return name in f


def _variable(path, name):
    with h5py.File(path) as f:
        return f[name][...]


def test_resume_from_a_history_without_the_latest_ensemble(tmp_path):
    """``History(every=3, final=False)``: the rows between kept ones hold no state, so the
    default policy writes the checkpoint file after them; a resume from the checkpoint
    continues at the checkpoint, a resume from the history at its last state row."""
    policy = storage.History(every=3, final=False)
    store = tmp_path / "h.h5"
    ckpt = tmp_path / "h.ckpt.h5"
    calls = []
    real = storage.write_checkpoint

    def counting(path, smoother, state, **kw):
        calls.append(state.iteration)
        return real(path, smoother, state, **kw)

    import enkal.storage.recorder as mod  # where the run's recorder looks it up

    mod.write_checkpoint = counting
    try:
        _straight(7, store, history=policy)
    finally:
        mod.write_checkpoint = real
    assert calls == [0, 1, 2, 4, 5, 7]  # the start, the stateless rows, the end
    reference = _straight(10)
    with storage.open(store) as ds:
        assert ds.stored.values.tolist() == [5, 0, 0, 5, 0, 0, 5, 0]
    a_store = tmp_path / "a.h5"
    a_store.write_bytes(store.read_bytes())
    a_ckpt = tmp_path / "a.ckpt.h5"
    a_ckpt.write_bytes(ckpt.read_bytes())
    a = enkal.run(_smoother(), _model(), resume=a_ckpt, store=a_store, history=policy,
                        max_iterations=10)
    with pytest.warns(RuntimeWarning, match="from iteration 6, dropping and recomputing "
                                            "row 7"):  # announced
        b = enkal.run(_smoother(), _model(), resume=store, max_iterations=10)  # its policy
    assert torch.equal(a.parameters, reference.parameters)
    assert torch.equal(b.parameters, reference.parameters)
    assert a.history["iteration"] == [8, 9, 10]  # from the checkpoint at 7
    assert b.history["iteration"] == [7, 8, 9, 10]  # from the history's row 6
    for path in (a_store, store):
        with storage.open(path) as ds:
            assert ds.iteration.values.tolist() == list(range(11))
            assert ds.stored.values.tolist() == [5, 0, 0, 5, 0, 0, 5, 0, 0, 5, 0]


def test_format_of_and_read_policy(tmp_path):
    policy = storage.History(every=3, predictions=True, compression="lzf")
    _straight(4, tmp_path / "h.h5", history=policy)
    assert storage.format_of(tmp_path / "h.h5") == storage.HISTORY_FORMAT
    assert storage.format_of(tmp_path / "h.ckpt.h5") == storage.CHECKPOINT_FORMAT
    with h5py.File(tmp_path / "plain.h5", "w"):
        pass
    assert storage.format_of(tmp_path / "plain.h5") is None
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        storage.format_of(tmp_path / "nope.h5")
    assert storage.read_policy(tmp_path / "h.h5") == policy
    with pytest.raises(StorageError, match="h.ckpt.h5: not an enkal-history file"):
        storage.read_policy(tmp_path / "h.ckpt.h5")


def test_checkpoint_policies_of_run(tmp_path, monkeypatch):
    calls = []
    real = storage.write_checkpoint
    monkeypatch.setattr(storage.recorder, "write_checkpoint",  # where the recorder looks
                        lambda path, sm, st, **kw: (calls.append((Path(path).name,
                                                                  st.iteration)),
                                                    real(path, sm, st, **kw))[1])
    _straight(4, tmp_path / "d.h5")  # default: the start and the end
    assert calls == [("d.ckpt.h5", 0), ("d.ckpt.h5", 4)]
    calls.clear()
    _straight(4, tmp_path / "t.h5", checkpoint=True)  # every update, as before
    assert calls == [("t.ckpt.h5", k) for k in range(5)]
    calls.clear()
    _straight(4, tmp_path / "p.h5", checkpoint=tmp_path / "own.h5", checkpoint_every=2)
    assert calls == [("own.h5", 0), ("own.h5", 2), ("own.h5", 4)]
    calls.clear()
    _straight(4, tmp_path / "n.h5", checkpoint=False)
    assert calls == [] and not (tmp_path / "n.ckpt.h5").exists()
    back = storage.read_state(tmp_path / "n.h5", _smoother())  # the history suffices
    assert back.iteration == 4
    with pytest.raises(TypeError, match="checkpoint: expected a path"):
        _straight(1, tmp_path / "x.h5", checkpoint=3)


def test_resume_from_the_start_checkpoint_takes_the_later_history_states(tmp_path):
    """The default checkpoint file holds the start only while the run goes on; resuming
    from it with the run's history continues from the history's latest state (what
    recomputing gives, bit for bit), up to max_iterations."""
    store = tmp_path / "h.h5"
    smoother = _smoother()
    start = smoother.init(_prior())
    ckpt = storage.write_checkpoint(tmp_path / "start.h5", smoother, start)
    _straight(6, store, checkpoint=False)  # the "killed" run got to 6
    seen = []
    resumed = enkal.run(_smoother(), _model(), resume=ckpt, store=store, max_iterations=8,
                              callbacks=[lambda s, i: seen.append(s.iteration)])
    assert seen == [7, 8]  # 1..6 were taken from the history, not recomputed
    assert torch.equal(resumed.parameters, _straight(8).parameters)
    # max_iterations below the history's end: the state where recomputing would stop (the
    # rows beyond it are lost for good: refused unless allowed, then announced)
    with pytest.raises(ValueError, match=r"rows 5-8, beyond max_iterations 4"):
        enkal.run(_smoother(), _model(), resume=ckpt, store=store, max_iterations=4)
    with pytest.warns(RuntimeWarning, match=r"rows 5-8, beyond max_iterations 4"):
        short = enkal.run(_smoother(), _model(), resume=ckpt, store=store, max_iterations=4,
                          allow_changes=True)
    assert short.state.iteration == 4 and short.history == {}
    assert torch.equal(short.parameters, _straight(4).parameters)
    with storage.open(store) as ds:
        assert ds.iteration.values.tolist() == [0, 1, 2, 3, 4]
    # another configuration: no shortcut (the history's later rows are not its run's)
    other = _smoother(schedule=enkal.FixedAnnealing(factor=0.5))
    _straight(6, store, checkpoint=False)
    with pytest.warns(RuntimeWarning, match="configuration"):
        state = storage.read_state(ckpt, other, store=store)
    assert state.iteration == 0
    # a history whose row at the checkpoint's iteration is another state: no shortcut
    enkal.run(_smoother(), _model(), 2 * _prior(), max_iterations=6, store=store,
              checkpoint=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert storage.read_state(ckpt, smoother, store=store).iteration == 0


@pytest.mark.parametrize("checkpoint", [False, True])
def test_background_io_writes_the_same_file_and_copies_only_what_it_keeps(tmp_path,
                                                                          monkeypatch,
                                                                          checkpoint):
    """The writer thread gets copies of the tensors its row (and the checkpoint) writes,
    None for the others; with in-place updates reusing the buffers the file is the
    synchronous one, bit for bit."""
    given = []
    write = storage.Recorder._write

    def spy(self, state, info, predictions, final, checkpoint):
        given.append((state.iteration, state.parameters is not None, predictions is not None))
        write(self, state, info, predictions, final, checkpoint)

    policy = storage.History(every=3, predictions=True)
    kw = dict(history=policy, checkpoint=checkpoint, checkpoint_every=4, inplace=True)
    _straight(7, tmp_path / "sync.h5", **kw)
    monkeypatch.setattr(storage.Recorder, "_write", spy)
    _straight(7, tmp_path / "thread.h5", background_io=True, **kw)
    # rows 0, 3 and 6 keep the ensemble, 7 is final; a checkpoint at 4 needs the ensemble
    # (row 4 does not hold the state); the predictions of rows 0, 3, 6 come with 1, 4, 7
    kept = {3, 6, 7} | ({4} if checkpoint else set())
    assert given == [(i, i in kept, i in {1, 4, 7}) for i in range(1, 8)]
    with storage.open(tmp_path / "sync.h5") as ref, \
            storage.open(tmp_path / "thread.h5") as ds:
        for name in ("parameters", "predictions", "stored", "alpha", "misfit",
                     "rng_state", "state_checksum"):
            assert np.array_equal(ds[name].values, ref[name].values, equal_nan=True), name
    if checkpoint:
        a = storage.read_checkpoint(tmp_path / "sync.ckpt.h5", _smoother())
        b = storage.read_checkpoint(tmp_path / "thread.ckpt.h5", _smoother())
        assert a.iteration == b.iteration == 7
        assert torch.equal(a.parameters, b.parameters)
