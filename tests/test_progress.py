"""Progress (``enkal.progress.Progress``) and the library's logging.

One tqdm-based sink serves ``EnsembleSmoother.run(progress=True)`` and ``enkal run``: its
total is the schedule's planned number of updates (ES-MDA's steps, not ``max_iterations``),
it draws a bar on a terminal and writes one plain line per update elsewhere, and it names
the two misfits as ``StepInfo`` defines them.
"""

from __future__ import annotations

import io
import logging
import math
import re
from dataclasses import dataclass

import pytest
import torch

import enkal
from enkal import ESMDA, CallableModel, DataMisfitController, EnsembleSmoother, FixedAnnealing
from enkal.progress import Progress
from enkal.schedule import planned_updates


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _problem(schedule, *, n: int = 16, seed: int = 0):
    model = CallableModel(lambda x: torch.cat([x, x[:, :1] * x[:, 1:]], dim=1),
                          parameters=["a", "b"], output_size=3)
    obs = enkal.Observations([0.5, -0.3, -0.15], noise_std=0.1)
    prior = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    return EnsembleSmoother(obs, schedule=schedule, seed=seed), model, prior


def _info(k: int, **kw) -> enkal.StepInfo:
    values = {"alpha": 4.0, "misfit": 5.0, "mean_misfit": 1.0, "spread": 0.1, "n_failed": 0,
              "n_resampled": 0, "done": False, **kw}
    return enkal.StepInfo(iteration=k, **values)


# -- the total ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Halving:
    """A user's schedule with the protocol's methods only (no planned_updates)."""

    def init(self):
        return None

    def step(self, state, *, parameters, predictions, observations):
        return 2.0, None, {}

    def done(self, state):
        return False


@pytest.mark.parametrize("schedule, max_iterations, expected", [
    (ESMDA.constant(4), 20, 4),              # the issue: the bar counted to 20, ES-MDA stops at 4
    (ESMDA.constant(4), 3, 3),               # a run cut short by max_iterations
    (ESMDA(alphas=(2.0, 2.0)), None, 2),
    (FixedAnnealing(), 7, 7),                # never done on its own: runs to max_iterations
    (FixedAnnealing(), None, None),
    (DataMisfitController(), 20, None),      # the data decide: no total
    (Halving(), 20, None),                   # a user's schedule needs nothing
])
def test_planned_updates(schedule, max_iterations, expected):
    assert planned_updates(schedule, max_iterations) == expected


@pytest.mark.parametrize("value", ["4", 2.5, -1, True, torch.tensor(3), math.nan])
def test_a_planned_updates_that_is_not_a_count_is_unknown(value):
    @dataclass(frozen=True)
    class Odd(Halving):
        planned_updates: object = value

    assert planned_updates(Odd(), 10) is None


def test_the_bar_counts_to_the_esmda_steps_not_max_iterations():
    smoother, model, prior = _problem(ESMDA.constant(4))
    stream = Terminal()
    bar = Progress(max_iterations=20, stream=stream)
    result = smoother.run(model, prior, max_iterations=20, sinks=[bar])
    assert result.history["iteration"] == [1, 2, 3, 4] and bar.total == 4
    text = stream.getvalue()
    assert "\r" in text and "4/4 [" in text and "/20" not in text, text
    assert text.endswith("\n") and text.count("\n") == 1  # one line, redrawn, kept at the end
    assert "<00:00" in text  # the time left (ETA): known with a total


def test_without_a_plan_the_bar_counts_with_no_total():
    smoother, model, prior = _problem(DataMisfitController())
    stream = Terminal()
    bar = Progress(max_iterations=50, stream=stream)
    result = smoother.run(model, prior, max_iterations=50, sinks=[bar])
    n = len(result.history["iteration"])
    assert bar.total is None and result.stopped_by == "schedule"
    assert re.search(rf"\b{n}update \[", stream.getvalue()), stream.getvalue()
    assert "/50" not in stream.getvalue()


