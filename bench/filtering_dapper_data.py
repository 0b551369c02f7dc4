"""DAPPER's own twin data and deterministic analyses, saved for a member-by-member test.

Run beside ``filtering_dapper.py`` in the DAPPER environment (``pip install dapper==1.7.1``):
``python bench/filtering_dapper_data.py``. It writes ``data/<tag>/`` beside this file (the
layout below); ``tests/data/dapper_l96_seed1.npz`` keeps, from ``data/L96_R1_seed1``, the
observations, the first ensembles of 24 and 10 members, and the analysis ensembles at
cycles 1, 10, 50 and 200 of ``EnKF('Sqrt', N=24, infl=1.013)`` and ``LETKF(N=10,
infl=1.04, loc_rad=4)`` with per-site domains (``tests/test_filtering.py``).

Save DAPPER truth/obs/initial ensembles (seed 1, first NC cycles) + reference
forecast/analysis ensembles of DETERMINISTIC DAPPER configs, so enkal can be run on
exactly the same data and compared member-by-member.

DAPPER refuses seed 0, so the data are of seed 1 (the first seed used
in peer.json).  Truth & obs are simulated with the full Ko=20000 (as in peer.json),
so the RNG state after simulate -- hence E0 -- is identical to the peer.json runs.
The assimilation is then run only over the first NC cycles (deterministic configs
=> identical to the first NC cycles of the full run).

Layout: data/<tag>/
  xx_full.npy   (NC*dko+1, Nx) truth at every model step k=0..NC*dko (t = k*dt); xx_full[0] = x(t=0)
  xx_obs.npy    (NC, Nx)  truth at obs times: xx_obs[ko] = xx_full[(ko+1)*dko]
  yy.npy        (NC, Ny)  obs: yy[ko] = xx_obs[ko] + N(0, R)   (H = identity)
  E0_N{N}.npy   (N, Nx)   initial ensemble DAPPER draws for ensemble size N (at t=0)
  ref_<cfg>_Ef.npy (NC, N, Nx) DAPPER forecast ensembles at obs times (before analysis)
  ref_<cfg>_Ea.npy (NC, N, Nx) DAPPER analysis ensembles (after analysis + inflation)
  ref_<cfg>_rmse_a.npy / _rmse_f.npy (NC,) per-cycle RMSE of ens. mean vs truth
  meta.json
"""
import json
import os

import dapper.tools.progressbar as pb
import numpy as np

pb.disable_progbar = True
from dapper.dpr_config import rc  # noqa: E402

rc.liveplotting = False
import dapper.stats  # noqa: E402
import filtering_dapper as R  # noqa: E402
from dapper.tools.seeding import set_seed  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NC = 200
SEED = 1

# capture ensembles passed to Stats.assess
_CAP = {}
_orig_assess = dapper.stats.Stats.assess


def _assess(self, k, ko=None, faus=None, E=None, **kw):
    if k == 0 and E is not None:
        _CAP["0"] = E.copy()
    if ko is not None and E is not None:
        sub = "f" if faus == "f" else "a"
        _CAP.setdefault(sub, {})[ko] = E.copy()
    return _orig_assess(self, k, ko, faus, E=E, **kw)


dapper.stats.Stats.assess = _assess

EXTRA = {  # deterministic variants not in peer.json
    "L96_LETKF_N7_i1.04_norot_r4_b2": ("L96_LETKF_N7_i1.04_norot_r4_b2", "L96", 1.0, "LETKF",
                                        dict(N=7, rot=False, infl=1.04, loc_rad=4), (2,)),
}
R.CONF.update(EXTRA)

