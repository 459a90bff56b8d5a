"""Few-step sampling of a trained digits model: FID of the calibrated grid against fixed grids, at NFE 6, 10, 20.

benchmarks/sampler_accuracy.py measures grids on exact mixture denoisers; this checks that the calibrated grid
(deepgm.diffusion.calibration) also helps a real network. For one trained run (EMA weights), FID in the digits
classifier's features against the test digits, of --n samples (the same seed, so the same starting noise, for
every row): the default (sampler "auto": the calibration picks trig-abm, DEIS or DPM-Solver++(2M) and the grid),
each of those on the calibrated grid and on fixed grids, and DDIM; with each calibration's choice and its
one-off pilot cost.

Run:  python benchmarks/digits_grids.py RUN_DIR [--n 1000] [--out benchmarks/results]
e.g.  deepgm train demo-digits --out runs/demo && python benchmarks/digits_grids.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deepgm.eval import evaluate_samples, get_feature_net
from deepgm.family import SamplingPlan
from deepgm.files import write_json, write_text
from deepgm.pipeline import draw, load_data, load_run

ROWS = [  # label: (sampler, grid, grid options)
    ("auto / calibrated (default)", "auto", "calibrated"),
    ("trig-abm / calibrated", "trig-abm", "calibrated"),
    ("trig-abm / trig", "trig-abm", "trig"),
    ("trig-abm / log-snr", "trig-abm", "log-snr"),
    ("dpmpp-2m / log-snr", "dpmpp-2m", "log-snr"),
    ("dpmpp-2m / calibrated", "dpmpp-2m", "calibrated"),
    ("deis / karras", "deis", "karras"),
    ("deis / calibrated", "deis", "calibrated"),
    ("ddim / uniform", "ddim", "uniform"),
]
NFES = (6, 10, 20)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a trained diffusion run on digits")
    parser.add_argument("--n", type=int, default=1000, help="samples per FID")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    train, test = load_data(run.config, "train"), load_data(run.config, "test")
    features = get_feature_net("digits", {k: v for k, v in run.config["data"].items() if k != "name"})
    rows = []
    for label, sampler, grid in ROWS:
        for nfe in NFES:
            start = time.time()
            result = draw(run, args.n, 0, SamplingPlan(sampler, nfe, grid=grid))
            metrics = evaluate_samples(result.x.cpu(), features, train.x, test.x)
            cal = result.calibration
            pilot = f"{cal.pilot_nfe} x {cal.pilot}" if cal else None
            rows.append(dict(label=label, nfe=result.nfe, fid=metrics["fid"], floor=metrics["fid_floor"],
                             chosen=cal.chosen if cal else None, pilot=pilot, seconds=time.time() - start))
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"FID of {args.n} samples against the test digits (floor, train vs test: {rows[0]['floor']:.2f}); run "
             f"{args.run} at step {run.step}; calibrated rows: the grid chosen and the one-off pilot cost", "",
             "| sampler / grid | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|" + "---:|" * len(NFES)]
    for label, _, _ in ROWS:
        cells = []
        for r in (r for r in rows if r["label"] == label):
            cells.append(f"{r['fid']:.2f}" + (f" ({r['chosen']}, pilot {r['pilot']})" if r["chosen"] else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "digits_grids.json", rows)
    write_text(out / "digits_grids.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
