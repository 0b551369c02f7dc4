"""Reading user files safely (issue 8): nothing is unpickled or evaluated, and crafted files
get clear errors.

* Statically (``ast``), no module of ``enkal/``, ``models/`` or ``problems/`` calls
  ``pickle.load(s)``, ``eval``/``exec``, ``torch.load`` without ``weights_only=True``,
  ``yaml.load``, ``np.load(allow_pickle=True)``, ``marshal``/``shelve``/``dill`` loaders; TOML is
  parsed by the standard library's ``tomllib`` in ``enkal/config.py`` only.
* Dynamically, a whole ``enkal run``/``info`` and the storage readers run with the unpicklers
  replaced by tripwires.
* Crafted files, built from scratch with ``h5py``/``h5netcdf`` (wrong dtypes, shapes that do
  not match the header, huge declared shapes with no data, invalid/deep/mistyped JSON
  attributes, links into other files, foreign, empty, text and truncated files) and crafted
  TOML (huge, invalid UTF-8, deeply nested, special files): every reader answers with
  ``StorageError`` (a ``ValueError``), ``ValueError`` or ``TypeError`` naming the file, within
  seconds and without allocating what the file declares. :func:`bounded` caps time and
  address space, so a reader that would hang or allocate terabytes fails the test instead of
  the machine.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import pickle
import resource
import signal
import time
from pathlib import Path

import h5netcdf
import h5py
import numpy as np
import pytest
import torch

import enkal
from enkal import storage
from enkal.cli import main
from enkal.config import MAX_CONFIG_BYTES, load_toml
from enkal.errors import StorageError

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("enkal", "models", "problems")


# -- bounded time and memory ---------------------------------------------------------------
class Exhausted(BaseException):
    """Raised by :func:`bounded` when the time is up (a BaseException, so that no
    ``except Exception`` in the code under test swallows it)."""


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def bounded(seconds: float = 5.0, memory: int = 512 << 20):
    """Run the block with at most ``seconds`` of wall time (SIGALRM raises
    :class:`Exhausted`) and ``memory`` bytes of new address space (allocations beyond fail
    with ``MemoryError``/``RuntimeError`` instead of swapping the machine to death)."""
    def alarm(signum, frame):
        raise Exhausted(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + memory
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    start = time.monotonic()
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # pytest-timeout's, if any
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if outer > 0:  # give the outer timer back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.01))


def expect_clear_error(read, path: Path, *, seconds: float = 5.0):
    """``read()`` must raise StorageError/ValueError/TypeError naming ``path``, quickly and
    without a big allocation; return the error."""
    try:
        with bounded(seconds):
            read()
    except Exhausted:
        pytest.fail(f"{path.name}: no answer within {seconds} s (a hang)")
    except MemoryError as err:
        pytest.fail(f"{path.name}: MemoryError ({err}): the reader allocated what the file "
                    "declares instead of checking it")
    except (StorageError, ValueError, TypeError) as err:
        assert path.name in str(err), f"the error does not name the file: {err!r}"
        return err
    pytest.fail(f"{path.name}: accepted a crafted file")


def info_fails_cleanly(path: Path, capsys) -> None:
    """``enkal info`` on a crafted file: exit status 1 or 2 and one line on stderr naming
    the file; no exception escapes, no hang, no big allocation."""
    capsys.readouterr()
    try:
        with bounded(10.0):
            rc = main(["info", str(path)])
    except Exhausted:
        pytest.fail(f"enkal info {path.name}: no answer within 10 s")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc in (1, 2), f"enkal info {path.name}: exit status {rc}"
    assert len(err) == 1 and path.name in err[0], err


# -- static: no unpickling or evaluation anywhere in the sources ------------------------------
UNSAFE = {
    "eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec",
    "importlib.import_module",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
    "_pickle.Unpickler", "cPickle.load", "cPickle.loads",
    "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads", "joblib.load",
    "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle",
    "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
    "yaml.full_load_all",
}
UNSAFE_MODULES = {"marshal", "shelve", "dill", "yaml", "joblib"}
#: (file, enclosing function, call) that are not read paths, with the reason
ALLOWED = {
    # the Dask worker unpickles the model bytes that _serialise_model (cloudpickle) made on
    # the client in the same run and shipped through Dask's own pickle-based transport:
    # never a file, never bytes from a user's input
    ("enkal/executors.py", "_evaluate_block", "pickle.loads"),
    # a TOML configuration names the user's model ([model] target/rhs): importing it is code
    # execution by design, as running a script is (docs/config.md says so); data files are
    # only parsed as numbers (tests/test_config_user.py checks one naming a module)
    ("problems/parsing.py", "import_target", "importlib.import_module"),
}


class _Scanner(ast.NodeVisitor):
    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.scope: list[str] = []
        self.found: list[tuple[int, str, str]] = []  # (line, function, what)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                a.name.split(".")[0]
            if a.name.split(".")[0] in UNSAFE_MODULES:
                self._flag(node, f"import {a.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        if (node.module or "").split(".")[0] in UNSAFE_MODULES:
            self._flag(node, f"from {node.module} import ...")

    def _scoped(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def _name(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._name(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def _flag(self, node: ast.AST, what: str) -> None:
        self.found.append((node.lineno, self.scope[-1] if self.scope else "<module>", what))

    def visit_Call(self, node: ast.Call) -> None:
        name = self._name(node.func)
        if name is not None:
            short = name.replace("numpy.", "np.", 1) if name.startswith("numpy.") else name
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if name in UNSAFE:
                self._flag(node, name)
            elif name == "torch.load":
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    self._flag(node, "torch.load without weights_only=True")
            elif short in ("np.load", "np.lib.format.read_array"):
                a = kw.get("allow_pickle")
                if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                    self._flag(node, f"{short}(allow_pickle=...)")
        self.generic_visit(node)


def scan(source: str) -> list[tuple[int, str, str]]:
    scanner = _Scanner()
    scanner.visit(ast.parse(source))
    return scanner.found


def _sources():
    for d in SOURCE_DIRS:
        yield from sorted((ROOT / d).rglob("*.py"))


def test_the_scanner_finds_what_it_looks_for():
    found = {what for _, _, what in scan(
        "import pickle as pk\nimport numpy as np\nimport torch, yaml\n"
        "from marshal import loads\nfrom builtins import eval as ev\n"
        "def f(b, s):\n"
        "    pk.loads(b); np.load(b, allow_pickle=True); np.load(b, allow_pickle=False)\n"
        "    torch.load(b); torch.load(b, weights_only=True); torch.load(b, weights_only=s)\n"
        "    yaml.safe_load(s); yaml.load(s); eval(s); exec(s); ev(s); loads(b)\n"
        "    __import__(s); cloudpickle.dumps(b)\n")}
    assert found == {
        "pickle.loads", "np.load(allow_pickle=...)", "torch.load without weights_only=True",
        "import yaml", "from marshal import ...", "yaml.load", "eval", "exec",
        "builtins.eval", "marshal.loads", "__import__",
    }


def test_no_unpickling_or_evaluation_in_the_sources():
    offending = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for line, function, what in scan(path.read_text(encoding="utf-8")):
            if (rel, function, what) not in ALLOWED:
                offending.append(f"{rel}:{line} in {function}: {what}")
    assert offending == []


def test_toml_is_parsed_by_the_standard_library_in_one_place():
    from enkal import config

    assert config.tomllib.__name__ in ("tomllib", "tomli")  # tomli: Python 3.10's backport
    readers = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                top = name.split(".")[0]
                assert top not in ("toml", "tomlkit", "pytoml", "rtoml", "qtoml"), \
                    f"{path}: imports {name}; TOML is read with the standard library"
                if top in ("tomllib", "tomli"):
                    readers.append(path.relative_to(ROOT).as_posix())
    assert set(readers) == {"enkal/config.py"}  # everything else goes through load_toml


# -- dynamic: tripwires on the unpicklers ------------------------------------------------------
def test_read_paths_never_unpickle(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "l63.toml"
    text = (ROOT / "problems" / "lorenz63.toml").read_text()
    cfg.write_text(text.replace("ensemble_size = 100", "ensemble_size = 8")
                   .replace("stop = 2.0", "stop = 0.3"))
    out = tmp_path / "run.h5"

    def tripwire(*args, **kwargs):
        raise AssertionError("a read path unpickles")

    for obj, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                      (torch, "load"), (np, "load")]:
        monkeypatch.setattr(obj, name, tripwire)
    assert main(["run", str(cfg), "--out", str(out), "--max-iterations", "1", "--quiet"]) == 0
    assert main(["info", str(out)]) == 0
    with enkal.open(out) as ds:
        ds.load()
    from enkal.problems import estimation

    exp = estimation.build(load_toml(cfg))
    state = storage.read_checkpoint(tmp_path / "run.ckpt.h5", exp.smoother)
    assert state.iteration == 1
    capsys.readouterr()


# -- crafted checkpoints -------------------------------------------------------------------
SMOOTHER = enkal.EnsembleSmoother(enkal.Observations([1.0, 2.0], noise_std=1.0),
                                  schedule=enkal.ESMDA((2.0, 2.0)), seed=0)
RNG = torch.Generator().manual_seed(0).get_state().numpy()


def _checkpoint(path: Path, *, attrs=None, drop=(), datasets=None) -> Path:
    """A checkpoint built from scratch: 4 members, 3 parameters, the ESMDA state after one
    update; ``attrs`` override the header, ``datasets(f)`` replaces the arrays it writes."""
    header = {
        "enkal_format": "enkal-checkpoint", "enkal_format_version": 1, "iteration": 1,
        "schedule": json.dumps({"type": "ESMDAState", "iteration": 1}),
        "config": json.dumps(SMOOTHER.config()), "parameters_dtype": "float64",
        "n_members": 4, "n_parameters": 3, "rng_state_size": RNG.size, "device_type": "cpu",
        "has_mask": 0,
    }
    header.update(attrs or {})
    with h5py.File(path, "w") as f:
        for k, v in header.items():
            if k not in drop:
                f.attrs[k] = v
        written = datasets(f) if datasets is not None else set()
        if "parameters" not in written:
            f.create_dataset("parameters", data=np.arange(12.0).reshape(4, 3), chunks=(4, 3),
                             fletcher32=True)
        if "rng_state" not in written:
            f.create_dataset("rng_state", data=RNG, chunks=(RNG.size,), fletcher32=True)
    return path


def _params(**kwargs):
    def write(f):
        f.create_dataset("parameters", **kwargs)
        return {"parameters"}
    return write


def _link(link, *, target_file=None):
    def write(f):
        if target_file is not None:
            with h5py.File(target_file, "w") as g:
                g["data"] = np.full((4, 3), 42.0)
        else:
            f["elsewhere"] = np.full((4, 3), 42.0)
        f["parameters"] = link
        return {"parameters"}
    return write


COMPOUND = np.dtype([("a", "f8"), ("b", "i4")])
CHECKPOINTS = {
    "int_parameters": dict(datasets=_params(data=np.zeros((4, 3), np.int64))),
    "string_parameters": dict(datasets=_params(data=np.full((4, 3), "x", dtype=object),
                                               dtype=h5py.string_dtype())),
    "vlen_parameters": dict(datasets=_params(shape=(4, 3), dtype=h5py.vlen_dtype("f8"))),
    "compound_parameters": dict(datasets=_params(data=np.zeros((4, 3), COMPOUND))),
    "float32_declared_float64": dict(datasets=_params(data=np.zeros((4, 3), np.float32))),
    "parameters_a_group": dict(datasets=lambda f: (f.create_group("parameters"),
                                                   {"parameters"})[1]),
    "shape_not_as_declared": dict(attrs={"n_members": 5}),
    "rng_state_not_as_declared": dict(attrs={"rng_state_size": 10}),
    "rng_state_not_a_generator_state": dict(
        attrs={"rng_state_size": 10},
        datasets=lambda f: (f.create_dataset("rng_state", data=np.zeros(10, np.uint8)),
                            {"rng_state"})[1]),
    "rng_state_int64": dict(datasets=lambda f: (f.create_dataset(
        "rng_state", data=RNG.astype(np.int64)), {"rng_state"})[1]),
    # 10^18 float64 declared, nothing written: must be refused, not allocated
    "huge_declared_shape": dict(attrs={"n_members": 10**12, "n_parameters": 10**6},
                                datasets=_params(shape=(10**12, 10**6), dtype="f8",
                                                 chunks=(1, 1000))),
    "huge_declared_rng_state": dict(
        attrs={"rng_state_size": 10**15},
        datasets=lambda f: (f.create_dataset("rng_state", shape=(10**15,), dtype="u1",
                                             chunks=(1 << 20,)), {"rng_state"})[1]),
    # 1.6 GB declared, nothing written: a file of a few kB cannot hold it
    "declared_bigger_than_the_file": dict(attrs={"n_members": 10**8, "n_parameters": 2},
                                          datasets=_params(shape=(10**8, 2), dtype="f8",
                                                           chunks=(10**5, 2))),
    "nan_parameters": dict(datasets=_params(data=np.full((4, 3), np.nan))),
    "schedule_invalid_json": dict(attrs={"schedule": "{not json"}),
    "schedule_deeply_nested_json": dict(attrs={"schedule": "[" * 100_000 + "]" * 100_000}),
    "schedule_a_list": dict(attrs={"schedule": "[1, 2]"}),
    "schedule_unknown_field": dict(attrs={"schedule": json.dumps(
        {"type": "ESMDAState", "bogus": 1})}),
    "schedule_field_of_wrong_type": dict(attrs={"schedule": json.dumps(
        {"type": "ESMDAState", "iteration": "one"})}),
    "schedule_field_a_table": dict(attrs={"schedule": json.dumps(
        {"type": "ESMDAState", "iteration": {"a": [1]}})}),
    "schedule_type_a_number": dict(attrs={"schedule": json.dumps({"type": 5})}),
    "config_invalid_json": dict(attrs={"config": "{"}),
    "config_deeply_nested_json": dict(attrs={"config": "[" * 100_000 + "]" * 100_000}),
    "iteration_a_string": dict(attrs={"iteration": "abc"}),
    "iteration_not_an_integer": dict(attrs={"iteration": 2.5}),
    "iteration_nan": dict(attrs={"iteration": float("nan")}),
    "iteration_an_array": dict(attrs={"iteration": np.arange(3)}),
    "iteration_negative": dict(attrs={"iteration": -1}),
    "n_members_a_string": dict(attrs={"n_members": "four"}),
    "n_members_not_an_integer": dict(attrs={"n_members": 4.7}),
    "n_members_negative": dict(attrs={"n_members": -4}),
    "dtype_not_a_dtype": dict(attrs={"parameters_dtype": "Tensor"}),
    "dtype_an_integer_type": dict(attrs={"parameters_dtype": "int64"}),
    "dtype_dunder": dict(attrs={"parameters_dtype": "__builtins__"}),
    "dtype_invalid_utf8": dict(attrs={"parameters_dtype": np.bytes_(b"\xff\xfe")}),
    "device_unknown": dict(attrs={"device_type": "bogus"}),
    "has_mask_a_string": dict(attrs={"has_mask": "yes"}),
    "has_mask_without_mask": dict(attrs={"has_mask": 1}),
    "mask_not_boolean": dict(attrs={"has_mask": 1}, datasets=lambda f: (f.create_dataset(
        "mask", data=np.array([0, 1, 7], np.uint8)), set())[1]),
    "missing_header_entry": dict(drop=("n_members",)),
    "missing_format": dict(drop=("enkal_format",)),
    "newer_format_version": dict(attrs={"enkal_format_version": 99}),
    "format_version_a_string": dict(attrs={"enkal_format_version": "one"}),
    "history_format": dict(attrs={"enkal_format": "enkal-history"}),
    # links: the arrays must be the file's own datasets, not something a link points at
    "parameters_external_link": dict(datasets=None),  # built in the test (needs tmp_path)
    "parameters_external_link_missing": dict(datasets=_link(
        h5py.ExternalLink("/nonexistent/enkal.h5", "/data"))),
    "parameters_soft_link_elsewhere": dict(datasets=_link(h5py.SoftLink("/elsewhere"))),
    "parameters_dangling_soft_link": dict(datasets=lambda f: (
        f.__setitem__("parameters", h5py.SoftLink("/nope")), {"parameters"})[1]),
    "parameters_soft_link_loop": dict(datasets=lambda f: (
        f.__setitem__("parameters", h5py.SoftLink("/parameters")), {"parameters"})[1]),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_crafted_checkpoints_raise_clear_errors(case, tmp_path):
    spec = dict(CHECKPOINTS[case])
    if case == "parameters_external_link":
        spec["datasets"] = _link(h5py.ExternalLink(str(tmp_path / "other.h5"), "/data"),
                                 target_file=tmp_path / "other.h5")
    path = _checkpoint(tmp_path / f"{case}.h5", **spec)
    expect_clear_error(lambda: storage.read_checkpoint(path, SMOOTHER), path)


def test_unexpected_checkpoint_attributes_are_ignored(tmp_path):
    """Extra attributes (of any type) are not read as anything: the state is the file's."""
    good = storage.read_checkpoint(_checkpoint(tmp_path / "good.h5"), SMOOTHER)
    path = _checkpoint(tmp_path / "extra.h5", attrs={
        "__class__": "os.system", "__reduce__": np.void(b"\x80\x04K\x01."),
        "pickle": np.frombuffer(pickle.dumps(print), np.uint8), "big": np.zeros(1000)})
    with bounded():
        state = storage.read_checkpoint(path, SMOOTHER)
    assert torch.equal(state.parameters, good.parameters)
    assert torch.equal(state.rng_state, good.rng_state) and state.schedule == good.schedule


