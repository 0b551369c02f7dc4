"""DAPPER 1.7.1 on the settings of bench/filtering.py: the peer scores it prints.

Not part of enkal's environment: run it in a separate one,

    python3 -m venv /tmp/dapper && /tmp/dapper/bin/pip install dapper==1.7.1
    OMP_NUM_THREADS=1 /tmp/dapper/bin/python bench/filtering_dapper.py --list
    OMP_NUM_THREADS=1 /tmp/dapper/bin/python bench/filtering_dapper.py L96_Sqrt_N24_i1.013_rot

Each configuration runs for seeds 1, 2, 3 (DAPPER refuses seed 0) with 20,000 analysis
cycles (``Ko``), keeping each model module's BurnIn (time units); one JSON record per
configuration goes to ``results/<id>.json`` beside this file, and
``bench/reference/filtering_dapper.json`` collects them (what bench/filtering.py reads).
Truth and observations come from DAPPER's own ``seed_and_simulate``: for a given model,
noise, seed and ``Ko`` every method sees the same data. DAPPER's ``loc_rad`` is the distance
where its Gaspari-Cohn taper is exp(-1/2): enkal's ``LETKF(radius=1.82 * loc_rad)`` is the
same taper; ``(1,)`` localizer batches analyse each site on its own, as enkal's LETKF does.
"""
import json
import os
import sys
import time

import dapper.tools.progressbar as pb
import numpy as np

pb.disable_progbar = True
from dapper.dpr_config import rc  # noqa: E402

rc.liveplotting = False

import dapper as dpr  # noqa: E402
import dapper.da_methods as da  # noqa: E402
import dapper.mods as modelling  # noqa: E402
from dapper.tools.localization import nd_Id_localization  # noqa: E402

SEEDS = [1, 2, 3]
KO = 20000  # DAPPER convention: Ko+1 = 20001 analysis times (ko = 0..Ko)
HERE = os.path.dirname(os.path.abspath(__file__))


def make_hmm(model, noise_var, batch=None, Ko=KO):
    if model == "L63":
        from dapper.mods.Lorenz63.sakov2012 import HMM
    else:
        from dapper.mods.Lorenz96.sakov2008 import HMM
    hmm = HMM.copy()
    hmm.tseq.Ko = Ko  # keeps dt, dko and BurnIn (time units) of the module
    Op = hmm.Obs.Op1
    Op.noise = modelling.GaussRV(C=noise_var, M=Op.M)
    if batch is not None:
        Op.localizer = nd_Id_localization((hmm.Nx,), batch)
    return hmm


# (id, model, noise_var, method, kwargs, localizer batch)
CONFIGS = []
for nv in [2.0, 1.0]:
    tag = f"L63_R{int(nv)}"
    CONFIGS += [
        (f"{tag}_Sqrt_N3_i1.30", "L63", nv, "EnKF", dict(upd_a="Sqrt", N=3, infl=1.30), None),
        (f"{tag}_Sqrt_N10_i1.02_rot", "L63", nv, "EnKF", dict(upd_a="Sqrt", N=10, infl=1.02, rot=True), None),
        (f"{tag}_Sqrt_N10_i1.02_norot", "L63", nv, "EnKF", dict(upd_a="Sqrt", N=10, infl=1.02, rot=False), None),
        (f"{tag}_Sqrt_N24_i1.013_norot", "L63", nv, "EnKF", dict(upd_a="Sqrt", N=24, infl=1.013, rot=False), None),
        (f"{tag}_PertObs_N10_i1.04", "L63", nv, "EnKF", dict(upd_a="PertObs", N=10, infl=1.04), None),
        (f"{tag}_PertObs_N100_i1.01", "L63", nv, "EnKF", dict(upd_a="PertObs", N=100, infl=1.01), None),
        (f"{tag}_EnKF_N_N3", "L63", nv, "EnKF_N", dict(N=3), None),
        (f"{tag}_EnKF_N_N10_rot", "L63", nv, "EnKF_N", dict(N=10, rot=True), None),
    ]
CONFIGS += [
    ("L96_PertObs_N40_i1.06", "L96", 1.0, "EnKF", dict(upd_a="PertObs", N=40, infl=1.06), None),
    ("L96_PertObs_N28_i1.08", "L96", 1.0, "EnKF", dict(upd_a="PertObs", N=28, infl=1.08), None),
    ("L96_Sqrt_N24_i1.013_rot", "L96", 1.0, "EnKF", dict(upd_a="Sqrt", N=24, infl=1.013, rot=True), None),
    ("L96_Sqrt_N24_i1.013_norot", "L96", 1.0, "EnKF", dict(upd_a="Sqrt", N=24, infl=1.013, rot=False), None),
    ("L96_Sqrt_N40_i1.01_rot", "L96", 1.0, "EnKF", dict(upd_a="Sqrt", N=40, infl=1.01, rot=True), None),
    ("L96_Sqrt_N40_i1.01_norot", "L96", 1.0, "EnKF", dict(upd_a="Sqrt", N=40, infl=1.01, rot=False), None),
    ("L96_LETKF_N7_i1.04_rot_r4_b2", "L96", 1.0, "LETKF", dict(N=7, rot=True, infl=1.04, loc_rad=4), (2,)),
    ("L96_LETKF_N7_i1.04_rot_r4_b1", "L96", 1.0, "LETKF", dict(N=7, rot=True, infl=1.04, loc_rad=4), (1,)),
    ("L96_LETKF_N10_i1.04_norot_r4_b1", "L96", 1.0, "LETKF", dict(N=10, rot=False, infl=1.04, loc_rad=4), (1,)),
    ("L96_EnKF_N_N24_rot", "L96", 1.0, "EnKF_N", dict(N=24, rot=True), None),
]
CONF = {c[0]: c for c in CONFIGS}


