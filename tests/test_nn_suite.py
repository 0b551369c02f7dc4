"""The architecture suite of issue #15 (enkal.models.nn: cnn, gap_cnn, mlp(layer_norm=),
LeNet5(activation=, pool=)) and its benchmark script, bench/nn_suite.py.

Weights are compared exactly (``torch.equal``): a network built by the library and one built
by hand in the same construction order draw the same numbers from the same global seed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import enkal
from enkal.models.nn import AsImage, LeNet5, cnn, gap_cnn, mlp

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "nn_suite.py"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def n_par(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


# -- the architectures ----------------------------------------------------------------------
@pytest.mark.parametrize("build, expected", [
    (cnn, 6090),
    (functools.partial(cnn, nn.Tanh, nn.AvgPool2d), 6090),
    (gap_cnn, 5130),
    (functools.partial(mlp, [64, 32, 10]), 2410),
    (functools.partial(mlp, [64, 128, 64, 10], activation=nn.GELU, layer_norm=True), 17610),
    (LeNet5, 61706),
    (functools.partial(LeNet5, activation=nn.ReLU, pool=nn.MaxPool2d), 61706),
    (functools.partial(cnn, image=12, channels=(4, 8), n_classes=3), 40 + 296 + 8 * 9 * 3 + 3),
    (functools.partial(gap_cnn, image=12, channels=(4, 8), n_classes=3), 40 + 296 + 27),
])
def test_parameter_counts(build, expected):
    assert n_par(build()) == expected


@pytest.mark.parametrize("build", [cnn, functools.partial(cnn, nn.Tanh, nn.AvgPool2d), gap_cnn])
@pytest.mark.parametrize("image", [8, 12])
def test_conv_nets_take_flat_and_image_inputs(build, image):
    torch.manual_seed(0)
    net = build(image=image, n_classes=7)
    x = torch.randn(5, 1, image, image)
    out = net(x)
    assert out.shape == (5, 7)
    assert torch.equal(net(x.reshape(5, image * image)), out)


@pytest.mark.parametrize("shape", [(5, 63), (5, 3, 8, 8), (5, 8, 8), (64,)])
def test_conv_nets_refuse_other_input_shapes(shape):
    with pytest.raises(ValueError, match=r"inputs: expected \(B, 64\) or \(B, 1, 8, 8\)"):
        cnn()(torch.zeros(shape))


def test_cnn_initialises_as_a_hand_built_sequential():
    torch.manual_seed(3)
    net = cnn()
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 2 * 2, 10))
    assert same_weights(net, ref)
    assert [n for n, _ in net.named_parameters()] == [
        "1.weight", "1.bias", "4.weight", "4.bias", "8.weight", "8.bias"]
    x = torch.randn(6, 1, 8, 8)
    assert torch.equal(net(x), ref(x))


def test_gap_cnn_initialises_as_a_hand_built_sequential():
    torch.manual_seed(4)
    net = gap_cnn(nn.Tanh)
    torch.manual_seed(4)
    ref = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    assert same_weights(net, ref)
    x = torch.randn(6, 64)
    assert torch.equal(net(x), ref(x.reshape(6, 1, 8, 8)))


def _old_lenet5() -> dict[str, torch.Tensor]:
    """LeNet-5 as enkal.models.nn built it before the activation/pool arguments."""
    features = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten())
    classifier = nn.Sequential(
        nn.Linear(400, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, 10))
    return {**{f"features.{n}": p for n, p in features.named_parameters()},
            **{f"classifier.{n}": p for n, p in classifier.named_parameters()}}


def test_lenet5_default_is_unchanged():
    torch.manual_seed(11)
    new = dict(LeNet5().named_parameters())
    torch.manual_seed(11)
    old = _old_lenet5()
    assert list(new) == list(old)
    assert all(torch.equal(new[k], old[k]) for k in old)
    assert sum(p.numel() for p in new.values()) == 61706
    kinds = [type(m).__name__ for m in LeNet5().modules()]
    assert "Tanh" in kinds and "AvgPool2d" in kinds
    assert "ReLU" not in kinds and "MaxPool2d" not in kinds


def test_lenet5_variant_has_the_same_names_and_weights():
    torch.manual_seed(2)
    a = LeNet5()
    torch.manual_seed(2)
    b = LeNet5(activation=nn.ReLU, pool=nn.MaxPool2d)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert same_weights(a, b)
    kinds = {type(m).__name__ for m in b.modules()}
    assert {"ReLU", "MaxPool2d"} <= kinds and not {"Tanh", "AvgPool2d"} & kinds
    assert b(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_defaults_unchanged():
    torch.manual_seed(5)
    net = mlp([64, 32, 10])
    torch.manual_seed(5)
    ref = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    assert same_weights(net, ref)
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    torch.manual_seed(5)
    assert same_weights(mlp([64, 32, 10], layer_norm=False), ref)


def test_mlp_layer_norm_sits_before_each_hidden_activation():
    net = mlp([64, 128, 64, 10], activation=nn.GELU, layer_norm=True)
    assert [type(m).__name__ for m in net] == [
        "Linear", "LayerNorm", "GELU", "Linear", "LayerNorm", "GELU", "Linear"]
    assert net[1].normalized_shape == (128,) and net[4].normalized_shape == (64,)
    assert net(torch.zeros(2, 64)).shape == (2, 10)


def test_factories_are_accepted():
    net = cnn(functools.partial(nn.LeakyReLU, 0.2))
    assert isinstance(net[2], nn.LeakyReLU) and net[2].negative_slope == 0.2


@pytest.mark.parametrize("build, error, match", [
    (lambda: cnn(nn.ReLU()), TypeError, r"activation: .*instance.*pass the class"),
    (lambda: cnn(pool=2), TypeError, r"pool: expected a module class such as nn.MaxPool2d"),
    (lambda: cnn(nn.functional.relu), TypeError, r"activation: calling relu\(\) failed"),
    (lambda: LeNet5(pool=lambda k: k), TypeError, r"pool: .*returning int"),
    (lambda: LeNet5(activation="tanh"), TypeError, r"activation: expected a module class"),
    (lambda: LeNet5(0), ValueError, r"n_classes: expected an int >= 1"),
    (lambda: cnn(image=3), ValueError, r"image: expected an int >= 4"),
    (lambda: cnn(image=8.0), TypeError, r"image: expected an int"),
    (lambda: gap_cnn(image=0), ValueError, r"image: expected an int >= 1"),
    (lambda: cnn(channels=(16,)), ValueError, r"channels: expected two ints"),
    (lambda: gap_cnn(channels=16), TypeError, r"channels: expected two ints"),
    (lambda: gap_cnn(channels=(16, 0)), ValueError, r"channels: expected an int >= 1"),
    (lambda: cnn(n_classes=True), TypeError, r"n_classes: expected an int"),
    (lambda: mlp([64, 10], layer_norm="yes"), TypeError, r"layer_norm: expected True or False"),
    (lambda: mlp([64, 10], activation=nn.GELU()), TypeError, r"activation: .*instance"),
    (lambda: AsImage(-1), ValueError, r"image: expected an int >= 1"),
])
def test_bad_arguments_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()


# -- the benchmark script: helpers in process -------------------------------------------------
@pytest.fixture
def suite(monkeypatch):
    """bench/nn_suite.py as a module (bench/ is not a package: its scripts import _common)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import nn_suite

    return nn_suite