# -- crafted history files ------------------------------------------------------------------
LAYOUT = [{"name": n, "shape": [], "offset": i, "constraint": {"type": "Real"}}
          for i, n in enumerate("abc")]


def _history(path: Path, *, attrs=None, drop=(), dtype="f8", data=None, iterations=None,
             after=None) -> Path:
    """A history file built from scratch with h5netcdf (the schema of docs/schema.md: 2
    rows, 4 members, 3 parameters, 2 outputs); ``after(f)`` edits it with h5py."""
    header = {"enkal_format": "enkal-history", "enkal_format_version": 1,
              "layout": json.dumps(LAYOUT)}
    header.update(attrs or {})
    its = np.arange(2) if iterations is None else np.asarray(iterations)
    with h5netcdf.File(path, "w") as nc:
        nc.dimensions = {"iteration": None, "member": 4, "parameter": 3, "output": 2}
        nc.create_variable("iteration", ("iteration",), "i8", chunks=(1024,))
        nc.resize_dimension("iteration", its.size)
        nc["iteration"][:] = its
        nc.create_variable("member", ("member",), "i8", data=np.arange(4))
        nc.create_variable("parameter", ("parameter",), h5py.string_dtype(),
                           data=np.array(list("abc"), dtype=object))
        nc.create_variable("output", ("output",), h5py.string_dtype(),
                           data=np.array(["y0", "y1"], dtype=object))
        v = nc.create_variable("parameters", ("iteration", "member", "parameter"), dtype,
                               chunks=(1, 4, 3))
        v[:] = np.zeros((its.size, 4, 3)) if data is None else data
        nc.create_variable("stored", ("iteration",), "i1", chunks=(1024,))
        nc["stored"][:] = np.ones(its.size, np.int8)
        nc.create_variable("observations", ("output",), "f8", data=np.zeros(2))
        nc.create_variable("noise_std", ("output",), "f8", data=np.ones(2))
        nc.create_variable("mask", ("parameter",), "i1", data=np.ones(3, np.int8))
        for k, v in header.items():
            if k not in drop:
                nc.attrs[k] = v
    if after is not None:
        with h5py.File(path, "r+") as f:
            after(f)
    return path


