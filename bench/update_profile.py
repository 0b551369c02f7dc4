r"""Fixed cost of one ``enkal.assimilate`` call: aten operations, host synchronisations and
time against the GEMM floor, on any device (issue #16's CPU-visible proxies).

For each ``P`` (parameters) at ``E`` members and ``M`` observations, float32:

* ``ops``: aten operations the call runs (every profiler event named ``aten::*``, nested
  ones included), and ``top_ops`` (those not inside another aten op): the kernel-launch
  count on a GPU is of the order of ``top_ops``;
* ``syncs``: calls that read a device value on the host (``aten::_local_scalar_dense``,
  behind ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``) plus device-to-host copies
  (``aten::_to_copy``/``aten::copy_`` into a CPU tensor from another device): on a GPU each
  one waits for the queue to drain; on a CPU they are free, but the count is the same code
  path's;
* ``ms``, ``floor_ms`` and ``copy_ms``: medians over ``--repeats`` interleaved rounds of the
  call (output buffer reused), of the GEMM floor ``torch.matmul(T, X, out=buf)`` and of the
  copy floor ``buf.copy_(X)`` (one read and one write of ``X``: the bandwidth bound of any
  update); ``over_floor`` and ``over_copy`` are the medians of the per-round ratios (robust
  to a shared machine's load).

``--compare DIR`` also runs this script on the enkal checkout in ``DIR`` (a ``git
worktree`` of an older commit), alternating the two processes round by round, and prints
both rows and the ratio of their medians: the before/after of a change, in one run.

The last line of output is ``BENCH_JSON {...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import parse_device, synchronize  # noqa: E402 (bench/ on the path first)


def _counts(call, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    call()  # warm-up outside the profile
    synchronize(device)
    with profile(activities=activities) as prof:
        call()
        synchronize(device)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or
           not e.cpu_parent.name.startswith("aten::")]
    scalar = sum(e.name == "aten::_local_scalar_dense" for e in events)
    return {"ops": len(events), "top_ops": len(top), "syncs": scalar,
            "kernels": sum(1 for e in prof.events()
                           if getattr(e, "device_type", None) is not None and
                           "CUDA" in str(e.device_type)) if device.type == "cuda" else None}


def measure(P: int, E: int, M: int, device: torch.device, repeats: int) -> dict:
    import enkal

    g = torch.Generator().manual_seed(0)
    x = torch.randn(E, P, generator=g).to(device)
    y = torch.randn(E, M, generator=g).to(device)
    obs = enkal.Observations(torch.randn(M, generator=g).to(device), noise_std=1.0)
    buf = torch.empty_like(x)
    t = torch.randn(E, E, generator=g).to(device)
    calls = {"assimilate": lambda: enkal.assimilate(x, y, obs, out=buf),
             "floor": lambda: torch.matmul(t, x, out=buf),
             "copy": lambda: buf.copy_(x)}
    row = {"P": P, "E": E, "M": M, **_counts(calls["assimilate"], device)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[k].append(time.perf_counter() - t0)
    row["ms"] = 1e3 * statistics.median(times["assimilate"])
    row["floor_ms"] = 1e3 * statistics.median(times["floor"])
    row["copy_ms"] = 1e3 * statistics.median(times["copy"])
    row["over_floor"] = statistics.median(a / f for a, f in zip(times["assimilate"],
                                                                 times["floor"], strict=True))
    row["over_copy"] = statistics.median(a / c for a, c in zip(times["assimilate"],
                                                               times["copy"], strict=True))
    return row


def _child(args: argparse.Namespace, root: str, P: int, repeats: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--P", str(P),
           "--E", str(args.E), "--M", str(args.M), "--device", args.device,
           "--repeats", str(repeats), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--P", type=float, nargs="+", default=[1e5, 1e6])
    p.add_argument("--E", type=int, default=64)
    p.add_argument("--M", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=5,
                   help="with --compare: alternations of the two processes (5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1; 0: default)")
    p.add_argument("--compare", metavar="DIR", default=None,
                   help="an older enkal checkout to measure in the same run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    sizes = [int(v) for v in args.P]
    if args.child:
        print(json.dumps(measure(sizes[0], args.E, args.M, device, args.repeats)))
        return {}
    here = os.path.dirname(HERE)
    roots = {"this": here} if args.compare is None else {"this": here,
                                                         "before": os.path.abspath(args.compare)}
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}, "
          f"E={args.E}, M={args.M}, float32; medians")
    print(f"{'code':7s} {'P':>9s} {'ops':>5s} {'top':>5s} {'syncs':>5s} {'ms':>9s} "
          f"{'floor':>9s} {'/floor':>7s} {'copy':>9s} {'/copy':>7s}")
    rows = []
    for P in sizes:
        got: dict[str, list[dict]] = {k: [] for k in roots}
        for _ in range(args.rounds if args.compare else 1):
            for name, root in roots.items():
                got[name].append(_child(args, root, P, args.repeats))
        for name, rs in got.items():
            med = {k: statistics.median(x[k] for x in rs)
                   for k in ("ms", "floor_ms", "copy_ms", "over_floor", "over_copy")}
            r = dict(rs[0], code=name, **med)
            rows.append(r)
            print(f"{name:7s} {P:9d} {r['ops']:5d} {r['top_ops']:5d} {r['syncs']:5d} "
                  f"{r['ms']:9.3f} {r['floor_ms']:9.3f} {r['over_floor']:7.3f} "
                  f"{r['copy_ms']:9.3f} {r['over_copy']:7.3f}", flush=True)
        if args.compare:
            this, before = rows[-2], rows[-1]
            print(f"{'':7s} {P:9d} this/before: time {this['ms'] / before['ms']:.3f}, "
                  f"over-floor {this['over_floor'] / before['over_floor']:.3f}")
    from _common import emit, environment
    record = {"bench": "update_profile", "device": str(device), **environment(), "rows": rows}
    emit(record)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
