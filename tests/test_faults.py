"""Nothing lost, ever: full disks, file-size limits, interrupts, two writers, readers beside a
writer, failed runs (issue #19). Each reproduction of the issue is a test here.

The history must survive whatever stops a write half way: every completed row stays readable
with plain xarray, and a resume once the cause is gone ends bit for bit where the
uninterrupted run ends.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import xarray as xr

import enkal
from enkal import storage
from enkal.errors import DiskFullError, FileInUseError
from enkal.storage import journal as journal_module

pytestmark = pytest.mark.usefixtures("one_thread")

N_ENS, N_PAR = 32, 2000  # float64: 512 kB per stored ensemble


def _model() -> enkal.CallableModel:
    w = torch.linspace(-1.0, 1.0, N_PAR, dtype=torch.float64)
    return enkal.CallableModel(lambda x: torch.stack([x @ w, (x ** 2).mean(1)], 1),
                               parameters=N_PAR, output_size=2)


def _smoother() -> enkal.EnsembleSmoother:
    return enkal.EnsembleSmoother(enkal.Observations([0.5, 1.0], noise_std=0.1),
                                  rule=enkal.PerturbedObservations(),
                                  schedule=enkal.FixedAnnealing(factor=0.9), seed=4)


def _prior() -> torch.Tensor:
    return torch.randn(N_ENS, N_PAR, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)


def _plain_rows(path: Path) -> list[int]:
    """The iterations plain xarray reads (no enkal involved), every row loaded."""
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        ds.load()
        return ds.iteration.values.tolist()


def _same_end(a: enkal.SmootherResult, b: enkal.SmootherResult) -> None:
    assert torch.equal(a.parameters, b.parameters)
    assert torch.equal(a.state.rng_state, b.state.rng_state)


# -- a file-size limit (ulimit -f): the reproduction, in a child process -------------
_LIMITED = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {tests!r})
    limit, path, check = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "check"
    import enkal
    from enkal.storage import journal
    from test_faults import _model, _prior, _smoother
    if not check:  # let the writes themselves hit the limit (EFBIG): the journal's case
        journal.check_space = lambda *a, **k: None
        import enkal.storage.history as history
        history.check_space = journal.check_space
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        enkal.run(_smoother(), _model(), _prior(), store=path, checkpoint=False,
                  max_iterations=12)
    except enkal.errors.DiskFullError as err:
        print("DiskFullError", err, flush=True)
        sys.exit(1)
""")


@pytest.mark.parametrize("check", ["check", "nocheck"])
@pytest.mark.parametrize("limit", [1_500_000, 2_600_000, 4_200_000])
def test_a_file_size_limit_costs_at_most_the_row_being_written(tmp_path, limit, check):
    """``RLIMIT_FSIZE`` stops the run with one clear error (exit 1, no segfault), every
    completed row reads with plain xarray, and the resume without the limit is bitwise the
    uninterrupted run. With ``check`` the space check stops it before the row; without it
    the write itself fails (EFBIG) and the journal undoes the half-written row."""
    path = tmp_path / "f.h5"
    code = _LIMITED.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code, str(limit), str(path), check],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "DiskFullError" in proc.stdout and str(path) in proc.stdout
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    rows = _plain_rows(path)
    assert rows == list(range(len(rows))) and len(rows) >= 1
    assert os.path.getsize(path) <= limit
    assert not list(tmp_path.glob(".*.journal")) and not list(tmp_path.glob(".*.tmp"))
    resumed = enkal.run(_smoother(), _model(), resume=path, max_iterations=12)
    straight = enkal.run(_smoother(), _model(), _prior(), max_iterations=12)
    _same_end(resumed, straight)
    assert _plain_rows(path) == list(range(13))


