"""The wheel installs `enkal.models` and `enkal.problems`, never top-level `models`/`problems`,
and the core imports neither."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_core_does_not_import_models_or_problems():
    for path in (ROOT / "enkal").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")
                assert root[0] not in ("models", "problems"), f"{path} imports {name}"
                assert root[:2] not in (["enkal", "models"], ["enkal", "problems"]), \
                    f"{path} imports {name}"


@pytest.mark.timeout(300)
def test_wheel_installs_namespaced_packages(tmp_path):
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(ROOT)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("enkal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "enkal/models/__init__.py" in names
    assert "enkal/problems/__init__.py" in names
    assert not any(n.startswith(("models/", "problems/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "-q",
         str(wheel)],
        check=True, cwd=tmp_path,
    )
    # dependencies (torch, numpy, ...) come from this environment's site-packages via
    # PYTHONPATH; .pth files there (our editable install) are not processed, so the
    # imported enkal is the wheel's.
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    code = ("import enkal, enkal.models, enkal.problems, importlib.util; "
            "print(enkal.__file__); "
            "print(importlib.util.find_spec('models') is None, "
            "importlib.util.find_spec('problems') is None)")
    out = subprocess.run([str(vpy), "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env).stdout.split("\n")
    assert str(venv) in out[0]
    assert out[1] == "True True"
