"""Progressive distillation against the teacher's samplers at the same number of network evaluations.

For each round of a `deepgm distill` output (students of N = N_0/2, ..., 1 steps): the student with its own plan
(deterministic DDIM over t = i/N), and the teacher at the same N with DDIM (its uniform grid), DPM-Solver++(2M) and
deepgm's default `auto` (a grid and sampler calibrated to the model; its pilot is not counted in the NFE), and once
with DDIM at --reference-steps. With --guided (a `deepgm distill --guidance-range` output), the same at guidance
weights --weights: the guided teacher (two evaluations per step where w != 1) against the student that reads w (one).

Every row: FID in the eval classifier's features against the test digits, beside its floor at the same n (as many
training digits, the classes in turn, against the test digits), and the classifier's accuracy on the class asked
for. The same seed, so the same starting noise, in every row. Students have no likelihood bound (they are trained
at N times only); the teacher's test bits/dim is `deepgm eval TEACHER`'s.

Run:  deepgm train demo-digits --out runs/teacher
      deepgm distill runs/teacher --out runs/pd --rounds 6 --teacher-steps 64 --steps-per-round 400
      deepgm distill runs/teacher --out runs/pd-guided --rounds 4 --teacher-steps 64 --guidance-range 1 4
      python benchmarks/distillation.py runs/teacher --students runs/pd --guided runs/pd-guided
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from deepgm.eval import get_feature_net
from deepgm.eval.metrics import fid
from deepgm.family import SamplingPlan
from deepgm.files import write_json, write_text
from deepgm.pipeline import draw, load_data, load_run, plan_for
from deepgm.viz import save_strip

sys.path.insert(0, str(Path(__file__).parent))
from guidance_digits import balanced  # noqa: E402  (the class-balanced floor, shared with the guidance benchmark)

TEACHER_SAMPLERS = ("ddim", "dpmpp-2m", "auto")


class Scorer:
    """FID and class accuracy of samples, in the eval classifier's features, with the floor at the same n."""

    def __init__(self, config: dict, n: int):
        train, test = load_data(config, "train"), load_data(config, "test")
        self.features = get_feature_net(config["data"]["name"], {k: v for k, v in config["data"].items()
                                                                  if k != "name"})
        self.test_feats = self.features.features(test.x)
        self.floor = fid(self.features.features(train.x[balanced(train.y, n)]), self.test_feats)

    def __call__(self, result) -> dict:
        x = result.x.clamp(-1, 1).cpu()
        return {"fid": fid(self.features.features(x), self.test_feats),
                "class_accuracy": float((self.features.predict(x) == result.cond["y"].cpu()).double().mean()),
                "nfe": result.nfe}


def measure(run, plan: SamplingPlan, n: int, seed: int, score: Scorer, **label) -> dict:
    start = time.time()
    result = draw(run, n, seed, plan)
    row = {**label, "sampler": plan.sampler, "grid": plan.grid, "steps": plan.steps, "guidance": plan.guidance,
           **score(result), "seconds": round(time.time() - start, 1)}
    row["x"] = result.x[:20].clamp(-1, 1).cpu()  # two samples of each class, for the picture (dropped from JSON)
    print(json.dumps({k: v for k, v in row.items() if k != "x"}), flush=True)
    return row


def rounds_of(out: Path) -> list[dict]:
    summary = json.loads((out / "distill.json").read_text())
    return [r for r in summary["rounds"] if r["round"] > 0]