# -- an injected ENOSPC inside the writer ------------------------------------------------------
@pytest.mark.parametrize("after", [0, 4096, 300_000, 600_000])
def test_an_injected_enospc_in_the_middle_of_an_append_is_rolled_back(tmp_path, monkeypatch,
                                                                       after):
    """The disk fills up half way through an append (after ``after`` new bytes): the row is
    undone byte for byte, the error names the file, and the run resumes bit for bit."""
    path = tmp_path / "f.h5"
    straight = enkal.run(_smoother(), _model(), _prior(), max_iterations=6)
    budget = {"left": None}
    real_write = journal_module._write_all  # every byte the journal writes goes through it

    def write(fd, data, offset):
        if budget["left"] is not None:
            budget["left"] -= len(memoryview(data).cast("B"))
            if budget["left"] < 0:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_write(fd, data, offset)

    def fill_up(state, info):
        if info.iteration == 3:  # the row of iteration 3 is the first to fail
            budget["left"] = after
            before = path.read_bytes()
            fill_up.before = before

    monkeypatch.setattr(journal_module, "_write_all", write)
    with pytest.raises(DiskFullError, match="f.h5: no space left while writing the row of "
                                            "iteration 3"):
        enkal.run(_smoother(), _model(), _prior(), store=path, checkpoint=False,
                  max_iterations=6, callbacks=[fill_up])
    # the close could not mark the file either (still full): it is the file before row 3
    assert path.read_bytes() == fill_up.before
    assert _plain_rows(path) == [0, 1, 2]
    budget["left"] = None  # space freed
    resumed = enkal.run(_smoother(), _model(), resume=path, max_iterations=6)
    _same_end(resumed, straight)
    assert _plain_rows(path) == list(range(7))


def test_a_full_disk_before_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    smoother, model = _smoother(), _model()
    result = enkal.run(smoother, model, _prior(), store=tmp_path / "f.h5", checkpoint=True,
                       max_iterations=2)
    ckpt = tmp_path / "f.ckpt.h5"
    before = ckpt.read_bytes()
    monkeypatch.setattr(journal_module, "free_bytes", lambda path, new=False: 1000)
    with pytest.raises(DiskFullError, match="f.ckpt.h5: not enough space to write the "
                                            "checkpoint of iteration 2"):
        storage.write_checkpoint(ckpt, smoother, result.state)
    assert ckpt.read_bytes() == before


def test_the_space_check_stops_before_the_row_with_a_clear_message(tmp_path, monkeypatch):
    path = tmp_path / "f.h5"
    calls = {"n": 0}

    def free(p, new=False):
        calls["n"] += 1
        return 10**12 if calls["n"] < 4 else 100_000  # the disk fills up after 3 rows

    monkeypatch.setattr(journal_module, "free_bytes", free)
    with pytest.raises(DiskFullError, match=r"f.h5: not enough space to write the row of "
                                            r"iteration \d: it needs about"):
        enkal.run(_smoother(), _model(), _prior(), store=path, checkpoint=False,
                  max_iterations=6)
    assert _plain_rows(path) == [0, 1, 2]


