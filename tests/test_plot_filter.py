"""The figure of a filter run (enkal.plot_filter.series): what it draws, from a result, a
file and a Dataset, and nothing overlapping (the check of tests/test_plot.py)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

import enkal
from enkal.filtering import ETKF, EnsembleFilter, run_filter
from enkal.models import RK4, Lorenz96
from enkal.plot_filter import series
from enkal.problems.filtering import twin_experiment
from enkal.storage import open_filter_history

from .test_plot import _assert_nothing_overlaps

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = Lorenz96(t_obs=[0.05], n_sites=8, solver=RK4(dt=0.05))
    twin = twin_experiment(model, x0=[8.01] + [8.0] * 7, parameters=[8.0], dt_obs=0.05,
                           n_cycles=60, noise_std=1.0, initial_std=1.0, n_members=12,
                           observe=[0, 2, 4, 6], spin_up=100, seed=0)
    flt = EnsembleFilter(model, ETKF(), noise_std=1.0, observe=[0, 2, 4, 6], inflation=1.05,
                         parameters=[8.0])
    path = tmp_path_factory.mktemp("f") / "f.h5"
    result = enkal.run_filter(flt, twin.initial, twin.times, twin.values, out=path,
                              truth=twin.truth)
    return result, twin, path


@pytest.mark.parametrize("variables", [None, [3], list(range(8))])
def test_nothing_overlaps(run, variables):
    result, twin, _ = run
    fig = series(result, truth=twin.truth, variables=variables)
    assert len(fig.axes) == (6 if variables is None else len(variables)) + 1  # + the errors
    _assert_nothing_overlaps(fig)


def test_a_result_a_file_and_a_dataset_draw_the_same_lines(run):
    result, twin, path = run
    figs = [series(result, truth=twin.truth), series(path)]
    with open_filter_history(path) as ds:
        figs.append(series(ds))
    lines = [[line.get_ydata().tolist() for line in f.axes[0].lines] for f in figs]
    # the analysis mean and the truth; the file also knows observation 0 is of x[0]
    assert lines[0] == lines[1][:2] == lines[2][:2]
    np.testing.assert_array_equal(lines[1][2], twin.values[:, 0].numpy())
    np.testing.assert_array_equal(lines[1][1], twin.truth[:, 0].numpy())
    last = series(path, last=10)
    assert len(last.axes[0].lines[0].get_xdata()) == 10


def test_bad_arguments_are_named(run):
    result, twin, _ = run
    with pytest.raises(ValueError, match="variables"):
        series(result, variables=[8])
    with pytest.raises(ValueError, match="one filter"):
        batch = torch.stack([twin.initial, twin.initial])
        flt = EnsembleFilter(Lorenz96(t_obs=[0.05], n_sites=8, solver=RK4(dt=0.05)),
                             noise_std=1.0, observe=[0, 2, 4, 6], parameters=[8.0])
        two = run_filter(flt, flt.init(batch), twin.times[:3],
                         torch.stack([twin.values[:3]] * 2, 1))
        series(two)
