"""Is an exact sampler within the held-out suite's noise floor? The converged ODE of an exact mixture's denoiser
against pairs of true-sample sets, over many independent draws.

benchmarks/sampler_heldout.py judges the default against the floor's interval for a mean of its held-out draws.
This script checks that interval's premise on one of its mixtures: with the exact denoiser, the probability-flow
ODE solved to tight tolerance is (up to t_min) an exact sampler, so its FD and SW2 to fresh true samples must be
drawn from the floor's own distribution, true samples against other true samples. It prints both over --draws
independent draws (each: new starting noise, new true samples, new directions for SW2) and the difference of
their means with its standard error.

Run:  python benchmarks/floor_check.py [--problem diabetes] [--draws 20]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import sampler_accuracy as sa  # noqa: E402
import sampler_heldout as sh  # noqa: E402

from deepgm.files import write_text  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="diabetes", help="a held-out mixture's name (its first words)")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.draws < 2:
        raise SystemExit(f"--draws must be at least 2 (a spread needs two values), got {args.draws}")
    torch.set_num_threads(1)
    found = sh.problems(False, pathlib.Path("runs"), only=[args.problem])
    if len(found) != 1:
        raise SystemExit(f"--problem {args.problem!r} names {len(found)} held-out problems; give the first words of "
                         "one fitted mixture: diabetes, cancer, 'digits PCA', 'digits GMM 64-D, linear' or "
                         "'digits GMM 64-D, EDM'")
    (name, gmm, schedule, _, x0_fn, _, n, _), = found
    if x0_fn is not None:
        raise SystemExit(f"{name} is a trained network: its ODE is not exact, so it cannot check the floor")
    oracle = sa.Oracle(gmm, schedule, None, 1e-8)
    scores = {m: {"floor": [], "ode": []} for m in sh.METRICS}
    for k in range(args.draws):
        draw = sa.Draw(oracle, n, 20_000 + 10 * k)  # seeds apart from the benchmark's draws and floor draws
        for m in sh.METRICS:
            scores[m]["floor"].append(draw.floor[m])
            scores[m]["ode"].append(draw.value(m, draw.reference))
        print(f"draw {k}: " + ", ".join(f"{m} floor {scores[m]['floor'][-1]:.4f} ODE {scores[m]['ode'][-1]:.4f}"
                                        for m in sh.METRICS), flush=True)
    lines = [f"## {name}: the converged ODE (rk45, rtol = atol = 1e-8) against the noise floor, {args.draws} draws "
             f"of {n} points (`python benchmarks/floor_check.py --problem {args.problem} --draws {args.draws}`)", "",
             "| metric | floor mean (sd) | converged ODE mean (sd) | difference of means (standard error) |",
             "|---|---:|---:|---:|"]
    for m in sh.METRICS:
        f, o = scores[m]["floor"], scores[m]["ode"]
        se = math.sqrt((statistics.variance(f) + statistics.variance(o)) / args.draws)
        lines.append(f"| {m} | {statistics.mean(f):.5f} ({statistics.stdev(f):.5f}) | {statistics.mean(o):.5f} "
                     f"({statistics.stdev(o):.5f}) | {statistics.mean(o) - statistics.mean(f):+.5f} ({se:.5f}) |")
    text = "\n".join(lines) + "\n"
    write_text(pathlib.Path(args.out) / "floor_check.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