def _huge_rows(f):
    for name in ("iteration", "parameters", "stored"):
        f[name].resize(10**12, axis=0)  # declared, never written


def _layout(rows):
    return {"attrs": {"layout": json.dumps(rows)}}


HISTORIES = {
    "int_parameters": dict(dtype="i8", data=np.zeros((2, 4, 3), np.int64)),
    "string_parameters": dict(dtype=h5py.string_dtype(),
                              data=np.full((2, 4, 3), "x", dtype=object)),
    "compound_parameters": dict(dtype=COMPOUND, data=np.zeros((2, 4, 3), COMPOUND)),
    "huge_declared_rows": dict(after=_huge_rows),
    "layout_invalid_json": dict(attrs={"layout": "{"}),
    "layout_deeply_nested_json": dict(attrs={"layout": "[" * 100_000 + "]" * 100_000}),
    "layout_list_of_numbers": _layout([1, 2, 3]),
    "layout_a_table": dict(attrs={"layout": '{"a": 1}'}),
    "layout_constraint_a_string": _layout([{"name": "a", "shape": [3],
                                            "constraint": "Real"}]),
    "layout_constraint_code": _layout([{"name": "a", "shape": [3],
                                        "constraint": {"type": "__import__('os')"}}]),
    "layout_shape_a_string": _layout([{"name": "a", "shape": "abc"}]),
    "layout_huge_shape": _layout([{"name": "a", "shape": [10**12, 10**12]}]),
    "layout_negative_shape": _layout([{"name": "a", "shape": [-3]},
                                      {"name": "b", "shape": [6]}]),
    "layout_bounds_not_numbers": _layout([{"name": "a", "shape": [3], "constraint": {
        "type": "Bounded", "low": "x", "high": 1}}]),
    "layout_missing": dict(drop=("layout",)),
    "layout_a_number": dict(attrs={"layout": 5}),
    "iterations_not_increasing": dict(iterations=[3, 1]),
    "format_version_a_string": dict(attrs={"enkal_format_version": "x"}),
    "checkpoint_format": dict(attrs={"enkal_format": "enkal-checkpoint"}),
    "missing_format": dict(drop=("enkal_format",)),
    "external_link": dict(),  # built in the test (needs tmp_path)
    "external_link_missing": dict(after=lambda f: f.__setitem__(
        "extra", h5py.ExternalLink("/nonexistent/enkal.h5", "/data"))),
    "dangling_soft_link": dict(after=lambda f: f.__setitem__("extra", h5py.SoftLink("/no"))),
}