def make_xp(method, kw):
    kw = dict(kw)
    if method == "EnKF":
        upd_a = kw.pop("upd_a")
        return da.EnKF(upd_a, **kw)
    return getattr(da, method)(**kw)


def run_config(cid, Ko=KO, seeds=SEEDS):
    _, model, nv, method, kw, batch = CONF[cid]
    rec = dict(id=cid, model=model, method=method, upd_a=kw.get("upd_a"),
               N=kw["N"], infl=kw.get("infl", 1.0), rot=kw.get("rot", False),
               loc_rad=kw.get("loc_rad"), taper="GC" if method == "LETKF" else None,
               localizer_batch=list(batch) if batch else None,
               noise_var=nv, seeds=seeds,
               rmse_a=[], rmse_a_sigma=[], rmv_a=[], rmv_a_sigma=[],
               rmse_f=[], rmse_f_sigma=[], rmv_f=[], infl_mean=[], wall_s=[],
               wall_assim_s=[])
    for sd in seeds:
        hmm = make_hmm(model, nv, batch, Ko)
        xp = make_xp(method, kw)
        xp.seed = sd
        t0 = time.time()
        hmm, xx, yy = dpr.seed_and_simulate(hmm, xp)
        t1 = time.time()
        xp.assimilate(hmm, xx, yy, liveplots=False)
        t2 = time.time()
        xp.stats.average_in_time()
        t3 = time.time()
        av = xp.avrgs
        rec["rmse_a"].append(float(av.err.rms.a.val))
        rec["rmse_a_sigma"].append(float(av.err.rms.a.prec))
        rec["rmv_a"].append(float(av.spread.rms.a.val))
        rec["rmv_a_sigma"].append(float(av.spread.rms.a.prec))
        rec["rmse_f"].append(float(av.err.rms.f.val))
        rec["rmse_f_sigma"].append(float(av.err.rms.f.prec))
        rec["rmv_f"].append(float(av.spread.rms.f.val))
        if method == "EnKF_N":
            rec["infl_mean"].append(float(av.infl.val))
        rec["wall_s"].append(round(t3 - t0, 2))
        rec["wall_assim_s"].append(round(t2 - t1, 2))
        print(cid, sd, rec["rmse_a"][-1], rec["rmv_a"][-1], rec["rmse_f"][-1],
              rec["wall_s"][-1], flush=True)
    tseq = hmm.tseq
    rec.update(Ko=tseq.Ko, K=tseq.K, dt=tseq.dt, dko=tseq.dko, BurnIn=tseq.BurnIn,
               n_avg_cycles=int(tseq.masko.sum()))
    for key in ["rmse_a", "rmv_a", "rmse_f"]:
        v = np.array(rec[key])
        s = np.array(rec[key + "_sigma"]) if key + "_sigma" in rec else None
        rec[key + "_mean"] = float(v.mean())
        # std error of the 3-seed mean: combine DAPPER's per-seed 1-sigma
        rec[key + "_mean_sigma_dapper"] = float(np.sqrt((s**2).sum()) / len(s))
        rec[key + "_seed_std"] = float(v.std(ddof=1))
    return rec


#: what bench/reference/filtering_dapper.json keeps of a record
KEEP = ("id", "model", "method", "upd_a", "N", "infl", "rot", "loc_rad", "taper",
        "localizer_batch", "noise_var", "seeds", "rmse_a", "rmv_a", "rmse_f", "rmse_a_mean",
        "rmv_a_mean", "rmse_f_mean", "rmse_a_seed_std", "Ko", "BurnIn", "dt", "dko",
        "n_avg_cycles", "wall_s")


def merge() -> str:
    """Collect results/*.json into bench/reference/filtering_dapper.json (atomically)."""
    records = []
    folder = os.path.join(HERE, "results")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                r = json.load(f)
            records.append({k: r[k] for k in KEEP if k in r})
    path = os.path.join(HERE, "reference", "filtering_dapper.json")
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


if __name__ == "__main__":
    if sys.argv[1] == "--list":
        print("\n".join(CONF))
        sys.exit()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    for cid in sys.argv[1:]:
        rec = run_config(cid)
        with open(os.path.join(HERE, "results", cid + ".json"), "w") as f:
            json.dump(rec, f, indent=1)
    print("wrote", merge())
