"""Where two-object captions fail: per kind of attribute, on two-object captions only, for one or more runs.

For each text-conditioned run on shapes: --n samples for the first --n two-object test captions (one per caption,
the same noise for every run), read by the attribute classifier. Reports the alignment, each kind's agreement
(colour: both objects' colours, matched as deepgm.data.shapes.agreement matches them), how often both objects
come out in one colour that the caption gives as two, and the relation: how often it holds where both objects'
colour and shape came out right, beside the chance of it holding for two objects dropped in random distinct
cells (3/8 for every relation: the other cell is in a later column, or row, for 27 of the 72 ordered pairs).
A model that places objects without reading the relation sits at chance.

Run:  python benchmarks/t2i_binding.py RUN_DIR [RUN_DIR ...] [--n 200] [--guidance 2] [--name t2i_binding]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deepgm.data.shapes import COLUMN, canonical, relations_between
from deepgm.eval import get_feature_net
from deepgm.family import SamplingPlan
from deepgm.files import write_json, write_text
from deepgm.pipeline import draw, load_prepared, load_run

KINDS = ("n_objects", "colour", "shape", "size", "relation")
# P(relation holds) for an ordered pair of distinct random cells, the same for each relation by symmetry
CHANCE = sum("left of" in relations_between(a, b) for a in range(9) for b in range(9) if a != b) / 72


def binding(run_dir: str, n: int, plan: SamplingPlan, split: str = "test") -> dict:
    run = load_run(run_dir)
    if "text" not in run.model.conditioning:
        raise SystemExit(f"{run_dir} is not text-conditioned; train t2i-shapes-base")
    data = load_prepared(run, split)
    rows = torch.nonzero(data.attributes[:, COLUMN["n_objects"]] == 1).flatten()[:n]
    batch = data.batch(rows)
    cond = {c.key: c.from_batch(batch) for c in run.model.conditioning.conditions.values() if c.needs_examples}
    x = draw(run, len(rows), 0, plan, cond).x.clamp(-1, 1).cpu()
    net = get_feature_net("shapes", {k: v for k, v in run.config["data"].items() if k != "name"})
    read, wanted = net.predict(x), data.attributes[rows]
    agree = data.agreement(read, wanted)
    colours = lambda a: a[:, [COLUMN["colour0"], COLUMN["colour1"]]]  # noqa: E731
    one_colour = (colours(read)[:, 0] == colours(read)[:, 1]) & (colours(canonical(wanted)).diff(dim=1)[:, 0] != 0)
    objects_right = agree["colour"] & agree["shape"]
    out = {"run": run_dir, "step": run.step, "n": len(rows),
           "alignment": float(torch.stack([agree[k] for k in agree]).all(0).double().mean()),
           **{k: float(agree[k].double().mean()) for k in KINDS},
           "one_colour_for_two": float(one_colour.double().mean()),
           "objects_right": float(objects_right.double().mean()),
           "relation_given_objects": float(agree["relation"][objects_right].double().mean()),
           "relation_chance": CHANCE}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="trained text-conditioned runs on shapes")
    parser.add_argument("--n", type=int, default=200, help="two-object captions (one sample each)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="t2i_binding", help="stem of the result files")
    args = parser.parse_args(argv)
    plan = SamplingPlan(args.sampler, args.steps, guidance=args.guidance, threshold="static")
    rows = [binding(r, args.n, plan, args.split) for r in args.runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{args.name}.json", {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
                                           "split": args.split, "rows": rows})
    lines = [f"Two-object captions only: the first {args.n} of the {args.split} split, one sample each, "
             f"{args.sampler} {args.steps} steps, guidance {args.guidance:g}, static thresholding. 'one colour': both "
             f"objects drawn in one colour where the caption names two; 'relation | objects right': the relation "
             f"holds, among samples whose two objects have the right colour and shape (chance {CHANCE:.3f}).", "",
             "| run | step | alignment | count | colour | shape | size | relation | one colour | objects right | "
             "relation \\| objects right |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['step']} | {r['alignment']:.3f} | {r['n_objects']:.3f} | {r['colour']:.3f} | "
                     f"{r['shape']:.3f} | {r['size']:.3f} | {r['relation']:.3f} | {r['one_colour_for_two']:.3f} | "
                     f"{r['objects_right']:.3f} | {r['relation_given_objects']:.3f} |")
    write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
