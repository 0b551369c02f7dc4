"""The recorder: a run's HDF5 history and checkpoint file, as a sink of the run."""

from __future__ import annotations

import os

__all__ = ["default_checkpoint_path"]


def default_checkpoint_path(store: str | os.PathLike) -> str:
    """``run.h5`` -> ``run.ckpt.h5``: where ``run(store=...)`` keeps its checkpoint."""
    root, ext = os.path.splitext(os.fspath(store))
    return f"{root}.ckpt{ext or '.h5'}"
