"""Executors: where the members' forwards run.

An executor has one method, ``evaluate(model, parameters) -> (predictions, ok)``, with the
contract of :func:`enkal.evaluate`: predictions ``(N_ens, N_obs)`` on the parameters' device
and dtype, NaN rows and ``ok = False`` for failed members, errors per failed member in the
result's ``errors`` attribute.

* :class:`InProcess` (default): in this process, in chunks of ``members_per_call`` members.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_positive_int
from .forward import ForwardModel, evaluate

__all__ = ["InProcess", "check_executor"]


@dataclass(frozen=True)
class InProcess:
    """Run forwards in this process, ``members_per_call`` members per ``forward`` call.

    ``max_abs`` marks predictions with larger entries as failed.
    """

    members_per_call: int | None = None
    max_abs: float | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.members_per_call, "InProcess.members_per_call", allow_none=True)

    def evaluate(self, model: ForwardModel, parameters: torch.Tensor):
        return evaluate(model, parameters, members_per_call=self.members_per_call,
                        max_abs=self.max_abs)


def check_executor(executor: object) -> None:
    if not callable(getattr(executor, "evaluate", None)):
        raise TypeError(
            "executor: expected InProcess(), Dask(...) or an object with "
            f"evaluate(model, parameters), got {type(executor).__name__}"
        )
