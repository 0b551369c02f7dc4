"""The ``torch.optim.Optimizer`` conventions of :class:`~enkal.nn.EnsembleKalmanOptimizer`:
``lr`` read from its one parameter group, the batch and closure of ``step``, and
``param_groups`` in its state dicts (torch's layout: the group's entries, parameters as
indices)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .tasks import _describe

LR_NAME = "param_groups[0]['lr']"


def check_lr(lr: Any, name: str) -> float:
    """``lr`` as a float, or a TypeError/ValueError naming ``name``."""
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and lr.is_floating_point():
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{name}: expected a float (the multiplier of the mean increment), "
                        f"got {type(lr).__name__}")
    value = float(lr)
    if not (math.isfinite(value) and value >= 0):  # 0 as torch's optimizers (a warm-up)
        raise ValueError(f"{name}: expected a finite number >= 0 (the multiplier of the mean "
                         f"increment; 1.0 is the plain update), got {lr!r}")
    return value


def group_lr(param_groups: list[dict[str, Any]]) -> float:
    """``param_groups[0]["lr"]``, checked (a scheduler may have set it)."""
    if len(param_groups) != 1:
        raise ValueError(f"param_groups: expected one group (the model's trainable "
                         f"parameters), got {len(param_groups)}")
    return check_lr(param_groups[0].get("lr"), LR_NAME)


def check_batch(inputs: Any, targets: Any, closure: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step`` (required: the update needs it) and its closure, checked."""
    if callable(inputs) and not isinstance(inputs, torch.Tensor):
        raise TypeError("step: got a callable as inputs; the closure is a keyword: "
                        "step(inputs, targets, closure=closure)")
    if inputs is None or targets is None:
        raise TypeError(
            "step: the ensemble Kalman update needs the minibatch: step(inputs, targets) "
            "or step(inputs=..., targets=..., closure=...); got "
            f"inputs={_describe(inputs)}, targets={_describe(targets)}. With Lightning use "
            "manual optimization (automatic_optimization = False) and call "
            "self.optimizers().step(inputs=x, targets=y)")
    if closure is not None and not callable(closure):
        raise TypeError(f"closure: expected a callable returning the loss, got "
                        f"{type(closure).__name__}")
    return inputs, targets


def saved_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``param_groups`` as torch's ``state_dict`` writes them (``params`` as indices)."""
    return [{**{k: v for k, v in g.items() if k != "params"},
             "params": list(range(len(g["params"])))} for g in param_groups]


def loaded_group(groups: Any, current: dict[str, Any]) -> dict[str, Any] | None:
    """The group to install from a state's ``param_groups`` (``None``: none saved, as in
    dicts written before they were added); ``current`` gives the parameters."""
    if groups is None:
        return None
    n = len(current["params"])
    if not isinstance(groups, (list, tuple)) or len(groups) != 1 \
            or not isinstance(groups[0], dict):
        raise ValueError(f"state: expected param_groups to be a list of one dict, got "
                         f"{_describe(groups)}")
    saved = groups[0]
    if len(saved.get("params", ())) != n:
        raise ValueError(f"state: param_groups[0] holds {len(saved.get('params', ()))} "
                         f"parameters, this optimizer {n}")
    try:
        check_lr(saved.get("lr"), LR_NAME)
    except (TypeError, ValueError) as err:
        raise ValueError(f"state: {err}") from None
    return {**saved, "params": current["params"]}
