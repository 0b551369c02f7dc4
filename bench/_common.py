"""Helpers shared by the benchmark scripts: the closing ``BENCH_JSON`` line and its file, and
the test accuracy of a classifier (:func:`accuracy`).

Every script in ``bench/`` ends its output with one line ``BENCH_JSON {...}`` (compact JSON,
floats rounded) so that results can be collected by grepping logs; ``--json FILE`` also
writes the record, indented, atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile

import torch

__all__ = ["environment", "emit", "rounded", "accuracy", "synchronize", "parse_device"]


def environment() -> dict:
    """Versions and threads: what a reader needs to compare two records."""
    import enkal

    return {"enkal": enkal.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine()}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timer around a CUDA call would time the launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_device(text: str) -> torch.device:
    """``--device``: a ``torch.device`` that exists here, or ``SystemExit`` naming the flag."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise SystemExit(f"--device: expected a torch device such as cpu or cuda:0 ({err})"
                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {text}: CUDA is not available on this machine")
    return device


def rounded(obj: object, digits: int = 4) -> object:
    """``obj`` with floats rounded to ``digits`` significant digits, non-finite ones ``None``."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def emit(record: dict, json_path: str | os.PathLike | None = None) -> None:
    """Print ``BENCH_JSON <record>`` (rounded, compact); write it to ``json_path`` if given."""
    if json_path:
        path = os.fspath(json_path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    print("BENCH_JSON " + json.dumps(rounded(record), separators=(",", ":")), flush=True)


@torch.no_grad()
def accuracy(net, x: torch.Tensor, y: torch.Tensor, batch: int = 2500) -> float:
    """Test accuracy of ``net`` as plain user code computes it, ``net(x).argmax(1) == y``
    in evaluation mode (BatchNorm's running statistics), in batches (the ensemble
    optimizers write their mean into ``net``); the mode is restored after."""
    correct, mode = 0, net.training
    net.eval()
    try:
        for i in range(0, x.shape[0], batch):
            correct += int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    finally:
        net.train(mode)
    return correct / x.shape[0]
