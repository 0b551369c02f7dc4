"""The ``filtering`` TOML problems: twin experiments built from a configuration file."""

from __future__ import annotations

import copy

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
