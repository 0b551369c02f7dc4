"""enkal.storage.Recorder: the history and checkpoint files of a run, as a sink.

A loop driven by hand (``init``/``step``, ask/tell) with a :class:`Recorder` must write the
files ``enkal.run(smoother, model, prior, store=...)`` writes, bit for bit: every variable and
attribute (but the ``created`` time), and the raw bytes of the files with that time masked.
(When the recorder moved out of the smoother's loop these tests compared it with the old
``EnsembleSmoother.run(store=...)``, which wrote the files itself; the files of 8de6c67's
``enkal run`` and of a killed-and-resumed run are compared bit for bit in the closing note of
the issue "One iteration, one place".)
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import enkal
from enkal import storage
from enkal._types import RunEnd, RunStart
from enkal.storage import History, Recorder

_TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")


def _model():
    return enkal.CallableModel(
        lambda x: torch.stack([x[:, 0] ** 2 + x[:, 1], torch.sin(x[:, 1]), x[:, 2]], 1),
        parameters=["a", ("b", (), enkal.Positive()), "c"], output_size=3)


def _smoother(adapt=None):
    obs = enkal.Observations([1.0, 0.5, 0.2], noise_std=[0.1, 0.2, 0.1])
    return enkal.EnsembleSmoother(obs, rule=enkal.PerturbedObservations(),
                                  schedule=enkal.ESMDA.constant(5), seed=3, adapt=adapt)


def _prior():
    return torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _drive(smoother, model, recorder, state, *, max_iterations=100):
    """The loop of ``run``, by hand: evaluate, step, record; close whatever happens."""
    recorder.start(RunStart(smoother, model.layout, model.output_names, state))
    n_forwards, stopped_by = 0, "max_iterations"
    try:
        while True:
            if smoother.done(state):
                stopped_by = "schedule"
                break
            if state.iteration >= max_iterations:
                break
            y, ok = enkal.evaluate(model, model.layout.to_physical(state.parameters))
            n_forwards += y.shape[0]
            state, info = smoother.step(state, y, ok=ok)
            recorder.record(state, info, y,
                            final=info.done or state.iteration >= max_iterations)
    finally:
        recorder.close(RunEnd(stopped_by=stopped_by, n_forwards=n_forwards))
    return state


def _contents(path: Path) -> dict:
    """Every group, dataset and attribute of an HDF5 file (but ``created``), exactly;
    object references (netCDF's dimension lists) by the name they point at."""
    out = {}
    with h5py.File(path, "r") as f:

        def exact(v):
            a = np.asarray(v)
            if a.dtype.kind == "O" or a.dtype.names:  # strings, references, compounds
                return [item(x) for x in a.reshape(-1).tolist()]
            return (a.dtype.str, a.shape, a.tobytes())  # bit for bit, NaN included

        def item(x):
            if isinstance(x, h5py.Reference):
                return f[x].name
            if isinstance(x, tuple):
                return tuple(item(y) for y in x)
            if isinstance(x, np.ndarray):
                return exact(x)
            return x.decode() if isinstance(x, bytes) else x

        def add(name, obj):
            attrs = {k: exact(v) for k, v in obj.attrs.items() if k != "created"}
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj.shape, obj.chunks, exact(obj[()]), attrs)
            else:
                out[name] = attrs

        add("/", f)
        f.visititems(add)
    return out


def assert_same_file(a: Path, b: Path) -> None:
    ca, cb = _contents(a), _contents(b)
    assert sorted(ca) == sorted(cb)
    for name in ca:
        assert ca[name] == cb[name], f"{a.name} != {b.name} at {name!r}"
    # and the bytes, with the creation time (same length) masked
    assert _TIME.sub(b"T" * 25, a.read_bytes()) == _TIME.sub(b"T" * 25, b.read_bytes())


