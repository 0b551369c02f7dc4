r"""Time ``enkal.assimilate`` against its GEMM floor and against iterative_ensemble_smoother.

One update of an ensemble of ``E`` members with ``P`` parameters from ``M`` observations is,
in enkal, a small ``(E, E)`` transform built from the predictions (the *prepare*, cost
``O(M E^2)``) and one GEMM ``X+ = W X`` over the members-first ``(E, P)`` parameters (cost
``O(P E^2)``). For large ``P`` the GEMM is the whole cost, so the reference is the *floor*:
``torch.matmul(T, X, out=buf)`` with ``T`` any ``(E, E)`` matrix and ``buf`` preallocated.

For each case ``(P, M, dtype)`` this script times, in the same process, the torch methods
interleaved round by round (so their ratios are robust to the load of a shared machine), then
the peer's two methods the same way (kept apart from torch's calls: see ``_time_groups``):

* ``floor``     ``torch.matmul(T, X, out=buf)``, ``X`` members first ``(E, P)``;
* ``floor_pm``  ``torch.matmul(Xpm, T.T, out=buf_pm)``, ``Xpm`` a contiguous ``(P, E)``
  (parameter-major) copy: the layout iterative_ensemble_smoother uses;
* ``sr``, ``po``  ``assimilate(X, Y, obs, rule=SquareRoot() / PerturbedObservations(),
  out=buf)``: steady state, output buffer reused (includes validation and the prepare);
* ``sr_alloc``, ``po_alloc``  the same without ``out=`` (a fresh output each call);
* ``peer``      ``ESMDA(covariance=noise_var, observations=y, alpha=1, seed=0)`` then
  ``prepare_assimilation(Y=Y.numpy().T, truncation=1.0)`` + ``assimilate_batch(X=X.numpy().T)``.
  The ``.T`` are views of enkal's members-first arrays; ``assimilate_batch`` (with the default
  ``overwrite=False``) copies ``X`` with ``X.copy()``, which is C order, so that copy is also
  a transpose. ``truncation=1.0`` keeps every singular value, like enkal's default.
  Construction of the ESMDA object (O(M)) is not timed; prepare + assimilate are.
* ``peer_pm``   the same peer call given a C-contiguous ``(P, E)`` array (its native layout),
  to separate the transposing copy from the rest of its work.

On ``--device cuda`` (issue #16) the tensors live on the GPU, every timed call ends with a
``torch.cuda.synchronize`` and two floors are printed: the GEMM above and the copy floor
``buf.copy_(X)`` (one read and one write of ``X``: the bandwidth bound of any update), with
the bandwidth and GEMM rate they imply; ``SR/copy`` is the update over the copy floor. The
peer (numpy) and the parameter-major layout run on the CPU only. ``--dtypes bfloat16`` times
a bfloat16 ensemble (predictions in bfloat16 too, as ``assimilate`` requires); its ``SR/copy``
is against its own copy floor, and the headline also gives it over float32's copy floor.
``--no-alloc`` skips ``sr_alloc``/``po_alloc`` (a third ``(E, P)`` buffer: at ``P = 1e8``
float32, ``E = 64`` each buffer is 25.6 GB).

The prepare alone (``enkal.update.ensemble_transform``, and the peer's
``prepare_assimilation``) is timed per ``(M, dtype)``: it does not depend on ``P``, and its
growth with ``M`` should be linear (ratio ~10 from M=2000 to M=20000). The enkal PO prepare
is given its perturbations here; ``assimilate`` also draws them (``E x M`` normals).

The table shows medians; the JSON rows also carry each method's minimum (``*_min_ms``) and
the median over rounds of the back-to-back ratio to the floor (``*_over_floor_paired``),
both less sensitive to other processes on a shared machine than a ratio of medians.

Run ``python bench/update.py --help``. The last line of output is ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
from _common import emit, parse_device, synchronize

E_DEFAULT = 64
HEADLINE_P, HEADLINE_M = 1_000_000, 2000
TARGET_FLOOR, TARGET_PEER = 1.25, 0.6


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/update.py",
        description="Time enkal.assimilate (SquareRoot, PerturbedObservations) against the "
                    "GEMM floor and iterative_ensemble_smoother.ESMDA.",
    )
    p.add_argument("--quick", action="store_true",
                   help="tiny grid (P in 1e4, 1e5; M in 100, 2000; 3 repeats), < 30 s")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per method (median reported); default 5, 3 with --quick")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and BLAS threads; default torch.get_num_threads()")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the JSON record to PATH")
    p.add_argument("--ensemble", type=int, default=E_DEFAULT, help="ensemble size E (64)")
    p.add_argument("--P", type=float, nargs="+", default=None,
                   help="parameter counts (default 1e4 1e5 1e6)")
    p.add_argument("--M", type=float, nargs="+", default=None,
                   help="observation counts (default 100 2000 20000)")
    p.add_argument("--device", default="cpu", help="torch device (cpu; cuda, cuda:1...)")
    p.add_argument("--no-alloc", action="store_true",
                   help="skip the sr_alloc/po_alloc methods (one (E, P) buffer fewer)")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "float64", "bfloat16"),
                   default=["float32", "float64"])
    p.add_argument("--no-peer", action="store_true", help="skip iterative_ensemble_smoother")
    p.add_argument("--peer-limit", type=float, default=30.0,
                   help="skip the peer's repeats for a case when one call takes longer (s)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.repeats < 1:
        p.error("--repeats: expected an int >= 1")
    if args.P is None:
        args.P = [1e4, 1e5] if args.quick else [1e4, 1e5, 1e6]
    if args.M is None:
        args.M = [100, 2000] if args.quick else [100, 2000, 20000]
    args.P = [int(v) for v in args.P]
    args.M = [int(v) for v in args.M]
    return args


def _median_ms(samples: list[float]) -> float | None:
    return None if not samples else 1e3 * statistics.median(samples)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _time_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                      limits: dict[str, float] | None = None,
                      sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """One warm-up call each, then ``repeats`` rounds calling every method once per round;
    ``sync()`` after each call is timed with it (the device's queued work).

    A method whose warm-up took longer than ``limits[name]`` seconds is not repeated (its
    warm-up time is kept as its only sample, flagged by the caller).
    """
    limits = limits or {}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    skipped = set()
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        if dt > limits.get(name, math.inf):
            samples[name].append(dt)
            skipped.add(name)
    for _ in range(repeats):
        for name, fn in fns.items():
            if name in skipped:
                continue
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return samples


def _time_groups(fns: dict[str, Callable[[], object]], repeats: int,
                 limits: dict[str, float] | None = None,
                 sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Time the torch methods interleaved, then the peer's (numpy) methods interleaved.

    The two libraries run separate thread pools (OpenMP for torch, OpenBLAS for numpy) whose
    idle workers spin for a while after each call; alternating them call by call on a small
    machine makes each wait for the other's spinning threads (measured: ~100 ms added to a
    1 ms prepare on 2 cores). Grouping keeps that artifact out of both sides.
    """
    groups = [{k: f for k, f in fns.items() if not k.endswith("peer") and "peer_" not in k},
              {k: f for k, f in fns.items() if k.endswith("peer") or "peer_" in k}]
    samples: dict[str, list[float]] = {}
    gc.collect()  # once per case: a collection costs ~0.1 s with torch loaded
    for grp in groups:
        if grp:
            time.sleep(0.05)  # let the other pool's workers go to sleep
            samples.update(_time_interleaved(grp, repeats, limits, sync))
    return samples


def _paired(a: list[float], b: list[float]) -> float | None:
    """Median over rounds of ``a[i] / b[i]``: both timed back to back in the same round, so
    slow drifts in the machine's load cancel."""
    pairs = [x / y for x, y in zip(a, b, strict=True) if y > 0]
    return statistics.median(pairs) if pairs else None


def _device_name(device: torch.device) -> str:
    return f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""


def _fmt(v: float | None, width: int, prec: int = 1) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{prec}f}"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    import numpy as np

    import enkal
    from enkal import Observations, PerturbedObservations, SquareRoot, assimilate
    from enkal.update import ensemble_transform

    threads = args.threads if args.threads is not None else torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
        blas_note = f"numpy BLAS limited to {threads} threads (threadpoolctl)"
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn/scipy
        blas_note = "threadpoolctl missing: numpy BLAS threads not set"

    device = parse_device(args.device)
    sync = partial(synchronize, device)
    on_cpu = device.type == "cpu"
    peer = None
    if not on_cpu:
        print(f"device {device}: the peer (numpy, CPU) and the parameter-major layout skipped")
    elif not args.no_peer:
        try:
            import iterative_ensemble_smoother as peer
        except ImportError:
            print("iterative_ensemble_smoother not installed: peer columns skipped")
    peer_version = getattr(peer, "__version__", None) if peer is not None else None

    E = args.ensemble
    dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
    sr, po = SquareRoot(), PerturbedObservations()
    print(f"enkal {enkal.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"iterative_ensemble_smoother {peer_version}; {threads} threads; {blas_note}; "
          f"device {device}{_device_name(device)}; E={E}; {args.repeats} repeats, medians in ms")

    # -- observations and predictions, per (M, dtype); prepare timings ---------------------
    gen = torch.Generator().manual_seed(0)
    data = {}
    prepare_rows = []
    for M in args.M:
        y64 = torch.randn(M, dtype=torch.float64, generator=gen)
        std64 = 0.5 + torch.rand(M, dtype=torch.float64, generator=gen)
        obs = Observations(y64.to(device), noise_std=std64.to(device))
        Y64 = y64 + torch.randn(E, M, dtype=torch.float64, generator=gen)  # sensible scale
        for name, dt in dtypes.items():
            if name not in args.dtypes:
                continue
            Y = Y64.to(device=device, dtype=dt)
            data[M, name] = (obs, Y, y64, std64)
            eps = obs.sample_noise(E, generator=gen)
            fns = {
                "prep_sr": lambda Y=Y, obs=obs: ensemble_transform(Y, obs, rule=sr),
                "prep_po": lambda Y=Y, obs=obs, eps=eps: ensemble_transform(
                    Y, obs, rule=po, perturbations=eps),
            }
            if peer is not None and name != "bfloat16":
                npdt = np.float32 if name == "float32" else np.float64
                yn, var = y64.numpy().astype(npdt), std64.square().numpy().astype(npdt)
                Yt = Y.numpy().T

                def peer_prep(yn=yn, var=var, Yt=Yt):
                    s = peer.ESMDA(covariance=var, observations=yn, alpha=1, seed=0)
                    s.prepare_assimilation(Y=Yt, truncation=1.0)
                fns["prep_peer"] = peer_prep
            smp = _time_groups(fns, args.repeats if args.quick else max(args.repeats, 5),
                               sync=sync)
            prepare_rows.append({"M": M, "dtype": name,
                                 **{k + "_ms": _median_ms(v) for k, v in smp.items()}})

    print("\nprepare alone (independent of P): enkal ensemble_transform, peer "
          "prepare_assimilation")
    print(f"{'M':>7} {'dtype':>8} {'enkal SR':>9} {'enkal PO':>9} {'peer':>9}")
    for r in prepare_rows:
        print(f"{r['M']:>7} {r['dtype']:>8} {_fmt(r['prep_sr_ms'], 9, 2)} "
              f"{_fmt(r['prep_po_ms'], 9, 2)} {_fmt(r.get('prep_peer_ms'), 9, 2)}")
    sys.stdout.flush()

    # -- the full update, per (P, M, dtype) --------------------------------------------------
    rows = []
    header = (f"\n{'P':>8} {'M':>6} {'dtype':>8} | {'copy':>8} {'floor':>8} {'floorPM':>8} | "
              f"{'SR':>8} {'PO':>8} {'SRalloc':>8} {'POalloc':>8} | {'peer':>8} {'peerPM':>8} | "
              f"{'SR/fl':>6} {'PO/fl':>6} {'SR/copy':>7} {'SR/peer':>7} {'PO/peer':>7} "
              f"{'flPM/fl':>7} | {'GB/s':>6} {'GFLOP/s':>7}")
    print(header)
    print("-" * (len(header) - 1))
    for name in args.dtypes:
        dt = dtypes[name]
        for P in args.P:
            g = torch.Generator().manual_seed(1)
            X = torch.randn(E, P, dtype=dt, generator=g).to(device)
            buf = torch.empty_like(X)
            T = (torch.eye(E, dtype=dt)
                 + 0.01 * torch.randn(E, E, dtype=dt, generator=g)).to(device)
            Xpm = X.T.contiguous() if on_cpu else None
            buf_pm = torch.empty_like(Xpm) if on_cpu else None
            for M in args.M:
                obs, Y, y64, std64 = data[M, name]
                pg = torch.Generator(device).manual_seed(2)
                fns = {
                    "copy": partial(buf.copy_, X),
                    "floor": partial(torch.matmul, T, X, out=buf),
                    "sr": partial(assimilate, X, Y, obs, rule=sr, out=buf),
                    "po": partial(assimilate, X, Y, obs, rule=po, generator=pg, out=buf),
                }
                if Xpm is not None:
                    fns["floor_pm"] = partial(torch.matmul, Xpm, T.T, out=buf_pm)
                if not args.no_alloc:
                    fns["sr_alloc"] = partial(assimilate, X, Y, obs, rule=sr)
                    fns["po_alloc"] = partial(assimilate, X, Y, obs, rule=po, generator=pg)
                peer_note = None
                if peer is not None and name != "bfloat16":
                    npdt = np.float32 if name == "float32" else np.float64
                    yn = y64.numpy().astype(npdt)
                    var = std64.square().numpy().astype(npdt)
                    Yt, Xt, Xn_pm = Y.numpy().T, X.numpy().T, Xpm.numpy()

                    def run_peer(Xin, yn=yn, var=var, Yt=Yt):
                        s = peer.ESMDA(covariance=var, observations=yn, alpha=1, seed=0)
                        s.prepare_assimilation(Y=Yt, truncation=1.0)
                        return s.assimilate_batch(X=Xin)

                    fns["peer"] = partial(run_peer, Xt)
                    fns["peer_pm"] = partial(run_peer, Xn_pm)
                smp = _time_groups(fns, args.repeats,
                                   {"peer": args.peer_limit, "peer_pm": args.peer_limit}, sync)
                ms = {k: _median_ms(v) for k, v in smp.items()}
                nbytes = X.numel() * X.element_size()
                for k in ("peer", "peer_pm"):
                    if k in ms and ms[k] is not None and ms[k] > 1e3 * args.peer_limit:
                        peer_note = (f"{k}: one call took {ms[k] / 1e3:.1f} s > "
                                     f"{args.peer_limit} s, not repeated")
                row = {"P": P, "M": M, "dtype": name, "E": E,
                       **{k + "_ms": v for k, v in ms.items()},
                       **{k + "_min_ms": 1e3 * min(v) for k, v in smp.items() if v},
                       "sr_over_floor": _ratio(ms["sr"], ms["floor"]),
                       "sr_over_copy": _ratio(ms["sr"], ms["copy"]),
                       "sr_over_copy_paired": _paired(smp["sr"], smp["copy"]),
                       "copy_gb_per_s": 2 * nbytes / ms["copy"] / 1e6,
                       "floor_gflop_per_s": 2 * E * E * P / ms["floor"] / 1e6,
                       "po_over_floor": _ratio(ms["po"], ms["floor"]),
                       "sr_alloc_over_floor": _ratio(ms.get("sr_alloc"), ms["floor"]),
                       "sr_over_peer": _ratio(ms["sr"], ms.get("peer")),
                       "po_over_peer": _ratio(ms["po"], ms.get("peer")),
                       "po_over_peer_pm": _ratio(ms["po"], ms.get("peer_pm")),
                       "floor_pm_over_floor": _ratio(ms.get("floor_pm"), ms["floor"]),
                       "sr_over_floor_paired": _paired(smp["sr"], smp["floor"]),
                       "po_over_floor_paired": _paired(smp["po"], smp["floor"]),
                       "sr_alloc_over_floor_paired": _paired(smp["sr_alloc"], smp["floor"])
                       if "sr_alloc" in smp else None,
                       "floor_pm_over_floor_paired": _paired(smp["floor_pm"], smp["floor"])
                       if "floor_pm" in smp else None}
                if peer_note:
                    row["note"] = peer_note
                rows.append(row)
                print(f"{P:>8} {M:>6} {name:>8} | {_fmt(ms['copy'], 8, 2)} "
                      f"{_fmt(ms['floor'], 8)} {_fmt(ms.get('floor_pm'), 8)} | "
                      f"{_fmt(ms['sr'], 8)} {_fmt(ms['po'], 8)} "
                      f"{_fmt(ms.get('sr_alloc'), 8)} {_fmt(ms.get('po_alloc'), 8)} | "
                      f"{_fmt(ms.get('peer'), 8)} {_fmt(ms.get('peer_pm'), 8)} | "
                      f"{_fmt(row['sr_over_floor'], 6, 2)} {_fmt(row['po_over_floor'], 6, 2)} "
                      f"{_fmt(row['sr_over_copy'], 7, 2)} "
                      f"{_fmt(row['sr_over_peer'], 7, 2)} {_fmt(row['po_over_peer'], 7, 2)} "
                      f"{_fmt(row['floor_pm_over_floor'], 7, 2)} | "
                      f"{_fmt(row['copy_gb_per_s'], 6, 0)} {_fmt(row['floor_gflop_per_s'], 7, 0)}"
                      + (f"  ({peer_note})" if peer_note else ""))
                sys.stdout.flush()
            del X, buf, Xpm, buf_pm
            gc.collect()

    # -- linearity in M and the headline ------------------------------------------------------
    linearity = []
    for name in args.dtypes:
        pr = {r["M"]: r for r in prepare_rows if r["dtype"] == name}
        if 2000 in pr and 20000 in pr:
            lin = {"dtype": name, "M_from": 2000, "M_to": 20000, "ideal": 10.0,
                   "prep_sr_ratio": _ratio(pr[20000]["prep_sr_ms"], pr[2000]["prep_sr_ms"]),
                   "prep_po_ratio": _ratio(pr[20000]["prep_po_ms"], pr[2000]["prep_po_ms"])}
            big = [r for r in rows if r["dtype"] == name and r["P"] == max(args.P)]
            byM = {r["M"]: r for r in big}
            if 2000 in byM and 20000 in byM:
                lin["P"] = max(args.P)
                for k in ("sr", "po"):
                    a = byM[20000][k + "_ms"] - byM[20000]["floor_ms"]
                    b = byM[2000][k + "_ms"] - byM[2000]["floor_ms"]
                    lin[f"{k}_minus_floor_ms_M2000"] = b
                    lin[f"{k}_minus_floor_ms_M20000"] = a
                    lin[f"{k}_total_ratio"] = _ratio(byM[20000][k + "_ms"], byM[2000][k + "_ms"])
            linearity.append(lin)

    headline = {}
    for name in args.dtypes:
        cand = [r for r in rows if r["dtype"] == name]
        if not cand:
            continue
        exact = [r for r in cand if r["P"] == HEADLINE_P and r["M"] == HEADLINE_M]
        r = exact[0] if exact else max(cand, key=lambda r: (r["P"], -abs(r["M"] - HEADLINE_M)))
        worst_floor = max(r["sr_over_floor"], r["po_over_floor"])
        peers = [v for v in (r["sr_over_peer"], r["po_over_peer"]) if v is not None]
        headline[name] = {
            "P": r["P"], "M": r["M"], "E": E, "is_target_case": bool(exact),
            "sr_over_floor": r["sr_over_floor"], "po_over_floor": r["po_over_floor"],
            "sr_over_copy": r["sr_over_copy"],
            "sr_over_peer": r["sr_over_peer"], "po_over_peer": r["po_over_peer"],
            "po_over_peer_pm": r["po_over_peer_pm"],
            "floor_pm_over_floor": r["floor_pm_over_floor"],
            "floor_target": TARGET_FLOOR, "peer_target": TARGET_PEER,
            "sr_over_floor_paired": r["sr_over_floor_paired"],
            "po_over_floor_paired": r["po_over_floor_paired"],
            "sr_over_floor_min": _ratio(r["sr_min_ms"], r["floor_min_ms"]),
            "po_over_floor_min": _ratio(r["po_min_ms"], r["floor_min_ms"]),
            "floor_target_met": worst_floor <= TARGET_FLOOR,
            "peer_target_met": (max(peers) <= TARGET_PEER) if peers else None,
        }

    f32 = headline.get("float32")
    if "bfloat16" in headline and f32 is not None and f32["P"] == headline["bfloat16"]["P"]:
        h = headline["bfloat16"]
        h["sr_over_float32_copy"] = _ratio(
            next(r["sr_ms"] for r in rows if r["dtype"] == "bfloat16" and r["P"] == h["P"]
                 and r["M"] == h["M"]),
            next(r["copy_ms"] for r in rows if r["dtype"] == "float32" and r["P"] == h["P"]
                 and r["M"] == h["M"]))

    print("\nlinearity in M (prepare alone; and enkal minus floor at the largest P):")
    for lin in linearity:
        print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in lin.items()))
    print("\nheadline (targets: enkal/floor <= "
          f"{TARGET_FLOOR}, enkal/peer <= {TARGET_PEER}; both rules must meet them):")
    for name, h in headline.items():
        print(f"  {name} P={h['P']} M={h['M']} E={E}: SR/floor={h['sr_over_floor']:.3f} "
              f"PO/floor={h['po_over_floor']:.3f} SR/peer={_fmt(h['sr_over_peer'], 0, 3)} "
              f"PO/peer={_fmt(h['po_over_peer'], 0, 3)} -> floor target "
              f"{'met' if h['floor_target_met'] else 'MISSED'}, peer target "
              f"{ {True: 'met', False: 'MISSED', None: 'n/a'}[h['peer_target_met']] }; "
              f"SR/copy={_fmt(h['sr_over_copy'], 0, 3)}"
              + (f", SR/float32 copy={_fmt(h['sr_over_float32_copy'], 0, 3)}"
                 if "sr_over_float32_copy" in h else ""))

    record = {
        "bench": "update", "device": str(device), "device_name": _device_name(device).strip(" ()"),
        "enkal": enkal.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "peer": peer_version, "threads": threads,
        "machine": platform.processor() or platform.machine(), "E": E,
        "repeats": args.repeats, "quick": args.quick,
        "peer_call": "ESMDA(covariance=var, observations=y, alpha=1, seed=0); "
                     "prepare_assimilation(Y=Y.numpy().T, truncation=1.0); "
                     "assimilate_batch(X=X.numpy().T) (copies X, C order)",
        "rows": rows, "prepare": prepare_rows, "linearity": linearity, "headline": headline,
    }
    emit(record, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
