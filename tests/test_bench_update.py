"""bench/update.py's floors and devices (issue #16): the copy floor and its ratios, bfloat16
ensembles, ``--no-alloc``, and ``--device`` refused by name where it does not exist. The
timings themselves are not checked (benchmarks, not tests): only what the record holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import update

    return update


def _record(capsys) -> dict:
    import json

    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("BENCH_JSON ")][-1]
    return json.loads(line[len("BENCH_JSON "):])


def test_rows_carry_the_copy_floor_and_bfloat16_is_judged_against_float32s(bench, capsys):
    assert bench.main(["--P", "2000", "--M", "30", "--ensemble", "8", "--repeats", "1",
                       "--dtypes", "float32", "bfloat16", "--no-peer", "--no-alloc"]) == 0
    rec = _record(capsys)
    assert rec["device"] == "cpu"
    rows = {r["dtype"]: r for r in rec["rows"]}
    assert set(rows) == {"float32", "bfloat16"}
    for r in rows.values():
        assert r["copy_ms"] > 0 and r["sr_ms"] > 0
        assert r["sr_over_copy"] == pytest.approx(r["sr_ms"] / r["copy_ms"], rel=1e-3)
        # one read and one write of the (E, P) ensemble in the copy's time
        size = {"float32": 4, "bfloat16": 2}[r["dtype"]]
        assert r["copy_gb_per_s"] == pytest.approx(2 * 8 * 2000 * size / r["copy_ms"] / 1e6,
                                                   rel=1e-3)
        assert "sr_alloc_ms" not in r and r["sr_alloc_over_floor"] is None
    bf = rec["headline"]["bfloat16"]
    assert bf["sr_over_float32_copy"] == pytest.approx(
        rows["bfloat16"]["sr_ms"] / rows["float32"]["copy_ms"], rel=1e-3)


def test_an_absent_device_is_refused_naming_the_flag(bench):
    with pytest.raises(SystemExit, match="--device"):
        bench.main(["--device", "nonsense", "--quick"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: CUDA is not available"):
            bench.main(["--device", "cuda", "--quick"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_gpu(bench, capsys):  # pragma: no cover - no GPU in CI
    assert bench.main(["--device", "cuda", "--P", "10000", "--M", "50", "--repeats", "1",
                       "--dtypes", "float32", "--no-peer"]) == 0
    rec = _record(capsys)
    assert rec["device"].startswith("cuda") and rec["rows"][0]["copy_ms"] > 0