DATASETS = {
    "L63_R2_seed1": ("L63", 2.0, ["L63_R2_Sqrt_N3_i1.30", "L63_R2_Sqrt_N10_i1.02_norot",
                                  "L63_R2_Sqrt_N24_i1.013_norot", "L63_R2_EnKF_N_N3"],
                     [3, 10, 24, 100]),
    "L63_R1_seed1": ("L63", 1.0, ["L63_R1_Sqrt_N3_i1.30", "L63_R1_Sqrt_N10_i1.02_norot",
                                  "L63_R1_Sqrt_N24_i1.013_norot", "L63_R1_EnKF_N_N3"],
                     [3, 10, 24, 100]),
    "L96_R1_seed1": ("L96", 1.0, ["L96_Sqrt_N24_i1.013_norot", "L96_Sqrt_N40_i1.01_norot",
                                  "L96_LETKF_N10_i1.04_norot_r4_b1",
                                  "L96_LETKF_N7_i1.04_norot_r4_b2"],
                     [7, 10, 24, 28, 40]),
}


def sim(model, nv, batch=None):
    hmm = R.make_hmm(model, nv, batch, R.KO)
    set_seed(SEED)
    xx, yy = hmm.simulate()
    return hmm, xx, yy


for tag, (model, nv, cfgs, Ns) in DATASETS.items():
    out = os.path.join(HERE, "data", tag)
    os.makedirs(out, exist_ok=True)
    hmm, xx, yy = sim(model, nv)
    dko = hmm.tseq.dko
    np.save(os.path.join(out, "xx_full.npy"), xx[: NC * dko + 1])
    np.save(os.path.join(out, "xx_obs.npy"), xx[hmm.tseq.kko[:NC]])
    np.save(os.path.join(out, "yy.npy"), np.stack(list(yy[:NC])))
    for N in Ns:
        hmm, xx, yy = sim(model, nv)
        np.save(os.path.join(out, f"E0_N{N}.npy"), hmm.X0.sample(N))
    meta = dict(model=model, noise_var=nv, seed=SEED, Ko_simulated=R.KO, n_cycles_saved=NC,
                dt=hmm.tseq.dt, dko=dko, BurnIn=hmm.tseq.BurnIn,
                X0_mu=hmm.X0.mu.tolist(), X0_var=float(hmm.X0.C.diag[0]),
                refs={})
    for cid in cfgs:
        _, m, nv_, method, kw, batch = R.CONF[cid]
        hmm, xx, yy = sim(model, nv, batch)
        # truncate to NC cycles; RNG state (=> E0) unchanged
        hmm.tseq.Ko = NC - 1
        xx_t = xx[: hmm.tseq.K + 1]
        yy_t = yy[:NC]
        xp = R.make_xp(method, kw)
        _CAP.clear()
        xp.assimilate(hmm, xx_t, yy_t, liveplots=False)
        Ef = np.stack([_CAP["f"][i] for i in range(NC)])
        Ea = np.stack([_CAP["a"][i] for i in range(NC)])
        xo = xx_t[hmm.tseq.kko]
        np.save(os.path.join(out, f"ref_{cid}_Ef.npy"), Ef)
        np.save(os.path.join(out, f"ref_{cid}_Ea.npy"), Ea)
        ra = np.sqrt(((Ea.mean(1) - xo) ** 2).mean(1))
        rf = np.sqrt(((Ef.mean(1) - xo) ** 2).mean(1))
        np.save(os.path.join(out, f"ref_{cid}_rmse_a.npy"), ra)
        np.save(os.path.join(out, f"ref_{cid}_rmse_f.npy"), rf)
        assert np.allclose(ra, xp.stats.err.rms.a[:NC])
        E0f = os.path.join(out, f"E0_N{kw['N']}.npy")
        assert np.array_equal(np.load(E0f), _CAP["0"]), "E0 mismatch"
        meta["refs"][cid] = dict(method=method, kwargs=kw,
                                 localizer_batch=list(batch) if batch else None,
                                 E0_file=os.path.basename(E0f),
                                 rmse_a_mean_all200=float(ra.mean()),
                                 rmse_a_mean_last100=float(ra[100:].mean()))
        print(tag, cid, ra.mean(), ra[100:].mean(), flush=True)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
