"""bench/gpu_session.sh, the one prepared command a session lent a GPU runs (issue #16): its
QUICK mode runs every step on the CPU, so a flag that drifts in a benchmark fails here and
not in scarce device time."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _session(out: Path, **env: str) -> str:
    """Run the QUICK session on the CPU into ``out``; its session.log."""
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_session.sh"), str(out)],
        env={**os.environ, "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable, **env},
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return (out / "session.log").read_text()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_every_step_runs_and_leaves_its_record(tmp_path):
    out = tmp_path / "gs"
    log = _session(out, OMP_NUM_THREADS="1", FIGURES=str(tmp_path / "figures"))
    assert "failed: none" in log
    steps = ["environment", "gpu_tests", "update", "update_profile", "forward",
             "training_seeds_0", "training_seeds_1_2", "training_e64", "training_bf16"]
    for name in steps:
        assert f"] {name}: exit 0 after" in log, log
    assert sorted(p.name for p in out.iterdir()) == ["bench.jsonl", "session.log",
                                                     "steps.log"]
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert [r["bench"] for r in records] == ["update", "update_profile", "forward",
                                             *["nn_training"] * 4]
    assert all(r["device"] == "cpu" for r in records)
    low = records[-1]
    assert (low["dtype"], low["forward_dtype"]) == ("bfloat16", "bfloat16")


def test_a_spent_budget_skips_the_steps_and_says_so(tmp_path):
    log = _session(tmp_path / "gs", BUDGET_S="0")
    assert re.search(r"\] update: skipped, -?\d+ s of the budget left", log), log
    assert "done: 0 benchmark record(s)" in log
