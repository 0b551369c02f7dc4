"""enkal's own exception classes (everything else raised at a boundary is a plain
``TypeError`` or ``ValueError`` naming the argument)."""

from __future__ import annotations

__all__ = ["EnkalError", "FailedMembersError", "ScheduleExhaustedError", "StorageError",
           "DiskFullError", "FileInUseError"]


class EnkalError(RuntimeError):
    """Base class of enkal's run-time errors."""


class FailedMembersError(EnkalError):
    """Too few ensemble members produced usable predictions to update the ensemble."""


class ScheduleExhaustedError(EnkalError):
    """The noise schedule has no step left (ES-MDA alphas used up, or algorithm time 1)."""


class StorageError(EnkalError, ValueError):
    """A file could not be read as an enkal file (truncated, corrupt or not enkal's)."""


class DiskFullError(EnkalError):
    """A file could not be written for lack of space (a full disk, a quota, a file-size
    limit). The row or checkpoint being written was rolled back: the file holds every
    completed row and resumes once space is freed."""


class FileInUseError(EnkalError):
    """Another process (or another run in this one) is writing the same history file."""