def _build_history(case: str, tmp_path: Path) -> Path:
    spec = dict(HISTORIES[case])
    if case == "external_link":
        other = tmp_path / "other.h5"
        with h5py.File(other, "w") as g:
            g["data"] = np.full((2, 4, 3), 42.0)
        spec["after"] = lambda f: f.__setitem__("extra", h5py.ExternalLink(str(other),
                                                                          "/data"))
    return _history(tmp_path / f"{case}.h5", **spec)


@pytest.mark.parametrize("case", sorted(HISTORIES))
def test_crafted_histories_raise_clear_errors(case, tmp_path, capsys):
    path = _build_history(case, tmp_path)
    expect_clear_error(lambda: enkal.open(path).close(), path)
    info_fails_cleanly(path, capsys)


def test_unexpected_history_attributes_are_ignored(tmp_path, capsys):
    path = _history(tmp_path / "extra.h5", attrs={"__reduce__": "os.system",
                                                   "x": np.zeros(100)})
    with bounded():
        with enkal.open(path) as ds:
            assert ds.parameter.values.tolist() == ["a", "b", "c"]
        assert main(["info", str(path)]) == 0
    capsys.readouterr()


def _not_enkal(path: Path, kind: str, tmp_path: Path) -> Path:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("iteration,parameters\n0,1.5\n")
    elif kind == "foreign_hdf5":
        with h5py.File(path, "w") as f:
            f["parameters"] = np.zeros((4, 3))
            f.attrs["layout"] = json.dumps(LAYOUT)
    elif kind == "truncated_history":
        whole = _history(tmp_path / "whole.h5").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "truncated_checkpoint":
        whole = _checkpoint(tmp_path / "whole.h5").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "hdf5_signature_only":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


