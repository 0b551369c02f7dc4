"""bench/methods.py: the comparison of inversion methods against the stored MCMC reference
runs (``--quick``: two seeds, two data sets, the two-parameter SIR problem) and prints its
table and JSON line; the reference file holds every problem with a converged chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_chains_converged():
    """Every stored MCMC reference: Monte-Carlo error of the means under 5% of a posterior sd
    (the bench's error column is read to 0.1 sd) and enough steps after burn-in for 50
    autocorrelation times."""
    refs = json.loads((ROOT / "bench" / "reference" / "methods_mcmc.json").read_text())
    assert set(refs) == {"lorenz63", "lotka-volterra", "sir", "lorenz96"}
    for name, r in refs.items():
        assert r["se_over_sd"] < 0.05, name
        assert r["steps"] - r["burn"] >= 50 * max(r["tau"]), name
        assert 0.1 < r["acceptance"] < 0.9, name


def test_the_methods_benchmark_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "methods.py"), "--quick",
                           "--problems", "sir", "--json", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=600, env=env,
                          cwd=ROOT / "bench")
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in json.loads((tmp_path / "m.json").read_text())["rows"]}
    assert {"enkal ES-MDA", "enkal GaussNewton", "enkal UKI"} <= set(rows)
    for r in rows.values():
        assert r["forwards"] > 0 and 0 <= r["cov90"] <= 1
    assert proc.stdout.strip().splitlines()[-1].startswith("BENCH_JSON ")