def test_suite_pairs_are_the_issues(suite):
    counts = {name: suite.n_parameters(name) for name in suite.PAIRS}
    assert counts == {"digits/cnn-tanh-avg": 6090, "digits/cnn-relu-max": 6090,
                      "digits/gap-relu": 5130, "digits/mlp-relu": 2410,
                      "digits/mlp-gelu-ln": 17610, "fashion/lenet5": 61706,
                      "fashion/lenet-relu-max": 61706}


def test_suite_selects_pairs_by_name_or_prefix(suite):
    assert len(suite.select_pairs(["digits"])) == 5
    assert suite.select_pairs(["fashion/lenet5"]) == ["fashion/lenet5"]
    assert suite.select_pairs(["digits/cnn,fashion/lenet5"]) == [
        "digits/cnn-tanh-avg", "digits/cnn-relu-max", "fashion/lenet5"]
    with pytest.raises(ValueError, match="--pairs: .*'mnist'"):
        suite.select_pairs(["mnist"])
    # the BatchNorm pair: by its full name only, after the seven, never in a prefix
    assert suite.n_parameters("digits/cnn-relu-bn") == 6186
    assert suite.select_pairs(["digits/cnn-relu-max", "digits/cnn-relu-bn"]) == [
        "digits/cnn-relu-max", "digits/cnn-relu-bn"]
    assert "digits/cnn-relu-bn" not in suite.select_pairs(["digits/cnn-relu"])


def test_suite_overall_target_judges_the_seven_pairs_only(suite):
    per_pair = [{"target": f"{p}: enkal within 3 points of AdamW", "verdict": "met"}
                for p in list(suite.PAIRS)[:-1] + ["digits/cnn-relu-bn"]]
    assert suite.overall_target(per_pair)["verdict"] == "n/a: 6 of 7 pairs judged"


def _run(seed, final):
    return {"seed": seed, "accuracy": [0.1, final], "wall_s": [0.0, 1.0],
            "step_s_median": 0.01}