@pytest.mark.parametrize("kind", ["empty", "text", "foreign_hdf5", "truncated_history",
                                  "truncated_checkpoint", "hdf5_signature_only",
                                  "random_bytes"])
def test_files_that_are_not_enkal_files(kind, tmp_path, capsys):
    path = _not_enkal(tmp_path / f"{kind}.h5", kind, tmp_path)
    expect_clear_error(lambda: enkal.open(path).close(), path)
    expect_clear_error(lambda: storage.read_checkpoint(path, SMOOTHER), path)
    info_fails_cleanly(path, capsys)


def test_directories_and_missing_files(tmp_path, capsys):
    (tmp_path / "dir.h5").mkdir()
    for path in (tmp_path / "dir.h5", tmp_path / "missing.h5"):
        with pytest.raises((OSError, ValueError), match=path.name):
            enkal.open(path)
        with pytest.raises((OSError, ValueError), match=path.name):
            storage.read_checkpoint(path, SMOOTHER)
        info_fails_cleanly(path, capsys)


# -- crafted TOML ------------------------------------------------------------------------
DEPTH = 50_000
TOMLS = {
    "too_large": "# " + "x" * MAX_CONFIG_BYTES + "\n",
    "invalid_utf8": b'name = "\xff\xfe"\n',
    "utf16": "name = 'x'\n".encode("utf-16"),
    "nul_byte": "name = 1\x00\n",
    "deeply_nested_arrays": "a = " + "[" * DEPTH + "]" * DEPTH + "\n",
    "deeply_nested_inline_tables": "a = " + "{b = " * DEPTH + "1" + "}" * DEPTH + "\n",
    # under the size limit, but a parser quadratic in the key length needs minutes and GBs
    "long_dotted_key": "a" + ".a" * 100_000 + " = 1\n",
    "long_table_header": "[" + ".".join(["t"] * 100_000) + "]\nx = 1\n",
}