def test_a_resumed_run_starts_the_bar_where_it_stands():
    smoother, model, prior = _problem(ESMDA.constant(4))
    half = smoother.run(model, prior, max_iterations=2)
    log = io.StringIO()
    smoother.run(model, state=half.state, sinks=[Progress(stream=log)])
    assert [line.split(" [")[0] for line in log.getvalue().splitlines()] == \
        ["update 3/4", "update 4/4"]


# -- plain lines off a terminal ----------------------------------------------------------------
def test_off_a_terminal_one_plain_line_per_update_with_the_misfits_named():
    smoother, model, prior = _problem(ESMDA.constant(3))
    log = io.StringIO()
    result = smoother.run(model, prior, sinks=[Progress(stream=log)])
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 3
    h = result.history
    for k, line in enumerate(lines):
        assert line.startswith(f"update {k + 1}/3 [") and "<" in line  # elapsed<remaining
        # "misfit of mean" is StepInfo.mean_misfit (the ensemble-mean prediction's misfit),
        # "avg member" StepInfo.misfit (the members' misfits averaged): the old line printed
        # mean_misfit under the name "misfit"
        assert (f"misfit of mean {h['mean_misfit'][k]:.3g}, avg member {h['misfit'][k]:.3g}, "
                f"alpha {h['alpha'][k]:.3g}, spread {h['spread'][k]:.2g}, failed 0") in line
    # by Jensen's inequality the mean prediction fits at least as well as the average member
    assert all(m <= a for m, a in zip(h["mean_misfit"], h["misfit"], strict=True))


def test_describe_does_not_swap_the_misfits():
    text = Progress.describe(_info(1, misfit=5.0, mean_misfit=1.0))
    assert text.startswith("misfit of mean 1, avg member 5,"), text


def test_run_progress_true_is_this_sink_on_stderr(capsys):
    smoother, model, prior = _problem(ESMDA.constant(4))
    result = smoother.run(model, prior, max_iterations=20, progress=True)
    err = capsys.readouterr().err  # captured: not a terminal
    assert [line.split(" [")[0] for line in err.splitlines()] == \
        [f"update {k}/4" for k in result.history["iteration"]]


def test_tty_can_be_forced_either_way():
    smoother, model, prior = _problem(ESMDA.constant(2))
    plain = Terminal()
    smoother.run(model, prior, sinks=[Progress(stream=plain, tty=False)])
    assert "\r" not in plain.getvalue() and len(plain.getvalue().splitlines()) == 2
    bar = io.StringIO()
    smoother.run(model, prior, sinks=[Progress(stream=bar, tty=True)])
    assert "\r" in bar.getvalue() and "2/2" in bar.getvalue()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_iterations": 0}, ValueError, "max_iterations"),
    ({"max_iterations": 2.5}, TypeError, "max_iterations"),
    ({"tty": "yes"}, TypeError, "tty: expected a bool"),
    ({"stream": 3}, TypeError, "stream: expected a text stream"),
])
def test_bad_arguments_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        Progress(**kwargs)


def test_the_bar_is_closed_when_the_run_fails():
    smoother, _, prior = _problem(ESMDA.constant(2))
    calls = []

    def forward(x):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return torch.cat([x, x[:, :1] * x[:, 1:]], dim=1)

    model = CallableModel(forward, parameters=["a", "b"], output_size=3)
    stream = Terminal()
    bar = Progress(stream=stream)
    with pytest.raises(KeyboardInterrupt):
        smoother.run(model, prior, sinks=[bar])
    assert bar._bar is None and stream.getvalue().endswith("\n")  # closed, line ended


# -- logging -------------------------------------------------------------------------------------
def test_the_library_logger_has_only_a_null_handler():
    logger = logging.getLogger("enkal")
    assert [type(h) for h in logger.handlers] == [logging.NullHandler]
    assert logger.propagate  # an application's logging configuration sees enkal's records


def test_debug_records_per_update_reach_an_applications_handler(caplog):
    smoother, model, prior = _problem(ESMDA.constant(2))
    with caplog.at_level(logging.DEBUG, logger="enkal"):
        smoother.run(model, prior)
    lines = [r.getMessage() for r in caplog.records if r.name == "enkal.smoother"]
    assert [line.split(":")[0] for line in lines] == ["update 1", "update 2"], lines
    assert all(" 16 forwards in " in line for line in lines)
