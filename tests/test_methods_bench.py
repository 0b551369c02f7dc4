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


def test_the_verdict_reads_the_acceptance_of_issue_17():
    """``verdict``: the best enkal row by error; the cheapest enkal row at or below IES
    ESMDA's error, and whether it used fewer forwards."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import methods
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def row(method, err, lo, hi, forwards):
        return {"problem": "p", "method": method, "err": err, "sd_min": lo, "sd_max": hi,
                "forwards": forwards}

    rows = [row("enkal ES-MDA", 0.2, 1.1, 1.3, 400), row("IES ESMDA", 0.3, 1.1, 1.3, 400),
            row("enkal GaussNewton", 0.25, 0.9, 1.5, 64), row("enkal UKI", 0.1, 1.0, 1.0, 105)]
    v = methods.verdict(rows)
    assert v["best"] == "enkal UKI" and v["within_0.5_sd"] and v["sd_in_0.7_1.4"]
    assert v["reaches_ies"] == "enkal GaussNewton" and v["reaches_ies_forwards"] == 64
    assert v["fewer_forwards"]
    v = methods.verdict([row("enkal ES-MDA", 0.6, 0.5, 1.0, 800), row("IES ESMDA", 0.3, 1, 1, 400)])
    assert not v["within_0.5_sd"] and not v["sd_in_0.7_1.4"]
    assert v["reaches_ies"] is None and not v["fewer_forwards"]


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


def test_the_sir_reference_is_the_exact_posterior():
    """An independent check of the stored MCMC reference: SIR's posterior on a grid (two
    parameters, 301 x 301 points within +- 10 posterior sds) has the reference's means
    within 0.05 posterior sd (the MC error is below 0.015 sd) and its sds within 3%
    (measured: 0.01 sd and 0.5%)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import methods
    finally:
        sys.path.remove(str(ROOT / "bench"))
    ref = json.loads((ROOT / "bench" / "reference" / "methods_mcmc.json").read_text())["sir"]
    pb = methods.Problem(methods.problems()["sir"], 0)
    w, axes = methods._grid(pb, ref["mean"], [10 * s for s in ref["sd"]], 301)
    for j, marg in enumerate((w.sum(1), w.sum(0))):
        mean = float((marg * axes[j]).sum())
        sd = float((marg * (axes[j] - mean) ** 2).sum().sqrt())
        assert abs(mean - ref["mean"][j]) < 0.05 * ref["sd"][j]
        assert abs(sd / ref["sd"][j] - 1) < 0.03