CASES = {
    "default": ({}, {}),
    "sparse_with_predictions": (
        dict(history=History(every=2, predictions=True), checkpoint=True, checkpoint_every=2,
             store_attrs={"problem": "twin"}, truth=torch.tensor([1.0, 0.5, 0.0])),
        dict(history=History(every=2, predictions=True), checkpoint=True, checkpoint_every=2,
             attrs={"problem": "twin"}, truth=torch.tensor([1.0, 0.5, 0.0]))),
    "final_only_own_checkpoint": (
        dict(history=History(every=None, predictions=True), checkpoint="own.h5",
             checkpoint_every=3),
        dict(history=History(every=None, predictions=True), checkpoint="own.h5",
             checkpoint_every=3)),
    "no_checkpoint_max_iterations": (dict(checkpoint=False, max_iterations=3),
                                     dict(checkpoint=False)),
}


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_recorder_writes_the_files_of_run(case, background, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative checkpoint path lands here
    run_kw, rec_kw = CASES[case]
    smoother, model = _smoother(), _model()
    limit = run_kw.get("max_iterations", 100)
    (tmp_path / "run").mkdir()
    (tmp_path / "rec").mkdir()
    own = rec_kw.get("checkpoint")
    if isinstance(own, str):
        run_kw = {**run_kw, "checkpoint": f"run/{own}"}
        rec_kw = {**rec_kw, "checkpoint": f"rec/{own}"}
    # predictive=False: the Recorder driven by hand below gets no posterior predictive
    result = enkal.run(smoother, model, _prior(), store="run/h.h5", background_io=background,
                       predictive=False, **run_kw)
    state = _drive(smoother, model, Recorder("rec/h.h5", background=background, **rec_kw),
                   smoother.init(_prior()), max_iterations=limit)
    assert torch.equal(state.parameters, result.parameters)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert "h.h5" in names and (len(names) == 1) == (run_kw.get("checkpoint") is False)
    for name in names:
        assert_same_file(tmp_path / "run" / name, tmp_path / "rec" / name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_recorder_checkpoints_when_run_does(case, tmp_path, monkeypatch):
    """The same checkpoint writes, in the same order (the final files cannot tell)."""
    import enkal.storage.recorder as recorder_module

    monkeypatch.chdir(tmp_path)
    run_kw, rec_kw = CASES[case]
    calls = []
    real = recorder_module.write_checkpoint

    def spy(path, smoother, state, **kw):
        calls.append((Path(path).name, state.iteration, kw))
        return real(path, smoother, state, **kw)

    smoother, model = _smoother(), _model()
    monkeypatch.setattr(recorder_module, "write_checkpoint", spy)
    enkal.run(smoother, model, _prior(), store="h.h5", **run_kw)
    by_run = list(calls)
    calls.clear()
    _drive(smoother, model, Recorder("h.h5", **rec_kw), smoother.init(_prior()),
           max_iterations=run_kw.get("max_iterations", 100))
    assert calls == by_run
    assert (calls == []) == (run_kw.get("checkpoint") is False)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_background_writes_get_copies_of_what_they_keep_only(checkpoint, tmp_path,
                                                             monkeypatch):
    given = []
    write = Recorder._write

    def spy(self, state, info, predictions, final, checkpoint):
        given.append((state.iteration, state.parameters is not None, predictions is not None))
        write(self, state, info, predictions, final, checkpoint)

    monkeypatch.setattr(Recorder, "_write", spy)
    smoother = enkal.EnsembleSmoother(_smoother().observations,
                                      schedule=enkal.ESMDA.constant(7), seed=3)
    rec = Recorder(tmp_path / "h.h5", history=History(every=3, predictions=True),
                   checkpoint=checkpoint, checkpoint_every=4, background=True)
    _drive(smoother, _model(), rec, smoother.init(_prior()))
    # rows 0, 3 and 6 keep the ensemble, 7 is final; a checkpoint at 4 needs the ensemble
    # (row 4 does not hold the state); the predictions of rows 0, 3, 6 come with 1, 4, 7
    kept = {3, 6, 7} | ({4} if checkpoint else set())
    assert given == [(i, i in kept, i in {1, 4, 7}) for i in range(1, 8)]


@pytest.mark.parametrize("background", [False, True])
def test_recorder_with_masks_from_structure_adaptation(background, tmp_path):
    """Pruning changes the mask as the run goes: ``mask`` and ``state_mask`` as run's."""
    smoother = _smoother(adapt=enkal.StructureAdaptation(every=2, fraction=0.34))
    model = _model()
    policy = History(every=2, predictions=True)
    enkal.run(smoother, model, _prior(), store=tmp_path / "run.h5", history=policy,
              background_io=background, predictive=False)  # (as the Recorder below)
    _drive(smoother, model, Recorder(tmp_path / "rec.h5", history=policy,
                                     background=background), smoother.init(_prior()))
    with h5py.File(tmp_path / "rec.h5") as f:
        assert "state_mask" in f and f["mask"][...].tolist() != [1, 1, 1]
    assert_same_file(tmp_path / "run.h5", tmp_path / "rec.h5")
    assert_same_file(tmp_path / "run.ckpt.h5", tmp_path / "rec.ckpt.h5")


@pytest.mark.parametrize("policy", [None, History(every=2)])
def test_recorder_continues_a_history_as_run_resume_does(policy, tmp_path):
    """``resume_from``: the file is continued where the state was read (its later rows
    dropped), no starting checkpoint; with ``history=None`` the file's own policy."""
    smoother, model = _smoother(), _model()
    # with a policy: the first run's last row holds no state, so it resumes from row 3
    kw = {} if policy is None else {"history": History(every=3, final=False,
                                                       predictions=True)}
    enkal.run(smoother, model, _prior(), store=tmp_path / "run.h5", max_iterations=4,
              predictive=False, **kw)
    shutil.copy(tmp_path / "run.h5", tmp_path / "rec.h5")
    shutil.copy(tmp_path / "run.ckpt.h5", tmp_path / "rec.ckpt.h5")
    # with a policy the last row holds no state: its recomputation is announced
    with (pytest.warns(RuntimeWarning, match="dropping and recomputing row 4")
          if policy is not None else contextlib.nullcontext()):
        enkal.run(smoother, model, resume=tmp_path / "run.h5", history=policy,
                  predictive=False)
    state = storage.read_state(tmp_path / "rec.h5", smoother, store=tmp_path / "rec.h5")
    assert state.iteration == (4 if policy is None else 3)
    # enkal.run counts the forwards behind the resumed state too (N_ens per update)
    before = state.parameters.shape[0] * state.iteration
    _drive(smoother, model, Recorder(tmp_path / "rec.h5", history=policy,
                                     resume_from=state.iteration, forwards_before=before),
           state)
    assert_same_file(tmp_path / "run.h5", tmp_path / "rec.h5")
    assert_same_file(tmp_path / "run.ckpt.h5", tmp_path / "rec.ckpt.h5")


def test_default_checkpoint_path():
    assert storage.default_checkpoint_path("a/run.h5") == "a/run.ckpt.h5"
    assert storage.default_checkpoint_path(Path("run")) == "run.ckpt.h5"
    assert Recorder("x/r.nc").checkpoint_path == "x/r.ckpt.nc"
    assert Recorder("r.h5", checkpoint=True).checkpoint_path == "r.ckpt.h5"
    assert Recorder("r.h5", checkpoint=Path("c.h5")).checkpoint_path == "c.h5"
    assert Recorder("r.h5", checkpoint=False).checkpoint_path is None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(path=3), TypeError, "path: expected a str or os.PathLike"),
    (dict(history="all"), TypeError, "history: expected enkal.storage.History or None"),
    (dict(history=History), TypeError, "history: expected"),
    (dict(checkpoint=3), TypeError, "checkpoint: expected a path, a bool or None"),
    (dict(checkpoint_every=0), ValueError, "checkpoint_every: expected an int >= 1"),
    (dict(checkpoint_every=1.5), TypeError, "checkpoint_every: expected an int >= 1"),
    (dict(checkpoint_every=True), TypeError, "checkpoint_every"),
    (dict(background="yes"), TypeError, "background: expected a bool"),
    (dict(attrs=[("a", 1)]), TypeError, "attrs: expected a dict of attributes or None"),
    (dict(truth="abc"), TypeError, "truth: expected a tensor or sequence"),
    (dict(resume_from=-1), ValueError, "resume_from: expected an int >= 0"),
    (dict(resume_from="3"), TypeError, "resume_from: expected an int >= 0"),
])
def test_recorder_argument_validation(kwargs, error, match, tmp_path):
    kwargs = {"path": tmp_path / "h.h5", **kwargs}
    with pytest.raises(error, match=match):
        Recorder(**kwargs)
    assert not (tmp_path / "h.h5").exists()