@pytest.mark.parametrize("case", sorted(TOMLS))
def test_crafted_toml_raises_clear_errors(case, tmp_path):
    path = tmp_path / f"{case}.toml"
    text = TOMLS[case]
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    err = expect_clear_error(lambda: load_toml(path), path)
    if case == "too_large":
        assert str(MAX_CONFIG_BYTES) in str(err)


def test_toml_screen_skips_comments_and_strings(tmp_path):
    """Quotes and brackets in comments, and brackets, '#' and escaped quotes in strings,
    are not structure: a quote in a comment must not hide what follows from the screen,
    and brackets there must not count as nesting."""
    path = tmp_path / "c.toml"
    deep = "[" * 100 + "]" * 100
    for head in ("# it's\n", '# say "hi\n', 'a = "it\'s"  # it\'s\n', 'a = "q\\"["  # "\n'):
        path.write_text(head + f"b = {deep}\n")
        with pytest.raises(ValueError, match="nested deeper than 64 levels"):
            load_toml(path)
    fine = ("# ranges like [0, 1) and {a\n" * 100 + "a = 'it'  # it's [\n"
            'b = "[[[# not a comment"\nc = """\n' + "[{" * 100 + '\n""""\n'
            "d = '''\n" + "[" * 100 + "'''\ne = [[1], [2]]\n")
    path.write_text(fine)
    assert load_toml(path) == {"a": "it", "b": "[[[# not a comment",
                               "c": "[{" * 100 + '\n"', "d": "[" * 100, "e": [[1], [2]]}


