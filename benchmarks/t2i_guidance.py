"""Imagen's first finding on captioned shapes: guidance weight against text alignment and image fidelity.

For a trained text-conditioned run (e.g. `deepgm train t2i-shapes-base --out runs/t2i-l6`) and guidance weights w
x {static, dynamic p=0.995} thresholding: --n samples for the first --n test captions (and for the held-out
combinations' captions), the same noise in every cell. Alignment: the fraction of samples whose attributes, read
by the attribute classifier trained on real scenes, all match what the caption names (95% interval). Fidelity: FID
in that classifier's features against the test scenes, beside the data's floor (training vs test scenes at the
same n). Writes a table and a Pareto plot (alignment against FID, one curve per thresholding).

Run:  python benchmarks/t2i_guidance.py RUN_DIR [--n 256] [--sampler ddpm] [--steps 100] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deepgm.eval import get_feature_net
from deepgm.eval.metrics import fid
from deepgm.family import SamplingPlan
from deepgm.files import write_json, write_text
from deepgm.pipeline import draw, load_data, load_prepared, load_run, sample_metrics

WEIGHTS = (1.0, 2.0, 3.0, 5.0, 8.0, 12.0)
THRESHOLDS = ("static", "dynamic:0.995")
SPLITS = ("test", "test-combos")


def pareto_figure(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    from deepgm.viz.plots import save_figure  # sets the Agg backend

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for t in dict.fromkeys(r["threshold"] for r in rows):
        mine = [r for r in rows if r["threshold"] == t]
        ax.plot([r["fid"] for r in mine], [r["alignment"] for r in mine], marker="o", label=t)
        for r in mine:
            ax.annotate(f"w={r['guidance']:g}", (r["fid"], r["alignment"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axvline(rows[0]["fid_floor"], ls="--", c="grey", label="FID floor (same n)")
    ax.set(xlabel="FID vs test scenes (lower is better)", ylabel="alignment on test captions",
           title="guidance: alignment against fidelity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a trained text-conditioned run on shapes")
    parser.add_argument("--n", type=int, default=256, help="samples per cell (one per caption)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sampler", default="ddpm", help="ancestral by default: the ODE samplers give the base "
                                                           "model wrong backgrounds (README)")
    parser.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    parser.add_argument("--thresholds", nargs="+", default=list(THRESHOLDS), help="static and/or dynamic:P")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="t2i_guidance", help="stem of the result files")
    args = parser.parse_args(argv)
    run = load_run(args.run)
    if "text" not in run.model.conditioning:
        parser.error(f"{args.run} is not text-conditioned; train t2i-shapes-base")
    train = load_data(run.config, "train")
    data = {s: load_prepared(run, s) for s in SPLITS}
    features = get_feature_net(run.config["data"]["name"], {k: v for k, v in run.config["data"].items()
                                                             if k != "name"})
    floor = fid(features.features(train.x[: args.n]), features.features(data["test"].x))
    rows = []
    for threshold in args.thresholds:
        for w in args.weights:
            plan = SamplingPlan(args.sampler, args.steps, guidance=w, threshold=threshold)
            row = {"threshold": threshold, "guidance": w, "fid_floor": floor}
            start = time.time()
            for split, test in data.items():
                result = draw(run, args.n, 0, plan, run.model.conditioning.examples(test, args.n))
                m = sample_metrics(run, result, test, 0, train)
                prefix = "" if split == "test" else f"{split}/"
                row.update({prefix + k: m[k] for k in ("alignment", "alignment_ci95", "fid")})
                row.update({prefix + k: v for k, v in m.items() if k.startswith("alignment_") and k[10:] != "ci95"})
                row["nfe"] = result.nfe
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{args.name}.json", {"run": str(args.run), "step": run.step, "n": args.n,
                                           "attribute_net_test_accuracy": features.test_accuracy,
                                           "attribute_accuracy": features.attribute_accuracy, "rows": rows})
    lines = [f"Guidance on `{args.run}` (step {run.step}, encoder {run.model.conditioning['text'].encoder_name}): "
             f"{args.n} samples per cell, {args.sampler} {args.steps} steps, one per caption, the same noise in "
             f"every cell. Alignment: all attributes the caption names, read by the attribute classifier (all "
             f"attributes right on {features.test_accuracy:.3f} of real test scenes; the real images of the same "
             f"captions count as aligned {rows[0]['alignment_of_real_images']:.3f} / "
             f"{rows[0]['test-combos/alignment_of_real_images']:.3f} (test / held-out combinations), the ceiling "
             f"this classifier allows); FID in its features, floor at the same n {floor:.2f}.", "",
             "| threshold | w | NFE | alignment (test) | one object / two (test) | alignment (held-out "
             "combinations) | FID |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['threshold']} | {r['guidance']:g} | {r['nfe']} | {r['alignment']:.3f} ± "
                     f"{r['alignment_ci95']:.3f} | {r['alignment_one_object']:.3f} / "
                     f"{r['alignment_two_objects']:.3f} | {r['test-combos/alignment']:.3f} ± "
                     f"{r['test-combos/alignment_ci95']:.3f} | {r['fid']:.2f} |")
    write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    pareto_figure(rows, out / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
