"""How the calibration pilot should judge its candidates: on development problems only.

`deepgm.diffusion.calibration.calibrate` runs every candidate (sampler, grid, options) on a pilot batch and keeps
one. Until 2026-12-07 it kept the one closest to its fine ODE solution sample by sample (rms). At NFE 6 on the
held-out 64-D digits mixture that candidate was not the one closest in distribution (FD 1.11x the best peer's).
This measures, on development problems, which candidate each pilot criterion picks and how far that pick is from
the best candidate's Fréchet distance (FD) and sliced W2 (SW2) to fresh true samples:

  rms    rms to the fine solution (the old rule)
  fd     the Fréchet distance between the candidate's and the fine solution's pilot samples (paired: same noise)
  sum    rms / (least rms) + fd / (least fd) (the rule since 2026-12-07: `calibration.choose`)

Development problems: benchmarks/sampler_accuracy.py's 2-D ring and random 64-D mixture, and three synthetic
ill-conditioned full-covariance mixtures (random rotations, eigenvalues log-spaced over 1e2-1e4), all on DDPM's
linear schedule. None is fitted to real data, so the held-out suite (benchmarks/sampler_heldout.py) stays apart.
The exact denoiser throughout; each candidate runs on 10,000 fresh starting points.

Run:  python benchmarks/pilot_criterion.py [--only ring synthetic] [--out benchmarks/results]   (~28 min, 1 thread)
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import sampler_accuracy as sa  # noqa: E402  (the exact mixtures' oracle and the pilot's seed)

from deepgm.data import make_mixture  # noqa: E402
from deepgm.data.toy import GaussianMixture  # noqa: E402
from deepgm.diffusion.calibration import calibrate, choose  # noqa: E402
from deepgm.diffusion.samplers import SAMPLERS  # noqa: E402
from deepgm.diffusion.schedules import DiscreteVP  # noqa: E402
from deepgm.eval.metrics import fid, sliced_wasserstein  # noqa: E402
from deepgm.files import write_json, write_text  # noqa: E402

CRITERIA = {
    "rms": lambda cal: min(cal.pilot_errors, key=cal.pilot_errors.get),
    "fd": lambda cal: min(cal.pilot_distances, key=cal.pilot_distances.get),
    "sum": lambda cal: choose(cal.pilot_errors, cal.pilot_distances),
}
N = 10_000


def ill_conditioned(dim: int, components: int, seed: int, condition: float) -> GaussianMixture:
    """Means ~ N(0, 0.36 I); each covariance a random rotation of eigenvalues 0.25 x log-spaced down to 1/condition."""
    g = torch.Generator().manual_seed(seed)
    means = 0.6 * torch.randn(components, dim, generator=g, dtype=torch.float64)
    eig = 0.25 * torch.logspace(0, -math.log10(condition), dim, dtype=torch.float64)
    covs = []
    for _ in range(components):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        covs.append(q @ torch.diag(eig) @ q.T)
    weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(weights / weights.sum(), means, torch.stack(covs))


def problems():
    return [("ring 2-D", make_mixture("ring")),
            ("mixture 64-D", make_mixture("mixture", dim=64, n_modes=8, seed=0)),
            ("synthetic 32-D, 6 modes, cond 1e3", ill_conditioned(32, 6, 1, 1e3)),
            ("synthetic 48-D, 8 modes, cond 1e4", ill_conditioned(48, 8, 2, 1e4)),
            ("synthetic 16-D, 12 modes, cond 1e2", ill_conditioned(16, 12, 3, 1e2))]


def measure(name: str, gmm: GaussianMixture, steps_list) -> list[dict]:
    schedule = DiscreteVP.linear(T=1000)
    denoiser = sa.Oracle(gmm, schedule).denoiser()
    z = torch.randn(N, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = gmm.sample(N, generator=torch.Generator().manual_seed(1)).double()
    other = gmm.sample(N, generator=torch.Generator().manual_seed(2)).double()
    sw2 = lambda x: sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(3))  # noqa: E731
    floor = {"fd": fid(other, truth), "sw2": sw2(other)}
    rows = []
    for steps in steps_list:
        start = time.time()
        cal = calibrate(denoiser, "auto", steps, (gmm.dim,), seed=sa.PILOT_SEED, dtype=torch.float64)
        scores = {}
        for label, (sampler, times, options) in cal.candidates.items():
            x = SAMPLERS[sampler](denoiser, times, z, **options)
            scores[label] = {"fd": fid(x, truth), "sw2": sw2(x)} if bool(torch.isfinite(x).all()) else \
                {"fd": math.inf, "sw2": math.inf}
        best = {m: min(s[m] for s in scores.values()) for m in ("fd", "sw2")}
        row = {"problem": name, "nfe": steps, "floor": floor, "best": best, "candidates": len(scores),
               "picks": {c: {"label": (label := pick(cal)), **scores[label]} for c, pick in CRITERIA.items()}}
        assert row["picks"]["sum"]["label"] == cal.chosen
        rows.append(row)
        print(f"{name} NFE {steps}: " + "; ".join(f"{c} {p['label']} FD {p['fd']:.4f} SW2 {p['sw2']:.4f}"
                                                  for c, p in row["picks"].items())
              + f"; best FD {best['fd']:.4f} SW2 {best['sw2']:.4f} ({time.time() - start:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["Each pilot criterion's pick: its FD and SW2 to 10,000 fresh true samples as a ratio to the best "
             "candidate's (1.00: the best there was). Exact denoisers, DDPM linear schedule, sampler 'auto'.", "",
             "| problem | NFE | " + " | ".join(f"{c}: FD, SW2" for c in CRITERIA) + " | best FD, SW2 | floor FD, SW2 |",
             "|---|---:|" + "---|" * (len(CRITERIA) + 2)]
    for r in rows:
        cells = [f"{p['fd'] / r['best']['fd']:.2f}, {p['sw2'] / r['best']['sw2']:.2f}" for p in r["picks"].values()]
        lines.append(f"| {r['problem']} | {r['nfe']} | " + " | ".join(cells)
                     + f" | {r['best']['fd']:.4f}, {r['best']['sw2']:.4f} | {r['floor']['fd']:.4f}, "
                       f"{r['floor']['sw2']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", help="problems whose names start with these words")
    parser.add_argument("--nfe", type=int, nargs="+", default=[6, 10, 20])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, rows = time.time(), []
    for name, gmm in problems():
        if not args.only or any(name.startswith(o) for o in args.only):
            rows += measure(name, gmm, args.nfe)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pilot_criterion.json", rows)
    text = table(rows)
    write_text(out / "pilot_criterion.md", text + f"\n\n`python benchmarks/pilot_criterion.py`, "
                                                  f"{time.time() - start:.0f} s.\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