@pytest.mark.parametrize("kind", ["directory", "dev_zero", "fifo"])
def test_toml_from_special_files(kind, tmp_path):
    """Not regular files: a directory, an endless device, a FIFO nobody writes to."""
    if kind == "directory":
        path = tmp_path / "dir.toml"
        path.mkdir()
    elif kind == "dev_zero":
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero")
    else:
        path = tmp_path / "fifo.toml"
        os.mkfifo(path)
    expect_clear_error(lambda: load_toml(path), path, seconds=3.0)


def test_cli_reports_crafted_toml_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\x00\x01\x02\xff" * 64)
    out = tmp_path / "out.h5"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.toml" in err[0]
    assert not out.exists()


# -- crafted state rows of history files (the history as its own checkpoint) ---------------
def _state_rows(path: Path, *, rng=None, rng_dtype="u1", device_type="cpu", schedules=None,
                sched_dtype=None, checksums=None, checksum_dtype="u8", flags=(5, 5),
                masks=None, iterations=(0, 1), data=None, attrs=None,
                after=None) -> Path:
    """A history of 2 rows, both holding a whole ESMDA state (``stored`` bit 4), built from
    scratch; the checksums are the right ones for what is written unless given."""
    x = np.arange(24.0).reshape(2, 4, 3) if data is None else data
    header = {"config": json.dumps(SMOOTHER.config()), "parameters_dtype": "float64"}
    header.update(attrs or {})
    _history(path, attrs=header, data=x, iterations=list(iterations))
    g = np.stack([RNG, RNG]) if rng is None else rng
    texts = schedules or [json.dumps({"type": "ESMDAState", "iteration": int(k)})
                          for k in iterations]
    if checksums is None:
        checksums = [storage._state_checksum(x[r], g[r].astype(np.uint8), str(texts[r]),
                                             None if masks is None else masks[r],
                                             int(iterations[r])) for r in range(2)]
    with h5netcdf.File(path, "a") as nc:
        nc.dimensions["rng_byte"] = g.shape[1]
        v = nc.create_variable("rng_state", ("iteration", "rng_byte"), rng_dtype,
                               chunks=(1, g.shape[1]))
        v[:] = g
        v.attrs["device_type"] = device_type
        v = nc.create_variable("schedule_state", ("iteration",),
                               sched_dtype or h5py.string_dtype(), chunks=(16,))
        v[:] = np.array(texts, dtype=object if sched_dtype is None else sched_dtype)
        v = nc.create_variable("state_checksum", ("iteration",), checksum_dtype, chunks=(16,))
        v[:] = np.array(checksums, dtype=checksum_dtype)
        if masks is not None:
            v = nc.create_variable("state_mask", ("iteration", "parameter"), masks.dtype,
                                   chunks=(1, masks.shape[1]))
            v[:] = masks
    with h5py.File(path, "r+") as f:
        f["stored"][:] = np.array(flags, np.int8)
        if after is not None:
            after(f)
    return path


def _swap(name, link):
    def edit(f):
        f["elsewhere"] = f[name][...]
        del f[name]
        f[name] = link
    return edit


