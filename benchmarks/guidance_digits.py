"""Classifier-free guidance on a class-conditional digits model: alignment (class accuracy) against fidelity (FID).

Imagen's first trade-off (Saharia et al. 2022, fig. 4) at the scale of the demo: for guidance weights w (1 is the
conditional model, 0 the unconditional one) and x0 thresholding static (clip to [-1, 1]) or dynamic (Imagen's
percentile rule), --n samples with the classes in turn, the same starting noise for every row (deepgm's chunked
sampling: sample i depends only on the seed and i). Alignment: the eval classifier's accuracy on the samples
against the class asked for. Fidelity: FID in that classifier's features against the test digits, beside its floor
at the same n (n training digits, the classes in turn, against the test digits): FID is biased upward at small
n, so only the gap to the floor is the model's. The peer for the guided sampler itself is the paper's equation,
checked exactly in tests/test_guidance.py; this script measures what the weight does on a trained network.

Run:  python benchmarks/guidance_digits.py RUN_DIR [--n 500] [--steps 50] [--out benchmarks/results]
e.g.  deepgm demo --out runs/demo && python benchmarks/guidance_digits.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deepgm.eval import get_feature_net
from deepgm.eval.metrics import fid
from deepgm.family import SamplingPlan
from deepgm.files import write_json, write_text
from deepgm.pipeline import draw, load_data, load_run
from deepgm.viz import save_strip

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
THRESHOLDS = ("static", "dynamic:0.995")


def balanced(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of n training examples with the classes in turn, as the samples have them (a random subset's class
    counts would add their own FID)."""
    by_class = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    k = len(by_class)
    return torch.stack([by_class[i % k][i // k] for i in range(n)])


def trade_off_figure(rows: list[dict], weights, floor: float, n: int, path: Path) -> None:
    """Accuracy and FID against w, one curve per thresholding, the FID floor dashed."""
    import matplotlib.pyplot as plt

    from deepgm.viz.plots import save_figure  # sets the Agg backend

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for t in THRESHOLDS:
        mine = [r for r in rows if r["threshold"] == t]
        left.plot(weights, [r["class_accuracy"] for r in mine], marker="o", label=t)
        right.plot(weights, [r["fid"] for r in mine], marker="o", label=t)
    right.axhline(floor, ls="--", c="grey", label=f"floor (train vs test, n={n})")
    left.set(xlabel="guidance weight w", ylabel="class accuracy of the samples", title="alignment")
    right.set(xlabel="guidance weight w", ylabel="FID vs test digits", title="fidelity (lower is better)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a trained class-conditional diffusion run on digits (label dropout > 0)")
    parser.add_argument("--n", type=int, default=500, help="samples per cell")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (NFE = 2 x steps where w is not 0 or 1)")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    if "y" not in run.model.conditioning:
        parser.error(f"{args.run} is not class-conditional; train demo-digits (model.class_conditional: true)")
    train, test = load_data(run.config, "train"), load_data(run.config, "test")
    features = get_feature_net(run.config["data"]["name"], {k: v for k, v in run.config["data"].items() if k != "name"})
    test_feats = features.features(test.x)
    floor = fid(features.features(train.x[balanced(train.y, args.n)]), test_feats)
    rows, pictures = [], {}
    for threshold in THRESHOLDS:
        for w in args.weights:
            start = time.time()
            result = draw(run, args.n, 0, SamplingPlan(args.sampler, args.steps, guidance=w, threshold=threshold))
            x = result.x.clamp(-1, 1).cpu()
            accuracy = float((features.predict(x) == result.cond["y"].cpu()).double().mean())
            rows.append(dict(threshold=threshold, guidance=w, nfe=result.nfe, class_accuracy=accuracy,
                             fid=fid(features.features(x), test_feats), fid_floor_same_n=floor,
                             x_abs_max=float(result.x.abs().max()), seconds=round(time.time() - start, 1)))
            pictures[threshold, w] = x[:20]  # two samples of each class
            print(json.dumps(rows[-1]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "guidance_digits.json", {"run": str(args.run), "step": run.step, "n": args.n,
                                              "sampler": args.sampler, "steps": args.steps, "rows": rows})
    lines = [f"Classifier-free guidance on `{args.run}` (step {run.step}): {args.n} samples per cell, {args.sampler} "
             f"{args.steps} steps, classes in turn, the same noise in every cell. Accuracy: the eval classifier "
             f"(test accuracy {features.test_accuracy:.3f}) on the samples; FID against the test digits, floor "
             f"at the same n (as many training digits, the classes in turn) {floor:.2f}.", "",
             "| w | NFE | accuracy (static) | FID (static) | accuracy (dynamic 0.995) | FID (dynamic 0.995) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for w in args.weights:
        s, d = (next(r for r in rows if r["threshold"] == t and r["guidance"] == w) for t in THRESHOLDS)
        lines.append(f"| {w:g} | {s['nfe']} | {s['class_accuracy']:.3f} | {s['fid']:.2f} | {d['class_accuracy']:.3f} "
                     f"| {d['fid']:.2f} |")
    write_text(out / "guidance_digits.md", "\n".join(lines) + "\n")
    print("\n".join(lines))

    trade_off_figure(rows, args.weights, floor, args.n, out / "guidance_digits.png")
    save_strip([pictures[t, w] for t in THRESHOLDS for w in args.weights], out / "guidance_digits_samples.png",
               labels=[f"w={w:g} {t.split(':')[0]}" for t in THRESHOLDS for w in args.weights])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
