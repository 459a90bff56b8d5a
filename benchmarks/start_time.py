"""Where sampling starts: the held-out problems' probability-flow ODE started below t = 1.

Every deepgm grid starts at t = 1, from x_T ~ N(0, sigma(1)^2 I). An eps-predicting network's x0 prediction there is
(z - sigma eps_hat) / alpha: its eps error is multiplied by sigma/alpha, which is 157 at t = 1 on DDPM's linear
schedule and 2e4 on the cosine one. An exact denoiser's x0 is a posterior mean, whose mean square never exceeds the
data's (E|E[x0|z]|^2 <= E|x0|^2), but the trained networks of benchmarks/sampler_heldout.py break that bound at t = 1
by 4x to 6e5x. This script starts the ODE at the time where sigma/alpha = S instead (x ~ N(0, sigma^2 I) there: the
data's share of the marginal, alpha^2 Cov(x0), is dropped), for S from the schedule's own down to 20, and reports:
- m(t_max) = E|x0_hat|^2 on that noise, beside the data's E|x0|^2;
- FD and SW2 to fresh true samples (two-sample noise floors beside them) of the converged ODE (rk45, tolerance as in
  the held-out suite) and of dpmpp-2m on the log-SNR grid at 10 and 20 steps, all from the same noise.

With --run RUN (a trained image run, e.g. the demo's runs/demo), it measures that run instead: FID and class accuracy
of 1000 samples (DEIS 10 steps, DDIM 50 steps, log-SNR grid) from each start.

It measures; it changes nothing in deepgm. Run: python benchmarks/start_time.py [--quick] [--threads 2] [--only ...]
[--run RUN]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import sampler_accuracy as sa  # noqa: E402
import sampler_heldout as sh  # noqa: E402

import deepgm  # noqa: E402
from deepgm.diffusion.grids import make_grid  # noqa: E402

LEVELS = (160, 80, 40, 20)  # sigma/alpha at the start, below the schedule's own
PROBLEMS = ("digits GMM 64-D, linear", "digits PCA 24-D, cosine", "digits GMM 64-D, EDM")  # the exact mixtures
STEPS = (10, 20)


def t_at(schedule, s: float) -> float:
    """The time where sigma/alpha = s."""
    return float(schedule.t_from_log_snr(torch.tensor(-2 * math.log(s), dtype=torch.float64)))


def log_snr_grid(schedule, steps: int, t_max: float) -> torch.Tensor:
    """`steps` times uniform in log-SNR from t_max to the schedule's smallest time, then 0."""
    return make_grid("log-snr", schedule, steps, **({"t_max": t_max} if t_max != 1.0 else {}))


def measure(name, gmm, schedule, x0_fn, n: int, tol: float) -> list[dict]:
    oracle = sa.Oracle(gmm, schedule, x0_fn=x0_fn, reference_tol=tol)
    draw = sa.Draw(oracle, n, seed=0, reference=False)
    unit = torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    data_m2 = float(gmm.sample(20000, generator=torch.Generator().manual_seed(101)).double().pow(2).sum(1).mean())
    native = float(torch.exp(-schedule.log_snr(torch.tensor(1.0, dtype=torch.float64)) / 2))
    rows = []
    for level in [native] + [s for s in LEVELS if s < native * 0.99]:
        t_max = 1.0 if level == native else t_at(schedule, level)
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(t_max, dtype=torch.float64)))
        x_T = sigma * unit
        m2 = float(oracle.x0(x_T, alpha, sigma).pow(2).sum(1).mean())
        row = {"problem": name, "start sigma/alpha": level, "t_max": t_max, "m2": m2, "data m2": data_m2,
               "floor fd": draw.floor["fd"], "floor sw2": draw.floor["sw2"]}
        solvers = [("ode", "rk45", log_snr_grid(schedule, 2, t_max), {"rtol": tol, "atol": tol})]
        solvers += [(f"dpmpp-2m@{k}", "dpmpp-2m", log_snr_grid(schedule, k, t_max), {}) for k in STEPS]
        for label, sampler, times, options in solvers:
            x = deepgm.sample(oracle.denoiser(), x_T=x_T, sampler=sampler, times=times, dtype=torch.float64,
                              **options).x
            finite = bool(torch.isfinite(x).all())
            row[f"{label} fd"] = draw.value("fd", x) if finite else math.inf
            row[f"{label} sw2"] = draw.value("sw2", x) if finite else math.inf
        rows.append(row)
        print(table([row], header=not rows[:-1]), flush=True)
    return rows