def _table(rows: list[dict], steps: list[int], who: list[str]) -> list[str]:
    lines = ["| steps | " + " | ".join(who) + " |", "|---:|" + "---:|" * len(who)]
    for n in steps:
        cells = []
        for w in who:
            r = next((r for r in rows if r["who"] == w and r["steps"] == n), None)
            cells.append(f"{r['fid']:.2f} ({r['class_accuracy']:.3f})" if r else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def figure(rows: list[dict], reference: dict, floor: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    from deepgm.viz.plots import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for who in sorted({r["who"] for r in rows}):
        mine = sorted((r for r in rows if r["who"] == who), key=lambda r: r["steps"])
        ax.plot([r["steps"] for r in mine], [r["fid"] for r in mine], marker="o", label=who)
    ax.axhline(reference["fid"], ls=":", c="k", label=f"teacher, DDIM {reference['steps']} steps")
    ax.axhline(floor, ls="--", c="grey", label="floor at the same n")
    ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="FID vs test digits (lower is better)")
    ax.set_xticks(sorted({r["steps"] for r in rows}), [str(s) for s in sorted({r["steps"] for r in rows})])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teacher", help="the teacher run (a class-conditional digits diffusion model)")
    parser.add_argument("--students", help="a `deepgm distill` output directory")
    parser.add_argument("--guided", help="a `deepgm distill --guidance-range` output directory")
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 3.0], help="guidance weights (--guided)")
    parser.add_argument("--n", type=int, default=1000, help="samples per row")
    parser.add_argument("--reference-steps", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_run(args.teacher)
    if "y" not in teacher.model.conditioning:
        parser.error(f"{args.teacher} is not class-conditional; train demo-digits")
    score = Scorer(teacher.config, args.n)
    threshold = plan_for(teacher).threshold
    results: dict = {"teacher": args.teacher, "n": args.n, "seed": args.seed, "fid_floor_same_n": score.floor}
    lines = [f"# Progressive distillation on digits\n\nTeacher `{args.teacher}` (step {teacher.step}, "
             f"{teacher.model.denoiser.parameterization}-prediction); {args.n} samples per cell, classes in turn, the "
             f"same seed everywhere; FID against the test digits in the eval classifier's features (its floor at the "
             f"same n: {score.floor:.2f}), class accuracy in brackets. Thresholding: {threshold}.\n"]
    pictures, labels = [], []

    def teacher_plan(sampler: str, steps: int, guidance: float = 1.0) -> SamplingPlan:
        return SamplingPlan(sampler, steps, guidance=guidance, threshold=threshold)

    if args.students:
        reference = measure(teacher, teacher_plan("ddim", args.reference_steps), args.n, args.seed, score,
                            who="teacher DDIM (reference)")
        rows, out = [], Path(args.students)
        for r in rounds_of(out):
            student = load_run(r["run"])
            n = r["student_steps"]
            rows.append(measure(student, plan_for(student), args.n, args.seed, score, who="student", round=r["round"],
                                training_steps=r["training_steps"], minutes=r["minutes"]))
            pictures.append(rows[-1]["x"])
            labels.append(f"student {n}")
            for sampler in TEACHER_SAMPLERS:
                rows.append(measure(teacher, teacher_plan(sampler, n), args.n, args.seed, score,
                                    who=f"teacher {sampler}"))
        steps = sorted({r["steps"] for r in rows}, reverse=True)
        who = ["student", *(f"teacher {s}" for s in TEACHER_SAMPLERS)]
        lines += [f"## Students against the teacher's samplers at the same steps\n\nTeacher with DDIM at "
                  f"{args.reference_steps} steps: FID {reference['fid']:.2f} ({reference['class_accuracy']:.3f}).\n",
                  *_table(rows, steps, who), "",
                  "| round | student steps | training steps | minutes |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['round']} | {r['steps']} | {r['training_steps']} | {r['minutes']:.1f} |"
                  for r in rows if r["who"] == "student"]
        results["reference"] = {k: v for k, v in reference.items() if k != "x"}
        results["rows"] = [{k: v for k, v in r.items() if k != "x"} for r in rows]
        figure(rows, reference, score.floor, Path(args.out) / "distillation.png")

    if args.guided:
        guided_rows, out = [], Path(args.guided)
        for w in args.weights:
            guided_rows.append(measure(teacher, teacher_plan("ddim", args.reference_steps, w), args.n, args.seed,
                                       score, who="teacher DDIM (reference)"))
            for r in rounds_of(out):
                student = load_run(r["run"])
                n = r["student_steps"]
                guided_rows.append(measure(student, plan_for(student, guidance=w), args.n, args.seed, score,
                                           who="student", round=r["round"]))
                guided_rows.append(measure(teacher, teacher_plan("ddim", n, w), args.n, args.seed, score,
                                           who="teacher ddim"))
                if n == 4:
                    pictures.append(guided_rows[-2]["x"])
                    labels.append(f"student 4, w={w:g}")
        lines += ["", "## Guidance distilled into the student (Meng et al. 2023)\n",
                  "FID (class accuracy) and NFE per sample; the student reads w and evaluates once per step.\n",
                  "| w | steps | student | NFE | teacher DDIM | NFE |", "|---:|---:|---:|---:|---:|---:|"]
        for w in args.weights:
            ref = next(r for r in guided_rows if r["guidance"] == w and r["who"] == "teacher DDIM (reference)")
            lines.append(f"| {w:g} | {ref['steps']} | | | {ref['fid']:.2f} ({ref['class_accuracy']:.3f}) | "
                         f"{ref['nfe']} |")
            for s in (r for r in guided_rows if r["guidance"] == w and r["who"] == "student"):
                t = next(r for r in guided_rows if r["guidance"] == w and r["who"] == "teacher ddim"
                         and r["steps"] == s["steps"])
                lines.append(f"| {w:g} | {s['steps']} | {s['fid']:.2f} ({s['class_accuracy']:.3f}) | {s['nfe']} | "
                             f"{t['fid']:.2f} ({t['class_accuracy']:.3f}) | {t['nfe']} |")
        results["guided_rows"] = [{k: v for k, v in r.items() if k != "x"} for r in guided_rows]

    out_dir = Path(args.out)
    write_json(out_dir / "distillation.json", results)
    write_text(out_dir / "distillation.md", "\n".join(lines) + "\n")
    if pictures:
        save_strip(pictures, out_dir / "distillation_samples.png", labels=labels)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
