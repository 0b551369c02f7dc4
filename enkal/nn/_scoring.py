"""The draws behind :meth:`EnsembleKalmanOptimizer.information`: fresh ensembles around the
mean (or the carried one), run on a batch and scored against their errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._checks import check_positive_int
from .model import NeuralModel
from .tasks import Classification, Regression


def score_draws(net: NeuralModel, sample: Callable[[torch.Generator], torch.Tensor],
                task: Classification | Regression, inputs: torch.Tensor, targets: Any, *,
                draws: int, score: Callable[..., torch.Tensor] | None, seed: int,
                carried: bool) -> torch.Tensor:
    """``score(parameters, errors)`` over ``draws`` ensembles ``sample(generator)`` (one
    generator seeded with ``seed``); ``carried``: the ensemble is the optimizer's own, so
    one draw only."""
    from ..information import mutual_information

    check_positive_int(draws, "draws")
    score = mutual_information if score is None else score
    if not callable(score):
        raise TypeError(f"score: expected a callable score(parameters, errors), got "
                        f"{type(score).__name__}")
    if carried and draws != 1:
        raise ValueError(f"draws: with Carry the carried ensemble is the sample; expected "
                         f"draws=1, got {draws}")
    net._check_inputs(inputs)
    gen = torch.Generator(device=net.device).manual_seed(int(seed))
    xs, es = [], []
    for _ in range(draws):
        x = sample(gen)
        out = net.predict(x, inputs)
        y = task.targets(targets, out.shape[1], out.shape[2]).to(out.device)
        xs.append(x)
        es.append(task.predictions(out) - y.to(out.dtype))
    return score(torch.cat(xs), torch.cat(es))
