"""The ``enkal`` command line (issue 4) and fuzzed configurations (issue 8).

Runs use a reduced Lorenz-63 (``problems/lorenz63.toml`` with 20 members, observations up
to t = 0.5 and two ES-MDA steps, or fixed annealing where a run must not end by itself),
mostly through ``enkal.cli.main`` in this process; a few real ``python -m enkal.cli``
processes check exit statuses, stderr and a SIGKILL in the middle of a run.

Configuration errors must exit with status 2 and one line on stderr naming the key or file,
without touching an existing output file. The fuzzing tests mutate the configuration
(delete a key, add an unknown one, put a value of another type anywhere, break
``ensemble_size``) and accept a built experiment or a ``ValueError``/``TypeError``/
``enkal.EnkalError`` with a message; anything else, a hang or a runaway allocation (capped by
``test_security.bounded``) fails. ``CI`` set: 1,000 cases for the builder.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import xarray as xr
from conftest import torch_threads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_security import Exhausted, bounded

import enkal
from enkal import storage
from enkal.cli import main
from enkal.config import load_toml
from enkal.problems import estimation
from enkal.progress import Progress

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LORENZ63 = ROOT / "problems" / "lorenz63.toml"
NAMES = ["sigma", "rho", "beta"]
ALLOWED = (ValueError, TypeError, enkal.EnkalError)


# -- helpers -------------------------------------------------------------------------------
def lorenz63(*, ensemble_size: int = 20, schedule=None) -> dict:
    """The Lorenz-63 problem, reduced: a few members, observations up to t = 0.5."""
    cfg = load_toml(LORENZ63)
    cfg["model"]["t_obs"] = {"start": 0.1, "stop": 0.5, "step": 0.1}
    cfg["smoother"]["ensemble_size"] = ensemble_size
    cfg["smoother"]["schedule"] = schedule or {"type": "ESMDA", "alphas": [2.0, 2.0]}
    return cfg


def annealing() -> dict:
    """Fixed annealing never ends by itself: runs stop at --max-iterations."""
    return lorenz63(schedule={"type": "FixedAnnealing", "factor": 0.9})


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, str):  # a JSON string is a TOML basic string, but for DEL
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}"
                               for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {type(v).__name__}")


def dump_toml(cfg: dict) -> str:
    """A tiny TOML writer for these tests (no tomli_w): one ``key = value`` line per top-level
    key, tables inline, keys always quoted."""
    return "".join(f"{_toml_value(str(k))} = {_toml_value(v)}\n" for k, v in cfg.items())


def write(directory: Path, cfg: dict, name: str = "config.toml") -> Path:
    path = directory / name
    path.write_text(dump_toml(cfg), encoding="utf-8")
    return path


def run_quiet(*argv) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured (for module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def final_parameters(path: Path) -> np.ndarray:
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.parameters.isel(iteration=-1).values


def test_toml_writer_round_trips():
    cfg = {**lorenz63(), "extra": {"s": 'q"\\\x7f\n\tω', "f": [1e300, -0.0, 5e-324],
                                   "n": [float("inf"), -float("inf")], "b": [True, 2**70],
                                   "": {"nested": [{"a": []}]}}}
    assert tomllib.loads(dump_toml(cfg)) == cfg
    assert math.isnan(tomllib.loads(dump_toml({"x": float("nan")}))["x"])


# -- enkal run / info / plot -------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of the reduced Lorenz-63: seed 3 twice, seed 4 once."""
    d = tmp_path_factory.mktemp("runs")
    cfg = write(d, lorenz63(), "l63.toml")
    out = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        rc, stdout, stderr = run_quiet("run", cfg, "--out", d / f"{name}.h5", "--seed", seed,
                                       "--max-iterations", 2, "--quiet")
        assert rc == 0, stderr
        out[name] = (d / f"{name}.h5", stdout, stderr)
    return out


def test_run_writes_the_schema_and_prints_the_summary(runs):
    path, stdout, stderr = runs["a"]
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds.parameters.dims == ("iteration", "member", "parameter")
        assert ds.parameter.values.tolist() == NAMES
        assert ds.iteration.values.tolist() == [0, 1, 2]
        assert ds.sizes["member"] == 20 and ds.sizes["output"] == 15
        assert np.isfinite(ds.parameters.values).all()
        assert int(ds.attrs["seed"]) == 3 and ds.attrs["problem"] == "estimation"
    with enkal.open(path) as ds:  # and it passes enkal's own validation
        assert ds.attrs["complete"] == 1
    assert path.with_suffix(".ckpt.h5").exists()
    rows = [line.split()[0] for line in stdout.splitlines()]
    assert rows[0] == "parameter" and rows[1:4] == NAMES
    assert "2 updates" in stdout and str(path) in stdout
    assert stderr == ""  # --quiet: no progress, no first line