def test_recorder_order_of_calls_and_truth_size(tmp_path):
    smoother, model = _smoother(), _model()
    state = smoother.init(_prior())
    run = RunStart(smoother, model.layout, model.output_names, state)
    rec = Recorder(tmp_path / "h.h5", truth=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"truth: expected 3 values \(N_par\), got 2"):
        rec.start(run)
    assert not (tmp_path / "h.h5").exists()
    rec = Recorder(tmp_path / "h.h5")
    with pytest.raises(ValueError, match="record\\(\\) before start\\(\\)"):
        rec.record(state, None, None, final=False)
    rec.close(RunEnd("schedule", 0))  # nothing started: nothing to close
    rec.start(run)
    with pytest.raises(ValueError, match="start\\(\\) called twice"):
        rec.start(run)
    rec.close(RunEnd("callback", 0))
    rec.close(RunEnd("callback", 0))  # twice is harmless
    with storage.open(tmp_path / "h.h5") as ds:
        assert ds.attrs["complete"] == 1 and ds.attrs["stopped_by"] == "callback"
    # a start that fails (here: its first checkpoint) leaves the history incomplete
    rec = Recorder(tmp_path / "f.h5", checkpoint=tmp_path / "missing" / "c.h5")
    with pytest.raises(OSError):
        rec.start(run)
    rec.close(RunEnd("max_iterations", 0))
    with storage.open(tmp_path / "f.h5") as ds:
        assert ds.attrs["complete"] == 0 and "stopped_by" not in ds.attrs


