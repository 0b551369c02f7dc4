"""Changes to an existing HDF5 file that are undone whole when they fail, and the writer's lock.

Appending a row changes HDF5 metadata in place (dataset extents, chunk indexes, the
superblock's end of file) and writes the new chunks at the end of the file. A write that
fails half way (a full disk, a file-size limit, an interrupt) would leave the metadata
describing data that never reached the file: nothing could read the history any more.

:func:`transaction` opens the file through h5py's file-object driver on a :class:`Journal`,
which keeps, before every write into the file's old extent, the bytes it overwrites (in
memory, and appended to an undo log ``.NAME.journal`` beside the file, before the overwrite;
metadata writes are small), and remembers the file's old length. If anything fails -- an
``OSError`` from the disk, an exception while HDF5 flushes at close (which h5py only reports
as "unraisable"), a ``KeyboardInterrupt`` -- the old bytes are written back and the file cut
to its old length: it is again, byte for byte, the file before the change. Undoing needs no
new space (it rewrites bytes the file already holds, then shrinks it). If the process is
killed half way, the undo log stays and :func:`recover` replays it at the next open (by the
next writer, or a reader once the writer is gone): a SIGKILL in the middle of an append
costs that row and nothing else, whatever HDF5 was writing at the time. The log is removed
when the change is whole. (It is not fsync-ed: a killed process loses nothing the kernel
already has; power loss is another matter, as for every file written without fsync.)

Before each row the writer also checks the space it will need (:func:`check_space`: free
disk, quota and ``RLIMIT_FSIZE``) and stops with a :class:`~enkal.errors.DiskFullError`
without touching the file when it is short; the journal covers what such a check cannot
(another process filling the disk meanwhile).

:func:`writer_lock` is the advisory lock that keeps a second writer off a history file: a
``flock`` on a hidden ``.NAME.lock`` beside it, holding the owner's PID, released when the
writer closes or its process dies.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py

from ..errors import DiskFullError, FileInUseError

__all__ = ["Journal", "transaction", "recover", "check_space", "writer_lock",
           "deferred_interrupts", "FULL_ERRNOS"]

#: errors of a write that found no room: a full disk, a quota, a file-size limit
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


_MAGIC = b"ENKALJ1\n"
_RECORD = struct.Struct("<QQ")  # offset, length of the old bytes that follow


def journal_path(path: Path) -> Path:
    """``dir/run.h5`` -> ``dir/.run.h5.journal``: the undo log of a change in progress."""
    return path.with_name(f".{path.name}.journal")


def recover(path: Path, *, reader: bool = False) -> bool:
    """Undo the change a killed writer left half done in ``path`` (its journal exists):
    the file is then byte for byte what it was before that change. True if it did.

    A journal whose writer is still running is a change in progress: a ``reader`` leaves it
    alone (returns False); a writer gets :class:`~enkal.errors.FileInUseError`.
    """
    jp = journal_path(path)
    try:
        data = jp.read_bytes()
    except FileNotFoundError:
        return False
    head = len(_MAGIC) + 16
    if len(data) < head or not data.startswith(_MAGIC):
        jp.unlink()  # killed before its header was whole: nothing was changed yet
        return False
    size = int.from_bytes(data[len(_MAGIC):len(_MAGIC) + 8], "little")
    pid = int.from_bytes(data[len(_MAGIC) + 8:head], "little")
    if pid != os.getpid() and process_alive(pid):
        if reader:
            return False
        raise FileInUseError(f"{path}: process {pid} is writing this file right now")
    records, pos = [], head
    while pos + _RECORD.size <= len(data):
        offset, length = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if pos + length > len(data):
            break  # a record cut short: its overwrite never started
        records.append((offset, data[pos:pos + length]))
        pos += length
    with open(path, "r+b") as fh:
        for offset, old in reversed(records):
            fh.seek(offset)
            fh.write(old)
        fh.truncate(size)
        fh.flush()
        os.fsync(fh.fileno())
    jp.unlink()
    return True


class Journal(io.RawIOBase):
    """A read-write file object for h5py's ``fileobj`` driver that can undo its writes.

    Before a write overwrites bytes of the file's old extent, their old content goes to the
    undo log ``.NAME.journal`` (appended, in order, before the overwrite: a killed process
    leaves a log that :func:`recover` replays) and to memory (:meth:`rollback`).

    A write that finds no room (a full disk, a quota, a file-size limit) is not reported to
    HDF5: from then on the writes of this change go to memory instead of the file (reads
    see them), so that HDF5 finishes and closes the file cleanly -- an error inside HDF5's
    close leaves the library holding a half-closed file, which crashes it later -- and the
    caller then undoes the change (:attr:`error` holds the cause)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        recover(path)  # a change a killed writer left half done comes undone first
        self._f = open(path, "r+b", buffering=0)  # noqa: SIM115 - closed in close()
        self._fd = self._f.fileno()
        self._size = os.fstat(self._fd).st_size
        self._undo: list[tuple[int, bytes]] = []
        self._overlay: list[tuple[int, bytes]] = []  # writes held in memory after an error
        self._pos = 0
        self._log_path = journal_path(path)
        self._log: Any = None  # opened at the first overwrite
        #: the first write error (h5py swallows those raised while it closes the file)
        self.error: BaseException | None = None

    def _keep(self, offset: int, old: bytes) -> None:
        if self._log is None:
            self._log = open(self._log_path, "wb", buffering=0)  # noqa: SIM115
            _write_all(self._log.fileno(), _MAGIC + self._size.to_bytes(8, "little")
                       + os.getpid().to_bytes(8, "little"), None)
        # one record, whole; a record cut short is ignored by recover(): its overwrite
        # comes after it
        _write_all(self._log.fileno(), _RECORD.pack(offset, len(old)) + old, None)
        self._undo.append((offset, old))

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._end() + offset
        return self._pos

    def _end(self) -> int:
        end = os.fstat(self._fd).st_size
        for offset, data in self._overlay:
            end = max(end, offset + len(data))
        return end

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = _pread(self._fd, len(view), self._pos)
        n = len(data)
        view[:n] = data
        for offset, held in self._overlay:  # what was written to memory, in order
            lo, hi = max(offset, self._pos), min(offset + len(held), self._pos + len(view))
            if lo < hi:
                view[lo - self._pos:hi - self._pos] = held[lo - offset:hi - offset]
                n = max(n, hi - self._pos)
        if n < len(view) and self._overlay:  # a hole before held bytes reads as zeros
            view[n:] = b"\0" * (len(view) - n)
        self._pos += n
        return n

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                if self._pos < self._size:  # keep what the write overwrites
                    end = min(self._pos + len(view), self._size)
                    self._keep(self._pos, _pread(self._fd, end - self._pos, self._pos))
                _write_all(self._fd, view, self._pos)
            except OSError as err:
                if not is_full(err):
                    self.error = err
                    raise
                self.error = err  # from here on this change lives in memory (see above)
            except BaseException as err:
                self.error = self.error or err
                raise
        if self.error is not None:
            self._overlay.append((self._pos, bytes(view)))
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is not None:
            return size  # undone anyway
        if size < self._size:
            self._keep(size, _pread(self._fd, self._size - size, size))
        os.ftruncate(self._fd, size)
        return size

    def flush(self) -> None:
        pass  # unbuffered

    def fsync(self) -> None:
        """Flush to disk (after a change that must survive power loss)."""
        os.fsync(self._fd)

    def rollback(self) -> None:
        """Put back every overwritten byte and cut the file to its old length."""
        for offset, old in reversed(self._undo):
            _write_all(self._fd, old, offset)
        os.ftruncate(self._fd, self._size)
        self._undo.clear()
        self._overlay.clear()
        self.commit()

    def commit(self) -> None:
        """The change is whole (or undone): the undo log goes."""
        if self._log is not None:
            self._log.close()
            self._log = None
            self._log_path.unlink()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self._log is not None:  # an error left it: recover() replays it later
            self._log.close()
            self._log = None
        super().close()


