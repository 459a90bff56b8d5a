"""A few sampler configurations on one very large draw: the distribution metrics of sampler_accuracy.py where their
two-sample noise and finite-n bias are small.

At the sample sizes of the main benchmark, sw2 between a sampler's output and true samples carries a bias that
depends on the shape of the sampler's distribution (an empirical quantile's noise grows as 1/density, so filling
the gaps between modes lowers it), and fd of a whole mixture sees only its mean and covariance. This script runs
named configurations (the ring's goal cells where the main benchmark's verdict and its large draw disagreed; the
64-D mixture's where its large draw put deepgm behind on fd) from the same noise at n = 1e6, and prints each metric
beside two diagnostics that explain them: the weight-averaged within-mode variance (trace) and the mean distance
from the origin, against their exact values. No reference ODE solve (it would dominate the cost); the converged ODE
(rk45, tol 1e-6) stands in for it.

Run: python benchmarks/large_n_check.py [--n 1000000] [--mixture ring|mixture-64] (about 15 min and 9 GB for the
ring at 1e6)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

from deepgm.data import make_mixture
from deepgm.diffusion.schedules import DiscreteVP

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import sampler_accuracy as sa  # noqa: E402  (the benchmark's oracle, configurations and metrics)

PROBLEMS = {  # name: (the benchmark's mixture, {NFE: configurations})
    "ring": (lambda: make_mixture("ring"),
             {6: ["auto/calibrated", "LMS/default/linspace", "DEIS2/exp/linspace"],
              10: ["auto/calibrated", "trig-abm/trig(0.5)", "DEIS3/exp/linspace", "DEIS2/karras/linspace"]}),
    "mixture-64": (lambda: make_mixture("mixture", dim=64, n_modes=8, seed=0),
                   {6: ["auto/calibrated", "DEIS3/exp/linspace"],
                    10: ["auto/calibrated", "DEIS3/karras/linspace"],
                    20: ["auto/calibrated", "DEIS3/karras/linspace"]}),
}


def diagnostics(gmm, x) -> str:
    k = gmm.assign(x)
    within = sum(float(w) * float(torch.cov(x[k == j].T).reshape(gmm.dim, gmm.dim).trace())
                 for j, w in enumerate(gmm.weights) if int((k == j).sum()) > 1)
    return f"within-mode variance {within:.4f}, mean |x| {float(x.norm(dim=1).mean()):.4f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--mixture", default="ring", choices=sorted(PROBLEMS),
                        help="the benchmark's 2-D ring or its 64-D mixture, each with its own cells")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    make, cells = PROBLEMS[args.mixture]
    gmm = make()
    oracle = sa.Oracle(gmm, DiscreteVP.linear(T=1000))
    configs = {c.label: c for c in sa.deepgm_configs() + sa.diffusers_configs()}
    draw = sa.Draw(oracle, args.n, seed=7, reference=False)
    print(f"{args.mixture}, n = {args.n}; exact within-mode variance "
          f"{float(torch.einsum('k,kii->', gmm.weights, gmm.covs)):.4f}; floor (true samples): "
          + ", ".join(f"{m} {v:.6f}" for m, v in draw.floor.items()) + f"; {diagnostics(gmm, draw.truth)}", flush=True)
    runs = [("converged ODE (rk45)", None, lambda z: sa.run_deepgm(oracle, z, 2, "rk45", "uniform", lambda _: 2, 0,
                                                          rtol=1e-6, atol=1e-6))]
    runs += [(label, nfe, lambda z, c=configs[label], nfe=nfe: c.run(oracle, z, nfe))
             for nfe, labels in cells.items() for label in labels]
    for label, nfe, run in runs:
        x = run(draw.z)[0].double()
        scores = draw.score(x, det=False)
        where = f"NFE {nfe}" if nfe else "any NFE"
        print(f"{where:7s} {label:24s} " + " ".join(f"{m} {scores[m]:.6f}" for m in sa.METRICS[1:])
              + f"; {diagnostics(gmm, x)} ({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
