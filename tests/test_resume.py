"""Resume only what the file recorded (issue 19): ``enkal.run(..., resume=)`` and
``enkal run --resume`` compare the run with the file before anything is written, announce
the rows a resume drops, count the whole run's forwards, and the CLI's failures are one line.

Each case reproduces a fault of issue 19 that passed silently before: a resume with other
data, noise, ensemble size, layout or strategies continued with exit 0; ``--resume
other.h5`` wrote into the configuration's default output; ``--max-iterations`` below a
finished run's rows dropped them unannounced; ``n_forwards`` counted the resumed part only;
unreachable Dask schedulers hung or created files; internal errors printed tracebacks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_cli import annealing, lorenz63, write

import enkal
from enkal import storage
from enkal.cli import main
from enkal.storage import Difference, run_differences

pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers ---------------------------------------------------------------------------------
def _model(constraint=None):
    return enkal.CallableModel(
        lambda x: torch.stack([x[:, 0] ** 2 + x[:, 1], torch.sin(x[:, 1])], 1),
        parameters=["a", ("b", (), constraint or enkal.Positive())], output_size=2)


def _smoother(*, y=(1.0, 0.5), noise_std=(0.1, 0.2), noise_cov=None, schedule=None, seed=3,
              chunk_size=None):
    obs = enkal.Observations(list(y), noise_cov=noise_cov) if noise_cov is not None else \
        enkal.Observations(list(y), noise_std=list(noise_std))
    return enkal.EnsembleSmoother(obs, rule=enkal.PerturbedObservations(),
                                  schedule=schedule or enkal.FixedAnnealing(factor=0.8),
                                  seed=seed, chunk_size=chunk_size)


def _prior(n=16):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f.attrs[k] for k in f.attrs}


def _iterations(path: Path) -> list[int]:
    with h5py.File(path, "r") as f:
        return f["iteration"][:].tolist()


@pytest.fixture
def half(tmp_path):
    """A run stopped after 3 of 6 updates (``run.h5``), and its bytes."""
    path = tmp_path / "run.h5"
    enkal.run(_smoother(), _model(), _prior(), store=path, max_iterations=3)
    return path, path.read_bytes()


# -- what a resume compares ----------------------------------------------------------------
CHANGES = {  # another run: (smoother, model, prior, store_attrs) changes, the item named
    "observations": (dict(smoother=dict(y=(1.0, 0.7))), "observations", "0.5", "0.7"),
    "noise_std": (dict(smoother=dict(noise_std=(0.1, 0.4))), "noise_std", "0.2", "0.4"),
    "full_noise": (dict(smoother=dict(noise_cov=[[0.01, 0.0], [0.0, 0.04]])), "noise",
                   "diagonal", "a full covariance"),
    "ensemble_size": (dict(prior=8), "ensemble_size", "16", "8"),
    "schedule": (dict(smoother=dict(schedule=enkal.FixedAnnealing(factor=0.5))), "schedule",
                 "FixedAnnealing(factor=0.8)", "FixedAnnealing(factor=0.5)"),
    "schedule_type": (dict(smoother=dict(schedule=enkal.ESMDA.constant(6))), "schedule",
                      "FixedAnnealing(", "ESMDA("),
    "seed": (dict(smoother=dict(seed=4)), "seed", "3", "4"),
    "chunk_size": (dict(smoother=dict(chunk_size=1)), "chunk_size", "None", "1"),
    "store_attrs": (dict(attrs={"problem_config": {"data": {"seed": 2}}}),
                    "problem_config.data.seed", "1", "2"),
}


def _changed(change: dict):
    smoother = _smoother(**change.get("smoother", {}))
    prior = _prior(change.get("prior", 16))
    return smoother, prior, change.get("attrs")


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_a_resume_of_another_run_is_refused_before_anything_is_written(case, tmp_path):
    change, name, recorded, current = CHANGES[case]
    path = tmp_path / "run.h5"
    attrs = {"problem_config": {"data": {"seed": 1}}} if "attrs" in change else None
    enkal.run(_smoother(), _model(), _prior(), store=path, max_iterations=3,
              store_attrs=attrs)
    before, ckpt_before = path.read_bytes(), (tmp_path / "run.ckpt.h5").read_bytes()
    smoother, prior, new_attrs = _changed(change)
    with pytest.raises(ValueError) as err:
        enkal.run(smoother, _model(), prior, resume=path, max_iterations=6,
                  store_attrs=new_attrs)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"resume {path}: the file was written with {name} ")
    assert recorded in message.split("; this run has")[0], message
    assert current in message.split("; this run has")[1], message
    assert "allow_changes=True / --allow-changes" in message
    assert path.read_bytes() == before  # refused before anything was written
    assert (tmp_path / "run.ckpt.h5").read_bytes() == ckpt_before
    if case == "schedule_type":  # an ESMDA cannot continue a FixedAnnealing's state
        with pytest.warns(RuntimeWarning, match=name), \
                pytest.raises(ValueError, match="does not fit this smoother"):
            enkal.run(smoother, _model(), prior, resume=path, max_iterations=6,
                      allow_changes=True, store_attrs=new_attrs)
        return
    with pytest.warns(RuntimeWarning, match=f"written with {name} .*continuing as allowed"):
        result = enkal.run(smoother, _model(), prior, resume=path, max_iterations=6,
                           allow_changes=True, store_attrs=new_attrs)
    assert result.state.iteration == 6
    assert result.parameters.shape[0] == 16  # the file's ensemble goes on
    assert _iterations(path) == list(range(7))


def test_the_message_names_every_item_that_differs(half):
    path, before = half
    smoother = _smoother(noise_std=(1.0, 1.0), seed=5)
    with pytest.raises(ValueError) as err:
        enkal.run(smoother, _model(), _prior(8), resume=path)
    assert str(err.value) == (
        f"resume {path}: the file was written with noise_std [0.1 0.2], ensemble_size 16 "
        "and seed 3; this run has noise_std [1 1], ensemble_size 8 and seed 5 (pass "
        "allow_changes=True / --allow-changes to continue anyway)")
    assert path.read_bytes() == before


@pytest.mark.parametrize("case", ["layout", "n_obs"])
def test_another_layout_or_number_of_observations_is_refused_even_when_allowed(case, half):
    path, before = half
    model, smoother = _model(), _smoother()
    if case == "layout":
        model = _model(constraint=enkal.Real())
        word = "layout b Positive; this run has layout b Real"
    else:
        smoother = _smoother(y=(1.0, 0.5, 0.2), noise_std=(0.1, 0.2, 0.3))
        model = enkal.CallableModel(lambda x: torch.cat([x, x[:, :1]], 1), parameters=2,
                                    output_size=3)
        word = "observations 2 values"
    for allow in (False, True):
        with pytest.raises(ValueError, match=f"{re.escape(word)}.*cannot continue it$"):
            enkal.run(smoother, model, resume=path, allow_changes=allow)
    assert path.read_bytes() == before


def test_a_checkpoint_resume_is_compared_with_the_history_it_continues(tmp_path):
    """A checkpoint records the configuration only; the history it continues records the
    data: both are compared, each difference named once."""
    store = tmp_path / "run.h5"
    enkal.run(_smoother(), _model(), _prior(), store=store, max_iterations=3,
              checkpoint=tmp_path / "c.h5")
    before = store.read_bytes()
    with pytest.raises(ValueError, match=rf"resume {tmp_path / 'c.h5'}: {store} was written "
                                         r"with noise_std \[0.1 0.2\] and seed 3; this run "
                                         r"has noise_std \[0.3 0.3\] and seed 1"):
        enkal.run(_smoother(noise_std=(0.3, 0.3), seed=1), _model(), resume=tmp_path / "c.h5",
                  store=store)
    assert store.read_bytes() == before
    assert run_differences(tmp_path / "c.h5", _smoother(seed=1), ensemble_size=4) == [
        Difference("ensemble_size", "16", "4"), Difference("seed", "3", "1")]


def test_a_true_resume_passes_silently_with_the_prior_given(half, recwarn):
    path, _ = half
    result = enkal.run(_smoother(), _model(), _prior(), resume=path, max_iterations=6)
    straight = enkal.run(_smoother(), _model(), _prior(), max_iterations=6)
    assert torch.equal(result.parameters, straight.parameters)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_arguments_of_a_resume(half):
    path, _ = half
    with pytest.raises(ValueError, match="exactly one of prior=, state= or resume=.*got "
                                         "prior and state"):
        enkal.run(_smoother(), _model(), _prior(), state=_smoother().init(_prior()))
    with pytest.raises(TypeError, match="allow_changes: expected a bool"):
        enkal.run(_smoother(), _model(), resume=path, allow_changes="yes")
    with pytest.raises(TypeError, match="prior: expected a torch.Tensor"):
        enkal.run(_smoother(), _model(), [[1.0, 2.0]], resume=path)


# -- rows a resume drops ----------------------------------------------------------------------
def test_dropping_rows_beyond_max_iterations_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "done.h5"
    enkal.run(_smoother(), _model(), _prior(), store=path, max_iterations=6)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"holds rows 4-6, beyond max_iterations 3; "
                                         r"continuing from iteration 3 drops them for good"):
        enkal.run(_smoother(), _model(), resume=path, max_iterations=3)
    assert path.read_bytes() == before
    with pytest.warns(RuntimeWarning, match=r"rows 4-6, beyond max_iterations 3.*as allowed"):
        result = enkal.run(_smoother(), _model(), resume=path, max_iterations=3,
                           allow_changes=True)
    assert result.state.iteration == 3 and _iterations(path) == [0, 1, 2, 3]
    # resuming a finished run with room to go drops nothing: silent
    enkal.run(_smoother(), _model(), _prior(), store=path, max_iterations=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enkal.run(_smoother(), _model(), resume=path, max_iterations=8)
    assert _iterations(path) == list(range(9))


def test_rows_recomputed_after_a_resume_are_announced(tmp_path):
    """History(every=2): rows 3 and 5 hold no state; a resume from row 4 drops row 5 and
    recomputes it (bit for bit), and says so."""
    path = tmp_path / "h.h5"
    policy = storage.History(every=2, final=False)
    enkal.run(_smoother(), _model(), _prior(), store=path, max_iterations=5, history=policy,
              checkpoint=False)
    with pytest.warns(RuntimeWarning, match=rf"resume {path}: continues from iteration 4, "
                                            r"dropping and recomputing row 5$"):
        enkal.run(_smoother(), _model(), resume=path, max_iterations=6)
    assert _iterations(path) == list(range(7))


# -- n_forwards ------------------------------------------------------------------------------
def test_n_forwards_counts_the_whole_run_across_resumes(tmp_path):
    straight, split = tmp_path / "straight.h5", tmp_path / "split.h5"
    enkal.run(_smoother(), _model(), _prior(), store=straight, max_iterations=6)
    enkal.run(_smoother(), _model(), _prior(), store=split, max_iterations=2)
    assert _attrs(split)["n_forwards"] == 2 * 16
    r = enkal.run(_smoother(), _model(), resume=split, max_iterations=4)
    assert r.n_forwards == 2 * 16  # the result: this call's
    assert _attrs(split)["n_forwards"] == 4 * 16
    enkal.run(_smoother(), _model(), resume=tmp_path / "split.ckpt.h5", store=split,
              max_iterations=6)
    assert _attrs(split)["n_forwards"] == _attrs(straight)["n_forwards"] == 6 * 16
    assert np.array_equal(_iterations(split), _iterations(straight))


# -- the command line ------------------------------------------------------------------------
def _run(*argv) -> int:
    return main(["run", *(str(a) for a in argv), "--quiet"])


def _one_line(capsys, rc, expected_rc, *words):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # (a refused run prints no banner either)
    assert rc == expected_rc, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def slow_run(tmp_path, monkeypatch):
    """``enkal run slow.toml`` (12 updates, in the config's default output ``slow.h5``),
    then ``--out other.h5 --seed 3 --max-iterations 4``; the cwd is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    cfg = annealing()
    cfg["smoother"]["max_iterations"] = 12
    config = write(tmp_path, cfg, "slow.toml")
    assert _run(config) == 0
    assert _run(config, "--out", "other.h5", "--seed", 3, "--max-iterations", 4) == 0
    return config


def test_resume_without_out_continues_the_resumed_file(slow_run, capsys):
    before = Path("slow.h5").read_bytes()
    # (without --quiet, which keeps warnings only: the first line is logged at INFO)
    assert main(["run", str(slow_run), "--resume", "other.h5", "--seed", "3"]) == 0
    assert Path("slow.h5").read_bytes() == before  # the default output: untouched
    assert _iterations(Path("other.h5")) == list(range(13))
    assert _attrs(Path("other.h5"))["seed"] == 3
    assert "20 members, 3 parameters, 15 observations -> other.h5 (resuming other.h5 at " \
           "iteration 4)" in capsys.readouterr().err
    # a checkpoint X.ckpt.h5: the history X.h5 beside it
    assert _run(slow_run, "--out", "third.h5", "--max-iterations", 2) == 0
    assert _run(slow_run, "--resume", "third.ckpt.h5") == 0
    assert _iterations(Path("third.h5")) == list(range(13))
    assert Path("slow.h5").read_bytes() == before
    capsys.readouterr()
    # ... and without one, give --out
    os.replace("third.ckpt.h5", "lonely.ckpt.h5")
    rc = _run(slow_run, "--resume", "lonely.ckpt.h5")
    _one_line(capsys, rc, 2, "--resume lonely.ckpt.h5", "no history lonely.h5", "give --out")
    assert not Path("lonely.h5").exists()


CLI_CHANGES = {  # a change of the configuration: the item the one line names
    "noise_std": (("data", "noise_std", 0.5), "noise_std [1 1 ...]"),
    "data_seed": (("data", "seed", 2), "problem_config.data.seed 1"),
    "ensemble_size": (("smoother", "ensemble_size", 10), "ensemble_size 20"),
    "schedule": (("smoother", "schedule", {"type": "FixedAnnealing", "factor": 0.5}),
                 "schedule FixedAnnealing(factor=0.9)"),
    "model": (("model", "x0", [-5.0, -5.5, 24.6]), "problem_config.model.x0"),
}


@pytest.mark.parametrize("case", sorted(CLI_CHANGES))
def test_the_cli_refuses_a_resume_of_another_run_in_one_line(case, tmp_path, capsys):
    (table, key, value), words = CLI_CHANGES[case]
    cfg = annealing()
    first = write(tmp_path, cfg, "a.toml")
    out = tmp_path / "a.h5"
    assert _run(first, "--out", out, "--max-iterations", 2) == 0
    cfg[table][key] = value
    second = write(tmp_path, cfg, "b.toml")
    before = out.read_bytes()
    capsys.readouterr()
    rc = _run(second, "--resume", out, "--max-iterations", 3)
    line = _one_line(capsys, rc, 2, f"enkal run: error: resume {out}: the file was written "
                                    "with", words, "--allow-changes")
    assert out.read_bytes() == before, line
    if case == "ensemble_size":  # the file's 20 members go on
        assert main(["run", str(second), "--resume", str(out), "--max-iterations", "3",
                     "--allow-changes"]) == 0  # not --quiet: the first line is INFO
        err = capsys.readouterr().err
        assert f"enkal run: note: resume {out}: the file was written with {words}" in err
        assert f"20 members, 3 parameters, 15 observations -> {out} (resuming {out} at " \
               "iteration 2)" in err  # what runs: the file's ensemble
        assert _iterations(out) == [0, 1, 2, 3]


def test_the_cli_refuses_to_drop_rows_and_announces_it_when_allowed(slow_run, capsys):
    before = Path("slow.h5").read_bytes()
    capsys.readouterr()
    rc = _run(slow_run, "--resume", "slow.h5", "--max-iterations", 5)
    _one_line(capsys, rc, 2, "slow.h5 holds rows 6-12, beyond max_iterations 5",
              "--allow-changes")
    assert Path("slow.h5").read_bytes() == before
    assert _run(slow_run, "--resume", "slow.h5", "--max-iterations", 5, "--allow-changes") == 0
    assert "enkal run: note: resume slow.h5: slow.h5 holds rows 6-12, beyond max_iterations " \
           "5; continuing from iteration 5 drops them for good, as allowed" in \
           capsys.readouterr().err
    assert _iterations(Path("slow.h5")) == list(range(6))
    assert _attrs(Path("slow.h5"))["n_forwards"] == 5 * 20
    assert _run(slow_run, "--resume", "slow.h5") == 0  # on to the config's 12
    assert _attrs(Path("slow.h5"))["n_forwards"] == 12 * 20
    assert _iterations(Path("slow.h5")) == list(range(13))


def test_allow_changes_needs_resume(tmp_path, capsys):
    rc = _run(write(tmp_path, lorenz63()), "--out", tmp_path / "o.h5", "--allow-changes")
    _one_line(capsys, rc, 2, "--allow-changes: only with --resume")
    assert not (tmp_path / "o.h5").exists()


# -- one line, or a traceback with --debug ----------------------------------------------------
@pytest.mark.parametrize("error, rc, words", [
    (MemoryError("cannot allocate"), 1, ["out of memory (MemoryError: cannot allocate)",
                                          "ensemble_size"]),
    (KeyError("the writer's"), 1, ["internal error: KeyError:", "--debug"]),
    (RuntimeError("bug"), 1, ["internal error: RuntimeError: bug", "--debug"]),
    (OSError(28, "No space left on device"), 1, ["OSError", "No space left"]),
])
def test_every_failure_is_one_line_and_debug_shows_the_traceback(error, rc, words, tmp_path,
                                                                 monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("enkal.cli.load_toml", fail)
    config = write(tmp_path, lorenz63())
    _one_line(capsys, main(["run", str(config), "--quiet"]), rc, *words)
    for argv in (["--debug", "run", str(config)], ["run", str(config), "--debug"]):
        with pytest.raises(type(error)):
            main(argv)


def test_debug_in_a_real_process_prints_the_traceback(tmp_path):
    cfg = lorenz63()
    cfg["smoother"]["bogus"] = 1
    config = write(tmp_path, cfg)
    for debug in ([], ["--debug"]):
        p = subprocess.run([sys.executable, "-m", "enkal.cli", *debug, "run", str(config)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == (1 if debug else 2), p.stderr
        assert ("Traceback" in p.stderr) == bool(debug), p.stderr
        assert "bogus" in p.stderr.strip().splitlines()[-1]


def test_a_damaged_hdf5_file_is_one_line_without_hdf5_diagnostics(tmp_path):
    """h5py keeps HDF5's own error stack quiet; the CLI adds one line naming the file."""
    path = tmp_path / "run.h5"
    enkal.run(_smoother(), _model(), _prior(), store=path, max_iterations=2)
    data = path.read_bytes()
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(data[: len(data) // 2])
    config = write(tmp_path, lorenz63())
    for argv in (["info", str(damaged)],
                 ["run", str(config), "--resume", str(damaged), "--out",
                  str(tmp_path / "o.h5")]):
        p = subprocess.run([sys.executable, "-m", "enkal.cli", *argv], capture_output=True,
                           text=True, timeout=120)
        lines = [x for x in p.stderr.strip().splitlines() if not x.startswith("enkal 0")]
        assert p.returncode in (1, 2) and len(lines) == 1, p.stderr
        assert "damaged.h5" in lines[0] and "HDF5-DIAG" not in p.stderr, p.stderr
    assert not (tmp_path / "o.h5").exists()


# -- Dask schedulers that cannot be reached -------------------------------------------------
def test_a_scheduler_address_that_is_none_fails_at_once(tmp_path):
    pytest.importorskip("distributed")
    config = write(tmp_path, lorenz63())
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "enkal.cli", "run", str(config), "--executor",
                        "dask", "--scheduler", "notanaddress", "--out",
                        str(tmp_path / "o.h5")], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 30  # was: one line, then 60 s in Client.__del__
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "enkal run: error: --scheduler notanaddress: Dask.address: expected a scheduler "
        "address such as 'tcp://host:8786', got 'notanaddress' (missing port number in "
        "address 'notanaddress')"]
    assert sorted(os.listdir(tmp_path)) == ["config.toml"]


def test_an_unreachable_scheduler_fails_in_seconds_before_any_file(tmp_path, capsys):
    pytest.importorskip("distributed")
    from enkal.executors import Dask

    t0 = time.monotonic()
    with pytest.raises(OSError, match="127.0.0.1:1"):
        Dask(address="tcp://127.0.0.1:1", connect_timeout=0.5).connect()
    assert time.monotonic() - t0 < 10
    with pytest.raises(ValueError, match="Dask.connect_timeout"):
        Dask(address="tcp://127.0.0.1:1", connect_timeout=0)


@pytest.mark.slow
def test_the_cli_fails_on_an_unreachable_scheduler_before_any_file(tmp_path, capsys):
    pytest.importorskip("distributed")
    config = write(tmp_path, lorenz63())
    t0 = time.monotonic()
    rc = main(["run", str(config), "--executor", "dask", "--scheduler", "tcp://127.0.0.1:1",
               "--out", str(tmp_path / "o.h5"), "--quiet"])
    assert time.monotonic() - t0 < 20  # the default connect_timeout is 5 s (was 30)
    _one_line(capsys, rc, 1, "OSError", "127.0.0.1:1")
    assert sorted(os.listdir(tmp_path)) == ["config.toml"]