@contextlib.contextmanager
def _unraisable_into(journal: Journal) -> Iterator[None]:
    """h5py reports an exception raised in a file-object callback while it closes a file as
    'unraisable' (a traceback on stderr, no exception): catch it into the journal."""
    previous = sys.unraisablehook

    def hook(info: Any) -> None:
        if journal.error is None and info.exc_value is not None:
            journal.error = info.exc_value
        elif info.exc_value is None:
            previous(info)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def transaction(path: Path, *, fsync: bool = False) -> Iterator[h5py.File]:
    """``h5py.File(path, "r+")`` for one change, undone whole if anything fails.

    Raises whatever failed (after the rollback); a write that found no room is re-raised as
    the ``OSError`` it was, for the caller to turn into a :class:`DiskFullError` naming
    what it was writing.
    """
    journal = Journal(path)
    try:
        with _unraisable_into(journal):
            f = h5py.File(journal, "r+")
            try:
                yield f
            finally:
                f.close()
        if journal.error is not None:
            raise journal.error
        if fsync:
            journal.fsync()
        journal.commit()
    except BaseException:
        journal.rollback()
        raise
    finally:
        journal.close()


def _pread(fd: int, n: int, offset: int) -> bytes:
    """``os.pread`` (with a seek and a read where the platform has none: Windows)."""
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - not on POSIX
    return os.read(fd, n)  # pragma: no cover


