"""The ``filtering`` TOML problems: twin experiments built from a configuration file."""

from __future__ import annotations

import copy
import pathlib

import numpy as np
import pytest
import torch

from enkal.config import load_toml
from enkal.filtering import LETKF, AdaptiveInflation, run_filter
from enkal.problems import filtering
from enkal.problems.filtering import build

L63 = load_toml(filtering.__file__.replace("filtering.py", "lorenz63_filter.toml"))
L96 = load_toml(filtering.__file__.replace("filtering.py", "lorenz96_filter.toml"))


def _short(config: dict, cycles: int) -> dict:
    c = copy.deepcopy(config)
    c["twin"]["cycles"] = cycles
    c["twin"]["burn_in"] = cycles // 5
    return c


def test_the_shipped_configurations_filter_well():
    # 200 cycles after a 40-cycle spin-up: the analysis error is far below the observation
    # noise (std 1.41 and 1), and the same configuration and seed give the same numbers
    for config, bound in ((L63, 0.9), (L96, 0.4)):
        exp = build(_short(config, 200))
        res = run_filter(exp.filter, exp.filter.init(exp.initial), exp.times, exp.values)
        assert res.scores(exp.truth, burn_in=exp.burn_in)["analysis"].mean < bound
    exp = build(_short(L96, 3))
    assert isinstance(exp.filter.scheme, LETKF)
    assert isinstance(exp.filter.inflation, AdaptiveInflation)
    assert torch.equal(build(_short(L96, 3)).values, exp.values)
    assert not torch.equal(build(_short(L96, 3), seed=5).values, exp.values)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["twin"].pop("dt_obs"), r"\[twin\]: missing key\(s\) \['dt_obs'\]"),
    (lambda c: c["filter"].update(scheme={"type": "Kalman"}), r"scheme type 'Kalman'"),
    (lambda c: c["filter"].update(scheme={"type": "LETKF"}), r"\[filter\].*LETKF"),
    (lambda c: c["parameters"].pop("rho"), r"\[parameters\]: missing key\(s\) \['rho'\]"),
    (lambda c: c["model"].update(t_obs=[0.1]), r"\[model\] t_obs"),
    (lambda c: c["filter"].update(inflation={"type": "Adaptive"}), r"inflation type"),
    (lambda c: c["filter"].update(ensemble_size=1), r"ensemble_size"),
])
def test_bad_configurations_name_the_key(edit, match):
    c = _short(L63, 2)
    edit(c)
    with pytest.raises((ValueError, TypeError), match=match):
        build(c)


def _cli(*argv: str) -> int:
    from enkal.cli import main
    return main(list(argv))


def test_enkal_run_info_and_resume_a_filter(tmp_path, capsys, monkeypatch):
    # 40 cycles in one go against 25 then a resume to 40: the same rows, bit for bit
    import xarray as xr

    monkeypatch.chdir(tmp_path)
    text = pathlib.Path(filtering.__file__).with_name("lorenz63_filter.toml").read_text()
    for name, cycles in (("whole", 40), ("part", 25), ("rest", 40)):
        (tmp_path / f"{name}.toml").write_text(
            text.replace("cycles = 1000", f"cycles = {cycles}").replace(
                "burn_in = 100", "burn_in = 5"))
    assert _cli("run", "whole.toml", "--out", "whole.h5", "--quiet") == 0
    assert _cli("run", "part.toml", "--out", "part.h5", "--quiet") == 0
    assert _cli("run", "rest.toml", "--resume", "part.h5", "--quiet") == 0
    out = capsys.readouterr().out
    assert "analysis RMSE" in out and "(resumed)" in out
    with xr.open_dataset("whole.h5") as a, xr.open_dataset("part.h5") as b:
        assert a.sizes["time"] == b.sizes["time"] == 40
        for name in ("analysis_mean", "forecast_spread", "truth", "observations"):
            assert np.array_equal(a[name].values, b[name].values), name
    assert _cli("info", "part.h5") == 0
    info = capsys.readouterr().out
    assert "40 cycles" in info and "ETKF()" in info and "analysis RMSE" in info
    # refused: an existing --out without --resume, smoother-only options
    assert _cli("run", "whole.toml", "--out", "whole.h5", "--quiet") == 2
    assert _cli("run", "whole.toml", "--out", "x.h5", "--max-iterations", "3") == 2
    err = capsys.readouterr().err
    assert "--out whole.h5: exists" in err and "--max-iterations: not used" in err


def test_the_filtering_benchmark_runs(tmp_path):
    """bench/filtering.py --quick (a few hundred cycles of each configuration): the table,
    the batch timing and the JSON line."""
    import json
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(root / "bench" / "filtering.py"), "--quick",
                           "--seeds", "1", "--batch", "2", "--json", str(tmp_path / "f.json")],
                          capture_output=True, text=True, timeout=600, env=env,
                          cwd=root / "bench")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "f.json").read_text())
    rows = {r["id"]: r for r in record["rows"]}
    # even 300 cycles of the tuned ETKF on Lorenz-96 track the truth far below the noise (1)
    assert rows["L96_Sqrt_N24_i1.013_rot"]["rmse_a"] < 0.4
    assert record["batch"]["n_filters"] == 2
    assert proc.stdout.strip().splitlines()[-1].startswith("BENCH_JSON ")