def test_suite_paired_gaps_compare_seed_by_seed(suite):
    # AdamW's seeds 0-2 and enkal's 0, 1, 3: the gaps on the two common seeds only
    adamw = [_run(0, 0.860), _run(1, 0.840), _run(2, 0.900)]
    enkal = [_run(0, 0.820), _run(1, 0.830), _run(3, 0.990)]
    p = suite.paired_gaps(enkal, adamw)
    assert p["seeds"] == [0, 1] and p["gaps"] == pytest.approx([-4.0, -1.0])
    assert p["median"] == pytest.approx(-2.5) and p["n_within"] == 1
    assert suite.paired_gaps(enkal, []) is None
    summary = suite.summarize({"digits/mlp-relu": {"adamw": adamw, "enkal": enkal}})
    rows = summary["digits/mlp-relu"]["methods"]
    assert rows["adamw"]["paired"] is None and rows["enkal"]["paired"] == p
    # the difference of the medians (0.830 - 0.860) is not the median of the paired gaps
    assert rows["enkal"]["gap_points"] == pytest.approx(-3.0)
    table = "\n".join(suite.results_table(summary, argparse.Namespace(ensemble=64)))
    assert "| -3.0 | no | -2.5 [-4.0, -1.0] (1 of 2) |" in table


def test_suite_defaults_key_has_no_run_specific_fields(suite):
    text = suite.enkal_defaults()
    assert text.startswith("EnsembleKalmanOptimizer(") and text.endswith(")")
    assert "N_par" not in text and "N_ens" not in text and "seed=" not in text
    assert " at 0x" not in text and suite.enkal_defaults() == text


def test_suite_runs_file_survives_a_torn_line(suite, tmp_path, capsys):
    settings = suite.Settings(epochs=1, train_subset=10, test_subset=10, defaults="D")
    spec = settings.spec("digits/mlp-relu", "enkal", 0, 8)
    path = tmp_path / "runs.jsonl"
    path.write_text('{"pair": "digits/mlp-relu", "meth')  # a run killed while writing
    suite.append_run(path, {**suite.asdict(spec), "accuracy": [0.1, 0.5]})
    runs = suite.read_runs(path)
    assert list(runs) == [suite.astuple(spec)]
    assert "1 unreadable line(s)" in capsys.readouterr().out
    adamw = settings.spec("digits/mlp-relu", "adamw", 0, 8)
    assert adamw.ensemble is None and adamw.defaults is None and adamw.subset


def test_suite_keys_runs_by_dtype_and_reads_older_runs_as_float32(suite, tmp_path):
    f32 = suite.Settings(epochs=1, train_subset=10, test_subset=10, defaults="D")
    b16 = suite.Settings(epochs=1, train_subset=10, test_subset=10, defaults="D",
                         dtype="bfloat16")
    spec, low = (s.spec("digits/mlp-relu", "enkal", 0, 8) for s in (f32, b16))
    assert low.dtype == "bfloat16" and suite.astuple(low) != suite.astuple(spec)
    assert b16.spec("digits/mlp-relu", "adamw", 0, 8).dtype == "float32"  # AdamW: float32
    assert "bfloat16 (targets in float32)" in suite.target_reasons(low, 3)
    old = {k: v for k, v in suite.asdict(spec).items() if k != "dtype"}  # before --dtype
    path = tmp_path / "runs.jsonl"
    suite.append_run(path, {**old, "accuracy": [0.1, 0.5]})
    suite.append_run(path, {**suite.asdict(low), "accuracy": [0.1, 0.4]})
    runs = suite.read_runs(path)
    assert runs[suite.astuple(spec)]["accuracy"] == [0.1, 0.5]
    assert runs[suite.astuple(low)]["accuracy"] == [0.1, 0.4]


# -- the benchmark script: a tiny run, twice ------------------------------------------------
def _run_suite(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--pairs", "digits/mlp-relu", "--methods", "adamw,enkal",
           "--seeds", "0", "--epochs", "1", "--train-subset", "128", "--test-subset", "64",
           "--ensemble", "8", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _bench_json(stdout: str) -> dict:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("BENCH_JSON ")
    return json.loads(last[len("BENCH_JSON "):])


def test_suite_smoke_run_then_cached(tmp_path):
    first = _run_suite(tmp_path)
    rec = _bench_json(first.stdout)
    assert rec["bench"] == "nn_suite" and rec["trained"] == 2 and rec["cached"] == 0
    assert rec["threads"] == 1 and rec["failed"] == 0
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in runs) == ["adamw", "enkal"]
    assert all(len(r["accuracy"]) == 2 and r["subset"] and r["n_train"] == 128 for r in runs)
    assert (tmp_path / "nn_suite.png").stat().st_size > 0
    report = (tmp_path / "nn_suite.md").read_text()
    assert "[SUBSET]" in report and "| digits/mlp-relu | 2410 | enkal (E=8) |" in report

    second = _run_suite(tmp_path)
    again = _bench_json(second.stdout)
    assert again["trained"] == 0 and again["cached"] == 2
    assert second.stdout.count("cached  digits/mlp-relu") == 2
    assert not [line for line in second.stdout.splitlines() if line.startswith("trained ")]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2
    assert again["results"]["digits/mlp-relu"]["methods"]["enkal"]["final"] == \
        rec["results"]["digits/mlp-relu"]["methods"]["enkal"]["final"]