def _pwrite(fd: int, data: Any, offset: int) -> int:
    """``os.pwrite`` (a seek and a write where the platform has none)."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - not on POSIX
    return os.write(fd, data)  # pragma: no cover


def _write_all(fd: int, data: Any, offset: int | None) -> None:
    """Write all of ``data`` at ``offset`` (``None``: at the descriptor's position)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view) if offset is None else _pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - a regular file writes or raises
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        if offset is not None:
            offset += n


def is_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a write that found no room."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


def free_bytes(path: Path, *, new: bool = False) -> int | None:
    """Bytes a write to ``path`` may still add: free disk space for this user, and the
    process's ``RLIMIT_FSIZE`` less the file's size (of a ``new`` file: the whole limit);
    ``None`` when neither is known."""
    limits = []
    try:
        st = os.statvfs(path.parent)
        limits.append(st.f_bavail * st.f_frsize)
    except (OSError, AttributeError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            size = path.stat().st_size if path.exists() and not new else 0
            limits.append(max(soft - size, 0))
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


#: room kept for HDF5's metadata beyond a row's arrays: the chunk of every per-iteration
#: variable (1024 rows x 8 bytes, about 20 of them) and the string heaps, with slack
METADATA_MARGIN = 256 << 10


def check_space(path: Path, need: int, *, what: str, new: bool = False) -> None:
    """:class:`DiskFullError` naming ``what`` when fewer than ``need`` bytes (plus 5% and
    :data:`METADATA_MARGIN`) can be written to ``path`` (a ``new`` file: a temporary one
    that will replace it)."""
    want = int(need * 1.05) + METADATA_MARGIN
    free = free_bytes(path, new=new)
    if free is not None and free < want:
        then = "run again" if new else "resume from this file"
        raise DiskFullError(
            f"{path}: not enough space to write {what}: it needs about "
            f"{_size(want)}, {_size(free)} can be written (disk, quota or file-size limit); "
            f"nothing was written: free space and {then}")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def full_error(path: Path, what: str, err: BaseException) -> DiskFullError:
    """The :class:`DiskFullError` of a write of ``what`` that found no room (rolled back)."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return DiskFullError(f"{path}: no space left while writing {what} ({reason}); it was "
                         "rolled back, the file holds every completed row: free space and "
                         "resume from it")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (ours counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


# -- one writer per file ---------------------------------------------------------------------
class _Lock:
    def __init__(self, path: Path, fh: Any) -> None:
        self.path = path
        self._fh = fh

    def release(self) -> None:
        if self._fh is None:
            return
        try:
            with contextlib.suppress(OSError):
                self.path.unlink()
        finally:
            self._fh.close()  # closing releases the flock
            self._fh = None


def lock_path(path: Path) -> Path:
    """``dir/run.h5`` -> ``dir/.run.h5.lock``: where the writer's lock lives."""
    return path.with_name(f".{path.name}.lock")


def writer_lock(path: Path) -> _Lock:
    """Hold the advisory lock of the history ``path`` for this writer, or raise
    :class:`~enkal.errors.FileInUseError` naming the process that holds it.

    A ``flock`` on ``.NAME.lock`` (not on the history itself, whose readers may take HDF5's
    own ``flock``); the kernel releases it when the process dies, so a killed run never
    leaves the file locked. Where ``fcntl`` is missing (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return _Lock(lock_path(path), None)
    lp = lock_path(path)
    fh = open(lp, "a+")  # noqa: SIM115 - kept open while the lock is held
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise FileInUseError(
                f"{path}: another run is writing this history (process {holder}); two "
                "writers would interleave their rows. Wait for it, or write to another "
                "file with --out / store=") from None
        raise
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return _Lock(lp, fh)


# -- no torn rows on Ctrl-C ----------------------------------------------------------------------
@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) while the block runs, then raise the ``KeyboardInterrupt``
    it would have raised: a row is written whole or not at all. Only the main thread gets
    signals; elsewhere (a background writer) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
    except (ValueError, OSError):  # pragma: no cover - no signals here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:  # now deliver it as the previous handler would have
            if callable(previous):
                previous(signal.SIGINT, pending[0])
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt
