"""Where two-object captions fail: per kind of attribute, on two-object captions only, for one or more runs.

For each text-conditioned run on shapes: --n samples for the first --n two-object test captions (one per caption,
the same noise for every run), read by the attribute classifier. Reports the alignment, each kind's agreement
(colour: both objects' colours, matched as deepgm.data.shapes.agreement matches them), how often both objects
come out in one colour that the caption gives as two, and the relation: how often it holds where both objects'
colour and shape came out right, beside the chance of it holding for two objects dropped in random distinct
cells (3/8 for every relation: the other cell is in a later column, or row, for 27 of the 72 ordered pairs).
A model that places objects without reading the relation sits at chance.

Where the relation is lost, the second table shows: near t = 1 the denoiser's x0 prediction for pure noise is
the mean image of its caption, E[x0 | caption], which the data fixes exactly (the average of every layout the
relation allows, weighted as the dataset draws them). For captions that differ only in the relation ("a big red
circle above / below a big blue square"), the *relation contrast* is how much more of object A's colour (less
B's) the first half of the image holds (top, or left) under "above" / "left of" than under "below" / "right of".
The data's contrast is what the relation word says about the layout; a network that ignores it has none.

Run:  python benchmarks/t2i_binding.py RUN_DIR [RUN_DIR ...] [--n 200] [--guidance 2] [--name t2i_binding]
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from deepgm.data.shapes import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, COLOURS, COLUMN, canonical, relations_between, render
from deepgm.eval import get_feature_net
from deepgm.eval.alignment import alignment
from deepgm.family import SamplingPlan
from deepgm.files import write_json, write_text
from deepgm.pipeline import Run, _data_options, draw, load_prepared, load_run

KINDS = ("n_objects", "colour", "shape", "size", "relation")
# P(relation holds) for an ordered pair of distinct random cells, the same for each relation by symmetry
CHANCE = sum("left of" in relations_between(a, b) for a in range(9) for b in range(9) if a != b) / 72
# caption pairs for the relation contrast: (colour A, shape A, colour B, shape B), both objects large
PAIRS = (("red", "circle", "blue", "square"), ("green", "cross", "magenta", "diamond"),
         ("yellow", "triangle", "cyan", "circle"), ("blue", "diamond", "red", "cross"))
AXES = {"vertical": ("above", "below"), "horizontal": ("left of", "right of")}
PHRASE = {"above": "above", "below": "below", "left of": "to the left of", "right of": "to the right of"}
T_HIGH = 0.98  # alpha ~ 0.03 on the cosine schedule: x_t is almost pure noise


@functools.cache  # the same for every run
def _mean_scene(colour_a: str, shape_a: str, colour_b: str, shape_b: str, relation: str, size: int) -> torch.Tensor:
    """E[x0 | caption] at t = 1 for a two-object caption: the renders of every cell pair the relation allows, each
    weighted by the chance the dataset gives it (cells uniform, then one of the relations that hold)."""
    row = [-1] * len(ATTRIBUTE_NAMES)
    values = {"n_objects": "two", "relation": relation, "shape0": shape_a, "colour0": colour_a, "shape1": shape_b,
              "colour1": colour_b, "size0": "large", "size1": "large"}
    for name, value in values.items():
        row[COLUMN[name]] = ATTRIBUTE_VALUES[name].index(value)
    total, weight = 0.0, 0.0
    for a in range(9):
        for b in range(9):
            holds = relations_between(a, b) if a != b else []
            if relation in holds:
                row[COLUMN["position0"]], row[COLUMN["position1"]] = a, b
                total, weight = total + render(row, size) / len(holds), weight + 1 / len(holds)
    return total / weight


def _contrast(first: torch.Tensor, second: torch.Tensor, colour_a: str, colour_b: str, axis: str) -> float:
    """How much more of A's colour against B's the first half of `first` holds than that of `second` (C, H, W)."""
    direction = torch.tensor(COLOURS[colour_a], dtype=torch.float32) - torch.tensor(COLOURS[colour_b])
    direction = direction / direction.norm()
    half = first.shape[-1] // 2
    dim = 0 if axis == "vertical" else 1  # halves of the (H, W) map: top and bottom, or left and right

    def lead(x: torch.Tensor) -> float:
        towards_a = torch.einsum("c,chw->hw", direction, x)
        return float(towards_a.narrow(dim, 0, half).mean() - towards_a.narrow(dim, half, half).mean())

    return lead(first) - lead(second)


@torch.no_grad()
def relation_contrast(run_dir: str, run: Run, draws: int = 64) -> dict:
    """Per axis, the relation contrast of the run's denoiser at T_HIGH and of the data's exact mean, averaged over
    PAIRS."""
    text, size = run.model.conditioning["text"], run.config["data"]["size"]
    out = {"run": run_dir}
    for axis, (rel_first, rel_second) in AXES.items():
        model, data = [], []
        for colour_a, shape_a, colour_b, shape_b in PAIRS:
            means = []
            for rel in (rel_first, rel_second):
                caption = f"a big {colour_a} {shape_a} {PHRASE[rel]} a big {colour_b} {shape_b}"
                noise = torch.randn((draws, 3, size, size), generator=torch.Generator().manual_seed(0))
                ids = text.tokenize([caption] * draws)
                means.append(run.model.denoiser(noise, torch.tensor(T_HIGH), text=ids).x0.mean(0))
            model.append(_contrast(*means, colour_a, colour_b, axis))
            data.append(_contrast(_mean_scene(colour_a, shape_a, colour_b, shape_b, rel_first, size),
                                  _mean_scene(colour_a, shape_a, colour_b, shape_b, rel_second, size),
                                  colour_a, colour_b, axis))
        out[axis] = {"model": sum(model) / len(model), "data": sum(data) / len(data)}
    print(json.dumps(out), flush=True)
    return out


def binding(run_dir: str, run: Run, n: int, plan: SamplingPlan, split: str = "test") -> dict:
    data = load_prepared(run, split)
    data = data.subset(torch.nonzero(data.attributes[:, COLUMN["n_objects"]] == 1).flatten()[:n])
    x = draw(run, len(data), 0, plan, run.model.conditioning.examples(data, len(data))).x.clamp(-1, 1).cpu()
    net = get_feature_net("shapes", _data_options(run.config))
    read, wanted = net.predict(x), data.attributes
    agree = data.agreement(read, wanted)
    colours = lambda a: a[:, [COLUMN["colour0"], COLUMN["colour1"]]]  # noqa: E731
    one_colour = (colours(read)[:, 0] == colours(read)[:, 1]) & (colours(canonical(wanted)).diff(dim=1)[:, 0] != 0)
    objects_right = agree["colour"] & agree["shape"]
    out = {"run": run_dir, "step": run.step, "n": len(data), "alignment": alignment(agree)["alignment"],
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
    rows, contrasts = [], []
    for run_dir in args.runs:
        try:
            run = load_run(run_dir)
        except FileNotFoundError as err:
            parser.error(str(err))
        if "text" not in run.model.conditioning:
            parser.error(f"{run_dir} is not text-conditioned; train t2i-shapes-base")
        rows.append(binding(run_dir, run, args.n, plan, args.split))
        contrasts.append(relation_contrast(run_dir, run))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{args.name}.json", {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
                                           "split": args.split, "rows": rows, "relation_contrast": contrasts})
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
    lines += ["", f"Relation contrast of E[x0 | caption] (x0 predicted from pure noise at t = {T_HIGH}, {len(PAIRS)} "
              f"caption pairs of two large objects that differ only in the relation word; the data's: its exact "
              f"mean at t = 1):", "", "| run | vertical: model / data | horizontal: model / data |", "|---|---:|---:|"]
    for c in contrasts:
        lines.append(f"| {c['run']} | {c['vertical']['model']:.3f} / {c['vertical']['data']:.3f} | "
                     f"{c['horizontal']['model']:.3f} / {c['horizontal']['data']:.3f} |")
    write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
