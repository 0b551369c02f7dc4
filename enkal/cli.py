"""The ``enkal`` command line: ``run`` a TOML configuration, ``info`` and ``plot`` a result file.

::

    enkal [--debug] run CONFIG.toml [--out FILE] [--seed N] [--device D]
                          [--max-iterations N] [--resume FILE] [--allow-changes]
                          [--executor {inprocess,dask}] [--workers N]
                          [--scheduler ADDRESS] [--quiet | -v]
    enkal [--debug] info FILE
    enkal [--debug] plot FILE [-o PNG] [--kind {summary,pair,predictive,all}]

``python -m enkal ...`` is the same command.

Configuration errors (unknown or missing keys, bad values) and unusable command-line
arguments (a missing ``--resume`` file, an ``--out`` in no directory, an unavailable
``--device``, a resume of another run) print one line naming the key or file and exit with
status 2, before anything is written; a run that fails exits with status 1, also with one
line (out of memory, a disk error, an unreachable Dask scheduler, an internal error).
``--debug`` (before or after the command) shows the traceback instead. Warnings print as one
line (``enkal run: note: ...``). What the library logs (``logging.getLogger("enkal")``:
the run's first line, a Dask cluster's start and dashboard) prints one line per message on
stderr (``--quiet``: warnings only; ``-v``: debug lines too); the progress of ``run`` is
:class:`enkal.progress.Progress` (a tqdm bar on a terminal, one line per update otherwise),
its total the schedule's planned updates. The problem a configuration describes is built
by the plugin its ``problem`` key names (default ``estimation``), found through the
``enkal.problems`` entry points.

``--resume FILE`` continues the run FILE recorded: without ``--out``, the output is FILE
itself when it is a history, or, for a checkpoint ``X.ckpt.h5``, the history ``X.h5`` beside
it. The run is compared with the file first (``enkal.run``): other data, noise, ensemble
size, parameters or strategies are refused (``--allow-changes`` continues anyway, with a
note), and so is a ``--max-iterations`` below rows the file holds.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from ._version import __version__
from .config import load_toml
from .errors import EnkalError
from .progress import Progress

__all__ = ["main"]

_log = logging.getLogger(__name__)


_DEBUG_HELP = "show the traceback of a failure instead of one line"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enkal", description="Black-box ensemble Kalman inference.")
    p.add_argument("--version", action="version", version=f"enkal {__version__}")
    p.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # --debug after the command too: a subcommand's default must not reset the global one
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=_DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a TOML configuration", parents=[common],
                       description="Build the problem a TOML configuration describes, run the "
                                   "smoother (or, for problem = \"filtering\", the filter "
                                   "over the series) and write the history to an HDF5 file.")
    r.add_argument("config", help="the TOML configuration (docs/config.md; problems/*.toml). "
                                  "A configuration may name Python code ([model] target/rhs) "
                                  "that is imported and run: run only configurations you trust")
    r.add_argument("--out", help="output HDF5 file (default: with --resume, the history "
                                 "resumed; else CONFIG's name with .h5, here)")
    r.add_argument("--seed", type=int, help="seed of prior, data and smoother (overrides "
                   "[smoother] seed)")
    r.add_argument("--device", help="torch device for the model and the update, e.g. cpu, cuda")
    r.add_argument("--max-iterations", type=int,
                   help="stop at this many updates, counted from the start of the run (a "
                        "resumed run too)")
    r.add_argument("--resume", metavar="FILE",
                   help="continue a killed or stopped run from FILE: its history file (the "
                        "--out of that run; its last complete row holds the whole state) or "
                        "its checkpoint OUT.ckpt.h5. Without --out the run continues FILE "
                        "(a history) or OUT.h5 beside the checkpoint. A run that differs "
                        "from FILE's (data, noise, ensemble size, parameters, strategies, "
                        "seed) or a --max-iterations below FILE's rows is refused")
    r.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although this run differs from FILE's, or "
                        "drop FILE's rows beyond --max-iterations (a note says what)")
    r.add_argument("--executor", choices=["inprocess", "dask"],
                   help="where forwards run (overrides [executor])")
    r.add_argument("--workers", type=int,
                   help="local Dask workers (with --executor dask; started before the first "
                        "update, within 60 s, and reported with the dashboard's address)")
    r.add_argument("--scheduler", help="Dask scheduler address, e.g. tcp://host:8786 (with "
                                       "--executor dask; connected before anything is "
                                       "written, waiting at most 5 s)")
    talk = r.add_mutually_exclusive_group()
    talk.add_argument("--quiet", action="store_true",
                      help="no progress bar and no log lines but warnings (not the first "
                           "line, nor Dask's start)")
    talk.add_argument("-v", "--verbose", action="store_true",
                      help="log debug lines too (each update's forward and update times)")

    i = sub.add_parser("info", help="summarise a result file", parents=[common])
    i.add_argument("file")

    pl = sub.add_parser(
        "plot", help="plot a result file to PNG", parents=[common],
        description="Draw a history file's figures (enkal.plot, physical units) to PNG: "
                    "summary (misfit, spread and alpha per iteration; prior and posterior "
                    "marginals), pair (corner plot of the posterior members), predictive "
                    "(the data with the posterior-predictive band; needs predictions stored "
                    "in the file). A filter history gets one figure: truth, observations and "
                    "analysis over time, and the errors (enkal.plot_filter.series).")
    pl.add_argument("file", help="an enkal history file (the --out of enkal run)")
    pl.add_argument("-o", "--output", metavar="PNG",
                    help="the PNG to write (default: FILE without .h5, with .png); with "
                         "--kind all, PNG without .png is the stem of STEM.summary.png, "
                         "STEM.pair.png and STEM.predictive.png")
    pl.add_argument("--kind", choices=[*_PLOT_KINDS, "all"], default="summary",
                    help="which figure (default summary); all writes each of them, "
                         "skipping predictive with a note when the file holds no "
                         "predictions")
    return p


class _Banner:
    """A sink logging the run's first line once it starts (after a resume's checks, so a
    refusal is the only line): the ensemble and the data it runs on."""

    def __init__(self, name: str, out: str, resume: str | None) -> None:
        self.name, self.out, self.resume = name, out, resume

    def start(self, run: Any) -> None:
        n_ens, n_par = run.state.parameters.shape
        resuming = f" (resuming {self.resume} at iteration {run.state.iteration})" \
            if self.resume else ""
        _log.info("enkal %s: %s, %d members, %d parameters, %d observations -> %s%s",
                  __version__, self.name, n_ens, n_par, run.smoother.observations.size,
                  self.out, resuming)

    def record(self, state: Any, info: Any, predictions: Any, *, final: bool) -> None:
        pass

    def close(self, end: Any) -> None:
        pass


def _check_run_args(args: argparse.Namespace) -> None:
    """Usage errors of ``enkal run`` found before the (possibly expensive) build: ValueError."""
    if args.max_iterations is not None and args.max_iterations < 1:
        raise ValueError(f"--max-iterations: expected an int >= 1, got {args.max_iterations}")
    if args.executor != "dask" and (args.workers is not None or args.scheduler is not None):
        raise ValueError("--workers/--scheduler: only with --executor dask")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers: expected an int >= 1, got {args.workers}")
    if args.resume is not None and not os.path.isfile(args.resume):
        raise ValueError(f"--resume {args.resume}: no such file (expected a history file or "
                         "a checkpoint)")
    if args.allow_changes and args.resume is None:
        raise ValueError("--allow-changes: only with --resume")
    if args.out is not None:
        _check_out(args.out, args.config)
    if args.device is not None:
        _check_device(args.device)


def _check_out(out: str, config: str) -> None:
    if os.path.isdir(out):
        raise ValueError(f"--out {out}: is a directory, expected a file name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out}: directory {parent} does not exist")
    if os.path.exists(out) and os.path.exists(config) and os.path.samefile(out, config):
        raise ValueError(f"--out {out}: is the configuration file itself")


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"--device {name}: not a torch device ({err})") from None
    if device.type == "meta":
        raise ValueError(f"--device {name}: expected a device that holds data, e.g. cpu, cuda")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:  # "Torch not compiled with CUDA" asserts
        raise ValueError(f"--device {name}: not available here ({err})") from None


def _output(args: argparse.Namespace) -> str:
    """The history file a run writes: ``--out``; else, resuming, the history resumed (a
    history ``FILE``, or ``X.h5`` beside a checkpoint ``X.ckpt.h5``); else CONFIG.h5 here."""
    from .storage import CHECKPOINT_FORMAT, HISTORY_FORMAT, format_of

    if args.out is not None:
        return str(args.out)
    if args.resume is None:
        return os.path.splitext(os.path.basename(args.config))[0] + ".h5"
    fmt = format_of(args.resume)
    if fmt == HISTORY_FORMAT:
        return str(args.resume)
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {args.resume}: not an enkal history file or checkpoint "
                         f"(enkal_format {fmt!r})")
    root, ext = os.path.splitext(args.resume)
    history = root.removesuffix(".ckpt") + ext if root.endswith(".ckpt") else None
    if history is None or not os.path.isfile(history) or format_of(history) != HISTORY_FORMAT:
        beside = f"no history {history} beside it" if history is not None else \
            "not named X.ckpt.h5"
        raise ValueError(f"--resume {args.resume}: a checkpoint, {beside}: give --out (the "
                         "history file to continue or write)")
    return history


def _executor(args: argparse.Namespace, configured: Any) -> Any:
    if args.executor is None:
        return configured
    if args.executor == "inprocess":
        from .executors import InProcess

        return InProcess()
    from . import executors

    dask_cls = getattr(executors, "Dask", None)
    if dask_cls is None:
        raise ValueError("--executor dask: this enkal has no Dask executor")
    kwargs = {}
    if args.workers is not None:
        kwargs["n_workers"] = args.workers
    if args.scheduler is not None:
        kwargs["address"] = args.scheduler
    try:
        return dask_cls(**kwargs)
    except ValueError as err:
        if args.scheduler is None:
            raise
        raise ValueError(f"--scheduler {args.scheduler}: {err}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from .experiment import find_plugin
    from .runner import run
    from .storage import History

    _check_run_args(args)
    config = load_toml(args.config)
    plugin = find_plugin(config.get("problem", "estimation"))
    if getattr(plugin, "sequential", False):  # a filter over a series: docs/filtering.md
        from .filter_cli import run_command

        return run_command(args, plugin, config,
                           build_kwargs=_base_dir(plugin, args.config))
    out = _output(args)
    exp = plugin.build(config, seed=args.seed, device=args.device,
                       **_base_dir(plugin, args.config))
    executor = _executor(args, exp.executor)
    max_it = args.max_iterations or exp.max_iterations
    sinks: list[Any] = [_Banner(exp.name, out, args.resume)]
    if not args.quiet:  # the total: the schedule's planned updates, at most max_it
        sinks.append(Progress(max_iterations=max_it))
    try:
        if callable(getattr(executor, "connect", None)):
            executor.connect()  # an unreachable scheduler fails here, before any file
        result = run(
            exp.smoother, exp.model, exp.prior, resume=args.resume,
            allow_changes=args.allow_changes, max_iterations=max_it, executor=executor,
            store=out, history=History(), store_attrs=_provenance(config, exp.name),
            truth=exp.truth, sinks=sinks,
        )
    finally:
        if hasattr(executor, "close"):
            executor.close()
    _print_summary(result.summary(), exp.truth)
    print(f"{len(result.history.get('iteration', []))} updates, {result.n_forwards} member "
          f"forwards, stopped by {result.stopped_by}; wrote {out}")
    return 0


def _base_dir(plugin: Any, config: str) -> dict:
    """``base_dir=`` (the configuration's directory, for its relative paths) for plugins
    whose ``build`` takes it; plugins written before it existed get nothing new."""
    try:
        takes = "base_dir" in inspect.signature(plugin.build).parameters
    except (TypeError, ValueError):
        takes = False
    return {"base_dir": os.path.dirname(os.path.abspath(config))} if takes else {}


#: tables of a configuration that describe how a problem is run, not the problem: the
#: smoother's settings are compared as the smoother's configuration (and ensemble_size as the
#: ensemble's size) when a run is resumed; max_iterations, the executor and the name may change
_RUN_TABLES = ("smoother", "executor", "name")


def _provenance(config: dict, name: str) -> dict:
    """The history's extra attributes: the plugin, the experiment's name and the problem's
    own configuration (``problem_config``: every table but [smoother] and [executor]), which
    a resume compares (a changed data seed or noise is another problem)."""
    problem = {k: v for k, v in config.items() if k not in _RUN_TABLES}
    return {"problem": config.get("problem", "estimation"), "name": name,
            "problem_config": problem}


def _print_summary(summary: dict, truth: torch.Tensor | None) -> None:
    """The posterior table; with a twin experiment's truth, whether each truth lies in its
    5-95% interval (``inside``) or not (``OUTSIDE``, in capitals to stand out)."""
    head = f"{'parameter':<14} {'mean':>11} {'std':>10} {'5%':>11} {'95%':>11}"
    if truth is not None:
        head += f" {'truth':>11} {'in 5-95%':>8}"
    print(head)
    for j, (name, row) in enumerate(summary.items()):
        line = (f"{name:<14} {row['mean']:11.5g} {row['std']:10.4g} {row['q05']:11.5g} "
                f"{row['q95']:11.5g}")
        if truth is not None:
            t = float(truth[j])
            line += f" {t:11.5g} {truth_verdict(t, row['q05'], row['q95']):>8}"
        print(line)


def truth_verdict(truth: float, low: float, high: float) -> str:
    """``"inside"`` when ``low <= truth <= high``, else ``"OUTSIDE"`` (a NaN bound too)."""
    return "inside" if low <= truth <= high else "OUTSIDE"


def _truth(ds):
    """The twin experiment's truth (physical units) stored by ``run(truth=...)``, or None."""
    import numpy as np

    t = ds.attrs.get("truth")
    if t is None:
        return None
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    return t if t.shape == (ds.sizes.get("parameter", -1),) else None


def cmd_info(args: argparse.Namespace) -> int:
    from .filter_cli import info_command, is_filter_history
    from .storage import open_dataset, physical

    if is_filter_history(args.file):
        return info_command(args.file)

    with open_dataset(args.file) as ds:
        n_it = ds.sizes.get("iteration", 0)
        print(f"{args.file}: enkal {ds.attrs.get('enkal_version', '?')}, torch "
              f"{ds.attrs.get('torch_version', '?')}, created {ds.attrs.get('created', '?')}, "
              f"seed {ds.attrs.get('seed', '?')}")
        print(f"  {n_it} iterations, {ds.sizes.get('member', 0)} members, "
              f"{ds.sizes.get('parameter', 0)} parameters, {ds.sizes.get('output', 0)} outputs")
        diag = [v for v in ("alpha", "misfit", "mean_misfit", "spread", "n_failed",
                            "n_resampled") if v in ds]
        if diag:
            print("  " + " ".join(f"{v:>12}" for v in ["iteration", *diag]))
            for k in range(n_it):
                vals = [ds[v].values[k] for v in diag]
                print("  " + " ".join(f"{x:>12.4g}" if isinstance(x, float) or
                                      hasattr(x, "dtype") and x.dtype.kind == "f"
                                      else f"{x:>12}" for x in
                                      [int(ds.iteration.values[k]), *vals]))
        stored = [k for k in range(n_it) if not bool(
            (ds.parameters.isel(iteration=k).isnull()).all())]
        if not stored:
            print("  no ensemble stored")
            return 0
        last = stored[-1]
        phys = physical(ds).isel(iteration=last).values
        truth = _truth(ds)
        print(f"  ensemble at iteration {int(ds.iteration.values[last])} (physical units):")
        names = [str(n) for n in ds.parameter.values]
        import numpy as np

        q05, q95 = np.quantile(phys, [0.05, 0.95], axis=0)
        summary = {n: {"mean": float(phys[:, j].mean()), "std": float(phys[:, j].std(ddof=1)),
                       "q05": float(q05[j]), "q95": float(q95[j])} for j, n in enumerate(names)}
        if len(names) > 40:
            print(f"  ({len(names)} parameters: showing the first 40)")
            summary = dict(list(summary.items())[:40])
        _print_summary(summary, None if truth is None else torch.as_tensor(truth))
    return 0


_PLOT_KINDS = ("summary", "pair", "predictive")


def _plot_outputs(args: argparse.Namespace) -> dict[str, str]:
    """The PNG each figure of ``enkal plot`` goes to (checked before anything is read)."""
    out = args.output
    if out is None:
        out = (args.file[:-3] if args.file.endswith(".h5") else args.file) + ".png"
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or os.path.isdir(out):
        raise ValueError(f"-o {out}: expected a file name in an existing directory")
    if os.path.abspath(out) == os.path.abspath(args.file):
        raise ValueError(f"-o {out}: is the history file itself")
    if args.kind != "all":
        return {args.kind: out}
    stem = out[:-4] if out.endswith(".png") else out
    return {kind: f"{stem}.{kind}.png" for kind in _PLOT_KINDS}


def _save_figure(fig: Any, path: str) -> None:
    """``fig`` to ``path`` atomically (a temporary PNG beside it, then ``os.replace``)."""
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plot
    from .filter_cli import is_filter_history

    if is_filter_history(args.file):  # one figure: the series (enkal.plot_filter)
        from .plot_filter import series

        path = args.output or os.path.splitext(args.file)[0] + ".png"
        _save_figure(series(args.file), path)
        print(f"wrote {path}")
        return 0
    for kind, path in _plot_outputs(args).items():
        try:
            fig = getattr(plot, kind)(args.file)
        except ImportError as err:
            raise ValueError(str(err)) from None
        except ValueError as err:
            if args.kind != "all" or kind != "predictive":
                raise
            print(f"enkal plot: note: no {path}: {' '.join(str(err).split())}",
                  file=sys.stderr)
            continue
        _save_figure(fig, path)
        print(f"wrote {path}")
    return 0


def _notes(command: str) -> Any:
    """A ``warnings.showwarning`` for ``command``: each warning on one line,
    ``enkal run: note: ...`` (a RuntimeWarning) or ``enkal run: warning: Category: ...``."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        text = " ".join(str(message).split())
        kind = "note" if issubclass(category, RuntimeWarning) else \
            f"warning: {category.__name__}"
        _write(f"enkal {command}: {kind}: {text}")

    return show


def _write(line: str) -> None:
    """One line on the current ``sys.stderr``, through ``tqdm.write``: a progress bar drawn
    there is cleared first and redrawn below the line."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


class _LogLines(logging.Handler):
    """The command line's handler of the ``enkal`` loggers: one line per record on
    stderr; INFO and DEBUG as the message, warnings and errors as
    ``enkal run: warning: ...``."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())
            if record.levelno >= logging.WARNING:
                text = f"enkal {self.command}: {record.levelname.lower()}: {text}"
            _write(text)
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


@contextlib.contextmanager
def _logging_to_stderr(args: argparse.Namespace) -> Iterator[None]:
    """While a command runs, the ``enkal`` logger writes to stderr (:class:`_LogLines`) at
    INFO, WARNING with ``--quiet``, DEBUG with ``--verbose``; restored afterwards (the
    library itself adds only a ``NullHandler``)."""
    logger = logging.getLogger("enkal")
    level = logging.WARNING if getattr(args, "quiet", False) else \
        logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    handler = _LogLines(args.command)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # an application's root handler would print each line twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


_MEMORY_HINT = ("fewer members ([smoother] ensemble_size), a smaller [smoother] chunk_size, "
                "or forwards elsewhere (--executor dask)")


def _memory_errors() -> tuple[type[BaseException], ...]:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError",
                                                               None)
    return (MemoryError,) if oom is None else (MemoryError, oom)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"run": cmd_run, "info": cmd_info, "plot": cmd_plot}
    with warnings.catch_warnings(), _logging_to_stderr(args):
        warnings.simplefilter("default")
        warnings.showwarning = _notes(args.command)
        if args.debug:
            return commands[args.command](args)
        return _one_line(commands[args.command], args)


def _one_line(command: Any, args: argparse.Namespace) -> int:
    """Run ``command``; every failure is one line on stderr and an exit status."""
    try:
        return command(args)
    except KeyboardInterrupt:
        print(f"enkal {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `enkal info FILE | head`: the reader has gone, say nothing
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except Exception as err:  # noqa: BLE001 - a bug or a library's error: still one line
        line, status = _failure(args, err)
        print(f"enkal {args.command}: {line}", file=sys.stderr)
        return status


def _failure(args: argparse.Namespace, err: Exception) -> tuple[str, int]:
    """The line and exit status of a failed command: 2 for usage errors (bad values, a path
    on the command line that cannot be used), 1 for a run that failed."""
    about = _about(args, err)
    if isinstance(err, _memory_errors()):
        what = type(err).__name__ + (f": {about}" if str(err) else "")
        return f"out of memory ({what}); try {_MEMORY_HINT}", 1
    if isinstance(err, (ValueError, TypeError)):
        return f"error: {about}", 2
    if isinstance(err, EnkalError):
        return f"{type(err).__name__}: {about}", 1
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                        PermissionError)):
        return f"error: {about}", 2
    if isinstance(err, OSError):  # disk full, I/O error while running
        return f"{type(err).__name__}: {about}", 1
    return (f"internal error: {type(err).__name__}: {about} (run with --debug for the "
            "traceback)"), 1


def _about(args: argparse.Namespace, err: BaseException) -> str:
    """The error message, on one line, naming the file ``info``/``plot`` read."""
    msg = " ".join(str(err).split()) or type(err).__name__
    path = getattr(args, "file", None)
    if path is not None and path not in msg:
        msg = f"{path}: {msg}"
    return msg


if __name__ == "__main__":
    sys.exit(main())
