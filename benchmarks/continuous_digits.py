"""Continuous-time diffusion on 8x8 digits: likelihoods in bits/dim and FID by sampler and NFE, one table.

For each trained run (EMA weights), on the 359 test digits (17 grey levels in [-1, 1], bins of width 2/16):
- discrete VLB: the T-step bound L_T + sum L_{t-1} + L_0 on t_i = i/T (T = the schedule's, else --vlb-steps),
  discretised-Gaussian L_0 over the bins (deepgm.diffusion.losses.vlb);
- continuous ELBO: VDM's bound, prior + (1/2) int ||eps - eps_hat||^2 dlambda + discretised-Gaussian decoder
  at t_min (deepgm.diffusion.likelihood.continuous_elbo), --elbo-points stratified log-SNRs per digit;
- probability-flow ODE NLL: exact change of variables along the ODE from t_min to 1 (RK45, rtol = atol = 1e-5,
  Hutchinson with --probes Rademacher probes), on uniformly dequantised digits, as a bound on -log P(x) over
  the 17 levels: -log p(x + u) - D log(2/16); with the number of network evaluations per digit;
- FID (digits classifier features, against the test digits; floor: train vs test) of --fid-samples samples
  at NFE 10, 20, 50 for deepgm.sample's default (sampler "auto": the calibration's choice of sampler and grid),
  DDIM (uniform t), DPM-Solver++(2M) (uniform log-SNR), Heun (Karras rho = 7, N steps cost 2N - 1),
  Euler-Maruyama on the reverse SDE (uniform t) and DDPM ancestral (uniform t).
Every likelihood is a bound on (or, for the ODE, an estimate of) -log P(x) of the same discrete data.

Run:  python benchmarks/continuous_digits.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--out benchmarks/results]
      [--likelihoods-from SAVED.json]   (FIDs only; the likelihoods of the saved run of each NAME, ~25-35 min
                                         per model saved) [--only SAMPLER ...]  (those rows only)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from deepgm.diffusion.likelihood import elbo_nll, ode_nll
from deepgm.diffusion.losses import vlb
from deepgm.eval import evaluate_samples, get_feature_net
from deepgm.family import SamplingPlan
from deepgm.likelihood import bits_per_dim
from deepgm.pipeline import draw, load_data, load_run

SAMPLERS = {  # name: (sampler, grid, steps for NFE n)
    "default": ("auto", "calibrated", lambda n: n),  # above 20 steps: trig-abm on the trig grid, no pilot
    "DDIM": ("ddim", "uniform", lambda n: n),
    "DPM-Solver++(2M)": ("dpmpp-2m", "log-snr", lambda n: n),
    "Heun (EDM)": ("heun", "karras", lambda n: (n + 1) // 2),
    "Euler-Maruyama": ("euler-maruyama", "uniform", lambda n: n),
    "DDPM ancestral": ("ddpm", "uniform", lambda n: n),
}
NFES = (10, 20, 50)


def _summary(per_example_bpd: torch.Tensor) -> dict:
    n = len(per_example_bpd)
    return {"bpd": float(per_example_bpd.mean()), "ci95": 1.96 * float(per_example_bpd.std()) / math.sqrt(n)}


def evaluate(name: str, run_dir: str, args) -> dict:
    run = load_run(run_dir)
    train, test = load_data(run.config, "train"), load_data(run.config, "test")
    x0, dims = test.x, test.x[0].numel()
    den = run.model.denoiser
    schedule = den.schedule
    out = {"name": name, "run": run_dir, "step": run.step, "schedule": repr(schedule),
           "weighting": run.model.objective.weighting.name, "test_examples": len(x0), "levels": test.levels}
    start = time.time()
    if name in args.saved:  # the likelihoods of an earlier run of the same config, measured then
        saved = args.saved[name]
        out.update({key: saved[key] for key in ("vlb", "elbo", "ode", "likelihood_seconds")},
                   likelihoods_from=saved["run"])
    else:
        steps = schedule.T or args.vlb_steps
        terms = vlb(den, x0, test.levels, torch.Generator().manual_seed(0), T=steps)
        out["vlb"] = {**_summary(bits_per_dim(terms["total"], dims)), "T": steps}
        elbo = elbo_nll(den, x0, test.levels, args.elbo_points, torch.Generator().manual_seed(1))
        out["elbo"] = {**_summary(elbo.bpd), "points": args.elbo_points}
        ode = ode_nll(den, x0, test.levels, divergence="hutchinson", probes=args.probes,
                      generator=torch.Generator().manual_seed(2))
        out["ode"] = {**_summary(ode.bpd), "nfe": ode.nfe, "probes": args.probes}
        out["likelihood_seconds"] = time.time() - start
    features = get_feature_net("digits", {k: v for k, v in run.config["data"].items() if k != "name"})
    out["fid"] = {}
    for label, (sampler, grid, steps_for) in SAMPLERS.items():
        if args.only and label not in args.only:  # kept from the saved run
            out["fid"].update({k: v for k, v in args.saved[name]["fid"].items() if k.startswith(label + "@")})
            out["fid_floor"] = args.saved[name]["fid_floor"]
            continue
        for nfe in NFES:
            result = draw(run, args.fid_samples, 0, SamplingPlan(sampler, steps_for(nfe), grid=grid))
            metrics = evaluate_samples(result.x.cpu(), features, train.x, test.x)
            out["fid"][f"{label}@{nfe}"] = {"fid": metrics["fid"], "nfe": result.nfe, "precision": metrics["precision"],
                                            "recall": metrics["recall"]}
            out["fid_floor"] = metrics["fid_floor"]
    out["seconds"] = time.time() - start
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | weighting | discrete VLB | continuous ELBO | PF-ODE NLL (NFE/digit) |",
             "|---|---|---|---|---|"]
    for r in rows:
        v, e, o = r["vlb"], r["elbo"], r["ode"]
        lines.append(f"| {r['name']} | {r['weighting']} | {v['bpd']:.3f} ± {v['ci95']:.3f} (T={v['T']}) | "
                     f"{e['bpd']:.3f} ± {e['ci95']:.3f} | {o['bpd']:.3f} ± {o['ci95']:.3f} ({o['nfe']}) |")
    reused = [f"{r['name']} (from {r['likelihoods_from']})" for r in rows if "likelihoods_from" in r]
    if reused:
        lines += ["", "Likelihoods measured on an earlier training of the same config: " + ", ".join(reused)]
    lines += ["", f"FID against the test digits ({rows[0]['fid_floor']:.2f} between train and test digits); "
              "the NFE actually spent in brackets where it differs", "",
              "| model | sampler (grid) | NFE 10 | NFE 20 | NFE 50 |", "|---|---|---|---|---|"]
    for r in rows:
        for s, (_, grid, _) in SAMPLERS.items():
            cells = []
            for n in NFES:
                f = r["fid"][f"{s}@{n}"]
                cells.append(f"{f['fid']:.2f}" + (f" ({f['nfe']})" if f["nfe"] != n else ""))
            lines.append(f"| {r['name']} | {s} ({grid}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--elbo-points", type=int, default=64)
    parser.add_argument("--vlb-steps", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--likelihoods-from", metavar="JSON",
                        help="take each NAME's likelihood columns from a saved continuous_digits.json (same config, "
                             "trained before) and measure only the FIDs")
    parser.add_argument("--only", action="append", choices=list(SAMPLERS),
                        help="re-measure only this sampler's FIDs (repeatable); the rest from --likelihoods-from")
    args = parser.parse_args()
    saved = json.loads(Path(args.likelihoods_from).read_text()) if args.likelihoods_from else []
    args.saved = {r["name"]: r for r in saved}
    missing = [spec.split("=", 1)[0] for spec in args.runs if spec.split("=", 1)[0] not in args.saved]
    if args.only and missing:
        parser.error(f"--only keeps the other rows of a saved run; --likelihoods-from has none named {missing}")
    torch.manual_seed(0)
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        name, run_dir = spec.split("=", 1)
        rows.append(evaluate(name, run_dir, args))
        print(json.dumps(rows[-1], indent=2), flush=True)
        (out / "continuous_digits.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "continuous_digits.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