# -- bench/nn_activity.py: the activity-perturbation estimator -------------------------------
@pytest.fixture
def activity(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import nn_activity

    return nn_activity


def _true_and_estimated(activity, net, x, y, ensemble, seed=0):
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    true = torch.cat([p.grad.flatten() for p in net.parameters()])
    activity.ActivityGradient(net, ensemble, 0.03, torch.Generator().manual_seed(seed))(x, y)
    est = torch.cat([p.grad.flatten() for p in net.parameters()])
    return true, est


def test_activity_gradient_is_the_gradient_of_a_linear_network(activity):
    # Without nonlinearities the logits' anomalies are exactly A J^T, so the estimate is
    # (A^T A / ((E - 1) sigma^2)) J^T g per sample: unbiased, with a relative error of order
    # sqrt(U / E) per sample (U <= 6 units here), averaged over the batch: at E = 4000 the
    # cosine with the true gradient is above 0.99 and the norms agree within 5% (measured
    # 0.999 and 1.4%, generator seeds 0-4), while at E = 4 (a few directions per sample) the
    # cosine is 0.11-0.73.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    true, est = _true_and_estimated(activity, net, x, y, 4000)
    assert float(nn.functional.cosine_similarity(true, est, 0)) > 0.99
    assert abs(float(est.norm() / true.norm()) - 1) < 0.05
    _, rough = _true_and_estimated(activity, net, x, y, 4)
    assert float(nn.functional.cosine_similarity(true, rough, 0)) < 0.99


def test_activity_gradient_sees_the_nonlinear_layers_through_the_members(activity):
    # A ReLU MLP: the members' logits carry the ReLU switches, the local derivatives do not
    # backpropagate; at E = 2000 with a 3% spread the estimate still points along the gradient
    # (cosine 0.995 for generator seeds 0-4; the bound leaves room for the switches the noise
    # flips).
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 4, (32,))
    true, est = _true_and_estimated(activity, net, x, y, 2000)
    assert float(nn.functional.cosine_similarity(true, est, 0)) > 0.95


@pytest.mark.parametrize("kw, match", [({"ensemble": 1}, "ensemble"),
                                       ({"spread": 0.0}, "spread")])
def test_activity_gradient_names_bad_arguments(activity, kw, match):
    args = {"net": nn.Linear(2, 2), "ensemble": 8, "spread": 0.03,
            "generator": torch.Generator()} | kw
    with pytest.raises(ValueError, match=match):
        activity.ActivityGradient(**args)


# -- bench/nn_diagnose.py: where a step's signal comes from ------------------------------------
@pytest.fixture
def diagnose(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import nn_diagnose

    return nn_diagnose


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 5)
        self.unused = nn.Parameter(torch.randn(7))  # in the layout, not in the forward
        self.second = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_signal_shares_are_a_partition_and_zero_where_the_outputs_do_not_look(diagnose):
    torch.manual_seed(0)
    opt = enkal.EnsembleKalmanOptimizer(_WithUnused(), ensemble_size=16, seed=0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    shares = diagnose.signal_shares(opt, x, y)
    assert set(shares) == {b.name for b in opt.layout.blocks}
    assert all(v >= 0 for v in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)  # a sum of float ratios
    # members differing only there predict the same up to float32 rounding of the batched
    # forward (anomalies ~1e-7 of the signal's, squared): far below any real share
    assert shares["unused"] < 1e-9
    assert shares["second.weight"] > 0 and shares["first.weight"] > 0


def test_diagnose_runs_on_a_suite_pair_for_a_few_steps(diagnose, capsys):
    rec = diagnose.main(["--pairs", "digits/mlp-relu", "--ensemble", "8", "--steps", "3",
                         "--epochs", "1"])
    (pair,) = rec["pairs"]
    assert pair["steps"] == 3 and pair["batch"] == 64
    for when in ("init", "trained"):
        assert sum(pair[when]["signal"].values()) == pytest.approx(1.0, abs=1e-12)
    assert "| 0.weight |" in capsys.readouterr().out
    # without training between, the probe's 20 steps must leave the held spread as it was
    (still,) = diagnose.main(["--pairs", "digits/mlp-relu", "--ensemble", "8", "--steps",
                              "0"])["pairs"]
    assert still["init"]["rel_std"] == still["trained"]["rel_std"]
    with pytest.raises(SystemExit):
        diagnose.main(["--pairs", "digits/nonesuch"])