def test_seed_changes_the_run_and_the_same_seed_repeats_it(runs):
    a, b, c = (final_parameters(runs[k][0]) for k in "abc")
    assert np.array_equal(a, b)  # bit for bit
    assert not np.allclose(a, c)
    with xr.open_dataset(runs["a"][0], engine="h5netcdf") as da, \
            xr.open_dataset(runs["b"][0], engine="h5netcdf") as db:
        for name in ("parameters", "misfit", "alpha", "spread"):
            assert np.array_equal(da[name].values, db[name].values, equal_nan=True), name


def test_progress_prints_a_line_per_update_with_the_schedules_total(tmp_path, capsys):
    """Not a terminal: one plain line per update. The total is ES-MDA's 2 steps, not the
    configuration's max_iterations (20): the old bar counted to 20 and stopped at 2."""
    cfg = lorenz63()
    assert cfg["smoother"]["max_iterations"] == 20
    path = write(tmp_path, cfg)
    assert main(["run", str(path), "--out", str(tmp_path / "p.h5")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: plain lines
    lines = err.splitlines()
    assert lines[0].startswith(f"enkal {enkal.__version__}: lorenz63, 20 members")  # logged
    updates = [line for line in lines if line.startswith("update ")]
    assert len(updates) == 2, err
    with xr.open_dataset(tmp_path / "p.h5", engine="h5netcdf") as ds:
        mean_misfit, misfit = ds.mean_misfit.values[1:], ds.misfit.values[1:]
    for k, line in enumerate(updates, start=1):
        assert line.startswith(f"update {k}/2 [") and " failed 0" in line, line
        # the misfit of the mean prediction and the members' average, each named as it is
        assert f"misfit of mean {mean_misfit[k - 1]:.3g}, avg member {misfit[k - 1]:.3g}, " \
            in line, line


def test_quiet_prints_only_warnings_and_verbose_the_debug_lines(tmp_path, capsys):
    path = write(tmp_path, lorenz63())
    assert main(["run", str(path), "--out", str(tmp_path / "q.h5"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # no first line, no progress
    assert main(["run", str(path), "--out", str(tmp_path / "v.h5"), "-v"]) == 0
    err = capsys.readouterr().err
    debug = [line for line in err.splitlines() if " forwards in " in line]
    assert [line.split(":")[0] for line in debug] == ["update 1", "update 2"], err
    with pytest.raises(SystemExit) as exit_:  # one or the other: argparse's usage error
        main(["run", str(path), "--quiet", "-v"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_cli_and_run_progress_share_one_implementation(tmp_path, capsys, monkeypatch):
    started = []
    original = Progress.start

    def spy(self, run):
        started.append(type(self))
        original(self, run)

    monkeypatch.setattr(Progress, "start", spy)
    path = write(tmp_path, lorenz63())
    assert main(["run", str(path), "--out", str(tmp_path / "p.h5")]) == 0
    exp = estimation.plugin.build(load_toml(path))
    exp.smoother.run(exp.model, exp.prior, progress=True)
    assert started == [Progress, Progress]
    assert not hasattr(enkal.cli, "ProgressBar")
    capsys.readouterr()


def test_the_logger_is_the_clis_only_while_it_runs(tmp_path, capsys):
    """Library use: the "enkal" logger has a NullHandler only; the command line adds its
    stderr handler for the command's duration and removes it after, also on a failure."""
    logger = logging.getLogger("enkal")
    before = list(logger.handlers)
    assert [type(h) for h in before] == [logging.NullHandler]
    assert main(["info", str(tmp_path / "missing.h5")]) == 2
    assert logger.handlers == before and logger.propagate
    capsys.readouterr()


def test_info_prints_the_parameter_table(runs, capsys):
    path = runs["a"][0]
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "3 iterations, 20 members, 3 parameters" in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("parameter "))
    assert [line.split()[0] for line in lines[head + 1:head + 4]] == NAMES
    assert "truth" in lines[head]  # a twin experiment: the truth is stored
    # each truth: inside or OUTSIDE its 5-95% interval, as the row's own numbers say
    assert lines[head].split()[-2:] == ["in", "5-95%"]
    for line in lines[head + 1:head + 4]:
        q05, q95, truth, verdict = line.split()[3:7]
        assert verdict == ("inside" if float(q05) <= float(truth) <= float(q95)
                           else "OUTSIDE"), line


def test_the_summary_says_when_a_truth_is_outside(capsys):
    """The issue's case: sigma 8.64 [7.86, 9.89] against a truth of 10 is OUTSIDE."""
    rows = {"sigma": {"mean": 8.64, "std": 0.62, "q05": 7.86, "q95": 9.89},
            "rho": {"mean": 28.16, "std": 0.2, "q05": 27.83, "q95": 28.5},
            "edge": {"mean": 1.0, "std": 0.1, "q05": 0.9, "q95": 1.1}}
    enkal.cli._print_summary(rows, torch.tensor([10.0, 28.0, 1.1], dtype=torch.float64))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines] == ["5-95%", "OUTSIDE", "inside", "inside"]
    enkal.cli._print_summary(rows, None)  # no truth: no verdict
    assert "inside" not in capsys.readouterr().out


def test_python_dash_m_enkal_is_the_command(tmp_path):
    """``python -m enkal`` runs enkal.cli.main, with its exit statuses."""
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "enkal", *argv], capture_output=True,
                              text=True, timeout=120)

    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"enkal {enkal.__version__}", p
    p = run("info", str(tmp_path / "missing.h5"))
    assert p.returncode == 2 and p.stderr.startswith("enkal info: error: "), p
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = run("bogus")
    assert p.returncode == 2 and "invalid choice" in p.stderr, p


PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png(runs, tmp_path, capsys):
    png = tmp_path / "run.png"
    assert main(["plot", str(runs["a"][0]), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG
    assert not list(tmp_path.glob("*.tmp.png"))
    assert capsys.readouterr().out.strip() == f"wrote {png}"


def test_plot_defaults_to_the_file_name_and_writes_every_kind(runs, tmp_path, capsys):
    import shutil

    h5 = tmp_path / "r.h5"
    shutil.copy(runs["a"][0], h5)
    assert main(["plot", str(h5)]) == 0  # -o defaults to FILE without .h5, with .png
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG
    assert main(["plot", str(h5), "--kind", "pair", "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    capsys.readouterr()
    assert main(["plot", str(h5), "--kind", "all", "-o", str(tmp_path / "all.png")]) == 0
    out, err = capsys.readouterr()
    for kind in ("summary", "pair"):
        assert (tmp_path / f"all.{kind}.png").read_bytes()[:8] == PNG
        assert f"wrote {tmp_path / f'all.{kind}.png'}" in out
    with enkal.open(h5) as ds:
        has_predictions = "predictions" in ds
    # predictive: written when the run kept predictions, else skipped with a one-line note
    assert (tmp_path / "all.predictive.png").exists() == has_predictions
    assert ("enkal plot: note: no " in err) == (not has_predictions)
    assert not list(tmp_path.glob("*.tmp.png"))


def test_plot_predictive_without_predictions_is_one_line_saying_how(tmp_path, capsys):
    model = enkal.CallableModel(lambda x: 2 * x, parameters=["a"], output_size=1)
    smoother = enkal.EnsembleSmoother(enkal.Observations([1.0], noise_std=0.1),
                                      schedule=enkal.ESMDA.constant(2))
    prior = torch.randn(16, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h5 = tmp_path / "nopred.h5"
    enkal.run(smoother, model, prior, store=h5, predictive=False)
    rc = main(["plot", str(h5), "--kind", "predictive"])
    _assert_one_line_error(rc, capsys.readouterr().err, "nopred.h5", "no predictions stored",
                           "predictive=True")
    assert not (tmp_path / "nopred.png").exists()
    assert main(["plot", str(h5), "--kind", "all"]) == 0  # the rest is drawn
    assert (tmp_path / "nopred.summary.png").exists()
    assert not (tmp_path / "nopred.predictive.png").exists()
    capsys.readouterr()


def test_a_real_process_exits_0_and_shows_progress(tmp_path):
    cfg = write(tmp_path, lorenz63())
    out = tmp_path / "run.h5"
    p = subprocess.run([sys.executable, "-m", "enkal.cli", "run", str(cfg), "--out", str(out),
                        "--max-iterations", "2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert len([line for line in p.stderr.splitlines() if line.startswith("update ")]) == 2
    assert "sigma" in p.stdout and out.exists()


# -- configuration errors: exit 2, one line naming the key, the output untouched -----------------
def _set(dotted: str, value):
    def mutate(cfg):
        *parents, last = dotted.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[last] = value
    return mutate


def _delete(dotted: str):
    def mutate(cfg):
        *parents, last = dotted.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        del node[last]
    return mutate


PRIOR = {"prior_median": 1.0, "prior_std": 0.3}
CONFIG_ERRORS = {  # name: (mutation, what the message must name)
    "unknown_key": (_set("smoother.bogus", 1), "bogus"),
    "unknown_top_level_table": (_set("solver", {"type": "RK4"}), "solver"),
    "unknown_parameter_key": (_set("parameters.sigma.prior_mean", 8.0), "prior_mean"),
    "unknown_parameter": (_set("parameters.gamma", PRIOR), "gamma"),
    "unknown_strategy_field": (_set("smoother.rule.inflation", 1.1), "inflation"),
    "missing_key": (_delete("smoother.ensemble_size"), "ensemble_size"),
    "missing_parameter": (_delete("parameters.rho"), "rho"),
    "missing_section": (_delete("smoother"), "smoother"),
    "missing_noise": (_delete("data.noise_std"), "noise_std"),
    "missing_model_type": (_delete("model.type"), "type"),
    "ensemble_size_a_string": (_set("smoother.ensemble_size", "twenty"), "ensemble_size"),
    "ensemble_size_1": (_set("smoother.ensemble_size", 1), "ensemble_size"),
    "ensemble_size_a_float": (_set("smoother.ensemble_size", 20.0), "ensemble_size"),
    "ensemble_size_a_bool": (_set("smoother.ensemble_size", True), "ensemble_size"),
    "prior_std_negative": (_set("parameters.rho.prior_std", -1.0), "prior_std"),
    "prior_std_a_string": (_set("parameters.rho.prior_std", "wide"), "prior_std"),
    "prior_median_a_table": (_set("parameters.rho.prior_median", {"a": 1}), "prior_median"),
    "truth_a_string": (_set("parameters.rho.truth", "ten"), "truth"),
    "noise_std_a_string": (_set("data.noise_std", "loud"), "noise_std"),
    "noise_std_nan": (_set("data.noise_std", float("nan")), "noise_std"),
    "noise_std_wrong_length": (_set("data.noise_std", [1.0, 2.0]), "noise_std"),
    "data_seed_a_string": (_set("data.seed", "one"), "seed"),
    "smoother_seed_a_string": (_set("smoother.seed", "zero"), "seed"),
    "smoother_seed_a_float": (_set("smoother.seed", 1.5), "seed"),
    "max_iterations_a_string": (_set("smoother.max_iterations", "many"), "max_iterations"),
    "dt_a_string": (_set("model.solver.dt", "small"), "dt"),
    "t_obs_a_string": (_set("model.t_obs", "often"), "t_obs"),
    "t_obs_step_a_string": (_set("model.t_obs.step", "x"), "step"),
    "t_obs_stop_inf": (_set("model.t_obs.stop", float("inf")), "stop"),
    "alphas_a_string": (_set("smoother.schedule.alphas", "many"), "alphas"),
    "solver_type_a_list": (_set("model.solver.type", ["RK4"]), "solver"),
    "unknown_model_type": (_set("model.type", "Lorenz64"), "Lorenz64"),
    "unknown_rule_type": (_set("smoother.rule.type", "Kalman"), "Kalman"),
    "unknown_schedule_type": (_set("smoother.schedule.type", "Cosine"), "Cosine"),
    "unknown_solver_type": (_set("model.solver.type", "Euler"), "Euler"),
    "unknown_problem": (_set("problem", "nope"), "nope"),
}


@pytest.fixture
def existing_output(tmp_path):
    """An existing output file (and checkpoint) that a failing run must leave as they are."""
    out = tmp_path / "out.h5"
    out.write_bytes(b"an earlier result, not to be damaged\n" * 10)
    return out


def _assert_one_line_error(rc, err, *words):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_exit_2_with_one_line_naming_the_key(case, tmp_path, existing_output,
                                                           capsys):
    mutate, word = CONFIG_ERRORS[case]
    cfg = lorenz63()
    mutate(cfg)
    path = write(tmp_path, cfg)
    before = existing_output.read_bytes()
    with bounded(20.0):
        rc = main(["run", str(path), "--out", str(existing_output), "--quiet"])
    _assert_one_line_error(rc, capsys.readouterr().err, word)
    assert existing_output.read_bytes() == before
    assert not existing_output.with_suffix(".ckpt.h5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "out.h5"]


def _unreadable(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.toml"
    if kind == "invalid_syntax":
        path.write_text(dump_toml(lorenz63()) + "[smoother\nensemble_size = \n")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    return path  # "missing": not created


@pytest.mark.parametrize("kind", ["invalid_syntax", "missing", "binary", "empty",
                                  "directory"])
def test_unreadable_configs_exit_2_with_one_line(kind, tmp_path, existing_output, capsys):
    path = _unreadable(kind, tmp_path)
    before = existing_output.read_bytes()
    rc = main(["run", str(path), "--out", str(existing_output), "--quiet"])
    words = ["model", "parameters", "smoother"] if kind == "empty" else [path.name]
    _assert_one_line_error(rc, capsys.readouterr().err, *words)
    assert existing_output.read_bytes() == before
    assert not existing_output.with_suffix(".ckpt.h5").exists()
    fresh = tmp_path / "fresh.h5"  # and no output is created
    assert main(["run", str(path), "--out", str(fresh), "--quiet"]) == 2
    assert not fresh.exists() and not fresh.with_suffix(".ckpt.h5").exists()
    capsys.readouterr()


def test_a_real_process_reports_config_errors_in_one_line(tmp_path, existing_output):
    cfg = lorenz63()
    cfg["smoother"]["bogus"] = 1
    path = write(tmp_path, cfg)
    before = existing_output.read_bytes()
    p = subprocess.run([sys.executable, "-m", "enkal.cli", "run", str(path), "--out",
                        str(existing_output)], capture_output=True, text=True, timeout=120)
    _assert_one_line_error(p.returncode, p.stderr, "bogus", "[smoother]")
    assert p.stdout == ""
    assert existing_output.read_bytes() == before


USAGE_ERRORS = {  # extra arguments after `run CONFIG --out OUT`: what the message names
    "workers_without_dask": (["--workers", "2"], "--workers"),
    "scheduler_without_dask": (["--scheduler", "tcp://localhost:1"], "--scheduler"),
    "max_iterations_0": (["--max-iterations", "0"], "--max-iterations"),
    "resume_missing": (["--resume", "missing.ckpt.h5"], "missing.ckpt.h5"),
    "device_meta": (["--device", "meta"], "--device"),
    "device_unknown": (["--device", "abacus"], "abacus"),
    "max_iterations_negative": (["--max-iterations", "-3"], "--max-iterations"),
    "workers_0": (["--executor", "dask", "--workers", "0"], "--workers"),
    "seed_negative": (["--seed", "-1"], "seed"),
    "seed_huge": (["--seed", str(2**70)], "seed"),
}


@pytest.mark.parametrize("argv, option", [
    (["--seed", "x"], "--seed"), (["--max-iterations", "1.5"], "--max-iterations"),
    (["--executor", "bogus"], "--executor"), (["--workers", "two"], "--workers"),
    (["--bogus"], "--bogus")])
def test_malformed_options_exit_2_naming_the_option(argv, option, tmp_path, capsys):
    """What argparse refuses: exit 2 and the option named (every option of ``enkal run``
    is in this table or in USAGE_ERRORS)."""
    cfg = write(tmp_path, lorenz63())
    with pytest.raises(SystemExit) as exc:
        main(["run", str(cfg), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_exit_2(case, tmp_path, existing_output, capsys):
    extra, word = USAGE_ERRORS[case]
    cfg = write(tmp_path, lorenz63())
    before = existing_output.read_bytes()
    rc = main(["run", str(cfg), "--out", str(existing_output), "--quiet", *extra])
    _assert_one_line_error(rc, capsys.readouterr().err, word)
    assert existing_output.read_bytes() == before


def test_bad_paths_on_the_command_line(tmp_path, capsys):
    cfg = write(tmp_path, lorenz63())
    text = cfg.read_text()
    cases = [
        (["run", str(cfg), "--out", str(tmp_path / "no" / "out.h5")], str(tmp_path / "no")),
        (["run", str(cfg), "--out", str(cfg)], cfg.name),  # never overwrite the config
        (["run", str(cfg), "--out", str(tmp_path)], tmp_path.name),
        (["info", str(tmp_path / "missing.h5")], "missing.h5"),
        (["info", str(cfg)], cfg.name),
        (["plot", str(cfg), "-o", str(tmp_path / "p.png")], cfg.name),
        (["plot", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "no" / "p.png")],
         str(tmp_path / "no" / "p.png")),
    ]
    for argv, word in cases:
        rc = main(argv)
        _assert_one_line_error(rc, capsys.readouterr().err, word)
    assert cfg.read_text() == text
    with pytest.raises(SystemExit) as exc:  # argparse: not one of the choices
        main(["run", str(cfg), "--executor", "threads"])
    assert exc.value.code == 2
    capsys.readouterr()


def test_executor_inprocess(tmp_path, capsys):
    cfg = write(tmp_path, lorenz63())
    out = tmp_path / "run.h5"
    assert main(["run", str(cfg), "--out", str(out), "--executor", "inprocess",
                 "--max-iterations", "1", "--quiet"]) == 0
    with enkal.open(out) as ds:
        assert ds.iteration.values.tolist() == [0, 1]
    capsys.readouterr()


# -- resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["checkpoint", "history"])
def test_resume_continues_bit_for_bit(tmp_path, capsys, source):
    cfg = write(tmp_path, annealing())
    straight, split = tmp_path / "straight.h5", tmp_path / "split.h5"
    common = ["--quiet", "--seed", "5"]
    assert main(["run", str(cfg), "--out", str(straight), "--max-iterations", "4", *common]) == 0
    assert main(["run", str(cfg), "--out", str(split), "--max-iterations", "2", *common]) == 0
    with enkal.open(split) as ds:
        assert ds.iteration.values.tolist() == [0, 1, 2]
    resume = tmp_path / "split.ckpt.h5" if source == "checkpoint" else split
    assert main(["run", str(cfg), "--resume", str(resume), "--out",
                 str(split), "--max-iterations", "4", *common]) == 0
    assert np.array_equal(final_parameters(split), final_parameters(straight))
    with enkal.open(split) as a, enkal.open(straight) as b:
        assert a.iteration.values.tolist() == [0, 1, 2, 3, 4]
        for name in ("parameters", "alpha", "misfit", "spread", "n_failed"):
            assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name
    capsys.readouterr()


def _rows(path: Path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f["iteration"].shape[0])
    except (OSError, KeyError, ValueError, RuntimeError):  # not there yet, or mid-append
        return 0


def test_resume_after_sigkill_is_bit_for_bit(tmp_path, capsys):
    """Kill ``enkal run`` once its file has >= 2 updates, at a random moment (between or
    inside appends and checkpoints), resume it: the result is the uninterrupted run's."""
    cfg = write(tmp_path, annealing())
    killed, reference = tmp_path / "killed.h5", tmp_path / "reference.h5"
    # the child runs "forever" (so it is surely still running when killed) on one thread
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "enkal.cli", "run", str(cfg), "--out",
                             str(killed), "--max-iterations", "100000", "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seed = int.from_bytes(os.urandom(4), "little")
    try:
        deadline = time.monotonic() + 90
        while _rows(killed) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no second update within 90 s"
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    ckpt = tmp_path / "killed.ckpt.h5"
    done = storage.read_state_dict(ckpt)["iteration"]  # the history has it, or one more
    n = max(8, done + 4)  # the resumed run has updates left to do
    with torch_threads(1):
        assert main(["run", str(cfg), "--out", str(reference), "--max-iterations", str(n),
                     "--quiet"]) == 0
        # the killed run was headed for 100000: --allow-changes lets the resume drop the
        # rows it may hold beyond n (refused without it)
        assert main(["run", str(cfg), "--resume", str(ckpt), "--out", str(killed),
                     "--max-iterations", str(n), "--quiet", "--allow-changes"]) == 0
    assert np.array_equal(final_parameters(killed), final_parameters(reference)), \
        f"seed {seed}, killed after update {done}"
    with enkal.open(killed) as a, enkal.open(reference) as b:
        assert a.iteration.values.tolist() == list(range(n + 1))  # no row twice
        for name in ("parameters", "alpha", "misfit"):
            assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name
        assert a.attrs["complete"] == 1
    capsys.readouterr()


# -- every shipped configuration builds ---------------------------------------------------
#: the smoother's configurations (tests/test_filter_config.py runs the filtering ones)
ESTIMATION_CONFIGS = sorted(p for p in ROOT.glob("problems/*.toml")
                            if load_toml(p).get("problem", "estimation") == "estimation")


@pytest.mark.parametrize("path", ESTIMATION_CONFIGS, ids=lambda p: p.name)
def test_every_problem_config_builds_and_evaluates(path):
    cfg = load_toml(path)
    if "summary" in cfg:  # fewer replicate paths: this checks the file, not the statistics
        cfg["summary"]["replicates"] = min(cfg["summary"].get("replicates", 100), 8)
    exp = estimation.build(cfg)
    n_ens, n_par = exp.prior.shape
    assert n_ens == cfg["smoother"]["ensemble_size"]
    assert n_par == exp.model.layout.size and exp.observations.size == exp.model.output_size
    y, ok = enkal.evaluate(exp.model, exp.model.layout.to_physical(exp.prior[:2]))
    assert y.shape == (2, exp.observations.size) and bool(ok.all())
    assert torch.isfinite(y).all()


# -- fuzzing configurations ----------------------------------------------------------------
BASE = lorenz63(ensemble_size=5)
FLOATS = [0.0, -0.0, -1.0, -1e300, 1e300, 1e-300, 5e-324, float("nan"), float("inf"),
          -float("inf"), 1.5, 2.0**64]
INTS = [0, 1, -1, -5, 2, 7, 2**31, 2**63 - 1, 2**70, -(2**70)]
scalars = st.one_of(
    st.sampled_from(FLOATS), st.sampled_from(INTS), st.booleans(),
    st.sampled_from(["", "x", "auto", "Lorenz63", "RK4", "ESMDA", "nan"]),
    st.floats(), st.integers(-10, 100), st.text(max_size=8),
)
#: mostly a scalar of another type, sometimes a list or a (nested) table
values = st.one_of(scalars, scalars, st.lists(scalars, max_size=4),
                   st.recursive(scalars, lambda inner: st.one_of(
                       st.lists(inner, max_size=3),
                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=6))
keys = st.one_of(st.sampled_from(["bogus", "Type", "ensemble-size", "", "ω", "__class__",
                                  "type", "seed", "values", "truth"]), st.text(max_size=6))


def _paths(node, prefix=()):
    """Every key/index path into the configuration, tables and leaves."""
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _node(cfg, path):
    for k in path:
        cfg = cfg[k]
    return cfg


@st.composite
def mutated_configs(draw, base=BASE):
    cfg = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "add", "replace", "replace", "ensemble_size"]))
        paths = list(_paths(cfg))
        if op == "delete" and paths:
            path = draw(st.sampled_from(paths))
            del _node(cfg, path[:-1])[path[-1]]
        elif op == "add":
            tables = [()] + [p for p in paths if isinstance(_node(cfg, p), dict)]
            _node(cfg, draw(st.sampled_from(tables)))[draw(keys)] = draw(values)
        elif op == "replace" and paths:
            path = draw(st.sampled_from(paths))
            _node(cfg, path[:-1])[path[-1]] = draw(values)
        elif op == "ensemble_size" and isinstance(cfg.get("smoother"), dict):
            cfg["smoother"]["ensemble_size"] = draw(st.sampled_from(
                [0, 1, -5, 1.5, 2, 3, True, "5", [5], 2**70, 10**12]))
    return cfg


def build_or_error(cfg):
    """``estimation.build(cfg)`` under time and memory caps: the experiment, or the allowed
    error (anything else is raised)."""
    try:
        with bounded(5.0, 1 << 30):
            return estimation.build(cfg)
    except Exhausted:
        raise AssertionError(f"build hangs on {cfg!r}") from None
    except MemoryError:
        raise AssertionError(f"build allocates without bound on {cfg!r}") from None
    except ALLOWED as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        return err


FUZZ = settings(max_examples=1000 if os.environ.get("CI") else 100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@FUZZ
@given(mutated_configs())
def test_fuzzed_configs_build_or_fail_cleanly(cfg):
    build_or_error(cfg)


@settings(FUZZ, max_examples=100 if os.environ.get("CI") else 15)
@given(mutated_configs())
def test_fuzzed_configs_through_the_cli(cfg):
    """``enkal run`` on the fuzzed file: exit 0 (a valid history), or 2 (1 for a run-time
    enkal error) with one line on stderr, and an existing output file left intact by every
    configuration error."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d), cfg)
        cfg = load_toml(path)  # what the CLI will see
        problem_ok = cfg.get("problem", "estimation") == "estimation"
        built = build_or_error(cfg) if problem_ok else ValueError("problem")
        out = Path(d) / "out.h5"
        out.write_bytes(b"earlier result\n")
        try:
            with bounded(20.0, 1 << 30):
                rc, stdout, stderr = run_quiet("run", path, "--out", out, "--max-iterations",
                                               1, "--quiet")
        except Exhausted:
            raise AssertionError(f"enkal run hangs on {cfg!r}") from None
        if isinstance(built, Exception):
            if isinstance(built, enkal.EnkalError) and not isinstance(built, ValueError):
                assert rc == 1 and len(stderr.strip().splitlines()) == 1, stderr
            else:
                _assert_one_line_error(rc, stderr)
            assert out.read_bytes() == b"earlier result\n"
            assert not out.with_suffix(".ckpt.h5").exists()
        elif rc == 0:
            with enkal.open(out) as ds:
                assert ds.sizes["iteration"] == 2
        else:  # a run-time failure: the header line, then one line saying why
            assert rc in (1, 2), stderr
            assert "Traceback" not in stderr
            assert stderr.strip().splitlines()[-1].startswith("enkal run: "), stderr
            if out.read_bytes() != b"earlier result\n":  # replaced: by a valid history
                with enkal.open(out):
                    pass


@pytest.mark.parametrize("source", ["history", "checkpoint"])
def test_a_user_schedule_resumes_through_the_cli(tmp_path, capsys, monkeypatch, source):
    """A user's own schedule, registered for configs (``register_strategy``), resumes from
    the CLI bit for bit like a built-in one: its state is checkpointed from its fields."""
    from dataclasses import dataclass

    from enkal import config as config_module

    @dataclass(frozen=True)
    class ShrinkState:
        rho: float = 2.0
        iteration: int = 0

    @dataclass(frozen=True)
    class Shrink:  # rho *= factor every update; never done
        factor: float = 0.8

        def init(self):
            return ShrinkState()

        def step(self, state, *, parameters, predictions, observations):
            rho = state.rho * self.factor
            return rho * rho, ShrinkState(rho, state.iteration + 1), {"rho": rho}

        def done(self, state):
            return False

    monkeypatch.setitem(config_module.STRATEGIES, "schedule",
                        {**config_module.STRATEGIES["schedule"], "Shrink": Shrink})
    cfg = write(tmp_path, lorenz63(schedule={"type": "Shrink", "factor": 0.7}))
    straight, split = tmp_path / "straight.h5", tmp_path / "split.h5"
    common = ["--quiet", "--seed", "5"]
    assert main(["run", str(cfg), "--out", str(straight), "--max-iterations", "4", *common]) == 0
    assert main(["run", str(cfg), "--out", str(split), "--max-iterations", "2", *common]) == 0
    resume = tmp_path / "split.ckpt.h5" if source == "checkpoint" else split
    assert main(["run", str(cfg), "--resume", str(resume), "--out", str(split),
                 "--max-iterations", "4", *common]) == 0
    with enkal.open(split) as a, enkal.open(straight) as b:
        assert a.iteration.values.tolist() == [0, 1, 2, 3, 4]
        for name in ("parameters", "alpha", "schedule_rho", "rng_state"):
            assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name
        assert json.loads(str(a.schedule_state.values[-1])) == {
            "type": "ShrinkState", "rho": float(b.schedule_rho.values[-1]), "iteration": 4}
    capsys.readouterr()


def test_info_into_a_pipe_closed_early_says_nothing(tmp_path):
    """`enkal info FILE | head -1`: the reader closes the pipe; enkal ends quietly (it
    printed "BrokenPipeError" before)."""
    import subprocess
    import sys

    model = enkal.CallableModel(lambda x: 2 * x, parameters=["a"], output_size=1)
    smoother = enkal.EnsembleSmoother(enkal.Observations([1.0], noise_std=0.1),
                                      schedule=enkal.ESMDA.constant(2))
    enkal.run(smoother, model, torch.randn(16, 1, dtype=torch.float64), store=tmp_path / "p.h5")
    cmd = f"{sys.executable} -m enkal info {tmp_path / 'p.h5'} | head -c 1 >/dev/null"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True,
                          text=True, timeout=120)
    assert proc.stderr == "" and proc.returncode in (0, 141), (proc.returncode, proc.stderr)