def test_recorder_is_a_sink():
    from enkal._types import Sink

    assert isinstance(Recorder("h.h5"), Sink)


def test_a_checkpoint_without_a_history(tmp_path):
    """``enkal.run(..., checkpoint=path)`` without ``store``: the checkpoint file alone,
    at the start and every ``checkpoint_every`` updates; it resumes the run."""
    smoother, model = _smoother(), _model()
    ckpt = tmp_path / "only.ckpt.h5"
    straight = enkal.run(smoother, model, _prior(), max_iterations=6)
    enkal.run(smoother, model, _prior(), max_iterations=3, checkpoint=ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["only.ckpt.h5"]
    resumed = enkal.run(smoother, model, resume=ckpt, max_iterations=6)
    assert torch.equal(resumed.parameters, straight.parameters)
    with pytest.raises(ValueError, match="checkpoint: without a history path"):
        Recorder(None)
    with pytest.raises(ValueError, match="history: only with a history path"):
        Recorder(None, checkpoint=ckpt, history=History())


@pytest.mark.parametrize("attrs, error, match", [
    ({"enkal_format": "mine"}, ValueError, "'enkal_format' is an attribute the history writes"),
    ({"layout": "[]"}, ValueError, "'layout' is an attribute"),
    ({"complete": 1}, ValueError, "'complete' is an attribute"),
    ({1: 2}, TypeError, "expected non-empty str keys"),
    ({"note": object()}, TypeError, r"attrs\['note'\]: expected a number"),
])
def test_reserved_or_unwritable_attributes_are_refused(attrs, error, match, tmp_path):
    """``store_attrs={"enkal_format": ...}`` used to replace the file's own attributes, after
    which the run's own file could no longer be opened (issue #19, item 8)."""
    with pytest.raises(error, match=match):
        Recorder(tmp_path / "h.h5", attrs=attrs)
    with pytest.raises(error, match=match):
        enkal.run(_smoother(), _model(), _prior(), store=tmp_path / "h.h5", store_attrs=attrs,
                  max_iterations=1)
    assert not (tmp_path / "h.h5").exists()