def measure_run(run_dir: str, n: int = 1000) -> str:
    """FID and class accuracy of a trained image run's samples from each start (the data's classifier features)."""
    from deepgm.diffusion.sampling import sample
    from deepgm.eval import evaluate_samples, get_feature_net
    from deepgm.family import SamplingPlan
    from deepgm.pipeline import _data_options, load_data, load_run

    run = load_run(run_dir)
    model = run.model
    cond = model.conditioning.for_samples(0, n) if model.conditioning else {}
    train, test = load_data(run.config, "train"), load_data(run.config, "test")
    features = get_feature_net(run.config["data"]["name"], _data_options(run.config))
    schedule = model.denoiser.schedule
    native = float(torch.exp(-schedule.log_snr(torch.tensor(1.0, dtype=torch.float64)) / 2))
    lines = [f"{run_dir}: FID (class accuracy) of {n} samples, log-SNR grid from each start; the last row with x0 "
             "clipped to [-1, 1] (threshold static, the image default)",
             "", "| start sigma/alpha | t_max | threshold | DEIS 10 steps | DDIM 50 steps |",
             "|---:|---:|---|---:|---:|"]
    starts = [(level, "none") for level in [native] + [s for s in LEVELS if s < native * 0.99]] + [(native, "static")]
    for level, threshold in starts:
        denoiser = model.sampling_denoiser(SamplingPlan(threshold=threshold))
        t_max = 1.0 if level == native else t_at(schedule, level)
        sigma = float(schedule.alpha_sigma(torch.tensor(t_max, dtype=torch.float64))[1])
        cells = []
        for sampler, steps in (("deis", 10), ("ddim", 50)):
            x_T = sigma * torch.randn(n, *model.data_shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                x = sample(denoiser, None, x_T.shape, x_T=x_T, sampler=sampler,
                           times=log_snr_grid(schedule, steps, t_max), cond=cond).x
            m = evaluate_samples(x.clamp(-1, 1), features, train.x, test.x, labels=cond.get("y"))
            cells.append(f"{m['fid']:.2f} ({m['class_accuracy']:.3f})" if "class_accuracy" in m else f"{m['fid']:.2f}")
        lines.append(f"| {level:.3g} | {t_max:.4f} | {threshold} | {cells[0]} | {cells[1]} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def table(rows: list[dict], header: bool = True) -> str:
    cols = ["ode", *(f"dpmpp-2m@{k}" for k in STEPS)]
    lines = []
    if header:
        lines += ["| problem | start sigma/alpha | t_max | E|x0_hat|^2 (data) | floor FD, SW2 | "
                  + " | ".join(f"{c} FD, SW2" for c in cols) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        cells = " | ".join(f"{r[c + ' fd']:.3g}, {r[c + ' sw2']:.3g}" for c in cols)
        lines.append(f"| {r['problem']} | {r['start sigma/alpha']:.3g} | {r['t_max']:.4f} | "
                     f"{r['m2']:.3g} ({r['data m2']:.3g}) | {r['floor fd']:.3g}, {r['floor sw2']:.3g} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1000 samples instead of 4000")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", help="problem names starting with these words")
    parser.add_argument("--runs", default="runs", help="where the trained networks' runs are (or go)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--run", help="a trained image run to measure instead of the held-out problems")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run:
        text = measure_run(args.run)
        (out / "start_time_run.md").write_text(text + "\n")
        print(text)
        return 0
    start, rows = time.time(), []
    only = args.only or [name for name in [*PROBLEMS, *sh.NETWORKS] if not name.startswith(sh.FRESH)]
    for name, gmm, schedule, _, x0_fn, _, _, tol in sh.problems(False, pathlib.Path(args.runs), only):
        rows += measure(name, gmm, schedule, x0_fn, 1000 if args.quick else 4000, max(tol, 1e-8))
    text = (f"Start of sampling below t = 1 (`python benchmarks/start_time.py{' --quick' if args.quick else ''}`, "
            f"{time.time() - start:.0f} s)\n\n" + table(rows))
    (out / "start_time.md").write_text(text + "\n")
    print(f"wrote {out}/start_time.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