# -- a kill in the middle of an append ------------------------------------------------------------
def test_a_change_killed_half_way_is_undone_by_the_next_opener(tmp_path):
    """A process killed inside a journaled change leaves its undo log; the next reader (once
    the writer is gone) or writer replays it: the file is the one before the change."""
    path = tmp_path / "f.h5"
    enkal.run(_smoother(), _model(), _prior(), store=path, checkpoint=False, max_iterations=2)
    before = path.read_bytes()
    code = textwrap.dedent(f"""
        import os, signal, numpy as np
        from pathlib import Path
        from enkal.storage.journal import transaction
        with transaction(Path({str(path)!r})) as f:
            for name in ("misfit", "alpha"):
                f[name][0] = 1234.5          # overwrites: logged first
            f["iteration"].resize(50, axis=0)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / ".f.h5.journal").exists()
    assert path.read_bytes() != before
    assert _plain_rows_enkal(path) == [0, 1, 2]  # enkal.open replays the log first
    assert path.read_bytes() == before and not (tmp_path / ".f.h5.journal").exists()


def _plain_rows_enkal(path: Path) -> list[int]:
    with enkal.open(path) as ds:
        return ds.iteration.values.tolist()


# -- Ctrl-C -------------------------------------------------------------------------------------------
def test_ctrl_c_during_an_append_leaves_no_torn_row_and_says_interrupted(tmp_path):
    """SIGINT arrives in the middle of the row of iteration 3: the row is finished first, then
    the run stops; the file says ``interrupted``, is not ``complete``, opens, and resumes
    bit for bit. (Before: a row whose iteration was 0, and ``complete = 1``.)

    The interrupted run is a fresh interpreter that first installs Python's own SIGINT
    handler, as an interactive Python has it: a process started in the background by a
    shell without job control (``pytest ... &`` in a script) inherits SIGINT *ignored*, and
    an ignored Ctrl-C rightly stops nothing. That, not a lost interrupt, was why this test
    failed in 4 of 6 full-suite runs on 2026-12-05 (the runs were background jobs) and never
    alone (run in the foreground); the test below covers the ignored case."""
    path = tmp_path / "f.h5"
    code = textwrap.dedent(f"""
        import signal, sys, threading
        signal.signal(signal.SIGINT, signal.default_int_handler)  # not an inherited SIG_IGN
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import enkal
        from enkal import storage
        from test_faults import _model, _prior, _smoother
        real = storage.history._write_row

        def interrupted(f, row, iteration, *args, **kwargs):
            if iteration == 3:  # delivered in the middle of the append
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return real(f, row, iteration, *args, **kwargs)

        storage.history._write_row = interrupted
        try:
            enkal.run(_smoother(), _model(), _prior(), store={str(path)!r}, max_iterations=6)
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr  # the run stopped with KeyboardInterrupt
    with enkal.open(path) as ds:
        assert ds.iteration.values.tolist() == [0, 1, 2, 3]
        assert ds.attrs["stopped_by"] == "interrupted" and ds.attrs["complete"] == 0
    resumed = enkal.run(_smoother(), _model(), resume=path, max_iterations=6)
    _same_end(resumed, enkal.run(_smoother(), _model(), _prior(), max_iterations=6))


@pytest.mark.parametrize("held", ["default", "ignored", "callable"])
def test_deferred_interrupts_acts_as_the_handler_it_held_back(held):
    """A SIGINT inside the block waits for the block's end, then does what the handler in
    place before would have done: Python's default raises KeyboardInterrupt, an inherited
    SIG_IGN (a background job of a shell without job control) ignores it, a callable
    handler is called once. Before, the test above stood xfail for the ignored case."""
    calls = []
    handler = {"default": signal.default_int_handler, "ignored": signal.SIG_IGN,
               "callable": lambda signum, frame: calls.append(signum)}[held]
    original = signal.signal(signal.SIGINT, handler)
    finished = []
    try:
        def block():
            with journal_module.deferred_interrupts():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                finished.append(True)  # the block ran to its end first
        if held == "default":
            with pytest.raises(KeyboardInterrupt):
                block()
        else:
            block()
        assert finished == [True]
        assert calls == ([signal.SIGINT] if held == "callable" else [])
        assert signal.getsignal(signal.SIGINT) is handler  # put back as it was
    finally:
        signal.signal(signal.SIGINT, original)


def test_a_failed_run_is_marked_failed_not_complete(tmp_path):
    path = tmp_path / "f.h5"

    def boom(state, info):
        if info.iteration == 2:
            raise RuntimeError("the cluster went away")

    with pytest.raises(RuntimeError):
        enkal.run(_smoother(), _model(), _prior(), store=path, max_iterations=6,
                  callbacks=[boom])
    with enkal.open(path) as ds:
        assert ds.attrs["complete"] == 0
        assert ds.attrs["stopped_by"] == "failed: RuntimeError: the cluster went away"
        assert ds.iteration.values.tolist() == [0, 1]  # the callbacks run before the row


# -- two writers --------------------------------------------------------------------------------
def test_a_second_writer_on_the_same_file_is_refused(tmp_path):
    path = tmp_path / "f.h5"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import enkal
        from test_faults import _model, _prior, _smoother
        def slow(state, info):
            print(info.iteration, flush=True)
            time.sleep(0.3)
        enkal.run(_smoother(), _model(), _prior(), store={str(path)!r}, max_iterations=40,
                  callbacks=[slow])
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # the first writer is running
        with pytest.raises(FileInUseError, match=rf"f.h5: another run is writing this "
                                                 rf"history \(process {proc.pid}\)"):
            enkal.run(_smoother(), _model(), _prior(), store=path, max_iterations=2)
        with pytest.raises(FileInUseError):  # a resume of it too
            enkal.run(_smoother(), _model(), resume=path, max_iterations=50)
    finally:
        proc.kill()
        proc.wait()
    # the first writer is gone (killed): its lock went with it
    enkal.run(_smoother(), _model(), resume=path, max_iterations=6)
    assert _plain_rows(path) == list(range(7))


def test_two_writers_in_one_process_are_refused_too(tmp_path):
    from enkal._types import RunEnd, RunStart

    smoother, model = _smoother(), _model()
    state = smoother.init(_prior())
    first = storage.Recorder(tmp_path / "f.h5")
    first.start(RunStart(smoother, model.layout, None, state))
    with pytest.raises(FileInUseError, match=f"process {os.getpid()}"):
        storage.Recorder(tmp_path / "f.h5").start(RunStart(smoother, model.layout, None,
                                                          state))
    first.close(RunEnd("max_iterations", 0))
    assert not (tmp_path / ".f.h5.lock").exists()


# -- readers in the same process --------------------------------------------------------------------
def test_an_open_dataset_does_not_block_a_resume_and_polling_reads_work(tmp_path):
    """The notebook workflow: ``ds = enkal.open(p)`` (or ``xr.open_dataset``) held open, then
    the run resumes into the same file in the same process (before: "file locking flag
    values don't match"), and reading goes on. A handle opened before the rows were
    written shows the file as it was then (HDF5 shares one cache per file in a process):
    close it and open again to see them."""
    path = tmp_path / "f.h5"
    enkal.run(_smoother(), _model(), _prior(), store=path, max_iterations=2)
    held = enkal.open(path)
    plain = xr.open_dataset(path, engine="h5netcdf")
    seen = []

    def poll(state, info):
        with enkal.open(path) as ds:
            seen.append(ds.sizes["iteration"])

    enkal.run(_smoother(), _model(), resume=path, max_iterations=4, callbacks=[poll])
    assert held.iteration.values.tolist() == [0, 1, 2] and plain.sizes["iteration"] == 3
    assert len(seen) == 2
    held.close()
    plain.close()
    assert _plain_rows(path) == list(range(5))
    seen.clear()  # with no older handle open, every poll sees the rows written so far
    enkal.run(_smoother(), _model(), resume=path, max_iterations=7, callbacks=[poll])
    assert seen == [5, 6, 7]  # the callback runs before each row
    assert _plain_rows(path) == list(range(8))


# -- leftovers ----------------------------------------------------------------------------------
def test_temporaries_of_dead_writers_are_removed_and_n_forwards_adds_up(tmp_path):
    path = tmp_path / "f.h5"
    enkal.run(_smoother(), _model(), _prior(), store=path, max_iterations=2)
    stale = tmp_path / ".f.h5.999999999-abcd1234.tmp"   # no such process
    stale.write_bytes(b"x" * 100)
    live = tmp_path / f".f.h5.{os.getpid()}-abcd1234.tmp"  # ours: kept
    live.write_bytes(b"x")
    enkal.run(_smoother(), _model(), resume=path, max_iterations=5)
    assert not stale.exists() and live.exists()
    with enkal.open(path) as ds:
        assert ds.attrs["n_forwards"] == 5 * N_ENS  # 2 updates, then 3 more
    with h5py.File(path) as f:  # the completion flags of the whole run
        assert int(f.attrs["complete"]) == 1
        assert json.loads(f.attrs["history_policy"]) is not None
    assert not list(tmp_path.glob(".*.journal")) and not list(tmp_path.glob(".*.lock"))
    assert np.isfinite(xr.open_dataset(path, engine="h5netcdf").parameters[-1]).all()


def test_polling_a_file_another_process_appends_to_never_gives_a_raw_error(tmp_path):
    """``enkal.open`` while another process appends: it opens the rows written so far, or
    says in one StorageError naming the file that it caught the file mid-append (before:
    a raw ``OSError: addr overflow``)."""
    path = tmp_path / "f.h5"
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import enkal
        from test_faults import _model, _smoother
        prior = torch.randn(8, 20, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)
        model = enkal.CallableModel(lambda x: x[:, :2], parameters=20, output_size=2)
        enkal.run(_smoother(), model, prior, store={str(path)!r}, max_iterations=400)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    opened, caught = 0, 0
    try:
        while proc.poll() is None:
            if not path.exists():
                continue
            try:
                with warnings.catch_warnings():  # "a row is being written": left out
                    warnings.simplefilter("ignore", RuntimeWarning)
                    ds = enkal.open(path)
                with ds:
                    rows = ds.iteration.values
                assert list(rows) == list(range(len(rows)))
                opened += 1
            except enkal.StorageError as err:
                assert str(path) in str(err)
                caught += 1
            except FileNotFoundError:  # between the temporary file and its rename
                pass
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == 0 and opened > 0
    assert _plain_rows(path) == list(range(401))