STATE_HISTORIES = {
    "rng_state_int64": dict(rng_dtype="i8"),
    "rng_state_not_a_cpu_state": dict(rng=np.zeros((2, 10), np.uint8)),
    "rng_state_device_unknown": dict(device_type="bogus"),
    "rng_state_soft_link": dict(after=_swap("rng_state", h5py.SoftLink("/elsewhere"))),
    "rng_state_external_link": dict(after=_swap("rng_state", h5py.ExternalLink(
        "/nonexistent/enkal.h5", "/data"))),
    "schedule_state_floats": dict(sched_dtype="f8", schedules=[0.5, 1.5]),
    "schedule_state_invalid_json": dict(schedules=["{", "{"]),
    "schedule_state_deeply_nested": dict(schedules=["[" * 10_000 + "]" * 10_000] * 2),
    "schedule_state_a_list": dict(schedules=["[1, 2]"] * 2),
    "schedule_state_field_a_string": dict(schedules=[json.dumps(
        {"type": "ESMDAState", "iteration": "one"})] * 2),
    "schedule_state_of_another_schedule": dict(schedules=[json.dumps(
        {"type": "AnnealingState", "rho": 1.0, "iteration": 0})] * 2),
    "schedule_state_unknown_field": dict(schedules=[json.dumps(
        {"type": "ESMDAState", "bogus": 1})] * 2),
    "checksums_wrong": dict(checksums=[1, 2]),
    "checksums_floats": dict(checksums=[1.0, 2.0], checksum_dtype="f8"),
    "state_mask_not_boolean": dict(flags=(13, 13), masks=np.full((2, 3), 7, np.int8)),
    "state_mask_wrong_shape": dict(flags=(13, 13), after=lambda f: f.create_dataset(
        "state_mask", data=np.ones((2, 5), np.int8), maxshape=(None, 5))),
    "state_mask_flag_without_state_mask": dict(flags=(13, 13)),
    "parameters_dtype_dunder": dict(attrs={"parameters_dtype": "__class__"}),
    "parameters_dtype_an_integer_type": dict(attrs={"parameters_dtype": "int64"}),
    "parameters_dtype_not_the_stored_one": dict(attrs={"parameters_dtype": "float32"}),
    "parameters_nan": dict(data=np.full((2, 4, 3), np.nan)),
    "iterations_negative": dict(iterations=(-2, -1)),
    "no_row_holds_a_state": dict(flags=(1, 1)),
    "config_invalid_json": dict(attrs={"config": "{"}),
    "config_deeply_nested": dict(attrs={"config": "[" * 100_000 + "]" * 100_000}),
    "huge_declared_rows": dict(after=_huge_rows),
}


def test_the_state_history_builder_makes_a_valid_file(tmp_path):
    """So that each crafted case below fails for its own reason."""
    path = _state_rows(tmp_path / "good.h5")
    with bounded():
        state = storage.read_state(path, SMOOTHER)
    assert state.iteration == 1 and state.schedule.iteration == 1
    assert torch.equal(state.parameters, torch.arange(12.0, 24.0, dtype=torch.float64)
                       .reshape(4, 3))
    assert torch.equal(state.rng_state, torch.from_numpy(RNG))


@pytest.mark.parametrize("case", sorted(STATE_HISTORIES))
def test_crafted_state_rows_raise_clear_errors(case, tmp_path):
    path = _state_rows(tmp_path / f"{case}.h5", **STATE_HISTORIES[case])
    expect_clear_error(lambda: storage.read_state(path, SMOOTHER), path)
    expect_clear_error(lambda: enkal.run(
        SMOOTHER,
        enkal.CallableModel(lambda x: x[:, :2], parameters=["a", "b", "c"], output_size=2),
        resume=path, store=tmp_path / "out.h5"), path)


@pytest.mark.parametrize("policy", ["{", "[1]", '{"bogus": 1}', '{"every": 0}',
                                    '{"compression": "zstd"}', '{"chunk_bytes": "big"}',
                                    "[" * 1000 + "]" * 1000])
def test_crafted_history_policy_of_a_continued_file(policy, tmp_path):
    """``run(resume=history)`` continues the file with the policy it declares."""
    path = _state_rows(tmp_path / "policy.h5", attrs={"history_policy": policy})
    model = enkal.CallableModel(lambda x: x[:, :2], parameters=["a", "b", "c"], output_size=2)
    expect_clear_error(lambda: enkal.run(SMOOTHER, model, resume=path), path)
